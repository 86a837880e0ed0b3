//! An on-disk cache of judge verdicts: one JSON line per verdict in `verdicts.jsonl`, keyed by a
//! SHA-256 of the judge model, the prompt (system message and template) and the compared texts.
//!
//! Keys made before the model was part of them (`deepeyes-judge-cache-v1`) can never equal a
//! key made now, so the verdicts of an older cache file are kept on disk but never served:
//! every comparison is asked again once and cached under its new key.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::prompt::JudgePrompt;

/// The file name inside the cache directory.
pub const CACHE_FILE: &str = "verdicts.jsonl";

/// One cached verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedVerdict {
    /// The cache key ([`cache_key`]).
    pub key: String,
    /// The verdict.
    pub correct: bool,
    /// The judge's reply it was read from.
    pub raw_reply: String,
    /// The model that gave it.
    pub model: String,
    /// The prompt name.
    pub prompt: String,
}

/// The key of a comparison: a SHA-256 over the judge model, the prompt's system message and
/// template, the question, the reference and the prediction (each length-prefixed, so no two
/// different inputs share a preimage). So one cache directory may serve several judge models,
/// each seeing only its own verdicts. Temperature is not part of it.
pub fn cache_key(
    model: &str,
    prompt: &JudgePrompt,
    question: &str,
    reference: &str,
    prediction: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"deepeyes-judge-cache-v2");
    for part in [
        model,
        prompt.system.as_str(),
        prompt.template.as_str(),
        question,
        reference,
        prediction,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

/// The verdicts of a cache directory, loaded at open and appended to as new ones arrive.
/// Several processes may append to the same file; a later duplicate key wins on reload.
#[derive(Debug)]
pub struct VerdictCache {
    path: PathBuf,
    entries: Mutex<HashMap<String, CachedVerdict>>,
    file: Mutex<File>,
}

impl VerdictCache {
    /// Opens (creating if needed) the cache in `dir`. Lines that do not parse (a write cut short
    /// by a crash) are skipped with a warning.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(CACHE_FILE);
        let mut entries = HashMap::new();
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err),
        };
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<CachedVerdict>(line) {
                Ok(entry) => {
                    entries.insert(entry.key.clone(), entry);
                }
                Err(err) => tracing::warn!(
                    path = %path.display(),
                    line = index + 1,
                    error = %err,
                    "skipping an unreadable judge cache line"
                ),
            }
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A line cut short by a crash must not swallow the next verdict.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        tracing::debug!(path = %path.display(), verdicts = entries.len(), "judge cache opened");
        Ok(Self {
            path,
            entries: Mutex::new(entries),
            file: Mutex::new(file),
        })
    }

    /// The file the verdicts live in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many verdicts the cache holds.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the cache holds no verdict.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The verdict stored under `key`.
    pub fn get(&self, key: &str) -> Option<CachedVerdict> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Stores a verdict, in memory and on disk (one line, flushed).
    pub fn put(&self, entry: CachedVerdict) -> std::io::Result<()> {
        let mut line = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
        line.push('\n');
        {
            let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            file.write_all(line.as_bytes())?;
            file.flush()?;
        }
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.key.clone(), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, correct: bool) -> CachedVerdict {
        CachedVerdict {
            key: key.into(),
            correct,
            raw_reply: "VERDICT: CORRECT".into(),
            model: "m".into(),
            prompt: "visual".into(),
        }
    }

    #[test]
    fn keys_separate_every_field() {
        let p = JudgePrompt::builtin("visual").unwrap();
        let a = cache_key("m", &p, "q", "ab", "c");
        assert_eq!(a, cache_key("m", &p, "q", "ab", "c"));
        assert_ne!(a, cache_key("m", &p, "q", "a", "bc"));
        assert_ne!(a, cache_key("m", &p, "qa", "b", "c"));
        assert_ne!(a, cache_key("m2", &p, "q", "ab", "c"));
        assert_ne!(a, cache_key("", &p, "mq", "ab", "c"));
        let m = JudgePrompt::builtin("math").unwrap();
        assert_ne!(a, cache_key("m", &m, "q", "ab", "c"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn verdicts_survive_a_reopen_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = VerdictCache::open(dir.path()).unwrap();
            cache.put(entry("k1", true)).unwrap();
            cache.put(entry("k2", false)).unwrap();
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(CACHE_FILE))
            .unwrap();
        file.write_all(b"{\"key\": \"k3\", \"corr").unwrap();
        drop(file);
        let cache = VerdictCache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 2);
        cache.put(entry("k4", true)).unwrap();
        drop(cache);
        let cache = VerdictCache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get("k1").map(|e| e.correct), Some(true));
        assert_eq!(cache.get("k2").map(|e| e.correct), Some(false));
        assert!(cache.get("k3").is_none());
    }
}
