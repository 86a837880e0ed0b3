//! `deepeyes reward` end to end: the built-in DeepEyes pipeline, bad rows, the output file, a
//! config file, and a loopback judge.

#[allow(dead_code)] // each test binary uses some of the shared fixtures
mod support;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const CROP: &str =
    "<tool_response><|vision_start|><|image_pad|><|image_pad|><|vision_end|></tool_response>";

/// Seven rows: line 3 is not JSON, line 5 lacks `response`, line 6 names an unrouted source.
fn input() -> String {
    let rows = [
        serde_json::json!({"id": "v1", "data_source": "vstar", "question": "What colour is the kite?", "ground_truth": "red",
            "response": format!("<think>small; zoom</think><tool_call>{{}}</tool_call>{CROP}<think>red</think><answer>Red</answer>")}).to_string(),
        serde_json::json!({"id": 2, "data_source": "chart", "question": "Which bar is tallest?\nA. 2019\nB. 2020", "ground_truth": "B",
            "response": "<think>look</think><answer>(A)</answer>"}).to_string(),
        "{\"id\": 3, \"data_source\": \"vstar\", oops".to_string(),
        serde_json::json!({"id": "m4", "data_source": "thinklite_eureka", "question": "3/6?", "ground_truth": 0.5,
            "response": "<think>halve</think>\\boxed{\\frac{1}{2}}"}).to_string(),
        serde_json::json!({"id": 5, "data_source": "vstar", "question": "q", "ground_truth": "x"}).to_string(),
        serde_json::json!({"id": 6, "data_source": "geoguessr", "question": "q", "ground_truth": "x", "response": "x"}).to_string(),
        serde_json::json!({"id": "v7", "data_source": "vstar", "question": "What is the man holding?", "ground_truth": "umbrella",
            "response": format!("{CROP}<answer>a parasol</answer>")}).to_string(),
    ];
    rows.join("\n") + "\n"
}

fn deepeyes(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run deepeyes")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn scores_rows_with_the_built_in_pipeline_and_skips_bad_rows() {
    // Run from an empty directory: the built-in config must not depend on the working directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();
    let out = deepeyes(&["reward", "--input", "in.jsonl", "--no-judge"], dir.path());
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    insta::assert_snapshot!("reward_rows_no_judge", stdout);
    for (line, why) in [
        (3, "not a valid row"),
        (5, "missing field `response`"),
        (6, "geoguessr"),
    ] {
        let report = stderr
            .lines()
            .find(|l| l.contains(&format!("in.jsonl line {line}:")))
            .unwrap_or_else(|| panic!("no report for line {line} in:\n{stderr}"));
        assert!(report.contains(why), "{report}");
    }
    assert_eq!(stdout.lines().count(), 4);

    // The same rows land in --output.
    let out = deepeyes(
        &[
            "reward",
            "--input",
            "in.jsonl",
            "--no-judge",
            "--output",
            "out.jsonl",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
        stdout
    );
}

#[test]
fn fail_on_bad_row_stops_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();
    let out = deepeyes(
        &[
            "reward",
            "--input",
            "in.jsonl",
            "--no-judge",
            "--fail-on-bad-row",
            "--output",
            "o.jsonl",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("in.jsonl line 3"), "{stderr}");
    assert!(!dir.path().join("o.jsonl").exists());
}

#[test]
fn a_config_file_replaces_the_built_in_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();
    let ablation = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/rewards/deepeyes-no-tool-bonus.toml"
    );
    let out = deepeyes(
        &[
            "reward",
            "--config",
            ablation,
            "--input",
            "in.jsonl",
            "--no-judge",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "v1");
    assert_eq!(first["total"], 0.8);
    assert!(
        first["terms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] != "tool")
    );

    std::fs::write(
        dir.path().join("bad.toml"),
        "version = 1\nrewards = {}\nsourcez = {}\n",
    )
    .unwrap();
    let out = deepeyes(
        &["reward", "--config", "bad.toml", "--input", "in.jsonl"],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("sourcez"),
        "{stderr}"
    );
}

/// A loopback judge that lists one model and calls every answer correct; it counts chat
/// requests.
fn judge_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let chats = Arc::new(AtomicUsize::new(0));
    let counter = chats.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(request) = support::read_request(&stream) else {
                continue;
            };
            let reply = if request.line.contains("/v1/models") {
                serde_json::json!({"data": [{"id": "cli-judge"}]})
            } else {
                counter.fetch_add(1, Ordering::SeqCst);
                serde_json::json!({"choices": [{"message": {"content": "VERDICT: CORRECT"}}]})
            }
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, chats)
}

#[test]
fn judge_url_sends_undecided_answers_to_the_judge() {
    let (url, chats) = judge_server();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();
    let out = deepeyes(
        &["reward", "--input", "in.jsonl", "--judge-url", &url],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Only "a parasol" vs "umbrella" needs the judge; the rules decide the rest.
    assert_eq!(chats.load(Ordering::SeqCst), 1);
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["id"], "v7");
    assert_eq!(last["total"], 2.0);
    assert_eq!(last["flags"], serde_json::json!(["accuracy_by_judge"]));
}

#[test]
fn a_dead_judge_fails_fast_with_a_hint() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cfg.toml"), format!(
        "version = 1\n[sources]\nvstar = 'v'\n[rewards.v]\ntype = 'deepeyes-visual'\n[judge]\nbase-url = '{url}'\nmax-retries = 1\nbackoff-initial-ms = 1\nbackoff-max-ms = 1\n"
    )).unwrap();
    std::fs::write(dir.path().join("in.jsonl"), input()).unwrap();
    let out = deepeyes(
        &["reward", "--config", "cfg.toml", "--input", "in.jsonl"],
        dir.path(),
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&url) && stderr.contains("--no-judge"),
        "{stderr}"
    );
}

/// A chat reply: status, extra header lines, body.
type ChatReply = (u16, &'static str, String);

/// A named way for a judge to fail.
type Scenario = (&'static str, fn() -> ChatReply);

/// What a loopback judge received: chat requests, and the Authorization headers it was sent.
#[derive(Default)]
struct Seen {
    chats: AtomicUsize,
    auth: std::sync::Mutex<Vec<String>>,
}

/// A loopback judge that lists one model and answers every chat request with `chat_reply`'s
/// status, extra headers and body.
fn scripted_judge(
    chat_reply: impl Fn() -> ChatReply + Send + Sync + 'static,
) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let record = seen.clone();
    let chat_reply = Arc::new(chat_reply);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (record, chat_reply) = (record.clone(), chat_reply.clone());
            std::thread::spawn(move || answer(stream, &record, chat_reply.as_ref()));
        }
    });
    (url, seen)
}

fn answer(
    mut stream: std::net::TcpStream,
    seen: &Seen,
    chat_reply: &(dyn Fn() -> ChatReply + Send + Sync),
) {
    let Some(request) = support::read_request(&stream) else {
        return;
    };
    for (name, value) in &request.headers {
        if name == "authorization" {
            seen.auth.lock().unwrap().push(value.clone());
        }
    }
    let (status, headers, reply) = if request.line.contains("/v1/models") {
        (
            200,
            "",
            serde_json::json!({"data": [{"id": "cli-judge"}]}).to_string(),
        )
    } else {
        seen.chats.fetch_add(1, Ordering::SeqCst);
        chat_reply()
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

/// `n` rows the rules cannot decide ("a parasol" vs "umbrella"): each needs the judge.
fn undecided_rows(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"id": i, "data_source": "vstar", "question": "What is the man holding?",
                "ground_truth": "umbrella", "response": format!("{CROP}<answer>a parasol {i}</answer>")})
            .to_string() + "\n"
        })
        .collect()
}

fn chat_content(content: &str) -> String {
    serde_json::json!({"choices": [{"message": {"content": content}}]}).to_string()
}

#[test]
fn a_judge_answering_garbage_loses_no_row_and_is_not_hammered() {
    let replies: [Scenario; 4] = [
        ("HTTP 500", || (500, "", "{\"error\": \"boom\"}".into())),
        ("not JSON", || (200, "", "<html>gateway</html>".into())),
        ("no verdict", || (200, "", chat_content("Hard to say."))),
        ("429", || {
            (
                429,
                "Retry-After: 1\r\n",
                "{\"error\": \"slow down\"}".into(),
            )
        }),
    ];
    for (what, reply) in replies {
        let (url, seen) = scripted_judge(reply);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), undecided_rows(20)).unwrap();
        let out = deepeyes(
            &[
                "reward",
                "--input",
                "in.jsonl",
                "--output",
                "out.jsonl",
                "--judge-url",
                &url,
                "--jobs",
                "2",
            ],
            dir.path(),
        );
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        let written = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 20, "{what}: every row is written\n{stderr}");
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row["id"], i, "{what}: input order");
            assert_eq!(
                row["flags"],
                serde_json::json!(["judge_unavailable_rule_fallback"]),
                "{what}: {row}"
            );
        }
        // The breaker opens after 5 failed attempts in a row; only a request already in flight
        // on the other job can follow. Without it: 20 rows x 5 attempts = 100 requests.
        let chats = seen.chats.load(Ordering::SeqCst);
        assert!(chats <= 5 + 2, "{what}: the judge saw {chats} requests");
        assert!(stderr.contains("circuit breaker open"), "{what}: {stderr}");
    }
}

#[test]
fn api_key_env_reads_only_variables_the_user_allows() {
    let (url, seen) = scripted_judge(|| (200, "", chat_content("VERDICT: CORRECT")));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), undecided_rows(1)).unwrap();
    let config = |var: &str| {
        format!(
            "version = 1\n[sources]\nvstar = 'v'\n[rewards.v]\ntype = 'deepeyes-visual'\n[judge]\nbase-url = '{url}'\napi-key-env = '{var}'\n"
        )
    };
    let run = |var: &str, extra: &[&str]| {
        std::fs::write(dir.path().join("cfg.toml"), config(var)).unwrap();
        let mut args = vec!["reward", "--config", "cfg.toml", "--input", "in.jsonl"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_deepeyes"))
            .args(&args)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("CLI_TEST_SECRET", "s3cret")
            .env("DEEPEYES_JUDGE_CLI_TEST_TOKEN", "t0ken")
            .stdin(Stdio::null())
            .output()
            .expect("run deepeyes")
    };

    // A config naming any other variable is refused before a request, naming it and the way out.
    let out = run("CLI_TEST_SECRET", &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("judge.api-key-env")
            && stderr.contains("CLI_TEST_SECRET")
            && stderr.contains("--allow-env CLI_TEST_SECRET")
            && stderr.contains("DEEPEYES_JUDGE_"),
        "{stderr}"
    );
    assert!(seen.auth.lock().unwrap().is_empty());
    assert_eq!(seen.chats.load(Ordering::SeqCst), 0);

    // Allowed on the command line: sent.
    let out = run("CLI_TEST_SECRET", &["--allow-env", "CLI_TEST_SECRET"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        seen.auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == "Bearer s3cret")
    );

    // The documented prefix needs no flag.
    seen.auth.lock().unwrap().clear();
    let out = run("DEEPEYES_JUDGE_CLI_TEST_TOKEN", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let auth = seen.auth.lock().unwrap().clone();
    assert!(
        !auth.is_empty() && auth.iter().all(|a| a == "Bearer t0ken"),
        "{auth:?}"
    );
}
