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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_cpu_device_never_polls() {
        let policy = WaitPolicy::new(Duration::ZERO);
        let polls = Cell::new(0);
        let slept = Cell::new(false);
        let result = policy.wait(
            || {
                polls.set(polls.get() + 1);
                Ok(true)
            },
            || {
                slept.set(true);
                Ok(())
            },
        );
        assert_eq!(result, Ok(()));
        assert_eq!(polls.get(), 0);
        assert!(slept.get());
    }

    #[test]
    fn a_batch_done_while_polling_needs_no_sleep() {
        let policy = WaitPolicy::new(SPIN);
        let polls = Cell::new(0);
        let result = policy.wait(
            || {
                polls.set(polls.get() + 1);
                Ok(polls.get() == 3)
            },
            || panic!("slept although the batch finished while polling"),
        );
        assert_eq!(result, Ok(()));
        assert_eq!(polls.get(), 3);
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_slow_batch_polls_for_the_spin_then_sleeps() {
        let spin = Duration::from_millis(5);
        let policy = WaitPolicy::new(spin);
        let start = Instant::now();
        let slept = Cell::new(false);
        let result = policy.wait(
            || Ok(false),
            || {
                slept.set(true);
                Ok(())
            },
        );
        assert_eq!(result, Ok(()));
        assert!(slept.get());
        assert!(start.elapsed() >= spin);
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn past_the_pollers_allowed_a_waiter_sleeps_at_once() {
        let policy = WaitPolicy::new(SPIN);
        // Every polling place taken, as by other threads.
        policy.polling.store(policy.max_pollers, Ordering::Release);
        let result = policy.wait(|| panic!("polled past the limit"), || Ok(()));
        assert_eq!(result, Ok(()));
        assert_eq!(policy.polling.load(Ordering::Acquire), policy.max_pollers);
    }

    #[test]
    fn an_error_while_polling_is_returned_and_frees_the_place() {
        let policy = WaitPolicy::new(SPIN);
        let result = policy.wait(
            || Err(BackendError::DeviceLost),
            || panic!("slept after the device was lost"),
        );
        assert_eq!(result, Err(BackendError::DeviceLost));
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }
}
