//! A CUDA lane: pinned staging memory, a stream of its own and an event
//! that marks the end of the pending batch, all made once.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrayvec::ArrayVec;
use cudarc::driver::sys::{self, CUevent_flags, CUresult, CUstream_flags};
use tracing::{debug, warn};

use super::conv;
use super::device::DeviceShared;
use crate::backend::hostmem::LockedRegion;
use crate::backend::{
    backend_id, check_batch, check_target, BackendError, HostRegion, Lane, TransferOp, MAX_BATCH,
};

/// `cuMemHostRegister` takes any range, but whole pages are what the
/// driver pins, and what `LockedRegion` hands out at the least.
const STAGING_ALIGN: usize = 4096;

/// Host memory a lane stages through.
enum Staging {
    /// Our own locked memory, registered with the driver (see `hostmem`
    /// for why this is preferred). Unregistered before it is unmapped.
    Registered(LockedRegion),
    /// Pinned memory from `cuMemHostAlloc`, where registering failed.
    Allocated { ptr: NonNull<u8>, len: usize },
}

impl Staging {
    fn ptr(&self) -> *mut u8 {
        match self {
            Staging::Registered(region) => region.as_ptr(),
            Staging::Allocated { ptr, .. } => ptr.as_ptr(),
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Staging::Registered(region) => region.as_mut_slice(),
            // SAFETY: `ptr..ptr+len` was allocated by `cuMemHostAlloc` and is
            // owned by `self`; `&mut self` makes this the only reference.
            Staging::Allocated { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }

    fn bytes_ref(&self) -> &[u8] {
        match self {
            Staging::Registered(region) => region.as_slice(),
            // SAFETY: as in `bytes`; a shared borrow of `self` rules out a
            // live mutable one.
            Staging::Allocated { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

/// Registers the caller's memory `buf` with the driver
/// (`cuMemHostRegister`): it pins the pages, and copies into any part of
/// them then run by DMA at full speed, where unregistered memory would be
/// copied through the driver's own staging. The driver takes any address
/// and length (page alignment was a CUDA 4.0 rule) and pins the whole
/// pages under them. Flags 0: the one primary context uses it, and no
/// device pointer to it is needed (not `PORTABLE`, not `DEVICEMAP`).
pub(super) fn register_host(
    shared: &Arc<DeviceShared>,
    buf: &[u8],
) -> Result<HostRegion, BackendError> {
    if buf.is_empty() {
        return Err(BackendError::OutOfBounds("an empty host region".into()));
    }
    shared.bind()?;
    // SAFETY: the context is current; `buf` is live memory of this process.
    // Registering reads and writes none of it; the registration outlives
    // the borrow, and copies reach it only through a later borrow checked
    // to lie inside it (`check_target`).
    conv::check("cuMemHostRegister_v2", unsafe {
        sys::cuMemHostRegister_v2(buf.as_ptr() as *mut c_void, buf.len(), 0)
    })
    .map_err(|e| shared.note(e))?;
    Ok(HostRegion::new(buf, backend_id(&**shared), [0; 2], 0))
}

/// Gives back a registration from [`register_host`]. The memory may
/// already be freed (nbdkit reallocated its buffer): the driver then lets
/// go of the pages it pinned.
pub(super) fn unregister_host(shared: &Arc<DeviceShared>, region: HostRegion) {
    if shared.make_current().is_err() {
        return;
    }
    let start = region.start() as *mut c_void;
    // SAFETY: `start` was registered by `register_host` on this context;
    // no batch uses it any more (the caller's rule).
    let result = unsafe { sys::cuMemHostUnregister(start) };
    if result != CUresult::CUDA_SUCCESS {
        debug!("{}", conv::error("cuMemHostUnregister", result));
    }
}

/// One step of a batch, checked and resolved to addresses.
#[derive(Clone, Copy)]
enum Step {
    Upload {
        dst: sys::CUdeviceptr,
        src: *const u8,
        len: usize,
    },
    Download {
        dst: *mut u8,
        src: sys::CUdeviceptr,
        len: usize,
    },
    Zero {
        dst: sys::CUdeviceptr,
        words: usize,
    },
}

/// A run of a batch's copies that one `cuMemcpyBatchAsync` queues: the
/// driver may run a batch's copies in any order (only the batch as a
/// whole keeps its place in the stream), so a run holds copies of one
/// direction whose destinations do not overlap. None of them then writes
/// what another reads or writes (uploads read host memory and write
/// chunks, downloads the reverse), and every order lands the same bytes.
/// Host addresses go as they are (`Adapter::host_pointers`).
#[derive(Default)]
struct CopyRun {
    dsts: ArrayVec<sys::CUdeviceptr, MAX_BATCH>,
    srcs: ArrayVec<sys::CUdeviceptr, MAX_BATCH>,
    sizes: ArrayVec<usize, MAX_BATCH>,
}

impl CopyRun {
    /// The run that starts `steps`, if it has two copies or more: one
    /// copy costs the same either way (2.3 µs of the caller's time on an
    /// H100), 8 scattered ones 16.4 µs a copy at a time against 8.0 in one
    /// call, 64 of them 132 against 54 (docs/BENCHMARKS.md).
    fn take(steps: &[Step]) -> Option<CopyRun> {
        let upload = matches!(steps.first()?, Step::Upload { .. });
        let mut run = CopyRun::default();
        for step in steps.iter().take(MAX_BATCH) {
            let (dst, src, len) = match *step {
                Step::Upload { dst, src, len } if upload => (dst, src as sys::CUdeviceptr, len),
                Step::Download { dst, src, len } if !upload => (dst as sys::CUdeviceptr, src, len),
                _ => break,
            };
            run.dsts.push(dst);
            run.srcs.push(src);
            run.sizes.push(len);
        }
        if run.sizes.len() < 2 {
            return None;
        }
        let mut ranges: ArrayVec<(u64, u64), MAX_BATCH> = run
            .dsts
            .iter()
            .zip(&run.sizes)
            .map(|(&dst, &len)| (dst, dst.saturating_add(len as u64)))
            .collect();
        ranges.sort_unstable();
        if ranges.windows(2).any(|pair| pair[1].0 < pair[0].1) {
            return None;
        }
        Some(run)
    }

    fn len(&self) -> usize {
        self.sizes.len()
    }
}

pub(super) struct CudaLane {
    shared: Arc<DeviceShared>,
    stream: sys::CUstream,
    /// Recorded after each batch; complete once every step before it is.
    event: sys::CUevent,
    /// `None` only while building or dropping.
    staging: Option<Staging>,
    /// Start of the staging memory; fixed for the lane's life.
    staging_ptr: *mut u8,
    staging_len: usize,
    pending: bool,
}

// SAFETY: the stream and event handles are only passed to the driver, which
// accepts them from any thread once the context is current (`bind`); the
// staging memory is owned by the lane and reached through `&mut self`.
unsafe impl Send for CudaLane {}
// SAFETY: the only `&self` method reachable outside this module is
// `Lane::staged`, which reads the staging memory; the driver is called from
// `&mut self` methods (and `Drop`) alone.
unsafe impl Sync for CudaLane {}

impl CudaLane {
    pub(super) fn new(shared: Arc<DeviceShared>, staging_len: usize) -> Result<Self, BackendError> {
        shared.bind()?;
        let mut lane = CudaLane {
            shared,
            stream: std::ptr::null_mut(),
            event: std::ptr::null_mut(),
            staging: None,
            staging_ptr: std::ptr::null_mut(),
            staging_len,
            pending: false,
        };
        // From here on `Drop` gives back whatever was made.
        // Non-blocking: the lane's copies must not wait for, nor hold up,
        // work another library queues on the legacy default stream.
        let flags = CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: the context is current; the out-pointer is valid.
        conv::check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut lane.stream, flags)
        })
        .map_err(|e| lane.shared.note(e))?;
        // No timing: cheaper to record. No blocking sync: nothing waits on
        // the event in the driver (see `wait_event`).
        let flags = CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: as above.
        conv::check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut lane.event, flags)
        })
        .map_err(|e| lane.shared.note(e))?;
        let staging = lane.create_staging().map_err(|e| lane.shared.note(e))?;
        lane.staging_ptr = staging.ptr();
        lane.staging = Some(staging);
        Ok(lane)
    }

    /// Our own locked memory, registered with the driver; driver-allocated
    /// pinned memory where that fails. The context is current.
    fn create_staging(&self) -> Result<Staging, BackendError> {
        let len = self.staging_len;
        match LockedRegion::new(len, STAGING_ALIGN) {
            Ok(region) => {
                // SAFETY: the range is a live mapping owned by `region`,
                // which is unregistered before it is unmapped (`Drop`).
                let registered = conv::check("cuMemHostRegister_v2", unsafe {
                    sys::cuMemHostRegister_v2(region.as_ptr() as *mut c_void, region.len(), 0)
                });
                match registered {
                    Ok(()) => return Ok(Staging::Registered(region)),
                    Err(err) => {
                        debug!("registering staging memory failed ({err}); using cuMemHostAlloc")
                    }
                }
            }
            Err(err) => debug!("mapping staging memory failed ({err}); using cuMemHostAlloc"),
        }
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the context is current; the out-pointer is valid. Freed
        // with `cuMemFreeHost` in `Drop`.
        conv::check_host("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut ptr, len, 0)
        })?;
        let ptr = NonNull::new(ptr as *mut u8).ok_or(BackendError::OutOfHostMemory)?;
        Ok(Staging::Allocated { ptr, len })
    }

    /// Resolves a step that `check_batch` passed to addresses, checking
    /// that its chunk is allocated; `target` is the start of the batch's
    /// host target. Calls no driver function.
    fn resolve(&self, op: &TransferOp, target: *mut u8) -> Result<Step, BackendError> {
        let chunk = self.shared.chunk_ptr(op.chunk())?;
        // `wrapping_add`: the offsets lie inside the staging buffer, as
        // `check_batch` saw to.
        Ok(match *op {
            TransferOp::Upload {
                staging_offset,
                chunk_offset,
                len,
                ..
            } => Step::Upload {
                dst: chunk + chunk_offset,
                src: self.staging_ptr.wrapping_add(staging_offset),
                len: len as usize,
            },
            TransferOp::Download {
                staging_offset,
                chunk_offset,
                len,
                ..
            } => Step::Download {
                dst: self.staging_ptr.wrapping_add(staging_offset),
                src: chunk + chunk_offset,
                len: len as usize,
            },
            TransferOp::Zero {
                chunk_offset, len, ..
            } => Step::Zero {
                dst: chunk + chunk_offset,
                words: (len / 4) as usize,
            },
            TransferOp::DownloadTo {
                host_offset,
                chunk_offset,
                len,
                ..
            } => Step::Download {
                dst: target.wrapping_add(host_offset),
                src: chunk + chunk_offset,
                len: len as usize,
            },
        })
    }

    /// Queues one checked step on the lane's stream.
    fn enqueue(&self, step: Step) -> Result<(), BackendError> {
        // For each arm: the context is current; `check_batch` and `resolve`
        // checked the addresses to lie inside the pinned staging buffer (or
        // the batch's host target, inside registered memory) and a live
        // chunk, and all stay so until `wait` returns (the store keeps the
        // chunk and the target, the lane its staging); the stream is the
        // lane's.
        let (call, result) = match step {
            Step::Upload { dst, src, len } => {
                // SAFETY: see above.
                let result = unsafe {
                    sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, self.stream)
                };
                ("cuMemcpyHtoDAsync_v2", result)
            }
            Step::Download { dst, src, len } => {
                // SAFETY: see above.
                let result =
                    unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, self.stream) };
                ("cuMemcpyDtoHAsync_v2", result)
            }
            Step::Zero { dst, words } => {
                // SAFETY: see above; `dst` is 4-byte aligned (chunk bases
                // are 256-byte aligned, offsets checked multiples of 4).
                let result = unsafe { sys::cuMemsetD32Async(dst, 0, words, self.stream) };
                ("cuMemsetD32Async", result)
            }
        };
        conv::check(call, result).map_err(|e| self.shared.note(e))
    }

    /// Queues a run of copies with one `cuMemcpyBatchAsync`. Should the
    /// driver refuse the call, this device's lanes stop using it (a
    /// warning says why) and the run is queued a copy at a time, once
    /// what the call queued has finished: copying the same bytes to the
    /// same places again changes nothing (`CopyRun`).
    fn enqueue_run(&self, mut run: CopyRun, steps: &[Step]) -> Result<(), BackendError> {
        // Sources are read in stream order, as a copy's own call reads
        // them; no location hints (pinned host memory and device memory
        // need none).
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: no_location(),
            dstLocHint: no_location(),
            flags: 0,
        };
        let mut attrs_index = 0usize;
        let mut failed_at = usize::MAX;
        // SAFETY: the context is current; every address was checked as for
        // `enqueue` (inside a live chunk, or inside pinned staging or the
        // batch's registered target, which the device reaches at its host
        // address: `Adapter::host_pointers`), and stays so until `wait`;
        // the three arrays hold `run.len()` entries and the one attribute
        // applies from copy 0; the stream is the lane's.
        let result = unsafe {
            sys::cuMemcpyBatchAsync(
                run.dsts.as_mut_ptr(),
                run.srcs.as_mut_ptr(),
                run.sizes.as_mut_ptr(),
                run.len(),
                &mut attrs,
                &mut attrs_index,
                1,
                &mut failed_at,
                self.stream,
            )
        };
        match conv::check("cuMemcpyBatchAsync", result) {
            Ok(()) => Ok(()),
            Err(BackendError::DeviceLost) => Err(self.shared.note(BackendError::DeviceLost)),
            Err(err) => {
                if self.shared.batch_copies.swap(false, Ordering::Relaxed) {
                    warn!(
                        "{}: copying a call per copy from now on: {err}",
                        self.shared.info.name
                    );
                }
                self.drain();
                steps[..run.len()]
                    .iter()
                    .try_for_each(|&step| self.enqueue(step))
            }
        }
    }

    /// After a batch failed halfway: lets what was queued of it finish, so
    /// that nothing still copies into staging or a chunk once `submit` has
    /// returned and the caller reuses them.
    fn drain(&self) {
        // SAFETY: the stream is the lane's; the context is current.
        let drained = unsafe { sys::cuStreamSynchronize(self.stream) };
        if drained != CUresult::CUDA_SUCCESS {
            let err = self
                .shared
                .note(conv::error("cuStreamSynchronize", drained));
            debug!("draining a failed batch: {err}");
        }
    }

    /// Whether the batch is done.
    fn query_event(&self) -> Result<bool, BackendError> {
        // SAFETY: the event is the lane's and was recorded by `submit`.
        match unsafe { sys::cuEventQuery(self.event) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(self.shared.note(conv::error("cuEventQuery", other))),
        }
    }

    /// Polls the event, then naps between looks at it. Not
    /// `cuEventSynchronize` on a blocking-sync event: with many threads
    /// waiting at once it sometimes slept on for up to a second after the
    /// copy was done (`backend::wait`).
    fn wait_event(&self) -> Result<(), BackendError> {
        self.shared.bind()?;
        self.shared.waits.wait(
            || self.query_event(),
            |length| {
                std::thread::sleep(length);
                self.query_event()
            },
            &self.shared.info.name,
        )
    }
}

impl Lane for CudaLane {
    fn staging(&mut self) -> &mut [u8] {
        let len = self.staging_len;
        match self.staging.as_mut() {
            Some(staging) => &mut staging.bytes()[..len],
            None => &mut [],
        }
    }

    fn staged(&self) -> &[u8] {
        match self.staging.as_ref() {
            Some(staging) => &staging.bytes_ref()[..self.staging_len],
            None => &[],
        }
    }

    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        self.run(ops, &mut [])
    }

    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        check_target(region, backend_id(&*self.shared), target)?;
        self.run(ops, target)
    }

    fn wait(&mut self) -> Result<(), BackendError> {
        if !self.pending {
            return Ok(());
        }
        let result = self.wait_event();
        self.pending = false;
        result
    }
}

impl CudaLane {
    /// Checks, queues and marks a batch; `DownloadTo` steps write into
    /// `target`.
    fn run(&mut self, ops: &[TransferOp], target: &mut [u8]) -> Result<(), BackendError> {
        self.shared.check_alive()?;
        if self.pending {
            return Err(BackendError::Busy);
        }
        // Every step is checked and resolved before any reaches the driver:
        // a batch that fails its checks moves no byte. On the stack: the
        // collect cannot overflow, `check_batch` allows MAX_BATCH steps.
        check_batch(ops, self.staging_len, target.len())?;
        let target = target.as_mut_ptr();
        let steps = ops
            .iter()
            .map(|op| self.resolve(op, target))
            .collect::<Result<ArrayVec<Step, MAX_BATCH>, _>>()?;
        self.shared.bind()?;
        let mut rest = &steps[..];
        while let Some(&step) = rest.first() {
            let run = self
                .shared
                .batch_copies
                .load(Ordering::Relaxed)
                .then(|| CopyRun::take(rest))
                .flatten();
            let (queued, taken) = match run {
                Some(run) => {
                    let taken = run.len();
                    (self.enqueue_run(run, rest), taken)
                }
                None => (self.enqueue(step), 1),
            };
            if let Err(err) = queued {
                self.drain();
                return Err(err);
            }
            rest = &rest[taken..];
        }
        // SAFETY: event and stream are the lane's; the context is current.
        let recorded = conv::check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.event, self.stream)
        });
        if let Err(err) = recorded {
            self.drain();
            return Err(self.shared.note(err));
        }
        self.pending = true;
        Ok(())
    }
}

/// A location hint that names none.
fn no_location() -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID,
        id: 0,
    }
}

impl Drop for CudaLane {
    fn drop(&mut self) {
        if self.pending {
            if let Err(err) = self.wait_event() {
                warn!("dropping a lane whose batch failed: {err}");
            }
        }
        // Teardown goes on when the device is lost: whatever the driver
        // still accepts is given back, the rest goes with the context.
        let current = self.shared.make_current().is_ok();
        if current {
            // SAFETY: nothing of this lane is pending any more; handles that
            // were never made (a half-built lane) are skipped.
            unsafe {
                if !self.event.is_null() {
                    let _ = sys::cuEventDestroy_v2(self.event);
                }
                if !self.stream.is_null() {
                    let _ = sys::cuStreamDestroy_v2(self.stream);
                }
            }
        }
        match self.staging.take() {
            Some(Staging::Registered(region)) => {
                // SAFETY: registered by `create_staging`; no copy uses it any
                // more. Unregistered before `region` unmaps it.
                let unregistered = current
                    && unsafe { sys::cuMemHostUnregister(region.as_ptr() as *mut c_void) }
                        == CUresult::CUDA_SUCCESS;
                if unregistered {
                    drop(region);
                } else {
                    // Still registered (a lost context lets go of it only
                    // when released): keep the pages mapped rather than
                    // unmap memory the driver may still reach.
                    std::mem::forget(region);
                }
            }
            Some(Staging::Allocated { ptr, .. }) if current => {
                // SAFETY: allocated by `cuMemHostAlloc`; no copy uses it.
                let _ = unsafe { sys::cuMemFreeHost(ptr.as_ptr() as *mut c_void) };
            }
            // A lost context frees its pinned memory when it is released.
            Some(Staging::Allocated { .. }) | None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(dst: u64, len: usize) -> Step {
        Step::Upload {
            dst,
            src: (0x7000_0000 + dst) as usize as *const u8,
            len,
        }
    }

    fn down(dst: usize, len: usize) -> Step {
        Step::Download {
            dst: dst as *mut u8,
            src: 0x9000_0000 + dst as u64,
            len,
        }
    }

    fn run_len(steps: &[Step]) -> Option<usize> {
        CopyRun::take(steps).map(|run| run.len())
    }

    #[test]
    fn a_run_is_copies_of_one_direction() {
        let zero = Step::Zero { dst: 0, words: 4 };
        assert_eq!(
            run_len(&[up(0, 64), up(64, 64), down(0, 64), up(128, 64)]),
            Some(2)
        );
        assert_eq!(
            run_len(&[down(0, 64), down(64, 64), down(128, 8), zero]),
            Some(3)
        );
        assert_eq!(run_len(&[up(0, 64), zero, up(64, 64)]), None, "one copy");
        assert_eq!(run_len(&[zero, up(0, 64), up(64, 64)]), None);
        assert_eq!(run_len(&[]), None);
        let many: Vec<Step> = (0..MAX_BATCH).map(|i| down(i * 100, 100)).collect();
        assert_eq!(run_len(&many), Some(MAX_BATCH));
    }

    #[test]
    fn copies_whose_destinations_overlap_are_not_run_together() {
        // Touching ends are fine; one shared byte is not, in any order.
        assert_eq!(run_len(&[up(0, 64), up(64, 64)]), Some(2));
        assert_eq!(run_len(&[up(64, 64), up(0, 65)]), None);
        assert_eq!(run_len(&[down(100, 10), down(0, 50), down(109, 1)]), None);
        assert_eq!(run_len(&[down(0, 8), down(0, 8)]), None);
        // Sources may overlap: they are only read.
        let a = Step::Download {
            dst: 0x1000 as *mut u8,
            src: 0x9000_0000,
            len: 64,
        };
        let b = Step::Download {
            dst: 0x2000 as *mut u8,
            src: 0x9000_0000,
            len: 64,
        };
        assert_eq!(run_len(&[a, b]), Some(2));
    }
}
