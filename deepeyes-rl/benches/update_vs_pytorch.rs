//! The deepeyes side of the side-by-side update benchmark (`scripts/bench_update.sh` runs both
//! sides and prints the ratios).
//!
//! Rolls out one step of the demo's configuration (`configs/train/tinyeyes-demo.toml`: 8 SynthV*
//! prompts × 16 samples, DeepEyes' reward by its rules) with the given bundle, writes that
//! step's update as the PyTorch side reads it (`update-batch.safetensors` and
//! `update-batch.json` in `--out`), then times the trainer's real update half
//! ([`Trainer::update_step`]: sequences, image preprocessing, forward, backward, clipping,
//! AdamW) on those rollouts, once to warm up and `--runs` times measured, and writes the times
//! to `deepeyes-times.json`. With `--same-work` the trainer computes exactly what the PyTorch
//! side computes (no shared prefixes; each distinct image is still encoded once) and the times go
//! to `deepeyes-same-work.json`.
//!
//! `cargo bench --bench update_vs_pytorch -- [--bundle DIR] [--out DIR] [--runs N] [--threads N]
//! [--same-work]`

#![allow(clippy::print_stdout, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use deepeyes_core::onnx::OnnxOptions;
use deepeyes_reward::{PipelineConfig, Registry};
use deepeyes_rl::TrainConfig;
use deepeyes_rl::network::{PolicyNetwork, ScoreOptions, Sequence, to_host};
use deepeyes_rl::synthv::{SynthVConfig, write_split};
use deepeyes_rl::trainer::{Trainer, UpdateRecord};
use deepeyes_tools::{ToolRegistry, ToolsConfig};
use safetensors::{Dtype, tensor::TensorView};

mod allocator;

struct Args {
    bundle: PathBuf,
    out: PathBuf,
    runs: usize,
    threads: usize,
    /// Compute exactly what the PyTorch side computes: no shared prefixes.
    same_work: bool,
}

fn args(repo: &Path) -> Args {
    let mut a = Args {
        bundle: repo.join("assets/tinyeyes"),
        out: repo.join("target/bench-update"),
        runs: 3,
        threads: 2,
        same_work: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--bundle" => a.bundle = PathBuf::from(value()),
            "--out" => a.out = PathBuf::from(value()),
            "--runs" => a.runs = value().parse().expect("--runs takes a count"),
            // The update's threads are burn's (RAYON_NUM_THREADS); these are the rollouts'.
            "--threads" => a.threads = value().parse().expect("--threads takes a count"),
            "--same-work" => a.same_work = true,
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn trainer(repo: &Path, a: &Args) -> Trainer {
    let data = write_split(
        &SynthVConfig::default(),
        &a.out.join("data"),
        "train",
        64,
        0,
    )
    .expect("SynthV* items");
    let text = std::fs::read_to_string(repo.join("configs/train/tinyeyes-demo.toml"))
        .expect("the demo config");
    let mut config = TrainConfig::from_toml_str(&text, "tinyeyes-demo.toml").expect("valid");
    config.output_dir = a.out.join("train");
    config.data.paths = vec![data];
    config.model.bundle = a.bundle.clone();
    config.batch.share_prefixes = !a.same_work;
    let _ = std::fs::remove_dir_all(&config.output_dir);
    let mut rewards = PipelineConfig::from_toml_str(
        deepeyes_reward::DEEPEYES_TOML,
        "configs/rewards/deepeyes.toml",
    )
    .expect("the DeepEyes pipeline");
    rewards.judge = None;
    let reward = rewards
        .build(&Registry::new())
        .expect("the pipeline builds");
    let tools = ToolsConfig::from_table(&config.tools, "[tools]").expect("the default tools");
    let tools = ToolRegistry::from_config(&tools).expect("tools").tools();
    Trainer::new(config, tools, Arc::new(reward))
        .expect("the trainer starts")
        .with_onnx_options(OnnxOptions {
            threads: a.threads,
            ..OnnxOptions::default()
        })
}

/// Writes `record` as `update-batch.safetensors` (per trajectory `seq.{i}.tokens`, and per image
/// `seq.{i}.image.{k}.patches` / `.grid`; `weights`; `engine_logprobs`, the training engine's
/// log-probs at the step's weights, which the PyTorch side must reproduce) and
/// `update-batch.json`.
fn write_record(record: &UpdateRecord, trainer: &Trainer, out: &Path) {
    let mut bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (i, s) in record.sequences.iter().enumerate() {
        let tokens: Vec<i64> = s.tokens.iter().map(|&t| i64::from(t)).collect();
        bytes.push((
            format!("seq.{i}.tokens"),
            Dtype::I64,
            vec![tokens.len()],
            i64s(&tokens),
        ));
        for (k, im) in s.images.iter().enumerate() {
            let n = im.grid.iter().product::<usize>();
            let pd = im.patches.len() / n;
            bytes.push((
                format!("seq.{i}.image.{k}.patches"),
                Dtype::F32,
                vec![n, pd],
                f32s(&im.patches),
            ));
            let grid: Vec<i64> = im.grid.iter().map(|&g| g as i64).collect();
            bytes.push((
                format!("seq.{i}.image.{k}.grid"),
                Dtype::I64,
                vec![3],
                i64s(&grid),
            ));
        }
    }
    let logprobs = engine_logprobs(record, trainer);
    for (name, grid) in [("weights", &record.weights), ("engine_logprobs", &logprobs)] {
        let g = grid.as_standard_layout();
        bytes.push((
            name.into(),
            Dtype::F32,
            g.shape().to_vec(),
            f32s(g.as_slice().expect("contiguous")),
        ));
    }
    let views: HashMap<String, TensorView<'_>> = bytes
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).expect("a tensor"),
            )
        })
        .collect();
    safetensors::serialize_to_file(&views, None, &out.join("update-batch.safetensors"))
        .expect("writing the batch");
    let o = &trainer.config().optimizer;
    let meta = serde_json::json!({
        "trajectories": record.sequences.len(),
        "micro_batches": record.micro_batches,
        "lr": record.lr,
        "betas": o.betas,
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "grad_clip": o.grad_clip,
        "image_pad": trainer.model().config.image_token_id,
    });
    std::fs::write(out.join("update-batch.json"), meta.to_string()).expect("writing the meta");
}

/// The training engine's log-prob of every token of the record, `[trajectories, width]`, at
/// the trainer's current weights, micro-batch by micro-batch.
fn engine_logprobs(record: &UpdateRecord, trainer: &Trainer) -> ndarray::Array2<f32> {
    let mut out = ndarray::Array2::<f32>::zeros(record.weights.dim());
    for rows in &record.micro_batches {
        let seqs: Vec<Sequence> = rows.iter().map(|&r| record.sequences[r].clone()).collect();
        let scores = trainer
            .model()
            .score_sequences(&seqs, ScoreOptions::default())
            .expect("log-probs");
        let cols = scores.logprobs.dims()[1];
        let host = to_host(scores.logprobs);
        for (i, &r) in rows.iter().enumerate() {
            let w = cols.min(out.ncols());
            for t in 0..w {
                out[[r, t]] = host[i * cols + t];
            }
        }
    }
    out
}

fn main() {
    allocator::keep_freed_memory();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let a = args(&repo);
    std::fs::create_dir_all(&a.out).expect("the output folder");
    let mut trainer = trainer(&repo, &a);
    let scored = trainer.rollout_step().expect("one rollout step");
    let record = trainer.update_record(&scored).expect("the update record");
    write_record(&record, &trainer, &a.out);
    let tokens: usize = record.sequences.iter().map(|s| s.tokens.len()).sum();
    let images: usize = record.sequences.iter().map(|s| s.images.len()).sum();
    let n = record.sequences.len();
    println!(
        "rows: {n} trajectories, {:.1} tokens (one pad per image) and {:.2} images each, micro-batches of {}",
        tokens as f64 / n as f64,
        images as f64 / n as f64,
        record.micro_batches.first().map_or(0, Vec::len)
    );
    let mut times = Vec::new();
    let mut first_grad_norm = 0.0;
    for run in 0..=a.runs {
        let t = Instant::now();
        let metrics = trainer.update_step(&scored).expect("an update");
        let s = t.elapsed().as_secs_f64();
        if run == 0 {
            first_grad_norm = metrics.update.grad_norm;
            println!("deepeyes update (warm-up): {s:.3} s, gradient norm {first_grad_norm:.6e}");
        } else {
            println!("deepeyes update run {run}: {s:.3} s");
            times.push(s);
        }
    }
    let json = serde_json::json!({ "update_s": times, "first_grad_norm": first_grad_norm });
    let name = if a.same_work {
        "deepeyes-same-work.json"
    } else {
        "deepeyes-times.json"
    };
    std::fs::write(a.out.join(name), json.to_string()).expect("writing times");
}
