//! Several GPUs as one swap area: `start --device all` or `--device 0,2`
//! makes one instance per GPU, each with its own server, NBD device and
//! swap area, all at the same priority so the kernel stripes pages across
//! them (swap areas of equal priority are used round-robin). The members
//! are named `NAME-gpuI` (I: the GPU's index) and record NAME as their
//! group; `stop NAME` and `status NAME` take the whole group, and each
//! member can be stopped on its own.

use anyhow::{anyhow, bail, Result};
use tracing::warn;
use vramswap::backend::{select_device, BackendKind, DeviceSelector};

use crate::config::{Origin, Settings};
use crate::devices::Gpus;
use crate::name::check_name;
use crate::state::{self, InstanceDir};
use crate::stop;
use crate::system::System;

/// The GPU indexes `device` names when it is `all` or a comma-separated
/// list of selectors (index, name substring or UUID); `None` when it names
/// one GPU.
pub fn devices(
    gpus: &dyn Gpus,
    settings: &Settings,
    origin: &Origin,
) -> Result<Option<Vec<usize>>> {
    let Some(spec) = settings.device.as_deref() else {
        return Ok(None);
    };
    if spec != "all" && !spec.contains(',') {
        return Ok(None);
    }
    let named = || origin.names("device", spec);
    let kind: BackendKind = match settings.backend.as_deref() {
        Some(b) => b.parse().map_err(|e| anyhow!("{}: {e}", named()))?,
        None => gpus.default_backend(&DeviceSelector::First)?,
    };
    let found = gpus.devices(kind)?;
    let indexes: Vec<usize> = if spec == "all" {
        found.iter().map(|d| d.index).collect()
    } else {
        spec.split(',')
            .map(|one| {
                let selector: DeviceSelector = one
                    .trim()
                    .parse()
                    .map_err(|e| anyhow!("{}: {e}", named()))?;
                select_device(&found, &selector)
                    .map(|d| d.index)
                    .map_err(|e| anyhow!("{}: {e}", named()))
            })
            .collect::<Result<_>>()?
    };
    if indexes.is_empty() {
        bail!("{}: the {kind} backend sees no GPU", named());
    }
    for (i, index) in indexes.iter().enumerate() {
        if indexes[..i].contains(index) {
            bail!("{}: names GPU {index} twice", named());
        }
    }
    Ok(Some(indexes))
}

/// Starts area `name`: one instance, or a group when `settings` name
/// several GPUs.
pub fn start_area(
    system: &mut dyn System,
    gpus: &dyn Gpus,
    name: &str,
    settings: &Settings,
    origin: &Origin,
    dry_run: bool,
) -> Result<()> {
    match devices(gpus, settings, origin)? {
        Some(indexes) => start(system, gpus, name, settings, origin, &indexes, dry_run),
        None => settings
            .to_options(name, origin)
            .and_then(|o| crate::start::run(system, gpus, &o, dry_run)),
    }
}

/// Starts one member per GPU, in order. If one fails, the members already
/// started are stopped again (newest first), so a group is all or nothing.
pub fn start(
    system: &mut dyn System,
    gpus: &dyn Gpus,
    name: &str,
    settings: &Settings,
    origin: &Origin,
    indexes: &[usize],
    dry_run: bool,
) -> Result<()> {
    check_name(name)?;
    if system.exists(&InstanceDir::new(name)?.dir) {
        bail!("'{name}' is already an instance (see vramswap status)");
    }
    if !state::group_members(system, name)?.is_empty() {
        bail!("'{name}' is already running (see vramswap status {name})");
    }
    let mut started: Vec<String> = Vec::new();
    for &index in indexes {
        let member = format!("{name}-gpu{index}");
        let mut one = settings.clone();
        one.device = Some(index.to_string());
        let result = one.to_options(&member, origin).and_then(|mut options| {
            options.group = Some(name.to_string());
            crate::start::run(system, gpus, &options, dry_run)
        });
        if let Err(err) = result {
            if !dry_run {
                for done in started.iter().rev() {
                    if let Err(undo) = stop::stop_one(system, done) {
                        warn!("{done}: could not stop it again: {undo:#}");
                    }
                }
            }
            let undone = if started.is_empty() || dry_run {
                String::new()
            } else {
                format!(" (stopped again: {})", started.join(", "))
            };
            bail!("{member}: {err:#}{undone}");
        }
        started.push(member);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake::{gpu, FakeGpus};
    use crate::system::fake::{Call, FakeSystem};

    fn three_gpus() -> FakeGpus {
        let devices = (0..3)
            .map(|i| {
                let mut d = gpu(&format!("NVIDIA L4 #{i}"), 20 << 30);
                d.index = i;
                d.uuid = [i as u8 + 1; 16];
                d.pci_bus_id = Some(format!("0000:0{}:00.0", i + 1));
                d
            })
            .collect();
        FakeGpus {
            devices,
            bad_blocks: Vec::new(),
        }
    }

    fn settings(device: &str) -> Settings {
        Settings {
            device: Some(device.into()),
            size: Some("1G".into()),
            plugin: Some("/usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so".into()),
            ..Default::default()
        }
    }

    /// Three free NBD devices; nbdkit "starts" for each of `members`.
    fn machine(members: &[&str]) -> FakeSystem {
        FakeSystem::ready_to_start(3, members)
    }

    #[test]
    fn all_and_lists_name_gpus_and_single_devices_are_no_group() {
        let gpus = three_gpus();
        let origin = Origin::default();
        let pick = |d: &str| devices(&gpus, &settings(d), &origin);
        assert_eq!(pick("all").unwrap(), Some(vec![0, 1, 2]));
        assert_eq!(pick("2,0").unwrap(), Some(vec![2, 0]));
        assert_eq!(pick("#1, 0").unwrap(), Some(vec![1, 0]));
        assert_eq!(pick("1").unwrap(), None);
        assert_eq!(devices(&gpus, &Settings::default(), &origin).unwrap(), None);
        let err = |d: &str| pick(d).unwrap_err().to_string();
        assert!(
            err("0,0").contains("--device 0,0: names GPU 0 twice"),
            "{}",
            err("0,0")
        );
        assert!(err("0,7").starts_with("--device 0,7: "), "{}", err("0,7"));
        let none = FakeGpus {
            devices: Vec::new(),
            bad_blocks: Vec::new(),
        };
        let e = devices(&none, &settings("all"), &origin)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sees no GPU"), "{e}");
    }

    #[test]
    fn a_group_starts_one_member_per_gpu_and_stops_as_one() {
        let mut system = machine(&["swap-gpu0", "swap-gpu2"]);
        let gpus = three_gpus();
        let origin = Origin::default();
        let start_swap = |system: &mut FakeSystem| {
            start(
                system,
                &gpus,
                "swap",
                &settings("0,2"),
                &origin,
                &[0, 2],
                false,
            )
        };
        start_swap(&mut system).unwrap();
        assert_eq!(
            state::group_members(&system, "swap").unwrap(),
            ["swap-gpu0", "swap-gpu2"]
        );
        let ran = system.ran();
        let swapons: Vec<&String> = ran.iter().filter(|c| c.starts_with("swapon")).collect();
        assert_eq!(swapons.len(), 2, "{ran:?}");
        // Same priority: the kernel stripes pages across equal priorities.
        assert!(swapons[0].contains("--priority 50") && swapons[1].contains("--priority 50"));
        assert!(swapons[0].ends_with("/dev/nbd0") && swapons[1].ends_with("/dev/nbd1"));
        assert!(ran
            .iter()
            .any(|c| c.contains("nbdkit") && c.contains("device=2")));
        // A second start of the same group is refused before anything runs.
        let before = system.ran().len();
        let again = start_swap(&mut system);
        assert!(again.unwrap_err().to_string().contains("already running"));
        assert_eq!(system.ran().len(), before);
        // `stop swap` means both members.
        assert_eq!(
            state::resolve(&system, "swap").unwrap(),
            ["swap-gpu0", "swap-gpu2"]
        );
        assert_eq!(state::resolve(&system, "swap-gpu2").unwrap(), ["swap-gpu2"]);
        assert!(state::resolve(&system, "other").is_err());
    }

    #[test]
    fn each_gpu_of_an_elastic_group_has_its_own_slices_and_watcher() {
        let mut system = machine(&["swap-gpu0", "swap-gpu2"]);
        let gpus = three_gpus();
        let mut s = settings("0,2");
        s.elastic = Some(true);
        s.slices = Some(2);
        start(
            &mut system,
            &gpus,
            "swap",
            &s,
            &Origin::default(),
            &[0, 2],
            false,
        )
        .unwrap();
        let ran = system.ran();
        for member in ["swap-gpu0", "swap-gpu2"] {
            for i in 0..2 {
                let create = format!("dmsetup create vramswap-{member}-s{i} ");
                assert!(ran.iter().any(|l| l.starts_with(&create)), "{ran:?}");
            }
            let state = state::State::load(&system, &InstanceDir::new(member).unwrap()).unwrap();
            assert_eq!(state.elastic.unwrap().slices.len(), 2);
        }
        let watchers: Vec<&Call> = system
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Spawn(_)))
            .collect();
        assert_eq!(watchers.len(), 2);
        assert!(matches!(watchers[1], Call::Spawn(l) if l.ends_with("elastic swap-gpu2")));
    }

    #[test]
    fn a_member_that_fails_stops_the_members_already_started() {
        // No pidfile for the second member: its server never comes up.
        let mut system = machine(&["swap-gpu0"]);
        let gpus = three_gpus();
        let mut s = settings("all");
        s.timeout = Some(1);
        let err = start(
            &mut system,
            &gpus,
            "swap",
            &s,
            &Origin::default(),
            &[0, 1, 2],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("swap-gpu1: "), "{err}");
        assert!(err.ends_with("(stopped again: swap-gpu0)"), "{err}");
        assert!(state::group_members(&system, "swap").unwrap().is_empty());
        assert!(!system.exists(&InstanceDir::new("swap-gpu0").unwrap().dir));
        assert!(!system.ran().iter().any(|c| c.contains("swap-gpu2")));
    }
}
