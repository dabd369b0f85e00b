//! An open CUDA device: its primary context, and the table of chunk
//! allocations the lanes copy to and from.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::sys;
use tracing::{debug, warn};

use super::conv;
use super::driver::Adapter;
#[cfg(feature = "vulkan")]
use super::vkmem::Interop;
use crate::backend::wait::{Naps, WaitPolicy, SPIN};
use crate::backend::{
    admit_chunk, BackendError, ChunkId, DeviceInfo, Fill, LostFlag, MappedMode, MemoryReport,
    CHUNK_SIZE,
};

/// Whether `mapped=auto` takes the Vulkan-exported path (`vkmem.rs`) where
/// it works, as Vulkan's own backend does. Not yet: on the H200 (driver
/// 580) mapped chunks ran out at 69 GiB of its 140 (`out of device
/// memory`, 2026-12-04), so an eager store sized to the free memory, the
/// default, would fail at open; and a process that had opened and closed
/// it many times once failed to make another Vulkan instance. Until both
/// are understood only `mapped=on` uses it.
#[cfg(feature = "vulkan")]
const AUTO_MAPS: bool = false;

/// State every lane and chunk of one device shares. Dropped when the last
/// of them is gone: chunks are freed, then the primary context released.
pub(super) struct DeviceShared {
    pub(super) info: DeviceInfo,
    device: sys::CUdevice,
    /// The device's primary context, retained for as long as this lives.
    /// Primary rather than our own context: it is the one the CUDA runtime
    /// and other libraries in the process share, so a process that also
    /// uses CUDA elsewhere does not pay for (and switch between) two.
    ctx: sys::CUcontext,
    lost: LostFlag,
    /// Whether waiters poll their event or sleep.
    pub(super) waits: WaitPolicy,
    /// Whether lanes queue a run of copies with one `cuMemcpyBatchAsync`
    /// (`lane.rs`): where the driver has it, until a call of it fails.
    pub(super) batch_copies: AtomicBool,
    memory_limit: Option<u64>,
    /// Chunk id → `CUdeviceptr` (0: none). Lanes read it without a lock;
    /// only allocation and free write it, under `memory`.
    chunks: Box<[AtomicU64]>,
    memory: Mutex<Memory>,
    /// Present when chunks live in Vulkan-exported VRAM the CPU writes
    /// through a mapping (`mapped=`, `vkmem.rs`); else they are
    /// `cuMemAlloc`'d.
    #[cfg(feature = "vulkan")]
    interop: Option<Interop>,
}

// SAFETY: the context handle is only passed to the driver, whose API is
// thread-safe; every other field is Send and Sync already.
unsafe impl Send for DeviceShared {}
// SAFETY: as above; shared access never mutates the handle.
unsafe impl Sync for DeviceShared {}

struct Memory {
    /// Ids that were handed out and given back, reused first.
    free_ids: Vec<u32>,
    /// Ids below this have been handed out at some time.
    next_id: u32,
    held: u64,
}

impl DeviceShared {
    pub(super) fn open(
        adapter: Adapter,
        memory_limit: Option<u64>,
        mapped: MappedMode,
    ) -> Result<Self, BackendError> {
        let Adapter {
            device,
            info,
            host_pointers,
        } = adapter;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: a device from `cuDeviceGet`; the out-pointer is valid. The
        // retain is released by `Drop`, also when opening fails below.
        conv::check_context(&info.name, "cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, device)
        })?;
        let capacity = (info.memory.total / CHUNK_SIZE) as usize + 1;
        let mut shared = DeviceShared {
            info,
            device,
            ctx,
            lost: LostFlag::default(),
            waits: WaitPolicy::new(SPIN, Naps::POLLED),
            batch_copies: AtomicBool::new(host_pointers && super::driver::has_batch_copies()),
            memory_limit,
            chunks: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            memory: Mutex::new(Memory {
                free_ids: Vec::new(),
                next_id: 0,
                held: 0,
            }),
            #[cfg(feature = "vulkan")]
            interop: None,
        };
        shared.bind()?;
        shared.info.memory.available = shared.free_memory()?;
        shared.open_mapped(mapped, capacity)?;
        debug!(
            device = %shared.info.name,
            bus = shared.info.pci_bus_id.as_deref().unwrap_or("?"),
            dedicated = shared.info.dedicated_transfer_queue,
            "CUDA device open"
        );
        Ok(shared)
    }

    /// Decides where chunks live (`mapped=`): in Vulkan-exported VRAM
    /// where that works and covers the device's memory, else (`auto`) in
    /// `cuMemAlloc`'d memory; `on` fails naming what is missing. Sets
    /// `info.mappable` to what was found. The context is current.
    #[cfg(feature = "vulkan")]
    fn open_mapped(&mut self, mode: MappedMode, capacity: usize) -> Result<(), BackendError> {
        if mode == MappedMode::Off || (mode == MappedMode::Auto && !AUTO_MAPS) {
            return Ok(());
        }
        let opened = if super::driver::has_interop() {
            Interop::open(&self.info.uuid, &self.info.name, capacity)
        } else {
            Err(BackendError::UnsupportedDevice {
                device: self.info.name.clone(),
                reason: "the CUDA driver cannot import Vulkan memory \
                         (no cuImportExternalMemory)"
                    .into(),
            })
        };
        let (interop, mappable) = match opened {
            Ok(opened) => opened,
            Err(err) if mode == MappedMode::On => {
                return Err(match err {
                    BackendError::UnsupportedDevice { device, reason } => {
                        BackendError::UnsupportedDevice {
                            device,
                            reason: format!("mapped=on: {reason}"),
                        }
                    }
                    other => other,
                })
            }
            Err(err) => {
                debug!("{}: chunks not mapped: {err}", self.info.name);
                return Ok(());
            }
        };
        self.info.mappable = mappable;
        if crate::backend::decide_mapped(&self.info, mode)? {
            self.interop = Some(interop);
        }
        Ok(())
    }

    /// Without the Vulkan backend nothing can map CUDA's memory.
    #[cfg(not(feature = "vulkan"))]
    fn open_mapped(&mut self, mode: MappedMode, _capacity: usize) -> Result<(), BackendError> {
        match mode {
            MappedMode::On => Err(BackendError::UnsupportedDevice {
                device: self.info.name.clone(),
                reason: "mapped=on: CUDA's VRAM is mapped for the CPU through Vulkan, \
                         and this build has no vulkan backend"
                    .into(),
            }),
            MappedMode::Auto | MappedMode::Off => Ok(()),
        }
    }

    /// Whether chunks are mapped for the CPU ([`Self::write_mapped`]).
    pub(super) fn is_mapped(&self) -> bool {
        #[cfg(feature = "vulkan")]
        return self.interop.is_some();
        #[cfg(not(feature = "vulkan"))]
        false
    }

    pub(super) fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        #[cfg(feature = "vulkan")]
        return self.interop.as_ref().is_some_and(|i| i.contains(chunk));
        #[cfg(not(feature = "vulkan"))]
        {
            let _ = chunk;
            false
        }
    }

    pub(super) fn write_mapped(
        &self,
        chunk: ChunkId,
        offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.check_alive()?;
        #[cfg(feature = "vulkan")]
        if let Some(interop) = &self.interop {
            return interop.write(chunk, offset, fill);
        }
        let _ = (offset, fill);
        Err(BackendError::BadChunk(chunk))
    }

    pub(super) fn read_mapped(
        &self,
        chunk: ChunkId,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        self.check_alive()?;
        #[cfg(feature = "vulkan")]
        if let Some(interop) = &self.interop {
            return interop.read(chunk, offset, dst);
        }
        let _ = (offset, dst);
        Err(BackendError::BadChunk(chunk))
    }

    /// A chunk's memory: a slot of a mapped block, or its own
    /// `cuMemAlloc`. The context is current.
    fn take_memory(&self, id: u32) -> Result<sys::CUdeviceptr, BackendError> {
        #[cfg(feature = "vulkan")]
        if let Some(interop) = &self.interop {
            return interop.allocate(id);
        }
        let _ = id;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the context is current; the out-pointer is valid. The
        // allocation is freed by `free_chunk` or `Drop`.
        conv::check("cuMemAlloc_v2", unsafe {
            sys::cuMemAlloc_v2(&mut ptr, CHUNK_SIZE as usize)
        })?;
        Ok(ptr)
    }

    fn memory_lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn check_alive(&self) -> Result<(), BackendError> {
        self.lost.check()
    }

    /// Notes a lost device: every later call fails at once.
    pub(super) fn note(&self, err: BackendError) -> BackendError {
        self.lost.note(err, &self.info.name)
    }

    /// Fails at once if the device is lost, else makes its context current
    /// on this thread. nbdkit calls in from many worker threads and a lane
    /// moves between them, so every entry point does this first; it costs
    /// one thread-local read in the driver once the context is current.
    pub(super) fn bind(&self) -> Result<(), BackendError> {
        self.check_alive()?;
        self.make_current().map_err(|e| self.note(e))
    }

    /// [`Self::bind`] without the lost check, for teardown, which tries to
    /// give everything back even then.
    pub(super) fn make_current(&self) -> Result<(), BackendError> {
        let mut current: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid.
        conv::check("cuCtxGetCurrent", unsafe {
            sys::cuCtxGetCurrent(&mut current)
        })?;
        if current != self.ctx {
            // SAFETY: `ctx` stays retained while `self` lives.
            conv::check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })?;
        }
        Ok(())
    }

    /// `cuMemGetInfo`'s free bytes on this device. The context is bound.
    fn free_memory(&self) -> Result<u64, BackendError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the caller made the context current; out-pointers valid.
        conv::check("cuMemGetInfo_v2", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })
        .map_err(|e| self.note(e))?;
        Ok(free as u64)
    }

    /// The total size, and what this process could still take: the
    /// driver's free memory, capped by what the limit leaves. A device that
    /// cannot say (lost) has nothing available.
    pub(super) fn memory_report(&self) -> MemoryReport {
        let held = self.memory_lock().held;
        let free = self.bind().and_then(|()| self.free_memory());
        let mut available = free.unwrap_or(0);
        if let Some(limit) = self.memory_limit {
            available = available.min(limit.saturating_sub(held));
        }
        MemoryReport {
            total: self.info.memory.total,
            available,
        }
    }

    pub(super) fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        self.bind()?;
        let mut memory = self.memory_lock();
        admit_chunk(memory.held, self.memory_limit)?;
        let id = memory.free_ids.last().copied().unwrap_or(memory.next_id);
        if id as usize >= self.chunks.len() {
            return Err(BackendError::OutOfDeviceMemory);
        }
        let ptr = self.take_memory(id).map_err(|e| self.note(e))?;
        if memory.free_ids.pop().is_none() {
            memory.next_id += 1;
        }
        memory.held += CHUNK_SIZE;
        self.chunks[id as usize].store(ptr, Ordering::Release);
        Ok(ChunkId(id))
    }

    /// Frees a chunk no batch uses (the trait's rule). Under the lock, so
    /// that `held` never undercounts what the device holds against the
    /// limit. `cuMemFree` synchronises the context before it frees, so a
    /// trim waits for the copies in flight on every lane.
    pub(super) fn free_chunk(&self, chunk: ChunkId) {
        let mut memory = self.memory_lock();
        let id = chunk.0 as usize;
        let ptr = self
            .chunks
            .get(id)
            .map_or(0, |slot| slot.swap(0, Ordering::AcqRel));
        if ptr == 0 {
            warn!("freeing chunk {id}, which is not allocated");
            return;
        }
        memory.free_ids.push(chunk.0);
        memory.held -= CHUNK_SIZE;
        let bound = self.bind().is_ok();
        #[cfg(feature = "vulkan")]
        if let Some(interop) = &self.interop {
            interop.free(chunk.0, bound);
            return;
        }
        // A lost device's memory goes back with its context, in `Drop`.
        if bound {
            // SAFETY: `ptr` came from `cuMemAlloc_v2` in this context and
            // was just taken out of the table, so it is freed once.
            let freed = conv::check("cuMemFree_v2", unsafe { sys::cuMemFree_v2(ptr) });
            if let Err(err) = freed {
                warn!("{}: freeing chunk {id}: {}", self.info.name, self.note(err));
            }
        }
    }

    /// The device address of a chunk, for a copy.
    pub(super) fn chunk_ptr(&self, chunk: ChunkId) -> Result<sys::CUdeviceptr, BackendError> {
        match self
            .chunks
            .get(chunk.0 as usize)
            .map(|slot| slot.load(Ordering::Acquire))
        {
            Some(ptr) if ptr != 0 => Ok(ptr),
            _ => Err(BackendError::BadChunk(chunk)),
        }
    }
}

impl Drop for DeviceShared {
    fn drop(&mut self) {
        // No lane is left (they hold this struct), so nothing new is queued;
        // synchronising makes every chunk idle before it is freed.
        if self.make_current().is_ok() {
            // SAFETY: the context is current.
            let synced = unsafe { sys::cuCtxSynchronize() };
            if synced != sys::CUresult::CUDA_SUCCESS {
                debug!("{}: cuCtxSynchronize at close: {synced:?}", self.info.name);
            }
            #[cfg(feature = "vulkan")]
            if let Some(interop) = &self.interop {
                // Chunks are slots of mapped blocks: the blocks go back
                // whole, CUDA's import before Vulkan's memory.
                self.chunks
                    .iter()
                    .for_each(|slot| slot.store(0, Ordering::Release));
                interop.release_all();
            }
            for slot in self.chunks.iter() {
                let ptr = slot.swap(0, Ordering::AcqRel);
                if ptr != 0 {
                    // SAFETY: each live allocation is freed once, idle.
                    let _ = unsafe { sys::cuMemFree_v2(ptr) };
                }
            }
        }
        // SAFETY: balances the retain in `open`. When this was the last
        // reference the driver resets the context, which also frees whatever
        // a lost context could not free above.
        let released = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
        if released != sys::CUresult::CUDA_SUCCESS {
            warn!(
                "{}: releasing the CUDA context: {released:?}",
                self.info.name
            );
        }
    }
}
