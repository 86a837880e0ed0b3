//! Peak memory of one training forward + backward pass of a random Qwen2.5-VL over one
//! text sequence, with burn's gradient checkpointing on or off (`model.gradient-checkpointing`).
//!
//! ```sh
//! cargo run --release -p deepeyes-rl --example activation_memory -- \
//!     assets/tinyeyes/config.json 2048 on
//! ```
//!
//! Prints one JSON line: the resident peak (VmHWM) after building the model (weights), and
//! after the pass (weights + activations + gradients), in MiB. Run each length and setting in
//! its own process: the peak only grows.

#![allow(clippy::print_stdout)]

use deepeyes_rl::network::{
    Batch, ComputeDevice, PadLayout, Qwen25Vl, Qwen25VlConfig, Sequence, tensor2,
};

/// The process's resident peak in MiB (Linux `VmHWM`).
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, len, checkpointing] = args.as_slice() else {
        return Err("usage: activation_memory CONFIG.json TOKENS on|off".into());
    };
    let len: usize = len.parse()?;
    let checkpointing = match checkpointing.as_str() {
        "on" => true,
        "off" => false,
        other => return Err(format!("on or off, not {other:?}").into()),
    };
    let config = Qwen25VlConfig::from_hf_file(config)?;
    let mut device = ComputeDevice::Flex.device(true)?;
    if checkpointing {
        device = device.gradient_checkpointing();
    }
    let model = Qwen25Vl::random(&config, 0, &device)?;
    let weights = peak_mib();
    let vocab = config.text.vocab_size as u32;
    let tokens: Vec<u32> = (0..len as u32)
        .map(|i| 7 + (i * 31) % (vocab - 7))
        .collect();
    let seq = Sequence {
        score_from: 0,
        tokens,
        images: vec![],
    };
    let batch = Batch::new(&config, &[seq], PadLayout::OnePerImage)?;
    let started = std::time::Instant::now();
    let scores = model.score_tokens(&batch, false)?;
    let weights_row = tensor2(vec![1.0; batch.score_len], 1, batch.score_len, &device)?;
    let grads = (weights_row * scores.logprobs).sum().backward();
    let seconds = started.elapsed().as_secs_f64();
    drop(grads);
    println!(
        "{}",
        serde_json::json!({
            "tokens": len,
            "checkpointing": checkpointing,
            "peak_after_weights_mib": weights,
            "peak_after_pass_mib": peak_mib(),
            "pass_s": seconds,
        })
    );
    Ok(())
}
