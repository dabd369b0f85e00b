//! Host memory for staging buffers: locked regions, and the copy into them.
//!
//! Backends import this memory into the GPU API (Vulkan's
//! `VK_EXT_external_memory_host`, CUDA's `cuMemHostRegister`) rather than
//! letting the driver allocate it: `memcpy` into the NVIDIA driver's own
//! HOST_CACHED Vulkan memory ran at half the rate of memcpy into this
//! (docs/BENCHMARKS.md, "What bounds it, and what was tried"), and that copy
//! is most of what a large request costs. The region is locked so the swap
//! server never has to page its own staging buffers in.

use std::ptr::NonNull;

use tracing::debug;

/// An anonymous, page-aligned, populated and (where permitted) locked
/// mapping. Unmapped on drop.
#[cfg_attr(not(any(feature = "vulkan", feature = "cuda")), allow(dead_code))]
pub(crate) struct LockedRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; access goes
// through `&self`/`&mut self`, so the usual borrow rules make it race-free.
unsafe impl Send for LockedRegion {}
// SAFETY: as above; shared references only hand out shared slices.
unsafe impl Sync for LockedRegion {}

#[cfg_attr(not(any(feature = "vulkan", feature = "cuda")), allow(dead_code))]
impl LockedRegion {
    /// Maps at least `len` bytes, rounded up to `align` (a power of two
    /// that is a multiple of the page size) and aligned to it.
    pub(crate) fn new(len: usize, align: usize) -> std::io::Result<Self> {
        let page = page_size();
        let align = align.max(page);
        if !align.is_power_of_two() || len == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let len = len.div_ceil(align) * align;
        // Over-map by `align` so an aligned start can be carved out.
        let mapped_len = len + align;
        // SAFETY: a fresh anonymous private mapping; no existing memory is
        // touched. The result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base as usize;
        let start = base.div_ceil(align) * align;
        let end = start + len;
        // SAFETY: both trims lie inside the mapping made above and outside
        // the `start..end` range that is kept.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            if base + mapped_len > end {
                libc::munmap(end as *mut libc::c_void, base + mapped_len - end);
            }
        }
        // SAFETY: `start..end` is mapped read-write by this process.
        if unsafe { libc::mlock(start as *const libc::c_void, len) } != 0 {
            debug!(
                "mlock of {len} staging bytes failed ({}); the driver pins them instead",
                std::io::Error::last_os_error()
            );
        }
        let ptr = NonNull::new(start as *mut u8).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(LockedRegion { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is mapped and owned by `self`; a shared
        // borrow of `self` rules out a live `as_mut_slice` borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is mapped and owned by `self`; `&mut self`
        // makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for LockedRegion {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and nothing refers to it
        // any more (GPU imports are released before their region).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// Copies `src` into staging memory (`dst`, same length) that the CPU will
/// not read again: the DMA engine reads it. Non-temporal stores skip
/// fetching each destination line first, which made the copy a quarter
/// faster (docs/BENCHMARKS.md, "What bounds it, and what was tried"), and
/// the copy is most of what a large write costs. Ends with a store fence,
/// so the bytes are visible before the batch that reads them is submitted.
pub fn copy_to_staging(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_to_staging needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Plain copy up to the first 16-byte aligned destination byte.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let body = (dst.len() - head) / 64 * 64;
        let (d, s) = (dst[head..].as_mut_ptr(), src[head..].as_ptr());
        let mut i = 0;
        while i < body {
            // SAFETY: SSE2 is part of the x86_64 baseline. `i + 64 <= body`
            // keeps every access inside both slices; `d + i` is 16-byte
            // aligned (head alignment, steps of 64) as streaming stores need;
            // loads are unaligned.
            unsafe {
                let a = _mm_loadu_si128(s.add(i) as *const __m128i);
                let b = _mm_loadu_si128(s.add(i + 16) as *const __m128i);
                let c = _mm_loadu_si128(s.add(i + 32) as *const __m128i);
                let e = _mm_loadu_si128(s.add(i + 48) as *const __m128i);
                _mm_stream_si128(d.add(i) as *mut __m128i, a);
                _mm_stream_si128(d.add(i + 16) as *mut __m128i, b);
                _mm_stream_si128(d.add(i + 32) as *mut __m128i, c);
                _mm_stream_si128(d.add(i + 48) as *mut __m128i, e);
            }
            i += 64;
        }
        let tail = head + body;
        dst[tail..].copy_from_slice(&src[tail..]);
        // SAFETY: a fence has no memory-safety preconditions.
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Streams `len` zero bytes to `dst` (see [`copy_to_staging`]), fenced.
fn zero_streaming(dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_sfence, _mm_stream_si128};
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].fill(0);
        let body = (dst.len() - head) / 16 * 16;
        let d = dst[head..].as_mut_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: SSE2 is baseline on x86_64; `i + 16 <= body` keeps the
            // store inside the slice, and `d + i` is 16-byte aligned.
            unsafe { _mm_stream_si128(d.add(i) as *mut __m128i, _mm_setzero_si128()) };
            i += 16;
        }
        dst[head + body..].fill(0);
        // SAFETY: a fence has no memory-safety preconditions.
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.fill(0);
}

/// The CPU mappings of a backend's chunks, by chunk id: what
/// [`Backend::write_mapped`](super::Backend::write_mapped) writes and
/// [`Backend::read_mapped`](super::Backend::read_mapped) reads through.
/// Writes are streaming stores and a fence: mapped device memory is
/// write-combined, and a store that read each line first would cross PCIe
/// twice. Reads are streaming loads (see `copy_from_mapped`). Used by the
/// backends that map chunks: Vulkan, and CUDA through Vulkan.
#[cfg_attr(not(feature = "vulkan"), allow(dead_code))]
pub(crate) struct MappedChunks {
    /// Chunk id → address of its first byte (0: not mapped).
    ptrs: Box<[std::sync::atomic::AtomicUsize]>,
}

#[cfg_attr(not(feature = "vulkan"), allow(dead_code))]
impl MappedChunks {
    pub(crate) fn new(capacity: usize) -> Self {
        MappedChunks {
            ptrs: (0..capacity)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
        }
    }

    /// Records where chunk `id` is mapped.
    ///
    /// # Safety
    /// `ptr` must stay mapped for `CHUNK_SIZE` writable bytes until
    /// [`MappedChunks::clear`] of the same id, and the backend must not free
    /// the chunk while a write to it may run (the trait's rule: no batch or
    /// write uses a chunk that is freed).
    pub(crate) unsafe fn set(&self, id: u32, ptr: NonNull<u8>) {
        if let Some(slot) = self.ptrs.get(id as usize) {
            slot.store(ptr.as_ptr() as usize, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether chunk `id` is mapped.
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.ptrs
            .get(id as usize)
            .is_some_and(|p| p.load(std::sync::atomic::Ordering::Acquire) != 0)
    }

    /// Forgets chunk `id`'s mapping, before its memory is freed.
    pub(crate) fn clear(&self, id: u32) {
        if let Some(slot) = self.ptrs.get(id as usize) {
            slot.store(0, std::sync::atomic::Ordering::Release);
        }
    }

    /// Stores `fill` at `offset` of chunk `chunk`, fenced.
    pub(crate) fn write(
        &self,
        chunk: super::ChunkId,
        offset: u64,
        fill: super::Fill<'_>,
    ) -> Result<(), super::BackendError> {
        let base = self.base(chunk)?;
        let len = fill.len() as u64;
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > super::CHUNK_SIZE)
        {
            return Err(super::BackendError::OutOfBounds(format!(
                "mapped write of {len} bytes at chunk offset {offset}"
            )));
        }
        // SAFETY: `base` maps CHUNK_SIZE bytes while the chunk is allocated
        // (`set`'s contract), and the range was checked to lie inside it.
        // Writers of one range are kept apart by the store; the device only
        // reads the bytes in batches submitted after this call returns.
        let dst = unsafe {
            std::slice::from_raw_parts_mut((base as *mut u8).add(offset as usize), len as usize)
        };
        match fill {
            super::Fill::Bytes(src) => copy_to_staging(dst, src),
            super::Fill::Zeros(_) => zero_streaming(dst),
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` of chunk `chunk` into `dst`
    /// with streaming loads. Sees every [`MappedChunks::write`] that
    /// returned before it was called, and every batch whose wait returned
    /// (the backend makes a batch's writes visible to the host before its
    /// wait returns).
    pub(crate) fn read(
        &self,
        chunk: super::ChunkId,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), super::BackendError> {
        let base = self.base(chunk)?;
        let len = dst.len() as u64;
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > super::CHUNK_SIZE)
        {
            return Err(super::BackendError::OutOfBounds(format!(
                "mapped read of {len} bytes at chunk offset {offset}"
            )));
        }
        // SAFETY: `base` maps CHUNK_SIZE bytes while the chunk is allocated
        // (`set`'s contract; the store holds the chunk's lock shared, so it
        // is not freed meanwhile), and the range was checked to lie inside
        // it.
        unsafe {
            copy_from_mapped(
                dst,
                (base as *const u8).add(offset as usize),
                base,
                base + super::CHUNK_SIZE as usize,
            )
        };
        Ok(())
    }

    /// Where chunk `chunk` is mapped.
    fn base(&self, chunk: super::ChunkId) -> Result<usize, super::BackendError> {
        match self
            .ptrs
            .get(chunk.0 as usize)
            .map_or(0, |p| p.load(std::sync::atomic::Ordering::Acquire))
        {
            0 => Err(super::BackendError::BadChunk(chunk)),
            base => Ok(base),
        }
    }
}

/// Copies `len` bytes from `src`, an address in write-combined mapped
/// device memory, into `dst`. Plain loads from such memory are uncached:
/// each one is a separate read across PCIe (a 4 KiB `memcpy` took 76 µs on
/// an H200, docs/BENCHMARKS.md). SSE4.1's streaming loads (`movntdqa`) fetch
/// a whole 64-byte line into a streaming-load buffer per miss, and several
/// lines are in flight at once (7.9 µs). Every load is an aligned 16-byte
/// one, also for a range that starts or ends inside 16 bytes: the aligned
/// 16 bytes around it lie inside the same mapping (`mapping_start..
/// mapping_end`, where both are 16-byte aligned; plain loads where they
/// are not), and only the asked-for bytes are kept.
///
/// # Safety
/// `src..src+dst.len()` must lie inside `mapping_start..mapping_end`, a
/// readable mapping.
unsafe fn copy_from_mapped(
    dst: &mut [u8],
    src: *const u8,
    mapping_start: usize,
    mapping_end: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if (mapping_start | mapping_end) % 16 == 0 && std::arch::is_x86_feature_detected!("sse4.1")
        {
            // SAFETY: SSE4.1 is present (checked above); the caller's
            // contract is passed on unchanged.
            unsafe { stream_from_mapped(dst, src, mapping_start, mapping_end) };
            return;
        }
    }
    let _ = (mapping_start, mapping_end);
    // SAFETY: the caller guarantees `src..src+len` is readable mapped
    // memory; `dst` is a distinct host buffer of the same length. No
    // reference to the device memory is made: the device may write other
    // bytes of it meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
}

/// [`copy_from_mapped`] with streaming loads.
///
/// # Safety
/// As for [`copy_from_mapped`], and the CPU has SSE4.1, and both ends of
/// the mapping are 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn stream_from_mapped(
    dst: &mut [u8],
    src: *const u8,
    mapping_start: usize,
    mapping_end: usize,
) {
    use std::arch::x86_64::{__m128i, _mm_mfence, _mm_storeu_si128, _mm_stream_load_si128};
    let len = dst.len();
    if len == 0 {
        return;
    }
    // Streaming loads are weakly ordered, and a streaming-load buffer could
    // still hold a line fetched before the write this read must see: the
    // fence orders them after every earlier load and store (Intel's rule
    // for MOVNTDQA on memory another agent writes).
    _mm_mfence();
    let start = src as usize;
    let end = start + len;
    let first = start & !15;
    let last = (end + 15) & !15;
    debug_assert!(first >= mapping_start && last <= mapping_end);
    let d = dst.as_mut_ptr();
    // Copies the part of the aligned 16 bytes at `line` that lies inside
    // `start..end` into `dst`.
    let partial = |line: usize| {
        let mut bytes = [0u8; 16];
        // SAFETY: `line` is 16-byte aligned and inside the mapping (the
        // caller's contract, widened to 16-byte bounds that the mapping's
        // aligned ends contain); `bytes` is 16 writable bytes.
        unsafe {
            let v = _mm_stream_load_si128(line as *const __m128i);
            _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, v);
        }
        let from = start.max(line);
        let to = end.min(line + 16);
        // SAFETY: `from - start .. to - start` lies inside `dst`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(from - line),
                d.add(from - start),
                to - from,
            )
        };
    };
    let mut line = first;
    if start != first {
        partial(line);
        line += 16;
    }
    let body_end = end & !15;
    // Four lines (256 bytes) of loads before their stores, so several
    // line fetches across PCIe are in flight at once.
    while line + 256 <= body_end {
        let s = line as *const __m128i;
        // SAFETY: `line..line+256` is aligned and inside `start..end`, so
        // inside the mapping; `dst` has the same bytes at `line - start`.
        unsafe {
            let mut v = [std::mem::MaybeUninit::<__m128i>::uninit(); 16];
            for (k, slot) in v.iter_mut().enumerate() {
                slot.write(_mm_stream_load_si128(s.add(k)));
            }
            let o = d.add(line - start) as *mut __m128i;
            for (k, slot) in v.iter().enumerate() {
                _mm_storeu_si128(o.add(k), slot.assume_init());
            }
        }
        line += 256;
    }
    while line + 16 <= body_end {
        // SAFETY: as above, for 16 bytes.
        unsafe {
            let v = _mm_stream_load_si128(line as *const __m128i);
            _mm_storeu_si128(d.add(line - start) as *mut __m128i, v);
        }
        line += 16;
    }
    if line < end {
        partial(line);
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_copy_is_exact_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..20 {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 127, 200, 900] {
                let mut dst = vec![0u8; 1000];
                copy_to_staging(&mut dst[offset..offset + len], &src[3..3 + len]);
                assert_eq!(&dst[offset..offset + len], &src[3..3 + len]);
                assert!(dst[..offset].iter().all(|b| *b == 0));
                assert!(dst[offset + len..].iter().all(|b| *b == 0));
            }
        }
    }

    #[test]
    fn mapped_writes_land_in_range_and_refuse_the_rest() {
        use crate::backend::{BackendError, ChunkId, Fill, CHUNK_SIZE};
        let mut region = LockedRegion::new(CHUNK_SIZE as usize, 4096).unwrap();
        region.as_mut_slice().fill(0xee);
        let table = MappedChunks::new(2);
        // SAFETY: the region outlives the table's use of it below.
        unsafe { table.set(1, NonNull::new(region.as_ptr()).unwrap()) };
        table.write(ChunkId(1), 3, Fill::Bytes(&[1, 2, 3])).unwrap();
        table.write(ChunkId(1), 100, Fill::Zeros(333)).unwrap();
        assert_eq!(
            table.write(ChunkId(0), 0, Fill::Zeros(4)),
            Err(BackendError::BadChunk(ChunkId(0)))
        );
        assert!(table
            .write(ChunkId(1), CHUNK_SIZE - 2, Fill::Zeros(4))
            .is_err());
        assert!(table.write(ChunkId(1), 0, Fill::Zeros(0)).is_err());
        table.clear(1);
        assert!(table.write(ChunkId(1), 0, Fill::Zeros(4)).is_err());
        let bytes = region.as_slice();
        assert_eq!(&bytes[..7], &[0xee, 0xee, 0xee, 1, 2, 3, 0xee]);
        assert!(bytes[100..433].iter().all(|b| *b == 0));
        assert_eq!((bytes[99], bytes[433]), (0xee, 0xee));
    }

    #[test]
    fn mapped_reads_are_exact_at_every_alignment_and_length() {
        use crate::backend::{BackendError, ChunkId, CHUNK_SIZE};
        let mut region = LockedRegion::new(CHUNK_SIZE as usize, 4096).unwrap();
        for (i, b) in region.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 13 + i / 251) as u8;
        }
        let bytes = region.as_slice().to_vec();
        let table = MappedChunks::new(1);
        // SAFETY: the region outlives the table's use of it below.
        unsafe { table.set(0, NonNull::new(region.as_ptr()).unwrap()) };
        let end = CHUNK_SIZE as usize;
        let mut dst = vec![0u8; 5002];
        for offset in (0..40).chain([4096 - 7, end - 4096, end - 300, end - 17, end - 1]) {
            for len in [1, 2, 15, 16, 17, 31, 48, 64, 255, 256, 257, 300, 4096, 4999] {
                if offset + len > end {
                    continue;
                }
                dst.fill(0xee);
                table
                    .read(ChunkId(0), offset as u64, &mut dst[1..1 + len])
                    .unwrap();
                assert_eq!(
                    &dst[1..1 + len],
                    &bytes[offset..offset + len],
                    "{offset}+{len}"
                );
                assert_eq!((dst[0], dst[1 + len]), (0xee, 0xee), "{offset}+{len}");
                // Plain loads, as where streaming loads are not to be had:
                // a mapping whose ends are not 16-byte aligned.
                dst.fill(0xee);
                let base = region.as_ptr() as usize;
                // SAFETY: `offset..offset+len` lies inside the region, and
                // so inside the narrower bounds given.
                unsafe {
                    copy_from_mapped(
                        &mut dst[..len],
                        region.as_ptr().add(offset),
                        base + offset,
                        base + offset + len,
                    )
                };
                assert_eq!(&dst[..len], &bytes[offset..offset + len]);
            }
        }
        assert!(table
            .read(ChunkId(0), CHUNK_SIZE - 2, &mut dst[..4])
            .is_err());
        assert!(table.read(ChunkId(0), 0, &mut dst[..0]).is_err());
        table.clear(0);
        assert_eq!(
            table.read(ChunkId(0), 0, &mut dst[..4]),
            Err(BackendError::BadChunk(ChunkId(0)))
        );
    }

    #[test]
    fn regions_are_aligned_rounded_and_writable() {
        let mut region = LockedRegion::new(10_000, 64 << 10).unwrap();
        assert_eq!(region.as_ptr() as usize % (64 << 10), 0);
        assert_eq!(region.len(), 64 << 10);
        region.as_mut_slice().fill(0xab);
        assert!(region.as_mut_slice().iter().all(|b| *b == 0xab));
        assert!(LockedRegion::new(0, 4096).is_err());
        assert!(LockedRegion::new(4096, 3 * 4096).is_err());
    }
}
