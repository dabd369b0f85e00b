//! Choosing and opening a backend: the one place that names every
//! implementation, so that the seam (`backend/mod.rs`) names none.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use super::cuda;
use super::host;
#[cfg(feature = "vulkan")]
use super::vulkan;
use super::{
    Backend, BackendKind, DeviceInfo, DeviceSelector, MappedMode, OpenError, NVIDIA_VENDOR_ID,
};

/// What to open and with which limits.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub device: DeviceSelector,
    /// Never hold more device memory than this (bytes), whatever the device
    /// has free: chunk allocations past it fail as out of device memory.
    pub memory_limit: Option<u64>,
    /// Whether chunks live in CPU-mappable VRAM, written by CPU stores.
    pub mapped: MappedMode,
}

/// Takes the adapter `selector` picks out of a backend's list, by the
/// rules of [`select_device`]; `info` says what each adapter is.
#[cfg(any(feature = "vulkan", feature = "cuda"))]
pub(crate) fn select_adapter<A>(
    adapters: Vec<A>,
    info: impl Fn(&A) -> &DeviceInfo,
    selector: &DeviceSelector,
) -> Result<A, OpenError> {
    let infos: Vec<DeviceInfo> = adapters.iter().map(|a| info(a).clone()).collect();
    let index = select_device(&infos, selector)?.index;
    adapters
        .into_iter()
        .find(|a| info(a).index == index)
        .ok_or_else(|| OpenError::NoDevice {
            selector: selector.to_string(),
            available: infos.iter().map(DeviceInfo::short).collect(),
        })
}

/// The backend to use when none is named: the first compiled-in backend,
/// in order of preference (CUDA before Vulkan: on NVIDIA GPUs the vendor
/// API), that sees a device matching `selector`. Plugin and CLI share it,
/// so `device=` finds the same GPU with or without `backend=`.
pub fn default_backend(selector: &DeviceSelector) -> Result<BackendKind, OpenError> {
    default_device(selector).map(|(kind, _)| kind)
}

/// [`default_backend`] with the device it found, for a caller that needs
/// both without listing the devices a second time.
pub fn default_device(selector: &DeviceSelector) -> Result<(BackendKind, DeviceInfo), OpenError> {
    let mut last_error = None;
    for kind in BackendKind::preferred() {
        match enumerate(*kind).and_then(|devices| select_device(&devices, selector).cloned()) {
            Ok(device) => return Ok((*kind, device)),
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or(OpenError::NoDevice {
        selector: selector.to_string(),
        available: Vec::new(),
    }))
}

/// Picks one device from a list the way every backend must, so that
/// `device=` means the same under Vulkan and CUDA.
pub fn select_device<'a>(
    devices: &'a [DeviceInfo],
    selector: &DeviceSelector,
) -> Result<&'a DeviceInfo, OpenError> {
    let not_found = || OpenError::NoDevice {
        selector: selector.to_string(),
        available: devices.iter().map(DeviceInfo::short).collect(),
    };
    match selector {
        DeviceSelector::First => devices
            .iter()
            .min_by_key(|d| (d.kind.preference(), d.index))
            .ok_or_else(not_found),
        DeviceSelector::Index(i) => devices.iter().find(|d| d.index == *i).ok_or_else(not_found),
        DeviceSelector::Uuid(u) => devices.iter().find(|d| &d.uuid == u).ok_or_else(not_found),
        DeviceSelector::Name(name) => {
            let needle = name.to_lowercase();
            let matches: Vec<&DeviceInfo> = devices
                .iter()
                .filter(|d| d.name.to_lowercase().contains(&needle))
                .collect();
            match matches.as_slice() {
                [one] => Ok(one),
                [] => Err(not_found()),
                many => Err(OpenError::AmbiguousDevice {
                    selector: name.clone(),
                    matches: many.iter().map(|d| d.short()).collect(),
                }),
            }
        }
    }
}

/// Why `kind` is a poor choice for `device` when this build has a better
/// one, in one line for a warning; `None` when it is the right choice.
///
/// Vulkan on the NVIDIA driver serves correctly, but slower than CUDA, and
/// under many concurrent small reads it left single ones waiting for up to
/// seconds (docs/BENCHMARKS.md, "One H200, 2026-12-03"). For swap such a
/// read is a process frozen.
pub fn caution(kind: BackendKind, device: &DeviceInfo) -> Option<&'static str> {
    let cuda_here = BackendKind::compiled_in().contains(&BackendKind::Cuda);
    (kind == BackendKind::Vulkan && device.vendor_id == NVIDIA_VENDOR_ID && cuda_here).then_some(
        "on NVIDIA GPUs the cuda backend answers small requests faster, and Vulkan has left \
         single requests waiting up to 2 s under many concurrent ones; prefer cuda where it loads",
    )
}

/// Lists the devices a backend sees, without opening any of them.
pub fn enumerate(kind: BackendKind) -> Result<Vec<DeviceInfo>, OpenError> {
    match kind {
        #[cfg(feature = "vulkan")]
        BackendKind::Vulkan => vulkan::enumerate(),
        #[cfg(not(feature = "vulkan"))]
        BackendKind::Vulkan => Err(OpenError::NotCompiledIn(kind)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => cuda::enumerate(),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err(OpenError::NotCompiledIn(kind)),
        BackendKind::Host => Ok(vec![host::HostBackend::new(None).device().clone()]),
    }
}

/// Opens one device of a backend.
pub fn open(kind: BackendKind, options: &OpenOptions) -> Result<Arc<dyn Backend>, OpenError> {
    match kind {
        #[cfg(feature = "vulkan")]
        BackendKind::Vulkan => Ok(Arc::new(vulkan::VulkanBackend::open(options)?)),
        #[cfg(not(feature = "vulkan"))]
        BackendKind::Vulkan => Err(OpenError::NotCompiledIn(kind)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Arc::new(cuda::CudaBackend::open(options)?)),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err(OpenError::NotCompiledIn(kind)),
        BackendKind::Host => Ok(Arc::new(host::HostBackend::with_mapping(
            options.memory_limit,
            options.mapped != MappedMode::Off,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DeviceKind, MemoryReport};

    fn dev(index: usize, name: &str, kind: DeviceKind, uuid_byte: u8) -> DeviceInfo {
        DeviceInfo {
            backend: BackendKind::Host,
            index,
            name: name.to_string(),
            vendor: "test".into(),
            vendor_id: 0,
            device_id: 0,
            kind,
            uuid: [uuid_byte; 16],
            pci_bus_id: None,
            dedicated_transfer_queue: false,
            memory: MemoryReport::default(),
            mappable: 0,
        }
    }

    #[test]
    fn selection_prefers_discrete_and_rejects_ambiguity() {
        let devices = [
            dev(0, "llvmpipe (LLVM 15)", DeviceKind::Cpu, 1),
            dev(1, "NVIDIA H100 80GB", DeviceKind::Discrete, 2),
            dev(2, "NVIDIA RTX 4090", DeviceKind::Discrete, 3),
        ];
        assert_eq!(
            select_device(&devices, &DeviceSelector::First)
                .unwrap()
                .index,
            1
        );
        assert_eq!(
            select_device(&devices, &DeviceSelector::Index(2))
                .unwrap()
                .index,
            2
        );
        assert_eq!(
            select_device(&devices, &DeviceSelector::Uuid([3; 16]))
                .unwrap()
                .index,
            2
        );
        assert_eq!(
            select_device(&devices, &"h100".parse().unwrap())
                .unwrap()
                .index,
            1
        );
        let err = select_device(&devices, &"nvidia".parse().unwrap()).unwrap_err();
        assert!(matches!(err, OpenError::AmbiguousDevice { .. }), "{err}");
        let err = select_device(&devices, &DeviceSelector::Index(7)).unwrap_err();
        assert!(err.to_string().contains("no device 7"), "{err}");
        assert!(err.to_string().contains("NVIDIA H100"), "{err}");
        let none: [DeviceInfo; 0] = [];
        let err = select_device(&none, &DeviceSelector::First).unwrap_err();
        assert!(err.to_string().ends_with("devices: none"), "{err}");
    }

    #[test]
    fn vulkan_on_nvidia_is_cautioned_only_where_cuda_is_built_in() {
        let mut nvidia = dev(0, "NVIDIA H200", DeviceKind::Discrete, 1);
        nvidia.vendor_id = NVIDIA_VENDOR_ID;
        let mut amd = dev(1, "AMD Radeon PRO W7900", DeviceKind::Discrete, 2);
        amd.vendor_id = 0x1002;
        let cuda_here = cfg!(feature = "cuda");
        assert_eq!(
            caution(BackendKind::Vulkan, &nvidia).is_some(),
            cuda_here,
            "{:?}",
            caution(BackendKind::Vulkan, &nvidia)
        );
        assert_eq!(caution(BackendKind::Cuda, &nvidia), None);
        assert_eq!(caution(BackendKind::Vulkan, &amd), None);
        assert_eq!(caution(BackendKind::Host, &nvidia), None);
    }
}
