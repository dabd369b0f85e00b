//! The block store: a byte-addressed device of N bytes kept in VRAM.
//!
//! The device is cut into [`CHUNK_SIZE`] chunks (one backend allocation
//! each), and each chunk into 64 [`BLOCK_SIZE`] blocks. Per chunk the store
//! keeps two bitmaps: `data` (the block holds bytes on the GPU; a clear bit
//! reads as zeros without touching the GPU) and `busy` (a partial write is
//! zeroing the rest of the block right now; see [`BlockStore::write`]).
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
//! [`crate::checksum`]): set from the caller's bytes as they are copied
//! into staging, updated from the old and new bytes of the range on a
//! partial write (the old ones are downloaded in the same batch, before the
//! upload, into the last two blocks of the lane's staging), and checked
//! over the whole block on every read that downloads it. A block that
//! fails fails its read with EIO and is logged and counted. Blocks that
//! hold no data read as zeros without the GPU, so they need no checksum.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use arrayvec::ArrayVec;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::backend::{
    copy_to_staging, Backend, BackendError, ChunkId, DeviceInfo, Lane, MemoryReport, TransferOp,
    BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE,
};
use crate::checksum::{self, Checksums};
use crate::size::ByteSize;

mod readahead;
use readahead::{Changes, ReadAhead};
pub use readahead::{ReadAheadStats, MAX_WINDOWS, WINDOW_BYTES};

/// VRAM left to other users when the size is automatic.
pub const DEFAULT_RESERVE: u64 = 256 << 20;
/// Staging lanes made at open: enough for nbdkit's 16 worker threads on
/// each of 4 connections to have one each.
pub const DEFAULT_LANES: usize = 64;
/// Bytes of pinned staging per lane. A request larger than this is moved in
/// pieces, several lanes in flight, so copying into host memory overlaps DMA.
/// On the H100 machine, 4 MiB requests from 16 threads reached (of the DMA
/// ceiling, host→VRAM / VRAM→host) 95% / 92% on Vulkan and 84% / 81% on
/// CUDA with 2 MiB, against 88% / 83% and 82% / 74% with 1 MiB in the same
/// run; 128 lanes of 1 MiB gained nothing, so the size of a batch, not the
/// number of lanes, is what counts. 64 lanes lock 128 MiB of RAM.
pub const DEFAULT_STAGING: usize = 2 << 20;
/// Read-ahead windows (of [`WINDOW_BYTES`]) made at open: four streams,
/// such as `nbdcopy`'s four connections, each with the windows it reads
/// and the ones filled ahead of it. 32 windows lock 64 MiB of RAM.
pub const DEFAULT_READAHEAD: usize = 32;
/// Most lanes one request keeps in flight. On the H100 a batch completes
/// 15–50 µs after submit even when tiny; with four in flight the copy into
/// staging, not that latency, sets the pace of a large request.
const MAX_DEPTH: usize = 4;
/// Times a read is retried when a block fails its check while a write to
/// it was in flight: each retry first waits for the writers to finish.
const MAX_TORN_READS: usize = 64;

/// How big the device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// This many bytes, rounded down to a whole chunk.
    Bytes(u64),
    /// What the GPU has available now, less `reserve` for other users.
    Auto { reserve: u64 },
}

impl Default for SizeSpec {
    fn default() -> Self {
        SizeSpec::Auto {
            reserve: DEFAULT_RESERVE,
        }
    }
}

/// When VRAM is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocationPolicy {
    /// All of it at open, so swap never finds the GPU full later.
    #[default]
    Eager,
    /// A chunk at its first write; a write that finds the GPU full fails with
    /// ENOSPC. Whole chunks that are trimmed go back to the GPU.
    Lazy,
}

impl FromStr for AllocationPolicy {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "eager" => Ok(AllocationPolicy::Eager),
            "lazy" => Ok(AllocationPolicy::Lazy),
            _ => Err(StoreError::Config(format!(
                "'{s}' is not an allocation policy: expected eager or lazy"
            ))),
        }
    }
}

impl fmt::Display for AllocationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllocationPolicy::Eager => "eager",
            AllocationPolicy::Lazy => "lazy",
        })
    }
}

/// How to build a [`BlockStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    pub size: SizeSpec,
    pub allocation: AllocationPolicy,
    /// Staging lanes (pinned buffers with their command contexts).
    pub lanes: usize,
    /// Bytes per lane: a multiple of [`BLOCK_SIZE`], at most [`CHUNK_SIZE`]
    /// (and at least 3 blocks with `verify`).
    pub staging_bytes: usize,
    /// Checksum every block on write and check it on read.
    pub verify: bool,
    /// Read-ahead windows (at most [`MAX_WINDOWS`]); 0 turns read-ahead
    /// off. None are made with `verify`: a window's bytes are not checked.
    pub readahead: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            size: SizeSpec::default(),
            allocation: AllocationPolicy::default(),
            lanes: DEFAULT_LANES,
            staging_bytes: DEFAULT_STAGING,
            verify: false,
            readahead: DEFAULT_READAHEAD,
        }
    }
}

/// Errors of the block store. [`StoreError::errno`] gives what NBD clients
/// see.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    #[error("size {requested} is larger than the {available} available on {device}")]
    TooLarge {
        requested: ByteSize,
        available: ByteSize,
        device: String,
    },
    #[error("reserve {reserve} leaves no room: {device} has {available} available")]
    NothingLeft {
        reserve: ByteSize,
        available: ByteSize,
        device: String,
    },
    #[error("size {0} is smaller than one {chunk} chunk", chunk = ByteSize(CHUNK_SIZE))]
    TooSmall(ByteSize),
    #[error("{0}")]
    Config(String),
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no VRAM left for a new chunk")]
    NoSpace,
    #[error("the device has failed and serves no more requests: {0}")]
    Failed(String),
    #[error("checksum mismatch in the 64 KiB block at offset {offset:#x}: its VRAM changed after it was written")]
    Checksum { offset: u64 },
    #[error("the 64 KiB block at offset {offset:#x} kept changing while it was read")]
    Unsettled { offset: u64 },
    #[error("{0}")]
    Backend(BackendError),
}

impl StoreError {
    /// The errno an NBD client should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::OutOfRange { .. } | StoreError::Config(_) => libc::EINVAL,
            StoreError::NoSpace => libc::ENOSPC,
            StoreError::TooLarge { .. } | StoreError::NothingLeft { .. } => libc::ENOSPC,
            StoreError::TooSmall(_) => libc::EINVAL,
            StoreError::Failed(_)
            | StoreError::Backend(_)
            | StoreError::Checksum { .. }
            | StoreError::Unsettled { .. } => libc::EIO,
        }
    }
}

impl From<BackendError> for StoreError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::OutOfDeviceMemory => StoreError::NoSpace,
            other => StoreError::Backend(other),
        }
    }
}

/// The size a store gets: `bytes`, and what the user asked for when that
/// was not a whole number of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedSize {
    pub bytes: u64,
    pub rounded_from: Option<u64>,
}

/// Turns a [`SizeSpec`] into a byte count for a device with `memory`, or
/// says clearly why it cannot be served.
pub fn resolve_size(
    spec: SizeSpec,
    policy: AllocationPolicy,
    memory: MemoryReport,
    device: &str,
) -> Result<ResolvedSize, StoreError> {
    let round = |n: u64| n - n % CHUNK_SIZE;
    match spec {
        SizeSpec::Bytes(requested) => {
            let bytes = round(requested);
            if bytes == 0 {
                return Err(StoreError::TooSmall(ByteSize(requested)));
            }
            // Eager must fit what is free now; lazy may overcommit what is
            // free but never the device itself.
            let limit = match policy {
                AllocationPolicy::Eager => memory.available,
                AllocationPolicy::Lazy => memory.total,
            };
            if bytes > limit {
                return Err(StoreError::TooLarge {
                    requested: ByteSize(bytes),
                    available: ByteSize(limit),
                    device: device.to_string(),
                });
            }
            Ok(ResolvedSize {
                bytes,
                rounded_from: (bytes != requested).then_some(requested),
            })
        }
        SizeSpec::Auto { reserve } => {
            let bytes = round(memory.available.saturating_sub(reserve));
            if bytes == 0 {
                return Err(StoreError::NothingLeft {
                    reserve: ByteSize(reserve),
                    available: ByteSize(memory.available),
                    device: device.to_string(),
                });
            }
            Ok(ResolvedSize {
                bytes,
                rounded_from: None,
            })
        }
    }
}

/// One chunk of the device and what is known about its blocks.
struct ChunkSlot {
    chunk: RwLock<Option<ChunkId>>,
    /// Bit b set: block b holds bytes on the GPU.
    data: AtomicU64,
    /// Bit b set: a partial write is zeroing block b before writing into it.
    busy: AtomicU64,
    /// Every change to the chunk's bytes, for read-ahead's windows.
    changes: Changes,
}

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
}

/// A byte-addressed device in VRAM. Safe to share between threads.
pub struct BlockStore {
    backend: Arc<dyn Backend>,
    size: u64,
    policy: AllocationPolicy,
    slots: Box<[ChunkSlot]>,
    lanes: LanePool,
    chunks_allocated: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// `verify`: a checksum per block, indexed `slot * 64 + block`.
    checksums: Option<Checksums>,
    checksum_errors: AtomicU64,
    readahead: Option<ReadAhead>,
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

/// Where one piece of a request goes: a range of one chunk that fits one
/// lane's staging buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    slot: usize,
    /// Offset inside the chunk.
    start: u64,
    len: u64,
    /// Offset of the piece inside the caller's buffer.
    buf: usize,
}

impl Piece {
    fn first_block(&self) -> usize {
        (self.start / BLOCK_SIZE) as usize
    }
    fn last_block(&self) -> usize {
        ((self.start + self.len - 1) / BLOCK_SIZE) as usize
    }
    /// Bits of the blocks this piece touches.
    fn block_mask(&self) -> u64 {
        span_mask(self.first_block(), self.last_block())
    }
    /// Bits of the blocks this piece covers completely.
    fn whole_block_mask(&self) -> u64 {
        whole_blocks_mask(self.start, self.len)
    }
}

/// Bits `first..=last`.
fn span_mask(first: usize, last: usize) -> u64 {
    let upper = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    upper & !((1u64 << first) - 1)
}

/// Bits of the blocks that `start..start+len` (inside one chunk) covers
/// completely.
fn whole_blocks_mask(start: u64, len: u64) -> u64 {
    let first = start.div_ceil(BLOCK_SIZE) as usize;
    let end = ((start + len) / BLOCK_SIZE) as usize;
    if end <= first {
        0
    } else {
        span_mask(first, end - 1)
    }
}

/// What a submitted piece still needs once its batch is done.
#[derive(Debug, Clone, Copy)]
struct Pending {
    piece: Piece,
    /// Reads: blocks that were downloaded and must be copied out.
    download_bits: u64,
    /// Reads: the chunk offset that staging byte 0 holds (the piece's
    /// start, or with `verify` the start of its first block).
    staging_origin: u64,
    /// Writes: blocks that hold data once the batch is done.
    set_bits: u64,
    /// Writes: busy bits this request holds, cleared when done.
    busy_bits: u64,
    /// `verify` only: see [`Sums`].
    sums: Sums,
}

/// A piece's checksum work (`verify`), carried from submit to finish.
#[derive(Debug, Clone, Copy)]
struct Sums {
    /// Writes: the new checksum of each whole block, by block in the chunk;
    /// reads: each downloaded block's write sequence before the download.
    per_block: [u32; BLOCKS_PER_CHUNK],
    /// Writes: the blocks written in part.
    partial: [Option<PartialBlock>; 2],
}

impl Default for Sums {
    fn default() -> Self {
        Sums {
            per_block: [0; BLOCKS_PER_CHUNK],
            partial: [None; 2],
        }
    }
}

/// A block a write covers only in part.
#[derive(Debug, Clone, Copy)]
struct PartialBlock {
    block: usize,
    /// The written range, as chunk offsets.
    from: u64,
    to: u64,
    /// Raw CRC of the new bytes of the range.
    new: u32,
    /// Where the old bytes of the range were downloaded in staging, or
    /// `None` when the block was zeroed in this batch (no old bytes).
    old_at: Option<usize>,
}

/// How the checksums of a read came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Clean,
    /// A block failed while a write to it was in flight: read it again.
    Torn,
    /// A block failed with no write near it: its VRAM changed. The device
    /// offset of the first such block.
    Corrupt(u64),
}

/// Where bytes come from in a write.
#[derive(Clone, Copy)]
enum Source<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

impl BlockStore {
    /// Builds a store on `backend`: resolves the size, makes the staging
    /// lanes and, for eager allocation, takes and zeroes all VRAM now.
    pub fn open(backend: Arc<dyn Backend>, config: &StoreConfig) -> Result<Self, StoreError> {
        if config.lanes == 0 {
            return Err(StoreError::Config("lanes must be at least 1".into()));
        }
        if config.staging_bytes == 0
            || config.staging_bytes as u64 % BLOCK_SIZE != 0
            || config.staging_bytes as u64 > CHUNK_SIZE
        {
            return Err(StoreError::Config(format!(
                "staging buffer {} must be a multiple of {} and at most {}",
                ByteSize(config.staging_bytes as u64),
                ByteSize(BLOCK_SIZE),
                ByteSize(CHUNK_SIZE)
            )));
        }
        if config.readahead > MAX_WINDOWS {
            return Err(StoreError::Config(format!(
                "at most {MAX_WINDOWS} read-ahead windows"
            )));
        }
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
        let chunk_count = (resolved.bytes / CHUNK_SIZE) as usize;
        let slots = (0..chunk_count)
            .map(|_| ChunkSlot {
                chunk: RwLock::new(None),
                data: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                changes: Changes::default(),
            })
            .collect();
        if config.verify && (config.staging_bytes as u64) < 3 * BLOCK_SIZE {
            return Err(StoreError::Config(format!(
                "verify needs staging buffers of at least {}: two blocks of each hold the old bytes of partial writes",
                ByteSize(3 * BLOCK_SIZE)
            )));
        }
        let lanes = LanePool::new(
            backend.as_ref(),
            config.lanes,
            config.staging_bytes,
            config.verify,
        )?;
        let readahead = match config.readahead {
            0 => None,
            _ if config.verify => None,
            windows => Some(ReadAhead::new(backend.as_ref(), windows)?),
        };
        let store = BlockStore {
            backend,
            size: resolved.bytes,
            policy: config.allocation,
            slots,
            lanes,
            chunks_allocated: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            checksums: config
                .verify
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
            readahead = store.readahead.as_ref().map_or(0, |r| r.stats().windows),
            "block store ready to allocate"
        );
        if store.policy == AllocationPolicy::Eager {
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
        StoreStats {
            size: self.size,
            allocation: self.policy,
            chunks_total: self.slots.len() as u64,
            chunks_allocated: self.chunks_allocated.load(Ordering::Relaxed),
            blocks_with_data: self
                .slots
                .iter()
                .map(|s| u64::from(s.data.load(Ordering::Relaxed).count_ones()))
                .sum(),
            failure: self.failure(),
            verify: self.checksums.is_some(),
            checksum_errors: self.checksum_errors.load(Ordering::Relaxed),
            readahead: self
                .readahead
                .as_ref()
                .map(ReadAhead::stats)
                .unwrap_or_default(),
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
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(readahead) = &self.readahead {
            if readahead.read(&self.slots, buf, offset) {
                return Ok(());
            }
        }
        let mut lanes = self
            .lanes
            .acquire(self.piece_count(offset, buf.len() as u64));
        let mut done = 0usize;
        while done < buf.len() {
            let (slot_index, start, len) = self.segment(offset + done as u64, buf.len() - done);
            let slot = &self.slots[slot_index];
            let guard = read_lock(&slot.chunk);
            let out = &mut buf[done..done + len as usize];
            let mut result = Ok(Verdict::Clean);
            for _ in 0..MAX_TORN_READS {
                result = match *guard {
                    None => {
                        out.fill(0);
                        Ok(Verdict::Clean)
                    }
                    Some(chunk) => self.read_segment(&mut lanes, slot_index, chunk, start, out),
                };
                if result != Ok(Verdict::Torn) {
                    break;
                }
                self.wait_for_writers(slot_index, start, len);
            }
            // Every copy into this chunk is finished before its lock goes.
            let drained = lanes.drain();
            drop(guard);
            match result.and_then(|verdict| drained.map(|()| verdict)) {
                Ok(Verdict::Clean) => {}
                Ok(Verdict::Corrupt(offset)) => return Err(StoreError::Checksum { offset }),
                Ok(Verdict::Torn) => {
                    return Err(StoreError::Unsettled {
                        offset: offset + done as u64,
                    })
                }
                Err(err) => self.outcome(Err(err))?,
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.check(offset, buf.len() as u64)?;
        self.write_from(Source::Bytes(buf), offset, buf.len() as u64)
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole blocks are only
    /// marked (no GPU work); with lazy allocation whole chunks go back to
    /// the GPU; partial blocks that hold data are overwritten with zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check(offset, len)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (slot_index, start, seg_len) = self.segment(pos, (end - pos) as usize);
            let slot = &self.slots[slot_index];
            let _change = slot.changes.begin();
            if seg_len == CHUNK_SIZE && self.policy == AllocationPolicy::Lazy {
                self.free_slot(slot_index);
            } else {
                slot.data
                    .fetch_and(!whole_blocks_mask(start, seg_len), Ordering::AcqRel);
                // Partial blocks at the ends: only those that hold data need
                // zeros written; a clear block already reads as zeros.
                let seg_end = start + seg_len;
                let mut partial: ArrayVec<(u64, u64), 2> = ArrayVec::new();
                if start % BLOCK_SIZE != 0 {
                    partial.push((start, seg_end.min(start - start % BLOCK_SIZE + BLOCK_SIZE)));
                }
                if seg_end % BLOCK_SIZE != 0 {
                    let tail = (seg_end - seg_end % BLOCK_SIZE).max(start);
                    if partial.first().is_none_or(|&(head, _)| head != tail) {
                        partial.push((tail, seg_end));
                    }
                }
                let data = slot.data.load(Ordering::Acquire);
                for (from, to) in partial {
                    if data & (1 << (from / BLOCK_SIZE)) != 0 {
                        let device_offset = slot_index as u64 * CHUNK_SIZE + from;
                        self.write_from(Source::Zeros, device_offset, to - from)?;
                    }
                }
            }
            pos += seg_len;
        }
        Ok(())
    }

    /// Calls `f(offset, len, holds_data)` for consecutive runs covering
    /// `offset..offset+len`; runs with `holds_data == false` read as zeros.
    pub fn extents(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<(), StoreError> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut run: Option<(u64, u64, bool)> = None;
        let mut pos = offset;
        while pos < end {
            let slot_index = (pos / CHUNK_SIZE) as usize;
            let slot = &self.slots[slot_index];
            let allocated = read_lock(&slot.chunk).is_some();
            let bits = if allocated {
                slot.data.load(Ordering::Acquire)
            } else {
                0
            };
            let block = ((pos % CHUNK_SIZE) / BLOCK_SIZE) as usize;
            let block_end =
                (slot_index as u64 * CHUNK_SIZE + (block as u64 + 1) * BLOCK_SIZE).min(end);
            let data = bits & (1 << block) != 0;
            let piece = block_end - pos;
            run = match run {
                Some((o, l, d)) if d == data => Some((o, l + piece, d)),
                Some((o, l, d)) => {
                    f(o, l, d);
                    Some((pos, piece, data))
                }
                None => Some((pos, piece, data)),
            };
            pos = block_end;
        }
        if let Some((o, l, d)) = run {
            f(o, l, d);
        }
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

    /// About how many lane-sized pieces a request splits into.
    fn piece_count(&self, offset: u64, len: u64) -> usize {
        let first = offset / BLOCK_SIZE * BLOCK_SIZE;
        (offset + len - first).div_ceil(self.lanes.piece_bytes) as usize
    }

    /// The chunk holding `pos`, the offset in it and how much of `remaining`
    /// lies in it.
    fn segment(&self, pos: u64, remaining: usize) -> (usize, u64, u64) {
        let slot = (pos / CHUNK_SIZE) as usize;
        let start = pos % CHUNK_SIZE;
        let len = (CHUNK_SIZE - start).min(remaining as u64);
        (slot, start, len)
    }

    /// Splits `start..start+len` of a chunk into lane-sized pieces that end
    /// on block boundaries, so only a request's first and last block can be
    /// partial.
    fn pieces(&self, slot: usize, start: u64, len: u64) -> impl Iterator<Item = Piece> {
        let staging = self.lanes.piece_bytes;
        let end = start + len;
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let limit = (pos / BLOCK_SIZE) * BLOCK_SIZE + staging;
            let piece_end = limit.min(end);
            let piece = Piece {
                slot,
                start: pos,
                len: piece_end - pos,
                buf: (pos - start) as usize,
            };
            pos = piece_end;
            Some(piece)
        })
    }

    /// Reads one chunk's part of a request; with `verify`, says whether
    /// every downloaded block passed its check.
    fn read_segment(
        &self,
        lanes: &mut Lanes<'_>,
        slot_index: usize,
        chunk: ChunkId,
        start: u64,
        out: &mut [u8],
    ) -> Result<Verdict, BackendError> {
        let mut verdict = Verdict::Clean;
        let submitted = self.read_pieces(lanes, slot_index, chunk, start, out, &mut verdict);
        let finished = lanes
            .finish_all(|pending, lane, ok| self.finish_read(pending, lane, ok, out, &mut verdict));
        submitted.and(finished).map(|()| verdict)
    }

    fn read_pieces(
        &self,
        lanes: &mut Lanes<'_>,
        slot_index: usize,
        chunk: ChunkId,
        start: u64,
        out: &mut [u8],
        verdict: &mut Verdict,
    ) -> Result<(), BackendError> {
        let slot = &self.slots[slot_index];
        for piece in self.pieces(slot_index, start, out.len() as u64) {
            let lane = lanes
                .next_free(|pending, lane, ok| self.finish_read(pending, lane, ok, out, verdict))?;
            let bits = slot.data.load(Ordering::Acquire) & piece.block_mask();
            // With verify, whole blocks are downloaded (the checksum covers
            // the block), from the first block's start.
            let origin = match self.checksums {
                Some(_) => piece.first_block() as u64 * BLOCK_SIZE,
                None => piece.start,
            };
            let mut sums = Sums::default();
            let mut ops: ArrayVec<TransferOp, BLOCKS_PER_CHUNK> = ArrayVec::new();
            let mut block = piece.first_block();
            while block <= piece.last_block() {
                let run_start = block;
                let holds = bits & (1 << block) != 0;
                while block <= piece.last_block() && (bits & (1 << block) != 0) == holds {
                    block += 1;
                }
                let from = (run_start as u64 * BLOCK_SIZE).max(piece.start);
                let to = (block as u64 * BLOCK_SIZE).min(piece.start + piece.len);
                if holds {
                    let (from, to) = match &self.checksums {
                        Some(checksums) => {
                            for b in run_start..block {
                                sums.per_block[b] =
                                    checksums.snapshot(slot_index * BLOCKS_PER_CHUNK + b);
                            }
                            (run_start as u64 * BLOCK_SIZE, block as u64 * BLOCK_SIZE)
                        }
                        None => (from, to),
                    };
                    ops.push(TransferOp::Download {
                        staging_offset: (from - origin) as usize,
                        chunk,
                        chunk_offset: from,
                        len: to - from,
                    });
                } else {
                    let at = piece.buf + (from - piece.start) as usize;
                    out[at..at + (to - from) as usize].fill(0);
                }
            }
            if !ops.is_empty() {
                lanes.submit(
                    lane,
                    &ops,
                    Pending {
                        piece,
                        download_bits: bits,
                        staging_origin: origin,
                        set_bits: 0,
                        busy_bits: 0,
                        sums,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Copies a finished read's downloaded blocks out, checking each one's
    /// checksum first with `verify`.
    fn finish_read(
        &self,
        pending: &Pending,
        lane: &mut dyn Lane,
        ok: bool,
        out: &mut [u8],
        verdict: &mut Verdict,
    ) {
        if !ok {
            return;
        }
        let piece = pending.piece;
        let origin = pending.staging_origin;
        let staging = lane.staging();
        for block in piece.first_block()..=piece.last_block() {
            if pending.download_bits & (1 << block) == 0 {
                continue;
            }
            let block_start = block as u64 * BLOCK_SIZE;
            if let Some(checksums) = &self.checksums {
                let at = (block_start - origin) as usize;
                let index = piece.slot * BLOCKS_PER_CHUNK + block;
                let sum = checksum::block(&staging[at..at + BLOCK_SIZE as usize]);
                if sum != checksums.get(index) {
                    if checksums.changed_since(index, pending.sums.per_block[block]) {
                        *verdict = (*verdict).max(Verdict::Torn);
                    } else {
                        let offset = piece.slot as u64 * CHUNK_SIZE + block_start;
                        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            offset,
                            "{}: checksum mismatch in the 64 KiB block at offset {offset:#x}: \
                             its VRAM changed after it was written (read fails with EIO)",
                            self.device().name
                        );
                        if !matches!(verdict, Verdict::Corrupt(_)) {
                            *verdict = Verdict::Corrupt(offset);
                        }
                    }
                    continue;
                }
            }
            let from = block_start.max(piece.start);
            let to = (block_start + BLOCK_SIZE).min(piece.start + piece.len);
            let s = (from - origin) as usize;
            let n = (to - from) as usize;
            let at = piece.buf + (from - piece.start) as usize;
            out[at..at + n].copy_from_slice(&staging[s..s + n]);
        }
    }

    /// Waits until no write is in flight on the blocks of a segment.
    fn wait_for_writers(&self, slot_index: usize, start: u64, len: u64) {
        let Some(checksums) = &self.checksums else {
            return;
        };
        let first = slot_index * BLOCKS_PER_CHUNK + (start / BLOCK_SIZE) as usize;
        let last = slot_index * BLOCKS_PER_CHUNK + ((start + len - 1) / BLOCK_SIZE) as usize;
        while (first..=last).any(|b| checksums.writing(b)) {
            std::thread::yield_now();
        }
    }

    /// Reads of blocks that failed their checksum, since open.
    pub fn checksum_errors(&self) -> u64 {
        self.checksum_errors.load(Ordering::Relaxed)
    }

    fn write_from(&self, source: Source<'_>, offset: u64, len: u64) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        let mut lanes = self.lanes.acquire(self.piece_count(offset, len));
        let mut done = 0u64;
        while done < len {
            let (slot_index, start, seg_len) = self.segment(offset + done, (len - done) as usize);
            let slot = &self.slots[slot_index];
            // Goes after the drain below: the change is done on the GPU.
            let _change = slot.changes.begin();
            let (guard, chunk) = loop {
                let guard = read_lock(&slot.chunk);
                if let Some(chunk) = *guard {
                    break (guard, chunk);
                }
                drop(guard);
                // Lazy: the first write takes the chunk. It is allocated
                // again if a trim gave it back between here and the lock.
                self.allocate_slot(slot_index, &mut lanes)?;
            };
            let part = match source {
                Source::Bytes(b) => Source::Bytes(&b[done as usize..(done + seg_len) as usize]),
                Source::Zeros => Source::Zeros,
            };
            let result = self.write_segment(&mut lanes, slot_index, chunk, start, seg_len, part);
            let drained = lanes.drain();
            drop(guard);
            self.outcome(result.and(drained))?;
            done += seg_len;
        }
        Ok(())
    }

    fn write_segment(
        &self,
        lanes: &mut Lanes<'_>,
        slot_index: usize,
        chunk: ChunkId,
        start: u64,
        len: u64,
        source: Source<'_>,
    ) -> Result<(), BackendError> {
        let finish =
            |pending: &Pending, lane: &mut dyn Lane, ok: bool| self.finish_write(pending, lane, ok);
        let submitted = self.write_pieces(lanes, slot_index, chunk, start, len, source, finish);
        // Runs even after an error, so busy bits are always released.
        let finished = lanes.finish_all(finish);
        submitted.and(finished)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_pieces(
        &self,
        lanes: &mut Lanes<'_>,
        slot_index: usize,
        chunk: ChunkId,
        start: u64,
        len: u64,
        source: Source<'_>,
        finish: impl Fn(&Pending, &mut dyn Lane, bool) + Copy,
    ) -> Result<(), BackendError> {
        for piece in self.pieces(slot_index, start, len) {
            let lane = lanes.next_free(finish)?;
            let reserve = self.lanes.piece_bytes as usize;
            let staging = &mut lanes.lane(lane).staging()[..piece.len as usize];
            let whole = piece.whole_block_mask();
            let mut sums = Sums::default();
            let src = match source {
                Source::Bytes(b) => Some(&b[piece.buf..piece.buf + piece.len as usize]),
                Source::Zeros => None,
            };
            match (src, &self.checksums) {
                (Some(src), None) => copy_to_staging(staging, src),
                (Some(src), Some(_)) => {
                    // Block by block, the checksum first: the copy then
                    // reads the bytes from cache, not memory.
                    let mut at = 0;
                    for block in piece.first_block()..=piece.last_block() {
                        let end = (((block + 1) as u64 * BLOCK_SIZE).min(piece.start + piece.len)
                            - piece.start) as usize;
                        if whole & (1 << block) != 0 {
                            sums.per_block[block] = checksum::block(&src[at..end]);
                        }
                        copy_to_staging(&mut staging[at..end], &src[at..end]);
                        at = end;
                    }
                }
                (None, checksums) => {
                    staging.fill(0);
                    if let Some(checksums) = checksums {
                        sums.per_block.fill(checksums.zero_block());
                    }
                }
            }
            let mut ops: ArrayVec<TransferOp, 5> = ArrayVec::new();
            let mut downloads: ArrayVec<TransferOp, 2> = ArrayVec::new();
            let mut busy_bits = 0;
            let mut partial_bits = 0;
            for block in [piece.first_block(), piece.last_block()] {
                let bit = 1u64 << block;
                if whole & bit != 0 || partial_bits & bit != 0 {
                    continue;
                }
                partial_bits |= bit;
                let zeroed = self.claim_block_init(slot_index, bit);
                if zeroed {
                    busy_bits |= bit;
                    ops.push(TransferOp::Zero {
                        chunk,
                        chunk_offset: block as u64 * BLOCK_SIZE,
                        len: BLOCK_SIZE,
                    });
                }
                if self.checksums.is_some() {
                    let from = (block as u64 * BLOCK_SIZE).max(piece.start);
                    let to = ((block as u64 + 1) * BLOCK_SIZE).min(piece.start + piece.len);
                    let range = (from - piece.start) as usize..(to - piece.start) as usize;
                    let new = match src {
                        Some(src) => checksum::raw(&src[range]),
                        None => 0,
                    };
                    // The old bytes of the range, read before the upload
                    // overwrites them, into this block's reserve.
                    let old_at = (!zeroed).then(|| {
                        let at = reserve + downloads.len() * BLOCK_SIZE as usize;
                        downloads.push(TransferOp::Download {
                            staging_offset: at,
                            chunk,
                            chunk_offset: from,
                            len: to - from,
                        });
                        at
                    });
                    let slot = if block == piece.first_block() { 0 } else { 1 };
                    sums.partial[slot] = Some(PartialBlock {
                        block,
                        from,
                        to,
                        new,
                        old_at,
                    });
                }
            }
            ops.extend(downloads);
            ops.push(TransferOp::Upload {
                staging_offset: 0,
                chunk,
                chunk_offset: piece.start,
                len: piece.len,
            });
            let pending = Pending {
                piece,
                download_bits: 0,
                staging_origin: piece.start,
                set_bits: whole | busy_bits,
                busy_bits,
                sums,
            };
            if let Some(checksums) = &self.checksums {
                for block in piece.first_block()..=piece.last_block() {
                    checksums.begin_write(slot_index * BLOCKS_PER_CHUNK + block);
                }
            }
            if let Err(err) = lanes.submit(lane, &ops, pending) {
                self.finish_write(&pending, lanes.lane(lane), false);
                return Err(err);
            }
        }
        Ok(())
    }

    /// For a block a write covers only partly: returns true when the caller
    /// must zero the block first (and now holds its busy bit); false when
    /// the block already holds data. Waits while another writer zeroes it.
    fn claim_block_init(&self, slot_index: usize, bit: u64) -> bool {
        let slot = &self.slots[slot_index];
        loop {
            if slot.data.load(Ordering::Acquire) & bit != 0 {
                return false;
            }
            if slot.busy.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                // Won the claim; another writer may have finished in between.
                if slot.data.load(Ordering::Acquire) & bit != 0 {
                    self.release_busy(slot_index, bit);
                    return false;
                }
                return true;
            }
            let mut guard = self.init_guard();
            while slot.busy.load(Ordering::Acquire) & bit != 0 {
                guard = self
                    .init_done
                    .wait(guard)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn init_guard(&self) -> MutexGuard<'_, ()> {
        self.init_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_busy(&self, slot_index: usize, bits: u64) {
        if bits == 0 {
            return;
        }
        let _guard = self.init_guard();
        self.slots[slot_index]
            .busy
            .fetch_and(!bits, Ordering::AcqRel);
        self.init_done.notify_all();
    }

    fn finish_write(&self, pending: &Pending, lane: &mut dyn Lane, ok: bool) {
        let piece = pending.piece;
        let slot = &self.slots[piece.slot];
        if let Some(checksums) = &self.checksums {
            let base = piece.slot * BLOCKS_PER_CHUNK;
            // A failed batch may have written some of its bytes: the old
            // checksums stay, and reading those blocks fails their check.
            if ok {
                self.update_checksums(checksums, pending, lane);
            }
            for block in piece.first_block()..=piece.last_block() {
                checksums.end_write(base + block);
            }
        }
        if ok {
            slot.data.fetch_or(pending.set_bits, Ordering::AcqRel);
        }
        self.release_busy(piece.slot, pending.busy_bits);
    }

    /// A finished write's checksums: whole blocks get theirs, partial
    /// blocks the change of their range.
    fn update_checksums(&self, checksums: &Checksums, pending: &Pending, lane: &mut dyn Lane) {
        let piece = pending.piece;
        let base = piece.slot * BLOCKS_PER_CHUNK;
        let whole = piece.whole_block_mask();
        for block in piece.first_block()..=piece.last_block() {
            if whole & (1 << block) != 0 {
                checksums.set(base + block, pending.sums.per_block[block]);
            }
        }
        let staging = lane.staging();
        for partial in pending.sums.partial.iter().flatten() {
            let after = (partial.block as u64 + 1) * BLOCK_SIZE - partial.to;
            let index = base + partial.block;
            match partial.old_at {
                None => checksums.set(index, checksums.zeroed_then(partial.new, after)),
                Some(at) => {
                    let old =
                        checksum::raw(&staging[at..at + (partial.to - partial.from) as usize]);
                    checksums.apply(index, checksums.delta(old, partial.new, after));
                }
            }
        }
    }

    /// Takes a chunk for an empty slot and zeroes it (lazy allocation).
    fn allocate_slot(&self, slot_index: usize, lanes: &mut Lanes<'_>) -> Result<(), StoreError> {
        let slot = &self.slots[slot_index];
        let mut guard = slot.chunk.write().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            return Ok(());
        }
        let chunk = self.backend.allocate_chunk()?;
        let lane = lanes.first();
        let zeroed = lane
            .submit(&[TransferOp::Zero {
                chunk,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            }])
            .and_then(|()| lane.wait());
        if let Err(err) = zeroed {
            self.backend.free_chunk(chunk);
            return self.outcome(Err(err));
        }
        slot.data.store(0, Ordering::Release);
        *guard = Some(chunk);
        self.chunks_allocated.fetch_add(1, Ordering::Relaxed);
        debug!(slot = slot_index, ?chunk, "chunk allocated");
        Ok(())
    }

    /// Gives a slot's chunk back to the GPU once no copy is using it,
    /// scrubbed first when it held data (see [`scrub_and_free`]). The
    /// caller counts this as a change of the chunk (`zero`'s `Change`), so
    /// no window is filled from it meanwhile.
    fn free_slot(&self, slot_index: usize) {
        let slot = &self.slots[slot_index];
        // The lane before the slot's lock, the order every writer takes them.
        let mut lanes = self.lanes.acquire(1);
        let mut guard = slot.chunk.write().unwrap_or_else(|e| e.into_inner());
        if let Some(readahead) = &self.readahead {
            readahead.forget_chunk(slot_index);
        }
        let held_data = slot.data.swap(0, Ordering::AcqRel) != 0;
        if let Some(chunk) = guard.take() {
            if held_data {
                scrub_and_free(&*self.backend, lanes.first(), &[chunk]);
            } else {
                self.backend.free_chunk(chunk);
            }
            self.chunks_allocated.fetch_sub(1, Ordering::Relaxed);
            debug!(slot = slot_index, ?chunk, "chunk freed");
        }
    }

    /// Eager allocation: every chunk now, zeroed in batches on one lane.
    /// On failure the chunks already installed are freed by `Drop`.
    fn allocate_all(&self) -> Result<(), StoreError> {
        const BATCH: usize = 64;
        let total = self.slots.len();
        let mut lanes = self.lanes.acquire(1);
        let mut next_report = total / 10;
        let mut start = 0;
        while start < total {
            let end = (start + BATCH).min(total);
            let mut batch: ArrayVec<ChunkId, BATCH> = ArrayVec::new();
            let mut zeroes: ArrayVec<TransferOp, BATCH> = ArrayVec::new();
            let mut result = Ok(());
            for _ in start..end {
                match self.backend.allocate_chunk() {
                    Ok(chunk) => {
                        batch.push(chunk);
                        zeroes.push(TransferOp::Zero {
                            chunk,
                            chunk_offset: 0,
                            len: CHUNK_SIZE,
                        });
                    }
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                }
            }
            let lane = lanes.first();
            let result = result
                .and_then(|()| lane.submit(&zeroes))
                .and_then(|()| lane.wait());
            if let Err(err) = result {
                for chunk in batch {
                    self.backend.free_chunk(chunk);
                }
                if err == BackendError::OutOfDeviceMemory {
                    return Err(StoreError::TooLarge {
                        requested: ByteSize(self.size),
                        available: ByteSize((start + zeroes.len()) as u64 * CHUNK_SIZE),
                        device: self.device().name.clone(),
                    });
                }
                return self.outcome(Err(err));
            }
            for (slot, chunk) in self.slots[start..end].iter().zip(batch) {
                *slot.chunk.write().unwrap_or_else(|e| e.into_inner()) = Some(chunk);
            }
            self.chunks_allocated
                .fetch_add((end - start) as u64, Ordering::Relaxed);
            if end >= next_report && total >= 100 {
                info!(
                    "allocated and zeroed {} of {}",
                    ByteSize(end as u64 * CHUNK_SIZE),
                    ByteSize(self.size)
                );
                next_report = end + total / 10;
            }
            start = end;
        }
        Ok(())
    }
}

fn read_lock(lock: &RwLock<Option<ChunkId>>) -> RwLockReadGuard<'_, Option<ChunkId>> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Zeroes chunks on the GPU, then gives them back: VRAM we hand back to
/// the driver never carries swapped-out pages to its next user, whatever the
/// driver does (neither Vulkan nor CUDA promises to clear memory between
/// processes). A failed scrub (a lost device) still frees the chunks; it is
/// logged, and a lost device is torn down by its driver anyway.
fn scrub_and_free(backend: &dyn Backend, lane: &mut dyn Lane, chunks: &[ChunkId]) {
    let mut scrubbing = true;
    for batch in chunks.chunks(64) {
        let zeroes: ArrayVec<TransferOp, 64> = batch
            .iter()
            .map(|&chunk| TransferOp::Zero {
                chunk,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            })
            .collect();
        if scrubbing {
            if let Err(err) = lane.submit(&zeroes).and_then(|()| lane.wait()) {
                warn!(%err, "could not scrub VRAM before freeing it; freeing it as it is");
                scrubbing = false;
            }
        }
        for &chunk in batch {
            backend.free_chunk(chunk);
        }
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        if let Some(readahead) = &mut self.readahead {
            readahead.drain();
            let stats = readahead.stats();
            info!(
                "read-ahead: {} reads served from {} windows filled ({} stream reads missed)",
                stats.served, stats.filled, stats.missed
            );
        }
        let chunks: Vec<ChunkId> = self
            .slots
            .iter_mut()
            .filter_map(|slot| slot.chunk.get_mut().ok().and_then(Option::take))
            .collect();
        let mut lanes = self.lanes.acquire(1);
        scrub_and_free(&*self.backend, lanes.first(), &chunks);
    }
}

/// The staging lanes of a store, made once at open.
struct LanePool {
    lanes: Box<[Mutex<Box<dyn Lane>>]>,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
    /// Staging bytes a piece of a request may use: all of it, or with
    /// `verify` all but the last two blocks, which take the old bytes of a
    /// partial write's first and last block.
    piece_bytes: u64,
}

impl LanePool {
    fn new(
        backend: &dyn Backend,
        count: usize,
        staging_bytes: usize,
        verify: bool,
    ) -> Result<Self, StoreError> {
        let lanes = (0..count)
            .map(|_| backend.create_lane(staging_bytes).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?
            .into_boxed_slice();
        Ok(LanePool {
            lanes,
            free: Mutex::new((0..count).rev().collect()),
            returned: Condvar::new(),
            piece_bytes: staging_bytes as u64 - if verify { 2 * BLOCK_SIZE } else { 0 },
        })
    }

    /// One lane, waiting for it if all are busy, and up to `wanted - 1`
    /// more (at most [`MAX_DEPTH`] in all) that are free right now: never
    /// waiting for more while holding one, so lanes cannot deadlock.
    fn acquire(&self, wanted: usize) -> Lanes<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let first = loop {
            match free.pop() {
                Some(index) => break index,
                None => free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner()),
            }
        };
        let mut indices: ArrayVec<usize, MAX_DEPTH> = ArrayVec::new();
        indices.push(first);
        while indices.len() < wanted.min(MAX_DEPTH) {
            match free.pop() {
                Some(index) => indices.push(index),
                None => break,
            }
        }
        drop(free);
        let mut held: ArrayVec<HeldLane<'_>, MAX_DEPTH> = ArrayVec::new();
        for index in indices {
            held.push(HeldLane {
                index,
                lane: self.lanes[index].lock().unwrap_or_else(|e| e.into_inner()),
                pending: None,
            });
        }
        Lanes {
            pool: self,
            held,
            next: 0,
        }
    }
}

struct HeldLane<'p> {
    index: usize,
    lane: MutexGuard<'p, Box<dyn Lane>>,
    pending: Option<Pending>,
}

/// The lanes a request holds, used in turn: while some batches are in
/// flight the next piece is copied into another lane's staging.
struct Lanes<'p> {
    pool: &'p LanePool,
    held: ArrayVec<HeldLane<'p>, MAX_DEPTH>,
    next: usize,
}

impl Lanes<'_> {
    fn first(&mut self) -> &mut dyn Lane {
        self.held[0].lane.as_mut()
    }

    fn lane(&mut self, index: usize) -> &mut dyn Lane {
        self.held[index].lane.as_mut()
    }

    /// The lane to fill next; if its previous batch is still pending, waits
    /// for it and runs `finish` on it first.
    fn next_free(
        &mut self,
        mut finish: impl FnMut(&Pending, &mut dyn Lane, bool),
    ) -> Result<usize, BackendError> {
        let index = self.next;
        self.next = (self.next + 1) % self.held.len();
        self.complete(index, &mut finish)?;
        Ok(index)
    }

    fn submit(
        &mut self,
        index: usize,
        ops: &[TransferOp],
        pending: Pending,
    ) -> Result<(), BackendError> {
        let held = &mut self.held[index];
        held.lane.submit(ops)?;
        held.pending = Some(pending);
        Ok(())
    }

    /// Waits for the lane's batch and runs `finish` on it, told whether the
    /// batch succeeded.
    fn complete(
        &mut self,
        index: usize,
        finish: &mut impl FnMut(&Pending, &mut dyn Lane, bool),
    ) -> Result<(), BackendError> {
        let held = &mut self.held[index];
        match held.pending.take() {
            Some(pending) => {
                let result = held.lane.wait();
                finish(&pending, held.lane.as_mut(), result.is_ok());
                result
            }
            None => Ok(()),
        }
    }

    /// Completes every pending batch, oldest first.
    fn finish_all(
        &mut self,
        mut finish: impl FnMut(&Pending, &mut dyn Lane, bool),
    ) -> Result<(), BackendError> {
        let count = self.held.len();
        let mut result = Ok(());
        for k in 0..count {
            let index = (self.next + k) % count;
            let r = self.complete(index, &mut finish);
            result = result.and(r);
        }
        result
    }

    /// Waits for anything still in flight, so no copy outlives the chunk
    /// lock of the request that started it. Segments finish their batches
    /// themselves; this is the backstop.
    fn drain(&mut self) -> Result<(), BackendError> {
        let mut result = Ok(());
        for held in self.held.iter_mut() {
            debug_assert!(held.pending.is_none(), "a batch was left unfinished");
            result = result.and(held.lane.wait());
        }
        result
    }
}

impl Drop for Lanes<'_> {
    fn drop(&mut self) {
        let _ = self.drain();
        let indices: ArrayVec<usize, MAX_DEPTH> = self.held.iter().map(|h| h.index).collect();
        self.held.clear();
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(indices);
        drop(free);
        self.pool.returned.notify_all();
    }
}
