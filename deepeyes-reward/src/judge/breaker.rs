//! The circuit breaker: after `breaker-failures` failed attempts in a row (over every thread),
//! the judge is not asked again for `breaker-cooldown-secs`; the answers it would have decided
//! fail at once, which the accuracy term turns into the flagged rule fallback. When the cool-down
//! ends one request is let through as a probe: a success closes the breaker, a failure opens it
//! for another cool-down.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A breaker shared by every thread that uses one judge.
#[derive(Debug)]
pub(super) struct Breaker {
    /// Failed attempts in a row that open it; 0 never opens.
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Failed attempts since the last success.
    consecutive: u32,
    /// While open: when the next probe may go.
    open_until: Option<Instant>,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether a request may go now; `Err` holds how long the breaker stays open. Once the
    /// cool-down is over, the first caller is the probe and the others keep waiting.
    pub(super) fn admit(&self) -> Result<(), Duration> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.open_until {
            Some(until) if now < until => Err(until - now),
            Some(_) => {
                state.open_until = Some(now + self.cooldown);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// An attempt got an answer: closes the breaker.
    pub(super) fn success(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = State::default();
    }

    /// An attempt failed; true when this failure opened (or reopened) the breaker.
    pub(super) fn failure(&self) -> bool {
        self.failure_at(Instant::now())
    }

    fn failure_at(&self, now: Instant) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.consecutive = state.consecutive.saturating_add(1);
        if state.consecutive >= self.threshold {
            state.open_until = Some(now + self.cooldown);
            true
        } else {
            false
        }
    }

    /// The failures in a row so far.
    pub(super) fn consecutive(&self) -> u32 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let breaker = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!breaker.failure_at(t0));
        assert!(!breaker.failure_at(t0));
        assert!(breaker.admit_at(t0).is_ok());
        assert!(breaker.failure_at(t0));
        assert_eq!(
            breaker.admit_at(t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        // The cool-down is over: one probe goes, the next caller waits for its outcome.
        let later = t0 + Duration::from_secs(10);
        assert!(breaker.admit_at(later).is_ok());
        assert!(breaker.admit_at(later).is_err());
        // The probe failed: open again for a whole cool-down.
        assert!(breaker.failure_at(later));
        assert!(breaker.admit_at(later + Duration::from_secs(9)).is_err());
        // A successful probe closes it.
        assert!(breaker.admit_at(later + Duration::from_secs(10)).is_ok());
        breaker.success();
        assert!(breaker.admit_at(later + Duration::from_secs(10)).is_ok());
        assert_eq!(breaker.consecutive(), 0);
    }

    #[test]
    fn a_success_resets_the_count_and_zero_never_opens() {
        let breaker = Breaker::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!breaker.failure_at(t0));
        breaker.success();
        assert!(!breaker.failure_at(t0));
        assert!(breaker.admit_at(t0).is_ok());

        let never = Breaker::new(0, Duration::from_secs(10));
        for _ in 0..100 {
            assert!(!never.failure_at(t0));
        }
        assert!(never.admit_at(t0).is_ok());
    }
}
