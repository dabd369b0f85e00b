//! `warm-up=THREADS:SIZE`: before a device becomes swap, every nbdkit
//! worker thread takes one request of the largest size the kernel will
//! send, so that none of them grows its request buffer later, when that
//! allocation could wait for swap-out through its own connection (see
//! [`vramswap::export::WarmUp`]).
//!
//! nbdkit gives each connection its own `--threads` workers, and which of
//! them takes a request is up to them. So a read of the warm-up size on a
//! thread that has not taken one waits here until THREADS different
//! threads of its connection have: while it waits, its thread cannot take
//! another request, so a client's concurrent reads reach the others. A
//! wait ends after [`WAIT`] in any case and the read is served as usual;
//! the connection then counts as warm only once a later round completes.
//! The start script learns how many connections are warm from the status
//! file (`warm_connections`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing::info;
use vramswap::export::WarmUp;
use vramswap::ByteSize;

/// Longest a warm-up read waits for its connection's other threads. Short:
/// a read of that size from anyone else (a probe of the new device) is
/// held as long.
const WAIT: Duration = Duration::from_secs(2);

/// Connections whose every thread has taken a warm-up read.
static WARM_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread has been counted (each nbdkit thread serves one
    /// connection, so once is enough).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Connections whose every worker thread has taken a warm-up read.
pub fn warm_connections() -> u64 {
    WARM_CONNECTIONS.load(Ordering::Relaxed)
}

/// One connection's warm-up.
pub struct Barrier {
    plan: WarmUp,
    done: AtomicBool,
    counted: Mutex<usize>,
    all_in: Condvar,
}

impl Barrier {
    pub fn new(plan: WarmUp) -> Self {
        Barrier {
            plan,
            done: AtomicBool::new(false),
            counted: Mutex::new(0),
            all_in: Condvar::new(),
        }
    }

    /// Called before every read is served; returns at once unless the
    /// read is one this connection's warm-up still needs. Returns true
    /// when this read made the connection warm.
    pub fn read(&self, len: usize) -> bool {
        if len < self.plan.size || self.done.load(Ordering::Acquire) || COUNTED.get() {
            return false;
        }
        COUNTED.set(true);
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        *counted += 1;
        if *counted >= self.plan.threads {
            self.done.store(true, Ordering::Release);
            drop(counted);
            self.all_in.notify_all();
            WARM_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            info!(
                "warm-up: all {} threads of a connection have taken a {} read",
                self.plan.threads,
                ByteSize(self.plan.size as u64)
            );
            return true;
        }
        let _ = self
            .all_in
            .wait_timeout_while(counted, WAIT, |_| !self.done.load(Ordering::Acquire));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn plan(threads: usize) -> WarmUp {
        WarmUp {
            threads,
            size: 128 << 10,
        }
    }

    #[test]
    fn reads_wait_until_every_thread_has_one() {
        let barrier = Arc::new(Barrier::new(plan(4)));
        let before = warm_connections();
        let start = Instant::now();
        let made_warm: usize = (0..4)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || b.read(128 << 10))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(made_warm, 1);
        assert!(start.elapsed() < WAIT, "a read waited for its timeout");
        assert!(warm_connections() > before);
        // Done: any read passes straight through.
        let t = std::thread::spawn(move || barrier.read(128 << 10));
        assert!(!t.join().unwrap());
    }

    #[test]
    fn smaller_reads_and_counted_threads_pass_and_a_lone_read_gives_up() {
        let barrier = Barrier::new(plan(2));
        assert!(!barrier.read(4096));
        let start = Instant::now();
        assert!(!barrier.read(128 << 10));
        assert!(start.elapsed() >= WAIT);
        // The same thread again: already counted, no second wait.
        let again = Instant::now();
        assert!(!barrier.read(128 << 10));
        assert!(again.elapsed() < WAIT);
        // A second thread completes it.
        let b = Arc::new(barrier);
        let t = std::thread::spawn({
            let b = b.clone();
            move || b.read(128 << 10)
        });
        assert!(t.join().unwrap());
    }
}
