// VRAM self-test: fill a 4 MiB chunk with a pattern, read it back and
// compare on the GPU. Compiled to SPIR-V by build.rs (naga); the Rust
// mirror of `expected` is `backend::selftest::expected_word`, and the
// conformance tests check that the two agree word for word.
//
// One dispatch covers one chunk (binding 0). Mismatches are counted in
// `counters` (the total, then one counter per 64 KiB block of each chunk of
// the batch) and the first ones are recorded in `bad`, so the host reads
// back a few KiB, never the chunk.

struct Params {
    // 0 walking ones, 1 walking zeros, 2 address in address, 3 random,
    // 4 checkerboard (`selftest::Pattern::code`).
    pattern: u32,
    seed: u32,
    // XORed into every expected word: 0, or 0xffffffff for the complement.
    invert: u32,
    // Walking patterns: where the walking bit starts.
    rotate: u32,
    // The chunk's position in the area under test: addresses are
    // chunk_index * 2^20 + word, in 32-bit words.
    chunk_index: u32,
    // The chunk's position in this batch: its row of block counters.
    slot: u32,
    // Blocks per chunk, and log2 of the words per block.
    blocks_per_chunk: u32,
    block_shift: u32,
}

struct Counters {
    mismatches: atomic<u32>,
    blocks: array<atomic<u32>>,
}

struct BadWord {
    slot: u32,
    word: u32,
    observed: u32,
    expected: u32,
}

var<push_constant> params: Params;
@group(0) @binding(0) var<storage, read_write> words: array<u32>;
@group(0) @binding(1) var<storage, read_write> counters: Counters;
@group(0) @binding(2) var<storage, read_write> bad: array<BadWord>;

// PCG-style integer hash: a different, reproducible value for every address.
fn hash(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn expected(i: u32) -> u32 {
    let address = (params.chunk_index << 20u) | i;
    var value = 0u;
    switch params.pattern {
        // Walking ones and zeros: one bit, moving one place per word.
        case 0u: { value = 1u << ((i + params.rotate) & 31u); }
        case 1u: { value = ~(1u << ((i + params.rotate) & 31u)); }
        case 2u: { value = address; }
        case 3u: { value = hash(address ^ hash(params.seed ^ (params.chunk_index >> 12u))); }
        default: {
            // Checkerboard, shifted by `rotate` bits: neighbouring bits
            // and (with invert) each cell hold both values in turn.
            value = 0x55555555u << (params.rotate & 1u);
            if ((i & 1u) == 1u) { value = ~value; }
        }
    }
    return value ^ params.invert;
}

fn record(i: u32, observed: u32, wanted: u32) {
    let n = atomicAdd(&counters.mismatches, 1u);
    let block = params.slot * params.blocks_per_chunk + (i >> params.block_shift);
    atomicAdd(&counters.blocks[block], 1u);
    if (n < arrayLength(&bad)) {
        bad[n] = BadWord(params.slot, i, observed, wanted);
    }
}

// Grid-stride loops: the host picks the workgroup count.
@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&words);
    let stride = groups.x * 256u;
    for (var i = id.x; i < n; i += stride) {
        words[i] = expected(i);
    }
}

@compute @workgroup_size(256)
fn check(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&words);
    let stride = groups.x * 256u;
    for (var i = id.x; i < n; i += stride) {
        let observed = words[i];
        let wanted = expected(i);
        if (observed != wanted) {
            record(i, observed, wanted);
        }
    }
}

// Moving inversions: check each word, then write its complement, so every
// cell holds both values and is read in both.
@compute @workgroup_size(256)
fn check_invert(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&words);
    let stride = groups.x * 256u;
    for (var i = id.x; i < n; i += stride) {
        let observed = words[i];
        let wanted = expected(i);
        if (observed != wanted) {
            record(i, observed, wanted);
        }
        words[i] = ~wanted;
    }
}
