//! `vramswap status`: is each instance's server alive, its NBD device
//! attached and its swap area active? Non-zero exit when one is not.

use anyhow::{bail, Result};
use serde::Serialize;
use vramswap::ByteSize;

use crate::elastic::watch::Record;
use crate::nbd;
use crate::state::{self, InstanceDir, State};
use crate::system::System;

/// The page the kernel swaps, and a compressed store packs, one at a time.
const PAGE: u64 = 4096;

#[derive(Debug, Serialize, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    /// The group of GPUs this instance is one of (`start --device all`).
    pub group: Option<String>,
    /// The dm-crypt mapping swap runs on (`start --encrypt`).
    pub crypt: Option<String>,
    pub healthy: bool,
    /// What is wrong, one phrase each.
    pub problems: Vec<String>,
    pub nbd_device: Option<String>,
    pub backend: Option<String>,
    pub gpu: Option<String>,
    pub gpu_uuid: Option<String>,
    pub size: Option<u64>,
    pub pid: Option<u32>,
    pub server_alive: bool,
    pub nbd_attached: bool,
    pub swap_active: bool,
    pub swap_used: Option<u64>,
    pub priority: Option<i32>,
    /// What the server reports about itself (failed requests, a lost
    /// device), when it has written its status file.
    pub server: Option<serde_json::Value>,
    /// A compressed area: the bytes of pages it still holds whose swap
    /// slots the kernel has freed (its pages less the kernel's used swap).
    /// Linux tells a swap device of freed slots only by discarding whole
    /// free 1 MiB clusters (zram alone hears of each slot), so these keep
    /// their VRAM until the kernel writes the slot again or its cluster
    /// empties.
    pub stale_bytes: Option<u64>,
    /// A compressed area: about how many bytes of pages its VRAM holds if
    /// pages go on packing as those stored so far did (once they are
    /// [`HOLDS_AFTER`] or more). Less than `size`: the VRAM fills before the
    /// swap area does, and swap-outs then fail with ENOSPC while the kernel
    /// still counts free slots.
    pub holds_bytes: Option<u64>,
    /// An elastic area's slices and watcher (`start --elastic`).
    pub elastic: Option<ElasticStatus>,
}

/// An elastic area: its slices, what it lends now, and its watcher.
#[derive(Debug, Serialize, PartialEq)]
pub struct ElasticStatus {
    pub slices: Vec<SliceStatus>,
    /// The sizes of the online slices: the most VRAM the area may take now.
    pub lent: u64,
    /// VRAM the server holds now (4 MiB chunks with data), as it last said.
    pub held: Option<u64>,
    pub headroom: u64,
    pub settle: u64,
    pub watcher_alive: bool,
    /// What the watcher last read and did (`elastic.json`).
    pub watcher: Option<Record>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SliceStatus {
    pub mapping: String,
    pub size: u64,
    pub priority: i32,
    pub online: bool,
    pub used: u64,
}

pub fn inspect(system: &dyn System, name: &str) -> Result<InstanceStatus> {
    let instance = InstanceDir::new(name)?;
    if !system.exists(&instance.dir) {
        bail!("no instance '{name}'");
    }
    let mut status = InstanceStatus {
        name: name.to_string(),
        group: None,
        crypt: None,
        healthy: false,
        problems: Vec::new(),
        nbd_device: None,
        backend: None,
        gpu: None,
        gpu_uuid: None,
        size: None,
        pid: None,
        server_alive: false,
        nbd_attached: false,
        swap_active: false,
        swap_used: None,
        priority: None,
        server: None,
        stale_bytes: None,
        holds_bytes: None,
        elastic: None,
    };
    let state = match State::load(system, &instance) {
        Ok(state) => state,
        Err(err) => {
            status.problems.push(format!("{err:#}"));
            return Ok(status);
        }
    };
    status.group = state.group.clone();
    status.crypt = state.crypt.clone();
    status.server_alive = system.alive(state.pid);
    status.nbd_attached = nbd::kernel_name(&state.nbd_device)
        .map(|n| nbd::is_attached(system, n))
        .unwrap_or(false);
    let areas = state.swap_areas(system);
    status.swap_active = !areas.is_empty();
    status.swap_used =
        (!areas.is_empty()).then(|| areas.iter().map(|(_, a)| a.used_kib << 10).sum());
    if !status.server_alive {
        status
            .problems
            .push(format!("nbdkit (pid {}) is not running", state.pid));
    }
    if !status.nbd_attached {
        status
            .problems
            .push(format!("{} is not attached", state.nbd_device));
    }
    if let Some(layout) = &state.elastic {
        let elastic = elastic_status(system, &instance, layout);
        if !elastic.watcher_alive {
            status.problems.push(
                "the elastic watcher is not running: slices stay as they are (stop and start \
                 the area to run it again)"
                    .into(),
            );
        }
        status.elastic = Some(elastic);
    } else if !status.swap_active {
        status.problems.push(format!(
            "{} is not an active swap area",
            state.swap_paths(system)[0]
        ));
    }
    if let Some(report) = state::server_report(system, &instance) {
        if let Some(failure) = report["failure"].as_str() {
            status
                .problems
                .push(format!("the server has failed: {failure}"));
        }
        for (key, what) in [
            ("failed_requests", "requests failed (EIO)"),
            ("nospace_requests", "writes found the GPU full (ENOSPC)"),
            ("panics", "internal errors"),
            (
                "checksum_errors",
                "blocks failed their checksum (VRAM corruption; see vramswap memtest)",
            ),
        ] {
            let n = report[key].as_u64().unwrap_or(0);
            if n > 0 {
                status.problems.push(format!("{n} {what}"));
            }
        }
        let compress = &report["compress"];
        if let (Some(used), Some(stored)) = (status.swap_used, compress["pages_stored"].as_u64()) {
            let pages = stored + compress["pages_same"].as_u64().unwrap_or(0);
            // Less the swap header, which mkswap wrote and the kernel does
            // not count as used.
            let held = pages.saturating_sub(1) * PAGE;
            status.stale_bytes = Some(held.saturating_sub(used));
        }
        status.holds_bytes = holds(compress);
        if compress["full"].as_bool() == Some(true) {
            let stale = match status.stale_bytes {
                Some(stale) if stale > 0 => format!(
                    "; {} of its pages are ones the kernel has freed but not discarded: with \
                     ratio= at most the ratio status shows, freed pages cannot fill it",
                    ByteSize(stale)
                ),
                _ => String::new(),
            };
            status.problems.push(format!(
                "its VRAM is full of compressed pages: swap-outs to it fail (ENOSPC) until \
                 pages are freed; a larger size= or a lower ratio= gives room{stale}"
            ));
        }
        if let Some(signal) = report["daemon"]["quit_pending"]["signal"].as_str() {
            status.problems.push(format!(
                "nbdkit got {signal} and holds it back while its clients are connected: \
                 it exits when they disconnect (vramswap stop swaps off first)"
            ));
        }
        status.server = Some(report);
    }
    status.healthy = status.problems.is_empty();
    status.nbd_device = Some(state.nbd_device);
    status.backend = Some(state.backend);
    status.gpu = Some(state.device_name);
    status.gpu_uuid = Some(state.device_uuid);
    status.size = Some(state.size);
    status.pid = Some(state.pid);
    status.priority = Some(state.priority);
    Ok(status)
}

fn elastic_status(
    system: &dyn System,
    instance: &InstanceDir,
    layout: &crate::elastic::Layout,
) -> ElasticStatus {
    let slices: Vec<SliceStatus> = layout
        .slices
        .iter()
        .map(|slice| {
            let area = nbd::mapper_paths(system, &slice.mapping)
                .into_iter()
                .find_map(|path| nbd::swap_area(system, &path));
            SliceStatus {
                mapping: slice.mapping.clone(),
                size: slice.size,
                priority: slice.priority,
                online: area.is_some(),
                used: area.map_or(0, |a| a.used_kib << 10),
            }
        })
        .collect();
    let watcher = Record::load(system, instance);
    let watcher_alive = watcher
        .as_ref()
        .is_some_and(|r| r.pid != 0 && system.alive(r.pid));
    // Under --stand-in-swap the kernel holds no slice: the watcher says.
    let slices = match watcher.as_ref().map(|r| &r.stand_in_online) {
        Some(online) if online.len() == slices.len() => slices
            .into_iter()
            .zip(online)
            .map(|(s, &online)| SliceStatus { online, ..s })
            .collect(),
        _ => slices,
    };
    ElasticStatus {
        lent: slices.iter().filter(|s| s.online).map(|s| s.size).sum(),
        slices,
        held: state::server_report(system, instance).and_then(|r| r["vram_held"].as_u64()),
        headroom: layout.headroom,
        settle: layout.settle,
        watcher_alive,
        watcher,
    }
}

/// An elastic area in a few lines: the slices, what is lent, the watcher.
fn elastic_lines(e: &ElasticStatus) -> Vec<String> {
    let online = e.slices.iter().filter(|s| s.online).count();
    let mut lines = vec![format!(
        "elastic: {online} of {} slices online, {} lent{}, headroom {}, free VRAM {}",
        e.slices.len(),
        ByteSize(e.lent),
        e.held
            .map_or(String::new(), |h| format!(" ({} held)", ByteSize(h))),
        ByteSize(e.headroom),
        e.watcher
            .as_ref()
            .and_then(|w| w.free)
            .map_or("unknown".into(), |f| ByteSize(f).to_string()),
    )];
    lines.push(
        e.slices
            .iter()
            .map(|s| {
                let short = s.mapping.rsplit('-').next().unwrap_or(&s.mapping);
                match s.online {
                    true => format!("{short} on ({} used)", ByteSize(s.used)),
                    false => format!("{short} off"),
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    if let Some(w) = &e.watcher {
        for (what, event) in [
            ("last yield", &w.last_yield),
            ("last return", &w.last_return),
            ("last failure", &w.last_failure),
        ] {
            if let Some(ev) = event {
                lines.push(format!("{what}: {} ({})", ev.slice, ev.reason));
            }
        }
    }
    lines
}

/// Bytes of pages stored before the ratio they pack to is taken to
/// forecast what the VRAM holds: fewer say little of the pages to come.
const HOLDS_AFTER: u64 = 64 << 20;

/// A compressed area's pages (same-filled ones in) and the VRAM they take:
/// the 64 KiB slabs their slots are in, slack of slabs partly used
/// included (a server from before `slab_bytes` was reported: the slots
/// alone). Not the VRAM taken, which an eager area takes whole at start.
fn packed(compress: &serde_json::Value) -> Option<(u64, u64)> {
    let n = |key: &str| compress[key].as_u64();
    let taken = n("slab_bytes").or_else(|| n("slot_bytes"))?;
    Some((n("original_bytes")?, taken)).filter(|&(_, taken)| taken > 0)
}

/// About how many bytes of pages a compressed area's VRAM holds, at the
/// ratio of the pages it stores.
fn holds(compress: &serde_json::Value) -> Option<u64> {
    let budget = compress["budget"].as_u64()?;
    let (original, taken) = packed(compress).filter(|&(original, _)| original >= HOLDS_AFTER)?;
    u64::try_from(u128::from(budget) * u128::from(original) / u128::from(taken)).ok()
}

/// The line under a compressed area whose VRAM, at the ratio its pages
/// pack to, fills before the swap area does.
fn fills_first_line(holds: u64, size: u64) -> Option<String> {
    (holds < size).then(|| {
        format!(
            "at this ratio its VRAM holds about {} of pages, {} % of the {} area: past that, \
             swap-outs fail (ENOSPC) while the kernel counts free slots; a ratio= at most \
             this one keeps the VRAM from filling first",
            ByteSize(holds),
            holds * 100 / size,
            ByteSize(size)
        )
    })
}

/// `compress=`'s counts as zramctl names them: the bytes of the pages
/// written (DATA), compressed (COMPR), and the VRAM they take (TOTAL);
/// and how densely they pack, DATA over the slabs they take (what to hold
/// `ratio=` to).
fn compress_line(report: &serde_json::Value, stale: Option<u64>) -> Option<String> {
    let c = &report["compress"];
    let algorithm = c["algorithm"].as_str()?;
    let n = |key: &str| c[key].as_u64().unwrap_or(0);
    let ratio = match packed(c) {
        Some((original, taken)) => format!("{:.2}", original as f64 / taken as f64),
        None => "-".to_string(),
    };
    let stale = match stale {
        Some(stale) if stale > 0 => format!(
            ", {} of them freed by the kernel, not discarded yet",
            ByteSize(stale)
        ),
        _ => String::new(),
    };
    Some(format!(
        "compress {algorithm}: DATA {} COMPR {} TOTAL {} of {} VRAM (packed {ratio}:1), \
         {} pages stored ({} raw), {} same-filled{stale}",
        ByteSize(n("original_bytes")),
        ByteSize(n("compressed_bytes")),
        ByteSize(n("vram_used")),
        ByteSize(n("budget")),
        n("pages_stored"),
        n("pages_raw"),
        n("pages_same"),
    ))
}

/// Prints the status of the named instances (all when none is named);
/// fails when one is unhealthy or unknown.
pub fn run(system: &dyn System, names: &[String], json: bool) -> Result<()> {
    let names = if names.is_empty() {
        state::instances(system)?
    } else {
        let mut all = Vec::new();
        for name in names {
            all.extend(state::resolve(system, name)?);
        }
        all
    };
    let statuses = names
        .iter()
        .map(|name| inspect(system, name))
        .collect::<Result<Vec<_>>>()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else if statuses.is_empty() {
        println!("no vramswap instances");
    } else {
        println!(
            "{:<12} {:<10} {:<7} {:<28} {:>9} {:>9} {:<6} {:<4} {:<4} HEALTH",
            "NAME", "DEVICE", "BACKEND", "GPU", "SIZE", "USED", "SERVER", "NBD", "SWAP"
        );
        for s in &statuses {
            let yes = |b: bool| if b { "yes" } else { "no" };
            println!(
                "{:<12} {:<10} {:<7} {:<28} {:>9} {:>9} {:<6} {:<4} {:<4} {}",
                s.name,
                s.nbd_device.as_deref().unwrap_or("-"),
                s.backend.as_deref().unwrap_or("-"),
                s.gpu
                    .as_deref()
                    .unwrap_or("-")
                    .chars()
                    .take(28)
                    .collect::<String>(),
                s.size.map_or("-".into(), |b| ByteSize(b).to_string()),
                s.swap_used.map_or("-".into(), |b| ByteSize(b).to_string()),
                if s.server_alive { "up" } else { "down" },
                yes(s.nbd_attached),
                yes(s.swap_active),
                if s.healthy {
                    "ok".to_string()
                } else {
                    s.problems.join("; ")
                }
            );
            if let Some(line) = s
                .server
                .as_ref()
                .and_then(|report| compress_line(report, s.stale_bytes))
            {
                println!("{:<12} {line}", "");
            }
            if let Some(line) = s
                .holds_bytes
                .zip(s.size)
                .and_then(|(holds, size)| fills_first_line(holds, size))
            {
                println!("{:<12} {line}", "");
            }
            for line in s.elastic.iter().flat_map(elastic_lines) {
                println!("{:<12} {line}", "");
            }
        }
    }
    let sick: Vec<&str> = statuses
        .iter()
        .filter(|s| !s.healthy)
        .map(|s| s.name.as_str())
        .collect();
    if !sick.is_empty() {
        bail!("unhealthy: {}", sick.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::FakeSystem;

    fn instance(system: &mut FakeSystem, name: &str, device: &str, pid: u32) {
        let state = State {
            device_uuid: "6d657361-3232-2e33-2e36-000000000000".into(),
            ..crate::state::test_state(name, device, pid)
        };
        system.fixture(
            &format!("/run/vramswap/{name}/state.json"),
            &state.to_json(),
        );
    }

    #[test]
    fn an_elastic_area_shows_its_slices_and_needs_its_watcher() {
        let mut system = FakeSystem::new();
        instance(&mut system, "el", "/dev/nbd0", 10);
        system.alive.insert(10, true);
        system.fixture("/sys/block/nbd0/pid", "1\n");
        let dir = InstanceDir::new("el").unwrap();
        let mut state = State::load(&system, &dir).unwrap();
        let options = crate::elastic::ElasticOptions {
            slices: Some(2),
            headroom: 1 << 30,
            settle: std::time::Duration::from_secs(30),
            budget_file: None,
        };
        state.elastic = Some(crate::elastic::layout("el", 256 << 20, 50, &options).unwrap());
        system.fixture("/run/vramswap/el/state.json", &state.to_json());
        system.fixture("/sys/block/dm-0/dm/name", "vramswap-el-s0\n");
        system.fixture("/sys/block/dm-1/dm/name", "vramswap-el-s1\n");
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/dm-0 partition 131068 2048 50\n",
        );
        let no_watcher = inspect(&system, "el").unwrap();
        assert_eq!(
            no_watcher.problems,
            [
                "the elastic watcher is not running: slices stay as they are (stop and start \
              the area to run it again)"
            ]
        );
        // A slice offline is no problem; the area swaps on the other.
        let record = Record {
            pid: 7000,
            free: Some(3 << 30),
            ..Default::default()
        };
        system.fixture(
            "/run/vramswap/el/elastic.json",
            &serde_json::to_string(&record).unwrap(),
        );
        system.alive.insert(7000, true);
        let status = inspect(&system, "el").unwrap();
        assert!(status.healthy, "{status:?}");
        assert_eq!(status.swap_used, Some(2 << 20));
        let elastic = status.elastic.as_ref().unwrap();
        assert_eq!(
            elastic.slices.iter().map(|s| s.online).collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(elastic.lent, 128 << 20);
        assert_eq!(
            elastic_lines(elastic)[..2],
            [
                "elastic: 1 of 2 slices online, 128 MiB lent, headroom 1 GiB, free VRAM 3 GiB",
                "s0 on (2 MiB used), s1 off"
            ]
        );
    }

    #[test]
    fn healthy_and_broken_instances_from_a_fixture_tree() {
        let mut system = FakeSystem::new();
        instance(&mut system, "good", "/dev/nbd0", 10);
        instance(&mut system, "dead", "/dev/nbd1", 11);
        system.fixture("/run/vramswap/torn/state.json", "{\"vers");
        system.alive.insert(10, true);
        system.fixture("/sys/block/nbd0/pid", "1\n");
        system.fixture("/sys/block/nbd1/pid", "1\n");
        system.fixture(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/nbd0 partition 262140 4096 50\n",
        );

        let good = inspect(&system, "good").unwrap();
        assert!(good.healthy, "{good:?}");
        assert_eq!(good.swap_used, Some(4096 << 10));

        let dead = inspect(&system, "dead").unwrap();
        assert!(!dead.healthy);
        assert_eq!(
            dead.problems,
            [
                "nbdkit (pid 11) is not running",
                "/dev/nbd1 is not an active swap area"
            ]
        );

        let torn = inspect(&system, "torn").unwrap();
        assert!(
            torn.problems[0].contains("not a valid vramswap state file"),
            "{torn:?}"
        );

        let err = run(&system, &[], true).unwrap_err().to_string();
        assert_eq!(err, "unhealthy: dead, torn");

        run(&system, &["good".into()], false).unwrap();

        // A running server that reports failed requests is not healthy.
        system.fixture(
            "/run/vramswap/good/server.json",
            r#"{"failure":"the device was lost","failed_requests":3,"nospace_requests":0,"panics":1,"checksum_errors":2}"#,
        );
        let degraded = inspect(&system, "good").unwrap();
        assert_eq!(
            degraded.problems,
            [
                "the server has failed: the device was lost",
                "3 requests failed (EIO)",
                "1 internal errors",
                "2 blocks failed their checksum (VRAM corruption; see vramswap memtest)"
            ]
        );

        // A storage daemon that holds back a SIGTERM serves on, and says so.
        system.fixture(
            "/run/vramswap/good/server.json",
            r#"{"failure":null,"daemon":{"storage_daemon":true,"connections":4,"quit_pending":{"signal":"SIGTERM","at":1796421350}}}"#,
        );
        let holding = inspect(&system, "good").unwrap();
        assert_eq!(
            holding.problems,
            [
                "nbdkit got SIGTERM and holds it back while its clients are connected: \
              it exits when they disconnect (vramswap stop swaps off first)"
            ]
        );
        // A compressed area counts its pages as zramctl does, and one whose
        // VRAM is full says so.
        let compress = r#""compress":{"algorithm":"lz4","budget":4294967296,"pages_stored":300000,"pages_same":20000,"pages_raw":1000,"original_bytes":1310720000,"compressed_bytes":450000000,"slot_bytes":470000000,"slab_bytes":479985664,"vram_used":490733568,"full_writes":0,"full":false,"corrupt_reads":0}"#;
        system.fixture(
            "/run/vramswap/good/server.json",
            &format!(r#"{{"failure":null,{compress}}}"#),
        );
        // The kernel uses a slot for each of its 320,000 pages, less the
        // swap header.
        let swaps = |used_kib: u64| {
            format!("Filename Type Size Used Priority\n/dev/nbd0 partition 8388604 {used_kib} 50\n")
        };
        system.fixture("/proc/swaps", &swaps(319_999 * 4));
        let packed = inspect(&system, "good").unwrap();
        assert!(packed.healthy, "{packed:?}");
        assert_eq!(packed.stale_bytes, Some(0));
        // 4 GiB of VRAM at 2.73:1 hold about 10.9 GiB: more than an 8 GiB
        // area (this one's record says 256 MiB).
        assert_eq!(packed.holds_bytes, Some(11_728_474_320));
        assert_eq!(fills_first_line(11_728_474_320, 8 << 30), None);
        assert_eq!(
            compress_line(packed.server.as_ref().unwrap(), packed.stale_bytes).unwrap(),
            "compress lz4: DATA 1.22 GiB COMPR 429.15 MiB TOTAL 468 MiB of 4 GiB VRAM (packed 2.73:1), \
             300000 pages stored (1000 raw), 20000 same-filled"
        );
        // The kernel has freed 64,000 of those slots without a discard.
        system.fixture("/proc/swaps", &swaps(255_999 * 4));
        let stale = inspect(&system, "good").unwrap();
        assert_eq!(stale.stale_bytes, Some(64_000 * 4096));
        assert_eq!(
            compress_line(stale.server.as_ref().unwrap(), stale.stale_bytes).unwrap(),
            "compress lz4: DATA 1.22 GiB COMPR 429.15 MiB TOTAL 468 MiB of 4 GiB VRAM (packed 2.73:1), \
             300000 pages stored (1000 raw), 20000 same-filled, 250 MiB of them freed by the \
             kernel, not discarded yet"
        );
        system.fixture(
            "/run/vramswap/good/server.json",
            &format!(
                r#"{{"failure":null,{}}}"#,
                compress.replace(r#""full":false"#, r#""full":true"#)
            ),
        );
        let full = inspect(&system, "good").unwrap();
        assert_eq!(
            full.problems,
            [
                "its VRAM is full of compressed pages: swap-outs to it fail (ENOSPC) until pages \
              are freed; a larger size= or a lower ratio= gives room; 250 MiB of its pages are \
              ones the kernel has freed but not discarded: with ratio= at most the ratio \
              status shows, freed pages cannot fill it"
            ]
        );
        // Pages that pack 1.5:1 fill 4 GiB of VRAM at 6 GiB of an 8 GiB
        // area, whether the area took its VRAM as it went or all at start;
        // too few pages stored forecast nothing.
        let worse = |original: u64| {
            compress
                .replace("1310720000", &original.to_string())
                .replace("479985664", &(original * 2 / 3).to_string())
                .replace("490733568", "4294967296")
        };
        system.fixture(
            "/run/vramswap/good/server.json",
            &format!(r#"{{"failure":null,{}}}"#, worse(3 << 30)),
        );
        let fills = inspect(&system, "good").unwrap();
        assert!(fills.healthy, "{fills:?}");
        assert_eq!(
            fills_first_line(fills.holds_bytes.unwrap(), 8 << 30).unwrap(),
            "at this ratio its VRAM holds about 6 GiB of pages, 75 % of the 8 GiB area: past \
             that, swap-outs fail (ENOSPC) while the kernel counts free slots; a ratio= at \
             most this one keeps the VRAM from filling first"
        );
        // A server from before slab_bytes: its slots' bytes instead.
        system.fixture(
            "/run/vramswap/good/server.json",
            &format!(
                r#"{{"failure":null,{}}}"#,
                compress.replace(r#""slab_bytes":479985664,"#, "")
            ),
        );
        assert_eq!(
            inspect(&system, "good").unwrap().holds_bytes,
            Some(11_977_658_583)
        );
        system.fixture(
            "/run/vramswap/good/server.json",
            &format!(r#"{{"failure":null,{}}}"#, worse(32 << 20)),
        );
        assert_eq!(inspect(&system, "good").unwrap().holds_bytes, None);
        assert_eq!(
            run(&system, &["nope".into()], false)
                .unwrap_err()
                .to_string(),
            "no instance 'nope'"
        );
    }
}
