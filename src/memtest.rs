//! The VRAM memory test: takes an area of device memory in chunks, writes
//! patterns into it and checks them on the GPU (see
//! [`backend::selftest`](crate::backend::selftest)), and reports every
//! 64 KiB block that did not hold what was written.
//!
//! Consumer GPUs have no ECC: a weak cell under swap silently corrupts a
//! process. `vramswap memtest` runs this; `vramswap start --memtest` runs a
//! quick pass over the area it is about to serve and refuses bad memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::selftest::{
    BadWord, Pattern, TestChunk, TestOp, MAX_BAD_WORDS, MAX_CHUNKS_PER_STEP, WORDS_PER_CHUNK,
};
use crate::backend::{
    Backend, BackendError, BackendKind, ChunkId, BLOCKS_PER_CHUNK, BLOCK_SIZE, CHUNK_SIZE,
};
use crate::size::ByteSize;

/// What to test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemtestConfig {
    /// Bytes of device memory (rounded down to whole chunks).
    pub size: u64,
    pub passes: u32,
    pub patterns: Vec<Pattern>,
    /// Seeds the random pattern (pass N uses `seed + N`).
    pub seed: u32,
}

impl MemtestConfig {
    /// Every pattern, once.
    pub fn full(size: u64) -> Self {
        MemtestConfig {
            size,
            passes: 1,
            patterns: Pattern::ALL.to_vec(),
            seed: 1,
        }
    }

    /// One pass of [`Pattern::QUICK`]: what `start --memtest` runs.
    pub fn quick(size: u64) -> Self {
        MemtestConfig {
            patterns: Pattern::QUICK.to_vec(),
            ..MemtestConfig::full(size)
        }
    }

    /// Sweeps over the whole area the test makes.
    pub fn sweeps(&self) -> u64 {
        let per_pass: usize = self.patterns.iter().map(|p| p.steps(0, 0).len()).sum();
        per_pass as u64 * u64::from(self.passes)
    }
}

/// Where the test is, after each step over a batch of chunks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemtestProgress {
    /// Bytes swept so far (each sweep counts the area once).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes of the area: one sweep.
    pub size: u64,
    /// 1-based.
    pub pass: u32,
    pub pattern: Pattern,
    /// What the current sweep does.
    pub op: TestOp,
    /// Mismatching words so far.
    pub mismatches: u64,
    pub elapsed: Duration,
}

/// A 64 KiB block that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    /// Offset of the block in the tested area.
    pub offset: u64,
    /// Mismatching words found in it, over all steps.
    pub errors: u64,
    /// Some of those words (the GPU records the first few of each step).
    pub words: Vec<BadWordAt>,
}

/// One word that read back wrong, by its offset in the tested area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadWordAt {
    pub offset: u64,
    pub observed: u32,
    pub expected: u32,
    pub pattern: Pattern,
}

/// What a test found.
#[derive(Debug, Clone, PartialEq)]
pub struct MemtestReport {
    pub device: String,
    pub backend: BackendKind,
    /// Bytes tested (a whole number of chunks).
    pub size: u64,
    pub passes: u32,
    pub patterns: Vec<Pattern>,
    /// Bytes swept: `size` times the sweeps made.
    pub bytes_swept: u64,
    pub elapsed: Duration,
    /// Every mismatching word found.
    pub mismatches: u64,
    /// In address order.
    pub bad_blocks: Vec<BadBlock>,
}

impl MemtestReport {
    /// Sweep throughput, in 10^9 bytes per second.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes_swept as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemtestError {
    #[error("the {0} backend cannot run the memory test (it has no compute shaders); test the same GPU with the vulkan backend")]
    Unsupported(BackendKind),
    #[error("size {requested} is smaller than one {chunk} chunk", requested = ByteSize(*.0), chunk = ByteSize(CHUNK_SIZE))]
    TooSmall(u64),
    #[error(
        "size {requested} is more than {device} can hold now: it gave {got} before running out"
    )]
    TooLarge {
        requested: ByteSize,
        got: ByteSize,
        device: String,
    },
    #[error("{0}")]
    Backend(#[from] BackendError),
}

/// Chunks taken for the test, given back however it ends.
struct Area<'a> {
    backend: &'a dyn Backend,
    chunks: Vec<ChunkId>,
}

impl Drop for Area<'_> {
    fn drop(&mut self) {
        for chunk in self.chunks.drain(..) {
            self.backend.free_chunk(chunk);
        }
    }
}

/// Runs the test on `backend`, calling `progress` after every step over a
/// batch of chunks.
pub fn run(
    backend: &dyn Backend,
    config: &MemtestConfig,
    mut progress: impl FnMut(&MemtestProgress),
) -> Result<MemtestReport, MemtestError> {
    let device = backend.device().clone();
    let self_test = backend
        .self_test()
        .ok_or(MemtestError::Unsupported(device.backend))?;
    let chunk_count = config.size / CHUNK_SIZE;
    if chunk_count == 0 {
        return Err(MemtestError::TooSmall(config.size));
    }
    let mut area = Area {
        backend,
        chunks: Vec::with_capacity(chunk_count as usize),
    };
    for _ in 0..chunk_count {
        match backend.allocate_chunk() {
            Ok(chunk) => area.chunks.push(chunk),
            Err(BackendError::OutOfDeviceMemory) => {
                return Err(MemtestError::TooLarge {
                    requested: ByteSize(chunk_count * CHUNK_SIZE),
                    got: ByteSize(area.chunks.len() as u64 * CHUNK_SIZE),
                    device: device.name.clone(),
                })
            }
            Err(err) => return Err(err.into()),
        }
    }
    let tested: Vec<TestChunk> = area
        .chunks
        .iter()
        .enumerate()
        .map(|(index, &chunk)| TestChunk {
            chunk,
            index: index as u64,
        })
        .collect();
    let size = chunk_count * CHUNK_SIZE;
    let bytes_total = size * config.sweeps();
    let start = Instant::now();
    let mut bytes_done = 0;
    let mut mismatches = 0u64;
    // Block index in the area → errors and sample words.
    let mut bad: BTreeMap<u64, (u64, Vec<BadWordAt>)> = BTreeMap::new();
    for pass in 0..config.passes {
        for &pattern in &config.patterns {
            for step in pattern.steps(pass, config.seed) {
                for batch in tested.chunks(MAX_CHUNKS_PER_STEP) {
                    let result = self_test.run(batch, &step)?;
                    mismatches += result.mismatches;
                    note_bad_blocks(&mut bad, batch, &result.block_errors);
                    for word in &result.bad_words {
                        note_bad_word(&mut bad, batch, word, pattern);
                    }
                    bytes_done += batch.len() as u64 * CHUNK_SIZE;
                    progress(&MemtestProgress {
                        bytes_done,
                        bytes_total,
                        size,
                        pass: pass + 1,
                        pattern,
                        op: step.op,
                        mismatches,
                        elapsed: start.elapsed(),
                    });
                }
            }
        }
    }
    let elapsed = start.elapsed();
    drop(area);
    Ok(MemtestReport {
        device: device.name,
        backend: device.backend,
        size,
        passes: config.passes,
        patterns: config.patterns.clone(),
        bytes_swept: bytes_total,
        elapsed,
        mismatches,
        bad_blocks: bad
            .into_iter()
            .map(|(block, (errors, words))| BadBlock {
                offset: block * BLOCK_SIZE,
                errors,
                words,
            })
            .collect(),
    })
}

fn note_bad_blocks(
    bad: &mut BTreeMap<u64, (u64, Vec<BadWordAt>)>,
    batch: &[TestChunk],
    block_errors: &[u32],
) {
    for (i, &errors) in block_errors.iter().enumerate() {
        if errors > 0 {
            let chunk = batch[i / BLOCKS_PER_CHUNK].index;
            let block = chunk * BLOCKS_PER_CHUNK as u64 + (i % BLOCKS_PER_CHUNK) as u64;
            bad.entry(block).or_default().0 += u64::from(errors);
        }
    }
}

fn note_bad_word(
    bad: &mut BTreeMap<u64, (u64, Vec<BadWordAt>)>,
    batch: &[TestChunk],
    word: &BadWord,
    pattern: Pattern,
) {
    let Some(chunk) = batch.get(word.slot) else {
        return;
    };
    let offset = (chunk.index * WORDS_PER_CHUNK + word.word) * 4;
    let words = &mut bad.entry(offset / BLOCK_SIZE).or_default().1;
    if words.len() < MAX_BAD_WORDS {
        words.push(BadWordAt {
            offset,
            observed: word.observed,
            expected: word.expected,
            pattern,
        });
    }
}
