//! A real backend that fails on purpose, for the tests that prove failures
//! stay contained. Compiled only with the `fault-injection` feature: it is
//! never in a release build.
//!
//! Faults are counted from when the wrapper is made: the Nth chunk
//! allocation fails (as a full GPU would), the Nth batch's completion
//! reports a copy error (EIO), or the device is lost after N batches (EIO
//! for every later request, as after a GPU reset).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, BackendError, ChunkId, DeviceInfo, Lane, MemoryReport, TransferOp};

/// Which faults to inject. `None` never fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// The Nth chunk allocation (counting from 1) and every later one fail
    /// with out-of-device-memory.
    pub alloc_fails_from: Option<u64>,
    /// The Nth batch (counting from 1) fails with a copy error.
    pub batch_fails_at: Option<u64>,
    /// From the Nth batch on, the device is lost.
    pub lost_from_batch: Option<u64>,
}

struct Counters {
    allocations: AtomicU64,
    batches: AtomicU64,
    lost: AtomicBool,
}

/// Wraps a real backend and injects the faults of a [`FaultPlan`].
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    plan: FaultPlan,
    counters: Arc<Counters>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, plan: FaultPlan) -> Self {
        FaultyBackend {
            inner,
            plan,
            counters: Arc::new(Counters {
                allocations: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                lost: AtomicBool::new(false),
            }),
        }
    }
}

impl Backend for FaultyBackend {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }

    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }

    fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        if self.counters.lost.load(Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        let n = self.counters.allocations.fetch_add(1, Ordering::AcqRel) + 1;
        if self.plan.alloc_fails_from.is_some_and(|from| n >= from) {
            return Err(BackendError::OutOfDeviceMemory);
        }
        self.inner.allocate_chunk()
    }

    fn free_chunk(&self, chunk: ChunkId) {
        self.inner.free_chunk(chunk)
    }

    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        Ok(Box::new(FaultyLane {
            inner: self.inner.create_lane(staging_bytes)?,
            plan: self.plan,
            counters: self.counters.clone(),
            fail_this: None,
        }))
    }
}

struct FaultyLane {
    inner: Box<dyn Lane>,
    plan: FaultPlan,
    counters: Arc<Counters>,
    /// The error the pending batch completes with.
    fail_this: Option<BackendError>,
}

impl Lane for FaultyLane {
    fn staging(&mut self) -> &mut [u8] {
        self.inner.staging()
    }

    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        if self.counters.lost.load(Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        let n = self.counters.batches.fetch_add(1, Ordering::AcqRel) + 1;
        self.fail_this = if self.plan.lost_from_batch.is_some_and(|from| n >= from) {
            // The batch may run or not, as on a GPU that resets mid-copy.
            self.counters.lost.store(true, Ordering::Release);
            Some(BackendError::DeviceLost)
        } else if self.plan.batch_fails_at == Some(n) {
            Some(BackendError::Api {
                call: "injected",
                detail: format!("batch {n} failed"),
            })
        } else {
            None
        };
        self.inner.submit(ops)
    }

    fn wait(&mut self) -> Result<(), BackendError> {
        let result = self.inner.wait();
        match self.fail_this.take() {
            Some(err) => Err(err),
            None => result,
        }
    }
}
