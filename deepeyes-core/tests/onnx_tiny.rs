//! The ONNX Runtime backend on the tiny random-weight Qwen2.5-VL, against transformers' outputs
//! for a two-image prompt (`tests/data/tiny-qwen2_5_vl`).
//!
//! These tests need the ONNX Runtime library. They find it like the product does
//! (`$ORT_DYLIB_PATH`, the `.ort/` directory filled by `scripts/setup_ort.sh`, then `python3`'s
//! onnxruntime package) and FAIL with that message when it is missing: run
//! `scripts/setup_ort.sh` first.

#![cfg(feature = "onnx")]

mod tiny_fixture;

use deepeyes_core::model::FinishReason;
use deepeyes_core::onnx::{LogitsOf, OnnxModel, OnnxOptions, PreparedPrompt, WeightMap};
use deepeyes_core::preprocess::PixelValues;
use deepeyes_core::{GenerateRequest, Image, ImageLimits, SamplingParams, VisionLanguageModel};
use tiny_fixture::{Golden, argmax, max_abs_diff};

const TOL: f32 = 1e-4;

fn model_with(options: &OnnxOptions) -> OnnxModel {
    OnnxModel::load(tiny_fixture::bundle(), options).unwrap_or_else(|e| panic!("{e}"))
}

/// One ONNX Runtime thread: the tiny model's fastest setting.
fn one_thread() -> OnnxOptions {
    OnnxOptions {
        threads: 1,
        ..OnnxOptions::default()
    }
}

fn model() -> OnnxModel {
    model_with(&one_thread())
}

/// The golden prompt prepared by the fixture's bundle, and that bundle's logits at every
/// position of it: what other loads of the same weights must reproduce.
fn reference_prefill() -> (PreparedPrompt, Vec<f32>) {
    let base = model();
    let prompt = golden_prompt(&base, &Golden::load());
    let (mut logits, _) = base.prefill(&[&prompt], LogitsOf::All).unwrap();
    (prompt, logits.remove(0))
}

/// The processor's pixel values of the golden images, split per image.
fn golden_pixels(golden: &Golden) -> Vec<PixelValues> {
    let all = golden.f32("pixel_values");
    let d = all.shape[1];
    let mut start = 0;
    golden
        .grids()
        .into_iter()
        .map(|g| {
            let n = (g[0] * g[1] * g[2]) as usize;
            let data = all.data[start * d..(start + n) * d].to_vec();
            start += n;
            PixelValues {
                data,
                grid_thw: g,
                resized: (g[1] * 14, g[2] * 14),
            }
        })
        .collect()
}

fn golden_prompt(model: &OnnxModel, golden: &Golden) -> PreparedPrompt {
    model
        .prepare(&golden.u32s("prompt_ids"), &golden_pixels(golden))
        .unwrap()
}

fn greedy(tokens: &[u32], max_new_tokens: usize) -> GenerateRequest<'_> {
    GenerateRequest {
        tokens,
        images: &[],
        sampling: SamplingParams::greedy(),
        seed: 0,
        max_new_tokens,
        stop_sequences: &[],
        banned_tokens: &[],
    }
}

#[allow(clippy::print_stderr)]
fn report(what: &str, value: f32) {
    eprintln!("{what}: max |Δ| = {value:.3e}");
}

#[test]
fn tokenizer_matches_python() {
    let golden = Golden::load();
    let model = model();
    let prompt = std::fs::read_to_string(tiny_fixture::root().join("golden/prompt.txt")).unwrap();
    assert_eq!(
        model.codec().encode(&prompt).unwrap(),
        golden.u32s("prompt_ids")
    );
}

#[test]
fn vision_encoder_matches_transformers() {
    let golden = Golden::load();
    let model = model();
    let mut features = Vec::new();
    for px in golden_pixels(&golden) {
        features.extend(model.encode_image(&px).unwrap());
    }
    let diff = max_abs_diff(&features, &golden.f32("image_embeds").data);
    report("vision features", diff);
    assert!(diff <= TOL, "vision features differ by {diff}");
}

#[test]
fn prefill_and_20_decode_steps_match_transformers() {
    let golden = Golden::load();
    let model = model();
    let prompt = golden_prompt(&model, &golden);
    assert_eq!(
        prompt.input_ids,
        golden.u32s("input_ids"),
        "expanded prompt"
    );
    assert_eq!(prompt.rope.delta, golden.i64("rope_delta").data[0]);
    let vocab = model.config().text.vocab_size;

    let (logits, mut state) = model.prefill(&[&prompt], LogitsOf::All).unwrap();
    let all = &logits[0];
    assert_eq!(all.len(), prompt.input_ids.len() * vocab);
    let kept = golden.i64("prefill_positions").data;
    let want = golden.f32("prefill_logits");
    let mut worst = 0.0f32;
    for (k, &p) in kept.iter().enumerate() {
        let p = p as usize;
        worst = worst.max(max_abs_diff(
            &all[p * vocab..(p + 1) * vocab],
            &want.data[k * vocab..(k + 1) * vocab],
        ));
    }
    report("prefill logits", worst);
    assert!(worst <= TOL, "prefill logits differ by {worst}");

    let tokens = golden.u32s("tokens");
    let last = &all[(prompt.input_ids.len() - 1) * vocab..];
    assert_eq!(argmax(last), tokens[0]);
    let steps = golden.f32("decode_logits");
    assert_eq!(steps.shape, vec![20, vocab]);
    let mut worst = 0.0f32;
    for i in 0..20 {
        let out = model.step(&mut state, &[tokens[i]]).unwrap();
        worst = worst.max(max_abs_diff(
            &out[0],
            &steps.data[i * vocab..(i + 1) * vocab],
        ));
        assert_eq!(
            argmax(&out[0]),
            tokens[i + 1],
            "greedy token after step {i}"
        );
    }
    report("decode logits (20 steps)", worst);
    assert!(worst <= TOL, "decode logits differ by {worst}");
}

#[test]
fn greedy_generation_gives_transformers_tokens() {
    let golden = Golden::load();
    let model = model();
    let prompt = golden_prompt(&model, &golden);
    let want = golden.u32s("tokens");
    let ids = golden.u32s("prompt_ids");
    let request = greedy(&ids, want.len());
    let out = model
        .generate_prepared(&[&request], std::slice::from_ref(&prompt))
        .unwrap()
        .remove(0);
    // The configured end-of-sequence ids stop generation early, keeping the EOS token.
    let eos = &model.config().tokens.eos;
    let end = want
        .iter()
        .position(|t| eos.contains(t))
        .map_or(want.len(), |i| i + 1);
    assert_eq!(out.tokens, want[..end]);
    assert_eq!(out.logprobs.len(), out.tokens.len());
    assert!(out.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
}

#[test]
fn generation_from_raw_images_uses_the_rust_preprocessing() {
    let golden = Golden::load();
    let model = model();
    let images = golden_images();
    let ids = golden.u32s("prompt_ids");
    let prompt = model.prepare_images(&ids, &images).unwrap();
    assert_eq!(prompt.grids, golden.grids());
    assert_eq!(prompt.input_ids, golden.u32s("input_ids"));
    // Rust and PIL resampling differ by a fraction of a gray level; the features stay close.
    let diff = max_abs_diff(&prompt.features, &golden.f32("image_embeds").data);
    report("vision features from Rust preprocessing", diff);
    assert!(
        diff < 0.05,
        "features from Rust preprocessing differ by {diff}"
    );
    let request = GenerateRequest {
        images: &images,
        ..greedy(&ids, 5)
    };
    let out = model.generate(&request).unwrap();
    assert_eq!(out.tokens.len(), 5);
    // A second call reuses the cached image features and gives the same tokens.
    assert_eq!(model.generate(&request).unwrap(), out);
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let golden = Golden::load();
    let whole = model();
    let chunked = model_with(&OnnxOptions {
        threads: 1,
        prefill_chunk: 37,
        ..OnnxOptions::default()
    });
    let p = golden_prompt(&whole, &golden);
    let (a, _) = whole.prefill(&[&p], LogitsOf::All).unwrap();
    let (b, _) = chunked.prefill(&[&p], LogitsOf::All).unwrap();
    let diff = max_abs_diff(&a[0], &b[0]);
    assert!(diff <= 1e-5, "chunked prefill differs by {diff}");
}

#[test]
fn batched_generation_equals_one_by_one() {
    let golden = Golden::load();
    let model = model();
    let codec = model.codec();
    let image_prompt = golden.u32s("prompt_ids");
    let short = codec
        .encode("<|im_start|>user\nHow many cars are there?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let images: Vec<Image> = (0..2)
        .map(|k| {
            Image::open(
                tiny_fixture::root().join(format!("golden/image{k}.png")),
                &ImageLimits::default(),
            )
            .unwrap()
        })
        .collect();
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
    };
    let requests = vec![
        GenerateRequest {
            images: &images,
            ..greedy(&image_prompt, 12)
        },
        // The same context again (shares the prefill) but sampled.
        GenerateRequest {
            images: &images,
            sampling: sampled,
            seed: 11,
            ..greedy(&image_prompt, 12)
        },
        // A shorter, text-only context (left-padded in the batch).
        GenerateRequest {
            sampling: sampled,
            seed: 5,
            ..greedy(&short, 9)
        },
        GenerateRequest {
            images: &images,
            sampling: sampled,
            seed: 12,
            ..greedy(&image_prompt, 7)
        },
    ];
    let batched = model.generate_batch(&requests);
    assert_eq!(batched.len(), requests.len());
    for (i, (r, b)) in requests.iter().zip(batched).enumerate() {
        let b = b.unwrap();
        let one = model.generate(r).unwrap();
        assert_eq!(b.tokens, one.tokens, "request {i}");
        assert_eq!(b.finish, one.finish, "request {i}");
        let diff = max_abs_diff(&b.logprobs, &one.logprobs);
        assert!(diff <= 1e-4, "request {i}: log-probs differ by {diff}");
    }
}

#[test]
fn stop_sequences_banned_tokens_and_seeds() {
    let golden = Golden::load();
    let model = model();
    let prompt = golden_prompt(&model, &golden);
    let ids = golden.u32s("prompt_ids");
    let want = golden.u32s("tokens");
    let run = |r: &GenerateRequest<'_>| {
        model
            .generate_prepared(&[r], std::slice::from_ref(&prompt))
            .unwrap()
            .remove(0)
    };

    // A stop sequence ends generation and is kept.
    let stops = vec![want[2..4].to_vec()];
    let out = run(&GenerateRequest {
        stop_sequences: &stops,
        ..greedy(&ids, 20)
    });
    assert_eq!(out.tokens, want[..4]);
    assert_eq!(out.finish, FinishReason::Stop);

    // The budget ends it otherwise.
    let out = run(&greedy(&ids, 3));
    assert_eq!(out.tokens, want[..3]);
    assert_eq!(out.finish, FinishReason::Length);
    let out = run(&greedy(&ids, 0));
    assert!(out.tokens.is_empty());

    // A banned token is never produced, even when it is the most likely.
    let banned = [want[0]];
    let out = run(&GenerateRequest {
        banned_tokens: &banned,
        ..greedy(&ids, 10)
    });
    assert_ne!(out.tokens[0], want[0]);
    assert!(!out.tokens.contains(&want[0]));

    // Sampling depends on the seed only; log-probs are those of the temperature-scaled model.
    let sampled = |seed| GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.3,
            top_p: 1.0,
            top_k: 0,
        },
        seed,
        ..greedy(&ids, 15)
    };
    let a = run(&sampled(1));
    assert_eq!(run(&sampled(1)), a);
    assert_ne!(run(&sampled(2)).tokens, a.tokens);
    let (logits, _) = model.prefill(&[&prompt], LogitsOf::Last).unwrap();
    let lp = deepeyes_core::sampling::token_logprob(&logits[0], 1.3, a.tokens[0]);
    assert!((lp - a.logprobs[0]).abs() < 1e-5);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let golden = Golden::load();
    let model = model();
    let ids = golden.u32s("prompt_ids");
    // Two image pads but no images.
    let err = model.generate(&greedy(&ids, 3)).unwrap_err().to_string();
    assert!(err.contains("2 <|image_pad|> tokens for 0 images"), "{err}");
    // A token outside the vocabulary.
    let err = model
        .generate(&greedy(&[1, 5000], 3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("5000"), "{err}");
    // A bundle directory that is not one.
    let err = OnnxModel::load(tiny_fixture::root().join("hf"), &OnnxOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bundle.json"), "{err}");
}

#[test]
fn options_reject_unknown_keys_and_bad_values() {
    let err = serde_json::from_str::<OnnxOptions>(r#"{"threads": 2, "gpu": true}"#).unwrap_err();
    assert!(err.to_string().contains("gpu"), "{err}");
    let o: OnnxOptions =
        serde_json::from_str(r#"{"require-gpu": true, "providers": ["cpu"]}"#).unwrap();
    assert!(o.require_gpu);
    // require-gpu with only the CPU (or without a GPU library) is an error, not a silent CPU run.
    let err = OnnxModel::load(tiny_fixture::bundle(), &o)
        .unwrap_err()
        .to_string();
    assert!(err.contains("GPU"), "{err}");
    let bad = OnnxOptions {
        max_batch: 0,
        ..OnnxOptions::default()
    };
    assert!(OnnxModel::load(tiny_fixture::bundle(), &bad).is_err());
}

#[test]
fn runs_on_the_cpu_and_reports_it() {
    let model = model();
    let device = model.device();
    // This machine has no GPU library: the CUDA provider falls back to the CPU once.
    assert!(!device.gpu || device.provider == "CUDAExecutionProvider");
    let info = model.runtime_info();
    assert!(info.library.exists(), "{}", info.library.display());
    assert!(info.version.starts_with("1."), "{}", info.version);
}

/// The bundle's weights of record, as a trainer would hold them.
fn bundle_weights() -> deepeyes_core::onnx::Weights {
    deepeyes_core::onnx::weights::read_safetensors(
        &tiny_fixture::bundle().join("model.safetensors"),
    )
    .unwrap()
}

#[test]
fn weights_given_in_memory_are_the_ones_that_run() {
    let options = one_thread();
    let base = model();
    let (prompt, want) = reference_prefill();

    // The same weights from memory give the same logits.
    let mut weights = bundle_weights();
    let same = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &weights).unwrap();
    let (got, _) = same.prefill(&[&prompt], LogitsOf::All).unwrap();
    assert_eq!(max_abs_diff(&got[0], &want), 0.0);

    // Zeroing one row of the (transposed in the graph) output head zeroes that token's logit
    // everywhere and leaves every other logit as it was.
    let vocab = base.config().text.vocab_size;
    let token = 77;
    let head = weights.get_mut("lm_head.weight").unwrap();
    let hidden = head.shape[1];
    head.data[token * hidden..(token + 1) * hidden].fill(0.0);
    let changed = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &weights).unwrap();
    let (got, _) = changed.prefill(&[&prompt], LogitsOf::All).unwrap();
    for (pos, (row, base_row)) in got[0].chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        assert_eq!(row[token], 0.0, "position {pos}");
        assert_ne!(base_row[token], 0.0);
        for v in (0..vocab).filter(|&v| v != token) {
            assert_eq!(row[v], base_row[v], "position {pos}, token {v}");
        }
    }
}

/// The golden images, decoded as a user's would be.
fn golden_images() -> Vec<Image> {
    (0..2)
        .map(|k| {
            Image::open(
                tiny_fixture::root().join(format!("golden/image{k}.png")),
                &ImageLimits::default(),
            )
            .unwrap()
        })
        .collect()
}

/// Every logit of the golden prompt with its images, from `model`'s current weights (the
/// images through the vision encoder and its feature cache, as generation sees them).
fn image_prompt_logits(model: &OnnxModel) -> Vec<f32> {
    let prompt = model
        .prepare_images(&Golden::load().u32s("prompt_ids"), &golden_images())
        .unwrap();
    model
        .prefill(&[&prompt], LogitsOf::All)
        .unwrap()
        .0
        .remove(0)
}

#[test]
fn the_same_sessions_take_new_weights_in_place() {
    use deepeyes_core::{WeightReceiver, WeightUpdate};
    let options = one_thread();
    let old = bundle_weights();
    let engine = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &old).unwrap();
    assert_eq!(engine.weights_version(), None);
    let before = image_prompt_logits(&engine);

    // Every parameter changes, as after an optimizer step (the vision tower's too, so cached
    // image features of the old weights would show).
    let mut new = old.clone();
    for t in new.values_mut() {
        for (i, v) in t.data.iter_mut().enumerate() {
            *v = *v * 1.05 + 0.01 * ((i % 7) as f32 - 3.0);
        }
    }
    let update = WeightUpdate {
        version: 1,
        tensors: &new,
    };
    engine.receive_weights(&update).unwrap();
    assert_eq!(engine.weights_version(), Some(1));
    let after = image_prompt_logits(&engine);
    let fresh = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &new).unwrap();
    let want = image_prompt_logits(&fresh);
    let diff = max_abs_diff(&after, &want);
    report("in-place weights vs a fresh load of them", diff);
    assert!(
        diff <= 1e-5,
        "in-place weights differ from a fresh load by {diff}"
    );
    let moved = max_abs_diff(&after, &before);
    assert!(moved > 1e-2, "the logits did not change ({moved})");

    // A bad update names the parameter at fault and changes nothing.
    let mut bad = new.clone();
    bad.remove("model.norm.weight");
    let e = engine
        .receive_weights(&WeightUpdate {
            version: 2,
            tensors: &bad,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
    assert_eq!(engine.weights_version(), Some(1));
    assert_eq!(image_prompt_logits(&engine), after);

    // A model that runs the weights it was loaded with says how to get one that takes updates.
    let e = model().receive_weights(&update).unwrap_err().to_string();
    assert!(e.contains("load_with_weights"), "{e}");
}

/// A 7B's graphs keep their weights in `<graph>.onnx.data` files beside them (protobufs stop at
/// 2 GB); the tiny model exported that way must run exactly as the inline one, from its own
/// data files and with weights handed over in memory.
#[test]
fn an_external_data_bundle_runs_like_the_inline_one() {
    let dir = tiny_fixture::bundle_external();
    for graph in ["vision", "embed", "decoder"] {
        let data = dir.join(format!("{graph}.onnx.data"));
        let inline = std::fs::metadata(tiny_fixture::bundle().join(format!("{graph}.onnx")))
            .unwrap()
            .len();
        let outer = std::fs::metadata(dir.join(format!("{graph}.onnx")))
            .unwrap()
            .len();
        assert!(data.is_file(), "{}", data.display());
        assert!(outer < inline, "{graph}.onnx still holds its weights");
    }
    let options = one_thread();
    let inline = model();
    let (prompt, want) = reference_prefill();
    let external = OnnxModel::load(&dir, &options).unwrap_or_else(|e| panic!("{e}"));
    let (got, _) = external.prefill(&[&prompt], LogitsOf::All).unwrap();
    assert_eq!(max_abs_diff(&got[0], &want), 0.0);
    let ids = Golden::load().u32s("prompt_ids");
    let request = greedy(&ids, 8);
    let tokens = |m: &OnnxModel| {
        m.generate_prepared(&[&request], std::slice::from_ref(&prompt))
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(0)
            .tokens
    };
    assert_eq!(tokens(&external), tokens(&inline));

    // Weights from memory replace the ones in the data files.
    let mut weights = bundle_weights();
    let head = weights.get_mut("lm_head.weight").unwrap();
    let hidden = head.shape[1];
    head.data[77 * hidden..78 * hidden].fill(0.0);
    let changed = |bundle: &std::path::Path| {
        let m = OnnxModel::load_with_weights(bundle, &options, &weights).unwrap();
        m.prefill(&[&prompt], LogitsOf::All).unwrap().0
    };
    let (a, b) = (changed(&tiny_fixture::bundle()), changed(&dir));
    assert_eq!(max_abs_diff(&a[0], &b[0]), 0.0);
    assert_ne!(max_abs_diff(&b[0], &want), 0.0, "the new weights ran");
}

/// A freshly exported bundle's graphs hold its weights (`graphs-current`), so loading it reads
/// no safetensors file; once the flag is cleared, the file's weights are read and run.
#[test]
fn current_graphs_are_run_as_they_are_and_stale_ones_take_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_fixture::bundle()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let mut map = WeightMap::load(dir.path()).unwrap().unwrap();
    assert!(map.graphs_current, "the exporter marks its graphs current");
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let options = one_thread();
    let (prompt, want) = reference_prefill();
    let current = OnnxModel::load(dir.path(), &options).unwrap_or_else(|e| panic!("{e}"));
    let (got, _) = current.prefill(&[&prompt], LogitsOf::All).unwrap();
    assert_eq!(max_abs_diff(&got[0], &want), 0.0);

    map.graphs_current = false;
    map.save(dir.path()).unwrap();
    let err = OnnxModel::load(dir.path(), &options)
        .expect_err("the broken weights file is read now")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn weights_missing_a_parameter_or_misshapen_are_refused_by_name() {
    let options = OnnxOptions {
        threads: 1,
        ..OnnxOptions::default()
    };
    let mut weights = bundle_weights();
    weights.remove("model.norm.weight");
    let e = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &weights).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    assert!(e.to_string().contains("weights.json"), "{e}");

    let mut weights = bundle_weights();
    weights.get_mut("visual.merger.mlp.0.bias").unwrap().shape = vec![1, 1];
    let e = OnnxModel::load_with_weights(tiny_fixture::bundle(), &options, &weights).unwrap_err();
    assert!(
        e.to_string()
            .contains("visual.merger.mlp.0.bias has shape [1, 1]"),
        "{e}"
    );
}
