//! Training-side checks of the burn Qwen2.5-VL: gradients reach every parameter and match
//! transformers' autograd, freezing the vision tower works, and AdamW steps improve the
//! objective.

// The tests report the measured differences on stderr (visible with --nocapture).
#![allow(clippy::print_stderr)]

mod model_common;

use burn::optim::{AdamWConfig, GradientsParams};
use deepeyes_rl::network::{
    Batch, ComputeDevice, HostParam, PadLayout, Qwen25Vl, Qwen25VlConfig, Sequence, param_grads,
    tensor2, to_host,
};
use model_common::Golden;

fn autodiff_model(g: &Golden) -> Qwen25Vl {
    let device = ComputeDevice::Flex.device(true).unwrap();
    Qwen25Vl::from_pretrained(g.checkpoint(), &device).unwrap()
}

/// The golden objective `Σ w·logp + 0.05 Σ H` over the multimodal prompt.
fn golden_loss(g: &Golden, model: &Qwen25Vl) -> burn::tensor::Tensor<1> {
    let pd = model.config.vision.patch_dim();
    let seq = g.mm_sequence(pd);
    let batch = Batch::new(
        &model.config,
        std::slice::from_ref(&seq),
        PadLayout::Expanded,
    )
    .unwrap();
    let scores = model.score_tokens(&batch, true).unwrap();
    // w[i] weighs the prediction of token i + 1; score column t holds token t.
    let w = g.get("grad_weights").f32s();
    let mut weights = vec![0.0f32; batch.score_len];
    weights[1..].copy_from_slice(&w);
    let weights = tensor2(weights, 1, batch.score_len, &model.device()).unwrap();
    let ent = scores.entropy.unwrap();
    (weights * scores.logprobs).sum() + ent.sum().mul_scalar(0.05)
}

#[test]
fn every_parameter_gets_the_transformers_gradient() {
    let g = Golden::load();
    let model = autodiff_model(&g);
    let infos = model.params();
    assert_eq!(infos.len(), 57, "tiny Qwen2.5-VL has 57 parameter tensors");
    assert!(infos.iter().all(|p| p.trainable));

    let loss = golden_loss(&g, &model);
    let loss_value = f64::from(to_host(loss.clone())[0]);
    let want_loss = g.get("grad_loss").data[0];
    assert!(
        (loss_value - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "loss {loss_value} vs transformers {want_loss}"
    );
    let grads = loss.backward();

    let names: Vec<String> = g.meta["grad_names"]
        .split(',')
        .map(str::to_string)
        .collect();
    let norms = &g.get("grad_norms").data;
    let want_norm: std::collections::HashMap<&str, f64> = names
        .iter()
        .map(String::as_str)
        .zip(norms.iter().copied())
        .collect();
    let got = param_grads(&model, &grads);
    assert_eq!(got.len(), names.len());
    let mut worst = (0.0f64, String::new());
    for (name, grad) in &got {
        let grad = grad
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(
            grad.values.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(
            grad.values.iter().any(|&v| v != 0.0),
            "{name}: all-zero gradient"
        );
        let norm = grad
            .values
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        let want = want_norm[name.as_str()];
        let rel = (norm - want).abs() / want.max(1e-6);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        assert!(
            rel <= 1e-3,
            "{name}: |grad| {norm} vs transformers {want} (rel {rel:e})"
        );
        // Whole gradients of a few parameters.
        if let Some(full) = g.tensors.get(&format!("grad.{name}")) {
            let scale = full.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let d = model_common::max_abs_diff(&grad.values, &full.data);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{name}: gradient max |Δ| {d:e} (scale {scale:e})"
            );
        }
    }
    eprintln!(
        "worst relative gradient-norm error: {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn frozen_vision_tower_gets_no_gradient() {
    let g = Golden::load();
    let model = autodiff_model(&g).freeze_vision();
    let infos = model.params();
    for p in &infos {
        assert_eq!(p.trainable, !p.name.starts_with("visual."), "{}", p.name);
    }
    let grads = golden_loss(&g, &model).backward();
    for (name, grad) in param_grads(&model, &grads) {
        if name.starts_with("visual.") {
            assert!(grad.is_none(), "{name} is frozen but got a gradient");
        } else {
            let grad = grad.unwrap_or_else(|| panic!("{name} has no gradient"));
            assert!(
                grad.values.iter().any(|&v| v != 0.0),
                "{name}: all-zero gradient"
            );
        }
    }
}

#[test]
fn adamw_steps_raise_the_weighted_log_likelihood() {
    let device = ComputeDevice::Flex.device(true).unwrap();
    let cfg = Qwen25VlConfig::tiny();
    let mut model = Qwen25Vl::random(&cfg, 11, &device).unwrap();
    let pd = cfg.vision.patch_dim();
    let image = |grid: [usize; 3], seed: f32| deepeyes_rl::network::ImageInput {
        grid,
        patches: (0..grid.iter().product::<usize>() * pd)
            .map(|i| (i as f32 * 0.37 + seed).sin())
            .collect(),
    };
    let pad = cfg.image_token_id;
    let seqs = vec![
        Sequence {
            score_from: 0,
            tokens: vec![
                10,
                cfg.vision_start_token_id,
                pad,
                cfg.vision_end_token_id,
                11,
                12,
                13,
                14,
            ],
            images: vec![image([1, 4, 4], 0.0)],
        },
        Sequence {
            score_from: 0,
            tokens: vec![20, 21, 22, 23, 24],
            images: vec![],
        },
    ];
    let batch = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap();
    let mask = tensor2(batch.score_mask(), batch.batch, batch.score_len, &device).unwrap();
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut objective = Vec::new();
    for _ in 0..4 {
        let scores = model.score_tokens(&batch, false).unwrap();
        let mean_logp = (mask.clone() * scores.logprobs)
            .sum()
            .div_scalar(batch.targets.len() as f64);
        objective.push(to_host(mean_logp.clone())[0]);
        let grads = mean_logp.neg().backward();
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(3e-3, model, grads);
    }
    eprintln!("mean log-prob over AdamW steps: {objective:?}");
    assert!(
        objective[3] > objective[0] + 0.05,
        "mean log-prob did not rise: {objective:?}"
    );
}

/// A GRPO-shaped batch: two prompts, each with its own image, sampled three times; some samples
/// go on with a second image (a crop), and scoring starts after the prompt.
fn grouped_sequences(cfg: &Qwen25VlConfig) -> Vec<Sequence> {
    let pad = cfg.image_token_id;
    let pd = cfg.vision.patch_dim();
    let image = |grid: [usize; 3], seed: usize| deepeyes_rl::network::ImageInput {
        grid,
        patches: (0..grid.iter().product::<usize>() * pd)
            .map(|i| ((i * 31 + seed * 17) % 97) as f32 / 97.0 - 0.5)
            .collect(),
    };
    let mut seqs = Vec::new();
    for prompt in 0..2u32 {
        let head = vec![1, 20 + prompt, 3, pad, 4, 30, 31, 32 + prompt];
        for sample in 0..3u32 {
            let mut tokens = head.clone();
            let mut images = vec![image([1, 4, 4], prompt as usize)];
            tokens.extend([40 + sample, 41, 42 + sample * prompt]);
            if sample > 0 {
                tokens.extend([3, pad, 4, 50 + sample]);
                images.push(image([1, 2, 4], 10 + (prompt * 3 + sample) as usize));
            }
            tokens.extend((0..sample).map(|i| 60 + i));
            seqs.push(Sequence {
                tokens,
                images,
                score_from: head.len(),
            });
        }
    }
    seqs
}

#[test]
fn shared_prefixes_give_the_same_logprobs_and_gradients() {
    let device = ComputeDevice::Flex.device(true).unwrap();
    let cfg = Qwen25VlConfig::tiny();
    let model = Qwen25Vl::random(&cfg, 11, &device).unwrap();
    let seqs = grouped_sequences(&cfg);
    let plain = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap();
    let shared = Batch::new(&cfg, &seqs, PadLayout::OnePerImage)
        .unwrap()
        .share_prefixes()
        .unwrap();
    let plan = shared
        .shared
        .as_ref()
        .expect("the rows share their prompts");
    assert_eq!(plan.prefix.batch, 2, "one prefix per prompt");
    // The prompt is 8 tokens, its pad 4 positions (a 4×4 grid merged 2×2); each row keeps its
    // last prompt position, which predicts the first scored token.
    assert_eq!(plan.prefix.seq, 8 - 1 + 4 - 1);
    assert_eq!(plain.targets, shared.targets);

    let weights = loss_weights(&plain);
    let (lp_a, ent_a, grads_a) = scored(&model, &plain, &weights);
    let (lp_b, ent_b, grads_b) = scored(&model, &shared, &weights);
    assert!(lp_a.iter().any(|&v| v != 0.0));
    let (dl, de) = (worst(&lp_a, &lp_b), worst(&ent_a, &ent_b));
    let dg = worst_gradient(&grads_a, &grads_b);
    eprintln!(
        "shared prefixes vs full rows: log-probs {dl:.1e}, entropy {de:.1e}, gradients {dg:.1e} (relative)"
    );
    assert!(
        dl <= 1e-5 && de <= 1e-5,
        "log-probs differ by {dl}, entropies by {de}"
    );
    assert!(
        dg <= 1e-4,
        "gradients differ by {dg} (relative to each tensor's largest)"
    );
}

/// Fixed per-token weights of a GRPO-shaped loss over `batch`.
fn loss_weights(batch: &Batch) -> Vec<f32> {
    (0..batch.batch * batch.score_len)
        .map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.4)
        .collect()
}

/// Every parameter's gradient by name (`None` where it has none).
type Grads = Vec<(String, Option<HostParam>)>;

/// Log-probs, entropies and every parameter's gradient of `Σ w·logp + 0.1 Σ H` over `batch`.
fn scored(model: &Qwen25Vl, batch: &Batch, weights: &[f32]) -> (Vec<f32>, Vec<f32>, Grads) {
    let scores = model.score_tokens(batch, true).unwrap();
    let w = tensor2(
        weights.to_vec(),
        batch.batch,
        batch.score_len,
        &model.device(),
    )
    .unwrap();
    let logp = to_host(scores.logprobs.clone());
    let ent = to_host(scores.entropy.clone().unwrap());
    let loss = (w * scores.logprobs).sum() + scores.entropy.unwrap().sum().mul_scalar(0.1);
    (logp, ent, param_grads(model, &loss.backward()))
}

/// The largest absolute difference.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The largest difference of two models' gradients, relative to each tensor's largest value.
fn worst_gradient(a: &[(String, Option<HostParam>)], b: &[(String, Option<HostParam>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut dg = 0f32;
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let (a, b) = (
            a.as_ref().unwrap(),
            b.as_ref().unwrap_or_else(|| panic!("{name}")),
        );
        let scale = a.values.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        dg = dg.max(worst(&a.values, &b.values) / scale);
    }
    dg
}

/// Attention a few query rows at a time (`model.attention-chunk`) and the output head a few rows
/// at a time, with and without burn's checkpointing, give the log-probs, entropies and gradients
/// of whole attention and whole logits: on full rows, on shared prefixes and their suffixes, and
/// in the vision tower (16- and 8-patch images).
#[test]
fn chunked_attention_and_logits_give_the_same_scores_and_gradients() {
    let cfg = Qwen25VlConfig::tiny();
    let seqs = grouped_sequences(&cfg);
    let plain = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap();
    let shared = plain.clone().share_prefixes().unwrap();
    let weights = loss_weights(&plain);
    for checkpointing in [false, true] {
        let mut device = ComputeDevice::Flex.device(true).unwrap();
        if checkpointing {
            device = device.gradient_checkpointing();
        }
        let whole = Qwen25Vl::random(&cfg, 11, &device).unwrap();
        let chunked = Qwen25Vl::random(&cfg, 11, &device)
            .unwrap()
            .with_attention_chunk(3)
            .with_logits_limit(3 * cfg.text.vocab_size);
        for batch in [&plain, &shared] {
            let (lp_a, ent_a, grads_a) = scored(&whole, batch, &weights);
            let (lp_b, ent_b, grads_b) = scored(&chunked, batch, &weights);
            let (dl, de) = (worst(&lp_a, &lp_b), worst(&ent_a, &ent_b));
            let dg = worst_gradient(&grads_a, &grads_b);
            eprintln!(
                "chunked vs whole attention and logits (checkpointing {checkpointing}, shared {}): \
                 log-probs {dl:.1e}, entropy {de:.1e}, gradients {dg:.1e}",
                batch.shared.is_some()
            );
            assert!(dl <= 1e-5 && de <= 1e-5, "log-probs {dl}, entropies {de}");
            assert!(dg <= 1e-4, "gradients differ by {dg}");
        }
    }
}

/// burn's gradient checkpointing (`model.gradient-checkpointing`) recomputes instead of keeping,
/// and gives the same gradients.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let g = Golden::load();
    let plain = autodiff_model(&g);
    let device = ComputeDevice::Flex
        .device(true)
        .unwrap()
        .gradient_checkpointing();
    let checkpointed = Qwen25Vl::from_pretrained(g.checkpoint(), &device).unwrap();
    let want = param_grads(&plain, &golden_loss(&g, &plain).backward());
    let got = param_grads(&checkpointed, &golden_loss(&g, &checkpointed).backward());
    assert_eq!(got.len(), want.len());
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let d = a
            .values
            .iter()
            .zip(&b.values)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-6, "{name}: max |Δ| {d:e}");
    }
}
