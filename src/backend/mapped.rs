//! Where chunks live (`mapped=`) and what a write through a chunk's CPU
//! mapping stores: the seam's vocabulary for mapped VRAM, which the Vulkan
//! backend and CUDA on Vulkan-exported memory implement.

use std::fmt;
use std::str::FromStr;

#[cfg(feature = "vulkan")]
use super::{BackendError, DeviceInfo};

/// Whether chunks go to mappable VRAM: `auto` where the device maps (nearly)
/// all of it, `on` only there (else the error names what is missing). The
/// backends that map chunks: Vulkan, and CUDA through Vulkan.
#[cfg(feature = "vulkan")]
pub(crate) fn decide_mapped(info: &DeviceInfo, mode: MappedMode) -> Result<bool, BackendError> {
    match mode {
        MappedMode::Off => Ok(false),
        MappedMode::Auto => Ok(info.maps_all_memory()),
        MappedMode::On if info.maps_all_memory() => Ok(true),
        MappedMode::On => Err(BackendError::UnsupportedDevice {
            device: info.name.clone(),
            reason: format!(
                "mapped=on needs CPU-mappable VRAM, but the CPU can map only {} of its {} \
                 (enable resizable BAR, or use mapped=auto)",
                crate::size::ByteSize(info.mappable),
                crate::size::ByteSize(info.memory.total)
            ),
        }),
    }
}
/// Where chunks live and how writes reach them (`mapped=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MappedMode {
    /// In CPU-mappable device memory where it covers the device's memory
    /// (resizable BAR, lavapipe), else as with `Off`.
    #[default]
    Auto,
    /// In CPU-mappable device memory, or the backend does not open.
    On,
    /// In device memory reached only by DMA through staging.
    Off,
}

impl MappedMode {
    pub fn name(self) -> &'static str {
        match self {
            MappedMode::Auto => "auto",
            MappedMode::On => "on",
            MappedMode::Off => "off",
        }
    }
}

impl fmt::Display for MappedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MappedMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(MappedMode::Auto),
            "on" | "yes" | "true" | "1" => Ok(MappedMode::On),
            "off" | "no" | "false" | "0" => Ok(MappedMode::Off),
            _ => Err(format!("'{s}' is not auto, on or off")),
        }
    }
}

/// What a write through a chunk's mapping stores.
#[derive(Debug, Clone, Copy)]
pub enum Fill<'a> {
    Bytes(&'a [u8]),
    Zeros(usize),
}

impl Fill<'_> {
    pub fn len(&self) -> usize {
        match self {
            Fill::Bytes(b) => b.len(),
            Fill::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
