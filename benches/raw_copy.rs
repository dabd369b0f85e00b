//! Raw block-store copy throughput, host→VRAM and VRAM→host, beside the
//! pinned-memory DMA ceiling measured in the same run on the same device.
//!
//! ```text
//! cargo bench --bench raw_copy -- [--backend vulkan] [--device D] [--size 2G]
//!                                 [--seconds 2] [--csv FILE]
//!                                 [--lanes 64] [--staging 1M]
//!                                 [--requests 4M,64K] [--threads 1,4,16]
//!                                 [--verify] [--compress lz4|zstd]
//!                                 [--random-pct 25]
//! ```
//!
//! `--verify` runs the store with block checksums on (`verify=on`): the
//! same figures with a CRC32C computed per 64 KiB block on write and
//! checked on read; compare with a run without it on the same machine.
//!
//! `--compress` runs the store compressed (`compress=`, eager, the export
//! as large as the VRAM): every byte written and read is bench/swap's
//! pages (`--random-pct` of each page's words hashed; lz4 packs 25 %
//! about 1.6:1), so the figures are the store's own compressed path,
//! codec included, with no nbdkit in front. Set beside `nbd-compare`'s
//! compressed nbdcopy shapes on the same machine, they say whether the
//! store or what serves it bounds those.
//!
//! The ceiling moves whole 4 MiB chunks between the backend's own pinned
//! staging buffers and VRAM, no host copy at all, several batches in
//! flight: the fastest this backend can move bytes. The store figures
//! include everything a real request does: copying from the caller's
//! ordinary (pageable) buffer into staging, the DMA, the bookkeeping.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vramswap::backend::{
    self, Backend, BackendKind, ChunkId, MappedMode, OpenOptions, TransferOp, CHUNK_SIZE,
};
use vramswap::{parse_size, AllocationPolicy, BlockStore, SizeSpec, StoreConfig};

#[path = "common/hog_page.rs"]
mod hog_page;
use hog_page::hog_page;

const PAGE: usize = 4096;

struct Args {
    backend: BackendKind,
    device: String,
    size: u64,
    seconds: f64,
    csv: Option<String>,
    store: StoreConfig,
    requests: Vec<u64>,
    threads: Vec<usize>,
    random_pct: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        backend: BackendKind::Vulkan,
        device: String::new(),
        size: 2 << 30,
        seconds: 2.0,
        csv: None,
        store: StoreConfig::default(),
        requests: vec![CHUNK_SIZE, 64 << 10],
        threads: vec![1, 4, 16],
        random_pct: 25,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--backend" => args.backend = value().parse().unwrap_or_else(|e| die(&format!("{e}"))),
            "--device" => args.device = value(),
            "--size" => {
                args.size = parse_size(&value()).unwrap_or_else(|e| die(&format!("--size: {e}")))
            }
            "--seconds" => {
                args.seconds = value()
                    .parse()
                    .unwrap_or_else(|_| die("--seconds: a number"))
            }
            "--csv" => args.csv = Some(value()),
            "--requests" => {
                args.requests = value()
                    .split(',')
                    .map(|s| parse_size(s).unwrap_or_else(|e| die(&format!("--requests: {e}"))))
                    .collect()
            }
            "--threads" => {
                args.threads = value()
                    .split(',')
                    .map(|s| {
                        s.parse()
                            .unwrap_or_else(|_| die("--threads: numbers, e.g. 1,4,16"))
                    })
                    .collect()
            }
            "--lanes" => {
                args.store.lanes = value().parse().unwrap_or_else(|_| die("--lanes: a number"))
            }
            "--staging" => {
                args.store.staging_bytes = parse_size(&value())
                    .unwrap_or_else(|e| die(&format!("--staging: {e}")))
                    as usize
            }
            "--verify" => args.store.verify = true,
            "--compress" => {
                args.store.compress = value().parse().unwrap_or_else(|e| die(&format!("{e}")));
                // Every page must fit: the export no larger than the VRAM.
                args.store.ratio = "1".parse().expect("ratio 1");
            }
            "--random-pct" => {
                args.random_pct = value()
                    .parse()
                    .ok()
                    .filter(|pct| *pct <= 100)
                    .unwrap_or_else(|| die("--random-pct: 0 to 100"))
            }
            "--bench" => {} // cargo bench passes this
            other => die(&format!("unknown argument {other}")),
        }
    }
    args
}

fn die(msg: &str) -> ! {
    eprintln!("raw_copy: {msg}");
    std::process::exit(2)
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    ToVram,
    FromVram,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::ToVram => "host->vram",
            Dir::FromVram => "vram->host",
        }
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8) ^ (seed as u8) ^ 0x5a).collect()
}

/// `len` bytes of bench/swap's pages, numbered from `first`.
fn hog_pages(first: u64, len: usize, random_pct: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    for (n, page) in bytes.chunks_mut(PAGE).enumerate() {
        hog_page(first + n as u64, random_pct, page);
    }
    bytes
}

/// Runs `work(thread, iteration) -> bytes` on `threads` threads for about
/// `seconds`; returns GB/s (10^9 bytes per second).
fn timed(threads: usize, seconds: f64, work: impl Fn(usize, u64) -> u64 + Sync) -> f64 {
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || {
                    let mut bytes = 0;
                    let mut i = 0;
                    while start.elapsed() < deadline {
                        bytes += work(t, i);
                        i += 1;
                    }
                    bytes
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    total as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// DMA only: each thread keeps two batches of `chunks_per_batch` whole
/// chunks in flight between its own pinned staging and VRAM.
fn ceiling(backend: &dyn Backend, dir: Dir, threads: usize, seconds: f64) -> f64 {
    let per_thread = 2;
    let chunks: Vec<ChunkId> = (0..threads * per_thread)
        .map(|_| {
            backend
                .allocate_chunk()
                .unwrap_or_else(|e| die(&format!("allocate: {e}")))
        })
        .collect();
    let lanes: Vec<std::sync::Mutex<Vec<Box<dyn backend::Lane>>>> = (0..threads)
        .map(|_| {
            std::sync::Mutex::new(
                (0..2)
                    .map(|_| {
                        backend
                            .create_lane(CHUNK_SIZE as usize)
                            .unwrap_or_else(|e| die(&format!("lane: {e}")))
                    })
                    .collect(),
            )
        })
        .collect();
    let gbs = timed(threads, seconds, |t, i| {
        let mut lanes = lanes[t].lock().expect("lanes");
        let lane = &mut lanes[(i % 2) as usize];
        lane.wait().unwrap_or_else(|e| die(&format!("wait: {e}")));
        let chunk = chunks[t * per_thread + (i % 2) as usize];
        let op = match dir {
            Dir::ToVram => TransferOp::Upload {
                staging_offset: 0,
                chunk,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            },
            Dir::FromVram => TransferOp::Download {
                staging_offset: 0,
                chunk,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            },
        };
        lane.submit(&[op])
            .unwrap_or_else(|e| die(&format!("submit: {e}")));
        CHUNK_SIZE
    });
    for lanes in &lanes {
        for lane in lanes.lock().expect("lanes").iter_mut() {
            let _ = lane.wait();
        }
    }
    drop(lanes);
    for chunk in chunks {
        backend.free_chunk(chunk);
    }
    gbs
}

/// Host memory only: each thread copies its own 4 MiB source into a 1 MiB
/// buffer with the store's staging copy, as a write copies the caller's
/// bytes into staging. Bounds what any design that copies through staging
/// can reach on this machine.
fn memcpy_rate(threads: usize, seconds: f64) -> f64 {
    let buffers: Vec<std::sync::Mutex<(Vec<u8>, Vec<u8>)>> = (0..threads)
        // Real bytes: `vec![0; n]` would map the shared zero page and read
        // from cache whatever the size.
        .map(|t| std::sync::Mutex::new((pattern(t, CHUNK_SIZE as usize), pattern(t + 1, 1 << 20))))
        .collect();
    timed(threads, seconds, |t, i| {
        let mut guard = buffers[t].lock().expect("buffers");
        let (src, dst) = &mut *guard;
        let len = dst.len();
        let piece = (i % 4) as usize * len;
        backend::copy_to_staging(dst, &src[piece..piece + len]);
        std::hint::black_box(&dst);
        dst.len() as u64
    })
}

/// One lane, one batch at a time: how long `submit` takes and how long
/// after it the batch is complete, median over `rounds`, in microseconds.
fn batch_latency(backend: &dyn Backend, dir: Dir, len: u64, rounds: usize) -> (f64, f64) {
    let chunk = backend
        .allocate_chunk()
        .unwrap_or_else(|e| die(&format!("allocate: {e}")));
    let mut lane = backend
        .create_lane(len as usize)
        .unwrap_or_else(|e| die(&format!("lane: {e}")));
    let op = match dir {
        Dir::ToVram => TransferOp::Upload {
            staging_offset: 0,
            chunk,
            chunk_offset: 0,
            len,
        },
        Dir::FromVram => TransferOp::Download {
            staging_offset: 0,
            chunk,
            chunk_offset: 0,
            len,
        },
    };
    let mut submit = Vec::with_capacity(rounds);
    let mut complete = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        lane.submit(&[op])
            .unwrap_or_else(|e| die(&format!("submit: {e}")));
        submit.push(start.elapsed().as_secs_f64() * 1e6);
        lane.wait().unwrap_or_else(|e| die(&format!("wait: {e}")));
        complete.push(start.elapsed().as_secs_f64() * 1e6);
    }
    drop(lane);
    backend.free_chunk(chunk);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut submit), median(&mut complete))
}

/// Whole requests through the block store, each thread in its own region.
fn store_rate(
    store: &BlockStore,
    dir: Dir,
    request: u64,
    threads: usize,
    seconds: f64,
    random_pct: usize,
) -> f64 {
    let region = store.size() / threads as u64 / request * request;
    let per_region = region / request;
    let buffers: Vec<std::sync::Mutex<Vec<u8>>> = (0..threads)
        .map(|t| {
            let first = (t as u64) << 32;
            std::sync::Mutex::new(hog_pages(first, request as usize, random_pct))
        })
        .collect();
    timed(threads, seconds, |t, i| {
        let offset = t as u64 * region + (i % per_region) * request;
        let mut buf = buffers[t].lock().expect("buffer");
        match dir {
            Dir::ToVram => store.write(&buf, offset),
            Dir::FromVram => store.read(&mut buf, offset),
        }
        .unwrap_or_else(|e| die(&format!("store: {e}")));
        request
    })
}

fn main() {
    let args = parse_args();
    let device = if args.device.is_empty() {
        Default::default()
    } else {
        args.device
            .parse()
            .unwrap_or_else(|e| die(&format!("--device: {e}")))
    };
    let backend: Arc<dyn Backend> = backend::open(
        args.backend,
        &OpenOptions {
            device,
            memory_limit: None,
            // Tests and measures VRAM itself: the same cells either way.
            mapped: MappedMode::Off,
        },
    )
    .unwrap_or_else(|e| die(&format!("{e}")));
    let info = backend.device().clone();
    println!(
        "device: {} ({}, {}), backend {}, transfer queue: {}",
        info.name,
        info.vendor,
        info.uuid_string(),
        args.backend,
        if info.dedicated_transfer_queue {
            "dedicated"
        } else {
            "shared"
        }
    );

    let mut ceilings = [0.0f64; 2];
    for (k, dir) in [Dir::ToVram, Dir::FromVram].into_iter().enumerate() {
        let best = [1, 2, 4]
            .into_iter()
            .map(|threads| ceiling(backend.as_ref(), dir, threads, args.seconds / 2.0))
            .fold(0.0, f64::max);
        ceilings[k] = best;
    }
    println!(
        "pinned DMA ceiling: host->vram {:.2} GB/s, vram->host {:.2} GB/s",
        ceilings[0], ceilings[1]
    );
    for dir in [Dir::ToVram, Dir::FromVram] {
        for len in [4096, 1 << 20] {
            let (submit, complete) = batch_latency(backend.as_ref(), dir, len, 2000);
            println!(
                "one batch {} {}: submit {submit:.1} us, complete {complete:.1} us (median)",
                dir.name(),
                vramswap::ByteSize(len)
            );
        }
    }
    for dir in [Dir::ToVram, Dir::FromVram] {
        let per: Vec<String> = [1, 2, 4]
            .into_iter()
            .map(|t| {
                format!(
                    "{t}: {:.1}",
                    ceiling(backend.as_ref(), dir, t, args.seconds / 2.0)
                )
            })
            .collect();
        println!(
            "ceiling {} by threads (GB/s) {}",
            dir.name(),
            per.join(", ")
        );
    }
    let copies: Vec<String> = args
        .threads
        .iter()
        .map(|&t| format!("{t} threads {:.2} GB/s", memcpy_rate(t, args.seconds / 2.0)))
        .collect();
    println!(
        "host copy into staging, no GPU (4 MiB source): {}",
        copies.join(", ")
    );

    let store = BlockStore::open(
        backend.clone(),
        &StoreConfig {
            size: SizeSpec::Bytes(args.size),
            allocation: AllocationPolicy::Eager,
            ..args.store
        },
    )
    .unwrap_or_else(|e| die(&format!("{e}")));
    // Reads must find data on the GPU, or they never leave the host (a
    // compressed store keeps a page of one repeated word in its table).
    let mut offset = 0;
    while offset < store.size() {
        let fill = hog_pages(offset / PAGE as u64, CHUNK_SIZE as usize, args.random_pct);
        store
            .write(&fill, offset)
            .unwrap_or_else(|e| die(&format!("fill: {e}")));
        offset += CHUNK_SIZE;
    }

    println!(
        "store: verify={} (block checksums {}), compress={}",
        if args.store.verify { "on" } else { "off" },
        if args.store.verify {
            "computed on write, checked on read"
        } else {
            "off"
        },
        args.store.compress
    );
    if let Some(stats) = store.stats().compress {
        println!(
            "filled with bench/swap's pages ({} % of each page's words hashed): {} pages \
             ({} raw) packed {:.2}:1 into {} of slots",
            args.random_pct,
            stats.pages_stored,
            stats.pages_raw,
            stats.original_bytes as f64 / stats.compressed_bytes.max(1) as f64,
            vramswap::ByteSize(stats.slot_bytes)
        );
    }
    let mut csv = String::from(
        "backend,device,direction,request_bytes,threads,gb_per_s,ceiling_gb_per_s,ratio\n",
    );
    println!(
        "{:<11} {:>8} {:>7} {:>9} {:>9}",
        "direction", "request", "threads", "GB/s", "ceiling"
    );
    for (k, dir) in [Dir::ToVram, Dir::FromVram].into_iter().enumerate() {
        for &request in &args.requests {
            for &threads in &args.threads {
                let gbs = store_rate(&store, dir, request, threads, args.seconds, args.random_pct);
                let ratio = gbs / ceilings[k];
                println!(
                    "{:<11} {:>8} {:>7} {:>9.2} {:>8.0}%",
                    dir.name(),
                    vramswap::ByteSize(request).to_string(),
                    threads,
                    gbs,
                    ratio * 100.0
                );
                let _ = writeln!(
                    csv,
                    "{},\"{}\",{},{request},{threads},{gbs:.3},{:.3},{ratio:.3}",
                    args.backend,
                    info.name.replace('"', "'"),
                    dir.name(),
                    ceilings[k]
                );
            }
        }
    }
    if let Some(path) = args.csv {
        std::fs::write(&path, csv).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    }
}
