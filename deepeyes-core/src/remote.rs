//! Rollouts on remote inference servers that speak SGLang's native API (`deepeyes serve`, or an
//! SGLang fleet): a [`VisionLanguageModel`] whose generate calls are `POST /generate` requests,
//! and a [`WeightReceiver`] that hands each published weight version to every server through
//! `POST /update_weights_from_disk`.
//!
//! Token ids, images and seeds travel as they are, so a server running the same bundle samples
//! exactly what an in-process engine samples for the same batch. In deterministic mode each
//! generate call goes whole to one server (the batch a server sees is the batch the agent built);
//! otherwise the batch is split over the servers and the parts run in parallel. A server that
//! fails has its part retried on the others; one that fails to take a weight version is no
//! longer used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::model::{
    FinishReason, GenerateRequest, Generation, HfTokenizer, TokenCodec, VisionLanguageModel,
};
use crate::preprocess::PreprocessConfig;
use crate::protocol::IMAGE_PAD;
use crate::weights::{WeightReceiver, WeightSource, WeightUpdate};

/// Where the servers are and how to talk to them.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Base URLs (`http://host:port`), at least one.
    pub servers: Vec<String>,
    /// Send each generate call whole to one server, so results do not depend on how a batch is
    /// split (and equal in-process results on the same weights).
    pub deterministic: bool,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Longest wait for one HTTP call.
    pub timeout: Duration,
    /// Where weight versions are written for the servers to load (a path they can read).
    pub weights_dir: PathBuf,
}

/// A model served remotely; see the module documentation.
pub struct RemoteModel {
    options: RemoteOptions,
    codec: HfTokenizer,
    preprocess: PreprocessConfig,
    image_pad: u32,
    /// Parameter names and shapes, from the bundle (what a weight version must hold).
    parameters: Vec<(String, Vec<usize>)>,
    http: ureq::Agent,
    next_server: AtomicUsize,
    version: Mutex<Option<u64>>,
    /// Servers still in use: one that failed to take a weight version is dropped, so a step
    /// never mixes versions.
    live: Mutex<Vec<String>>,
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteModel")
            .field("servers", &self.options.servers)
            .field("deterministic", &self.options.deterministic)
            .finish_non_exhaustive()
    }
}

impl RemoteModel {
    /// A client of servers running the bundle in `bundle` (read here for its tokenizer, image
    /// preprocessing and parameter names).
    pub fn new(bundle: &Path, options: RemoteOptions) -> Result<Self> {
        if options.servers.is_empty() {
            return Err(Error::config("rollout-servers", "name at least one server"));
        }
        let config =
            crate::onnx::BundleConfig::load(bundle).map_err(|e| Error::Model(e.to_string()))?;
        let codec = HfTokenizer::from_file(bundle.join(&config.tokenizer))?;
        let image_pad = codec
            .token_id(IMAGE_PAD)
            .ok_or_else(|| Error::Tokenizer(format!("{IMAGE_PAD} is not in the vocabulary")))?;
        let weights = crate::onnx::weights::read_safetensors(&bundle.join("model.safetensors"))
            .map_err(|e| Error::Model(e.to_string()))?;
        let parameters = weights
            .into_iter()
            .map(|(name, t)| (name, t.shape))
            .collect();
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(options.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            preprocess: config.preprocess,
            codec,
            image_pad,
            parameters,
            http,
            next_server: AtomicUsize::new(0),
            version: Mutex::new(None),
            live: Mutex::new(options.servers.clone()),
            options,
        })
    }

    fn post(&self, server: &str, route: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{route}", server.trim_end_matches('/'));
        let mut request = self.http.post(&url);
        if let Some(key) = &self.options.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request
            .send_json(body)
            .map_err(|e| Error::Model(format!("{url}: {e}")))?;
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| Error::Model(format!("{url}: reading the answer: {e}")))?;
        if !status.is_success() {
            return Err(Error::Model(format!("{url}: {status}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| Error::Model(format!("{url}: not JSON ({e})")))
    }

    /// The servers still in use.
    pub fn live_servers(&self) -> Vec<String> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `/generate` body of `requests`; images already encoded are shared.
    fn generate_body(
        &self,
        requests: &[GenerateRequest<'_>],
        encoded: &mut HashMap<usize, String>,
    ) -> Result<Value> {
        let mut ids = Vec::with_capacity(requests.len());
        let mut images = Vec::with_capacity(requests.len());
        let mut params = Vec::with_capacity(requests.len());
        for r in requests {
            if r.banned_tokens.iter().any(|&t| t != self.image_pad) {
                return Err(Error::Model(
                    "a remote server bans only <|image_pad|>; other banned tokens cannot be sent"
                        .into(),
                ));
            }
            let mut stop_ids = Vec::new();
            let mut stop_texts = Vec::new();
            for seq in r.stop_sequences {
                match seq.as_slice() {
                    [id] => stop_ids.push(*id),
                    longer => stop_texts.push(self.codec.decode(longer)?),
                }
            }
            ids.push(r.tokens.to_vec());
            images.push(
                r.images
                    .iter()
                    .map(|im| data_url(im, encoded))
                    .collect::<Result<Vec<_>>>()?,
            );
            params.push(json!({
                "temperature": r.sampling.temperature,
                "top_p": r.sampling.top_p,
                "top_k": if r.sampling.top_k == 0 { -1 } else { r.sampling.top_k as i64 },
                "max_new_tokens": r.max_new_tokens,
                "stop_token_ids": stop_ids,
                "stop": stop_texts,
                "sampling_seed": r.seed,
            }));
        }
        Ok(json!({
            "input_ids": ids,
            "image_data": images,
            "sampling_params": params,
            "return_logprob": true,
        }))
    }

    /// Runs `requests` as one `/generate` call, on the servers in turn from `first` until one
    /// answers.
    fn call(
        &self,
        requests: &[GenerateRequest<'_>],
        first: usize,
        encoded: &mut HashMap<usize, String>,
    ) -> Result<Vec<Generation>> {
        let body = self.generate_body(requests, encoded)?;
        let servers = self.live_servers();
        let mut failures = Vec::new();
        for k in 0..servers.len() {
            let server = &servers[(first + k) % servers.len()];

            match self
                .post(server, "/generate", &body)
                .and_then(|v| parse_answers(&v, requests.len()))
            {
                Ok(generations) => return Ok(generations),
                Err(e) => {
                    tracing::warn!(%server, error = %e, "a rollout server failed; trying the next");
                    failures.push(e.to_string());
                }
            }
        }
        Err(Error::Model(format!(
            "every rollout server failed: {}",
            failures.join("; ")
        )))
    }
}

/// The image as a PNG data URL, encoded once per image buffer.
fn data_url(image: &Image, encoded: &mut HashMap<usize, String>) -> Result<String> {
    if let Some(url) = encoded.get(&image.buffer_id()) {
        return Ok(url.clone());
    }
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image.to_png()?)
    );
    encoded.insert(image.buffer_id(), url.clone());
    Ok(url)
}

/// The generations in a `/generate` answer (a list for a batch).
fn parse_answers(value: &Value, expected: usize) -> Result<Vec<Generation>> {
    let answers = value
        .as_array()
        .ok_or_else(|| Error::Model("a batched /generate answer must be a list".into()))?;
    if answers.len() != expected {
        return Err(Error::Model(format!(
            "/generate answered {} of {expected} requests",
            answers.len()
        )));
    }
    answers.iter().map(parse_answer).collect()
}

fn parse_answer(answer: &Value) -> Result<Generation> {
    let bad = |what: &str| Error::Model(format!("a /generate answer without {what}: {answer}"));
    let tokens: Vec<u32> =
        serde_json::from_value(answer["output_ids"].clone()).map_err(|_| bad("output_ids"))?;
    let logprobs: Vec<f32> = answer["meta_info"]["output_token_logprobs"]
        .as_array()
        .ok_or_else(|| bad("meta_info.output_token_logprobs"))?
        .iter()
        .map(|entry| entry[0].as_f64().map(|lp| lp as f32))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a log-prob per token"))?;
    let finish = match answer["meta_info"]["finish_reason"]["type"].as_str() {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        _ => return Err(bad("a stop or length finish_reason")),
    };
    Ok(Generation {
        tokens,
        logprobs,
        finish,
    })
}

impl VisionLanguageModel for RemoteModel {
    fn generate(&self, request: &GenerateRequest<'_>) -> Result<Generation> {
        let mut out = self.generate_batch(std::slice::from_ref(request));
        out.remove(0)
    }

    fn codec(&self) -> &dyn TokenCodec {
        &self.codec
    }

    fn generate_batch(&self, requests: &[GenerateRequest<'_>]) -> Vec<Result<Generation>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let servers = self.live_servers().len().max(1);
        let first = self.next_server.fetch_add(1, Ordering::Relaxed);
        let parts = if self.options.deterministic {
            1
        } else {
            servers.min(requests.len())
        };
        let size = requests.len().div_ceil(parts);
        let answered: Vec<Result<Vec<Generation>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .chunks(size)
                .enumerate()
                .map(|(k, part)| {
                    scope.spawn(move || self.call(part, first + k, &mut HashMap::new()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Model("a rollout thread panicked".into())))
                })
                .collect()
        });
        let mut out = Vec::with_capacity(requests.len());
        for (part, result) in requests.chunks(size).zip(answered) {
            match result {
                Ok(generations) => out.extend(generations.into_iter().map(Ok)),
                Err(e) => {
                    let message = e.to_string();
                    out.extend(part.iter().map(|_| Err(Error::Model(message.clone()))));
                }
            }
        }
        out
    }

    fn preprocess_config(&self) -> PreprocessConfig {
        self.preprocess
    }
}

impl WeightReceiver for RemoteModel {
    /// Writes the version as `weights_dir/version-<v>.safetensors` (Hugging Face names) and has
    /// every server load it; the version counts only once all have.
    fn receive_weights(&self, update: &WeightUpdate<'_>) -> Result<()> {
        std::fs::create_dir_all(&self.options.weights_dir)
            .map_err(|e| Error::io(&self.options.weights_dir, e))?;
        let path = self
            .options
            .weights_dir
            .join(format!("version-{}.safetensors", update.version));
        write_weights(&self.parameters, update.tensors, &path)?;
        *self
            .version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let body = json!({"model_path": path, "weight_version": update.version.to_string()});
        let mut kept = Vec::new();
        let mut failures = Vec::new();
        for server in self.live_servers() {
            match self.post(&server, "/update_weights_from_disk", &body) {
                Ok(answer) if answer["success"] == true => kept.push(server),
                Ok(answer) => failures.push(format!("{server}: {answer}")),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if !failures.is_empty() {
            tracing::warn!(
                failures = %failures.join("; "),
                "rollout servers that did not take weight version {} are no longer used",
                update.version
            );
        }
        if kept.is_empty() {
            return Err(Error::Model(format!(
                "no rollout server took {}: {}",
                path.display(),
                failures.join("; ")
            )));
        }
        *self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = kept;
        // Earlier versions are no longer needed by any server.
        if let Ok(entries) = std::fs::read_dir(&self.options.weights_dir) {
            for entry in entries.flatten() {
                if entry.path() != path
                    && entry.file_name().to_string_lossy().starts_with("version-")
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        *self
            .version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(update.version);
        Ok(())
    }

    /// The version every server reports, when they agree on the one last published.
    fn weights_version(&self) -> Option<u64> {
        let published = (*self
            .version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        for server in &self.options.servers {
            let url = format!("{}/get_weight_version", server.trim_end_matches('/'));
            let reported = self
                .http
                .get(&url)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .and_then(|v| v["weight_version"].as_str().map(str::to_string));
            if reported.as_deref() != Some(published.to_string().as_str()) {
                return None;
            }
        }
        Some(published)
    }
}

/// Writes every parameter of `parameters` from `source` as a safetensors file.
fn write_weights(
    parameters: &[(String, Vec<usize>)],
    source: &dyn WeightSource,
    path: &Path,
) -> Result<()> {
    let mut bytes = Vec::with_capacity(parameters.len());
    for (name, shape) in parameters {
        let tensor = source.tensor(name).ok_or_else(|| {
            Error::Model(format!("the published weights have no parameter {name}"))
        })?;
        if tensor.shape != shape.as_slice() {
            return Err(Error::Model(format!(
                "{name}: published with shape {:?}, the bundle has {shape:?}",
                tensor.shape
            )));
        }
        bytes.push(
            tensor
                .data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let views = parameters
        .iter()
        .zip(&bytes)
        .map(|((name, shape), data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::Model(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let partial = path.with_extension("partial");
    safetensors::serialize_to_file(views, None, &partial)
        .map_err(|e| Error::Model(format!("{}: {e}", partial.display())))?;
    std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglangs_batch_answer_is_read_newer_keys_and_all() {
        let path = format!(
            "{}/../tests/data/sglang/generate_response.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let answer: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let generations = parse_answers(&answer, 2).unwrap();
        assert_eq!(generations[0].finish, FinishReason::Stop);
        assert_eq!(generations[0].tokens.len(), 8);
        assert_eq!(generations[0].tokens[7], 151645);
        assert_eq!(generations[0].logprobs[3], -0.69_f32);
        assert_eq!(generations[1].finish, FinishReason::Length);
        assert_eq!(
            generations[1].logprobs,
            vec![-0.5, -0.25, -0.125, -1.5, -0.75]
        );
        let err = parse_answers(&answer, 3).unwrap_err().to_string();
        assert!(err.contains("2 of 3"), "{err}");
        let single = parse_answers(&answer[0], 1).unwrap_err().to_string();
        assert!(single.contains("must be a list"), "{single}");
    }
}
