//! The judge's settings ([`JudgeConfig`], `[judge]` in a reward config): their defaults, builder
//! methods, prompt resolution and validation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{FailurePolicy, JudgeError, JudgePrompt, PromptSpec};

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
    /// What to do when the judge gives no verdict (retries run out, the breaker is open):
    /// `rule-fallback` (default) scores the answer by the rules and flags it; `error` fails the
    /// sample.
    #[serde(default = "default_on_failure")]
    pub on_failure: FailurePolicy,
    /// What `train`, `reward` and `eval` do when the judge does not answer at start-up:
    /// `error` (default) refuses to start; `rule-fallback` starts anyway, with a warning.
    #[serde(default = "default_on_start_failure")]
    pub on_start_failure: FailurePolicy,
    /// Failed attempts in a row (over every thread) that open the circuit breaker; 0 turns it
    /// off.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker leaves the judge alone, in seconds, before one probe request.
    #[serde(default = "default_breaker_cooldown_secs")]
    pub breaker_cooldown_secs: f64,
    /// Where verdicts are cached (`verdicts.jsonl` inside it); absent disables the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// The environment variable holding a bearer token, for servers that need one. Its value is
    /// sent to `base-url`, so only names starting with [`API_KEY_ENV_PREFIX`], or allowed on the
    /// command line (`--allow-env NAME`, [`JudgeConfig::allow_env`]), are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Prompt overrides by name; `visual` and `math` exist built in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, PromptSpec>,
    /// Environment variables `api-key-env` may name besides those starting with
    /// [`API_KEY_ENV_PREFIX`]. Never read from a file: a config must not grant itself access to
    /// the user's secrets, so only the command line (`--allow-env`) fills it.
    #[serde(skip)]
    pub allowed_env: BTreeSet<String>,
}

/// The prefix of the environment variables `api-key-env` may always name.
pub const API_KEY_ENV_PREFIX: &str = "DEEPEYES_JUDGE_";

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
fn default_on_failure() -> FailurePolicy {
    FailurePolicy::RuleFallback
}
fn default_on_start_failure() -> FailurePolicy {
    FailurePolicy::Error
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_secs() -> f64 {
    30.0
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
            on_failure: default_on_failure(),
            on_start_failure: default_on_start_failure(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_secs: default_breaker_cooldown_secs(),
            cache_dir: None,
            api_key_env: None,
            prompts: BTreeMap::new(),
            allowed_env: BTreeSet::new(),
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

    /// Sets the start-up policy.
    #[must_use]
    pub fn with_on_start_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_start_failure = policy;
        self
    }

    /// Sets the circuit breaker: `failures` in a row open it (0: never) for `cooldown`.
    #[must_use]
    pub fn with_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown_secs = cooldown.as_secs_f64();
        self
    }

    /// Sets the API key variable.
    #[must_use]
    pub fn with_api_key_env(mut self, var: impl Into<String>) -> Self {
        self.api_key_env = Some(var.into());
        self
    }

    /// Allows `api-key-env` to name these variables too (what `--allow-env` grants).
    #[must_use]
    pub fn allow_env<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_env.extend(names.into_iter().map(Into::into));
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
        if !(self.breaker_cooldown_secs.is_finite() && self.breaker_cooldown_secs >= 0.0) {
            return bad(
                "breaker-cooldown-secs",
                format!(
                    "{} is not a non-negative number of seconds",
                    self.breaker_cooldown_secs
                ),
            );
        }
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return bad("model", "is empty; leave it out to auto-detect".into());
        }
        self.check_api_key_env()?;
        self.resolve_prompts().map(|_| ())
    }

    /// Refuses an `api-key-env` the user did not allow: its value would go to `base-url`, so a
    /// config from elsewhere could otherwise send any secret of the environment to its server.
    fn check_api_key_env(&self) -> Result<(), JudgeError> {
        match &self.api_key_env {
            Some(var)
                if !var.starts_with(API_KEY_ENV_PREFIX) && !self.allowed_env.contains(var) =>
            {
                Err(JudgeError::Config(format!(
                    "judge.api-key-env: the environment variable {var} is not allowed (its value would be sent to {}); \
                     name a variable starting with {API_KEY_ENV_PREFIX}, or allow this one with --allow-env {var}",
                    self.base_url
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::HttpJudge;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let config: JudgeConfig = toml::from_str("base-url = 'http://127.0.0.1:1'").unwrap();
        assert_eq!(config, JudgeConfig::new("http://127.0.0.1:1"));
        let err = toml::from_str::<JudgeConfig>("base-url = 'http://x'\ntimeout = 3").unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
    }

    #[test]
    fn api_key_env_reads_only_allowed_names() {
        let config = JudgeConfig::new("http://judge:1").with_api_key_env("HOME");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("judge.api-key-env"), "{err}");
        assert!(
            err.contains("HOME") && err.contains("--allow-env HOME"),
            "{err}"
        );
        assert!(err.contains(API_KEY_ENV_PREFIX), "{err}");
        config.clone().allow_env(["HOME"]).validate().unwrap();
        JudgeConfig::new("http://judge:1")
            .with_api_key_env("DEEPEYES_JUDGE_TOKEN")
            .validate()
            .unwrap();
        // A file cannot grant itself a variable: the allow-list is not a config key.
        let err = toml::from_str::<JudgeConfig>(
            "base-url = 'http://x'\napi-key-env = 'HOME'\nallowed-env = ['HOME']",
        )
        .unwrap_err();
        assert!(err.to_string().contains("allowed-env"), "{err}");
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
            (
                JudgeConfig::new("http://x").with_breaker(3, Duration::ZERO),
                "ok",
            ),
            (
                JudgeConfig {
                    breaker_cooldown_secs: f64::NAN,
                    ..JudgeConfig::new("http://x")
                },
                "breaker-cooldown-secs",
            ),
        ];
        for (config, key) in cases {
            if key == "ok" {
                config.validate().unwrap();
                continue;
            }
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        if !cfg!(feature = "tls") {
            let err = HttpJudge::new(JudgeConfig::new("https://x")).unwrap_err();
            assert!(err.to_string().contains("`tls` feature"), "{err}");
        }
    }
}
