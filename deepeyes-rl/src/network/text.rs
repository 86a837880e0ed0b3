//! The language model: token embedding, decoder layers with grouped-query attention and
//! multimodal rotary positions (mRoPE), final norm. Plus the causal / padding bias of its inputs;
//! the mRoPE positions come from the workspace's one definition, [`deepeyes_core::vision::rope_index`].

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::config::TextConfig;
use super::error::{Result, input_err};
use super::init::ParamSource;
use super::layers::{Embedding, Linear, RmsNorm, SwiGlu, apply_rotary, attention, tensor_from};
use super::vision::MASKED;

/// `[batch, 1, seq, seq]` additive bias for right-padded rows of the given lengths: causal within
/// each row, padding keys masked with the finite [`MASKED`].
pub(crate) fn causal_bias(lengths: &[usize], seq: usize) -> Vec<f32> {
    let mut out = vec![MASKED; lengths.len() * seq * seq];
    for (b, &len) in lengths.iter().enumerate() {
        for i in 0..seq {
            let row = &mut out[(b * seq + i) * seq..(b * seq + i + 1) * seq];
            row[..len.min(i + 1)].fill(0.0);
        }
    }
    out
}

/// Host-side decoder inputs besides the embeddings.
#[derive(Debug, Clone)]
pub struct DecoderInputs {
    /// Rows.
    pub batch: usize,
    /// Columns (positions per row).
    pub seq: usize,
    /// `[3, batch, seq]` mRoPE positions (temporal, height, width planes).
    pub position_ids: Vec<i64>,
    /// `[batch, 1, seq, seq]` additive attention bias.
    pub attn_bias: Vec<f32>,
}

impl DecoderInputs {
    /// Checks the shapes.
    pub fn new(
        batch: usize,
        seq: usize,
        position_ids: Vec<i64>,
        attn_bias: Vec<f32>,
    ) -> Result<Self> {
        if position_ids.len() != 3 * batch * seq {
            return Err(input_err(format!(
                "position_ids hold {} values; [3, {batch}, {seq}] needs {}",
                position_ids.len(),
                3 * batch * seq
            )));
        }
        if attn_bias.len() != batch * seq * seq {
            return Err(input_err(format!(
                "attn_bias holds {} values; [{batch}, 1, {seq}, {seq}] needs {}",
                attn_bias.len(),
                batch * seq * seq
            )));
        }
        Ok(Self {
            batch,
            seq,
            position_ids,
            attn_bias,
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
        let device = embeds.device();
        let (cos, sin) = self.rotary_tables(inputs, &device);
        let (b, s) = (inputs.batch, inputs.seq);
        let bias = tensor_from(inputs.attn_bias.clone(), [b, 1, s, s], &device);
        let mut h = embeds;
        for layer in &self.layers {
            let a = layer.self_attn.forward(
                layer.input_layernorm.forward(h.clone()),
                &cos,
                &sin,
                bias.clone(),
            );
            h = h + a;
            h = h.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(h));
        }
        self.norm.forward(h)
    }
}

impl TextAttention {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        bias: Tensor<4>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let hd = self.q_proj.weight.dims()[0] / nh;
        let rep = nh / nkv;
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, s, nh, hd])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, s, nkv, hd])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, nkv, hd])
            .swap_dims(1, 2);
        let q = apply_rotary(q, cos.clone(), sin.clone());
        let k = apply_rotary(k, cos.clone(), sin.clone());
        // Heads kv·rep .. kv·rep + rep − 1 share key/value head kv: stack them along the query
        // axis instead of repeating keys and values.
        let q = q.reshape([b, nkv, rep * s, hd]);
        let bias = if rep > 1 {
            bias.repeat_dim(2, rep)
        } else {
            bias
        };
        let out = attention(q, k, v, bias, 1.0 / (hd as f64).sqrt());
        let out = out
            .reshape([b, nh, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, nh * hd]);
        self.o_proj.forward(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_bias_masks_future_and_padding() {
        let b = causal_bias(&[2], 3);
        let m = MASKED;
        assert_eq!(b, vec![0.0, m, m, 0.0, 0.0, m, 0.0, 0.0, m]);
    }
}
