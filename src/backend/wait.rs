//! How a thread waits for its batch: by polling the GPU, or by sleeping.
//!
//! Polling answers within a microsecond of the copy finishing but keeps a
//! core busy; sleeping in the driver frees the core but costs a wake-up
//! (tens of microseconds on a virtual machine's idle vCPU). Both GPU
//! backends share this policy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::BackendError;

/// How long a waiter polls before it sleeps. A small copy over PCIe is done
/// in a few microseconds; a large one in tens.
pub(crate) const SPIN: Duration = Duration::from_micros(100);

/// Shared by every lane of one device.
#[derive(Debug)]
pub(crate) struct WaitPolicy {
    spin: Duration,
    /// Most threads polling at once: a few cut small-request latency, but
    /// all of nbdkit's worker threads polling would take the cores the
    /// socket and the client need.
    max_pollers: usize,
    polling: AtomicUsize,
}

impl WaitPolicy {
    /// `spin` zero: never poll (a CPU "device" needs the core for the copy).
    pub(crate) fn new(spin: Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        WaitPolicy {
            spin,
            max_pollers: (cores / 4).max(1),
            polling: AtomicUsize::new(0),
        }
    }

    /// Waits until `poll` says the batch is done, polling first where the
    /// policy allows and then calling `sleep`, which blocks until it is.
    pub(crate) fn wait(
        &self,
        mut poll: impl FnMut() -> Result<bool, BackendError>,
        sleep: impl FnOnce() -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let start = Instant::now();
        if self.spin.is_zero() {
            return sleep();
        }
        if self.polling.fetch_add(1, Ordering::AcqRel) < self.max_pollers {
            let _leave = Leave(&self.polling);
            loop {
                if poll()? {
                    return Ok(());
                }
                if start.elapsed() >= self.spin {
                    break;
                }
                std::hint::spin_loop();
            }
        } else {
            self.polling.fetch_sub(1, Ordering::AcqRel);
        }
        sleep()
    }
}

/// Decrements its counter when dropped.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
