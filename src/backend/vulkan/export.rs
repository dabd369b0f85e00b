//! CPU-mapped VRAM lent to another API: the Vulkan half of the CUDA
//! backend's `mapped=` chunks (`backend/cuda/vkmem.rs` is the CUDA half).
//!
//! CUDA cannot map its own allocations for the CPU, but Vulkan can
//! allocate from the `DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT` type
//! (resizable BAR) and export that memory as an opaque file descriptor
//! (`VK_KHR_external_memory_fd`), which CUDA imports on the same GPU. A
//! device opened here does nothing else: one queue (Vulkan wants one), no
//! commands, only memory objects, each mapped for the CPU as long as it
//! lives.

use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

use ash::vk;
use tracing::debug;

use super::conv;
use super::instance::{mappable_type, Adapter, Instance};
use crate::backend::{BackendError, OpenError, CHUNK_SIZE};

/// The handle type both APIs agree on for Linux: a file descriptor only
/// the same driver understands.
const HANDLE_TYPE: vk::ExternalMemoryHandleTypeFlags = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;

/// What a chunk buffer is used for, as the export support is asked for it.
const USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::TRANSFER_SRC.as_raw() | vk::BufferUsageFlags::TRANSFER_DST.as_raw(),
);

/// How a device can export mapped VRAM, found without opening it.
struct Support {
    /// The mappable VRAM memory type.
    type_index: u32,
    /// Its heap's size: what `DeviceInfo::mappable` reports.
    heap_size: u64,
    /// Whether the driver exports only memory dedicated to one buffer.
    dedicated_only: bool,
}

/// Whether `adapter` can lend exportable mapped VRAM, and if not, why.
fn support(instance: &Instance, adapter: &Adapter) -> Result<Support, String> {
    if !adapter.has_external_memory_fd {
        return Err("its Vulkan driver lacks VK_KHR_external_memory_fd".into());
    }
    // SAFETY: the physical device belongs to this instance.
    let memory = unsafe {
        instance
            .raw
            .get_physical_device_memory_properties(adapter.raw)
    };
    let Some((type_index, heap_size)) = mappable_type(&memory) else {
        return Err("Vulkan has no CPU-mappable VRAM memory type on it".into());
    };
    let info = vk::PhysicalDeviceExternalBufferInfo::default()
        .usage(USAGE)
        .handle_type(HANDLE_TYPE);
    let mut props = vk::ExternalBufferProperties::default();
    // SAFETY: the physical device belongs to this instance (Vulkan 1.1, so
    // the core entry point exists); both structs are valid for the call.
    unsafe {
        instance
            .raw
            .get_physical_device_external_buffer_properties(adapter.raw, &info, &mut props)
    };
    let features = props.external_memory_properties.external_memory_features;
    if !features.contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE) {
        return Err("its Vulkan driver cannot export buffer memory as a file descriptor".into());
    }
    Ok(Support {
        type_index,
        heap_size,
        dedicated_only: features.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY),
    })
}

/// For each UUID, the bytes of VRAM the CPU can map on that GPU where
/// Vulkan sees it and can export that memory, else why not. One Vulkan
/// instance answers all of them; nothing is opened.
pub(crate) fn exportable(uuids: &[[u8; 16]]) -> Vec<Result<u64, String>> {
    let answers = Instance::new()
        .map_err(|e| e.to_string())
        .and_then(|instance| {
            let adapters = instance.adapters().map_err(|e| e.to_string())?;
            Ok(uuids
                .iter()
                .map(
                    |uuid| match adapters.iter().find(|a| &a.info.uuid == uuid) {
                        Some(adapter) => support(&instance, adapter).map(|s| s.heap_size),
                        None => Err("Vulkan does not see this GPU".into()),
                    },
                )
                .collect::<Vec<_>>())
        });
    answers.unwrap_or_else(|reason| vec![Err(reason); uuids.len()])
}

/// A Vulkan device opened only to allocate exportable mapped VRAM.
pub(crate) struct ExportingDevice {
    raw: ash::Device,
    fd: ash::khr::external_memory_fd::Device,
    support: Support,
    /// Whether an exportable buffer may be bound to the mappable memory
    /// (its memory type bits say so). NVIDIA's driver (580, H200) says
    /// not; then blocks are memory objects with no Vulkan buffer: nothing
    /// in Vulkan uses them, CUDA maps its own buffer over the import.
    bind_buffer: bool,
    /// Declared last: dropped after `Drop::drop` destroyed the device.
    _instance: Instance,
}

/// One exported, mapped memory object. Freed only by
/// [`ExportingDevice::free`]; dropped otherwise, its memory stays with the
/// device until the device is destroyed.
pub(crate) struct ExportedBlock {
    /// The buffer the memory is bound to, where exportable buffers may
    /// live in mappable VRAM (`ExportingDevice::bind_buffer`).
    buffer: Option<vk::Buffer>,
    memory: vk::DeviceMemory,
    ptr: NonNull<u8>,
    size: u64,
}

// SAFETY: the handles are plain identifiers the (thread-safe, externally
// synchronised per object) driver interprets; `ptr` is a mapping of device
// memory that any thread may write, and the block is used by one owner.
unsafe impl Send for ExportedBlock {}

impl ExportedBlock {
    /// Where the CPU sees the block's first byte.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The memory object's size, which an importer must name exactly.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }
}

impl ExportingDevice {
    /// Opens the Vulkan device with this UUID, where it can lend exportable
    /// mapped VRAM; the error says why not, in words for a log line.
    pub(crate) fn open(uuid: &[u8; 16], name: &str) -> Result<(Self, u64), BackendError> {
        let unsupported = |reason: String| BackendError::UnsupportedDevice {
            device: name.to_string(),
            reason,
        };
        let instance = Instance::new().map_err(|e| match e {
            OpenError::Backend(e) => e,
            other => unsupported(other.to_string()),
        })?;
        let adapter = instance
            .adapters()?
            .into_iter()
            .find(|a| &a.info.uuid == uuid)
            .ok_or_else(|| unsupported("Vulkan does not see this GPU".into()))?;
        let support = support(&instance, &adapter).map_err(unsupported)?;
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(adapter.queue_family)
            .queue_priorities(&priorities)];
        // VK_KHR_external_memory and VK_KHR_dedicated_allocation are core
        // in Vulkan 1.1, the version the instance asks for.
        let extensions = [ash::khr::external_memory_fd::NAME.as_ptr()];
        let create = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&extensions);
        // SAFETY: `adapter.raw` belongs to `instance`; the create info and
        // what it points to live across the call. Destroyed by `Drop`.
        let raw = unsafe { instance.raw.create_device(adapter.raw, &create, None) }
            .map_err(|e| conv::error("vkCreateDevice", e))?;
        let fd = ash::khr::external_memory_fd::Device::new(&instance.raw, &raw);
        let heap_size = support.heap_size;
        let mut device = ExportingDevice {
            raw,
            fd,
            support,
            bind_buffer: false,
            _instance: instance,
        };
        let (probe, requirements) = device.external_buffer(CHUNK_SIZE)?;
        // SAFETY: the probe is unbound and unused.
        unsafe { device.raw.destroy_buffer(probe, None) };
        device.bind_buffer = requirements.memory_type_bits & (1 << device.support.type_index) != 0;
        if !device.bind_buffer && device.support.dedicated_only {
            return Err(unsupported(
                "its Vulkan driver exports only memory dedicated to a buffer, and no \
                 exportable buffer may live in CPU-mappable VRAM"
                    .into(),
            ));
        }
        debug!(
            device = %adapter.info.name,
            memory_type = device.support.type_index,
            buffer_types = format_args!("{:#x}", requirements.memory_type_bits),
            bind_buffer = device.bind_buffer,
            dedicated_only = device.support.dedicated_only,
            "Vulkan device open to export mapped VRAM"
        );
        Ok((device, heap_size))
    }

    /// An exportable buffer of `size` bytes, unbound, and what memory it
    /// takes. The caller destroys it.
    fn external_buffer(
        &self,
        size: u64,
    ) -> Result<(vk::Buffer, vk::MemoryRequirements), BackendError> {
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(HANDLE_TYPE);
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(USAGE)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: valid create info; the caller destroys the buffer.
        let buffer = unsafe { self.raw.create_buffer(&info, None) }
            .map_err(|e| conv::error("vkCreateBuffer", e))?;
        // SAFETY: `buffer` was just made from this device.
        let requirements = unsafe { self.raw.get_buffer_memory_requirements(buffer) };
        Ok((buffer, requirements))
    }

    /// Whether an importer must be told the memory is dedicated to one
    /// buffer (`CUDA_EXTERNAL_MEMORY_DEDICATED`).
    pub(crate) fn dedicated(&self) -> bool {
        self.support.dedicated_only
    }

    /// Allocates `size` bytes of mapped VRAM, maps it for the CPU and
    /// exports it: the descriptor is the caller's, to hand to the importer
    /// (or to drop, which closes it).
    pub(crate) fn allocate(&self, size: u64) -> Result<(ExportedBlock, OwnedFd), BackendError> {
        let buffer = match self.bind_buffer {
            true => Some(self.external_buffer(size)?),
            false => None,
        };
        let allocation_size = buffer.map_or(size, |(_, requirements)| requirements.size);
        let buffer = buffer.map(|(buffer, _)| buffer);
        let destroy_buffer = || {
            if let Some(buffer) = buffer {
                // SAFETY: the buffer is unused by any queue (this device
                // submits nothing) and freed once, on this error path.
                unsafe { self.raw.destroy_buffer(buffer, None) }
            }
        };
        let mut export = vk::ExportMemoryAllocateInfo::default().handle_types(HANDLE_TYPE);
        let mut dedicated =
            vk::MemoryDedicatedAllocateInfo::default().buffer(buffer.unwrap_or_default());
        let mut allocate = vk::MemoryAllocateInfo::default()
            .allocation_size(allocation_size)
            .memory_type_index(self.support.type_index)
            .push_next(&mut export);
        if self.support.dedicated_only && buffer.is_some() {
            allocate = allocate.push_next(&mut dedicated);
        }
        // SAFETY: valid allocate info whose chain lives across the call;
        // freed on every error path below and by `free`.
        let memory = match unsafe { self.raw.allocate_memory(&allocate, None) } {
            Ok(memory) => memory,
            Err(e) => {
                destroy_buffer();
                return Err(conv::error("vkAllocateMemory(export)", e));
            }
        };
        let fail = |err: BackendError| {
            destroy_buffer();
            // SAFETY: the memory is unmapped (vkFreeMemory unmaps it
            // anyway), bound at most to the buffer destroyed above, and no
            // importer holds it yet.
            unsafe { self.raw.free_memory(memory, None) };
            err
        };
        if let Some(buffer) = buffer {
            // SAFETY: new buffer and memory, bound once before any use;
            // the memory meets the buffer's requirements (size, type).
            if let Err(e) = unsafe { self.raw.bind_buffer_memory(buffer, memory, 0) } {
                return Err(fail(conv::error("vkBindBufferMemory", e)));
            }
        }
        // SAFETY: host-visible memory, mapped once, whole, until `free`.
        let mapped = unsafe {
            self.raw
                .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
        };
        let ptr = match mapped.map(|p| NonNull::new(p.cast::<u8>())) {
            Ok(Some(ptr)) => ptr,
            Ok(None) => {
                return Err(fail(BackendError::Api {
                    call: "vkMapMemory",
                    detail: "returned a null pointer".into(),
                }))
            }
            Err(e) => return Err(fail(conv::error("vkMapMemory", e))),
        };
        let get = vk::MemoryGetFdInfoKHR::default()
            .memory(memory)
            .handle_type(HANDLE_TYPE);
        // SAFETY: memory allocated exportable as this handle type; each
        // call returns a new descriptor the caller owns.
        let fd = match unsafe { self.fd.get_memory_fd(&get) } {
            Ok(fd) if fd >= 0 => fd,
            Ok(_) => {
                return Err(fail(BackendError::Api {
                    call: "vkGetMemoryFdKHR",
                    detail: "returned a negative descriptor".into(),
                }))
            }
            Err(e) => return Err(fail(conv::error("vkGetMemoryFdKHR", e))),
        };
        // SAFETY: a descriptor vkGetMemoryFdKHR just opened for us: valid,
        // and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((
            ExportedBlock {
                buffer,
                memory,
                ptr,
                size: allocation_size,
            },
            fd,
        ))
    }

    /// Unmaps and frees a block. No CPU write may still use its mapping;
    /// an importer may still hold the memory (the driver keeps it until
    /// both let go), but should have let go first.
    pub(crate) fn free(&self, block: ExportedBlock) {
        // SAFETY: the block came from this device (`allocate`), is freed
        // once (taken by value), and no queue uses it (none is submitted).
        unsafe {
            self.raw.unmap_memory(block.memory);
            if let Some(buffer) = block.buffer {
                self.raw.destroy_buffer(buffer, None);
            }
            self.raw.free_memory(block.memory, None);
        }
    }
}

impl Drop for ExportingDevice {
    fn drop(&mut self) {
        // SAFETY: nothing was submitted to the device, and its owner freed
        // every block (`Interop`'s drop frees what `release_all` could
        // not). The instance outlives this call (field order).
        unsafe { self.raw.destroy_device(None) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Vulkan half on whatever device is here (lavapipe in CI): a block
    /// allocated, written through its mapping, exported and freed.
    #[test]
    fn blocks_are_mapped_exported_and_freed() {
        let Ok(devices) = super::super::enumerate() else {
            eprintln!("no Vulkan here; nothing to check");
            return;
        };
        let uuids: Vec<[u8; 16]> = devices.iter().map(|d| d.uuid).collect();
        let answers = exportable(&uuids);
        assert_eq!(answers.len(), uuids.len());
        let Some((device, _)) = devices.iter().zip(&answers).find(|(_, a)| a.is_ok()) else {
            eprintln!("no Vulkan device here exports mapped VRAM: {answers:?}");
            return;
        };
        let opened = ExportingDevice::open(&device.uuid, &device.name);
        let Ok((vk, mappable)) = opened else {
            panic!("{}: {:?}", device.name, opened.err());
        };
        assert_eq!(mappable, device.mappable);
        let allocated = vk.allocate(CHUNK_SIZE);
        let Ok((block, fd)) = allocated else {
            panic!("{}: {:?}", device.name, allocated.err());
        };
        assert!(block.size() >= CHUNK_SIZE);
        // SAFETY: the block maps at least CHUNK_SIZE bytes until `free`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(block.ptr().as_ptr(), CHUNK_SIZE as usize) };
        bytes.fill(0x5a);
        assert!(bytes.iter().all(|b| *b == 0x5a));
        let stat = is_open(&fd);
        assert!(stat, "the exported descriptor is open");
        drop(fd);
        vk.free(block);
        let unknown = exportable(&[[0xee; 16]]);
        assert!(unknown[0].is_err(), "{unknown:?}");
    }

    fn is_open(fd: &OwnedFd) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl(F_GETFD) on a descriptor we own only reads flags.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) >= 0 }
    }
}
