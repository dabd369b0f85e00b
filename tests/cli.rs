//! The `vramswap` CLI as a user runs it, on this machine: no `/dev/nbd`,
//! Vulkan on lavapipe. The real start/stop path runs in the qemu guest
//! tests; here: devices, preflight failing cleanly, the dry-run plan, and
//! status/stop of instances that do not exist.

mod common;

use std::process::Command;

use common::nbd::{cli_path, plugin_path};
use serde_json::Value;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the CLI with its run directory in `run_dir`.
fn vramswap(run_dir: &std::path::Path, args: &[&str]) -> Run {
    let out = Command::new(cli_path())
        .args(args)
        .env("VRAMSWAP_RUN_DIR", run_dir)
        .env("XDG_RUNTIME_DIR", run_dir)
        .output()
        .expect("run vramswap");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn nbdkit_processes_for(dir: &std::path::Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(&needle))
        .count()
}

#[test]
fn devices_json_lists_the_vulkan_device() {
    let dir = tempfile::tempdir().unwrap();
    let run = vramswap(dir.path(), &["devices", "--json"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let vulkan: Vec<&Value> = json["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["backend"] == "vulkan")
        .collect();
    assert!(!vulkan.is_empty(), "no Vulkan device: {}", run.stdout);
    for field in [
        "index",
        "name",
        "vendor",
        "uuid",
        "pci_bus_id",
        "memory_total",
        "memory_available",
        "dedicated_transfer_queue",
    ] {
        assert!(
            vulkan[0].get(field).is_some(),
            "missing {field}: {}",
            vulkan[0]
        );
    }
    assert_eq!(json["backends"][0]["name"], "vulkan");
    // The table form works too.
    let table = vramswap(dir.path(), &["devices"]);
    assert_eq!(table.code, Some(0));
    assert!(table.stdout.contains(vulkan[0]["uuid"].as_str().unwrap()));
}

#[test]
fn start_without_nbd_fails_preflight_in_one_line_and_leaves_nothing() {
    if std::path::Path::new("/sys/block/nbd0").exists() {
        eprintln!("this machine has NBD devices; the guest tests cover a real start");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_path().to_str().unwrap();
    let run = vramswap(dir.path(), &["start", "--size", "64M", "--plugin", plugin]);
    assert_eq!(run.code, Some(1));
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].starts_with("vramswap: error: no NBD support"),
        "{}",
        lines[0]
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "left files behind"
    );
    assert_eq!(nbdkit_processes_for(dir.path()), 0, "left a server running");
}

#[test]
fn dry_run_prints_the_plan_and_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_path().to_str().unwrap();
    let run = vramswap(
        dir.path(),
        &[
            "start",
            "test",
            "--dry-run",
            "--size",
            "64M",
            "--priority",
            "7",
            "--memtest",
            "--plugin",
            plugin,
        ],
    );
    let run_dir = dir.path().join("test");
    for needle in [
        "plan for instance 'test'".to_string(),
        format!("mkdir -m 0700 {}", run_dir.display()),
        format!("setsid nbdkit --unix {}/nbd.sock", run_dir.display()),
        format!("{plugin} backend=vulkan size=67108864"),
        "-b 4096 -swap -timeout 300 -C 4".to_string(),
        "mkswap -L vramswap-test".to_string(),
        "swapon --priority 7 --discard".to_string(),
        "ok    gpu".to_string(),
        "ok    size    64 MiB (eager)".to_string(),
        "ok    memtest 64 MiB clean (address, random;".to_string(),
    ] {
        assert!(
            run.stdout.contains(&needle),
            "missing {needle:?} in:\n{}",
            run.stdout
        );
    }
    assert!(
        !run_dir.exists(),
        "a dry run created the instance directory"
    );
    // Exit status: 0 where a start would pass preflight, 1 where not.
    let would_pass = !run.stdout.contains("FAIL");
    assert_eq!(
        run.code,
        Some(if would_pass { 0 } else { 1 }),
        "{}",
        run.stdout
    );
}

#[test]
fn memtest_of_64m_on_the_vulkan_device_finds_no_bad_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let run = vramswap(dir.path(), &["memtest", "--size", "64M", "--json"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["backend"], "vulkan");
    assert_eq!(report["size"], 64 << 20);
    assert_eq!(report["bad_blocks"], Value::Array(Vec::new()), "{report}");
    assert_eq!(report["mismatches"], 0);
    // Every pattern: walking ones, zeros, address and random sweep twice,
    // moving inversions four times.
    assert_eq!(report["bytes_swept"], 12 * (64 << 20));
    assert!(report["gb_per_s"].as_f64().unwrap() > 0.0, "{report}");
    // Not a terminal: one progress line per sweep on stderr.
    assert_eq!(
        run.stderr
            .lines()
            .filter(|l| l.starts_with("vramswap: memtest: pass 1/1"))
            .count(),
        12,
        "{}",
        run.stderr
    );
}

#[test]
fn bad_flags_and_unknown_instances_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            vec!["start", "--size", "lots"],
            "--size lots: 'lots' is not a size",
        ),
        (
            vec!["start", "--size", "1G", "--reserve", "1G"],
            "size=1 GiB and reserve=1 GiB exclude each other",
        ),
        (
            vec!["start", "--allocation", "sometimes"],
            "invalid value 'sometimes'",
        ),
        (vec!["start", "../etc"], "invalid name '../etc'"),
        (
            vec!["start", "--config", "/nonexistent.toml"],
            "/nonexistent.toml: no such config file",
        ),
        (vec!["start", "--connections", "0"], "0 is not in 1..=64"),
        (
            vec!["start", "--nbd", "/dev/sda", "--dry-run"],
            "'/dev/sda' is not an NBD device",
        ),
        (
            vec!["memtest", "--size", "lots"],
            "--size lots: 'lots' is not a size",
        ),
        (
            vec!["memtest", "--size", "1M"],
            "smaller than one 4 MiB chunk",
        ),
        (
            vec!["memtest", "--patterns", "zebra"],
            "invalid value 'zebra'",
        ),
        (vec!["memtest", "--passes", "0"], "0 is not in 1.."),
        (vec!["stop", "nope"], "no instance 'nope'"),
        (vec!["status", "nope"], "no instance 'nope'"),
    ] {
        let run = vramswap(dir.path(), &args);
        assert_ne!(run.code, Some(0), "{args:?} succeeded");
        let first = run.stderr.lines().next().unwrap_or("");
        assert!(
            first.contains(needle) || run.stdout.contains(needle),
            "{args:?}: {}{}",
            run.stderr,
            run.stdout
        );
    }
    let none = vramswap(dir.path(), &["status"]);
    assert_eq!(none.code, Some(0));
    assert_eq!(none.stdout.trim(), "no vramswap instances");
    assert_eq!(
        vramswap(dir.path(), &["status", "--json"]).stdout.trim(),
        "[]"
    );
}

#[test]
fn garbage_in_every_flag_is_one_clear_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("not.toml");
    std::fs::write(&config, "[swap\nsize = \n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["start", "--backend", "opengl"], "opengl"),
        (vec!["start", "--size", "0", "--dry-run"], "--size 0"),
        (vec!["start", "--size", "-1G"], "-1"),
        (vec!["start", "--size", "99999999999T"], "99999999999T"),
        (vec!["start", "--size", "1.5.G"], "1.5.G"),
        (vec!["start", "--reserve", "lots"], "lots"),
        (vec!["start", "--priority", "99999999999"], "99999999999"),
        (vec!["start", "--priority", "40000"], "--priority 40000"),
        (vec!["start", "--priority", "high"], "high"),
        (
            vec!["start", "--nbd", "/dev/nbd-1", "--dry-run"],
            "/dev/nbd-1",
        ),
        (vec!["start", "--connections", "many"], "many"),
        (vec!["start", "--threads", "0"], "0"),
        (vec!["start", "--timeout", "-5"], "-5"),
        (vec!["start", "--timeout", "soon"], "soon"),
        (vec!["start", "--allocation", ""], "allocation"),
        (vec!["start", "--config", &config], "not.toml"),
        (vec!["start", "a/b"], "a/b"),
        (vec!["start", "--bogus"], "--bogus"),
        (vec!["memtest", "--passes", "0"], "0"),
        (vec!["memtest", "--size", "huge"], "huge"),
        (vec!["memtest", "--patterns", "stripes"], "stripes"),
        (vec!["devices", "--bogus"], "--bogus"),
        (vec!["status", "--json", "--bogus"], "--bogus"),
        (vec!["stop", "--all", "name"], "cannot be used with"),
    ];
    for (args, needle) in cases {
        let run = vramswap(dir.path(), &args);
        assert!(
            matches!(run.code, Some(c) if c != 0 && c != 101),
            "{args:?}: exit {:?} (0 is success, 101 a panic)\n{}",
            run.code,
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{args:?}: {}", run.stderr);
        // The first line says it, or (--dry-run) the failed preflight check.
        let first = run.stderr.lines().next().unwrap_or("");
        let failed_check = run
            .stdout
            .lines()
            .any(|l| l.trim_start().starts_with("FAIL") && l.contains(needle));
        assert!(
            first.contains(needle) || failed_check,
            "{args:?}: the first line does not name {needle:?}:\n{}{}",
            run.stderr,
            run.stdout
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n != "not.toml")
            .collect();
        assert!(left.is_empty(), "{args:?} left {left:?} behind");
        assert_eq!(nbdkit_processes_for(dir.path()), 0, "{args:?}");
    }
}

#[test]
fn device_all_plans_one_member_per_gpu() {
    // lavapipe is the one Vulkan device here: one member, named after the
    // group and the GPU's index, serving that GPU.
    let dir = tempfile::tempdir().unwrap();
    let plugin = plugin_path().to_string_lossy().into_owned();
    let run = vramswap(
        dir.path(),
        &[
            "start",
            "swap",
            "--backend",
            "vulkan",
            "--device",
            "all",
            "--size",
            "64M",
            "--plugin",
            &plugin,
            "--dry-run",
        ],
    );
    assert!(
        run.stdout.contains("/run/vramswap/swap-gpu0/") || run.stdout.contains("swap-gpu0"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("device=0"), "{}", run.stdout);
    // No /dev/nbd here: the member's preflight fails, and says which member.
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr
            .lines()
            .next()
            .unwrap_or("")
            .contains("swap-gpu0: "),
        "{}",
        run.stderr
    );
    let bad = vramswap(dir.path(), &["start", "--device", "0,0", "--dry-run"]);
    assert!(
        bad.stderr.contains("--device 0,0: names GPU 0 twice"),
        "{}",
        bad.stderr
    );
}
