//! `storage-daemon=on`: a server that swap depends on does not exit while
//! a client is connected.
//!
//! nbdkit ends at the first SIGTERM, SIGINT, SIGHUP or SIGQUIT: it answers
//! ESHUTDOWN to what is in flight and closes its clients, and a kernel
//! that swapped pages out to it loses them (swapoff then blocks for about
//! a minute and fails; the processes whose pages they were die). Any stray
//! signal does it: an admin's `kill`, a package script, systemd-shutdown's
//! final kill of every process left.
//!
//! With this on, the plugin puts its own handler in place of nbdkit's for
//! those four signals (nbdkit installs its handlers before it forks;
//! `after_fork` runs after). While a client is connected a signal only
//! marks the exit as pending, and a thread of ours logs it and updates the
//! status file; the server exits (`nbdkit_shutdown`, what nbdkit's own
//! handler does) when the last client disconnects, which `vramswap stop`
//! brings about after swapoff has brought every page back. With no client
//! connected it exits at once. SIGKILL, which no process can refuse,
//! still ends it.
//!
//! It also marks itself as a root storage daemon: systemd-shutdown's final
//! kill spares the processes of root whose argv[0] starts with '@'
//! (systemd's "Storage Daemons for the Root File System"), so that the
//! swapoff after it can bring the pages back.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::{health, STORE};

extern "C" {
    // Provided by the nbdkit binary (1.20 and later): what its own quit
    // handler does, a flag and a byte down a pipe; safe in a signal handler.
    fn nbdkit_shutdown();
    // glibc: the program's argv[0] itself, not a copy, and its last part,
    // which syslog(3) names messages by unless openlog(3) said otherwise.
    static mut program_invocation_name: *mut c_char;
    static mut program_invocation_short_name: *mut c_char;
}

/// The signals nbdkit quits on (its `server/signals.c`).
const QUIT_SIGNALS: [c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Clients connected now.
static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
/// The first quit signal that came, 0 while none has.
static PENDING: AtomicI32 = AtomicI32::new(0);
/// When it came, in seconds since the epoch (set by the logging thread).
static PENDING_AT: AtomicU64 = AtomicU64::new(0);
/// The pipe's write end: the handler wakes the logging thread through it.
static NOTIFY: AtomicI32 = AtomicI32::new(-1);

/// One client's connection, counted while it lives (the plugin's `open`
/// to its `close`).
pub struct Connection(());

impl Connection {
    pub fn open() -> Self {
        CONNECTIONS.fetch_add(1, Ordering::SeqCst);
        Connection(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SeqCst on both sides (here and in the handler): either the
        // handler sees no client left, or this sees the pending signal.
        if CONNECTIONS.fetch_sub(1, Ordering::SeqCst) == 1 {
            let signal = PENDING.load(Ordering::SeqCst);
            if signal != 0 {
                info!(
                    "the last client disconnected: exiting, as {} asked",
                    name(signal)
                );
                // SAFETY: nbdkit's own entry point, callable from any thread.
                unsafe { nbdkit_shutdown() };
            }
        }
    }
}

/// Makes this server a storage daemon (see the module's text). Runs once,
/// in the process that serves, after nbdkit installed its handlers.
pub fn start() -> std::io::Result<()> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let read_end = fds[0];
    std::thread::Builder::new()
        .name("vramswap-quit".into())
        .spawn(move || watch(read_end))?;
    NOTIFY.store(fds[1], Ordering::SeqCst);
    ENABLED.store(true, Ordering::SeqCst);
    mark_storage_daemon();
    for signal in QUIT_SIGNALS {
        // SAFETY: a zeroed sigaction is valid; the handler only touches
        // atomics and async-signal-safe calls (`on_quit`).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_quit as extern "C" fn(c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            for other in QUIT_SIGNALS {
                libc::sigaddset(&mut action.sa_mask, other);
            }
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    info!(
        "storage daemon: a quit signal waits for the last client to disconnect; \
         only SIGKILL ends this server at once"
    );
    Ok(())
}

/// argv[0][0] = '@', as systemd's root storage daemons do: its final kill
/// at shutdown passes over root's processes whose command line starts so
/// (`/usr/sbin/nbdkit` shows as `@usr/sbin/nbdkit`). The name the system
/// log knows the server by (`journalctl -t nbdkit`) is argv[0]'s last
/// part; where argv[0] is that part alone (`nbdkit`, as taskset runs it),
/// syslog is pointed at a copy first, so it stays `nbdkit`.
fn mark_storage_daemon() {
    // SAFETY: glibc points `program_invocation_name` at argv[0], which
    // lives as long as the process, and `program_invocation_short_name`
    // into it; this runs once, before any thread of ours logs. One byte of
    // argv[0] is overwritten, inside the string (it is not empty); the
    // copy is leaked, to live as long as the process too.
    unsafe {
        let argv0 = program_invocation_name;
        if argv0.is_null() || *argv0 == 0 {
            return;
        }
        if program_invocation_short_name == argv0 {
            let name = std::ffi::CStr::from_ptr(argv0).to_owned();
            program_invocation_short_name = name.into_raw();
        }
        *argv0 = b'@' as c_char;
    }
}

extern "C" fn on_quit(signal: c_int) {
    // SAFETY: errno is this thread's; saved and put back around the write.
    let errno = unsafe { *libc::__errno_location() };
    let _ = PENDING.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    if CONNECTIONS.load(Ordering::SeqCst) == 0 {
        // SAFETY: async-signal-safe (a flag and a write to a pipe).
        unsafe { nbdkit_shutdown() };
    }
    let fd = NOTIFY.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: write(2) is async-signal-safe; one byte from the stack.
        unsafe { libc::write(fd, (&byte as *const u8).cast::<c_void>(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The logging thread: says what each signal did, outside the handler.
fn watch(fd: c_int) {
    loop {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast::<c_void>(), 1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n != 1 {
            return;
        }
        let signal = c_int::from(byte);
        let clients = CONNECTIONS.load(Ordering::SeqCst);
        if clients == 0 {
            info!("{}: no client connected: exiting", name(signal));
        } else {
            warn!(
                "{} postponed: {clients} client(s) connected, and a swap area on this server \
                 may hold pages; it exits when the last one disconnects (vramswap stop swaps \
                 off first). SIGKILL still ends it at once and loses every page it holds",
                name(signal)
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = PENDING_AT.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        health::write(&STORE);
    }
}

/// For the status file: whether this server is a storage daemon, and the
/// quit signal it is holding back, if any.
pub fn report() -> serde_json::Value {
    let signal = PENDING.load(Ordering::SeqCst);
    serde_json::json!({
        "storage_daemon": ENABLED.load(Ordering::SeqCst),
        "connections": CONNECTIONS.load(Ordering::SeqCst),
        "quit_pending": (signal != 0).then(|| serde_json::json!({
            "signal": name(signal),
            "at": PENDING_AT.load(Ordering::SeqCst),
        })),
    })
}

fn name(signal: c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "a quit signal",
    }
}
