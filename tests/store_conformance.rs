//! The block store's contract, checked once for every backend present:
//! the host reference model and Vulkan (lavapipe on machines with no GPU),
//! and CUDA where built and present. `VRAMSWAP_TEST_BACKENDS` says which.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use vramswap::backend::{Backend, BackendKind, BLOCK_SIZE, CHUNK_SIZE};
use vramswap::{
    AllocationPolicy, BlockStore, Compression, Ratio, SizeSpec, StoreConfig, StoreError,
};

use common::{for_each_backend, open_backend, Counting};

const MIB: u64 = 1 << 20;

fn config(size: u64, allocation: AllocationPolicy) -> StoreConfig {
    StoreConfig {
        size: SizeSpec::Bytes(size),
        allocation,
        lanes: 8,
        staging_bytes: 256 << 10,
        verify: false,
        readahead: 8,
        compress: Compression::Off,
        ratio: Ratio::DEFAULT,
    }
}

/// A compressed store (`compress=`) on `budget` bytes of VRAM, exporting
/// `ratio` times that.
fn compressed(
    kind: BackendKind,
    budget: u64,
    allocation: AllocationPolicy,
    compress: Compression,
    verify: bool,
    ratio: &str,
) -> BlockStore {
    let config = StoreConfig {
        verify,
        compress,
        ratio: ratio.parse().unwrap(),
        ..config(budget, allocation)
    };
    BlockStore::open(open_backend(kind, None), &config).expect("open compressed store")
}

fn store(kind: BackendKind, size: u64, allocation: AllocationPolicy) -> BlockStore {
    BlockStore::open(open_backend(kind, None), &config(size, allocation)).expect("open store")
}

/// A store with block checksums on (`verify=on`) or off.
fn store_verify(
    kind: BackendKind,
    size: u64,
    allocation: AllocationPolicy,
    verify: bool,
) -> BlockStore {
    let config = StoreConfig {
        verify,
        ..config(size, allocation)
    };
    BlockStore::open(open_backend(kind, None), &config).expect("open store")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// 4 KiB of bytes that compress about 3:1, as program memory does.
fn compressible(seed: u64, piece: &mut [u8]) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for run in piece.chunks_mut(16) {
        match rng.gen_range(0..3) {
            0 => rng.fill_bytes(run),
            _ => run.fill(rng.gen_range(0..4)),
        }
    }
}

/// Bytes of every kind a compressed store tells apart, 4 KiB at a time:
/// random (kept raw), compressible, one repeated 8-byte word
/// (same-filled) and zeros.
fn mixed(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for piece in v.chunks_mut(4096) {
        match rng.gen_range(0..4) {
            0 => rng.fill_bytes(piece),
            1 => compressible(rng.gen(), piece),
            2 => {
                let word = rng.gen::<u64>().to_ne_bytes();
                for (i, byte) in piece.iter_mut().enumerate() {
                    *byte = word[i % 8];
                }
            }
            _ => {}
        }
    }
    v
}

#[test]
fn fresh_device_reads_zeros_without_touching_the_gpu() {
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Eager, AllocationPolicy::Lazy] {
            let counting = Arc::new(Counting::new(open_backend(kind, None)));
            let store = BlockStore::open(counting.clone(), &config(16 * MIB, allocation)).unwrap();
            let mut buf = vec![0xffu8; (9 * MIB) as usize];
            store.read(&mut buf, 3 * MIB + 17).unwrap();
            assert!(
                buf.iter().all(|b| *b == 0),
                "{kind}/{allocation}: fresh read not zero"
            );
            assert_eq!(
                counting.downloads.load(Ordering::Relaxed),
                0,
                "{kind}: read went to the GPU"
            );
        }
    });
}

#[test]
fn eager_takes_everything_at_open_and_lazy_on_first_write() {
    for_each_backend(|kind| {
        let eager = store(kind, 32 * MIB, AllocationPolicy::Eager);
        assert_eq!(eager.stats().chunks_allocated, 8);
        assert_eq!(eager.stats().chunks_total, 8);

        let lazy = store(kind, 32 * MIB, AllocationPolicy::Lazy);
        assert_eq!(lazy.stats().chunks_allocated, 0);
        lazy.write(&[1; 10], CHUNK_SIZE - 5).unwrap();
        assert_eq!(
            lazy.stats().chunks_allocated,
            2,
            "a write across a boundary takes both chunks"
        );
        lazy.zero(0, CHUNK_SIZE).unwrap();
        assert_eq!(
            lazy.stats().chunks_allocated,
            1,
            "a trimmed whole chunk goes back"
        );
        let mut back = [9u8; 10];
        lazy.read(&mut back, CHUNK_SIZE - 5).unwrap();
        assert_eq!(back, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    });
}

#[test]
fn new_chunks_are_zeroed_and_reused_chunks_show_no_old_data() {
    for_each_backend(|kind| {
        let store = store(kind, 16 * MIB, AllocationPolicy::Lazy);
        // Fill chunk 0 completely, give it back, then write a few bytes into
        // chunk 3: the backend hands the same VRAM back, and nothing of the
        // old pattern may show, inside or outside the written block.
        let old = pattern(1, CHUNK_SIZE as usize);
        store.write(&old, 0).unwrap();
        store.zero(0, CHUNK_SIZE).unwrap();
        assert_eq!(store.stats().chunks_allocated, 0);
        store.write(b"new", 3 * CHUNK_SIZE + 100).unwrap();
        let mut back = vec![0xffu8; CHUNK_SIZE as usize];
        store.read(&mut back, 3 * CHUNK_SIZE).unwrap();
        let mut want = vec![0u8; CHUNK_SIZE as usize];
        want[100..103].copy_from_slice(b"new");
        assert!(back == want, "{kind}: reused chunk shows stale bytes");
        store.read(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|b| *b == 0),
            "{kind}: trimmed chunk not zero"
        );
    });
}

#[test]
fn trim_and_zero_of_partial_and_whole_blocks() {
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Eager, AllocationPolicy::Lazy] {
            let store = store(kind, 16 * MIB, allocation);
            let data = pattern(2, (3 * CHUNK_SIZE) as usize);
            store.write(&data, 0).unwrap();
            let mut model = data.clone();
            model.resize((16 * MIB) as usize, 0);
            // Partial head block, whole blocks, partial tail block, a whole
            // chunk, and a range inside one block.
            for (offset, len) in [
                (1000, 3 * BLOCK_SIZE),
                (CHUNK_SIZE, CHUNK_SIZE),
                (2 * CHUNK_SIZE + 5, 7),
                (2 * CHUNK_SIZE + BLOCK_SIZE, BLOCK_SIZE),
            ] {
                store.zero(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            let mut back = vec![0u8; model.len()];
            store.read(&mut back, 0).unwrap();
            assert!(back == model, "{kind}/{allocation}: zeroed ranges wrong");
            let mut holes = 0;
            store
                .extents(0, 16 * MIB, |_, len, data| {
                    if !data {
                        holes += len
                    }
                })
                .unwrap();
            // Never written: chunk 3; trimmed: chunk 1 and three whole blocks.
            assert_eq!(
                holes,
                8 * MIB + 3 * BLOCK_SIZE,
                "{kind}: zero bytes in extents"
            );
        }
    });
}

#[test]
fn out_of_range_requests_are_errors() {
    for_each_backend(|kind| {
        let store = store(kind, 8 * MIB, AllocationPolicy::Lazy);
        let mut buf = [0u8; 16];
        for offset in [8 * MIB - 15, 8 * MIB, u64::MAX - 3] {
            let err = store.read(&mut buf, offset).unwrap_err();
            assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
            assert_eq!(err.errno(), libc::EINVAL);
            assert!(store.write(&buf, offset).is_err());
            assert!(store.zero(offset, 16).is_err());
        }
        store.read(&mut buf, 8 * MIB - 16).unwrap();
    });
}

#[test]
fn a_full_gpu_fails_writes_with_enospc_and_recovers_after_trim() {
    for_each_backend(|kind| {
        // A device that lends 4 chunks under a 16-chunk lazy store.
        let backend = open_backend(kind, Some(4 * CHUNK_SIZE));
        let store = BlockStore::open(backend, &config(64 * MIB, AllocationPolicy::Lazy)).unwrap();
        for chunk in 0..4 {
            store.write(&[7; 512], chunk * CHUNK_SIZE).unwrap();
        }
        let err = store.write(&[7; 512], 10 * CHUNK_SIZE).unwrap_err();
        assert_eq!(err, StoreError::NoSpace, "{kind}");
        assert_eq!(err.errno(), libc::ENOSPC);
        // Still serving: reads work, and a trim makes room.
        let mut back = [0u8; 512];
        store.read(&mut back, 2 * CHUNK_SIZE).unwrap();
        assert_eq!(back, [7; 512]);
        store.zero(CHUNK_SIZE, CHUNK_SIZE).unwrap();
        store.write(&[8; 512], 10 * CHUNK_SIZE).unwrap();
        store.read(&mut back, 10 * CHUNK_SIZE).unwrap();
        assert_eq!(back, [8; 512]);

        // Eager: refused at open, naming both sizes.
        let backend = open_backend(kind, Some(4 * CHUNK_SIZE));
        let err =
            BlockStore::open(backend, &config(64 * MIB, AllocationPolicy::Eager)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("64 MiB") && text.contains("16 MiB"),
            "{kind}: {text}"
        );
    });
}

/// Needs `--features fault-injection` (scripts/test-all passes it).
#[cfg(feature = "fault-injection")]
#[test]
fn a_lost_device_fails_every_later_request_with_eio() {
    use vramswap::backend::faulty::{FaultPlan, FaultyBackend};
    for_each_backend(|kind| {
        // Batch 1 zeroes the eager chunks, batch 2 is the first write (a
        // whole block: one batch, or one mapped write).
        let plan = FaultPlan {
            lost_from_batch: Some(3),
            ..Default::default()
        };
        let backend = Arc::new(FaultyBackend::new(open_backend(kind, None), plan));
        let store = BlockStore::open(backend, &config(8 * MIB, AllocationPolicy::Eager)).unwrap();
        let block = vec![1u8; BLOCK_SIZE as usize];
        store.write(&block, 0).unwrap();
        let err = store.write(&block, 2 * BLOCK_SIZE).unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{kind}: {err}");
        // Even reads of never-written blocks, which need no GPU, now fail:
        // the store cannot vouch for anything any more.
        let mut buf = [0u8; 16];
        let err = store.read(&mut buf, 6 * MIB).unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{kind}: {err}");
        assert!(store.stats().failure.unwrap().contains("lost"));
    });
}

/// One random operation against the store and the model; returns the
/// range to check afterwards.
fn random_op(
    rng: &mut SmallRng,
    store: &BlockStore,
    model: &mut [u8],
    base: u64,
    span: u64,
    max_len: u64,
) -> (u64, u64) {
    nbd_thread();
    let len = match rng.gen_range(0..4) {
        0 => rng.gen_range(1..=16),
        1 => rng.gen_range(1..=BLOCK_SIZE * 2),
        2 => BLOCK_SIZE * rng.gen_range(1..=4),
        _ => rng.gen_range(1..=max_len),
    }
    .min(span);
    let offset = match rng.gen_range(0..3) {
        0 => base + rng.gen_range(0..=span - len) / 4096 * 4096,
        _ => base + rng.gen_range(0..=span - len),
    };
    let range = offset as usize - base as usize..(offset + len) as usize - base as usize;
    match rng.gen_range(0..10) {
        0..=4 => {
            let data = mixed(rng.gen(), len as usize);
            store.write(&data, offset).unwrap();
            model[range].copy_from_slice(&data);
        }
        5..=7 => {
            let mut buf = vec![0xeeu8; len as usize];
            store.read(&mut buf, offset).unwrap();
            assert!(
                buf == model[range],
                "read at {offset}+{len} differs from the model"
            );
        }
        _ => {
            store.zero(offset, len).unwrap();
            model[range].fill(0);
        }
    }
    (offset, len)
}

std::thread_local! {
    /// This thread's request buffer, kept as nbdkit keeps its own (see
    /// `nbd_buffer`), and how many checks this thread has made.
    static NBD_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Buffers this thread's has replaced, kept mapped until the thread
    /// ends: the store gives a moved buffer's registration back at the
    /// thread's next request, and the fake CUDA driver in CI holds it to
    /// unregistering memory that is still mapped (docs/RELIABILITY.md says
    /// why `vramswap start` never moves a registered buffer).
    static RETIRED: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
    static CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Makes this thread's request buffers outlive the store's record of
/// their registration: thread-locals end in the reverse order of their
/// first use, and nbdkit frees its buffer after every one of them (a
/// pthread key), so the buffers must be in use before the thread's first
/// store call.
fn nbd_thread() {
    NBD_BUFFER.with(|_| ());
    RETIRED.with(|_| ());
}

/// Runs `f` on this thread's request buffer cut to `len`, as nbdkit hands
/// a plugin its per-thread buffer: reused, and replaced (as `realloc`
/// moves it) only for a request longer than any before.
fn nbd_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    NBD_BUFFER.with_borrow_mut(|buffer| {
        if buffer.len() < len {
            let old = std::mem::replace(buffer, vec![0u8; len]);
            RETIRED.with_borrow_mut(|retired| retired.push(old));
        }
        f(&mut buffer[..len])
    })
}

/// Reads through [`BlockStore::read_direct`] into this thread's request
/// buffer, as the plugin does.
fn read_direct(store: &BlockStore, offset: u64, len: u64) -> Vec<u8> {
    nbd_buffer(len as usize, |buf| {
        buf.fill(0xdd);
        store.read_direct(buf, offset).unwrap();
        buf.to_vec()
    })
}

/// Checks a range against the model, every other time through a direct
/// read into the thread's request buffer, else through staging.
fn check_range(store: &BlockStore, model: &[u8], base: u64, offset: u64, len: u64) {
    nbd_thread();
    let checks = CHECKS.get();
    CHECKS.set(checks + 1);
    let buf = if checks % 2 == 0 {
        read_direct(store, offset, len)
    } else {
        let mut buf = vec![0xddu8; len as usize];
        store.read(&mut buf, offset).unwrap();
        buf
    };
    let range = (offset - base) as usize..(offset - base + len) as usize;
    if buf != model[range.clone()] {
        let first = buf
            .iter()
            .zip(&model[range])
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "mismatch at device offset {} after an op at {offset}+{len}",
            offset + first as u64
        );
    }
}

/// `steps` random requests of up to `max_len` bytes over the first `span`
/// bytes of the store, each checked against a model, and after each a
/// probe of up to `probe` bytes at random; then the whole span.
fn run_model(store: &BlockStore, seed: u64, span: u64, steps: usize, max_len: u64, probe: u64) {
    let mut model = vec![0u8; span as usize];
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..steps {
        let (offset, len) = random_op(&mut rng, store, &mut model, 0, span, max_len);
        check_range(store, &model, 0, offset, len);
        let at = rng.gen_range(0..span - probe);
        check_range(store, &model, 0, at, rng.gen_range(1..=probe));
    }
    check_range(store, &model, 0, 0, span);
}

#[test]
fn randomized_single_thread_model_with_large_requests() {
    for_each_backend(|kind| {
        for (allocation, verify) in [
            (AllocationPolicy::Eager, false),
            (AllocationPolicy::Lazy, false),
            (AllocationPolicy::Eager, true),
        ] {
            let size = 24 * MIB;
            let store = store_verify(kind, size, allocation, verify);
            let mut model = vec![0u8; size as usize];
            let mut rng = SmallRng::seed_from_u64(42);
            for _ in 0..300 {
                let (offset, len) = random_op(&mut rng, &store, &mut model, 0, size, 9 * MIB);
                check_range(&store, &model, 0, offset, len);
                let probe = rng.gen_range(0..size - 200_000);
                check_range(&store, &model, 0, probe, 200_000);
            }
            check_range(&store, &model, 0, 0, size);
            assert_eq!(store.stats().checksum_errors, 0, "{kind}: false alarms");
        }
    });
}

/// Where the driver gives only part of the VRAM as mappable memory (the
/// H200's gives half), the store holds mapped and unmapped chunks at once:
/// writes and small reads of the first go through the mapping, the rest
/// by DMA, and the model cannot tell them apart. The host model maps the
/// first 8 MiB of chunks it lends.
#[test]
fn a_store_part_mapped_part_not_matches_the_model() {
    use vramswap::backend::host::HostBackend;
    for (allocation, verify) in [
        (AllocationPolicy::Eager, false),
        (AllocationPolicy::Lazy, false),
        (AllocationPolicy::Eager, true),
    ] {
        let counting = Arc::new(Counting::new(Arc::new(HostBackend::with_mappable(
            None,
            8 * MIB,
        ))));
        let size = 24 * MIB;
        let config = StoreConfig {
            verify,
            ..config(size, allocation)
        };
        let store = BlockStore::open(counting.clone(), &config).unwrap();
        run_model(&store, 7, size, 400, 5 * MIB, 8192);
        let mut chunks = counting.chunks.lock().unwrap().clone();
        chunks.sort_by_key(|c| c.0);
        chunks.dedup();
        let mapped = chunks.iter().filter(|&&c| counting.chunk_mapped(c)).count();
        assert!(mapped <= 2, "{allocation:?}: {mapped} mapped chunks");
        if allocation == AllocationPolicy::Eager {
            assert_eq!((mapped, chunks.len()), (2, 6), "{allocation:?}");
        }
        if !verify {
            assert!(
                counting.mapped_reads.load(Ordering::Relaxed) > 0,
                "{allocation:?}"
            );
        }
        assert!(
            counting.downloads.load(Ordering::Relaxed) > 0,
            "{allocation:?}"
        );
    }
}

#[test]
fn randomized_multi_thread_model() {
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Eager, AllocationPolicy::Lazy] {
            run_threads(kind, allocation, false);
        }
    });
}

/// With checksums on, threads writing different bytes of one block at once
/// keep its checksum right (the updates are XORs in any order), and reads
/// racing those writes are read again, never failed.
#[test]
fn randomized_multi_thread_model_with_checksums() {
    for_each_backend(|kind| run_threads(kind, AllocationPolicy::Lazy, true));
}

/// The same threads on compressed pages: neighbours' partial writes into
/// one page each read, merge and write back the whole page, and must
/// never lose each other's bytes.
#[test]
fn randomized_multi_thread_model_with_compression() {
    for_each_backend(|kind| {
        run_threads_on(kind, AllocationPolicy::Lazy, false, Compression::Lz4);
        run_threads_on(kind, AllocationPolicy::Eager, true, Compression::Zstd(1));
    });
}

/// Threads share chunks and blocks but never bytes: the first half of the
/// device is dealt out in 20 KiB stripes (so neighbours write into the same
/// 64 KiB block at once), the second half in whole chunks (so trims give
/// chunks back while others copy). Each thread checks its own bytes against
/// its own model after every step, and all of it at the end.
fn run_threads(kind: BackendKind, allocation: AllocationPolicy, verify: bool) {
    run_threads_on(kind, allocation, verify, Compression::Off);
}

fn run_threads_on(
    kind: BackendKind,
    allocation: AllocationPolicy,
    verify: bool,
    compress: Compression,
) {
    const THREADS: usize = 6;
    const STRIPE: u64 = 20 << 10;
    let stripes_per_thread = 40u64;
    let striped = STRIPE * stripes_per_thread * THREADS as u64;
    let chunked_base = striped.div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
    let chunks_per_thread = 2u64;
    let size = chunked_base + CHUNK_SIZE * chunks_per_thread * THREADS as u64;
    let store = Arc::new(match compress {
        Compression::Off => store_verify(kind, size, allocation, verify),
        // VRAM for every page raw, and room for slabs partly full.
        _ => compressed(kind, size + 8 * MIB, allocation, compress, verify, "1"),
    });
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = store.clone();
            scope.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(1000 + t as u64);
                let mut stripes: Vec<Vec<u8>> =
                    vec![vec![0; STRIPE as usize]; stripes_per_thread as usize];
                let own_base = chunked_base + t as u64 * chunks_per_thread * CHUNK_SIZE;
                let own_span = chunks_per_thread * CHUNK_SIZE;
                let mut own = vec![0u8; own_span as usize];
                for step in 0..150 {
                    if step % 2 == 0 {
                        let s = rng.gen_range(0..stripes_per_thread);
                        let base = (s * THREADS as u64 + t as u64) * STRIPE;
                        let model = &mut stripes[s as usize];
                        let (o, l) = random_op(&mut rng, &store, model, base, STRIPE, STRIPE);
                        check_range(&store, model, base, o, l);
                    } else {
                        let (o, l) =
                            random_op(&mut rng, &store, &mut own, own_base, own_span, own_span);
                        if rng.gen_range(0..8) == 0 {
                            store.zero(own_base, CHUNK_SIZE).unwrap();
                            own[..CHUNK_SIZE as usize].fill(0);
                        }
                        check_range(&store, &own, own_base, o, l);
                    }
                }
                for (s, model) in stripes.iter().enumerate() {
                    let base = (s as u64 * THREADS as u64 + t as u64) * STRIPE;
                    check_range(&store, model, base, base, STRIPE);
                }
                check_range(&store, &own, own_base, own_base, own_span);
            });
        }
    });
    assert_eq!(store.stats().checksum_errors, 0, "{kind}: false alarms");
}

/// Random requests of any offset and length over compressed pages of every
/// kind, overwriting pages of one kind with another, against a model.
#[test]
fn randomized_model_with_compression() {
    for_each_backend(|kind| {
        for (compress, allocation, verify) in [
            (Compression::Lz4, AllocationPolicy::Lazy, false),
            (Compression::Zstd(1), AllocationPolicy::Eager, false),
            (Compression::Lz4, AllocationPolicy::Eager, true),
            (Compression::Zstd(3), AllocationPolicy::Lazy, true),
        ] {
            // The model spans what the VRAM holds even if every page were
            // raw, with room for slabs partly full: no write finds it full.
            let span = 16 * MIB;
            let store = compressed(kind, 24 * MIB, allocation, compress, verify, "1.5");
            assert_eq!(store.size(), 36 * MIB);
            run_model(&store, 11, span, 300, 3 * MIB, 70_000);
            let stats = store.stats();
            let packed = stats.compress.unwrap();
            assert_eq!(packed.compression, compress);
            assert!(
                packed.pages_stored > 0 && packed.pages_same > 0,
                "{packed:?}"
            );
            assert!(packed.pages_raw > 0 && packed.pages_raw < packed.pages_stored);
            assert!(packed.compressed_bytes <= packed.slot_bytes);
            assert!(packed.slot_bytes <= packed.vram_used);
            assert_eq!(stats.checksum_errors, 0, "{kind} {compress}: false alarms");
            // Everything trimmed: no page, no slot, and lazy gives every
            // chunk back.
            store.zero(0, store.size()).unwrap();
            let packed = store.stats().compress.unwrap();
            assert_eq!(
                (packed.pages_stored, packed.pages_same, packed.slot_bytes),
                (0, 0, 0)
            );
            let held = match allocation {
                AllocationPolicy::Lazy => 0,
                AllocationPolicy::Eager => 24 * MIB,
            };
            assert_eq!(packed.vram_used, held, "{kind} {compress} {allocation:?}");
        }
    });
}

/// Compressed pages in chunks part mapped, part not (as on the H200):
/// small reads of pages in mapped chunks are CPU loads, the rest DMA, and
/// the model cannot tell them apart. The host model maps the first 8 MiB
/// of chunks it lends.
#[test]
fn compressed_pages_part_mapped_part_not_match_the_model() {
    use vramswap::backend::host::HostBackend;
    for compress in [Compression::Lz4, Compression::Zstd(1)] {
        let counting = Arc::new(Counting::new(Arc::new(HostBackend::with_mappable(
            None,
            8 * MIB,
        ))));
        let config = StoreConfig {
            compress,
            ratio: "1".parse().unwrap(),
            ..config(24 * MIB, AllocationPolicy::Eager)
        };
        let store = BlockStore::open(counting.clone(), &config).unwrap();
        run_model(&store, 8, 16 * MIB, 400, MIB, 8192);
        assert!(
            counting.mapped_reads.load(Ordering::Relaxed) > 0,
            "{compress}"
        );
        assert!(counting.downloads.load(Ordering::Relaxed) > 0, "{compress}");
    }
}

/// Requests written at once by several threads: each request's pages of
/// one class take neighbouring slots, so reading one back is a step or
/// two, not a copy per page. (Slots taken one at a time interleaved, and
/// compressed reads at 8 connections stopped at 2.0 GB/s on an H100,
/// against 4.7-5.4 for the same pages written one request at a time.)
#[test]
fn pages_written_together_lie_together_among_concurrent_writers() {
    use vramswap::backend::host::HostBackend;
    const THREADS: u64 = 8;
    const REQUESTS: u64 = 8;
    // 128 pages: two batches of 64 pages each way.
    const REQUEST: u64 = 512 << 10;
    let counting = Arc::new(Counting::new(Arc::new(HostBackend::new(None))));
    let config = StoreConfig {
        compress: Compression::Lz4,
        ratio: "1".parse().unwrap(),
        staging_bytes: 1 << 20,
        ..config(
            THREADS * REQUESTS * REQUEST + 8 * MIB,
            AllocationPolicy::Eager,
        )
    };
    let store = BlockStore::open(counting.clone(), &config).unwrap();
    // A quarter random, the rest zeros: every page packs to about 1 KiB.
    let request = |t: u64, r: u64| -> Vec<u8> {
        let mut bytes = vec![0u8; REQUEST as usize];
        for (n, page) in bytes.chunks_mut(4096).enumerate() {
            SmallRng::seed_from_u64(t << 32 | r << 16 | n as u64).fill_bytes(&mut page[..1024]);
        }
        bytes
    };
    let at = |t: u64, r: u64| (r * THREADS + t) * REQUEST;
    // Each round's requests start together.
    let round = std::sync::Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (store, round) = (&store, &round);
            scope.spawn(move || {
                for r in 0..REQUESTS {
                    let bytes = request(t, r);
                    round.wait();
                    store.write(&bytes, at(t, r)).unwrap();
                }
            });
        }
    });
    let before = counting.downloads.load(Ordering::Relaxed);
    let mut buf = vec![0u8; REQUEST as usize];
    for t in 0..THREADS {
        for r in 0..REQUESTS {
            store.read(&mut buf, at(t, r)).unwrap();
            assert!(
                buf == request(t, r),
                "request {r} of thread {t} read back wrong"
            );
        }
    }
    let steps = counting.downloads.load(Ordering::Relaxed) - before;
    let requests = THREADS * REQUESTS;
    // One step a batch, and a second where one crosses from one chunk
    // into the next.
    let batches = 2 * requests;
    assert!(
        steps <= batches + batches / 32,
        "{steps} download steps to read {requests} requests of 128 pages"
    );
}

/// zramctl's columns: pages of each kind, their bytes before and after,
/// and what the VRAM behind them takes.
#[test]
fn compressed_pages_are_counted_as_zram_counts_them() {
    for_each_backend(|kind| {
        let store = compressed(
            kind,
            8 * MIB,
            AllocationPolicy::Lazy,
            Compression::Lz4,
            false,
            "2",
        );
        assert_eq!(store.size(), 16 * MIB);
        let mut text = vec![0u8; MIB as usize];
        for (n, page) in text.chunks_mut(4096).enumerate() {
            compressible(n as u64, page);
        }
        store.write(&text, 0).unwrap();
        let word = mixed(3, 4096);
        let same: Vec<u8> = (0..BLOCK_SIZE as usize)
            .map(|i| (i % 8) as u8 + 1)
            .collect();
        store.write(&same, MIB).unwrap();
        store
            .write(&vec![0u8; BLOCK_SIZE as usize], MIB + BLOCK_SIZE)
            .unwrap();
        store
            .write(&pattern(5, BLOCK_SIZE as usize), MIB + 2 * BLOCK_SIZE)
            .unwrap();
        let packed = store.stats().compress.unwrap();
        assert_eq!(packed.pages_stored, 256 + 16, "{packed:?}");
        assert_eq!(packed.pages_same, 32);
        assert_eq!(packed.pages_raw, 16);
        assert_eq!(packed.original_bytes, (256 + 16 + 32) * 4096);
        let raw = 16 * 4096;
        assert!(
            packed.compressed_bytes - raw < 256 * 4096 * 2 / 3,
            "{kind}: {packed:?}"
        );
        assert_eq!(packed.vram_used, CHUNK_SIZE);
        assert_eq!(packed.budget, 8 * MIB);
        // Same-filled pages read back as they were and, zeros or not,
        // take no VRAM; zeros read as a hole.
        let mut buf = vec![0u8; 2 * BLOCK_SIZE as usize];
        store.read(&mut buf, MIB).unwrap();
        assert!(
            buf[..BLOCK_SIZE as usize] == same[..]
                && buf[BLOCK_SIZE as usize..].iter().all(|&b| b == 0)
        );
        let mut runs = Vec::new();
        store
            .extents(MIB - 4096, 3 * BLOCK_SIZE, |o, l, d| runs.push((o, l, d)))
            .unwrap();
        assert_eq!(
            runs,
            [
                (MIB - 4096, 4096 + BLOCK_SIZE, true),
                (MIB + BLOCK_SIZE, BLOCK_SIZE, false),
                (MIB + 2 * BLOCK_SIZE, BLOCK_SIZE - 4096, true),
            ]
        );
        // One word changed in a same-filled page makes it a stored one.
        store.write(&word[..8], MIB + 4096).unwrap();
        let after = store.stats().compress.unwrap();
        assert_eq!(
            (after.pages_stored, after.pages_same),
            (packed.pages_stored + 1, packed.pages_same - 1)
        );
        // Zeroing what is left of a page leaves no page at all, as zeroing
        // the whole of it does.
        store.zero(MIB + 4096 + 8, 4096 - 8).unwrap();
        store.zero(MIB + 4096, 8).unwrap();
        let zeroed = store.stats().compress.unwrap();
        assert_eq!(
            (zeroed.pages_stored, zeroed.pages_same),
            (packed.pages_stored, packed.pages_same - 1)
        );
        store.zero(0, 16 * MIB).unwrap();
        let empty = store.stats().compress.unwrap();
        assert_eq!(
            (
                empty.original_bytes,
                empty.compressed_bytes,
                empty.vram_used
            ),
            (0, 0, 0)
        );
        assert_eq!(store.stats().chunks_allocated, 0);
    });
}

/// An export larger than its VRAM fills up: a write that finds no room
/// fails with ENOSPC and changes nothing, every page already stored reads
/// back, pages that need no slot are still taken, and trimming makes room.
#[test]
fn a_full_compressed_store_refuses_writes_and_keeps_every_page() {
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Lazy, AllocationPolicy::Eager] {
            let store = compressed(kind, 4 * MIB, allocation, Compression::Lz4, true, "4");
            let mut model = vec![0u8; store.size() as usize];
            let block = BLOCK_SIZE as usize;
            let mut offset = 0;
            let err = loop {
                let data = pattern(offset as u64, block);
                match store.write(&data, offset as u64) {
                    Ok(()) => model[offset..offset + block].copy_from_slice(&data),
                    Err(err) => break err,
                }
                offset += block;
            };
            assert_eq!(err, StoreError::NoSpace, "{kind}");
            assert_eq!(err.errno(), libc::ENOSPC);
            // One chunk holds 64 blocks of raw pages.
            assert_eq!(offset as u64, CHUNK_SIZE, "{kind} {allocation:?}");
            let packed = store.stats().compress.unwrap();
            assert!(packed.full && packed.full_writes >= 1, "{packed:?}");
            // A partial write over a stored page fails too, and leaves it.
            let err = store.write(&[1, 2, 3], 100).unwrap_err();
            assert_eq!(err, StoreError::NoSpace);
            // A page of one repeated word needs no slot.
            let word = [7u8; 4096];
            store.write(&word, offset as u64).unwrap();
            model[offset..offset + 4096].copy_from_slice(&word);
            let mut all = vec![0u8; model.len()];
            store.read(&mut all, 0).unwrap();
            assert!(
                all == model,
                "{kind} {allocation:?}: a full store changed a page"
            );
            // Trimming one block frees its slab: writes fit again.
            store.zero(0, BLOCK_SIZE).unwrap();
            model[..block].fill(0);
            assert!(!store.stats().compress.unwrap().full);
            let data = pattern(1234, block);
            store.write(&data, CHUNK_SIZE + BLOCK_SIZE).unwrap();
            model[offset + block..offset + 2 * block].copy_from_slice(&data);
            store.read(&mut all, 0).unwrap();
            assert!(all == model, "{kind} {allocation:?}");
            assert_eq!(store.stats().checksum_errors, 0);
        }
    });
}

/// A page of `random` random bytes and zeros after them: lz4 packs it to
/// a little more than `random` bytes, so its size class is chosen.
fn sized_page(seed: u64, random: usize) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut page[..random]);
    page
}

/// Pages that change size class leave the old class's slabs with a few
/// live slots each; compaction moves those pages together instead of
/// refusing writes with most of the VRAM slack. An export exactly its
/// VRAM (ratio 1): small pages everywhere, then raw ones over most of
/// them, then small ones again; every write succeeds and every page reads
/// back as the model says.
#[test]
fn pages_that_change_size_are_compacted_not_refused() {
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Lazy, AllocationPolicy::Eager] {
            let store = compressed(kind, 8 * MIB, allocation, Compression::Lz4, true, "1");
            let pages = (store.size() / 4096) as usize;
            let mut model = vec![0u8; store.size() as usize];
            let mut put = |page: usize, random: usize, seed: u64| {
                let data = sized_page(seed, random);
                store
                    .write(&data, page as u64 * 4096)
                    .unwrap_or_else(|e| panic!("{kind} {allocation:?}: page {page}: {e}"));
                model[page * 4096..(page + 1) * 4096].copy_from_slice(&data);
            };
            // 1 KiB slots (64 a slab, 32 slabs), then raw pages (16 a
            // slab) over nine in ten of them, taken from every small slab
            // in turn so that none empties: without compaction the raw
            // pages run out of blocks a quarter of the way before the end
            // (116 raw slabs and 32 small ones in 128 blocks).
            for page in 0..pages {
                put(page, 1000, page as u64);
            }
            let order = (0..64).flat_map(|slot| (0..pages / 64).map(move |slab| slab * 64 + slot));
            for page in order.take(pages * 9 / 10) {
                put(page, 3500, (pages + page) as u64);
            }
            for page in 0..pages {
                put(page, 1000, (2 * pages + page) as u64);
            }
            let packed = store.stats().compress.unwrap();
            assert!(
                packed.compacted_slabs > 0,
                "{kind} {allocation:?}: {packed:?}"
            );
            assert!(!packed.full && packed.full_writes == 0, "{packed:?}");
            let mut all = vec![0u8; model.len()];
            store.read(&mut all, 0).unwrap();
            assert!(all == model, "{kind} {allocation:?}: a moved page changed");
            assert_eq!(store.stats().checksum_errors, 0);
        }
    });
}

/// Compaction beside other writers and readers: threads each rewrite
/// their own pages with sizes that change, partly by partial writes that
/// hold a group while they compact, and read their pages back as they go.
#[test]
fn compaction_beside_writers_and_readers_loses_nothing() {
    for_each_backend(|kind| {
        const THREADS: usize = 4;
        let store = Arc::new(compressed(
            kind,
            8 * MIB,
            AllocationPolicy::Lazy,
            Compression::Lz4,
            true,
            "1",
        ));
        let pages = (store.size() / 4096) as usize / THREADS;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t as u64);
                    let mut model = vec![0u8; pages * 4096];
                    let base = (t * pages) as u64 * 4096;
                    for round in 0..6 {
                        let random = [900, 2600, 1700, 3000, 500, 2200][round];
                        for _ in 0..pages {
                            let page = rng.gen_range(0..pages);
                            let mut data = sized_page(rng.gen(), random);
                            let at = base + page as u64 * 4096;
                            if rng.gen_ratio(1, 8) {
                                // Part of a page: the rest stays as it was.
                                let from = rng.gen_range(0..4000);
                                let len = rng.gen_range(1..=4096 - from);
                                let piece = &mut data[from..from + len];
                                store.write(piece, at + from as u64).unwrap();
                                let old = &mut model[page * 4096 + from..page * 4096 + from + len];
                                old.copy_from_slice(piece);
                            } else {
                                store.write(&data, at).unwrap();
                                model[page * 4096..(page + 1) * 4096].copy_from_slice(&data);
                            }
                            if rng.gen_ratio(1, 4) {
                                let mut back = vec![0u8; 4096];
                                store.read(&mut back, at).unwrap();
                                assert!(back == model[page * 4096..(page + 1) * 4096]);
                            }
                        }
                    }
                    let mut all = vec![0u8; model.len()];
                    store.read(&mut all, base).unwrap();
                    assert!(all == model, "thread {t}: a page changed");
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("a thread failed");
        }
        let packed = store.stats().compress.unwrap();
        assert!(packed.compacted_slabs > 0, "{kind}: {packed:?}");
        assert_eq!(packed.full_writes, 0, "{kind}: {packed:?}");
        assert_eq!(store.stats().checksum_errors, 0);
    });
}

/// With `verify`, a compressed page whose VRAM changed after it was written
/// fails its read with EIO, naming the page, and the pages around it read
/// fine; without, a changed compressed page that no longer decompresses
/// fails the same way rather than returning garbage.
#[test]
#[cfg(feature = "fault-injection")]
fn a_changed_compressed_page_fails_its_read() {
    use vramswap::backend::faulty::{FaultPlan, FaultyBackend};
    for_each_backend(|kind| {
        for verify in [true, false] {
            let plan = FaultPlan {
                // The first upload: the page at 5 * 4096, written before
                // its neighbours, with its first byte flipped.
                corrupt_upload_at: Some(1),
                ..Default::default()
            };
            let backend = Arc::new(FaultyBackend::new(open_backend(kind, None), plan));
            let config = StoreConfig {
                verify,
                compress: Compression::Lz4,
                ..config(8 * MIB, AllocationPolicy::Eager)
            };
            let store = BlockStore::open(backend, &config).unwrap();
            let mut page = vec![0u8; 4096];
            compressible(77, &mut page);
            store.write(&page, 5 * 4096).unwrap();
            let mut first = vec![0u8; 5 * 4096];
            for (n, page) in first.chunks_mut(4096).enumerate() {
                compressible(n as u64, page);
            }
            store.write(&first, 0).unwrap();
            let mut buf = vec![0u8; 4096];
            match store.read(&mut buf, 5 * 4096) {
                Err(err) => {
                    assert_eq!(err, StoreError::Corrupt { offset: 5 * 4096 }, "{kind}");
                    assert_eq!(err.errno(), libc::EIO);
                    assert_eq!(store.stats().checksum_errors, 1);
                }
                // Without checksums, a flipped literal can decompress.
                Ok(()) => assert!(!verify && buf != page, "{kind}: the fault did not land"),
            }
            let mut rest = vec![0u8; 5 * 4096];
            store.read(&mut rest, 0).unwrap();
            assert!(rest == first, "{kind}");
            store.write(&page, 5 * 4096).unwrap();
            store.read(&mut buf, 5 * 4096).unwrap();
            assert!(buf == page, "{kind}: a rewrite mends the page");
        }
    });
}

/// What a stream of reads asks for at a time (nbdcopy's request size).
const PIECE: u64 = 256 << 10;

/// Reads `offset..offset+len` as a stream of [`PIECE`]s, each checked
/// against the model of the whole device.
fn stream_check(store: &BlockStore, model: &[u8], offset: u64, len: u64) {
    let mut at = offset;
    while at < offset + len {
        let n = PIECE.min(offset + len - at);
        check_range(store, model, 0, at, n);
        at += n;
    }
}

#[test]
fn sequential_reads_are_served_from_windows_filled_ahead() {
    for_each_backend(|kind| {
        let counting = Arc::new(Counting::new(open_backend(kind, None)));
        let store =
            BlockStore::open(counting.clone(), &config(16 * MIB, AllocationPolicy::Eager)).unwrap();
        let model = pattern(7, (16 * MIB) as usize);
        store.write(&model, 0).unwrap();
        let before = counting.downloads.load(Ordering::Relaxed);
        stream_check(&store, &model, 0, 16 * MIB);
        let downloads = counting.downloads.load(Ordering::Relaxed) - before;
        let stats = store.stats().readahead;
        // 64 reads of eight 2 MiB windows: the first window's eight from
        // VRAM (the second of them starts the stream), the other 56 from
        // the seven windows filled ahead, one download each.
        assert_eq!(
            (stats.windows, stats.filled, stats.served),
            (8, 7, 56),
            "{kind}"
        );
        assert_eq!(downloads, 8 + 7, "{kind}: downloads for 64 reads");
    });
}

/// Reads shorter than 128 KiB, however sequential (swap-ins, a 64 KiB
/// `dd`), never start a fill: each would cost 8 MiB of downloads.
#[test]
fn small_reads_never_fill_windows() {
    for_each_backend(|kind| {
        let store = store(kind, 8 * MIB, AllocationPolicy::Eager);
        let model = pattern(8, (8 * MIB) as usize);
        store.write(&model, 0).unwrap();
        for len in [4096, 64 << 10, (128 << 10) - 4096] {
            let mut at = 0;
            while at + len <= 8 * MIB {
                check_range(&store, &model, 0, at, len);
                at += len;
            }
        }
        assert_eq!(store.stats().readahead.filled, 0, "{kind}");
    });
}

/// Each change lands in a window while it sits filled ahead, unread; the
/// stream then reads through it. One backend per kind serves every store
/// (the NVIDIA driver takes opening and closing many devices in one
/// process badly; RELIABILITY.md).
#[test]
fn a_window_never_serves_bytes_older_than_a_finished_change() {
    type Change = fn(&BlockStore, &mut [u8]);
    let window = 2 * MIB;
    let changes: [(&str, Change); 5] = [
        ("a small write", |store, model| {
            let data = pattern(11, 300);
            store.write(&data, 2 * MIB + 70_000).unwrap();
            model[(2 * MIB + 70_000) as usize..][..300].copy_from_slice(&data);
        }),
        ("a write of the whole window", |store, model| {
            let data = pattern(12, (2 * MIB) as usize);
            store.write(&data, 4 * MIB).unwrap();
            model[(4 * MIB) as usize..(6 * MIB) as usize].copy_from_slice(&data);
        }),
        ("a zero of whole blocks", |store, model| {
            store.zero(4 * MIB + BLOCK_SIZE, 3 * BLOCK_SIZE).unwrap();
            model[(4 * MIB + BLOCK_SIZE) as usize..(4 * MIB + 4 * BLOCK_SIZE) as usize].fill(0);
        }),
        ("a zero inside one block", |store, model| {
            store.zero(4 * MIB + 100, 5000).unwrap();
            model[(4 * MIB + 100) as usize..(4 * MIB + 5100) as usize].fill(0);
        }),
        ("a trim of the whole chunk", |store, model| {
            store.zero(4 * MIB, CHUNK_SIZE).unwrap();
            model[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
        }),
    ];
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        for allocation in [AllocationPolicy::Eager, AllocationPolicy::Lazy] {
            for (name, change) in changes {
                let store =
                    BlockStore::open(backend.clone(), &config(16 * MIB, allocation)).unwrap();
                let mut model = pattern(3, (16 * MIB) as usize);
                store.write(&model, 0).unwrap();
                // Reading the first window fills the next four (2..10 MiB).
                stream_check(&store, &model, 0, window);
                assert_eq!(store.stats().readahead.filled, 4, "{kind}/{allocation}");
                change(&store, &mut model);
                stream_check(&store, &model, window, 16 * MIB - window);
                check_range(&store, &model, 0, 0, 16 * MIB);
                assert!(
                    store.stats().readahead.served > 0,
                    "{kind}/{allocation}/{name}: no read came from a window"
                );
            }
        }
    });
}

/// One thread rewrites 256 KiB pieces, each time with a new version
/// number in every word, and publishes the version once the write has
/// returned; two threads stream through all pieces meanwhile. A read may
/// see a write still in flight, but never a version older than the one
/// published before it began: that would be a window filled before the
/// write, served after it.
#[test]
fn streams_racing_writes_never_read_bytes_older_than_a_finished_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    const PIECES: u64 = 32;
    let bytes = |piece: u64, version: u64| -> Vec<u8> {
        (0..PIECE / 8)
            .flat_map(|_| (piece << 32 | version).to_le_bytes())
            .collect()
    };
    for_each_backend(|kind| {
        let store = store(kind, PIECES * PIECE, AllocationPolicy::Eager);
        let published: Vec<AtomicU64> = (0..PIECES).map(|_| AtomicU64::new(0)).collect();
        for piece in 0..PIECES {
            store.write(&bytes(piece, 0), piece * PIECE).unwrap();
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut rng = SmallRng::seed_from_u64(5);
                for _ in 0..400 {
                    let piece = rng.gen_range(0..PIECES);
                    let version = published[piece as usize].load(Ordering::SeqCst) + 1;
                    store.write(&bytes(piece, version), piece * PIECE).unwrap();
                    published[piece as usize].store(version, Ordering::SeqCst);
                }
                done.store(true, Ordering::SeqCst);
            });
            for _ in 0..2 {
                scope.spawn(|| {
                    let mut buf = vec![0u8; PIECE as usize];
                    loop {
                        let last_pass = done.load(Ordering::SeqCst);
                        for piece in 0..PIECES {
                            let before = published[piece as usize].load(Ordering::SeqCst);
                            store.read(&mut buf, piece * PIECE).unwrap();
                            let after = published[piece as usize].load(Ordering::SeqCst);
                            for word in buf.chunks_exact(8) {
                                let word = u64::from_le_bytes(word.try_into().unwrap());
                                let version = word & 0xffff_ffff;
                                assert_eq!(word >> 32, piece, "{kind}: another piece's bytes");
                                assert!(
                                    (before..=after + 1).contains(&version),
                                    "{kind}: piece {piece} read as version {version}; \
                                     version {before} was written before the read began"
                                );
                            }
                        }
                        if last_pass {
                            break;
                        }
                    }
                });
            }
        });
        assert!(
            store.stats().readahead.served > 0,
            "{kind}: no read came from a window"
        );
    });
}

/// Many threads, each moving small pieces of its own: more threads than
/// lanes, and far more than queues, so threads wait for lanes and their
/// batches wait behind each other's on a queue. Every thread must be woken
/// for its own batch (a lost wake-up hangs here) and find its own bytes.
/// Where chunks are mapped (`VRAMSWAP_TEST_MAPPED`, auto: host model and
/// lavapipe), reads of up to 8 KiB without `verify` are CPU loads through
/// the mapping, with no lane; they see what DMA writes and zeroes left, as
/// a DMA read does. Larger reads, and every read with `verify`, still go
/// through the lanes. Unmapped, every read does.
#[test]
fn small_reads_of_mapped_chunks_load_through_the_mapping() {
    for_each_backend(|kind| {
        for verify in [false, true] {
            let counting = Arc::new(Counting::new(open_backend(kind, None)));
            let mapped = counting.mapped();
            let config = StoreConfig {
                verify,
                ..config(12 * MIB, AllocationPolicy::Lazy)
            };
            let store = BlockStore::open(counting.clone(), &config).unwrap();
            let size = 12 * MIB as usize;
            let mut model = vec![0u8; size];
            // Whole chunks, partial blocks into fresh and written blocks,
            // and zeroed ranges, all by DMA.
            for (seed, offset, len) in [
                (1, 0, 2 * MIB as usize),
                (2, 5 * MIB as usize + 100, 3000),
                (3, 3 * MIB as usize - 70_000, 140_000),
                (4, 8 * MIB as usize + 4096, 4096),
            ] {
                let data = pattern(seed, len);
                store.write(&data, offset as u64).unwrap();
                model[offset..offset + len].copy_from_slice(&data);
            }
            for (offset, len) in [(10_000, 50_000), (MIB as usize, 65_536 + 17)] {
                store.zero(offset as u64, len as u64).unwrap();
                model[offset..offset + len].fill(0);
            }
            let dma_before = counting.downloads.load(Ordering::Relaxed);
            let small: &[(usize, usize)] = &[
                (0, 4096),
                (4096 * 3, 4096),
                (1, 1),
                (65_536 - 3, 6),
                (65_536 - 4096, 8192),
                (9_000, 8192),
                (MIB as usize + 65_536 - 10, 8192),
                (2 * MIB as usize - 2048, 4096),
                (3 * MIB as usize - 70_000, 8192),
                (4 * MIB as usize - 100, 200),
                (5 * MIB as usize, 4096),
                (8 * MIB as usize + 4096, 4096),
                (11 * MIB as usize, 4096),
            ];
            for &(offset, len) in small {
                let mut buf = vec![0xeeu8; len];
                store.read(&mut buf, offset as u64).unwrap();
                assert!(buf == model[offset..offset + len], "{kind}: {offset}+{len}");
            }
            let loads = counting.mapped_reads.load(Ordering::Relaxed);
            let dma = counting.downloads.load(Ordering::Relaxed) - dma_before;
            if mapped && !verify {
                assert!(loads > 0, "{kind}: no read went through the mapping");
                assert_eq!(dma, 0, "{kind}: a small read took a lane");
            } else {
                assert_eq!(
                    loads, 0,
                    "{kind} (verify {verify}): read through the mapping"
                );
                assert!(dma > 0, "{kind}: no read was downloaded");
            }
            // One byte past the limit: by DMA again.
            let mut buf = vec![0u8; 8193];
            store.read(&mut buf, 60_000).unwrap();
            assert!(buf == model[60_000..68_193], "{kind}: a larger read");
            assert!(counting.downloads.load(Ordering::Relaxed) > dma_before + dma);
            assert_eq!(counting.mapped_reads.load(Ordering::Relaxed), loads);
        }
    });
}

#[test]
fn many_threads_of_small_requests_each_get_their_own_bytes() {
    const THREADS: usize = 24;
    const PIECE: usize = 4096;
    const SLOTS: u64 = 16;
    for_each_backend(|kind| {
        let size = CHUNK_SIZE * 2;
        let few_lanes = StoreConfig {
            lanes: 16,
            ..config(size, AllocationPolicy::Eager)
        };
        let store = BlockStore::open(open_backend(kind, None), &few_lanes).expect("open store");
        std::thread::scope(|scope| {
            for t in 0..THREADS as u64 {
                let store = &store;
                scope.spawn(move || {
                    let mut read = vec![0u8; PIECE];
                    for round in 0..100u64 {
                        let offset = (t * SLOTS + round % SLOTS) * PIECE as u64;
                        let data = pattern(t << 32 | round, PIECE);
                        store.write(&data, offset).unwrap();
                        store.read(&mut read, offset).unwrap();
                        assert!(
                            read == data,
                            "{kind}: thread {t} round {round} read other bytes"
                        );
                    }
                });
            }
        });
    });
}

/// Small reads of many threads at once share batches where the backend
/// gathers them (Vulkan), reads too long for the chunks' mapping among
/// them: each gets its own bytes, and a batch that fails fails exactly the
/// reads in it, each with EIO, while the others and every later read get
/// their bytes.
#[cfg(feature = "fault-injection")]
#[test]
fn small_reads_gathered_into_shared_batches_each_get_their_own_bytes() {
    use vramswap::backend::faulty::{FaultPlan, FaultyBackend};
    const THREADS: u64 = 24;
    const ROUNDS: u64 = 50;
    // Longer than the mapping serves (8 KiB), within what is gathered.
    const LEN: u64 = 12 << 10;
    for_each_backend(|kind| {
        let size = 4 * CHUNK_SIZE;
        let model = pattern(7, size as usize);
        let open = |plan| {
            let backend = Arc::new(FaultyBackend::new(open_backend(kind, None), plan));
            let store =
                BlockStore::open(backend.clone(), &config(size, AllocationPolicy::Eager)).unwrap();
            store.write(&model, 0).unwrap();
            (backend, store)
        };
        // The batches the setup takes, to fail one of the reads' batches.
        let (probe, _) = open(FaultPlan::default());
        let fail_at = probe.batches() + 2 * THREADS;
        let (backend, store) = open(FaultPlan {
            batch_fails_at: Some(fail_at),
            ..Default::default()
        });
        let gathers = backend.gathers_reads();
        let failed = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (store, model, failed) = (&store, &model, &failed);
                scope.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t);
                    let mut buf = vec![0u8; LEN as usize];
                    for _ in 0..ROUNDS {
                        // Any offset that keeps the read inside one chunk,
                        // or crosses into the next now and then.
                        let offset = rng.gen_range(0..size - LEN);
                        match store.read(&mut buf, offset) {
                            Ok(()) => assert!(
                                buf[..] == model[offset as usize..(offset + LEN) as usize],
                                "{kind}: thread {t} read other bytes at {offset}"
                            ),
                            Err(err) => {
                                assert_eq!(err.errno(), libc::EIO, "{kind}: {err}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let failed = failed.into_inner();
        let gather = store.stats().gather;
        assert!(
            backend.batches() >= fail_at,
            "{kind}: the failing batch never came"
        );
        assert!(failed >= 1, "{kind}: the failed batch failed no read");
        if gathers {
            // Every read that stayed in one chunk was gathered (the rest,
            // crossing a chunk's end, took the lanes), and some shared.
            assert!(
                gather.reads >= THREADS * ROUNDS * 9 / 10,
                "{kind}: {gather:?}"
            );
            assert!(
                gather.batches < gather.reads,
                "{kind}: no batch shared: {gather:?}"
            );
        } else {
            assert_eq!(failed, 1, "{kind}: one read per batch");
            assert_eq!(gather, Default::default(), "{kind}");
        }
        // Nothing stuck, nothing lost: the store still serves every byte.
        let mut all = vec![0u8; size as usize];
        store.read(&mut all, 0).unwrap();
        assert!(all == model, "{kind}: the store changed");
    });
}

#[test]
fn concurrent_partial_writes_into_one_fresh_block_all_land() {
    // Every thread writes its own 4 KiB into the same never-written block at
    // the same moment. Each write must zero the rest of the block first,
    // exactly once: a second zeroing would erase a neighbour's bytes.
    for (kind, verify) in common::backend_kinds()
        .into_iter()
        .flat_map(|k| [(k, false), (k, true)])
    {
        eprintln!("--- backend {kind}, verify {verify}");
        const THREADS: u64 = 8;
        const PIECE: u64 = 4096;
        let blocks = 48;
        let store = store_verify(kind, 4 * MIB, AllocationPolicy::Eager, verify);
        for round in 0..3u8 {
            let barrier = std::sync::Barrier::new(THREADS as usize);
            std::thread::scope(|scope| {
                for t in 0..THREADS {
                    let (store, barrier) = (&store, &barrier);
                    scope.spawn(move || {
                        for block in 0..blocks {
                            barrier.wait();
                            let at = block * BLOCK_SIZE + t * 2 * PIECE + 512;
                            store
                                .write(&[round * 16 + t as u8 + 1; PIECE as usize], at)
                                .unwrap();
                        }
                    });
                }
            });
            for block in 0..blocks {
                let mut back = vec![0u8; BLOCK_SIZE as usize];
                store.read(&mut back, block * BLOCK_SIZE).unwrap();
                for t in 0..THREADS {
                    let at = (t * 2 * PIECE + 512) as usize;
                    assert!(
                        back[at..at + PIECE as usize]
                            .iter()
                            .all(|b| *b == round * 16 + t as u8 + 1),
                        "{kind}: round {round} block {block}: thread {t}'s write was lost"
                    );
                }
            }
            // Trim everything: the blocks are fresh again for the next round.
            store.zero(0, 4 * MIB).unwrap();
        }
        assert_eq!(store.stats().checksum_errors, 0, "{kind}: false alarms");
    }
}

/// Needs `--features fault-injection`: a bit of VRAM flips after the store
/// wrote it (a real extra copy behind the store's back). With checksums on,
/// every read of that block fails with EIO, is counted, and other blocks
/// read fine; a rewrite heals it. Without, the flipped bit is read back.
#[cfg(feature = "fault-injection")]
#[test]
fn verify_fails_reads_of_a_block_whose_vram_changed() {
    use vramswap::backend::faulty::{FaultPlan, FaultyBackend};
    for_each_backend(|kind| {
        // Each case: writes, in order; the last write's upload is the one
        // corrupted; the block it lands in.
        let whole = BLOCK_SIZE;
        let cases = [
            ("a whole block", vec![(0, whole), (5 * whole, whole)], 5),
            (
                "a partial write over data",
                vec![(7 * whole, whole), (7 * whole + 8192, 4096)],
                7,
            ),
            (
                "a partial write into a fresh block",
                vec![(9 * whole + 100, 3000)],
                9,
            ),
        ];
        for (what, writes, bad_block) in cases {
            for verify in [true, false] {
                let plan = FaultPlan {
                    corrupt_upload_at: Some(writes.len() as u64),
                    ..Default::default()
                };
                let backend = Arc::new(FaultyBackend::new(open_backend(kind, None), plan));
                let store = BlockStore::open(
                    backend,
                    &StoreConfig {
                        verify,
                        ..config(8 * MIB, AllocationPolicy::Eager)
                    },
                )
                .unwrap();
                let mut model = vec![0u8; (8 * MIB) as usize];
                for (i, &(offset, len)) in writes.iter().enumerate() {
                    let data = pattern(i as u64 + 7, len as usize);
                    store.write(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                let last = writes.last().unwrap().0;
                let block_start = bad_block * BLOCK_SIZE;
                let mut buf = vec![0u8; BLOCK_SIZE as usize];
                if !verify {
                    // The fault is real: the bit comes back flipped.
                    store.read(&mut buf, block_start).unwrap();
                    let at = (last - block_start) as usize;
                    assert_eq!(buf[at], model[last as usize] ^ 1, "{kind}: {what}");
                    continue;
                }
                for (offset, len) in [
                    (block_start, BLOCK_SIZE),
                    (last, 1),
                    (block_start - 3 * BLOCK_SIZE, 5 * BLOCK_SIZE),
                ] {
                    // The long one by DMA into the request buffer, checked
                    // there.
                    let err =
                        nbd_buffer(len as usize, |buf| store.read_direct(buf, offset)).unwrap_err();
                    assert_eq!(
                        err,
                        StoreError::Checksum {
                            offset: block_start
                        },
                        "{kind}: {what}"
                    );
                    assert_eq!(err.errno(), libc::EIO);
                }
                assert_eq!(store.stats().checksum_errors, 3, "{kind}: {what}");
                assert_eq!(store.stats().direct.reads, 1, "{kind}: {what}");
                // Other blocks, written or not, read fine.
                let mut all_but = vec![0u8; block_start as usize];
                store.read(&mut all_but, 0).unwrap();
                assert!(all_but == model[..block_start as usize], "{kind}: {what}");
                // Rewriting the whole block gives it a new checksum.
                let fresh = pattern(99, BLOCK_SIZE as usize);
                store.write(&fresh, block_start).unwrap();
                store.read(&mut buf, block_start).unwrap();
                assert!(buf == fresh, "{kind}: {what}");
            }
        }
    });
}

#[test]
fn every_chunk_is_zeroed_on_the_gpu_when_allocated_over_old_data() {
    // Looks at the VRAM itself through a raw lane, not through the store
    // (whose zero bits would hide stale bytes): a new device must never
    // hold another device's old data.
    for_each_backend(|kind| {
        let gpu = open_backend(kind, None);
        let old = pattern(9, CHUNK_SIZE as usize);
        let first =
            BlockStore::open(gpu.clone(), &config(16 * MIB, AllocationPolicy::Eager)).unwrap();
        for chunk in 0..4 {
            first.write(&old, chunk * CHUNK_SIZE).unwrap();
        }
        drop(first);

        let counting = Arc::new(Counting::new(gpu.clone()));
        let second =
            BlockStore::open(counting.clone(), &config(16 * MIB, AllocationPolicy::Eager)).unwrap();
        let mut lane = gpu.create_lane(CHUNK_SIZE as usize).unwrap();
        let chunks = counting.chunks.lock().unwrap().clone();
        assert_eq!(chunks.len(), 4);
        for chunk in chunks {
            lane.submit(&[vramswap::backend::TransferOp::Download {
                staging_offset: 0,
                chunk,
                chunk_offset: 0,
                len: CHUNK_SIZE,
            }])
            .unwrap();
            lane.wait().unwrap();
            assert!(
                lane.staging().iter().all(|b| *b == 0),
                "{kind}: chunk {chunk:?} not zeroed"
            );
        }
        drop(second);
    });
}

/// Reads every chunk back through a raw lane as it is freed, and counts
/// those that still held data: what the next user of that VRAM would see.
struct FreesInspected {
    inner: Arc<dyn vramswap::backend::Backend>,
    freed: std::sync::atomic::AtomicU64,
    freed_with_data: std::sync::atomic::AtomicU64,
}

impl vramswap::backend::Backend for FreesInspected {
    fn device(&self) -> &vramswap::backend::DeviceInfo {
        self.inner.device()
    }
    fn memory(&self) -> vramswap::backend::MemoryReport {
        self.inner.memory()
    }
    fn allocate_chunk(
        &self,
    ) -> Result<vramswap::backend::ChunkId, vramswap::backend::BackendError> {
        self.inner.allocate_chunk()
    }
    fn free_chunk(&self, chunk: vramswap::backend::ChunkId) {
        let mut lane = self.inner.create_lane(CHUNK_SIZE as usize).unwrap();
        lane.submit(&[vramswap::backend::TransferOp::Download {
            staging_offset: 0,
            chunk,
            chunk_offset: 0,
            len: CHUNK_SIZE,
        }])
        .unwrap();
        lane.wait().unwrap();
        self.freed.fetch_add(1, Ordering::Relaxed);
        if lane.staging().iter().any(|b| *b != 0) {
            self.freed_with_data.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.free_chunk(chunk)
    }
    fn create_lane(
        &self,
        staging_bytes: usize,
    ) -> Result<Box<dyn vramswap::backend::Lane>, vramswap::backend::BackendError> {
        self.inner.create_lane(staging_bytes)
    }
}

#[test]
fn vram_is_scrubbed_before_it_goes_back_to_the_driver() {
    // Neither Vulkan nor CUDA promises to clear memory between processes:
    // a trimmed chunk and the whole device at close are zeroed first.
    for_each_backend(|kind| {
        for allocation in [AllocationPolicy::Lazy, AllocationPolicy::Eager] {
            let gpu = Arc::new(FreesInspected {
                inner: open_backend(kind, None),
                freed: Default::default(),
                freed_with_data: Default::default(),
            });
            let store = BlockStore::open(gpu.clone(), &config(16 * MIB, allocation)).unwrap();
            let data = pattern(5, 2 * CHUNK_SIZE as usize);
            store.write(&data, 0).unwrap();
            // A whole trimmed chunk goes back at once with lazy allocation.
            store.zero(0, CHUNK_SIZE).unwrap();
            let after_trim = gpu.freed.load(Ordering::Relaxed);
            drop(store);
            let expected_at_trim = u64::from(allocation == AllocationPolicy::Lazy);
            assert_eq!(after_trim, expected_at_trim, "{kind} {allocation:?}");
            let all = if allocation == AllocationPolicy::Lazy {
                2
            } else {
                4
            };
            assert_eq!(
                gpu.freed.load(Ordering::Relaxed),
                all,
                "{kind} {allocation:?}"
            );
            assert_eq!(
                gpu.freed_with_data.load(Ordering::Relaxed),
                0,
                "{kind} {allocation:?}: VRAM freed with data in it"
            );
        }
    });
}

/// A thread's request buffer is registered by its first read of at least
/// `DIRECT_READ` bytes, reused by every later read it holds (shorter ones
/// too), registered again when it grows or moves, given back when a request
/// comes with another buffer, when its thread exits and when the store
/// closes; reads below the threshold never register one.
#[test]
fn direct_reads_register_a_buffer_once_reuse_it_and_give_it_back() {
    use vramswap::store::DIRECT_READ;
    for_each_backend(|kind| {
        for verify in [false, true] {
            let size = 16 * MIB;
            let counting = Arc::new(Counting::new(open_backend(kind, None)));
            let config = StoreConfig {
                verify,
                ..config(size, AllocationPolicy::Lazy)
            };
            let store = Arc::new(BlockStore::open(counting.clone(), &config).unwrap());
            let mut model = vec![0u8; size as usize];
            // Data with holes: every third block is never written.
            for block in (0..size / BLOCK_SIZE).filter(|b| b % 3 != 0) {
                let data = pattern(block, BLOCK_SIZE as usize);
                store.write(&data, block * BLOCK_SIZE).unwrap();
                model[(block * BLOCK_SIZE) as usize..][..BLOCK_SIZE as usize]
                    .copy_from_slice(&data);
            }
            let direct = |store: &BlockStore| store.stats().direct;
            let check = |store: &BlockStore, offset: u64, len: u64| {
                let got = read_direct(store, offset, len);
                assert!(
                    got == model[offset as usize..(offset + len) as usize],
                    "{kind} verify={verify}: direct read at {offset}+{len}"
                );
            };
            let small = (DIRECT_READ / 2) as u64;
            let thread = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        // Small reads alone register nothing.
                        check(&store, 5, small);
                        assert_eq!(direct(&store).registered, 0, "{kind}");
                        // The first long read registers; later ones, long or
                        // short, odd or aligned, reuse it.
                        let long = 3 * MIB + 12_345;
                        check(&store, 1000, long);
                        for (offset, len) in [
                            (0, long),
                            (4 * MIB - 7, long),
                            (77, 1),
                            (BLOCK_SIZE + 3, small),
                            (size - long, long),
                        ] {
                            check(&store, offset, len);
                        }
                        let stats = direct(&store);
                        assert_eq!((stats.registered, stats.unregistered), (1, 0), "{kind}");
                        // Without verify the 1-byte read goes through the
                        // chunks' CPU mapping where there is one, or into a
                        // batch with other small reads where the backend
                        // gathers them: no direct read.
                        let elsewhere = !verify && (counting.mapped() || counting.gathers_reads());
                        assert_eq!(stats.reads, 6 - u64::from(elsewhere), "{kind}");
                        // Grown (moved): the old one goes, the new one comes.
                        check(&store, 3, long + 1);
                        let stats = direct(&store);
                        assert_eq!((stats.registered, stats.unregistered), (2, 1), "{kind}");
                        // A write from a buffer elsewhere: the thread's buffer
                        // moved, so its registration goes at once.
                        store.write(&model[..100], 0).unwrap();
                        assert_eq!(direct(&store).live(), 0, "{kind}");
                        check(&store, 0, long);
                        assert_eq!(direct(&store).live(), 1, "{kind}");
                        // A write from the thread's own buffer keeps it.
                        let at = 8 * MIB as usize;
                        nbd_buffer(4096, |buf| {
                            buf.copy_from_slice(&model[at..at + 4096]);
                            store.write(buf, at as u64).unwrap()
                        });
                        assert_eq!(direct(&store).live(), 1, "{kind}");
                    })
                    .join()
            });
            thread.unwrap();
            // The thread exited: its registration went with it.
            let stats = direct(&store);
            assert_eq!(stats.live(), 0, "{kind}: registration outlived its thread");
            // Close gives back what live threads still hold.
            let before = Arc::strong_count(&store);
            assert_eq!(before, 1);
            check(&store, 0, 2 * MIB);
            assert_eq!(direct(&store).live(), 1, "{kind}");
            assert_eq!(counting.hosts_live(), 1, "{kind}");
            drop(Arc::into_inner(store).unwrap());
            assert_eq!(
                counting.hosts_live(),
                0,
                "{kind}: a registration outlived its store"
            );
        }
    });
}
