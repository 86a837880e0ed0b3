//! `deepeyes train` end to end on the tiny random-weight bundle with the shipped DeepEyes reward,
//! then `deepeyes eval` on the bundle it wrote. Needs the ONNX Runtime library
//! (`scripts/setup_ort.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(dead_code)] // each test binary uses some of the shared fixtures
mod support;

use support::repo;

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
        .output()
        .expect("the deepeyes binary runs")
}

/// `deepeyes train` on `config`, single-threaded, rules-only reward, plus `extra` arguments.
fn train_command(config: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deepeyes"));
    command
        .args(["train", "--config"])
        .arg(config)
        .args(["--threads", "1", "--no-judge"])
        .args(extra);
    command
}

fn train(config: &Path, extra: &[&str]) -> Output {
    train_command(config, extra)
        .output()
        .expect("the deepeyes binary runs")
}

fn write_config(dir: &Path, extra: &str, steps: u64, every: u64) -> PathBuf {
    write_config_on(
        &repo().join("tests/data/datasets/vstar"),
        dir,
        extra,
        steps,
        every,
    )
}

/// [`write_config`] on the V* folder `data`.
fn write_config_on(data: &Path, dir: &Path, extra: &str, steps: u64, every: u64) -> PathBuf {
    let text = format!(
        r#"output-dir = "{out}"
steps = {steps}
{extra}
[data]
kind = "vstar"
paths = ["{data}"]

[model]
bundle = "{bundle}"

[rollout]
max-turns = 2
max-new-tokens = 4

[rollout.sampling]
temperature = 1.0

[batch]
prompts-per-step = 2
mini-batch-prompts = 2
micro-batch = 4

[grpo]
group-size = 2

[checkpoint]
every = {every}
"#,
        out = dir.join("run").display(),
        data = data.display(),
        bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle").display(),
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_prints_a_table_writes_metrics_and_bundles_that_eval_loads() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", 2, 1);
    let out = train(&config, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("step   reward"), "{stdout}");
    assert!(stdout.contains("trained 2 steps"), "{stdout}");
    let run = dir.path().join("run");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["trajectories"], 4);
    // The DeepEyes reward's terms are reported.
    assert!(first["reward_terms"]["accuracy"].is_number(), "{first}");
    assert!(
        run.join("checkpoints/step-00000001/model.safetensors")
            .is_file()
    );
    let bundle = run.join("final");
    assert!(bundle.join("weights.json").is_file());

    // The curves of the run draw.
    let plot = deepeyes(&["plot", run.to_str().unwrap()]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    assert!(run.join("plots/curves.png").is_file());

    // A checkpoint exports to a bundle without the training state.
    let exported = dir.path().join("exported");
    let out = deepeyes(&[
        "export",
        "--checkpoint",
        run.join("checkpoints/step-00000001").to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(exported.join("weights.json").is_file());
    assert!(!exported.join("optimizer.bpk").exists());

    let eval = deepeyes(&[
        "eval",
        "--model",
        bundle.to_str().unwrap(),
        "--bench",
        "vstar",
        "--data",
        repo().join("tests/data/datasets/vstar").to_str().unwrap(),
        "--out",
        dir.path().join("eval").to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--threads",
        "1",
    ]);
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    assert!(String::from_utf8_lossy(&eval.stdout).contains("vstar: 3 items"));
}

#[test]
fn an_unknown_config_key_is_refused_by_name_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "bogus-key = 1\n", 2, 1);
    let out = deepeyes(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bogus-key"), "{stderr}");
    assert!(
        !dir.path().join("run").exists(),
        "nothing is written for a bad config"
    );
}

/// The metrics of a run without the wall-clock fields.
fn metrics_without_times(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("time_"));
            v
        })
        .collect()
}

/// How long an uninterrupted run took: before its first step (start-up), and in all.
#[derive(Debug, Clone, Copy)]
struct RunTime {
    startup: std::time::Duration,
    total: std::time::Duration,
}

/// Metrics of an uninterrupted `steps`-step run of [`write_config`] with `extra` and a
/// checkpoint every `every` steps, and how long the run took.
fn uninterrupted(extra: &str, steps: u64, every: u64) -> (Vec<serde_json::Value>, RunTime) {
    let whole = tempfile::tempdir().unwrap();
    let config = write_config(whole.path(), extra, steps, every);
    let started = std::time::Instant::now();
    let out = train(&config, &[]);
    let total = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = whole.path().join("run");
    let in_steps: f64 = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["time_step_s"]
                .as_f64()
                .unwrap()
        })
        .sum();
    let startup = total.saturating_sub(std::time::Duration::from_secs_f64(in_steps));
    (metrics_without_times(&run), RunTime { startup, total })
}

/// Runs `config` to its end, SIGKILLed after a seeded random delay (drawn from `state`) again
/// and again: kills land mid-step and mid-checkpoint-write alike, and each restart resumes from
/// the newest intact checkpoint (or starts over when the first was never finished). Returns how
/// many kills it took.
fn run_with_kills(config: &Path, run: &Path, took: RunTime, state: &mut u64) -> usize {
    let mut kills = 0;
    loop {
        let has_checkpoint = std::fs::read_dir(run.join("checkpoints"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().join("manifest.json").is_file())
            })
            .unwrap_or(false);
        let mode = if has_checkpoint {
            "--resume"
        } else {
            "--overwrite"
        };
        let mut child = train_command(config, &[mode])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        // The start-up, then 10–60 % of the uninterrupted run's steps: steps and checkpoint
        // writes alike (a kill during start-up would only cost a start-up).
        let share = 0.1 + 0.5 * ((*state >> 11) as f64 / (1u64 << 53) as f64);
        std::thread::sleep(took.startup + (took.total - took.startup).mul_f64(share));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "run {kills} failed");
            return kills;
        }
        child.kill().unwrap();
        // The run may have ended between `try_wait` and the kill, which then finds it exited.
        if child.wait().unwrap().success() {
            return kills;
        }
        kills += 1;
        assert!(kills < 20, "the run never finished between kills");
    }
}

#[test]
fn runs_killed_at_random_moments_resume_exactly() {
    killed_runs_resume_exactly("");
}

/// The same for a LoRA run, whose checkpoints hold the adapter and whose base is reloaded.
#[test]
fn lora_runs_killed_at_random_moments_resume_exactly() {
    killed_runs_resume_exactly("[lora]\nrank = 4\nalpha = 8\ntarget-modules = \"all-linear\"\n");
}

/// Runs of [`write_config`] with `extra`, each killed at random moments and resumed until it
/// ends, each ending as the uninterrupted run did.
fn killed_runs_resume_exactly(extra: &str) {
    let steps = 4;
    let (want, took) = uninterrupted(extra, steps, 1);
    assert_eq!(want.len(), steps as usize);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    // Until a run has been killed at least twice (a resumed run near its end may finish before
    // its kill), each run from scratch in a fresh folder, and each must end as the
    // uninterrupted one did.
    let mut most = 0;
    for _ in 0..5 {
        let cut = tempfile::tempdir().unwrap();
        let config = write_config(cut.path(), extra, steps, 1);
        let run = cut.path().join("run");
        let kills = run_with_kills(&config, &run, took, &mut state);
        let got = metrics_without_times(&run);
        assert_eq!(
            got, want,
            "the run killed {kills} times differs from the uninterrupted one"
        );
        most = most.max(kills);
        if most >= 2 {
            break;
        }
    }
    assert!(
        most >= 2,
        "at most {most} kills per run: the delays are too long for this machine"
    );
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_and_the_previous_resumes_exactly() {
    let steps = 3;
    let (want, _) = uninterrupted("", steps, 1);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", steps, 1);
    let out = train(&config, &[]);
    assert!(out.status.success());
    let run = dir.path().join("run");
    let newest = run.join("checkpoints/step-00000003");
    let weights = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&weights, bytes).unwrap();

    // A fresh run refuses the folder; --resume says what it skipped and continues from step 2.
    let refused = train(&config, &[]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("holds an earlier run"), "{stderr}");
    let out = train(&config, &["--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000003") && stderr.contains("skipping a checkpoint"),
        "{stderr}"
    );
    assert_eq!(metrics_without_times(&run), want);
}

#[test]
fn resume_without_a_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", 2, 1);
    let out = deepeyes(&["train", "--config", config.to_str().unwrap(), "--resume"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no intact checkpoint in"), "{stderr}");
}

/// Trains with `config` (its output folder `run` under `dir`), which must succeed, and returns
/// the metrics file.
fn trained_metrics(config: &Path, dir: &Path) -> String {
    let out = train(config, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap()
}

#[test]
fn an_item_whose_image_does_not_decode_is_skipped_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = support::vstar_with_a_truncated_image(dir.path());
    let config = write_config_on(&data, dir.path(), "", 3, 0);
    let metrics = trained_metrics(&config, dir.path());
    let skipped: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| m.get("skipped_items").cloned())
        .collect();
    assert!(!skipped.is_empty(), "{metrics}");
    assert_eq!(skipped[0][0]["id"], "direct_attributes/sa_10001");
    // Every step still trained on a full batch of the items that do decode.
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(m["trajectories"], 4, "{line}");
    }
}

#[test]
fn questions_that_spell_special_tokens_train_like_any_other() {
    // Every question spells `<|image_pad|>` and `<|im_end|>`: each is asked as its characters,
    // so every step trains on its full batch, and the update reads the rollout's very token ids
    // (its log-probs agree with the rollout engine's).
    let dir = tempfile::tempdir().unwrap();
    let data = support::vstar_with_spelled_special_tokens(dir.path());
    let config = write_config_on(&data, dir.path(), "", 1, 0);
    let metrics = trained_metrics(&config, dir.path());
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(m["trajectories"], 4, "{m}");
    assert!(m.get("skipped_items").is_none(), "{m}");
    let diff = m["rollout_logprob_diff"].as_f64().unwrap();
    assert!(diff < 1e-2, "rollout and update disagree by {diff}: {m}");
}

/// [`write_config`] with rollouts on `servers` (`rollout-engine = "remote"`).
fn remote_config(dir: &Path, servers: &[&str], deterministic: bool, steps: u64) -> PathBuf {
    let path = write_config(dir, "", steps, 100);
    let urls: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[model]\n",
        &format!(
            "[model]\nrollout-engine = \"remote\"\nrollout-servers = [{}]\nrollout-deterministic = {deterministic}\n",
            urls.join(", ")
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("final/model.safetensors")).unwrap()
}

#[test]
fn remote_rollouts_on_two_servers_train_exactly_as_in_process_ones() {
    let bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle");
    let steps = 3;
    let local = tempfile::tempdir().unwrap();
    let out = train(&write_config(local.path(), "", steps, 100), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = support::ServeProcess::start(&bundle, &["--allow-weight-updates"], &[]);
    let second = support::ServeProcess::start(&bundle, &["--allow-weight-updates"], &[]);
    let remote = tempfile::tempdir().unwrap();
    let config = remote_config(remote.path(), &[&first.base, &second.base], true, steps);
    let out = train(&config, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local_run = local.path().join("run");
    let remote_run = remote.path().join("run");
    let metrics = metrics_without_times(&remote_run);
    assert_eq!(metrics.len(), steps as usize);
    assert_eq!(metrics, metrics_without_times(&local_run));
    assert!(
        final_weights(&remote_run) == final_weights(&local_run),
        "the final weights differ"
    );
    // Each server was told every step's weights.
    for server in [&first, &second] {
        let version: serde_json::Value = ureq::get(format!("{}/get_weight_version", server.base))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        assert_eq!(version["weight_version"], (steps - 1).to_string());
    }
}

#[test]
fn a_rollout_server_killed_mid_run_loses_no_step() {
    let bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle");
    let steps = 4;
    let first = support::ServeProcess::start(&bundle, &["--allow-weight-updates"], &[]);
    let mut second = support::ServeProcess::start(&bundle, &["--allow-weight-updates"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = remote_config(dir.path(), &[&first.base, &second.base], false, steps);
    let run = dir.path().join("run");
    let child = train_command(&config, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the second server once the first step is logged.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 1 {
        assert!(
            started.elapsed().as_secs() < 300,
            "no step within 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    second.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = metrics_without_times(&run);
    assert_eq!(metrics.len(), steps as usize, "every step was logged");
    for (k, m) in metrics.iter().enumerate() {
        assert_eq!(m["step"], k as u64, "{m}");
    }
}
