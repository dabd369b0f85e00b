//! Loading Vulkan and finding adapters: what each device is, which queue
//! family moves data, and which heap is its VRAM.

use std::ffi::CStr;

use ash::vk;
use tracing::debug;

use super::conv;
use crate::backend::{BackendError, BackendKind, DeviceInfo, MemoryReport, OpenError};

/// Vulkan 1.1 brings `vkGetPhysicalDeviceProperties2` (device UUIDs) and
/// `vkCmdFillBuffer` on transfer-only queues.
const API_VERSION: u32 = vk::API_VERSION_1_1;

/// The loader and one instance; destroyed on drop.
pub(super) struct Instance {
    pub(super) raw: ash::Instance,
    /// Keeps `libvulkan.so.1` loaded while `raw` is in use.
    _entry: ash::Entry,
}

/// A physical device that can serve as a backend, and how to use it.
pub(super) struct Adapter {
    pub(super) raw: vk::PhysicalDevice,
    pub(super) info: DeviceInfo,
    pub(super) queue_family: u32,
    pub(super) queue_count: u32,
    /// A family that can dispatch compute shaders (the self-test), when
    /// the device has one; it may be `queue_family` itself.
    pub(super) compute_family: Option<u32>,
    /// The largest device-local heap: where chunks live.
    pub(super) vram_heap: usize,
    pub(super) has_memory_budget: bool,
    /// `minImportedHostPointerAlignment` where the device can use host
    /// memory we allocate (`VK_EXT_external_memory_host`).
    pub(super) host_import_alignment: Option<u64>,
    /// Whether the device can export memory as a file descriptor
    /// (`VK_KHR_external_memory_fd`), for the CUDA backend's mapped chunks.
    pub(super) has_external_memory_fd: bool,
}

impl Instance {
    pub(super) fn new() -> Result<Self, OpenError> {
        // SAFETY: loads libvulkan.so.1 with dlopen; the library's
        // initialisers are trusted like any system library's.
        let entry = unsafe { ash::Entry::load() }.map_err(|err| OpenError::NotAvailable {
            backend: BackendKind::Vulkan,
            reason: format!("Vulkan loader not found: libvulkan.so.1 could not be loaded ({err})"),
        })?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"vramswap")
            .application_version(1)
            .engine_name(c"vramswap")
            .api_version(API_VERSION);
        let create = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `create` and `app` are valid for the call; no allocator.
        let raw = unsafe { entry.create_instance(&create, None) }.map_err(|err| match err {
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => OpenError::NotAvailable {
                backend: BackendKind::Vulkan,
                reason: "no Vulkan driver (ICD) supports Vulkan 1.1 on this machine".into(),
            },
            other => conv::error("vkCreateInstance", other).into(),
        })?;
        Ok(Instance { raw, _entry: entry })
    }

    /// Every physical device that can hold chunks and copy them, numbered
    /// in the loader's order.
    pub(super) fn adapters(&self) -> Result<Vec<Adapter>, BackendError> {
        // SAFETY: the instance is alive for the call.
        let devices = unsafe { self.raw.enumerate_physical_devices() }
            .map_err(|e| conv::error("vkEnumeratePhysicalDevices", e))?;
        let mut adapters = Vec::new();
        for raw in devices {
            match self.adapter(raw, adapters.len())? {
                Some(adapter) => adapters.push(adapter),
                None => continue,
            }
        }
        Ok(adapters)
    }

    fn adapter(
        &self,
        raw: vk::PhysicalDevice,
        index: usize,
    ) -> Result<Option<Adapter>, BackendError> {
        // SAFETY: `raw` came from this instance.
        let props = unsafe { self.raw.get_physical_device_properties(raw) };
        let name = conv::c_chars(&props.device_name);
        if props.api_version < API_VERSION {
            debug!(
                "skipping {name}: Vulkan {}.{} < 1.1",
                vk::api_version_major(props.api_version),
                vk::api_version_minor(props.api_version)
            );
            return Ok(None);
        }
        // SAFETY: `raw` came from this instance.
        let extensions = unsafe { self.raw.enumerate_device_extension_properties(raw) }
            .map_err(|e| conv::error("vkEnumerateDeviceExtensionProperties", e))?;
        let has = |wanted: &CStr| {
            extensions
                .iter()
                .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == wanted))
        };
        let has_pci = has(ash::ext::pci_bus_info::NAME);
        let has_memory_budget = has(ash::ext::memory_budget::NAME);
        let has_host_import = has(ash::ext::external_memory_host::NAME);
        let has_external_memory_fd = has(ash::khr::external_memory_fd::NAME);

        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut pci = vk::PhysicalDevicePCIBusInfoPropertiesEXT::default();
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
        if has_pci {
            props2 = props2.push_next(&mut pci);
        }
        if has_host_import {
            props2 = props2.push_next(&mut host);
        }
        // SAFETY: the chain holds only structs of extensions the device has.
        unsafe { self.raw.get_physical_device_properties2(raw, &mut props2) };

        // SAFETY: `raw` came from this instance.
        let families = unsafe { self.raw.get_physical_device_queue_family_properties(raw) };
        let moves_data = |f: &vk::QueueFamilyProperties| {
            f.queue_flags.intersects(
                vk::QueueFlags::TRANSFER | vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE,
            ) && f.queue_count > 0
        };
        let transfer_only = |f: &vk::QueueFamilyProperties| {
            moves_data(f)
                && !f
                    .queue_flags
                    .intersects(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
        };
        let dedicated = families.iter().position(transfer_only);
        let Some(queue_family) = dedicated.or_else(|| families.iter().position(moves_data)) else {
            debug!("skipping {name}: no queue can copy buffers");
            return Ok(None);
        };
        let computes =
            |f: &vk::QueueFamilyProperties| f.queue_flags.contains(vk::QueueFlags::COMPUTE);
        // The copy family when it computes too (one queue family for all),
        // else the first that does.
        let compute_family = if computes(&families[queue_family]) {
            Some(queue_family)
        } else {
            families
                .iter()
                .position(|f| computes(f) && f.queue_count > 0)
        };

        // SAFETY: `raw` came from this instance.
        let memory = unsafe { self.raw.get_physical_device_memory_properties(raw) };
        let heaps = &memory.memory_heaps[..memory.memory_heap_count as usize];
        let Some(vram_heap) = heaps
            .iter()
            .enumerate()
            .filter(|(_, h)| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .max_by_key(|(_, h)| h.size)
            .map(|(i, _)| i)
        else {
            debug!("skipping {name}: no device-local heap");
            return Ok(None);
        };

        let mut adapter = Adapter {
            raw,
            info: DeviceInfo {
                backend: BackendKind::Vulkan,
                index,
                name,
                vendor: conv::vendor_name(props.vendor_id),
                vendor_id: props.vendor_id,
                device_id: props.device_id,
                kind: conv::device_kind(props.device_type),
                uuid: id.device_uuid,
                pci_bus_id: has_pci.then(|| conv::pci_bus_id(&pci)),
                dedicated_transfer_queue: dedicated.is_some(),
                memory: MemoryReport::default(),
                mappable: mappable_bytes(&memory),
            },
            queue_family: queue_family as u32,
            queue_count: families[queue_family].queue_count,
            compute_family: compute_family.map(|f| f as u32),
            vram_heap,
            has_memory_budget,
            host_import_alignment: has_host_import
                .then_some(host.min_imported_host_pointer_alignment),
            has_external_memory_fd,
        };
        adapter.info.memory = self.memory(&adapter, 0, None);
        Ok(Some(adapter))
    }

    /// The VRAM heap's size and what is available in it: the driver's
    /// budget minus its usage where `VK_EXT_memory_budget` exists, else the
    /// heap less what this backend holds (`held`); capped by `limit`.
    pub(super) fn memory(&self, adapter: &Adapter, held: u64, limit: Option<u64>) -> MemoryReport {
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut props = vk::PhysicalDeviceMemoryProperties2::default();
        if adapter.has_memory_budget {
            props = props.push_next(&mut budget);
        }
        // SAFETY: the chain holds only structs of extensions the device has.
        unsafe {
            self.raw
                .get_physical_device_memory_properties2(adapter.raw, &mut props)
        };
        let heap = adapter.vram_heap;
        let total = props.memory_properties.memory_heaps[heap].size;
        let mut available = if adapter.has_memory_budget {
            budget.heap_budget[heap].saturating_sub(budget.heap_usage[heap])
        } else {
            total.saturating_sub(held)
        };
        if let Some(limit) = limit {
            available = available.min(limit.saturating_sub(held));
        }
        MemoryReport { total, available }
    }
}

/// The size of the heap behind the device's `DEVICE_LOCAL | HOST_VISIBLE |
/// HOST_COHERENT` memory type (0 where there is none): all of VRAM with
/// resizable BAR, a 256 MiB window without.
fn mappable_bytes(memory: &vk::PhysicalDeviceMemoryProperties) -> u64 {
    mappable_type(memory).map_or(0, |(_, size)| size)
}

/// The `DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT` memory type on the
/// largest heap, and that heap's size.
pub(super) fn mappable_type(memory: &vk::PhysicalDeviceMemoryProperties) -> Option<(u32, u64)> {
    memory.memory_types[..memory.memory_type_count as usize]
        .iter()
        .enumerate()
        .filter(|(_, t)| t.property_flags.contains(conv::MAPPED_VRAM))
        .map(|(i, t)| (i as u32, memory.memory_heaps[t.heap_index as usize].size))
        .max_by_key(|(i, size)| (*size, std::cmp::Reverse(*i)))
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every object made from this instance (devices) is
        // destroyed before it: `DeviceShared` drops its device first.
        unsafe { self.raw.destroy_instance(None) };
    }
}
