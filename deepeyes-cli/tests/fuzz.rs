//! Fuzzing: at least a million generated inputs for every parser that a model's output, a data
//! set or a config file feeds, checking that none of them panics (errors are fine: they are the
//! clear refusals the parsers exist to give). Kept out of CI (`#[ignore]`: minutes, not seconds):
//!
//! ```text
//! cargo test --workspace --release --test fuzz -- --ignored --test-threads 2 --nocapture
//! FUZZ_CASES=10000 cargo test --workspace --test fuzz -- --ignored   # a quick look
//! ```
//!
//! `FUZZ_CASES` (default 1,000,000) is the number of inputs per target: texts for the turn
//! parser, boxes for bbox resolution, answer pairs for the reward rules, rows for the dataset
//! readers, config texts for the config loaders. Each target prints how many it ran. Inputs
//! are built from the pieces that matter to each parser (markers, JSON and LaTeX fragments,
//! special tokens, extreme numbers) mixed with arbitrary Unicode, and the configs are mutations
//! of the real ones, so most inputs reach deep into the parsers instead of failing at byte 1.

use std::sync::atomic::{AtomicU64, Ordering};

use deepeyes_core::PreprocessConfig;
use deepeyes_core::dataset::{ItemReader, JsonlReader, JsonlSchema, LoadOptions};
use deepeyes_core::protocol::{CallSelection, extract_answer, parse_tool_call, parse_turn};
use deepeyes_reward::rules::{self, Tolerance};
use deepeyes_tools::geometry::{CoordinateFrame, ZoomLimits, parse_bbox, resolve_bbox};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u64 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Runs `check` on `total` inputs of `strategy` (each input may stand for `per_input` of
/// them), failing on the first panic with the input, shrunk; prints the count.
fn fuzz<S: Strategy>(name: &str, per_input: u64, strategy: S, check: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let ran = AtomicU64::new(0);
    let runs = cases().div_ceil(per_input);
    let mut runner = TestRunner::new(Config {
        cases: u32::try_from(runs).unwrap_or(u32::MAX),
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        check(input);
        ran.fetch_add(per_input, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{name}: {} inputs, no panic", ran.load(Ordering::Relaxed));
    }
}

/// Text made of `pieces` and arbitrary characters, up to `len` of them.
fn soup(pieces: &'static [&'static str], len: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => proptest::sample::select(pieces).prop_map(str::to_string),
        1 => any::<char>().prop_map(String::from),
        1 => "[ -~]{0,6}",
    ];
    proptest::collection::vec(piece, 0..len).prop_map(|v| v.concat())
}

const TURN_PIECES: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\",
    "\"name\"",
    "\"arguments\"",
    "\"image_zoom_in_tool\"",
    "\"bbox_2d\"",
    "\"label\"",
    "1",
    "-7.5",
    "1e309",
    "NaN",
    "null",
    "true",
    " ",
    "\n",
    "<|im_end|>",
    "<|image_pad|>",
    "\\boxed{",
    "é",
    "\u{0}",
];

#[test]
#[ignore = "fuzzing: minutes; run by hand (see the module docs)"]
fn fuzz_turn_parser() {
    fuzz("turn parser", 1, soup(TURN_PIECES, 40), |text| {
        for selection in [
            CallSelection::First,
            CallSelection::Last,
            CallSelection::All,
        ] {
            let _ = parse_turn(&text, selection);
        }
        let _ = parse_tool_call(&text);
        let _ = extract_answer(&text);
    });
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        -2000.0..4000.0f64,
        -2.0..2.0f64,
        proptest::sample::select(&[0.0, -0.0, 1.0, f64::MIN_POSITIVE, 1e300, -1e300][..]),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        number().prop_map(
            |x| serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, Into::into)
        ),
        any::<i64>().prop_map(Into::into),
        "[ -~]{0,8}".prop_map(serde_json::Value::String),
        any::<bool>().prop_map(serde_json::Value::Bool),
        Just(serde_json::Value::Null),
    ];
    leaf.prop_recursive(3, 16, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                proptest::sample::select(&["bbox_2d", "bbox", "label", "x"][..])
                    .prop_map(str::to_string),
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
#[ignore = "fuzzing: minutes; run by hand (see the module docs)"]
fn fuzz_bbox_resolution() {
    let frames = [
        CoordinateFrame::Original,
        CoordinateFrame::Resized,
        CoordinateFrame::Relative,
        CoordinateFrame::RelativeUnit,
    ];
    let size = prop_oneof![0u32..4, 1u32..5000, Just(u32::MAX)];
    let strategy = (
        json_value(),
        [number(), number(), number(), number()],
        proptest::sample::select(frames.to_vec()),
        size.clone(),
        size,
    );
    let (preprocess, limits) = (PreprocessConfig::default(), ZoomLimits::default());
    fuzz(
        "bbox resolution",
        1,
        strategy,
        |(args, bbox, frame, w, h)| {
            let _ = parse_bbox(&args);
            let _ = parse_bbox(&serde_json::json!({ "bbox_2d": bbox }));
            let _ = resolve_bbox(bbox, frame, w, h, &preprocess, &limits);
        },
    );
}

const ANSWER_PIECES: &[&str] = &[
    "\\frac{",
    "\\dfrac",
    "}",
    "{",
    "\\sqrt",
    "^",
    "_",
    "1",
    "2.5",
    "-",
    "+",
    "*",
    "/",
    "(",
    ")",
    "\\pi",
    "x",
    "=",
    "\\left(",
    "\\right)",
    "%",
    "\\%",
    "A",
    "B",
    "(C)",
    "D.",
    "yes",
    "No",
    "\\boxed{",
    "\\text{",
    "e",
    ".",
    ",",
    " ",
    "1,000",
    "1e400",
    "0.",
    "\\infty",
    "\\cdot",
    "\\times",
    "{{{{{{{{",
    "}}}}}}}}",
    "((((((((",
    "\n",
    "(A) red\n(B) blue\n",
];

#[test]
#[ignore = "fuzzing: minutes; run by hand (see the module docs)"]
fn fuzz_reward_rules() {
    let strategy = (
        soup(ANSWER_PIECES, 30),
        soup(ANSWER_PIECES, 12),
        soup(ANSWER_PIECES, 16),
    );
    fuzz(
        "reward rules",
        1,
        strategy,
        |(prediction, reference, question)| {
            let _ = rules::visual_answer(&prediction, &reference, &question, Tolerance::default());
            let _ = rules::math_answer(&prediction, &reference);
            let _ = rules::evaluate(&prediction);
            let _ = rules::normalize_latex(&prediction);
            let _ = rules::numbers_in(&prediction);
        },
    );
}

/// One JSONL row: an object with the keys the readers look at, holding values of any type, or
/// a line of anything.
fn jsonl_row() -> impl Strategy<Value = String> {
    const KEYS: &[&str] = &[
        "id",
        "question",
        "image",
        "images",
        "options",
        "answer",
        "answer_index",
        "bbox",
        "bboxes",
        "labels",
        "data_source",
        "category",
    ];
    let value = prop_oneof![
        3 => json_value(),
        1 => proptest::sample::select(&["images/a.png", "../x.png", "/etc/hostname", "", "a"][..])
            .prop_map(|s| serde_json::Value::String(s.into())),
    ];
    let object = proptest::collection::btree_map(proptest::sample::select(KEYS), value, 0..9)
        .prop_map(|m| {
            serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                .to_string()
        });
    prop_oneof![4 => object, 1 => soup(TURN_PIECES, 12).prop_map(|s| s.replace('\n', " "))]
}

const ROWS_PER_FILE: u64 = 2_000;

#[test]
#[ignore = "fuzzing: minutes; run by hand (see the module docs)"]
fn fuzz_dataset_rows() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let path = dir.path().join("rows.jsonl");
    let rows = proptest::collection::vec(jsonl_row(), ROWS_PER_FILE as usize);
    fuzz("dataset rows", ROWS_PER_FILE, rows, |rows| {
        std::fs::write(&path, rows.join("\n")).unwrap();
        for schema in [JsonlSchema::Generic, JsonlSchema::SynthV] {
            let mut reader = JsonlReader::open(&path, schema, &LoadOptions::default()).unwrap();
            for row in &mut reader {
                let _ = row;
            }
            let _ = reader.summary();
        }
    });
}

/// `base` with a few random edits: lines dropped or repeated, values replaced by extreme or
/// wrongly typed ones, keys and table headers inserted.
fn mutated(base: &'static str) -> impl Strategy<Value = String> {
    const VALUES: &[&str] = &[
        "-1",
        "0",
        "1e309",
        "nan",
        "inf",
        "-inf",
        "\"\"",
        "[]",
        "{}",
        "true",
        "\"x\"",
        "99999999999999999999",
        "[1, \"a\"]",
        "-0.0",
        "0.5",
        "[[]]",
        "{ a = 1 }",
        "\"../..\"",
    ];
    let lines: Vec<&'static str> = base.lines().collect();
    let keys: Vec<String> = lines
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .collect();
    let n = lines.len();
    let edit = (
        0..5u8,
        0..n,
        proptest::sample::select(VALUES),
        proptest::sample::select(keys),
    );
    proptest::collection::vec(edit, 0..6).prop_map(move |edits| {
        let mut out: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
        for (kind, at, value, key) in edits {
            let at = at.min(out.len().saturating_sub(1));
            match kind {
                0 if !out.is_empty() => {
                    out.remove(at);
                }
                1 if !out.is_empty() => {
                    let line = out[at].clone();
                    out.insert(at, line);
                }
                2 => {
                    if let Some((k, _)) = out.get(at).and_then(|l| l.split_once('=')) {
                        out[at] = format!("{k}= {value}");
                    }
                }
                3 => out.insert(at, format!("{key} = {value}")),
                _ => out.insert(at, format!("[{key}]")),
            }
        }
        out.join("\n")
    })
}

const TRAIN_CONFIG: &str = include_str!("../../configs/train/example.toml");
const REWARD_CONFIG: &str = include_str!("../../configs/rewards/deepeyes.toml");
const TEMPLATES: &str = include_str!("../../assets/tinyeyes/templates.toml");
const AGENT: &str = include_str!("../../assets/tinyeyes/agent.toml");
const TOOLS: &str = "[zoom]\nenabled = true\n[rotate]\nenabled = false\n\
                     [[plugins]]\npath = \"p.so\"\nenabled = false\n";

#[test]
#[ignore = "fuzzing: minutes; run by hand (see the module docs)"]
fn fuzz_config_loaders() {
    let strategy = prop_oneof![
        mutated(TRAIN_CONFIG).prop_map(|t| (0u8, t)),
        mutated(REWARD_CONFIG).prop_map(|t| (1, t)),
        mutated(TEMPLATES).prop_map(|t| (2, t)),
        mutated(AGENT).prop_map(|t| (3, t)),
        mutated(TOOLS).prop_map(|t| (4, t)),
    ];
    fuzz("config loaders", 1, strategy, |(which, text)| match which {
        0 => {
            if let Ok(c) = deepeyes_rl::TrainConfig::from_toml_str(&text, "fuzz") {
                let _ = c.validate("fuzz");
            }
        }
        1 => {
            if let Ok(c) = deepeyes_reward::PipelineConfig::from_toml_str(&text, "fuzz") {
                let _ = c.build(&deepeyes_reward::Registry::new());
            }
        }
        2 => {
            let _ = deepeyes_core::PromptTemplates::from_toml_str(&text, "fuzz");
        }
        3 => {
            let _ = deepeyes_core::agent::BundleAgentDefaults::from_toml_str(&text, "fuzz");
        }
        _ => {
            let _ = deepeyes_tools::ToolsConfig::from_toml_str(&text, "fuzz");
        }
    });
}
