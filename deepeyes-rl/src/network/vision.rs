//! The vision tower: patch embedding, blocks with 2D rotary attention restricted to windows or
//! frames ([`KeyMask::Segments`]), and the patch merger. Its grid-dependent inputs (patch positions, the
//! window permutation, the attention blocks) come from the workspace's one definition of the
//! Qwen2.5-VL geometry, [`deepeyes_core::vision`], which the ONNX Runtime backend uses too.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use deepeyes_core::vision;

use super::attention::{DEFAULT_ATTENTION_CHUNK, KeyMask, masked_attention};
use super::config::VisionConfig;
use super::error::{Result, input_err};
use super::init::{InitKind, ParamSource};
use super::layers::{Linear, RmsNorm, SwiGlu, apply_rotary, tensor_from};

/// The `(t, h, w)` patch grid of one image: frames / 2 × rows × columns of 14-pixel patches.
pub type Grid = [usize; 3];

/// The grids as the core geometry takes them.
pub(crate) fn core_grids(grids: &[Grid]) -> Result<Vec<[u32; 3]>> {
    grids
        .iter()
        .map(|g| {
            let mut out = [0u32; 3];
            for (slot, &d) in out.iter_mut().zip(g) {
                *slot =
                    u32::try_from(d).map_err(|_| input_err(format!("grid {g:?} is too large")))?;
            }
            Ok(out)
        })
        .collect()
}

/// What the vision tower takes for one or more images: the same values the ONNX vision graph
/// takes (patches, positions, window permutation, window and full masks), for one sequence of
/// `n` patches, or for `count` such sequences of the same grid encoded side by side
/// ([`VisionInputs::stacked`]).
#[derive(Debug, Clone)]
pub struct VisionInputs {
    /// `[count · n, patch_dim]` flattened patches, each sequence's in the image processor's
    /// order.
    pub patches: Vec<f32>,
    /// Number of patches `n` of each sequence.
    pub n: usize,
    /// Number of sequences encoded side by side (1 unless [`VisionInputs::stacked`]).
    pub count: usize,
    /// `(row, column)` of each patch, in the same order as `patches`.
    pub pos_ids: Vec<[i64; 2]>,
    /// The window order of merged units (`n / merge²` entries).
    pub window_index: Vec<usize>,
    /// The blocks of the window-attention layers, in window order.
    pub window_mask: Arc<KeyMask>,
    /// The blocks of the full-attention layers (one per frame), in window order.
    pub full_mask: Arc<KeyMask>,
}

impl VisionInputs {
    /// Computes positions, window order and masks from the images' grids. `patches` holds the
    /// images' patches one after the other.
    pub fn from_grids(patches: Vec<f32>, grids: &[Grid], cfg: &VisionConfig) -> Result<Self> {
        let merge = cfg.spatial_merge_size;
        for (i, g) in grids.iter().enumerate() {
            if g.contains(&0) || !g[1].is_multiple_of(merge) || !g[2].is_multiple_of(merge) {
                return Err(input_err(format!(
                    "image {i}: grid {g:?} must be positive with h and w multiples of {merge}"
                )));
            }
        }
        let geo = cfg.geometry()?;
        let core = core_grids(grids)?;
        let geometry = |e: deepeyes_core::Error| input_err(e.to_string());
        let pos_ids = vision::vision_position_ids(&core, &geo).map_err(geometry)?;
        let windows = vision::window_index(&core, &geo).map_err(geometry)?;
        let window_index = windows.window_index.iter().map(|&i| i as usize).collect();
        // The window permutation moves whole frames as blocks, so the frame boundaries hold in
        // window order too.
        let bounds = |cu: &[i64]| cu.iter().map(|&b| b as usize).collect::<Vec<_>>();
        let window_bounds = bounds(&windows.cu_window_seqlens);
        let frame_bounds = bounds(&vision::frame_seqlens(&core));
        Self::new(
            patches,
            pos_ids,
            window_index,
            window_bounds,
            frame_bounds,
            cfg,
        )
    }

    /// Takes precomputed inputs (e.g. the ones fed to the ONNX graph; the attention blocks as
    /// cumulative boundaries, window order) and checks their shapes.
    pub fn new(
        patches: Vec<f32>,
        pos_ids: Vec<[i64; 2]>,
        window_index: Vec<usize>,
        window_bounds: Vec<usize>,
        frame_bounds: Vec<usize>,
        cfg: &VisionConfig,
    ) -> Result<Self> {
        let n = pos_ids.len();
        let pd = cfg.patch_dim();
        let unit = cfg.merge_unit();
        if n == 0 || !n.is_multiple_of(unit) {
            return Err(input_err(format!(
                "{n} patches is not a positive multiple of {unit}"
            )));
        }
        if patches.len() != n * pd {
            return Err(input_err(format!(
                "patches hold {} values; {n} patches of {pd} need {}",
                patches.len(),
                n * pd
            )));
        }
        let m = n / unit;
        let mut seen = vec![false; m];
        if window_index.len() != m {
            return Err(input_err(format!(
                "window_index has {} entries, expected {m}",
                window_index.len()
            )));
        }
        for &i in &window_index {
            if i >= m || std::mem::replace(&mut seen[i], true) {
                return Err(input_err(format!(
                    "window_index is not a permutation of 0..{m} (entry {i})"
                )));
            }
        }
        for (name, bounds) in [("window", &window_bounds), ("frame", &frame_bounds)] {
            if bounds.first() != Some(&0)
                || bounds.last() != Some(&n)
                || bounds.windows(2).any(|w| w[1] < w[0])
            {
                return Err(input_err(format!(
                    "{name} boundaries {bounds:?} do not cover {n} patches"
                )));
            }
        }
        let segments = |bounds| Arc::new(KeyMask::Segments { bounds });
        Ok(Self {
            patches,
            n,
            count: 1,
            pos_ids,
            window_index,
            window_mask: segments(window_bounds),
            full_mask: segments(frame_bounds),
        })
    }

    /// `count` images of the same `grid`, encoded side by side in one call (a batch dimension,
    /// not one long sequence: each image attends only to itself). `patches` holds each image's
    /// patches one after the other; the features come out in the same order.
    pub fn stacked(
        patches: Vec<f32>,
        grid: Grid,
        count: usize,
        cfg: &VisionConfig,
    ) -> Result<Self> {
        let per_image = grid.iter().product::<usize>() * cfg.patch_dim();
        if count == 0 || patches.len() != count * per_image {
            return Err(input_err(format!(
                "{} patch values for {count} images of grid {grid:?} ({per_image} each)",
                patches.len()
            )));
        }
        let first = patches[..per_image].to_vec();
        let mut one = Self::from_grids(first, &[grid], cfg)?;
        one.patches = patches;
        one.count = count;
        Ok(one)
    }

    /// The inverse of `window_index`.
    pub fn reverse_index(&self) -> Vec<usize> {
        let mut rev = vec![0; self.window_index.len()];
        for (pos, &i) in self.window_index.iter().enumerate() {
            rev[i] = pos;
        }
        rev
    }
}

/// The Conv3d patch embedding, held as the equivalent `[hidden, patch_dim]` matrix.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// Stored in Hugging Face files as `[hidden, channels, temporal, patch, patch]`.
    pub proj: Linear,
}

/// Fused query/key/value attention of a vision block.
#[derive(Module, Debug)]
pub struct VisionAttention {
    /// `[3·hidden, hidden]` with bias.
    pub qkv: Linear,
    /// Output projection with bias.
    pub proj: Linear,
    /// Number of heads.
    pub num_heads: usize,
}

/// One vision transformer block.
#[derive(Module, Debug)]
pub struct VisionBlock {
    /// Pre-attention norm.
    pub norm1: RmsNorm,
    /// Pre-MLP norm.
    pub norm2: RmsNorm,
    /// Attention.
    pub attn: VisionAttention,
    /// SwiGLU MLP with biases.
    pub mlp: SwiGlu,
}

/// Merges `merge²` neighbouring patches into one language-model token.
#[derive(Module, Debug)]
pub struct PatchMerger {
    /// Norm before merging.
    pub ln_q: RmsNorm,
    /// First linear layer (`mlp.0` in Hugging Face files).
    pub mlp0: Linear,
    /// Second linear layer (`mlp.2`), after a GELU.
    pub mlp2: Linear,
}

/// The Qwen2.5-VL vision tower.
#[derive(Module, Debug)]
pub struct VisionTower {
    /// Patch embedding.
    pub patch_embed: PatchEmbed,
    /// Transformer blocks.
    pub blocks: Vec<VisionBlock>,
    /// Patch merger.
    pub merger: PatchMerger,
    /// Hyper-parameters.
    #[module(skip)]
    pub config: VisionConfig,
    /// Query rows attended at once in longer sequences ([`DEFAULT_ATTENTION_CHUNK`]).
    #[module(skip)]
    pub attention_chunk: usize,
}

impl VisionTower {
    pub(crate) fn load(src: &mut dyn ParamSource, cfg: &VisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let pd = cfg.patch_dim();
        let conv_shape = [
            c,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.patch_size,
        ];
        let std = 1.0 / (pd as f32).sqrt();
        let w = src.fetch(
            "visual.patch_embed.proj.weight",
            &[c, pd],
            Some(&conv_shape),
            InitKind::Normal { std },
        )?;
        let device = src.device().clone();
        let patch_embed = PatchEmbed {
            proj: Linear {
                weight: super::init::named_param(
                    "visual.patch_embed.proj.weight",
                    tensor_from(w, [c, pd], &device),
                ),
                bias: None,
                lora: None,
            },
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("visual.blocks.{i}");
            blocks.push(VisionBlock {
                norm1: RmsNorm::load(src, &format!("{p}.norm1"), c, cfg.rms_norm_eps)?,
                norm2: RmsNorm::load(src, &format!("{p}.norm2"), c, cfg.rms_norm_eps)?,
                attn: VisionAttention {
                    qkv: Linear::load(src, &format!("{p}.attn.qkv"), c, 3 * c, true)?,
                    proj: Linear::load(src, &format!("{p}.attn.proj"), c, c, true)?,
                    num_heads: cfg.num_heads,
                },
                mlp: SwiGlu::load(src, &format!("{p}.mlp"), c, cfg.intermediate_size, true)?,
            });
        }
        let mc = c * cfg.merge_unit();
        let merger = PatchMerger {
            ln_q: RmsNorm::load(src, "visual.merger.ln_q", c, cfg.rms_norm_eps)?,
            mlp0: Linear::load(src, "visual.merger.mlp.0", mc, mc, true)?,
            mlp2: Linear::load(src, "visual.merger.mlp.2", mc, cfg.out_hidden_size, true)?,
        };
        Ok(Self {
            patch_embed,
            blocks,
            merger,
            config: cfg.clone(),
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
        })
    }

    /// Rotary `cos`/`sin` tables `[n, 1, head_dim]` for the patches, in window order.
    fn rotary_tables(&self, inputs: &VisionInputs, device: &Device) -> (Tensor<3>, Tensor<3>) {
        let cfg = &self.config;
        let hd = cfg.head_dim();
        let spatial = hd / 2;
        let quarter = spatial / 2;
        let inv: Vec<f32> = (0..quarter)
            .map(|j| 1.0 / (cfg.rope_theta as f32).powf((2 * j) as f32 / spatial as f32))
            .collect();
        let unit = cfg.merge_unit();
        let mut cos = Vec::with_capacity(inputs.n * hd);
        let mut sin = Vec::with_capacity(inputs.n * hd);
        let mut row = vec![0f32; spatial];
        for &wi in &inputs.window_index {
            for u in 0..unit {
                let [ph, pw] = inputs.pos_ids[wi * unit + u];
                for j in 0..quarter {
                    row[j] = ph as f32 * inv[j];
                    row[quarter + j] = pw as f32 * inv[j];
                }
                for _ in 0..2 {
                    cos.extend(row.iter().map(|a| a.cos()));
                    sin.extend(row.iter().map(|a| a.sin()));
                }
            }
        }
        (
            tensor_from(cos, [inputs.n, 1, hd], device),
            tensor_from(sin, [inputs.n, 1, hd], device),
        )
    }

    /// Runs the tower: `[n / merge², out_hidden]` features, one row per image token, in the
    /// images' token order.
    pub fn forward(&self, inputs: &VisionInputs) -> Tensor<2> {
        let cfg = &self.config;
        let device = self.patch_embed.proj.weight.val().device();
        let (b, n) = (inputs.count, inputs.n);
        let pd = cfg.patch_dim();
        let unit = cfg.merge_unit();
        // The patch embedding is row-wise, so the window permutation is applied to the inputs.
        let mut permuted = Vec::with_capacity(b * n * pd);
        for image in inputs.patches.chunks_exact(n * pd) {
            for &wi in &inputs.window_index {
                permuted.extend_from_slice(&image[wi * unit * pd..(wi + 1) * unit * pd]);
            }
        }
        let x = tensor_from(permuted, [b, n, pd], &device);
        let mut h = self.patch_embed.proj.forward(x);
        let (cos, sin) = self.rotary_tables(inputs, &device);
        let hd = cfg.head_dim();
        let (cos, sin) = (cos.reshape([1, n, 1, hd]), sin.reshape([1, n, 1, hd]));
        for (i, blk) in self.blocks.iter().enumerate() {
            let mask = if cfg.fullatt_block_indexes.contains(&i) {
                &inputs.full_mask
            } else {
                &inputs.window_mask
            };
            let a = blk.attn.forward(
                blk.norm1.forward(h.clone()),
                &cos,
                &sin,
                mask,
                self.attention_chunk,
            );
            h = h + a;
            h = h.clone() + blk.mlp.forward(blk.norm2.forward(h));
        }
        let c = h.dims()[2];
        let merged = self.merger.forward(h.reshape([b * n, c]), unit);
        let rev = inputs.reverse_index();
        let m = rev.len();
        let order: Vec<i64> = (0..b)
            .flat_map(|i| rev.iter().map(move |&r| (i * m + r) as i64))
            .collect();
        merged.select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(order, [b * m]), &device),
        )
    }
}

impl VisionAttention {
    /// Self-attention over `[images, n, hidden]`, each image on its own, within the blocks of
    /// `mask` (`chunk` query rows at a time when longer).
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Arc<KeyMask>,
        chunk: usize,
    ) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let heads = self.num_heads;
        let hd = c / heads;
        let qkv = self.qkv.forward(x).reshape([b, n, 3, heads, hd]);
        let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([b, n, heads, hd]);
        let q = apply_rotary(part(0), cos.clone(), sin.clone()).swap_dims(1, 2);
        let k = apply_rotary(part(1), cos.clone(), sin.clone()).swap_dims(1, 2);
        let v = part(2).swap_dims(1, 2);
        let out = masked_attention(q, k, v, mask, 1.0 / (hd as f64).sqrt(), chunk);
        self.proj.forward(out.swap_dims(1, 2).reshape([b, n, c]))
    }
}

impl PatchMerger {
    fn forward(&self, h: Tensor<2>, unit: usize) -> Tensor<2> {
        let [n, c] = h.dims();
        let x = self.ln_q.forward(h).reshape([n / unit, c * unit]);
        self.mlp2.forward(gelu(self.mlp0.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_vision_inputs_are_rejected() {
        let cfg = super::super::config::Qwen25VlConfig::tiny().vision;
        let e = VisionInputs::from_grids(vec![0.0; 10], &[[1, 2, 2]], &cfg).unwrap_err();
        assert!(e.to_string().contains("patches hold 10"), "{e}");
        let e = VisionInputs::from_grids(vec![], &[[1, 3, 2]], &cfg).unwrap_err();
        assert!(e.to_string().contains("multiples of 2"), "{e}");
        let pd = cfg.patch_dim();
        let e = VisionInputs::new(
            vec![0.0; 4 * pd],
            vec![[0, 0]; 4],
            vec![1],
            vec![0, 4],
            vec![0, 4],
            &cfg,
        )
        .unwrap_err();
        assert!(e.to_string().contains("permutation"), "{e}");
    }
}
