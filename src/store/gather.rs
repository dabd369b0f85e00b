//! Small reads gathered into shared batches (group commit).
//!
//! nbdkit hands the plugin one request per worker thread, so many small
//! reads at once (sixteen connections faulting pages in) each paid for a
//! batch of their own: a submission, a wait, a lane. Here a small read
//! joins a queue instead. At most [`IN_FLIGHT`] batches run at once, each
//! led by one of the reading threads: the leader takes every read queued
//! when it starts (up to [`MAX_BATCH`]), submits them as one batch on a
//! lane, waits once, copies each read out into its owner's buffer and
//! wakes the owner. A leader that is done hands its lane to the oldest
//! read still queued, whose thread leads the next batch. While a lane is
//! free a read leads at once, so a lone read costs what it did before.
//!
//! Lock order: the gather's lanes are its own, not the store's pool. A
//! follower holds its chunk's lock shared while it waits (the chunk must
//! not be freed under the copy), and freeing a chunk holds a pool lane
//! while it waits for that lock: a leader that needed a pool lane could
//! wait for its own followers. A leader waits for nothing but the GPU.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use arrayvec::ArrayVec;

use crate::backend::{Backend, BackendError, ChunkId, Lane, TransferOp, BLOCK_SIZE, MAX_BATCH};

/// The largest read gathered: swap's pages and their clusters. Larger
/// reads are few at a time and cost a batch of their own anyway.
pub(super) const GATHER_MAX: usize = 16 << 10;

/// Batches in flight at once, each on a lane of the gather's own. On an
/// H200 through Vulkan, 16 threads of 4 KiB reads ran 198k/s with two,
/// 226k/s with four and 190k/s with eight; 64 threads 335k, 471k, 452k
/// (docs/BENCHMARKS.md, "Small reads gathered into shared batches").
const IN_FLIGHT: usize = 4;

/// Reads that may wait at once; past it a read takes the usual path.
const QUEUE_MAX: usize = 1024;

// A gathered read spans at most two blocks, so at most one run of blocks
// with data: one download per read.
const _: () = assert!(GATHER_MAX as u64 <= BLOCK_SIZE);

/// A ticket's states.
const WAITING: u32 = 0;
const DONE: u32 = 1;
const FAILED: u32 = 2;
/// Its thread leads the next batch, on the lane left in the ticket.
const LEAD: u32 = 3;

/// How many reads were gathered into how many batches, since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatherStats {
    pub reads: u64,
    pub batches: u64,
}

/// One thread's read. It lives on that thread's stack, which waits until
/// the state leaves [`WAITING`]; until then the leader that took it from
/// the queue may write its `dst`, `error` and `lane`. The owner sleeps on
/// the state word itself (a futex): no thread handle, nothing allocated.
struct Ticket {
    chunk: ChunkId,
    chunk_offset: u64,
    dst: *mut u8,
    len: usize,
    state: AtomicU32,
    error: UnsafeCell<Option<BackendError>>,
    lane: UnsafeCell<Option<Box<dyn Lane>>>,
}

impl Ticket {
    /// Sleeps while the state is still [`WAITING`] (or until a signal or a
    /// spurious wake-up: the caller looks again).
    fn sleep(&self) {
        // SAFETY: the word is live (this thread owns the ticket) and
        // aligned; FUTEX_WAIT returns at once if it no longer holds WAITING.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.state.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                WAITING,
                std::ptr::null::<libc::timespec>(),
            )
        };
    }
}

/// A queued ticket.
struct TicketRef(*const Ticket);

// SAFETY: a ticket is reached from another thread only between its owner
// queueing it (under the state mutex) and the leader setting its state;
// its owner neither reads nor drops it meanwhile (see `Ticket`).
unsafe impl Send for TicketRef {}

impl TicketRef {
    /// The ticket, until [`TicketRef::settle`].
    fn ticket(&self) -> &Ticket {
        // SAFETY: the owner keeps the ticket alive until its state leaves
        // WAITING, which only the one holder of this reference does.
        unsafe { &*self.0 }
    }

    /// Sets the state and wakes the owner. The owner may return, and its
    /// ticket go, as soon as it sees the state, so no reference to the
    /// ticket outlives the store: after it the address is only the futex's
    /// key (a wake-up that finds another sleeper there is one it takes as
    /// spurious, as every futex sleeper must).
    fn settle(&self, state: u32) {
        // SAFETY: the ticket is alive until the store below; the word is
        // reached through a raw pointer, not a reference that would outlive
        // it. FUTEX_WAKE reads no memory: the address is only a key.
        unsafe {
            let word: *const AtomicU32 = std::ptr::addr_of!((*self.0).state);
            (*word).store(state, Ordering::Release);
            libc::syscall(
                libc::SYS_futex,
                word,
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }
}

struct State {
    queue: VecDeque<TicketRef>,
    /// Lanes no batch is using.
    lanes: ArrayVec<Box<dyn Lane>, IN_FLIGHT>,
}

pub(super) struct Gather {
    state: Mutex<State>,
    reads: AtomicU64,
    batches: AtomicU64,
}

impl Gather {
    /// Makes the gather's lanes, each staging a whole batch.
    pub(super) fn new(backend: &dyn Backend) -> Result<Self, BackendError> {
        let lanes = (0..IN_FLIGHT)
            .map(|_| backend.create_lane(MAX_BATCH * GATHER_MAX))
            .collect::<Result<ArrayVec<_, IN_FLIGHT>, _>>()?;
        Ok(Gather {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(QUEUE_MAX),
                lanes,
            }),
            reads: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        })
    }

    pub(super) fn stats(&self) -> GatherStats {
        GatherStats {
            reads: self.reads.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }

    /// Downloads `dst.len()` (at most [`GATHER_MAX`]) bytes at
    /// `chunk_offset` of `chunk` into `dst`, in a batch with whatever other
    /// reads are waiting. The caller holds the chunk's lock shared. `None`
    /// where too many reads wait already: the caller reads it itself.
    pub(super) fn read(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        dst: &mut [u8],
    ) -> Option<Result<(), BackendError>> {
        debug_assert!(dst.len() <= GATHER_MAX);
        let ticket = Ticket {
            chunk,
            chunk_offset,
            dst: dst.as_mut_ptr(),
            len: dst.len(),
            state: AtomicU32::new(WAITING),
            error: UnsafeCell::new(None),
            lane: UnsafeCell::new(None),
        };
        let free = {
            let mut state = self.lock();
            match state.lanes.pop() {
                Some(lane) => Some(lane),
                None if state.queue.len() < QUEUE_MAX => {
                    state.queue.push_back(TicketRef(&ticket));
                    None
                }
                None => return None,
            }
        };
        if let Some(lane) = free {
            return Some(self.lead(lane, &ticket));
        }
        loop {
            match ticket.state.load(Ordering::Acquire) {
                WAITING => ticket.sleep(),
                DONE => return Some(Ok(())),
                FAILED => {
                    // SAFETY: the leader wrote the error before the state
                    // (Release, read above with Acquire) and no more.
                    let error = unsafe { (*ticket.error.get()).take() };
                    return Some(Err(error.unwrap_or(BackendError::DeviceLost)));
                }
                _ => {
                    // SAFETY: as for the error: written before the state.
                    let lane = unsafe { (*ticket.lane.get()).take() };
                    return lane.map(|lane| self.lead(lane, &ticket));
                }
            }
        }
    }

    /// Runs one batch: `own`, then the oldest reads queued, on `lane`.
    fn lead(&self, mut lane: Box<dyn Lane>, own: &Ticket) -> Result<(), BackendError> {
        let mut batch: ArrayVec<TicketRef, MAX_BATCH> = ArrayVec::new();
        batch.push(TicketRef(own));
        {
            let mut state = self.lock();
            while !batch.is_full() {
                match state.queue.pop_front() {
                    Some(ticket) => batch.push(ticket),
                    None => break,
                }
            }
        }
        let ops: ArrayVec<TransferOp, MAX_BATCH> = batch
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let t = t.ticket();
                TransferOp::Download {
                    staging_offset: k * GATHER_MAX,
                    chunk: t.chunk,
                    chunk_offset: t.chunk_offset,
                    len: t.len as u64,
                }
            })
            .collect();
        let result = lane.submit(&ops).and_then(|()| lane.wait());
        if result.is_ok() {
            let staged = lane.staged();
            for (k, t) in batch.iter().enumerate() {
                let t = t.ticket();
                let from = &staged[k * GATHER_MAX..k * GATHER_MAX + t.len];
                // SAFETY: `dst..dst+len` is the owner's buffer, borrowed
                // mutably by its `read` call, which touches it no more until
                // the state leaves WAITING; it does not overlap staging.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), t.dst, t.len) };
            }
        }
        self.reads.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.hand_on(lane);
        for t in &batch[1..] {
            let state = match &result {
                Ok(()) => DONE,
                Err(err) => {
                    // SAFETY: see `Ticket`: only this leader writes it now.
                    unsafe { *t.ticket().error.get() = Some(err.clone()) };
                    FAILED
                }
            };
            t.settle(state);
        }
        result
    }

    /// Gives a lane to the oldest read still queued, to lead the next
    /// batch, or back to the free ones.
    fn hand_on(&self, lane: Box<dyn Lane>) {
        let next = {
            let mut state = self.lock();
            match state.queue.pop_front() {
                Some(next) => next,
                None => {
                    state.lanes.push(lane);
                    return;
                }
            }
        };
        // SAFETY: see `Ticket`: taken from the queue, so only this thread
        // reaches it until the state says LEAD.
        unsafe { *next.ticket().lane.get() = Some(lane) };
        next.settle(LEAD);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
