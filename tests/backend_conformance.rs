//! The `Backend` and `Lane` contract itself, checked for every backend
//! named in `VRAMSWAP_TEST_BACKENDS`: the parts the block store relies on
//! but never provokes, such as refusing a bad step before it reaches the
//! driver, `Busy`, and the memory limit.

mod common;

use vramswap::backend::{
    BackendError, BackendKind, ChunkId, Fill, Lane, TransferOp, CHUNK_SIZE, MAX_BATCH,
};

use common::{for_each_backend, open_backend};

const STAGING: usize = 64 << 10;

/// Submits a batch and waits for it: a backend may refuse a bad batch at
/// either step.
fn run(lane: &mut dyn Lane, ops: &[TransferOp]) -> Result<(), BackendError> {
    lane.submit(ops).and_then(|()| lane.wait())
}

/// `len` bytes from `staging_offset` of the staging to `chunk_offset` of
/// `chunk`.
fn upload(chunk: ChunkId, staging_offset: usize, chunk_offset: u64, len: u64) -> TransferOp {
    TransferOp::Upload {
        staging_offset,
        chunk,
        chunk_offset,
        len,
    }
}

/// `len` bytes from `chunk_offset` of `chunk` to `staging_offset` of the
/// staging.
fn download(chunk: ChunkId, staging_offset: usize, chunk_offset: u64, len: u64) -> TransferOp {
    TransferOp::Download {
        staging_offset,
        chunk,
        chunk_offset,
        len,
    }
}

#[test]
fn bad_steps_are_refused_and_the_lane_stays_usable() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        let chunk = backend.allocate_chunk().unwrap();
        let mut lane = backend.create_lane(STAGING).unwrap();
        assert_eq!(lane.staging().len(), STAGING, "{kind}");
        let copy =
            |staging_offset, chunk_offset, len| upload(chunk, staging_offset, chunk_offset, len);
        let fetch =
            |staging_offset, chunk_offset, len| download(chunk, staging_offset, chunk_offset, len);
        let zero = |chunk_offset: u64, len: u64| TransferOp::Zero {
            chunk,
            chunk_offset,
            len,
        };
        for op in [
            copy(STAGING - 4, 0, 8),
            fetch(STAGING - 4, 0, 8),
            copy(0, CHUNK_SIZE - 4, 8),
            fetch(0, CHUNK_SIZE - 4, 8),
            copy(usize::MAX - 2, 0, 8),
            fetch(0, u64::MAX - 2, 8),
            copy(0, 0, 0),
            zero(2, 8),
            zero(0, 6),
            zero(0, 0),
            zero(CHUNK_SIZE - 4, 8),
            zero(u64::MAX - 3, 8),
        ] {
            let result = run(&mut *lane, &[op]);
            assert!(
                matches!(result, Err(BackendError::OutOfBounds(_))),
                "{kind}: {op:?}: {result:?}"
            );
        }
        // One step more than a batch may hold is refused; as many pass.
        let too_long = [zero(0, 4); MAX_BATCH + 1];
        let result = run(&mut *lane, &too_long);
        assert!(
            matches!(result, Err(BackendError::OutOfBounds(_))),
            "{kind}: {result:?}"
        );
        run(&mut *lane, &too_long[..MAX_BATCH]).unwrap();
        let missing = ChunkId(1 << 30);
        let result = run(
            &mut *lane,
            &[TransferOp::Zero {
                chunk: missing,
                chunk_offset: 0,
                len: 4,
            }],
        );
        assert_eq!(result, Err(BackendError::BadChunk(missing)), "{kind}");

        // A second batch while one is pending is refused; waiting twice is
        // harmless.
        lane.submit(&[zero(0, CHUNK_SIZE)]).unwrap();
        assert_eq!(
            lane.submit(&[zero(0, 4)]),
            Err(BackendError::Busy),
            "{kind}"
        );
        lane.wait().unwrap();
        lane.wait().unwrap();

        // After all that, the lane still moves bytes: a fill, then copies
        // at odd offsets and lengths over it.
        let pattern: Vec<u8> = (0..STAGING).map(|i| (i * 7 + 1) as u8).collect();
        lane.staging().copy_from_slice(&pattern);
        run(
            &mut *lane,
            &[
                zero(0, CHUNK_SIZE),
                copy(3, 1001, 5000),
                copy(9000, CHUNK_SIZE - 333, 333),
            ],
        )
        .unwrap();
        lane.staging().fill(0xee);
        run(
            &mut *lane,
            &[fetch(0, 0, 8192), fetch(10_000, CHUNK_SIZE - 1000, 1000)],
        )
        .unwrap();
        let staging = lane.staging();
        let mut want = vec![0u8; 8192];
        want[1001..6001].copy_from_slice(&pattern[3..5003]);
        assert!(staging[..8192] == want[..], "{kind}: head of the chunk");
        assert!(staging[8192..10_000].iter().all(|b| *b == 0xee), "{kind}");
        let mut want = vec![0u8; 1000];
        want[667..].copy_from_slice(&pattern[9000..9333]);
        assert!(
            staging[10_000..11_000] == want[..],
            "{kind}: tail of the chunk"
        );

        // A freed chunk is refused, not written.
        backend.free_chunk(chunk);
        let result = run(&mut *lane, &[zero(0, 4)]);
        assert_eq!(result, Err(BackendError::BadChunk(chunk)), "{kind}");
    });
}

#[test]
fn the_memory_limit_caps_allocation_and_what_is_reported_available() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, Some(2 * CHUNK_SIZE));
        assert_eq!(backend.device().backend, kind);
        let before = backend.memory();
        assert!(before.total > 0, "{kind}: {before:?}");
        assert_eq!(before.available, 2 * CHUNK_SIZE, "{kind}: {before:?}");
        let a = backend.allocate_chunk().unwrap();
        let b = backend.allocate_chunk().unwrap();
        assert_ne!(a, b);
        assert_eq!(
            backend.allocate_chunk(),
            Err(BackendError::OutOfDeviceMemory),
            "{kind}"
        );
        assert_eq!(backend.memory().available, 0, "{kind}");
        backend.free_chunk(a);
        assert_eq!(backend.memory().available, CHUNK_SIZE, "{kind}");
        let c = backend.allocate_chunk().unwrap();
        // Chunks outlive lanes and go back with the backend.
        let mut lane = backend.create_lane(STAGING).unwrap();
        lane.staging()[..4].copy_from_slice(&[1, 2, 3, 4]);
        run(&mut *lane, &[upload(c, 0, CHUNK_SIZE - 4, 4)]).unwrap();
        drop(lane);
        backend.free_chunk(b);
        backend.free_chunk(b); // a second free is ignored
        assert_eq!(backend.memory().available, CHUNK_SIZE, "{kind}");
    });
}

#[test]
fn mapped_writes_are_what_a_lane_downloads() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        if !backend.mapped() {
            eprintln!("{kind}: chunks not mapped here; nothing to check");
            return;
        }
        // More chunks than one block of a backend that carves chunks out
        // of larger allocations (CUDA through Vulkan: 16 a block), so the
        // writes land in several blocks and a freed block is made again.
        let chunks: Vec<ChunkId> = (0..20).map(|_| backend.allocate_chunk().unwrap()).collect();
        let mut lane = backend.create_lane(STAGING).unwrap();
        let pattern = |chunk: usize, i: usize| (chunk * 31 + i * 7 + 1) as u8;
        let check = |lane: &mut dyn Lane, chunk: ChunkId, n: usize| {
            for (offset, len) in [
                (0, 4096),
                (CHUNK_SIZE / 2 - 10, 20),
                (CHUNK_SIZE - 4096, 4096),
            ] {
                run(lane, &[download(chunk, 0, offset, len)]).unwrap();
                let got = &lane.staging()[..len as usize];
                for (i, byte) in got.iter().enumerate() {
                    let at = offset as usize + i;
                    // Bytes 100..200 were zeroed after the pattern went in.
                    let want = if (100..200).contains(&at) {
                        0
                    } else {
                        pattern(n, at)
                    };
                    assert_eq!(*byte, want, "{kind}: chunk {n} byte {at}");
                }
            }
        };
        let bytes: Vec<Vec<u8>> = (0..chunks.len())
            .map(|n| (0..CHUNK_SIZE as usize).map(|i| pattern(n, i)).collect())
            .collect();
        for (n, chunk) in chunks.iter().enumerate() {
            backend
                .write_mapped(*chunk, 0, Fill::Bytes(&bytes[n]))
                .unwrap();
            backend.write_mapped(*chunk, 100, Fill::Zeros(100)).unwrap();
        }
        for (n, chunk) in chunks.iter().enumerate() {
            check(&mut *lane, *chunk, n);
        }
        // Out of range and freed chunks are refused, not written.
        assert!(matches!(
            backend.write_mapped(chunks[0], CHUNK_SIZE - 2, Fill::Zeros(4)),
            Err(BackendError::OutOfBounds(_))
        ));
        for chunk in &chunks[1..] {
            backend.free_chunk(*chunk);
        }
        assert_eq!(
            backend.write_mapped(chunks[1], 0, Fill::Zeros(4)),
            Err(BackendError::BadChunk(chunks[1])),
            "{kind}"
        );
        // The one chunk left kept its bytes; new chunks are mapped too.
        check(&mut *lane, chunks[0], 0);
        let again: Vec<ChunkId> = (0..17).map(|_| backend.allocate_chunk().unwrap()).collect();
        for (n, chunk) in again.iter().enumerate() {
            backend
                .write_mapped(*chunk, 0, Fill::Bytes(&bytes[n]))
                .unwrap();
            backend.write_mapped(*chunk, 100, Fill::Zeros(100)).unwrap();
            check(&mut *lane, *chunk, n);
        }
    });
}

/// `DownloadTo`: a chunk's bytes land straight in registered host memory,
/// at the target's offsets; a step past the target, a target outside the
/// registration, another backend's registration, or a `DownloadTo` in a
/// plain batch is refused before any byte moves.
#[test]
fn downloads_into_registered_host_memory_land_in_place_and_bad_ones_are_refused() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        let chunk = backend.allocate_chunk().unwrap();
        let mut lane = backend.create_lane(STAGING).unwrap();
        let bytes: Vec<u8> = (0..STAGING).map(|i| (i * 7 + 1) as u8).collect();
        lane.staging().copy_from_slice(&bytes);
        run(&mut *lane, &[upload(chunk, 0, 4096, STAGING as u64)]).unwrap();
        // An odd start and length, as a malloc'd buffer has.
        let mut host = vec![0xeeu8; 300_001];
        let buf = &mut host[17..17 + 200_000];
        let region = backend.register_host(buf).unwrap();
        assert!(region.covers(buf), "{kind}");
        let target = &mut buf[1000..1000 + 70_000];
        let step = |host_offset: usize, chunk_offset: u64, len: u64| TransferOp::DownloadTo {
            host_offset,
            chunk,
            chunk_offset,
            len,
        };
        lane.submit_into(
            &[step(3, 4096, 1000), step(2000, 4096 + 500, 64)],
            target,
            &region,
        )
        .unwrap();
        lane.wait().unwrap();
        assert_eq!(&target[3..1003], &bytes[..1000], "{kind}");
        assert_eq!(&target[2000..2064], &bytes[500..564], "{kind}");
        assert!(target[..3].iter().all(|b| *b == 0xee), "{kind}");
        assert!(target[1003..2000].iter().all(|b| *b == 0xee), "{kind}");
        let before = host.clone();
        let buf = &mut host[17..17 + 200_000];
        // Past the target (though inside the registration).
        let target = &mut buf[..1000];
        assert!(matches!(
            lane.submit_into(&[step(999, 0, 2)], target, &region)
                .and_then(|()| lane.wait()),
            Err(BackendError::OutOfBounds(_))
        ));
        // A target reaching past the registration.
        let mut other = vec![0u8; 4096];
        assert!(lane
            .submit_into(&[step(0, 0, 4)], &mut other, &region)
            .and_then(|()| lane.wait())
            .is_err());
        assert!(lane
            .submit_into(&[step(0, 0, 4)], &mut buf[199_999..], &region)
            .and_then(|()| lane.wait())
            .is_err());
        // In a plain batch there is no target.
        assert!(run(&mut *lane, &[step(0, 0, 4)]).is_err(), "{kind}");
        // Another backend's registration (of other memory: CUDA backends
        // share the device's primary context, where memory registers once).
        let stranger = open_backend(kind, None);
        let mut elsewhere = vec![0u8; 8192];
        let foreign = stranger.register_host(&elsewhere).unwrap();
        assert!(lane
            .submit_into(&[step(0, 0, 4)], &mut elsewhere[..4], &foreign)
            .and_then(|()| lane.wait())
            .is_err());
        stranger.unregister_host(foreign);
        assert!(
            elsewhere.iter().all(|b| *b == 0),
            "{kind}: a refused step moved bytes"
        );
        assert!(host == before, "{kind}: a refused step moved bytes");
        // The lane still works, and the memory can be registered again.
        backend.unregister_host(region);
        let buf = &mut host[17..17 + 100_000];
        let region = backend.register_host(buf).unwrap();
        lane.submit_into(&[step(0, 4096, 8)], buf, &region).unwrap();
        lane.wait().unwrap();
        assert_eq!(&buf[..8], &bytes[..8], "{kind}");
        backend.unregister_host(region);
    });
}

/// A batch's steps take effect as if run one after another, in the order
/// given, however a backend queues them (the CUDA lane puts runs of
/// copies into one `cuMemcpyBatchAsync`, whose copies the driver may run
/// in any order; Vulkan puts barriers between dependent copies): a later
/// upload over an earlier one wins, a download sees the uploads and zeros
/// before it, and scattered pieces, the shape of compressed pages in
/// their slots, land where each one should.
#[test]
fn a_batchs_steps_take_effect_in_order() {
    for_each_backend(|kind| {
        let backend = open_backend(kind, None);
        let chunk = backend.allocate_chunk().unwrap();
        let mut lane = backend.create_lane(STAGING).unwrap();
        let up =
            |staging_offset, chunk_offset, len| upload(chunk, staging_offset, chunk_offset, len);
        let down =
            |staging_offset, chunk_offset, len| download(chunk, staging_offset, chunk_offset, len);
        let pattern: Vec<u8> = (0..16384).map(|i| (i * 13 + i / 251) as u8).collect();
        let staging = lane.staging();
        staging.fill(0);
        staging[..4096].fill(0xaa);
        staging[4096..8192].fill(0xbb);
        staging[8192..8192 + 16384].copy_from_slice(&pattern);
        let (out, late) = (32768, 49152);
        run(
            &mut *lane,
            &[
                TransferOp::Zero {
                    chunk,
                    chunk_offset: 0,
                    len: 16384,
                },
                up(0, 0, 4096),
                up(4096, 2048, 4096),
                TransferOp::Zero {
                    chunk,
                    chunk_offset: 5120,
                    len: 512,
                },
                down(out, 0, 8192),
                up(8192, 8192, 4096),
                up(8192 + 4096, 12288, 4096),
                down(late, 8192, 8192),
            ],
        )
        .unwrap();
        let staged = lane.staged();
        let first = &staged[out..out + 8192];
        assert!(first[..2048].iter().all(|b| *b == 0xaa), "{kind}");
        assert!(first[2048..5120].iter().all(|b| *b == 0xbb), "{kind}");
        assert!(first[5120..5632].iter().all(|b| *b == 0), "{kind}");
        assert!(first[5632..6144].iter().all(|b| *b == 0xbb), "{kind}");
        assert!(first[6144..].iter().all(|b| *b == 0), "{kind}");
        assert_eq!(&staged[late..late + 8192], &pattern[..8192], "{kind}");

        // The pattern scattered into the chunk in pieces of 100 to 1,300
        // bytes, 37 KiB and some 64-byte slots apart, then gathered back
        // side by side.
        lane.staging()[..16384].copy_from_slice(&pattern);
        let mut pieces = Vec::new();
        let (mut at, mut n) = (0usize, 0u64);
        while pieces.len() < MAX_BATCH / 2 {
            let len = 100 + (n * 389 % 1201) as usize;
            if at + len > 16384 {
                break;
            }
            pieces.push((at, 65536 + n * 37 * 1024 + n % 7 * 64, len));
            at += len;
            n += 1;
        }
        let batched = fake_batched_copies();
        let ups: Vec<TransferOp> = pieces
            .iter()
            .map(|&(at, slot, len)| up(at, slot, len as u64))
            .collect();
        run(&mut *lane, &ups).unwrap();
        lane.staging()[..16384].fill(0);
        let downs: Vec<TransferOp> = pieces
            .iter()
            .map(|&(at, slot, len)| down(out + at, slot, len as u64))
            .collect();
        run(&mut *lane, &downs).unwrap();
        assert_eq!(&lane.staged()[out..out + at], &pattern[..at], "{kind}");
        if let (BackendKind::Cuda, Some(before)) = (kind, batched) {
            let after = fake_batched_copies().unwrap_or(0);
            assert!(
                after >= before + 2 * pieces.len(),
                "the fake driver queued {} copies in batches, want {} or more",
                after - before,
                2 * pieces.len()
            );
        }
        drop(lane);
        backend.free_chunk(chunk);
    });
}

/// With the fake driver `scripts/test-all` builds (tests/fake_cuda): how
/// many copies it has queued through `cuMemcpyBatchAsync`, from every
/// thread. None with any other driver, or none loaded.
fn fake_batched_copies() -> Option<usize> {
    [c"libcuda.so", c"libcuda.so.1"].iter().find_map(|name| {
        // SAFETY: RTLD_NOLOAD only finds a library already loaded (cudarc
        // loaded the driver); nothing is initialised again.
        let lib = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if lib.is_null() {
            return None;
        }
        // SAFETY: looks a symbol up in a library handle that is open.
        let symbol = unsafe { libc::dlsym(lib, c"fake_cuda_batched_copies".as_ptr()) };
        // SAFETY: the fake defines it as `size_t fake_cuda_batched_copies(void)`.
        let count = (!symbol.is_null()).then(|| unsafe {
            std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> usize>(symbol)()
        });
        // SAFETY: drops the reference RTLD_NOLOAD took; cudarc keeps its own.
        unsafe { libc::dlclose(lib) };
        count
    })
}
