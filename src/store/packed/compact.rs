//! Compaction: slack won back when a write finds no room.
//!
//! A slab holds one class, and a page that is overwritten or trimmed frees
//! its slot wherever it was. When the pages change their sizes (a program
//! whose memory compresses worse than what it replaced; fio's buffers after
//! swap's pages), the slabs of the old class keep a few live slots each
//! while the new class finds no free block: measured before this existed,
//! a store held 466 MB of slots in 1 GiB of VRAM and refused writes.
//!
//! So a write that finds no slot and no block first compacts: the class
//! whose slabs have the most free bytes gives up its least used slabs, as
//! many as the free slots of its other slabs can take in, and their pages
//! move there. The emptied blocks are free for any class. A write is
//! refused only when no class has a whole slab's worth of free slots: the
//! slack that is left is less than one 64 KiB slab per class (49 classes:
//! under 3.1 MiB however the VRAM is).
//!
//! Each page moves under its group's exclusive lock, as a write of it
//! would: read, new slot, write, entry swapped, old slot freed. Groups are
//! only ever tried, never waited for: the writer that compacts may hold one
//! itself (a partial write), and a busy group keeps its pages where they
//! are this time. Compactions run one at a time.

use std::sync::atomic::Ordering;
use std::sync::TryLockError;

use arrayvec::ArrayVec;
use tracing::debug;

use super::slabs::{class_size, Slot};
use super::{Entry, PackedPages, GROUP, PAGE};
use crate::backend::{Backend, Fill, Lane, TransferOp};
use crate::store::error::StoreError;

/// Slabs one compaction may empty.
const DRAIN: usize = 64;

impl PackedPages {
    /// Empties the least used slabs of one class into the rest of its
    /// slabs, with `lane` and the first `room` bytes of its staging (at
    /// least a page). Returns whether any block was freed.
    pub(super) fn compact(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        room: usize,
    ) -> Result<bool, StoreError> {
        let _one = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let mut victims: ArrayVec<u32, DRAIN> = ArrayVec::new();
        let (class, before, held) = {
            let mut slabs = self.lock_slabs();
            let Some(class) = slabs.start_drain(&mut victims) else {
                return Ok(false);
            };
            let held = victims.iter().map(|&slab| slabs.used(slab)).sum();
            (class, slabs.counts().slabs, held)
        };
        victims.sort_unstable();
        let moved = self.move_out(backend, lane, room, class, &victims, held);
        let mut slabs = self.lock_slabs();
        for &slab in &victims {
            slabs.end_drain(slab, class);
        }
        let freed = before.saturating_sub(slabs.counts().slabs);
        drop(slabs);
        let moved = moved?;
        self.compacted_slabs.fetch_add(freed, Ordering::Relaxed);
        debug!(class, victims = victims.len(), moved, freed, "compacted");
        Ok(freed > 0)
    }

    /// Moves every page in a slot of `class` in `victims` (sorted) that
    /// its group lets it, into other slots; the table is searched until
    /// `held`, the pages the victims held, have moved. Returns the pages
    /// moved.
    fn move_out(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        room: usize,
        class: usize,
        victims: &[u32],
        held: usize,
    ) -> Result<usize, StoreError> {
        let in_victim = |entry: &Entry| {
            entry
                .slot()
                .is_some_and(|(slot, c)| c == class && victims.binary_search(&slot.slab).is_ok())
        };
        let per_batch = (room / PAGE).clamp(1, GROUP);
        let mut moved = 0;
        for group in self.groups.iter() {
            if moved >= held {
                break;
            }
            let mut entries = match group.try_write() {
                Ok(entries) => entries,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            let pages: ArrayVec<usize, GROUP> =
                (0..GROUP).filter(|&n| in_victim(&entries[n])).collect();
            for batch in pages.chunks(per_batch) {
                match self.move_batch(backend, lane, class, &mut entries, batch)? {
                    0 => return Ok(moved),
                    n => moved += n,
                }
            }
        }
        Ok(moved)
    }

    /// Moves the pages `batch` of a group (its entries held exclusively):
    /// read by one batch into staging, new slots, written, entries
    /// swapped, old slots freed. Returns how many moved: 0 when no slot
    /// could be had, and then nothing changed.
    fn move_batch(
        &self,
        backend: &dyn Backend,
        lane: &mut dyn Lane,
        class: usize,
        entries: &mut [Entry; GROUP],
        batch: &[usize],
    ) -> Result<usize, StoreError> {
        let reads: ArrayVec<TransferOp, GROUP> = batch
            .iter()
            .enumerate()
            .filter_map(|(n, &page)| {
                let entry = entries[page];
                let (slot, class) = entry.slot()?;
                Some(TransferOp::Download {
                    staging_offset: n * PAGE,
                    chunk: self.chunk(slot),
                    chunk_offset: slot.offset(class),
                    len: u64::from(entry.len),
                })
            })
            .collect();
        lane.submit(&reads).and_then(|()| lane.wait())?;
        let mut slots: ArrayVec<Slot, GROUP> = ArrayVec::new();
        for _ in batch {
            match self.try_slot(backend, class) {
                Ok(Some(slot)) => slots.push(slot),
                stop => {
                    self.forget(backend, lane, &slots, class);
                    return stop.map(|_| 0);
                }
            }
        }
        let mut writes: ArrayVec<TransferOp, GROUP> = ArrayVec::new();
        for (n, (&page, slot)) in batch.iter().zip(&slots).enumerate() {
            let len = entries[page].len as usize;
            let (chunk, chunk_offset) = (self.chunk(*slot), slot.offset(class));
            if backend.chunk_mapped(chunk) {
                let bytes = &lane.staged()[n * PAGE..n * PAGE + len];
                if let Err(err) = backend.write_mapped(chunk, chunk_offset, Fill::Bytes(bytes)) {
                    self.forget(backend, lane, &slots, class);
                    return Err(err.into());
                }
            } else {
                writes.push(TransferOp::Upload {
                    staging_offset: n * PAGE,
                    chunk,
                    chunk_offset,
                    len: len as u64,
                });
            }
        }
        if !writes.is_empty() {
            if let Err(err) = lane.submit(&writes).and_then(|()| lane.wait()) {
                self.forget(backend, lane, &slots, class);
                return Err(err.into());
            }
        }
        for (&page, slot) in batch.iter().zip(&slots) {
            let old = entries[page];
            entries[page] = Entry {
                slab: slot.slab,
                index: slot.index,
                ..old
            };
            self.release(backend, lane, old);
        }
        Ok(batch.len())
    }

    /// Frees slots of `class` taken for pages that never moved into them.
    fn forget(&self, backend: &dyn Backend, lane: &mut dyn Lane, slots: &[Slot], class: usize) {
        for slot in slots {
            let unused = Entry {
                slab: slot.slab,
                index: slot.index,
                len: class_size(class) as u16,
                word: 0,
            };
            self.release(backend, lane, unused);
        }
    }
}
