//! An LLM judge over any OpenAI-compatible server (vLLM, SGLang, llama.cpp, hosted APIs).
//!
//! The judge is consulted only when the rule matchers cannot decide. [`HttpJudge`] posts one
//! `/v1/chat/completions` request per comparison, with:
//! - the model from config, or the first id listed by `/v1/models` (as DeepEyes does);
//! - a timeout per request, bounded retries with exponential backoff on transport errors,
//!   timeouts, 408/429/5xx replies, malformed JSON and unreadable verdicts;
//! - a concurrency limit shared by every thread that uses the judge (the reward API is
//!   synchronous; trainers score from many threads);
//! - an optional on-disk cache of verdicts ([`VerdictCache`]), so re-scoring is free;
//! - a `tracing` event for every verdict with the judge's raw reply.
//!
//! What happens when the retries run out is the caller's choice ([`FailurePolicy`]).
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

mod cache;
mod prompt;
mod verdict;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use cache::{CACHE_FILE, CachedVerdict, VerdictCache, cache_key};
pub use prompt::{
    DEFAULT_MARKER, DEFAULT_MATH_TEMPLATE, DEFAULT_SYSTEM, DEFAULT_VISUAL_TEMPLATE, JudgePrompt,
    PLACEHOLDERS, PromptSpec,
};
pub use verdict::parse_verdict;

/// What to do when the judge cannot give a verdict after its retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Fail the sample's reward with the judge's error.
    #[default]
    Error,
    /// Score by the rules alone (an undecided answer scores 0) and flag the breakdown with
    /// `judge_unavailable_rule_fallback`.
    RuleFallback,
}

/// The judge's settings (`[judge]` in a reward config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JudgeConfig {
    /// The server's base URL, with or without a trailing `/v1` (`http://127.0.0.1:18901`).
    pub base_url: String,
    /// The model id; when absent, the first id listed by `/v1/models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The time limit of one HTTP request, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Retries after the first attempt (so `max-retries + 1` attempts in all).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The wait before the first retry, in milliseconds; it doubles with each retry.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// The longest wait between retries, in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// At most this many requests in flight at once, over all threads.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// `max_tokens` of each request; absent leaves it to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// What to do when the retries run out.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// Where verdicts are cached (`verdicts.jsonl` inside it); absent disables the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The environment variable holding a bearer token, for servers that need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Prompt overrides by name; `visual` and `math` exist built in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, PromptSpec>,
}

fn default_timeout_secs() -> f64 {
    60.0
}
fn default_max_retries() -> u32 {
    4
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    8_000
}
fn default_max_concurrency() -> usize {
    16
}

impl JudgeConfig {
    /// A config for the server at `base_url`, with every other setting at its default.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: None,
            timeout_secs: default_timeout_secs(),
            max_retries: default_max_retries(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            max_concurrency: default_max_concurrency(),
            max_tokens: None,
            on_failure: FailurePolicy::default(),
            cache_dir: None,
            api_key_env: None,
            prompts: BTreeMap::new(),
        }
    }

    /// Sets the model id.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the per-request timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_secs = timeout.as_secs_f64();
        self
    }

    /// Sets the retry count and the backoff range.
    #[must_use]
    pub fn with_retries(mut self, max_retries: u32, initial: Duration, max: Duration) -> Self {
        self.max_retries = max_retries;
        self.backoff_initial_ms = u64::try_from(initial.as_millis()).unwrap_or(u64::MAX);
        self.backoff_max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the concurrency limit.
    #[must_use]
    pub fn with_max_concurrency(mut self, max_concurrency: usize) -> Self {
        self.max_concurrency = max_concurrency;
        self
    }

    /// Sets the failure policy.
    #[must_use]
    pub fn with_on_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }

    /// Sets the cache directory.
    #[must_use]
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Overrides (or adds) the prompt called `name`.
    #[must_use]
    pub fn with_prompt(mut self, name: impl Into<String>, spec: PromptSpec) -> Self {
        self.prompts.insert(name.into(), spec);
        self
    }

    /// The prompts this config resolves to: the built-ins with their overrides, plus new ones.
    pub fn resolve_prompts(&self) -> Result<BTreeMap<String, JudgePrompt>, JudgeError> {
        let mut prompts = BTreeMap::new();
        for name in ["visual", "math"] {
            let spec = self.prompts.get(name).cloned().unwrap_or_default();
            let prompt = JudgePrompt::resolve(name, &spec).map_err(JudgeError::Config)?;
            prompts.insert(name.to_string(), prompt);
        }
        for (name, spec) in &self.prompts {
            if !prompts.contains_key(name) {
                let prompt = JudgePrompt::resolve(name, spec).map_err(JudgeError::Config)?;
                prompts.insert(name.clone(), prompt);
            }
        }
        Ok(prompts)
    }

    /// Checks every value; the error names the key at fault.
    pub fn validate(&self) -> Result<(), JudgeError> {
        let bad = |key: &str, why: String| Err(JudgeError::Config(format!("judge.{key}: {why}")));
        let url = self.base_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return bad(
                "base-url",
                format!("{:?} is not an http:// or https:// URL", self.base_url),
            );
        }
        if url.starts_with("https://") && !cfg!(feature = "tls") {
            return bad(
                "base-url",
                format!(
                    "{url} needs TLS, which this build leaves out: rebuild deepeyes-reward with the `tls` feature, or use a plain-HTTP judge"
                ),
            );
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return bad(
                "timeout-secs",
                format!("{} is not a positive number of seconds", self.timeout_secs),
            );
        }
        if self.max_concurrency == 0 {
            return bad("max-concurrency", "must be at least 1".into());
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return bad(
                "backoff-initial-ms",
                format!(
                    "{} exceeds backoff-max-ms ({})",
                    self.backoff_initial_ms, self.backoff_max_ms
                ),
            );
        }
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return bad("model", "is empty; leave it out to auto-detect".into());
        }
        self.resolve_prompts().map(|_| ())
    }

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

/// Counters of an [`HttpJudge`], for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JudgeStats {
    /// HTTP requests sent (chat completions and model listings).
    pub requests: u64,
    /// Verdicts read from replies.
    pub verdicts: u64,
    /// Verdicts served from the cache.
    pub cache_hits: u64,
    /// Retries made.
    pub retries: u64,
    /// Comparisons that got no verdict.
    pub failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    verdicts: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
}

/// A counting semaphore: at most `permits` holders at once.
#[derive(Debug)]
struct Semaphore {
    free: Mutex<usize>,
    released: Condvar,
}

impl Semaphore {
    fn new(permits: usize) -> Self {
        Self {
            free: Mutex::new(permits),
            released: Condvar::new(),
        }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .released
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Permit(self)
    }
}

struct Permit<'a>(&'a Semaphore);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.released.notify_one();
    }
}

/// How one attempt ended badly.
enum Failure {
    Retry(AttemptError),
    Fatal(JudgeError),
}

/// The judge over an OpenAI-compatible HTTP server. Share one per process (`Arc<HttpJudge>`):
/// the concurrency limit, the detected model and the cache are per instance.
pub struct HttpJudge {
    config: JudgeConfig,
    root: String,
    agent: ureq::Agent,
    api_key: Option<String>,
    prompts: BTreeMap<String, JudgePrompt>,
    model: Mutex<Option<String>>,
    limiter: Semaphore,
    cache: Option<VerdictCache>,
    counters: Counters,
}

impl fmt::Debug for HttpJudge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpJudge")
            .field("root", &self.root)
            .field("model", &self.config.model)
            .field("prompts", &self.prompts.keys().collect::<Vec<_>>())
            .field("cache", &self.cache.as_ref().map(VerdictCache::path))
            .finish_non_exhaustive()
    }
}

impl HttpJudge {
    /// Builds the judge: checks the config, resolves the prompts, opens the cache and reads the
    /// API key variable. No request is made yet.
    pub fn new(config: JudgeConfig) -> Result<Self, JudgeError> {
        config.validate()?;
        let prompts = config.resolve_prompts()?;
        let trimmed = config.base_url.trim().trim_end_matches('/');
        let root = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let api_key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                JudgeError::Config(format!(
                    "judge.api-key-env: the environment variable {var} is not set"
                ))
            })?),
            None => None,
        };
        let cache = match &config.cache_dir {
            Some(dir) => Some(VerdictCache::open(dir).map_err(|err| {
                JudgeError::Config(format!(
                    "judge.cache-dir: cannot open the cache in {}: {err}",
                    dir.display()
                ))
            })?),
            None => None,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(config.timeout_secs)))
            .http_status_as_error(false)
            .user_agent(concat!("deepeyes-reward/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            model: Mutex::new(config.model.clone()),
            limiter: Semaphore::new(config.max_concurrency),
            root,
            agent,
            api_key,
            prompts,
            cache,
            counters: Counters::default(),
            config,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    /// What to do when it gives no verdict.
    pub fn on_failure(&self) -> FailurePolicy {
        self.config.on_failure
    }

    /// The resolved prompts.
    pub fn prompts(&self) -> &BTreeMap<String, JudgePrompt> {
        &self.prompts
    }

    /// The verdict cache, when enabled.
    pub fn cache(&self) -> Option<&VerdictCache> {
        self.cache.as_ref()
    }

    /// The counters so far.
    pub fn stats(&self) -> JudgeStats {
        let c = &self.counters;
        JudgeStats {
            requests: c.requests.load(Ordering::Relaxed),
            verdicts: c.verdicts.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.root)
    }

    fn models_url(&self) -> String {
        format!("{}/v1/models", self.root)
    }

    /// The model id: from config, or detected once from `/v1/models` (with the same retries as
    /// a verdict). Call it at start-up to fail fast on a dead judge.
    pub fn resolve_model(&self) -> Result<String, JudgeError> {
        self.with_retries(&self.models_url(), |judge| judge.model_once())
    }

    fn model_once(&self) -> Result<String, Failure> {
        let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = model.as_ref() {
            return Ok(id.clone());
        }
        let url = self.models_url();
        let body = self.send(&url, None)?;
        let parsed: serde_json::Value = serde_json::from_str(&body).map_err(|e| {
            Failure::Retry(AttemptError::Malformed(format!("{e}: {}", clip(&body))))
        })?;
        let data = parsed
            .get("data")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| {
                Failure::Retry(AttemptError::Malformed(format!(
                    "no `data` array in {}",
                    clip(&body)
                )))
            })?;
        let id = data
            .first()
            .ok_or(Failure::Retry(AttemptError::NoModel))?
            .get("id")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                Failure::Retry(AttemptError::Malformed(format!(
                    "the first model has no `id`: {}",
                    clip(&body)
                )))
            })?
            .to_string();
        tracing::info!(url = %url, model = %id, "judge model detected");
        *model = Some(id.clone());
        Ok(id)
    }

    /// Sends one request (a GET when `json` is `None`) and returns the body of a 2xx reply.
    fn send(&self, url: &str, json: Option<&serde_json::Value>) -> Result<String, Failure> {
        let _permit = self.limiter.acquire();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let auth = self.api_key.as_ref().map(|key| format!("Bearer {key}"));
        let result = match json {
            Some(body) => {
                let mut request = self.agent.post(url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.send_json(body)
            }
            None => {
                let mut request = self.agent.get(url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
        };
        let mut response = result.map_err(|err| Failure::Retry(transport_error(err)))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|err| Failure::Retry(transport_error(err)))?;
        match status {
            200..=299 => Ok(body),
            408 | 429 | 500..=599 => Err(Failure::Retry(AttemptError::Status {
                status,
                body: clip(&body),
            })),
            _ => Err(Failure::Fatal(JudgeError::Rejected {
                url: url.to_string(),
                status,
                body: clip(&body),
            })),
        }
    }

    /// One chat completion: the reply's content.
    fn complete_once(&self, prompt: &JudgePrompt, user: &str) -> Result<String, Failure> {
        let model = self.model_once()?;
        let mut body = serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": user},
            ],
            "temperature": prompt.temperature,
            "stream": false,
        });
        if let Some(max_tokens) = self.config.max_tokens {
            body["max_tokens"] = max_tokens.into();
        }
        let text = self.send(&self.chat_url(), Some(&body))?;
        let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Failure::Retry(AttemptError::Malformed(format!("{e}: {}", clip(&text))))
        })?;
        parsed
            .pointer("/choices/0/message/content")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                Failure::Retry(AttemptError::Malformed(format!(
                    "no choices[0].message.content in {}",
                    clip(&text)
                )))
            })
    }

    /// Runs `attempt` until it succeeds, fails fatally, or the retries run out.
    fn with_retries<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut(&Self) -> Result<T, Failure>,
    ) -> Result<T, JudgeError> {
        let attempts = self.config.max_retries.saturating_add(1);
        let mut last = AttemptError::NoModel;
        for n in 1..=attempts {
            if n > 1 {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(self.config.backoff(n - 1));
            }
            match attempt(self) {
                Ok(value) => return Ok(value),
                Err(Failure::Fatal(err)) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(url, error = %err, "judge request rejected");
                    return Err(err);
                }
                Err(Failure::Retry(err)) => {
                    tracing::warn!(url, attempt = n, of = attempts, error = %err, "judge attempt failed");
                    last = err;
                }
            }
        }
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let err = JudgeError::Exhausted {
            url: url.to_string(),
            attempts,
            last,
        };
        tracing::error!(error = %err, "judge request gave up");
        Err(err)
    }
}

impl Verifier for HttpJudge {
    fn verify(&self, request: &JudgeRequest<'_>) -> Result<JudgeVerdict, JudgeError> {
        let prompt = self
            .prompts
            .get(request.prompt)
            .ok_or_else(|| JudgeError::UnknownPrompt {
                name: request.prompt.to_string(),
                known: self.prompts.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let key = cache_key(
            prompt,
            request.question,
            request.reference,
            request.prediction,
        );
        if let Some(hit) = self.cache.as_ref().and_then(|cache| cache.get(&key)) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                key = %&key[..16],
                prompt = %prompt.name,
                correct = hit.correct,
                raw = %hit.raw_reply,
                "judge verdict (cached)"
            );
            return Ok(JudgeVerdict {
                correct: hit.correct,
                raw_reply: hit.raw_reply,
                cached: true,
                attempts: 0,
            });
        }
        let user = prompt.render(request.question, request.reference, request.prediction);
        let started = Instant::now();
        let mut attempts = 0;
        let (correct, reply) = self.with_retries(&self.chat_url(), |judge| {
            attempts += 1;
            let reply = judge.complete_once(prompt, &user)?;
            match parse_verdict(&reply, &prompt.marker) {
                Some(correct) => Ok((correct, reply)),
                None => Err(Failure::Retry(AttemptError::Unparseable { reply })),
            }
        })?;
        self.counters.verdicts.fetch_add(1, Ordering::Relaxed);
        let model = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        tracing::info!(
            key = %&key[..16],
            prompt = %prompt.name,
            model = %model,
            correct,
            attempts,
            elapsed_ms = started.elapsed().as_millis() as u64,
            raw = %reply,
            "judge verdict"
        );
        if let Some(cache) = &self.cache {
            let entry = CachedVerdict {
                key,
                correct,
                raw_reply: reply.clone(),
                model,
                prompt: prompt.name.clone(),
            };
            if let Err(err) = cache.put(entry) {
                tracing::warn!(path = %cache.path().display(), error = %err, "could not cache a judge verdict");
            }
        }
        Ok(JudgeVerdict {
            correct,
            raw_reply: reply,
            cached: false,
            attempts,
        })
    }

    fn describe(&self) -> String {
        format!("judge at {}", self.root)
    }
}

fn transport_error(err: ureq::Error) -> AttemptError {
    match err {
        ureq::Error::Timeout(what) => AttemptError::Timeout(what.to_string()),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            AttemptError::Timeout(io.to_string())
        }
        other => AttemptError::Transport(other.to_string()),
    }
}

/// The first 300 characters of a body, for error messages.
fn clip(text: &str) -> String {
    const LIMIT: usize = 300;
    match text.char_indices().nth(LIMIT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let config: JudgeConfig = toml::from_str("base-url = 'http://127.0.0.1:1'").unwrap();
        assert_eq!(config, JudgeConfig::new("http://127.0.0.1:1"));
        let err = toml::from_str::<JudgeConfig>("base-url = 'http://x'\ntimeout = 3").unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (JudgeConfig::new("ftp://x"), "base-url"),
            (
                JudgeConfig::new("http://x").with_timeout(Duration::ZERO),
                "timeout-secs",
            ),
            (
                JudgeConfig::new("http://x").with_max_concurrency(0),
                "max-concurrency",
            ),
            (
                JudgeConfig::new("http://x").with_retries(
                    1,
                    Duration::from_secs(2),
                    Duration::from_secs(1),
                ),
                "backoff-initial-ms",
            ),
            (JudgeConfig::new("http://x").with_model(" "), "model"),
        ];
        for (config, key) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        if !cfg!(feature = "tls") {
            let err = HttpJudge::new(JudgeConfig::new("https://x")).unwrap_err();
            assert!(err.to_string().contains("`tls` feature"), "{err}");
        }
    }

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
    fn base_urls_with_or_without_v1_reach_the_same_endpoints() {
        for base in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            let judge = HttpJudge::new(JudgeConfig::new(base)).unwrap();
            assert_eq!(judge.chat_url(), "http://h:1/v1/chat/completions");
            assert_eq!(judge.models_url(), "http://h:1/v1/models");
        }
    }

    #[test]
    fn unknown_prompts_are_an_error_not_a_request() {
        let judge = HttpJudge::new(JudgeConfig::new("http://127.0.0.1:9")).unwrap();
        let err = judge
            .verify(&JudgeRequest {
                prompt: "nope",
                question: "",
                reference: "",
                prediction: "",
            })
            .unwrap_err();
        assert!(matches!(err, JudgeError::UnknownPrompt { .. }), "{err}");
        assert_eq!(judge.stats().requests, 0);
    }

    #[test]
    fn clip_keeps_short_bodies_whole() {
        assert_eq!(clip("abc"), "abc");
        assert_eq!(clip(&"é".repeat(400)).chars().count(), 301);
    }
}
