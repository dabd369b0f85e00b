//! Elastic areas (`start --elastic`): one server and one NBD device, cut
//! by device-mapper into slices that are each a swap area of their own, at
//! descending priority. The kernel fills the first slices first, so the
//! last stay emptiest longest. A watcher (`vramswap elastic NAME`, which
//! `start` runs in the background) reads how much VRAM the GPU has free;
//! when other programs leave less than the headroom, it swaps off the
//! emptiest online slice and discards its range, which gives that range's
//! 4 MiB chunks back to the GPU (the server allocates lazily); when free
//! VRAM has stayed above the headroom plus a slice for `settle`, it turns
//! the next slice back on (docs/ELASTIC.md).

pub mod policy;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use vramswap::backend::CHUNK_SIZE;
use vramswap::ByteSize;

/// Slices when `--slices` is not given: about this many ...
pub const DEFAULT_SLICES: u64 = 8;
/// ... but none under this: a smaller area has fewer slices.
pub const DEFAULT_SLICE_MIN: u64 = 512 << 20;
/// The least slice `--slices` may ask for: swap areas much smaller are
/// not worth a device-mapper table and a swapoff each.
pub const SLICE_MIN: u64 = 32 << 20;
/// The most slices: each is a swap area, and the kernel allows 32 in all.
pub const SLICES_MAX: u32 = 16;
/// VRAM the watcher keeps free for other programs [`--headroom`].
pub const DEFAULT_HEADROOM: u64 = 1 << 30;
/// How long free VRAM must stay high before a slice comes back.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);

/// What an elastic area is made of, kept in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub slices: Vec<Slice>,
    /// Bytes of free VRAM the watcher keeps for other programs.
    pub headroom: u64,
    /// Seconds free VRAM must stay above headroom plus a slice before the
    /// next slice comes back.
    pub settle: u64,
    /// Where free VRAM is read from instead of the GPU (`--budget-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_file: Option<PathBuf>,
}

/// One slice: a range of the NBD device under a device-mapper name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slice {
    /// The device-mapper name: `vramswap-NAME-sI`.
    pub mapping: String,
    pub offset: u64,
    pub size: u64,
    pub priority: i32,
}

impl Slice {
    /// The block device the slice swaps on.
    pub fn path(&self) -> String {
        format!("/dev/mapper/{}", self.mapping)
    }

    /// The `dmsetup` table: `size` bytes of `device` from `offset`, in
    /// 512-byte sectors.
    pub fn table(&self, device: &str) -> String {
        format!("0 {} linear {device} {}", self.size >> 9, self.offset >> 9)
    }
}

/// What `start` was asked for with `--elastic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElasticOptions {
    /// `--slices`; `None`: about [`DEFAULT_SLICES`], none under
    /// [`DEFAULT_SLICE_MIN`].
    pub slices: Option<u32>,
    pub headroom: u64,
    pub settle: Duration,
    pub budget_file: Option<PathBuf>,
}

/// Cuts `size` bytes (whole 4 MiB chunks) of area `name` into slices
/// whose priorities descend from `priority`.
pub fn layout(name: &str, size: u64, priority: i32, options: &ElasticOptions) -> Result<Layout> {
    let chunks = size / CHUNK_SIZE;
    let count = match options.slices {
        Some(n) => u64::from(n),
        None => (size / DEFAULT_SLICE_MIN).clamp(1, DEFAULT_SLICES),
    };
    if count == 0 || chunks / count * CHUNK_SIZE < SLICE_MIN {
        bail!(
            "--slices {count}: {} in {count} slices is under the {} a slice needs",
            ByteSize(size),
            ByteSize(SLICE_MIN)
        );
    }
    let lowest = i64::from(priority) - (count as i64 - 1);
    if lowest < -1 {
        bail!(
            "--priority {priority}: {count} slices take priorities {priority} down to {lowest}, \
             and swap priorities stop at -1"
        );
    }
    let mut offset = 0;
    let slices = (0..count)
        .map(|i| {
            // The chunks that do not divide evenly go to the first slices.
            let size = (chunks / count + u64::from(i < chunks % count)) * CHUNK_SIZE;
            let slice = Slice {
                mapping: format!("vramswap-{name}-s{i}"),
                offset,
                size,
                priority: priority - i as i32,
            };
            offset += size;
            slice
        })
        .collect();
    Ok(Layout {
        slices,
        headroom: options.headroom,
        settle: options.settle.as_secs(),
        budget_file: options.budget_file.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(slices: Option<u32>) -> ElasticOptions {
        ElasticOptions {
            slices,
            headroom: DEFAULT_HEADROOM,
            settle: DEFAULT_SETTLE,
            budget_file: None,
        }
    }

    #[test]
    fn slices_cover_the_area_at_descending_priority() {
        let l = layout("swap", 16 << 30, 50, &options(None)).unwrap();
        assert_eq!(l.slices.len(), 8);
        assert!(l.slices.iter().all(|s| s.size == 2 << 30));
        assert_eq!(l.slices[0].mapping, "vramswap-swap-s0");
        assert_eq!(
            l.slices.iter().map(|s| s.priority).collect::<Vec<_>>(),
            [50, 49, 48, 47, 46, 45, 44, 43]
        );
        assert_eq!(l.slices[7].offset, 14 << 30);
        assert_eq!(
            l.slices[1].table("/dev/nbd0"),
            "0 4194304 linear /dev/nbd0 4194304"
        );
        // A small area has fewer slices, none under 512 MiB by default.
        let small = layout("swap", 1536 << 20, 50, &options(None)).unwrap();
        assert_eq!(small.slices.len(), 3);
        assert_eq!(
            layout("swap", 300 << 20, 50, &options(None))
                .unwrap()
                .slices
                .len(),
            1
        );
        // Chunks that do not divide go to the first slices; all are used.
        let odd = layout("swap", 41 * CHUNK_SIZE, 50, &options(Some(4))).unwrap();
        assert_eq!(
            odd.slices
                .iter()
                .map(|s| s.size / CHUNK_SIZE)
                .collect::<Vec<_>>(),
            [11, 10, 10, 10]
        );
        assert_eq!(odd.slices[3].offset + odd.slices[3].size, 41 * CHUNK_SIZE);
    }

    #[test]
    fn slices_too_small_or_priorities_below_minus_one_are_refused() {
        let err = layout("swap", 100 << 20, 50, &options(Some(4))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--slices 4: 100 MiB in 4 slices is under the 32 MiB a slice needs"
        );
        let err = layout("swap", 8 << 30, 2, &options(Some(8))).unwrap_err();
        assert!(err.to_string().contains("down to -5"), "{err}");
    }
}
