//! `vramswap elastic NAME`: the watcher of an elastic area. `start
//! --elastic` runs it in the background; it ends when the area is stopped
//! (`stop` sends it SIGTERM and waits for the step in hand to finish) or
//! when its instance is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};
use vramswap::backend::{BackendKind, DeviceSelector};
use vramswap::budget::{self, FileBudget, VramBudget};
use vramswap::ByteSize;

use super::policy::{Action, Policy, SliceNow};
use super::{Layout, Slice};
use crate::state::{InstanceDir, State};
use crate::system::{under, Cmd, System};

/// How often the watcher reads the free VRAM.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long `stop` waits for the watcher to finish the step in hand (a
/// swapoff can take minutes) before it kills it.
const STOP_GRACE: Duration = Duration::from_secs(600);

/// What the watcher did last, in `elastic.json`, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    /// Where free VRAM is read from.
    pub source: String,
    /// The last reading, in bytes.
    pub free: Option<u64>,
    /// Why the last reading failed, if it did.
    pub budget_error: Option<String>,
    /// Seconds since the Unix epoch of the last tick.
    pub updated: u64,
    /// `--stand-in-swap`: which slices the watcher holds online.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stand_in_online: Vec<bool>,
    pub last_yield: Option<Event>,
    pub last_return: Option<Event>,
    pub last_failure: Option<Event>,
}

/// A slice given back, taken again, or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub slice: String,
    pub reason: String,
    /// How long the step took.
    pub seconds: f64,
}

impl Record {
    pub fn load(system: &dyn System, instance: &InstanceDir) -> Option<Record> {
        serde_json::from_str(&system.read(&instance.elastic()).ok()?).ok()
    }
}

/// The watcher's command line, as the `start` step runs it.
pub fn command(name: &str) -> Cmd {
    let exe = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "vramswap".into());
    Cmd::new(exe).arg("elastic").arg(name).new_session()
}

/// The block device of a slice: the kernel's /dev/dm-N where it has the
/// mapping (devtmpfs makes that node; /dev/mapper/NAME needs udev or
/// libdevmapper's own fallback, which dmsetup leaves to udev), else
/// /dev/mapper/NAME, as a dry run shows it.
pub fn device(system: &dyn System, slice: &Slice) -> String {
    crate::nbd::mapper_paths(system, &slice.mapping)
        .pop()
        .unwrap_or_else(|| slice.path())
}

/// Whether the kernel has the slice's device-mapper table (its
/// /dev/mapper node may be left over where no udev removes it).
pub fn is_mapped(system: &dyn System, slice: &Slice) -> bool {
    crate::nbd::mapper_paths(system, &slice.mapping).len() > 1
}

/// Removes the slices' device-mapper tables (the swap on them is off).
pub fn remove_mappings(system: &mut dyn System, layout: &Layout) -> Result<()> {
    for slice in layout.slices.iter().rev() {
        if is_mapped(system, slice) {
            let out = system.run(&Cmd::new("dmsetup").args(["remove", &slice.mapping]))?;
            if !out.success() {
                bail!("dmsetup remove {} failed: {}", slice.mapping, out.reason());
            }
        }
    }
    Ok(())
}

/// Ends the watcher of `instance`, if one runs: SIGTERM, then waits for
/// it to finish the step in hand.
pub fn stop_watcher(system: &mut dyn System, instance: &InstanceDir) -> Result<()> {
    match Record::load(system, instance) {
        Some(record) if record.pid != 0 => crate::stop::terminate(
            system,
            record.pid,
            STOP_GRACE,
            "(the elastic watcher, in a swapoff)",
        ),
        _ => Ok(()),
    }
}

/// Ends the watcher of every elastic area. Suspend and stop do so before
/// they lift cgroup limits: a watcher in a yield of its own lifts and puts
/// back limits too, and would put back those their swapoffs need.
pub fn stop_watchers(system: &mut dyn System) -> Result<()> {
    for name in crate::state::instances(system)? {
        let instance = InstanceDir::new(&name)?;
        if State::load(system, &instance).is_ok_and(|s| s.elastic.is_some()) {
            stop_watcher(system, &instance)?;
        }
    }
    Ok(())
}

/// Starts the watcher again of every elastic area that has none running
/// (suspend and stop end them all first, and start them again for the
/// areas still up).
pub fn restart_watchers(system: &mut dyn System) {
    for name in crate::state::instances(system).unwrap_or_default() {
        let Ok(instance) = InstanceDir::new(&name) else {
            continue;
        };
        let elastic = State::load(system, &instance).is_ok_and(|s| s.elastic.is_some());
        let running = Record::load(system, &instance).is_some_and(|r| system.alive(r.pid));
        if elastic && !running {
            if let Err(err) = system.spawn(&command(&name), &instance.dir.join("elastic.log")) {
                error!("elastic '{name}': cannot start its watcher again: {err}");
            }
        }
    }
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Relaxed);
}

/// Runs the watcher of area `name` until it is stopped.
pub fn run(system: &mut dyn System, name: &str, stand_in: bool) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe; nothing else handles SIGTERM in this process.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let mut watcher = Watcher::open(system, name, stand_in)?;
    info!(
        "elastic '{name}': {} slices, headroom {}, settle {} s, free VRAM from {}{}",
        watcher.layout.slices.len(),
        ByteSize(watcher.layout.headroom),
        watcher.layout.settle,
        watcher.record.source,
        if stand_in {
            "; stand-in: swapoff, mkswap and swapon are not run"
        } else {
            ""
        }
    );
    let start = Instant::now();
    while !TERM.load(Ordering::Relaxed) {
        if !watcher.tick(system, start.elapsed())? {
            info!("elastic '{name}': the area is gone, the watcher ends");
            return Ok(());
        }
        let mut slept = Duration::ZERO;
        while slept < INTERVAL && !TERM.load(Ordering::Relaxed) {
            system.sleep(Duration::from_millis(100));
            slept += Duration::from_millis(100);
        }
    }
    info!("elastic '{name}': stopped");
    Ok(())
}

/// The watcher of one elastic area.
pub struct Watcher {
    instance: InstanceDir,
    state: State,
    layout: Layout,
    budget: Box<dyn VramBudget>,
    policy: Policy,
    record: Record,
    stand_in: bool,
    /// When to try again to put back cgroup limits a yield lifted and
    /// could not put back (their pages had nowhere to go yet).
    next_restore: Duration,
}

impl Watcher {
    pub fn open(system: &mut dyn System, name: &str, stand_in: bool) -> Result<Watcher> {
        let instance = InstanceDir::new(name)?;
        let state = State::load(system, &instance)?;
        let layout = state
            .elastic
            .clone()
            .ok_or_else(|| anyhow!("'{name}' is not an elastic area (see start --elastic)"))?;
        let budget: Box<dyn VramBudget> = match &layout.budget_file {
            Some(file) => Box::new(FileBudget::new(under(system.root(), file))),
            None => {
                let kind: BackendKind = state.backend.parse()?;
                let uuid = match state.device_uuid.parse()? {
                    DeviceSelector::Uuid(uuid) => uuid,
                    _ => bail!("{}: no GPU UUID recorded", instance.state().display()),
                };
                budget::open(kind, &uuid)?
            }
        };
        let mut record = Record::load(system, &instance).unwrap_or_default();
        record.pid = std::process::id();
        record.source = budget.source();
        if stand_in && record.stand_in_online.len() != layout.slices.len() {
            record.stand_in_online = vec![true; layout.slices.len()];
        }
        let policy = Policy::new(layout.headroom, Duration::from_secs(layout.settle));
        let watcher = Watcher {
            instance,
            state,
            layout,
            budget,
            policy,
            record,
            stand_in,
            next_restore: Duration::ZERO,
        };
        watcher.save(system)?;
        Ok(watcher)
    }

    fn save(&self, system: &mut dyn System) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.record)? + "\n";
        system
            .write(&self.instance.elastic(), &text, 0o600)
            .with_context(|| format!("write {}", self.instance.elastic().display()))
    }

    /// Each slice: online (its swap area active) and how much it holds.
    fn slices_now(&self, system: &dyn System) -> Vec<SliceNow> {
        self.layout
            .slices
            .iter()
            .enumerate()
            .map(|(i, slice)| match self.stand_in {
                true => SliceNow {
                    size: slice.size,
                    online: self.record.stand_in_online[i],
                    used: 0,
                },
                false => {
                    let area = active_area(system, slice);
                    SliceNow {
                        size: slice.size,
                        online: area.is_some(),
                        used: area.map_or(0, |(_, a)| a.used_kib << 10),
                    }
                }
            })
            .collect()
    }

    /// One look at the free VRAM, and the step it calls for. `false` when
    /// the area is gone and the watcher should end.
    pub fn tick(&mut self, system: &mut dyn System, now: Duration) -> Result<bool> {
        if !system.exists(&self.instance.state()) {
            return Ok(false);
        }
        // Suspend stops the area, and resume starts it (and a watcher)
        // again: nothing to do in between.
        if crate::sleep::resume_pending(system) {
            return Ok(true);
        }
        let free = match self.budget.free() {
            Ok(free) => free,
            Err(err) => {
                let why = err.to_string();
                if self.record.budget_error.as_deref() != Some(why.as_str()) {
                    error!(
                        "elastic '{}': cannot read the free VRAM: {why}; slices stay as they are",
                        self.instance.name
                    );
                }
                self.record.budget_error = Some(why);
                self.save(system)?;
                return Ok(true);
            }
        };
        self.record.budget_error = None;
        self.record.free = Some(free);
        if now >= self.next_restore && crate::cgroups::pending(system) {
            self.put_back_limits(system, now);
        }
        let slices = self.slices_now(system);
        match self.policy.decide(now, free, &slices) {
            Action::Yield { slice, reason } => {
                let started = Instant::now();
                let result = self.give_back(system, slice, slices[slice].used, now);
                self.settle_step(result, slice, reason, started, true, now);
            }
            Action::Return { slice, reason } => {
                let started = Instant::now();
                let result = self.take_again(system, slice);
                self.settle_step(result, slice, reason, started, false, now);
            }
            Action::Wait => {}
        }
        self.record.updated = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.save(system)?;
        Ok(true)
    }

    /// Logs and records how a step ended.
    fn settle_step(
        &mut self,
        result: Result<()>,
        i: usize,
        reason: String,
        started: Instant,
        yielding: bool,
        now: Duration,
    ) {
        let slice = &self.layout.slices[i];
        let name = &self.instance.name;
        let seconds = started.elapsed().as_secs_f64();
        let event = |reason: String| Event {
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            slice: slice.mapping.clone(),
            reason,
            seconds,
        };
        match (result, yielding) {
            (Ok(()), true) => {
                warn!(
                    "elastic '{name}': gave {} back ({} offline, {seconds:.1} s): {reason}",
                    ByteSize(slice.size),
                    slice.mapping
                );
                if self.stand_in {
                    self.record.stand_in_online[i] = false;
                }
                self.record.last_yield = Some(event(reason));
            }
            (Ok(()), false) => {
                warn!(
                    "elastic '{name}': took {} again ({} online, priority {}): {reason}",
                    ByteSize(slice.size),
                    slice.mapping,
                    slice.priority
                );
                if self.stand_in {
                    self.record.stand_in_online[i] = true;
                }
                self.record.last_return = Some(event(reason));
            }
            (Err(err), yielding) => {
                let what = if yielding {
                    format!("{} stays online: {err:#}", slice.mapping)
                } else {
                    format!("{} stays offline: {err:#}", slice.mapping)
                };
                error!("elastic '{name}': {what} (wanted because {reason})");
                if yielding {
                    self.policy.failed(now);
                }
                self.record.last_failure = Some(event(what));
            }
        }
    }

    /// Puts back the cgroup limits a yield lifted; those whose pages
    /// still have nowhere to go stay lifted until a later try.
    fn put_back_limits(&mut self, system: &mut dyn System, now: Duration) {
        if let Err(err) = crate::cgroups::restore(system) {
            warn!("elastic '{}': {err:#}", self.instance.name);
            self.next_restore = now + Duration::from_secs(self.layout.settle);
        }
    }

    /// Swaps slice `i` off, then discards its range so the server gives
    /// the chunks behind it back to the GPU. swapoff charges each page
    /// back to its memory cgroup: the limits that would make that an OOM
    /// kill are lifted first, as suspend does, and put back after.
    fn give_back(
        &mut self,
        system: &mut dyn System,
        i: usize,
        used: u64,
        now: Duration,
    ) -> Result<()> {
        let slice = self.layout.slices[i].clone();
        if self.stand_in {
            info!("stand-in: swapoff {} not run", slice.path());
        } else {
            let (path, _) = active_area(system, &slice)
                .ok_or_else(|| anyhow!("{} is not an active swap area", slice.path()))?;
            let purpose = format!("elastic '{}'", self.instance.name);
            crate::cgroups::lift(system, &purpose)
                .context("cannot lift the memory limits that the swapoff would meet")?;
            let off = crate::stop::swapoff(system, &path, used >> 10);
            self.put_back_limits(system, now);
            off?;
        }
        if let Err(err) = system.discard(&self.state.socket, slice.offset, slice.size) {
            // Off is off: the kernel puts nothing there any more. The VRAM
            // goes back with the next discard of the range, or at stop.
            warn!(
                "elastic '{}': {} is off, but its VRAM could not be given back: {err}",
                self.instance.name, slice.mapping
            );
        }
        Ok(())
    }

    /// Makes slice `i` a swap area again.
    fn take_again(&mut self, system: &mut dyn System, i: usize) -> Result<()> {
        let slice = &self.layout.slices[i];
        let discard = self.state.settings.discard != Some(false);
        let device = device(system, slice);
        for cmd in [
            crate::nbd::mkswap_command(&slice.mapping, &device),
            crate::nbd::swapon_command(slice.priority, &device, discard),
        ] {
            if self.stand_in {
                info!("stand-in: {cmd} not run");
                continue;
            }
            let out = system.run(&cmd)?;
            if !out.success() {
                bail!("{cmd}: {}", out.reason());
            }
        }
        Ok(())
    }
}

/// The slice's active swap area and the path /proc/swaps lists it under.
fn active_area(system: &dyn System, slice: &Slice) -> Option<(String, crate::nbd::SwapArea)> {
    crate::nbd::mapper_paths(system, &slice.mapping)
        .into_iter()
        .find_map(|path| crate::nbd::swap_area(system, &path).map(|a| (path, a)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::elastic::{layout, ElasticOptions};
    use crate::system::fake::{Call, FakeSystem};

    const M: u64 = 1 << 20;

    /// Area 'el': four 64 MiB slices on /dev/dm-0..3, all swapping, the
    /// budget read from /budget.
    fn machine(budget: &str) -> FakeSystem {
        let system = FakeSystem::new();
        let options = ElasticOptions {
            slices: Some(4),
            headroom: 512 * M,
            settle: Duration::from_secs(30),
            budget_file: Some("/budget".into()),
        };
        let state = State {
            elastic: Some(layout("el", 256 * M, 50, &options).unwrap()),
            ..crate::state::test_state("el", "/dev/nbd0", 4321)
        };
        system.fixture("/run/vramswap/el/state.json", &state.to_json());
        for i in 0..4 {
            system.fixture(
                &format!("/sys/block/dm-{i}/dm/name"),
                &format!("vramswap-el-s{i}\n"),
            );
        }
        system.fixture("/budget", budget);
        swaps(&system, &[Some(60), Some(60), Some(9), Some(2)]);
        system
    }

    /// /proc/swaps with the slices that are on, each using KIB.
    fn swaps(system: &FakeSystem, used_mib: &[Option<u64>]) {
        let mut text = "Filename Type Size Used Priority\n".to_string();
        for (i, used) in used_mib.iter().enumerate() {
            if let Some(used) = used {
                text += &format!("/dev/dm-{i} partition 65532 {} {}\n", used << 10, 50 - i);
            }
        }
        system.fixture("/proc/swaps", &text);
    }

    fn record(system: &FakeSystem) -> Record {
        Record::load(system, &InstanceDir::new("el").unwrap()).unwrap()
    }

    #[test]
    fn under_the_headroom_slices_go_emptiest_first_and_their_range_is_discarded() {
        let mut system = machine("100M");
        let mut watcher = Watcher::open(&mut system, "el", false).unwrap();
        assert_eq!(record(&system).source, watcher.budget.source());
        assert!(watcher.tick(&mut system, Duration::ZERO).unwrap());
        assert_eq!(system.ran(), ["swapoff /dev/dm-3"]);
        assert!(system.calls.contains(&Call::Discard(
            "/run/vramswap/el/nbd.sock".into(),
            192 * M,
            64 * M
        )));
        let r = record(&system);
        assert_eq!(r.last_yield.as_ref().unwrap().slice, "vramswap-el-s3");
        assert_eq!(r.free, Some(100 * M));
        // Slice 3 is off now; the next emptiest is 2.
        swaps(&system, &[Some(60), Some(60), Some(9), None]);
        watcher.tick(&mut system, Duration::from_secs(1)).unwrap();
        assert_eq!(system.ran().last().unwrap(), "swapoff /dev/dm-2");
    }

    #[test]
    fn a_cgroup_at_its_limit_is_lifted_for_the_swapoff_and_put_back_after() {
        let mut system = machine("100M");
        system.fixture("/sys/fs/cgroup/cgroup.procs", "1\n");
        crate::cgroups::fixtures::cgroup(
            &system,
            "hog",
            24 * M,
            40 * M,
            &(24 * M).to_string(),
            "max",
        );
        let mut watcher = Watcher::open(&mut system, "el", false).unwrap();
        watcher.tick(&mut system, Duration::ZERO).unwrap();
        let max = Path::new("/sys/fs/cgroup/hog/memory.max");
        let writes: Vec<usize> = (0..system.calls.len())
            .filter(|&i| matches!(&system.calls[i], Call::Write(p) if p == max))
            .collect();
        let swapoff = system
            .calls
            .iter()
            .position(|c| matches!(c, Call::Run(l) if l.starts_with("swapoff")))
            .unwrap();
        assert!(
            writes.len() == 2 && writes[0] < swapoff && swapoff < writes[1],
            "{:?}",
            system.calls
        );
        assert_eq!(
            crate::cgroups::fixtures::limits(&system, "hog"),
            ((24 * M).to_string(), "max".into())
        );
        assert!(!crate::cgroups::pending(&system));
    }

    #[test]
    fn a_swapoff_that_fails_leaves_the_slice_online_and_waits_settle() {
        let mut system = machine("100M");
        system.answer(
            "swapoff /dev/dm-3",
            255,
            "",
            "swapoff: /dev/dm-3: swapoff failed: Cannot allocate memory\n",
        );
        let mut watcher = Watcher::open(&mut system, "el", false).unwrap();
        watcher.tick(&mut system, Duration::ZERO).unwrap();
        assert!(!system.calls.iter().any(|c| matches!(c, Call::Discard(..))));
        let failure = record(&system).last_failure.unwrap();
        assert!(
            failure
                .reason
                .starts_with("vramswap-el-s3 stays online: swapoff /dev/dm-3 failed"),
            "{}",
            failure.reason
        );
        assert!(record(&system).last_yield.is_none());
        watcher.tick(&mut system, Duration::from_secs(10)).unwrap();
        assert_eq!(system.ran().len(), 1, "{:?}", system.ran());
        watcher.tick(&mut system, Duration::from_secs(31)).unwrap();
        assert_eq!(system.ran().len(), 2);
    }

    #[test]
    fn slices_return_highest_priority_first_after_settle() {
        let mut system = machine("4G");
        swaps(&system, &[Some(60), None, None, None]);
        let mut watcher = Watcher::open(&mut system, "el", false).unwrap();
        watcher.tick(&mut system, Duration::ZERO).unwrap();
        watcher.tick(&mut system, Duration::from_secs(29)).unwrap();
        assert!(system.ran().is_empty());
        watcher.tick(&mut system, Duration::from_secs(30)).unwrap();
        assert_eq!(
            system.ran(),
            [
                "mkswap -L vramswap-el-s1 /dev/dm-1",
                "swapon --priority 49 --discard /dev/dm-1"
            ]
        );
        assert_eq!(record(&system).last_return.unwrap().slice, "vramswap-el-s1");
    }

    #[test]
    fn an_unreadable_budget_changes_nothing_and_a_stopped_area_ends_the_watcher() {
        let mut system = machine("lots");
        let mut watcher = Watcher::open(&mut system, "el", false).unwrap();
        assert!(watcher.tick(&mut system, Duration::ZERO).unwrap());
        assert!(system.ran().is_empty());
        assert!(record(&system).budget_error.unwrap().contains("/budget"));
        system
            .remove_dir_all(Path::new("/run/vramswap/el"))
            .unwrap();
        assert!(!watcher.tick(&mut system, Duration::from_secs(1)).unwrap());
    }

    #[test]
    fn stand_in_runs_no_swap_commands_but_discards() {
        let mut system = machine("100M");
        let mut watcher = Watcher::open(&mut system, "el", true).unwrap();
        watcher.tick(&mut system, Duration::ZERO).unwrap();
        assert!(system.ran().is_empty());
        assert!(system
            .calls
            .iter()
            .any(|c| matches!(c, Call::Discard(_, offset, _) if *offset == 192 * M)));
        assert_eq!(record(&system).stand_in_online, [true, true, true, false]);
    }

    #[test]
    fn stop_ends_the_watcher_it_finds_in_the_record() {
        let mut system = machine("4G");
        system.alive.insert(7000, true);
        let rec = Record {
            pid: 7000,
            ..Default::default()
        };
        system.fixture(
            "/run/vramswap/el/elastic.json",
            &serde_json::to_string(&rec).unwrap(),
        );
        stop_watcher(&mut system, &InstanceDir::new("el").unwrap()).unwrap();
        assert_eq!(system.calls, [Call::Signal(7000, libc::SIGTERM)]);
    }
}
