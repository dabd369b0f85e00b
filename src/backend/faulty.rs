//! A real backend that fails on purpose, for the tests that prove failures
//! stay contained. Compiled only with the `fault-injection` feature: it is
//! never in a release build.
//!
//! Faults are counted from when the wrapper is made: the Nth chunk
//! allocation fails (as a full GPU would), the Nth batch's completion
//! reports a copy error (EIO), or the device is lost after N batches (EIO
//! for every later request, as after a GPU reset).
//!
//! Memory faults are real bytes in real device memory, changed behind the
//! caller's back with extra copies (download a word, change it, upload
//! it): a bit that flips after an upload (what `verify=on` must catch),
//! and a stuck bit the self-test must find.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::selftest::{SelfTest, StepResult, TestChunk, TestStep};
use super::{
    Backend, BackendError, ChunkId, DeviceInfo, Fill, HostRegion, Lane, MemoryReport, TransferOp,
    CHUNK_SIZE,
};

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
    /// The Nth upload (counting from 1, over all lanes) lands in device
    /// memory with bit 0 of its first byte flipped, once it is done: the
    /// bytes change after whoever wrote them computed their checksum.
    pub corrupt_upload_at: Option<u64>,
    /// Self-test: bit 0 of the byte at this offset of the area under test
    /// (chunk `offset / CHUNK_SIZE` of the steps' chunks) is stuck at 1
    /// after every step that writes.
    pub stuck_bit_at: Option<u64>,
}

struct Counters {
    allocations: AtomicU64,
    batches: AtomicU64,
    uploads: AtomicU64,
    lost: AtomicBool,
}

impl Counters {
    /// Counts one more batch (a lane's, or a mapped write): the error it
    /// completes with under `plan`, if any.
    fn batch(&self, plan: &FaultPlan) -> Result<Option<BackendError>, BackendError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        let n = self.batches.fetch_add(1, Ordering::AcqRel) + 1;
        Ok(if plan.lost_from_batch.is_some_and(|from| n >= from) {
            // The batch may run or not, as on a GPU that resets mid-copy.
            self.lost.store(true, Ordering::Release);
            Some(BackendError::DeviceLost)
        } else if plan.batch_fails_at == Some(n) {
            Some(BackendError::Api {
                call: "injected",
                detail: format!("batch {n} failed"),
            })
        } else {
            None
        })
    }

    /// Counts one more upload: whether `plan` corrupts it.
    fn upload(&self, plan: &FaultPlan) -> bool {
        let n = self.uploads.fetch_add(1, Ordering::AcqRel) + 1;
        plan.corrupt_upload_at == Some(n)
    }
}

/// Wraps a real backend and injects the faults of a [`FaultPlan`].
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    plan: FaultPlan,
    counters: Arc<Counters>,
    /// The lane that forces the stuck bit and corrupts mapped writes,
    /// made at its first use.
    fault_lane: Mutex<Option<Box<dyn Lane>>>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, plan: FaultPlan) -> Self {
        FaultyBackend {
            inner,
            plan,
            counters: Arc::new(Counters {
                allocations: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                uploads: AtomicU64::new(0),
                lost: AtomicBool::new(false),
            }),
            fault_lane: Mutex::new(None),
        }
    }

    /// Batches counted so far (a lane's, or a mapped write each).
    pub fn batches(&self) -> u64 {
        self.counters.batches.load(Ordering::Acquire)
    }

    /// Changes a word of device memory on the wrapper's own lane.
    fn change_word(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        change: impl Fn(u32) -> u32,
    ) -> Result<(), BackendError> {
        let mut lane = self.fault_lane.lock().unwrap_or_else(|e| e.into_inner());
        let lane = match &mut *lane {
            Some(lane) => lane,
            empty => empty.insert(self.inner.create_lane(64 << 10)?),
        };
        change_word(lane.as_mut(), chunk, chunk_offset, change)
    }
}

/// Changes one 32-bit word of device memory through `lane`: downloads it
/// into the first 4 staging bytes, applies `change`, uploads it back.
fn change_word(
    lane: &mut dyn Lane,
    chunk: ChunkId,
    chunk_offset: u64,
    change: impl Fn(u32) -> u32,
) -> Result<(), BackendError> {
    let word = TransferOp::Download {
        staging_offset: 0,
        chunk,
        chunk_offset,
        len: 4,
    };
    lane.submit(&[word])?;
    lane.wait()?;
    let staging = lane.staging();
    let value = change(u32::from_le_bytes([
        staging[0], staging[1], staging[2], staging[3],
    ]));
    staging[..4].copy_from_slice(&value.to_le_bytes());
    lane.submit(&[TransferOp::Upload {
        staging_offset: 0,
        chunk,
        chunk_offset,
        len: 4,
    }])?;
    lane.wait()
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

    fn gathers_reads(&self) -> bool {
        self.inner.gathers_reads()
    }

    fn mapped(&self) -> bool {
        self.inner.mapped()
    }

    fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        self.inner.chunk_mapped(chunk)
    }

    /// A mapped write is one batch, and (with bytes) one upload, of the
    /// plan: it fails, loses the device or lands corrupted as a lane's
    /// batch would.
    fn write_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        let fault = self.counters.batch(&self.plan)?;
        let corrupt = matches!(fill, Fill::Bytes(_)) && self.counters.upload(&self.plan);
        self.inner.write_mapped(chunk, chunk_offset, fill)?;
        if corrupt {
            let bit = 1u32 << (8 * (chunk_offset % 4));
            self.change_word(chunk, chunk_offset - chunk_offset % 4, |v| v ^ bit)?;
        }
        fault.map_or(Ok(()), Err)
    }

    /// A mapped read fails as every call does once the device is lost.
    fn read_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        if self.counters.lost.load(Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        self.inner.read_mapped(chunk, chunk_offset, dst)
    }

    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        if self.counters.lost.load(Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        self.inner.register_host(buf)
    }

    fn unregister_host(&self, region: HostRegion) {
        self.inner.unregister_host(region)
    }

    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        Ok(Box::new(FaultyLane {
            inner: self.inner.create_lane(staging_bytes)?,
            plan: self.plan,
            counters: self.counters.clone(),
            fail_this: None,
            corrupt_this: None,
        }))
    }

    fn self_test(&self) -> Option<&dyn SelfTest> {
        self.inner.self_test().map(|_| self as &dyn SelfTest)
    }
}

impl SelfTest for FaultyBackend {
    fn run(&self, chunks: &[TestChunk], step: &TestStep) -> Result<StepResult, BackendError> {
        let inner = self.inner.self_test().ok_or(BackendError::Api {
            call: "self_test",
            detail: "the wrapped backend has none".into(),
        })?;
        let result = inner.run(chunks, step)?;
        let Some(at) = self.plan.stuck_bit_at else {
            return Ok(result);
        };
        let Some(test) = chunks.iter().find(|c| c.index == at / CHUNK_SIZE) else {
            return Ok(result);
        };
        if step.op.writes() {
            let offset = at % CHUNK_SIZE;
            let bit = 1u32 << (8 * (offset % 4));
            self.change_word(test.chunk, offset - offset % 4, |v| v | bit)?;
        }
        Ok(result)
    }
}

struct FaultyLane {
    inner: Box<dyn Lane>,
    plan: FaultPlan,
    counters: Arc<Counters>,
    /// The error the pending batch completes with.
    fail_this: Option<BackendError>,
    /// The upload of the pending batch to corrupt once it is done: its
    /// chunk and offset.
    corrupt_this: Option<(ChunkId, u64)>,
}

impl Lane for FaultyLane {
    fn staging(&mut self) -> &mut [u8] {
        self.inner.staging()
    }

    fn staged(&self) -> &[u8] {
        self.inner.staged()
    }

    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        self.plan_batch(ops)?;
        self.inner.submit(ops)
    }

    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        self.plan_batch(ops)?;
        self.inner.submit_into(ops, target, region)
    }

    fn wait(&mut self) -> Result<(), BackendError> {
        let result = self.inner.wait();
        if let (Ok(()), Some((chunk, offset))) = (&result, self.corrupt_this.take()) {
            let bit = 1u32 << (8 * (offset % 4));
            // The caller may still read what the batch downloaded into
            // staging: the word borrowed for the change is put back.
            let mut saved = [0u8; 4];
            saved.copy_from_slice(&self.inner.staging()[..4]);
            let changed = change_word(self.inner.as_mut(), chunk, offset - offset % 4, |v| v ^ bit);
            self.inner.staging()[..4].copy_from_slice(&saved);
            changed?;
        }
        match self.fail_this.take() {
            Some(err) => Err(err),
            None => result,
        }
    }
}

impl FaultyLane {
    /// Counts a batch and decides its faults: how it completes, and which
    /// upload of it to corrupt.
    fn plan_batch(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        self.fail_this = self.counters.batch(&self.plan)?;
        self.corrupt_this = None;
        for op in ops {
            if let TransferOp::Upload {
                chunk,
                chunk_offset,
                ..
            } = *op
            {
                if self.counters.upload(&self.plan) {
                    self.corrupt_this = Some((chunk, chunk_offset));
                }
            }
        }
        Ok(())
    }
}
