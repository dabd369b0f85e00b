//! The CUDA backend: the driver API through cudarc's raw bindings.
//!
//! Chunks are 4 MiB `cuMemAlloc` allocations in the device's primary
//! context, or, with `mapped=on` in a build that has the Vulkan backend
//! too, 4 MiB slots of 64 MiB blocks of VRAM the CPU can map:
//! Vulkan (on the GPU whose `deviceUUID` is CUDA's UUID) allocates each
//! block from its `DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT` type
//! (resizable BAR), maps it and exports it as a file descriptor, and CUDA
//! imports it (`cuImportExternalMemory`), so that lanes copy it by DMA as
//! before and [`Backend::write_mapped`] stores into it through the Vulkan
//! mapping (`vkmem.rs`, `vulkan/export.rs`). `on` fails, saying why,
//! where that path is missing (no Vulkan, no matching device, no export,
//! a driver without the import, a 256 MiB BAR). `auto` keeps `cuMemAlloc`
//! for now: on the H200 the mapped chunks ran out at half its VRAM
//! (`device::AUTO_MAPS`).
//! Each lane has its own non-blocking stream, on which a batch's
//! steps are queued in order (`cuMemcpyHtoDAsync`, `cuMemcpyDtoHAsync`,
//! `cuMemsetD32Async`; a run of copies that may go in any order in one
//! `cuMemcpyBatchAsync` where the driver has it), and an event recorded
//! after them; the copy engines run them by DMA between VRAM and pinned
//! staging memory. Not kernels: a kernel waits for the GPU's time slice
//! while another process computes (2.4 ms against the copy engines'
//! unchanged 7.5 µs, docs/BENCHMARKS.md), and swap must not. `libcuda.so.1`
//! is loaded at run time, so a build with this backend runs on machines
//! without the NVIDIA driver, where the backend reports itself unavailable.
//!
//! cudarc's safe layer is not used: its slices track every use with events
//! and allocate from stream-ordered pools, and its context keeps one
//! deferred error for all threads; raw calls keep every driver call, and
//! what its failure means, in view here.
//!
//! Files split by lifetime: `driver` loads the library and describes
//! devices, `device` opens one and owns its memory, `vkmem` imports mapped
//! blocks from Vulkan and carves chunks out of them, `lane` queues and
//! waits for copies, `conv` holds every conversion between the driver's
//! values and ours; `nvml` reads a GPU's free VRAM for the swap watcher
//! through NVML, with no CUDA context.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod conv;
mod device;
mod driver;
mod lane;
mod nvml;
#[cfg(feature = "vulkan")]
mod vkmem;

use std::sync::Arc;

use self::device::DeviceShared;
use self::driver::FreeMemory;
use self::lane::CudaLane;
pub(crate) use self::nvml::NvmlBudget;
use super::{
    select_adapter, Backend, BackendError, ChunkId, DeviceInfo, Fill, HostRegion, Lane,
    MemoryReport, OpenError, OpenOptions,
};

/// Lists the CUDA devices, without opening them. Measuring each one's
/// free memory makes (and drops) its primary context if no one holds it.
pub fn enumerate() -> Result<Vec<DeviceInfo>, OpenError> {
    let count = driver::init()?;
    let mut infos: Vec<DeviceInfo> = driver::adapters(count, FreeMemory::Measure)?
        .into_iter()
        .map(|a| a.info)
        .collect();
    set_mappable(&mut infos);
    Ok(infos)
}

/// Fills in `mappable` (0 from the driver): the VRAM Vulkan maps for the
/// CPU on the same GPU, where it can export that memory to CUDA and the
/// driver can import it (`vkmem.rs`), so that placement refuses
/// `mapped=on` before the backend opens.
#[cfg(feature = "vulkan")]
fn set_mappable(infos: &mut [DeviceInfo]) {
    if infos.is_empty() || !driver::has_interop() {
        return;
    }
    let uuids: Vec<[u8; 16]> = infos.iter().map(|i| i.uuid).collect();
    for (info, answer) in infos
        .iter_mut()
        .zip(super::vulkan::export::exportable(&uuids))
    {
        match answer {
            Ok(bytes) => info.mappable = bytes,
            Err(reason) => tracing::debug!("{}: VRAM not mappable: {reason}", info.name),
        }
    }
}

#[cfg(not(feature = "vulkan"))]
fn set_mappable(_: &mut [DeviceInfo]) {}

/// One open CUDA device lending its VRAM.
pub struct CudaBackend {
    shared: Arc<DeviceShared>,
}

impl CudaBackend {
    /// Opens the device `options.device` selects.
    pub fn open(options: &OpenOptions) -> Result<Self, OpenError> {
        let count = driver::init()?;
        // Selection needs no free-memory figures, and measuring them would
        // make a context on every GPU of the machine.
        let adapters = driver::adapters(count, FreeMemory::Skip)?;
        let adapter = select_adapter(adapters, |a| &a.info, &options.device)?;
        let shared = DeviceShared::open(adapter, options.memory_limit, options.mapped)?;
        Ok(CudaBackend {
            shared: Arc::new(shared),
        })
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> &DeviceInfo {
        &self.shared.info
    }

    fn memory(&self) -> MemoryReport {
        self.shared.memory_report()
    }

    fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        self.shared.allocate_chunk()
    }

    fn free_chunk(&self, chunk: ChunkId) {
        self.shared.free_chunk(chunk)
    }

    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        Ok(Box::new(CudaLane::new(self.shared.clone(), staging_bytes)?))
    }

    fn mapped(&self) -> bool {
        self.shared.is_mapped()
    }

    fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        self.shared.chunk_mapped(chunk)
    }

    fn write_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.shared.write_mapped(chunk, chunk_offset, fill)
    }

    fn read_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        self.shared.read_mapped(chunk, chunk_offset, dst)
    }

    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        lane::register_host(&self.shared, buf)
    }

    fn unregister_host(&self, region: HostRegion) {
        lane::unregister_host(&self.shared, region)
    }
}
