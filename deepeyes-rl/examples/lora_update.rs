//! One LoRA GRPO update, timed: the training engine alone (no ONNX Runtime), on the CPU or, built
//! with `--features cuda`, on a GPU. The deepeyes side of `scripts/device_check.sh`, whose PyTorch
//! + PEFT side (`scripts/device_check.py`) does the same update on the same batch.
//!
//! ```sh
//! lora_update MODEL BATCH.json [--device cpu|cuda] [--rank 16] [--runs 3] [--checkpointing]
//! lora_update --probe [--device cuda]
//! ```
//!
//! `MODEL` is a Hugging Face checkpoint directory; `BATCH.json` holds `sequences` (token ids),
//! `score_from` (the first scored position of each) and `weights` (one per scored token, the
//! GRPO surrogate's coefficients, in order). An update: forward of every sequence, the loss
//! `Σ w·log p`, backward into adapters of rank `--rank` (alpha 2·rank) on every linear layer, one
//! AdamW step, waiting for the device. The first update warms up (kernel compilation on a GPU);
//! the next `--runs` are timed. `--probe` only checks that the device runs a product. Prints one
//! JSON line.

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use deepeyes_rl::network::{
    Batch, ComputeDevice, LoraConfig, PadLayout, Qwen25Vl, Sequence, tensor2, to_host,
};
use serde::Deserialize;

/// The update's batch, as `scripts/device_check.py` writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBatch {
    sequences: Vec<Vec<u32>>,
    score_from: Vec<usize>,
    weights: Vec<f32>,
}

type Error = Box<dyn std::error::Error>;

/// The value of `--name`, if given.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

fn device(args: &[String]) -> Result<Device, Error> {
    let compute = match flag(args, "--device").unwrap_or("cpu") {
        "cpu" => ComputeDevice::Flex,
        "cuda" => ComputeDevice::Cuda(0),
        other => return Err(format!("--device is cpu or cuda, not {other:?}").into()),
    };
    let mut device = compute.device(true)?;
    if args.iter().any(|a| a == "--checkpointing") {
        device = device.gradient_checkpointing();
    }
    Ok(device)
}

/// The per-sequence weights `[sequences, longest]` of `batch`, aligned with the scored tokens.
fn weight_grid(batch: &UpdateBatch, longest: usize) -> Result<Vec<f32>, Error> {
    let mut grid = vec![0.0; batch.sequences.len() * longest];
    let mut next = batch.weights.iter();
    for (b, (seq, &from)) in batch.sequences.iter().zip(&batch.score_from).enumerate() {
        for t in from.max(1)..seq.len() {
            grid[b * longest + t] = *next.next().ok_or("fewer weights than scored tokens")?;
        }
    }
    if next.next().is_some() {
        return Err("more weights than scored tokens".into());
    }
    Ok(grid)
}

/// One update; returns the model, the loss and the seconds it took, the device waited for.
fn update(
    model: Qwen25Vl,
    optim: &mut ModuleOptimizer,
    batch: &UpdateBatch,
) -> Result<(Qwen25Vl, f32, f64), Error> {
    let started = Instant::now();
    let sequences: Vec<Sequence> = batch
        .sequences
        .iter()
        .zip(&batch.score_from)
        .map(|(tokens, &score_from)| Sequence {
            tokens: tokens.clone(),
            images: vec![],
            score_from,
        })
        .collect();
    let prepared = Batch::new(&model.config, &sequences, PadLayout::OnePerImage)?;
    let scores = model.score_tokens(&prepared, false)?;
    let grid = weight_grid(batch, prepared.score_len)?;
    let weights = tensor2(grid, prepared.batch, prepared.score_len, &model.device())?;
    let loss = (weights * scores.logprobs).sum();
    let value = to_host(loss.clone())[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optim.step(1e-5, model, grads);
    model.device().sync()?;
    Ok((model, value, started.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = device(&args)?;
    if args.iter().any(|a| a == "--probe") {
        let x = Tensor::<2>::ones([64, 64], &device);
        let sum = to_host(x.clone().matmul(x).sum())[0];
        println!(
            "{}",
            serde_json::json!({ "probe": format!("{device:?}"), "sum": sum })
        );
        return if sum == 64.0 * 64.0 * 64.0 {
            Ok(())
        } else {
            Err(format!("the device computed {sum}, not 262144").into())
        };
    }
    let (Some(model_dir), Some(batch_path)) = (args.first(), args.get(1)) else {
        return Err(
            "usage: lora_update MODEL BATCH.json [--device cpu|cuda] [--rank R] \
                    [--runs N] [--checkpointing]"
                .into(),
        );
    };
    let batch: UpdateBatch = serde_json::from_str(&std::fs::read_to_string(batch_path)?)
        .map_err(|e| format!("{batch_path}: {e}"))?;
    let rank: usize = flag(&args, "--rank").unwrap_or("16").parse()?;
    let runs: usize = flag(&args, "--runs").unwrap_or("3").parse()?;
    let started = Instant::now();
    let lora = LoraConfig::all_linear(rank);
    let mut model =
        Qwen25Vl::from_pretrained(Path::new(model_dir), &device)?.with_lora(&lora, 0)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut optim = AdamWConfig::new().init();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..=runs {
        let (next, loss, seconds) = update(model, &mut optim, &batch)?;
        model = next;
        times.push(seconds);
        losses.push(loss);
    }
    let mut timed = times[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let usage = model.device().memory_pool_usage();
    println!(
        "{}",
        serde_json::json!({
            "side": "deepeyes",
            "device": format!("{device:?}"),
            "load_s": load_s,
            "warmup_s": times[0],
            "median_s": timed.get(timed.len() / 2),
            "runs_s": &times[1..],
            "first_loss": losses[0],
            "reserved_mib_after": usage.map(|u| u.bytes_reserved as f64 / 1048576.0),
        })
    );
    Ok(())
}
