//! Few transfers for many pages: a batch's slots laid out in staging in
//! VRAM order, neighbours in one chunk moved by one step.
//!
//! Each page is its own slot, so a batch of 64 pages was 64 copies, and
//! with CUDA every copy is a driver call (the process makes about 450k of
//! them a second, however many threads call). Pages written together take
//! neighbouring slots of their classes (a write batch takes its slots
//! under one hold of the slabs' lock: `write.rs`); sorted by place they
//! fall into few runs, one step each. Where requests written at once took
//! their slots page by page, interleaved, reading them back was a copy a
//! page and stopped near 2 GB/s on CUDA and Vulkan alike; taking a batch's
//! slots together, pages written by 8 connections at once read at 5.6
//! GB/s (H100, 8 connections; docs/BENCHMARKS.md, "Compressed pages on an
//! H100" and the section after it). Joining pieces up to 32 KiB apart
//! (carrying the bytes between) bought nothing there: on an area whose
//! slots churned, a request's pages lie in different chunks.

use arrayvec::ArrayVec;

use crate::backend::{ChunkId, TransferOp, MAX_BATCH};

/// One page's bytes to move.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    /// The caller's number for the page.
    pub(super) at: usize,
    pub(super) chunk: ChunkId,
    pub(super) offset: u64,
    /// Bytes to move: a download, the bytes stored; an upload, the whole
    /// slot (its tail is the slot's own, so writing it harms no one).
    pub(super) len: u64,
    /// Where the bytes are in staging, once laid out.
    pub(super) staged: usize,
}

/// Sorts `pieces` by place in VRAM, gives each its place in staging from
/// 0 on, and returns the steps that move them: a piece that starts at
/// most `gap` bytes after the last one ended, in the same chunk, joins its
/// step (a download carries the bytes between along; uploads must be given
/// a gap of 0, as the bytes between are other pages'). A join that would
/// leave too little of `room` bytes of staging for the pieces after it
/// starts a new step instead: pieces that fit `room` end to end always
/// fit.
pub(super) fn lay_out(
    pieces: &mut [Piece],
    gap: u64,
    room: usize,
    upload: bool,
) -> ArrayVec<TransferOp, MAX_BATCH> {
    pieces.sort_unstable_by_key(|p| (p.chunk.0, p.offset));
    let mut steps: ArrayVec<TransferOp, MAX_BATCH> = ArrayVec::new();
    // The step being grown: its chunk, VRAM start and end, staging start.
    let mut open: Option<(ChunkId, u64, u64, usize)> = None;
    let mut cursor = 0;
    // Bytes of the pieces not yet placed: a join leaves room for them.
    let mut rest: u64 = pieces.iter().map(|p| p.len).sum();
    for piece in pieces.iter_mut() {
        let end = piece.offset + piece.len;
        rest -= piece.len;
        if let Some((chunk, start, last, staged)) = &mut open {
            let between = piece.offset.saturating_sub(*last);
            if *chunk == piece.chunk
                && piece.offset >= *last
                && between <= gap
                && cursor as u64 + between + piece.len + rest <= room as u64
            {
                piece.staged = *staged + (piece.offset - *start) as usize;
                *last = end;
                cursor = *staged + (end - *start) as usize;
                continue;
            }
            steps.push(step(upload, *chunk, *start, *last, *staged));
        }
        piece.staged = cursor;
        open = Some((piece.chunk, piece.offset, end, cursor));
        cursor += piece.len as usize;
    }
    if let Some((chunk, start, last, staged)) = open {
        steps.push(step(upload, chunk, start, last, staged));
    }
    steps
}

fn step(upload: bool, chunk: ChunkId, start: u64, end: u64, staging_offset: usize) -> TransferOp {
    let len = end - start;
    match upload {
        true => TransferOp::Upload {
            staging_offset,
            chunk,
            chunk_offset: start,
            len,
        },
        false => TransferOp::Download {
            staging_offset,
            chunk,
            chunk_offset: start,
            len,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(at: usize, chunk: u32, offset: u64, len: u64) -> Piece {
        Piece {
            at,
            chunk: ChunkId(chunk),
            offset,
            len,
            staged: usize::MAX,
        }
    }

    fn ranges(steps: &[TransferOp]) -> Vec<(u32, u64, u64, usize)> {
        steps
            .iter()
            .map(|s| match *s {
                TransferOp::Upload {
                    staging_offset,
                    chunk,
                    chunk_offset,
                    len,
                }
                | TransferOp::Download {
                    staging_offset,
                    chunk,
                    chunk_offset,
                    len,
                } => (chunk.0, chunk_offset, len, staging_offset),
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn neighbouring_slots_share_a_step_and_others_do_not() {
        // Two runs in chunk 1 (slots of 512 and of 1024 bytes), one piece
        // in chunk 0, given out of order.
        let mut pieces = [
            piece(0, 1, 1024, 512),
            piece(1, 1, 65536, 1024),
            piece(2, 1, 512, 512),
            piece(3, 0, 0, 4096),
            piece(4, 1, 66560, 1024),
        ];
        let steps = lay_out(&mut pieces, 0, 1 << 20, true);
        assert_eq!(
            ranges(&steps),
            [
                (0, 0, 4096, 0),
                (1, 512, 1024, 4096),
                (1, 65536, 2048, 5120)
            ]
        );
        let staged: Vec<_> = pieces.iter().map(|p| (p.at, p.staged)).collect();
        assert_eq!(staged, [(3, 0), (2, 4096), (0, 4608), (1, 5120), (4, 6144)]);
    }

    #[test]
    fn downloads_carry_small_gaps_along_but_never_past_the_room() {
        let mut pieces = [
            piece(0, 2, 0, 100),
            piece(1, 2, 300, 100),
            piece(2, 2, 5000, 100),
        ];
        let steps = lay_out(&mut pieces, 4096, 1 << 20, false);
        // 100..300 comes along; 400..5000 is more than the gap.
        assert_eq!(ranges(&steps), [(2, 0, 400, 0), (2, 5000, 100, 400)]);
        assert_eq!(pieces.map(|p| p.staged), [0, 300, 400]);
        // With room for the pieces alone, no gap is carried: not even one
        // that would fit if no piece came after it.
        let mut pieces = [
            piece(0, 2, 0, 100),
            piece(1, 2, 300, 100),
            piece(2, 3, 0, 100),
        ];
        let steps = lay_out(&mut pieces, 4096, 300, false);
        assert_eq!(
            ranges(&steps),
            [(2, 0, 100, 0), (2, 300, 100, 100), (3, 0, 100, 200)]
        );
    }

    #[test]
    fn every_piece_lands_where_its_step_puts_its_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        for _ in 0..200 {
            let count = rng.gen_range(1..=MAX_BATCH);
            // Distinct slots of 64..4096 bytes in up to three chunks.
            let mut pieces: Vec<Piece> = (0..count)
                .map(|n| {
                    let len = 64 * rng.gen_range(1..=64u64);
                    piece(
                        n,
                        rng.gen_range(0..3),
                        n as u64 * 4096 + rng.gen_range(0..4096 - len + 1),
                        len,
                    )
                })
                .collect();
            let least: u64 = pieces.iter().map(|p| p.len).sum();
            let room = least as usize + rng.gen_range(0..8192);
            let gap = if rng.gen() { 0 } else { 4096 };
            let steps = ranges(&lay_out(&mut pieces, gap, room, false));
            assert!(steps.len() <= count);
            for p in &pieces {
                let (_, start, _, staged) = *steps
                    .iter()
                    .find(|s| s.0 == p.chunk.0 && s.1 <= p.offset && p.offset + p.len <= s.1 + s.2)
                    .expect("a step covers every piece");
                assert_eq!(p.staged, staged + (p.offset - start) as usize);
                assert!(p.staged + p.len as usize <= room);
            }
        }
    }
}
