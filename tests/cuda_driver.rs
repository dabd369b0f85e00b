//! The CUDA backend without the NVIDIA driver (it must say so, never
//! panic: a panic kills the nbdkit server) and with it (every device
//! described as Vulkan describes the same GPU).
//!
//! `VRAMSWAP_TEST_CUDA_UNAVAILABLE` names the start of the reason the
//! backend must give where the library loads but cannot serve
//! (`scripts/test-all` runs this against a fake driver that lacks an entry
//! point); without it, the backend must be unavailable exactly when no
//! `libcuda` loads.
#![cfg(feature = "cuda")]

mod common;

use std::ffi::CStr;

use vramswap::backend::{self, BackendKind, DeviceInfo, OpenError, OpenOptions};

/// Whether the dynamic loader finds the driver under the names cudarc
/// tries first and last (the development link and the driver's soname).
fn driver_present() -> bool {
    [c"libcuda.so", c"libcuda.so.1"].iter().any(|name: &&CStr| {
        // SAFETY: loads the library only to see that it exists; it stays
        // loaded (no dlclose), as cudarc would keep it anyway.
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) }.is_null()
    })
}

const NOT_FOUND: &str = "CUDA driver not found: libcuda.so.1 could not be loaded";

/// The reason the backend must be unavailable for here, if it must be.
fn expected_unavailable() -> Option<String> {
    match std::env::var("VRAMSWAP_TEST_CUDA_UNAVAILABLE") {
        Ok(reason) => Some(reason),
        Err(_) => (!driver_present()).then(|| NOT_FOUND.to_string()),
    }
}

#[test]
fn without_a_usable_driver_cuda_is_unavailable_and_nothing_panics() {
    let Some(want) = expected_unavailable() else {
        eprintln!("libcuda loads on this machine: see the test of present drivers");
        return;
    };
    if want == NOT_FOUND {
        let err = OpenError::NotAvailable {
            backend: BackendKind::Cuda,
            reason: want.clone(),
        };
        assert_eq!(
            err.to_string(),
            "cuda is not available: CUDA driver not found: libcuda.so.1 could not be loaded"
        );
    }
    let check = |result: Result<(), OpenError>| match result {
        Err(OpenError::NotAvailable {
            backend: BackendKind::Cuda,
            reason,
        }) => assert!(
            reason.starts_with(&want) && (reason.len() == want.len() || want != NOT_FOUND),
            "reason '{reason}', want '{want}'"
        ),
        other => panic!("want NotAvailable ({want}), got {other:?}"),
    };
    // From several threads at once, as nbdkit's would, and twice each: the
    // second answer comes from the remembered first.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..2 {
                    check(backend::enumerate(BackendKind::Cuda).map(drop));
                    check(backend::open(BackendKind::Cuda, &OpenOptions::default()).map(drop));
                }
            });
        }
    });
}

fn check_described(device: &DeviceInfo, index: usize) {
    let name = &device.name;
    assert_eq!(device.backend, BackendKind::Cuda);
    assert_eq!(device.index, index, "{name}");
    assert!(!name.is_empty());
    assert_eq!(
        (device.vendor.as_str(), device.vendor_id),
        ("NVIDIA", 0x10de)
    );
    assert_ne!(device.uuid, [0; 16], "{name}: no UUID");
    let bus = device.pci_bus_id.as_deref().unwrap_or("");
    let shape: Vec<usize> = bus.split([':', '.']).map(str::len).collect();
    assert_eq!(shape, [4, 2, 2, 1], "{name}: PCI bus ID '{bus}'");
    assert_eq!(bus, bus.to_lowercase(), "{name}");
    assert!(
        device.memory.total >= 1 << 30,
        "{name}: {:?}",
        device.memory
    );
    assert!(
        device.memory.available > 0 && device.memory.available <= device.memory.total,
        "{name}: {:?}",
        device.memory
    );
}

#[test]
fn with_the_driver_every_device_is_described_as_vulkan_sees_it() {
    if expected_unavailable().is_some() {
        eprintln!("no usable libcuda here: see the test of a missing driver");
        return;
    }
    common::init_logging();
    let devices = backend::enumerate(BackendKind::Cuda).expect("enumerate CUDA devices");
    for (index, device) in devices.iter().enumerate() {
        eprintln!("{device:?}");
        check_described(device, index);
    }
    let kinds = common::backend_kinds();
    if !kinds.contains(&BackendKind::Cuda) {
        return;
    }
    assert!(!devices.is_empty(), "cuda is under test but has no device");
    // An opened device says the same about itself, with its free memory.
    let opened = common::open_backend(BackendKind::Cuda, None);
    let info = opened.device();
    check_described(info, info.index);
    assert_eq!(info.uuid, devices[info.index].uuid);
    // The same GPU under both APIs: the same UUID (what lets `device=` name
    // one GPU for either backend), bus ID and PCI product ID.
    if !kinds.contains(&BackendKind::Vulkan) {
        return;
    }
    let vulkan = backend::enumerate(BackendKind::Vulkan).expect("enumerate Vulkan devices");
    for device in &devices {
        let twin = vulkan.iter().find(|v| v.uuid == device.uuid);
        let twin = twin.unwrap_or_else(|| {
            panic!(
                "{}: no Vulkan device has UUID {}; Vulkan has {:?}",
                device.name,
                device.uuid_string(),
                vulkan.iter().map(DeviceInfo::short).collect::<Vec<_>>()
            )
        });
        assert_eq!(twin.pci_bus_id, device.pci_bus_id, "{}", device.name);
        assert_eq!(twin.vendor_id, device.vendor_id, "{}", device.name);
        // CUDA's comes from sysfs, which a container may not show.
        if device.device_id != 0 {
            assert_eq!(twin.device_id, device.device_id, "{}", device.name);
        } else {
            eprintln!("{}: no PCI product ID in sysfs", device.name);
        }
    }
}

/// `mapped=on` starts only where CUDA's chunks can be CPU-mapped, and
/// elsewhere (the fake driver in CI, which cannot import Vulkan memory) is
/// refused before anything is opened, in one line naming the key.
#[test]
fn mapped_on_is_refused_in_one_line_where_cuda_cannot_map_vram() {
    if expected_unavailable().is_some() {
        eprintln!("no usable CUDA driver here: see the test of missing drivers");
        return;
    }
    let mut export = vramswap::ExportConfig::default();
    for (key, value) in [("backend", "cuda"), ("mapped", "on"), ("size", "8M")] {
        export.set(key, value).unwrap();
    }
    let first = backend::select_device(
        &backend::enumerate(BackendKind::Cuda).unwrap(),
        &export.device,
    )
    .unwrap()
    .clone();
    match vramswap::placement::place(&export) {
        Ok(placed) => assert!(placed.device.maps_all_memory(), "{placed:?}"),
        Err(err) => {
            let text = err.to_string();
            assert!(!first.maps_all_memory(), "{first:?}: {text}");
            assert!(text.starts_with("mapped=on: "), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
