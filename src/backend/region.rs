//! Host memory registered with a backend for DMA straight into it (reads
//! into nbdkit's request buffers, `direct=on`), and the check that keeps a
//! batch's target inside such a registration.

use super::BackendError;

/// Checks that `target` (a batch's host target) lies inside `region`, and
/// that `region` is `backend`'s: the one check between a
/// [`TransferOp::DownloadTo`](super::TransferOp::DownloadTo) and memory the driver was not told of.
pub(crate) fn check_target(
    region: &HostRegion,
    backend: usize,
    target: &[u8],
) -> Result<(), BackendError> {
    if region.backend == backend && region.covers(target) {
        return Ok(());
    }
    Err(BackendError::OutOfBounds(format!(
        "a host target of {} bytes outside the registered host memory",
        target.len()
    )))
}

/// Host memory the caller owns, registered with a backend for DMA
/// ([`Backend::register_host`](super::Backend::register_host)): a request buffer the block store reads
/// straight into. It holds the range's address only to check that a
/// batch's target lies inside it; it owns no memory and reads none.
/// Given back with [`Backend::unregister_host`](super::Backend::unregister_host); a region dropped without
/// that stays registered (the driver keeps its pages pinned) until the
/// backend is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// First byte and length of the registered range.
    start: usize,
    len: usize,
    /// The registering backend's address, so that no other takes it.
    backend: usize,
    /// What the backend needs to reach it (Vulkan: the buffer and memory
    /// that import it, and where `start` lies in them).
    pub(crate) handle: [u64; 2],
    pub(crate) offset: u64,
}

impl HostRegion {
    /// A region for `buf`, registered by the backend at address `backend`
    /// (its `self` pointer), with the backend's own `handle`.
    pub(crate) fn new(buf: &[u8], backend: usize, handle: [u64; 2], offset: u64) -> Self {
        HostRegion {
            start: buf.as_ptr() as usize,
            len: buf.len(),
            backend,
            handle,
            offset,
        }
    }

    /// Whether `buf` lies wholly inside the registered range.
    pub fn covers(&self, buf: &[u8]) -> bool {
        let start = buf.as_ptr() as usize;
        start >= self.start
            && start
                .checked_add(buf.len())
                .is_some_and(|end| end <= self.start + self.len)
    }

    /// Bytes registered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first registered byte's address.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The address of the backend that registered it.
    pub(crate) fn backend_of(&self) -> usize {
        self.backend
    }

    /// Where `target` (inside the region) starts, from the region's start.
    #[cfg_attr(not(feature = "vulkan"), allow(dead_code))]
    pub(crate) fn offset_of(&self, target: &[u8]) -> usize {
        target.as_ptr() as usize - self.start
    }
}

/// The address that identifies a backend to its [`HostRegion`]s.
pub(crate) fn backend_id<T: ?Sized>(backend: &T) -> usize {
    backend as *const T as *const u8 as usize
}
