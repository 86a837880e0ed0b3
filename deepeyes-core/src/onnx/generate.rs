//! Generation on [`OnnxModel`]: the [`VisionLanguageModel`] implementation.
//!
//! A batch of requests is prepared one by one (images through the feature cache), prefilled
//! together, and decoded together, one token per row per decoder call, until every row has
//! stopped. Requests with the same context (the samples of a GRPO group) share one prefill: the
//! cache rows are copied after it.

use crate::error::{Error, Result};
use crate::model::{FinishReason, GenerateRequest, Generation, TokenCodec, VisionLanguageModel};
use crate::preprocess::PreprocessConfig;
use crate::sampling::{Sampler, StopRule};

use super::decode::LogitsOf;
use super::error::OnnxResult;
use super::model::OnnxModel;
use super::prompt::PreparedPrompt;

/// One row being decoded.
struct Active<'r> {
    request: &'r GenerateRequest<'r>,
    sampler: Sampler,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: Option<FinishReason>,
}

impl OnnxModel {
    /// Generates for `requests` as one batch, from their already prepared contexts
    /// (`prompts[i]` is `requests[i]`'s context; the requests' own tokens and images are not
    /// read). This is [`VisionLanguageModel::generate_batch`] without the image preprocessing.
    pub fn generate_prepared(
        &self,
        requests: &[&GenerateRequest<'_>],
        prompts: &[PreparedPrompt],
    ) -> OnnxResult<Vec<Generation>> {
        let b = requests.len();
        if prompts.len() != b {
            return Err(Error::Model(format!("{} prompts for {b} requests", prompts.len())).into());
        }
        if b == 0 {
            return Ok(Vec::new());
        }
        let eos = &self.config().tokens.eos;
        let mut rows: Vec<Active<'_>> = Vec::with_capacity(b);
        for r in requests {
            rows.push(Active {
                request: r,
                sampler: Sampler::new(r.sampling, r.seed)?,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: (r.max_new_tokens == 0).then_some(FinishReason::Length),
            });
        }
        if rows.iter().all(|r| r.finish.is_some()) {
            return Ok(rows.into_iter().map(finish).collect());
        }

        // Identical contexts are prefilled once.
        let mut unique: Vec<usize> = Vec::new();
        let mut source = Vec::with_capacity(b);
        for (i, p) in prompts.iter().enumerate() {
            match unique.iter().position(|&u| same_context(&prompts[u], p)) {
                Some(k) if self.cache_is_f32() => source.push(k),
                _ => {
                    source.push(unique.len());
                    unique.push(i);
                }
            }
        }
        let refs: Vec<&PreparedPrompt> = unique.iter().map(|&i| &prompts[i]).collect();
        let (first, state) = self.prefill(&refs, LogitsOf::Last)?;
        let mut state = if unique.len() == b {
            state
        } else {
            self.gather_rows(&state, &source)?
        };
        let mut logits: Vec<Vec<f32>> = source.iter().map(|&k| first[k].clone()).collect();

        let pad = self.config().tokens.pad;
        loop {
            let mut feed = Vec::with_capacity(b);
            for (row, l) in rows.iter_mut().zip(&logits) {
                if row.finish.is_none() {
                    let (token, lp) = row.sampler.sample(l, row.request.banned_tokens)?;
                    row.tokens.push(token);
                    row.logprobs.push(lp);
                    let rule =
                        StopRule::new(eos, row.request.stop_sequences, row.request.max_new_tokens);
                    row.finish = rule.check(&row.tokens);
                }
                feed.push(if row.finish.is_none() {
                    *row.tokens.last().unwrap_or(&pad)
                } else {
                    pad
                });
            }
            if rows.iter().all(|r| r.finish.is_some()) {
                break;
            }
            logits = self.step(&mut state, &feed)?;
        }
        Ok(rows.into_iter().map(finish).collect())
    }
}

fn finish(row: Active<'_>) -> Generation {
    Generation {
        tokens: row.tokens,
        logprobs: row.logprobs,
        finish: row.finish.unwrap_or(FinishReason::Length),
    }
}

fn same_context(a: &PreparedPrompt, b: &PreparedPrompt) -> bool {
    a.input_ids == b.input_ids
        && a.grids == b.grids
        && (std::sync::Arc::ptr_eq(&a.features, &b.features) || a.features == b.features)
}

impl VisionLanguageModel for OnnxModel {
    fn generate(&self, request: &GenerateRequest<'_>) -> Result<Generation> {
        let prompt = self.prepare_images(request.tokens, request.images)?;
        let mut out = self.generate_prepared(&[request], std::slice::from_ref(&prompt))?;
        Ok(out.remove(0))
    }

    fn codec(&self) -> &dyn TokenCodec {
        self.tokenizer()
    }

    fn generate_batch(&self, requests: &[GenerateRequest<'_>]) -> Vec<Result<Generation>> {
        let mut results: Vec<Option<Result<Generation>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut ready: Vec<(usize, PreparedPrompt)> = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            match self.prepare_images(r.tokens, r.images) {
                Ok(p) => ready.push((i, p)),
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        for group in ready.chunks(self.options().max_batch) {
            let reqs: Vec<&GenerateRequest<'_>> =
                group.iter().map(|(i, _)| &requests[*i]).collect();
            let prompts: Vec<PreparedPrompt> = group.iter().map(|(_, p)| p.clone()).collect();
            match self.generate_prepared(&reqs, &prompts) {
                Ok(gens) => {
                    for ((i, _), g) in group.iter().zip(gens) {
                        results[*i] = Some(Ok(g));
                    }
                }
                Err(e) => {
                    let msg = Error::from(e).to_string();
                    for (i, _) in group {
                        results[*i] = Some(Err(Error::Model(msg.clone())));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::Invariant("a request was not answered".into())))
            })
            .collect()
    }

    fn preprocess_config(&self) -> PreprocessConfig {
        self.config().preprocess
    }
}
