//! Building blocks shared by the vision tower and the decoder: linear layers in Hugging Face's
//! `[out, in]` weight layout, RMSNorm, SwiGLU, rotary embedding and masked attention.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Tensor, TensorData};

use super::error::Result;
use super::init::ParamSource;
use super::lora::LoraAdapter;

/// A dense layer `y = x Wᵀ + b` with `W` stored as `[out, in]`, as Hugging Face stores it.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Param<Tensor<1>>>,
    /// A LoRA adapter, when the layer has one ([`super::lora`]).
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub(crate) fn load(
        src: &mut dyn ParamSource,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = src.weight(&format!("{name}.weight"), d_out, d_in)?;
        let bias = if bias {
            Some(src.bias(&format!("{name}.bias"), d_out)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in.max(1);
        let w = self.weight.val();
        let d_out = w.dims()[0];
        let x = x.reshape([rows, d_in]);
        let mut y = match &self.lora {
            Some(lora) => x.clone().matmul(w.transpose()) + lora.forward(x),
            None => x.matmul(w.transpose()),
        };
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze::<2>();
        }
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(
        src: &mut dyn ParamSource,
        name: &str,
        dim: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            weight: src.norm(&format!("{name}.weight"), dim)?,
            eps,
        })
    }

    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let inv = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        x * inv * self.weight.val().unsqueeze::<D>()
    }
}

/// A token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`.
    pub weight: Param<Tensor<2>>,
}

/// The gated MLP `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct SwiGlu {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl SwiGlu {
    pub(crate) fn load(
        src: &mut dyn ParamSource,
        name: &str,
        dim: usize,
        hidden: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(src, &format!("{name}.gate_proj"), dim, hidden, bias)?,
            up_proj: Linear::load(src, &format!("{name}.up_proj"), dim, hidden, bias)?,
            down_proj: Linear::load(src, &format!("{name}.down_proj"), hidden, dim, bias)?,
        })
    }

    /// Applies the MLP to the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let g = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(g * self.up_proj.forward(x))
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves along the last dimension.
pub(crate) fn rotate_half<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let d = x.dims()[D - 1];
    let h = d / 2;
    let x1 = x.clone().narrow(D - 1, 0, h);
    let x2 = x.narrow(D - 1, h, d - h);
    Tensor::cat(vec![x2.neg(), x1], D - 1)
}

/// `x·cos + rotate_half(x)·sin`; `cos`/`sin` broadcast against `x`.
pub(crate) fn apply_rotary<const D: usize>(
    x: Tensor<D>,
    cos: Tensor<D>,
    sin: Tensor<D>,
) -> Tensor<D> {
    x.clone() * cos + rotate_half(x) * sin
}

/// `softmax(q kᵀ · scale + bias) v` over the last two dimensions. `bias` broadcasts against the
/// scores.
pub(crate) fn attention<const D: usize>(
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
    bias: Tensor<D>,
    scale: f64,
) -> Tensor<D> {
    let scores = q.matmul(k.swap_dims(D - 2, D - 1)).mul_scalar(scale) + bias;
    softmax(scores, D - 1).matmul(v)
}

/// `n` deterministic values in `[-scale/2, scale/2)` spread over the range (test inputs).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 / 1009.0 - 0.5) * scale)
        .collect()
}

/// A float tensor from host data.
pub(crate) fn tensor_from<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}
