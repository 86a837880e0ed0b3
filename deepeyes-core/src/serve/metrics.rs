//! The server's counters, written in Prometheus' text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Upper bounds of the request-latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds of the batch-size buckets, in episodes per generate round.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Count per bucket (not cumulative; the exposition sums them).
    counts: Vec<AtomicU64>,
    /// Sum of observed values, in millionths.
    sum_micros: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6).round() as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.total.load(Ordering::Relaxed));
    }
}

/// Requests, tokens, latency, batch sizes and queue depth of one server.
#[derive(Debug)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    latency: Histogram,
    batch: Histogram,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BUCKETS),
            batch: Histogram::new(&BATCH_BUCKETS),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }
}

impl Metrics {
    /// Counts one answered request of `route` with HTTP `status`, and its latency.
    pub(crate) fn request(&self, route: &'static str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((route, status))
            .or_default() += 1;
        self.latency.observe(seconds);
    }

    /// Counts the tokens of one answered request.
    pub(crate) fn tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// Records the size of one generate round.
    pub(crate) fn observe_batch(&self, episodes: usize) {
        self.batch.observe(episodes as f64);
    }

    /// Sets how many requests wait for room in the batch.
    pub(crate) fn set_waiting(&self, requests: usize) {
        self.waiting.store(requests, Ordering::Relaxed);
    }

    /// Admits one more request unless `limit` are already in flight; the ticket releases the
    /// place when dropped.
    pub(crate) fn admit(self: &std::sync::Arc<Self>, limit: usize) -> Option<Ticket> {
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Ticket {
                        metrics: self.clone(),
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    /// The exposition text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP deepeyes_requests_total Answered HTTP requests by route and status.\n# TYPE deepeyes_requests_total counter"
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "deepeyes_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "deepeyes_prompt_tokens_total",
                "Prompt tokens of answered requests (image tokens included).",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "deepeyes_completion_tokens_total",
                "Tokens generated for answered requests, all turns.",
                self.completion_tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let gauges = [
            (
                "deepeyes_requests_in_flight",
                "Requests admitted and not yet answered.",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "deepeyes_requests_waiting",
                "Requests waiting for room in the batch.",
                self.waiting.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        self.latency.write(
            &mut out,
            "deepeyes_request_duration_seconds",
            "Time from a request's arrival to its full answer.",
        );
        self.batch.write(
            &mut out,
            "deepeyes_batch_episodes",
            "Episodes stepped in one batched generate round.",
        );
        out
    }
}

/// A request's place among those in flight.
#[derive(Debug)]
pub(crate) struct Ticket {
    metrics: std::sync::Arc<Metrics>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn admission_stops_at_the_limit_and_tickets_give_places_back() {
        let metrics = Arc::new(Metrics::default());
        let a = metrics.admit(2).expect("first");
        let _b = metrics.admit(2).expect("second");
        assert!(metrics.admit(2).is_none(), "a third is refused");
        drop(a);
        assert!(metrics.admit(2).is_some(), "a place came back");
        assert!(metrics.render().contains("deepeyes_requests_in_flight 1"));
    }

    #[test]
    fn the_exposition_has_cumulative_buckets_and_labelled_counters() {
        let metrics = Metrics::default();
        metrics.request("chat", 200, 0.2);
        metrics.request("chat", 200, 3.0);
        metrics.request("chat", 400, 0.01);
        metrics.observe_batch(3);
        metrics.tokens(10, 4);
        let text = metrics.render();
        for line in [
            "deepeyes_requests_total{route=\"chat\",status=\"200\"} 2",
            "deepeyes_requests_total{route=\"chat\",status=\"400\"} 1",
            "deepeyes_request_duration_seconds_bucket{le=\"0.05\"} 1",
            "deepeyes_request_duration_seconds_bucket{le=\"0.25\"} 2",
            "deepeyes_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "deepeyes_request_duration_seconds_count 3",
            "deepeyes_batch_episodes_bucket{le=\"2\"} 0",
            "deepeyes_batch_episodes_bucket{le=\"4\"} 1",
            "deepeyes_prompt_tokens_total 10",
            "deepeyes_completion_tokens_total 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
