//! Log-probs and entropies of chosen tokens without holding the `[rows, vocab]` logits: the output
//! head, log-softmax, the pick of each row's token and the entropy as one custom operation
//! ([`ChunkedTokenScores`]) that goes through the rows a chunk at a time and keeps only the
//! hidden rows and two numbers per row for the backward pass, recomputing each chunk's logits
//! there. At Qwen2.5-VL's vocabulary (151,936) the logits of 8k rows are 5 GB in float32, more
//! than every other activation of a 3B-width layer together.
//!
//! Small problems (at most [`WHOLE_LOGITS_LIMIT`] logits) are computed whole, as before: the
//! demo's figures come from that path.

use std::ops::Range;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IndexingUpdateOp};
use burn::backend::{
    Autodiff, Backend, Dispatch, Flex, Slice, TensorData, TensorMetadata, backend_extension,
};
use burn::tensor::{Device, Tensor};

use super::attention::runs_chunked;

/// Logits computed whole at most (2^26, 256 MiB in float32); more go a chunk of rows at a time,
/// each chunk about this size.
pub const WHOLE_LOGITS_LIMIT: usize = 1 << 26;

/// Whether the logits of `rows` rows over `vocab` are at most `limit` values, small enough to
/// compute whole (or the device is one [`ChunkedTokenScores`] does not run on).
pub(crate) fn whole_logits(rows: usize, vocab: usize, limit: usize, device: &Device) -> bool {
    rows * vocab <= limit || !runs_chunked(device)
}

/// `[rows]` log-probs of `targets` and `[rows]` entropies of the predictive distributions of
/// `hidden` `[rows, hidden]` under the output head `weight` `[vocab, hidden]` (Hugging Face's
/// layout), chunks of rows of at most `limit` logits at a time. Carries the autodiff graph into
/// `hidden` and `weight`.
pub(crate) fn chunked_token_scores(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: &[i64],
    limit: usize,
) -> (Tensor<1>, Tensor<1>) {
    let [rows, _] = hidden.dims();
    let chunk = (limit / weight.dims()[0]).max(1);
    let both = Tensor::<2>::from_dispatch(<Dispatch as ChunkedTokenScores>::chunked_token_scores(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        Arc::from(targets),
        chunk,
    ));
    let logp = both.clone().narrow(1, 0, 1).reshape([rows]);
    let entropy = both.narrow(1, 1, 1).reshape([rows]);
    (logp, entropy)
}

/// The output head, log-softmax, token pick and entropy in chunks of rows, as a backend
/// operation with its own backward pass.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cuda"))]
pub trait ChunkedTokenScores: Backend {
    /// `[rows, 2]`: each row's log-prob of its target and its entropy, `chunk` rows at a time.
    fn chunked_token_scores(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Arc<[i64]>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(&Saved::inputs(hidden, weight, targets, chunk)).0
    }
}

impl ChunkedTokenScores for Flex {}

#[cfg(feature = "cuda")]
impl ChunkedTokenScores for burn::backend::Cube {}

/// What the backward pass keeps: the inputs and each row's log-sum-exp and entropy
/// (`[rows, 1]` each).
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: Arc<[i64]>,
    chunk: usize,
    lse: Option<FloatTensor<B>>,
    entropy: Option<FloatTensor<B>>,
}

impl<B: Backend> Saved<B> {
    fn inputs(
        hidden: FloatTensor<B>,
        weight: FloatTensor<B>,
        targets: Arc<[i64]>,
        chunk: usize,
    ) -> Self {
        Self {
            hidden,
            weight,
            targets,
            chunk,
            lse: None,
            entropy: None,
        }
    }

    fn chunks(&self) -> impl Iterator<Item = Range<usize>> + use<B> {
        let (rows, chunk) = (self.hidden.shape()[0], self.chunk.max(1));
        (0..rows)
            .step_by(chunk)
            .map(move |start| start..(start + chunk).min(rows))
    }

    /// Rows `rows` of a `[rows, w]` tensor.
    fn rows(t: &FloatTensor<B>, rows: &Range<usize>) -> FloatTensor<B> {
        B::float_slice(t.clone(), &[Slice::from(rows.clone()), Slice::from(..)])
    }

    /// The chunk's logits `[chunk, vocab]`.
    fn logits(&self, rows: &Range<usize>) -> FloatTensor<B> {
        let wt = B::float_swap_dims(self.weight.clone(), 0, 1);
        B::float_matmul(Self::rows(&self.hidden, rows), wt)
    }

    /// The chunk's targets as `[chunk, 1]` indices.
    fn targets(&self, rows: &Range<usize>) -> burn::backend::tensor::IntTensor<B> {
        let t = self.targets[rows.clone()].to_vec();
        B::int_from_data(TensorData::new(t, [rows.len(), 1]), &self.hidden.device())
    }
}

/// The forward pass: `[rows, 2]` (log-prob, entropy), and the rows' log-sum-exp `[rows, 1]`.
fn forward<B: Backend>(s: &Saved<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for rows in s.chunks() {
        let z = s.logits(&rows);
        let max = B::float_max_dim(z.clone(), 1);
        let e = B::float_exp(B::float_sub(z.clone(), max.clone()));
        let total = B::float_sum_dim(e.clone(), 1);
        let lse = B::float_add(max, B::float_log(total.clone()));
        let picked = B::float_gather(1, z.clone(), s.targets(&rows));
        let logp = B::float_sub(picked, lse.clone());
        // H = −Σ p (z − lse) = lse − Σ p z.
        let mean_z = B::float_div(B::float_sum_dim(B::float_mul(e, z), 1), total);
        let entropy = B::float_sub(lse.clone(), mean_z);
        outs.push(B::float_cat(vec![logp, entropy], 1));
        lses.push(lse);
    }
    (B::float_cat(outs, 0), B::float_cat(lses, 0))
}

/// The backward pass for the output gradient `grad` `[rows, 2]`: the gradients of `hidden`
/// and, when `weight_grad`, of `weight`. With `p` the chunk's probabilities and `g`, `gH` the
/// gradients of a row's log-prob and entropy, `dz = g·(onehot − p) − gH·p·(log p + H)`.
fn backward<B: Backend>(
    s: &Saved<B>,
    grad: FloatTensor<B>,
    weight_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let (lse, entropy) = (
        s.lse.clone().expect("saved"),
        s.entropy.clone().expect("saved"),
    );
    let mut dhs = Vec::new();
    let mut dw: Option<FloatTensor<B>> = None;
    for rows in s.chunks() {
        let g = Saved::<B>::rows(&grad, &rows);
        let g_logp = B::float_slice(g.clone(), &[Slice::from(..), Slice::from(0..1)]);
        let g_ent = B::float_slice(g, &[Slice::from(..), Slice::from(1..2)]);
        let logp_all = B::float_sub(s.logits(&rows), Saved::<B>::rows(&lse, &rows));
        let p = B::float_exp(logp_all.clone());
        let spread = B::float_add(
            g_logp.clone(),
            B::float_mul(
                g_ent,
                B::float_add(logp_all, Saved::<B>::rows(&entropy, &rows)),
            ),
        );
        let dz = B::float_scatter(
            1,
            B::float_neg(B::float_mul(p, spread)),
            s.targets(&rows),
            g_logp,
            IndexingUpdateOp::Add,
        );
        let h = Saved::<B>::rows(&s.hidden, &rows);
        if weight_grad {
            let part = B::float_matmul(B::float_swap_dims(dz.clone(), 0, 1), h);
            dw = Some(match dw {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
        dhs.push(B::float_matmul(dz, s.weight.clone()));
    }
    (B::float_cat(dhs, 0), dw)
}

impl<B: Backend + ChunkedTokenScores, C: CheckpointStrategy> ChunkedTokenScores for Autodiff<B, C> {
    fn chunked_token_scores(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Arc<[i64]>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Chunked;

        impl<B: Backend> Backward<B, 2> for Chunked {
            type State = Saved<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let [hidden, weight] = ops.parents;
                // A frozen head (LoRA) needs no `[vocab, hidden]` gradient: skip its products.
                let (dh, dw) = backward::<B>(&ops.state, grad, weight.is_some());
                if let Some(node) = hidden {
                    grads.register::<B>(node.id, dh);
                }
                if let (Some(node), Some(dw)) = (weight, dw) {
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        let nodes = [hidden.node(), weight.node()];
        let mut saved = Saved::inputs(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            chunk,
        );
        let (out, lse) = forward::<B>(&saved);
        match Chunked.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let rows = out.shape()[0];
                saved.entropy = Some(B::float_slice(
                    out.clone(),
                    &[Slice::from(0..rows), Slice::from(1..2)],
                ));
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
    use crate::network::layers::test_values;
    use crate::network::{ComputeDevice, to_host};
    use burn::tensor::Int;
    use burn::tensor::activation::log_softmax;

    fn random(shape: [usize; 2], seed: usize, device: &burn::tensor::Device) -> Tensor<2> {
        let values = test_values(shape.iter().product(), seed, 3.0);
        Tensor::<2>::from_data(TensorData::new(values, shape), device).require_grad()
    }

    /// Log-probs, entropies and the gradients of hidden and weight, whole or in chunks.
    fn run(chunk: Option<usize>) -> Vec<Vec<f32>> {
        let device = ComputeDevice::Flex.device(true).unwrap();
        let (rows, dim, vocab) = (7, 5, 11);
        let hidden = random([rows, dim], 1, &device);
        let weight = random([vocab, dim], 2, &device);
        let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 5) % vocab as i64).collect();
        let (logp, entropy) = match chunk {
            None => {
                let logp_all = log_softmax(hidden.clone().matmul(weight.clone().transpose()), 1);
                let tgt = TensorData::new(targets.clone(), [rows, 1]);
                let tgt = Tensor::<2, Int>::from_data(tgt, &device);
                let entropy = (logp_all.clone().exp() * logp_all.clone()).sum_dim(1).neg();
                (
                    logp_all.gather(1, tgt).reshape([rows]),
                    entropy.reshape([rows]),
                )
            }
            Some(chunk) => {
                let both = Tensor::<2>::from_dispatch(
                    <Dispatch as ChunkedTokenScores>::chunked_token_scores(
                        hidden.clone().into_dispatch(),
                        weight.clone().into_dispatch(),
                        Arc::from(&targets[..]),
                        chunk,
                    ),
                );
                (
                    both.clone().narrow(1, 0, 1).reshape([rows]),
                    both.narrow(1, 1, 1).reshape([rows]),
                )
            }
        };
        let w_lp = random([rows, 1], 3, &device).detach().reshape([rows]);
        let w_ent = random([rows, 1], 4, &device).detach().reshape([rows]);
        let loss = (logp.clone() * w_lp).sum() + (entropy.clone() * w_ent).sum();
        let grads = loss.backward();
        vec![
            to_host(logp),
            to_host(entropy),
            to_host(hidden.grad(&grads).unwrap()),
            to_host(weight.grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn chunks_give_the_whole_logits_scores_and_gradients() {
        let whole = run(None);
        for chunk in [1, 3, 7] {
            let chunked = run(Some(chunk));
            for (what, (a, b)) in ["logp", "entropy", "d hidden", "d weight"]
                .iter()
                .zip(chunked.iter().zip(&whole))
            {
                let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 2e-6 * scale.max(1.0),
                    "{what}, chunk {chunk}: max |Δ| {worst:e}"
                );
            }
        }
    }
}
