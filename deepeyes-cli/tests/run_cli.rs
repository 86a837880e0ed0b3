//! `deepeyes run` and `deepeyes doctor` end to end on the tiny random-weight Qwen2.5-VL bundle.
//!
//! They need the ONNX Runtime library (found via $ORT_DYLIB_PATH, the `.ort/` directory that
//! `scripts/setup_ort.sh` fills, or python3's onnxruntime) and fail, with that message, without it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-qwen2_5_vl")
}

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
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

#[test]
fn run_prints_the_episode_and_writes_a_replayable_trace() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = fixture().join("bundle");
    let sampled = |trace: &std::path::Path| {
        ok(&run_on_golden_image(
            &bundle,
            "What color is the disc?",
            &[
                "--max-turns",
                "2",
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.0",
                "--seed",
                "4",
                "--threads",
                "1",
                "--trace",
                trace.to_str().unwrap(),
            ],
        ))
    };
    let trace = dir.path().join("episode.json");
    let out = sampled(&trace);
    assert!(out.contains("question: What color is the disc?"), "{out}");
    assert!(out.contains("── turn 1 ──"), "{out}");
    assert!(out.contains("trace: "), "{out}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let turns = json["turns"].as_array().unwrap();
    assert!(!turns.is_empty());
    let t0 = &turns[0];
    let input = t0["input_token_ids"].as_array().unwrap();
    let generated = t0["generated_ids"].as_array().unwrap();
    let logprobs = t0["logprobs"].as_array().unwrap();
    assert!(input.len() > 50);
    assert!(!generated.is_empty() && generated.len() <= 12);
    assert_eq!(generated.len(), logprobs.len());
    assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    // image0.png is 140×170: a 12×10 patch grid, 30 image tokens.
    assert_eq!(t0["images"][0]["grid_thw"], serde_json::json!([1, 12, 10]));
    assert_eq!(t0["images"][0]["image_tokens"], 30);
    assert_eq!(json["model"]["provider"], "CPUExecutionProvider");

    // The same seed gives the same episode.
    let again = dir.path().join("again.json");
    sampled(&again);
    let json2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&again).unwrap()).unwrap();
    assert_eq!(json["turns"], json2["turns"]);
}

/// `deepeyes run` with `bundle`, `image`, `question` and `extra`.
fn run_episode(
    bundle: &std::path::Path,
    image: &std::path::Path,
    question: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "run",
        "--model",
        bundle.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--question",
        question,
    ];
    args.extend_from_slice(extra);
    deepeyes(&args)
}

/// `deepeyes run` on the golden image with `bundle`, `question` and `extra`.
fn run_on_golden_image(bundle: &std::path::Path, question: &str, extra: &[&str]) -> Output {
    run_episode(
        bundle,
        &fixture().join("golden/image0.png"),
        question,
        extra,
    )
}

/// The stderr of [`run_on_golden_image`], which must fail.
fn failed_run(bundle: &std::path::Path, extra: &[&str]) -> String {
    let out = run_on_golden_image(bundle, "?", extra);
    assert!(!out.status.success(), "{extra:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A copy of the fixture bundle whose `agent.toml` holds `agent`.
fn bundle_with_agent_limits(dir: &std::path::Path, agent: &str) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for entry in std::fs::read_dir(fixture().join("bundle")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
    }
    std::fs::write(bundle.join("agent.toml"), agent).unwrap();
    bundle
}

#[test]
fn a_bundles_agent_limits_apply_unless_the_command_line_overrides_them() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_with_agent_limits(
        dir.path(),
        "max-turns = 1\nmax-new-tokens = 3\nstop-at-tool-call-end = true\n",
    );
    let run = |bundle: &std::path::Path, name: &str, extra: &[&str]| {
        let trace = dir.path().join(name);
        let mut args = vec!["--threads", "1", "--trace", trace.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&run_on_golden_image(bundle, "?", &args));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
        json
    };
    let limits = |json: &serde_json::Value| {
        let agent = &json["agent"];
        (
            agent["max-turns"].as_u64().unwrap(),
            agent["max-new-tokens"].as_u64().unwrap(),
            agent["stop-at-tool-call-end"].as_bool().unwrap(),
        )
    };
    // No flags: the bundle's limits, and the model really ran under them.
    let from_bundle = run(&bundle, "bundle.json", &[]);
    assert_eq!(limits(&from_bundle), (1, 3, true));
    let turns = from_bundle["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 1);
    assert!(turns[0]["generated_ids"].as_array().unwrap().len() <= 3);
    // Flags win, the bare switch and an explicit false included.
    let given = run(
        &bundle,
        "given.json",
        &["--max-new-tokens", "5", "--stop-at-tool-call-end", "false"],
    );
    assert_eq!(limits(&given), (1, 5, false));
    assert_eq!(
        limits(&run(
            &bundle,
            "switch.json",
            &["--max-turns", "2", "--stop-at-tool-call-end"]
        )),
        (2, 3, true)
    );
    // Without an agent.toml, the command's own defaults.
    let plain = run(
        &fixture().join("bundle"),
        "plain.json",
        &["--max-new-tokens", "2"],
    );
    assert_eq!(limits(&plain), (5, 2, false));
}

#[test]
fn a_bad_agent_toml_is_an_error_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_with_agent_limits(dir.path(), "max-turns = 0\n");
    let err = failed_run(&bundle, &[]);
    assert!(
        err.contains("agent.toml") && err.contains("max-turns") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn doctor_reports_the_library_and_the_device() {
    let bundle = fixture().join("bundle");
    let out = ok(&deepeyes(&["doctor", "--model", bundle.to_str().unwrap()]));
    assert!(out.contains("library:"), "{out}");
    assert!(out.contains("libonnxruntime"), "{out}");
    assert!(out.contains("CPUExecutionProvider"), "{out}");
    assert!(out.contains("smoke test: prefill of"), "{out}");
    assert!(out.contains("GPU used: no"), "{out}");
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .arg("doctor")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/libonnxruntime.so: does not exist"),
        "{err}"
    );
    assert!(err.contains("scripts/setup_ort.sh"), "{err}");
}

#[test]
fn require_gpu_fails_without_one() {
    let err = failed_run(&fixture().join("bundle"), &["--require-gpu"]);
    assert!(err.contains("GPU"), "{err}");
}

/// The first turn's generated ids and log-probs of a greedy run of `bundle`.
fn first_turn(bundle: &std::path::Path, trace: &std::path::Path) -> serde_json::Value {
    ok(&run_on_golden_image(
        bundle,
        "What color is the disc?",
        &[
            "--max-turns",
            "1",
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
            "--trace",
            trace.to_str().unwrap(),
        ],
    ));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trace).unwrap()).unwrap();
    json["turns"][0]["logprobs"].clone()
}

/// A PEFT adapter (made by PEFT, `tests/data/lora/peft`) merged into the base bundle gives a
/// bundle `deepeyes run` answers with, and it runs the adapted weights, not the base's.
#[test]
fn export_merge_writes_a_bundle_that_runs_the_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture().join("bundle");
    let adapter = fixture().join("../lora/peft");
    let merged = dir.path().join("merged");
    let out = ok(&deepeyes(&[
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--bundle",
        base.to_str().unwrap(),
        "--merge",
        "--out",
        merged.to_str().unwrap(),
    ]));
    assert!(out.contains("loads on CPUExecutionProvider"), "{out}");
    let adapted = first_turn(&merged, &dir.path().join("merged.json"));
    let original = first_turn(&base, &dir.path().join("base.json"));
    assert!(adapted.as_array().is_some_and(|a| !a.is_empty()));
    assert_ne!(adapted, original, "the merged bundle runs the base weights");

    // An adapter alone is not a bundle: --merge is required, and a bad folder is named.
    let out = deepeyes(&[
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--bundle",
        base.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--merge"));
    let out = deepeyes(&[
        "export",
        "--adapter",
        dir.path().to_str().unwrap(),
        "--bundle",
        base.to_str().unwrap(),
        "--merge",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("adapter_config.json"),
        "{err}"
    );
}

/// A TinyEyes episode on SynthV* test item 0 sampled with `seed` (and `extra` arguments) and
/// traced: the zoom region of its first tool call (`x, y, width, height` in canvas pixels), if
/// it made one.
fn tinyeyes_zoom_region(
    bundle: &std::path::Path,
    image: &std::path::Path,
    seed: u64,
    extra: &[&str],
) -> Option<[f64; 4]> {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let question = "What colour is the dot on the small white card?\nOptions:\nA. green\nB. blue\nC. red\nD. black";
    let seed = seed.to_string();
    let mut args = vec!["--temperature", "1", "--seed", &seed, "--threads", "1"];
    args.extend_from_slice(&["--trace", trace.to_str().unwrap()]);
    args.extend_from_slice(extra);
    ok(&run_episode(bundle, image, question, &args));
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trace).unwrap()).unwrap();
    let region = &trace["turns"][0]["tool_calls"][0]["outcome"]["region"];
    let at = |k: &str| region[k].as_f64();
    Some([at("x")?, at("y")?, at("width")?, at("height")?])
}

/// A bundle's `tools.toml` is the tools configuration its commands use unless given one: the
/// same sampled zoom call is read in the `resized` frame (pixels of the model's 112 px view) by
/// TinyEyes' bundle and in the `relative` (0–1000) frame by a copy that carries
/// `frame = "relative"` (and no minimum side, since its boxes then shrink to a few pixels).
#[test]
fn a_bundles_tools_config_sets_the_frame_its_boxes_are_read_in() {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = dir.path().join("synthv");
    ok(&deepeyes(&[
        "synthv",
        "--out",
        data.to_str().unwrap(),
        "--train",
        "0",
        "--test",
        "1",
    ]));
    let image = data.join("images/test-00000.png");
    let original = repo.join("assets/tinyeyes");
    let relative = dir.path().join("relative");
    std::fs::create_dir_all(&relative).unwrap();
    for entry in std::fs::read_dir(&original).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), relative.join(entry.file_name())).unwrap();
    }
    std::fs::write(
        relative.join("tools.toml"),
        "[zoom-in]\nframe = \"relative\"\nmin-side = 0\n",
    )
    .unwrap();
    // The base zooms in about a fifth of its sampled answers.
    let (seed, region) = (0..40)
        .find_map(|s| tinyeyes_zoom_region(&original, &image, s, &[]).map(|r| (s, r)))
        .expect("a zoom within 40 sampled episodes");
    let read_relative = tinyeyes_zoom_region(&relative, &image, seed, &[]).expect("the same call");
    // The canvas is 1024 px a side and its view 112: the resized frame reads a coordinate v
    // as v · 1024 / 112 canvas pixels, the relative one as v · 1.024.
    for (o, r) in region.iter().zip(&read_relative) {
        assert!(
            (o * 112.0 / 1000.0 - r).abs() <= 1.5,
            "{region:?} read relative as {read_relative:?}"
        );
    }
    assert_ne!(region, read_relative);
    // The command line still overrides the bundle.
    let tools = dir.path().join("tools.toml");
    std::fs::write(&tools, "[zoom-in]\nframe = \"resized\"\n").unwrap();
    let overridden = tinyeyes_zoom_region(
        &relative,
        &image,
        seed,
        &["--tools-config", tools.to_str().unwrap()],
    );
    assert_eq!(overridden, Some(region));
}
