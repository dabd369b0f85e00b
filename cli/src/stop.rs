//! `vramswap stop`: swapoff first (the kernel pulls every page back into
//! RAM), then detach the NBD device, stop nbdkit (which gives the VRAM
//! back) and remove the instance directory. If swapoff fails, nothing else
//! is touched: the pages are still in VRAM and the server must keep them.
//!
//! Unless the server is dead: then its pages are lost whatever stop does
//! (since Linux 6.0 swapoff succeeds and leaves an error entry for each
//! lost page, so the process that touches one gets SIGBUS), and keeping
//! the instance would only hold on to a useless NBD device. So stop says
//! so, detaches the device first (the requests the server had in flight
//! would otherwise wait out the kernel's NBD timeout before they fail, and
//! swapoff with them), runs swapoff, and removes the instance even when
//! swapoff fails, naming what is left.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use vramswap::ByteSize;

use crate::cgroups;
use crate::nbd;
use crate::state::{self, InstanceDir, State};
use crate::system::{Cmd, System};

/// Stops the named instances (or all); every one is tried, and the error
/// lists those that failed.
pub fn run(system: &mut dyn System, names: &[String], all: bool) -> Result<()> {
    let names = if all {
        state::instances(system)?
    } else if names.is_empty() {
        vec![crate::args::DEFAULT_NAME.to_string()]
    } else {
        names.to_vec()
    };
    if names.is_empty() {
        println!("vramswap: no instances to stop");
        return Ok(());
    }
    // A group's name stands for all its members.
    let mut members = Vec::new();
    for name in &names {
        members.extend(state::resolve(system, name)?);
    }
    // swapoff charges every page it brings back to its memory cgroup, and
    // one at its memory.max would get an OOM kill: the limits are lifted
    // for the swapoffs as suspend does, and put back after. Elastic
    // watchers end first: one in a yield of its own puts limits back too.
    crate::elastic::watch::stop_watchers(system)?;
    if let Err(err) = cgroups::lift(system, "stop") {
        put_back_limits(system);
        crate::elastic::watch::restart_watchers(system);
        bail!(
            "cannot lift the memory limits that the swapoff would meet: {err:#}; nothing was \
             stopped"
        );
    }
    let mut failed = Vec::new();
    for name in &members {
        if let Err(err) = stop_one(system, name) {
            eprintln!("vramswap: error: {name}: {err:#}");
            failed.push(name.as_str());
        }
    }
    put_back_limits(system);
    // The elastic areas that are still up are watched again.
    crate::elastic::watch::restart_watchers(system);
    if !failed.is_empty() {
        bail!("could not stop: {}", failed.join(", "));
    }
    Ok(())
}

/// Puts back the limits lifted for the swapoffs. Those of a cgroup that
/// now holds more than its `memory.max`, with no swap left to push it to,
/// stay lifted (`memory.high` holds it there) and recorded, for the next
/// `start`; a suspend's record waits for its resume.
fn put_back_limits(system: &mut dyn System) {
    if !cgroups::pending(system) || crate::sleep::resume_pending(system) {
        return;
    }
    if let Err(err) = cgroups::restore(system) {
        warn!("{err:#}; the next 'vramswap start' tries again");
    }
}

pub fn stop_one(system: &mut dyn System, name: &str) -> Result<()> {
    let instance = InstanceDir::new(name)?;
    if !system.exists(&instance.dir) {
        bail!("no instance '{name}' (see vramswap status)");
    }
    let state = State::load(system, &instance)?;
    let device = state.nbd_device.clone();
    let server_alive = system.alive(state.pid);
    if !server_alive {
        warn!(
            "{name}: nbdkit (pid {}) is not running: the pages it held are lost \
             (processes that touch them get SIGBUS); removing what is left",
            state.pid
        );
    }

    let kernel_name = nbd::kernel_name(&device)?;
    if !server_alive && nbd::is_attached(system, kernel_name) {
        detach(system, &device, "nothing was removed")?;
    }
    // An elastic area's watcher first: it must not turn a slice back on
    // behind the swapoffs below.
    if state.elastic.is_some() {
        crate::elastic::watch::stop_watcher(system, &instance)?;
    }
    let mut swap_left = None;
    for (swap, area) in state.swap_areas(system) {
        if let Err(err) = swapoff(system, &swap, area.used_kib) {
            if server_alive {
                bail!(
                    "{err:#}: the pages stay in VRAM and nothing was stopped; free some RAM \
                     (the kernel needs room for {}) and try again",
                    ByteSize(nbd::swap_area(system, &swap).map_or(0, |a| a.used_kib) << 10)
                );
            }
            swap_left = Some((swap, err));
            break;
        }
    }
    if let (Some(layout), None) = (&state.elastic, &swap_left) {
        crate::elastic::watch::remove_mappings(system, layout)?;
    }
    // The mapping goes (its key with it) before the device under it.
    if let Some(mapping) = &state.crypt {
        if swap_left.is_none()
            && system.exists(std::path::Path::new(&format!("/dev/mapper/{mapping}")))
        {
            let out = system.run(&Cmd::new("cryptsetup").args(["close", mapping]))?;
            if !out.success() {
                bail!(
                    "cryptsetup close {mapping} failed: {}; the server keeps running",
                    out.reason()
                );
            }
        }
    }
    if server_alive && nbd::is_attached(system, kernel_name) {
        detach(system, &device, "the server keeps running")?;
    }
    stop_server(system, &instance)?;
    system
        .remove_dir_all(&instance.dir)
        .with_context(|| format!("remove {}", instance.dir.display()))?;
    if let Some((swap, err)) = swap_left {
        bail!(
            "{err:#}; the server was dead, so '{name}' was removed anyway: {swap} stays an \
             active swap area holding only lost pages until 'swapoff {swap}' succeeds"
        );
    }
    println!(
        "vramswap: stopped '{name}' ({device}, {})",
        ByteSize(state.size)
    );
    Ok(())
}

/// Stops the instance's nbdkit: SIGTERM (it gives the VRAM back on the
/// way out), then SIGKILL if it has not exited after 30 s. Called once
/// swap is off and the device detached: a storage daemon holds SIGTERM
/// back only while a client is connected, and none should be left.
pub fn stop_server(system: &mut dyn System, instance: &InstanceDir) -> Result<()> {
    let Some(pid) = state::read_pid(system, &instance.pidfile()) else {
        return Ok(());
    };
    terminate(
        system,
        pid,
        Duration::from_secs(30),
        "(a client still connected holds it there); swap is off and the device detached",
    )
}

/// Ends process `pid` if it runs: SIGTERM, then SIGKILL if it has not
/// exited after `grace`, saying why it was late (`late`).
pub fn terminate(system: &mut dyn System, pid: u32, grace: Duration, late: &str) -> Result<()> {
    const POLL: Duration = Duration::from_millis(100);
    if !system.alive(pid) {
        return Ok(());
    }
    system
        .signal(pid, libc::SIGTERM)
        .with_context(|| format!("kill -TERM {pid}"))?;
    let mut waited = Duration::ZERO;
    while system.alive(pid) {
        if waited >= grace {
            warn!(
                "process {pid} has not exited {} s after SIGTERM {late}: killing it",
                grace.as_secs()
            );
            system
                .signal(pid, libc::SIGKILL)
                .with_context(|| format!("kill -KILL {pid}"))?;
            break;
        }
        system.sleep(POLL);
        waited += POLL;
    }
    Ok(())
}

/// Disconnects the NBD device: the kernel fails whatever is still in
/// flight on it. `left` says what a failure leaves as it was.
fn detach(system: &mut dyn System, device: &str, left: &str) -> Result<()> {
    let out = system.run(&Cmd::new("nbd-client").args(["-d", device]))?;
    if !out.success() {
        bail!("nbd-client -d {device} failed: {}; {left}", out.reason());
    }
    Ok(())
}

/// Runs swapoff, showing how much is still to come back while it works.
pub fn swapoff(system: &mut dyn System, device: &str, used_kib: u64) -> Result<()> {
    info!(
        "swapoff {device}: moving {} back into RAM",
        ByteSize(used_kib << 10)
    );
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let root = system.root().to_path_buf();
    let remaining = || nbd::swap_area_at(&root, device).map_or(0, |a| a.used_kib);
    let out = system.run_watching(
        &Cmd::new("swapoff").arg(device),
        Duration::from_millis(500),
        &mut || {
            let left = remaining();
            if tty {
                eprint!(
                    "\rvramswap: swapoff {device}: {} still in VRAM   ",
                    ByteSize(left << 10)
                );
            } else if last_line.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "vramswap: swapoff {device}: {} still in VRAM",
                    ByteSize(left << 10)
                );
                last_line = Instant::now();
            }
        },
    )?;
    if tty {
        eprintln!();
    }
    if !out.success() {
        bail!("swapoff {device} failed ({})", out.reason());
    }
    info!(
        "swapoff {device}: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::{Call, FakeSystem};

    fn running() -> FakeSystem {
        let mut system = FakeSystem::new();
        let state = crate::state::test_state("default", "/dev/nbd0", 4321);
        system.fixture("/run/vramswap/default/state.json", &state.to_json());
        system.fixture("/run/vramswap/default/nbdkit.pid", "4321\n");
        system.fixture("/sys/block/nbd0/pid", "99\n");
        system.fixture("/sys/block/nbd0/size", "524288\n");
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/nbd0 partition 262140 2048 50\n",
        );
        system.alive.insert(4321, true);
        system
    }

    #[test]
    fn stop_undoes_start_in_order_and_removes_everything() {
        let mut system = running();
        stop_one(&mut system, "default").unwrap();
        assert_eq!(
            actions(&system),
            [
                "swapoff /dev/nbd0".to_string(),
                "nbd-client -d /dev/nbd0".to_string(),
                format!("signal 4321 {}", libc::SIGTERM),
                "rm /run/vramswap/default".to_string(),
            ]
        );
        assert!(!system.exists(std::path::Path::new("/run/vramswap/default")));
    }

    #[test]
    fn an_encrypted_area_is_swapped_off_and_its_mapping_closed_before_detach() {
        let mut system = running();
        let instance = InstanceDir::new("default").unwrap();
        let mut state = State::load(&system, &instance).unwrap();
        state.crypt = Some("vramswap-default".into());
        system.fixture("/run/vramswap/default/state.json", &state.to_json());
        // /dev/mapper/NAME is a link to dm-0, which /proc/swaps names.
        system.fixture("/dev/mapper/vramswap-default", "");
        system.fixture("/sys/block/dm-0/dm/name", "vramswap-default\n");
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/dm-0 partition 262140 2048 50\n",
        );
        stop_one(&mut system, "default").unwrap();
        assert_eq!(
            actions(&system),
            [
                "swapoff /dev/dm-0".to_string(),
                "cryptsetup close vramswap-default".to_string(),
                "nbd-client -d /dev/nbd0".to_string(),
                format!("signal 4321 {}", libc::SIGTERM),
                "rm /run/vramswap/default".to_string(),
            ]
        );
    }

    #[test]
    fn a_failed_swapoff_leaves_everything_running() {
        let mut system = running();
        system.answer(
            "swapoff",
            255,
            "",
            "swapoff: /dev/nbd0: swapoff failed: Cannot allocate memory\n",
        );
        let err = format!("{:#}", stop_one(&mut system, "default").unwrap_err());
        assert!(err.contains("Cannot allocate memory"), "{err}");
        assert!(err.contains("nothing was stopped"), "{err}");
        assert_eq!(system.ran(), ["swapoff /dev/nbd0"]);
        assert!(system.alive.get(&4321) == Some(&true));
        assert!(system.exists(std::path::Path::new("/run/vramswap/default/state.json")));
    }

    /// The order of what stop did, as short words.
    fn actions(system: &FakeSystem) -> Vec<String> {
        system
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Run(l) => Some(l.clone()),
                Call::Signal(pid, sig) => Some(format!("signal {pid} {sig}")),
                Call::RemoveDir(p) => Some(format!("rm {}", p.display())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dead_server_is_cleaned_up_without_signalling_it() {
        let mut system = running();
        system.alive.insert(4321, false);
        stop_one(&mut system, "default").unwrap();
        // Detached first: what the dead server had in flight fails at once
        // instead of holding swapoff until the kernel's NBD timeout.
        assert_eq!(
            actions(&system),
            [
                "nbd-client -d /dev/nbd0",
                "swapoff /dev/nbd0",
                "rm /run/vramswap/default"
            ]
        );
    }

    #[test]
    fn a_dead_server_is_removed_even_when_swapoff_fails() {
        let mut system = running();
        system.alive.insert(4321, false);
        system.answer(
            "swapoff",
            255,
            "",
            "swapoff: /dev/nbd0: swapoff failed: Input/output error\n",
        );
        let err = format!("{:#}", stop_one(&mut system, "default").unwrap_err());
        assert_eq!(
            err,
            "swapoff /dev/nbd0 failed (swapoff: /dev/nbd0: swapoff failed: Input/output error); \
             the server was dead, so 'default' was removed anyway: /dev/nbd0 stays an active \
             swap area holding only lost pages until 'swapoff /dev/nbd0' succeeds"
        );
        assert_eq!(
            actions(&system),
            [
                "nbd-client -d /dev/nbd0",
                "swapoff /dev/nbd0",
                "rm /run/vramswap/default"
            ]
        );
        assert!(!system.exists(std::path::Path::new("/run/vramswap/default")));
    }

    #[test]
    fn stop_lifts_the_limits_its_swapoff_would_meet_and_puts_them_back() {
        let mut system = running();
        let limits = crate::cgroups::fixtures::tight_cgroup(&system);
        run(&mut system, &[], false).unwrap();
        let max = std::path::PathBuf::from("/sys/fs/cgroup/hog.scope/memory.max");
        let lifted = system
            .calls
            .iter()
            .position(|c| *c == Call::Write(max.clone()))
            .expect("memory.max was never written");
        let swapoff = system
            .calls
            .iter()
            .position(|c| *c == Call::Run("swapoff /dev/nbd0".into()))
            .unwrap();
        assert!(lifted < swapoff, "{:?}", system.calls);
        assert_eq!(limits(&system), ("134217728".into(), "max".into()));
        assert!(!crate::cgroups::pending(&system));
    }

    #[test]
    fn a_cgroup_left_over_its_limit_stays_lifted_for_the_next_start() {
        let mut system = running();
        let limits = crate::cgroups::fixtures::tight_cgroup(&system);
        // Its pages are back in RAM, and no swap is left to push them to.
        system.on_run.push((
            "swapoff /dev/nbd0".into(),
            "/sys/fs/cgroup/hog.scope/memory.current".into(),
            format!("{}\n", 228 << 20),
        ));
        run(&mut system, &[], false).unwrap();
        assert_eq!(limits(&system), ("max".into(), "134217728".into()));
        assert!(crate::cgroups::pending(&system));
        assert!(!system.exists(std::path::Path::new("/run/vramswap/default")));
    }

    #[test]
    fn unknown_and_broken_instances_are_clear_errors() {
        let mut system = running();
        let err = stop_one(&mut system, "other").unwrap_err().to_string();
        assert_eq!(err, "no instance 'other' (see vramswap status)");
        system.fixture("/run/vramswap/default/state.json", "{\"version\":");
        let err = format!("{:#}", stop_one(&mut system, "default").unwrap_err());
        assert!(
            err.contains("state.json: not a valid vramswap state file"),
            "{err}"
        );
        assert!(system.calls.is_empty(), "touched {:?}", system.calls);
    }
}
