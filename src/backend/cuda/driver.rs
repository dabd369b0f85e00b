//! Loading the CUDA driver and describing its devices.
//!
//! cudarc loads `libcuda` lazily, the first time any `sys` function runs:
//! `sys::culib()` panics when no library name it tries can be loaded, and
//! each function panics when its symbol is missing from the library. A
//! panic inside the nbdkit plugin kills the server, so [`init`] proves
//! neither can happen before it lets any `sys` function run:
//! `sys::is_culib_present()` tries the same names as `sys::culib()`, in the
//! same order, and only reports; then every entry point this backend calls
//! is looked up in the library `culib()` loaded.

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};
use tracing::debug;

use super::conv;
use crate::backend::{
    BackendError, BackendKind, DeviceInfo, DeviceKind, MemoryReport, OpenError, NVIDIA_VENDOR_ID,
};

/// Why the backend is unavailable on a machine without the NVIDIA driver.
pub(super) const NOT_FOUND: &str = "CUDA driver not found: libcuda.so.1 could not be loaded";

/// Every driver function this backend calls, by the symbol name cudarc's
/// loader looks up. A test checks it against the code in both directions:
/// a call missing here could panic on an old driver, an extra name would
/// refuse a driver that serves us.
const ENTRY_POINTS: &[&CStr] = &[
    c"cuInit",
    c"cuDeviceGetCount",
    c"cuDeviceGet",
    c"cuDeviceGetName",
    c"cuDeviceGetUuid_v2",
    c"cuDeviceGetPCIBusId",
    c"cuDeviceGetAttribute",
    c"cuDeviceTotalMem_v2",
    c"cuDevicePrimaryCtxRetain",
    c"cuDevicePrimaryCtxRelease_v2",
    c"cuCtxGetCurrent",
    c"cuCtxSetCurrent",
    c"cuCtxPushCurrent_v2",
    c"cuCtxPopCurrent_v2",
    c"cuCtxSynchronize",
    c"cuMemGetInfo_v2",
    c"cuMemAlloc_v2",
    c"cuMemFree_v2",
    c"cuMemHostRegister_v2",
    c"cuMemHostUnregister",
    c"cuMemHostAlloc",
    c"cuMemFreeHost",
    c"cuStreamCreate",
    c"cuStreamDestroy_v2",
    c"cuStreamSynchronize",
    c"cuMemcpyHtoDAsync_v2",
    c"cuMemcpyDtoHAsync_v2",
    c"cuMemsetD32Async",
    c"cuEventCreate",
    c"cuEventRecord",
    c"cuEventQuery",
    c"cuEventDestroy_v2",
];

/// The driver functions chunks in Vulkan-exported memory need
/// (`vkmem.rs`, `mapped=`). Optional: a driver without them (the fake one
/// the tests use) still serves, with `cuMemAlloc`'d chunks.
pub(super) const INTEROP_ENTRY_POINTS: &[&CStr] = &[
    c"cuImportExternalMemory",
    c"cuExternalMemoryGetMappedBuffer",
    c"cuDestroyExternalMemory",
];

/// One call for many copies (CUDA 12.8, driver 570, and later): a lane
/// queues a batch's copies with it where the driver has it (`lane.rs`).
/// Optional: older drivers serve with a call per copy.
pub(super) const BATCH_COPY_ENTRY_POINTS: &[&CStr] = &[c"cuMemcpyBatchAsync"];

/// Whether the driver [`init`] loaded has [`BATCH_COPY_ENTRY_POINTS`].
/// [`init`] must have succeeded.
pub(super) fn has_batch_copies() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| has_all(BATCH_COPY_ENTRY_POINTS, "a call per copy"))
}

/// Whether the driver [`init`] loaded has every one of `names`, so they
/// may be called without cudarc panicking on a missing symbol; `without`
/// says what is done instead when one is missing. [`init`] must have
/// succeeded.
fn has_all(names: &[&CStr], without: &str) -> bool {
    // SAFETY: `init` succeeded, so `culib` finds the library it loaded
    // rather than panicking.
    let lib = unsafe { sys::culib() };
    names.iter().all(|name| {
        // SAFETY: only looks the symbol up; the pointer is never called
        // through this type.
        let found = unsafe { lib.get::<unsafe extern "C" fn()>(*name) };
        if let Err(err) = &found {
            debug!("{without}: {err}");
        }
        found.is_ok()
    })
}

/// Whether the driver [`init`] loaded has every [`INTEROP_ENTRY_POINTS`]
/// function, so they may be called without cudarc panicking on a missing
/// symbol. [`init`] must have succeeded.
#[cfg_attr(not(feature = "vulkan"), allow(dead_code))]
pub(super) fn has_interop() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| has_all(INTEROP_ENTRY_POINTS, "no mapped CUDA chunks"))
}

/// Loads and initialises the driver, once per process, and returns how
/// many devices it has. Later calls return the first answer: neither a
/// missing library nor a failed `cuInit` changes within a process.
pub(super) fn init() -> Result<usize, OpenError> {
    static DEVICES: OnceLock<Result<usize, OpenError>> = OnceLock::new();
    DEVICES.get_or_init(init_once).clone()
}

fn init_once() -> Result<usize, OpenError> {
    let unavailable = |reason: String| OpenError::NotAvailable {
        backend: BackendKind::Cuda,
        reason,
    };
    // SAFETY: only dlopens (and closes again) the driver's library names;
    // the library's initialisers are trusted like any system library's.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(NOT_FOUND.into()));
    }
    // SAFETY: a library of the same names loaded just above, so `culib`
    // finds one instead of panicking; loading it is trusted as above.
    let lib = unsafe { sys::culib() };
    for name in ENTRY_POINTS {
        // SAFETY: only looks the symbol up; the pointer is never called
        // through this type.
        if let Err(err) = unsafe { lib.get::<unsafe extern "C" fn()>(*name) } {
            return Err(unavailable(format!(
                "the CUDA driver is too old: it lacks {} ({err})",
                name.to_string_lossy()
            )));
        }
    }
    // SAFETY: every entry point is present; `cuInit(0)` is the documented
    // first call and may be repeated.
    match unsafe { sys::cuInit(0) } {
        CUresult::CUDA_SUCCESS => {}
        CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        other => return Err(conv::init_error(other)),
    }
    let mut count: c_int = 0;
    // SAFETY: the driver is initialised; the out-pointer is valid.
    conv::check("cuDeviceGetCount", unsafe {
        sys::cuDeviceGetCount(&mut count)
    })?;
    Ok(count.max(0) as usize)
}

/// A CUDA device as the driver numbers it.
pub(super) struct Adapter {
    pub(super) device: sys::CUdevice,
    pub(super) info: DeviceInfo,
    /// Whether the device reaches registered host memory at its host
    /// address (`CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM`, as on x86-64
    /// Linux), which `cuMemcpyBatchAsync` takes as it is (`lane.rs`).
    pub(super) host_pointers: bool,
}

/// Whether describing a device also measures its free memory, which needs
/// its primary context and so costs a context creation on an idle GPU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum FreeMemory {
    Measure,
    Skip,
}

/// Every device the driver has, numbered in the driver's order (what
/// `CUDA_VISIBLE_DEVICES` leaves). [`init`] must have succeeded.
pub(super) fn adapters(count: usize, free: FreeMemory) -> Result<Vec<Adapter>, BackendError> {
    (0..count).map(|index| adapter(index, free)).collect()
}

fn adapter(index: usize, free: FreeMemory) -> Result<Adapter, BackendError> {
    let mut device: sys::CUdevice = 0;
    // SAFETY: the driver is initialised (`init`); out-pointers are valid and
    // the buffers' lengths are passed with them.
    unsafe {
        conv::check("cuDeviceGet", sys::cuDeviceGet(&mut device, index as c_int))?;
    }
    let mut name = [0 as c_char; 256];
    // SAFETY: as above.
    conv::check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, device)
    })?;
    let name = conv::c_chars(&name);
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: as above. `_v2` is what `cuDeviceGetUuid` means in the CUDA
    // 12 headers; outside MIG mode both give the GPU's UUID, the bytes
    // Vulkan reports as deviceUUID.
    conv::check("cuDeviceGetUuid_v2", unsafe {
        sys::cuDeviceGetUuid_v2(&mut uuid, device)
    })?;
    // 13 bytes hold "0000:00:00.0"; some drivers print an 8-digit domain.
    let mut bus = [0 as c_char; 32];
    // SAFETY: as above.
    conv::check("cuDeviceGetPCIBusId", unsafe {
        sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, device)
    })?;
    let raw_bus = conv::c_chars(&bus);
    let pci_bus_id = conv::pci_bus_id(&raw_bus);
    if pci_bus_id.is_none() {
        debug!("{name}: unexpected PCI bus ID '{raw_bus}'");
    }
    let attribute = |attribute: CUdevice_attribute| -> Result<c_int, BackendError> {
        let mut value: c_int = 0;
        // SAFETY: as above; the attribute is one every CUDA 12 driver knows.
        conv::check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut value, attribute, device)
        })?;
        Ok(value)
    };
    let integrated = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0;
    let copy_engines = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?;
    let host_pointers =
        attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM)?
            != 0;
    let mut total: usize = 0;
    // SAFETY: as above.
    conv::check("cuDeviceTotalMem_v2", unsafe {
        sys::cuDeviceTotalMem_v2(&mut total, device)
    })?;
    let available = match free {
        FreeMemory::Measure => free_memory(device).unwrap_or_else(|err| {
            debug!("{name}: free memory unknown: {err}");
            0
        }),
        FreeMemory::Skip => 0,
    };
    let device_id = pci_bus_id
        .as_deref()
        .and_then(|bus| std::fs::read_to_string(format!("/sys/bus/pci/devices/{bus}/device")).ok())
        .and_then(|text| conv::pci_product_id(&text))
        .unwrap_or(0);
    Ok(Adapter {
        device,
        host_pointers,
        info: DeviceInfo {
            backend: BackendKind::Cuda,
            index,
            name,
            vendor: "NVIDIA".into(),
            vendor_id: NVIDIA_VENDOR_ID,
            device_id,
            kind: if integrated {
                DeviceKind::Integrated
            } else {
                DeviceKind::Discrete
            },
            uuid: uuid.bytes.map(|b| b as u8),
            pci_bus_id,
            dedicated_transfer_queue: copy_engines > 0,
            memory: MemoryReport {
                total: total as u64,
                available,
            },
            // cuMemAlloc'd memory has no CPU mapping (without GDRCopy).
            mappable: 0,
        },
    })
}

/// `cuMemGetInfo`'s free bytes of a device that is not open: under its
/// primary context, pushed and popped so the calling thread's current
/// context is left as it was.
fn free_memory(device: sys::CUdevice) -> Result<u64, BackendError> {
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: a device from `cuDeviceGet`; the out-pointer is valid. The
    // retain is balanced by the release below on every path.
    conv::check("cuDevicePrimaryCtxRetain", unsafe {
        sys::cuDevicePrimaryCtxRetain(&mut ctx, device)
    })?;
    // SAFETY: `ctx` was just retained.
    let pushed = conv::check("cuCtxPushCurrent_v2", unsafe {
        sys::cuCtxPushCurrent_v2(ctx)
    });
    let measured = pushed.clone().and_then(|()| {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: a context is current; out-pointers are valid.
        conv::check("cuMemGetInfo_v2", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok(free as u64)
    });
    if pushed.is_ok() {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above; the out-pointer is valid.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
    // SAFETY: balances the retain above; nothing made in it outlives this.
    let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(device) };
    measured
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The `sys::cu…(` calls in the backend's source, by name.
    fn calls_in(source: &str) -> BTreeSet<String> {
        let mut calls = BTreeSet::new();
        for (at, _) in source.match_indices("sys::cu") {
            let name: String = source[at + "sys::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let called = source[at + "sys::".len() + name.len()..].starts_with('(');
            // `culib` is cudarc's loader, guarded by `is_culib_present`.
            if called && name != "culib" {
                calls.insert(name);
            }
        }
        calls
    }

    #[test]
    fn every_driver_call_is_checked_for_before_the_first_one() {
        let sources = [
            include_str!("mod.rs"),
            include_str!("driver.rs"),
            include_str!("device.rs"),
            include_str!("lane.rs"),
            include_str!("conv.rs"),
            include_str!("vkmem.rs"),
        ];
        let called: BTreeSet<String> = sources.iter().flat_map(|s| calls_in(s)).collect();
        let names = |list: &[&CStr]| -> BTreeSet<String> {
            list.iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect()
        };
        let optional: BTreeSet<String> = names(INTEROP_ENTRY_POINTS)
            .union(&names(BATCH_COPY_ENTRY_POINTS))
            .cloned()
            .collect();
        assert!(names(ENTRY_POINTS).is_disjoint(&optional));
        let listed: BTreeSet<String> = names(ENTRY_POINTS).union(&optional).cloned().collect();
        assert!(called.contains("cuInit") && called.contains("cuMemAlloc_v2"));
        assert_eq!(
            called.difference(&listed).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "called but not in ENTRY_POINTS"
        );
        assert_eq!(
            listed.difference(&called).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "in ENTRY_POINTS but never called"
        );
    }

    #[test]
    fn the_call_scanner_sees_calls_only() {
        // Spelt with `SYS` so that this file's own scan does not see them.
        let source = "SYS::cuA(x); SYS::cuB_v2 (y); SYS::culib(); SYS::CUresult; SYS::cuC(";
        let calls = calls_in(&source.replace("SYS", "sys"));
        assert_eq!(
            calls.into_iter().collect::<Vec<_>>(),
            vec!["cuA".to_string(), "cuC".to_string()]
        );
    }
}
