//! When the watcher gives a slice back and when it takes one again: a
//! pure function of the free VRAM, the slices and the time, so that every
//! rule is tested without a GPU or a kernel.

use std::time::Duration;

use vramswap::ByteSize;

/// A slice as the watcher sees it on one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceNow {
    pub size: u64,
    pub online: bool,
    /// Bytes swapped out to it.
    pub used: u64,
}

/// What to do on this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Swap off slice `slice` and give its VRAM back.
    Yield {
        slice: usize,
        reason: String,
    },
    /// Turn slice `slice` back on.
    Return {
        slice: usize,
        reason: String,
    },
    Wait,
}

/// The rules, and what they remember between ticks.
#[derive(Debug, Clone)]
pub struct Policy {
    headroom: u64,
    settle: Duration,
    /// Since when free VRAM has been high enough to take a slice back.
    high_since: Option<Duration>,
    /// No yield before this: the last one failed.
    hold_until: Option<Duration>,
}

impl Policy {
    pub fn new(headroom: u64, settle: Duration) -> Self {
        Policy {
            headroom,
            settle,
            high_since: None,
            hold_until: None,
        }
    }

    /// The action for free VRAM `free` at time `now` (a monotonic clock).
    ///
    /// Under the headroom: the emptiest online slice goes (of equal ones,
    /// the lowest priority, which the kernel would fill last). At or over
    /// headroom plus the next slice's size for `settle`: the offline slice
    /// of highest priority comes back, and the next must wait its own
    /// `settle`.
    pub fn decide(&mut self, now: Duration, free: u64, slices: &[SliceNow]) -> Action {
        if free < self.headroom {
            self.high_since = None;
            if self.hold_until.is_some_and(|until| now < until) {
                return Action::Wait;
            }
            let emptiest = slices
                .iter()
                .enumerate()
                .filter(|(_, s)| s.online)
                .min_by_key(|(i, s)| (s.used, usize::MAX - i));
            return match emptiest {
                Some((slice, s)) => Action::Yield {
                    slice,
                    reason: format!(
                        "{} of VRAM free, under the {} headroom; the emptiest slice holds {}",
                        ByteSize(free),
                        ByteSize(self.headroom),
                        ByteSize(s.used)
                    ),
                },
                None => Action::Wait,
            };
        }
        let Some((slice, s)) = slices.iter().enumerate().find(|(_, s)| !s.online) else {
            self.high_since = None;
            return Action::Wait;
        };
        if free < self.headroom + s.size {
            self.high_since = None;
            return Action::Wait;
        }
        let since = *self.high_since.get_or_insert(now);
        if now - since < self.settle {
            return Action::Wait;
        }
        self.high_since = None;
        Action::Return {
            slice,
            reason: format!(
                "{} of VRAM free for {} s, at least the {} headroom plus the slice's {}",
                ByteSize(free),
                (now - since).as_secs(),
                ByteSize(self.headroom),
                ByteSize(s.size)
            ),
        }
    }

    /// A yield failed: the next waits `settle`, so a swapoff that cannot
    /// succeed (no RAM for the pages) is not retried every tick.
    pub fn failed(&mut self, now: Duration) {
        self.hold_until = Some(now + self.settle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn slices(state: &[(bool, u64)]) -> Vec<SliceNow> {
        state
            .iter()
            .map(|&(online, used)| SliceNow {
                size: G,
                online,
                used,
            })
            .collect()
    }

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn under_the_headroom_the_emptiest_online_slice_goes() {
        let mut p = Policy::new(G, at(30));
        let four = slices(&[(true, 900), (true, 5), (true, 0), (true, 0)]);
        // Two empty slices: the one of lower priority (the later) goes.
        assert!(matches!(
            p.decide(at(0), G / 2, &four),
            Action::Yield { slice: 3, .. }
        ));
        let three = slices(&[(true, 900), (true, 5), (true, 0), (false, 0)]);
        assert!(matches!(
            p.decide(at(1), G / 2, &three),
            Action::Yield { slice: 2, .. }
        ));
        let one = slices(&[(true, 900), (false, 0), (false, 0), (false, 0)]);
        assert!(matches!(
            p.decide(at(2), 0, &one),
            Action::Yield { slice: 0, .. }
        ));
        assert_eq!(p.decide(at(3), 0, &slices(&[(false, 0); 4])), Action::Wait);
        // At the headroom nothing goes.
        assert_eq!(p.decide(at(4), G, &four), Action::Wait);
    }

    #[test]
    fn a_slice_returns_after_free_vram_stayed_high_for_settle() {
        let mut p = Policy::new(G, at(30));
        let s = slices(&[(true, 9), (false, 0), (false, 0)]);
        // Headroom plus a slice is needed; less resets the clock.
        assert_eq!(p.decide(at(0), 2 * G - 1, &s), Action::Wait);
        assert_eq!(p.decide(at(10), 2 * G, &s), Action::Wait);
        assert_eq!(p.decide(at(39), 2 * G, &s), Action::Wait);
        assert!(matches!(
            p.decide(at(40), 3 * G, &s),
            Action::Return { slice: 1, .. }
        ));
        // The next waits its own settle.
        let s = slices(&[(true, 9), (true, 0), (false, 0)]);
        assert_eq!(p.decide(at(41), 3 * G, &s), Action::Wait);
        assert_eq!(p.decide(at(60), G + G / 2, &s), Action::Wait);
        assert_eq!(p.decide(at(61), 3 * G, &s), Action::Wait);
        assert!(matches!(
            p.decide(at(91), 3 * G, &s),
            Action::Return { slice: 2, .. }
        ));
    }

    #[test]
    fn after_a_failed_yield_the_next_waits_settle() {
        let mut p = Policy::new(G, at(30));
        let s = slices(&[(true, 9), (true, 7)]);
        assert!(matches!(
            p.decide(at(0), 0, &s),
            Action::Yield { slice: 1, .. }
        ));
        p.failed(at(1));
        assert_eq!(p.decide(at(2), 0, &s), Action::Wait);
        assert_eq!(p.decide(at(30), 0, &s), Action::Wait);
        assert!(matches!(
            p.decide(at(31), 0, &s),
            Action::Yield { slice: 1, .. }
        ));
    }
}
