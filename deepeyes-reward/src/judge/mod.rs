//! An LLM judge over any OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs).
//!
//! The judge is consulted only when the rule matchers cannot decide. [`HttpJudge`] posts one
//! `/v1/chat/completions` request per comparison, with:
//! - the model from config, or the first id listed by `/v1/models` (as DeepEyes does);
//! - a timeout per request, bounded retries with jittered exponential backoff (or the server's
//!   `Retry-After`, capped) on transport errors, timeouts, 408/429/5xx replies, malformed JSON
//!   and unreadable verdicts;
//! - a circuit breaker: after `breaker-failures` failed attempts in a row the judge is left
//!   alone for `breaker-cooldown-secs`, and what it would have decided fails at once (the
//!   accuracy term then scores it by the rules, flagged), so a dead judge costs a run seconds,
//!   not hours;
//! - a concurrency limit shared by every thread that uses the judge (the reward API is
//!   synchronous; trainers score from many threads);
//! - an optional on-disk cache of verdicts ([`VerdictCache`]), so re-scoring is free;
//! - a `tracing` event for every verdict with the judge's raw reply.
//!
//! What happens when the judge gives no verdict is the config's choice ([`FailurePolicy`]); by
//! default the answer is scored by the rules and flagged, so no sample is lost.
//!
//! Any other verifier (a local model, a test double) plugs in through [`Verifier`], which
//! closures implement:
//!
//! ```
//! use deepeyes_reward::judge::{JudgeRequest, JudgeVerdict, Verifier};
//!
//! let always_right = |_: &JudgeRequest<'_>| Ok(JudgeVerdict::fresh(true, "VERDICT: CORRECT"));
//! let request = JudgeRequest { prompt: "visual", question: "q", reference: "red", prediction: "crimson" };
//! assert!(always_right.verify(&request).unwrap().correct);
//! ```

mod backoff;
mod breaker;
mod cache;
mod config;
mod http;
mod limit;
mod prompt;
mod verdict;

use serde::{Deserialize, Serialize};

pub use cache::{CACHE_FILE, CachedVerdict, VerdictCache, cache_key};
pub use config::{API_KEY_ENV_PREFIX, JudgeConfig};
pub use http::{HttpJudge, JudgeStats};
pub use prompt::{
    DEFAULT_MARKER, DEFAULT_MATH_TEMPLATE, DEFAULT_SYSTEM, DEFAULT_VISUAL_TEMPLATE, JudgePrompt,
    PLACEHOLDERS, PromptSpec,
};
pub use verdict::parse_verdict;

/// What to do when the judge cannot give a verdict (`on-failure`), or does not answer at
/// start-up (`on-start-failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Fail: the sample's reward is an error (`deepeyes reward` reports the row as bad,
    /// `train` stops), or, at start-up, the command refuses to start.
    Error,
    /// Score by the rules alone (an undecided answer scores 0) and flag the breakdown with
    /// `judge_unavailable_rule_fallback`; at start-up, start anyway with a warning.
    RuleFallback,
}

/// One comparison to judge.
#[derive(Debug, Clone, Copy)]
pub struct JudgeRequest<'a> {
    /// The prompt to use (`visual`, `math`, or a name from config).
    pub prompt: &'a str,
    /// The question asked.
    pub question: &'a str,
    /// The reference answer.
    pub reference: &'a str,
    /// The model's answer.
    pub prediction: &'a str,
}

/// A judge's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgeVerdict {
    /// Whether the prediction was judged correct.
    pub correct: bool,
    /// The judge's reply the verdict was read from.
    pub raw_reply: String,
    /// Whether it came from the cache (no request was made).
    pub cached: bool,
    /// How many requests it took (0 for a cached verdict).
    pub attempts: u32,
}

impl JudgeVerdict {
    /// A verdict that took one request.
    pub fn fresh(correct: bool, raw_reply: impl Into<String>) -> Self {
        Self {
            correct,
            raw_reply: raw_reply.into(),
            cached: false,
            attempts: 1,
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// The connection failed (refused, reset, DNS).
    #[error("transport error: {0}")]
    Transport(String),
    /// The request ran past its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server answered with a retryable status (408, 429, 5xx).
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the reply body.
        body: String,
        /// The wait its `Retry-After` header asked for (seconds form).
        retry_after: Option<std::time::Duration>,
    },
    /// The reply was not the JSON an OpenAI-compatible server sends.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The reply held no readable verdict.
    #[error("no verdict in the reply {reply:?}")]
    Unparseable {
        /// The reply text.
        reply: String,
    },
    /// `/v1/models` listed no model.
    #[error("/v1/models lists no model")]
    NoModel,
}

/// Why the judge gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JudgeError {
    /// Every attempt failed.
    #[error("{url}: gave up after {attempts} attempt(s); last: {last}")]
    Exhausted {
        /// The endpoint.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: AttemptError,
    },
    /// The server refused the request in a way retrying cannot fix (4xx other than 408/429).
    #[error("{url}: HTTP {status} (not retried): {body}")]
    Rejected {
        /// The endpoint.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the reply body.
        body: String,
    },
    /// The circuit breaker is open: the judge failed too often in a row and is not asked
    /// until its cool-down ends.
    #[error(
        "{url}: not asked; the judge failed {failures} time(s) in a row and is left alone for another {wait_ms} ms (circuit breaker open)"
    )]
    CircuitOpen {
        /// The endpoint.
        url: String,
        /// The failed attempts in a row.
        failures: u32,
        /// How long the breaker stays open.
        wait_ms: u64,
    },
    /// The request names a prompt that does not exist.
    #[error("unknown judge prompt {name:?} (known: {known})")]
    UnknownPrompt {
        /// The missing name.
        name: String,
        /// The prompts that exist.
        known: String,
    },
    /// The judge's config is invalid.
    #[error("{0}")]
    Config(String),
    /// A verifier other than [`HttpJudge`] failed.
    #[error("{0}")]
    Other(String),
}

/// Something that judges whether a prediction matches a reference.
pub trait Verifier: Send + Sync {
    /// Judges one comparison.
    fn verify(&self, request: &JudgeRequest<'_>) -> Result<JudgeVerdict, JudgeError>;

    /// A name for logs.
    fn describe(&self) -> String {
        "verifier".to_string()
    }
}

impl<F> Verifier for F
where
    F: Fn(&JudgeRequest<'_>) -> Result<JudgeVerdict, JudgeError> + Send + Sync,
{
    fn verify(&self, request: &JudgeRequest<'_>) -> Result<JudgeVerdict, JudgeError> {
        self(request)
    }
}
