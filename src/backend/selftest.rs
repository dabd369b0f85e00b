//! The VRAM self-test seam: what a backend that can run compute on its
//! chunks offers the memory test (`crate::memtest`).
//!
//! A step writes a pattern into chunks, or reads them back and compares
//! with the pattern, on the device: the device counts mismatches per 64 KiB
//! block and records the first few bad words, so a check reads back a few
//! KiB, never the chunk. [`expected_word`] is the pattern in Rust, word for
//! word what `shaders/memtest.wgsl` computes: the host reference model runs
//! it, and the conformance tests compare the GPU's fills with it.
//!
//! Backends without compute return `None` from
//! [`Backend::self_test`](super::Backend::self_test): the CUDA backend does
//! (no kernels are built for it); test the same GPU through Vulkan.

use std::fmt;
use std::str::FromStr;

use super::{BackendError, ChunkId, BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE};

/// Most chunks one [`SelfTest::run`] takes: the device-side counters are
/// sized for this many.
pub const MAX_CHUNKS_PER_STEP: usize = 16;
/// Bad words one step records in detail (every mismatch is counted).
pub const MAX_BAD_WORDS: usize = 64;
/// 32-bit words in a chunk.
pub const WORDS_PER_CHUNK: u64 = CHUNK_SIZE / 4;
/// 32-bit words in a block.
pub const WORDS_PER_BLOCK: u64 = BLOCK_SIZE / 4;

/// A data pattern of the memory test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// One bit set per word, moving one place from word to word (and by
    /// one more place each pass): catches stuck-at-0 bits and bits that
    /// pull their neighbours up.
    WalkingOnes,
    /// One bit clear per word, moving the same way: stuck-at-1 bits.
    WalkingZeros,
    /// Each word holds its own address: catches address lines that are
    /// stuck or shorted, where two addresses reach the same cells.
    AddressInAddress,
    /// A reproducible pseudo-random word per address, from a seed (a new
    /// seed each pass): data-dependent faults the regular patterns miss.
    Random,
    /// A checkerboard, then three sweeps that each check every word and
    /// write its complement: every cell holds both values and is read in
    /// both (memtest86's moving inversions, with the sweeps in parallel).
    MovingInversions,
}

impl Pattern {
    pub const ALL: [Pattern; 5] = [
        Pattern::WalkingOnes,
        Pattern::WalkingZeros,
        Pattern::AddressInAddress,
        Pattern::Random,
        Pattern::MovingInversions,
    ];
    /// The quick test `vramswap start --memtest` runs: addressing faults
    /// and data faults, two sweeps each.
    pub const QUICK: [Pattern; 2] = [Pattern::AddressInAddress, Pattern::Random];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::WalkingOnes => "walking-ones",
            Pattern::WalkingZeros => "walking-zeros",
            Pattern::AddressInAddress => "address",
            Pattern::Random => "random",
            Pattern::MovingInversions => "moving-inversions",
        }
    }

    /// The steps that test this pattern in pass `pass` with `seed`. Each
    /// step runs over the whole area before the next starts, so every word
    /// keeps its value for a whole sweep before it is checked.
    pub fn steps(self, pass: u32, seed: u32) -> Vec<TestStep> {
        let step = |op, fill, invert| TestStep {
            op,
            fill,
            seed: seed.wrapping_add(pass),
            rotate: pass % 32,
            invert,
        };
        let simple = |fill| {
            vec![
                step(TestOp::Fill, fill, false),
                step(TestOp::Check, fill, false),
            ]
        };
        match self {
            Pattern::WalkingOnes => simple(Fill::WalkingOnes),
            Pattern::WalkingZeros => simple(Fill::WalkingZeros),
            Pattern::AddressInAddress => simple(Fill::Address),
            Pattern::Random => simple(Fill::Random),
            Pattern::MovingInversions => vec![
                step(TestOp::Fill, Fill::Checkerboard, false),
                step(TestOp::CheckInvert, Fill::Checkerboard, false),
                step(TestOp::CheckInvert, Fill::Checkerboard, true),
                step(TestOp::Check, Fill::Checkerboard, false),
            ],
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Pattern::ALL.iter().map(|p| p.name()).collect();
                format!("'{s}' is not a pattern: expected {}", names.join(", "))
            })
    }
}

/// The value every word gets, before `invert`. The numbers are the shader's
/// `params.pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    WalkingOnes = 0,
    WalkingZeros = 1,
    Address = 2,
    Random = 3,
    Checkerboard = 4,
}

/// What a step does to each word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestOp {
    /// Write the expected value.
    Fill,
    /// Compare with the expected value.
    Check,
    /// Compare with the expected value, then write its complement.
    CheckInvert,
}

impl TestOp {
    pub fn name(self) -> &'static str {
        match self {
            TestOp::Fill => "fill",
            TestOp::Check => "check",
            TestOp::CheckInvert => "check+invert",
        }
    }

    /// Whether the step writes the chunks.
    pub fn writes(self) -> bool {
        matches!(self, TestOp::Fill | TestOp::CheckInvert)
    }
}

/// One sweep of a pattern over some chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestStep {
    pub op: TestOp,
    pub fill: Fill,
    pub seed: u32,
    /// Walking patterns: the bit word 0 holds; checkerboard: the phase.
    pub rotate: u32,
    /// Expect (and write) the complement of the fill.
    pub invert: bool,
}

/// A chunk under test and its position in the tested area, which the
/// address-dependent patterns use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestChunk {
    pub chunk: ChunkId,
    pub index: u64,
}

/// A word that did not hold what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadWord {
    /// Position of the chunk in the call's `chunks`.
    pub slot: usize,
    /// Word index in the chunk.
    pub word: u64,
    pub observed: u32,
    pub expected: u32,
}

/// What one step found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepResult {
    /// Every mismatching word.
    pub mismatches: u64,
    /// Mismatches per block: `[slot * BLOCKS_PER_CHUNK + block]`.
    pub block_errors: Vec<u32>,
    /// The first mismatches found (at most [`MAX_BAD_WORDS`]), in no order.
    pub bad_words: Vec<BadWord>,
}

impl StepResult {
    /// A clean result for `chunks` chunks.
    pub fn new(chunks: usize) -> Self {
        StepResult {
            mismatches: 0,
            block_errors: vec![0; chunks * BLOCKS_PER_CHUNK],
            bad_words: Vec::new(),
        }
    }

    /// Notes one bad word (for backends that compare on the host).
    pub fn record(&mut self, bad: BadWord) {
        self.mismatches += 1;
        self.block_errors[bad.slot * BLOCKS_PER_CHUNK + (bad.word / WORDS_PER_BLOCK) as usize] += 1;
        if self.bad_words.len() < MAX_BAD_WORDS {
            self.bad_words.push(bad);
        }
    }
}

/// Compute on chunks: the VRAM self-test.
pub trait SelfTest: Send + Sync {
    /// Runs `step` over every word of `chunks` (at most
    /// [`MAX_CHUNKS_PER_STEP`]) and waits for it. No copy may be using
    /// these chunks meanwhile.
    fn run(&self, chunks: &[TestChunk], step: &TestStep) -> Result<StepResult, BackendError>;
}

/// The word at `word` (index in the chunk) of chunk `index` of the area,
/// as `shaders/memtest.wgsl` computes it.
pub fn expected_word(step: &TestStep, index: u64, word: u64) -> u32 {
    let i = word as u32;
    let chunk = index as u32;
    let address = (chunk << 20) | i;
    let value = match step.fill {
        Fill::WalkingOnes => 1u32 << (i.wrapping_add(step.rotate) & 31),
        Fill::WalkingZeros => !(1u32 << (i.wrapping_add(step.rotate) & 31)),
        Fill::Address => address,
        Fill::Random => hash(address ^ hash(step.seed ^ (chunk >> 12))),
        Fill::Checkerboard => {
            let value = 0x5555_5555u32 << (step.rotate & 1);
            if i & 1 == 1 {
                !value
            } else {
                value
            }
        }
    };
    if step.invert {
        !value
    } else {
        value
    }
}

/// The shader's PCG-style integer hash.
fn hash(x: u32) -> u32 {
    let state = x.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Checks the arguments of [`SelfTest::run`] the same way in every backend.
pub fn check_chunks(chunks: &[TestChunk]) -> Result<(), BackendError> {
    if chunks.is_empty() || chunks.len() > MAX_CHUNKS_PER_STEP {
        return Err(BackendError::OutOfBounds(format!(
            "a self-test step takes 1 to {MAX_CHUNKS_PER_STEP} chunks, not {}",
            chunks.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_by_name_and_every_step_list_checks_last() {
        for pattern in Pattern::ALL {
            assert_eq!(pattern.name().parse::<Pattern>().unwrap(), pattern);
            let steps = pattern.steps(3, 7);
            assert_eq!(steps[0].op, TestOp::Fill);
            assert_eq!(steps.last().unwrap().op, TestOp::Check);
        }
        assert!("zebra"
            .parse::<Pattern>()
            .unwrap_err()
            .contains("walking-ones"));
    }

    #[test]
    fn moving_inversions_expect_what_the_previous_sweep_wrote() {
        let steps = Pattern::MovingInversions.steps(0, 1);
        for pair in steps.windows(2) {
            for word in [0, 1, 2, 12345] {
                let written = match pair[0].op {
                    TestOp::Fill => expected_word(&pair[0], 2, word),
                    _ => !expected_word(&pair[0], 2, word),
                };
                assert_eq!(expected_word(&pair[1], 2, word), written, "{pair:?}");
            }
        }
    }

    #[test]
    fn address_and_random_patterns_differ_between_chunks_and_words() {
        let step = |fill| Pattern::steps(Pattern::Random, 0, 1)[0].with_fill(fill);
        for fill in [Fill::Address, Fill::Random] {
            let s = step(fill);
            assert_ne!(expected_word(&s, 0, 5), expected_word(&s, 1, 5));
            assert_ne!(expected_word(&s, 0, 5), expected_word(&s, 0, 6));
        }
        let walking = step(Fill::WalkingOnes);
        assert_eq!(expected_word(&walking, 9, 33).count_ones(), 1);
    }

    impl TestStep {
        fn with_fill(mut self, fill: Fill) -> Self {
            self.fill = fill;
            self
        }
    }
}
