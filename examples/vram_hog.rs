//! Another GPU program, for the elastic bench (`bench/elastic-gpu`): takes
//! VRAM in 4 MiB chunks until the device has only LEAVE free, then times
//! how long until HEADROOM is free again (the elastic watcher giving slices
//! back), takes MORE and says whether it got it, holds everything for HOLD
//! seconds and frees it.
//!
//! ```text
//! vram_hog BACKEND LEAVE HEADROOM MORE HOLD
//! vram_hog cuda 2G 4G 1G 20
//! ```
//!
//! One `key=value` line per event on stdout, times in milliseconds.

use std::time::{Duration, Instant};

use vramswap::backend::{self, BackendKind, ChunkId, CHUNK_SIZE};
use vramswap::{budget, parse_size};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, leave, headroom, more, hold] = &args[..] else {
        return Err("usage: vram_hog BACKEND LEAVE HEADROOM MORE HOLD_SECONDS".into());
    };
    let kind: BackendKind = kind.parse()?;
    let (leave, headroom, more) = (parse_size(leave)?, parse_size(headroom)?, parse_size(more)?);
    let hold = Duration::from_secs(hold.parse()?);
    let gpu = backend::open(kind, &Default::default())?;
    let mut free = budget::open(kind, &gpu.device().uuid)?;
    println!("source={}", free.source());
    println!("free_at_start={}", free.free()?);
    let mut chunks: Vec<ChunkId> = Vec::new();
    let started = Instant::now();
    while free.free()? > leave + CHUNK_SIZE {
        let want = (free.free()? - leave) / CHUNK_SIZE;
        for _ in 0..want.min(256) {
            chunks.push(gpu.allocate_chunk()?);
        }
    }
    let low = Instant::now();
    println!(
        "took={} ms={} free={}",
        chunks.len() as u64 * CHUNK_SIZE,
        started.elapsed().as_millis(),
        free.free()?
    );
    // The watcher reads once a second: at most a minute to give back.
    while free.free()? < headroom && low.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let back = free.free()?;
    println!(
        "given_back_ms={} free={back} headroom_met={}",
        low.elapsed().as_millis(),
        back >= headroom
    );
    let mut extra = 0;
    while extra < more {
        match gpu.allocate_chunk() {
            Ok(chunk) => chunks.push(chunk),
            Err(err) => {
                println!("more=failed after={extra} error={err}");
                break;
            }
        }
        extra += CHUNK_SIZE;
    }
    if extra >= more {
        println!("more=ok bytes={extra} free={}", free.free()?);
    }
    std::thread::sleep(hold);
    for chunk in chunks {
        gpu.free_chunk(chunk);
    }
    println!("freed free={}", free.free()?);
    Ok(())
}
