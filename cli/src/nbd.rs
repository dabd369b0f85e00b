//! The kernel's side: NBD devices in sysfs and swap areas in /proc/swaps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::system::{Cmd, System};

/// `/dev/nbd3` → `nbd3`.
pub fn kernel_name(device: &str) -> Result<&str> {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    let number = name.strip_prefix("nbd").unwrap_or("");
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
        bail!("'{device}' is not an NBD device: expected /dev/nbdN");
    }
    Ok(name)
}

fn sys_block(name: &str) -> PathBuf {
    Path::new("/sys/block").join(name)
}

/// Whether the kernel has NBD devices at all (module loaded or built in).
pub fn kernel_has_nbd(system: &dyn System) -> bool {
    system.exists(&sys_block("nbd0"))
}

/// A device is in use when a client is attached (`pid` exists) or it has
/// a size.
pub fn is_free(system: &dyn System, name: &str) -> bool {
    let dir = sys_block(name);
    system.exists(&dir)
        && !system.exists(&dir.join("pid"))
        && system
            .read(&dir.join("size"))
            .map(|s| s.trim() == "0")
            .unwrap_or(false)
}

/// Whether a client is attached to the device.
pub fn is_attached(system: &dyn System, name: &str) -> bool {
    system.exists(&sys_block(name).join("pid"))
}

/// For each hardware queue of the device that CPUs submit to (each is one
/// NBD connection), the first of those CPUs. Queues no CPU maps to (more
/// connections than CPUs) are not listed: they never carry a request.
pub fn queue_cpus(system: &dyn System, name: &str) -> Result<Vec<u32>> {
    let dir = sys_block(name).join("mq");
    let mut queues: Vec<(u32, u32)> = Vec::new();
    for queue in system.list(&dir).unwrap_or_default() {
        let Ok(index) = queue.parse::<u32>() else {
            continue;
        };
        let list = system
            .read(&dir.join(&queue).join("cpu_list"))
            .unwrap_or_default();
        let first = list
            .trim()
            .split([',', '-'])
            .next()
            .and_then(|cpu| cpu.trim().parse::<u32>().ok());
        if let Some(cpu) = first {
            queues.push((index, cpu));
        }
    }
    if queues.is_empty() {
        bail!("{}: no hardware queue has a CPU", dir.display());
    }
    queues.sort_unstable();
    Ok(queues.into_iter().map(|(_, cpu)| cpu).collect())
}

/// The first free `/dev/nbdN` that is not in `taken`.
pub fn first_free(system: &dyn System, taken: &[String]) -> Option<String> {
    let mut names: Vec<String> = system
        .list(Path::new("/sys/block"))
        .ok()?
        .into_iter()
        .filter(|n| kernel_name(n).is_ok())
        .collect();
    names.sort_by_key(|n| n[3..].parse::<u32>().unwrap_or(u32::MAX));
    names
        .into_iter()
        .find(|n| is_free(system, n) && !taken.iter().any(|t| t.ends_with(n.as_str())))
        .map(|n| format!("/dev/{n}"))
}

/// One line of /proc/swaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapArea {
    pub device: String,
    pub size_kib: u64,
    pub used_kib: u64,
    pub priority: i32,
}

/// /proc/swaps under `root`, readable while a `System` is busy running
/// swapoff (progress).
pub fn swaps_at(root: &Path) -> Vec<SwapArea> {
    let Ok(text) = std::fs::read_to_string(crate::system::under(root, Path::new("/proc/swaps")))
    else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(SwapArea {
                device: f.first()?.to_string(),
                size_kib: f.get(2)?.parse().ok()?,
                used_kib: f.get(3)?.parse().ok()?,
                priority: f.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

/// The names of device-mapper mapping `mapping`: /dev/mapper/NAME, and
/// /dev/dm-N, which /proc/swaps shows where /dev/mapper/NAME is a link.
pub fn mapper_paths(system: &dyn System, mapping: &str) -> Vec<String> {
    let mut paths = vec![format!("/dev/mapper/{mapping}")];
    let blocks = system.list(Path::new("/sys/block")).unwrap_or_default();
    for block in blocks.into_iter().filter(|b| b.starts_with("dm-")) {
        let name = system.read(&Path::new("/sys/block").join(&block).join("dm/name"));
        if name.is_ok_and(|n| n.trim() == mapping) {
            paths.push(format!("/dev/{block}"));
        }
    }
    paths
}

/// `mkswap` of `device`, labelled `label`.
pub fn mkswap_command(label: &str, device: &str) -> Cmd {
    Cmd::new("mkswap").arg("-L").arg(label).arg(device)
}

/// `swapon` of `device` at `priority`, with `--discard` (trims reach the
/// server, which frees the VRAM behind them) where asked.
pub fn swapon_command(priority: i32, device: &str, discard: bool) -> Cmd {
    let cmd = Cmd::new("swapon")
        .arg("--priority")
        .arg(priority.to_string());
    let cmd = if discard { cmd.arg("--discard") } else { cmd };
    cmd.arg(device)
}

pub fn swap_area(system: &dyn System, device: &str) -> Option<SwapArea> {
    swap_area_at(system.root(), device)
}

pub fn swap_area_at(root: &Path, device: &str) -> Option<SwapArea> {
    swaps_at(root).into_iter().find(|s| s.device == device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::FakeSystem;

    fn nbd(system: &FakeSystem, name: &str, size: &str, attached: bool) {
        system.fixture(&format!("/sys/block/{name}/size"), size);
        if attached {
            system.fixture(&format!("/sys/block/{name}/pid"), "77\n");
        }
    }

    #[test]
    fn each_mapped_hardware_queue_gives_its_first_cpu() {
        let system = FakeSystem::new();
        assert!(queue_cpus(&system, "nbd0").is_err());
        system.fixture("/sys/block/nbd0/mq/10/cpu_list", "12, 13\n");
        system.fixture("/sys/block/nbd0/mq/2/cpu_list", "4-7\n");
        system.fixture("/sys/block/nbd0/mq/0/cpu_list", "0\n");
        // A queue without CPUs (more connections than CPUs) is left out.
        system.fixture("/sys/block/nbd0/mq/3/cpu_list", "\n");
        assert_eq!(queue_cpus(&system, "nbd0").unwrap(), [0, 4, 12]);
    }

    #[test]
    fn finds_the_first_free_device_in_numeric_order() {
        let system = FakeSystem::new();
        assert!(!kernel_has_nbd(&system));
        assert_eq!(first_free(&system, &[]), None);
        nbd(&system, "nbd0", "16777216\n", true);
        nbd(&system, "nbd1", "0\n", false);
        nbd(&system, "nbd2", "0\n", false);
        nbd(&system, "nbd10", "0\n", false);
        system.fixture("/sys/block/sda/size", "0\n");
        assert!(kernel_has_nbd(&system));
        assert_eq!(first_free(&system, &[]).as_deref(), Some("/dev/nbd1"));
        assert_eq!(
            first_free(&system, &["/dev/nbd1".into()]).as_deref(),
            Some("/dev/nbd2")
        );
        assert!(is_attached(&system, "nbd0"));
        assert!(!is_free(&system, "nbd0"));
    }

    #[test]
    fn device_names_are_checked() {
        assert_eq!(kernel_name("/dev/nbd12").unwrap(), "nbd12");
        assert_eq!(kernel_name("nbd0").unwrap(), "nbd0");
        for bad in ["/dev/sda", "/dev/nbd", "/dev/nbdx", "nbd1p1"] {
            assert!(kernel_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_proc_swaps() {
        let system = FakeSystem::new();
        system.fixture(
            "/proc/swaps",
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
             /dev/zram0                              partition\t8388604\t\t0\t\t100\n\
             /dev/nbd0                               partition\t262140\t\t1024\t\t50\n",
        );
        assert_eq!(
            swap_area(&system, "/dev/nbd0"),
            Some(SwapArea {
                device: "/dev/nbd0".into(),
                size_kib: 262140,
                used_kib: 1024,
                priority: 50
            })
        );
        assert_eq!(swaps_at(system.root()).len(), 2);
        assert_eq!(swap_area(&system, "/dev/nbd1"), None);
    }
}
