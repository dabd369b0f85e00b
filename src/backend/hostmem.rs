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
/// [`Backend::write_mapped`](super::Backend::write_mapped) writes through.
/// Writes are streaming stores and a fence: mapped device memory is
/// write-combined, and a store that read each line first would cross PCIe
/// twice.
#[cfg_attr(not(any(feature = "vulkan", feature = "cuda")), allow(dead_code))]
pub(crate) struct MappedChunks {
    /// Chunk id → address of its first byte (0: not mapped).
    ptrs: Box<[std::sync::atomic::AtomicUsize]>,
}

#[cfg_attr(not(any(feature = "vulkan", feature = "cuda")), allow(dead_code))]
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
        let base = self
            .ptrs
            .get(chunk.0 as usize)
            .map_or(0, |p| p.load(std::sync::atomic::Ordering::Acquire));
        if base == 0 {
            return Err(super::BackendError::BadChunk(chunk));
        }
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
}

fn page_size() -> usize {
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
