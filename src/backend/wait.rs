//! How a thread waits for its batch: by polling the GPU, or by sleeping.
//!
//! Polling answers within a microsecond of the copy finishing but keeps a
//! core busy; sleeping frees the core but costs a wake-up (tens of
//! microseconds on a virtual machine's idle vCPU). Both GPU backends share
//! this policy.
//!
//! No sleep is open-ended: a waiter sleeps in naps of bounded length and
//! looks at its batch between them. With many threads waiting at once, a
//! sleep in the driver (`cuEventSynchronize`) now and then ended long after
//! its copy, stalling a swap-in for as long (docs/BENCHMARKS.md, "Waiting
//! for a batch: bounded naps").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::BackendError;

/// How long a waiter polls before it sleeps. A small copy over PCIe is done
/// in a few microseconds; a large one in tens.
pub(crate) const SPIN: Duration = Duration::from_micros(100);

/// How long a sleeping waiter naps: `first`, then each nap twice the
/// last, up to `max`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Naps {
    first: Duration,
    max: Duration,
}

impl Naps {
    /// Where only time ends a nap (a plain sleep between polls): short
    /// naps first, since the batch may be done in microseconds; `max` is
    /// what a sleeping waiter may add to a request.
    #[cfg(any(feature = "cuda", test))]
    pub(crate) const POLLED: Naps = Naps {
        first: Duration::from_micros(10),
        max: Duration::from_micros(200),
    };

    /// Where the driver wakes the sleeper when its batch is done: the
    /// bound is only for a wake-up that never comes.
    #[cfg(feature = "vulkan")]
    pub(crate) const DRIVER: Naps = Naps {
        first: Duration::from_millis(1),
        max: Duration::from_millis(1),
    };

    /// On a CPU "device", whose copies run on the cores the waiters would
    /// wake on: they sleep in the driver until woken; waking them every few
    /// microseconds took the cores the copies need (docs/BENCHMARKS.md,
    /// "Waiting for a batch: bounded naps").
    #[cfg(any(feature = "vulkan", test))]
    pub(crate) const CPU: Naps = Naps {
        first: Duration::from_secs(1),
        max: Duration::from_secs(1),
    };
}

/// A wait this long means something is wrong; say so, and keep waiting:
/// giving up would leave the copy running into memory we hand back.
const SLOW_WAIT: Duration = Duration::from_secs(10);

/// Shared by every lane of one device.
#[derive(Debug)]
pub(crate) struct WaitPolicy {
    spin: Duration,
    naps: Naps,
    /// Most threads polling at once: a few cut small-request latency, but
    /// all of nbdkit's worker threads polling would take the cores the
    /// socket and the client need.
    max_pollers: usize,
    polling: AtomicUsize,
}

impl WaitPolicy {
    /// `spin` zero: never poll (a CPU "device" needs the core for the copy).
    pub(crate) fn new(spin: Duration, naps: Naps) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        WaitPolicy {
            spin,
            naps,
            max_pollers: (cores / 4).max(1),
            polling: AtomicUsize::new(0),
        }
    }

    /// Waits until the batch is done: `poll` says whether it is, without
    /// blocking; `nap(d)` blocks for at most `d` (less when the driver can
    /// wake it at the batch's end) and then says whether it is. Polls first
    /// where the policy allows, then naps; `device` names the GPU in the
    /// warning about a batch that takes very long.
    pub(crate) fn wait(
        &self,
        mut poll: impl FnMut() -> Result<bool, BackendError>,
        mut nap: impl FnMut(Duration) -> Result<bool, BackendError>,
        device: &str,
    ) -> Result<(), BackendError> {
        let start = Instant::now();
        if !self.spin.is_zero() && self.poll_for_spin(&mut poll, start)? {
            return Ok(());
        }
        let mut length = self.naps.first;
        let mut warned = false;
        loop {
            if nap(length)? {
                return Ok(());
            }
            length = (length * 2).min(self.naps.max);
            if !warned && start.elapsed() > SLOW_WAIT {
                warn!(
                    "{device}: a transfer has not finished after {:?}; still waiting",
                    start.elapsed()
                );
                warned = true;
            }
        }
    }

    /// Polls for up to the spin where a polling place is free; says whether
    /// the batch finished meanwhile.
    fn poll_for_spin(
        &self,
        poll: &mut impl FnMut() -> Result<bool, BackendError>,
        start: Instant,
    ) -> Result<bool, BackendError> {
        if self.polling.fetch_add(1, Ordering::AcqRel) < self.max_pollers {
            let _leave = Leave(&self.polling);
            loop {
                if poll()? {
                    return Ok(true);
                }
                if start.elapsed() >= self.spin {
                    return Ok(false);
                }
                std::hint::spin_loop();
            }
        }
        self.polling.fetch_sub(1, Ordering::AcqRel);
        Ok(false)
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
    use std::cell::{Cell, RefCell};

    #[test]
    fn a_cpu_device_never_polls_and_sleeps_until_woken() {
        let policy = WaitPolicy::new(Duration::ZERO, Naps::CPU);
        let polls = Cell::new(0);
        let naps = RefCell::new(Vec::new());
        let result = policy.wait(
            || {
                polls.set(polls.get() + 1);
                Ok(true)
            },
            |length| {
                naps.borrow_mut().push(length);
                Ok(true)
            },
            "test",
        );
        assert_eq!(result, Ok(()));
        assert_eq!(polls.get(), 0);
        assert_eq!(naps.into_inner(), [Duration::from_secs(1)]);
    }

    #[test]
    fn a_batch_done_while_polling_needs_no_nap() {
        let policy = WaitPolicy::new(SPIN, Naps::POLLED);
        let polls = Cell::new(0);
        let result = policy.wait(
            || {
                polls.set(polls.get() + 1);
                Ok(polls.get() == 3)
            },
            |_| panic!("napped although the batch finished while polling"),
            "test",
        );
        assert_eq!(result, Ok(()));
        assert_eq!(polls.get(), 3);
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_slow_batch_polls_for_the_spin_then_naps() {
        let spin = Duration::from_millis(5);
        let policy = WaitPolicy::new(spin, Naps::POLLED);
        let start = Instant::now();
        let napped = Cell::new(false);
        let result = policy.wait(
            || Ok(false),
            |_| {
                napped.set(true);
                Ok(true)
            },
            "test",
        );
        assert_eq!(result, Ok(()));
        assert!(napped.get());
        assert!(start.elapsed() >= spin);
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn naps_grow_but_never_past_the_longest_allowed() {
        let policy = WaitPolicy::new(Duration::ZERO, Naps::POLLED);
        let naps = RefCell::new(Vec::new());
        let result = policy.wait(
            || panic!("a CPU device polled"),
            |length| {
                naps.borrow_mut().push(length);
                Ok(naps.borrow().len() == 40)
            },
            "test",
        );
        assert_eq!(result, Ok(()));
        let naps = naps.into_inner();
        assert_eq!(naps[0], Naps::POLLED.first);
        assert!(naps.windows(2).all(|w| w[1] >= w[0]), "{naps:?}");
        assert!(naps.iter().all(|&n| n <= Naps::POLLED.max), "{naps:?}");
        assert_eq!(naps[39], Naps::POLLED.max);
    }

    #[test]
    fn past_the_pollers_allowed_a_waiter_naps_at_once() {
        let policy = WaitPolicy::new(SPIN, Naps::POLLED);
        // Every polling place taken, as by other threads.
        policy.polling.store(policy.max_pollers, Ordering::Release);
        let result = policy.wait(|| panic!("polled past the limit"), |_| Ok(true), "test");
        assert_eq!(result, Ok(()));
        assert_eq!(policy.polling.load(Ordering::Acquire), policy.max_pollers);
    }

    #[test]
    fn an_error_while_polling_is_returned_and_frees_the_place() {
        let policy = WaitPolicy::new(SPIN, Naps::POLLED);
        let result = policy.wait(
            || Err(BackendError::DeviceLost),
            |_| panic!("napped after the device was lost"),
            "test",
        );
        assert_eq!(result, Err(BackendError::DeviceLost));
        assert_eq!(policy.polling.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_error_while_napping_is_returned() {
        let policy = WaitPolicy::new(Duration::ZERO, Naps::CPU);
        let result = policy.wait(|| Ok(false), |_| Err(BackendError::DeviceLost), "test");
        assert_eq!(result, Err(BackendError::DeviceLost));
    }
}
