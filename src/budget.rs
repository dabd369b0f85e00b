//! How much VRAM other programs could still take on one GPU, for the
//! elastic swap watcher: it asks once a second and gives swap slices back
//! when the answer falls below its headroom.
//!
//! [`open`] picks the real source for a swap area's backend and GPU;
//! [`FileBudget`] reads the figure from a file, the stand-in that tests
//! lower and raise by rewriting it.
//!
//! ```no_run
//! use vramswap::backend::{self, BackendKind};
//! use vramswap::budget;
//!
//! let gpu = &backend::enumerate(BackendKind::Vulkan)?[0];
//! let mut free = budget::open(BackendKind::Vulkan, &gpu.uuid)?;
//! println!("{} bytes free ({})", free.free()?, free.source());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;

use thiserror::Error;

#[cfg(feature = "cuda")]
use crate::backend::cuda::NvmlBudget;
#[cfg(feature = "vulkan")]
use crate::backend::vulkan::VulkanBudget;
use crate::backend::{BackendKind, OpenError};
use crate::size::{parse_size, SizeError};

/// How much VRAM other programs could still take on one GPU, read again at
/// each call.
pub trait VramBudget: Send {
    /// Bytes free on the device now.
    fn free(&mut self) -> Result<u64, BudgetError>;

    /// Where the figure comes from, for logs and `vramswap status`:
    /// `VK_EXT_memory_budget (NVIDIA H200)`, `NVML (NVIDIA H200)`,
    /// `file /run/x`.
    fn source(&self) -> String;
}

/// Why free VRAM could not be read, in one line.
#[derive(Debug, Error)]
pub enum BudgetError {
    /// A [`FileBudget`]'s file could not be read.
    #[error("cannot read the VRAM budget file {}: {cause}", path.display())]
    FileUnreadable {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A [`FileBudget`]'s file holds something other than one size.
    #[error("the VRAM budget file {} holds no size: {cause}", path.display())]
    FileUnparsable { path: PathBuf, cause: SizeError },
    /// No device of the backend has the UUID.
    #[error("no {backend} device has UUID {uuid}")]
    NoDevice { backend: BackendKind, uuid: String },
    /// The device, or the backend, cannot tell what other programs use.
    #[error("{device} cannot report free VRAM: {reason}")]
    Unsupported { device: String, reason: String },
    /// The backend is not compiled in, or its driver is missing or failed
    /// while listing devices.
    #[error(transparent)]
    Unavailable(#[from] OpenError),
    /// A driver call that reads the figure failed.
    #[error("{call} failed: {detail}")]
    QueryFailed { call: &'static str, detail: String },
}

/// The real source of free VRAM for the GPU with `uuid`
/// ([`DeviceInfo::uuid`](crate::DeviceInfo::uuid)), as seen by `kind`, the
/// backend the swap area's server uses.
///
/// Vulkan reads `VK_EXT_memory_budget` (the VRAM heap's budget less its
/// usage) from the physical device: no logical device is made, no VRAM
/// taken. A device without the extension is refused, as Vulkan then
/// cannot see other programs' use.
///
/// CUDA reads NVML, which needs no CUDA context: a context would itself
/// take hundreds of MiB and make the reading wrong by as much. Where NVML
/// is missing or fails, it falls back to Vulkan on the same GPU (in builds
/// with that backend), then to `cuMemGetInfo`, which makes a context at
/// each reading.
#[cfg_attr(
    not(any(feature = "vulkan", feature = "cuda")),
    allow(unused_variables)
)]
pub fn open(kind: BackendKind, uuid: &[u8; 16]) -> Result<Box<dyn VramBudget>, BudgetError> {
    match kind {
        #[cfg(feature = "vulkan")]
        BackendKind::Vulkan => Ok(Box::new(VulkanBudget::open(uuid)?)),
        #[cfg(not(feature = "vulkan"))]
        BackendKind::Vulkan => Err(OpenError::NotCompiledIn(kind).into()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => open_cuda(uuid),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err(OpenError::NotCompiledIn(kind).into()),
        BackendKind::Host => Err(BudgetError::Unsupported {
            device: "the host backend".into(),
            reason: "it keeps its chunks in process memory, not VRAM".into(),
        }),
    }
}

/// NVML, else Vulkan, else `cuMemGetInfo`, each failure logged; the last
/// one's error when none answers.
#[cfg(feature = "cuda")]
fn open_cuda(uuid: &[u8; 16]) -> Result<Box<dyn VramBudget>, BudgetError> {
    let uuid_text = crate::backend::format_uuid(uuid);
    match NvmlBudget::open(uuid) {
        Ok(budget) => return Ok(Box::new(budget)),
        Err(err) => tracing::info!("GPU {uuid_text}: no free VRAM from NVML: {err}"),
    }
    #[cfg(feature = "vulkan")]
    match VulkanBudget::open(uuid) {
        Ok(budget) => return Ok(Box::new(budget)),
        Err(err) => tracing::info!("GPU {uuid_text}: no free VRAM from Vulkan: {err}"),
    }
    Ok(Box::new(CuMemGetInfoBudget::open(uuid)?))
}

/// Free VRAM as `cuMemGetInfo` reports it, through
/// [`crate::backend::enumerate`] at each reading: the CUDA source of last
/// resort. Each reading makes the primary context of every GPU that no
/// one holds and drops it again, so it costs a context creation, and reads
/// low by that context's own VRAM (hundreds of MiB) while it exists.
#[cfg(feature = "cuda")]
struct CuMemGetInfoBudget {
    uuid: [u8; 16],
    name: String,
}

#[cfg(feature = "cuda")]
impl CuMemGetInfoBudget {
    fn open(uuid: &[u8; 16]) -> Result<Self, BudgetError> {
        Ok(CuMemGetInfoBudget {
            uuid: *uuid,
            name: Self::device(uuid)?.name,
        })
    }

    fn device(uuid: &[u8; 16]) -> Result<crate::DeviceInfo, BudgetError> {
        crate::backend::enumerate(BackendKind::Cuda)?
            .into_iter()
            .find(|d| d.uuid == *uuid)
            .ok_or_else(|| BudgetError::NoDevice {
                backend: BackendKind::Cuda,
                uuid: crate::backend::format_uuid(uuid),
            })
    }
}

#[cfg(feature = "cuda")]
impl VramBudget for CuMemGetInfoBudget {
    fn free(&mut self) -> Result<u64, BudgetError> {
        Ok(Self::device(&self.uuid)?.memory.available)
    }

    fn source(&self) -> String {
        format!(
            "cuMemGetInfo ({}; a CUDA context made at each reading)",
            self.name
        )
    }
}

/// Free VRAM read from a file holding one size (`1073741824`, `512M`,
/// `3G`; surrounding whitespace ignored), read again at each call: the
/// stand-in that tests and the guest scenario lower and raise by rewriting
/// the file. Replace it by a rename, so that no reading sees it half
/// written.
#[derive(Debug, Clone)]
pub struct FileBudget {
    path: PathBuf,
}

impl FileBudget {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileBudget { path: path.into() }
    }
}

impl VramBudget for FileBudget {
    fn free(&mut self) -> Result<u64, BudgetError> {
        let text =
            std::fs::read_to_string(&self.path).map_err(|cause| BudgetError::FileUnreadable {
                path: self.path.clone(),
                cause,
            })?;
        parse_size(text.trim()).map_err(|cause| BudgetError::FileUnparsable {
            path: self.path.clone(),
            cause,
        })
    }

    fn source(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_holding(text: &str) -> (tempfile::TempDir, FileBudget) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("free");
        std::fs::write(&path, text).unwrap();
        (dir, FileBudget::new(path))
    }

    #[test]
    fn a_file_holds_bytes_or_a_suffixed_size() {
        for (text, bytes) in [
            ("1073741824", 1 << 30),
            ("512M", 512 << 20),
            ("3G", 3 << 30),
            ("1.5GiB", 3 << 29),
            ("  64k\n", 64 << 10),
            ("\t0\n\n", 0),
        ] {
            let (_dir, mut budget) = budget_holding(text);
            assert_eq!(budget.free().unwrap(), bytes, "{text:?}");
        }
    }

    #[test]
    fn a_file_is_read_again_at_each_call() {
        let (_dir, mut budget) = budget_holding("8G");
        assert_eq!(budget.free().unwrap(), 8 << 30);
        std::fs::write(&budget.path, "1G\n").unwrap();
        assert_eq!(budget.free().unwrap(), 1 << 30);
        assert_eq!(budget.source(), format!("file {}", budget.path.display()));
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = FileBudget::new(&path).free().unwrap_err();
        assert!(matches!(err, BudgetError::FileUnreadable { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    }

    #[test]
    fn garbage_is_named_with_its_file() {
        for text in ["lots", "12Q", "", "  \n", "1G 2G"] {
            let (_dir, mut budget) = budget_holding(text);
            let err = budget.free().unwrap_err();
            assert!(matches!(err, BudgetError::FileUnparsable { .. }), "{err}");
            let message = err.to_string();
            assert!(
                message.contains(&*budget.path.to_string_lossy()),
                "{message}"
            );
            assert!(message.contains(text.trim()), "{message}");
        }
    }

    #[test]
    fn the_host_backend_has_no_vram_to_report() {
        let err = open(BackendKind::Host, &[0; 16]).err().unwrap();
        assert!(matches!(err, BudgetError::Unsupported { .. }), "{err}");
    }
}
