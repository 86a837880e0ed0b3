//! Choosing tokens from logits: greedy, temperature, top-k and top-p sampling with a seeded
//! stream, banned tokens, log-probabilities, and the end-of-generation rules.
//!
//! Backends share this so that the same request gives the same tokens whatever the backend that
//! computed the logits.

use crate::error::{Error, Result};
use crate::model::{FinishReason, SamplingParams};
use crate::rng::Rng;

/// `log_softmax(logits / temperature)` in `f64` accumulation; `temperature ≤ 0` means 1.
pub fn log_softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max) / t).exp()).sum();
    let log_z = sum.ln() as f32;
    logits.iter().map(|&l| (l - max) / t - log_z).collect()
}

/// The log-probability of `token` under `log_softmax(logits / temperature)`.
pub fn token_logprob(logits: &[f32], temperature: f32, token: u32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max) / t).exp()).sum();
    (logits[token as usize] - max) / t - sum.ln() as f32
}

/// Picks tokens for one sequence.
///
/// Log-probabilities are those of the model's temperature-scaled distribution (temperature 1 for
/// greedy), before banned tokens, top-k and top-p are applied: what a trainer recomputes from the
/// same logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler drawing from `seed`'s stream. Fails on parameters outside their ranges.
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        if !(params.temperature >= 0.0 && params.temperature.is_finite()) {
            return Err(Error::config(
                "sampling.temperature",
                format!("must be a finite number ≥ 0, got {}", params.temperature),
            ));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(Error::config(
                "sampling.top-p",
                format!("must be in (0, 1], got {}", params.top_p),
            ));
        }
        Ok(Self {
            params,
            rng: Rng::new(seed),
            scratch: Vec::new(),
        })
    }

    /// The sampling parameters.
    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// Picks the next token from `logits` (one per vocabulary entry), never one of `banned`, and
    /// returns it with its log-probability.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> Result<(u32, f32)> {
        if let Some(i) = logits.iter().position(|l| l.is_nan()) {
            return Err(Error::Model(format!(
                "the model produced a NaN logit (token {i})"
            )));
        }
        let allowed = |i: usize| !banned.contains(&(i as u32));
        let token = if self.params.temperature == 0.0 {
            let mut best: Option<(usize, f32)> = None;
            for (i, &l) in logits.iter().enumerate() {
                if allowed(i) && best.is_none_or(|(_, b)| l > b) {
                    best = Some((i, l));
                }
            }
            best.map(|(i, _)| i as u32)
        } else {
            self.draw(logits, &allowed)
        };
        let token = token.ok_or_else(|| {
            Error::Model(format!(
                "no token can be sampled: all {} tokens are banned or have zero probability",
                logits.len()
            ))
        })?;
        Ok((token, token_logprob(logits, self.params.temperature, token)))
    }

    fn draw(&mut self, logits: &[f32], allowed: &dyn Fn(usize) -> bool) -> Option<u32> {
        let t = self.params.temperature;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(i, &l)| allowed(i) && l > f32::NEG_INFINITY)
                .map(|(i, &l)| (l / t, i as u32)),
        );
        if cands.is_empty() {
            return None;
        }
        // Highest first; ties by token id so the order never depends on the sort algorithm.
        let by_score = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_score);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_score);
        let max = cands[0].0;
        let weights: Vec<f64> = cands
            .iter()
            .map(|&(s, _)| f64::from(s - max).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut keep = weights.len();
        if self.params.top_p < 1.0 {
            let target = f64::from(self.params.top_p) * total;
            let mut acc = 0.0;
            for (j, w) in weights.iter().enumerate() {
                acc += w;
                if acc >= target {
                    keep = j + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = weights[..keep].iter().sum();
        let mut u = self.rng.next_f64() * kept_total;
        for (j, w) in weights[..keep].iter().enumerate() {
            if u < *w {
                return Some(cands[j].1);
            }
            u -= w;
        }
        Some(cands[keep - 1].1)
    }
}

/// Decides when a generation ends: an end-of-sequence token, a stop sequence (kept in the
/// output), or the token budget.
#[derive(Debug, Clone)]
pub struct StopRule<'a> {
    eos: &'a [u32],
    stop_sequences: &'a [Vec<u32>],
    max_new_tokens: usize,
}

impl<'a> StopRule<'a> {
    /// A rule ending at any of `eos`, any non-empty sequence of `stop_sequences`, or after
    /// `max_new_tokens` tokens.
    pub fn new(eos: &'a [u32], stop_sequences: &'a [Vec<u32>], max_new_tokens: usize) -> Self {
        Self {
            eos,
            stop_sequences,
            max_new_tokens,
        }
    }

    /// Whether `generated` (all tokens produced so far) is finished, and why.
    pub fn check(&self, generated: &[u32]) -> Option<FinishReason> {
        let last = generated.last()?;
        if self.eos.contains(last)
            || self
                .stop_sequences
                .iter()
                .any(|s| !s.is_empty() && generated.ends_with(s))
        {
            return Some(FinishReason::Stop);
        }
        (generated.len() >= self.max_new_tokens).then_some(FinishReason::Length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
        }
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0], 1.0);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[2] - token_logprob(&[1.0, 2.0, 3.0], 1.0, 2)).abs() < 1e-7);
        // Temperature flattens.
        let hot = log_softmax(&[1.0, 2.0, 3.0], 10.0);
        assert!(hot[2] - hot[0] < lp[2] - lp[0]);
    }

    #[test]
    fn greedy_takes_the_best_allowed_token() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        let logits = [0.0, 5.0, 3.0, 4.0];
        let (t, lp) = s.sample(&logits, &[]).unwrap();
        assert_eq!(t, 1);
        assert!((lp - token_logprob(&logits, 1.0, 1)).abs() < 1e-7);
        let (t, _) = s.sample(&logits, &[1]).unwrap();
        assert_eq!(t, 3);
        assert!(s.sample(&logits, &[0, 1, 2, 3]).is_err());
        assert!(s.sample(&[0.0, f32::NAN], &[]).is_err());
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.9, 20), seed).unwrap();
            (0..30)
                .map(|_| s.sample(&logits, &[]).unwrap().0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = [0.0, 1.0, 2.0, 3.0, 10.0, 9.9];
        let mut k2 = Sampler::new(params(1.0, 1.0, 2), 1).unwrap();
        let mut p = Sampler::new(params(1.0, 0.3, 0), 1).unwrap();
        for _ in 0..200 {
            let (t, _) = k2.sample(&logits, &[]).unwrap();
            assert!(t == 4 || t == 5, "top-k 2 drew {t}");
            // Token 4 alone holds about half the mass, more than 0.3.
            assert_eq!(p.sample(&logits, &[]).unwrap().0, 4);
        }
        // Banned tokens are never drawn, even when they dominate.
        let mut s = Sampler::new(params(1.0, 1.0, 0), 2).unwrap();
        for _ in 0..200 {
            let (t, _) = s.sample(&logits, &[4, 5]).unwrap();
            assert!(t < 4);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let mut s = Sampler::new(params(1.0, 1.0, 0), 9).unwrap();
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(&logits, &[]).unwrap().0 == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.015, "frequency {freq}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Sampler::new(params(-1.0, 1.0, 0), 0).is_err());
        assert!(Sampler::new(params(f32::NAN, 1.0, 0), 0).is_err());
        assert!(Sampler::new(params(1.0, 0.0, 0), 0).is_err());
        assert!(Sampler::new(params(1.0, 1.5, 0), 0).is_err());
    }

    #[test]
    fn stop_rule() {
        let stops = vec![vec![7, 8]];
        let rule = StopRule::new(&[2], &stops, 4);
        assert_eq!(rule.check(&[]), None);
        assert_eq!(rule.check(&[5]), None);
        assert_eq!(rule.check(&[5, 2]), Some(FinishReason::Stop));
        assert_eq!(rule.check(&[7, 8]), Some(FinishReason::Stop));
        assert_eq!(rule.check(&[8, 7]), None);
        assert_eq!(rule.check(&[1, 1, 1, 1]), Some(FinishReason::Length));
    }
}
