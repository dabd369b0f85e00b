//! The CUDA backend: the driver API through cudarc's raw bindings.
//!
//! Chunks are 4 MiB `cuMemAlloc` allocations in the device's primary
//! context. Each lane has its own non-blocking stream, on which a batch's
//! steps are queued in order (`cuMemcpyHtoDAsync`, `cuMemcpyDtoHAsync`,
//! `cuMemsetD32Async`), and an event recorded after them; the copy engines
//! run them by DMA between VRAM and pinned staging memory. `libcuda.so.1`
//! is loaded at run time, so a build with this backend runs on machines
//! without the NVIDIA driver, where the backend reports itself unavailable.
//!
//! cudarc's safe layer is not used: its slices track every use with events
//! and allocate from stream-ordered pools, and its context keeps one
//! deferred error for all threads; raw calls keep every driver call, and
//! what its failure means, in view here.
//!
//! Files split by lifetime: `driver` loads the library and describes
//! devices, `device` opens one and owns its memory, `lane` queues and waits
//! for copies, `conv` holds every conversion between the driver's values
//! and ours.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod conv;
mod device;
mod driver;
mod lane;

use std::sync::Arc;

use self::device::DeviceShared;
use self::driver::FreeMemory;
use self::lane::CudaLane;
use super::{
    select_adapter, Backend, BackendError, ChunkId, DeviceInfo, Lane, MemoryReport, OpenError,
    OpenOptions,
};

/// Lists the CUDA devices, without opening them. Measuring each one's
/// free memory makes (and drops) its primary context if no one holds it.
pub fn enumerate() -> Result<Vec<DeviceInfo>, OpenError> {
    let count = driver::init()?;
    Ok(driver::adapters(count, FreeMemory::Measure)?
        .into_iter()
        .map(|a| a.info)
        .collect())
}

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
        let shared = DeviceShared::open(adapter, options.memory_limit)?;
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
}
