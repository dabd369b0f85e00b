//! An open Vulkan device: its transfer queues, its allocator, and the table
//! of chunk buffers the lanes copy to and from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ash::vk;
use ash::vk::Handle;
use gpu_allocator::vulkan::{
    Allocation, AllocationCreateDesc, AllocationScheme, Allocator, AllocatorCreateDesc,
};
use gpu_allocator::{AllocationSizes, AllocatorDebugSettings, MemoryLocation};
use tracing::{debug, warn};

use super::conv;
use super::instance::{Adapter, Instance};
use crate::backend::hostmem::{LockedRegion, MappedChunks};
use crate::backend::wait::{self, Naps, WaitPolicy};
use crate::backend::{
    admit_chunk, decide_mapped, BackendError, ChunkId, DeviceKind, Fill, LostFlag, MappedMode,
    MemoryReport, CHUNK_SIZE,
};

/// Queues of the transfer family used at once. NVIDIA exposes 2 transfer
/// queues, AMD 1–2 SDMA queues; more lanes than queues share them.
const MAX_QUEUES: u32 = 4;
/// gpu-allocator carves chunks out of device memory blocks of this size:
/// few enough `vkAllocateMemory` calls for an 80 GiB card (the driver
/// limit is often 4096), small enough that lazy trims give memory back.
const MEMBLOCK: u64 = 64 << 20;

/// Host memory a lane stages through.
pub(super) enum Staging {
    /// Our own locked memory, imported (`VK_EXT_external_memory_host`).
    Imported {
        region: LockedRegion,
        memory: vk::DeviceMemory,
    },
    /// Host-visible memory from the driver, through gpu-allocator.
    Allocated(Allocation),
}

impl Staging {
    pub(super) fn bytes(&mut self) -> &mut [u8] {
        match self {
            Staging::Imported { region, .. } => region.as_mut_slice(),
            Staging::Allocated(allocation) => allocation.mapped_slice_mut().unwrap_or_default(),
        }
    }

    pub(super) fn bytes_ref(&self) -> &[u8] {
        match self {
            Staging::Imported { region, .. } => region.as_slice(),
            Staging::Allocated(allocation) => allocation.mapped_slice().unwrap_or_default(),
        }
    }
}

/// State every lane and chunk of one device shares. Destroyed when the last
/// of them is gone, device before instance.
pub(super) struct DeviceShared {
    pub(super) raw: ash::Device,
    pub(super) queues: Box<[Mutex<vk::Queue>]>,
    pub(super) queue_family: u32,
    /// Where compute shaders run (the self-test), if anywhere.
    compute: Option<ComputeQueue>,
    /// The queue families that use chunks: buffers are shared between
    /// them (`CONCURRENT`) when there are two, so what a shader wrote a
    /// copy reads without an ownership transfer.
    families: Vec<u32>,
    pub(super) adapter: Adapter,
    lost: LostFlag,
    /// Whether waiters poll their fence or sleep.
    pub(super) waits: WaitPolicy,
    memory_limit: Option<u64>,
    /// Present when staging can be our own locked memory.
    host_import: Option<ash::ext::external_memory_host::Device>,
    /// Chunk id → `vk::Buffer` raw handle (0: none). Lanes read it without
    /// a lock; only allocation and free write it.
    buffers: Box<[AtomicU64]>,
    /// Present when chunks live in CPU-mappable VRAM (`mapped=`): where
    /// each one is mapped.
    mapped: Option<MappedChunks>,
    /// `mapped=on`: a chunk the driver will not give as mappable VRAM is
    /// refused rather than placed in unmapped memory.
    mapped_required: bool,
    /// Set once the driver refused a mappable chunk (`mapped=auto`): no
    /// later chunk tries again until one is freed.
    mapped_full: std::sync::atomic::AtomicBool,
    memory: Mutex<Memory>,
    /// Declared last: dropped after `Drop::drop` destroyed the device.
    pub(super) instance: Instance,
}

/// The compute queue: a queue of its own family, or (`own: None`) the
/// first copy queue when that family computes too.
struct ComputeQueue {
    family: u32,
    own: Option<Mutex<vk::Queue>>,
}

struct Memory {
    allocator: Option<Allocator>,
    chunks: Vec<Option<(vk::Buffer, Allocation)>>,
    free_ids: Vec<u32>,
    held: u64,
}

impl DeviceShared {
    pub(super) fn open(
        instance: Instance,
        adapter: Adapter,
        memory_limit: Option<u64>,
        mapped: MappedMode,
    ) -> Result<Self, BackendError> {
        let use_mapped = decide_mapped(&adapter.info, mapped)?;
        let queue_count = adapter.queue_count.min(MAX_QUEUES);
        let priorities = vec![1.0f32; queue_count as usize];
        let mut queue_info = vec![vk::DeviceQueueCreateInfo::default()
            .queue_family_index(adapter.queue_family)
            .queue_priorities(&priorities)];
        let separate_compute = adapter
            .compute_family
            .filter(|&family| family != adapter.queue_family);
        if let Some(family) = separate_compute {
            queue_info.push(
                vk::DeviceQueueCreateInfo::default()
                    .queue_family_index(family)
                    .queue_priorities(&priorities[..1]),
            );
        }
        let mut extensions = Vec::new();
        if adapter.has_memory_budget {
            extensions.push(ash::ext::memory_budget::NAME.as_ptr());
        }
        if adapter.host_import_alignment.is_some() {
            extensions.push(ash::ext::external_memory_host::NAME.as_ptr());
        }
        let create = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .enabled_extension_names(&extensions);
        // SAFETY: `adapter.raw` belongs to `instance`; the create info and
        // what it points to live across the call.
        let raw = unsafe { instance.raw.create_device(adapter.raw, &create, None) }
            .map_err(|e| conv::error("vkCreateDevice", e))?;
        let queues = (0..queue_count)
            // SAFETY: the family and index were requested at device creation.
            .map(|i| Mutex::new(unsafe { raw.get_device_queue(adapter.queue_family, i) }))
            .collect();
        let compute = adapter.compute_family.map(|family| ComputeQueue {
            family,
            own: separate_compute.map(|family| {
                // SAFETY: queue 0 of this family was requested above.
                Mutex::new(unsafe { raw.get_device_queue(family, 0) })
            }),
        });
        let mut families = vec![adapter.queue_family];
        families.extend(separate_compute);
        let allocator = Allocator::new(&AllocatorCreateDesc {
            instance: instance.raw.clone(),
            device: raw.clone(),
            physical_device: adapter.raw,
            debug_settings: AllocatorDebugSettings::default(),
            buffer_device_address: false,
            allocation_sizes: AllocationSizes::new(MEMBLOCK, MEMBLOCK),
        });
        let allocator = match allocator {
            Ok(allocator) => allocator,
            Err(err) => {
                // SAFETY: nothing was made from the device yet.
                unsafe { raw.destroy_device(None) };
                return Err(conv::allocation_error(err));
            }
        };
        let host_import = adapter
            .host_import_alignment
            .is_some()
            .then(|| ash::ext::external_memory_host::Device::new(&instance.raw, &raw));
        let heap_size = instance.memory(&adapter, 0, None).total;
        let capacity = (heap_size / CHUNK_SIZE) as usize + 1;
        let (spin, naps) = match adapter.info.kind {
            DeviceKind::Cpu => (Duration::ZERO, Naps::CPU),
            _ => (wait::SPIN, Naps::DRIVER),
        };
        debug!(
            device = %adapter.info.name,
            family = adapter.queue_family,
            queues = queue_count,
            dedicated = adapter.info.dedicated_transfer_queue,
            "Vulkan device open"
        );
        Ok(DeviceShared {
            raw,
            queues,
            queue_family: adapter.queue_family,
            compute,
            families,
            adapter,
            lost: LostFlag::default(),
            waits: WaitPolicy::new(spin, naps),
            memory_limit,
            host_import,
            buffers: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            mapped: use_mapped.then(|| MappedChunks::new(capacity)),
            mapped_required: mapped == MappedMode::On,
            mapped_full: std::sync::atomic::AtomicBool::new(false),
            memory: Mutex::new(Memory {
                allocator: Some(allocator),
                chunks: Vec::new(),
                free_ids: Vec::new(),
                held: 0,
            }),
            instance,
        })
    }

    fn memory_lock(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn check_alive(&self) -> Result<(), BackendError> {
        self.lost.check()
    }

    /// Notes a lost device: every later call fails at once.
    pub(super) fn note(&self, err: BackendError) -> BackendError {
        self.lost.note(err, &self.adapter.info.name)
    }

    pub(super) fn memory_report(&self) -> MemoryReport {
        let held = self.memory_lock().held;
        self.instance.memory(&self.adapter, held, self.memory_limit)
    }

    /// The compute queue's family and the queue, where the device has one.
    pub(super) fn compute_queue(&self) -> Option<(u32, &Mutex<vk::Queue>)> {
        let compute = self.compute.as_ref()?;
        let queue = compute.own.as_ref().unwrap_or(&self.queues[0]);
        Some((compute.family, queue))
    }

    /// Makes a buffer with memory bound from `location`.
    pub(super) fn create_buffer(
        &self,
        size: u64,
        location: MemoryLocation,
        name: &str,
    ) -> Result<(vk::Buffer, Allocation), BackendError> {
        let mut memory = self.memory_lock();
        self.create_buffer_locked(&mut memory, size, location, name)
    }

    fn create_buffer_locked(
        &self,
        memory: &mut Memory,
        size: u64,
        location: MemoryLocation,
        name: &str,
    ) -> Result<(vk::Buffer, Allocation), BackendError> {
        let allocator = memory.allocator.as_mut().ok_or(BackendError::DeviceLost)?;
        // STORAGE_BUFFER: the self-test's shaders read and write chunks.
        let info = vk::BufferCreateInfo::default().size(size).usage(
            vk::BufferUsageFlags::TRANSFER_SRC
                | vk::BufferUsageFlags::TRANSFER_DST
                | vk::BufferUsageFlags::STORAGE_BUFFER,
        );
        let info = if self.families.len() > 1 {
            info.sharing_mode(vk::SharingMode::CONCURRENT)
                .queue_family_indices(&self.families)
        } else {
            info.sharing_mode(vk::SharingMode::EXCLUSIVE)
        };
        // SAFETY: valid create info; the buffer is destroyed below on error
        // or by `destroy_buffer`.
        let buffer = unsafe { self.raw.create_buffer(&info, None) }
            .map_err(|e| conv::error("vkCreateBuffer", e))?;
        // SAFETY: `buffer` was just made from this device.
        let requirements = unsafe { self.raw.get_buffer_memory_requirements(buffer) };
        let allocation = allocator
            .allocate(&AllocationCreateDesc {
                name,
                requirements,
                location,
                linear: true,
                allocation_scheme: AllocationScheme::GpuAllocatorManaged,
            })
            .map_err(conv::allocation_error);
        let allocation = match allocation {
            Ok(allocation) => allocation,
            Err(err) => {
                // SAFETY: the buffer is unused and unbound.
                unsafe { self.raw.destroy_buffer(buffer, None) };
                return Err(err);
            }
        };
        // SAFETY: the allocation meets the buffer's requirements and is
        // bound once, before any use.
        let bound = unsafe {
            self.raw
                .bind_buffer_memory(buffer, allocation.memory(), allocation.offset())
        };
        if let Err(err) = bound {
            // SAFETY: the buffer is unused.
            unsafe { self.raw.destroy_buffer(buffer, None) };
            let _ = allocator.free(allocation);
            return Err(conv::error("vkBindBufferMemory", err));
        }
        Ok((buffer, allocation))
    }

    /// A staging buffer of at least `len` bytes: our own locked memory
    /// imported into Vulkan where the device allows it (see `hostmem` for
    /// why), else host-cached memory from the driver.
    pub(super) fn create_staging(&self, len: usize) -> Result<(vk::Buffer, Staging), BackendError> {
        if let Some(align) = self.adapter.host_import_alignment {
            match self.import_host(len, align) {
                Ok(staging) => return Ok(staging),
                Err(err) => debug!("importing host memory failed ({err}); using driver memory"),
            }
        }
        // Host-cached: downloads are read by the CPU, and reading
        // write-combined memory is an order of magnitude slower.
        let (buffer, allocation) =
            self.create_buffer(len as u64, MemoryLocation::GpuToCpu, "vramswap staging")?;
        if allocation.mapped_ptr().is_none() {
            self.destroy_staging(buffer, Staging::Allocated(allocation));
            return Err(BackendError::UnsupportedDevice {
                device: self.adapter.info.name.clone(),
                reason: "staging memory cannot be mapped".into(),
            });
        }
        Ok((buffer, Staging::Allocated(allocation)))
    }

    fn import_host(&self, len: usize, align: u64) -> Result<(vk::Buffer, Staging), BackendError> {
        let region = LockedRegion::new(len, align as usize).map_err(|e| BackendError::Api {
            call: "mmap",
            detail: e.to_string(),
        })?;
        // SAFETY: the region is a live mapping aligned to the import
        // alignment, and outlives the memory object (`destroy_staging`).
        let (buffer, memory) = unsafe { self.import_pointer(region.as_ptr(), region.len())? };
        Ok((buffer, Staging::Imported { region, memory }))
    }

    /// Imports the caller's memory `buf` for DMA: the whole pages that
    /// cover it, as the import needs its pointer and size aligned to
    /// `minImportedHostPointerAlignment`. Refused where that alignment is
    /// larger than a page: the aligned range could then reach into
    /// mappings that are neither the buffer's nor its allocator's, which
    /// may be unmapped while imported. Within a page, the bytes around
    /// the buffer are its allocator's (a malloc header, a neighbour in the
    /// same heap page): imported, never written, since copies reach only
    /// a batch's target inside `buf`.
    pub(super) fn register_host(
        &self,
        buf: &[u8],
    ) -> Result<(vk::Buffer, vk::DeviceMemory, u64), BackendError> {
        let unsupported = |reason: &str| BackendError::UnsupportedDevice {
            device: self.adapter.info.name.clone(),
            reason: reason.into(),
        };
        let align =
            self.adapter
                .host_import_alignment
                .ok_or_else(|| unsupported("no VK_EXT_external_memory_host"))? as usize;
        if align > crate::backend::hostmem::page_size() || !align.is_power_of_two() {
            return Err(unsupported("host imports need more than page alignment"));
        }
        if buf.is_empty() {
            return Err(BackendError::OutOfBounds("an empty host region".into()));
        }
        let first = buf.as_ptr() as usize;
        let start = first & !(align - 1);
        let end = (first + buf.len()).div_ceil(align) * align;
        // SAFETY: `start..end` are whole pages of which `buf` holds at
        // least a byte each, so they are mapped now; the caller unregisters
        // before the buffer could be freed and mapped again
        // (`Backend::register_host`), and copies reach only a batch's target
        // inside it.
        let (buffer, memory) = unsafe { self.import_pointer(start as *mut u8, end - start)? };
        Ok((buffer, memory, (first - start) as u64))
    }

    /// Destroys an import from [`DeviceShared::register_host`]. No batch
    /// may use it any more.
    pub(super) fn unregister_host(&self, buffer: vk::Buffer, memory: vk::DeviceMemory) {
        // SAFETY: the caller's rule; buffer before the memory bound to it.
        unsafe {
            self.raw.destroy_buffer(buffer, None);
            self.raw.free_memory(memory, None);
        }
    }

    /// Imports `len` bytes of host memory at `ptr` as a transfer buffer.
    ///
    /// # Safety
    /// `ptr` and `len` are aligned to the device's import alignment, the
    /// range is mapped, and it stays so until the memory is freed.
    unsafe fn import_pointer(
        &self,
        ptr: *mut u8,
        len: usize,
    ) -> Result<(vk::Buffer, vk::DeviceMemory), BackendError> {
        let ext = self.host_import.as_ref().ok_or(BackendError::Api {
            call: "vkGetMemoryHostPointerPropertiesEXT",
            detail: "extension not enabled".into(),
        })?;
        let handle_type = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut pointer_props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the pointer is the start of a live mapping aligned to the
        // device's import alignment (the caller's rule); the out struct is
        // valid.
        unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(
                self.raw.handle(),
                handle_type,
                ptr as *const std::ffi::c_void,
                &mut pointer_props,
            )
        }
        .result()
        .map_err(|e| conv::error("vkGetMemoryHostPointerPropertiesEXT", e))?;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle_type);
        let info = vk::BufferCreateInfo::default()
            .size(len as u64)
            .usage(vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: valid create info; destroyed on every error path below.
        let buffer = unsafe { self.raw.create_buffer(&info, None) }
            .map_err(|e| conv::error("vkCreateBuffer", e))?;
        // SAFETY: `buffer` was just made from this device.
        let requirements = unsafe { self.raw.get_buffer_memory_requirements(buffer) };
        // SAFETY: the physical device belongs to the instance.
        let types = unsafe {
            self.instance
                .raw
                .get_physical_device_memory_properties(self.adapter.raw)
        };
        let allowed = pointer_props.memory_type_bits & requirements.memory_type_bits;
        let cached = vk::MemoryPropertyFlags::HOST_VISIBLE
            | vk::MemoryPropertyFlags::HOST_COHERENT
            | vk::MemoryPropertyFlags::HOST_CACHED;
        let candidates = || (0..types.memory_type_count).filter(|i| allowed & (1 << i) != 0);
        let Some(type_index) = candidates()
            .find(|&i| {
                types.memory_types[i as usize]
                    .property_flags
                    .contains(cached)
            })
            .or_else(|| candidates().next())
        else {
            // SAFETY: the buffer is unused and unbound.
            unsafe { self.raw.destroy_buffer(buffer, None) };
            return Err(BackendError::Api {
                call: "vkGetMemoryHostPointerPropertiesEXT",
                detail: "no memory type can import host memory for a buffer".into(),
            });
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle_type)
            .host_pointer(ptr as *mut std::ffi::c_void);
        let allocate = vk::MemoryAllocateInfo::default()
            .allocation_size(len as u64)
            .memory_type_index(type_index)
            .push_next(&mut import);
        // SAFETY: the import points at mapped memory that outlives the
        // memory object (the caller's rule).
        let memory = match unsafe { self.raw.allocate_memory(&allocate, None) } {
            Ok(memory) => memory,
            Err(e) => {
                // SAFETY: the buffer is unused and unbound.
                unsafe { self.raw.destroy_buffer(buffer, None) };
                return Err(conv::error("vkAllocateMemory(import)", e));
            }
        };
        // SAFETY: memory and buffer are both new, bound once before use.
        if let Err(e) = unsafe { self.raw.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: neither is in use.
            unsafe {
                self.raw.destroy_buffer(buffer, None);
                self.raw.free_memory(memory, None);
            }
            return Err(conv::error("vkBindBufferMemory", e));
        }
        Ok((buffer, memory))
    }

    /// Destroys a staging buffer. No submitted work may use it any more.
    pub(super) fn destroy_staging(&self, buffer: vk::Buffer, staging: Staging) {
        match staging {
            Staging::Imported { region, memory } => {
                // SAFETY: nothing uses the buffer; the memory is freed before
                // the host region it imports is unmapped (region drops last).
                unsafe {
                    self.raw.destroy_buffer(buffer, None);
                    self.raw.free_memory(memory, None);
                }
                drop(region);
            }
            Staging::Allocated(allocation) => self.destroy_buffer(buffer, allocation),
        }
    }

    /// Destroys a buffer from [`DeviceShared::create_buffer`]. No submitted
    /// work may use it any more.
    pub(super) fn destroy_buffer(&self, buffer: vk::Buffer, allocation: Allocation) {
        let mut memory = self.memory_lock();
        Self::destroy_buffer_locked(&self.raw, &mut memory, buffer, allocation);
    }

    fn destroy_buffer_locked(
        device: &ash::Device,
        memory: &mut Memory,
        buffer: vk::Buffer,
        allocation: Allocation,
    ) {
        // SAFETY: the caller guarantees no pending work uses the buffer.
        unsafe { device.destroy_buffer(buffer, None) };
        if let Some(allocator) = memory.allocator.as_mut() {
            if let Err(err) = allocator.free(allocation) {
                warn!("freeing device memory failed: {err}");
            }
        }
    }

    /// A chunk's buffer and memory, and where the CPU maps it: mapped VRAM
    /// where chunks are mapped and the driver still gives it, else (with
    /// `mapped=auto`) device memory reached by DMA only. NVIDIA's H200
    /// driver gives a process only about half of the VRAM as mappable
    /// memory (docs/BENCHMARKS.md, "Mapped writes and reads"), so a large
    /// area is part mapped, part not.
    fn allocate_chunk_memory(
        &self,
        memory: &mut Memory,
    ) -> Result<(vk::Buffer, Allocation, Option<std::ptr::NonNull<u8>>), BackendError> {
        if self.mapped.is_some() && !self.mapped_full.load(Ordering::Acquire) {
            // gpu-allocator falls back to host memory when CpuToGpu finds
            // no mappable VRAM: such a chunk is refused, not used.
            match self.create_buffer_locked(
                memory,
                CHUNK_SIZE,
                MemoryLocation::CpuToGpu,
                "vramswap chunk",
            ) {
                Ok((buffer, allocation)) => match allocation.mapped_ptr() {
                    Some(ptr) if allocation.memory_properties().contains(conv::MAPPED_VRAM) => {
                        return Ok((buffer, allocation, Some(ptr.cast::<u8>())));
                    }
                    _ => Self::destroy_buffer_locked(&self.raw, memory, buffer, allocation),
                },
                Err(BackendError::OutOfDeviceMemory) => {}
                Err(err) => return Err(self.note(err)),
            }
            if self.mapped_required {
                return Err(BackendError::OutOfDeviceMemory);
            }
            // Mappable VRAM is spent; later chunks go straight to the rest.
            if !self.mapped_full.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    "{}: the driver gives no more mappable VRAM after {}; further chunks \
                     are written and read by DMA",
                    self.adapter.info.name,
                    crate::size::ByteSize(memory.held)
                );
            }
        }
        let (buffer, allocation) = self
            .create_buffer_locked(
                memory,
                CHUNK_SIZE,
                MemoryLocation::GpuOnly,
                "vramswap chunk",
            )
            .map_err(|e| self.note(e))?;
        Ok((buffer, allocation, None))
    }

    pub(super) fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        self.check_alive()?;
        let mut memory = self.memory_lock();
        admit_chunk(memory.held, self.memory_limit)?;
        let (buffer, allocation, mapping) = self.allocate_chunk_memory(&mut memory)?;
        let id = match memory.free_ids.pop() {
            Some(id) => id as usize,
            None => memory.chunks.len(),
        };
        if id >= self.buffers.len() {
            Self::destroy_buffer_locked(&self.raw, &mut memory, buffer, allocation);
            return Err(BackendError::OutOfDeviceMemory);
        }
        if id == memory.chunks.len() {
            memory.chunks.push(None);
        }
        memory.chunks[id] = Some((buffer, allocation));
        memory.held += CHUNK_SIZE;
        self.buffers[id].store(buffer.as_raw(), Ordering::Release);
        if let (Some(table), Some(ptr)) = (&self.mapped, mapping) {
            // SAFETY: gpu-allocator keeps the block persistently mapped
            // until the allocation is freed, which `free_chunk` does only
            // after clearing this entry.
            unsafe { table.set(id as u32, ptr) };
        }
        Ok(ChunkId(id as u32))
    }

    pub(super) fn free_chunk(&self, chunk: ChunkId) {
        let mut memory = self.memory_lock();
        let id = chunk.0 as usize;
        let Some((buffer, allocation)) = memory.chunks.get_mut(id).and_then(Option::take) else {
            warn!("freeing chunk {id}, which is not allocated");
            return;
        };
        self.buffers[id].store(0, Ordering::Release);
        if let Some(table) = &self.mapped {
            if table.contains(id as u32) {
                self.mapped_full.store(false, Ordering::Release);
            }
            table.clear(id as u32);
        }
        memory.free_ids.push(id as u32);
        memory.held -= CHUNK_SIZE;
        Self::destroy_buffer_locked(&self.raw, &mut memory, buffer, allocation);
    }

    pub(super) fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    pub(super) fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        self.mapped.as_ref().is_some_and(|t| t.contains(chunk.0))
    }

    pub(super) fn write_mapped(
        &self,
        chunk: ChunkId,
        offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.check_alive()?;
        match &self.mapped {
            Some(table) => table.write(chunk, offset, fill),
            None => Err(BackendError::BadChunk(chunk)),
        }
    }

    pub(super) fn read_mapped(
        &self,
        chunk: ChunkId,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        self.check_alive()?;
        match &self.mapped {
            Some(table) => table.read(chunk, offset, dst),
            None => Err(BackendError::BadChunk(chunk)),
        }
    }

    /// The buffer of a chunk, for recording a copy.
    pub(super) fn chunk_buffer(&self, chunk: ChunkId) -> Result<vk::Buffer, BackendError> {
        match self
            .buffers
            .get(chunk.0 as usize)
            .map(|b| b.load(Ordering::Acquire))
        {
            Some(raw) if raw != 0 => Ok(vk::Buffer::from_raw(raw)),
            _ => Err(BackendError::BadChunk(chunk)),
        }
    }
}

impl Drop for DeviceShared {
    fn drop(&mut self) {
        // SAFETY: no lane is left (they hold this struct), so nothing new is
        // submitted; waiting makes every chunk idle before it is destroyed.
        unsafe {
            let _ = self.raw.device_wait_idle();
        }
        let memory = self.memory.get_mut().unwrap_or_else(|e| e.into_inner());
        let chunks = std::mem::take(&mut memory.chunks);
        for (buffer, allocation) in chunks.into_iter().flatten() {
            Self::destroy_buffer_locked(&self.raw, memory, buffer, allocation);
        }
        // The allocator frees its memory blocks, which needs the device.
        memory.allocator = None;
        // SAFETY: every buffer, memory block and lane object of this device
        // is gone; the instance outlives this call (field dropped later).
        unsafe { self.raw.destroy_device(None) };
    }
}
