//! The device check before nbdkit forks, run in a child process of its own.
//!
//! nbdkit calls `get_ready` in the process its caller waits on, then forks
//! the server into the background and exits 0, and only then calls
//! `after_fork` in the server (nbdkit 1.32 `server/main.c`). A refusal in
//! `get_ready` is therefore an exit 1 with the reason on stderr; one in
//! `after_fork` reaches nobody who started nbdkit. But the GPU API must not
//! be initialised in nbdkit's process before the fork: the CUDA driver
//! refuses every call in a child forked after `cuInit`, and Vulkan drivers
//! start threads that a fork does not copy. So the check runs in a
//! short-lived child that lists the devices, sends back one line and ends
//! with `_exit`; nbdkit's own process never loads a GPU driver.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// How long the check may take. CUDA makes a context on every GPU to read
/// its free memory: seconds on a machine of eight.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The longest refusal sent back. A pipe holds at least one page, so the
/// child never waits on its write.
const MAX_LINE: usize = 3000;

/// The first byte of a verdict.
const ACCEPT: u8 = b'+';
const REFUSE: u8 = b'-';

/// Runs `check` in a child process and returns its verdict: `Err` holds
/// the one line to show.
pub fn run(check: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "device check: pipe: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors are new, open and owned by nothing else.
    let (from_child, to_parent) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: nbdkit starts no thread before it accepts connections (after
    // the fork), and this plugin none before `after_fork`, so the child is a
    // whole copy of a single-threaded process and may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(format!(
            "device check: fork: {}",
            io::Error::last_os_error()
        )),
        0 => {
            drop(from_child);
            in_child(to_parent, check)
        }
        pid => {
            drop(to_parent);
            wait_for(pid, from_child)
        }
    }
}

fn in_child(mut to_parent: File, check: impl FnOnce() -> Result<(), String>) -> ! {
    // Nothing may unwind out of here: the child would return into nbdkit
    // and carry on as a second nbdkit.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let verdict = catch_unwind(AssertUnwindSafe(check)).unwrap_or_else(|payload| {
            let why = crate::panic_text(payload.as_ref());
            Err(format!("device check: internal error ({why})"))
        });
        let _ = to_parent.write_all(&encode(verdict));
    }));
    // SAFETY: ends this process at once. No atexit handler runs (the GPU
    // driver's would tear down what the process is about to lose anyway),
    // and the C stdio buffers this child shares with nbdkit's process are
    // not written out a second time.
    unsafe { libc::_exit(0) }
}

/// A verdict as the child sends it: one byte, then a refusal's line.
fn encode(verdict: Result<(), String>) -> Vec<u8> {
    match verdict {
        Ok(()) => vec![ACCEPT],
        Err(line) => {
            let mut end = line.len().min(MAX_LINE);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            [&[REFUSE], &line.as_bytes()[..end]].concat()
        }
    }
}

/// Waits for the child and reads its verdict.
fn wait_for(pid: libc::pid_t, mut from_child: File) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut status = 0;
    loop {
        // SAFETY: waits on our own child; writes its status into a local.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match done {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            0 => {
                // SAFETY: signals and reaps our own child, which is hung.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return Err(format!(
                    "device check: the GPU driver did not list its devices within {} s",
                    TIMEOUT.as_secs()
                ));
            }
            // Exited; or already reaped where SIGCHLD is ignored (ECHILD),
            // when the pipe alone says how it went.
            _ => break,
        }
    }
    // The child has exited. Should a process it started still hold the
    // pipe open, reading must not wait for that one.
    // SAFETY: sets a flag on a descriptor this function owns.
    unsafe { libc::fcntl(from_child.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut message = Vec::new();
    let _ = from_child.read_to_end(&mut message);
    match message.split_first() {
        Some((&ACCEPT, _)) => Ok(()),
        Some((&REFUSE, line)) => Err(String::from_utf8_lossy(line).into_owned()),
        _ if libc::WIFSIGNALED(status) => Err(format!(
            "device check: the GPU driver crashed while listing devices (signal {})",
            libc::WTERMSIG(status)
        )),
        _ => Err("device check: ended without a verdict".into()),
    }
}
