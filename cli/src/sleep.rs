//! `vramswap suspend` / `vramswap resume`, run by vramswap-suspend.service
//! and vramswap-resume.service around system sleep.
//!
//! On suspend the GPU driver tears down the device memory that holds the
//! swap; swap I/O in flight then blocks forever and the machine hangs on
//! resume. So before sleeping every instance is stopped (swapoff while the
//! GPU is alive), and started again after waking. If swapoff cannot bring
//! the pages back into RAM, the instances already stopped are started again
//! and suspend fails: the machine stays awake rather than hang.
//!
//! swapoff charges each page to its memory cgroup: first the limits that
//! would turn it into an OOM kill are lifted, and they are put back once
//! resume has the areas swapping again (`cgroups.rs`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::cgroups;
use crate::config::{Origin, Settings};
use crate::devices::Gpus;
use crate::state::{self, run_dir, InstanceDir, State};
use crate::system::System;
use crate::{start, stop};

/// What `resume` must start again.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stopped {
    areas: Vec<Area>,
}

/// One instance as `start` made it: its settings, and the group it was a
/// member of (`start --device all`), which it joins again.
#[derive(Debug, Serialize, Deserialize)]
struct Area {
    name: String,
    settings: Settings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

const RESUME_FILE: &str = "resume.json";

fn resume_file() -> PathBuf {
    run_dir().join(RESUME_FILE)
}

/// Whether a suspend's areas wait for `resume`.
pub fn resume_pending(system: &dyn System) -> bool {
    system.exists(&resume_file())
}

pub fn suspend(system: &mut dyn System, gpus: &dyn Gpus) -> Result<()> {
    crate::elastic::watch::stop_watchers(system)?;
    if let Err(err) = cgroups::lift(system, "suspend") {
        give_back_limits(system);
        bail!("cannot lift the memory limits that the swapoff would meet: {err:#}; not suspending");
    }
    let mut stopped = Stopped::default();
    for name in state::instances(system)? {
        let instance = InstanceDir::new(&name)?;
        let state = State::load(system, &instance)
            .with_context(|| format!("{name}: cannot tell how to restart it after resume"))?;
        info!("suspend: stopping '{name}'");
        if let Err(err) = stop::stop_one(system, &name) {
            error!("suspend: cannot stop '{name}': {err:#}");
            error!("suspend: starting again what was stopped, and refusing to sleep: swap in VRAM would hang the machine on resume");
            restart(system, gpus, &stopped.areas);
            give_back_limits(system);
            crate::elastic::watch::restart_watchers(system);
            bail!("'{name}' could not be stopped: {err:#}; not suspending");
        }
        stopped.areas.push(Area {
            name,
            settings: state.settings,
            group: state.group,
        });
        state::write_record(system, RESUME_FILE, &stopped)?;
    }
    Ok(())
}

pub fn resume(system: &mut dyn System, gpus: &dyn Gpus) -> Result<()> {
    let path = resume_file();
    let failed = match system.read(&path) {
        Ok(text) => {
            let stopped: Stopped = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a vramswap resume file", path.display()))?;
            let failed = restart(system, gpus, &stopped.areas);
            system.remove_file(&path)?;
            failed
        }
        Err(_) => {
            info!("resume: nothing was stopped for suspend");
            Vec::new()
        }
    };
    if !failed.is_empty() {
        // Put back, the limits would push what is over them out to swap
        // that is not there: they stay lifted until an area is.
        bail!(
            "could not start again: {}{}",
            failed.join(", "),
            if cgroups::pending(system) {
                "; the memory limits lifted for suspend stay lifted until 'vramswap start' \
                 has an area swapping"
            } else {
                ""
            }
        );
    }
    // The areas swap again: what the cgroups hold over their limits can go
    // back out to them.
    cgroups::restore(system)
}

/// Puts back the limits a suspend that is not going to sleep lifted;
/// whatever fails stays recorded for the next resume or start.
fn give_back_limits(system: &mut dyn System) {
    if let Err(err) = cgroups::restore(system) {
        error!("suspend: {err:#}");
    }
}

/// Starts each area; returns the names that failed.
fn restart(system: &mut dyn System, gpus: &dyn Gpus, areas: &[Area]) -> Vec<String> {
    let mut failed = Vec::new();
    for Area {
        name,
        settings,
        group,
    } in areas
    {
        let started = settings
            .to_options(name, &Origin::default())
            .and_then(|mut options| {
                options.group = group.clone();
                start::run(system, gpus, &options, false)
            });
        if let Err(err) = started {
            error!("cannot start '{name}' again: {err:#}");
            failed.push(name.clone());
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Whether `resume` has something to do.
    fn pending(system: &dyn System) -> bool {
        system.exists(&resume_file())
    }
    use crate::devices::fake::{gpu, FakeGpus};
    use crate::system::fake::{Call, FakeSystem};

    fn running(system: &mut FakeSystem, name: &str, device: &str, pid: u32) {
        let state = State {
            size: 64 << 20,
            device_name: "gpu".into(),
            settings: Settings {
                size: Some("64M".into()),
                plugin: Some("/plugin.so".into()),
                ..Default::default()
            },
            // 'b' is one GPU of group 'g' (start g --device all).
            group: (name == "b").then(|| "g".to_string()),
            ..crate::state::test_state(name, device, pid)
        };
        system.fixture(
            &format!("/run/vramswap/{name}/state.json"),
            &state.to_json(),
        );
        system.fixture(
            &format!("/run/vramswap/{name}/nbdkit.pid"),
            &format!("{pid}\n"),
        );
        system.alive.insert(pid, true);
    }

    fn machine() -> FakeSystem {
        let mut system = FakeSystem::new();
        system.fixture("/plugin.so", "");
        system.free_nbd(0);
        system.free_nbd(1);
        system.answer("nbdkit --version", 0, "nbdkit 1.32.5\n", "");
        running(&mut system, "a", "/dev/nbd0", 10);
        running(&mut system, "b", "/dev/nbd1", 11);
        system
    }

    fn gpus() -> FakeGpus {
        FakeGpus {
            devices: vec![gpu("gpu", 8 << 30)],
            bad_blocks: Vec::new(),
        }
    }

    #[test]
    fn suspend_stops_all_and_resume_starts_them_again() {
        let mut system = machine();
        suspend(&mut system, &gpus()).unwrap();
        assert!(!system.exists(Path::new("/run/vramswap/a")));
        assert!(!system.exists(Path::new("/run/vramswap/b")));
        assert!(pending(&system));

        system.on_run.push((
            "nbdkit --unix /run/vramswap/a".into(),
            "/run/vramswap/a/nbdkit.pid".into(),
            "20\n".into(),
        ));
        system.on_run.push((
            "nbdkit --unix /run/vramswap/b".into(),
            "/run/vramswap/b/nbdkit.pid".into(),
            "21\n".into(),
        ));
        system.alive.insert(20, true);
        system.alive.insert(21, true);
        resume(&mut system, &gpus()).unwrap();
        for name in ["a", "b"] {
            let state = State::load(&system, &InstanceDir::new(name).unwrap()).unwrap();
            assert_eq!(state.settings.size.as_deref(), Some("64M"));
        }
        // Back in its group: `stop g` still means it.
        assert_eq!(state::resolve(&system, "g").unwrap(), ["b"]);
        assert!(!pending(&system));
    }

    #[test]
    fn a_failed_swapoff_restarts_what_was_stopped_and_refuses_to_sleep() {
        let mut system = machine();
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/nbd0 partition 65532 0 50\n/dev/nbd1 partition 65532 9000 50\n",
        );
        system.answer(
            "swapoff /dev/nbd1",
            255,
            "",
            "swapoff: /dev/nbd1: swapoff failed: Cannot allocate memory\n",
        );
        system.on_run.push((
            "nbdkit --unix /run/vramswap/a".into(),
            "/run/vramswap/a/nbdkit.pid".into(),
            "20\n".into(),
        ));
        system.alive.insert(20, true);
        let err = suspend(&mut system, &gpus()).unwrap_err().to_string();
        assert!(
            err.contains("'b' could not be stopped") && err.contains("not suspending"),
            "{err}"
        );
        // a was stopped, then started again; b was never touched past swapoff.
        assert!(State::load(&system, &InstanceDir::new("a").unwrap()).is_ok());
        assert!(system.exists(Path::new("/run/vramswap/b/state.json")));
        assert!(!system.calls.contains(&Call::Signal(11, libc::SIGTERM)));
    }

    #[test]
    fn suspend_lifts_the_limits_its_swapoff_would_meet_and_resume_puts_them_back() {
        let mut system = machine();
        let limits = cgroups::fixtures::tight_cgroup(&system);
        suspend(&mut system, &gpus()).unwrap();
        assert_eq!(limits(&system).0, "max");
        for (pid, started) in [(20, "a"), (21, "b")] {
            system.on_run.push((
                format!("nbdkit --unix /run/vramswap/{started}"),
                format!("/run/vramswap/{started}/nbdkit.pid"),
                format!("{pid}\n"),
            ));
            system.alive.insert(pid, true);
        }
        resume(&mut system, &gpus()).unwrap();
        assert_eq!(limits(&system).0, "134217728");
        assert!(!cgroups::pending(&system));
    }

    #[test]
    fn a_suspend_that_does_not_sleep_puts_the_limits_back() {
        let mut system = machine();
        let limits = cgroups::fixtures::tight_cgroup(&system);
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/nbd0 partition 65532 0 50\n/dev/nbd1 partition 65532 9000 50\n",
        );
        system.answer("swapoff /dev/nbd1", 255, "", "swapoff failed\n");
        system.on_run.push((
            "nbdkit --unix /run/vramswap/a".into(),
            "/run/vramswap/a/nbdkit.pid".into(),
            "20\n".into(),
        ));
        system.alive.insert(20, true);
        suspend(&mut system, &gpus()).unwrap_err();
        assert_eq!(limits(&system).0, "134217728");
        assert!(!cgroups::pending(&system));
    }

    #[test]
    fn resume_with_nothing_to_do_is_fine() {
        let mut system = FakeSystem::new();
        resume(&mut system, &gpus()).unwrap();
    }
}
