//! Handing the trainer's weights to the rollout engine in place, against loading the bundle
//! afresh, for any bundle (TinyEyes, or a random-weight model at real widths made by
//! `scripts/make_random_qwen2_5_vl.py --bundle`).
//!
//! Times, each once to warm up and then `--runs` times:
//! - **fresh load**: `OnnxModel::load` of the bundle (graphs, tokenizer, sessions);
//! - **rebuild**: `OnnxModel::load_with_weights` with the training engine's weights, what the
//!   trainer did every step before it kept its sessions;
//! - **sync**: what the trainer does every step now: views of the training engine's own buffers
//!   (`PolicyNetwork::weight_source`, no copy) taken in place by the same sessions
//!   (`WeightReceiver::receive_weights`), the two parts reported apart;
//! - **sync with a host copy**: the same with the weights first copied to the host
//!   (`PolicyNetwork::host_weights`), what it did before;
//! - **generation** on sessions built by `load` (weights pre-packed) and on the in-place ones
//!   (pre-packing off): 16 sampled continuations of 24 tokens of one prompt with a 448×448
//!   image, the shape of a demo rollout turn, so that the price of in-place weights in rollout
//!   speed is measured too.
//!
//! `cargo bench --bench weight_sync -- [--bundle DIR] [--runs N] [--threads N]`

#![allow(clippy::print_stdout, missing_docs)]

use std::path::PathBuf;
use std::time::Instant;

use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_core::{
    GenerateRequest, Image, SamplingParams, VisionLanguageModel, WeightReceiver, WeightSource,
    WeightUpdate,
};
use deepeyes_rl::network::{ComputeDevice, PolicyNetwork, Qwen25Vl};

mod allocator;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` once to warm up and `runs` times measured; the measured seconds.
fn timed(runs: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    (0..=runs)
        .filter_map(|i| {
            let t = Instant::now();
            f(i);
            let s = t.elapsed().as_secs_f64();
            (i > 0).then_some(s)
        })
        .collect()
}

/// Seconds to sample 16 continuations of 24 tokens of one image prompt, `runs` times after a
/// warm-up.
fn generation(model: &OnnxModel, runs: usize) -> Vec<f64> {
    let text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is \
                the dot?<|im_end|>\n<|im_start|>assistant\n";
    let tokens = model.codec().encode(text).expect("the prompt encodes");
    let rgb: Vec<u8> = (0..448 * 448 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let images = [Image::from_raw(448, 448, rgb).expect("an image")];
    let sampling = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::greedy()
    };
    timed(runs, |i| {
        let requests: Vec<GenerateRequest<'_>> = (0..16)
            .map(|k| GenerateRequest {
                tokens: &tokens,
                images: &images,
                sampling,
                seed: (i * 16 + k) as u64,
                max_new_tokens: 24,
                stop_sequences: &[],
                banned_tokens: &[],
            })
            .collect();
        for out in model.generate_batch(&requests) {
            out.expect("a generation");
        }
    })
}

fn main() {
    allocator::keep_freed_memory();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut bundle, mut runs, mut threads) = (repo.join("assets/tinyeyes"), 3, 2);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--bundle" => bundle = PathBuf::from(value()),
            "--runs" => runs = value().parse().expect("--runs takes a count"),
            "--threads" => threads = value().parse().expect("--threads takes a count"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let options = OnnxOptions {
        threads,
        ..OnnxOptions::default()
    };
    let fresh = timed(runs, |_| {
        OnnxModel::load(&bundle, &options).expect("the bundle loads");
    });
    let device = ComputeDevice::Flex.device(true).expect("the CPU device");
    let model = Qwen25Vl::from_pretrained(&bundle, &device).expect("the training engine loads");
    let params: usize = model
        .params()
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let rebuild = timed(runs, |_| {
        OnnxModel::load_with_weights(&bundle, &options, &model.host_weights()).expect("loads");
    });
    let engine = OnnxModel::load_with_weights(&bundle, &options, &model.host_weights())
        .expect("the rollout engine loads");
    // `copy`: the host copy of every weight first (before), or views of burn's buffers (now).
    let sync_with = |copy: bool, version: u64, parts: &mut (Vec<f64>, Vec<f64>)| {
        let t = Instant::now();
        let tensors: Box<dyn WeightSource> = if copy {
            Box::new(model.host_weights())
        } else {
            model.weight_source()
        };
        let handed = t.elapsed().as_secs_f64();
        let t = Instant::now();
        engine
            .receive_weights(&WeightUpdate {
                version,
                tensors: tensors.as_ref(),
            })
            .expect("the engine takes the weights");
        parts.0.push(handed);
        parts.1.push(t.elapsed().as_secs_f64());
    };
    let (mut views, mut copied) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    let mut version = 0;
    let mut sync = Vec::new();
    let mut sync_copy = Vec::new();
    // Alternately, so that both see the same machine.
    for i in 0..=runs {
        for copy in [false, true] {
            version += 1;
            let parts = if copy { &mut copied } else { &mut views };
            let t = Instant::now();
            sync_with(copy, version, parts);
            let s = t.elapsed().as_secs_f64();
            if i > 0 {
                if copy {
                    sync_copy.push(s)
                } else {
                    sync.push(s)
                }
            } else {
                parts.0.clear();
                parts.1.clear();
            }
        }
    }
    let packed = OnnxModel::load(&bundle, &options).expect("the bundle loads");
    let gen_packed = generation(&packed, runs);
    let gen_in_place = generation(&engine, runs);
    let (f, r, s) = (
        median(fresh.clone()),
        median(rebuild.clone()),
        median(sync.clone()),
    );
    println!(
        "bundle: {} ({:.0} M parameters, {threads} threads)",
        bundle.display(),
        params as f64 / 1e6
    );
    println!("fresh load (OnnxModel::load)                 median {f:.3} s  runs {fresh:.3?}");
    println!("rebuild with the weights (load_with_weights) median {r:.3} s  runs {rebuild:.3?}");
    println!("sync in place                                median {s:.3} s  runs {sync:.3?}");
    println!(
        "  of which views of the engine's buffers    median {:.3} s",
        median(views.0)
    );
    println!(
        "  and the engine taking them in place       median {:.3} s",
        median(views.1)
    );
    let sc = median(sync_copy.clone());
    println!("sync with a host copy (before)               median {sc:.3} s  runs {sync_copy:.3?}");
    println!(
        "  of which the training engine's host copy  median {:.3} s",
        median(copied.0)
    );
    println!(
        "  and the engine taking them in place       median {:.3} s",
        median(copied.1)
    );
    println!(
        "sync / fresh load: {:.1} %   sync with a host copy / fresh load: {:.1} %   sync / rebuild: {:.1} %",
        100.0 * s / f,
        100.0 * sc / f,
        100.0 * s / r
    );
    let (gp, gi) = (median(gen_packed.clone()), median(gen_in_place.clone()));
    println!(
        "generation, pre-packed sessions (load)        median {gp:.3} s  runs {gen_packed:.3?}"
    );
    println!(
        "generation, in-place sessions                 median {gi:.3} s  runs {gen_in_place:.3?}"
    );
    println!("in-place / pre-packed generation time: {:.2}", gi / gp);
}
