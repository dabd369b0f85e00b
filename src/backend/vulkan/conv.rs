//! Every conversion between Vulkan's values and vramswap's, in one place.

use ash::vk;

pub(super) use crate::backend::c_chars;
use crate::backend::{BackendError, DeviceKind, NVIDIA_VENDOR_ID};

/// Maps a failed Vulkan call to the error callers must tell apart; the
/// rest are reported with the call's name.
/// The memory a mapped chunk lives in: VRAM the CPU can write through a
/// mapping with no flush (resizable BAR; all of lavapipe's memory).
pub(super) const MAPPED_VRAM: vk::MemoryPropertyFlags = vk::MemoryPropertyFlags::from_raw(
    vk::MemoryPropertyFlags::DEVICE_LOCAL.as_raw()
        | vk::MemoryPropertyFlags::HOST_VISIBLE.as_raw()
        | vk::MemoryPropertyFlags::HOST_COHERENT.as_raw(),
);

pub(super) fn error(call: &'static str, result: vk::Result) -> BackendError {
    match result {
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY => BackendError::OutOfDeviceMemory,
        vk::Result::ERROR_OUT_OF_HOST_MEMORY => BackendError::OutOfHostMemory,
        vk::Result::ERROR_DEVICE_LOST => BackendError::DeviceLost,
        other => BackendError::Api {
            call,
            detail: format!("{other:?}"),
        },
    }
}

pub(super) fn allocation_error(err: gpu_allocator::AllocationError) -> BackendError {
    match err {
        gpu_allocator::AllocationError::OutOfMemory => BackendError::OutOfDeviceMemory,
        other => BackendError::Api {
            call: "gpu_allocator::Allocator::allocate",
            detail: other.to_string(),
        },
    }
}

pub(super) fn device_kind(kind: vk::PhysicalDeviceType) -> DeviceKind {
    match kind {
        vk::PhysicalDeviceType::DISCRETE_GPU => DeviceKind::Discrete,
        vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceKind::Integrated,
        vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceKind::Virtual,
        vk::PhysicalDeviceType::CPU => DeviceKind::Cpu,
        _ => DeviceKind::Other,
    }
}

/// PCI vendor IDs of the GPU makers, and Khronos' IDs for software drivers.
pub(super) fn vendor_name(vendor_id: u32) -> String {
    match vendor_id {
        NVIDIA_VENDOR_ID => "NVIDIA".into(),
        0x1002 | 0x1022 => "AMD".into(),
        0x8086 => "Intel".into(),
        0x13b5 => "ARM".into(),
        0x5143 => "Qualcomm".into(),
        0x1010 => "Imagination".into(),
        0x106b => "Apple".into(),
        0x10005 => "Mesa".into(),
        other => format!("0x{other:04x}"),
    }
}

pub(super) fn pci_bus_id(info: &vk::PhysicalDevicePCIBusInfoPropertiesEXT<'_>) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        info.pci_domain, info.pci_bus, info.pci_device, info.pci_function
    )
}
