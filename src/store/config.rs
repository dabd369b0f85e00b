//! How a store is asked for ([`StoreConfig`]) and how its size is resolved
//! against what the device has free.

use std::fmt;
use std::str::FromStr;

use super::error::StoreError;
use super::packed::Compression;
use super::readahead::MAX_WINDOWS;
use crate::backend::{MemoryReport, BLOCK_SIZE, CHUNK_SIZE};
use crate::size::ByteSize;

/// VRAM left to other users when the size is automatic.
pub const DEFAULT_RESERVE: u64 = 256 << 20;
/// Staging lanes made at open: enough for nbdkit's 16 worker threads on
/// each of 4 connections to have one each.
pub const DEFAULT_LANES: usize = 64;
/// Bytes of pinned staging per lane. A request larger than this is moved in
/// pieces, several lanes in flight, so copying into host memory overlaps DMA.
/// What counts is the size of a batch, not the number of lanes: 2 MiB beat
/// 1 MiB on both backends, and twice the lanes of 1 MiB gained nothing
/// (docs/BENCHMARKS.md, "H100, both backends"). 64 lanes lock 128 MiB of RAM.
pub const DEFAULT_STAGING: usize = 2 << 20;
/// Read-ahead windows (of [`super::WINDOW_BYTES`]) made at open: four
/// streams, such as `nbdcopy`'s four connections, each with the windows it
/// reads and the ones filled ahead of it. 32 windows lock 64 MiB of RAM.
pub const DEFAULT_READAHEAD: usize = 32;

/// `ratio=`: how much larger the export is than the VRAM behind it, with
/// compression on, in hundredths (1.00 to 8.00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio(u32);

impl Ratio {
    /// About what lz4 makes of program memory (zram's own figures: 2.6:1),
    /// less a margin, as nbd-vram's default.
    pub const DEFAULT: Ratio = Ratio(200);

    /// The export size for `budget` bytes of VRAM, in whole chunks.
    pub fn apply(self, budget: u64) -> u64 {
        let bytes = (u128::from(budget) * u128::from(self.0) / 100) as u64;
        bytes - bytes % CHUNK_SIZE
    }
}

impl Default for Ratio {
    fn default() -> Self {
        Ratio::DEFAULT
    }
}

impl FromStr for Ratio {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            StoreError::Config(format!(
                "'{text}' is not a ratio: expected a number from 1.0 to 8.0, at most two decimals"
            ))
        };
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty()
            || text.ends_with('.')
            || fraction.len() > 2
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: u32 = whole.parse().map_err(|_| bad())?;
        let fraction: u32 = format!("{fraction:0<2}").parse().map_err(|_| bad())?;
        let hundredths = whole.checked_mul(100).ok_or_else(bad)? + fraction;
        match hundredths {
            100..=800 => Ok(Ratio(hundredths)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, fraction) = (self.0 / 100, self.0 % 100);
        match fraction {
            0 => write!(f, "{whole}"),
            n if n % 10 == 0 => write!(f, "{whole}.{}", n / 10),
            n => write!(f, "{whole}.{n:02}"),
        }
    }
}

/// How big the device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// This many bytes, rounded down to a whole chunk.
    Bytes(u64),
    /// What the GPU has available now, less `reserve` for other users.
    Auto { reserve: u64 },
}

impl SizeSpec {
    /// Refuses a fixed size below one chunk: no device can serve it, so
    /// this is checked with the parameters, before any device is looked at.
    pub fn check(self) -> Result<(), StoreError> {
        match self {
            SizeSpec::Bytes(requested) if requested < CHUNK_SIZE => {
                Err(StoreError::TooSmall(ByteSize(requested)))
            }
            _ => Ok(()),
        }
    }
}

impl Default for SizeSpec {
    fn default() -> Self {
        SizeSpec::Auto {
            reserve: DEFAULT_RESERVE,
        }
    }
}

/// When VRAM is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocationPolicy {
    /// All of it at open, so swap never finds the GPU full later.
    #[default]
    Eager,
    /// A chunk at its first write; a write that finds the GPU full fails with
    /// ENOSPC. Whole chunks that are trimmed go back to the GPU.
    Lazy,
}

impl FromStr for AllocationPolicy {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "eager" => Ok(AllocationPolicy::Eager),
            "lazy" => Ok(AllocationPolicy::Lazy),
            _ => Err(StoreError::Config(format!(
                "'{s}' is not an allocation policy: expected eager or lazy"
            ))),
        }
    }
}

impl fmt::Display for AllocationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllocationPolicy::Eager => "eager",
            AllocationPolicy::Lazy => "lazy",
        })
    }
}

/// How to build a [`super::BlockStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    pub size: SizeSpec,
    pub allocation: AllocationPolicy,
    /// Staging lanes (pinned buffers with their command contexts).
    pub lanes: usize,
    /// Bytes per lane: a multiple of [`BLOCK_SIZE`], at most [`CHUNK_SIZE`]
    /// (and at least 3 blocks with `verify`).
    pub staging_bytes: usize,
    /// Checksum every block on write and check it on read.
    pub verify: bool,
    /// Read-ahead windows (at most [`MAX_WINDOWS`]); 0 turns read-ahead
    /// off. None are made with `verify`: a window's bytes are not checked.
    pub readahead: usize,
    /// Pack each 4 KiB page (`compress=`); `size` is then the VRAM budget.
    pub compress: Compression,
    /// With `compress`: the export is the budget times this.
    pub ratio: Ratio,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            size: SizeSpec::default(),
            allocation: AllocationPolicy::default(),
            lanes: DEFAULT_LANES,
            staging_bytes: DEFAULT_STAGING,
            verify: false,
            readahead: DEFAULT_READAHEAD,
            compress: Compression::Off,
            ratio: Ratio::DEFAULT,
        }
    }
}

impl StoreConfig {
    /// Refuses what no device could serve, before any device is touched.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.lanes == 0 {
            return Err(StoreError::Config("lanes must be at least 1".into()));
        }
        let staging = self.staging_bytes as u64;
        if staging == 0 || staging % BLOCK_SIZE != 0 || staging > CHUNK_SIZE {
            return Err(StoreError::Config(format!(
                "staging buffer {} must be a multiple of {} and at most {}",
                ByteSize(staging),
                ByteSize(BLOCK_SIZE),
                ByteSize(CHUNK_SIZE)
            )));
        }
        if self.readahead > MAX_WINDOWS {
            return Err(StoreError::Config(format!(
                "at most {MAX_WINDOWS} read-ahead windows"
            )));
        }
        if !self.compress.is_on() && self.ratio != Ratio::DEFAULT {
            return Err(StoreError::Config(
                "a ratio needs compression: without it the export is the VRAM it holds".into(),
            ));
        }
        if self.verify && staging < 3 * BLOCK_SIZE {
            return Err(StoreError::Config(format!(
                "verify needs staging buffers of at least {}: two blocks of each hold the old bytes of partial writes",
                ByteSize(3 * BLOCK_SIZE)
            )));
        }
        Ok(())
    }
}

/// The size a store gets: `bytes`, and what the user asked for when that
/// was not a whole number of chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedSize {
    pub bytes: u64,
    pub rounded_from: Option<u64>,
}

/// Turns a [`SizeSpec`] into a byte count for a device with `memory`, or
/// says clearly why it cannot be served.
pub fn resolve_size(
    spec: SizeSpec,
    policy: AllocationPolicy,
    memory: MemoryReport,
    device: &str,
) -> Result<ResolvedSize, StoreError> {
    spec.check()?;
    let round = |n: u64| n - n % CHUNK_SIZE;
    match spec {
        SizeSpec::Bytes(requested) => {
            let bytes = round(requested);
            // Eager must fit what is free now; lazy may overcommit what is
            // free but never the device itself.
            let limit = match policy {
                AllocationPolicy::Eager => memory.available,
                AllocationPolicy::Lazy => memory.total,
            };
            if bytes > limit {
                return Err(StoreError::TooLarge {
                    requested: ByteSize(bytes),
                    available: ByteSize(limit),
                    device: device.to_string(),
                });
            }
            Ok(ResolvedSize {
                bytes,
                rounded_from: (bytes != requested).then_some(requested),
            })
        }
        SizeSpec::Auto { reserve } => {
            let bytes = round(memory.available.saturating_sub(reserve));
            if bytes == 0 {
                return Err(StoreError::NothingLeft {
                    reserve: ByteSize(reserve),
                    available: ByteSize(memory.available),
                    device: device.to_string(),
                });
            }
            Ok(ResolvedSize {
                bytes,
                rounded_from: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_each_bad_key() {
        assert_eq!(StoreConfig::default().validate(), Ok(()));
        let bad = [
            StoreConfig {
                lanes: 0,
                ..Default::default()
            },
            StoreConfig {
                staging_bytes: 0,
                ..Default::default()
            },
            StoreConfig {
                staging_bytes: 4096,
                ..Default::default()
            },
            StoreConfig {
                staging_bytes: 2 * CHUNK_SIZE as usize,
                ..Default::default()
            },
            StoreConfig {
                readahead: MAX_WINDOWS + 1,
                ..Default::default()
            },
            StoreConfig {
                verify: true,
                staging_bytes: 2 * BLOCK_SIZE as usize,
                ..Default::default()
            },
            StoreConfig {
                ratio: Ratio(300),
                ..Default::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(config.validate(), Err(StoreError::Config(_))),
                "{config:?}"
            );
        }
    }

    #[test]
    fn ratios_parse_print_and_size_exports_in_whole_chunks() {
        for (text, hundredths, shown) in [
            ("1", 100, "1"),
            ("2.0", 200, "2"),
            ("2.5", 250, "2.5"),
            ("3.25", 325, "3.25"),
            ("8", 800, "8"),
            ("1.05", 105, "1.05"),
        ] {
            let ratio: Ratio = text.parse().unwrap();
            assert_eq!(ratio, Ratio(hundredths), "{text}");
            assert_eq!(ratio.to_string(), shown);
        }
        for bad in [
            "", "0.5", "8.01", "9", "2.", ".5", "2.555", "-2", "2,5", "x", "1e1",
        ] {
            let err = bad.parse::<Ratio>().unwrap_err().to_string();
            assert!(err.contains("from 1.0 to 8.0"), "{bad}: {err}");
        }
        assert_eq!(Ratio(250).apply(8 * CHUNK_SIZE), 20 * CHUNK_SIZE);
        assert_eq!(Ratio(105).apply(10 * CHUNK_SIZE), 10 * CHUNK_SIZE);
        assert_eq!(Ratio(800).apply(1 << 40), 8 << 40);
    }

    #[test]
    fn sizes_round_to_chunks_and_fit_the_policy() {
        let memory = MemoryReport {
            total: 64 * CHUNK_SIZE,
            available: 16 * CHUNK_SIZE,
        };
        let eager = AllocationPolicy::Eager;
        let lazy = AllocationPolicy::Lazy;
        let got = resolve_size(SizeSpec::Bytes(CHUNK_SIZE + 1), eager, memory, "d").unwrap();
        assert_eq!(got.bytes, CHUNK_SIZE);
        assert_eq!(got.rounded_from, Some(CHUNK_SIZE + 1));
        assert!(matches!(
            resolve_size(SizeSpec::Bytes(CHUNK_SIZE - 1), eager, memory, "d"),
            Err(StoreError::TooSmall(_))
        ));
        assert!(matches!(
            resolve_size(SizeSpec::Bytes(32 * CHUNK_SIZE), eager, memory, "d"),
            Err(StoreError::TooLarge { .. })
        ));
        assert_eq!(
            resolve_size(SizeSpec::Bytes(32 * CHUNK_SIZE), lazy, memory, "d")
                .unwrap()
                .bytes,
            32 * CHUNK_SIZE
        );
        let auto = SizeSpec::Auto {
            reserve: 4 * CHUNK_SIZE + 1,
        };
        assert_eq!(
            resolve_size(auto, eager, memory, "d").unwrap().bytes,
            11 * CHUNK_SIZE
        );
        let greedy = SizeSpec::Auto {
            reserve: 16 * CHUNK_SIZE,
        };
        assert!(matches!(
            resolve_size(greedy, eager, memory, "d"),
            Err(StoreError::NothingLeft { .. })
        ));
    }
}
