//! Block checksums for `verify=on`: a CRC32C per 64 KiB block, kept in
//! host RAM, computed on the host as data is written and checked when it
//! is read back.
//!
//! CRC32C because it is linear, and that makes partial writes cheap: for
//! two equal-length messages `crc(A ^ B) = crc(A) ^ raw(B)`, where `raw` is
//! the CRC register run from zero with no final inversion. A write of a
//! range of a block changes the block by `delta = old ^ new` in that range
//! and zeros elsewhere, so the block's new checksum is the old one XOR
//! `raw(old_range) ^ raw(new_range)` moved past the zeros after the range —
//! the rest of the block is never read. (A hash without this property
//! would have a 4 KiB swap write read the other 60 KiB of its block first.)
//! Updates are XORs, so writers of different ranges of one block may apply
//! them in any order. Hardware CRC32C (SSE4.2) also catches every
//! single-bit error, where a 32-bit hash catches one with probability
//! 1 - 2^-32.
//!
//! Reads see a write in progress through a per-block sequence word: the
//! low 16 bits count writers in flight, the rest counts finished writes. A
//! block that fails its check while a writer was in flight, or one
//! finished meanwhile, is read again rather than reported.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::backend::BLOCK_SIZE;

/// Low bits of a sequence word: writers in flight.
const ACTIVE: u32 = 0xffff;
/// Added by a writer that finishes (and subtracts itself from `ACTIVE`).
const FINISHED: u32 = 1 << 16;
/// Zero-shift operators for 2^0 ..= 2^16 bytes (one block is 2^16).
const SHIFTS: usize = 17;
/// The CRC32C polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// The checksum of every block of a store, and its write sequence.
pub(crate) struct Checksums {
    crc: Box<[AtomicU32]>,
    seq: Box<[AtomicU32]>,
    /// The checksum of a block of zeros.
    zero_block: u32,
    /// `shifts[k]`: the GF(2) matrix that runs the CRC register over 2^k
    /// zero bytes.
    shifts: [[u32; 32]; SHIFTS],
}

impl Checksums {
    /// Room for `blocks` blocks, allocated once here (4 + 4 bytes each:
    /// 10 MiB for 80 GiB).
    pub(crate) fn new(blocks: usize) -> Self {
        Checksums {
            crc: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            seq: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            zero_block: crc32c::crc32c(&[0u8; BLOCK_SIZE as usize]),
            shifts: zero_shifts(),
        }
    }

    pub(crate) fn zero_block(&self) -> u32 {
        self.zero_block
    }

    /// The stored checksum of block `block`.
    pub(crate) fn get(&self, block: usize) -> u32 {
        self.crc[block].load(Ordering::Acquire)
    }

    /// Sets the checksum of a block written whole (or zeroed, then written
    /// in part).
    pub(crate) fn set(&self, block: usize, crc: u32) {
        self.crc[block].store(crc, Ordering::Release);
    }

    /// Applies a partial write's change: `delta` from [`Checksums::delta`].
    pub(crate) fn apply(&self, block: usize, delta: u32) {
        self.crc[block].fetch_xor(delta, Ordering::AcqRel);
    }

    /// The change to a block's checksum when the range ending `after`
    /// bytes before the block's end goes from bytes with raw CRC `old` to
    /// bytes with raw CRC `new` (see [`raw`]).
    pub(crate) fn delta(&self, old: u32, new: u32, after: u64) -> u32 {
        self.shift(old ^ new, after)
    }

    /// The checksum of a block of zeros whose range ending `after` bytes
    /// before its end was then written with bytes of raw CRC `new`.
    pub(crate) fn zeroed_then(&self, new: u32, after: u64) -> u32 {
        self.zero_block ^ self.shift(new, after)
    }

    /// Runs the CRC register `value` over `zeros` zero bytes.
    fn shift(&self, mut value: u32, zeros: u64) -> u32 {
        debug_assert!(zeros < 1 << SHIFTS);
        for (k, matrix) in self.shifts.iter().enumerate() {
            if zeros & (1 << k) != 0 {
                value = times(matrix, value);
            }
        }
        value
    }

    /// A writer starts on `block`.
    pub(crate) fn begin_write(&self, block: usize) {
        self.seq[block].fetch_add(1, Ordering::AcqRel);
    }

    /// A writer of `block` is done (its checksum change applied).
    pub(crate) fn end_write(&self, block: usize) {
        self.seq[block].fetch_add(FINISHED - 1, Ordering::AcqRel);
    }

    /// What a reader notes before it downloads `block`.
    pub(crate) fn snapshot(&self, block: usize) -> u32 {
        self.seq[block].load(Ordering::Acquire)
    }

    /// Whether a write was in flight at `snapshot` or has finished since:
    /// a failed check proves nothing then.
    pub(crate) fn changed_since(&self, block: usize, snapshot: u32) -> bool {
        snapshot & ACTIVE != 0 || self.seq[block].load(Ordering::Acquire) != snapshot
    }

    /// Whether a writer is in flight on `block` now.
    pub(crate) fn writing(&self, block: usize) -> bool {
        self.seq[block].load(Ordering::Acquire) & ACTIVE != 0
    }
}

/// The checksum of a whole block.
pub(crate) fn block(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The CRC register run from zero over `data`, with no final inversion:
/// the linear part of the CRC.
pub(crate) fn raw(data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!0, data)
}

fn times(matrix: &[u32; 32], mut vector: u32) -> u32 {
    let mut sum = 0;
    let mut row = 0;
    while vector != 0 {
        if vector & 1 != 0 {
            sum ^= matrix[row];
        }
        vector >>= 1;
        row += 1;
    }
    sum
}

fn square(matrix: &[u32; 32]) -> [u32; 32] {
    let mut out = [0; 32];
    for (row, value) in out.iter_mut().enumerate() {
        *value = times(matrix, matrix[row]);
    }
    out
}

/// Zero-byte operators for 1, 2, 4 … 2^16 bytes (as zlib's crc32_combine
/// builds them): one zero bit, squared three times is one byte.
fn zero_shifts() -> [[u32; 32]; SHIFTS] {
    let mut bit = [0u32; 32];
    bit[0] = POLY;
    for (n, row) in bit.iter_mut().enumerate().skip(1) {
        *row = 1 << (n - 1);
    }
    let mut shifts = [[0u32; 32]; SHIFTS];
    shifts[0] = square(&square(&square(&bit)));
    for k in 1..SHIFTS {
        shifts[k] = square(&shifts[k - 1]);
    }
    shifts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: usize = BLOCK_SIZE as usize;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A partial write's checksum update equals the checksum of the
        /// whole new block, for any range, and two updates commute.
        #[test]
        fn partial_updates_equal_recomputing_the_block(
            seed in any::<u64>(),
            a in 0..B, alen in 1..B,
            b in 0..B, blen in 1..B,
        ) {
            let mut rng = seed;
            let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u8 };
            let mut block: Vec<u8> = (0..B).map(|_| next()).collect();
            let sums = Checksums::new(1);
            sums.set(0, super::block(&block));
            for (start, len) in [(a, alen), (b, blen)] {
                let end = (start + len).min(B);
                let new: Vec<u8> = (start..end).map(|_| next()).collect();
                let delta = sums.delta(raw(&block[start..end]), raw(&new), (B - end) as u64);
                block[start..end].copy_from_slice(&new);
                sums.apply(0, delta);
                prop_assert_eq!(sums.get(0), super::block(&block));
            }
        }

        #[test]
        fn a_zeroed_block_written_in_part_has_the_checksum_of_its_bytes(
            start in 0..B, len in 1..B, fill in any::<u8>(),
        ) {
            let end = (start + len).min(B);
            let mut block = vec![0u8; B];
            block[start..end].fill(fill);
            let sums = Checksums::new(1);
            prop_assert_eq!(
                sums.zeroed_then(raw(&block[start..end]), (B - end) as u64),
                super::block(&block)
            );
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_changes_the_checksum() {
        let block = vec![0x5au8; B];
        let sum = super::block(&block);
        for at in [0, 1, 4095, B / 2, B - 1] {
            for bit in 0..8 {
                let mut changed = block.clone();
                changed[at] ^= 1 << bit;
                assert_ne!(super::block(&changed), sum, "byte {at} bit {bit}");
            }
        }
    }

    #[test]
    fn readers_see_writers_in_flight_and_finished() {
        let sums = Checksums::new(2);
        let quiet = sums.snapshot(0);
        assert!(!sums.changed_since(0, quiet));
        sums.begin_write(0);
        assert!(sums.writing(0) && sums.changed_since(0, quiet));
        let during = sums.snapshot(0);
        sums.end_write(0);
        assert!(!sums.writing(0));
        assert!(sums.changed_since(0, during), "in flight at the snapshot");
        assert!(sums.changed_since(0, quiet), "finished since");
        assert!(!sums.changed_since(0, sums.snapshot(0)));
        assert!(!sums.changed_since(1, sums.snapshot(1)), "other blocks");
    }
}
