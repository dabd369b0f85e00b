//! The block store: a byte-addressed device of N bytes kept in VRAM.
//!
//! The device is cut into [`CHUNK_SIZE`] chunks (one backend allocation
//! each), and each chunk into 64 [`BLOCK_SIZE`] blocks. Per chunk the store
//! keeps two bitmaps (`slots.rs`): which blocks hold bytes on the GPU (the
//! others read as zeros without touching it), and which a partial write is
//! zeroing right now.
//!
//! Concurrency: every request takes the chunk's `RwLock` shared for the
//! whole time its copies are in flight; only allocating and freeing a chunk
//! take it exclusively, so a chunk is never freed under a running copy and
//! non-overlapping requests run in parallel, also inside one chunk.
//! Requests that overlap each other may land in either order, as NBD allows.
//!
//! No heap allocation happens on the I/O path: staging lanes are made at
//! open, and per-request state lives on the stack.
//!
//! With `verify` on, every block has a CRC32C in host RAM (see
//! [`crate::checksum`]): set as the caller's bytes are staged, updated from
//! the old and new bytes of the range on a partial write, and checked over
//! the whole block on every read that downloads it. A block that fails
//! fails its read with EIO and is logged and counted.
//!
//! The rooms: `config.rs` and `error.rs` (what is asked for, what goes
//! wrong), `slots.rs` (per-chunk state and request arithmetic),
//! `lanes.rs` (the staging lanes), `read.rs` and `write.rs` (the two I/O
//! paths), `gather.rs` (small reads in shared batches), `alloc.rs`
//! (taking and giving back VRAM) and `readahead.rs`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tracing::{info, warn};

use crate::backend::{Backend, BackendError, DeviceInfo, BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE};
use crate::checksum::Checksums;
use crate::size::ByteSize;

mod alloc;
mod config;
mod direct;
mod error;
mod gather;
mod lanes;
mod packed;
mod read;
mod readahead;
mod slots;
mod write;

pub use config::{
    resolve_size, AllocationPolicy, Ratio, ResolvedSize, SizeSpec, StoreConfig, DEFAULT_LANES,
    DEFAULT_READAHEAD, DEFAULT_RESERVE, DEFAULT_STAGING,
};
pub use direct::{DirectStats, DIRECT_READ};
pub use error::StoreError;
pub use gather::GatherStats;
pub use packed::{CompressStats, Compression, DEFAULT_ZSTD_LEVEL};
pub use readahead::{ReadAheadStats, MAX_WINDOWS, WINDOW_BYTES};

use direct::Registrations;
use gather::Gather;
use lanes::LanePool;
use packed::PackedPages;
use readahead::ReadAhead;
use slots::{piece_count, ChunkSlot};
use write::Source;

/// A snapshot of the store for `status` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    pub size: u64,
    pub allocation: AllocationPolicy,
    pub chunks_total: u64,
    pub chunks_allocated: u64,
    /// Blocks that hold data (the rest read as zeros).
    pub blocks_with_data: u64,
    /// Why the store stopped serving, if it did.
    pub failure: Option<String>,
    /// Whether blocks are checksummed.
    pub verify: bool,
    /// Reads of blocks that failed their checksum.
    pub checksum_errors: u64,
    pub readahead: ReadAheadStats,
    pub direct: DirectStats,
    pub gather: GatherStats,
    /// With `compress=`: what the pages hold and take.
    pub compress: Option<CompressStats>,
}

/// A byte-addressed device in VRAM. Safe to share between threads.
pub struct BlockStore {
    backend: Arc<dyn Backend>,
    size: u64,
    policy: AllocationPolicy,
    slots: Box<[ChunkSlot]>,
    lanes: LanePool,
    /// Small reads gathered into shared batches; not with `verify`.
    gather: Option<Gather>,
    /// With `compress=`: the page table that serves every request instead
    /// of `slots` (which is then empty).
    packed: Option<PackedPages>,
    chunks_allocated: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// `verify`: a checksum per block, indexed `slot * 64 + block`.
    checksums: Option<Checksums>,
    checksum_errors: AtomicU64,
    readahead: Option<ReadAhead>,
    /// Request buffers registered for direct reads, one per thread.
    direct: Arc<Registrations>,
    /// Wakes writers waiting for another writer to finish zeroing a block.
    init_lock: Mutex<()>,
    init_done: Condvar,
}

impl fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockStore")
            .field("device", &self.backend.device().name)
            .field("size", &self.size)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl BlockStore {
    /// Builds a store on `backend`: resolves the size, makes the staging
    /// lanes and, for eager allocation, takes and zeroes all VRAM now.
    pub fn open(backend: Arc<dyn Backend>, config: &StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let device = backend.device().clone();
        let memory = backend.memory();
        let resolved = resolve_size(config.size, config.allocation, memory, &device.name)?;
        if let Some(asked) = resolved.rounded_from {
            warn!(
                "size {asked} bytes is not a multiple of {}: using {} ({} bytes)",
                ByteSize(CHUNK_SIZE),
                ByteSize(resolved.bytes),
                resolved.bytes
            );
        }
        if config.allocation == AllocationPolicy::Lazy && resolved.bytes > memory.available {
            warn!(
                "lazy size {} is more than the {} available now on {}: writes may fail with ENOSPC",
                ByteSize(resolved.bytes),
                ByteSize(memory.available),
                device.name
            );
        }
        let compress = config.compress.is_on();
        // Compressed, the size resolved is the VRAM budget and the export
        // is larger; uncompressed, they are one.
        let budget_chunks = (resolved.bytes / CHUNK_SIZE) as usize;
        let size = match compress {
            true => config.ratio.apply(resolved.bytes),
            false => resolved.bytes,
        };
        let chunk_count = if compress { 0 } else { budget_chunks };
        let slots = (0..chunk_count).map(|_| ChunkSlot::default()).collect();
        let lanes = LanePool::new(
            backend.as_ref(),
            config.lanes,
            config.staging_bytes,
            config.verify && !compress,
        )?;
        let packed = match compress {
            true => Some(PackedPages::new(
                config.compress,
                size,
                budget_chunks,
                &lanes,
                config.allocation == AllocationPolicy::Eager,
                config.verify,
            )?),
            false => None,
        };
        // With `verify` a read downloads whole blocks and checks them: the
        // lanes' path. Compressed pages have paths of their own.
        let gather = match backend.gathers_reads() && !config.verify && !compress {
            true => Some(Gather::new(backend.as_ref())?),
            false => None,
        };
        let readahead = match config.readahead {
            0 => None,
            _ if config.verify || compress => None,
            windows => Some(ReadAhead::new(backend.as_ref(), windows)?),
        };
        let store = BlockStore {
            direct: Registrations::new(backend.clone()),
            backend,
            size,
            policy: config.allocation,
            slots,
            lanes,
            gather,
            packed,
            chunks_allocated: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            checksums: (config.verify && !compress)
                .then(|| Checksums::new(chunk_count * BLOCKS_PER_CHUNK)),
            checksum_errors: AtomicU64::new(0),
            readahead,
            init_lock: Mutex::new(()),
            init_done: Condvar::new(),
        };
        info!(
            device = %device.name,
            size = %ByteSize(store.size),
            allocation = %store.policy,
            lanes = config.lanes,
            staging = %ByteSize(config.staging_bytes as u64),
            verify = config.verify,
            mapped = store.backend.mapped(),
            readahead = store.readahead.as_ref().map_or(0, |r| r.stats().windows),
            compress = %config.compress,
            "block store ready to allocate"
        );
        if let Some(packed) = &store.packed {
            info!(
                "compressed with {}: a {} export on at most {} of VRAM; its page table takes {} of RAM",
                config.compress,
                ByteSize(size),
                ByteSize(resolved.bytes),
                ByteSize(PackedPages::host_bytes(size, budget_chunks))
            );
            if store.policy == AllocationPolicy::Eager {
                packed.allocate_all(store.backend.as_ref())?;
            }
        } else if store.policy == AllocationPolicy::Eager {
            store.allocate_all()?;
        }
        Ok(store)
    }

    /// Size of the device in bytes (a multiple of [`CHUNK_SIZE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn allocation(&self) -> AllocationPolicy {
        self.policy
    }

    pub fn device(&self) -> &DeviceInfo {
        self.backend.device()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn stats(&self) -> StoreStats {
        let compress = self.packed.as_ref().map(PackedPages::stats);
        StoreStats {
            size: self.size,
            allocation: self.policy,
            chunks_total: match &compress {
                Some(packed) => packed.budget / CHUNK_SIZE,
                None => self.slots.len() as u64,
            },
            chunks_allocated: match &compress {
                Some(packed) => packed.vram_used / CHUNK_SIZE,
                None => self.chunks_allocated.load(Ordering::Relaxed),
            },
            blocks_with_data: match &compress {
                Some(packed) => packed.slabs,
                None => self
                    .slots
                    .iter()
                    .map(|s| u64::from(s.data.load(Ordering::Relaxed).count_ones()))
                    .sum(),
            },
            failure: self.failure(),
            verify: self.checksums.is_some() || self.verify_packed(),
            checksum_errors: self.checksum_errors.load(Ordering::Relaxed)
                + compress.map_or(0, |c| c.corrupt_reads),
            readahead: self
                .readahead
                .as_ref()
                .map(ReadAhead::stats)
                .unwrap_or_default(),
            direct: self.direct.stats(),
            gather: self.gather.as_ref().map(Gather::stats).unwrap_or_default(),
            compress,
        }
    }

    /// Why the store stopped serving, if it did (a lost device).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.direct.forget_if_moved(buf);
        self.read_with(buf, offset, false)
    }

    /// [`BlockStore::read`] into the calling thread's request buffer, by DMA
    /// straight into it where it can be (`direct.rs`): a buffer the caller
    /// reuses for this thread's requests and frees or moves only for a
    /// request longer than it held before, or when the thread exits, as
    /// nbdkit does with its per-thread buffer. Every write of the thread
    /// goes through [`BlockStore::write`], which sees a moved buffer too.
    /// A read of at least [`DIRECT_READ`] bytes registers the buffer with
    /// the driver once; until the buffer moves, its reads need no staging.
    pub fn read_direct(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.read_with(buf, offset, true)
    }

    fn read_with(&self, buf: &mut [u8], offset: u64, direct: bool) -> Result<(), StoreError> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(packed) = &self.packed {
            return self.settle(packed.read(&*self.backend, &self.lanes, buf, offset));
        }
        // Windows were filled before this read came: their bytes are in
        // staging already, and a copy out is all that is left.
        if let Some(readahead) = &self.readahead {
            if readahead.read(&self.slots, buf, offset) {
                return Ok(());
            }
        }
        if direct {
            let registration = self.direct.for_read(buf);
            if let Some(region) = registration.region() {
                return self.read_from_vram(buf, offset, Some(region));
            }
        }
        self.read_from_vram(buf, offset, None)
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.direct.forget_if_moved(buf);
        self.check(offset, buf.len() as u64)?;
        if let Some(packed) = &self.packed {
            let source = packed::Source::Bytes(buf);
            let result = packed.write(
                &*self.backend,
                &self.lanes,
                source,
                offset,
                buf.len() as u64,
            );
            return self.settle(result);
        }
        self.write_from(Source::Bytes(buf), offset, buf.len() as u64)
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole blocks are only
    /// marked (no GPU work); with lazy allocation whole chunks go back to
    /// the GPU; partial blocks that hold data are overwritten with zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check(offset, len)?;
        if let Some(packed) = &self.packed {
            let result = packed.write(
                &*self.backend,
                &self.lanes,
                packed::Source::Zeros,
                offset,
                len,
            );
            return self.settle(result);
        }
        self.zero_range(offset, len)
    }

    /// Calls `f(offset, len, holds_data)` for consecutive runs covering
    /// `offset..offset+len`; runs with `holds_data == false` read as zeros.
    pub fn extents(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, bool),
    ) -> Result<(), StoreError> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut runs = Runs { run: None, f };
        if let Some(packed) = &self.packed {
            if len > 0 {
                let page = packed::PAGE as u64;
                packed.pages_with_data(offset / page, (end - 1) / page, |n, data| {
                    let from = (n * page).max(offset);
                    runs.push(from, ((n + 1) * page).min(end) - from, data);
                });
            }
            runs.finish();
            return Ok(());
        }
        let mut pos = offset;
        while pos < end {
            let slot_index = (pos / CHUNK_SIZE) as usize;
            let slot = &self.slots[slot_index];
            let allocated = slot.read_chunk().is_some();
            let bits = if allocated {
                slot.data.load(Ordering::Acquire)
            } else {
                0
            };
            let block = ((pos % CHUNK_SIZE) / BLOCK_SIZE) as usize;
            let block_end =
                (slot_index as u64 * CHUNK_SIZE + (block as u64 + 1) * BLOCK_SIZE).min(end);
            runs.push(pos, block_end - pos, bits & (1 << block) != 0);
            pos = block_end;
        }
        runs.finish();
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed(
                self.failure().unwrap_or_else(|| "unknown".into()),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Records a fatal backend error: from now on every request fails.
    fn outcome(&self, result: Result<(), BackendError>) -> Result<(), StoreError> {
        match result {
            Ok(()) => Ok(()),
            Err(err) => {
                if err.is_fatal() && !self.failed.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        "{}: {err}; every later request fails with EIO",
                        self.device().name
                    );
                    *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                }
                Err(err.into())
            }
        }
    }

    /// [`BlockStore::outcome`] for a compressed store's result: a lost
    /// device stops the store.
    fn settle(&self, result: Result<(), StoreError>) -> Result<(), StoreError> {
        match result {
            Err(StoreError::Backend(err)) => self.outcome(Err(err)),
            other => other,
        }
    }

    fn verify_packed(&self) -> bool {
        self.packed.as_ref().is_some_and(PackedPages::verifies)
    }

    /// About how many lane-sized pieces a request splits into.
    fn piece_count(&self, offset: u64, len: u64) -> usize {
        piece_count(offset, len, self.lanes.piece_bytes)
    }

    /// Bytes of VRAM the store holds now: its allocated chunks (or, with
    /// compression, what its pages take).
    pub fn vram_held(&self) -> u64 {
        match &self.packed {
            Some(packed) => packed.stats().vram_used,
            None => self.chunks_allocated.load(Ordering::Relaxed) * CHUNK_SIZE,
        }
    }

    /// Whether writes go straight into mapped VRAM (`mapped=`).
    pub fn mapped(&self) -> bool {
        self.backend.mapped()
    }

    /// Reads of blocks (or compressed pages) that failed their check,
    /// since open.
    pub fn checksum_errors(&self) -> u64 {
        self.checksum_errors.load(Ordering::Relaxed)
            + self.compress_stats().map_or(0, |c| c.corrupt_reads)
    }

    /// With `compress=`: what the pages hold and take, cheaply (no walk).
    pub fn compress_stats(&self) -> Option<CompressStats> {
        self.packed.as_ref().map(PackedPages::stats)
    }
}

/// [`BlockStore::extents`]' runs: pieces that hold data, or not, merged
/// with their neighbours of the same kind and passed on to `f`.
struct Runs<F: FnMut(u64, u64, bool)> {
    run: Option<(u64, u64, bool)>,
    f: F,
}

impl<F: FnMut(u64, u64, bool)> Runs<F> {
    fn push(&mut self, at: u64, len: u64, data: bool) {
        self.run = match self.run {
            Some((o, l, d)) if d == data => Some((o, l + len, d)),
            Some((o, l, d)) => {
                (self.f)(o, l, d);
                Some((at, len, data))
            }
            None => Some((at, len, data)),
        };
    }

    fn finish(mut self) {
        if let Some((o, l, d)) = self.run.take() {
            (self.f)(o, l, d);
        }
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        self.direct.release_all();
        if let Some(gather) = &self.gather {
            let stats = gather.stats();
            info!(
                "gathered {} small reads into {} batches",
                stats.reads, stats.batches
            );
        }
        if let Some(readahead) = &mut self.readahead {
            readahead.drain();
            let stats = readahead.stats();
            info!(
                "read-ahead: {} reads served from {} windows filled ({} stream reads missed)",
                stats.served, stats.filled, stats.missed
            );
        }
        self.free_all();
    }
}
