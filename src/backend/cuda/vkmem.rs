//! CUDA chunks the CPU can write through a mapping (`mapped=`), in VRAM
//! that Vulkan allocates, maps and exports, and CUDA imports.
//!
//! `cuMemAlloc`'d memory has no CPU mapping (short of GDRCopy's kernel
//! module), but Vulkan can allocate from the `DEVICE_LOCAL | HOST_VISIBLE |
//! HOST_COHERENT` type (resizable BAR) and export it as an opaque file
//! descriptor, which `cuImportExternalMemory` takes on the same GPU (the
//! Vulkan device whose `deviceUUID` is CUDA's UUID). Lanes copy to and from
//! the imported memory with the same DMA calls as before; writes go through
//! the Vulkan mapping ([`MappedChunks`]).
//!
//! Memory is exported in [`BLOCK`]s, each carved into chunks: one export
//! and import per 4 MiB chunk would take 35 000 memory objects for an
//! H200, where NVIDIA's Vulkan allows 4096 (`maxMemoryAllocationCount`),
//! and a few milliseconds each. A block goes back to the device when its
//! last chunk is freed, so a lazy store's trims still return VRAM.

use std::collections::BTreeSet;
use std::os::fd::IntoRawFd;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::sys;
use tracing::{debug, warn};

use super::conv;
use crate::backend::hostmem::MappedChunks;
use crate::backend::vulkan::export::{ExportedBlock, ExportingDevice};
use crate::backend::{BackendError, ChunkId, Fill, CHUNK_SIZE};

/// Bytes exported (and imported) at a time. 64 MiB, as the Vulkan backend's
/// own memory blocks: an H200's 140 GiB is 2240 of them, about half of the
/// 4096 memory objects NVIDIA's Vulkan allows, and each costs an export, an
/// import and a mapping once per 16 chunks. Larger blocks would keep more
/// VRAM held by one live chunk after trims; smaller ones would near the
/// object limit on larger cards. Where a whole block no longer fits, ever
/// smaller ones are tried, down to one chunk, so the last of the VRAM is
/// not lost to the block size.
pub(super) const BLOCK: u64 = 64 << 20;

/// One Vulkan memory object imported into CUDA.
struct Block {
    vk: ExportedBlock,
    external: sys::CUexternalMemory,
    /// The whole block's device address in this context.
    device_ptr: sys::CUdeviceptr,
    /// Chunks the block holds.
    slots: u32,
    /// Bit `i`: slot `i` holds a chunk.
    used: u64,
}

// SAFETY: the external-memory handle is only passed to the driver, whose
// API is thread-safe; blocks are reached only under `Interop::state`.
unsafe impl Send for Block {}

#[derive(Default)]
struct State {
    /// Block number → block; `None` where one was given back.
    blocks: Vec<Option<Block>>,
    /// Blocks with a free slot, lowest first: new chunks fill the lowest
    /// blocks so that the highest empty out and go back.
    with_room: BTreeSet<usize>,
    /// Chunk id → (block, slot).
    owner: Vec<Option<(usize, u32)>>,
}

/// The Vulkan device that lends the memory, the blocks it lent, and where
/// each chunk is mapped.
pub(super) struct Interop {
    vk: ExportingDevice,
    mapped: MappedChunks,
    state: Mutex<State>,
    device: String,
}

impl Interop {
    /// Opens the Vulkan side of the GPU with this UUID and proves the path
    /// once (a block exported, imported and given back), so that `auto`
    /// falls back at open rather than failing chunks later. Returns it with
    /// the bytes of VRAM the CPU can map. The context is current.
    pub(super) fn open(
        uuid: &[u8; 16],
        name: &str,
        capacity: usize,
    ) -> Result<(Self, u64), BackendError> {
        let (vk, mappable) = ExportingDevice::open(uuid, name)?;
        let interop = Interop {
            vk,
            mapped: MappedChunks::new(capacity),
            state: Mutex::new(State::default()),
            device: name.to_string(),
        };
        let probe = interop.import(CHUNK_SIZE)?;
        interop.release(probe);
        Ok((interop, mappable))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exports `size` bytes from Vulkan and imports them. The context is
    /// current.
    fn import(&self, size: u64) -> Result<Block, BackendError> {
        let (vk, fd) = self.vk.allocate(size)?;
        let desc = sys::CUDA_EXTERNAL_MEMORY_HANDLE_DESC {
            type_: sys::CUexternalMemoryHandleType::CU_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD,
            handle: sys::CUDA_EXTERNAL_MEMORY_HANDLE_DESC_st__bindgen_ty_1 {
                fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            },
            size: vk.size(),
            flags: if self.vk.dedicated() {
                sys::CUDA_EXTERNAL_MEMORY_DEDICATED
            } else {
                0
            },
            reserved: [0; 16],
        };
        let mut external: sys::CUexternalMemory = std::ptr::null_mut();
        // SAFETY: `has_interop` proved the symbol present before this type
        // was made; the descriptor names a live fd of a Vulkan allocation
        // of exactly `size()` bytes on this GPU; the out-pointer is valid.
        let imported = conv::check("cuImportExternalMemory", unsafe {
            sys::cuImportExternalMemory(&mut external, &desc)
        });
        if let Err(err) = imported {
            // The descriptor is still ours: `fd` closes it as it drops.
            drop(fd);
            self.vk.free(vk);
            return Err(err);
        }
        // CUDA owns the descriptor now and closes it with the import.
        let _ = fd.into_raw_fd();
        let buffer = sys::CUDA_EXTERNAL_MEMORY_BUFFER_DESC {
            offset: 0,
            size: vk.size(),
            flags: 0,
            reserved: [0; 16],
        };
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `external` was just imported; the range lies inside it;
        // the out-pointer is valid. The pointer is freed by `release`.
        let mapped = conv::check("cuExternalMemoryGetMappedBuffer", unsafe {
            sys::cuExternalMemoryGetMappedBuffer(&mut device_ptr, external, &buffer)
        });
        if let Err(err) = mapped {
            // SAFETY: imported above, never mapped, destroyed once.
            let _ = unsafe { sys::cuDestroyExternalMemory(external) };
            self.vk.free(vk);
            return Err(err);
        }
        let slots = (vk.size() / CHUNK_SIZE).min(64) as u32;
        Ok(Block {
            vk,
            external,
            device_ptr,
            slots,
            used: 0,
        })
    }

    /// Gives a block back: CUDA's mapping and import, then Vulkan's memory.
    /// The context is current, and no copy or write uses the block.
    fn release(&self, block: Block) {
        // SAFETY: the pointer came from `cuExternalMemoryGetMappedBuffer`
        // on this import and is freed once (the block is taken by value);
        // no copy in flight uses it (the caller's rule).
        let freed = conv::check("cuMemFree_v2", unsafe {
            sys::cuMemFree_v2(block.device_ptr)
        });
        // SAFETY: its only mapping was freed just above; destroyed once.
        let destroyed = conv::check("cuDestroyExternalMemory", unsafe {
            sys::cuDestroyExternalMemory(block.external)
        });
        if let Err(err) = freed.and(destroyed) {
            warn!("{}: giving a mapped block back: {err}", self.device);
        }
        self.vk.free(block.vk);
    }

    /// Takes a chunk for id `id`: a free slot of the lowest block with one,
    /// else of a new block. Returns its device address. The context is
    /// current; the caller holds the device's memory lock and checked the
    /// limit.
    pub(super) fn allocate(&self, id: u32) -> Result<sys::CUdeviceptr, BackendError> {
        let mut state = self.state();
        let index = match state.with_room.first().copied() {
            Some(index) => index,
            None => {
                let block = self.import_fitting()?;
                let index = match state.blocks.iter().position(Option::is_none) {
                    Some(index) => index,
                    None => {
                        state.blocks.push(None);
                        state.blocks.len() - 1
                    }
                };
                state.blocks[index] = Some(block);
                state.with_room.insert(index);
                index
            }
        };
        let Some(block) = state.blocks.get_mut(index).and_then(Option::as_mut) else {
            return Err(BackendError::OutOfDeviceMemory);
        };
        let slot = (!block.used).trailing_zeros();
        block.used |= 1 << slot;
        let full = block.used.count_ones() == block.slots;
        let offset = u64::from(slot) * CHUNK_SIZE;
        let device_ptr = block.device_ptr + offset;
        // SAFETY: `offset + CHUNK_SIZE` lies inside the block's mapping
        // (`slot < slots`), which stays until `release`, and `free` clears
        // this entry before its block can be released.
        let host = unsafe { NonNull::new_unchecked(block.vk.ptr().as_ptr().add(offset as usize)) };
        // SAFETY: as above; the store frees a chunk only when no write or
        // batch uses it.
        unsafe { self.mapped.set(id, host) };
        if full {
            state.with_room.remove(&index);
        }
        let id = id as usize;
        if state.owner.len() <= id {
            state.owner.resize(id + 1, None);
        }
        state.owner[id] = Some((index, slot));
        Ok(device_ptr)
    }

    /// A new block of [`BLOCK`] bytes, or the largest smaller one (halving
    /// down to one chunk) the device still has room for.
    fn import_fitting(&self) -> Result<Block, BackendError> {
        let mut size = BLOCK;
        loop {
            match self.import(size) {
                Err(BackendError::OutOfDeviceMemory) if size > CHUNK_SIZE => {
                    debug!("{}: no room for a {size}-byte mapped block", self.device);
                    size /= 2;
                }
                other => return other,
            }
        }
    }

    /// Gives chunk `id` back, and its block with it when that was the
    /// block's last chunk and `context_current` (a lost context keeps its
    /// blocks until the backend closes).
    pub(super) fn free(&self, id: u32, context_current: bool) {
        self.mapped.clear(id);
        let mut state = self.state();
        let Some((index, slot)) = state.owner.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        let Some(block) = state.blocks.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        block.used &= !(1 << slot);
        if block.used == 0 && context_current {
            state.with_room.remove(&index);
            if let Some(block) = state.blocks[index].take() {
                drop(state);
                self.release(block);
            }
        } else {
            state.with_room.insert(index);
        }
    }

    /// Stores `fill` through chunk `chunk`'s mapping.
    pub(super) fn write(
        &self,
        chunk: ChunkId,
        offset: u64,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.mapped.write(chunk, offset, fill)
    }

    /// Whether chunk `chunk` is one of these (mapped).
    pub(super) fn contains(&self, chunk: ChunkId) -> bool {
        self.mapped.contains(chunk.0)
    }

    /// Loads `dst.len()` bytes of chunk `chunk` through its mapping.
    pub(super) fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), BackendError> {
        self.mapped.read(chunk, offset, dst)
    }

    /// Gives every block back, at close: the context is current and
    /// synchronised, so no copy uses any of them.
    pub(super) fn release_all(&self) {
        let blocks: Vec<Block> = {
            let mut state = self.state();
            state.with_room.clear();
            state.owner.clear();
            state.blocks.drain(..).flatten().collect()
        };
        for block in blocks {
            self.release(block);
        }
    }
}

impl Drop for Interop {
    fn drop(&mut self) {
        // Blocks left here are those of a context that could not be made
        // current at close: its release (after `release_all` was skipped)
        // took CUDA's side; Vulkan's memory goes before its device.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for block in state.blocks.drain(..).flatten() {
            self.vk.free(block.vk);
        }
    }
}
