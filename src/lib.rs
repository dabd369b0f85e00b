//! vramswap: a block device whose bytes live in GPU video memory.
//!
//! The core crate: a [`BlockStore`] of 64 KiB blocks carved from 4 MiB
//! VRAM chunks, behind the [`Backend`] trait that each GPU API implements.
//! The nbdkit plugin and the `vramswap` CLI are thin layers over it.
//!
//! ```no_run
//! use vramswap::{backend, BlockStore, StoreConfig, SizeSpec};
//!
//! let gpu = backend::open(backend::BackendKind::Vulkan, &Default::default())?;
//! let store = BlockStore::open(gpu, &StoreConfig { size: SizeSpec::Bytes(1 << 30), ..Default::default() })?;
//! store.write(b"hello", 4096)?;
//! let mut back = [0u8; 5];
//! store.read(&mut back, 4096)?;
//! assert_eq!(&back, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backend;
pub mod budget;
mod checksum;
pub mod export;
pub mod maps;
pub mod memtest;
pub mod placement;
pub mod size;
pub mod store;

pub use backend::{Backend, BackendError, BackendKind, DeviceInfo, DeviceSelector, OpenError};
pub use export::ExportConfig;
pub use memtest::{MemtestConfig, MemtestError, MemtestReport};
pub use size::{parse_size, ByteSize, SizeError};
pub use store::{
    AllocationPolicy, BlockStore, CompressStats, Compression, Ratio, SizeSpec, StoreConfig,
    StoreError, StoreStats,
};
