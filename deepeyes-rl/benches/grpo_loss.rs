//! The GRPO loss and its gradient on a realistic micro-batch: 128 trajectories × 300 tokens
//! (about 70% model-generated), token-mean, with and without a KL term; plus the group
//! advantages of a DeepEyes-sized step (4096 trajectories in groups of 16).

// criterion's macros define an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use deepeyes_core::Rng;
use deepeyes_rl::grpo::{GrpoConfig, LossScale, PolicyLossInput, group_advantages, policy_loss};
use ndarray::Array2;

const ROWS: usize = 128;
const COLS: usize = 300;

struct Batch {
    logp: Array2<f32>,
    old: Array2<f32>,
    reference: Array2<f32>,
    adv: Array2<f32>,
    mask: Array2<f32>,
}

fn batch() -> Batch {
    let mut rng = Rng::new(1);
    let logp = Array2::from_shape_fn((ROWS, COLS), |_| -(rng.next_f32() * 3.0));
    let old = logp.mapv(|x| x + (rng.next_f32() - 0.5) * 0.4);
    let reference = logp.mapv(|x| x + (rng.next_f32() - 0.5) * 0.2);
    let row_adv: Vec<f32> = (0..ROWS).map(|_| rng.normal() as f32).collect();
    let adv = Array2::from_shape_fn((ROWS, COLS), |(b, _)| row_adv[b]);
    let mask = Array2::from_shape_fn((ROWS, COLS), |(_, t)| {
        f32::from(u8::from(t >= 40 && rng.next_f32() < 0.8))
    });
    Batch {
        logp,
        old,
        reference,
        adv,
        mask,
    }
}

fn bench_loss(c: &mut Criterion) {
    let b = batch();
    let scale = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    let plain = GrpoConfig::default();
    let with_kl = GrpoConfig {
        kl_coef: 0.001,
        ..GrpoConfig::default()
    };
    let input = |reference: bool| PolicyLossInput {
        logprobs: b.logp.view(),
        old_logprobs: b.old.view(),
        advantages: b.adv.view(),
        mask: b.mask.view(),
        ref_logprobs: reference.then(|| b.reference.view()),
        entropy: None,
        rollout_logprobs: None,
    };
    c.bench_function("policy_loss 128x300 token-mean", |bench| {
        let inp = input(false);
        bench.iter(|| black_box(policy_loss(&plain, black_box(&inp), scale).unwrap()));
    });
    c.bench_function("policy_loss 128x300 token-mean + k3 KL", |bench| {
        let inp = input(true);
        bench.iter(|| black_box(policy_loss(&with_kl, black_box(&inp), scale).unwrap()));
    });

    let mut rng = Rng::new(2);
    let rewards: Vec<f64> = (0..4096).map(|_| rng.next_f64() * 2.0 - 0.2).collect();
    let groups: Vec<usize> = (0..4096).map(|i| i / 16).collect();
    c.bench_function("group_advantages 256x16", |bench| {
        bench.iter(|| black_box(group_advantages(&rewards, &groups, true, 1e-6).unwrap()));
    });
}

criterion_group!(benches, bench_loss);
criterion_main!(benches);
