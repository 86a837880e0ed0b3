//! `deepeyes train` end to end on the tiny random-weight bundle with the shipped DeepEyes reward,
//! then `deepeyes eval` on the bundle it wrote. Needs the ONNX Runtime library
//! (`scripts/setup_ort.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
        .output()
        .expect("the deepeyes binary runs")
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"output-dir = "{out}"
steps = 2
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
every = 1
"#,
        out = dir.join("run").display(),
        data = repo().join("tests/data/datasets/vstar").display(),
        bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle").display(),
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_prints_a_table_writes_metrics_and_bundles_that_eval_loads() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let out = deepeyes(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--threads",
        "1",
        "--no-judge",
    ]);
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
        run.join("checkpoints/step-000001/model.safetensors")
            .is_file()
    );
    let bundle = run.join("final");
    assert!(bundle.join("weights.json").is_file());

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
    let config = write_config(dir.path(), "bogus-key = 1\n");
    let out = deepeyes(&["train", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bogus-key"), "{stderr}");
    assert!(
        !dir.path().join("run").exists(),
        "nothing is written for a bad config"
    );
}
