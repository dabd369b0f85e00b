//! `scrub=PERIOD` (with `verify=on`): a background thread that re-reads
//! every written block once per period and checks it against its checksum,
//! so a VRAM cell that went bad under data nobody has read for hours is
//! found, logged and counted in `vramswap status` before a process swaps
//! that page back in (and gets EIO).
//!
//! It reads through the store like any request, one 64 KiB block at a time,
//! paced evenly over the period (24h over 80 GiB: one block every 66 ms,
//! about 1 MB/s), so it never competes with swap for more than a lane now
//! and then. Blocks that hold no data are skipped without touching the GPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, warn};
use vramswap::backend::BLOCK_SIZE;
use vramswap::{BlockStore, StoreError};

use crate::health;

type Slot = RwLock<Option<Arc<BlockStore>>>;

/// The running scrub thread, if any.
static THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);
/// Set by `stop`: the thread leaves at its next wake-up.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Starts the scrub thread for the store in `store` (opened by then).
pub fn start(store: &'static Slot, period: Duration) {
    let spawned = std::thread::Builder::new()
        .name("vramswap-scrub".into())
        // Its one buffer is on the heap; the stack is locked memory.
        .stack_size(256 << 10)
        .spawn(move || {
            let mut block = vec![0u8; BLOCK_SIZE as usize];
            while pass(store, period, &mut block) {}
        });
    match spawned {
        Ok(handle) => *THREAD.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle),
        Err(err) => warn!("scrub: no scrub thread ({err}); blocks are checked only when read"),
    }
}

/// Wakes the scrub thread and waits until it has exited. `unload` calls it
/// before the last reference to the store goes: on NVIDIA's Vulkan driver a
/// thread that used the driver and exits while another destroys the device
/// can deadlock the two (docs/RELIABILITY.md), so the device must outlive
/// every thread that used it.
pub fn stop() {
    STOPPING.store(true, Ordering::Release);
    let handle = THREAD.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(handle) = handle {
        handle.thread().unpark();
        if handle.join().is_err() {
            warn!("scrub: the scrub thread panicked");
        }
    }
}

/// One pass over the store, paced to last `period`; false once there is
/// nothing left to check (the store closed, or failed: a lost device).
/// The store is taken afresh for each block, never held between them, so
/// closing it (which scrubs and frees the VRAM) never waits on a pass.
fn pass(slot: &Slot, period: Duration, block: &mut [u8]) -> bool {
    let current = || {
        if STOPPING.load(Ordering::Acquire) {
            return None;
        }
        slot.read().unwrap_or_else(PoisonError::into_inner).clone()
    };
    let Some(blocks) = current().map(|s| s.size() / BLOCK_SIZE) else {
        return false;
    };
    let step = period / u32::try_from(blocks.max(1)).unwrap_or(u32::MAX);
    let mut next = Instant::now();
    for index in 0..blocks {
        next += step;
        // Parked rather than asleep, so `stop` need not wait out a step
        // (an hour's period over a small export is seconds per block).
        while let Some(wait) = next.checked_duration_since(Instant::now()) {
            if STOPPING.load(Ordering::Acquire) {
                return false;
            }
            std::thread::park_timeout(wait);
        }
        let Some(store) = current() else {
            return false;
        };
        let offset = index * BLOCK_SIZE;
        let mut holds_data = false;
        if store
            .extents(offset, BLOCK_SIZE, |_, _, data| holds_data |= data)
            .is_err()
        {
            return false;
        }
        if !holds_data {
            continue;
        }
        match store.read(block, offset) {
            Ok(()) => {}
            // The store has logged the block and counted it.
            Err(StoreError::Checksum { offset }) => {
                error!("scrub: the block at {offset} failed its checksum");
                health::changed();
            }
            // Written to while being checked again and again: next pass.
            Err(StoreError::Unsettled { .. }) => {}
            Err(err) => {
                if store.failure().is_some() {
                    return false;
                }
                warn!("scrub: reading the block at {offset}: {err}");
            }
        }
    }
    true
}
