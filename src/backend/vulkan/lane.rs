//! A Vulkan lane: a host-visible staging buffer, a command pool with one
//! command buffer, and a fence, all made once.

use std::sync::Arc;
use std::time::Duration;

use ash::vk;
use ash::vk::Handle;
use tracing::warn;

use super::conv;
use super::device::{DeviceShared, Staging};
use crate::backend::{
    backend_id, check_batch, check_target, BackendError, HostRegion, Lane, TransferOp,
};

/// Where a batch's `DownloadTo` steps land: the buffer importing the
/// registered memory, and the offset of the batch's target in it.
#[derive(Clone, Copy)]
struct Target {
    buffer: vk::Buffer,
    offset: u64,
}

pub(super) struct VulkanLane {
    shared: Arc<DeviceShared>,
    queue: usize,
    pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    staging_buffer: vk::Buffer,
    /// `None` only while building or dropping.
    staging: Option<Staging>,
    staging_len: usize,
    pending: bool,
}

impl VulkanLane {
    pub(super) fn new(
        shared: Arc<DeviceShared>,
        staging_len: usize,
        queue: usize,
    ) -> Result<Self, BackendError> {
        let device = &shared.raw;
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(shared.queue_family)
            .flags(vk::CommandPoolCreateFlags::TRANSIENT);
        // SAFETY: valid create info for this device.
        let pool = unsafe { device.create_command_pool(&pool_info, None) }
            .map_err(|e| conv::error("vkCreateCommandPool", e))?;
        let mut lane = VulkanLane {
            shared: shared.clone(),
            queue: queue % shared.queues.len(),
            pool,
            cmd: vk::CommandBuffer::null(),
            fence: vk::Fence::null(),
            staging_buffer: vk::Buffer::null(),
            staging: None,
            staging_len,
            pending: false,
        };
        // From here on `Drop` cleans up whatever was made.
        let alloc_info = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool belongs to this device.
        lane.cmd = unsafe { device.allocate_command_buffers(&alloc_info) }
            .map_err(|e| conv::error("vkAllocateCommandBuffers", e))?[0];
        // SAFETY: valid create info for this device.
        lane.fence = unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) }
            .map_err(|e| conv::error("vkCreateFence", e))?;
        let (buffer, staging) = shared.create_staging(staging_len)?;
        lane.staging_buffer = buffer;
        lane.staging = Some(staging);
        Ok(lane)
    }

    /// Records a batch that `check_batch` passed; `target` is where its
    /// `DownloadTo` steps write (none for [`Lane::submit`]).
    fn record(&self, ops: &[TransferOp], target: Option<Target>) -> Result<(), BackendError> {
        let device = &self.shared.raw;
        let cmd = self.cmd;
        // SAFETY: no batch of this lane is pending (checked by `submit`), so
        // the pool's one command buffer is not in use.
        unsafe { device.reset_command_pool(self.pool, vk::CommandPoolResetFlags::empty()) }
            .map_err(|e| conv::error("vkResetCommandPool", e))?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: the command buffer was just reset.
        unsafe { device.begin_command_buffer(cmd, &begin) }
            .map_err(|e| conv::error("vkBeginCommandBuffer", e))?;
        let mut downloads = false;
        let mut chunk_writes = false;
        // What the steps since the last barrier did to chunks: a later
        // step that touches the same kind of bytes waits for them (copies
        // in one command buffer may otherwise run in any order).
        let (mut read, mut written) = (false, false);
        for op in ops {
            let writes_chunk = !matches!(
                op,
                TransferOp::Download { .. } | TransferOp::DownloadTo { .. }
            );
            if written || (read && writes_chunk) {
                self.barrier(
                    vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE,
                );
                (read, written) = (false, false);
            }
            if writes_chunk {
                written = true;
                chunk_writes = true;
            } else {
                read = true;
            }
            match *op {
                TransferOp::Upload {
                    staging_offset,
                    chunk,
                    chunk_offset,
                    len,
                } => {
                    let region = vk::BufferCopy {
                        src_offset: staging_offset as u64,
                        dst_offset: chunk_offset,
                        size: len,
                    };
                    let dst = self.shared.chunk_buffer(chunk)?;
                    // SAFETY: both buffers are alive (the store holds the
                    // chunk's lock while this batch runs) and the region is
                    // inside both (`check_batch`, in `submit`).
                    unsafe { device.cmd_copy_buffer(cmd, self.staging_buffer, dst, &[region]) };
                }
                TransferOp::Download {
                    staging_offset,
                    chunk,
                    chunk_offset,
                    len,
                } => {
                    let region = vk::BufferCopy {
                        src_offset: chunk_offset,
                        dst_offset: staging_offset as u64,
                        size: len,
                    };
                    let src = self.shared.chunk_buffer(chunk)?;
                    // SAFETY: as for uploads.
                    unsafe { device.cmd_copy_buffer(cmd, src, self.staging_buffer, &[region]) };
                    downloads = true;
                }
                TransferOp::Zero {
                    chunk,
                    chunk_offset,
                    len,
                } => {
                    let dst = self.shared.chunk_buffer(chunk)?;
                    // SAFETY: the range is 4-aligned and inside the buffer
                    // (`check_batch`).
                    unsafe { device.cmd_fill_buffer(cmd, dst, chunk_offset, len, 0) };
                }
                TransferOp::DownloadTo {
                    host_offset,
                    chunk,
                    chunk_offset,
                    len,
                } => {
                    let Some(target) = target else {
                        return Err(BackendError::OutOfBounds(
                            "a download to host memory in a batch without a target".into(),
                        ));
                    };
                    let region = vk::BufferCopy {
                        src_offset: chunk_offset,
                        dst_offset: target.offset + host_offset as u64,
                        size: len,
                    };
                    let src = self.shared.chunk_buffer(chunk)?;
                    // SAFETY: the chunk as for uploads; the destination lies
                    // inside the batch's target (`check_batch`), which lies
                    // inside the imported buffer (`check_target`) and stays
                    // borrowed by the caller until `wait`.
                    unsafe { device.cmd_copy_buffer(cmd, src, target.buffer, &[region]) };
                    downloads = true;
                }
            }
        }
        // Makes the copied bytes visible to the CPU once the fence signals:
        // the staging a download wrote, and where chunks are mapped, the
        // chunk bytes an upload or a zero wrote, which reads through the
        // mapping (`Backend::read_mapped`) then see.
        if downloads || (chunk_writes && self.shared.is_mapped()) {
            self.barrier(vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ);
        }
        // SAFETY: the command buffer is recording.
        unsafe { device.end_command_buffer(cmd) }.map_err(|e| conv::error("vkEndCommandBuffer", e))
    }

    fn barrier(&self, dst_stage: vk::PipelineStageFlags, dst_access: vk::AccessFlags) {
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(dst_access);
        // SAFETY: the command buffer is recording; a global memory barrier
        // needs no resources.
        unsafe {
            self.shared.raw.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::TRANSFER,
                dst_stage,
                vk::DependencyFlags::empty(),
                &[barrier],
                &[],
                &[],
            )
        };
    }

    fn fence_status(&self) -> Result<bool, BackendError> {
        // SAFETY: the fence belongs to this device.
        unsafe { self.shared.raw.get_fence_status(self.fence) }
            .map_err(|e| self.shared.note(conv::error("vkGetFenceStatus", e)))
    }

    fn wait_fence(&self) -> Result<(), BackendError> {
        self.shared.waits.wait(
            || self.fence_status(),
            |length| self.sleep_on_fence(length),
            &self.shared.adapter.info.name,
        )
    }

    /// Sleeps in the driver until the batch is done, for at most `length`;
    /// says whether it is.
    fn sleep_on_fence(&self, length: Duration) -> Result<bool, BackendError> {
        // SAFETY: the fence belongs to this device and was submitted.
        let result = unsafe {
            self.shared
                .raw
                .wait_for_fences(&[self.fence], true, length.as_nanos() as u64)
        };
        match result {
            Ok(()) => Ok(true),
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(e) => Err(self.shared.note(conv::error("vkWaitForFences", e))),
        }
    }
}

impl Lane for VulkanLane {
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
        self.run(ops, 0, None)
    }

    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        check_target(region, backend_id(&*self.shared), target)?;
        let at = Target {
            buffer: vk::Buffer::from_raw(region.handle[0]),
            offset: region.offset + region.offset_of(target) as u64,
        };
        self.run(ops, target.len(), Some(at))
    }

    fn wait(&mut self) -> Result<(), BackendError> {
        if !self.pending {
            return Ok(());
        }
        let result = self.wait_fence();
        self.pending = false;
        result
    }
}

impl VulkanLane {
    /// Checks, records and submits a batch whose `DownloadTo` steps write
    /// into `target_len` bytes at `target`.
    fn run(
        &mut self,
        ops: &[TransferOp],
        target_len: usize,
        target: Option<Target>,
    ) -> Result<(), BackendError> {
        self.shared.check_alive()?;
        if self.pending {
            return Err(BackendError::Busy);
        }
        check_batch(ops, self.staging_len, target_len)?;
        self.record(ops, target)?;
        let device = &self.shared.raw;
        // SAFETY: the fence is not in use (no batch pending).
        unsafe { device.reset_fences(&[self.fence]) }
            .map_err(|e| conv::error("vkResetFences", e))?;
        let cmds = [self.cmd];
        let submit = vk::SubmitInfo::default().command_buffers(&cmds);
        let queue = self.shared.queues[self.queue]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // SAFETY: the queue is externally synchronised by its mutex; the
        // command buffer is fully recorded and not pending elsewhere.
        unsafe { device.queue_submit(*queue, &[submit], self.fence) }
            .map_err(|e| self.shared.note(conv::error("vkQueueSubmit", e)))?;
        drop(queue);
        self.pending = true;
        Ok(())
    }
}

impl Drop for VulkanLane {
    fn drop(&mut self) {
        if self.pending {
            if let Err(err) = self.wait_fence() {
                warn!("dropping a lane whose batch failed: {err}");
            }
        }
        let device = &self.shared.raw;
        // SAFETY: nothing of this lane is pending any more; null handles
        // (from a half-built lane) are ignored by the destroy calls.
        unsafe {
            device.destroy_fence(self.fence, None);
            device.destroy_command_pool(self.pool, None);
        }
        if let Some(staging) = self.staging.take() {
            self.shared.destroy_staging(self.staging_buffer, staging);
        }
    }
}
