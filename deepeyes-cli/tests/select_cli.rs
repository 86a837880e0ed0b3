//! `deepeyes select` on the SynthV* fixture with the tiny random-weight bundle: every item gets a
//! decision, the report's stages add up, and the kept rows are copied verbatim. Needs the ONNX
//! Runtime library (`scripts/setup_ort.sh`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn select_records_a_decision_per_item_and_a_consistent_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo().join("tests/data/datasets/synthv/synthv_mini.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args([
            "select",
            "--model",
            repo()
                .join("tests/data/tiny-qwen2_5_vl/bundle")
                .to_str()
                .unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            dir.path().to_str().unwrap(),
            "--k",
            "2",
            "--max-turns",
            "1",
            "--max-new-tokens",
            "4",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("always right (dropped)"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let n = |k: &str| report[k].as_u64().unwrap();
    let selections: Vec<Value> = std::fs::read_to_string(dir.path().join("selection.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(selections.len() as u64, n("items"));
    assert!(n("items") > 0);
    assert_eq!(
        n("always_right") + n("never_right") + n("mixed"),
        n("items")
    );
    assert!(n("kept") <= n("mixed"));
    for s in &selections {
        let correct = s["correct"].as_u64().unwrap();
        assert!(correct <= 2);
        let decision = s["decision"].as_str().unwrap();
        match correct {
            0 => assert_eq!(decision, "never-right"),
            2 => assert_eq!(decision, "always-right"),
            _ => assert_ne!(decision, "never-right"),
        }
    }
    // The kept rows, verbatim from the input.
    let input = std::fs::read_to_string(&data).unwrap();
    let kept = std::fs::read_to_string(dir.path().join("data.jsonl")).unwrap();
    assert_eq!(kept.lines().count() as u64, n("kept"));
    for line in kept.lines() {
        assert!(input.lines().any(|l| l == line));
    }
}
