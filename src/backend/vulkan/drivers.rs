//! Which installed Vulkan drivers a server lets the loader load.
//!
//! The loader loads every installed driver (ICD) when an instance is made,
//! and a server keeps its instance for life and locks every file it maps
//! (the plugin's `safety` module). A driver for hardware the machine does
//! not have finds no device, yet it and what it links stay locked: on
//! Debian 12, Mesa's RADV and lavapipe bring LLVM and z3 with them. Before
//! its first instance the server names those drivers in the loader's
//! `VK_LOADER_DRIVERS_DISABLE` (loader 1.3.234 and later; older loaders
//! ignore it and load every driver as before):
//! - a driver whose library is known to serve one GPU vendor, where no
//!   display controller of that vendor is on the PCI bus;
//! - lavapipe (a CPU "device"), where the device is left to the default
//!   choice and a GPU of the machine has a driver installed: the default
//!   takes a GPU before a CPU device, and a GPU whose driver fails should
//!   fail the start, not put swap in host memory.
//!
//! Drivers it does not know (virtio, Asahi, …) are always left in. An
//! admin who chose drivers (`VK_DRIVER_FILES`, `VK_ICD_FILENAMES`,
//! `VK_ADD_DRIVER_FILES` or either filter variable set) is left alone.

use std::path::{Path, PathBuf};

use crate::backend::DeviceSelector;

const NVIDIA: u16 = 0x10de;
const AMD: u16 = 0x1002;
const INTEL: u16 = 0x8086;

/// What a driver serves, judged by its library's file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serves {
    /// GPUs of this PCI vendor only.
    Vendor(u16),
    /// The CPU (lavapipe).
    Cpu,
    /// Anything else: never held back.
    Unknown,
}

/// An installed driver: its manifest's file name and what it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Manifest {
    file_name: String,
    serves: Serves,
}

/// The variables with which an admin chooses drivers themselves.
const ADMIN_CHOICE: [&str; 5] = [
    "VK_DRIVER_FILES",
    "VK_ICD_FILENAMES",
    "VK_ADD_DRIVER_FILES",
    "VK_LOADER_DRIVERS_SELECT",
    "VK_LOADER_DRIVERS_DISABLE",
];

/// Keeps the loader from loading drivers this machine cannot use, for a
/// server that will open the device `selector` names; returns the
/// manifests it held back (empty: none, or the admin chose). It sets an
/// environment variable, so call it before the process has threads that
/// read the environment (nbdkit's `config_complete`).
pub fn hold_back_unused(selector: &DeviceSelector) -> Vec<String> {
    if ADMIN_CHOICE
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
    {
        return Vec::new();
    }
    let manifests = installed(&search_dirs());
    let unused = unused(&manifests, &display_vendors(), selector);
    if !unused.is_empty() {
        std::env::set_var("VK_LOADER_DRIVERS_DISABLE", unused.join(","));
    }
    unused
}

/// The manifests to hold back: see the module's comment.
fn unused(manifests: &[Manifest], present: &[u16], selector: &DeviceSelector) -> Vec<String> {
    let has_gpu_driver = manifests
        .iter()
        .any(|m| matches!(m.serves, Serves::Vendor(v) if present.contains(&v)));
    manifests
        .iter()
        .filter(|m| match m.serves {
            Serves::Vendor(v) => !present.contains(&v),
            Serves::Cpu => has_gpu_driver && *selector == DeviceSelector::First,
            Serves::Unknown => false,
        })
        // The filter's entries are globs: a name that reads as more than
        // itself is left in rather than risk holding back another.
        .filter(|m| !m.file_name.contains(['*', '?', '[', ',']))
        .map(|m| m.file_name.clone())
        .collect()
}

/// What a driver library serves, from its file name.
fn serves(library: &str) -> Serves {
    let name = library.rsplit('/').next().unwrap_or(library);
    let starts = |prefix: &str| name.starts_with(prefix);
    if starts("libvulkan_lvp") {
        Serves::Cpu
    } else if starts("libvulkan_radeon") || starts("amdvlk") {
        Serves::Vendor(AMD)
    } else if starts("libvulkan_intel") {
        Serves::Vendor(INTEL)
    } else if starts("libGLX_nvidia") || starts("libnvidia") || starts("libvulkan_nouveau") {
        Serves::Vendor(NVIDIA)
    } else {
        Serves::Unknown
    }
}

/// Where the Linux loader looks for driver manifests when no variable
/// overrides it (its LoaderDriverInterface, "Driver Discovery on Linux").
fn search_dirs() -> Vec<PathBuf> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let home = var("HOME");
    let one = |name: &str, under_home: &str| {
        var(name).or_else(|| home.as_ref().map(|h| format!("{h}/{under_home}")))
    };
    let list = |name: &str, default: &str| var(name).unwrap_or_else(|| default.into());
    let mut bases = Vec::new();
    bases.extend(one("XDG_CONFIG_HOME", ".config"));
    bases.extend(
        list("XDG_CONFIG_DIRS", "/etc/xdg")
            .split(':')
            .map(String::from),
    );
    bases.push("/etc".into());
    bases.extend(one("XDG_DATA_HOME", ".local/share"));
    let data = list("XDG_DATA_DIRS", "/usr/local/share:/usr/share");
    bases.extend(data.split(':').map(String::from));
    bases
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| Path::new(&b).join("vulkan/icd.d"))
        .collect()
}

/// The manifests in `dirs` whose library could be read from them.
fn installed(dirs: &[PathBuf]) -> Vec<Manifest> {
    let mut found: Vec<Manifest> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !file_name.ends_with(".json") || found.iter().any(|m| m.file_name == file_name) {
                continue;
            }
            let Some(library) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|text| library_path(&text))
            else {
                continue;
            };
            found.push(Manifest {
                file_name,
                serves: serves(&library),
            });
        }
    }
    found
}

/// The `ICD.library_path` of a manifest's text.
fn library_path(text: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(json.get("ICD")?.get("library_path")?.as_str()?.to_owned())
}

/// The PCI vendors of the machine's display controllers (class 0x03:
/// VGA, 3D and other display controllers).
fn display_vendors() -> Vec<u16> {
    let Ok(devices) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let mut vendors = Vec::new();
    for device in devices.flatten() {
        let dir = device.path();
        let display = read(&dir, "class").is_some_and(|c| c.trim().starts_with("0x03"));
        let vendor = read(&dir, "vendor")
            .and_then(|v| u16::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok());
        if let (true, Some(vendor)) = (display, vendor) {
            if !vendors.contains(&vendor) {
                vendors.push(vendor);
            }
        }
    }
    vendors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(file_name: &str, library: &str) -> Manifest {
        Manifest {
            file_name: file_name.into(),
            serves: serves(library),
        }
    }

    /// Debian 12 with mesa-vulkan-drivers and NVIDIA's driver installed.
    fn desktop() -> Vec<Manifest> {
        vec![
            manifest(
                "intel_icd.x86_64.json",
                "/usr/lib/x86_64-linux-gnu/libvulkan_intel.so",
            ),
            manifest(
                "intel_hasvk_icd.x86_64.json",
                "/usr/lib/x86_64-linux-gnu/libvulkan_intel_hasvk.so",
            ),
            manifest(
                "lvp_icd.x86_64.json",
                "/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so",
            ),
            manifest(
                "radeon_icd.x86_64.json",
                "/usr/lib/x86_64-linux-gnu/libvulkan_radeon.so",
            ),
            manifest("nvidia_icd.json", "libGLX_nvidia.so.0"),
            manifest(
                "virtio_icd.x86_64.json",
                "/usr/lib/x86_64-linux-gnu/libvulkan_virtio.so",
            ),
        ]
    }

    #[test]
    fn an_nvidia_machine_loads_only_nvidia_and_the_unknown() {
        assert_eq!(
            unused(&desktop(), &[NVIDIA], &DeviceSelector::First),
            [
                "intel_icd.x86_64.json",
                "intel_hasvk_icd.x86_64.json",
                "lvp_icd.x86_64.json",
                "radeon_icd.x86_64.json"
            ]
        );
    }

    #[test]
    fn a_laptop_keeps_both_of_its_gpus_drivers() {
        assert_eq!(
            unused(&desktop(), &[INTEL, NVIDIA], &DeviceSelector::First),
            ["lvp_icd.x86_64.json", "radeon_icd.x86_64.json"]
        );
    }

    #[test]
    fn lavapipe_stays_without_a_gpu_or_when_a_device_is_named() {
        // No display controller at all (CI): only the vendors' drivers go.
        assert_eq!(
            unused(&desktop(), &[], &DeviceSelector::First),
            [
                "intel_icd.x86_64.json",
                "intel_hasvk_icd.x86_64.json",
                "radeon_icd.x86_64.json",
                "nvidia_icd.json"
            ]
        );
        // A GPU whose driver is not installed: lavapipe is what serves.
        let no_nvidia: Vec<Manifest> = desktop()
            .into_iter()
            .filter(|m| m.file_name != "nvidia_icd.json")
            .collect();
        assert!(!unused(&no_nvidia, &[NVIDIA], &DeviceSelector::First)
            .contains(&"lvp_icd.x86_64.json".to_string()));
        // A device named by the admin may be lavapipe.
        for selector in [
            DeviceSelector::Index(1),
            DeviceSelector::Name("llvmpipe".into()),
            DeviceSelector::Uuid([0; 16]),
        ] {
            assert!(!unused(&desktop(), &[NVIDIA], &selector)
                .contains(&"lvp_icd.x86_64.json".to_string()));
        }
    }

    #[test]
    fn libraries_are_told_apart_by_name() {
        assert_eq!(serves("libvulkan_radeon.so"), Serves::Vendor(AMD));
        assert_eq!(serves("/opt/amdvlk/amdvlk64.so"), Serves::Vendor(AMD));
        assert_eq!(serves("libnvidia-vulkan.so.1"), Serves::Vendor(NVIDIA));
        assert_eq!(
            serves("/usr/lib/libvulkan_nouveau.so"),
            Serves::Vendor(NVIDIA)
        );
        assert_eq!(serves("libvulkan_lvp.so"), Serves::Cpu);
        assert_eq!(serves("libvulkan_dzn.so"), Serves::Unknown);
    }

    #[test]
    fn a_name_that_reads_as_a_glob_is_never_held_back() {
        let odd = [manifest("intel*.json", "libvulkan_intel.so")];
        assert!(unused(&odd, &[], &DeviceSelector::First).is_empty());
    }

    #[test]
    fn manifests_are_read_from_their_folders_first_name_wins() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&first)?;
        std::fs::create_dir(&second)?;
        std::fs::write(
            first.join("radeon_icd.x86_64.json"),
            r#"{"file_format_version": "1.0.0", "ICD": {"library_path": "/usr/lib/libvulkan_radeon.so", "api_version": "1.3.230"}}"#,
        )?;
        std::fs::write(
            second.join("radeon_icd.x86_64.json"),
            r#"{"ICD": {"library_path": "libvulkan_lvp.so"}}"#,
        )?;
        std::fs::write(second.join("broken.json"), "{ not json")?;
        std::fs::write(second.join("notes.txt"), "")?;
        assert_eq!(
            installed(&[first, second, dir.path().join("missing")]),
            [manifest("radeon_icd.x86_64.json", "libvulkan_radeon.so")]
        );
        Ok(())
    }
}
