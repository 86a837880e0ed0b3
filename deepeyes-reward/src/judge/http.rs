//! [`HttpJudge`]: the judge over an OpenAI-compatible HTTP server, with its request counters
//! ([`JudgeStats`]), model detection, the start-up probe, chat completions and the retry loop
//! (behind the circuit breaker).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use deepeyes_core::Rng;
use serde::Serialize;

use super::backoff::{Failure, parse_retry_after};
use super::breaker::Breaker;
use super::limit::Semaphore;
use super::{
    AttemptError, CachedVerdict, FailurePolicy, JudgeConfig, JudgeError, JudgePrompt, JudgeRequest,
    JudgeVerdict, VerdictCache, Verifier, cache_key, parse_verdict,
};

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
    /// Requests not made because the circuit breaker was open.
    pub short_circuited: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    verdicts: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    short_circuited: AtomicU64,
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
    breaker: Breaker,
    /// Spreads the retries of threads that failed together.
    jitter: Mutex<Rng>,
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
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Self {
            model: Mutex::new(config.model.clone()),
            limiter: Semaphore::new(config.max_concurrency),
            breaker: Breaker::new(
                config.breaker_failures,
                Duration::from_secs_f64(config.breaker_cooldown_secs),
            ),
            jitter: Mutex::new(Rng::new(seed)),
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
            short_circuited: c.short_circuited.load(Ordering::Relaxed),
        }
    }

    fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.root)
    }

    fn models_url(&self) -> String {
        format!("{}/v1/models", self.root)
    }

    /// The model id: from config, or detected once from `/v1/models` (with the same retries as
    /// a verdict).
    pub fn resolve_model(&self) -> Result<String, JudgeError> {
        // Known already: no attempt, so nothing for the breaker to count as a success.
        if let Some(id) = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(id);
        }
        self.with_retries(&self.models_url(), |judge| judge.model_once())
    }

    /// The start-up check: asks `/v1/models` (with the retries of a verdict) even when the
    /// model is configured, so a dead or misaddressed judge is found before any work, and
    /// returns the model id. Warns when a configured model is not listed.
    pub fn probe(&self) -> Result<String, JudgeError> {
        let url = self.models_url();
        let listed = self.with_retries(&url, |judge| judge.list_models_once())?;
        let configured = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match configured {
            Some(model) => {
                if !listed.contains(&model) {
                    tracing::warn!(url = %url, model = %model, listed = ?listed, "the configured judge model is not listed by the server");
                }
                Ok(model)
            }
            None => self.resolve_model(),
        }
    }

    /// The ids `/v1/models` lists, in its order; an empty list, or a first entry without an
    /// id, is a failure.
    fn list_models_once(&self) -> Result<Vec<String>, Failure> {
        let body = self.send(&self.models_url(), None)?;
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
        let id = |entry: &serde_json::Value| {
            entry
                .get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        match data.first() {
            None => Err(Failure::Retry(AttemptError::NoModel)),
            Some(first) if id(first).is_none() => Err(Failure::Retry(AttemptError::Malformed(
                format!("the first model has no `id`: {}", clip(&body)),
            ))),
            Some(_) => Ok(data.iter().filter_map(id).collect()),
        }
    }

    fn model_once(&self) -> Result<String, Failure> {
        let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = model.as_ref() {
            return Ok(id.clone());
        }
        let url = self.models_url();
        let id = self
            .list_models_once()?
            .into_iter()
            .next()
            .ok_or(Failure::Retry(AttemptError::NoModel))?;
        tracing::info!(url = %url, model = %id, "judge model detected");
        *model = Some(id.clone());
        Ok(id)
    }

    /// Sends one request (a GET when `json` is `None`) and returns the body of a 2xx reply.
    fn send(&self, url: &str, json: Option<&serde_json::Value>) -> Result<String, Failure> {
        let _permit = self.limiter.acquire();
        // Asked after the permit: a thread that queued while the judge was failing must not
        // send once the breaker opened.
        if let Err(wait) = self.breaker.admit() {
            self.counters
                .short_circuited
                .fetch_add(1, Ordering::Relaxed);
            return Err(Failure::Open(JudgeError::CircuitOpen {
                url: url.to_string(),
                failures: self.breaker.consecutive(),
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            }));
        }
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
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|err| Failure::Retry(transport_error(err)))?;
        match status {
            200..=299 => Ok(body),
            408 | 429 | 500..=599 => Err(Failure::Retry(AttemptError::Status {
                status,
                body: clip(&body),
                retry_after,
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

    /// Runs `attempt` until it succeeds, fails fatally, the breaker opens, or the retries run
    /// out. Every attempt's outcome feeds the breaker.
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
                std::thread::sleep(self.retry_wait(n - 1, &last));
            }
            match attempt(self) {
                Ok(value) => {
                    self.breaker.success();
                    return Ok(value);
                }
                Err(Failure::Open(err)) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(url, error = %err, "judge not asked");
                    return Err(err);
                }
                Err(Failure::Fatal(err)) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    self.note_failure(url);
                    tracing::error!(url, error = %err, "judge request rejected");
                    return Err(err);
                }
                Err(Failure::Retry(err)) => {
                    tracing::warn!(url, attempt = n, of = attempts, error = %err, "judge attempt failed");
                    self.note_failure(url);
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

impl HttpJudge {
    /// The wait before retry `retry` after `last` failed: its `Retry-After`, or a jittered
    /// backoff.
    fn retry_wait(&self, retry: u32, last: &AttemptError) -> Duration {
        let asked = match last {
            AttemptError::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        let jitter = self
            .jitter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_f64();
        self.config.retry_wait(retry, asked, jitter)
    }

    /// Feeds a failed attempt to the breaker, saying so when it opens.
    fn note_failure(&self, url: &str) {
        if self.breaker.failure() {
            tracing::error!(
                url,
                failures = self.breaker.consecutive(),
                cooldown_s = self.config.breaker_cooldown_secs,
                "judge circuit breaker open: not asking the judge during the cool-down; undecided answers get the rule fallback"
            );
        }
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
        // The model is part of the key, so it is known (configured or detected) first.
        let model = self.resolve_model()?;
        let key = cache_key(
            &model,
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
