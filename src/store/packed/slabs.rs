//! Where compressed pages live: size-class slots carved from 64 KiB
//! blocks ("slabs") of the 4 MiB chunks.
//!
//! A slab holds slots of one size class only: a multiple of [`GRAIN`] up
//! to [`MOST_COMPRESSED`](super::codec::MOST_COMPRESSED), or a whole raw
//! page. A page goes to the lowest slab of its class with a free slot,
//! and a new slab is opened, in the lowest free block of the lowest chunk
//! with one, only when no slab of the class has room. A slab whose last
//! slot is freed gives its block back at once, and a chunk whose last
//! block is given back can go back to the GPU.
//!
//! Everything here is sized at open for the whole VRAM budget and never
//! grows: the I/O path allocates nothing. This is plain bookkeeping, one
//! lock around it (the caller's); it moves no byte.

use arrayvec::ArrayVec;

use super::PAGE;
use crate::backend::{BLOCKS_PER_CHUNK, BLOCK_SIZE};

/// Slot sizes are multiples of this: a page loses 32 bytes on average to
/// rounding, about 2 % of one compressed 3:1.
pub(super) const GRAIN: usize = 64;
/// Size classes: 48 of compressed pages (64 B to 3 KiB), and raw pages.
pub(super) const CLASSES: usize = super::codec::MOST_COMPRESSED / GRAIN + 1;
/// The class of pages stored as they are.
pub(super) const RAW: usize = CLASSES - 1;
const SLAB: usize = BLOCK_SIZE as usize;
const MAX_SLOTS: usize = SLAB / GRAIN;
const NO_CLASS: u8 = u8::MAX;

/// The class a page of `len` stored bytes goes to.
pub(super) fn class_of(len: usize) -> usize {
    debug_assert!(len > 0 && len <= PAGE);
    if len > super::codec::MOST_COMPRESSED {
        RAW
    } else {
        (len - 1) / GRAIN
    }
}

/// Bytes of one slot of `class`.
pub(super) fn class_size(class: usize) -> usize {
    if class == RAW {
        PAGE
    } else {
        (class + 1) * GRAIN
    }
}

fn slots_per_slab(class: usize) -> usize {
    SLAB / class_size(class)
}

/// One slot: slab `slab` (`chunk * 64 + block`), slot `index` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Slot {
    pub(super) slab: u32,
    pub(super) index: u16,
}

impl Slot {
    /// Index of the chunk (in the store's chunk table) that holds it.
    pub(super) fn chunk(self) -> usize {
        self.slab as usize / BLOCKS_PER_CHUNK
    }

    /// Offset of the slot in its chunk, for a slot of `class`.
    pub(super) fn offset(self, class: usize) -> u64 {
        let block = self.slab as usize % BLOCKS_PER_CHUNK;
        (block * SLAB + self.index as usize * class_size(class)) as u64
    }
}

/// A set of numbers below a fixed bound with a quick "lowest member".
struct Bits {
    words: Box<[u64]>,
    /// Bit `i` is set when `words[i]` is not zero.
    summary: Box<[u64]>,
}

impl Bits {
    fn new(len: usize) -> Self {
        let words = len.div_ceil(64);
        Bits {
            words: vec![0; words].into_boxed_slice(),
            summary: vec![0; words.div_ceil(64)].into_boxed_slice(),
        }
    }

    fn insert(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
        self.summary[i / 4096] |= 1 << (i / 64 % 64);
    }

    fn remove(&mut self, i: usize) {
        let word = &mut self.words[i / 64];
        *word &= !(1 << (i % 64));
        if *word == 0 {
            self.summary[i / 4096] &= !(1 << (i / 64 % 64));
        }
    }

    /// The members, lowest first.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.summary
            .iter()
            .enumerate()
            .flat_map(move |(top, &bits)| {
                ones(bits).flat_map(move |bit| {
                    let word = top * 64 + bit;
                    ones(self.words[word]).map(move |low| word * 64 + low)
                })
            })
    }

    fn first(&self) -> Option<usize> {
        let (top, bits) = self
            .summary
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != 0)?;
        let word = top * 64 + bits.trailing_zeros() as usize;
        Some(word * 64 + self.words[word].trailing_zeros() as usize)
    }
}

/// The positions of the set bits of `bits`, lowest first.
fn ones(mut bits: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let bit = bits.trailing_zeros() as usize;
        (bits != 0).then(|| {
            bits &= bits - 1;
            bit
        })
    })
}

/// The state of one 64 KiB block.
#[derive(Clone)]
struct Slab {
    class: u8,
    used: u16,
    taken: [u64; MAX_SLOTS / 64],
}

impl Slab {
    const EMPTY: Slab = Slab {
        class: NO_CLASS,
        used: 0,
        taken: [0; MAX_SLOTS / 64],
    };
}

/// What the slabs hold, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct SlabCounts {
    /// Chunks in the table.
    pub(super) chunks: u64,
    /// Blocks that are slabs of some class.
    pub(super) slabs: u64,
    /// Bytes of the slots in use (each its class's size).
    pub(super) slot_bytes: u64,
}

/// The slots of every chunk of a store: which are taken, and where a new
/// page of each class goes.
pub(super) struct Slabs {
    slabs: Box<[Slab]>,
    present: Box<[bool]>,
    /// Per chunk, its blocks that are no slab (meaningful where present).
    free_blocks: Box<[u64]>,
    /// Chunks present with a free block.
    roomy_chunks: Bits,
    /// Per class, its slabs with a free slot.
    partial: Box<[Bits]>,
    counts: SlabCounts,
}

impl Slabs {
    /// Bookkeeping for up to `chunks` chunks, none present yet.
    pub(super) fn new(chunks: usize) -> Self {
        let slabs = chunks * BLOCKS_PER_CHUNK;
        Slabs {
            slabs: vec![Slab::EMPTY; slabs].into_boxed_slice(),
            present: vec![false; chunks].into_boxed_slice(),
            free_blocks: vec![0; chunks].into_boxed_slice(),
            roomy_chunks: Bits::new(chunks),
            partial: (0..CLASSES).map(|_| Bits::new(slabs)).collect(),
            counts: SlabCounts::default(),
        }
    }

    /// Host RAM the bookkeeping for `chunks` chunks takes, about.
    pub(super) fn host_bytes(chunks: usize) -> u64 {
        let slabs = (chunks * BLOCKS_PER_CHUNK) as u64;
        let bits = slabs.div_ceil(8) * CLASSES as u64;
        slabs * std::mem::size_of::<Slab>() as u64 + bits + chunks as u64 * 9
    }

    pub(super) fn counts(&self) -> SlabCounts {
        self.counts
    }

    /// Takes a slot of `class`; `None` when every present chunk is full
    /// (add one with [`Slabs::add_chunk`], if the budget allows, and ask
    /// again).
    pub(super) fn alloc(&mut self, class: usize) -> Option<Slot> {
        let slab_index = match self.partial[class].first() {
            Some(slab) => slab,
            None => self.open_slab(class)?,
        };
        let slab = &mut self.slabs[slab_index];
        let (word, bits) = slab
            .taken
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != u64::MAX)?;
        let index = word * 64 + bits.trailing_ones() as usize;
        debug_assert!(index < slots_per_slab(class));
        slab.taken[word] |= 1 << (index % 64);
        slab.used += 1;
        if slab.used as usize == slots_per_slab(class) {
            self.partial[class].remove(slab_index);
        }
        self.counts.slot_bytes += class_size(class) as u64;
        Some(Slot {
            slab: slab_index as u32,
            index: index as u16,
        })
    }

    /// Makes the lowest free block a slab of `class`.
    fn open_slab(&mut self, class: usize) -> Option<usize> {
        let chunk = self.roomy_chunks.first()?;
        let block = self.free_blocks[chunk].trailing_zeros() as usize;
        self.free_blocks[chunk] &= !(1 << block);
        if self.free_blocks[chunk] == 0 {
            self.roomy_chunks.remove(chunk);
        }
        let index = chunk * BLOCKS_PER_CHUNK + block;
        let slab = &mut self.slabs[index];
        slab.class = class as u8;
        // Slots past the last whole one are never handed out.
        let slots = slots_per_slab(class);
        for (word, bits) in slab.taken.iter_mut().enumerate() {
            let first = word * 64;
            *bits = match slots.saturating_sub(first) {
                0 => u64::MAX,
                n if n >= 64 => 0,
                n => !((1u64 << n) - 1),
            };
        }
        self.partial[class].insert(index);
        self.counts.slabs += 1;
        Some(index)
    }

    /// Gives a slot of `class` back. Returns the chunk's index when that
    /// left its chunk with no slab at all.
    pub(super) fn free(&mut self, slot: Slot, class: usize) -> Option<usize> {
        let slab_index = slot.slab as usize;
        let slab = &mut self.slabs[slab_index];
        debug_assert_eq!(slab.class as usize, class);
        let bit = 1u64 << (slot.index % 64);
        debug_assert!(slab.taken[slot.index as usize / 64] & bit != 0);
        slab.taken[slot.index as usize / 64] &= !bit;
        let was_full = slab.used as usize == slots_per_slab(class);
        slab.used -= 1;
        self.counts.slot_bytes -= class_size(class) as u64;
        if slab.used > 0 {
            if was_full {
                self.partial[class].insert(slab_index);
            }
            return None;
        }
        *slab = Slab::EMPTY;
        self.partial[class].remove(slab_index);
        self.counts.slabs -= 1;
        let chunk = slot.chunk();
        self.free_blocks[chunk] |= 1 << (slab_index % BLOCKS_PER_CHUNK);
        self.roomy_chunks.insert(chunk);
        (self.free_blocks[chunk] == u64::MAX).then_some(chunk)
    }

    /// Picks slabs to empty (compaction, `compact.rs`): of the class whose
    /// slabs with room have the most free bytes, as many of its least used
    /// slabs as the free slots of its other slabs can take in, at most
    /// `victims`' capacity. They leave the class's slabs with room, so no
    /// new page goes into them until [`Slabs::end_drain`]. Returns the
    /// class; `None` where no class has a whole slab's worth of free
    /// slots, which bounds what fragmentation can waste: less than one
    /// slab per class.
    pub(super) fn start_drain<const N: usize>(
        &mut self,
        victims: &mut ArrayVec<u32, N>,
    ) -> Option<usize> {
        let free_slots = |slabs: &Slabs, class: usize| -> usize {
            let per_slab = slots_per_slab(class);
            slabs.partial[class]
                .iter()
                .map(|slab| per_slab - slabs.slabs[slab].used as usize)
                .sum()
        };
        let (class, free) = (0..CLASSES)
            .map(|class| (class, free_slots(self, class)))
            .filter(|&(class, free)| free >= slots_per_slab(class))
            .max_by_key(|&(class, free)| free * class_size(class))?;
        let drain = (free / slots_per_slab(class)).min(N);
        // The `drain` least used slabs of the class, by insertion.
        let mut least: ArrayVec<(u16, u32), N> = ArrayVec::new();
        for slab in self.partial[class].iter() {
            let used = self.slabs[slab].used;
            let at = least.partition_point(|&(u, _)| u <= used);
            if at < drain {
                if least.len() == drain {
                    least.pop();
                }
                least.insert(at, (used, slab as u32));
            }
        }
        for &(_, slab) in &least {
            self.partial[class].remove(slab as usize);
            victims.push(slab);
        }
        Some(class)
    }

    /// Slots in use in `slab`.
    pub(super) fn used(&self, slab: u32) -> usize {
        self.slabs[slab as usize].used as usize
    }

    /// Ends the draining of `slab` of `class`: if it is still a slab of
    /// that class with room, new pages may go there again.
    pub(super) fn end_drain(&mut self, slab: u32, class: usize) {
        let state = &self.slabs[slab as usize];
        if state.class as usize == class && (state.used as usize) < slots_per_slab(class) {
            self.partial[class].insert(slab as usize);
        }
    }

    /// The lowest chunk index with no chunk, if the table has room.
    pub(super) fn vacant_chunk(&self) -> Option<usize> {
        self.present.iter().position(|p| !p)
    }

    /// Records a new chunk at `index`: all of its blocks are free.
    pub(super) fn add_chunk(&mut self, index: usize) {
        debug_assert!(!self.present[index]);
        self.present[index] = true;
        self.free_blocks[index] = u64::MAX;
        self.roomy_chunks.insert(index);
        self.counts.chunks += 1;
    }

    /// Forgets the chunk at `index`, which holds no slab.
    pub(super) fn remove_chunk(&mut self, index: usize) {
        debug_assert!(self.present[index] && self.free_blocks[index] == u64::MAX);
        self.present[index] = false;
        self.free_blocks[index] = 0;
        self.roomy_chunks.remove(index);
        self.counts.chunks -= 1;
    }

    /// Whether the chunk at `index` holds no slab (and can go back).
    #[cfg(test)]
    fn chunk_empty(&self, index: usize) -> bool {
        self.present[index] && self.free_blocks[index] == u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn classes_cover_every_length_with_the_smallest_slot_that_fits() {
        for len in 1..=PAGE {
            let class = class_of(len);
            assert!(class_size(class) >= len, "{len}");
            if class != RAW {
                assert!(class_size(class) - len < GRAIN, "{len}");
            }
        }
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(64), 0);
        assert_eq!(class_of(65), 1);
        assert_eq!(class_of(3072), RAW - 1);
        assert_eq!(class_of(3073), RAW);
        assert_eq!(class_size(RAW), PAGE);
        assert_eq!(CLASSES, 49);
    }

    #[test]
    fn lowest_members_come_first() {
        let mut bits = Bits::new(10_000);
        assert_eq!(bits.first(), None);
        for i in [9_999, 4_097, 64, 4_096] {
            bits.insert(i);
        }
        assert_eq!(bits.first(), Some(64));
        bits.remove(64);
        assert_eq!(bits.first(), Some(4_096));
        bits.remove(4_096);
        bits.remove(4_097);
        assert_eq!(bits.first(), Some(9_999));
        bits.remove(9_999);
        assert_eq!(bits.first(), None);
    }

    #[test]
    fn a_full_table_refuses_until_a_chunk_is_added() {
        let mut slabs = Slabs::new(2);
        assert_eq!(slabs.alloc(RAW), None);
        assert_eq!(slabs.vacant_chunk(), Some(0));
        slabs.add_chunk(0);
        let raw_per_chunk = BLOCKS_PER_CHUNK * SLAB / PAGE;
        let taken: Vec<Slot> = (0..raw_per_chunk)
            .map(|_| slabs.alloc(RAW).unwrap())
            .collect();
        assert_eq!(slabs.alloc(0), None);
        assert_eq!(slabs.vacant_chunk(), Some(1));
        for (i, slot) in taken.iter().enumerate() {
            let last = i + 1 == taken.len();
            assert_eq!(slabs.free(*slot, RAW), last.then_some(0));
        }
        assert!(slabs.chunk_empty(0));
        slabs.remove_chunk(0);
        assert_eq!(slabs.counts(), SlabCounts::default());
    }

    #[test]
    fn draining_picks_the_least_used_slabs_the_rest_can_take_in() {
        let mut slabs = Slabs::new(1);
        slabs.add_chunk(0);
        // Five raw slabs (16 slots each), used 16, 12, 3, 9, 1.
        let taken: Vec<Slot> = (0..5 * 16).map(|_| slabs.alloc(RAW).unwrap()).collect();
        let keep = [16, 12, 3, 9, 1];
        for (slab, &used) in keep.iter().enumerate() {
            for slot in &taken[slab * 16 + used..(slab + 1) * 16] {
                slabs.free(*slot, RAW);
            }
        }
        // Free slots: 4 + 13 + 7 + 15 = 39 in the four partial slabs:
        // room for two slabs' pages, the least used two.
        let mut victims: ArrayVec<u32, 8> = ArrayVec::new();
        assert_eq!(slabs.start_drain(&mut victims), Some(RAW));
        assert_eq!(victims.as_slice(), [4, 2]);
        // No new page goes into a slab being drained.
        let next = slabs.alloc(RAW).unwrap();
        assert_eq!(next.slab, 1);
        // Ending the drain of a slab still holding pages makes it usable
        // again; one emptied meanwhile is a free block.
        for slot in &taken[2 * 16..2 * 16 + 3] {
            slabs.free(*slot, RAW);
        }
        slabs.end_drain(2, RAW);
        slabs.end_drain(4, RAW);
        assert_eq!(slabs.counts().slabs, 4, "slab 2 is a free block");
        assert_eq!(slabs.alloc(RAW).unwrap().slab, 1);
        for _ in 0..2 {
            slabs.alloc(RAW).unwrap();
        }
        // Slab 1 is full; then slabs with room, lowest first: 3, then 4.
        assert_eq!(slabs.alloc(RAW).unwrap().slab, 3);
        // A class whose free slots make no whole slab is not drained.
        let mut slabs = Slabs::new(1);
        slabs.add_chunk(0);
        let one = slabs.alloc(0).unwrap();
        let mut victims: ArrayVec<u32, 8> = ArrayVec::new();
        assert_eq!(slabs.start_drain(&mut victims), None);
        slabs.free(one, 0);
    }

    /// One step of a random workload: take a slot of a class, or free the
    /// nth slot taken.
    #[derive(Debug, Clone)]
    enum Step {
        Take(usize),
        Free(usize),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0..CLASSES).prop_map(Step::Take),
                // Few classes, many slots of each: slabs fill up.
                3 => prop_oneof![Just(0usize), Just(23), Just(RAW)].prop_map(Step::Take),
                4 => any::<usize>().prop_map(Step::Free),
            ],
            1..1500,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Slots never overlap, each lies inside its slab and chunk, the
        /// counts add up, and freeing everything gives every chunk back.
        #[test]
        fn slots_never_overlap_and_frees_return_everything(steps in steps()) {
            let chunks = 3;
            let mut slabs = Slabs::new(chunks);
            let mut live: Vec<(Slot, usize)> = Vec::new();
            // Every taken byte: (chunk, offset) -> owner slot.
            let mut bytes: HashMap<(usize, u64), Slot> = HashMap::new();
            for step in steps {
                match step {
                    Step::Take(class) => {
                        let slot = match slabs.alloc(class) {
                            Some(slot) => slot,
                            None => match slabs.vacant_chunk() {
                                Some(index) => {
                                    slabs.add_chunk(index);
                                    slabs.alloc(class).expect("a new chunk has room")
                                }
                                None => continue,
                            },
                        };
                        let offset = slot.offset(class);
                        let size = class_size(class) as u64;
                        prop_assert_eq!(offset / SLAB as u64, (offset + size - 1) / SLAB as u64);
                        prop_assert!(offset + size <= crate::backend::CHUNK_SIZE);
                        // Slots of one class are grain-aligned: checking the
                        // first byte of each grain finds any overlap.
                        for at in (offset..offset + size).step_by(GRAIN) {
                            let old = bytes.insert((slot.chunk(), at), slot);
                            prop_assert!(old.is_none(), "{:?} overlaps {:?}", slot, old);
                        }
                        live.push((slot, class));
                    }
                    Step::Free(n) if !live.is_empty() => {
                        let (slot, class) = live.swap_remove(n % live.len());
                        let offset = slot.offset(class);
                        for at in (offset..offset + class_size(class) as u64).step_by(GRAIN) {
                            prop_assert_eq!(bytes.remove(&(slot.chunk(), at)), Some(slot));
                        }
                        if let Some(chunk) = slabs.free(slot, class) {
                            prop_assert!(slabs.chunk_empty(chunk));
                            prop_assert!(live.iter().all(|(s, _)| s.chunk() != chunk));
                            slabs.remove_chunk(chunk);
                        }
                    }
                    Step::Free(_) => {}
                }
                let slot_bytes: u64 = live.iter().map(|(_, c)| class_size(*c) as u64).sum();
                prop_assert_eq!(slabs.counts().slot_bytes, slot_bytes);
            }
            for (slot, class) in live.drain(..) {
                if let Some(chunk) = slabs.free(slot, class) {
                    slabs.remove_chunk(chunk);
                }
            }
            prop_assert_eq!(slabs.counts(), SlabCounts::default());
            prop_assert_eq!(slabs.vacant_chunk(), Some(0));
        }
    }
}
