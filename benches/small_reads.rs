//! Small reads, one request at a time per thread: latency (p50, p99,
//! p99.9, longest) and rate, through the CPU mapping of VRAM and by DMA
//! through a lane, and whole 4 KiB store reads, which take whichever the
//! store chooses. No nbdkit: what the store and backend cost themselves.
//!
//! ```text
//! cargo bench --bench small_reads -- [--backend vulkan] [--mapped on]
//!     [--size 1G] [--seconds 2] [--threads 1,4,16] [--raw 4K,16K,64K]
//! ```
//!
//! Every read lands at a random 4 KiB-aligned offset of the whole device,
//! filled by DMA writes first; every store read is checked against what
//! was written, so a mapped read that missed a DMA write fails the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vramswap::backend::{
    self, Backend, BackendKind, ChunkId, MappedMode, OpenOptions, TransferOp, CHUNK_SIZE,
};
use vramswap::{parse_size, AllocationPolicy, BlockStore, SizeSpec, StoreConfig};

struct Args {
    backend: BackendKind,
    mapped: MappedMode,
    size: u64,
    seconds: f64,
    threads: Vec<usize>,
    raw: Vec<u64>,
}

fn die(msg: &str) -> ! {
    eprintln!("small_reads: {msg}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        backend: BackendKind::Vulkan,
        mapped: MappedMode::Auto,
        size: 1 << 30,
        seconds: 2.0,
        threads: vec![1, 4, 16],
        raw: vec![4096, 16 << 10, 64 << 10],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        let sizes = |v: String| -> Vec<u64> {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| parse_size(s).unwrap_or_else(|e| die(&format!("{e}"))))
                .collect()
        };
        match arg.as_str() {
            "--backend" => args.backend = value().parse().unwrap_or_else(|e| die(&format!("{e}"))),
            "--mapped" => args.mapped = value().parse().unwrap_or_else(|e: String| die(&e)),
            "--size" => args.size = sizes(value())[0],
            "--seconds" => {
                args.seconds = value()
                    .parse()
                    .unwrap_or_else(|_| die("--seconds: a number"))
            }
            "--threads" => {
                args.threads = value()
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|_| die("--threads: 1,4,16")))
                    .collect()
            }
            "--raw" => args.raw = sizes(value()),
            "--bench" => {}
            other => die(&format!("unknown argument {other}")),
        }
    }
    args
}

/// The u64 word at device offset `at` (8-aligned) after the fill.
fn word(at: u64) -> u64 {
    (at / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5a5a
}

fn fill_bytes(offset: u64, buf: &mut [u8]) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(offset + 8 * i as u64).to_le_bytes());
    }
}

/// A small xorshift: no allocation, no lock.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Summary {
    count: u64,
    seconds: f64,
    lat_ns: Vec<u32>,
}

impl Summary {
    fn line(mut self, what: &str, threads: usize) -> String {
        self.lat_ns.sort_unstable();
        let q = |p: f64| {
            let v = &self.lat_ns;
            if v.is_empty() {
                return 0.0;
            }
            v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        };
        format!(
            "{what:<28} threads {threads:>2}  {:>8.1}k/s  p50 {:>7.1} us  p99 {:>7.1}  p99.9 {:>8.1}  max {:>9.1}",
            self.count as f64 / self.seconds / 1000.0,
            q(0.5),
            q(0.99),
            q(0.999),
            q(1.0)
        )
    }
}

/// Runs `op(thread, rng)` on `threads` threads for `seconds`, timing each.
fn timed(threads: usize, seconds: f64, op: impl Fn(usize, &mut u64) + Sync) -> Summary {
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let per: Vec<(u64, Vec<u32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                scope.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 21);
                    let mut rng = 0x1234_5678_9abc_def1u64 ^ ((t as u64 + 1) << 32);
                    let mut count = 0u64;
                    while start.elapsed() < deadline {
                        let t0 = Instant::now();
                        op(t, &mut rng);
                        let ns = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                        if lat.len() < lat.capacity() {
                            lat.push(ns);
                        }
                        count += 1;
                    }
                    (count, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut lat_ns = Vec::new();
    let mut count = 0;
    for (c, l) in per {
        count += c;
        lat_ns.extend(l);
    }
    Summary {
        count,
        seconds,
        lat_ns,
    }
}

fn main() {
    let args = parse_args();
    let backend: Arc<dyn Backend> = backend::open(
        args.backend,
        &OpenOptions {
            device: Default::default(),
            memory_limit: None,
            mapped: args.mapped,
        },
    )
    .unwrap_or_else(|e| die(&format!("{e}")));
    let info = backend.device().clone();
    println!(
        "device: {} ({}), backend {}, mapped={} (chunks mapped: {}), cpu sse4.1: {}",
        info.name,
        info.uuid_string(),
        args.backend,
        args.mapped,
        backend.mapped(),
        std::arch::is_x86_feature_detected!("sse4.1"),
    );
    let store = BlockStore::open(
        backend.clone(),
        &StoreConfig {
            size: SizeSpec::Bytes(args.size),
            allocation: AllocationPolicy::Eager,
            readahead: 0,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| die(&format!("{e}")));
    // Every byte written by DMA (the store's writes), so the reads below
    // read what DMA left.
    let mut chunk = vec![0u8; CHUNK_SIZE as usize];
    let mut offset = 0;
    while offset < store.size() {
        fill_bytes(offset, &mut chunk);
        store
            .write(&chunk, offset)
            .unwrap_or_else(|e| die(&format!("fill: {e}")));
        offset += CHUNK_SIZE;
    }
    drop(chunk);
    let pages = store.size() / 4096;

    // Raw: one chunk per thread region, straight through the backend.
    let chunks: Vec<ChunkId> = (0..64)
        .map(|_| {
            backend
                .allocate_chunk()
                .unwrap_or_else(|e| die(&format!("{e}")))
        })
        .collect();
    {
        // Real bytes in the raw chunks, by DMA.
        let mut lane = backend.create_lane(CHUNK_SIZE as usize).unwrap();
        for (i, &c) in chunks.iter().enumerate() {
            lane.staging().fill(i as u8 ^ 0x3c);
            lane.submit(&[TransferOp::Upload {
                staging_offset: 0,
                chunk: c,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            }])
            .unwrap();
            lane.wait().unwrap();
        }
    }
    let max_threads = args.threads.iter().copied().max().unwrap_or(1);
    for &len in &args.raw {
        let slots = CHUNK_SIZE / len;
        if backend.mapped() {
            let bufs: Vec<std::sync::Mutex<Vec<u8>>> = (0..max_threads)
                .map(|_| std::sync::Mutex::new(vec![0u8; len as usize]))
                .collect();
            for &threads in &args.threads {
                let s = timed(threads, args.seconds, |t, rng| {
                    let r = next(rng);
                    let c = chunks[(r % chunks.len() as u64) as usize];
                    let at = (r >> 8) % slots * len;
                    let mut buf = bufs[t].lock().unwrap();
                    backend
                        .read_mapped(c, at, &mut buf)
                        .unwrap_or_else(|e| die(&format!("read_mapped: {e}")));
                });
                let what = format!("raw mapped read {}", vramswap::ByteSize(len));
                println!("{}", s.line(&what, threads));
            }
        }
        let lanes: Vec<std::sync::Mutex<Box<dyn backend::Lane>>> = (0..max_threads)
            .map(|_| std::sync::Mutex::new(backend.create_lane(len as usize).unwrap()))
            .collect();
        for &threads in &args.threads {
            let s = timed(threads, args.seconds, |t, rng| {
                let r = next(rng);
                let c = chunks[(r % chunks.len() as u64) as usize];
                let at = (r >> 8) % slots * len;
                let mut lane = lanes[t].lock().unwrap();
                lane.submit(&[TransferOp::Download {
                    staging_offset: 0,
                    chunk: c,
                    chunk_offset: at,
                    len,
                }])
                .unwrap_or_else(|e| die(&format!("submit: {e}")));
                lane.wait().unwrap_or_else(|e| die(&format!("wait: {e}")));
            });
            let what = format!("raw DMA read {}", vramswap::ByteSize(len));
            println!("{}", s.line(&what, threads));
        }
    }
    for c in chunks {
        backend.free_chunk(c);
    }

    // The store: 4 KiB reads at random pages, each checked.
    let bufs: Vec<std::sync::Mutex<Vec<u8>>> = (0..max_threads)
        .map(|_| std::sync::Mutex::new(vec![0u8; 4096]))
        .collect();
    let path = if backend.mapped() { "mapped" } else { "DMA" };
    for &threads in &args.threads {
        let before = store.stats().gather;
        let s = timed(threads, args.seconds, |t, rng| {
            let at = next(rng) % pages * 4096;
            let mut buf = bufs[t].lock().unwrap();
            store
                .read(&mut buf, at)
                .unwrap_or_else(|e| die(&format!("read: {e}")));
            for (i, w) in buf.chunks_exact(8).enumerate() {
                let expected = word(at + 8 * i as u64);
                if u64::from_le_bytes(w.try_into().unwrap()) != expected {
                    die(&format!(
                        "read at {at}: word {i} differs from what was written"
                    ));
                }
            }
        });
        let what = format!("store 4 KiB read ({path})");
        let after = store.stats().gather;
        let (reads, batches) = (after.reads - before.reads, after.batches - before.batches);
        match batches {
            0 => println!("{}", s.line(&what, threads)),
            _ => println!(
                "{}  gathered {:.1} reads/batch",
                s.line(&what, threads),
                reads as f64 / batches as f64
            ),
        }
    }
}
