//! Where an export goes: the backend and device its parameters pick, and
//! the size it gets there; and, when it cannot be served, which key to
//! change. The nbdkit plugin checks this before it forks and meets the
//! same errors when it opens the device after the fork, so both say the
//! same line.

use thiserror::Error;

use crate::backend::{self, BackendKind, DeviceInfo, MappedMode, OpenError};
use crate::export::ExportConfig;
use crate::size::ByteSize;
use crate::store::{resolve_size, ResolvedSize, StoreError};

/// Why an export cannot be served here, in one line that starts with the
/// key to change as the user wrote it (`device=99: no device 99; …`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    /// No device matches `device=`, or none matches among the backends
    /// tried when `backend=` is not given.
    #[error("{key}: {error}")]
    Device { key: String, error: OpenError },
    /// The chosen backend cannot be used on this machine.
    #[error("backend={kind}: {error}")]
    Backend { kind: BackendKind, error: OpenError },
    /// The size, or the reserve of an automatic size, does not fit.
    #[error("{key}: {error}")]
    Size { key: String, error: StoreError },
    /// `mapped=on` on a device whose VRAM the CPU cannot map.
    #[error("{key}: {reason}")]
    Mapped { key: String, reason: String },
    /// Anything else the store refuses at open.
    #[error("{0}")]
    Store(StoreError),
}

impl PlacementError {
    /// A backend's refusal, blamed on `device=` or on `backend=`.
    pub fn backend(export: &ExportConfig, kind: BackendKind, error: OpenError) -> Self {
        match error {
            OpenError::NoDevice { .. }
            | OpenError::AmbiguousDevice { .. }
            | OpenError::BadSelector(_) => PlacementError::Device {
                key: export.quote("device"),
                error,
            },
            error => PlacementError::Backend { kind, error },
        }
    }

    /// The store's refusal, blamed on `size=` or `reserve=` where it is
    /// about the size.
    pub fn store(export: &ExportConfig, error: StoreError) -> Self {
        let key = match error {
            StoreError::TooLarge { .. } | StoreError::TooSmall(_) => "size",
            StoreError::NothingLeft { .. } => "reserve",
            error => return PlacementError::Store(error),
        };
        PlacementError::Size {
            key: export.quote(key),
            error,
        }
    }
}

/// The backend `backend=` names, or the first that sees the device
/// `device=` picks (see [`backend::default_backend`]).
pub fn pick_backend(export: &ExportConfig) -> Result<BackendKind, PlacementError> {
    match export.backend {
        Some(kind) => Ok(kind),
        None => backend::default_backend(&export.device).map_err(|error| PlacementError::Device {
            key: export.quote("device"),
            error,
        }),
    }
}

/// What [`place`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub backend: BackendKind,
    pub device: DeviceInfo,
    pub size: ResolvedSize,
}

/// Picks the backend and the device and resolves the size against what
/// the device has available, without opening it.
///
/// Listing devices initialises the GPU API in this process. CUDA does not
/// survive a fork after that, so the plugin runs this in a child of its
/// own before nbdkit forks, never in nbdkit's process.
pub fn place(export: &ExportConfig) -> Result<Placement, PlacementError> {
    let (kind, device) = match export.backend {
        Some(kind) => {
            let devices =
                backend::enumerate(kind).map_err(|e| PlacementError::backend(export, kind, e))?;
            let device = backend::select_device(&devices, &export.device)
                .map_err(|e| PlacementError::backend(export, kind, e))?;
            (kind, device.clone())
        }
        // The devices listed to choose the backend are the ones to use:
        // listing CUDA's makes a context on every GPU.
        None => {
            backend::default_device(&export.device).map_err(|error| PlacementError::Device {
                key: export.quote("device"),
                error,
            })?
        }
    };
    if export.mapped == MappedMode::On && !device.maps_all_memory() {
        return Err(PlacementError::Mapped {
            key: export.quote("mapped"),
            reason: unmappable(kind, &device),
        });
    }
    let store = export.store_config();
    let size = resolve_size(store.size, store.allocation, device.memory, &device.name)
        .map_err(|e| PlacementError::store(export, e))?;
    Ok(Placement {
        backend: kind,
        device,
        size,
    })
}

/// Why `device` cannot keep its chunks in CPU-mappable VRAM, in words.
pub fn unmappable(kind: BackendKind, device: &DeviceInfo) -> String {
    if device.mappable == 0 {
        return format!(
            "{} cannot map {}'s VRAM for the CPU here (use mapped=auto or mapped=off)",
            kind, device.name
        );
    }
    format!(
        "the CPU can map only {} of {}'s {} of VRAM; enable resizable BAR \
         (or use mapped=auto)",
        ByteSize(device.mappable),
        device.name,
        ByteSize(device.memory.total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export on the host backend (which `backend=` does not take).
    fn on_host(pairs: &[(&str, &str)]) -> ExportConfig {
        let mut export = ExportConfig::default();
        for (key, value) in pairs {
            export.set(key, value).unwrap();
        }
        export.complete().unwrap();
        export.backend = Some(BackendKind::Host);
        export
    }

    fn refusal(pairs: &[(&str, &str)]) -> String {
        place(&on_host(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn the_host_backend_places_a_size_that_fits() {
        let placed = place(&on_host(&[("size", "8M")])).unwrap();
        assert_eq!(placed.backend, BackendKind::Host);
        assert_eq!(placed.size.bytes, 8 << 20);
    }

    #[test]
    fn each_refusal_names_the_key_to_change_as_given() {
        for (pairs, start) in [
            (
                vec![("device", "99"), ("size", "8M")],
                "device=99: no device 99; devices: 0: ",
            ),
            (
                vec![("device", "no-such-name")],
                "device=no-such-name: no device named 'no-such-name'",
            ),
            (
                vec![("size", "64P")],
                "size=64P: size 64 PiB is larger than the ",
            ),
            (
                vec![("reserve", "64P")],
                "reserve=64P: reserve 64 PiB leaves no room",
            ),
        ] {
            let text = refusal(&pairs);
            assert!(text.starts_with(start), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn mapped_on_is_refused_in_one_line_where_vram_is_not_mappable() {
        assert!(place(&on_host(&[("mapped", "on"), ("size", "8M")])).is_ok());
        let mut device = place(&on_host(&[("size", "8M")])).unwrap().device;
        device.memory.total = 16 << 30;
        device.mappable = 256 << 20;
        let text = unmappable(BackendKind::Vulkan, &device);
        assert!(
            text.starts_with("the CPU can map only 256 MiB of "),
            "{text}"
        );
        assert!(text.contains("resizable BAR"), "{text}");
        device.mappable = 0;
        let text = unmappable(BackendKind::Cuda, &device);
        assert!(text.starts_with("cuda cannot map "), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn a_backend_that_cannot_be_used_is_blamed_on_backend() {
        let export = ExportConfig::default();
        let error = OpenError::NotAvailable {
            backend: BackendKind::Cuda,
            reason: "libcuda.so not found".into(),
        };
        let text = PlacementError::backend(&export, BackendKind::Cuda, error).to_string();
        assert_eq!(
            text,
            "backend=cuda: cuda is not available: libcuda.so not found"
        );
        let text = PlacementError::store(&export, StoreError::NoSpace).to_string();
        assert_eq!(text, "no VRAM left for a new chunk");
    }
}
