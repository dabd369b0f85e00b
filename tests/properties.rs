//! Property tests: inputs no example list would think of.

use std::sync::Arc;

use proptest::prelude::*;
use vramswap::backend::host::HostBackend;
use vramswap::backend::{BLOCK_SIZE, CHUNK_SIZE};
use vramswap::{
    parse_size, AllocationPolicy, BlockStore, Compression, ExportConfig, Ratio, SizeSpec,
    StoreConfig,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any number with any suffix reads back as itself (or is refused as
    /// too large, never wrapped).
    #[test]
    fn sizes_round_trip(n in 0u64..1 << 40, unit in 0usize..6, lower in any::<bool>(), ib in any::<bool>()) {
        let suffixes = ["", "K", "M", "G", "T", "P"];
        let mut suffix = suffixes[unit].to_string();
        if lower { suffix = suffix.to_lowercase(); }
        if ib && unit > 0 { suffix.push_str("iB"); }
        let text = format!("{n}{suffix}");
        match n.checked_mul(1u64 << (10 * unit)) {
            Some(bytes) => prop_assert_eq!(parse_size(&text), Ok(bytes)),
            None => prop_assert!(parse_size(&text).is_err()),
        }
    }

    /// Garbage never panics, and an error names what was given.
    #[test]
    fn garbage_sizes_are_errors_not_panics(text in "\\PC{0,24}") {
        if let Err(err) = parse_size(&text) {
            prop_assert!(text.trim().is_empty() || err.to_string().contains(&text), "{}", err);
        }
    }

    /// Any key and value: the plugin's parser answers, never panics, and a
    /// refusal is one line.
    #[test]
    fn any_parameter_is_parsed_or_refused_in_one_line(key in "[a-z-]{1,12}", value in "\\PC{0,16}") {
        let mut config = ExportConfig::default();
        if let Err(err) = config.set(&key, &value) {
            prop_assert!(!err.to_string().contains('\n'));
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Read(u64, u64),
    Zero(u64, u64),
    /// Reads `count` pieces of `len` one after another from the offset: a
    /// stream, which read-ahead serves from windows.
    Stream(u64, u64, u64),
}

/// Offsets and lengths that land on, near and across block, staging-piece
/// and chunk boundaries.
fn op(size: u64) -> impl Strategy<Value = Op> {
    let edge = prop_oneof![
        0..size,
        (0..size / BLOCK_SIZE).prop_map(|b| b * BLOCK_SIZE),
        (1..size / CHUNK_SIZE).prop_map(|c| c * CHUNK_SIZE - 1),
    ];
    (edge, 1..3 * CHUNK_SIZE, 0..4u8, any::<u8>()).prop_map(move |(offset, len, kind, byte)| {
        let len = len.min(size - offset).max(1);
        let offset = offset.min(size - len);
        match kind {
            0 => Op::Write(offset, len, byte),
            1 => Op::Read(offset, len),
            2 => Op::Zero(offset, len),
            _ => {
                // 128 KiB and up start a stream; some pieces straddle windows.
                let piece = (128 << 10) + u64::from(byte) * 4096;
                let count = ((size - offset) / piece).min(40);
                Op::Stream(offset, piece, count)
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Every request is split into chunk segments, staging pieces and
    /// blocks, and put together again: the bytes must always be the
    /// model's.
    #[test]
    fn any_request_sequence_matches_a_model(ops in prop::collection::vec(op(12 * CHUNK_SIZE), 1..24),
                                            lazy in any::<bool>(), verify in any::<bool>(),
                                            readahead in 0usize..4,
                                            compress in prop_oneof![Just(Compression::Off), Just(Compression::Lz4), Just(Compression::Zstd(1))]) {
        let size = 12 * CHUNK_SIZE;
        let store = BlockStore::open(
            Arc::new(HostBackend::new(None)),
            &StoreConfig {
                size: SizeSpec::Bytes(size),
                allocation: if lazy { AllocationPolicy::Lazy } else { AllocationPolicy::Eager },
                lanes: 3,
                // verify keeps two blocks of each lane for old bytes.
                staging_bytes: if verify { 192 << 10 } else { 128 << 10 },
                verify,
                readahead,
                // Compressed, the size is the VRAM behind an export as big.
                compress,
                ratio: if compress.is_on() { "1".parse().unwrap() } else { Ratio::DEFAULT },
            },
        )
        .unwrap();
        prop_assert_eq!(store.size(), size);
        let mut model = vec![0u8; size as usize];
        for op in ops {
            match op {
                Op::Write(offset, len, byte) => {
                    let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
                    store.write(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Op::Read(offset, len) => {
                    let mut buf = vec![0xee; len as usize];
                    store.read(&mut buf, offset).unwrap();
                    prop_assert!(buf == model[offset as usize..(offset + len) as usize], "read {}+{}", offset, len);
                }
                Op::Zero(offset, len) => {
                    store.zero(offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Stream(offset, len, count) => {
                    let mut buf = vec![0xee; len as usize];
                    for at in (0..count).map(|i| offset + i * len) {
                        store.read(&mut buf, at).unwrap();
                        prop_assert!(buf == model[at as usize..(at + len) as usize], "stream read {}+{}", at, len);
                    }
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        store.read(&mut all, 0).unwrap();
        prop_assert!(all == model);
        prop_assert_eq!(store.stats().checksum_errors, 0);
    }
}
