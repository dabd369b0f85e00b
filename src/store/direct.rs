//! Reads by DMA straight into the caller's buffer: the registration cache.
//!
//! nbdkit hands each worker thread one request buffer, which it reuses
//! from request to request and reallocates only to grow it, for a request
//! larger than any before (nbdkit's `server/threadlocal.c`); it frees it
//! when the thread exits. [`BlockStore::read_direct`] takes such a buffer:
//! the first read of at least [`DIRECT_READ`] bytes registers it with the
//! driver (pinning its pages, milliseconds), and that read and every later
//! one whose buffer lies inside the registration download into it by DMA,
//! with no staging and no copy after.
//!
//! The registration holds the pages that were there when it was made, so
//! it must never serve memory that was freed and mapped again at the same
//! address. Each thread has at most one, kept here, and it is given back:
//!
//! - when a request of the thread (read or write) comes with a buffer that
//!   starts elsewhere: nbdkit moved it (`realloc`, for a request longer
//!   than any before). The first request after a move sees it, and gives
//!   the old registration back before anything could use it. A buffer
//!   that starts at the same address but is longer grew in place: the
//!   registered pages are still its first bytes, so a write keeps the
//!   registration, and a read it does not cover registers the longer
//!   buffer instead;
//! - when the thread exits: a thread-local guard runs before the C library
//!   runs nbdkit's own thread-local destructor, which frees the buffer;
//! - when the store closes (`Drop`).
//!
//! Bounded: one registration per thread, in a table of [`SLOTS`] made at
//! open, so a request allocates nothing once its thread has registered
//! (the driver allocates inside the registering call itself, which is why
//! small reads, the kernel's swap-ins, never register one). A thread that
//! finds the table full, or a backend that cannot register, reads through
//! staging as before.
//!
//! [`BlockStore::read_direct`]: super::BlockStore::read_direct

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tracing::{debug, info};

use crate::backend::{Backend, BackendError, HostRegion};
use crate::size::ByteSize;

/// Reads at least this long register their buffer. A registration costs a
/// millisecond or more (docs/BENCHMARKS.md, "Direct reads"); the copy it
/// saves is about 10 µs per 128 KiB, so it pays for itself after a few
/// hundred such reads of the same buffer, and nbdkit keeps a thread's
/// buffer for the thread's life. 128 KiB is what `vramswap start` caps the
/// kernel's requests at and reads once on every thread to warm it up,
/// before swap is on: every thread registers then, not under reclaim.
/// Shorter reads use a registration their buffer lies in but never make one.
pub const DIRECT_READ: usize = 128 << 10;

/// Most threads with a registration at once (nbdkit runs `--threads`
/// workers per connection; `vramswap start` has 16 per connection).
pub const SLOTS: usize = 256;

/// What direct reads did, since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Buffers registered.
    pub registered: u64,
    /// Registrations given back.
    pub unregistered: u64,
    /// Registrations refused by the backend (the read used staging).
    pub refused: u64,
    /// Reads downloaded straight into their buffer.
    pub reads: u64,
}

impl DirectStats {
    /// Registrations held now.
    pub fn live(&self) -> u64 {
        self.registered - self.unregistered
    }
}

/// One thread's registration.
#[derive(Default)]
struct Slot {
    /// Claimed by a thread (whose thread-local [`Claim`] names this slot).
    claimed: bool,
    region: Option<HostRegion>,
    /// The buffer (address, length) the backend last refused, so a refused
    /// buffer is not tried on every request.
    refused: Option<(usize, usize)>,
}

/// The registration cache of one store.
pub(super) struct Registrations {
    backend: Arc<dyn Backend>,
    slots: Box<[Mutex<Slot>]>,
    /// The backend cannot register host memory at all.
    unsupported: AtomicBool,
    registered: AtomicU64,
    unregistered: AtomicU64,
    refused: AtomicU64,
    reads: AtomicU64,
}

/// A thread's slot in one store's table; gives the registration back when
/// the thread exits.
struct Claim {
    table: Weak<Registrations>,
    slot: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            table.release(self.slot);
        }
    }
}

thread_local! {
    /// This thread's slot, in the table of the store it last registered
    /// with: one registration per thread, whatever the number of stores.
    static CLAIM: RefCell<Option<Claim>> = const { RefCell::new(None) };
}

/// A thread's slot, locked for the length of a read, and the registration
/// that covers the read's buffer, if any.
pub(super) struct Direct<'a> {
    slot: Option<MutexGuard<'a, Slot>>,
}

impl Direct<'_> {
    /// The registration to download into, if the buffer has one.
    pub(super) fn region(&self) -> Option<&HostRegion> {
        self.slot.as_ref().and_then(|s| s.region.as_ref())
    }
}

impl Registrations {
    pub(super) fn new(backend: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Registrations {
            backend,
            slots: (0..SLOTS).map(|_| Mutex::default()).collect(),
            unsupported: AtomicBool::new(false),
            registered: AtomicU64::new(0),
            unregistered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        })
    }

    pub(super) fn stats(&self) -> DirectStats {
        DirectStats {
            registered: self.registered.load(Ordering::Relaxed),
            unregistered: self.unregistered.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }

    pub(super) fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// This thread's slot in this table, if it has one.
    fn own_slot(self: &Arc<Self>) -> Option<usize> {
        CLAIM.with_borrow(|claim| {
            claim
                .as_ref()
                .filter(|c| std::ptr::eq(c.table.as_ptr(), Arc::as_ptr(self)))
                .map(|c| c.slot)
        })
    }

    fn lock(&self, slot: usize) -> MutexGuard<'_, Slot> {
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives back this thread's registration if `buf` starts elsewhere: a
    /// request with a buffer at another address means the buffer moved.
    pub(super) fn forget_if_moved(self: &Arc<Self>, buf: &[u8]) {
        if let Some(slot) = self.own_slot() {
            let mut slot = self.lock(slot);
            let moved = slot
                .region
                .as_ref()
                .is_some_and(|r| r.start() != buf.as_ptr() as usize);
            if moved {
                self.unregister(&mut slot);
            }
        }
    }

    /// The registration to read `buf` through: this thread's, if it starts
    /// where `buf` does and covers it; else, for a read of at least [`DIRECT_READ`] bytes, a new one
    /// (the old one given back first). `None` inside: read through staging.
    pub(super) fn for_read(self: &Arc<Self>, buf: &[u8]) -> Direct<'_> {
        let slot = match self.own_slot() {
            Some(slot) => slot,
            None if buf.len() >= DIRECT_READ && !self.unsupported.load(Ordering::Relaxed) => {
                match self.claim() {
                    Some(slot) => slot,
                    None => return Direct { slot: None },
                }
            }
            None => return Direct { slot: None },
        };
        let mut guard = self.lock(slot);
        let start = buf.as_ptr() as usize;
        if guard
            .region
            .as_ref()
            .is_some_and(|r| r.start() == start && r.covers(buf))
        {
            return Direct { slot: Some(guard) };
        }
        self.unregister(&mut guard);
        let key = (buf.as_ptr() as usize, buf.len());
        if buf.len() >= DIRECT_READ
            && guard.refused != Some(key)
            && !self.unsupported.load(Ordering::Relaxed)
        {
            match self.backend.register_host(buf) {
                Ok(region) => {
                    self.registered.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        "registered a {} request buffer for direct reads",
                        ByteSize(buf.len() as u64)
                    );
                    guard.region = Some(region);
                    guard.refused = None;
                }
                Err(err) => self.refuse(&mut guard, key, err),
            }
        }
        Direct { slot: Some(guard) }
    }

    fn refuse(&self, slot: &mut Slot, key: (usize, usize), err: BackendError) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if matches!(err, BackendError::UnsupportedDevice { .. }) {
            if !self.unsupported.swap(true, Ordering::Relaxed) {
                info!("direct reads off: {err}; reads go through staging");
            }
        } else {
            debug!("registering a request buffer failed ({err}); this one reads through staging");
        }
        slot.refused = Some(key);
    }

    /// Takes a free slot for this thread, giving back the one it holds in
    /// another store's table (one registration per thread).
    fn claim(self: &Arc<Self>) -> Option<usize> {
        let slot = self.slots.iter().position(|slot| {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            !std::mem::replace(&mut slot.claimed, true)
        })?;
        let claim = Claim {
            table: Arc::downgrade(self),
            slot,
        };
        // The old claim drops (and gives its registration back) here.
        let old = CLAIM.with_borrow_mut(|c| c.replace(claim));
        drop(old);
        Some(slot)
    }

    fn unregister(&self, slot: &mut Slot) {
        if let Some(region) = slot.region.take() {
            self.backend.unregister_host(region);
            self.unregistered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A thread's exit: its registration goes back, its slot is free.
    fn release(&self, slot: usize) {
        let mut slot = self.lock(slot);
        self.unregister(&mut slot);
        *slot = Slot::default();
    }

    /// The store closes: every registration goes back. No read runs.
    pub(super) fn release_all(&self) {
        for slot in 0..self.slots.len() {
            let mut slot = self.lock(slot);
            self.unregister(&mut slot);
        }
    }
}
