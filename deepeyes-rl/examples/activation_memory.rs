//! Peak memory of one training update of a Qwen2.5-VL over one text sequence, split into the
//! resident part (weights, adapters, optimizer state) and the activation part, with burn's
//! gradient checkpointing on or off (`model.gradient-checkpointing`).
//!
//! ```sh
//! cargo run --release -p deepeyes-rl --example activation_memory -- \
//!     MODEL TOKENS on|off [--lora RANK] [--whole]
//! ```
//!
//! `MODEL` is a Hugging Face checkpoint directory (`scripts/make_random_qwen2_5_vl.py` makes
//! real-width ones) or a `config.json` (random weights). An update is one forward + backward of
//! the GRPO-shaped loss `Σ w·log p` over every token of the sequence and one AdamW step; with
//! `--lora RANK` only adapters on every linear layer (alpha = 2·rank) train. A first update on 64
//! tokens creates the optimizer state; then the resident level is read, the peak reset, and the
//! measured update runs: its activation part is the peak minus that level. `--whole` turns off
//! chunked attention and chunked logits (attention over every query row at once, all logits
//! held), the engine before them. Prints one JSON line (MiB, seconds). Run each setting in its
//! own process.

#![allow(clippy::print_stdout)]

use std::path::Path;

use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use deepeyes_rl::network::{
    Batch, ComputeDevice, LoraConfig, PadLayout, Qwen25Vl, Qwen25VlConfig, Sequence, tensor2,
};

/// A `/proc/self/status` field in MiB (Linux).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the resident peak (`VmHWM`) to the current resident size.
fn reset_peak() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// One AdamW update on a text sequence of `len` tokens; returns the model and its seconds.
fn update(
    model: Qwen25Vl,
    optim: &mut ModuleOptimizer,
    len: usize,
) -> Result<(Qwen25Vl, f64), Box<dyn std::error::Error>> {
    let vocab = model.config.text.vocab_size as u32;
    let tokens: Vec<u32> = (0..len as u32)
        .map(|i| 7 + (i * 31) % (vocab - 7))
        .collect();
    let seq = Sequence {
        score_from: 0,
        tokens,
        images: vec![],
    };
    let started = std::time::Instant::now();
    let batch = Batch::new(&model.config, &[seq], PadLayout::OnePerImage)?;
    let scores = model.score_tokens(&batch, false)?;
    let weights: Vec<f32> = (0..batch.score_len)
        .map(|i| if i % 3 == 0 { -0.5 } else { 1.0 } / batch.score_len as f32)
        .collect();
    let weights = tensor2(weights, 1, batch.score_len, &model.device())?;
    let grads = (weights * scores.logprobs).sum().backward();
    let grads = GradientsParams::from_grads(grads, &model);
    let model = optim.step(1e-5, model, grads);
    Ok((model, started.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model_path), Some(len), Some(checkpointing)) =
        (args.first(), args.get(1), args.get(2))
    else {
        return Err("usage: activation_memory MODEL TOKENS on|off [--lora RANK] [--whole]".into());
    };
    let len: usize = len.parse()?;
    let checkpointing = match checkpointing.as_str() {
        "on" => true,
        "off" => false,
        other => return Err(format!("on or off, not {other:?}").into()),
    };
    let rest = &args[3..];
    let whole = rest.iter().any(|a| a == "--whole");
    let rank = match rest.iter().position(|a| a == "--lora") {
        Some(i) => Some(
            rest.get(i + 1)
                .ok_or("--lora needs a rank")?
                .parse::<usize>()?,
        ),
        None => None,
    };
    let mut device = ComputeDevice::Flex.device(true)?;
    if checkpointing {
        device = device.gradient_checkpointing();
    }
    let path = Path::new(model_path);
    let mut model = if path.is_dir() {
        Qwen25Vl::from_pretrained(path, &device)?
    } else {
        Qwen25Vl::random(&Qwen25VlConfig::from_hf_file(path)?, 0, &device)?
    };
    if let Some(rank) = rank {
        let lora = LoraConfig::all_linear(rank);
        model = model.with_lora(&lora, 0)?;
    }
    if whole {
        model = model
            .with_attention_chunk(usize::MAX)
            .with_logits_limit(usize::MAX);
    }
    let trainable: usize = model
        .params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut optim = AdamWConfig::new().init();
    let (model, _) = update(model, &mut optim, 64)?;
    let resident = status_mib("VmRSS:");
    reset_peak()?;
    let (model, seconds) = update(model, &mut optim, len)?;
    let peak = status_mib("VmHWM:");
    drop(model);
    println!(
        "{}",
        serde_json::json!({
            "tokens": len,
            "checkpointing": checkpointing,
            "chunked": !whole,
            "lora_rank": rank,
            "trainable_params": trainable,
            "resident_mib": resident.round(),
            "peak_mib": peak.round(),
            "activation_mib": (peak - resident).round(),
            "update_s": (seconds * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
