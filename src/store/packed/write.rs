//! The compressed write path: whole pages packed into fresh slots and
//! swapped in, part pages read, merged and written back under their
//! group's lock; zeroes and trims as writes of nothing.

use arrayvec::ArrayVec;

use super::codec::{fill_word, Codec, Packed};
use super::slabs::{class_of, class_size, Slot};
use super::spans::{lay_out, Piece};
use super::{write_batch_pages, Entry, PackedPages, GROUP, PAGE, SAME};
use crate::backend::{Backend, Fill, Lane, TransferOp, MAX_BATCH};
use crate::store::error::StoreError;
use crate::store::lanes::LanePool;

/// Where a request's bytes come from.
#[derive(Clone, Copy)]
pub(in crate::store) enum Source<'a> {
    Bytes(&'a [u8]),
    Zeros,
}

impl Source<'_> {
    fn copy_into(self, dst: &mut [u8], at: usize) {
        match self {
            Source::Bytes(bytes) => dst.copy_from_slice(&bytes[at..at + dst.len()]),
            Source::Zeros => dst.fill(0),
        }
    }
}

/// The pages of one write batch.
#[derive(Clone, Copy)]
enum Pages<'a> {
    /// Whole pages of bytes.
    Bytes(&'a [u8]),
    /// This many pages made to read as zeros (trim and zero).
    Empty(usize),
}

impl PackedPages {
    /// Writes `len` bytes from `source` at `offset` (in range), on one lane.
    pub(in crate::store) fn write(
        &self,
        backend: &dyn Backend,
        lanes: &LanePool,
        source: Source<'_>,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let mut held = lanes.one();
        let mut codec = self.codec(held.first_index());
        let lane = held.first();
        let per_batch = write_batch_pages(lane);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE as u64;
            let page_start = page * PAGE as u64;
            if pos != page_start || end - pos < PAGE as u64 {
                let to = (page_start + PAGE as u64).min(end);
                self.write_partial(backend, lane, &mut codec, source, offset, pos, to)?;
                pos = to;
                continue;
            }
            let whole = (((end - pos) / PAGE as u64) as usize).min(per_batch);
            let at = (pos - offset) as usize;
            let pages = match source {
                Source::Bytes(bytes) => Pages::Bytes(&bytes[at..at + whole * PAGE]),
                Source::Zeros => Pages::Empty(whole),
            };
            let packed = self.pack(backend, lane, &mut codec, pages)?;
            for (n, entry) in packed.iter().enumerate() {
                let page = page as usize + n;
                let mut entries = self.groups[page / GROUP]
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                let old = std::mem::replace(&mut entries[page % GROUP], *entry);
                drop(entries);
                self.count(old, *entry);
                self.release(backend, lane, old);
            }
            pos += (whole * PAGE) as u64;
        }
        Ok(())
    }

    /// Writes `pos..to`, which lies in one page and does not cover it:
    /// the old page is read, merged and written back under its group's
    /// lock.
    #[allow(clippy::too_many_arguments)]
    fn write_partial(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        codec: &mut Codec,
        source: Source<'_>,
        offset: u64,
        pos: u64,
        to: u64,
    ) -> Result<(), StoreError> {
        let page = (pos / PAGE as u64) as usize;
        let page_start = (page * PAGE) as u64;
        let mut entries = self.groups[page / GROUP]
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let old = entries[page % GROUP];
        let mut bytes = [0u8; PAGE];
        match old.slot() {
            None if old.len == SAME => fill_word(&mut bytes, old.word),
            None => {}
            Some((slot, class)) => {
                let step = TransferOp::Download {
                    staging_offset: 0,
                    chunk: self.chunk(slot),
                    chunk_offset: slot.offset(class),
                    len: u64::from(old.len),
                };
                lane.submit(&[step]).and_then(|()| lane.wait())?;
                let stored = &lane.staged()[..old.len as usize];
                self.unpack(codec, old, stored, page_start, &mut bytes, 0)?;
            }
        }
        let in_page = (pos - page_start) as usize;
        let merged = &mut bytes[in_page..in_page + (to - pos) as usize];
        source.copy_into(merged, (pos - offset) as usize);
        let mut new = self.pack(backend, lane, codec, Pages::Bytes(&bytes))?[0];
        // A trim or zero that leaves the page all zeros leaves no page, as
        // one of the whole page does.
        if matches!(source, Source::Zeros) && new == Entry::same(0) {
            new = Entry::EMPTY;
        }
        entries[page % GROUP] = new;
        drop(entries);
        self.count(old, new);
        self.release(backend, lane, old);
        Ok(())
    }

    /// Compresses `pages`, takes slots for them and uploads them: their
    /// new entries, to swap in. On failure no slot is left taken. The
    /// packed bytes wait in the back half of staging until every slot of
    /// the batch is known, then go to VRAM: through the mapping, or by
    /// steps from the front half of staging in VRAM order, so that
    /// neighbouring slots take one step (`spans.rs`).
    fn pack(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        codec: &mut Codec,
        pages: Pages<'_>,
    ) -> Result<ArrayVec<Entry, MAX_BATCH>, StoreError> {
        let mut entries: ArrayVec<Entry, MAX_BATCH> = ArrayVec::new();
        // (class, page) of each page that needs a slot.
        let mut wanting: ArrayVec<(usize, usize), MAX_BATCH> = ArrayVec::new();
        let back = lane.staging().len() / 2;
        let count = match pages {
            Pages::Bytes(bytes) => bytes.len() / PAGE,
            Pages::Empty(count) => count,
        };
        for n in 0..count {
            let Pages::Bytes(bytes) = pages else {
                entries.push(Entry::EMPTY);
                continue;
            };
            let page = &bytes[n * PAGE..(n + 1) * PAGE];
            let (len, stored) = match codec.compress(page) {
                Packed::Same(word) => {
                    entries.push(Entry::same(word));
                    continue;
                }
                Packed::Compressed(len) => (len, codec.packed(len)),
                Packed::Raw => (PAGE, page),
            };
            let at = back + n * PAGE;
            lane.staging()[at..at + len].copy_from_slice(stored);
            let word = match self.verify {
                true => u64::from(crc32c::crc32c(stored)),
                false => 0,
            };
            // The slot is filled in below: until then no one sees it.
            entries.push(Entry {
                slab: 0,
                index: 0,
                len: len as u16,
                word,
            });
            wanting.push((class_of(len), n));
        }
        wanting.sort_unstable();
        self.take_slots(backend, lane, back, &wanting, &mut entries)?;
        let mut pieces: ArrayVec<Piece, MAX_BATCH> = ArrayVec::new();
        for &(class, n) in &wanting {
            let slot = Slot {
                slab: entries[n].slab,
                index: entries[n].index,
            };
            let (chunk, chunk_offset) = (self.chunk(slot), slot.offset(class));
            // Where the chunk is mapped VRAM, CPU stores put the bytes
            // there at once (fenced): no step.
            if backend.chunk_mapped(chunk) {
                let at = back + n * PAGE;
                let stored = &lane.staging()[at..at + entries[n].len as usize];
                if let Err(err) = backend.write_mapped(chunk, chunk_offset, Fill::Bytes(stored)) {
                    self.give_back(backend, lane, &entries);
                    return Err(err.into());
                }
            } else {
                pieces.push(Piece {
                    at: n,
                    chunk,
                    offset: chunk_offset,
                    len: class_size(class) as u64,
                    staged: 0,
                });
            }
        }
        if !pieces.is_empty() {
            let steps = lay_out(&mut pieces, 0, back, true);
            let staging = lane.staging();
            for piece in &pieces {
                let from = back + piece.at * PAGE;
                let len = entries[piece.at].len as usize;
                staging.copy_within(from..from + len, piece.staged);
            }
            if let Err(err) = lane.submit(&steps).and_then(|()| lane.wait()) {
                self.give_back(backend, lane, &entries);
                return Err(err.into());
            }
        }
        Ok(entries)
    }

    /// Gives the entries of `wanting` ((class, page) pairs, sorted) their
    /// slots. As many as the slabs have are taken under one hold of their
    /// lock, so that a batch's pages of one class lie side by side and
    /// read back in one step: taken one at a time, the slots of requests
    /// written at once interleaved, and each page read back was a copy of
    /// its own (2.0 GB/s at 8 connections on an H100, against 4.7–5.4 for
    /// the same pages written one request at a time). The rest, where a
    /// chunk must be taken or compaction must run, one by one. On failure
    /// no slot is left taken.
    fn take_slots(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        room: usize,
        wanting: &[(usize, usize)],
        entries: &mut [Entry],
    ) -> Result<(), StoreError> {
        if wanting.is_empty() {
            return Ok(());
        }
        let mut taken = 0;
        {
            let mut slabs = self.lock_slabs();
            for &(class, n) in wanting {
                let Some(slot) = slabs.alloc(class) else {
                    break;
                };
                (entries[n].slab, entries[n].index) = (slot.slab, slot.index);
                taken += 1;
            }
        }
        for &(class, n) in &wanting[taken..] {
            match self.take_slot(backend, lane, room, class) {
                Ok(slot) => (entries[n].slab, entries[n].index) = (slot.slab, slot.index),
                Err(err) => {
                    for &(_, n) in &wanting[..taken] {
                        self.release(backend, lane, entries[n]);
                    }
                    return Err(err);
                }
            }
            taken += 1;
        }
        Ok(())
    }
}
