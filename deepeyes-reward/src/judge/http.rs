//! [`HttpJudge`]: the judge over an OpenAI-compatible HTTP server, with its request counters
//! ([`JudgeStats`]), model detection, chat completions and the retry loop.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::backoff::Failure;
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
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    verdicts: AtomicU64,
    cache_hits: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
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
