//! The retry policy: how an attempt failed ([`Failure`]: retry, give up, or the breaker is
//! open) and the wait before a retry ([`JudgeConfig::retry_wait`]): the server's `Retry-After`
//! when it sent one, capped, else an exponential backoff with jitter.

use std::time::Duration;

use super::{AttemptError, JudgeConfig, JudgeError};

/// How one attempt ended badly.
pub(super) enum Failure {
    /// Worth another attempt.
    Retry(AttemptError),
    /// Another attempt would fail the same way.
    Fatal(JudgeError),
    /// The circuit breaker is open: no request was made.
    Open(JudgeError),
}

impl JudgeConfig {
    /// The backoff before retry number `retry` (1-based), without jitter: `backoff-initial-ms`
    /// doubled per retry, capped at `backoff-max-ms`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u64.saturating_pow(retry.saturating_sub(1));
        Duration::from_millis(
            self.backoff_initial_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }

    /// The wait before retry number `retry` (1-based). A `Retry-After` the server sent is
    /// honoured up to `backoff-max-ms`; otherwise the backoff is spread over its upper half by
    /// `jitter` (in `[0, 1)`), so threads that failed together do not retry together.
    pub fn retry_wait(&self, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let cap = Duration::from_millis(self.backoff_max_ms);
        if let Some(asked) = retry_after {
            return asked.min(cap);
        }
        self.backoff(retry)
            .mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// The seconds form of a `Retry-After` header (`120`); the HTTP-date form is not read (the
/// exponential backoff applies instead).
pub(super) fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9)))
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

    #[test]
    fn jitter_spreads_the_upper_half_and_retry_after_wins_up_to_the_cap() {
        let config = JudgeConfig::new("http://x").with_retries(
            9,
            Duration::from_millis(100),
            Duration::from_millis(500),
        );
        assert_eq!(config.retry_wait(2, None, 0.0).as_millis(), 100);
        assert_eq!(config.retry_wait(2, None, 0.5).as_millis(), 150);
        assert!(config.retry_wait(2, None, 0.999).as_millis() <= 200);
        assert_eq!(config.retry_wait(3, None, 1.0).as_millis(), 400);
        let asked = Some(Duration::from_millis(300));
        assert_eq!(config.retry_wait(1, asked, 0.9).as_millis(), 300);
        let too_long = Some(Duration::from_secs(3600));
        assert_eq!(config.retry_wait(1, too_long, 0.9).as_millis(), 500);
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
