//! `vramswap memtest`: test GPU memory with the core's memory test, and
//! the quick pass `start --memtest` runs.

use std::io::IsTerminal;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vramswap::backend::selftest::Pattern;
use vramswap::backend::{self, BackendKind, DeviceSelector, MappedMode, OpenOptions, CHUNK_SIZE};
use vramswap::memtest::{self, MemtestProgress};
use vramswap::store::DEFAULT_RESERVE;
use vramswap::{parse_size, ByteSize, MemtestConfig, MemtestReport};

use crate::args::{MemtestArgs, MemtestPattern};

/// The backend memtest uses unless told: the one with compute shaders.
fn default_backend() -> Result<BackendKind> {
    BackendKind::compiled_in()
        .iter()
        .copied()
        .find(|k| *k == BackendKind::Vulkan)
        .ok_or_else(|| anyhow!("memtest needs the vulkan backend, which this build lacks"))
}

/// Runs the memory test over `size` bytes of `device` (all available VRAM
/// but the default reserve when `None`).
pub fn test_device(
    kind: BackendKind,
    device: &DeviceSelector,
    size: Option<u64>,
    config: impl FnOnce(u64) -> MemtestConfig,
    progress: impl FnMut(&MemtestProgress),
) -> Result<MemtestReport> {
    let gpu = backend::open(
        kind,
        &OpenOptions {
            device: device.clone(),
            memory_limit: None,
            // Tests and measures VRAM itself: the same cells either way.
            mapped: MappedMode::Off,
        },
    )?;
    let size = match size {
        Some(size) => size,
        None => {
            let available = gpu.memory().available;
            let size = available.saturating_sub(DEFAULT_RESERVE);
            if size < CHUNK_SIZE {
                bail!(
                    "{} has {} available: nothing to test after the {} reserve",
                    gpu.device().name,
                    ByteSize(available),
                    ByteSize(DEFAULT_RESERVE)
                );
            }
            size
        }
    };
    Ok(memtest::run(gpu.as_ref(), &config(size), progress)?)
}

/// One line saying where the bad blocks are, for errors.
pub fn bad_summary(report: &MemtestReport) -> String {
    let shown: Vec<String> = report
        .bad_blocks
        .iter()
        .take(8)
        .map(|b| format!("{:#x}", b.offset))
        .collect();
    let more = report.bad_blocks.len().saturating_sub(shown.len());
    format!(
        "{} bad 64 KiB block{} at {}{} ({} mismatching words)",
        report.bad_blocks.len(),
        if report.bad_blocks.len() == 1 {
            ""
        } else {
            "s"
        },
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
        report.mismatches
    )
}

fn pattern(p: MemtestPattern) -> Pattern {
    match p {
        MemtestPattern::WalkingOnes => Pattern::WalkingOnes,
        MemtestPattern::WalkingZeros => Pattern::WalkingZeros,
        MemtestPattern::Address => Pattern::AddressInAddress,
        MemtestPattern::Random => Pattern::Random,
        MemtestPattern::MovingInversions => Pattern::MovingInversions,
    }
}

/// `vramswap memtest`.
pub fn run(args: &MemtestArgs, quiet: bool) -> Result<()> {
    let kind = match args.backend {
        Some(b) => b.to_string().parse()?,
        None => default_backend()?,
    };
    let device: DeviceSelector = match &args.device {
        Some(d) => d.parse().with_context(|| format!("--device {d}"))?,
        None => DeviceSelector::First,
    };
    let size = match &args.size {
        Some(s) => Some(parse_size(s).with_context(|| format!("--size {s}"))?),
        None => None,
    };
    let patterns: Vec<Pattern> = if args.patterns.is_empty() {
        Pattern::ALL.to_vec()
    } else {
        args.patterns.iter().map(|p| pattern(*p)).collect()
    };
    let bar = (std::io::stderr().is_terminal() && !quiet).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:28} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} \
                 {decimal_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    let mut sweep_start = (0u64, std::time::Duration::ZERO);
    let passes = args.passes;
    let progress = |p: &MemtestProgress| {
        let message = format!("pass {}/{passes} {} {}", p.pass, p.pattern, p.op.name());
        if let Some(bar) = &bar {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(message);
        } else if !quiet && p.bytes_done % p.size == 0 {
            // End of a sweep: one line for it.
            let bytes = p.bytes_done - sweep_start.0;
            let seconds = (p.elapsed - sweep_start.1).as_secs_f64().max(1e-9);
            eprintln!(
                "vramswap: memtest: {message}: swept {} in {seconds:.2} s ({:.2} GB/s), {} mismatching words so far",
                ByteSize(bytes),
                bytes as f64 / seconds / 1e9,
                p.mismatches
            );
            sweep_start = (p.bytes_done, p.elapsed);
        }
    };
    let report = test_device(
        kind,
        &device,
        size,
        |size| MemtestConfig {
            size,
            passes,
            patterns,
            seed: args.seed,
        },
        progress,
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report))?);
    } else {
        print_report(&report);
    }
    if !report.bad_blocks.is_empty() {
        bail!("memtest found {}", bad_summary(&report));
    }
    Ok(())
}

fn to_json(report: &MemtestReport) -> serde_json::Value {
    json!({
        "device": report.device,
        "backend": report.backend.name(),
        "size": report.size,
        "passes": report.passes,
        "patterns": report.patterns.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "bytes_swept": report.bytes_swept,
        "seconds": report.elapsed.as_secs_f64(),
        "gb_per_s": report.gb_per_s(),
        "mismatches": report.mismatches,
        "bad_blocks": report.bad_blocks.iter().map(|b| json!({
            "offset": b.offset,
            "errors": b.errors,
            "words": b.words.iter().map(|w| json!({
                "offset": w.offset,
                "observed": w.observed,
                "expected": w.expected,
                "pattern": w.pattern.name(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_report(report: &MemtestReport) {
    let names: Vec<&str> = report.patterns.iter().map(|p| p.name()).collect();
    println!(
        "memtest of {} on {} ({}): {} pass{} of {}",
        ByteSize(report.size),
        report.device,
        report.backend,
        report.passes,
        if report.passes == 1 { "" } else { "es" },
        names.join(", ")
    );
    println!(
        "swept {} in {:.2} s: {:.2} GB/s",
        ByteSize(report.bytes_swept),
        report.elapsed.as_secs_f64(),
        report.gb_per_s()
    );
    if report.bad_blocks.is_empty() {
        println!("no bad blocks");
        return;
    }
    println!(
        "{} BAD 64 KiB BLOCKS ({} mismatching words):",
        report.bad_blocks.len(),
        report.mismatches
    );
    for block in &report.bad_blocks {
        print!(
            "  {:#014x} ({}): {} errors",
            block.offset,
            ByteSize(block.offset),
            block.errors
        );
        match block.words.first() {
            Some(w) => println!(
                "; word {:#x} read {:#010x}, expected {:#010x} ({})",
                w.offset, w.observed, w.expected, w.pattern
            ),
            None => println!(),
        }
    }
}
