//! The read path: a request's segments downloaded piece by piece through
//! the lanes, blocks without data filled with zeros on the host, and with
//! `verify` every downloaded block checked against its checksum. With a
//! registered buffer (`direct.rs`) the lanes download straight into it;
//! only a block the request covers in part goes through staging, and only
//! with `verify` (its checksum covers the whole block). Small reads take
//! a shorter way where there is one: CPU loads through the chunks' mapping,
//! or a batch shared with other threads' small reads (`gather.rs`).

use std::sync::atomic::Ordering;

use arrayvec::ArrayVec;

use super::error::StoreError;
use super::gather::{Gather, GATHER_MAX};
use super::lanes::Lanes;
use super::slots::{pieces, segment, Piece, Segment};
use super::BlockStore;
use crate::backend::{
    BackendError, ChunkId, HostRegion, Lane, TransferOp, BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE,
};
use crate::checksum;

/// The largest read served through the chunks' mapping where they are
/// mapped (`Backend::read_mapped`), instead of by DMA through a lane. On an
/// H200 through Vulkan a 4 KiB load through the mapping took 7.4 µs against
/// 21 µs for a DMA round trip from the same memory, ran 1.6M/s on 16
/// threads against 117k/s, and never waited behind a queue or a driver
/// (DMA: up to 1 s). Its cost grows with the size (16 KiB: 25.5 µs, as slow
/// as DMA; 64 KiB: 125 µs, five times slower), so only reads of up to 8 KiB
/// take it (docs/BENCHMARKS.md, "Small reads through the mapping").
pub(super) const MAPPED_READ_MAX: usize = 8 << 10;

/// Times a read is retried when a block fails its check while a write to
/// it was in flight: each retry first waits for the writers to finish.
const MAX_TORN_READS: usize = 64;

/// What a submitted read piece still needs once its batch is done.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadPending {
    piece: Piece,
    /// Blocks that were downloaded: into staging, to be copied out, or
    /// (those also in `direct`) straight into the caller's buffer.
    downloaded: u64,
    /// Blocks downloaded straight into the caller's buffer.
    direct: u64,
    /// The chunk offset that staging byte 0 holds: the piece's start, or
    /// with `verify` the start of its first block.
    staging_origin: u64,
    /// `verify` only: each downloaded block's write sequence before the
    /// download, to tell a torn read from corruption.
    sequences: [u32; BLOCKS_PER_CHUNK],
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

impl BlockStore {
    /// Reads `buf` at `offset` from VRAM (the range is checked already),
    /// straight into `buf` when `region` (registered, covering it) is given.
    /// A small read of mapped chunks goes through the mapping all the same:
    /// CPU loads beat a DMA there, and need no registration. A small read
    /// of one chunk on a backend that gathers reads joins a shared batch.
    pub(super) fn read_from_vram(
        &self,
        buf: &mut [u8],
        offset: u64,
        region: Option<&HostRegion>,
    ) -> Result<(), StoreError> {
        // With `verify`, a block's checksum needs the whole block: DMA it.
        if buf.len() <= MAPPED_READ_MAX
            && self.checksums.is_none()
            && self.backend.mapped()
            && self.read_through_mapping(buf, offset)?
        {
            return Ok(());
        }
        if buf.len() <= GATHER_MAX {
            if let Some(gather) = &self.gather {
                if self.read_gathered(gather, buf, offset)? {
                    return Ok(());
                }
            }
        }
        if region.is_some() {
            self.direct.count_read();
        }
        let mut lanes = self
            .lanes
            .acquire(self.piece_count(offset, buf.len() as u64));
        let mut done = 0usize;
        while done < buf.len() {
            let seg = segment(offset + done as u64, (buf.len() - done) as u64);
            let guard = self.slots[seg.slot].read_chunk();
            let out = &mut buf[done..done + seg.len as usize];
            let mut result = Ok(Verdict::Clean);
            for _ in 0..MAX_TORN_READS {
                result = match *guard {
                    None => {
                        out.fill(0);
                        Ok(Verdict::Clean)
                    }
                    Some(chunk) => self.read_segment(&mut lanes, seg, chunk, out, region),
                };
                if result != Ok(Verdict::Torn) {
                    break;
                }
                self.wait_for_writers(seg);
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
            done += seg.len as usize;
        }
        Ok(())
    }

    /// Reads a small request by CPU loads through the chunks' mapping: no
    /// lane, no batch. Each chunk's lock is held shared across its loads,
    /// as across a DMA, so the chunk is not freed under them; a block's
    /// `data` bit is set only once its write is done (`finish_write`), so a
    /// read that follows a finished write sees it. Returns false, for the
    /// DMA path to read it all, where a chunk is not mapped.
    fn read_through_mapping(&self, buf: &mut [u8], offset: u64) -> Result<bool, StoreError> {
        let mut done = 0usize;
        while done < buf.len() {
            let seg = segment(offset + done as u64, (buf.len() - done) as u64);
            let out = &mut buf[done..done + seg.len as usize];
            let slot = &self.slots[seg.slot];
            let guard = slot.read_chunk();
            let result = match *guard {
                None => {
                    out.fill(0);
                    Ok(())
                }
                Some(chunk) if !self.backend.chunk_mapped(chunk) => return Ok(false),
                Some(chunk) => {
                    let bits = slot.data.load(Ordering::Acquire);
                    read_runs(seg, bits, out, |from, dst| {
                        self.backend.read_mapped(chunk, from, dst)
                    })
                }
            };
            drop(guard);
            self.outcome(result)?;
            done += seg.len as usize;
        }
        Ok(true)
    }

    /// Reads a small request that lies in one chunk in a batch shared with
    /// other threads' small reads (`gather.rs`), holding the chunk's lock
    /// shared until its bytes are in. Returns false, for the lanes to read
    /// it, where it crosses a chunk's end or the gather's queue is full.
    fn read_gathered(
        &self,
        gather: &Gather,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<bool, StoreError> {
        let seg = segment(offset, buf.len() as u64);
        if seg.len != buf.len() as u64 {
            return Ok(false);
        }
        let slot = &self.slots[seg.slot];
        let guard = slot.read_chunk();
        let Some(chunk) = *guard else {
            buf.fill(0);
            return Ok(true);
        };
        let bits = slot.data.load(Ordering::Acquire);
        let mut gathered = true;
        let result = read_runs(seg, bits, buf, |from, dst| {
            match gather.read(chunk, from, dst) {
                Some(result) => result,
                None => {
                    gathered = false;
                    Ok(())
                }
            }
        });
        drop(guard);
        self.outcome(result)?;
        Ok(gathered)
    }

    /// Reads one chunk's part of a request; with `verify`, says whether
    /// every downloaded block passed its check.
    fn read_segment(
        &self,
        lanes: &mut Lanes<'_, ReadPending>,
        seg: Segment,
        chunk: ChunkId,
        out: &mut [u8],
        region: Option<&HostRegion>,
    ) -> Result<Verdict, BackendError> {
        let mut verdict = Verdict::Clean;
        let submitted = self.read_pieces(lanes, seg, chunk, out, region, &mut verdict);
        let finished = lanes
            .finish_all(|pending, lane, ok| self.finish_read(pending, lane, ok, out, &mut verdict));
        submitted.and(finished).map(|()| verdict)
    }

    fn read_pieces(
        &self,
        lanes: &mut Lanes<'_, ReadPending>,
        seg: Segment,
        chunk: ChunkId,
        out: &mut [u8],
        region: Option<&HostRegion>,
        verdict: &mut Verdict,
    ) -> Result<(), BackendError> {
        let slot = &self.slots[seg.slot];
        for piece in pieces(seg, self.lanes.piece_bytes) {
            let lane = lanes
                .next_free(|pending, lane, ok| self.finish_read(pending, lane, ok, out, verdict))?;
            let bits = slot.data.load(Ordering::Acquire) & piece.block_mask();
            // With verify, whole blocks are downloaded (the checksum covers
            // the block), from the first block's start.
            let origin = match self.checksums {
                Some(_) => piece.first_block() as u64 * BLOCK_SIZE,
                None => piece.start,
            };
            let mut sequences = [0; BLOCKS_PER_CHUNK];
            let mut direct = 0u64;
            let mut ops: ArrayVec<TransferOp, BLOCKS_PER_CHUNK> = ArrayVec::new();
            let mut block = piece.first_block();
            while block <= piece.last_block() {
                let run_start = block;
                let holds = bits & (1 << block) != 0;
                while block <= piece.last_block() && (bits & (1 << block) != 0) == holds {
                    block += 1;
                }
                let from = (run_start as u64 * BLOCK_SIZE).max(piece.start);
                let to = (block as u64 * BLOCK_SIZE).min(piece.end());
                if holds {
                    let (from, to) = match &self.checksums {
                        Some(checksums) => {
                            let run = sequences.iter_mut().enumerate();
                            for (b, sequence) in run.take(block).skip(run_start) {
                                *sequence = checksums.snapshot(seg.slot * BLOCKS_PER_CHUNK + b);
                            }
                            (run_start as u64 * BLOCK_SIZE, block as u64 * BLOCK_SIZE)
                        }
                        None => (from, to),
                    };
                    match region {
                        Some(_) => {
                            direct |= self.push_direct(&mut ops, piece, chunk, origin, from, to)
                        }
                        None => ops.push(TransferOp::Download {
                            staging_offset: (from - origin) as usize,
                            chunk,
                            chunk_offset: from,
                            len: to - from,
                        }),
                    }
                } else {
                    let at = piece.buf + (from - piece.start) as usize;
                    out[at..at + (to - from) as usize].fill(0);
                }
            }
            if !ops.is_empty() {
                let pending = ReadPending {
                    piece,
                    downloaded: bits,
                    direct,
                    staging_origin: origin,
                    sequences,
                };
                match region {
                    Some(region) => lanes.submit_into(lane, &ops, out, region, pending)?,
                    None => lanes.submit(lane, &ops, pending)?,
                }
            }
        }
        Ok(())
    }

    /// Adds the steps that download `from..to` of a piece (a run of blocks
    /// with data, chunk offsets) straight into the caller's buffer, whose
    /// segment starts at the request's `out[0]`; says which blocks went
    /// there. With `verify`, `from..to` is whole blocks and a block the
    /// piece covers in part goes to staging at its place after `origin`,
    /// for its checksum; without, the piece's bytes go straight.
    fn push_direct(
        &self,
        ops: &mut ArrayVec<TransferOp, BLOCKS_PER_CHUNK>,
        piece: Piece,
        chunk: ChunkId,
        origin: u64,
        from: u64,
        to: u64,
    ) -> u64 {
        let (mut from, mut to) = (from, to);
        let to_staging = |ops: &mut ArrayVec<_, _>, at: u64| {
            ops.push(TransferOp::Download {
                staging_offset: (at - origin) as usize,
                chunk,
                chunk_offset: at,
                len: BLOCK_SIZE,
            })
        };
        if self.checksums.is_some() {
            if from < piece.start {
                to_staging(ops, from);
                from += BLOCK_SIZE;
            }
            if to > piece.end() && to - BLOCK_SIZE >= from {
                to_staging(ops, to - BLOCK_SIZE);
                to -= BLOCK_SIZE;
            }
        }
        if from >= to {
            return 0;
        }
        ops.push(TransferOp::DownloadTo {
            host_offset: piece.buf + (from - piece.start) as usize,
            chunk,
            chunk_offset: from,
            len: to - from,
        });
        let (first, last) = (
            (from / BLOCK_SIZE) as usize,
            ((to - 1) / BLOCK_SIZE) as usize,
        );
        super::slots::span_mask(first, last)
    }

    /// Copies a finished read's downloaded blocks out, checking each one's
    /// checksum first with `verify`.
    fn finish_read(
        &self,
        pending: &ReadPending,
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
            if pending.downloaded & (1 << block) == 0 {
                continue;
            }
            if pending.direct & (1 << block) != 0 {
                // In place already; with `verify`, a whole block inside the
                // request, checked where it landed.
                if self.checksums.is_some() {
                    let at = piece.buf + (block as u64 * BLOCK_SIZE - piece.start) as usize;
                    let bytes = &out[at..at + BLOCK_SIZE as usize];
                    let found = self.check_block(piece, block, bytes, pending.sequences[block]);
                    *verdict = verdict.and(found);
                }
                continue;
            }
            if self.checksums.is_some() {
                let at = (block as u64 * BLOCK_SIZE - origin) as usize;
                let bytes = &staging[at..at + BLOCK_SIZE as usize];
                let found = self.check_block(piece, block, bytes, pending.sequences[block]);
                if found != Verdict::Clean {
                    *verdict = verdict.and(found);
                    continue;
                }
            }
            let (from, to) = piece.block_range(block);
            let s = (from - origin) as usize;
            let n = (to - from) as usize;
            let at = piece.buf + (from - piece.start) as usize;
            out[at..at + n].copy_from_slice(&staging[s..s + n]);
        }
    }

    /// Checks one downloaded block (`verify`): clean, torn by a write that
    /// began after `sequence` was taken, or corrupt (logged and counted).
    fn check_block(&self, piece: Piece, block: usize, bytes: &[u8], sequence: u32) -> Verdict {
        let Some(checksums) = &self.checksums else {
            return Verdict::Clean;
        };
        let index = piece.slot * BLOCKS_PER_CHUNK + block;
        if checksum::block(bytes) == checksums.get(index) {
            return Verdict::Clean;
        }
        if checksums.changed_since(index, sequence) {
            return Verdict::Torn;
        }
        let offset = piece.slot as u64 * CHUNK_SIZE + block as u64 * BLOCK_SIZE;
        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            offset,
            "{}: checksum mismatch in the 64 KiB block at offset {offset:#x}: \
             its VRAM changed after it was written (read fails with EIO)",
            self.device().name
        );
        Verdict::Corrupt(offset)
    }

    /// Waits until no write is in flight on the blocks of a segment.
    fn wait_for_writers(&self, seg: Segment) {
        let Some(checksums) = &self.checksums else {
            return;
        };
        let first = seg.slot * BLOCKS_PER_CHUNK + (seg.start / BLOCK_SIZE) as usize;
        let last = seg.slot * BLOCKS_PER_CHUNK + ((seg.start + seg.len - 1) / BLOCK_SIZE) as usize;
        while (first..=last).any(|b| checksums.writing(b)) {
            std::thread::yield_now();
        }
    }
}

impl Verdict {
    /// The verdict of a read so far and one more block's: the worse of the
    /// two, and of two corrupt blocks the first found.
    fn and(self, found: Verdict) -> Verdict {
        match (self, found) {
            (Verdict::Corrupt(_), _) => self,
            (_, Verdict::Corrupt(_)) => found,
            _ => self.max(found),
        }
    }
}

/// Splits a segment into runs of blocks with and without data (`bits`):
/// calls `read(chunk_offset, dst)` for each run with data and fills the
/// others with zeros.
fn read_runs(
    seg: Segment,
    bits: u64,
    out: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let end = seg.start + seg.len;
    let mut block = (seg.start / BLOCK_SIZE) as usize;
    let last = ((end - 1) / BLOCK_SIZE) as usize;
    while block <= last {
        let run_start = block;
        let holds = bits & (1 << block) != 0;
        while block <= last && (bits & (1 << block) != 0) == holds {
            block += 1;
        }
        let from = (run_start as u64 * BLOCK_SIZE).max(seg.start);
        let to = (block as u64 * BLOCK_SIZE).min(end);
        let dst = &mut out[(from - seg.start) as usize..(to - seg.start) as usize];
        if holds {
            read(from, dst)?;
        } else {
            dst.fill(0);
        }
    }
    Ok(())
}
