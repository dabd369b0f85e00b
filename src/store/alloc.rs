//! Taking VRAM and giving it back: chunks allocated (all at open, or each
//! at its first write), zeroed before anything can read them, and scrubbed
//! before the driver gets them back.

use std::sync::atomic::Ordering;

use arrayvec::ArrayVec;
use tracing::{debug, info, warn};

use super::error::StoreError;
use super::BlockStore;
use crate::backend::{Backend, BackendError, ChunkId, Lane, TransferOp, CHUNK_SIZE, MAX_BATCH};
use crate::size::ByteSize;

/// Chunks zeroed (or scrubbed) in one batch: a zero step each, as many
/// steps as a lane takes.
const BATCH: usize = MAX_BATCH;

impl BlockStore {
    /// Takes a chunk for an empty slot and zeroes it (lazy allocation).
    pub(super) fn allocate_slot(
        &self,
        slot_index: usize,
        lane: &mut dyn Lane,
    ) -> Result<(), StoreError> {
        let slot = &self.slots[slot_index];
        let mut guard = slot.chunk.write().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() {
            return Ok(());
        }
        let chunk = self.backend.allocate_chunk()?;
        if let Err(err) = submit_and_wait(lane, &[zero_whole(chunk)]) {
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
    pub(super) fn free_slot(&self, slot_index: usize) {
        let slot = &self.slots[slot_index];
        // The lane before the slot's lock, the order every writer takes them.
        let mut lanes = self.lanes.one();
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
    pub(super) fn allocate_all(&self) -> Result<(), StoreError> {
        let total = self.slots.len();
        let mut lanes = self.lanes.one();
        let mut next_report = total / 10;
        let mut start = 0;
        while start < total {
            let end = (start + BATCH).min(total);
            let mut batch: ArrayVec<ChunkId, BATCH> = ArrayVec::new();
            let mut result = Ok(());
            for _ in start..end {
                match self.backend.allocate_chunk() {
                    Ok(chunk) => batch.push(chunk),
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                }
            }
            let zeroes: ArrayVec<TransferOp, BATCH> =
                batch.iter().map(|&chunk| zero_whole(chunk)).collect();
            let result = result.and_then(|()| submit_and_wait(lanes.first(), &zeroes));
            if let Err(err) = result {
                for &chunk in &batch {
                    self.backend.free_chunk(chunk);
                }
                if err == BackendError::OutOfDeviceMemory {
                    return Err(StoreError::TooLarge {
                        requested: ByteSize(self.size),
                        available: ByteSize((start + batch.len()) as u64 * CHUNK_SIZE),
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

    /// Scrubs and frees every chunk still held: the store is going away.
    pub(super) fn free_all(&mut self) {
        if let Some(packed) = &self.packed {
            let mut lanes = self.lanes.one();
            packed.free_all(&*self.backend, lanes.first());
            return;
        }
        let chunks: Vec<ChunkId> = self
            .slots
            .iter_mut()
            .filter_map(|slot| slot.chunk.get_mut().ok().and_then(Option::take))
            .collect();
        let mut lanes = self.lanes.one();
        scrub_and_free(&*self.backend, lanes.first(), &chunks);
    }
}

fn zero_whole(chunk: ChunkId) -> TransferOp {
    TransferOp::Zero {
        chunk,
        chunk_offset: 0,
        len: CHUNK_SIZE,
    }
}

fn submit_and_wait(lane: &mut dyn Lane, ops: &[TransferOp]) -> Result<(), BackendError> {
    lane.submit(ops).and_then(|()| lane.wait())
}

/// Zeroes chunks on the GPU, then gives them back: VRAM we hand back to
/// the driver never carries swapped-out pages to its next user, whatever the
/// driver does (neither Vulkan nor CUDA promises to clear memory between
/// processes). A failed scrub (a lost device) still frees the chunks; it is
/// logged, and a lost device is torn down by its driver anyway.
fn scrub_and_free(backend: &dyn Backend, lane: &mut dyn Lane, chunks: &[ChunkId]) {
    let mut scrubbing = true;
    for batch in chunks.chunks(BATCH) {
        let zeroes: ArrayVec<TransferOp, BATCH> =
            batch.iter().map(|&chunk| zero_whole(chunk)).collect();
        if scrubbing {
            if let Err(err) = submit_and_wait(lane, &zeroes) {
                warn!(%err, "could not scrub VRAM before freeing it; freeing it as it is");
                scrubbing = false;
            }
        }
        for &chunk in batch {
            backend.free_chunk(chunk);
        }
    }
}
