//! What the serving process tells `vramswap status`: a small JSON file
//! (`VRAMSWAP_STATUS_FILE`) rewritten when requests fail, so a degraded
//! server — a lost device, a full GPU, a panic — shows without asking it.
//!
//! The first error of each kind is written at once; later ones mark the
//! report dirty and a flusher thread writes it at most twice a second, so
//! a storm of failing requests costs no I/O to speak of, and the file is
//! never more than half a second behind. With `compress=` or lazy
//! allocation the flusher also rewrites it every 2 s with what the pages
//! hold and the VRAM they take.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vramswap::{AllocationPolicy, BlockStore, CompressStats};

static FAILED: AtomicU64 = AtomicU64::new(0);
static NOSPACE: AtomicU64 = AtomicU64::new(0);
static PANICS: AtomicU64 = AtomicU64::new(0);
/// Requests that found a block failing its checksum (the store counts the
/// blocks).
static CHECKSUM: AtomicU64 = AtomicU64::new(0);
static DIRTY: AtomicBool = AtomicBool::new(false);
static WRITING: Mutex<()> = Mutex::new(());

/// A request that failed with `errno`, or panicked; a read that found
/// a block whose checksum failed (also a failure with EIO).
pub enum Event {
    Failed(i32),
    Panic,
    Checksum,
}

pub fn record(event: Event, store: &RwLock<Option<Arc<BlockStore>>>) {
    let first = match event {
        Event::Failed(libc::ENOSPC) => NOSPACE.fetch_add(1, Ordering::Relaxed) == 0,
        Event::Failed(_) => FAILED.fetch_add(1, Ordering::Relaxed) == 0,
        Event::Panic => PANICS.fetch_add(1, Ordering::Relaxed) == 0,
        Event::Checksum => CHECKSUM.fetch_add(1, Ordering::Relaxed) == 0,
    };
    if first {
        write(store);
    } else {
        DIRTY.store(true, Ordering::Release);
    }
}

/// Something the report shows changed (a block the scrub found bad): the
/// flusher rewrites it within half a second.
pub fn changed() {
    DIRTY.store(true, Ordering::Release);
}

/// Whether the store's counts change with its writes: compressed pages,
/// or chunks taken and given back (lazy allocation).
fn changing(store: &RwLock<Option<Arc<BlockStore>>>) -> bool {
    store
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .is_some_and(|s| s.compress_stats().is_some() || s.allocation() == AllocationPolicy::Lazy)
}

/// Starts the thread that writes changes the first write did not cover.
pub fn start_flusher(store: &'static RwLock<Option<Arc<BlockStore>>>) {
    if std::env::var_os("VRAMSWAP_STATUS_FILE").is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("vramswap-status".into())
        // The loop needs little stack; it is locked memory (mlockall).
        .stack_size(64 << 10)
        .spawn(move || {
            for tick in 0u64.. {
                std::thread::sleep(Duration::from_millis(500));
                // A compressed or lazy store's counts change with its
                // writes: they are rewritten every 2 s.
                if DIRTY.swap(false, Ordering::AcqRel) || (tick % 4 == 3 && changing(store)) {
                    write(store);
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("status file: no flusher thread ({err}); counts may lag");
    }
}

/// What compression holds, with zramctl's names alongside.
fn compress_report(c: &CompressStats) -> serde_json::Value {
    serde_json::json!({
        "algorithm": c.compression.to_string(),
        "budget": c.budget,
        "pages_stored": c.pages_stored,
        "pages_same": c.pages_same,
        "pages_raw": c.pages_raw,
        "original_bytes": c.original_bytes,
        "compressed_bytes": c.compressed_bytes,
        "slot_bytes": c.slot_bytes,
        "slab_bytes": c.slabs * vramswap::backend::BLOCK_SIZE,
        "vram_used": c.vram_used,
        "compacted_slabs": c.compacted_slabs,
        "full_writes": c.full_writes,
        "full": c.full,
        "corrupt_reads": c.corrupt_reads,
    })
}

/// Writes the report now.
pub fn write(store: &RwLock<Option<Arc<BlockStore>>>) {
    let Some(path) = std::env::var_os("VRAMSWAP_STATUS_FILE") else {
        return;
    };
    // One writer at a time, each reading the counts under the lock: the
    // file last renamed holds the latest counts, and two writers never
    // share the temporary file.
    let _one = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    let (failure, checksum_errors, mapped, compress, vram_held) = store
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or((None, 0, false, None, 0), |s| {
            let compress = s.compress_stats().map(|c| compress_report(&c));
            let held = s.vram_held();
            (s.failure(), s.checksum_errors(), s.mapped(), compress, held)
        });
    let report = serde_json::json!({
        "failure": failure,
        "failed_requests": FAILED.load(Ordering::Relaxed),
        "nospace_requests": NOSPACE.load(Ordering::Relaxed),
        "panics": PANICS.load(Ordering::Relaxed),
        "checksum_errors": checksum_errors,
        "mapped": mapped,
        "warm_connections": crate::warmup::warm_connections(),
        "daemon": crate::daemon::report(),
        "compress": compress,
        "vram_held": vram_held,
        "updated": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    let path = std::path::PathBuf::from(path);
    let temp = path.with_extension("tmp");
    // Best effort: the status file is a report, not a part of serving.
    if std::fs::write(&temp, format!("{report}\n")).is_ok() {
        let _ = std::fs::rename(&temp, &path);
    }
}
