//! The one seam between the block store and a GPU API.
//!
//! A [`Backend`] hands out fixed-size device-memory chunks ([`CHUNK_SIZE`])
//! and [`Lane`]s: a lane is a pinned host staging buffer plus the command
//! context that moves bytes between it and chunks on the GPU's transfer queue.
//! A lane runs one batch of [`TransferOp`]s at a time: [`Lane::submit`]
//! starts it and returns at once, [`Lane::wait`] blocks until it is done, so a
//! caller holding two lanes keeps two batches in flight while it copies the
//! next piece into host memory.
//!
//! Raw API handles stay inside the backend modules; nothing above this trait
//! sees `ash` or CUDA. Only backend modules contain `unsafe`. Choosing and
//! opening one ([`open`], [`enumerate`], [`default_backend`]) is `open.rs`'s,
//! the one file that names the implementations.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "fault-injection")]
pub mod faulty;
pub mod host;
mod hostmem;
mod mapped;
mod open;
mod region;
pub mod selftest;
#[cfg(feature = "vulkan")]
pub mod vulkan;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod wait;

pub use self::hostmem::copy_to_staging;
#[cfg(feature = "vulkan")]
pub(crate) use self::mapped::decide_mapped;
pub use self::mapped::{Fill, MappedMode};
#[cfg(any(feature = "vulkan", feature = "cuda"))]
pub(crate) use self::open::select_adapter;
pub use self::open::{
    caution, default_backend, default_device, enumerate, open, select_device, OpenOptions,
};
pub use self::region::HostRegion;
pub(crate) use self::region::{backend_id, check_target};

/// Whether a GPU backend's device is lost. Once it is, every later call
/// fails at once with [`BackendError::DeviceLost`]: nothing is retried on a
/// device whose memory can no longer be trusted.
#[cfg(any(feature = "vulkan", feature = "cuda"))]
#[derive(Debug, Default)]
pub(crate) struct LostFlag(std::sync::atomic::AtomicBool);

#[cfg(any(feature = "vulkan", feature = "cuda"))]
impl LostFlag {
    pub(crate) fn check(&self) -> Result<(), BackendError> {
        if self.0.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BackendError::DeviceLost);
        }
        Ok(())
    }

    /// Passes `err` on, noting (and logging once, naming `device`) a lost
    /// device.
    pub(crate) fn note(&self, err: BackendError, device: &str) -> BackendError {
        if err == BackendError::DeviceLost
            && !self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::warn!("{device}: device lost");
        }
        err
    }
}

/// Refuses one more chunk where it would take what a backend holds (`held`
/// bytes) past its memory limit, the way a full device refuses it.
pub(crate) fn admit_chunk(held: u64, limit: Option<u64>) -> Result<(), BackendError> {
    match limit {
        Some(limit) if held + CHUNK_SIZE > limit => Err(BackendError::OutOfDeviceMemory),
        _ => Ok(()),
    }
}

/// A driver's fixed-size, NUL-terminated name buffer as a Rust string.
#[cfg(any(feature = "vulkan", feature = "cuda"))]
pub(crate) fn c_chars(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Size of one device allocation. VRAM is taken and given back in these.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Size of one block: the unit of zero tracking inside a chunk, and the
/// preferred I/O size of the exported device.
pub const BLOCK_SIZE: u64 = 64 << 10;
/// Blocks per chunk (64, so one `u64` bitmap covers a chunk).
pub const BLOCKS_PER_CHUNK: usize = (CHUNK_SIZE / BLOCK_SIZE) as usize;

/// Which GPU API a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Vulkan through `ash`: AMD, Intel, NVIDIA and Mesa's lavapipe.
    Vulkan,
    /// CUDA's driver API through `cudarc`: NVIDIA only.
    Cuda,
    /// Process memory: the reference model the conformance tests compare
    /// the GPU backends with. It holds nothing in VRAM.
    Host,
}

impl BackendKind {
    /// The backends this build can open, in the order they are preferred.
    pub fn compiled_in() -> &'static [BackendKind] {
        &[
            #[cfg(feature = "vulkan")]
            BackendKind::Vulkan,
            #[cfg(feature = "cuda")]
            BackendKind::Cuda,
        ]
    }

    /// [`BackendKind::compiled_in`] in the order a default is chosen: on an
    /// NVIDIA GPU the vendor's own API first.
    pub fn preferred() -> &'static [BackendKind] {
        &[
            #[cfg(feature = "cuda")]
            BackendKind::Cuda,
            #[cfg(feature = "vulkan")]
            BackendKind::Vulkan,
        ]
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Vulkan => "vulkan",
            BackendKind::Cuda => "cuda",
            BackendKind::Host => "host",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = OpenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "vulkan" => Ok(BackendKind::Vulkan),
            "cuda" => Ok(BackendKind::Cuda),
            "host" => Ok(BackendKind::Host),
            _ => Err(OpenError::UnknownBackend(s.to_string())),
        }
    }
}

/// Which device to open: by position in the backend's list, by a piece of
/// its name (case-insensitive, must match exactly one device), or by UUID.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSelector {
    /// The first device that can serve (discrete GPUs before others).
    #[default]
    First,
    Index(usize),
    Name(String),
    Uuid([u8; 16]),
}

impl FromStr for DeviceSelector {
    type Err = OpenError;

    /// `0`, `1`… select by index; 32 hex digits (dashes allowed, optional
    /// `GPU-` prefix as `nvidia-smi -L` prints) select by UUID; anything else
    /// is a name substring.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(OpenError::BadSelector(s.to_string()));
        }
        if let Ok(index) = s.parse::<usize>() {
            return Ok(DeviceSelector::Index(index));
        }
        let hex: String = s
            .strip_prefix("GPU-")
            .unwrap_or(s)
            .chars()
            .filter(|c| *c != '-')
            .collect();
        if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut uuid = [0u8; 16];
            for (i, byte) in uuid.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .map_err(|_| OpenError::BadSelector(s.to_string()))?;
            }
            return Ok(DeviceSelector::Uuid(uuid));
        }
        Ok(DeviceSelector::Name(s.to_string()))
    }
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::First => f.write_str("the first usable device"),
            DeviceSelector::Index(i) => write!(f, "device {i}"),
            DeviceSelector::Name(n) => write!(f, "device named '{n}'"),
            DeviceSelector::Uuid(u) => write!(f, "device {}", format_uuid(u)),
        }
    }
}

/// What kind of processor a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Discrete,
    Integrated,
    Virtual,
    Cpu,
    Other,
}

impl DeviceKind {
    fn preference(self) -> u8 {
        match self {
            DeviceKind::Discrete => 0,
            DeviceKind::Integrated => 1,
            DeviceKind::Virtual => 2,
            DeviceKind::Other => 3,
            DeviceKind::Cpu => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Discrete => "discrete",
            DeviceKind::Integrated => "integrated",
            DeviceKind::Virtual => "virtual",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Other => "other",
        }
    }
}

/// What a backend knows about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub backend: BackendKind,
    /// Position in this backend's device list; what `device=N` selects.
    pub index: usize,
    pub name: String,
    pub vendor: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub kind: DeviceKind,
    /// The device UUID (Vulkan's `deviceUUID`, CUDA's `cuDeviceGetUuid`:
    /// the same bytes for the same NVIDIA GPU).
    pub uuid: [u8; 16],
    /// `domain:bus:device.function`, where the API reports it.
    pub pci_bus_id: Option<String>,
    /// Whether copies run on a queue that does transfers only (a DMA engine
    /// of its own), rather than sharing a graphics or compute queue.
    pub dedicated_transfer_queue: bool,
    pub memory: MemoryReport,
    /// Bytes of device-local memory the CPU can map and write (the PCIe BAR
    /// window): about `memory.total` with resizable BAR, 256 MiB without,
    /// 0 where the backend cannot map chunks at all.
    pub mappable: u64,
}

impl DeviceInfo {
    /// Whether chunks can live in memory the CPU writes through a mapping
    /// (`mapped=`): the mappable window covers nearly all device memory,
    /// not just a 256 MiB aperture.
    pub fn maps_all_memory(&self) -> bool {
        self.mappable > 0 && self.mappable >= self.memory.total / 10 * 9
    }

    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }

    /// `0: NVIDIA H100 (…uuid…)`, as error messages list devices.
    pub fn short(&self) -> String {
        format!("{}: {} ({})", self.index, self.name, self.uuid_string())
    }
}

/// Formats a UUID the way `vulkaninfo` and `nvidia-smi` do.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Device-local memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// Size of the device-local heap chunks come from.
    pub total: u64,
    /// What this process could still allocate there now: the driver's budget
    /// minus what is in use (`VK_EXT_memory_budget`, `cuMemGetInfo`), or
    /// less where a `memory_limit` caps the backend.
    pub available: u64,
}

/// A chunk of device memory, [`CHUNK_SIZE`] bytes, owned by the backend
/// that allocated it. The number means nothing to anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkId(pub u32);

/// One step of a lane's batch. Steps run in order: each step is complete
/// before a later step of the same batch touches the bytes it touched (a
/// download of a range, then an upload over it, reads the old bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferOp {
    /// Copy `len` bytes from the lane's staging buffer to a chunk.
    Upload {
        staging_offset: usize,
        chunk: ChunkId,
        chunk_offset: u64,
        len: u64,
    },
    /// Copy `len` bytes from a chunk to the lane's staging buffer.
    Download {
        staging_offset: usize,
        chunk: ChunkId,
        chunk_offset: u64,
        len: u64,
    },
    /// Set `len` bytes of a chunk to zero on the device. Offset and length
    /// are multiples of 4 (Vulkan's `vkCmdFillBuffer` rule).
    Zero {
        chunk: ChunkId,
        chunk_offset: u64,
        len: u64,
    },
    /// Copy `len` bytes from a chunk straight into the caller's registered
    /// host memory, at `host_offset` of the target that
    /// [`Lane::submit_into`] names: no staging, no copy after. Only in a
    /// batch submitted that way.
    DownloadTo {
        host_offset: usize,
        chunk: ChunkId,
        chunk_offset: u64,
        len: u64,
    },
}

impl TransferOp {
    /// The chunk the step touches.
    pub(crate) fn chunk(&self) -> ChunkId {
        match *self {
            TransferOp::Upload { chunk, .. }
            | TransferOp::Download { chunk, .. }
            | TransferOp::Zero { chunk, .. }
            | TransferOp::DownloadTo { chunk, .. } => chunk,
        }
    }

    /// Refuses a step that is empty, reaches past a staging buffer of
    /// `staging_len` bytes, past a host target of `target_len` bytes (0:
    /// the batch has none) or past its chunk, or (a zero) is not 4-byte
    /// aligned. Whether the chunk is allocated is the lane's to check.
    fn check(&self, staging_len: usize, target_len: usize) -> Result<(), BackendError> {
        let fits = |offset: u64, len: u64, limit: u64| {
            len > 0 && offset.checked_add(len).is_some_and(|end| end <= limit)
        };
        match *self {
            TransferOp::Upload {
                staging_offset,
                chunk_offset,
                len,
                ..
            }
            | TransferOp::Download {
                staging_offset,
                chunk_offset,
                len,
                ..
            } => {
                if fits(staging_offset as u64, len, staging_len as u64)
                    && fits(chunk_offset, len, CHUNK_SIZE)
                {
                    return Ok(());
                }
                Err(BackendError::OutOfBounds(format!(
                    "copy of {len} bytes at staging {staging_offset} / chunk {chunk_offset}"
                )))
            }
            TransferOp::DownloadTo {
                host_offset,
                chunk_offset,
                len,
                ..
            } => {
                if fits(host_offset as u64, len, target_len as u64)
                    && fits(chunk_offset, len, CHUNK_SIZE)
                {
                    return Ok(());
                }
                Err(BackendError::OutOfBounds(format!(
                    "copy of {len} bytes to host offset {host_offset} of {target_len} / chunk {chunk_offset}"
                )))
            }
            TransferOp::Zero {
                chunk_offset, len, ..
            } => {
                if chunk_offset % 4 == 0 && len % 4 == 0 && fits(chunk_offset, len, CHUNK_SIZE) {
                    return Ok(());
                }
                Err(BackendError::OutOfBounds(format!(
                    "zero {chunk_offset}+{len} in a {CHUNK_SIZE}-byte chunk"
                )))
            }
        }
    }
}

/// The most steps one batch may hold: as many as the block store sends (a
/// step per block of a chunk), so that a lane can keep a batch's resolved
/// steps on the stack and the I/O path allocates nothing.
pub const MAX_BATCH: usize = BLOCKS_PER_CHUNK;

/// Checks a batch for a lane with `staging_len` bytes of staging and a
/// host target of `target_len` bytes (0 for [`Lane::submit`]), before any
/// of it runs: a batch that fails its checks moves no byte, on every
/// backend alike.
pub(crate) fn check_batch(
    ops: &[TransferOp],
    staging_len: usize,
    target_len: usize,
) -> Result<(), BackendError> {
    if ops.len() > MAX_BATCH {
        return Err(BackendError::OutOfBounds(format!(
            "a batch of {} steps; a lane takes at most {MAX_BATCH}",
            ops.len()
        )));
    }
    ops.iter()
        .try_for_each(|op| op.check(staging_len, target_len))
}

/// A pinned host staging buffer with the command context that moves it.
///
/// A lane is used by one thread at a time (`&mut self`); several lanes run
/// at once. The staging buffer is allocated once, when the lane is made,
/// and never on the I/O path. Between batches several threads may read
/// its staging at once ([`Lane::staged`]): the store's read-ahead windows
/// are read by every request they serve.
pub trait Lane: Send + Sync {
    /// The staging buffer: host memory the device can reach by DMA.
    fn staging(&mut self) -> &mut [u8];

    /// The staging buffer, to read: what the last finished download left
    /// there. Only meaningful while no batch is pending.
    fn staged(&self) -> &[u8];

    /// Starts a batch and returns without waiting for it. The staging bytes
    /// an upload reads must be written before this call; the bytes a
    /// download writes are valid only after [`Lane::wait`] returns `Ok`.
    /// Submitting while a batch is still pending is an error, and so is a
    /// batch of more than [`MAX_BATCH`] steps.
    fn submit(&mut self, ops: &[TransferOp]) -> Result<(), BackendError>;

    /// [`Lane::submit`], for a batch whose [`TransferOp::DownloadTo`]
    /// steps write into `target`, which lies inside `region` (registered
    /// by the backend that made this lane). Offsets of those steps count
    /// from `target`'s first byte. The bytes they write are valid only
    /// after [`Lane::wait`] returns `Ok`; until then the caller neither
    /// reads nor writes them, nor lets `target` go. Backends that cannot
    /// register host memory refuse.
    fn submit_into(
        &mut self,
        ops: &[TransferOp],
        target: &mut [u8],
        region: &HostRegion,
    ) -> Result<(), BackendError> {
        let _ = (ops, target, region);
        Err(BackendError::Api {
            call: "submit_into",
            detail: "this lane cannot download into host memory".into(),
        })
    }

    /// Blocks until the pending batch is done. Returns at once when none is.
    fn wait(&mut self) -> Result<(), BackendError>;
}

/// A GPU API that lends device memory and moves bytes in and out of it.
pub trait Backend: Send + Sync {
    /// The device this backend opened.
    fn device(&self) -> &DeviceInfo;

    /// Device-local memory now (total and available to this process).
    fn memory(&self) -> MemoryReport;

    /// Allocates one [`CHUNK_SIZE`] chunk of device-local memory. Its
    /// contents are undefined: the block store zeroes every chunk with a
    /// [`TransferOp::Zero`] before it is read.
    fn allocate_chunk(&self) -> Result<ChunkId, BackendError>;

    /// Gives a chunk back to the device. No batch may be using it.
    fn free_chunk(&self, chunk: ChunkId);

    /// Makes a lane with a staging buffer of `staging_bytes`.
    fn create_lane(&self, staging_bytes: usize) -> Result<Box<dyn Lane>, BackendError>;

    /// Registers the host memory of `buf` (and, where the API imports
    /// whole pages, the pages around it) for DMA by this backend's lanes
    /// ([`Lane::submit_into`]). It costs a driver call that pins pages,
    /// milliseconds: the block store registers a request buffer once and
    /// reuses it. `buf` is only read for its address and length.
    ///
    /// The registration outlives the borrow. The caller must unregister
    /// it before the memory could be freed and mapped again, and must
    /// never DMA into it through a borrow of other memory: the driver
    /// pinned the pages that were there when it registered.
    fn register_host(&self, buf: &[u8]) -> Result<HostRegion, BackendError> {
        let _ = buf;
        Err(BackendError::UnsupportedDevice {
            device: self.device().name.clone(),
            reason: "host memory cannot be registered".into(),
        })
    }

    /// Gives a registration back. No batch may be using it.
    fn unregister_host(&self, region: HostRegion) {
        let _ = region;
    }

    /// Whether small reads of many threads should share batches (the
    /// store's `gather.rs`): where a submission costs far more than the
    /// copies in it and submissions from many threads take turns, as on a
    /// Vulkan queue. Not where each lane's stream runs beside the others
    /// at a small cost per copy, as CUDA's do: gathering gained nothing
    /// there through nbdkit, and lost a fifth on 16 threads in the store
    /// alone (docs/BENCHMARKS.md, "Small reads gathered into shared
    /// batches").
    fn gathers_reads(&self) -> bool {
        false
    }

    /// Whether chunks live in memory the CPU writes through a mapping, so
    /// [`Backend::write_mapped`] serves writes (`mapped=`, decided at open).
    fn mapped(&self) -> bool {
        false
    }

    /// Whether this chunk is mapped: with `mapped=auto`, chunks the driver
    /// would not give as mappable VRAM are not, and their bytes move by DMA.
    fn chunk_mapped(&self, chunk: ChunkId) -> bool {
        let _ = chunk;
        false
    }

    /// Stores `fill` at `chunk_offset` of a chunk by CPU stores through its
    /// mapping: no staging, no queue. When it returns the bytes are fenced,
    /// so every batch submitted afterwards (by any thread that has seen
    /// this call return) reads them. Only where [`Backend::mapped`].
    fn write_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        let _ = (chunk, chunk_offset, fill);
        Err(BackendError::UnsupportedDevice {
            device: self.device().name.clone(),
            reason: "chunks are not mapped (mapped=off)".into(),
        })
    }

    /// Copies `dst.len()` bytes at `chunk_offset` of a chunk into `dst` by
    /// CPU loads through its mapping (streaming loads where the CPU has
    /// them): no staging, no queue, no wait. It sees every
    /// [`Backend::write_mapped`] that returned, and every batch whose
    /// [`Lane::wait`] returned, before it was called (by any thread that
    /// has seen that return). The caller keeps the chunk allocated
    /// meanwhile. Only where [`Backend::mapped`].
    fn read_mapped(
        &self,
        chunk: ChunkId,
        chunk_offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        let _ = (chunk, chunk_offset, dst);
        Err(BackendError::UnsupportedDevice {
            device: self.device().name.clone(),
            reason: "chunks are not mapped (mapped=off)".into(),
        })
    }

    /// Compute on chunks, for the VRAM self-test; `None` where the backend
    /// has none (CUDA: test the same GPU through Vulkan).
    fn self_test(&self) -> Option<&dyn selftest::SelfTest> {
        None
    }
}

/// PCI vendor id of NVIDIA, as Vulkan and CUDA report it.
pub const NVIDIA_VENDOR_ID: u32 = 0x10de;

/// Why no backend could be chosen or opened: the server refuses to start,
/// naming the setting to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("unknown backend '{0}': expected vulkan or cuda")]
    UnknownBackend(String),
    #[error("the {0} backend is not compiled into this build")]
    NotCompiledIn(BackendKind),
    #[error("{backend} is not available: {reason}")]
    NotAvailable {
        backend: BackendKind,
        reason: String,
    },
    #[error("'{0}' does not name a device: give an index, a name or a UUID")]
    BadSelector(String),
    #[error("no {selector}; devices: {}", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    NoDevice {
        selector: String,
        available: Vec<String>,
    },
    #[error("device name '{selector}' matches several devices: {}; give an index or UUID", matches.join(", "))]
    AmbiguousDevice {
        selector: String,
        matches: Vec<String>,
    },
    /// The device refused while it was being opened: out of memory, lost,
    /// unsupported, or an API call failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Errors an open backend and its lanes report. Callers tell apart running
/// out of memory (a write can fail with ENOSPC and later ones succeed), a
/// lost device (every later request fails) and the rest (this request
/// fails).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// The device lacks something a request needs (mappable staging
    /// memory, compute shaders), or cannot be had (CUDA compute modes).
    #[error("device '{device}' is not supported: {reason}")]
    UnsupportedDevice { device: String, reason: String },
    #[error("out of device memory")]
    OutOfDeviceMemory,
    #[error("out of host memory")]
    OutOfHostMemory,
    #[error("the device was lost (driver reset, GPU fault or removal)")]
    DeviceLost,
    #[error("chunk {0:?} is not allocated")]
    BadChunk(ChunkId),
    #[error("transfer out of bounds: {0}")]
    OutOfBounds(String),
    #[error("a batch is already pending on this lane")]
    Busy,
    #[error("{call} failed: {detail}")]
    Api { call: &'static str, detail: String },
}

impl BackendError {
    /// True when the device can no longer be trusted with any request.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BackendError::DeviceLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert_eq!(
            "0".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(0)
        );
        assert_eq!(
            "GPU-01010101-0101-0101-0101-010101010101"
                .parse::<DeviceSelector>()
                .unwrap(),
            DeviceSelector::Uuid([1; 16])
        );
        assert_eq!(
            "0101010101010101010101010101010A"
                .parse::<DeviceSelector>()
                .unwrap(),
            DeviceSelector::Uuid([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10])
        );
        assert_eq!(
            "H100".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Name("H100".into())
        );
        assert!("  ".parse::<DeviceSelector>().is_err());
    }

    #[cfg(any(feature = "vulkan", feature = "cuda"))]
    #[test]
    fn names_stop_at_the_first_nul() {
        let mut buf = [0 as std::ffi::c_char; 16];
        for (dst, src) in buf.iter_mut().zip(b"NVIDIA H100\0junk") {
            *dst = *src as std::ffi::c_char;
        }
        assert_eq!(c_chars(&buf), "NVIDIA H100");
        let full = [b'a' as std::ffi::c_char; 4];
        assert_eq!(c_chars(&full), "aaaa");
    }

    #[test]
    fn uuid_formats_like_vulkaninfo() {
        let mut u = [0u8; 16];
        u[0] = 0x6d;
        u[15] = 0xff;
        assert_eq!(format_uuid(&u), "6d000000-0000-0000-0000-0000000000ff");
    }
}
