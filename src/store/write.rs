//! The write path: a request's segments uploaded piece by piece through
//! the lanes. Whole blocks are simply marked as holding data once their
//! batch is done. A block a write covers only in part is zeroed first if it
//! held no data (other writers wait on its busy bit meanwhile), so it
//! never reads back the chunk's old bytes. With `verify`, each block's
//! checksum is set from the caller's bytes, or for a partial block updated
//! from the old and new bytes of the range.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use arrayvec::ArrayVec;

use super::config::AllocationPolicy;
use super::error::StoreError;
use super::lanes::Lanes;
use super::slots::{pieces, segment, whole_blocks_mask, ChunkGuard, Piece, Segment};
use super::BlockStore;
use crate::backend::{
    copy_to_staging, BackendError, ChunkId, Fill, Lane, TransferOp, BLOCKS_PER_CHUNK, BLOCK_SIZE,
    CHUNK_SIZE,
};
use crate::checksum::{self, Checksums};

/// Where the bytes of a write come from.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

impl<'a> Source<'a> {
    /// The part `at..at + len` of the source.
    fn part(self, at: usize, len: usize) -> Source<'a> {
        match self {
            Source::Bytes(b) => Source::Bytes(&b[at..at + len]),
            Source::Zeros => Source::Zeros,
        }
    }

    /// The caller's bytes for a piece of a segment, `None` for zeros.
    fn for_piece(self, piece: &Piece) -> Option<&'a [u8]> {
        match self.part(piece.buf, piece.len as usize) {
            Source::Bytes(b) => Some(b),
            Source::Zeros => None,
        }
    }
}

/// What a submitted write piece still needs once its batch is done.
#[derive(Debug, Clone, Copy)]
pub(super) struct WritePending {
    piece: Piece,
    /// Blocks that hold data once the batch is done.
    set_bits: u64,
    /// Busy bits this request holds, cleared when done.
    busy_bits: u64,
    /// `verify` only: the new checksum of each whole block, by block in
    /// the chunk.
    sums: [u32; BLOCKS_PER_CHUNK],
    /// `verify` only: the piece's first and last block, where it writes
    /// them in part.
    partial: [Option<PartialBlock>; 2],
}

/// A block a write covers only in part (`verify`).
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

/// A piece's partial blocks, worked out before its upload.
struct PartialWork {
    /// Zeroes, then downloads of old bytes: they run before the upload.
    ops: ArrayVec<TransferOp, 4>,
    busy_bits: u64,
    partial: [Option<PartialBlock>; 2],
}

impl BlockStore {
    /// Writes `len` bytes from `source` at `offset` (the range is checked
    /// already), allocating chunks that have none yet.
    pub(super) fn write_from(
        &self,
        source: Source<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        if self.backend.mapped() {
            return self.write_mapped_from(source, offset, len);
        }
        let mut lanes = self.lanes.acquire(self.piece_count(offset, len));
        let mut done = 0u64;
        while done < len {
            let seg = segment(offset + done, len - done);
            let slot = &self.slots[seg.slot];
            // Ends after the drain: the change is done on the GPU.
            let _change = slot.changes.begin();
            let part = source.part(done as usize, seg.len as usize);
            self.write_segment_by_lanes(&mut lanes, seg, part)?;
            done += seg.len;
        }
        Ok(())
    }

    /// [`BlockStore::write_from`] where chunks are mapped: each segment is
    /// stored by CPU stores straight into VRAM, with no staging copy, no
    /// batch and no wait. A segment still goes through a lane where its
    /// chunk is not mapped (the driver gave no more mappable VRAM), or with
    /// `verify` where it covers a block in part: its checksum needs that
    /// block's old bytes, which the DMA engine reads far faster than the CPU
    /// can read them back through the mapping.
    fn write_mapped_from(
        &self,
        source: Source<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let mut done = 0u64;
        while done < len {
            let seg = segment(offset + done, len - done);
            let part = source.part(done as usize, seg.len as usize);
            let whole = seg.start % BLOCK_SIZE == 0 && seg.len % BLOCK_SIZE == 0;
            let slot = &self.slots[seg.slot];
            let _change = slot.changes.begin();
            let mut by_lane = self.checksums.is_some() && !whole;
            if !by_lane {
                let (guard, chunk) = match slot.chunk_now() {
                    Some(held) => held,
                    None => self.chunk_for_write(seg.slot, self.lanes.one().first())?,
                };
                // A chunk the driver gave as unmapped memory goes by DMA.
                by_lane = !self.backend.chunk_mapped(chunk);
                if !by_lane {
                    let result = self.write_segment_mapped(seg, chunk, part);
                    drop(guard);
                    self.outcome(result)?;
                }
            }
            if by_lane {
                let mut lanes = self.lanes.acquire(self.piece_count(offset + done, seg.len));
                self.write_segment_by_lanes(&mut lanes, seg, part)?;
            }
            done += seg.len;
        }
        Ok(())
    }

    /// One segment through `lanes`, the chunk's lock held shared until
    /// every copy into it is done.
    fn write_segment_by_lanes(
        &self,
        lanes: &mut Lanes<'_, WritePending>,
        seg: Segment,
        part: Source<'_>,
    ) -> Result<(), StoreError> {
        let (guard, chunk) = self.chunk_for_write(seg.slot, lanes.first())?;
        let result = self.write_segment(lanes, seg, chunk, part);
        let drained = lanes.drain();
        drop(guard);
        self.outcome(result.and(drained))
    }

    /// The slot's chunk, held shared for a write; a lazy store allocates it
    /// (zeroed on `lane`) at its first write, again if a trim gave it back
    /// between the allocation and the lock.
    fn chunk_for_write(
        &self,
        slot_index: usize,
        lane: &mut dyn Lane,
    ) -> Result<(ChunkGuard<'_>, ChunkId), StoreError> {
        loop {
            if let Some(held) = self.slots[slot_index].chunk_now() {
                return Ok(held);
            }
            self.allocate_slot(slot_index, lane)?;
        }
    }

    /// Stores one segment through the chunk's mapping. A block the segment
    /// covers only in part and that holds no data yet gets zeros around the
    /// new bytes first, its busy bit held meanwhile (as a lane's write
    /// zeroes it first in its batch).
    fn write_segment_mapped(
        &self,
        seg: Segment,
        chunk: ChunkId,
        source: Source<'_>,
    ) -> Result<(), BackendError> {
        let piece = Piece {
            slot: seg.slot,
            start: seg.start,
            len: seg.len,
            buf: 0,
        };
        let whole = piece.whole_block_mask();
        let mut busy_bits = 0u64;
        let mut result = Ok(());
        for block in [piece.first_block(), piece.last_block()] {
            let bit = 1u64 << block;
            if (whole | busy_bits) & bit != 0 || !self.claim_block_init(seg.slot, bit) {
                continue;
            }
            busy_bits |= bit;
            let (from, to) = piece.block_range(block);
            let block_start = block as u64 * BLOCK_SIZE;
            for (at, len) in [
                (block_start, from - block_start),
                (to, block_start + BLOCK_SIZE - to),
            ] {
                if len > 0 && result.is_ok() {
                    result = self
                        .backend
                        .write_mapped(chunk, at, Fill::Zeros(len as usize));
                }
            }
        }
        let sums = self.block_sums(&piece, source.for_piece(&piece));
        if let Some(checksums) = &self.checksums {
            for block in piece.first_block()..=piece.last_block() {
                checksums.begin_write(seg.slot * BLOCKS_PER_CHUNK + block);
            }
        }
        if result.is_ok() {
            let fill = match source {
                Source::Bytes(bytes) => Fill::Bytes(bytes),
                Source::Zeros => Fill::Zeros(seg.len as usize),
            };
            result = self.backend.write_mapped(chunk, seg.start, fill);
        }
        let slot = &self.slots[seg.slot];
        if let Some(checksums) = &self.checksums {
            let base = seg.slot * BLOCKS_PER_CHUNK;
            let blocks = sums.iter().enumerate();
            for (block, &sum) in blocks
                .take(piece.last_block() + 1)
                .skip(piece.first_block())
            {
                // Only whole blocks come here with `verify` (see above).
                if result.is_ok() && whole & (1 << block) != 0 {
                    checksums.set(base + block, sum);
                }
                checksums.end_write(base + block);
            }
        }
        if result.is_ok() {
            slot.data.fetch_or(whole | busy_bits, Ordering::AcqRel);
        }
        self.release_busy(seg.slot, busy_bits);
        result
    }

    /// Makes `len` bytes at `offset` read as zeros (the range is checked
    /// already); see [`BlockStore::zero`].
    pub(super) fn zero_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let seg = segment(pos, end - pos);
            let slot = &self.slots[seg.slot];
            let _change = slot.changes.begin();
            if seg.len == CHUNK_SIZE && self.policy == AllocationPolicy::Lazy {
                self.free_slot(seg.slot);
            } else {
                slot.data
                    .fetch_and(!whole_blocks_mask(seg.start, seg.len), Ordering::AcqRel);
                // Partial blocks at the ends: only those that hold data need
                // zeros written; a clear block already reads as zeros.
                let seg_end = seg.start + seg.len;
                let mut partial: ArrayVec<(u64, u64), 2> = ArrayVec::new();
                if seg.start % BLOCK_SIZE != 0 {
                    let block_end = seg.start - seg.start % BLOCK_SIZE + BLOCK_SIZE;
                    partial.push((seg.start, seg_end.min(block_end)));
                }
                if seg_end % BLOCK_SIZE != 0 {
                    let tail = (seg_end - seg_end % BLOCK_SIZE).max(seg.start);
                    if partial.first().is_none_or(|&(head, _)| head != tail) {
                        partial.push((tail, seg_end));
                    }
                }
                let data = slot.data.load(Ordering::Acquire);
                for (from, to) in partial {
                    if data & (1 << (from / BLOCK_SIZE)) != 0 {
                        let device_offset = seg.slot as u64 * CHUNK_SIZE + from;
                        self.write_from(Source::Zeros, device_offset, to - from)?;
                    }
                }
            }
            pos += seg.len;
        }
        Ok(())
    }

    fn write_segment(
        &self,
        lanes: &mut Lanes<'_, WritePending>,
        seg: Segment,
        chunk: ChunkId,
        source: Source<'_>,
    ) -> Result<(), BackendError> {
        let submitted = self.write_pieces(lanes, seg, chunk, source);
        // Runs even after an error, so busy bits are always released.
        let finished = lanes.finish_all(|pending, lane, ok| self.finish_write(pending, lane, ok));
        submitted.and(finished)
    }

    fn write_pieces(
        &self,
        lanes: &mut Lanes<'_, WritePending>,
        seg: Segment,
        chunk: ChunkId,
        source: Source<'_>,
    ) -> Result<(), BackendError> {
        for piece in pieces(seg, self.lanes.piece_bytes) {
            let lane = lanes.next_free(|pending, lane, ok| self.finish_write(pending, lane, ok))?;
            let src = source.for_piece(&piece);
            let sums = self.stage(&piece, src, lanes.lane(lane).staging());
            let PartialWork {
                ops: before,
                busy_bits,
                partial,
            } = self.partial_blocks(&piece, chunk, src);
            let mut ops: ArrayVec<TransferOp, 5> = before.into_iter().collect();
            ops.push(TransferOp::Upload {
                staging_offset: 0,
                chunk,
                chunk_offset: piece.start,
                len: piece.len,
            });
            let pending = WritePending {
                piece,
                set_bits: piece.whole_block_mask() | busy_bits,
                busy_bits,
                sums,
                partial,
            };
            if let Some(checksums) = &self.checksums {
                for block in piece.first_block()..=piece.last_block() {
                    checksums.begin_write(seg.slot * BLOCKS_PER_CHUNK + block);
                }
            }
            if let Err(err) = lanes.submit(lane, &ops, pending) {
                self.finish_write(&pending, lanes.lane(lane), false);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Fills the start of a lane's staging with a piece's bytes (or zeros);
    /// with `verify`, returns the new checksum of each whole block.
    fn stage(
        &self,
        piece: &Piece,
        src: Option<&[u8]>,
        staging: &mut [u8],
    ) -> [u32; BLOCKS_PER_CHUNK] {
        let staging = &mut staging[..piece.len as usize];
        let mut sums = [0; BLOCKS_PER_CHUNK];
        match (src, &self.checksums) {
            (Some(src), None) => copy_to_staging(staging, src),
            (Some(src), Some(_)) => {
                // Block by block, the checksum first: the copy then reads
                // the bytes from cache, not memory.
                let whole = piece.whole_block_mask();
                let mut at = 0;
                let blocks = sums.iter_mut().enumerate();
                for (block, sum) in blocks
                    .take(piece.last_block() + 1)
                    .skip(piece.first_block())
                {
                    let end = (piece.block_range(block).1 - piece.start) as usize;
                    if whole & (1 << block) != 0 {
                        *sum = checksum::block(&src[at..end]);
                    }
                    copy_to_staging(&mut staging[at..end], &src[at..end]);
                    at = end;
                }
            }
            (None, checksums) => {
                staging.fill(0);
                if let Some(checksums) = checksums {
                    sums.fill(checksums.zero_block());
                }
            }
        }
        sums
    }

    /// With `verify`, the checksum of each block a piece covers whole, from
    /// the caller's bytes (`None`: zeros).
    fn block_sums(&self, piece: &Piece, src: Option<&[u8]>) -> [u32; BLOCKS_PER_CHUNK] {
        let mut sums = [0; BLOCKS_PER_CHUNK];
        let Some(checksums) = &self.checksums else {
            return sums;
        };
        let whole = piece.whole_block_mask();
        for (block, sum) in sums.iter_mut().enumerate() {
            if whole & (1 << block) == 0 {
                continue;
            }
            let (from, to) = piece.block_range(block);
            let range = (from - piece.start) as usize..(to - piece.start) as usize;
            *sum = src.map_or(checksums.zero_block(), |src| checksum::block(&src[range]));
        }
        sums
    }

    /// The blocks a piece covers only in part (its first and last): one
    /// that holds no data yet is zeroed before the upload, its busy bit
    /// held meanwhile; with `verify`, the old bytes of the range of one
    /// that does are downloaded into the staging's reserve first, and the
    /// checksum work is noted.
    fn partial_blocks(&self, piece: &Piece, chunk: ChunkId, src: Option<&[u8]>) -> PartialWork {
        let whole = piece.whole_block_mask();
        let mut work = PartialWork {
            ops: ArrayVec::new(),
            busy_bits: 0,
            partial: [None; 2],
        };
        let mut downloads: ArrayVec<TransferOp, 2> = ArrayVec::new();
        let mut seen = 0;
        for (end, block) in [piece.first_block(), piece.last_block()]
            .into_iter()
            .enumerate()
        {
            let bit = 1u64 << block;
            if (whole | seen) & bit != 0 {
                continue;
            }
            seen |= bit;
            let zeroed = self.claim_block_init(piece.slot, bit);
            if zeroed {
                work.busy_bits |= bit;
                work.ops.push(TransferOp::Zero {
                    chunk,
                    chunk_offset: block as u64 * BLOCK_SIZE,
                    len: BLOCK_SIZE,
                });
            }
            if self.checksums.is_none() {
                continue;
            }
            let (from, to) = piece.block_range(block);
            let new = src.map_or(0, |src| {
                checksum::raw(&src[(from - piece.start) as usize..(to - piece.start) as usize])
            });
            // The old bytes of the range, read before the upload overwrites
            // them, into this block's reserve.
            let old_at = (!zeroed).then(|| {
                let at = self.lanes.piece_bytes as usize + downloads.len() * BLOCK_SIZE as usize;
                downloads.push(TransferOp::Download {
                    staging_offset: at,
                    chunk,
                    chunk_offset: from,
                    len: to - from,
                });
                at
            });
            work.partial[end] = Some(PartialBlock {
                block,
                from,
                to,
                new,
                old_at,
            });
        }
        work.ops.extend(downloads);
        work
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

    fn finish_write(&self, pending: &WritePending, lane: &mut dyn Lane, ok: bool) {
        let piece = pending.piece;
        let slot = &self.slots[piece.slot];
        if let Some(checksums) = &self.checksums {
            let base = piece.slot * BLOCKS_PER_CHUNK;
            // A failed batch may have written some of its bytes: the old
            // checksums stay, and reading those blocks fails their check.
            if ok {
                update_checksums(checksums, pending, lane);
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
}

/// A finished write's checksums: whole blocks get theirs, partial blocks
/// the change of their range.
fn update_checksums(checksums: &Checksums, pending: &WritePending, lane: &mut dyn Lane) {
    let piece = pending.piece;
    let base = piece.slot * BLOCKS_PER_CHUNK;
    let whole = piece.whole_block_mask();
    for block in piece.first_block()..=piece.last_block() {
        if whole & (1 << block) != 0 {
            checksums.set(base + block, pending.sums[block]);
        }
    }
    let staging = lane.staging();
    for partial in pending.partial.iter().flatten() {
        let after = (partial.block as u64 + 1) * BLOCK_SIZE - partial.to;
        let index = base + partial.block;
        match partial.old_at {
            None => checksums.set(index, checksums.zeroed_then(partial.new, after)),
            Some(at) => {
                let old = checksum::raw(&staging[at..at + (partial.to - partial.from) as usize]);
                checksums.apply(index, checksums.delta(old, partial.new, after));
            }
        }
    }
}
