//! The retry policy: how an attempt failed ([`Failure`]: retry or give up) and the exponential
//! backoff between retries ([`JudgeConfig::backoff`]).

use std::time::Duration;

use super::{AttemptError, JudgeConfig, JudgeError};

/// How one attempt ended badly.
pub(super) enum Failure {
    Retry(AttemptError),
    Fatal(JudgeError),
}

impl JudgeConfig {
    /// The wait before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u64.saturating_pow(retry.saturating_sub(1));
        Duration::from_millis(
            self.backoff_initial_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = JudgeConfig::new("http://x").with_retries(
            9,
            Duration::from_millis(100),
            Duration::from_millis(500),
        );
        let waits: Vec<u128> = (1..=5).map(|r| config.backoff(r).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        assert_eq!(config.backoff(200).as_millis(), 500);
    }
}
