//! `deepeyes eval` end to end: the tiny random-weight Qwen2.5-VL bundle through ONNX Runtime on
//! the V*-format fixture folder (three good items in two categories, four broken rows).
//!
//! Needs the ONNX Runtime library (`scripts/setup_ort.sh`).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

#[allow(dead_code)] // each test binary uses some of the shared fixtures
mod support;

use support::repo;

fn eval(out: &Path, extra: &[&str]) -> Output {
    eval_data(&repo().join("tests/data/datasets/vstar"), out, extra)
}

fn eval_data(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle");
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        bundle.display().to_string(),
        "--bench".into(),
        "vstar".into(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--max-turns".into(),
        "2".into(),
        "--max-new-tokens".into(),
        "6".into(),
        "--threads".into(),
        "1".into(),
        "--batch".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(&args)
        .output()
        .expect("the deepeyes binary runs")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn traces(dir: &Path) -> Vec<Value> {
    fs::read_to_string(dir.join("traces.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn eval_scores_a_vstar_folder_and_its_summary_agrees_with_the_traces() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let stdout = ok(&eval(
        &out,
        &["--samples", "2", "--temperature", "1.0", "--seed", "3"],
    ));
    assert!(stdout.contains("vstar: 3 items × 2 samples"), "{stdout}");
    assert!(stdout.contains("4 dataset rows skipped"), "{stdout}");

    let records = traces(&out);
    assert_eq!(records.len(), 3);
    let s = summary(&out);
    assert_eq!(s["items"], 3);
    assert_eq!(s["samples"], 2);
    assert_eq!(s["skipped_rows"], 4);
    assert_eq!(s["categories"]["direct_attributes"]["items"], 2);
    assert_eq!(s["categories"]["relative_position"]["items"], 1);
    // The overall score is the mean of the item scores, each the share of correct samples.
    let mut total = 0.0;
    let mut answers = 0;
    for r in &records {
        let samples = r["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        let correct = samples
            .iter()
            .filter(|s| s["verdict"]["correct"].as_bool().unwrap())
            .count();
        assert_eq!(r["score"].as_f64().unwrap(), correct as f64 / 2.0);
        total += r["score"].as_f64().unwrap();
        answers += samples.len();
        // The prompt shows the options with letters, and the trace records the shown order.
        let prompt = r["prompt"].as_str().unwrap();
        assert!(prompt.contains("Options:\nA. "), "{prompt}");
        let letter = r["correct_letter"].as_str().unwrap();
        let order: Vec<u64> = r["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let shown = order[(letter.as_bytes()[0] - b'A') as usize];
        assert_eq!(shown, 0, "V* stores the answer first");
    }
    assert!((s["overall"].as_f64().unwrap() - total / 3.0).abs() < 1e-12);
    let by: u64 = s["scored_by"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by as usize, answers, "every answer is accounted for");
}

#[test]
fn an_interrupted_eval_resumes_without_redoing_finished_items() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    ok(&eval(&full, &[]));
    let want = traces(&full);
    assert_eq!(want.len(), 3);

    // Simulate a kill: one finished item and half of the next line.
    let cut = dir.path().join("cut");
    fs::create_dir_all(&cut).unwrap();
    fs::copy(full.join("eval.json"), cut.join("eval.json")).unwrap();
    let text = fs::read_to_string(full.join("traces.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    let second = text.lines().nth(1).unwrap();
    fs::write(
        cut.join("traces.jsonl"),
        format!("{first}\n{}", &second[..second.len() / 2]),
    )
    .unwrap();
    let stderr = String::from_utf8(eval(&cut, &[]).stderr).unwrap();
    assert!(stderr.contains("resuming"), "{stderr}");
    let got = traces(&cut);
    assert_eq!(got.len(), 3);
    // Greedy decoding with per-item seeds: the resumed run gives the same records.
    let mut ids_want: Vec<&Value> = want.iter().collect();
    let mut ids_got: Vec<&Value> = got.iter().collect();
    ids_want.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
    ids_got.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
    assert_eq!(ids_got, ids_want);
    assert_eq!(summary(&cut)["overall"], summary(&full)["overall"]);

    // A finished eval started again does nothing new.
    ok(&eval(&cut, &[]));
    assert_eq!(traces(&cut).len(), 3);
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&eval(&out, &["--limit", "1"]));
    let again = eval(&out, &["--limit", "1", "--seed", "9"]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8(again.stderr).unwrap();
    assert!(stderr.contains("other settings"), "{stderr}");
    assert!(stderr.contains("eval.json"), "{stderr}");
}

#[test]
fn a_question_that_spells_special_tokens_is_asked_as_text() {
    // Once, `<|image_pad|>` in a question made a second image slot and stopped the whole
    // evaluation ("the prompt holds 2 image pads for 1 images"); since failed items are recorded
    // and skipped, the same bug would leave every item failed, so that is checked too.
    let dir = tempfile::tempdir().unwrap();
    let data = support::vstar_with_spelled_special_tokens(dir.path());
    let out = dir.path().join("out");
    let stdout = ok(&eval_data(&data, &out, &["--samples", "2"]));
    assert!(stdout.contains("vstar: 3 items × 2 samples"), "{stdout}");
    assert!(!stdout.contains("could not be evaluated"), "{stdout}");
    let traces = traces(&out);
    assert_eq!(traces.len(), 3);
    for trace in &traces {
        assert!(trace.get("failed").is_none(), "{trace}");
        let prompt = trace["prompt"].as_str().unwrap();
        assert!(prompt.contains(support::SPELLED_SPECIALS), "{prompt}");
        let samples = trace["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{trace}");
        assert!(
            samples
                .iter()
                .all(|s| s["generated_tokens"].as_u64() > Some(0))
        );
    }
    let s = summary(&out);
    assert_eq!(
        (s["items"].as_u64(), s["failed_items"].as_u64()),
        (Some(3), Some(0))
    );
}

#[test]
fn a_truncated_image_is_recorded_and_the_evaluation_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = support::vstar_with_a_truncated_image(dir.path());
    let out = dir.path().join("out");
    let stdout = ok(&eval_data(&data, &out, &[]));
    assert!(
        stdout.contains("1 items could not be evaluated"),
        "{stdout}"
    );
    let traces = traces(&out);
    let failed: Vec<&Value> = traces.iter().filter(|t| t["failed"].is_string()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["id"], "direct_attributes/sa_10001");
    assert!(
        failed[0]["failed"].as_str().unwrap().contains("sa_10001"),
        "the cause names the image: {}",
        failed[0]["failed"]
    );
    let s = summary(&out);
    assert_eq!(
        (s["items"].as_u64(), s["failed_items"].as_u64()),
        (Some(2), Some(1))
    );
    // Run again: nothing is retried, the failure stays recorded once.
    ok(&eval_data(&data, &out, &[]));
    assert_eq!(self::traces(&out).len(), 3);
}
