//! The self-test on the GPU: the pipelines of `shaders/memtest.wgsl`
//! (compiled to SPIR-V by build.rs), and one command buffer that runs a
//! step over a batch of chunks on the compute queue.
//!
//! Made at the first step, not at open: a server that never tests its
//! memory never builds pipelines. Steps are serialised (one result buffer);
//! the memory test runs one at a time anyway.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ash::vk;
use gpu_allocator::vulkan::Allocation;
use gpu_allocator::MemoryLocation;
use tracing::warn;

use super::conv;
use super::device::DeviceShared;
use crate::backend::selftest::{
    self, BadWord, SelfTest, StepResult, TestChunk, TestOp, TestStep, MAX_BAD_WORDS,
    MAX_CHUNKS_PER_STEP, WORDS_PER_BLOCK,
};
use crate::backend::{BackendError, BLOCKS_PER_CHUNK};

/// `shaders/memtest.wgsl` as SPIR-V.
const SPIRV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtest.spv"));
/// Workgroups per chunk (256 invocations each): 4 words per invocation of
/// a 4 MiB chunk, enough work in flight to fill any GPU.
const WORKGROUPS: u32 = 1024;
/// `Params` in the shader: eight `u32`s.
const PARAMS_BYTES: u32 = 32;
/// The counters buffer: the total, then one counter per block of each
/// chunk of a batch.
const COUNTERS_BYTES: u64 = 4 * (1 + (MAX_CHUNKS_PER_STEP * BLOCKS_PER_CHUNK) as u64);
/// The bad-word records: four `u32`s each.
const BAD_BYTES: u64 = 16 * MAX_BAD_WORDS as u64;
/// A step this slow means something is wrong: say so, and keep waiting.
const SLOW_WAIT: Duration = Duration::from_secs(10);

/// The Vulkan backend's [`SelfTest`].
pub(super) struct VulkanSelfTest {
    shared: Arc<DeviceShared>,
    state: Mutex<Option<Compute>>,
}

impl VulkanSelfTest {
    pub(super) fn new(shared: Arc<DeviceShared>) -> Self {
        VulkanSelfTest {
            shared,
            state: Mutex::new(None),
        }
    }
}

impl SelfTest for VulkanSelfTest {
    fn run(&self, chunks: &[TestChunk], step: &TestStep) -> Result<StepResult, BackendError> {
        selftest::check_chunks(chunks)?;
        self.shared.check_alive()?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let compute = match &mut *state {
            Some(compute) => compute,
            empty => empty.insert(Compute::new(self.shared.clone())?),
        };
        compute.run(chunks, step)
    }
}

/// Everything a step needs, made once. `Drop` destroys what was made, so
/// a half-built one cleans up after itself.
struct Compute {
    shared: Arc<DeviceShared>,
    queue_family: u32,
    module: vk::ShaderModule,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    /// By [`TestOp`]: fill, check, check_invert.
    pipelines: [vk::Pipeline; 3],
    descriptor_pool: vk::DescriptorPool,
    /// One per chunk of a batch.
    sets: Vec<vk::DescriptorSet>,
    command_pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    /// Device-local: the shader's atomics stay on the GPU.
    counters: Option<(vk::Buffer, Allocation)>,
    bad: Option<(vk::Buffer, Allocation)>,
    /// Host-visible: the counters, then the bad words, copied here at the
    /// end of each step.
    readback: Option<(vk::Buffer, Allocation)>,
}

impl Compute {
    fn new(shared: Arc<DeviceShared>) -> Result<Self, BackendError> {
        let Some((queue_family, _)) = shared.compute_queue() else {
            return Err(BackendError::UnsupportedDevice {
                device: shared.adapter.info.name.clone(),
                reason: "no queue family can run compute shaders".into(),
            });
        };
        let mut compute = Compute {
            shared: shared.clone(),
            queue_family,
            module: vk::ShaderModule::null(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipelines: [vk::Pipeline::null(); 3],
            descriptor_pool: vk::DescriptorPool::null(),
            sets: Vec::new(),
            command_pool: vk::CommandPool::null(),
            cmd: vk::CommandBuffer::null(),
            fence: vk::Fence::null(),
            counters: None,
            bad: None,
            readback: None,
        };
        compute.build()?;
        Ok(compute)
    }

    fn build(&mut self) -> Result<(), BackendError> {
        let device = &self.shared.raw;
        let code = ash::util::read_spv(&mut std::io::Cursor::new(SPIRV)).map_err(|e| {
            BackendError::Api {
                call: "read_spv",
                detail: e.to_string(),
            }
        })?;
        // SAFETY: valid SPIR-V (validated at build time and by the tests);
        // the create info lives across the call.
        self.module = unsafe {
            device.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&code), None)
        }
        .map_err(|e| conv::error("vkCreateShaderModule", e))?;

        let bindings: Vec<vk::DescriptorSetLayoutBinding> = (0..3)
            .map(|binding| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(binding)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // SAFETY: valid create info for this device.
        self.set_layout = unsafe {
            device.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                None,
            )
        }
        .map_err(|e| conv::error("vkCreateDescriptorSetLayout", e))?;
        let push = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(PARAMS_BYTES)];
        let set_layouts = [self.set_layout];
        // SAFETY: the set layout was made above from this device.
        self.layout = unsafe {
            device.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default()
                    .set_layouts(&set_layouts)
                    .push_constant_ranges(&push),
                None,
            )
        }
        .map_err(|e| conv::error("vkCreatePipelineLayout", e))?;
        let infos: Vec<vk::ComputePipelineCreateInfo> = [c"fill", c"check", c"check_invert"]
            .iter()
            .map(|entry| {
                vk::ComputePipelineCreateInfo::default()
                    .stage(
                        vk::PipelineShaderStageCreateInfo::default()
                            .stage(vk::ShaderStageFlags::COMPUTE)
                            .module(self.module)
                            .name(entry),
                    )
                    .layout(self.layout)
            })
            .collect();
        // SAFETY: module and layout are alive; the entry points exist in
        // the module (the shaders test checks their names).
        let pipelines =
            unsafe { device.create_compute_pipelines(vk::PipelineCache::null(), &infos, None) };
        match pipelines {
            Ok(made) => self.pipelines.copy_from_slice(&made),
            Err((made, err)) => {
                // Keep what was made so `Drop` destroys it.
                for (slot, pipeline) in self.pipelines.iter_mut().zip(made) {
                    *slot = pipeline;
                }
                return Err(conv::error("vkCreateComputePipelines", err));
            }
        }

        let sizes = [vk::DescriptorPoolSize::default()
            .ty(vk::DescriptorType::STORAGE_BUFFER)
            .descriptor_count(3 * MAX_CHUNKS_PER_STEP as u32)];
        // SAFETY: valid create info for this device.
        self.descriptor_pool = unsafe {
            device.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .max_sets(MAX_CHUNKS_PER_STEP as u32)
                    .pool_sizes(&sizes),
                None,
            )
        }
        .map_err(|e| conv::error("vkCreateDescriptorPool", e))?;
        let layouts = vec![self.set_layout; MAX_CHUNKS_PER_STEP];
        // SAFETY: the pool has room for exactly these sets.
        self.sets = unsafe {
            device.allocate_descriptor_sets(
                &vk::DescriptorSetAllocateInfo::default()
                    .descriptor_pool(self.descriptor_pool)
                    .set_layouts(&layouts),
            )
        }
        .map_err(|e| conv::error("vkAllocateDescriptorSets", e))?;

        // SAFETY: valid create info; the family was requested at device
        // creation.
        self.command_pool = unsafe {
            device.create_command_pool(
                &vk::CommandPoolCreateInfo::default()
                    .queue_family_index(self.queue_family)
                    .flags(vk::CommandPoolCreateFlags::TRANSIENT),
                None,
            )
        }
        .map_err(|e| conv::error("vkCreateCommandPool", e))?;
        // SAFETY: the pool belongs to this device.
        self.cmd = unsafe {
            device.allocate_command_buffers(
                &vk::CommandBufferAllocateInfo::default()
                    .command_pool(self.command_pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1),
            )
        }
        .map_err(|e| conv::error("vkAllocateCommandBuffers", e))?[0];
        // SAFETY: valid create info for this device.
        self.fence = unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) }
            .map_err(|e| conv::error("vkCreateFence", e))?;

        let counters = self.shared.create_buffer(
            COUNTERS_BYTES,
            MemoryLocation::GpuOnly,
            "vramswap self-test counters",
        )?;
        let counters_buffer = counters.0;
        self.counters = Some(counters);
        let bad = self.shared.create_buffer(
            BAD_BYTES,
            MemoryLocation::GpuOnly,
            "vramswap self-test bad words",
        )?;
        let bad_buffer = bad.0;
        self.bad = Some(bad);
        // Host-visible and coherent (gpu-allocator's GpuToCpu).
        self.readback = Some(self.shared.create_buffer(
            COUNTERS_BYTES + BAD_BYTES,
            MemoryLocation::GpuToCpu,
            "vramswap self-test results",
        )?);
        // Bindings 1 and 2 never change; binding 0 is set per step.
        let counters_info = [vk::DescriptorBufferInfo::default()
            .buffer(counters_buffer)
            .range(vk::WHOLE_SIZE)];
        let bad_info = [vk::DescriptorBufferInfo::default()
            .buffer(bad_buffer)
            .range(vk::WHOLE_SIZE)];
        let writes: Vec<vk::WriteDescriptorSet> = self
            .sets
            .iter()
            .flat_map(|&set| {
                [
                    vk::WriteDescriptorSet::default()
                        .dst_set(set)
                        .dst_binding(1)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(&counters_info),
                    vk::WriteDescriptorSet::default()
                        .dst_set(set)
                        .dst_binding(2)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(&bad_info),
                ]
            })
            .collect();
        // SAFETY: the sets and buffers are alive and no command buffer
        // using the sets is pending (none was recorded yet).
        unsafe { device.update_descriptor_sets(&writes, &[]) };
        Ok(())
    }

    fn run(&mut self, chunks: &[TestChunk], step: &TestStep) -> Result<StepResult, BackendError> {
        let buffers = chunks
            .iter()
            .map(|c| self.shared.chunk_buffer(c.chunk))
            .collect::<Result<Vec<_>, _>>()?;
        self.record(&buffers, chunks, step)?;
        self.submit_and_wait()?;
        self.read_result(chunks.len())
    }

    fn record(
        &self,
        buffers: &[vk::Buffer],
        chunks: &[TestChunk],
        step: &TestStep,
    ) -> Result<(), BackendError> {
        let device = &self.shared.raw;
        let cmd = self.cmd;
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|&buffer| {
                [vk::DescriptorBufferInfo::default()
                    .buffer(buffer)
                    .range(vk::WHOLE_SIZE)]
            })
            .collect();
        let writes: Vec<vk::WriteDescriptorSet> = infos
            .iter()
            .zip(&self.sets)
            .map(|(info, &set)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(0)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        // SAFETY: the previous step's command buffer has completed (its
        // fence was waited for), so no pending work uses these sets; the
        // chunk buffers are alive (the caller holds the chunks).
        unsafe { device.update_descriptor_sets(&writes, &[]) };
        // SAFETY: no submission of this pool's command buffer is pending.
        unsafe { device.reset_command_pool(self.command_pool, vk::CommandPoolResetFlags::empty()) }
            .map_err(|e| conv::error("vkResetCommandPool", e))?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: the command buffer was just reset.
        unsafe { device.begin_command_buffer(cmd, &begin) }
            .map_err(|e| conv::error("vkBeginCommandBuffer", e))?;
        let buffer =
            |b: &Option<(vk::Buffer, Allocation)>| b.as_ref().map(|b| b.0).unwrap_or_default();
        let (counters, bad, readback) = (
            buffer(&self.counters),
            buffer(&self.bad),
            buffer(&self.readback),
        );
        // SAFETY: recording; the counters buffer is alive and its size a
        // multiple of 4.
        unsafe { device.cmd_fill_buffer(cmd, counters, 0, vk::WHOLE_SIZE, 0) };
        // The zeroed counters, and whatever earlier copies left in the
        // chunks, are visible to the shader.
        self.barrier(
            vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::AccessFlags::TRANSFER_WRITE | vk::AccessFlags::SHADER_WRITE,
            vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
        );
        let pipeline = self.pipelines[match step.op {
            TestOp::Fill => 0,
            TestOp::Check => 1,
            TestOp::CheckInvert => 2,
        }];
        // SAFETY: recording; the pipeline is alive.
        unsafe { device.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline) };
        for (slot, chunk) in chunks.iter().enumerate() {
            let params = [
                step.fill as u32,
                step.seed,
                if step.invert { u32::MAX } else { 0 },
                step.rotate,
                chunk.index as u32,
                slot as u32,
                BLOCKS_PER_CHUNK as u32,
                WORDS_PER_BLOCK.trailing_zeros(),
            ];
            let bytes: Vec<u8> = params.iter().flat_map(|p| p.to_ne_bytes()).collect();
            // SAFETY: recording; the set was updated above with live
            // buffers; the push range matches the layout's.
            unsafe {
                device.cmd_bind_descriptor_sets(
                    cmd,
                    vk::PipelineBindPoint::COMPUTE,
                    self.layout,
                    0,
                    &[self.sets[slot]],
                    &[],
                );
                device.cmd_push_constants(
                    cmd,
                    self.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    &bytes,
                );
                device.cmd_dispatch(cmd, WORKGROUPS, 1, 1);
            }
        }
        // Results to the readback copy; chunk contents to later copies.
        self.barrier(
            vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::AccessFlags::SHADER_WRITE,
            vk::PipelineStageFlags::TRANSFER,
            vk::AccessFlags::TRANSFER_READ,
        );
        let regions = [
            (counters, 0, COUNTERS_BYTES),
            (bad, COUNTERS_BYTES, BAD_BYTES),
        ];
        for (src, dst_offset, size) in regions {
            let region = vk::BufferCopy {
                src_offset: 0,
                dst_offset,
                size,
            };
            // SAFETY: recording; both buffers are alive and the region is
            // inside each.
            unsafe { device.cmd_copy_buffer(cmd, src, readback, &[region]) };
        }
        self.barrier(
            vk::PipelineStageFlags::TRANSFER,
            vk::AccessFlags::TRANSFER_WRITE,
            vk::PipelineStageFlags::HOST,
            vk::AccessFlags::HOST_READ,
        );
        // SAFETY: the command buffer is recording.
        unsafe { device.end_command_buffer(cmd) }.map_err(|e| conv::error("vkEndCommandBuffer", e))
    }

    fn barrier(
        &self,
        src_stage: vk::PipelineStageFlags,
        src_access: vk::AccessFlags,
        dst_stage: vk::PipelineStageFlags,
        dst_access: vk::AccessFlags,
    ) {
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(src_access)
            .dst_access_mask(dst_access);
        // SAFETY: the command buffer is recording; a global memory barrier
        // needs no resources.
        unsafe {
            self.shared.raw.cmd_pipeline_barrier(
                self.cmd,
                src_stage,
                dst_stage,
                vk::DependencyFlags::empty(),
                &[barrier],
                &[],
                &[],
            )
        };
    }

    fn submit_and_wait(&self) -> Result<(), BackendError> {
        let device = &self.shared.raw;
        let Some((_, queue)) = self.shared.compute_queue() else {
            return Err(BackendError::DeviceLost);
        };
        // SAFETY: the fence is not in use (the last step was waited for).
        unsafe { device.reset_fences(&[self.fence]) }
            .map_err(|e| conv::error("vkResetFences", e))?;
        let cmds = [self.cmd];
        let submit = vk::SubmitInfo::default().command_buffers(&cmds);
        let queue = queue.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the queue is externally synchronised by its mutex; the
        // command buffer is fully recorded and not pending.
        unsafe { device.queue_submit(*queue, &[submit], self.fence) }
            .map_err(|e| self.shared.note(conv::error("vkQueueSubmit", e)))?;
        drop(queue);
        let start = Instant::now();
        let mut warned = false;
        loop {
            // SAFETY: the fence belongs to this device and was submitted.
            let waited = unsafe {
                device.wait_for_fences(
                    &[self.fence],
                    true,
                    Duration::from_secs(1).as_nanos() as u64,
                )
            };
            match waited {
                Ok(()) => return Ok(()),
                Err(vk::Result::TIMEOUT) => {
                    if !warned && start.elapsed() > SLOW_WAIT {
                        warn!(
                            "{}: a self-test step has not finished after {:?}; still waiting",
                            self.shared.adapter.info.name,
                            start.elapsed()
                        );
                        warned = true;
                    }
                }
                Err(e) => return Err(self.shared.note(conv::error("vkWaitForFences", e))),
            }
        }
    }

    fn read_result(&self, chunks: usize) -> Result<StepResult, BackendError> {
        let bytes = self
            .readback
            .as_ref()
            .and_then(|(_, allocation)| allocation.mapped_slice())
            .ok_or(BackendError::Api {
                call: "gpu_allocator::Allocation::mapped_slice",
                detail: "self-test results are not host-visible".into(),
            })?;
        let words: Vec<u32> = bytes[..(COUNTERS_BYTES + BAD_BYTES) as usize]
            .chunks_exact(4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (counters, bad) = words.split_at((COUNTERS_BYTES / 4) as usize);
        let mismatches = u64::from(counters[0]);
        let recorded = (mismatches as usize).min(MAX_BAD_WORDS);
        Ok(StepResult {
            mismatches,
            block_errors: counters[1..1 + chunks * BLOCKS_PER_CHUNK].to_vec(),
            bad_words: bad
                .chunks_exact(4)
                .take(recorded)
                .map(|r| BadWord {
                    slot: r[0] as usize,
                    word: u64::from(r[1]),
                    observed: r[2],
                    expected: r[3],
                })
                .collect(),
        })
    }
}

impl Drop for Compute {
    fn drop(&mut self) {
        let device = &self.shared.raw;
        // SAFETY: every step was waited for before `run` returned, so
        // nothing of this is in use; null handles (from a half-built
        // one) are ignored by the destroy calls.
        unsafe {
            device.destroy_fence(self.fence, None);
            device.destroy_command_pool(self.command_pool, None);
            device.destroy_descriptor_pool(self.descriptor_pool, None);
            for pipeline in self.pipelines {
                device.destroy_pipeline(pipeline, None);
            }
            device.destroy_pipeline_layout(self.layout, None);
            device.destroy_descriptor_set_layout(self.set_layout, None);
            device.destroy_shader_module(self.module, None);
        }
        let buffers = [self.counters.take(), self.bad.take(), self.readback.take()];
        for (buffer, allocation) in buffers.into_iter().flatten() {
            self.shared.destroy_buffer(buffer, allocation);
        }
    }
}
