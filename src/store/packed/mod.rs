//! Compressed pages (`compress=`): each 4 KiB page of the device packed on
//! its own, as zram does, into a size-class slot of VRAM (`slabs.rs`).
//!
//! A page table in host RAM says where each page is: nowhere (it reads as
//! zeros), in the table alone (a same-filled page: one 8-byte word over
//! and over), or in a slot, compressed or raw. The export is the VRAM
//! budget times `ratio=`, so a write can find no room: it then fails with
//! ENOSPC and leaves every page as it was.
//!
//! Concurrency: the table is cut into groups of 16 pages (64 KiB of the
//! device), each behind a `RwLock`. A read holds its groups shared until
//! its downloads are done; a write packs and uploads its pages into fresh
//! slots first, then takes each group exclusively only to swap the pages'
//! entries, and frees the old slots after, when no read can be using them.
//! Where chunks are mapped VRAM (`mapped=`), a write stores each packed
//! page straight into its slot by CPU stores, as the block store does.
//! A write of part of a page holds its group exclusively from reading the
//! old page to swapping the new one, so two partial writes of one page
//! never lose each other's bytes. Locks are taken lane first, then groups
//! (in ascending order), then the slab table, as the block store takes
//! its own.
//!
//! Nothing on the I/O path allocates: the table, the slab bookkeeping and
//! one compression context per lane are made at open.
//!
//! The rooms: this file (the page table, slots taken and given back, the
//! counts), `read.rs` and `write.rs` (the two paths), `codec.rs` (lz4
//! and zstd), `slabs.rs` (where slots are) and `spans.rs` (a batch's
//! slots moved by few steps).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use tracing::{debug, warn};

use super::error::StoreError;
use super::lanes::LanePool;
use crate::backend::{
    Backend, BackendError, ChunkId, Lane, TransferOp, BLOCK_SIZE, CHUNK_SIZE, MAX_BATCH,
};

mod codec;
mod compact;
mod read;
mod slabs;
mod spans;
mod write;

pub use codec::{Compression, DEFAULT_ZSTD_LEVEL};
pub(in crate::store) use write::Source;

use codec::Codec;
use slabs::{class_of, Slabs, Slot};

/// The unit of compression: the kernel's page.
pub(super) const PAGE: usize = 4096;
const GROUP: usize = BLOCK_SIZE as usize / PAGE;
const NO_CHUNK: u32 = u32::MAX;
/// Compactions one write may run before it gives up with ENOSPC.
const COMPACTIONS_PER_SLOT: usize = 8;

/// Where one page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    slab: u32,
    index: u16,
    /// 0: nothing (zeros); [`SAME`]: same-filled with `word`; else the
    /// bytes stored in the slot ([`PAGE`]: raw).
    len: u16,
    /// The repeated word, or with `verify` the CRC32C of the stored bytes.
    word: u64,
}

const SAME: u16 = u16::MAX;

impl Entry {
    const EMPTY: Entry = Entry {
        slab: 0,
        index: 0,
        len: 0,
        word: 0,
    };

    fn same(word: u64) -> Entry {
        Entry {
            len: SAME,
            word,
            ..Entry::EMPTY
        }
    }

    /// The slot and its class, if the page is in one.
    fn slot(self) -> Option<(Slot, usize)> {
        match self.len {
            0 | SAME => None,
            len => Some((
                Slot {
                    slab: self.slab,
                    index: self.index,
                },
                class_of(len as usize),
            )),
        }
    }

    /// Whether the page reads as anything but zeros.
    fn holds_data(self) -> bool {
        !(self.len == 0 || (self.len == SAME && self.word == 0))
    }
}

/// What compression holds, for `status` (zramctl's columns and more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompressStats {
    pub compression: Compression,
    /// VRAM the store may take: the export is this times `ratio=`.
    pub budget: u64,
    /// Pages in slots, compressed or raw.
    pub pages_stored: u64,
    /// Pages kept as one repeated word (zeros included), in no slot.
    pub pages_same: u64,
    /// Pages stored raw: they did not compress below 3 KiB.
    pub pages_raw: u64,
    /// Bytes of the pages written: every stored and same-filled page
    /// (zramctl's DATA).
    pub original_bytes: u64,
    /// Bytes the stored pages take compressed (zramctl's COMPR).
    pub compressed_bytes: u64,
    /// Bytes of the slots they are in, each rounded up to its class.
    pub slot_bytes: u64,
    /// VRAM taken now, whole chunks (zramctl's TOTAL): slots plus slack.
    pub vram_used: u64,
    /// 64 KiB blocks of it that are slabs now.
    pub slabs: u64,
    /// 64 KiB blocks compaction emptied by moving their pages into the
    /// free slots of other slabs of their class.
    pub compacted_slabs: u64,
    /// Writes refused with ENOSPC because no slot could be had.
    pub full_writes: u64,
    /// Whether the last write that needed a slot found none, with no
    /// slot freed since.
    pub full: bool,
    /// Reads of pages that did not come back as written.
    pub corrupt_reads: u64,
}

/// The compressed page table of a store and the VRAM behind it.
pub(super) struct PackedPages {
    compression: Compression,
    groups: Box<[RwLock<[Entry; GROUP]>]>,
    /// The chunk at each index of the slab table, or [`NO_CHUNK`].
    chunks: Box<[AtomicU32]>,
    slabs: Mutex<Slabs>,
    /// Held by the one compaction running (`compact.rs`).
    compacting: Mutex<()>,
    /// Blocks compaction has emptied.
    compacted_slabs: AtomicU64,
    /// One context per lane, used by whoever holds that lane.
    codecs: Box<[Mutex<Codec>]>,
    /// Keep chunks that empty (eager allocation) instead of giving them back.
    keep_chunks: bool,
    verify: bool,
    pages_stored: AtomicU64,
    pages_same: AtomicU64,
    pages_raw: AtomicU64,
    compressed_bytes: AtomicU64,
    full_writes: AtomicU64,
    full: AtomicBool,
    corrupt_reads: AtomicU64,
}

impl PackedPages {
    /// A table for `size` bytes of device on up to `budget_chunks` chunks,
    /// with a context per lane of `lanes`.
    pub(super) fn new(
        compression: Compression,
        size: u64,
        budget_chunks: usize,
        lanes: &LanePool,
        keep_chunks: bool,
        verify: bool,
    ) -> Result<Self, StoreError> {
        let groups = (size / BLOCK_SIZE) as usize;
        let codecs = (0..lanes.len())
            .map(|_| Codec::new(compression).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PackedPages {
            compression,
            groups: (0..groups)
                .map(|_| RwLock::new([Entry::EMPTY; GROUP]))
                .collect(),
            chunks: (0..budget_chunks)
                .map(|_| AtomicU32::new(NO_CHUNK))
                .collect(),
            slabs: Mutex::new(Slabs::new(budget_chunks)),
            compacting: Mutex::new(()),
            compacted_slabs: AtomicU64::new(0),
            codecs: codecs.into_boxed_slice(),
            keep_chunks,
            verify,
            pages_stored: AtomicU64::new(0),
            pages_same: AtomicU64::new(0),
            pages_raw: AtomicU64::new(0),
            compressed_bytes: AtomicU64::new(0),
            full_writes: AtomicU64::new(0),
            full: AtomicBool::new(false),
            corrupt_reads: AtomicU64::new(0),
        })
    }

    /// Host RAM the table and bookkeeping take for `size` bytes of device
    /// on `budget_chunks` chunks, about: what the docs state per GiB.
    pub(super) fn host_bytes(size: u64, budget_chunks: usize) -> u64 {
        let groups = size / BLOCK_SIZE;
        let group = std::mem::size_of::<RwLock<[Entry; GROUP]>>() as u64;
        groups * group + Slabs::host_bytes(budget_chunks)
    }

    pub(super) fn stats(&self) -> CompressStats {
        let slabs = self.lock_slabs().counts();
        let stored = self.pages_stored.load(Ordering::Relaxed);
        let same = self.pages_same.load(Ordering::Relaxed);
        CompressStats {
            compression: self.compression,
            budget: self.chunks.len() as u64 * CHUNK_SIZE,
            pages_stored: stored,
            pages_same: same,
            pages_raw: self.pages_raw.load(Ordering::Relaxed),
            original_bytes: (stored + same) * PAGE as u64,
            compressed_bytes: self.compressed_bytes.load(Ordering::Relaxed),
            slot_bytes: slabs.slot_bytes,
            vram_used: slabs.chunks * CHUNK_SIZE,
            slabs: slabs.slabs,
            compacted_slabs: self.compacted_slabs.load(Ordering::Relaxed),
            full_writes: self.full_writes.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            corrupt_reads: self.corrupt_reads.load(Ordering::Relaxed),
        }
    }

    /// Whether stored pages are checksummed (`verify=on`).
    pub(super) fn verifies(&self) -> bool {
        self.verify
    }

    fn lock_slabs(&self) -> std::sync::MutexGuard<'_, Slabs> {
        self.slabs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chunk(&self, slot: Slot) -> ChunkId {
        ChunkId(self.chunks[slot.chunk()].load(Ordering::Acquire))
    }

    /// Takes every chunk of the budget now (eager allocation): a write
    /// then never waits for the driver.
    pub(super) fn allocate_all(&self, backend: &dyn Backend) -> Result<(), StoreError> {
        let mut slabs = self.lock_slabs();
        while let Some(index) = slabs.vacant_chunk() {
            let chunk = backend.allocate_chunk()?;
            self.chunks[index].store(chunk.0, Ordering::Release);
            slabs.add_chunk(index);
        }
        Ok(())
    }

    /// A slot of `class` for a page being written, from a new chunk if
    /// the budget has room for one, else from the slack that compaction
    /// wins back (with `lane` and the first `room` bytes of its staging).
    /// With none anywhere the store is full: ENOSPC.
    fn take_slot(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        room: usize,
        class: usize,
    ) -> Result<Slot, StoreError> {
        // Each compaction empties blocks; writers beside this one may take
        // them first, so a few rounds, not one. Once a write has been
        // refused, only a freed slot can make compaction find anything:
        // until one is (`release` clears `full`), refusals are quick.
        for _ in 0..COMPACTIONS_PER_SLOT {
            if let Some(slot) = self.try_slot(backend, class)? {
                return Ok(slot);
            }
            if self.full.load(Ordering::Relaxed) || !self.compact(backend, lane, room)? {
                break;
            }
        }
        if let Some(slot) = self.try_slot(backend, class)? {
            return Ok(slot);
        }
        self.full_writes.fetch_add(1, Ordering::Relaxed);
        if !self.full.swap(true, Ordering::Relaxed) {
            warn!("compressed store full: writes fail with ENOSPC until pages are freed");
        }
        Err(StoreError::NoSpace)
    }

    /// A slot of `class`, from a new chunk if the budget has room for one;
    /// `None` where there is none.
    fn try_slot(&self, backend: &dyn Backend, class: usize) -> Result<Option<Slot>, StoreError> {
        let mut slabs = self.lock_slabs();
        if let Some(slot) = slabs.alloc(class) {
            return Ok(Some(slot));
        }
        let Some(index) = slabs.vacant_chunk() else {
            return Ok(None);
        };
        let chunk = match backend.allocate_chunk() {
            Ok(chunk) => chunk,
            Err(BackendError::OutOfDeviceMemory) => return Ok(None),
            Err(other) => return Err(other.into()),
        };
        self.chunks[index].store(chunk.0, Ordering::Release);
        slabs.add_chunk(index);
        debug!(index, ?chunk, "chunk taken for compressed pages");
        Ok(slabs.alloc(class))
    }

    /// Frees the slots of entries that were never swapped in.
    fn give_back(&self, backend: &dyn Backend, lane: &mut dyn Lane, entries: &[Entry]) {
        for entry in entries {
            self.release(backend, lane, *entry);
        }
    }

    /// Frees the slot of an entry no one can reach any more, and gives its
    /// chunk back to the GPU, scrubbed, when that emptied it (unless the
    /// store keeps its chunks).
    fn release(&self, backend: &dyn Backend, lane: &mut dyn Lane, entry: Entry) {
        let Some((slot, class)) = entry.slot() else {
            return;
        };
        let mut slabs = self.lock_slabs();
        self.full.store(false, Ordering::Relaxed);
        let Some(index) = slabs.free(slot, class) else {
            return;
        };
        if self.keep_chunks {
            return;
        }
        slabs.remove_chunk(index);
        let chunk = ChunkId(self.chunks[index].swap(NO_CHUNK, Ordering::AcqRel));
        drop(slabs);
        scrub_and_free(backend, lane, chunk);
        debug!(index, ?chunk, "empty chunk given back");
    }

    /// Keeps the counters as `old` gives way to `new`.
    fn count(&self, old: Entry, new: Entry) {
        for (entry, add) in [(old, false), (new, true)] {
            let change = |counter: &AtomicU64, by: u64| match add {
                true => counter.fetch_add(by, Ordering::Relaxed),
                false => counter.fetch_sub(by, Ordering::Relaxed),
            };
            match entry.len {
                0 => {}
                SAME => {
                    change(&self.pages_same, 1);
                }
                len => {
                    change(&self.pages_stored, 1);
                    change(&self.compressed_bytes, u64::from(len));
                    if len as usize == PAGE {
                        change(&self.pages_raw, 1);
                    }
                }
            }
        }
    }

    /// Calls `f(page, holds_data)` for every page of `first..=last`.
    pub(super) fn pages_with_data(&self, first: u64, last: u64, mut f: impl FnMut(u64, bool)) {
        let mut page = first;
        while page <= last {
            let group = page as usize / GROUP;
            let entries = self.groups[group].read().unwrap_or_else(|e| e.into_inner());
            while page <= last && page as usize / GROUP == group {
                f(page, entries[page as usize % GROUP].holds_data());
                page += 1;
            }
        }
    }

    fn codec(&self, lane: usize) -> std::sync::MutexGuard<'_, Codec> {
        self.codecs[lane].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Scrubs and frees every chunk still held: the store is going away.
    pub(super) fn free_all(&self, backend: &dyn Backend, lane: &mut dyn Lane) {
        for chunk in self.chunks.iter() {
            let id = chunk.swap(NO_CHUNK, Ordering::AcqRel);
            if id != NO_CHUNK {
                scrub_and_free(backend, lane, ChunkId(id));
            }
        }
    }
}

/// Pages one read batch may hold: a page of staging each.
fn batch_pages(lane: &mut dyn Lane) -> usize {
    (lane.staging().len() / PAGE).min(MAX_BATCH)
}

/// Pages one write batch may hold: two pages of staging each, one where
/// the packed page waits and one where it goes out from.
fn write_batch_pages(lane: &mut dyn Lane) -> usize {
    (lane.staging().len() / (2 * PAGE)).min(MAX_BATCH)
}

/// Zeroes a chunk and frees it: VRAM given back never carries pages.
fn scrub_and_free(backend: &dyn Backend, lane: &mut dyn Lane, chunk: ChunkId) {
    let zero = TransferOp::Zero {
        chunk,
        chunk_offset: 0,
        len: CHUNK_SIZE,
    };
    if let Err(err) = lane.submit(&[zero]).and_then(|()| lane.wait()) {
        warn!(%err, "could not scrub VRAM before freeing it; freeing it as it is");
    }
    backend.free_chunk(chunk);
}
