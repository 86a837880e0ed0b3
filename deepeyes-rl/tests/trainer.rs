//! The GRPO trainer end to end on the tiny random-weight Qwen2.5-VL: ONNX Runtime rollouts with
//! the current weights, a custom Rust reward registered by name, burn updates; then the trained
//! weights exported as a bundle that ONNX Runtime runs, checked against the burn model's logits.
//!
//! Needs the ONNX Runtime library (`scripts/setup_ort.sh`).

use std::path::PathBuf;

use deepeyes_core::onnx::{LogitsOf, OnnxModel, OnnxOptions};
use deepeyes_core::{RewardBreakdown, RewardInput, RewardTerm, WeightReceiver};
use deepeyes_reward::{Bounds, PipelineConfig, Registry};
use deepeyes_rl::TrainConfig;
use deepeyes_rl::network::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, Batch, PadLayout, Sequence, to_host};
use deepeyes_rl::trainer::Trainer;
use deepeyes_tools::{ToolRegistry, ToolsConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The share of generated tokens whose id is below 512: about one half for the random model,
/// and something a policy gradient can push up within a few steps.
fn low_token_share(input: &RewardInput<'_>) -> deepeyes_core::Result<RewardBreakdown> {
    let traj = input.trajectory.expect("the trainer passes the trajectory");
    let generated: Vec<u32> = traj
        .tokens
        .iter()
        .zip(&traj.mask)
        .filter(|(_, m)| **m == 1)
        .map(|(t, _)| *t)
        .collect();
    let share = if generated.is_empty() {
        0.0
    } else {
        generated.iter().filter(|&&t| t < 512).count() as f64 / generated.len() as f64
    };
    Ok(RewardBreakdown::from_terms(vec![RewardTerm {
        name: "low_tokens".into(),
        value: share,
        weight: 1.0,
    }]))
}

fn config(out: &std::path::Path, steps: u64, extra_grpo: &str) -> TrainConfig {
    let text = format!(
        r#"
output-dir = "{out}"
steps = {steps}

[seeds]
data = 1
rollout = 2

[data]
kind = "vstar"
paths = ["{data}"]

[model]
bundle = "{bundle}"

[rollout]
max-turns = 1
max-new-tokens = 6

[rollout.sampling]
temperature = 1.0

[batch]
prompts-per-step = 2
mini-batch-prompts = 2
micro-batch = 8
logprob-micro-batch = 16

[grpo]
group-size = 8
{extra_grpo}

[optimizer]
lr = 2e-2

[reward]
version = 1
default = "low"

[reward.rewards.low]
type = "custom"
name = "low_token_share"
"#,
        out = out.display(),
        data = repo().join("tests/data/datasets/vstar").display(),
        bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle").display(),
    );
    TrainConfig::from_toml_str(&text, "test config").unwrap_or_else(|e| panic!("{e}"))
}

/// The custom rewards of these tests: [`low_token_share`] under its name.
fn low_share_rewards() -> Registry {
    let mut rewards = Registry::new();
    rewards
        .register_fn("low_token_share", Bounds::new(0.0, 1.0), low_token_share)
        .unwrap();
    rewards
}

/// The reward pipeline of `config`'s `[reward]` table, custom functions from `rewards`.
fn pipeline(
    config: &TrainConfig,
    rewards: &Registry,
) -> std::sync::Arc<dyn deepeyes_core::RewardFn> {
    let reward = PipelineConfig::from_table(config.reward.as_ref().unwrap(), "[reward]")
        .unwrap()
        .build(rewards)
        .unwrap();
    std::sync::Arc::new(reward)
}

/// A trainer for `config`, wired as the CLI wires it: the tools of its `[tools]` table and the
/// pipeline of its `[reward]` table, with custom reward functions from `rewards`.
fn trainer(config: TrainConfig, rewards: &Registry) -> Trainer {
    let tools = ToolsConfig::from_table(&config.tools, "[tools]").unwrap();
    let tools = ToolRegistry::from_config(&tools).unwrap().tools();
    let reward = pipeline(&config, rewards);
    Trainer::new(config, tools, reward)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_onnx_options(OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        })
}

/// The metrics of `steps` steps of a run of `config` (times left out), checking after each step
/// that the trainer held at most `window` items.
fn metrics_without_times(mut config: TrainConfig, window: usize) -> Vec<serde_json::Value> {
    config.data.window = window;
    let rewards = low_share_rewards();
    let steps = config.steps;
    let mut trainer = trainer(config, &rewards);
    (0..steps)
        .map(|_| {
            let line = run_steps(&mut trainer, 1).remove(0);
            let held = trainer.items_in_memory();
            assert!(
                held <= window,
                "{held} items held with a window of {window}"
            );
            line
        })
        .collect()
}

/// The trainer holds only a window of the data, re-reading the files for the next one, and draws
/// exactly the items (hence the metrics) of a run that holds everything: 6 items, 2 per step, 5
/// steps cross an epoch and leave a window of 2 four times.
#[test]
fn a_small_data_window_trains_exactly_as_holding_all_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let whole = metrics_without_times(config(&dir.path().join("whole"), 5, ""), 1024);
    let windowed = metrics_without_times(config(&dir.path().join("windowed"), 5, ""), 2);
    assert_eq!(whole.len(), 5);
    assert_eq!(windowed, whole);
}

/// Two micro-batches whose gradients are computed at the same time, each on its own thread,
/// train exactly as one after the other: the same metrics and the same weights, bit for bit.
#[test]
fn concurrent_micro_batches_train_bit_for_bit_as_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let rewards = low_share_rewards();
    let run = |at_once: usize| {
        let mut config = config(&dir.path().join(format!("at-once-{at_once}")), 2, "");
        config.batch.concurrent_micro_batches = at_once;
        let mut trainer = trainer(config, &rewards);
        let metrics = run_steps(&mut trainer, 2);
        (metrics, trainer.model().hf_tensors())
    };
    let (one_by_one, weights_one_by_one) = run(1);
    let (together, weights_together) = run(2);
    assert_eq!(one_by_one.len(), 2);
    assert!(
        one_by_one
            .iter()
            .all(|m| m["grad_norm"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(together, one_by_one);
    assert_eq!(weights_together, weights_one_by_one);
}

/// The bundles training writes carry the `[tools]` table it ran with as their `tools.toml`
/// (plugin paths made absolute, since a bundle reads them against its own folder), so that
/// `run`, `eval` and `serve` read boxes in the frame training used.
#[test]
fn exported_bundles_carry_the_tools_config_training_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir.path().join("run"), 1, "");
    config.tools = toml::from_str(
        "[zoom-in]\nframe = \"relative\"\nmin-side = 20\n[[plugins]]\npath = \"plugins/x.so\"\n",
    )
    .unwrap();
    let with_plugin = config.tools.clone();
    config.tools.remove("plugins");
    let trainer = trainer(config, &low_share_rewards());
    let out = trainer.export(&dir.path().join("bundle")).unwrap();
    let tools = deepeyes_tools::ToolsConfig::for_bundle(&out)
        .unwrap()
        .expect("tools.toml");
    assert_eq!(
        tools.zoom_in.frame,
        deepeyes_tools::CoordinateFrame::Relative
    );
    assert_eq!(tools.zoom_in.min_side, 20.0);
    // A plugin path relative to where training ran is written absolute.
    let written = dir.path().join("plugin-bundle");
    std::fs::create_dir_all(&written).unwrap();
    deepeyes_rl::trainer::write_tools_table(&with_plugin, &written).unwrap();
    let text = std::fs::read_to_string(written.join("tools.toml")).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert!(
        text.contains(&cwd.join("plugins/x.so").display().to_string()),
        "{text}"
    );
}

// The reward curve and the parity figure are printed for whoever reads the test log.
#[allow(clippy::print_stderr)]
#[test]
fn grpo_raises_the_reward_and_the_exported_bundle_runs_the_new_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let rewards = low_share_rewards();
    let mut trainer = trainer(config(&out, 8, ""), &rewards);
    let engine = trainer.rollout_engine().unwrap();
    assert_eq!(engine.weights_version(), Some(0));
    let mut means = Vec::new();
    for _ in 0..8 {
        let m = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.rollout.trajectories, 16);
        assert_eq!(m.update.optimizer_steps, 1);
        assert!(m.update.grad_norm.is_finite() && m.update.grad_norm > 0.0);
        means.push(m.rollout.reward_mean);
    }
    eprintln!("reward mean per step: {means:?}");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first = (means[0] + means[1]) / 2.0;
    let last = (means[6] + means[7]) / 2.0;
    assert!(last > first + 0.1, "the reward did not rise: {means:?}");
    assert_eq!(lines.lines().count(), 8);

    // The trained weights, exported as a bundle, run in ONNX Runtime with the burn model's
    // logits.
    let exported = trainer.export(&dir.path().join("bundle")).unwrap();
    // Its graphs still hold the fixture's weights, which the fixture's map says are current:
    // the export must say they are not, or the new weights would never be read.
    let map = deepeyes_core::onnx::WeightMap::load(&exported)
        .unwrap()
        .unwrap();
    assert!(!map.graphs_current);
    let ort = OnnxModel::load(
        &exported,
        &OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        },
    )
    .unwrap();
    let original = OnnxModel::load(
        repo().join("tests/data/tiny-qwen2_5_vl/bundle"),
        &OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        },
    )
    .unwrap();
    let tokens: Vec<u32> = vec![15, 17, 200, 301, 9, 42, 77, 600];
    let prompt = ort.prepare(&tokens, &[]).unwrap();
    let (got, _) = ort.prefill(&[&prompt], LogitsOf::All).unwrap();
    let (before, _) = original.prefill(&[&prompt], LogitsOf::All).unwrap();
    let model = trainer.model();
    let batch = Batch::new(
        &model.config,
        &[Sequence {
            score_from: 0,
            tokens: tokens.clone(),
            images: vec![],
        }],
        PadLayout::OnePerImage,
    )
    .unwrap();
    let want = to_host(model.logits(&batch).unwrap());
    let diff = got[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let moved = got[0]
        .iter()
        .zip(&before[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("exported ORT vs burn: max |Δ| = {diff:.2e}; moved from the base by {moved:.2e}");
    assert_eq!(got[0].len(), want.len());
    assert!(diff <= 1e-4, "ORT and burn disagree by {diff}");
    assert!(moved > 1e-3, "training did not change the weights ORT runs");

    // The rollout engine built before the first step is the one that runs the trained weights:
    // eight optimizer steps later its sessions, never rebuilt, give the burn model's logits.
    let synced = trainer.rollout_engine().unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&engine, &synced),
        "the rollout engine was rebuilt"
    );
    assert_eq!(engine.weights_version(), Some(8));
    let prompt = engine.prepare(&tokens, &[]).unwrap();
    let (live, _) = engine.prefill(&[&prompt], LogitsOf::All).unwrap();
    let diff = live[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("rollout engine after 8 steps vs burn: max |Δ| = {diff:.2e}");
    assert!(
        diff <= 1e-4,
        "the rollout engine and burn disagree by {diff}"
    );
}

/// Like [`low_token_share`], but constant for one V* item, so its groups carry no signal.
fn low_share_except_one_item(input: &RewardInput<'_>) -> deepeyes_core::Result<RewardBreakdown> {
    if input.question.contains("left or right side") {
        return Ok(RewardBreakdown::from_terms(vec![RewardTerm {
            name: "low_tokens".into(),
            value: 1.0,
            weight: 1.0,
        }]));
    }
    low_token_share(input)
}

#[test]
fn kl_entropy_and_dynamic_sampling_enter_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let mut rewards = Registry::new();
    rewards
        .register_fn(
            "low_token_share",
            Bounds::new(0.0, 1.0),
            low_share_except_one_item,
        )
        .unwrap();
    let extra = "kl-coef = 0.1\nentropy-coef = 0.01\n[grpo.dynamic-sampling]\nenabled = true\nmax-rounds = 4";
    let mut trainer = trainer(config(&dir.path().join("run"), 2, extra), &rewards);
    let first = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
    let second = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
    for m in [&first, &second] {
        // Groups without reward variance were replaced: a full batch, all informative.
        assert_eq!(m.rollout.trajectories, 16);
        assert_eq!(m.rollout.zero_variance_group_share, 0.0);
        let entropy = m.update.entropy.expect("entropy is reported");
        assert!(entropy > 0.0, "{entropy}");
    }
    // The policy starts as the reference, then moves away from it.
    assert!(first.update.kl.expect("kl is reported").abs() < 1e-6);
    assert!(second.update.kl.expect("kl is reported") > 0.0);
}

/// `[lora]` as a user writes it: adapters on every linear layer but the output head.
const LORA: &str = "[lora]\nrank = 4\nalpha = 8\ntarget-modules = \"all-linear\"";

/// The metrics of a trainer's next `steps` steps, times left out.
fn run_steps(trainer: &mut Trainer, steps: usize) -> Vec<serde_json::Value> {
    (0..steps)
        .map(|_| {
            let m = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
            let mut line = serde_json::to_value(m).unwrap();
            line.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("time_"));
            line
        })
        .collect()
}

/// The burn model's logits of a short text prompt.
fn text_logits(model: &deepeyes_rl::network::Qwen25Vl, tokens: &[u32]) -> Vec<f32> {
    let seq = Sequence {
        score_from: 0,
        tokens: tokens.to_vec(),
        images: vec![],
    };
    let batch = Batch::new(&model.config, &[seq], PadLayout::OnePerImage).unwrap();
    to_host(model.logits(&batch).unwrap())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// LoRA GRPO: only the adapters train, the rollout engine runs the merged weights, checkpoints
/// hold the adapter as PEFT writes it, and a run resumed from one continues exactly.
#[test]
fn lora_grpo_trains_the_adapter_only_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let rewards = low_share_rewards();
    let tokens: Vec<u32> = vec![15, 17, 200, 301, 9, 42, 77, 600];
    let base = deepeyes_rl::network::Qwen25Vl::from_pretrained(
        repo().join("tests/data/tiny-qwen2_5_vl/bundle"),
        &deepeyes_rl::network::ComputeDevice::Flex
            .device(false)
            .unwrap(),
    )
    .unwrap();

    let mut whole = trainer(config(&dir.path().join("whole"), 4, LORA), &rewards);
    let params = whole.model().params();
    assert!(
        params
            .iter()
            .filter(|p| p.trainable)
            .all(|p| p.name.contains(".lora_"))
    );
    assert!(params.iter().any(|p| p.trainable));
    let uninterrupted = run_steps(&mut whole, 4);
    let trained = text_logits(whole.model(), &tokens);
    let moved = max_diff(&trained, &text_logits(&base, &tokens));
    assert!(
        moved > 1e-3,
        "four LoRA steps did not change the model ({moved:e})"
    );
    // The rollout engine took the merged weights in place.
    let engine = whole.rollout_engine().unwrap();
    let prompt = engine.prepare(&tokens, &[]).unwrap();
    let (live, _) = engine.prefill(&[&prompt], LogitsOf::All).unwrap();
    let d = max_diff(&live[0], &trained);
    assert!(d <= 1e-4, "rollout engine vs adapted burn model: {d:e}");

    // Killed after step 2 and resumed from its checkpoint.
    let out = dir.path().join("resumed");
    let mut first = trainer(config(&out, 4, LORA), &rewards);
    let head = run_steps(&mut first, 2);
    let saved = first.save_checkpoint().unwrap();
    drop(first);
    for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        assert!(saved.join(file).is_file(), "the checkpoint has no {file}");
    }
    // The checkpoint's adapter on the untouched base is the trainer's model.
    let adapter = base.clone().load_adapter(&saved).unwrap();
    let merged = deepeyes_rl::network::Qwen25Vl::from_pretrained(&saved, &base.device()).unwrap();
    assert!(
        max_diff(
            &text_logits(&adapter, &tokens),
            &text_logits(&merged, &tokens)
        ) <= 1e-5
    );

    let (checkpoint, _) =
        deepeyes_rl::checkpoint::latest_intact(&config(&out, 4, LORA).checkpoint_dir()).unwrap();
    let checkpoint = checkpoint.unwrap();
    let resume = |config: TrainConfig| {
        let tools =
            ToolRegistry::from_config(&ToolsConfig::from_table(&config.tools, "[tools]").unwrap())
                .unwrap()
                .tools();
        let reward = pipeline(&config, &rewards);
        Trainer::resume(config, tools, reward, &checkpoint)
    };
    // A checkpoint continues only a run of its own kind.
    for (other, want) in [
        ("", "holds a LoRA adapter"),
        (
            "[lora]\nrank = 8\nalpha = 8\ntarget-modules = \"all-linear\"",
            "rank 4",
        ),
    ] {
        let e = resume(config(&out, 4, other)).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("step-00000002"), "{e}");
    }
    let mut resumed = resume(config(&out, 4, LORA))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_onnx_options(OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        });
    let tail = run_steps(&mut resumed, 2);
    assert_eq!([head, tail].concat(), uninterrupted);
    assert_eq!(text_logits(resumed.model(), &tokens), trained);
}

/// A LoRA run's KL reference is its own base with the adapters off: zero at the first step
/// (B = 0), positive once the adapters have moved, and no second model is loaded.
#[test]
fn lora_kl_reference_is_the_base_without_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let rewards = low_share_rewards();
    let extra = format!("kl-coef = 0.1\n{LORA}");
    let mut trainer = trainer(config(&dir.path().join("run"), 2, &extra), &rewards);
    let first = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
    let second = trainer.train_step().unwrap_or_else(|e| panic!("{e}"));
    assert!(first.update.kl.expect("kl is reported").abs() < 1e-6);
    assert!(second.update.kl.expect("kl is reported") > 0.0);
}

/// A full-update run's checkpoint is not continued as a LoRA run (nor the other way round: see
/// [`lora_grpo_trains_the_adapter_only_and_resumes_exactly`]).
#[test]
fn a_full_update_checkpoint_does_not_resume_as_lora() {
    let dir = tempfile::tempdir().unwrap();
    let rewards = low_share_rewards();
    let out = dir.path().join("run");
    let mut full = trainer(config(&out, 2, ""), &rewards);
    run_steps(&mut full, 1);
    let saved = full.save_checkpoint().unwrap();
    drop(full);
    let checkpoint = deepeyes_rl::checkpoint::Checkpoint::open(&saved).unwrap();
    let config = config(&out, 2, LORA);
    let reward = pipeline(&config, &rewards);
    let e = Trainer::resume(config, vec![], reward, &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trains every weight") && e.contains("[lora]"),
        "{e}"
    );
}
