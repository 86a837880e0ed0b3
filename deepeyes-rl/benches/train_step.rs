//! The time split of a full GRPO step on the tiny Qwen2.5-VL fixture: rollouts through ONNX
//! Runtime (weights handed over in memory, agent loop, tools), reward scoring, old log-prob
//! recomputation by burn, and the update (forward + backward + AdamW), with the update's time per
//! scored token.
//!
//! `cargo bench -p deepeyes-rl --bench train_step` (needs `scripts/setup_ort.sh`) runs 2 warm-up
//! steps and 6 timed steps of 4 prompts × 8 samples on the V*-format fixture and prints the mean
//! of each phase and its share of the step.

#![allow(clippy::print_stdout, missing_docs)]

use std::path::PathBuf;

use deepeyes_core::onnx::OnnxOptions;
use deepeyes_reward::{PipelineConfig, Registry};
use deepeyes_rl::TrainConfig;
use deepeyes_rl::trainer::Trainer;
use deepeyes_tools::{ToolRegistry, ToolsConfig};

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().expect("a temporary folder");
    let text = format!(
        r#"
output-dir = "{out}"
steps = 8

[data]
kind = "vstar"
paths = ["{data}"]

[model]
bundle = "{bundle}"

[rollout]
max-turns = 2
max-new-tokens = 24

[rollout.sampling]
temperature = 1.0

[batch]
prompts-per-step = 4
mini-batch-prompts = 4
micro-batch = 8
logprob-micro-batch = 16

[grpo]
group-size = 8

[optimizer]
lr = 1e-4

"#,
        out = out.path().display(),
        data = repo.join("tests/data/datasets/vstar").display(),
        bundle = repo.join("tests/data/tiny-qwen2_5_vl/bundle").display(),
    );
    let config = TrainConfig::from_toml_str(&text, "bench config").expect("a valid config");
    // DeepEyes' reward, by its rules alone (no judge server here).
    let mut rewards = PipelineConfig::deepeyes().expect("the DeepEyes pipeline");
    rewards.judge = None;
    let reward = rewards
        .build(&Registry::new())
        .expect("the pipeline builds");
    let tools = ToolsConfig::from_table(&config.tools, "[tools]").expect("the default tools");
    let tools = ToolRegistry::from_config(&tools)
        .expect("the tools")
        .tools();
    let mut trainer = Trainer::new(config, tools, std::sync::Arc::new(reward))
        .expect("the trainer starts")
        .with_onnx_options(OnnxOptions {
            threads: 2,
            ..OnnxOptions::default()
        });
    for _ in 0..2 {
        trainer.train_step().expect("a warm-up step");
    }
    let mut sums = [0.0f64; 5];
    let mut tokens = 0usize;
    let steps = 6;
    for _ in 0..steps {
        let m = trainer.train_step().expect("a step");
        let t = &m.time;
        for (s, v) in sums.iter_mut().zip([
            t.time_rollout_s,
            t.time_reward_s,
            t.time_logprob_s,
            t.time_update_s,
            t.time_step_s,
        ]) {
            *s += v;
        }
        tokens += m.update.loss_tokens;
    }
    let step = sums[4] / steps as f64;
    println!("GRPO step on the tiny fixture: 4 prompts × 8 samples, mean of {steps} steps");
    println!("{:<28} {:>10} {:>8}", "phase", "ms", "share");
    for (name, s) in [
        "rollout (ORT + tools)",
        "reward",
        "old log-probs (burn)",
        "update (burn)",
    ]
    .iter()
    .zip(&sums)
    {
        let ms = 1e3 * s / steps as f64;
        println!("{name:<28} {ms:>10.1} {:>7.1}%", 100.0 * ms / (1e3 * step));
    }
    println!("{:<28} {:>10.1}", "whole step", 1e3 * step);
    println!(
        "update time per scored token: {:.3} ms ({} tokens per step)",
        1e3 * sums[3] / tokens.max(1) as f64,
        tokens / steps
    );
}
