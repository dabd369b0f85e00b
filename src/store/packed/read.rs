//! The compressed read path: a request's pages under their groups' shared
//! locks, packed bytes downloaded in one batch (or loaded through the
//! mapping), and unpacked into the request.

use std::sync::atomic::Ordering;

use arrayvec::ArrayVec;
use tracing::warn;

use super::codec::Codec;
use super::spans::{lay_out, Piece};
use super::{batch_pages, Entry, PackedPages, GROUP, PAGE, SAME};
use crate::backend::{Backend, MAX_BATCH};
use crate::store::error::StoreError;
use crate::store::lanes::LanePool;
use crate::store::read::MAPPED_READ_MAX;

impl PackedPages {
    /// Reads `buf.len()` bytes at `offset` (in range), on one lane: a
    /// small read of mapped chunks by CPU loads, the rest by DMA.
    pub(in crate::store) fn read(
        &self,
        backend: &dyn Backend,
        lanes: &LanePool,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), StoreError> {
        let mut held = lanes.one();
        let mut codec = self.codec(held.first_index());
        if buf.len() <= MAPPED_READ_MAX
            && backend.mapped()
            && self.read_mapped(backend, &mut codec, buf, offset)?
        {
            return Ok(());
        }
        let lane = held.first();
        let per_batch = batch_pages(lane);
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let mut guards: ArrayVec<_, { MAX_BATCH / GROUP + 2 }> = ArrayVec::new();
            let mut pieces: ArrayVec<Piece, MAX_BATCH> = ArrayVec::new();
            // Pages to unpack once the batch is done: (device offset of
            // the page, its entry).
            let mut waiting: ArrayVec<(u64, Entry), MAX_BATCH> = ArrayVec::new();
            let mut group_of_guard = usize::MAX;
            while pos < end && pieces.len() < per_batch && !guards.is_full() {
                let page = pos / PAGE as u64;
                let group = page as usize / GROUP;
                if group != group_of_guard {
                    guards.push(self.groups[group].read().unwrap_or_else(|e| e.into_inner()));
                    group_of_guard = group;
                }
                let Some(entries) = guards.last() else { break };
                let entry = entries[page as usize % GROUP];
                let page_start = page * PAGE as u64;
                let piece_end = (page_start + PAGE as u64).min(end);
                let piece = &mut buf[(pos - offset) as usize..(piece_end - offset) as usize];
                let in_page = (pos - page_start) as usize;
                match entry.slot() {
                    None if entry.len == SAME => fill_piece(piece, entry.word, in_page),
                    None => piece.fill(0),
                    Some((slot, class)) => {
                        pieces.push(Piece {
                            at: waiting.len(),
                            chunk: self.chunk(slot),
                            offset: slot.offset(class),
                            len: u64::from(entry.len),
                            staged: 0,
                        });
                        waiting.push((page_start, entry));
                    }
                }
                pos = piece_end;
            }
            if pieces.is_empty() {
                continue;
            }
            let steps = lay_out(&mut pieces, PAGE as u64, lane.staging().len(), false);
            lane.submit(&steps).and_then(|()| lane.wait())?;
            let staged = lane.staged();
            for piece in &pieces {
                let (page_start, entry) = waiting[piece.at];
                let stored = &staged[piece.staged..piece.staged + entry.len as usize];
                let from = page_start.max(offset);
                let to = (page_start + PAGE as u64).min(end);
                let piece = &mut buf[(from - offset) as usize..(to - offset) as usize];
                self.unpack(
                    &mut codec,
                    entry,
                    stored,
                    page_start,
                    piece,
                    from - page_start,
                )?;
            }
            drop(guards);
        }
        Ok(())
    }

    /// Reads a small request by CPU loads through the mapping of the
    /// chunks its pages are in: no batch, no wait. Each group's lock is
    /// held shared across its page's loads, as across a DMA. Returns false,
    /// for the DMA path to read it all, where a page's chunk is not mapped.
    fn read_mapped(
        &self,
        backend: &dyn Backend,
        codec: &mut Codec,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<bool, StoreError> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE as u64;
            let page_start = page * PAGE as u64;
            let piece_end = (page_start + PAGE as u64).min(end);
            let piece = &mut buf[(pos - offset) as usize..(piece_end - offset) as usize];
            let in_page = pos - page_start;
            let entries = self.groups[page as usize / GROUP]
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let entry = entries[page as usize % GROUP];
            match entry.slot() {
                None if entry.len == SAME => fill_piece(piece, entry.word, in_page as usize),
                None => piece.fill(0),
                Some((slot, class)) => {
                    let chunk = self.chunk(slot);
                    if !backend.chunk_mapped(chunk) {
                        return Ok(false);
                    }
                    let mut stored = [0u8; PAGE];
                    let stored = &mut stored[..entry.len as usize];
                    backend.read_mapped(chunk, slot.offset(class), stored)?;
                    self.unpack(codec, entry, stored, page_start, piece, in_page)?;
                }
            }
            drop(entries);
            pos = piece_end;
        }
        Ok(true)
    }

    /// Turns the stored bytes of a page back into `piece`, the part of the
    /// page from `in_page` on.
    pub(super) fn unpack(
        &self,
        codec: &mut Codec,
        entry: Entry,
        stored: &[u8],
        page_start: u64,
        piece: &mut [u8],
        in_page: u64,
    ) -> Result<(), StoreError> {
        let corrupt = || {
            self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
            warn!(
                offset = page_start,
                "a compressed page does not read back as it was written"
            );
            StoreError::Corrupt { offset: page_start }
        };
        if self.verify && u64::from(crc32c::crc32c(stored)) != entry.word {
            return Err(corrupt());
        }
        let in_page = in_page as usize;
        if stored.len() == PAGE {
            piece.copy_from_slice(&stored[in_page..in_page + piece.len()]);
        } else if piece.len() == PAGE {
            if !codec.decompress(stored, piece) {
                return Err(corrupt());
            }
        } else {
            let mut page = [0u8; PAGE];
            if !codec.decompress(stored, &mut page) {
                return Err(corrupt());
            }
            piece.copy_from_slice(&page[in_page..in_page + piece.len()]);
        }
        Ok(())
    }
}

/// Fills `piece`, which starts `in_page` bytes into a page, as that page
/// filled with `word` reads.
fn fill_piece(piece: &mut [u8], word: u64, in_page: usize) {
    let bytes = word.to_ne_bytes();
    for (n, byte) in piece.iter_mut().enumerate() {
        *byte = bytes[(in_page + n) % 8];
    }
}
