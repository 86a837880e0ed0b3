//! The language model: token embedding, decoder layers with grouped-query attention and
//! multimodal rotary positions (mRoPE), final norm. Which keys a position sees is a
//! [`KeyMask`] (causal, padding, shared prefix), never a dense bias; the mRoPE positions come from the workspace's one definition, [`deepeyes_core::vision::rope_index`].

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use super::attention::{DEFAULT_ATTENTION_CHUNK, KeyMask, masked_attention};
use super::config::TextConfig;
use super::error::{Result, input_err};
use super::init::ParamSource;
use super::layers::{Embedding, Linear, RmsNorm, SwiGlu, apply_rotary, tensor_from};

/// One layer's keys and values, `[rows, kv heads, positions, head_dim]` each.
pub(crate) type KeysValues = (Tensor<4>, Tensor<4>);

/// Host-side decoder inputs besides the embeddings.
#[derive(Debug, Clone)]
pub struct DecoderInputs {
    /// Rows.
    pub batch: usize,
    /// Columns (positions per row).
    pub seq: usize,
    /// `[3, batch, seq]` mRoPE positions (temporal, height, width planes).
    pub position_ids: Vec<i64>,
    /// Key positions each query may attend to: `seq`, or `past + seq` after a shared prefix.
    pub keys: usize,
    /// Which keys each position sees (causal, padding, the shared prefix).
    pub mask: Arc<KeyMask>,
}

impl DecoderInputs {
    /// Inputs of right-padded causal rows of the given lengths; checks the shapes.
    pub fn causal(
        batch: usize,
        seq: usize,
        position_ids: Vec<i64>,
        lengths: &[usize],
    ) -> Result<Self> {
        Self::after_prefix(batch, seq, 0, position_ids, KeyMask::causal(lengths))
    }

    /// Checks the shapes of inputs whose rows continue a prefix of `past` positions (`mask`
    /// over `past + seq` keys, the prefix's first).
    pub fn after_prefix(
        batch: usize,
        seq: usize,
        past: usize,
        position_ids: Vec<i64>,
        mask: KeyMask,
    ) -> Result<Self> {
        if position_ids.len() != 3 * batch * seq {
            return Err(input_err(format!(
                "position_ids hold {} values; [3, {batch}, {seq}] needs {}",
                position_ids.len(),
                3 * batch * seq
            )));
        }
        let fits = match &mask {
            KeyMask::Causal {
                past: p,
                prefix,
                lengths,
            } => {
                *p == past
                    && lengths.len() == batch
                    && prefix.len() == batch
                    && lengths.iter().all(|&l| l <= seq)
                    && prefix.iter().all(|&l| l <= past)
            }
            KeyMask::Segments { .. } => false,
        };
        if !fits {
            return Err(input_err(format!(
                "the attention mask {mask:?} does not fit {batch} rows of {seq} positions after \
                 {past} prefix keys"
            )));
        }
        Ok(Self {
            batch,
            seq,
            keys: past + seq,
            position_ids,
            mask: Arc::new(mask),
        })
    }
}

/// Grouped-query self-attention with biased q/k/v projections.
#[derive(Module, Debug)]
pub struct TextAttention {
    /// Query projection (bias).
    pub q_proj: Linear,
    /// Key projection (bias).
    pub k_proj: Linear,
    /// Value projection (bias).
    pub v_proj: Linear,
    /// Output projection (no bias).
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention.
    pub self_attn: TextAttention,
    /// SwiGLU MLP without biases.
    pub mlp: SwiGlu,
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Pre-MLP norm.
    pub post_attention_layernorm: RmsNorm,
}

/// The language model (`model.*` in Hugging Face files).
#[derive(Module, Debug)]
pub struct TextModel {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Hyper-parameters.
    #[module(skip)]
    pub config: TextConfig,
    /// Query rows attended at once in longer sequences ([`DEFAULT_ATTENTION_CHUNK`]).
    #[module(skip)]
    pub attention_chunk: usize,
}

impl TextModel {
    pub(crate) fn load(src: &mut dyn ParamSource, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed_tokens = Embedding {
            weight: src.weight("model.embed_tokens.weight", cfg.vocab_size, h)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: TextAttention {
                    q_proj: Linear::load(src, &format!("{p}.self_attn.q_proj"), h, nh * hd, true)?,
                    k_proj: Linear::load(src, &format!("{p}.self_attn.k_proj"), h, nkv * hd, true)?,
                    v_proj: Linear::load(src, &format!("{p}.self_attn.v_proj"), h, nkv * hd, true)?,
                    o_proj: Linear::load(src, &format!("{p}.self_attn.o_proj"), nh * hd, h, false)?,
                    num_heads: nh,
                    num_kv_heads: nkv,
                },
                mlp: SwiGlu::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size, false)?,
                input_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.input_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    src,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
            });
        }
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(src, "model.norm", h, cfg.rms_norm_eps)?,
            config: cfg.clone(),
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
        })
    }

    /// mRoPE `cos`/`sin` tables `[batch, 1, seq, head_dim]`.
    pub(crate) fn rotary_tables(
        &self,
        inputs: &DecoderInputs,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let cfg = &self.config;
        let hd = cfg.head_dim();
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / (cfg.rope_theta as f32).powf((2 * j) as f32 / hd as f32))
            .collect();
        let [s0, s1, _] = cfg.mrope_section;
        let axis = |j: usize| usize::from(j >= s0) + usize::from(j >= s0 + s1);
        let (b, s) = (inputs.batch, inputs.seq);
        let plane = b * s;
        let mut cos = Vec::with_capacity(plane * hd);
        let mut sin = Vec::with_capacity(plane * hd);
        let mut row = vec![0f32; half];
        for p in 0..plane {
            for (j, r) in row.iter_mut().enumerate() {
                *r = inputs.position_ids[axis(j) * plane + p] as f32 * inv[j];
            }
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        (
            tensor_from(cos, [b, 1, s, hd], device),
            tensor_from(sin, [b, 1, s, hd], device),
        )
    }

    /// Runs the decoder over `[batch, seq, hidden]` embeddings; returns the final-normed hidden
    /// states.
    pub fn forward(&self, embeds: Tensor<3>, inputs: &DecoderInputs) -> Tensor<3> {
        let h = self.layers_forward(embeds, inputs, None, |_, _| {});
        self.norm.forward(h)
    }

    /// Runs the decoder over prefix rows `[prefixes, len, hidden]` and returns each layer's keys
    /// and values (`[prefixes, kv heads, len, head_dim]`, rotary applied), which rows that
    /// continue a prefix attend to ([`TextModel::forward_after_prefix`]).
    pub(crate) fn prefix_keys_values(
        &self,
        embeds: Tensor<3>,
        inputs: &DecoderInputs,
    ) -> Vec<KeysValues> {
        let mut kv = Vec::with_capacity(self.layers.len());
        self.layers_forward(embeds, inputs, None, |k, v| kv.push((k, v)));
        kv
    }

    /// Runs the decoder over rows that continue shared prefixes: row `b` attends to the keys and
    /// values of prefix `prefix_of_row[b]` (from [`TextModel::prefix_keys_values`]) and then
    /// to its own positions, as `inputs.mask` allows. Final-normed hidden states.
    pub(crate) fn forward_after_prefix(
        &self,
        embeds: Tensor<3>,
        inputs: &DecoderInputs,
        past: &[KeysValues],
        prefix_of_row: Tensor<1, Int>,
    ) -> Tensor<3> {
        let h = self.layers_forward(embeds, inputs, Some((past, prefix_of_row)), |_, _| {});
        self.norm.forward(h)
    }

    /// The decoder layers; each layer's own keys and values go to `keep`.
    fn layers_forward(
        &self,
        embeds: Tensor<3>,
        inputs: &DecoderInputs,
        past: Option<(&[KeysValues], Tensor<1, Int>)>,
        mut keep: impl FnMut(Tensor<4>, Tensor<4>),
    ) -> Tensor<3> {
        let device = embeds.device();
        let (cos, sin) = self.rotary_tables(inputs, &device);
        let mut h = embeds;
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            let (q, k, v) = attn.project(layer.input_layernorm.forward(h.clone()), &cos, &sin);
            keep(k.clone(), v.clone());
            let (k, v) = match &past {
                Some((kv, rows)) => {
                    let (pk, pv) = &kv[i];
                    (
                        Tensor::cat(vec![pk.clone().select(0, rows.clone()), k], 2),
                        Tensor::cat(vec![pv.clone().select(0, rows.clone()), v], 2),
                    )
                }
                None => (k, v),
            };
            h = h + attn.attend(q, k, v, &inputs.mask, self.attention_chunk);
            h = h.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(h));
        }
        h
    }
}

impl TextAttention {
    /// Queries `[batch, heads, seq, head_dim]`, keys and values `[batch, kv heads, seq,
    /// head_dim]`, rotary applied to queries and keys.
    fn project(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, s, _] = x.dims();
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let hd = self.q_proj.weight.dims()[0] / nh;
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone()), nh);
        let k = heads(self.k_proj.forward(x.clone()), nkv);
        let v = heads(self.v_proj.forward(x), nkv);
        (
            apply_rotary(q, cos.clone(), sin.clone()),
            apply_rotary(k, cos.clone(), sin.clone()),
            v,
        )
    }

    /// Attention of `q` over `k`/`v` as `mask` allows (`chunk` query rows at a time when
    /// longer), projected back to `[batch, seq, hidden]`.
    fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: &Arc<KeyMask>,
        chunk: usize,
    ) -> Tensor<3> {
        let [b, nh, s, hd] = q.dims();
        let out = masked_attention(q, k, v, mask, 1.0 / (hd as f64).sqrt(), chunk);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, nh * hd]))
    }
}
