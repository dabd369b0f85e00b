//! Making the serving process safe to swap onto.
//!
//! When the kernel swaps out to this device, reclaim waits on this process.
//! If the process itself needs reclaim to make progress — a page of its own
//! swapped out, an allocation that enters direct reclaim, the OOM killer
//! choosing it — the machine deadlocks. Measured in a 1 GiB qemu guest with
//! nbdkit's memory plugin as swap: without the three settings below the
//! guest hung under pressure; with them it swapped ~700 MB out and back.

use std::io;

use tracing::{info, warn};
use vramswap::ByteSize;

/// `prctl` option (Linux 5.6+): this process writes out memory for others,
/// so its own allocations never recurse into filesystem or block I/O.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Locks memory, shields the process from the OOM killer and marks it an
/// I/O flusher. Each step that is not permitted is a clear warning, not a
/// failure: a test run as a normal user still serves.
pub fn harden_process() {
    // MCL_ONFAULT locks pages as they are touched instead of populating every
    // mapping now: GPU drivers reserve large address ranges they never touch,
    // and locking those up front took so much RAM that the OOM killer chose
    // the server (seen with nbdkit's own --swap).
    // SAFETY: mlockall takes flags only and touches no Rust-visible memory.
    let locked =
        unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    report(
        "mlockall",
        errno_result(locked),
        "its own pages can be swapped out, which can deadlock swap on this device (needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK)",
    );

    report(
        "oom_score_adj=-1000",
        std::fs::write("/proc/self/oom_score_adj", "-1000"),
        "the OOM killer may choose this server and take every swapped-out page with it (needs CAP_SYS_RESOURCE)",
    );

    // SAFETY: prctl with integer arguments only.
    let flusher = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    let flusher = errno_result(flusher);
    let consequence = match &flusher {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            "the kernel predates PR_SET_IO_FLUSHER (Linux 5.6); allocations may recurse into swap I/O"
        }
        _ => "allocations may recurse into swap I/O under pressure (needs CAP_SYS_RESOURCE)",
    };
    report("PR_SET_IO_FLUSHER", flusher, consequence);
}

/// Reads in and locks every page of every file this process maps: its
/// code, nbdkit's, the C library's and the GPU driver's libraries (see
/// [`vramswap::maps`]). Run once the GPU is open, so the driver's libraries
/// are loaded. `mlockall(MCL_ONFAULT)` alone leaves untouched pages out, and
/// the first call of a rarely used function while the machine swaps (an
/// error path, a driver's slow path) would then read them in under reclaim.
/// Costs the size of the mapped files in RAM (shared with every other user
/// of those files): 220 MiB with lavapipe (most of it LLVM), 105 MiB with
/// the NVIDIA driver's CUDA and 166 MiB with its Vulkan (H200, 580.159.04).
pub fn lock_mapped_files() {
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => maps,
        Err(err) => {
            warn!("mapped files not locked (/proc/self/maps: {err}): {UNLOCKED_FILES}");
            return;
        }
    };
    let mut locked = 0u64;
    let mut failed: Option<(&str, io::Error)> = None;
    for mapping in vramswap::maps::file_mappings(&maps) {
        // SAFETY: mlock changes only how the kernel keeps the pages of the
        // range, never their contents; a range unmapped since the read
        // fails with ENOMEM and is reported below.
        let rc = unsafe { libc::mlock(mapping.start as *const libc::c_void, mapping.len()) };
        match errno_result(rc) {
            Ok(()) => locked += mapping.len() as u64,
            Err(err) => {
                failed.get_or_insert((mapping.path, err));
            }
        }
    }
    match failed {
        None => info!("mapped files: {} read in and locked", ByteSize(locked)),
        Some((path, err)) => warn!(
            "mapped files: {} locked, but not all of {path} ({err}): {UNLOCKED_FILES}",
            ByteSize(locked)
        ),
    }
}

const UNLOCKED_FILES: &str = "code run for the first time under memory pressure is read in then, which can deadlock swap on this device (needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK)";

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn report(step: &str, result: io::Result<()>, consequence: &str) {
    match result {
        Ok(()) => info!("{step}: done"),
        Err(err) => warn!("{step} failed ({err}): {consequence}"),
    }
}
