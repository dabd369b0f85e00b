//! The whole path in a qemu guest with a real kernel: `vramswap start`,
//! the kernel swapping pages out to VRAM (Vulkan on lavapipe) and back
//! through the real nbd-client and nbdkit, no page corrupted, `vramswap
//! stop` leaving nothing behind. `tests/guest/run-guest` boots the guest;
//! the scenarios are `tests/guest/scenarios/*.sh` (docs/TESTING.md).
//!
//! One boot runs every scenario (a boot and the first `start` under TCG
//! cost seconds each). The guest decides: it prints `SCENARIO NAME: PASS`
//! per scenario and `GUEST-RESULT: PASS` last; a hung guest is killed by
//! the harness's timeout and fails the test.

use std::process::Command;

/// In the order they run; each leaves no instance behind for the next.
const SCENARIOS: &[&str] = &[
    "swap", "stall", "two", "sleep", "kill", "term", "upgrade", "crypt", "zip", "elastic",
];

#[test]
fn kernel_swap_on_vramswap_in_a_guest() {
    let harness = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guest/run-guest");
    // The harness builds the release binaries it boots with, unless these
    // name them.
    let out = Command::new(harness)
        .args(["--timeout", "1800", "--scenario-timeout", "600"])
        .args(SCENARIOS)
        .output()
        .expect("run tests/guest/run-guest");
    let console = String::from_utf8_lossy(&out.stdout);
    let harness_said = String::from_utf8_lossy(&out.stderr);
    // The console log, for whoever reads a failure (cargo shows it then).
    println!("{console}");
    eprintln!("{harness_said}");
    // Said last, so that a report that keeps only the end of the output
    // (CI's) still tells which scenario failed and how.
    let verdicts: Vec<&str> = console
        .lines()
        .filter(|l| {
            l.starts_with("SCENARIO ")
                || l.contains("] FAIL: ")
                || l.contains(": timed out after ")
                // The guest's init: what it could not do, how the run ended.
                || l.starts_with("init: ")
        })
        .collect();
    for scenario in SCENARIOS {
        assert!(
            console
                .lines()
                .any(|l| l.starts_with(&format!("SCENARIO {scenario}: PASS"))),
            "scenario {scenario} did not pass: {}\nthe guest said:\n{}",
            harness_said
                .lines()
                .last()
                .unwrap_or("no word from run-guest"),
            verdicts.join("\n")
        );
    }
    assert!(
        console.lines().any(|l| l == "GUEST-RESULT: PASS"),
        "the guest did not report a pass"
    );
    assert!(out.status.success(), "run-guest failed: {}", out.status);
}
