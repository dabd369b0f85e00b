//! `vramswap devices`: every GPU each compiled-in backend sees.

use anyhow::Result;
use serde::Serialize;
use vramswap::backend::{self, BackendKind, DeviceInfo, DeviceSelector, OpenError};
use vramswap::{ByteSize, MemtestConfig, MemtestReport};

/// Where GPU facts come from: the real backends, or fixtures in tests.
pub trait Gpus {
    fn devices(&self, kind: BackendKind) -> Result<Vec<DeviceInfo>, OpenError>;
    fn default_backend(&self, selector: &DeviceSelector) -> Result<BackendKind, OpenError>;
    /// The quick memory test over `size` bytes of `device` (found by
    /// UUID: under Vulkan whichever backend will serve it).
    fn memtest(&self, device: &DeviceInfo, size: u64) -> anyhow::Result<MemtestReport>;
}

pub struct RealGpus;

impl Gpus for RealGpus {
    fn devices(&self, kind: BackendKind) -> Result<Vec<DeviceInfo>, OpenError> {
        backend::enumerate(kind)
    }

    fn default_backend(&self, selector: &DeviceSelector) -> Result<BackendKind, OpenError> {
        backend::default_backend(selector)
    }

    fn memtest(&self, device: &DeviceInfo, size: u64) -> anyhow::Result<MemtestReport> {
        crate::memtest::test_device(
            BackendKind::Vulkan,
            &DeviceSelector::Uuid(device.uuid),
            Some(size),
            MemtestConfig::quick,
            |_| {},
        )
    }
}

/// One device as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct DeviceJson {
    pub index: usize,
    pub backend: String,
    pub name: String,
    pub vendor: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub kind: String,
    pub uuid: String,
    pub pci_bus_id: Option<String>,
    pub memory_total: u64,
    pub memory_available: u64,
    pub dedicated_transfer_queue: bool,
    /// Bytes of VRAM the CPU can map (the BAR window).
    pub mappable: u64,
    /// Whether `mapped=auto` keeps chunks there (writes by CPU stores).
    pub mapped_writes: bool,
}

impl From<&DeviceInfo> for DeviceJson {
    fn from(d: &DeviceInfo) -> Self {
        DeviceJson {
            index: d.index,
            backend: d.backend.to_string(),
            name: d.name.clone(),
            vendor: d.vendor.clone(),
            vendor_id: d.vendor_id,
            device_id: d.device_id,
            kind: d.kind.name().to_string(),
            uuid: d.uuid_string(),
            pci_bus_id: d.pci_bus_id.clone(),
            memory_total: d.memory.total,
            memory_available: d.memory.available,
            dedicated_transfer_queue: d.dedicated_transfer_queue,
            mappable: d.mappable,
            mapped_writes: d.maps_all_memory(),
        }
    }
}

#[derive(Debug, Serialize)]
struct BackendJson {
    name: String,
    /// Why the backend cannot be used here, if it cannot.
    unavailable: Option<String>,
}

#[derive(Debug, Serialize)]
struct DevicesJson {
    backends: Vec<BackendJson>,
    devices: Vec<DeviceJson>,
}

/// Prints the devices; never fails for want of a GPU or a driver (a
/// backend that cannot load is reported, and the exit status is 0).
pub fn run(gpus: &dyn Gpus, json: bool) -> Result<()> {
    let mut backends = Vec::new();
    let mut devices = Vec::new();
    for &kind in BackendKind::compiled_in() {
        match gpus.devices(kind) {
            Ok(found) => {
                backends.push(BackendJson {
                    name: kind.to_string(),
                    unavailable: None,
                });
                devices.extend(found);
            }
            Err(err) => backends.push(BackendJson {
                name: kind.to_string(),
                unavailable: Some(err.to_string()),
            }),
        }
    }
    if json {
        let out = DevicesJson {
            backends,
            devices: devices.iter().map(DeviceJson::from).collect(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for b in &backends {
        if let Some(why) = &b.unavailable {
            eprintln!("vramswap: {} backend unavailable: {why}", b.name);
        }
    }
    if devices.is_empty() {
        println!("no GPU found");
        return Ok(());
    }
    println!(
        "{:<3} {:<7} {:<32} {:<8} {:<36} {:<13} {:>10} {:>10} {:<9} {:>10} MAPPED WRITES",
        "#", "BACKEND", "NAME", "VENDOR", "UUID", "PCI", "TOTAL", "AVAILABLE", "DMA QUEUE", "BAR"
    );
    for d in &devices {
        println!(
            "{:<3} {:<7} {:<32} {:<8} {:<36} {:<13} {:>10} {:>10} {:<9} {:>10} {}",
            d.index,
            d.backend,
            truncate(&d.name, 32),
            d.vendor,
            d.uuid_string(),
            d.pci_bus_id.as_deref().unwrap_or("-"),
            ByteSize(d.memory.total).to_string(),
            ByteSize(d.memory.available).to_string(),
            if d.dedicated_transfer_queue {
                "dedicated"
            } else {
                "shared"
            },
            if d.mappable == 0 {
                "-".to_string()
            } else {
                ByteSize(d.mappable).to_string()
            },
            if d.maps_all_memory() { "yes" } else { "no" }
        );
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;
    use vramswap::backend::{DeviceKind, MemoryReport};

    /// GPUs, and what a memory test of them finds.
    pub struct FakeGpus {
        pub devices: Vec<DeviceInfo>,
        /// Offsets of the 64 KiB blocks the memory test reports bad.
        pub bad_blocks: Vec<u64>,
    }

    pub fn gpu(name: &str, available: u64) -> DeviceInfo {
        DeviceInfo {
            backend: BackendKind::Vulkan,
            index: 0,
            name: name.into(),
            vendor: "NVIDIA".into(),
            vendor_id: 0x10de,
            device_id: 0x2330,
            kind: DeviceKind::Discrete,
            uuid: [0x39; 16],
            pci_bus_id: Some("0000:01:00.0".into()),
            dedicated_transfer_queue: true,
            memory: MemoryReport {
                total: 80 << 30,
                available,
            },
            mappable: 80 << 30,
        }
    }

    impl Gpus for FakeGpus {
        fn devices(&self, kind: BackendKind) -> Result<Vec<DeviceInfo>, OpenError> {
            Ok(self
                .devices
                .iter()
                .filter(|d| d.backend == kind)
                .cloned()
                .collect())
        }

        fn default_backend(&self, _selector: &DeviceSelector) -> Result<BackendKind, OpenError> {
            Ok(BackendKind::Vulkan)
        }

        fn memtest(&self, device: &DeviceInfo, size: u64) -> anyhow::Result<MemtestReport> {
            let config = MemtestConfig::quick(size);
            Ok(MemtestReport {
                device: device.name.clone(),
                backend: BackendKind::Vulkan,
                size,
                passes: 1,
                bytes_swept: size * config.sweeps(),
                patterns: config.patterns,
                elapsed: std::time::Duration::from_secs(1),
                mismatches: self.bad_blocks.len() as u64,
                bad_blocks: self
                    .bad_blocks
                    .iter()
                    .map(|&offset| vramswap::memtest::BadBlock {
                        offset,
                        errors: 1,
                        words: Vec::new(),
                    })
                    .collect(),
            })
        }
    }
}
