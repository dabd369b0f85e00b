//! Memory cgroups around the swapoffs of suspend, stop and an elastic area.
//!
//! swapoff charges every page it brings back to the cgroup the page
//! belongs to. A cgroup whose `memory.max` leaves no room for its
//! swapped-out pages (a systemd slice with `MemoryMax=`, a container) meets
//! its limit in the middle of the swapoff, and the kernel OOM-kills one of
//! its processes: a laptop closing its lid must never do that. So before
//! its swapoffs `suspend` lifts `memory.max`, and `memory.high` (which
//! would push the pages straight back out to swap), of every cgroup whose
//! memory and swap together exceed them, recording the old values first.
//! `resume` puts them back once the areas swap again, and the kernel pushes
//! what is over the limit back out to VRAM. `stop` does the same around its
//! swapoffs, and an elastic area's watcher around the swapoff of each slice
//! it gives back. A record that no resume took
//! (suspend refused to sleep, or crashed halfway) is put back when suspend
//! gives up, or by the next resume or start.
//!
//! The counters are hierarchical: a slice's include its children's, so a
//! slice that is too tight is lifted as well as the cgroup under it.
//! `memory.swap.current` counts pages in every swap area, not only ours,
//! so more may be lifted than the swapoff needs, never less.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::state::{self, run_dir};
use crate::system::System;

const ROOT: &str = "/sys/fs/cgroup";
const RECORD: &str = "cgroup-limits.json";

/// One cgroup's limits as they were before suspend lifted them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifted {
    /// Below `/sys/fs/cgroup`, e.g. `system.slice/backup.service`.
    pub cgroup: String,
    /// `memory.max` and `memory.high` as read: bytes, or `max`.
    pub max: String,
    pub high: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    lifted: Vec<Lifted>,
}

fn record_path() -> PathBuf {
    run_dir().join(RECORD)
}

/// Whether a record of lifted limits waits to be put back.
pub fn pending(system: &dyn System) -> bool {
    system.exists(&record_path())
}

/// Lifts the limits of every cgroup that could not take its swapped-out
/// pages back; returns those lifted now. The record is written before
/// each limit is touched, and keeps the values from before an earlier
/// lift that was never put back.
pub fn lift(system: &mut dyn System, purpose: &str) -> Result<Vec<Lifted>> {
    let mut record = load(system)?;
    let mut lifted = Vec::new();
    for cgroup in walk(system, Path::new(ROOT))? {
        let Some((entry, need)) = tight(system, cgroup) else {
            continue;
        };
        let dir = Path::new(ROOT).join(&entry.cgroup);
        if !record.lifted.iter().any(|l| l.cgroup == entry.cgroup) {
            record.lifted.push(entry.clone());
            state::write_record(system, RECORD, &record)?;
        }
        for file in ["memory.max", "memory.high"] {
            system
                .write_attribute(&dir.join(file), "max")
                .with_context(|| format!("lift {}", dir.join(file).display()))?;
        }
        info!(
            "{purpose}: {}: memory.max {} and memory.high {} lifted for the swapoff, which \
             brings back {} it has in swap; put back after it",
            entry.cgroup,
            entry.max,
            entry.high,
            vramswap::ByteSize(need)
        );
        lifted.push(entry);
    }
    Ok(lifted)
}

/// Puts back every limit in the record, innermost cgroup first, and
/// removes the record. A cgroup that is gone is skipped; a limit that
/// cannot be written, or a cgroup that still holds more than its
/// `memory.max` (its pages had nowhere to go), keeps the record, for the
/// next try.
///
/// `memory.high` goes to the limit first: the kernel reclaims down to it
/// and never kills for it. A `memory.max` written far below what the
/// cgroup holds makes the kernel OOM-kill in the cgroup when that reclaim
/// lags (swap-out over NBD is slow) or has nowhere to put the pages; once
/// the cgroup is under it, `memory.max` finds little to do, and then
/// `memory.high` takes its own value back.
pub fn restore(system: &mut dyn System) -> Result<()> {
    let record = load(system)?;
    let mut failed = Vec::new();
    for entry in record.lifted.iter().rev() {
        let dir = Path::new(ROOT).join(&entry.cgroup);
        if !system.exists(&dir.join("memory.max")) {
            info!("{}: gone since suspend; nothing to put back", entry.cgroup);
            continue;
        }
        match put_back(system, &dir, entry) {
            Ok(()) => info!(
                "{}: memory.max {} and memory.high {} put back",
                entry.cgroup, entry.max, entry.high
            ),
            Err(err) => {
                warn!("{}: cannot put its limits back: {err:#}", entry.cgroup);
                failed.push(entry.cgroup.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "could not put back the memory limits of {} (recorded in {})",
            failed.join(", "),
            record_path().display()
        );
    }
    system.remove_file(&record_path())?;
    Ok(())
}

/// How far each write of `memory.high` lowers it on the way down to a
/// limit far below what the cgroup holds. The kernel reclaims to the new
/// value in the writer, counting pages as gone only once their swap-out
/// has completed, so one write far below starts the swap-out of far more
/// than is over: in the guest, a cgroup of 224 MiB put back to 80 MiB had
/// 169–207 MiB pushed to swap by one write, 147–155 MiB in steps of 4, 8
/// or 16 MiB (2026-12-05). Pages pushed out for nothing are swap I/O for
/// nothing, and fill a compressed area.
const HIGH_STEP: u64 = 16 << 20;

/// One cgroup's limits back, `memory.high` at the limit first (see
/// [`restore`]), lowered to it in steps of [`HIGH_STEP`]; then its own
/// value, also in steps where that is lower still (a cgroup held by
/// `memory.high` alone, as systemd's `MemoryHigh=` sets).
fn put_back(system: &mut dyn System, dir: &Path, entry: &Lifted) -> Result<()> {
    let current = |system: &dyn System| -> Option<u64> {
        read(system, &dir.join("memory.current"))
            .ok()
            .and_then(|c| c.parse().ok())
    };
    if let Ok(limit) = entry.max.parse::<u64>() {
        let from = current(system);
        lower_high(system, dir, from, limit)?;
        system.write_attribute(&dir.join("memory.high"), &entry.max)?;
        if let Some(current) = current(system).filter(|&current| current > limit) {
            bail!(
                "it holds {} over its memory.max of {}, with nowhere to swap it: the limit \
                 stays lifted (memory.high holds it there meanwhile) until a later try, \
                 so that no process of it is OOM-killed",
                vramswap::ByteSize(current - limit),
                vramswap::ByteSize(limit)
            );
        }
    }
    system.write_attribute(&dir.join("memory.max"), &entry.max)?;
    if let Ok(high) = entry.high.parse::<u64>() {
        let from = current(system);
        lower_high(system, dir, from, high)?;
    }
    system.write_attribute(&dir.join("memory.high"), &entry.high)?;
    Ok(())
}

/// Lowers `memory.high` from `from` (what the cgroup holds; unknown: no
/// step) in steps of [`HIGH_STEP`] until one more step would reach `to`.
fn lower_high(system: &mut dyn System, dir: &Path, from: Option<u64>, to: u64) -> Result<()> {
    let mut high = from.unwrap_or(to);
    while high > to.saturating_add(HIGH_STEP) {
        high -= HIGH_STEP;
        system.write_attribute(&dir.join("memory.high"), &high.to_string())?;
    }
    Ok(())
}

fn load(system: &dyn System) -> Result<Record> {
    let path = record_path();
    match system.read(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a vramswap record of cgroup limits", path.display())),
        Err(_) => Ok(Record::default()),
    }
}

/// Every cgroup below `dir` with a memory controller, parents first, as
/// paths relative to [`ROOT`].
fn walk(system: &dyn System, dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let Ok(names) = system.list(dir) else {
        return Ok(found);
    };
    for name in names {
        let child = dir.join(&name);
        if !system.exists(&child.join("cgroup.procs")) {
            continue;
        }
        if system.exists(&child.join("memory.max")) {
            let relative = child.strip_prefix(ROOT).unwrap_or(&child);
            found.push(relative.to_string_lossy().into_owned());
        }
        found.extend(walk(system, &child)?);
    }
    Ok(found)
}

/// A cgroup's limits as they are, with the bytes it would hold once its
/// swapped-out pages are back, where that is more than its `memory.max`
/// or `memory.high` allows.
fn tight(system: &dyn System, cgroup: String) -> Option<(Lifted, u64)> {
    let dir = Path::new(ROOT).join(&cgroup);
    let value = |file: &str| read(system, &dir.join(file)).ok();
    let number = |file: &str| -> Option<u64> { value(file)?.parse().ok() };
    let swapped = number("memory.swap.current")?;
    if swapped == 0 {
        return None;
    }
    let need = number("memory.current")? + swapped;
    let limits = Lifted {
        max: value("memory.max")?,
        high: value("memory.high")?,
        cgroup,
    };
    // "max" parses as no number: no limit.
    let lowest = [&limits.max, &limits.high]
        .into_iter()
        .filter_map(|limit| limit.parse::<u64>().ok())
        .min()?;
    (need > lowest).then_some((limits, need))
}

fn read(system: &dyn System, path: &Path) -> Result<String> {
    Ok(system
        .read(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}

/// Cgroup trees for tests of what meets them (here and `sleep.rs`).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::system::fake::FakeSystem;

    /// A cgroup at `path` below the root: RAM and swap in use, its limits.
    pub(crate) fn cgroup(
        system: &FakeSystem,
        path: &str,
        current: u64,
        swap: u64,
        max: &str,
        high: &str,
    ) {
        let dir = format!("{ROOT}/{path}");
        system.fixture(&format!("{dir}/cgroup.procs"), "");
        system.fixture(&format!("{dir}/memory.current"), &format!("{current}\n"));
        system.fixture(&format!("{dir}/memory.swap.current"), &format!("{swap}\n"));
        system.fixture(&format!("{dir}/memory.max"), &format!("{max}\n"));
        system.fixture(&format!("{dir}/memory.high"), &format!("{high}\n"));
    }

    /// `hog.scope`, at its 128 MiB limit with 100 MiB in swap; returns its
    /// `memory.max` and `memory.high` as they are when called.
    pub(crate) fn tight_cgroup(system: &FakeSystem) -> impl Fn(&FakeSystem) -> (String, String) {
        cgroup(
            system,
            "hog.scope",
            128 << 20,
            100 << 20,
            "134217728",
            "max",
        );
        |system| limits(system, "hog.scope")
    }

    /// `memory.max` and `memory.high` of the cgroup at `path`, as they are.
    pub(crate) fn limits(system: &FakeSystem, path: &str) -> (String, String) {
        let dir = Path::new(ROOT).join(path);
        (
            read(system, &dir.join("memory.max")).unwrap(),
            read(system, &dir.join("memory.high")).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{cgroup, limits};
    use super::*;
    use crate::system::fake::{Call, FakeSystem};

    const MIB: u64 = 1 << 20;

    /// Runs [`restore`], counting its writes of the `memory.high` of the
    /// cgroup at `path`.
    fn restore_counting_high(system: &mut FakeSystem, path: &str) -> (Result<()>, usize) {
        let calls = system.calls.len();
        let result = restore(system);
        let high = Call::Write(Path::new(ROOT).join(path).join("memory.high"));
        let writes = system.calls[calls..].iter().filter(|c| **c == high).count();
        (result, writes)
    }

    /// What the cgroup at `path` holds now, as the kernel would say.
    fn holds(system: &mut FakeSystem, path: &str, bytes: u64) {
        let file = Path::new(ROOT).join(path).join("memory.current");
        system.write(&file, &bytes.to_string(), 0o644).unwrap();
    }

    /// A systemd-like tree: a slice at its MemoryMax with a service that
    /// has 100 MiB swapped out, a roomy service, one with nothing in swap,
    /// one held by memory.high alone, and the root's own files.
    fn machine() -> FakeSystem {
        let system = FakeSystem::new();
        system.fixture(&format!("{ROOT}/cgroup.procs"), "1\n");
        system.fixture(&format!("{ROOT}/memory.stat"), "");
        let m = |n: u64| (n * MIB).to_string();
        cgroup(&system, "work.slice", 128 * MIB, 100 * MIB, &m(160), "max");
        cgroup(
            &system,
            "work.slice/hog.service",
            128 * MIB,
            100 * MIB,
            &m(128),
            "max",
        );
        cgroup(&system, "work.slice/idle.service", 0, 0, &m(16), "max");
        cgroup(
            &system,
            "roomy.service",
            10 * MIB,
            20 * MIB,
            &m(1024),
            "max",
        );
        cgroup(&system, "soft.service", 50 * MIB, 30 * MIB, "max", &m(64));
        cgroup(&system, "nothing-out.service", 64 * MIB, 0, &m(64), "max");
        system
    }

    #[test]
    fn the_cgroups_that_cannot_take_their_pages_back_are_lifted_and_put_back() {
        let mut system = machine();
        let lifted = lift(&mut system, "suspend").unwrap();
        let names: Vec<&str> = lifted.iter().map(|l| l.cgroup.as_str()).collect();
        // Parents first; the roomy one, and those with nothing in swap, alone.
        assert_eq!(
            names,
            ["soft.service", "work.slice", "work.slice/hog.service"]
        );
        for name in &names {
            assert_eq!(
                limits(&system, name),
                ("max".into(), "max".into()),
                "{name}"
            );
        }
        assert_eq!(limits(&system, "roomy.service").0, (1024 * MIB).to_string());
        assert_eq!(
            limits(&system, "work.slice/idle.service").0,
            (16 * MIB).to_string()
        );
        assert!(pending(&system));

        restore(&mut system).unwrap();
        assert_eq!(
            limits(&system, "work.slice/hog.service"),
            ((128 * MIB).to_string(), "max".into())
        );
        assert_eq!(
            limits(&system, "work.slice"),
            ((160 * MIB).to_string(), "max".into())
        );
        assert_eq!(
            limits(&system, "soft.service"),
            ("max".into(), (64 * MIB).to_string())
        );
        assert!(!pending(&system));
    }

    #[test]
    fn a_second_lift_before_a_restore_keeps_the_values_from_before_the_first() {
        let mut system = machine();
        lift(&mut system, "suspend").unwrap();
        // Suspend ran again before any resume (it crashed, and runs anew):
        // the limits read now are the lifted ones; the record keeps the old.
        lift(&mut system, "suspend").unwrap();
        restore(&mut system).unwrap();
        assert_eq!(
            limits(&system, "work.slice/hog.service").0,
            (128 * MIB).to_string()
        );
    }

    #[test]
    fn a_cgroup_still_over_its_limit_keeps_it_lifted_and_memory_high_holds_it() {
        let mut system = machine();
        lift(&mut system, "suspend").unwrap();
        // Its pages came back and had nowhere to go out again.
        holds(&mut system, "work.slice/hog.service", 200 * MIB);
        let (result, steps) = restore_counting_high(&mut system, "work.slice/hog.service");
        let err = result.unwrap_err().to_string();
        assert!(err.contains("work.slice/hog.service"), "{err}");
        // memory.high came down in steps: 184, 168, 152, 136 MiB, then
        // the limit of 128.
        assert_eq!(steps, 5);
        // memory.high at the limit, memory.max still lifted: no OOM kill.
        assert_eq!(
            limits(&system, "work.slice/hog.service"),
            ("max".into(), (128 * MIB).to_string())
        );
        // The others are back, and the record waits for the next try.
        assert_eq!(limits(&system, "soft.service").1, (64 * MIB).to_string());
        assert!(pending(&system));
        holds(&mut system, "work.slice/hog.service", 100 * MIB);
        restore(&mut system).unwrap();
        assert_eq!(
            limits(&system, "work.slice/hog.service"),
            ((128 * MIB).to_string(), "max".into())
        );
        assert!(!pending(&system));
    }

    #[test]
    fn a_cgroup_held_by_memory_high_alone_comes_down_to_it_in_steps() {
        let mut system = machine();
        lift(&mut system, "suspend").unwrap();
        // Its 30 MiB came back on top of the 170 it held: 200 MiB, where
        // its memory.high is 64.
        holds(&mut system, "soft.service", 200 * MIB);
        let (result, steps) = restore_counting_high(&mut system, "soft.service");
        result.unwrap();
        // 184, 168, … 72 MiB, then 64: one write far below would push
        // far more than is over out to swap.
        assert_eq!(steps, 9);
        assert_eq!(
            limits(&system, "soft.service"),
            ("max".into(), (64 * MIB).to_string())
        );
        assert!(!pending(&system));
    }

    #[test]
    fn a_cgroup_gone_since_suspend_is_skipped_and_nothing_to_do_is_fine() {
        let mut system = machine();
        lift(&mut system, "suspend").unwrap();
        system
            .remove_dir_all(&Path::new(ROOT).join("soft.service"))
            .unwrap();
        restore(&mut system).unwrap();
        assert!(!pending(&system));
        // No record, no cgroup file system: nothing to do either way.
        let mut bare = FakeSystem::new();
        assert!(lift(&mut bare, "suspend").unwrap().is_empty());
        restore(&mut bare).unwrap();
    }
}
