//! LoRA adapters against PEFT (`scripts/gen_lora_fixture.py`), both directions: PEFT's adapter
//! loaded here gives PEFT's logits and adapter gradients, and the adapter deepeyes writes gives,
//! loaded by PEFT, the logits deepeyes computes. Merging and freezing as a trainer uses them.

// The tests report the measured differences on stderr (visible with --nocapture).
#![allow(clippy::print_stderr)]

mod model_common;

use std::path::PathBuf;

use burn::optim::{AdamWConfig, GradientsParams};
use deepeyes_rl::network::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, Batch, ComputeDevice, LoraConfig, PadLayout, Qwen25Vl,
    TargetModules, param_grads, tensor2, to_host,
};
use model_common::{Golden, max_abs_diff, repo_root};

const TOL: f64 = 1e-4;

fn fixture() -> PathBuf {
    repo_root().join("tests/data/lora")
}

fn base(autodiff: bool) -> Qwen25Vl {
    let device = ComputeDevice::Flex.device(autodiff).unwrap();
    Qwen25Vl::from_pretrained(repo_root().join("tests/data/tiny-qwen2_5_vl/hf"), &device).unwrap()
}

/// The adapter deepeyes writes into the fixture: rsLoRA, a pattern over both towers and the
/// output head, B drawn (not zero) so that it changes the model.
fn deepeyes_config() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 6.0,
        dropout: 0.0,
        target_modules: TargetModules::Pattern(
            r".*language_model.*\.(k_proj|o_proj|up_proj)|model\.visual\.blocks\.\d+\.attn\.proj|model\.visual\.merger\.mlp\.2|lm_head".into(),
        ),
        use_rslora: true,
        init_lora_weights: false,
    }
}

/// Logits `[seq, vocab]` of the burn golden set's two-image prompt.
fn logits(model: &Qwen25Vl, g: &Golden) -> Vec<f32> {
    let seq = g.mm_sequence(model.config.vision.patch_dim());
    let batch = Batch::new(&model.config, &[seq], PadLayout::Expanded).unwrap();
    to_host(model.logits(&batch).unwrap())
}

/// The golden objective `Σ w·logp + 0.05 Σ H` over the prompt.
fn golden_loss(g: &Golden, model: &Qwen25Vl) -> burn::tensor::Tensor<1> {
    let seq = g.mm_sequence(model.config.vision.patch_dim());
    let batch = Batch::new(&model.config, &[seq], PadLayout::Expanded).unwrap();
    let scores = model.score_tokens(&batch, true).unwrap();
    let w = g.get("grad_weights").f32s();
    let mut weights = vec![0.0f32; batch.score_len];
    weights[1..].copy_from_slice(&w);
    let weights = tensor2(weights, 1, batch.score_len, &model.device()).unwrap();
    (weights * scores.logprobs).sum() + scores.entropy.unwrap().sum().mul_scalar(0.05)
}

/// This crate's parameter name of a PEFT adapter key.
fn our_name(peft_key: &str) -> String {
    let module = peft_key.strip_prefix("base_model.model.").unwrap();
    if let Some(rest) = module.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = module.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        module.to_string()
    }
}

#[test]
fn peft_adapter_gives_peft_logits_and_gradients() {
    let prompt = Golden::load();
    let want = Golden::load_file(&fixture().join("golden.safetensors"));
    let model = base(true).load_adapter(fixture().join("peft")).unwrap();

    let d = max_abs_diff(&logits(&model, &prompt), &want.get("peft_logits").data);
    eprintln!("PEFT adapter: logits max |Δ| = {d:e}");
    assert!(d <= TOL, "logits with PEFT's adapter: max |Δ| = {d:e}");

    // Only the adapters train: exactly the tensors PEFT saved, and nothing else.
    let trainable: Vec<String> = model
        .params()
        .into_iter()
        .filter(|p| p.trainable)
        .map(|p| p.name)
        .collect();
    let mut peft: Vec<String> = want
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("peft_grad."))
        .map(our_name)
        .collect();
    peft.sort();
    let mut sorted = trainable.clone();
    sorted.sort();
    assert_eq!(sorted, peft, "trainable parameters are the PEFT adapter's");
    // Bare names select vision and language layers alike, as in PEFT.
    assert!(
        peft.iter()
            .any(|n| n.starts_with("visual.blocks.0.mlp.down_proj"))
    );
    assert!(
        peft.iter()
            .any(|n| n.starts_with("model.layers.1.mlp.down_proj"))
    );
    assert!(peft.iter().any(|n| n.starts_with("visual.merger.mlp.0")));

    let loss = golden_loss(&prompt, &model);
    let l = f64::from(to_host(loss.clone())[0]);
    let want_loss = want.get("peft_loss").data[0];
    assert!(
        (l - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "loss {l} vs PEFT {want_loss}"
    );
    let grads = loss.backward();
    let mut worst = 0.0f64;
    for (name, grad) in param_grads(&model, &grads) {
        let Some(grad) = grad else {
            assert!(
                !trainable.contains(&name),
                "{name}: adapter without a gradient"
            );
            continue;
        };
        assert!(
            trainable.contains(&name),
            "{name}: a frozen parameter got a gradient"
        );
        let key = want
            .tensors
            .keys()
            .find(|k| k.strip_prefix("peft_grad.").map(our_name).as_deref() == Some(&name))
            .unwrap();
        let full = &want.get(key).data;
        let scale = full.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&grad.values, full);
        worst = worst.max(d / scale.max(1.0));
        assert!(
            d <= TOL * scale.max(1.0),
            "{name}: gradient max |Δ| {d:e} (scale {scale:e})"
        );
    }
    eprintln!("PEFT adapter: worst gradient max |Δ| / scale = {worst:e}");
}

/// The adapter deepeyes writes is the committed one (rewritten with
/// `DEEPEYES_WRITE_LORA_FIXTURE=1`, after which `scripts/gen_lora_fixture.py` recomputes PEFT's
/// logits for it), and PEFT's logits for it are deepeyes' own.
#[test]
fn lora_fixture_deepeyes_adapter_loads_in_peft() {
    let prompt = Golden::load();
    let model = base(false).with_lora(&deepeyes_config(), 11).unwrap();
    let committed = fixture().join("deepeyes");
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), None).unwrap();
    if std::env::var_os("DEEPEYES_WRITE_LORA_FIXTURE").is_some() {
        model.save_adapter(&committed, None).unwrap();
    }
    for file in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        let ours = std::fs::read(dir.path().join(file)).unwrap();
        let theirs = std::fs::read(committed.join(file)).unwrap();
        assert!(ours == theirs, "{file} differs from the committed fixture");
    }
    let want = Golden::load_file(&fixture().join("golden.safetensors"));
    let d = max_abs_diff(&logits(&model, &prompt), &want.get("deepeyes_logits").data);
    eprintln!("deepeyes adapter: PEFT's logits max |Δ| = {d:e}");
    assert!(
        d <= TOL,
        "PEFT's logits of deepeyes' adapter: max |Δ| = {d:e}"
    );

    // And it reads back as it was written.
    let again = base(false).load_adapter(&committed).unwrap();
    assert_eq!(again.lora, Some(deepeyes_config()));
    assert_eq!(logits(&again, &prompt), logits(&model, &prompt));
}

#[test]
fn merging_keeps_the_function_and_the_weights_handed_out() {
    let prompt = Golden::load();
    let adapted = base(false).load_adapter(fixture().join("peft")).unwrap();
    let handed_out = adapted.hf_tensors();
    let want = logits(&adapted, &prompt);
    let merged = adapted.merged();
    assert!(merged.lora.is_none());
    let d = max_abs_diff(
        &logits(&merged, &prompt),
        &want.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
    );
    assert!(d <= 1e-5, "merged logits: max |Δ| = {d:e}");
    assert_eq!(
        merged.hf_tensors(),
        handed_out,
        "hf_tensors of an adapted model are the merged weights"
    );
    // The merged weights are a plain checkpoint.
    let dir = tempfile::tempdir().unwrap();
    merged.save_pretrained(dir.path()).unwrap();
    let device = ComputeDevice::Flex.device(false).unwrap();
    let reloaded = Qwen25Vl::from_pretrained(dir.path(), &device).unwrap();
    assert_eq!(logits(&reloaded, &prompt), logits(&merged, &prompt));
}

#[test]
fn fresh_adapters_start_at_the_base_and_only_they_train() {
    let prompt = Golden::load();
    let config = LoraConfig {
        init_lora_weights: true,
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..deepeyes_config()
    };
    let plain = base(true);
    let before = logits(&plain, &prompt);
    let frozen_before = plain.hf_tensors();
    let model = plain.with_lora(&config, 3).unwrap();
    assert_eq!(
        logits(&model, &prompt),
        before,
        "B = 0: the adapted model is the base"
    );
    let infos = model.params();
    let adapters = infos.iter().filter(|p| p.trainable).count();
    // all-linear: every linear layer but lm_head and the patch embedding, two tensors each.
    let layers = 2 * (2 + 3) + 2 + 2 * (4 + 3);
    assert_eq!(adapters, 2 * layers);
    assert!(
        infos
            .iter()
            .filter(|p| p.trainable)
            .all(|p| p.name.contains(".lora_"))
    );

    let mut optim = AdamWConfig::new().init();
    let grads = GradientsParams::from_grads(golden_loss(&prompt, &model).backward(), &model);
    let stepped = optim.step(1e-2, model, grads);
    assert_ne!(
        logits(&stepped, &prompt),
        before,
        "a step on the adapters changes the model"
    );
    // The base did not move: unmerged base weights are the ones loaded.
    let mut base_only = stepped.clone();
    for (_, linear) in lora_layers(&mut base_only) {
        linear.lora = None;
    }
    base_only.lora = None;
    assert_eq!(base_only.hf_tensors(), frozen_before);
}

/// Every linear layer of `model` that has an adapter (only through public fields).
fn lora_layers(model: &mut Qwen25Vl) -> Vec<(String, &mut deepeyes_rl::network::Linear)> {
    let mut out = Vec::new();
    for (i, b) in model.visual.blocks.iter_mut().enumerate() {
        for (n, l) in [
            ("qkv", &mut b.attn.qkv),
            ("proj", &mut b.attn.proj),
            ("gate", &mut b.mlp.gate_proj),
            ("up", &mut b.mlp.up_proj),
            ("down", &mut b.mlp.down_proj),
        ] {
            out.push((format!("v{i}.{n}"), l));
        }
    }
    out.push(("m0".into(), &mut model.visual.merger.mlp0));
    out.push(("m2".into(), &mut model.visual.merger.mlp2));
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        for (n, l) in [
            ("q", &mut layer.self_attn.q_proj),
            ("k", &mut layer.self_attn.k_proj),
            ("v", &mut layer.self_attn.v_proj),
            ("o", &mut layer.self_attn.o_proj),
            ("gate", &mut layer.mlp.gate_proj),
            ("up", &mut layer.mlp.up_proj),
            ("down", &mut layer.mlp.down_proj),
        ] {
            out.push((format!("t{i}.{n}"), l));
        }
    }
    out.into_iter().filter(|(_, l)| l.lora.is_some()).collect()
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let peft = fixture().join("peft");
    let dir = tempfile::tempdir().unwrap();
    let copy = |config: &str| {
        std::fs::copy(peft.join(ADAPTER_WEIGHTS), dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        std::fs::write(dir.path().join(ADAPTER_CONFIG), config).unwrap();
        base(false)
            .load_adapter(dir.path())
            .unwrap_err()
            .to_string()
    };
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let with = |key: &str, v: serde_json::Value| {
        let mut c = original.clone();
        c[key] = v;
        copy(&c.to_string())
    };
    let e = with("use_dora", true.into());
    assert!(e.contains("use_dora") && e.contains(ADAPTER_CONFIG), "{e}");
    let e = with("r", 8.into());
    assert!(e.contains("shape") || e.contains("8"), "{e}");
    let e = with("target_modules", serde_json::json!(["q_proj"]));
    assert!(e.contains("do not select"), "{e}");
    let e = with(
        "target_modules",
        serde_json::json!(["q_proj", "v_proj", "qkv", "down_proj", "mlp.0", "o_proj"]),
    );
    assert!(e.contains("no tensor") && e.contains("o_proj"), "{e}");
    let e = copy("{not json");
    assert!(e.contains(ADAPTER_CONFIG), "{e}");
    let bad = LoraConfig {
        target_modules: TargetModules::Names(vec!["proj".into()]),
        ..deepeyes_config()
    };
    let e = base(false).with_lora(&bad, 0).unwrap_err().to_string();
    assert!(e.contains("patch_embed") && e.contains("Conv3d"), "{e}");
}

/// An adapted output head trains the same when its logits go a few rows at a time (the merged
/// head weight inside the chunked operation) as when they are computed whole.
#[test]
fn an_adapted_head_gets_the_same_gradients_in_chunks() {
    let g = Golden::load();
    let whole = base(true).with_lora(&deepeyes_config(), 11).unwrap();
    let vocab = whole.config.text.vocab_size;
    let chunked = base(true)
        .with_lora(&deepeyes_config(), 11)
        .unwrap()
        .with_logits_limit(3 * vocab);
    let want = param_grads(&whole, &golden_loss(&g, &whole).backward());
    let got = param_grads(&chunked, &golden_loss(&g, &chunked).backward());
    let mut head = 0;
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        let (Some(a), Some(b)) = (a, b) else {
            assert!(
                a.is_none() && b.is_none(),
                "{name}: a gradient on one side only"
            );
            continue;
        };
        head += usize::from(name.starts_with("lm_head"));
        let b: Vec<f64> = b.values.iter().map(|&v| f64::from(v)).collect();
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&a.values, &b);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{name}: max |Δ| {d:e} (scale {scale:e})"
        );
    }
    assert_eq!(head, 2, "the head's A and B both get gradients");
}

/// What a rollout engine reads (`weight_views`) is what the network hands out as copies
/// (`hf_tensors`: Hugging Face names and shapes, adapters merged), read from burn's own buffers
/// with no parameter copied.
#[test]
fn weight_views_are_the_handed_out_weights_without_copies() {
    use deepeyes_core::WeightSource;
    for model in [
        base(true),
        base(true).with_lora(&deepeyes_config(), 11).unwrap(),
    ] {
        let copies = model.hf_tensors();
        let views = model.weight_views();
        assert_eq!(
            views.lent(),
            copies.len(),
            "every parameter lent, none copied"
        );
        for (name, (shape, values)) in &copies {
            let view = views
                .tensor(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(view.shape, shape.as_slice(), "{name}");
            assert_eq!(view.data, values.as_slice(), "{name}");
        }
        assert!(views.tensor("no.such.weight").is_none());
    }
}
