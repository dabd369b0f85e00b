//! The Vulkan backend: `ash` for the API, `gpu-allocator` for device memory.
//!
//! Chunks are 4 MiB buffers in the device's largest device-local heap.
//! Copies are `vkCmdCopyBuffer`s between them and host-cached staging
//! buffers, submitted on a transfer-only queue family where the device has
//! one (a DMA engine of its own), else on any queue that can copy. It runs
//! wherever a Vulkan 1.1 driver does: NVIDIA, AMD, Intel, and Mesa's
//! lavapipe on the CPU, which is what the tests use on machines with no GPU.
//!
//! The self-test runs `shaders/memtest.wgsl` on a compute-capable queue
//! (the copy queue itself where its family computes); chunks are storage
//! buffers, shared between the two families when they differ.
//!
//! Files split by lifetime: `instance` finds adapters, `device` opens one
//! and owns its memory, `lane` records and waits for copies, `compute`
//! runs the self-test's shaders, `conv` holds every conversion between
//! Vulkan's values and ours; `budget` reads a device's free VRAM for the
//! swap watcher without opening it; `drivers` keeps a server from loading
//! (and locking) drivers for hardware the machine lacks.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod budget;
mod compute;
mod conv;
mod device;
mod drivers;
#[cfg(feature = "cuda")]
pub(crate) mod export;
mod instance;
mod lane;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub(crate) use self::budget::VulkanBudget;
use self::compute::VulkanSelfTest;
use self::device::DeviceShared;
pub use self::drivers::hold_back_unused;
use self::instance::Instance;
use self::lane::VulkanLane;
use super::selftest::SelfTest;
use super::{
    backend_id, select_adapter, Backend, BackendError, ChunkId, DeviceInfo, Fill, HostRegion, Lane,
    MemoryReport, OpenError, OpenOptions,
};

/// Lists the Vulkan devices that can serve, without opening them.
pub fn enumerate() -> Result<Vec<DeviceInfo>, OpenError> {
    let instance = Instance::new()?;
    Ok(instance.adapters()?.into_iter().map(|a| a.info).collect())
}

/// One open Vulkan device lending its VRAM.
pub struct VulkanBackend {
    shared: Arc<DeviceShared>,
    next_queue: AtomicUsize,
    /// `None` where no queue family can run compute shaders.
    self_test: Option<VulkanSelfTest>,
}

impl VulkanBackend {
    /// Opens the device `options.device` selects.
    pub fn open(options: &OpenOptions) -> Result<Self, OpenError> {
        let instance = Instance::new()?;
        let adapter = select_adapter(instance.adapters()?, |a| &a.info, &options.device)?;
        let shared = Arc::new(DeviceShared::open(
            instance,
            adapter,
            options.memory_limit,
            options.mapped,
        )?);
        Ok(VulkanBackend {
            self_test: shared
                .compute_queue()
                .is_some()
                .then(|| VulkanSelfTest::new(shared.clone())),
            shared,
            next_queue: AtomicUsize::new(0),
        })
    }
}

impl Backend for VulkanBackend {
    fn device(&self) -> &DeviceInfo {
        &self.shared.adapter.info
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

    /// Every batch is a queue submission under the queue's lock: 16 threads
    /// of 4 KiB reads by DMA ran 113k/s one batch each, 226k/s gathered.
    fn gathers_reads(&self) -> bool {
        true
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

    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        let queue = self.next_queue.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(VulkanLane::new(
            self.shared.clone(),
            staging_bytes,
            queue,
        )?))
    }

    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        use ash::vk::Handle;
        let (buffer, memory, offset) = self.shared.register_host(buf)?;
        Ok(HostRegion::new(
            buf,
            backend_id(&*self.shared),
            [buffer.as_raw(), memory.as_raw()],
            offset,
        ))
    }

    fn unregister_host(&self, region: HostRegion) {
        use ash::vk::Handle;
        self.shared.unregister_host(
            ash::vk::Buffer::from_raw(region.handle[0]),
            ash::vk::DeviceMemory::from_raw(region.handle[1]),
        );
    }

    fn self_test(&self) -> Option<&dyn SelfTest> {
        self.self_test.as_ref().map(|t| t as &dyn SelfTest)
    }
}
