//! The store's staging lanes, made once at open and lent to requests.
//!
//! A request holds up to [`MAX_DEPTH`] lanes and uses them in turn: while
//! some batches are in flight, the next piece is copied into another lane's
//! staging. Each submitted batch carries what the request still has to do
//! once it is done (`P`: a read's or a write's pending piece).

use std::sync::{Condvar, Mutex, MutexGuard};

use arrayvec::ArrayVec;

use super::error::StoreError;
use crate::backend::{Backend, BackendError, HostRegion, Lane, TransferOp, BLOCK_SIZE};

/// Most lanes one request keeps in flight: with four, the copy into
/// staging, not a batch's latency, sets the pace of a large request
/// (docs/BENCHMARKS.md, "Raw block-store copies").
const MAX_DEPTH: usize = 4;

/// The staging lanes of a store.
pub(super) struct LanePool {
    lanes: Box<[Mutex<Box<dyn Lane>>]>,
    free: Mutex<Vec<usize>>,
    returned: Condvar,
    /// Staging bytes a piece of a request may use: all of it, or with
    /// `verify` all but the last two blocks, which take the old bytes of a
    /// partial write's first and last block.
    pub(super) piece_bytes: u64,
}

impl LanePool {
    pub(super) fn new(
        backend: &dyn Backend,
        count: usize,
        staging_bytes: usize,
        verify: bool,
    ) -> Result<Self, StoreError> {
        let lanes = (0..count)
            .map(|_| backend.create_lane(staging_bytes).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?
            .into_boxed_slice();
        Ok(LanePool {
            lanes,
            free: Mutex::new((0..count).rev().collect()),
            returned: Condvar::new(),
            piece_bytes: staging_bytes as u64 - if verify { 2 * BLOCK_SIZE } else { 0 },
        })
    }

    /// One lane, waiting for it if all are busy, and up to `wanted - 1`
    /// more (at most [`MAX_DEPTH`] in all) that are free right now: never
    /// waiting for more while holding one, so lanes cannot deadlock.
    pub(super) fn acquire<P>(&self, wanted: usize) -> Lanes<'_, P> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let first = loop {
            match free.pop() {
                Some(index) => break index,
                None => free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner()),
            }
        };
        let mut indices: ArrayVec<usize, MAX_DEPTH> = ArrayVec::new();
        indices.push(first);
        while indices.len() < wanted.min(MAX_DEPTH) {
            match free.pop() {
                Some(index) => indices.push(index),
                None => break,
            }
        }
        drop(free);
        let mut held: ArrayVec<HeldLane<'_, P>, MAX_DEPTH> = ArrayVec::new();
        for index in indices {
            held.push(HeldLane {
                index,
                lane: self.lanes[index].lock().unwrap_or_else(|e| e.into_inner()),
                pending: None,
            });
        }
        Lanes {
            pool: self,
            held,
            next: 0,
        }
    }

    /// How many lanes the pool has.
    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// One lane, for work that waits for each batch it submits itself
    /// (allocation, scrubbing).
    pub(super) fn one(&self) -> Lanes<'_, ()> {
        self.acquire(1)
    }
}

struct HeldLane<'p, P> {
    index: usize,
    lane: MutexGuard<'p, Box<dyn Lane>>,
    pending: Option<P>,
}

/// The lanes a request holds, used in turn.
pub(super) struct Lanes<'p, P> {
    pool: &'p LanePool,
    held: ArrayVec<HeldLane<'p, P>, MAX_DEPTH>,
    next: usize,
}

impl<P> Lanes<'_, P> {
    /// The pool's number for the first lane held: what the store keeps per
    /// lane (compression contexts) is indexed by it.
    pub(super) fn first_index(&self) -> usize {
        self.held[0].index
    }

    pub(super) fn first(&mut self) -> &mut dyn Lane {
        self.held[0].lane.as_mut()
    }

    pub(super) fn lane(&mut self, index: usize) -> &mut dyn Lane {
        self.held[index].lane.as_mut()
    }

    /// The lane to fill next; if its previous batch is still pending, waits
    /// for it and runs `finish` on it first.
    pub(super) fn next_free(
        &mut self,
        mut finish: impl FnMut(&P, &mut dyn Lane, bool),
    ) -> Result<usize, BackendError> {
        let index = self.next;
        self.next = (self.next + 1) % self.held.len();
        self.complete(index, &mut finish)?;
        Ok(index)
    }

    pub(super) fn submit(
        &mut self,
        index: usize,
        ops: &[TransferOp],
        pending: P,
    ) -> Result<(), BackendError> {
        let held = &mut self.held[index];
        held.lane.submit(ops)?;
        held.pending = Some(pending);
        Ok(())
    }

    /// [`Lanes::submit`], downloading straight into `target` where a step
    /// says so ([`Lane::submit_into`]).
    pub(super) fn submit_into(
        &mut self,
        index: usize,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
        pending: P,
    ) -> Result<(), BackendError> {
        let held = &mut self.held[index];
        held.lane.submit_into(ops, target, region)?;
        held.pending = Some(pending);
        Ok(())
    }

    /// Waits for the lane's batch and runs `finish` on it, told whether the
    /// batch succeeded.
    fn complete(
        &mut self,
        index: usize,
        finish: &mut impl FnMut(&P, &mut dyn Lane, bool),
    ) -> Result<(), BackendError> {
        let held = &mut self.held[index];
        match held.pending.take() {
            Some(pending) => {
                let result = held.lane.wait();
                finish(&pending, held.lane.as_mut(), result.is_ok());
                result
            }
            None => Ok(()),
        }
    }

    /// Completes every pending batch, oldest first.
    pub(super) fn finish_all(
        &mut self,
        mut finish: impl FnMut(&P, &mut dyn Lane, bool),
    ) -> Result<(), BackendError> {
        let count = self.held.len();
        let mut result = Ok(());
        for k in 0..count {
            let index = (self.next + k) % count;
            let r = self.complete(index, &mut finish);
            result = result.and(r);
        }
        result
    }

    /// Waits for anything still in flight, so no copy outlives the chunk
    /// lock of the request that started it. Segments finish their batches
    /// themselves; this is the backstop.
    pub(super) fn drain(&mut self) -> Result<(), BackendError> {
        let mut result = Ok(());
        for held in self.held.iter_mut() {
            debug_assert!(held.pending.is_none(), "a batch was left unfinished");
            result = result.and(held.lane.wait());
        }
        result
    }
}

impl<P> Drop for Lanes<'_, P> {
    fn drop(&mut self) {
        let _ = self.drain();
        let indices: ArrayVec<usize, MAX_DEPTH> = self.held.iter().map(|h| h.index).collect();
        self.held.clear();
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(indices.iter().copied());
        drop(free);
        // One waiter per lane: waking all of them (up to nbdkit's every
        // thread) to find one lane woke dozens for nothing.
        for _ in &indices {
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::host::HostBackend;

    #[test]
    fn a_request_takes_only_free_lanes_up_to_max_depth() {
        let backend = HostBackend::new(None);
        let pool = LanePool::new(&backend, MAX_DEPTH + 2, BLOCK_SIZE as usize, false).unwrap();
        let first: Lanes<'_, ()> = pool.acquire(usize::MAX);
        assert_eq!(first.held.len(), MAX_DEPTH);
        // Two are left: the second request takes those and does not wait.
        let second: Lanes<'_, ()> = pool.acquire(usize::MAX);
        assert_eq!(second.held.len(), 2);
        drop(first);
        let third = pool.one();
        assert_eq!(third.held.len(), 1);
        assert_eq!(pool.acquire::<()>(3).held.len(), 3);
    }

    #[test]
    fn verify_keeps_two_blocks_of_each_lane_for_old_bytes() {
        let backend = HostBackend::new(None);
        let staging = 4 * BLOCK_SIZE as usize;
        let plain = LanePool::new(&backend, 1, staging, false).unwrap();
        let verify = LanePool::new(&backend, 1, staging, true).unwrap();
        assert_eq!(plain.piece_bytes, 4 * BLOCK_SIZE);
        assert_eq!(verify.piece_bytes, 2 * BLOCK_SIZE);
    }
}
