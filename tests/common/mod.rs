//! What the block-store tests share: the backends to run against, and
//! wrappers that count or break the calls a real backend sees.
#![allow(dead_code)] // each test binary uses a different part

pub mod nbd;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use vramswap::backend::{
    self, Backend, BackendError, BackendKind, ChunkId, DeviceInfo, Fill, HostRegion, Lane,
    MappedMode, MemoryReport, OpenOptions, TransferOp,
};

pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// The backends every conformance test runs against:
/// `VRAMSWAP_TEST_BACKENDS` (comma-separated; default `host,vulkan`). Each
/// one named must open, so a missing driver fails the tests instead of
/// skipping them. `VRAMSWAP_TEST_DEVICE` picks the device (default: first).
pub fn backend_kinds() -> Vec<BackendKind> {
    let list = std::env::var("VRAMSWAP_TEST_BACKENDS").unwrap_or_else(|_| "host,vulkan".into());
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|e| panic!("VRAMSWAP_TEST_BACKENDS: {e}"))
        })
        .collect()
}

/// The `mapped=` modes each test runs under: `VRAMSWAP_TEST_MAPPED`
/// (auto, on or off), else both off and auto (mapped wherever the device
/// allows, which includes lavapipe), so both write paths are tested.
pub fn test_mapped_modes() -> Vec<MappedMode> {
    match std::env::var("VRAMSWAP_TEST_MAPPED") {
        Ok(v) => vec![v.parse().expect("VRAMSWAP_TEST_MAPPED: auto, on or off")],
        Err(_) => vec![MappedMode::Off, MappedMode::Auto],
    }
}

thread_local! {
    /// The mode [`for_each_backend`] is running the test under.
    static MAPPED: std::cell::Cell<MappedMode> = std::cell::Cell::new(test_mapped_modes()[0]);
}

/// Opens a backend the way the running test asks (see
/// [`for_each_backend`]).
pub fn open_backend(kind: BackendKind, memory_limit: Option<u64>) -> Arc<dyn Backend> {
    open_backend_mapped(kind, memory_limit, MAPPED.with(|m| m.get()))
}

pub fn open_backend_mapped(
    kind: BackendKind,
    memory_limit: Option<u64>,
    mapped: MappedMode,
) -> Arc<dyn Backend> {
    init_logging();
    let device = match std::env::var("VRAMSWAP_TEST_DEVICE") {
        Ok(d) => d.parse().expect("VRAMSWAP_TEST_DEVICE"),
        Err(_) => Default::default(),
    };
    backend::open(
        kind,
        &OpenOptions {
            device,
            memory_limit,
            mapped,
        },
    )
    .unwrap_or_else(|e| {
        panic!("cannot open the {kind} backend ({e}); set VRAMSWAP_TEST_BACKENDS to test others")
    })
}

/// Runs `test` once per backend and `mapped=` mode (what
/// [`open_backend`] opens), saying which one failed.
pub fn for_each_backend(test: impl Fn(BackendKind)) {
    for kind in backend_kinds() {
        for mapped in test_mapped_modes() {
            eprintln!("--- backend {kind} mapped={mapped}");
            MAPPED.with(|m| m.set(mapped));
            test(kind);
        }
    }
}

/// Counts what a real backend is asked to do.
pub struct Counting {
    pub inner: Arc<dyn Backend>,
    /// Every chunk handed out, in order.
    pub chunks: std::sync::Mutex<Vec<ChunkId>>,
    pub uploads: Arc<AtomicU64>,
    pub downloads: Arc<AtomicU64>,
    pub zeroes: Arc<AtomicU64>,
    pub allocations: AtomicU64,
    /// Reads through the chunks' mapping ([`Backend::read_mapped`]).
    pub mapped_reads: AtomicU64,
    /// Host registrations made and given back.
    pub hosts: AtomicU64,
    pub hosts_gone: AtomicU64,
}

impl Counting {
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        Counting {
            inner,
            chunks: Default::default(),
            uploads: Default::default(),
            downloads: Default::default(),
            zeroes: Default::default(),
            allocations: Default::default(),
            mapped_reads: Default::default(),
            hosts: Default::default(),
            hosts_gone: Default::default(),
        }
    }

    /// Host registrations held now.
    pub fn hosts_live(&self) -> u64 {
        self.hosts.load(Ordering::Relaxed) - self.hosts_gone.load(Ordering::Relaxed)
    }
}

impl Backend for Counting {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn allocate_chunk(&self) -> Result<ChunkId, BackendError> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let chunk = self.inner.allocate_chunk()?;
        self.chunks.lock().unwrap().push(chunk);
        Ok(chunk)
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

    fn write_mapped(
        &self,
        chunk: ChunkId,
        offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.inner.write_mapped(chunk, offset, fill)
    }
    fn read_mapped(&self, chunk: ChunkId, offset: u64, dst: &mut [u8]) -> Result<(), BackendError> {
        self.mapped_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_mapped(chunk, offset, dst)
    }
    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        let region = self.inner.register_host(buf)?;
        self.hosts.fetch_add(1, Ordering::Relaxed);
        Ok(region)
    }
    fn unregister_host(&self, region: HostRegion) {
        self.hosts_gone.fetch_add(1, Ordering::Relaxed);
        self.inner.unregister_host(region)
    }
    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError> {
        Ok(Box::new(CountingLane {
            inner: self.inner.create_lane(staging_bytes)?,
            uploads: self.uploads.clone(),
            downloads: self.downloads.clone(),
            zeroes: self.zeroes.clone(),
        }))
    }
}

struct CountingLane {
    inner: Box<dyn Lane>,
    uploads: Arc<AtomicU64>,
    downloads: Arc<AtomicU64>,
    zeroes: Arc<AtomicU64>,
}

impl CountingLane {
    fn count(&self, ops: &[TransferOp]) {
        for op in ops {
            let counter = match op {
                TransferOp::Upload { .. } => &self.uploads,
                TransferOp::Download { .. } | TransferOp::DownloadTo { .. } => &self.downloads,
                TransferOp::Zero { .. } => &self.zeroes,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Lane for CountingLane {
    fn staging(&mut self) -> &mut [u8] {
        self.inner.staging()
    }
    fn staged(&self) -> &[u8] {
        self.inner.staged()
    }
    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError> {
        self.count(ops);
        self.inner.submit(ops)
    }
    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        self.count(ops);
        self.inner.submit_into(ops, target, region)
    }
    fn wait(&mut self) -> Result<(), BackendError> {
        self.inner.wait()
    }
}
