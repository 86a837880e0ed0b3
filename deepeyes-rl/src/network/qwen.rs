//! `Qwen2_5_VLForConditionalGeneration` in burn: construction, checkpoints and the forward passes
//! (logits for parity checks, per-token log-probs and entropy for training).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::batch::{Batch, SharedPrefixes};
use super::config::Qwen25VlConfig;
use super::error::{ModelError, Result, input_err};
use super::init::{CheckpointSource, ParamSource, RandomSource};
use super::layers::{Linear, tensor_from};
use super::text::{DecoderInputs, TextModel};
use super::token_scores::{chunked_token_scores, whole_logits};
use super::vision::{VisionInputs, VisionTower};
use super::weights::{
    ParamInfo, ParamViews, param_infos, param_values, param_views, write_atomic, write_safetensors,
};

/// The patch embedding's parameter name.
const PATCH_EMBED: &str = "visual.patch_embed.proj.weight";

/// The Qwen2.5-VL model. Field names follow Hugging Face's parameter names (`visual.*`,
/// `model.*`, `lm_head.*`).
#[derive(Module, Debug)]
pub struct Qwen25Vl {
    /// The vision tower.
    pub visual: VisionTower,
    /// The language model.
    pub model: TextModel,
    /// The output projection; `None` when tied to the token embeddings.
    pub lm_head: Option<Linear>,
    /// Hyper-parameters.
    #[module(skip)]
    pub config: Qwen25VlConfig,
    /// The LoRA configuration, when the model carries adapters ([`Qwen25Vl::with_lora`]).
    #[module(skip)]
    pub lora: Option<super::LoraConfig>,
    /// Logits computed whole at most; more go a chunk of rows at a time
    /// ([`WHOLE_LOGITS_LIMIT`](super::WHOLE_LOGITS_LIMIT) unless set).
    #[module(skip)]
    pub logits_limit: usize,
}

/// Per-token scores of a [`Batch`], as autodiff tensors when the model is on an autodiff device.
#[derive(Debug, Clone)]
pub struct TokenScores {
    /// `[batch, score_len]`: `log p(token t | tokens < t, images)`; 0 where undefined (first
    /// token, image pads, padding).
    pub logprobs: Tensor<2>,
    /// `[batch, score_len]`: entropy of the predictive distribution at the same positions (0
    /// where undefined), when asked for.
    pub entropy: Option<Tensor<2>>,
    /// `[batch, score_len]` host mask: 1 where the scores are defined.
    pub mask: Vec<f32>,
}

impl Qwen25Vl {
    fn build(config: &Qwen25VlConfig, src: &mut dyn ParamSource) -> Result<Self> {
        config.validate()?;
        let visual = VisionTower::load(src, &config.vision)?;
        let model = TextModel::load(src, &config.text)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(
                src,
                "lm_head",
                config.text.hidden_size,
                config.text.vocab_size,
                false,
            )?)
        };
        Ok(Self {
            visual,
            model,
            lm_head,
            config: config.clone(),
            lora: None,
            logits_limit: super::WHOLE_LOGITS_LIMIT,
        })
    }

    /// A randomly initialised model (deterministic for `seed`).
    pub fn random(config: &Qwen25VlConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::build(config, &mut RandomSource::new(seed, device))
    }

    /// Loads weights with Hugging Face names from a safetensors file or checkpoint directory
    /// (`model.safetensors` or a sharded index). Every parameter must be present with the right
    /// shape, and every tensor of the checkpoint must be used (a tied model may carry
    /// `lm_head.weight`; it is ignored).
    pub fn load_safetensors(
        config: &Qwen25VlConfig,
        path: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut src = CheckpointSource::open(path, device)?;
        if config.tie_word_embeddings {
            src.discard("lm_head.weight");
        }
        let model = Self::build(config, &mut src)?;
        src.finish()?;
        tracing::debug!(path = %path.display(), params = model.num_params(), "loaded Qwen2.5-VL weights");
        Ok(model)
    }

    /// Loads a Hugging Face checkpoint directory (`config.json` and safetensors weights).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Qwen25VlConfig::from_hf_file(dir.join("config.json"))?;
        Self::load_safetensors(&config, dir, device)
    }

    /// Every parameter with its Hugging Face name and shape (the patch embedding as the 5-D
    /// convolution kernel transformers stores), as host copies.
    /// With adapters, the weights are the merged ones (`W + s·B A`), which is what the model
    /// computes.
    pub fn hf_tensors(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        if self.lora.is_some() {
            return self.clone().merged().hf_tensors();
        }
        let mut tensors = BTreeMap::new();
        for p in param_values(self) {
            let shape = if p.name == PATCH_EMBED {
                self.patch_embed_shape()
            } else {
                p.shape
            };
            tensors.insert(p.name, (shape, p.values));
        }
        tensors
    }

    /// [`Qwen25Vl::hf_tensors`] without copying them: views of burn's own buffers where the
    /// backend lends them (the CPU backend does), for a rollout engine to read.
    pub fn weight_views(&self) -> ParamViews {
        if self.lora.is_some() {
            return self.clone().merged().weight_views();
        }
        let mut views = param_views(self);
        views.reshape(PATCH_EMBED, self.patch_embed_shape());
        views
    }

    /// The patch embedding's shape as transformers stores it: the 5-D Conv3d kernel (this crate
    /// holds it as the equivalent `[hidden, patch_dim]` matrix).
    fn patch_embed_shape(&self) -> Vec<usize> {
        let v = &self.config.vision;
        vec![
            v.hidden_size,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ]
    }

    /// Writes every parameter, with Hugging Face names and shapes, to one safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = self.hf_tensors();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(path, &tensors, Some(meta))
    }

    /// Writes `config.json` and `model.safetensors` into `dir`, a directory transformers loads
    /// with `from_pretrained`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.save_safetensors(dir.join("model.safetensors"))?;
        let cfg = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config.to_hf_json()).map_err(|source| {
            ModelError::Json {
                path: cfg.clone(),
                source,
            }
        })?;
        write_atomic(&cfg, text.as_bytes())
    }

    /// Every float parameter: Hugging Face name, id, shape, trainable flag.
    pub fn params(&self) -> Vec<ParamInfo> {
        param_infos(self)
    }

    /// Stops gradients for the whole vision tower (its parameters stay fixed during training).
    pub fn freeze_vision(mut self) -> Self {
        self.visual = self.visual.no_grad();
        self
    }

    /// Attends `chunk` query rows at a time in sequences longer than that, in both towers
    /// ([`DEFAULT_ATTENTION_CHUNK`](super::DEFAULT_ATTENTION_CHUNK) unless set): the memory of
    /// attention then grows linearly with the length (`model.attention-chunk`).
    pub fn with_attention_chunk(mut self, chunk: usize) -> Self {
        self.model.attention_chunk = chunk.max(1);
        self.visual.attention_chunk = chunk.max(1);
        self
    }

    /// Computes at most `limit` logits at once (at least one row's): the log-probs and
    /// entropies of more rows go a chunk at a time, recomputed in the backward pass. Same
    /// results.
    pub fn with_logits_limit(mut self, limit: usize) -> Self {
        self.logits_limit = limit;
        self
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Image features `[tokens, hidden]` for one vision call (one or more images).
    pub fn image_features(&self, inputs: &VisionInputs) -> Tensor<2> {
        self.visual.forward(inputs)
    }

    fn embedding_matrix(&self) -> Tensor<2> {
        self.model.embed_tokens.weight.val()
    }

    /// Token embeddings `[batch, seq, hidden]` of `[batch, seq]` ids.
    pub fn embed(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Tensor<3>> {
        if ids.len() != batch * seq {
            return Err(input_err(format!(
                "{} ids for a [{batch}, {seq}] batch",
                ids.len()
            )));
        }
        let vocab = self.config.text.vocab_size;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(input_err(format!(
                "token {t} is outside the vocabulary ({vocab})"
            )));
        }
        let device = self.device();
        let idx: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [batch * seq]), &device);
        let h = self.config.text.hidden_size;
        Ok(self
            .embedding_matrix()
            .select(0, idx)
            .reshape([batch, seq, h]))
    }

    /// Runs the decoder on precomputed embeddings; final-normed hidden states.
    pub fn decode(&self, embeds: Tensor<3>, inputs: &DecoderInputs) -> Result<Tensor<3>> {
        let [b, s, h] = embeds.dims();
        if b != inputs.batch || s != inputs.seq || h != self.config.text.hidden_size {
            return Err(input_err(format!(
                "embeddings [{b}, {s}, {h}] do not match decoder inputs [{}, {}] / hidden {}",
                inputs.batch, inputs.seq, self.config.text.hidden_size
            )));
        }
        Ok(self.model.forward(embeds, inputs))
    }

    /// Logits of hidden states (last dimension `hidden` → `vocab`).
    pub fn head<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => Linear {
                weight: self.model.embed_tokens.weight.clone(),
                bias: None,
                lora: None,
            }
            .forward(hidden),
        }
    }

    /// The batch's input embeddings: token embeddings with every image pad replaced by the next
    /// image feature row.
    pub fn input_embeddings(&self, batch: &Batch) -> Result<Tensor<3>> {
        let h = self.config.text.hidden_size;
        let tokens = self.embed(&batch.input_ids, batch.batch, batch.seq)?;
        if batch.images.is_empty() {
            return Ok(tokens);
        }
        let plane = batch.batch * batch.seq;
        let mut rows = vec![tokens.reshape([plane, h])];
        rows.extend(batch.images.iter().map(|im| self.image_features(im)));
        let table = Tensor::cat(rows, 0);
        let available = table.dims()[0];
        let needed = batch.embed_rows.iter().copied().max().unwrap_or(0) as usize + 1;
        if needed > available || available - plane != batch.image_rows {
            return Err(input_err(format!(
                "the images give {} feature rows but the batch expects {}",
                available - plane,
                batch.image_rows
            )));
        }
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(batch.embed_rows.clone(), [plane]),
            &self.device(),
        );
        Ok(table.select(0, idx).reshape([batch.batch, batch.seq, h]))
    }

    /// Final hidden states `[batch, seq, hidden]` of a batch.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor<3>> {
        let embeds = self.input_embeddings(batch)?;
        self.decode(embeds, &batch.decoder)
    }

    /// Final hidden states `[batch, suffix len, hidden]` of the rows' suffixes, each prefix
    /// run once ([`SharedPrefixes`]).
    fn shared_hidden_states(&self, batch: &Batch, shared: &SharedPrefixes) -> Result<Tensor<3>> {
        let device = self.device();
        let h = self.config.text.hidden_size;
        let plane = batch.batch * batch.seq;
        let embeds = self.input_embeddings(batch)?.reshape([plane, h]);
        let rows = |positions: &[i64], inputs: &DecoderInputs| {
            let idx = Tensor::<1, Int>::from_data(
                TensorData::new(positions.to_vec(), [positions.len()]),
                &device,
            );
            embeds
                .clone()
                .select(0, idx)
                .reshape([inputs.batch, inputs.seq, h])
        };
        let past = self.model.prefix_keys_values(
            rows(&shared.prefix_positions, &shared.prefix),
            &shared.prefix,
        );
        let prefix_of_row = Tensor::<1, Int>::from_data(
            TensorData::new(shared.prefix_of_row.clone(), [batch.batch]),
            &device,
        );
        Ok(self.model.forward_after_prefix(
            rows(&shared.suffix_positions, &shared.suffix),
            &shared.suffix,
            &past,
            prefix_of_row,
        ))
    }

    /// Logits `[batch, seq, vocab]` at every expanded position.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor<3>> {
        Ok(self.head(self.hidden_states(batch)?))
    }

    /// Log-probs of chosen tokens at chosen positions: for each `(flat expanded position
    /// b·seq + e, token)`, `log p(token | the batch row up to e)`. Unlike
    /// [`score_tokens`](Self::score_tokens) the positions are free: any expanded position,
    /// image tokens included (auxiliary objectives during supervised training). Carries the
    /// autodiff graph on an autodiff device.
    pub fn score_positions(&self, batch: &Batch, picks: &[(usize, u32)]) -> Result<Tensor<1>> {
        let device = self.device();
        let h = self.config.text.hidden_size;
        let plane = batch.batch * batch.seq;
        if let Some(&(p, _)) = picks.iter().find(|(p, _)| *p >= plane) {
            return Err(input_err(format!(
                "position {p} is outside the batch ({} rows × {})",
                batch.batch, batch.seq
            )));
        }
        let k = picks.len();
        let hidden = self.hidden_states(batch)?;
        let src: Vec<i64> = picks.iter().map(|&(p, _)| p as i64).collect();
        let tgt: Vec<i64> = picks.iter().map(|&(_, t)| i64::from(t)).collect();
        let rows = hidden.reshape([plane, h]).select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(src, [k]), &device),
        );
        Ok(self.scores_of_rows(rows, tgt, false).0)
    }

    /// `[rows]` log-probs of `targets` after the hidden states `rows`, and with `entropy` the
    /// entropies of the same predictive distributions. Logits too large to hold whole (long
    /// sequences at a large vocabulary) are computed a chunk of rows at a time and recomputed
    /// in the backward pass ([`super::token_scores`]).
    fn scores_of_rows(
        &self,
        rows: Tensor<2>,
        targets: Vec<i64>,
        entropy: bool,
    ) -> (Tensor<1>, Option<Tensor<1>>) {
        let [k, _] = rows.dims();
        let device = rows.device();
        let (vocab, limit) = (self.config.text.vocab_size, self.logits_limit);
        if !whole_logits(k, vocab, limit, &device) {
            let (logp, ent) = chunked_token_scores(rows, self.head_weight(), &targets, limit);
            return (logp, entropy.then_some(ent));
        }
        let logp_all = log_softmax(self.head(rows), 1);
        let tgt = Tensor::<2, Int>::from_data(TensorData::new(targets, [k, 1]), &device);
        let picked = logp_all.clone().gather(1, tgt).reshape([k]);
        let ent = entropy.then(|| {
            let p = logp_all.clone().exp();
            (p * logp_all).sum_dim(1).reshape([k]).neg()
        });
        (picked, ent)
    }

    /// The output head's weight `[vocab, hidden]` (the token embeddings when tied), its
    /// adapter merged in.
    fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => match &head.lora {
                Some(lora) => head.weight.val() + lora.delta_weight(),
                None => head.weight.val(),
            },
            None => self.model.embed_tokens.weight.val(),
        }
    }

    /// Per-token log-probs of each next token (and, with `entropy`, the predictive entropy),
    /// aligned with the input tokens: `logprobs[b][t] = log p(tokens[b][t] | tokens[b][..t])`.
    /// Only the positions that predict a scored token go through `lm_head`. On an autodiff
    /// device the outputs carry the graph, so a loss such as `(weights * logprobs).sum()` can be
    /// back-propagated into every trainable parameter.
    pub fn score_tokens(&self, batch: &Batch, entropy: bool) -> Result<TokenScores> {
        let device = self.device();
        let h = self.config.text.hidden_size;
        let k = batch.targets.len();
        let cells = batch.batch * batch.score_len;
        let mask = batch.score_mask();
        if k == 0 {
            let zeros = Tensor::<2>::zeros([batch.batch, batch.score_len], &device);
            return Ok(TokenScores {
                logprobs: zeros.clone(),
                entropy: entropy.then_some(zeros),
                mask,
            });
        }
        let (hidden, src) = match &batch.shared {
            None => (
                self.hidden_states(batch)?,
                batch.targets.iter().map(|&(_, e, _)| e as i64).collect(),
            ),
            Some(shared) => (
                self.shared_hidden_states(batch, shared)?,
                shared.target_rows.clone(),
            ),
        };
        let [hb, hs, _] = hidden.dims();
        let tgt: Vec<i64> = batch
            .targets
            .iter()
            .map(|&(_, _, t)| i64::from(t))
            .collect();
        let rows = hidden.reshape([hb * hs, h]).select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(src, [k]), &device),
        );
        let (picked, ent) = self.scores_of_rows(rows, tgt, entropy);
        // Scatter the k values into the [batch, score_len] grid: every cell reads entry `k`
        // (a zero) unless it is scored.
        let mut place = vec![k as i64; cells];
        for (i, &(cell, _, _)) in batch.targets.iter().enumerate() {
            place[cell] = i as i64;
        }
        let place = Tensor::<1, Int>::from_data(TensorData::new(place, [cells]), &device);
        let zero = Tensor::<1>::zeros([1], &device);
        let spread = |v: Tensor<1>| {
            Tensor::cat(vec![v, zero.clone()], 0)
                .select(0, place.clone())
                .reshape([batch.batch, batch.score_len])
        };
        Ok(TokenScores {
            logprobs: spread(picked),
            entropy: ent.map(spread),
            mask,
        })
    }
}

/// Host copy (row-major, f32) of a float tensor; waits for the device. The engine's buffer is
/// taken as it is where it can be, else copied once (element by element through burn's generic
/// iterator, a 3B model's weights took seconds longer).
pub fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .expect("float tensor data converts to f32")
}

/// A `[rows, cols]` float tensor on `device` (e.g. GRPO per-token weights).
pub fn tensor2(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Result<Tensor<2>> {
    if values.len() != rows * cols {
        return Err(input_err(format!(
            "{} values for a [{rows}, {cols}] tensor",
            values.len()
        )));
    }
    Ok(tensor_from(values, [rows, cols], device))
}
