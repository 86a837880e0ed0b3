//! The burn Qwen2.5-VL against transformers' golden outputs (scripts/gen_burn_golden.py), and
//! safetensors save / load round trips.

// The tests report the measured differences on stderr (visible with --nocapture).
#![allow(clippy::print_stderr)]

mod model_common;

use std::collections::BTreeSet;

use deepeyes_core::vision::{frame_seqlens, rope_index, vision_position_ids, window_index};
use deepeyes_rl::network::{
    Batch, ComputeDevice, PadLayout, Qwen25Vl, Qwen25VlConfig, Sequence, VisionInputs, to_host,
};
use model_common::{Golden, max_abs_diff};

const TOL: f64 = 1e-4;

fn load(golden: &Golden) -> Qwen25Vl {
    let device = ComputeDevice::Flex.device(false).unwrap();
    Qwen25Vl::from_pretrained(golden.checkpoint(), &device).unwrap()
}

/// The workspace's one Qwen2.5-VL geometry (`deepeyes_core::vision`, which the burn engine
/// calls) against the burn golden set's values from transformers.
#[test]
fn vision_and_rope_geometry_match_transformers() {
    let g = Golden::load();
    let cfg = Qwen25VlConfig::from_hf_file(g.checkpoint().join("config.json")).unwrap();
    let geo = cfg.vision.geometry().unwrap();
    let grids: Vec<[u32; 3]> = g.grids().iter().map(|g| g.map(|d| d as u32)).collect();

    let pos: Vec<i64> = vision_position_ids(&grids, &geo)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(pos, g.get("vision_pos_ids").ints());

    let windows = window_index(&grids, &geo).unwrap();
    assert_eq!(windows.window_index, g.get("window_index").ints());
    assert_eq!(windows.cu_window_seqlens, g.get("cu_window_seqlens").ints());
    assert!(
        windows.cu_window_seqlens.len() > 3,
        "the golden prompt should have several windows"
    );
    assert_eq!(frame_seqlens(&grids), g.get("cu_seqlens").ints());

    let rope = rope_index(&g.input_ids(), cfg.image_token_id, &grids, &geo).unwrap();
    let s = rope.positions[0].len();
    let want = g.get("position_ids").ints();
    for (axis, got) in rope.positions.iter().enumerate() {
        assert_eq!(got[..], want[axis * s..(axis + 1) * s], "mRoPE axis {axis}");
    }
    assert_eq!(rope.delta, g.get("rope_deltas").ints()[0]);
}

#[test]
fn image_features_match_transformers() {
    let g = Golden::load();
    let model = load(&g);
    let vcfg = &model.config.vision;
    let want = &g.get("image_embeds").data;

    // Both images in one call, as transformers and the ONNX vision graph run them.
    let inputs = VisionInputs::from_grids(g.get("pixel_values").f32s(), &g.grids(), vcfg).unwrap();
    let got = to_host(model.image_features(&inputs));
    let d = max_abs_diff(&got, want);
    eprintln!("image features: max |Δ| = {d:e} over {} values", got.len());
    assert!(d <= TOL, "image features (one call): max |Δ| = {d:e}");

    // One call per image, as the training batch runs them.
    let mut per_image = Vec::new();
    for im in g.images(vcfg.patch_dim()) {
        let inputs = VisionInputs::from_grids(im.patches, &[im.grid], vcfg).unwrap();
        per_image.extend(to_host(model.image_features(&inputs)));
    }
    let d = max_abs_diff(&per_image, want);
    assert!(d <= TOL, "image features (per image): max |Δ| = {d:e}");
}

#[test]
fn logits_match_transformers() {
    let g = Golden::load();
    let model = load(&g);
    let pd = model.config.vision.patch_dim();
    let want = &g.get("logits").data;

    let batch = Batch::new(&model.config, &[g.mm_sequence(pd)], PadLayout::Expanded).unwrap();
    let got = to_host(model.logits(&batch).unwrap());
    let d = max_abs_diff(&got, want);
    eprintln!(
        "multimodal logits: max |Δ| = {d:e} over {} values",
        got.len()
    );
    assert!(d <= TOL, "logits: max |Δ| = {d:e}");

    // The same prompt written with one pad per image gives the same logits.
    let pad = model.config.image_token_id;
    let mut collapsed = Vec::new();
    for &t in &g.input_ids() {
        if t != pad || collapsed.last() != Some(&pad) {
            collapsed.push(t);
        }
    }
    let seq = Sequence {
        score_from: 0,
        tokens: collapsed,
        images: g.images(pd),
    };
    let batch = Batch::new(&model.config, &[seq], PadLayout::OnePerImage).unwrap();
    let got = to_host(model.logits(&batch).unwrap());
    let d = max_abs_diff(&got, want);
    assert!(d <= TOL, "logits (one pad per image): max |Δ| = {d:e}");
}

/// The ONNX fixture's own golden (transformers outputs that the ONNX bundle is checked against):
/// prefill logits of its two-image chat prompt, and the 20 greedy decode steps reproduced by a
/// teacher-forced forward over prompt + generated tokens.
#[test]
fn matches_the_onnx_fixture_golden() {
    let dir = model_common::repo_root().join("tests/data/tiny-qwen2_5_vl");
    let g = Golden::load_file(&dir.join("golden/golden.safetensors"));
    let device = ComputeDevice::Flex.device(false).unwrap();
    let model = Qwen25Vl::from_pretrained(dir.join("hf"), &device).unwrap();
    let cfg = &model.config;
    let pd = cfg.vision.patch_dim();
    let prompt: Vec<u32> = g
        .get("prompt_ids")
        .ints()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let generated: Vec<u32> = g
        .get("tokens")
        .ints()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mut tokens = prompt.clone();
    tokens.extend_from_slice(&generated[..generated.len() - 1]);
    let seq = Sequence {
        score_from: 0,
        tokens,
        images: g.images(pd),
    };
    let batch = Batch::new(cfg, &[seq], PadLayout::OnePerImage).unwrap();
    let expanded = g.get("input_ids").ints();
    assert_eq!(batch.lengths[0], expanded.len() + generated.len() - 1);
    let ids: Vec<i64> = batch.input_ids[..expanded.len()]
        .iter()
        .map(|&t| i64::from(t))
        .collect();
    assert_eq!(ids, expanded, "pad expansion differs from the processor's");
    assert_eq!(batch.rope_deltas[0], g.get("rope_delta").ints()[0]);

    let logits = to_host(model.logits(&batch).unwrap());
    let vocab = cfg.text.vocab_size;
    let at = |pos: usize| &logits[pos * vocab..(pos + 1) * vocab];
    let mut got = Vec::new();
    for &p in &g.get("prefill_positions").ints() {
        got.extend_from_slice(at(p as usize));
    }
    let d_prefill = max_abs_diff(&got, &g.get("prefill_logits").data);
    let mut got = Vec::new();
    for i in 0..generated.len() - 1 {
        got.extend_from_slice(at(expanded.len() + i));
    }
    let d_decode = max_abs_diff(&got, &g.get("decode_logits").data);
    eprintln!(
        "ONNX fixture golden: prefill max |Δ| = {d_prefill:e}, decode max |Δ| = {d_decode:e}"
    );
    assert!(
        d_prefill <= TOL && d_decode <= TOL,
        "prefill {d_prefill:e}, decode {d_decode:e}"
    );
}

#[test]
fn padded_batch_rows_match_single_prompts() {
    let g = Golden::load();
    let model = load(&g);
    let pd = model.config.vision.patch_dim();
    let seqs = [g.text_sequence(), g.mm_sequence(pd)];
    let batch = Batch::new(&model.config, &seqs, PadLayout::Expanded).unwrap();
    let logits = to_host(model.logits(&batch).unwrap());
    let vocab = model.config.text.vocab_size;
    let row = |b: usize, len: usize| {
        let start = b * batch.seq * vocab;
        logits[start..start + len * vocab].to_vec()
    };
    let text = g.get("text_logits");
    let d0 = max_abs_diff(&row(0, text.shape[1]), &text.data);
    let mm = g.get("logits");
    let d1 = max_abs_diff(&row(1, mm.shape[1]), &mm.data);
    assert!(
        d0 <= TOL && d1 <= TOL,
        "padded batch: text row {d0:e}, multimodal row {d1:e}"
    );
}

#[test]
fn token_scores_match_log_softmax_of_golden_logits() {
    let g = Golden::load();
    let model = load(&g);
    let pd = model.config.vision.patch_dim();
    let seq = g.mm_sequence(pd);
    let batch = Batch::new(
        &model.config,
        std::slice::from_ref(&seq),
        PadLayout::Expanded,
    )
    .unwrap();
    let scores = model.score_tokens(&batch, true).unwrap();
    let logp = to_host(scores.logprobs);
    let ent = to_host(scores.entropy.unwrap());
    let logits = g.get("logits");
    let vocab = logits.shape[2];
    let pad = model.config.image_token_id;
    let mut checked = 0;
    for t in 0..seq.tokens.len() {
        let defined = t > 0 && seq.tokens[t] != pad;
        assert_eq!(
            scores.mask[t],
            if defined { 1.0 } else { 0.0 },
            "mask at {t}"
        );
        if !defined {
            assert_eq!((logp[t], ent[t]), (0.0, 0.0), "undefined position {t}");
            continue;
        }
        let row = &logits.data[(t - 1) * vocab..t * vocab];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let want_lp = row[seq.tokens[t] as usize] - lse;
        let want_h: f64 = -row.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>();
        assert!(
            (f64::from(logp[t]) - want_lp).abs() <= TOL,
            "logp at {t}: {} vs {want_lp}",
            logp[t]
        );
        assert!(
            (f64::from(ent[t]) - want_h).abs() <= TOL,
            "entropy at {t}: {} vs {want_h}",
            ent[t]
        );
        checked += 1;
    }
    assert!(checked > 20);
}

#[test]
fn safetensors_round_trip_keeps_names_shapes_and_logits() {
    let g = Golden::load();
    let model = load(&g);
    let pd = model.config.vision.patch_dim();
    let batch = Batch::new(&model.config, &[g.mm_sequence(pd)], PadLayout::Expanded).unwrap();
    let before = to_host(model.logits(&batch).unwrap());

    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();

    // Same tensor names and shapes as the transformers checkpoint, and bit-identical values.
    let read = |p: std::path::PathBuf| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect::<BTreeSet<_>>()
    };
    let ours = read(dir.path().join("model.safetensors"));
    let theirs = read(g.checkpoint().join("model.safetensors"));
    let names = |s: &BTreeSet<(String, Vec<usize>, Vec<u8>)>| {
        s.iter()
            .map(|(n, shape, _)| (n.clone(), shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ours), names(&theirs));
    assert!(ours == theirs, "saved values differ from the checkpoint's");

    let device = ComputeDevice::Flex.device(false).unwrap();
    let reloaded = Qwen25Vl::from_pretrained(dir.path(), &device).unwrap();
    assert_eq!(reloaded.config, model.config);
    let after = to_host(reloaded.logits(&batch).unwrap());
    assert_eq!(before, after);
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let g = Golden::load();
    let model = load(&g);
    let device = ComputeDevice::Flex.device(false).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A missing tensor.
    let mut cfg = model.config.clone();
    cfg.text.num_hidden_layers += 1;
    let e = Qwen25Vl::load_safetensors(&cfg, g.checkpoint(), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.2."), "{e}");

    // An unused tensor.
    let mut cfg = model.config.clone();
    cfg.vision.depth -= 1;
    cfg.vision.fullatt_block_indexes.clear();
    let e = Qwen25Vl::load_safetensors(&cfg, g.checkpoint(), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("visual.blocks.1."), "{e}");

    // A wrong shape.
    let mut cfg = model.config.clone();
    cfg.text.intermediate_size = 96;
    let e = Qwen25Vl::load_safetensors(&cfg, g.checkpoint(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]"),
        "{e}"
    );

    // Not a safetensors file.
    let bad = dir.path().join("model.safetensors");
    std::fs::write(&bad, b"not a checkpoint").unwrap();
    let e = Qwen25Vl::load_safetensors(&model.config, &bad, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn tied_embeddings_round_trip_without_lm_head() {
    let device = ComputeDevice::Flex.device(false).unwrap();
    let mut cfg = Qwen25VlConfig::tiny();
    cfg.tie_word_embeddings = true;
    let model = Qwen25Vl::random(&cfg, 7, &device).unwrap();
    assert!(model.lm_head.is_none());
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("lm_head.weight").is_err());
    let back = Qwen25Vl::from_pretrained(dir.path(), &device).unwrap();
    let seq = Sequence {
        score_from: 0,
        tokens: vec![3, 9, 27, 81],
        images: vec![],
    };
    let batch = Batch::new(&cfg, &[seq], PadLayout::OnePerImage).unwrap();
    assert_eq!(
        to_host(model.logits(&batch).unwrap()),
        to_host(back.logits(&batch).unwrap())
    );
}
