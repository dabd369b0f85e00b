//! The block store's errors, and the errno each one reaches NBD clients as.

use thiserror::Error;

use crate::backend::{BackendError, CHUNK_SIZE};
use crate::size::ByteSize;

/// Errors of the block store. [`StoreError::errno`] gives what NBD clients
/// see.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    #[error("size {requested} is larger than the {available} available on {device}")]
    TooLarge {
        requested: ByteSize,
        available: ByteSize,
        device: String,
    },
    #[error("reserve {reserve} leaves no room: {device} has {available} available")]
    NothingLeft {
        reserve: ByteSize,
        available: ByteSize,
        device: String,
    },
    #[error("size {0} is smaller than one {chunk} chunk", chunk = ByteSize(CHUNK_SIZE))]
    TooSmall(ByteSize),
    #[error("{0}")]
    Config(String),
    #[error(
        "request at offset {offset} length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no VRAM left for a new chunk")]
    NoSpace,
    #[error("the device has failed and serves no more requests: {0}")]
    Failed(String),
    #[error("checksum mismatch in the 64 KiB block at offset {offset:#x}: its VRAM changed after it was written")]
    Checksum { offset: u64 },
    #[error("the 64 KiB block at offset {offset:#x} kept changing while it was read")]
    Unsettled { offset: u64 },
    #[error("the 4 KiB page at offset {offset:#x} does not read back as it was written: its VRAM changed")]
    Corrupt { offset: u64 },
    #[error("{0}")]
    Backend(#[source] BackendError),
}

impl StoreError {
    /// The errno an NBD client should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::OutOfRange { .. } | StoreError::Config(_) => libc::EINVAL,
            StoreError::NoSpace => libc::ENOSPC,
            StoreError::TooLarge { .. } | StoreError::NothingLeft { .. } => libc::ENOSPC,
            StoreError::TooSmall(_) => libc::EINVAL,
            StoreError::Failed(_)
            | StoreError::Backend(_)
            | StoreError::Checksum { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Unsettled { .. } => libc::EIO,
        }
    }
}

impl From<BackendError> for StoreError {
    fn from(err: BackendError) -> Self {
        match err {
            BackendError::OutOfDeviceMemory => StoreError::NoSpace,
            other => StoreError::Backend(other),
        }
    }
}
