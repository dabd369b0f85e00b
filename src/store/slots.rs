//! What the store knows about each chunk, and the arithmetic that cuts a
//! request into the parts the I/O paths move: segments (one chunk each),
//! pieces (one lane's staging each) and block masks (one bit per
//! [`BLOCK_SIZE`] block of a chunk). The read and write paths, read-ahead
//! and allocation all import it; none of them reaches into another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use crate::backend::{ChunkId, BLOCK_SIZE, CHUNK_SIZE};

/// One chunk of the device and what is known about its blocks.
#[derive(Debug, Default)]
pub(super) struct ChunkSlot {
    /// The chunk, once allocated. Taken shared by every request for as
    /// long as its copies are in flight; exclusively only to allocate or
    /// free the chunk.
    pub(super) chunk: RwLock<Option<ChunkId>>,
    /// Bit b set: block b holds bytes on the GPU; a clear block reads as
    /// zeros without the GPU.
    pub(super) data: AtomicU64,
    /// Bit b set: a partial write is zeroing block b before writing into it.
    pub(super) busy: AtomicU64,
    /// Every change to the chunk's bytes, for read-ahead's windows.
    pub(super) changes: Changes,
}

impl ChunkSlot {
    /// The chunk lock, shared. A poisoned lock still guards a valid
    /// `Option`: a panicking request left no half-made state behind it.
    pub(super) fn read_chunk(&self) -> RwLockReadGuard<'_, Option<ChunkId>> {
        self.chunk.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunk with its lock held shared, or `None` (and no lock) while
    /// none is allocated.
    pub(super) fn chunk_now(&self) -> Option<(ChunkGuard<'_>, ChunkId)> {
        let guard = self.read_chunk();
        let chunk = (*guard)?;
        Some((guard, chunk))
    }
}

/// A chunk's lock, held shared while its bytes are used.
pub(super) type ChunkGuard<'a> = RwLockReadGuard<'a, Option<ChunkId>>;

/// Counts the changes to one chunk's bytes: begun and finished. A
/// read-ahead window remembers the count it was filled at and serves only
/// while it still holds, so no read that starts after a change has finished
/// sees bytes from before it.
#[derive(Debug, Default)]
pub(super) struct Changes {
    begun: AtomicU64,
    finished: AtomicU64,
}

impl Changes {
    /// Counts a change as begun until the guard goes, which must be after
    /// its batches are done on the GPU.
    pub(super) fn begin(&self) -> Change<'_> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        Change(self)
    }

    /// The changes begun, if none is under way now.
    pub(super) fn settled(&self) -> Option<u64> {
        let begun = self.begun.load(Ordering::SeqCst);
        (self.finished.load(Ordering::SeqCst) == begun).then_some(begun)
    }

    pub(super) fn begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }
}

/// A change under way: see [`Changes::begin`].
pub(super) struct Change<'a>(&'a Changes);

impl Drop for Change<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// The part of a request that lies in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) slot: usize,
    /// Offset inside the chunk.
    pub(super) start: u64,
    pub(super) len: u64,
}

/// The chunk holding device offset `pos`, the offset in it and how much of
/// `remaining` lies in it.
pub(super) fn segment(pos: u64, remaining: u64) -> Segment {
    let start = pos % CHUNK_SIZE;
    Segment {
        slot: (pos / CHUNK_SIZE) as usize,
        start,
        len: (CHUNK_SIZE - start).min(remaining),
    }
}

/// Where one piece of a request goes: a range of one chunk that fits one
/// lane's staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) slot: usize,
    /// Offset inside the chunk.
    pub(super) start: u64,
    pub(super) len: u64,
    /// Offset of the piece inside the caller's buffer (of the segment).
    pub(super) buf: usize,
}

impl Piece {
    pub(super) fn first_block(&self) -> usize {
        (self.start / BLOCK_SIZE) as usize
    }

    pub(super) fn last_block(&self) -> usize {
        ((self.start + self.len - 1) / BLOCK_SIZE) as usize
    }

    /// Chunk offset one past the piece.
    pub(super) fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Bits of the blocks this piece touches.
    pub(super) fn block_mask(&self) -> u64 {
        span_mask(self.first_block(), self.last_block())
    }

    /// Bits of the blocks this piece covers completely.
    pub(super) fn whole_block_mask(&self) -> u64 {
        whole_blocks_mask(self.start, self.len)
    }

    /// The part of `block` the piece covers, as chunk offsets.
    pub(super) fn block_range(&self, block: usize) -> (u64, u64) {
        let block_start = block as u64 * BLOCK_SIZE;
        (
            block_start.max(self.start),
            (block_start + BLOCK_SIZE).min(self.end()),
        )
    }
}

/// Splits a segment into pieces of at most `piece_bytes` that end on block
/// boundaries, so only a request's first and last block can be partial.
pub(super) fn pieces(segment: Segment, piece_bytes: u64) -> impl Iterator<Item = Piece> {
    let Segment { slot, start, len } = segment;
    let end = start + len;
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let piece_end = ((pos / BLOCK_SIZE) * BLOCK_SIZE + piece_bytes).min(end);
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

/// About how many pieces of `piece_bytes` a request of `len` bytes at
/// device offset `offset` splits into.
pub(super) fn piece_count(offset: u64, len: u64, piece_bytes: u64) -> usize {
    let first = offset / BLOCK_SIZE * BLOCK_SIZE;
    (offset + len - first).div_ceil(piece_bytes) as usize
}

/// Bits `first..=last`.
pub(super) fn span_mask(first: usize, last: usize) -> u64 {
    let upper = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    upper & !((1u64 << first) - 1)
}

/// Bits of the blocks that `start..start+len` (inside one chunk) covers
/// completely.
pub(super) fn whole_blocks_mask(start: u64, len: u64) -> u64 {
    let first = start.div_ceil(BLOCK_SIZE) as usize;
    let end = ((start + len) / BLOCK_SIZE) as usize;
    if end <= first {
        0
    } else {
        span_mask(first, end - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BLOCKS_PER_CHUNK;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn span_masks_cover_exactly_their_bits() {
        assert_eq!(span_mask(0, 0), 1);
        assert_eq!(span_mask(3, 5), 0b111000);
        assert_eq!(span_mask(0, 63), u64::MAX);
        assert_eq!(span_mask(63, 63), 1 << 63);
        for first in 0..BLOCKS_PER_CHUNK {
            for last in first..BLOCKS_PER_CHUNK {
                let mask = span_mask(first, last);
                assert_eq!(mask.count_ones() as usize, last - first + 1);
                assert_eq!(mask.trailing_zeros() as usize, first);
                assert_eq!(63 - mask.leading_zeros() as usize, last);
            }
        }
    }

    #[test]
    fn whole_block_masks_leave_out_partial_ends() {
        assert_eq!(whole_blocks_mask(0, B), 1);
        assert_eq!(whole_blocks_mask(0, B - 1), 0);
        assert_eq!(whole_blocks_mask(1, B), 0);
        assert_eq!(whole_blocks_mask(1, 2 * B), 0b10);
        assert_eq!(whole_blocks_mask(B / 2, 3 * B), 0b110);
        assert_eq!(whole_blocks_mask(0, CHUNK_SIZE), u64::MAX);
        assert_eq!(whole_blocks_mask(CHUNK_SIZE - B, B), 1 << 63);
        assert_eq!(whole_blocks_mask(4096, 4096), 0);
    }

    #[test]
    fn segments_stop_at_chunk_ends() {
        assert_eq!(
            segment(0, 10),
            Segment {
                slot: 0,
                start: 0,
                len: 10
            }
        );
        assert_eq!(
            segment(CHUNK_SIZE - 4096, 8192),
            Segment {
                slot: 0,
                start: CHUNK_SIZE - 4096,
                len: 4096
            }
        );
        assert_eq!(
            segment(3 * CHUNK_SIZE + 5, 2 * CHUNK_SIZE),
            Segment {
                slot: 3,
                start: 5,
                len: CHUNK_SIZE - 5
            }
        );
    }

    /// Every piece fits the staging, ends on a block boundary unless it
    /// ends the segment, and together they tile the segment in order.
    #[test]
    fn pieces_tile_a_segment_on_block_boundaries() {
        for piece_bytes in [B, 2 * B, 30 * B, CHUNK_SIZE] {
            for (start, len) in [
                (0, CHUNK_SIZE),
                (1, 1),
                (B - 1, 2),
                (4096, 3 * B),
                (B / 2, CHUNK_SIZE - B),
                (CHUNK_SIZE - 1, 1),
            ] {
                let segment = Segment {
                    slot: 7,
                    start,
                    len,
                };
                let mut pos = start;
                let mut count = 0;
                for piece in pieces(segment, piece_bytes) {
                    assert_eq!(piece.slot, 7);
                    assert_eq!(piece.start, pos);
                    assert_eq!(piece.buf as u64, pos - start);
                    assert!(piece.len > 0);
                    // A piece may start inside a block (the request's first)
                    // and use the staging from that block's start.
                    assert!(piece.start % B + piece.len <= piece_bytes, "{piece:?}");
                    if piece.end() != start + len {
                        assert_eq!(piece.end() % B, 0, "{piece:?}");
                    }
                    pos = piece.end();
                    count += 1;
                }
                assert_eq!(pos, start + len);
                assert_eq!(
                    count,
                    piece_count(start, len, piece_bytes),
                    "{start} {len} {piece_bytes}"
                );
            }
        }
    }

    #[test]
    fn a_piece_knows_its_blocks() {
        let piece = Piece {
            slot: 0,
            start: B + 100,
            len: 2 * B,
            buf: 0,
        };
        assert_eq!((piece.first_block(), piece.last_block()), (1, 3));
        assert_eq!(piece.block_mask(), 0b1110);
        assert_eq!(piece.whole_block_mask(), 0b100);
        assert_eq!(piece.block_range(1), (B + 100, 2 * B));
        assert_eq!(piece.block_range(2), (2 * B, 3 * B));
        assert_eq!(piece.block_range(3), (3 * B, 3 * B + 100));
    }

    #[test]
    fn changes_settle_only_when_every_change_is_done() {
        let changes = Changes::default();
        assert_eq!(changes.settled(), Some(0));
        let first = changes.begin();
        let second = changes.begin();
        assert_eq!(changes.settled(), None);
        assert_eq!(changes.begun(), 2);
        drop(first);
        assert_eq!(changes.settled(), None);
        drop(second);
        assert_eq!(changes.settled(), Some(2));
    }
}
