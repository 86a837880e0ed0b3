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
fn the_api_key_comes_from_the_named_variable() {
    let server = JudgeServer::answering("VERDICT: CORRECT");
    let mut config = fast(&server.url());
    config.api_key_env = Some("PATH".into());
    let judge = HttpJudge::new(config).unwrap();
    judge.verify(&request("a")).unwrap();
    let expected = format!("Bearer {}", std::env::var("PATH").unwrap());
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some(expected.as_str())
    );

    let mut missing = fast(&server.url());
    missing.api_key_env = Some("DEEPEYES_TEST_SURELY_UNSET_VARIABLE".into());
    let err = HttpJudge::new(missing).unwrap_err();
    assert!(
        err.to_string()
            .contains("DEEPEYES_TEST_SURELY_UNSET_VARIABLE"),
        "{err}"
    );
}
