//! Compression of 4 KiB pages (`compress=`), on the CPU alone: which codec
//! packs bench/swap's pages how well and how fast, and how much VRAM a
//! compressed store takes as pages keep being overwritten and trimmed.
//!
//! ```text
//! cargo bench --bench compress -- [--pages 65536] [--random-pct 25]
//!     [--churn-seconds 60] [--export 1G] [--ratio 1.5] [--csv FILE]
//! ```
//!
//! `--csv FILE` also writes part 1 as `test,server,value,unit` rows
//! (`compress.csv`, which `bench-plot DIR` draws as `compress.png`); a
//! `--churn-seconds` of 0 skips part 2.
//!
//! Part 1, codecs: the C library's lz4 (what zram runs, `LZ4_compress_default`),
//! lz4_flex (what the store runs) and zstd at levels 1 and 3, each on the
//! same pages, one thread: the ratio of the compressed bytes, the ratio
//! after the store's slots round each page up to its class (64-byte
//! steps; raw above 3 KiB), and ns per page each way.
//!
//! Part 2, churn: a compressed store (lz4, lazy) on the host backend, its
//! export filled with such pages, then for `--churn-seconds` random
//! overwrites of 1 to 32 pages (each page's random share drawn from 0 to
//! 50 %, so pages change size class) and trims of 1 to 256 pages. Every
//! tenth of the run it prints what the VRAM holds: the bytes of the pages,
//! compressed, in slots, and the VRAM taken (whole chunks), so the slack
//! that fragmentation leaves shows as it grows or settles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vramswap::backend::host::HostBackend;
use vramswap::{parse_size, AllocationPolicy, BlockStore, Compression, SizeSpec, StoreConfig};

#[path = "common/hog_page.rs"]
mod hog_page;
use hog_page::hog_page;

const PAGE: usize = 4096;

struct Args {
    pages: usize,
    random_pct: usize,
    churn: f64,
    export: u64,
    ratio: String,
    csv: Option<std::path::PathBuf>,
}

fn die(msg: &str) -> ! {
    eprintln!("compress: {msg}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        pages: 65536,
        random_pct: 25,
        churn: 60.0,
        export: 1 << 30,
        ratio: "1.5".into(),
        csv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        let number = |v: String| v.parse().unwrap_or_else(|_| die(&format!("{arg} {v}")));
        match arg.as_str() {
            "--pages" => args.pages = number(value()),
            "--random-pct" => args.random_pct = number(value()),
            "--churn-seconds" => {
                args.churn = value().parse().unwrap_or_else(|_| die("--churn-seconds"))
            }
            "--export" => {
                args.export = parse_size(&value()).unwrap_or_else(|e| die(&e.to_string()))
            }
            "--ratio" => args.ratio = value(),
            "--csv" => args.csv = Some(value().into()),
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => die(&format!("unknown argument {other}")),
        }
    }
    args
}

/// The bytes of the slot a page of `len` compressed bytes takes.
fn slot_bytes(len: usize) -> usize {
    if len > PAGE * 3 / 4 {
        PAGE
    } else {
        len.div_ceil(64) * 64
    }
}

type Compress<'a> = Box<dyn FnMut(&[u8], &mut [u8]) -> usize + 'a>;
type Decompress<'a> = Box<dyn FnMut(&[u8], &mut [u8]) + 'a>;

fn codecs() -> Vec<(&'static str, Compress<'static>, Decompress<'static>)> {
    let mut table = lz4_flex::block::CompressTable::small();
    let zstd = |level: i32| {
        let mut c = zstd::bulk::Compressor::new(level).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let compress: Compress =
            Box::new(move |page, out| c.compress_to_buffer(page, out).unwrap());
        let decompress: Decompress = Box::new(move |packed, page| {
            assert_eq!(d.decompress_to_buffer(packed, page).unwrap(), PAGE);
        });
        (compress, decompress)
    };
    let (z1c, z1d) = zstd(1);
    let (z3c, z3d) = zstd(3);
    vec![
        (
            "lz4 C (zram's)",
            Box::new(|page: &[u8], out: &mut [u8]| {
                lz4::block::compress_to_buffer(page, None, false, out).unwrap()
            }),
            Box::new(|packed: &[u8], page: &mut [u8]| {
                lz4::block::decompress_to_buffer(packed, Some(PAGE as i32), page).unwrap();
            }),
        ),
        (
            "lz4_flex",
            Box::new(move |page: &[u8], out: &mut [u8]| {
                lz4_flex::block::compress_into_with_table(page, out, &mut table).unwrap()
            }),
            Box::new(|packed: &[u8], page: &mut [u8]| {
                lz4_flex::block::decompress_into(packed, page).unwrap();
            }),
        ),
        ("zstd-1", z1c, z1d),
        ("zstd-3", z3c, z3d),
    ]
}

fn part_codecs(args: &Args) {
    let mut pages = vec![0u8; args.pages * PAGE];
    for (n, page) in pages.chunks_exact_mut(PAGE).enumerate() {
        hog_page(n as u64, args.random_pct, page);
    }
    println!(
        "codecs: {} pages of bench/swap's kind ({} % random words), one thread",
        args.pages, args.random_pct
    );
    println!(
        "{:<16} {:>7} {:>12} {:>14} {:>16}",
        "codec", "ratio", "in slots", "compress ns", "decompress ns"
    );
    let mut out = vec![0u8; 2 * PAGE];
    let mut back = vec![0u8; PAGE];
    let mut csv = String::from("test,server,value,unit\n");
    for (name, mut compress, mut decompress) in codecs() {
        let mut packed: Vec<Vec<u8>> = Vec::with_capacity(args.pages);
        let start = Instant::now();
        for page in pages.chunks_exact(PAGE) {
            let len = compress(page, &mut out);
            packed.push(out[..len].to_vec());
        }
        let compress_ns = start.elapsed().as_nanos() as f64 / args.pages as f64;
        let start = Instant::now();
        for packed in &packed {
            decompress(packed, &mut back);
        }
        let decompress_ns = start.elapsed().as_nanos() as f64 / args.pages as f64;
        for (n, packed) in packed.iter().enumerate().step_by(97) {
            decompress(packed, &mut back);
            assert!(back == pages[n * PAGE..(n + 1) * PAGE], "{name}: page {n}");
        }
        let total: usize = packed.iter().map(Vec::len).sum();
        let slots: usize = packed.iter().map(|p| slot_bytes(p.len())).sum();
        let (ratio, in_slots) = (
            pages.len() as f64 / total as f64,
            pages.len() as f64 / slots as f64,
        );
        println!(
            "{:<16} {:>7.3} {:>12.3} {:>14.0} {:>16.0}",
            name, ratio, in_slots, compress_ns, decompress_ns
        );
        let mbs = |ns: f64| PAGE as f64 / ns * 1e3;
        for (test, value, unit) in [
            ("ratio", ratio, "x"),
            ("ratio-in-slots", in_slots, "x"),
            ("compress", mbs(compress_ns), "MB/s"),
            ("decompress", mbs(decompress_ns), "MB/s"),
        ] {
            csv += &format!("{test},{name},{value:.3},{unit}\n");
        }
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, csv).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    }
}

fn part_churn(args: &Args) {
    let export = args.export;
    let ratio = args
        .ratio
        .parse()
        .unwrap_or_else(|e| die(&format!("--ratio: {e}")));
    let chunk = vramswap::backend::CHUNK_SIZE;
    let budget = (u128::from(export) * 100 / u128::from(ratio_hundredths(&args.ratio))) as u64
        / chunk
        * chunk;
    let config = StoreConfig {
        size: SizeSpec::Bytes(budget),
        allocation: AllocationPolicy::Lazy,
        lanes: 4,
        staging_bytes: 256 << 10,
        verify: false,
        readahead: 0,
        compress: Compression::Lz4,
        ratio,
    };
    let store = BlockStore::open(Arc::new(HostBackend::new(None)), &config)
        .unwrap_or_else(|e| die(&e.to_string()));
    let pages = store.size() / PAGE as u64;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut buf = vec![0u8; 32 * PAGE];
    let mut full = 0u64;
    let mut write = |store: &BlockStore, rng: &mut SmallRng, first: u64, count: u64| {
        for n in 0..count {
            let pct = rng.gen_range(0..=50);
            hog_page(
                rng.gen(),
                pct,
                &mut buf[n as usize * PAGE..(n as usize + 1) * PAGE],
            );
        }
        match store.write(&buf[..count as usize * PAGE], first * PAGE as u64) {
            Ok(()) => 0,
            Err(vramswap::StoreError::NoSpace) => 1,
            Err(e) => die(&e.to_string()),
        }
    };
    for first in (0..pages).step_by(32) {
        full += write(&store, &mut rng, first, 32.min(pages - first));
    }
    println!(
        "\nchurn: a {} export on at most {} of VRAM (lz4, lazy), random overwrites and trims",
        vramswap::ByteSize(store.size()),
        vramswap::ByteSize(budget)
    );
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6}",
        "seconds", "ops", "data", "compr", "slots", "vram", "ratio", "packed", "enospc"
    );
    let report = |seconds: f64, ops: u64, full: u64| {
        let c = store.compress_stats().unwrap();
        println!(
            "{:>7.0} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9.3} {:>8.1}% {:>6}",
            seconds,
            ops,
            vramswap::ByteSize(c.original_bytes).to_string(),
            vramswap::ByteSize(c.compressed_bytes).to_string(),
            vramswap::ByteSize(c.slot_bytes).to_string(),
            vramswap::ByteSize(c.vram_used).to_string(),
            c.original_bytes as f64 / c.vram_used.max(1) as f64,
            100.0 * c.compressed_bytes as f64 / c.vram_used.max(1) as f64,
            full
        );
    };
    report(0.0, 0, full);
    let start = Instant::now();
    let run = Duration::from_secs_f64(args.churn);
    let mut next = 1;
    let mut ops = 0u64;
    while start.elapsed() < run {
        let first = rng.gen_range(0..pages);
        if rng.gen_range(0..8) == 0 {
            let count = rng.gen_range(1..=256).min(pages - first);
            store
                .zero(first * PAGE as u64, count * PAGE as u64)
                .unwrap();
        } else {
            let count = rng.gen_range(1..=32).min(pages - first);
            full += write(&store, &mut rng, first, count);
        }
        ops += 1;
        if start.elapsed() >= run.mul_f64(next as f64 / 10.0) {
            report(start.elapsed().as_secs_f64(), ops, full);
            next += 1;
        }
    }
}

/// `--ratio` in hundredths, for the budget that gives `--export`.
fn ratio_hundredths(text: &str) -> u64 {
    let value: f64 = text.parse().unwrap_or_else(|_| die("--ratio"));
    (value * 100.0).round() as u64
}

fn main() {
    let args = parse_args();
    part_codecs(&args);
    if args.churn > 0.0 {
        part_churn(&args);
    }
}
