//! A [`Backend`] in process memory: the reference model.
//!
//! It follows the same contract as the GPU backends, including the parts
//! that are easy to get wrong above the trait: a new chunk holds garbage
//! (0xA5 bytes, as stale VRAM would) until the block store zeroes it, and a
//! memory limit makes allocations fail the way a full GPU does. The
//! conformance tests run the same checks against it and against every GPU
//! backend present; it never stands in for one.

use std::sync::{Arc, Mutex, MutexGuard};

use super::selftest::{self, BadWord, SelfTest, StepResult, TestChunk, TestOp, TestStep};
use super::{
    admit_chunk, backend_id, check_batch, check_target, Backend, BackendError, BackendKind,
    ChunkId, DeviceInfo, DeviceKind, Fill, HostRegion, Lane, MemoryReport, TransferOp, CHUNK_SIZE,
};

/// What a new chunk contains before anyone writes it.
pub const GARBAGE: u8 = 0xA5;
/// The size the reference "device" claims; a `memory_limit` caps what it
/// lends, as it caps a GPU backend.
const HEAP: u64 = 1 << 40;

struct Chunks {
    slots: Vec<Option<Box<[u8]>>>,
    /// Which chunks are "mapped" (written and read in place).
    mapped: Vec<bool>,
    free: Vec<u32>,
    allocated: u64,
    /// Bytes of mapped chunks held.
    mapped_held: u64,
}

struct Shared {
    chunks: Mutex<Chunks>,
    limit: u64,
    /// Bytes of chunks that may be "mapped", written and read in place
    /// ([`Backend::write_mapped`]) as mapped VRAM is; 0: none. Past it,
    /// chunks are reached by copies only, as on a driver that gives a
    /// process only part of its VRAM as mappable memory.
    mappable: u64,
    info: DeviceInfo,
}

/// Chunks in process memory; copies are `memcpy`s done at submit time.
pub struct HostBackend {
    shared: Arc<Shared>,
}

impl HostBackend {
    /// A host "device" that lends at most `memory_limit` bytes (no limit
    /// when `None`).
    pub fn new(memory_limit: Option<u64>) -> Self {
        Self::with_mapping(memory_limit, false)
    }

    /// [`HostBackend::new`], with chunks written in place when `mapped`
    /// (the model of a GPU with CPU-mappable VRAM).
    pub fn with_mapping(memory_limit: Option<u64>, mapped: bool) -> Self {
        Self::with_mappable(memory_limit, if mapped { HEAP } else { 0 })
    }

    /// [`HostBackend::new`] where the first `mappable` bytes of chunks held
    /// at once are mapped and the rest are not.
    pub fn with_mappable(memory_limit: Option<u64>, mappable: u64) -> Self {
        let limit = memory_limit.unwrap_or(HEAP).min(HEAP);
        HostBackend {
            shared: Arc::new(Shared {
                chunks: Mutex::new(Chunks {
                    slots: Vec::new(),
                    mapped: Vec::new(),
                    free: Vec::new(),
                    allocated: 0,
                    mapped_held: 0,
                }),
                limit,
                mappable,
                info: Self::device_info(limit),
            }),
        }
    }

    pub(crate) fn device_info(limit: u64) -> DeviceInfo {
        DeviceInfo {
            backend: BackendKind::Host,
            index: 0,
            name: "host memory (reference model)".into(),
            vendor: "none".into(),
            vendor_id: 0,
            device_id: 0,
            kind: DeviceKind::Cpu,
            uuid: *b"vramswap-host-v1",
            pci_bus_id: None,
            dedicated_transfer_queue: false,
            memory: MemoryReport {
                total: HEAP,
                available: limit,
            },
            mappable: HEAP,
        }
    }
}

impl Shared {
    /// Runs `access` on `len` bytes at `offset` of a mapped chunk, as a
    /// mapped write or read (`what`) reaches them in place.
    fn in_place(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: usize,
        what: &str,
        access: impl FnOnce(&mut [u8]),
    ) -> Result<(), BackendError> {
        let fits = len > 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|e| e <= CHUNK_SIZE);
        if !fits {
            return Err(BackendError::OutOfBounds(format!(
                "mapped {what} of {len} bytes at chunk offset {offset}"
            )));
        }
        let mut chunks = self.lock();
        let id = chunk.0 as usize;
        if !chunks.mapped.get(id).copied().unwrap_or(false) {
            return Err(BackendError::BadChunk(chunk));
        }
        let data = chunks
            .slots
            .get_mut(id)
            .and_then(Option::as_mut)
            .ok_or(BackendError::BadChunk(chunk))?;
        access(&mut data[span(offset, len as u64)]);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Chunks> {
        // A poisoned lock means a test panicked mid-copy; the bytes are
        // still plain memory, so carry on rather than cascade.
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for HostBackend {
    fn device(&self) -> &DeviceInfo {
        &self.shared.info
    }

    fn memory(&self) -> MemoryReport {
        let used = self.shared.lock().allocated;
        MemoryReport {
            total: HEAP,
            available: self.shared.limit.saturating_sub(used),
        }
    }

    fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        let mut chunks = self.shared.lock();
        admit_chunk(chunks.allocated, Some(self.shared.limit))?;
        let data = vec![GARBAGE; CHUNK_SIZE as usize].into_boxed_slice();
        let id = match chunks.free.pop() {
            Some(id) => {
                chunks.slots[id as usize] = Some(data);
                id
            }
            None => {
                chunks.slots.push(Some(data));
                chunks.mapped.push(false);
                (chunks.slots.len() - 1) as u32
            }
        };
        let mapped = chunks.mapped_held + CHUNK_SIZE <= self.shared.mappable;
        chunks.mapped[id as usize] = mapped;
        if mapped {
            chunks.mapped_held += CHUNK_SIZE;
        }
        chunks.allocated += CHUNK_SIZE;
        Ok(ChunkId(id))
    }

    fn free_chunk(&self, chunk: ChunkId) {
        let mut chunks = self.shared.lock();
        if let Some(slot) = chunks.slots.get_mut(chunk.0 as usize) {
            if slot.take().is_some() {
                chunks.free.push(chunk.0);
                chunks.allocated -= CHUNK_SIZE;
                if std::mem::take(&mut chunks.mapped[chunk.0 as usize]) {
                    chunks.mapped_held -= CHUNK_SIZE;
                }
            }
        }
    }

    fn mapped(&self) -> bool {
        self.shared.mappable > 0
    }

    fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        let chunks = self.shared.lock();
        chunks
            .mapped
            .get(chunk.0 as usize)
            .copied()
            .unwrap_or(false)
    }

    fn write_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.shared.in_place(
            chunk,
            chunk_offset,
            fill.len(),
            "write",
            |bytes| match fill {
                Fill::Bytes(src) => bytes.copy_from_slice(src),
                Fill::Zeros(_) => bytes.fill(0),
            },
        )
    }

    fn read_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let len = dst.len();
        self.shared
            .in_place(chunk, chunk_offset, len, "read", |bytes| {
                dst.copy_from_slice(bytes)
            })
    }

    /// Nothing to pin: the model only notes whose region it is, so that its
    /// lanes refuse a foreign one as a GPU backend's would.
    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        if buf.is_empty() {
            return Err(BackendError::OutOfBounds("an empty host region".into()));
        }
        Ok(HostRegion::new(buf, backend_id(&*self.shared), [0; 2], 0))
    }

    fn unregister_host(&self, region: HostRegion) {
        debug_assert_eq!(region.backend_of(), backend_id(&*self.shared));
    }

    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        Ok(Box::new(HostLane {
            shared: self.shared.clone(),
            staging: vec![0; staging_bytes].into_boxed_slice(),
            result: None,
        }))
    }

    fn self_test(&self) -> Option<&dyn SelfTest> {
        Some(self)
    }
}

/// The self-test's reference model: the same steps as the shader, word by
/// word on the host.
impl SelfTest for HostBackend {
    fn run(&self, chunks: &[TestChunk], step: &TestStep) -> Result<StepResult, BackendError> {
        selftest::check_chunks(chunks)?;
        let mut result = StepResult::new(chunks.len());
        let mut memory = self.shared.lock();
        for (slot, test) in chunks.iter().enumerate() {
            let data = memory
                .slots
                .get_mut(test.chunk.0 as usize)
                .and_then(Option::as_mut)
                .ok_or(BackendError::BadChunk(test.chunk))?;
            for (word, bytes) in data.chunks_exact_mut(4).enumerate() {
                let expected = selftest::expected_word(step, test.index, word as u64);
                let observed = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                if step.op != TestOp::Fill && observed != expected {
                    result.record(BadWord {
                        slot,
                        word: word as u64,
                        observed,
                        expected,
                    });
                }
                match step.op {
                    TestOp::Fill => bytes.copy_from_slice(&expected.to_le_bytes()),
                    TestOp::CheckInvert => bytes.copy_from_slice(&(!expected).to_le_bytes()),
                    TestOp::Check => {}
                }
            }
        }
        Ok(result)
    }
}

struct HostLane {
    shared: Arc<Shared>,
    staging: Box<[u8]>,
    result: Option<Result<(), BackendError>>,
}

impl HostLane {
    /// Runs a batch; `target` is where its `DownloadTo` steps write.
    fn run(&mut self, ops: &[TransferOp], target: &mut [u8]) -> Result<(), BackendError> {
        check_batch(ops, self.staging.len(), target.len())?;
        let mut chunks = self.shared.lock();
        for op in ops {
            let chunk = op.chunk();
            let data = chunks
                .slots
                .get_mut(chunk.0 as usize)
                .and_then(Option::as_mut)
                .ok_or(BackendError::BadChunk(chunk))?;
            match *op {
                TransferOp::Upload {
                    staging_offset,
                    chunk_offset,
                    len,
                    ..
                } => data[span(chunk_offset, len)]
                    .copy_from_slice(&self.staging[span(staging_offset as u64, len)]),
                TransferOp::Download {
                    staging_offset,
                    chunk_offset,
                    len,
                    ..
                } => self.staging[span(staging_offset as u64, len)]
                    .copy_from_slice(&data[span(chunk_offset, len)]),
                TransferOp::Zero {
                    chunk_offset, len, ..
                } => data[span(chunk_offset, len)].fill(0),
                TransferOp::DownloadTo {
                    host_offset,
                    chunk_offset,
                    len,
                    ..
                } => target[span(host_offset as u64, len)]
                    .copy_from_slice(&data[span(chunk_offset, len)]),
            }
        }
        Ok(())
    }
}

/// `offset..offset+len` as a slice range, for a step `check_batch` passed
/// (so it cannot overflow or reach past its buffer).
fn span(offset: u64, len: u64) -> std::ops::Range<usize> {
    offset as usize..(offset + len) as usize
}

impl Lane for HostLane {
    fn staging(&mut self) -> &mut [u8] {
        &mut self.staging
    }

    fn staged(&self) -> &[u8] {
        &self.staging
    }

    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        if self.result.is_some() {
            return Err(BackendError::Busy);
        }
        self.result = Some(self.run(ops, &mut []));
        Ok(())
    }

    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        if self.result.is_some() {
            return Err(BackendError::Busy);
        }
        check_target(region, backend_id(&*self.shared), target)?;
        self.result = Some(self.run(ops, target));
        Ok(())
    }

    fn wait(&mut self) -> Result<(), BackendError> {
        self.result.take().unwrap_or(Ok(()))
    }
}
