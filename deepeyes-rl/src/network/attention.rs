//! Attention whose memory grows linearly with the sequence: which keys a query sees is described
//! per row ([`KeyMask`]) instead of by a dense `[L, L]` bias, and long sequences are attended in
//! chunks of query rows by a custom operation ([`ChunkedAttention`]) that keeps only the inputs,
//! the output and each row's log-sum-exp for the backward pass, recomputing every chunk's
//! scores there (as FlashAttention does, one chunk of rows at a time).
//!
//! Short sequences (at most `chunk` query rows) take the plain dense path: at those lengths the
//! `[rows, keys]` scores are small, and the dense path is the one the demo's figures come from.

use std::ops::Range;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, Backend, Dispatch, DispatchDevice, Flex, Shape, Slice, TensorData, TensorMetadata,
    backend_extension,
};
use burn::tensor::{Device, Tensor};

use super::layers::{attention, tensor_from};

/// Additive bias for masked-out attention scores (finite, so a fully masked row stays finite).
pub(crate) const MASKED: f32 = -1.0e9;

/// Query rows attended at once when a sequence is longer than that (512): the largest transient
/// of a chunk is `[rows, kv heads, rep · chunk, keys]` scores.
pub const DEFAULT_ATTENTION_CHUNK: usize = 512;

/// Which keys each query may see, described per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMask {
    /// Right-padded token rows, causal. Keys are `past` positions of a shared prefix, then the
    /// row's own positions: query `i` of row `b` sees the first `prefix[b]` prefix keys and its
    /// own keys `j ≤ i` with `j < lengths[b]` (a padding query sees the whole row).
    Causal {
        /// Prefix key positions before each row's own (0 without a shared prefix).
        past: usize,
        /// Visible prefix keys of each row.
        prefix: Vec<usize>,
        /// Own length of each row.
        lengths: Vec<usize>,
    },
    /// One sequence cut into blocks (`bounds` are cumulative, from 0 to its length; repeats
    /// make empty blocks): each position sees the positions of its own block. Shared by every
    /// row of a batch.
    Segments {
        /// Cumulative block boundaries.
        bounds: Vec<usize>,
    },
}

impl KeyMask {
    /// A causal mask over right-padded rows of the given lengths, no prefix.
    pub fn causal(lengths: &[usize]) -> Self {
        Self::Causal {
            past: 0,
            prefix: vec![0; lengths.len()],
            lengths: lengths.to_vec(),
        }
    }

    /// Rows of the bias: one per batch row, or one broadcast over all of them.
    pub fn rows(&self) -> usize {
        match self {
            Self::Causal { lengths, .. } => lengths.len(),
            Self::Segments { .. } => 1,
        }
    }

    /// The additive bias `[rows, 1, queries.len(), keys]` of the given query rows: 0 where the
    /// query sees the key, [`MASKED`] elsewhere.
    pub fn bias(&self, queries: Range<usize>, keys: usize) -> Vec<f32> {
        let q = queries.len();
        let mut out = vec![MASKED; self.rows() * q * keys];
        match self {
            Self::Causal {
                past,
                prefix,
                lengths,
            } => {
                for (b, (&p, &len)) in prefix.iter().zip(lengths).enumerate() {
                    for (r, i) in queries.clone().enumerate() {
                        let row = &mut out[(b * q + r) * keys..][..keys];
                        row[..p.min(*past)].fill(0.0);
                        let own = len.min(i + 1).min(keys - past);
                        row[*past..past + own].fill(0.0);
                    }
                }
            }
            Self::Segments { bounds } => {
                for (r, i) in queries.enumerate() {
                    // The block holding `i`; none (empty or short bounds) leaves it masked.
                    let s = bounds.partition_point(|&e| e <= i);
                    let start = s.checked_sub(1).and_then(|j| bounds.get(j)).copied();
                    let (Some(start), Some(&end)) = (start, bounds.get(s)) else {
                        continue;
                    };
                    let end = end.min(keys);
                    out[r * keys..][start.min(end)..end].fill(0.0);
                }
            }
        }
        out
    }
}

/// `softmax(q kᵀ · scale + mask) v` for queries `[batch, heads, seq, head_dim]` over keys and
/// values `[batch, kv heads, keys, head_dim]` (grouped-query: `heads` a multiple of `kv heads`,
/// query head `h` using key/value head `h / (heads / kv heads)`). More than `chunk` query rows
/// go through [`ChunkedAttention`] (on the backends it is implemented for); otherwise the scores
/// are computed whole.
pub(crate) fn masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &Arc<KeyMask>,
    scale: f64,
    chunk: usize,
) -> Tensor<4> {
    let [b, nh, s, hd] = q.dims();
    let [_, nkv, keys, _] = k.dims();
    if s > chunk.max(1) && runs_chunked(&q.device()) {
        let out = <Dispatch as ChunkedAttention>::chunked_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            Arc::clone(mask),
            scale,
            chunk.max(1),
        );
        return Tensor::from_dispatch(out);
    }
    let rep = nh / nkv;
    // Heads kv·rep .. kv·rep + rep − 1 share key/value head kv: stack them along the query axis
    // instead of repeating keys and values.
    let q = q.reshape([b, nkv, rep * s, hd]);
    let bias = tensor_from(
        mask.bias(0..s, keys),
        [mask.rows(), 1, s, keys],
        &q.device(),
    );
    let bias = if rep > 1 {
        bias.repeat_dim(2, rep)
    } else {
        bias
    };
    attention(q, k, v, bias, scale).reshape([b, nh, s, hd])
}

/// Whether `device` (with or without autodiff) is one the chunked operations are implemented
/// for: burn's CPU backend, and its CUDA backend when built with the `cuda` feature.
pub(crate) fn runs_chunked(device: &Device) -> bool {
    fn chunked(device: &DispatchDevice) -> bool {
        match device {
            DispatchDevice::Flex(_) => true,
            #[cfg(feature = "cuda")]
            DispatchDevice::Cube(_) => true,
            DispatchDevice::Autodiff(inner) => chunked(&inner.clone().inner()),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    chunked(device.as_dispatch())
}

/// Attention in chunks of query rows, as a backend operation with its own backward pass.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cuda"))]
pub trait ChunkedAttention: Backend {
    /// [`masked_attention`] over `chunk` query rows at a time.
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Arc<KeyMask>,
        scale: f64,
        chunk: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(&Saved::inputs(q, k, v, mask, scale, chunk)).0
    }
}

impl ChunkedAttention for Flex {}

#[cfg(feature = "cuda")]
impl ChunkedAttention for burn::backend::Cube {}

/// What the backward pass keeps of a chunked attention: its inputs, output and the
/// log-sum-exp of every query row (`[batch, heads, seq, 1]`).
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: Option<FloatTensor<B>>,
    lse: Option<FloatTensor<B>>,
    mask: Arc<KeyMask>,
    scale: f64,
    chunk: usize,
}

impl<B: Backend> Saved<B> {
    fn inputs(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        mask: Arc<KeyMask>,
        scale: f64,
        chunk: usize,
    ) -> Self {
        Self {
            q,
            k,
            v,
            out: None,
            lse: None,
            mask,
            scale,
            chunk,
        }
    }

    fn dims(&self) -> Dims {
        let q = self.q.shape();
        let k = self.k.shape();
        Dims {
            batch: q[0],
            heads: q[1],
            seq: q[2],
            kv_heads: k[1],
            keys: k[2],
        }
    }
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    seq: usize,
    kv_heads: usize,
    keys: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The chunks of query rows.
    fn chunks(&self, chunk: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let seq = self.seq;
        (0..seq)
            .step_by(chunk)
            .map(move |start| start..(start + chunk).min(seq))
    }

    /// Rows `rows` of a `[batch, heads, seq, w]` tensor, grouped by key/value head:
    /// `[batch, kv heads, rep · rows, w]`.
    fn stack<B: Backend>(&self, t: &FloatTensor<B>, rows: &Range<usize>) -> FloatTensor<B> {
        let w = t.shape()[3];
        let part = B::float_slice(
            t.clone(),
            &[
                Slice::from(..),
                Slice::from(..),
                Slice::from(rows.clone()),
                Slice::from(..),
            ],
        );
        B::float_reshape(
            part,
            Shape::new([self.batch, self.kv_heads, self.rep() * rows.len(), w]),
        )
    }

    /// The inverse of [`Dims::stack`] for a chunk: `[batch, heads, rows, w]`.
    fn unstack<B: Backend>(&self, t: FloatTensor<B>, rows: usize) -> FloatTensor<B> {
        let w = t.shape()[3];
        B::float_reshape(t, Shape::new([self.batch, self.heads, rows, w]))
    }
}

/// The chunk's scores `q kᵀ · scale + bias`, `[batch, kv heads, rep · rows, keys]`.
fn scores<B: Backend>(
    s: &Saved<B>,
    dims: &Dims,
    q: FloatTensor<B>,
    rows: &Range<usize>,
) -> FloatTensor<B> {
    let kt = B::float_swap_dims(s.k.clone(), 2, 3);
    let raw = B::float_mul_scalar(B::float_matmul(q, kt), s.scale.into());
    let bias = s.mask.bias(rows.clone(), dims.keys);
    let shape = [s.mask.rows(), 1, rows.len(), dims.keys];
    let mut bias = B::float_from_data(TensorData::new(bias, shape), &s.q.device());
    if dims.rep() > 1 {
        bias = B::float_repeat_dim(bias, 2, dims.rep());
    }
    B::float_add(raw, bias)
}

/// The forward pass: the output `[batch, heads, seq, head_dim]` and each query row's
/// log-sum-exp `[batch, heads, seq, 1]`.
fn forward<B: Backend>(s: &Saved<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let dims = s.dims();
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for rows in dims.chunks(s.chunk) {
        let q = dims.stack::<B>(&s.q, &rows);
        let scores = scores::<B>(s, &dims, q, &rows);
        let max = B::float_max_dim(scores.clone(), 3);
        let p = B::float_exp(B::float_sub(scores, max.clone()));
        let total = B::float_sum_dim(p.clone(), 3);
        let out = B::float_div(B::float_matmul(p, s.v.clone()), total.clone());
        let lse = B::float_add(max, B::float_log(total));
        outs.push(dims.unstack::<B>(out, rows.len()));
        lses.push(dims.unstack::<B>(lse, rows.len()));
    }
    (B::float_cat(outs, 2), B::float_cat(lses, 2))
}

/// The backward pass: gradients of `q`, `k` and `v` for the output's gradient `grad`, each
/// chunk's probabilities recomputed from the saved log-sum-exp.
fn backward<B: Backend>(
    s: &Saved<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let dims = s.dims();
    let (out, lse) = (s.out.clone().expect("saved"), s.lse.clone().expect("saved"));
    // Σ_j p_ij dp_ij = Σ_d dO_id O_id per query row.
    let delta = B::float_sum_dim(B::float_mul(grad.clone(), out), 3);
    let (mut dk, mut dv) = (None, None);
    let mut dqs = Vec::new();
    let add = |acc: Option<FloatTensor<B>>, t: FloatTensor<B>| match acc {
        Some(a) => Some(B::float_add(a, t)),
        None => Some(t),
    };
    for rows in dims.chunks(s.chunk) {
        let q = dims.stack::<B>(&s.q, &rows);
        let dout = dims.stack::<B>(&grad, &rows);
        let p = B::float_exp(B::float_sub(
            scores::<B>(s, &dims, q.clone(), &rows),
            dims.stack::<B>(&lse, &rows),
        ));
        dv = add(
            dv,
            B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), dout.clone()),
        );
        let dp = B::float_matmul(dout, B::float_swap_dims(s.v.clone(), 2, 3));
        let ds = B::float_mul(p, B::float_sub(dp, dims.stack::<B>(&delta, &rows)));
        let ds = B::float_mul_scalar(ds, s.scale.into());
        let dq = B::float_matmul(ds.clone(), s.k.clone());
        dqs.push(dims.unstack::<B>(dq, rows.len()));
        dk = add(dk, B::float_matmul(B::float_swap_dims(ds, 2, 3), q));
    }
    let none = "a sequence has at least one query row";
    (B::float_cat(dqs, 2), dk.expect(none), dv.expect(none))
}

impl<B: Backend + ChunkedAttention, C: CheckpointStrategy> ChunkedAttention for Autodiff<B, C> {
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Arc<KeyMask>,
        scale: f64,
        chunk: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Chunked;

        impl<B: Backend> Backward<B, 3> for Chunked {
            type State = Saved<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = backward::<B>(&ops.state, grad);
                for (parent, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let nodes = [q.node(), k.node(), v.node()];
        let mut saved = Saved::inputs(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            mask,
            scale,
            chunk,
        );
        let (out, lse) = forward::<B>(&saved);
        match Chunked.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                saved.out = Some(out.clone());
                saved.lse = Some(lse);
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::ComputeDevice;
    use crate::network::layers::test_values;

    fn random(shape: [usize; 4], seed: usize, device: &burn::tensor::Device) -> Tensor<4> {
        let values = test_values(shape.iter().product(), seed, 2.0);
        tensor_from(values, shape, device).require_grad()
    }

    /// Output and the gradients of `q`, `k`, `v` under a fixed weighting of the output.
    fn run(
        mask: &KeyMask,
        heads: [usize; 2],
        seq: usize,
        keys: usize,
        chunk: usize,
    ) -> Vec<Vec<f32>> {
        let device = ComputeDevice::Flex.device(true).unwrap();
        let [nh, nkv] = heads;
        let b = mask.rows().max(2);
        let q = random([b, nh, seq, 8], 1, &device);
        let k = random([b, nkv, keys, 8], 2, &device);
        let v = random([b, nkv, keys, 8], 3, &device);
        let w = random([b, nh, seq, 8], 4, &device).detach();
        let mask = Arc::new(mask.clone());
        let out = masked_attention(q.clone(), k.clone(), v.clone(), &mask, 0.35, chunk);
        let grads = (out.clone() * w).sum().backward();
        let host = |t: Tensor<4>| crate::network::to_host(t);
        vec![
            host(out),
            host(q.grad(&grads).unwrap()),
            host(k.grad(&grads).unwrap()),
            host(v.grad(&grads).unwrap()),
        ]
    }

    fn assert_close(chunked: &[Vec<f32>], dense: &[Vec<f32>]) {
        for (what, (a, b)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(chunked.iter().zip(dense))
        {
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5 * scale,
                "{what}: max |Δ| {worst:e} of {scale:e}"
            );
        }
    }

    #[test]
    fn chunks_give_the_dense_output_and_gradients() {
        // Grouped-query heads, padded rows after a shared prefix, chunks that do not divide the
        // rows; then block-diagonal (vision) attention.
        let causal = KeyMask::Causal {
            past: 3,
            prefix: vec![3, 1],
            lengths: vec![7, 4],
        };
        assert_close(
            &run(&causal, [4, 2], 7, 10, 3),
            &run(&causal, [4, 2], 7, 10, 64),
        );
        let blocks = KeyMask::Segments {
            bounds: vec![0, 4, 4, 9, 11],
        };
        assert_close(
            &run(&blocks, [2, 2], 11, 11, 4),
            &run(&blocks, [2, 2], 11, 11, 64),
        );
    }

    #[test]
    fn causal_mask_sees_prefix_then_own_past() {
        let m = KeyMask::Causal {
            past: 2,
            prefix: vec![2, 1],
            lengths: vec![2, 1],
        };
        let x = MASKED;
        assert_eq!(
            m.bias(0..2, 4),
            vec![
                0.0, 0.0, 0.0, x, //
                0.0, 0.0, 0.0, 0.0, //
                0.0, x, 0.0, x, //
                0.0, x, 0.0, x,
            ]
        );
        assert_eq!(m.bias(1..2, 4), vec![0.0, 0.0, 0.0, 0.0, 0.0, x, 0.0, x]);
    }

    #[test]
    fn causal_mask_without_prefix_masks_future_and_padding() {
        let x = MASKED;
        assert_eq!(
            KeyMask::causal(&[2]).bias(0..3, 3),
            vec![0.0, x, x, 0.0, 0.0, x, 0.0, 0.0, x]
        );
    }

    #[test]
    fn segments_are_blocks_and_match_the_geometry_crate() {
        let bounds = [0usize, 2, 2, 5];
        let m = KeyMask::Segments {
            bounds: bounds.to_vec(),
        };
        let cu: Vec<i64> = bounds.iter().map(|&b| b as i64).collect();
        let dense = deepeyes_core::vision::segment_mask(&cu, 5, MASKED).unwrap();
        assert_eq!(m.bias(0..5, 5), dense);
        assert_eq!(m.bias(3..4, 5), dense[15..20].to_vec());
        // Boundaries that cover nothing leave everything masked instead of panicking.
        let empty = KeyMask::Segments { bounds: vec![] };
        assert!(empty.bias(0..2, 2).iter().all(|&b| b == MASKED));
    }
}
