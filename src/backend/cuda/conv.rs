//! Every conversion between the CUDA driver's values and vramswap's, in one
//! place. Nothing here calls the driver, so all of it is tested without one.

use cudarc::driver::sys::CUresult;

pub(super) use crate::backend::c_chars;
use crate::backend::{BackendError, OpenError};

/// Maps a failed driver call to the error callers must tell apart; the rest
/// are reported with the call's name.
///
/// The errors mapped to [`BackendError::DeviceLost`] are the ones the CUDA
/// documentation calls sticky: they leave the context unusable, and every
/// later call in it returns the same error, so nothing can be trusted any
/// more. `CUDA_ERROR_NOT_PERMITTED` is deliberately not one of them: it
/// refuses a single call (a compute-mode or stream-capture rule) and the
/// context lives on.
pub(super) fn error(call: &'static str, result: CUresult) -> BackendError {
    match result {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfDeviceMemory,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
        | CUresult::CUDA_ERROR_LAUNCH_FAILED
        | CUresult::CUDA_ERROR_LAUNCH_TIMEOUT
        | CUresult::CUDA_ERROR_ASSERT
        | CUresult::CUDA_ERROR_ECC_UNCORRECTABLE
        | CUresult::CUDA_ERROR_NVLINK_UNCORRECTABLE
        | CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR
        | CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | CUresult::CUDA_ERROR_MISALIGNED_ADDRESS
        | CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE
        | CUresult::CUDA_ERROR_INVALID_PC
        | CUresult::CUDA_ERROR_EXTERNAL_DEVICE
        | CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED
        | CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE => BackendError::DeviceLost,
        other => BackendError::Api {
            call,
            detail: describe(other),
        },
    }
}

/// `Ok` for `CUDA_SUCCESS`, else [`error`].
pub(super) fn check(call: &'static str, result: CUresult) -> Result<(), BackendError> {
    match result {
        CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(error(call, other)),
    }
}

/// [`check`] for calls that allocate host memory (pinned staging), where the
/// driver's `CUDA_ERROR_OUT_OF_MEMORY` means RAM, not VRAM.
pub(super) fn check_host(call: &'static str, result: CUresult) -> Result<(), BackendError> {
    check(call, result).map_err(|err| match err {
        BackendError::OutOfDeviceMemory => BackendError::OutOfHostMemory,
        other => other,
    })
}

/// [`check`] for making the device's context, where a device that is
/// "unavailable" is one another process holds in exclusive-process compute
/// mode (or one set to prohibited): a setting to change, not a lost GPU.
pub(super) fn check_context(
    device: &str,
    call: &'static str,
    result: CUresult,
) -> Result<(), BackendError> {
    match result {
        CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE => Err(BackendError::UnsupportedDevice {
            device: device.to_string(),
            reason: format!(
                "{call}: the device is unavailable (its compute mode is exclusive-process \
                 and another process holds it, or prohibited; see nvidia-smi -q -d COMPUTE)"
            ),
        }),
        other => check(call, other),
    }
}

/// What `cuInit` failing means for the backend as a whole.
pub(super) fn init_error(result: CUresult) -> OpenError {
    let reason = match result {
        CUresult::CUDA_ERROR_STUB_LIBRARY => {
            "CUDA driver not found: the libcuda.so loaded is the CUDA toolkit's stub, \
             not the driver (is a toolkit stubs directory on LD_LIBRARY_PATH?)"
                .to_string()
        }
        other => format!(
            "the CUDA driver failed to start: cuInit returned {}",
            describe(other)
        ),
    };
    OpenError::NotAvailable {
        backend: crate::backend::BackendKind::Cuda,
        reason,
    }
}

/// The error's name and number, as the CUDA headers spell them.
fn describe(result: CUresult) -> String {
    format!("{result:?} ({})", result as u32)
}

/// `cuDeviceGetPCIBusId`'s `domain:bus:device.function` (hex fields, the
/// domain 4 or 8 digits wide depending on the driver) in the lowercase
/// `dddd:bb:dd.f` form the Vulkan backend prints and sysfs uses.
pub(super) fn pci_bus_id(raw: &str) -> Option<String> {
    let (domain, rest) = raw.trim().split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let field = |s: &str, max: u32| u32::from_str_radix(s, 16).ok().filter(|v| *v <= max);
    Some(format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        field(domain, u32::MAX)?,
        field(bus, 0xff)?,
        field(device, 0x1f)?,
        field(function, 0x7)?
    ))
}

/// The PCI product ID from sysfs (`/sys/bus/pci/devices/*/device`: `0x2330`
/// for an H100 SXM), which is what Vulkan reports as `deviceID`. CUDA's
/// `CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID` is the device (slot) number on the
/// bus instead, part of the bus ID, so it is not used for this.
pub(super) fn pci_product_id(sysfs: &str) -> Option<u32> {
    let hex = sysfs.trim().strip_prefix("0x")?;
    u32::from_str_radix(hex, 16).ok().filter(|id| *id <= 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_out_of_device_memory_except_for_host_allocations() {
        assert_eq!(
            error("cuMemAlloc_v2", CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            BackendError::OutOfDeviceMemory
        );
        assert_eq!(
            check_host("cuMemHostAlloc", CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            Err(BackendError::OutOfHostMemory)
        );
        assert_eq!(check_host("cuMemHostAlloc", CUresult::CUDA_SUCCESS), Ok(()));
    }

    #[test]
    fn sticky_errors_are_a_lost_device() {
        for result in [
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
            CUresult::CUDA_ERROR_LAUNCH_FAILED,
            CUresult::CUDA_ERROR_ECC_UNCORRECTABLE,
            CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR,
            CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION,
            CUresult::CUDA_ERROR_MISALIGNED_ADDRESS,
            CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE,
            CUresult::CUDA_ERROR_INVALID_PC,
            CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED,
            CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE,
        ] {
            let err = error("cuEventQuery", result);
            assert_eq!(err, BackendError::DeviceLost, "{result:?}");
            assert!(err.is_fatal());
        }
    }

    #[test]
    fn other_errors_name_the_call_and_the_code() {
        for (result, name) in [
            (
                CUresult::CUDA_ERROR_INVALID_VALUE,
                "CUDA_ERROR_INVALID_VALUE (1)",
            ),
            (
                CUresult::CUDA_ERROR_NOT_PERMITTED,
                "CUDA_ERROR_NOT_PERMITTED (800)",
            ),
            (CUresult::CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN (999)"),
        ] {
            let err = error("cuMemcpyHtoDAsync_v2", result);
            assert_eq!(
                err,
                BackendError::Api {
                    call: "cuMemcpyHtoDAsync_v2",
                    detail: name.into()
                }
            );
            assert!(!err.is_fatal());
            assert_eq!(
                err.to_string(),
                format!("cuMemcpyHtoDAsync_v2 failed: {name}")
            );
        }
        assert_eq!(check("cuMemFree_v2", CUresult::CUDA_SUCCESS), Ok(()));
    }

    #[test]
    fn an_unavailable_device_at_open_is_a_setting_not_a_loss() {
        let result = check_context(
            "NVIDIA H100",
            "cuDevicePrimaryCtxRetain",
            CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE,
        );
        assert!(
            matches!(&result, Err(BackendError::UnsupportedDevice { device, reason })
                if device == "NVIDIA H100" && reason.contains("exclusive-process")),
            "{result:?}"
        );
        assert_eq!(
            check_context("x", "cuCtxSetCurrent", CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            Err(BackendError::DeviceLost)
        );
    }

    #[test]
    fn init_failures_make_the_backend_unavailable() {
        let stub = init_error(CUresult::CUDA_ERROR_STUB_LIBRARY).to_string();
        assert!(
            stub.starts_with("cuda is not available: CUDA driver not found"),
            "{stub}"
        );
        let mismatch = init_error(CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH).to_string();
        assert!(
            mismatch.ends_with("cuInit returned CUDA_ERROR_SYSTEM_DRIVER_MISMATCH (803)"),
            "{mismatch}"
        );
    }

    #[test]
    fn pci_bus_ids_are_normalised() {
        assert_eq!(pci_bus_id("0000:65:00.0").as_deref(), Some("0000:65:00.0"));
        assert_eq!(
            pci_bus_id("00000000:1B:00.0").as_deref(),
            Some("0000:1b:00.0")
        );
        assert_eq!(
            pci_bus_id("0001:C3:1F.7\n").as_deref(),
            Some("0001:c3:1f.7")
        );
        for bad in [
            "",
            "0000:65:00",
            "0000:65.00.0",
            "0000:65:20.0",
            "0000:100:00.0",
            "0000::00.0",
            "zz:00:00.0",
        ] {
            assert_eq!(pci_bus_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pci_product_ids_come_from_sysfs_hex() {
        assert_eq!(pci_product_id("0x2330\n"), Some(0x2330));
        assert_eq!(pci_product_id("0x10de"), Some(0x10de));
        assert_eq!(pci_product_id("2330"), None);
        assert_eq!(pci_product_id("0x123456"), None);
        assert_eq!(pci_product_id(""), None);
    }
}
