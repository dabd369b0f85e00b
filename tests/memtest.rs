//! The VRAM memory test, on every backend present (the host reference
//! model, and Vulkan: lavapipe where there is no GPU): the GPU's patterns
//! are the reference model's word for word, clean memory passes, and a
//! stuck bit is reported in exactly its block.

mod common;

use std::sync::Arc;

use vramswap::backend::selftest::{Fill, TestChunk, TestOp, TestStep, WORDS_PER_CHUNK};
use vramswap::backend::{TransferOp, CHUNK_SIZE};
use vramswap::memtest::{self, MemtestConfig, MemtestError};

use common::{for_each_backend, open_backend, Counting};

const MIB: u64 = 1 << 20;

#[test]
fn every_fill_on_the_device_matches_the_reference_model_word_for_word() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        let self_test = backend.self_test().expect("a self-test");
        let chunks = [
            backend.allocate_chunk().unwrap(),
            backend.allocate_chunk().unwrap(),
        ];
        // Chunk positions past 2^12 exercise the random pattern's use of
        // the high bits of the index.
        let tested = [
            TestChunk {
                chunk: chunks[0],
                index: 3,
            },
            TestChunk {
                chunk: chunks[1],
                index: 5000,
            },
        ];
        let mut lane = backend.create_lane(CHUNK_SIZE as usize).unwrap();
        for fill in [
            Fill::WalkingOnes,
            Fill::WalkingZeros,
            Fill::Address,
            Fill::Random,
            Fill::Checkerboard,
        ] {
            for invert in [false, true] {
                let step = TestStep {
                    op: TestOp::Fill,
                    fill,
                    seed: 77,
                    rotate: 9,
                    invert,
                };
                let result = self_test.run(&tested, &step).unwrap();
                assert_eq!(result.mismatches, 0, "{kind}: a fill counts no mismatch");
                for test in &tested {
                    lane.submit(&[TransferOp::Download {
                        staging_offset: 0,
                        chunk: test.chunk,
                        chunk_offset: 0,
                        len: CHUNK_SIZE,
                    }])
                    .unwrap();
                    lane.wait().unwrap();
                    let staging = lane.staging();
                    for word in 0..WORDS_PER_CHUNK {
                        let at = (word * 4) as usize;
                        let got = u32::from_le_bytes(staging[at..at + 4].try_into().unwrap());
                        let want =
                            vramswap::backend::selftest::expected_word(&step, test.index, word);
                        assert_eq!(
                            got, want,
                            "{kind}: {step:?} chunk {} word {word}",
                            test.index
                        );
                    }
                }
                // What was filled checks clean, and its complement does not.
                let check = TestStep {
                    op: TestOp::Check,
                    ..step
                };
                assert_eq!(self_test.run(&tested, &check).unwrap().mismatches, 0);
                let wrong = TestStep {
                    invert: !invert,
                    ..check
                };
                let result = self_test.run(&tested, &wrong).unwrap();
                assert_eq!(result.mismatches, 2 * WORDS_PER_CHUNK, "{kind}: {fill:?}");
                assert!(result.block_errors.iter().all(|&n| n == 16384), "{kind}");
                assert_eq!(result.bad_words.len(), 64);
            }
        }
        for chunk in chunks {
            backend.free_chunk(chunk);
        }
    });
}

#[test]
fn clean_memory_passes_every_pattern_over_several_passes() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, Some(64 * MIB));
        let available = backend.memory().available;
        let mut config = MemtestConfig::full(8 * MIB + 1234);
        config.passes = 2;
        let mut last = None;
        let report = memtest::run(backend.as_ref(), &config, |p| last = Some(*p)).unwrap();
        assert_eq!(report.size, 8 * MIB, "{kind}: whole chunks only");
        assert_eq!(
            (report.mismatches, report.bad_blocks.len()),
            (0, 0),
            "{kind}: {report:?}"
        );
        // 2 passes x (4 two-step patterns + moving inversions' 4 steps).
        assert_eq!(report.bytes_swept, 8 * MIB * 24);
        let last = last.unwrap();
        assert_eq!((last.bytes_done, last.pass), (report.bytes_swept, 2));
        assert_eq!(
            backend.memory().available,
            available,
            "{kind}: chunks given back"
        );
    });
}

/// Needs `--features fault-injection` (scripts/test-all passes it).
#[cfg(feature = "fault-injection")]
#[test]
fn a_stuck_bit_is_reported_in_exactly_its_block() {
    use vramswap::backend::faulty::{FaultPlan, FaultyBackend};
    use vramswap::backend::BLOCK_SIZE;
    for_each_backend(|kind| {
        // 18 chunks: two batches of steps; the bit is in the second.
        // Word 5 * 16384 + 123 has bit 8 clear in the address pattern, so
        // a bit stuck at 1 there is caught whatever the random fill holds.
        let at = 17 * CHUNK_SIZE + 5 * BLOCK_SIZE + 123 * 4 + 1;
        let plan = FaultPlan {
            stuck_bit_at: Some(at),
            ..Default::default()
        };
        let backend = FaultyBackend::new(open_backend(kind, None), plan);
        let report =
            memtest::run(&backend, &MemtestConfig::quick(18 * CHUNK_SIZE), |_| {}).unwrap();
        assert_eq!(report.bad_blocks.len(), 1, "{kind}: {report:?}");
        let block = &report.bad_blocks[0];
        assert_eq!(block.offset, at - at % BLOCK_SIZE, "{kind}");
        assert!(
            block.errors >= 1 && block.errors == report.mismatches,
            "{kind}: {report:?}"
        );
        let word = block.words[0];
        assert_eq!(word.offset, at - at % 4, "{kind}");
        assert_eq!(word.observed ^ word.expected, 1 << 8, "{kind}: {word:?}");
        assert_eq!(word.observed & (1 << 8), 1 << 8, "{kind}: stuck at one");
    });
}

#[test]
fn a_backend_without_compute_is_refused_and_a_tiny_size_too() {
    for_each_backend(|kind| {
        // The wrapper does not pass the self-test through: no compute.
        let counting = Arc::new(Counting::new(open_backend(kind, None)));
        let err =
            memtest::run(counting.as_ref(), &MemtestConfig::quick(4 * MIB), |_| {}).unwrap_err();
        assert_eq!(err, MemtestError::Unsupported(kind));
        assert!(
            err.to_string()
                .contains("test the same GPU with the vulkan backend"),
            "{err}"
        );
        let backend = open_backend(kind, None);
        let err = memtest::run(backend.as_ref(), &MemtestConfig::quick(MIB), |_| {}).unwrap_err();
        assert!(matches!(err, MemtestError::TooSmall(_)), "{err}");
        let limited = open_backend(kind, Some(8 * MIB));
        let err =
            memtest::run(limited.as_ref(), &MemtestConfig::quick(16 * MIB), |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("gave 8 MiB before running out"),
            "{err}"
        );
        assert_eq!(
            limited.memory().available,
            8 * MIB,
            "{kind}: chunks given back"
        );
    });
}
