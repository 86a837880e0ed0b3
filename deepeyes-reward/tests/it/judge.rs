//! The HTTP judge against a loopback server: replies, outages, slowness, garbage, cache,
//! model detection and the concurrency limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deepeyes_reward::judge::{
    AttemptError, HttpJudge, JudgeConfig, JudgeError, JudgeRequest, PromptSpec, Verifier,
};

use crate::server::{JudgeServer, Reply, chat, dead_url, models};

/// A judge config with test-sized timeouts and backoffs.
fn fast(url: &str) -> JudgeConfig {
    JudgeConfig::new(url)
        .with_model("judge-model")
        .with_timeout(Duration::from_millis(1500))
        .with_retries(2, Duration::from_millis(5), Duration::from_millis(20))
}

fn request<'a>(prediction: &'a str) -> JudgeRequest<'a> {
    JudgeRequest {
        prompt: "visual",
        question: "What colour is the kite?",
        reference: "red",
        prediction,
    }
}

#[test]
fn a_correct_reply_is_a_verdict_and_the_request_is_well_formed() {
    let server = JudgeServer::answering("VERDICT: CORRECT");
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let verdict = judge.verify(&request("crimson")).unwrap();
    assert!(verdict.correct);
    assert_eq!((verdict.attempts, verdict.cached), (1, false));
    assert_eq!(verdict.raw_reply, "VERDICT: CORRECT");

    let sent = server.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].path, "/v1/chat/completions");
    let body = sent[0].json();
    assert_eq!(body["model"], "judge-model");
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["messages"][0]["role"], "system");
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert!(user.contains("What colour is the kite?"), "{user}");
    assert!(user.contains("<<<\ncrimson\n>>>"), "{user}");
    assert!(user.contains("Reference answer:\nred"), "{user}");
    assert_eq!(judge.stats().verdicts, 1);
}

#[test]
fn an_incorrect_reply_and_overridden_prompts() {
    let server = JudgeServer::answering("Judgement: 0");
    let spec = PromptSpec {
        template: Some("Q={question} R={reference} P={prediction}".into()),
        temperature: Some(0.3),
        marker: Some("Judgement:".into()),
        system: Some("sys".into()),
    };
    let judge = HttpJudge::new(fast(&server.url()).with_prompt("visual", spec)).unwrap();
    assert!(!judge.verify(&request("blue")).unwrap().correct);
    let body = server.requests()[0].json();
    assert_eq!(body["messages"][0]["content"], "sys");
    assert_eq!(
        body["messages"][1]["content"],
        "Q=What colour is the kite? R=red P=blue"
    );
    assert_eq!(body["temperature"], 0.3);
}

#[test]
fn the_model_is_detected_once_from_v1_models() {
    let server = JudgeServer::start(|req, _| {
        if req.path == "/v1/models" {
            models(&["auto-first", "auto-second"])
        } else {
            chat("VERDICT: CORRECT")
        }
    });
    let mut config = fast(&format!("{}/v1/", server.url()));
    config.model = None;
    let judge = HttpJudge::new(config).unwrap();
    judge.verify(&request("a")).unwrap();
    judge.verify(&request("b")).unwrap();
    assert_eq!(server.count("/v1/models"), 1);
    let chats: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .collect();
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|r| r.json()["model"] == "auto-first"));
    assert_eq!(judge.resolve_model().unwrap(), "auto-first");
}

#[test]
fn an_empty_model_list_is_retried_then_reported() {
    let server = JudgeServer::start(|_, _| models(&[]));
    let mut config = fast(&server.url());
    config.model = None;
    let judge = HttpJudge::new(config).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            err,
            JudgeError::Exhausted {
                attempts: 3,
                last: AttemptError::NoModel,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.count("/v1/models"), 3);
    assert_eq!(server.chat_requests(), 0);
}

#[test]
fn connection_refused_is_retried_a_bounded_number_of_times() {
    let url = dead_url();
    let judge = HttpJudge::new(fast(&url)).unwrap();
    let started = Instant::now();
    let err = judge.verify(&request("a")).unwrap_err();
    match &err {
        JudgeError::Exhausted {
            url: at,
            attempts,
            last,
        } => {
            assert!(at.starts_with(&url), "{at}");
            assert_eq!(*attempts, 3);
            assert!(matches!(last, AttemptError::Transport(_)), "{last}");
        }
        other => panic!("expected exhaustion, got {other}"),
    }
    let stats = judge.stats();
    assert_eq!((stats.requests, stats.retries, stats.failures), (3, 2, 1));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn server_errors_are_retried_until_the_judge_recovers() {
    let server = JudgeServer::start(|_, n| {
        if n < 2 {
            Reply::Body(503, "{\"error\": \"overloaded\"}".into())
        } else {
            chat("VERDICT: CORRECT")
        }
    });
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let verdict = judge.verify(&request("a")).unwrap();
    assert!(verdict.correct);
    assert_eq!(verdict.attempts, 3);
    assert_eq!(server.chat_requests(), 3);
    assert_eq!(judge.stats().retries, 2);
}

#[test]
fn persistent_500s_exhaust_the_retries() {
    let server = JudgeServer::start(|_, _| Reply::Body(500, "internal".into()));
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            &err,
            JudgeError::Exhausted {
                attempts: 3,
                last: AttemptError::Status { status: 500, .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.chat_requests(), 3);
    assert!(err.to_string().contains("internal"), "{err}");
}

#[test]
fn client_errors_are_not_retried() {
    let server =
        JudgeServer::start(|_, _| Reply::Body(404, "{\"error\": \"model not found\"}".into()));
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(&err, JudgeError::Rejected { status: 404, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("model not found"), "{err}");
    assert_eq!(server.chat_requests(), 1);
}

#[test]
fn a_slow_judge_times_out_each_attempt() {
    let server = JudgeServer::start(|_, _| {
        Reply::After(Duration::from_secs(3), Box::new(chat("VERDICT: CORRECT")))
    });
    let config = fast(&server.url())
        .with_timeout(Duration::from_millis(150))
        .with_retries(1, Duration::from_millis(5), Duration::from_millis(5));
    let judge = HttpJudge::new(config).unwrap();
    let started = Instant::now();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            &err,
            JudgeError::Exhausted {
                attempts: 2,
                last: AttemptError::Timeout(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.chat_requests(), 2);
    // Two attempts of 150 ms, not one wait for the 3 s reply.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_dropped_connection_is_a_transport_error() {
    let server = JudgeServer::start(|_, _| Reply::Close);
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            &err,
            JudgeError::Exhausted {
                attempts: 3,
                last: AttemptError::Transport(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_json_is_retried_then_reported() {
    let server = JudgeServer::start(|_, n| match n {
        0 => Reply::Body(200, "not json {".into()),
        1 => Reply::Body(200, "{\"choices\": []}".into()),
        _ => Reply::Body(
            200,
            "{\"choices\": [{\"message\": {\"content\": null}}]}".into(),
        ),
    });
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            &err,
            JudgeError::Exhausted {
                attempts: 3,
                last: AttemptError::Malformed(_),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(server.chat_requests(), 3);
}

#[test]
fn a_garbage_verdict_is_retried_and_a_later_clear_one_wins() {
    let server = JudgeServer::start(|_, n| {
        if n == 0 {
            chat("Well, it depends on the lighting.")
        } else {
            chat("VERDICT: INCORRECT")
        }
    });
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let verdict = judge.verify(&request("a")).unwrap();
    assert!(!verdict.correct);
    assert_eq!(verdict.attempts, 2);

    let garbage = JudgeServer::answering("banana");
    let judge = HttpJudge::new(fast(&garbage.url())).unwrap();
    let err = judge.verify(&request("a")).unwrap_err();
    match err {
        JudgeError::Exhausted {
            last: AttemptError::Unparseable { reply },
            attempts: 3,
            ..
        } => assert_eq!(reply, "banana"),
        other => panic!("expected an unparseable verdict, got {other}"),
    }
}

#[test]
fn cached_verdicts_make_no_request_even_after_a_restart() {
    let server = JudgeServer::answering("VERDICT: CORRECT");
    let dir = tempfile::tempdir().unwrap();
    let config = fast(&server.url()).with_cache_dir(dir.path());
    {
        let judge = HttpJudge::new(config.clone()).unwrap();
        let first = judge.verify(&request("scarlet")).unwrap();
        assert!(!first.cached);
        let second = judge.verify(&request("scarlet")).unwrap();
        assert!(second.cached && second.correct);
        assert_eq!(second.attempts, 0);
        assert_eq!(server.chat_requests(), 1);
        assert_eq!(judge.stats().cache_hits, 1);
    }
    let judge = HttpJudge::new(config).unwrap();
    assert!(judge.verify(&request("scarlet")).unwrap().cached);
    assert_eq!(server.chat_requests(), 1);
    // A different prediction, or another prompt, is another key.
    judge.verify(&request("maroon")).unwrap();
    let math = JudgeRequest {
        prompt: "math",
        ..request("scarlet")
    };
    judge.verify(&math).unwrap();
    assert_eq!(server.chat_requests(), 3);
    assert_eq!(judge.cache().unwrap().len(), 3);
}

#[test]
fn failed_verdicts_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let judge = HttpJudge::new(fast(&dead_url()).with_cache_dir(dir.path())).unwrap();
    assert!(judge.verify(&request("a")).is_err());
    assert!(judge.cache().unwrap().is_empty());
}

#[test]
fn the_concurrency_limit_holds_across_threads() {
    let server = JudgeServer::start(|_, _| {
        Reply::After(
            Duration::from_millis(60),
            Box::new(chat("VERDICT: CORRECT")),
        )
    });
    let judge = Arc::new(HttpJudge::new(fast(&server.url()).with_max_concurrency(2)).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let judge = judge.clone();
            std::thread::spawn(move || {
                let prediction = format!("answer {i}");
                judge.verify(&request(&prediction)).map(|v| v.correct)
            })
        })
        .collect();
    for handle in handles {
        assert!(handle.join().unwrap().unwrap());
    }
    assert_eq!(server.chat_requests(), 8);
    assert!(server.max_in_flight() <= 2, "{}", server.max_in_flight());
    assert!(server.max_in_flight() >= 1);
}

#[test]
fn the_api_key_comes_from_an_allowed_variable_only() {
    let server = JudgeServer::answering("VERDICT: CORRECT");
    // PATH is neither DEEPEYES_JUDGE_* nor allowed: refused before any request, naming it.
    let err = HttpJudge::new(fast(&server.url()).with_api_key_env("PATH")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("PATH") && text.contains("--allow-env PATH"),
        "{text}"
    );
    assert!(server.requests().is_empty());

    let allowed = fast(&server.url())
        .with_api_key_env("PATH")
        .allow_env(["PATH"]);
    let judge = HttpJudge::new(allowed).unwrap();
    judge.verify(&request("a")).unwrap();
    let expected = format!("Bearer {}", std::env::var("PATH").unwrap());
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some(expected.as_str())
    );

    let missing = fast(&server.url()).with_api_key_env("DEEPEYES_JUDGE_SURELY_UNSET_VARIABLE");
    let err = HttpJudge::new(missing).unwrap_err();
    assert!(
        err.to_string()
            .contains("DEEPEYES_JUDGE_SURELY_UNSET_VARIABLE is not set"),
        "{err}"
    );
}

#[test]
fn the_breaker_stops_asking_a_failing_judge_and_probes_after_the_cooldown() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let server = JudgeServer::start(move |_, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            chat("VERDICT: CORRECT")
        } else {
            Reply::Body(500, "down".into())
        }
    });
    let config = fast(&server.url()).with_breaker(4, Duration::from_secs(1));
    let judge = HttpJudge::new(config).unwrap();
    let errors: Vec<JudgeError> = (0..20)
        .map(|i| judge.verify(&request(&format!("answer {i}"))).unwrap_err())
        .collect();
    // 3 attempts for the first answer, 1 for the second opens the breaker; the other 18 are not
    // sent at all (without the breaker: 60 requests and 40 backoffs).
    assert_eq!(server.chat_requests(), 4);
    assert!(
        matches!(errors[0], JudgeError::Exhausted { attempts: 3, .. }),
        "{}",
        errors[0]
    );
    for err in &errors[2..] {
        assert!(
            matches!(err, JudgeError::CircuitOpen { failures: 4, .. }),
            "{err}"
        );
    }
    assert!(errors[5].to_string().contains("circuit breaker open"));
    assert_eq!(judge.stats().short_circuited, 19);

    // After the cool-down one probe goes; the judge is back, so the breaker closes.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(judge.verify(&request("back")).unwrap().correct);
    assert!(judge.verify(&request("again")).unwrap().correct);
    assert_eq!(server.chat_requests(), 6);
}

#[test]
fn retry_after_is_honoured_up_to_the_backoff_cap() {
    let retry_after = |seconds: &str| {
        Reply::WithHeaders(
            429,
            vec![("Retry-After".into(), seconds.into())],
            "{\"error\": \"slow down\"}".into(),
        )
    };
    let server = JudgeServer::start(move |_, n| {
        if n == 0 {
            retry_after("1")
        } else {
            chat("VERDICT: CORRECT")
        }
    });
    let config =
        fast(&server.url()).with_retries(2, Duration::from_millis(1), Duration::from_millis(5000));
    let judge = HttpJudge::new(config).unwrap();
    let started = Instant::now();
    let verdict = judge.verify(&request("a")).unwrap();
    assert_eq!(verdict.attempts, 2);
    // The backoff alone would have waited about 1 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );

    // An hour is capped at backoff-max-ms (20 ms in `fast`).
    let server = JudgeServer::start(move |_, _| retry_after("3600"));
    let judge = HttpJudge::new(fast(&server.url())).unwrap();
    let started = Instant::now();
    let err = judge.verify(&request("a")).unwrap_err();
    assert!(
        matches!(
            &err,
            JudgeError::Exhausted {
                attempts: 3,
                last: AttemptError::Status {
                    status: 429,
                    retry_after: Some(_),
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The cache key of a comparison as it was computed before the model was part of it.
fn v1_key(question: &str, reference: &str, prediction: &str) -> String {
    use sha2::{Digest, Sha256};
    let prompt = deepeyes_reward::judge::JudgePrompt::builtin("visual").unwrap();
    let mut hasher = Sha256::new();
    hasher.update(b"deepeyes-judge-cache-v1");
    for part in [
        prompt.system.as_str(),
        prompt.template.as_str(),
        question,
        reference,
        prediction,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

#[test]
fn the_cache_keeps_each_models_verdicts_apart_and_ignores_keys_without_a_model() {
    let server = JudgeServer::start(|req, _| {
        // Each model has its own opinion.
        if req.json()["model"] == "strict" {
            chat("VERDICT: INCORRECT")
        } else {
            chat("VERDICT: CORRECT")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // A verdict cached by an older build, under a key without the model, saying "incorrect".
    let old = serde_json::json!({
        "key": v1_key("What colour is the kite?", "red", "crimson"),
        "correct": false, "raw_reply": "VERDICT: INCORRECT", "model": "strict", "prompt": "visual",
    });
    std::fs::write(
        dir.path().join(deepeyes_reward::judge::CACHE_FILE),
        format!("{old}\n"),
    )
    .unwrap();

    let lenient = HttpJudge::new(fast(&server.url()).with_cache_dir(dir.path())).unwrap();
    let first = lenient.verify(&request("crimson")).unwrap();
    assert!(first.correct && !first.cached, "the old entry was served");
    assert!(lenient.verify(&request("crimson")).unwrap().cached);
    assert_eq!(server.chat_requests(), 1);

    let mut strict_config = fast(&server.url()).with_cache_dir(dir.path());
    strict_config.model = Some("strict".into());
    let strict = HttpJudge::new(strict_config).unwrap();
    let verdict = strict.verify(&request("crimson")).unwrap();
    assert!(!verdict.correct && !verdict.cached);
    assert!(strict.verify(&request("crimson")).unwrap().cached);
    assert_eq!(server.chat_requests(), 2);
    // Both models' verdicts and the old line stay in the file.
    let lines = std::fs::read_to_string(dir.path().join(deepeyes_reward::judge::CACHE_FILE))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 3);
}
