//! The TinyEyes commands as a user runs them: `synthv` writes splits the loaders read,
//! `pretrain-synthetic` trains a base and writes a runnable bundle from the committed TinyEyes
//! graphs, and `demo` runs its whole pipeline (base eval, GRPO, trained eval, curves, traced
//! episode) on that bundle. Needs the ONNX Runtime library (`scripts/setup_ort.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deepeyes(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "deepeyes {args:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn synthv_writes_splits_the_loaders_read() {
    let dir = tempfile::tempdir().unwrap();
    deepeyes(&[
        "synthv",
        "--out",
        path(dir.path()),
        "--train",
        "3",
        "--test",
        "2",
    ]);
    for (split, n) in [("train", 3), ("test", 2)] {
        let text = std::fs::read_to_string(dir.path().join(format!("{split}.jsonl"))).unwrap();
        let rows: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), n);
        for row in rows {
            assert!(dir.path().join(row["image"].as_str().unwrap()).is_file());
            // The bare question: readers render the options themselves.
            assert!(
                !row["question"].as_str().unwrap().contains("Options"),
                "{row}"
            );
            assert_eq!(row["options"].as_array().unwrap().len(), 4);
        }
    }
}

/// `--config` draws other canvases (here 2:1, and the search variant's decoys, listed in the
/// index); a misspelt key is refused with the file and the key named.
#[test]
fn synthv_config_draws_other_canvases_and_refuses_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    // The test split written with `config`: each row and its image.
    let rows = |name: &str, config: &str| -> Vec<(Value, image::DynamicImage)> {
        let out = dir.path().join(name);
        let config = format!("configs/synthv/{config}.toml");
        deepeyes(&[
            "synthv",
            "--out",
            path(&out),
            "--train",
            "0",
            "--test",
            "2",
            "--config",
            &config,
        ]);
        let text = std::fs::read_to_string(out.join("test.jsonl")).unwrap();
        text.lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).unwrap();
                let img = image::open(out.join(row["image"].as_str().unwrap())).unwrap();
                (row, img)
            })
            .collect()
    };
    for (row, img) in rows("wide", "wide-1536x768") {
        assert_eq!((img.width(), img.height()), (1536, 768));
        assert!(row.get("decoys").is_none(), "{row}");
    }
    for (row, _) in rows("search", "search") {
        let decoys = row["decoys"].as_array().unwrap();
        assert!((3..=5).contains(&decoys.len()), "{row}");
    }
    let out = dir.path().join("bad");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "canvas-min = 640\ncanvas-mx = 640\n").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(["synthv", "--out", path(&out), "--config", path(&bad)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("canvas-mx"),
        "{err}"
    );
}

#[test]
fn pretrain_then_demo_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let stdout = deepeyes(&[
        "pretrain-synthetic",
        "--out",
        path(&base),
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--batch-size",
        "4",
        "--pool-size",
        "6",
        "--bundle-template",
        "assets/tinyeyes",
    ]);
    assert!(stdout.contains("box IoU"), "{stdout}");
    let metrics = std::fs::read_to_string(base.join("base-metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 3);
    assert!(last["loss"].as_f64().unwrap().is_finite());
    let bundle = base.join("bundle");
    for file in [
        "model.safetensors",
        "decoder.onnx",
        "templates.toml",
        "agent.toml",
        "tokenizer.json",
    ] {
        assert!(bundle.join(file).is_file(), "{file}");
    }
    // The new weights differ from the template's: the bundle runs what was trained, with the
    // tokenizer it was trained with.
    assert_ne!(
        std::fs::read(bundle.join("model.safetensors")).unwrap(),
        std::fs::read(repo().join("assets/tinyeyes/model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(bundle.join("tokenizer.json")).unwrap(),
        std::fs::read(base.join("checkpoints/step-00000003/tokenizer.json")).unwrap()
    );

    let demo = dir.path().join("demo");
    let demo_in = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "demo",
            "--model",
            path(&bundle),
            "--out",
            path(out),
            "--steps",
            "1",
            "--train-items",
            "8",
            "--eval-items",
            "4",
        ];
        args.extend_from_slice(extra);
        deepeyes(&args)
    };
    let run_demo = |seed: &str| demo_in(&demo, &["--seed", seed]);
    let stdout = run_demo("0");
    for expected in [
        "held-out SynthV* (4 items, greedy)",
        "base",
        "trained",
        "one episode",
        "replay:   deepeyes run --model",
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(demo.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 1);
    assert_eq!(summary["base"]["items"], 4);
    assert_eq!(summary["trained"]["items"], 4);
    let metrics = std::fs::read_to_string(demo.join("train/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);
    assert!(demo.join("curves.png").is_file());
    assert!(demo.join("trace/input-with-zoom.png").is_file());
    assert!(demo.join("trace/input.png").is_file());

    // The replay line runs the traced episode again through `deepeyes run`, turn for turn.
    let replay = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("replay:"))
        .unwrap()
        .trim();
    let (command, question) = replay.split_once(" --question $'").unwrap();
    let question = question
        .strip_suffix('\'')
        .unwrap()
        .replace("\\n", "\n")
        .replace("\\'", "'");
    let mut args: Vec<&str> = command.split_whitespace().skip(1).collect();
    args.extend(["--question", &question]);
    let replayed = deepeyes(&args);
    let turns: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("model:"))
        .map(str::trim)
        .collect();
    assert!(!turns.is_empty(), "{stdout}");
    for turn in turns {
        assert!(replayed.contains(turn), "{turn:?} missing:\n{replayed}");
    }
    assert!(demo.join("train/final/templates.toml").is_file());

    // Data is reused only when it was written with the same settings.
    assert!(run_demo("0").contains("reusing the SynthV* data"));
    assert!(run_demo("1").contains("writing 8 training and 4 held-out"));

    // --lora: adapters on the frozen base; its checkpoints hold them as PEFT writes them.
    let lora = dir.path().join("demo-lora");
    let stdout = demo_in(&lora, &["--lora"]);
    assert!(stdout.contains("GRPO with LoRA adapters"), "{stdout}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["lora"], true);
    let checkpoints: Vec<_> = std::fs::read_dir(lora.join("train/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter_model.safetensors").is_file())
        .collect();
    assert!(!checkpoints.is_empty(), "no checkpoint holds the adapter");
}

#[test]
fn pretrain_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &Path, steps: &str, resume: bool| {
        let mut args = vec![
            "pretrain-synthetic",
            "--out",
            path(out),
            "--steps",
            steps,
            "--eval-every",
            "2",
            "--batch-size",
            "4",
            "--pool-size",
            "6",
        ];
        if resume {
            args.push("--resume");
        }
        deepeyes(&args);
    };
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    run(&whole, "4", false);
    // Stopped after step 2 (as a kill after the step-2 save leaves it), then resumed to 4.
    run(&split, "2", false);
    run(&split, "4", true);
    let weights =
        |d: &Path| std::fs::read(d.join("checkpoints/step-00000004/model.safetensors")).unwrap();
    assert!(weights(&whole) == weights(&split), "resumed weights differ");
    let metrics = |d: &Path| std::fs::read_to_string(d.join("base-metrics.jsonl")).unwrap();
    let (a, b) = (metrics(&whole), metrics(&split));
    let steps = |t: &str| {
        t.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&a), vec![2, 4]);
    assert_eq!(steps(&b), vec![2, 4]);
    let loss =
        |t: &str| serde_json::from_str::<Value>(t.lines().last().unwrap()).unwrap()["loss"].clone();
    assert_eq!(loss(&a), loss(&b));
}
