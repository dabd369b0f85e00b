//! Read-ahead: sequential reads served from windows of the device that
//! were downloaded into pinned staging before they were asked for.
//!
//! Why: a stream of 256 KiB reads that each wait for a DMA of their own
//! falls well short of nbdkit's memory plugin, and the same bytes in
//! 2 MiB copies cost a bystander far less than in 256 KiB copies
//! (docs/BENCHMARKS.md, "4-connection reads: what costs them"). A stream
//! read through windows makes one 2 MiB copy per eight such requests,
//! started while earlier requests are still being answered, so the request
//! that needs it rarely waits.
//!
//! A stream is a read of at least [`STREAM_READ`] bytes that a window
//! served or that starts where a recent one ended. Each fills the next
//! [`DEPTH`] windows that are not there yet. Small reads (swap's) never
//! start a fill and cost a scan of the window tags.
//!
//! Coherence: every change to a chunk's bytes (write, zero, trim, freeing
//! the chunk) counts itself in the chunk's [`Changes`] before it touches
//! anything and again once it is done on the GPU. A window is filled only
//! while no change of its chunk is under way, and remembers how many had
//! begun; it serves reads only while that count still holds. So a read
//! that starts after a write has finished never sees a window filled
//! before that write; a read that overlaps a write may see either, as NBD
//! allows.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock, RwLockWriteGuard};

use arrayvec::ArrayVec;

use super::slots::{span_mask, Changes, ChunkSlot};
use crate::backend::{
    Backend, BackendError, Lane, TransferOp, BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE,
};

/// Bytes per window: one copy per eight 256 KiB requests (nbdcopy's size),
/// two per chunk.
pub const WINDOW_BYTES: u64 = 2 << 20;
/// Most windows a store may have: their bits fit a `u64`.
pub const MAX_WINDOWS: usize = 64;
/// Windows filled ahead of the one a stream reads. nbdkit works on up to
/// 16 requests of a connection at once, 4 MiB of a 256 KiB stream, so a
/// window is asked for while the requests of the one before are still in
/// flight. Four beat two, and more windows than 32 did not help
/// (docs/BENCHMARKS.md, "Read-ahead for sequential reads").
const DEPTH: u64 = 4;
/// Reads shorter than this never start a stream: the kernel's swap-ins
/// are at most 32 KiB (page-cluster 3), file read-ahead is 128 KiB and up.
pub const STREAM_READ: usize = 128 << 10;
/// Ends of recent long reads kept to spot a stream.
const RECENT: usize = 16;
/// No region: an empty window, a free `recent` slot.
const NONE: u64 = u64::MAX;
const WINDOW_BLOCKS: usize = (WINDOW_BYTES / BLOCK_SIZE) as usize;
const WINDOWS_PER_CHUNK: u64 = CHUNK_SIZE / WINDOW_BYTES;

/// What read-ahead did, since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Windows (of [`WINDOW_BYTES`]) the store has.
    pub windows: usize,
    /// Windows filled.
    pub filled: u64,
    /// Reads served from a window.
    pub served: u64,
    /// Reads of a stream (long, following another) served from VRAM: the
    /// window was not there, was stale, or straddled two windows.
    pub missed: u64,
}

/// The windows of one store.
pub(super) struct ReadAhead {
    windows: Box<[Window]>,
    /// Held while choosing a window to fill, so that no region is ever in
    /// two windows.
    claim: Mutex<()>,
    /// Where recent long reads that no window served ended.
    recent: [AtomicU64; RECENT],
    next_recent: AtomicUsize,
    /// Ticks on every fill; of the windows not read through, the one
    /// filled first is refilled first. A read touches no state shared by
    /// all windows: 64 nbdkit threads would pass its cache line around.
    clock: AtomicU64,
    filled: AtomicU64,
    missed: AtomicU64,
}

struct Window {
    /// The region (device offset / [`WINDOW_BYTES`]) this window holds or
    /// is being filled with, or [`NONE`]: read without the lock to find a
    /// window. The lock's `Fill::region` is the truth.
    region: AtomicU64,
    /// The clock when it was filled.
    filled_at: AtomicU64,
    /// Blocks of the window read since it was filled: a window read
    /// through is the first to be refilled.
    read: AtomicU64,
    served: AtomicU64,
    fill: RwLock<Fill>,
}

struct Fill {
    lane: Box<dyn Lane>,
    region: u64,
    /// The chunk's changes begun when the fill was.
    changes: u64,
    /// Blocks of the window that hold data; the others read as zeros.
    data: u64,
    /// The download is submitted and not waited for yet.
    pending: bool,
}

impl ReadAhead {
    /// `count` is at most [`MAX_WINDOWS`] (`BlockStore::open` refuses more).
    pub(super) fn new(backend: &dyn Backend, count: usize) -> Result<Self, BackendError> {
        let windows = (0..count)
            .map(|_| {
                Ok(Window {
                    region: AtomicU64::new(NONE),
                    filled_at: AtomicU64::new(0),
                    read: AtomicU64::new(0),
                    served: AtomicU64::new(0),
                    fill: RwLock::new(Fill {
                        lane: backend.create_lane(WINDOW_BYTES as usize)?,
                        region: NONE,
                        changes: 0,
                        data: 0,
                        pending: false,
                    }),
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?
            .into_boxed_slice();
        Ok(ReadAhead {
            windows,
            claim: Mutex::new(()),
            recent: std::array::from_fn(|_| AtomicU64::new(NONE)),
            next_recent: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            filled: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        })
    }

    pub(super) fn stats(&self) -> ReadAheadStats {
        ReadAheadStats {
            windows: self.windows.len(),
            filled: self.filled.load(Ordering::Relaxed),
            served: self
                .windows
                .iter()
                .map(|w| w.served.load(Ordering::Relaxed))
                .sum(),
            missed: self.missed.load(Ordering::Relaxed),
        }
    }

    /// Serves `buf` at `offset` from a window if one holds it, and fills
    /// the windows ahead when this read is part of a stream. Says whether
    /// it served the read; if not, the caller reads from VRAM as usual.
    /// The range is inside the device and not empty.
    pub(super) fn read(&self, slots: &[ChunkSlot], buf: &mut [u8], offset: u64) -> bool {
        let end = offset + buf.len() as u64;
        let region = offset / WINDOW_BYTES;
        let served = (end - 1) / WINDOW_BYTES == region && self.serve(slots, region, buf, offset);
        let long = buf.len() >= STREAM_READ;
        let stream = long && (served || self.follows_recent(offset));
        if stream {
            let last = slots.len() as u64 * WINDOWS_PER_CHUNK;
            let first_ahead = (end - 1) / WINDOW_BYTES + 1;
            for ahead in (first_ahead..first_ahead + DEPTH).take_while(|&r| r < last) {
                self.fill(slots, ahead);
            }
        }
        if long && !served {
            if stream {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
            let at = self.next_recent.fetch_add(1, Ordering::Relaxed) % RECENT;
            self.recent[at].store(end, Ordering::Relaxed);
        }
        served
    }

    fn follows_recent(&self, offset: u64) -> bool {
        self.recent
            .iter()
            .any(|end| end.load(Ordering::Relaxed) == offset)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn find(&self, region: u64) -> Option<&Window> {
        self.windows
            .iter()
            .find(|w| w.region.load(Ordering::Acquire) == region)
    }

    /// Whether a window holds `region` or is being filled with it; a
    /// window a change made stale is emptied and does not count.
    fn holds(&self, region: u64, changes: &Changes) -> bool {
        let Some(window) = self.find(region) else {
            return false;
        };
        let stale = match window.fill.try_read() {
            Ok(fill) => fill.region == region && changes.begun() != fill.changes,
            // Being filled or waited for right now.
            Err(_) => false,
        };
        if stale {
            forget_stale(window, region, changes);
        }
        !stale
    }

    fn serve(&self, slots: &[ChunkSlot], region: u64, buf: &mut [u8], offset: u64) -> bool {
        let Some(window) = self.find(region) else {
            return false;
        };
        let changes = &slots[slot_of(region)].changes;
        loop {
            {
                let fill = window.fill.read().unwrap_or_else(|e| e.into_inner());
                if fill.region != region {
                    return false;
                }
                if changes.begun() != fill.changes {
                    drop(fill);
                    forget_stale(window, region, changes);
                    return false;
                }
                if !fill.pending {
                    let start = offset - region * WINDOW_BYTES;
                    copy_out(fill.lane.staged(), fill.data, start, buf);
                    let first = (start / BLOCK_SIZE) as usize;
                    let last = ((start + buf.len() as u64 - 1) / BLOCK_SIZE) as usize;
                    window
                        .read
                        .fetch_or(span_mask(first, last), Ordering::Relaxed);
                    window.served.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
            // The first reader to find the download pending waits for it;
            // the others wait for the lock, then read.
            let mut fill = window.fill.write().unwrap_or_else(|e| e.into_inner());
            if fill.region != region {
                return false;
            }
            if fill.pending {
                fill.pending = false;
                if fill.lane.wait().is_err() {
                    // The read from VRAM will meet the error and report it.
                    forget(window, &mut fill);
                    return false;
                }
            }
        }
    }

    /// Starts filling a window with `region` unless one holds it already.
    /// Never waits for a lock: read-ahead that would wait is skipped.
    fn fill(&self, slots: &[ChunkSlot], region: u64) {
        let slot = &slots[slot_of(region)];
        if self.holds(region, &slot.changes) {
            return;
        }
        // Held until the download is submitted: a chunk is freed only under
        // its write lock, and `forget_chunk` then waits for the download.
        let Ok(guard) = slot.chunk.try_read() else {
            return;
        };
        // A chunk never written reads as zeros without the GPU.
        let Some(chunk) = *guard else {
            return;
        };
        let Some(changes) = slot.changes.settled() else {
            return;
        };
        let first_block = ((region % WINDOWS_PER_CHUNK) * WINDOW_BYTES / BLOCK_SIZE) as usize;
        let data = (slot.data.load(Ordering::Acquire) >> first_block) & window_mask();
        let (window, mut fill) = {
            let _claim = self.claim.lock().unwrap_or_else(|e| e.into_inner());
            if self.holds(region, &slot.changes) {
                return;
            }
            let Some((window, fill)) = self.victim() else {
                return;
            };
            window.region.store(region, Ordering::Release);
            (window, fill)
        };
        if fill.pending {
            fill.pending = false;
            // An old window no one read: its outcome does not matter.
            let _ = fill.lane.wait();
        }
        window.read.store(0, Ordering::Relaxed);
        window.filled_at.store(self.tick(), Ordering::Relaxed);
        let mut ops: ArrayVec<TransferOp, BLOCKS_PER_CHUNK> = ArrayVec::new();
        let mut block = 0;
        while block < WINDOW_BLOCKS {
            if data & (1 << block) == 0 {
                block += 1;
                continue;
            }
            let run = block;
            while block < WINDOW_BLOCKS && data & (1 << block) != 0 {
                block += 1;
            }
            ops.push(TransferOp::Download {
                staging_offset: run * BLOCK_SIZE as usize,
                chunk,
                chunk_offset: (first_block + run) as u64 * BLOCK_SIZE,
                len: (block - run) as u64 * BLOCK_SIZE,
            });
        }
        if !ops.is_empty() {
            if fill.lane.submit(&ops).is_err() {
                forget(window, &mut fill);
                return;
            }
            fill.pending = true;
        }
        fill.region = region;
        fill.changes = changes;
        fill.data = data;
        self.filled.fetch_add(1, Ordering::Relaxed);
        drop(guard);
    }

    /// The window to refill, locked: an empty one, else one read through,
    /// else one not read through although as many windows have been filled
    /// since (its stream stopped), the one filled first; windows in use are
    /// passed over. A window a live stream has yet to read is never taken:
    /// with more streams than the windows serve, the fill is skipped and
    /// that stream reads from VRAM, where taking each other's windows would
    /// make every stream miss.
    fn victim(&self) -> Option<(&Window, RwLockWriteGuard<'_, Fill>)> {
        let now = self.clock.load(Ordering::Relaxed);
        // A stream's next windows were filled at most DEPTH fills ago.
        let count = (self.windows.len() as u64).max(2 * DEPTH);
        let rank = |w: &Window| {
            let filled_at = w.filled_at.load(Ordering::Relaxed);
            let class = if w.region.load(Ordering::Acquire) == NONE {
                0
            } else if w.read.load(Ordering::Relaxed) == window_mask() {
                1
            } else if now.saturating_sub(filled_at) >= count {
                2
            } else {
                return None;
            };
            Some((class, filled_at))
        };
        let mut tried = 0u64;
        for _ in 0..self.windows.len() {
            let (_, index, window) = self
                .windows
                .iter()
                .enumerate()
                .filter(|(i, _)| tried & (1 << i) == 0)
                .filter_map(|(i, w)| Some((rank(w)?, i, w)))
                .min_by_key(|&(rank, i, _)| (rank, i))?;
            tried |= 1 << index;
            if let Ok(fill) = window.fill.try_write() {
                return Some((window, fill));
            }
        }
        None
    }

    /// Empties the windows of a chunk about to be freed, waiting for their
    /// downloads. The caller holds the chunk's write lock, so no new fill
    /// of it can start.
    pub(super) fn forget_chunk(&self, slot_index: usize) {
        let regions =
            slot_index as u64 * WINDOWS_PER_CHUNK..(slot_index as u64 + 1) * WINDOWS_PER_CHUNK;
        for window in self.windows.iter() {
            if !regions.contains(&window.region.load(Ordering::Acquire)) {
                continue;
            }
            let mut fill = window.fill.write().unwrap_or_else(|e| e.into_inner());
            if regions.contains(&fill.region) {
                if fill.pending {
                    fill.pending = false;
                    let _ = fill.lane.wait();
                }
                forget(window, &mut fill);
            }
        }
    }

    /// Waits for every download still in flight (before chunks are freed).
    pub(super) fn drain(&mut self) {
        for window in self.windows.iter_mut() {
            let fill = window.fill.get_mut().unwrap_or_else(|e| e.into_inner());
            if fill.pending {
                fill.pending = false;
                let _ = fill.lane.wait();
            }
        }
    }
}

/// Empties a window that a change made stale, so the stream can fill it
/// again; left alone when another thread holds it or its download is
/// still in flight (a pending window always keeps its region).
fn forget_stale(window: &Window, region: u64, changes: &Changes) {
    if let Ok(mut fill) = window.fill.try_write() {
        if fill.region == region && changes.begun() != fill.changes && !fill.pending {
            forget(window, &mut fill);
        }
    }
}

fn forget(window: &Window, fill: &mut Fill) {
    fill.region = NONE;
    window.region.store(NONE, Ordering::Release);
}

fn slot_of(region: u64) -> usize {
    (region / WINDOWS_PER_CHUNK) as usize
}

fn window_mask() -> u64 {
    span_mask(0, WINDOW_BLOCKS - 1)
}

/// Copies `buf.len()` bytes at `start` of a window out of its staging:
/// blocks that hold data from there, the others as zeros.
fn copy_out(staged: &[u8], data: u64, start: u64, buf: &mut [u8]) {
    let mut done = 0usize;
    while done < buf.len() {
        let at = start + done as u64;
        let block = (at / BLOCK_SIZE) as usize;
        let n = ((BLOCK_SIZE - at % BLOCK_SIZE) as usize).min(buf.len() - done);
        let out = &mut buf[done..done + n];
        if data & (1 << block) != 0 {
            out.copy_from_slice(&staged[at as usize..at as usize + n]);
        } else {
            out.fill(0);
        }
        done += n;
    }
}
