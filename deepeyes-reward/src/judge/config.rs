//! The judge's settings ([`JudgeConfig`], `[judge]` in a reward config): their defaults, builder
//! methods, prompt resolution and validation.

use std::collections::BTreeMap;
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
}
