//! `deepeyes train` with an LLM judge on loopback: the start-up check, and a step's answers
//! scored concurrently. Needs the ONNX Runtime library (`scripts/setup_ort.sh`).

#[allow(dead_code)] // each test binary uses some of the shared fixtures
mod support;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The repository root.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A judge that lists one model and calls every answer correct after `delay`, recording how
/// many chat requests it had in flight at most.
#[derive(Default)]
struct Judge {
    chats: AtomicUsize,
    in_flight: AtomicUsize,
    most: AtomicUsize,
}

fn start_judge(delay: Duration) -> (String, Arc<Judge>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let judge = Arc::new(Judge::default());
    let shared = judge.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let judge = shared.clone();
            std::thread::spawn(move || serve(stream, &judge, delay));
        }
    });
    (url, judge)
}

fn serve(mut stream: TcpStream, judge: &Judge, delay: Duration) {
    let Some(request) = support::read_request(&stream) else {
        return;
    };
    let reply = if request.line.contains("/v1/models") {
        serde_json::json!({"data": [{"id": "train-judge"}]})
    } else {
        judge.chats.fetch_add(1, Ordering::SeqCst);
        let now = judge.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        judge.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(delay);
        judge.in_flight.fetch_sub(1, Ordering::SeqCst);
        serde_json::json!({"choices": [{"message": {"content": "VERDICT: CORRECT"}}]})
    }
    .to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

/// A URL where nothing listens.
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// A one-step training config on the V* fixture whose reward asks the judge at `url` about
/// every answer (rules off), with the `[judge]` lines `judge`.
fn write_config(dir: &Path, url: &str, judge: &str) -> PathBuf {
    let reward = format!(
        "version = 1\ndefault = 'acc'\n[rewards.acc]\ntype = 'accuracy'\nuse-rules = false\nmax-answer-chars = 0\n[judge]\nbase-url = '{url}'\nmax-retries = 0\nbackoff-initial-ms = 1\nbackoff-max-ms = 1\n{judge}\n"
    );
    std::fs::write(dir.join("reward.toml"), reward).unwrap();
    let text = format!(
        r#"output-dir = "{out}"
steps = 1
reward-file = "{reward}"
[data]
kind = "vstar"
paths = ["{data}"]

[model]
bundle = "{bundle}"

[rollout]
max-turns = 1
max-new-tokens = 4

[batch]
prompts-per-step = 2
mini-batch-prompts = 2
micro-batch = 4

[grpo]
group-size = 2
"#,
        out = dir.join("run").display(),
        reward = dir.join("reward.toml").display(),
        data = repo().join("tests/data/datasets/vstar").display(),
        bundle = repo().join("tests/data/tiny-qwen2_5_vl/bundle").display(),
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(["train", "--threads", "1", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("the deepeyes binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn train_refuses_to_start_when_the_judge_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let url = dead_url();
    let out = train(&write_config(dir.path(), &url, ""));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&url)
            && stderr.contains("does not answer")
            && stderr.contains("--no-judge")
            && stderr.contains("on-start-failure"),
        "{stderr}"
    );
    assert!(!dir.path().join("run/metrics.jsonl").exists());
}

#[test]
fn train_starts_without_the_judge_when_the_config_accepts_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &dead_url(),
        "on-start-failure = 'rule-fallback'",
    );
    let out = train(&config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    // Every answer was scored, by the flagged fallback.
    assert_eq!(
        step["reward_flags"]["judge_unavailable_rule_fallback"], 4,
        "{step}"
    );
}

#[test]
fn a_steps_answers_go_to_the_judge_concurrently() {
    let (url, judge) = start_judge(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let out = train(&write_config(dir.path(), &url, "max-concurrency = 4"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Two prompts, two answers each: four verdicts, not asked one at a time.
    assert_eq!(judge.chats.load(Ordering::SeqCst), 4);
    let most = judge.most.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "at most {most} in flight");
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(step["reward_flags"]["accuracy_by_judge"], 4, "{step}");
}
