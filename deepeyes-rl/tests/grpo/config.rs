//! The training config: the shipped example, defaults, strictness and validation messages.

use std::path::{Path, PathBuf};

use deepeyes_rl::config::{DatasetKind, RewardSource, RolloutEngine};
use deepeyes_rl::grpo::{KlEstimator, LossAggregation, LossNormalization};
use deepeyes_rl::schedule::ScheduleKind;
use deepeyes_rl::{Error, TrainConfig};

const MINIMAL: &str = r#"
output-dir = "runs/t"
[data]
kind = "jsonl"
paths = ["d.jsonl"]
[model]
bundle = "m"
"#;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/train/example.toml")
}

fn parse(text: &str) -> Result<TrainConfig, Error> {
    TrainConfig::from_toml_str(text, "test.toml")
}

/// Parses `MINIMAL` with `extra` appended (TOML tables may be repeated only once, so `extra`
/// must add new tables or keys of new tables).
fn with(extra: &str) -> Result<TrainConfig, Error> {
    parse(&format!("{MINIMAL}\n{extra}"))
}

fn problems(err: &Error) -> Vec<String> {
    match err {
        Error::Config { problems, .. } => problems.iter().map(|p| p.key.clone()).collect(),
        other => panic!("expected a validation error, got {other}"),
    }
}

#[test]
fn example_parses_and_matches_the_defaults() {
    let cfg = TrainConfig::load(&example_path()).unwrap();
    let minimal = parse(MINIMAL).unwrap();
    // The example spells out the defaults: apart from the required sections and the reward file
    // it equals a minimal config.
    assert_eq!(cfg.grpo, minimal.grpo);
    assert_eq!(cfg.optimizer, minimal.optimizer);
    assert_eq!(cfg.batch, minimal.batch);
    assert_eq!(cfg.schedule, minimal.schedule);
    assert_eq!(cfg.rollout, minimal.rollout);
    assert_eq!(cfg.checkpoint, minimal.checkpoint);
    assert_eq!(cfg.metrics, minimal.metrics);
    assert_eq!(cfg.seeds, minimal.seeds);
    assert_eq!(cfg.data.kind, DatasetKind::DeepeyesParquet);
    assert_eq!(cfg.data.paths.len(), 3);
    assert_eq!(cfg.model.rollout_engine, RolloutEngine::Ort);
    assert_eq!(cfg.model.attention_chunk, minimal.model.attention_chunk);
    assert!(matches!(cfg.reward_source(), RewardSource::File(p) if p.ends_with("deepeyes.toml")));
    assert!(cfg.tools.is_empty());
}

#[test]
fn defaults_reproduce_deepeyes() {
    let cfg = parse(MINIMAL).unwrap();
    assert_eq!(cfg.steps, 80);
    let g = &cfg.grpo;
    assert_eq!(g.group_size, 16);
    assert!(g.norm_by_std);
    assert_eq!(g.adv_epsilon, 1e-6);
    assert_eq!(
        (g.clip_low, g.clip_high, g.dual_clip),
        (0.2, 0.2, Some(3.0))
    );
    assert_eq!(g.loss_agg_mode, LossAggregation::TokenMean);
    assert_eq!(g.loss_normalization, LossNormalization::MicroBatch);
    assert_eq!((g.kl_coef, g.entropy_coef), (0.0, 0.0));
    assert_eq!(g.kl_estimator, KlEstimator::K3);
    assert!(!g.needs_reference() && !g.needs_entropy());
    assert!(!g.dynamic_sampling.enabled && !g.mask_max_turns);
    let o = &cfg.optimizer;
    assert_eq!(
        (o.lr, o.weight_decay, o.betas, o.grad_clip),
        (1e-6, 0.01, [0.9, 0.999], Some(1.0))
    );
    assert_eq!(cfg.schedule.kind, ScheduleKind::Constant);
    assert_eq!(cfg.schedule.warmup_steps, 0);
    assert_eq!(cfg.batch.prompts_per_step, 256);
    assert_eq!(cfg.batch.optimizer_steps_per_step(), 1);
    assert_eq!(cfg.batch.accumulation_steps(16), 1024);
    assert_eq!(cfg.rollout.max_turns, 5);
    assert_eq!(cfg.checkpoint.every, 8);
    assert_eq!(cfg.checkpoint_dir(), Path::new("runs/t/checkpoints"));
    assert_eq!(cfg.metrics_path(), Path::new("runs/t/metrics.jsonl"));
    assert!(matches!(cfg.reward_source(), RewardSource::Default));
}

#[test]
fn unknown_keys_are_rejected_in_every_table() {
    for extra in [
        "bogus = 1",
        "[seeds]\nbogus = 1",
        "[batch]\nbogus = 1",
        "[grpo]\nclip-hi = 0.3",
        "[grpo.dynamic-sampling]\nbogus = 1",
        "[optimizer]\nlearning-rate = 1e-5",
        "[schedule]\nbogus = 1",
        "[checkpoint]\nbogus = 1",
        "[metrics]\nbogus = 1",
        "[rollout]\nmax-turn = 3",
        "[rollout.sampling]\nbogus = 1",
    ] {
        // Top-level keys must precede the tables: put `bogus` first for that case.
        let text = if extra == "bogus = 1" {
            format!("bogus = 1\n{MINIMAL}")
        } else {
            format!("{MINIMAL}\n{extra}")
        };
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(err, Error::ConfigParse { .. }) && err.to_string().contains("unknown field"),
            "{extra}: {err}"
        );
    }
    // The two required tables.
    let data = "[data]\nkind = \"jsonl\"\npaths = [\"d\"]";
    let model = "[model]\nbundle = \"m\"";
    for text in [
        format!("output-dir = \"r\"\n{data}\nbogus = 1\n{model}"),
        format!("output-dir = \"r\"\n{data}\n{model}\nbogus = 1"),
    ] {
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    }
}

#[test]
fn parse_errors_name_the_key() {
    let err = with("[grpo]\nloss-agg-mode = \"token-sum\"").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("loss-agg-mode") && msg.contains("test.toml"),
        "{msg}"
    );
    let err = parse("output-dir = \"r\"\n[model]\nbundle = \"m\"").unwrap_err();
    assert!(err.to_string().contains("missing field `data`"), "{err}");
    let err = with("[grpo]\ndual-clip = true").unwrap_err();
    assert!(err.to_string().contains("dual-clip"), "{err}");
}

#[test]
fn invalid_values_are_all_reported_by_key() {
    let err = with(
        "[grpo]\nclip-low = 1.5\ngroup-size = 0\ndual-clip = 0.5\n\
         [optimizer]\nlr = -1.0\nbetas = [0.9, 1.0]\n\
         [batch]\nmini-batch-prompts = 100\n\
         [schedule]\nwarmup-steps = 100\nmin-lr-ratio = 2.0\n\
         [rollout]\nmax-turns = 0",
    )
    .unwrap_err();
    let keys = problems(&err);
    for key in [
        "grpo.clip-low",
        "grpo.group-size",
        "grpo.dual-clip",
        "optimizer.lr",
        "optimizer.betas[1]",
        "batch.mini-batch-prompts",
        "schedule.warmup-steps",
        "schedule.min-lr-ratio",
        "rollout.max-turns",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    let msg = err.to_string();
    assert!(msg.starts_with("config test.toml: key `"), "{msg}");
}

#[test]
fn attention_chunk_is_at_least_one_row() {
    let text = |chunk: usize| {
        MINIMAL.replace(
            "bundle = \"m\"",
            &format!("bundle = \"m\"\nattention-chunk = {chunk}"),
        )
    };
    assert_eq!(parse(&text(64)).unwrap().model.attention_chunk, 64);
    assert_eq!(parse(MINIMAL).unwrap().model.attention_chunk, 512);
    let err = parse(&text(0)).unwrap_err();
    assert_eq!(problems(&err), ["model.attention-chunk"]);
}

#[test]
fn remote_rollouts_need_http_servers_and_only_they_take_them() {
    let text = |model: &str| MINIMAL.replace("bundle = \"m\"", &format!("bundle = \"m\"\n{model}"));
    let ok = parse(&text(
        "rollout-engine = \"remote\"\nrollout-servers = [\"http://a:8000\", \"https://b\"]\nrollout-deterministic = true",
    ))
    .unwrap();
    assert_eq!(ok.model.rollout_engine, RolloutEngine::Remote);
    assert_eq!(ok.model.rollout_servers.len(), 2);
    assert!(ok.model.rollout_deterministic);
    for (model, key) in [
        ("rollout-engine = \"remote\"", "model.rollout-servers"),
        (
            "rollout-engine = \"remote\"\nrollout-servers = [\"a:8000\"]",
            "model.rollout-servers[0]",
        ),
        (
            "rollout-servers = [\"http://a:8000\"]",
            "model.rollout-servers",
        ),
    ] {
        let err = parse(&text(model)).unwrap_err();
        assert_eq!(problems(&err), [key], "{model}");
    }
}

#[test]
fn micro_batch_must_divide_the_mini_batch() {
    let err = with("[batch]\nprompts-per-step = 4\nmini-batch-prompts = 2\nmicro-batch = 5\n[grpo]\ngroup-size = 4")
        .unwrap_err();
    assert_eq!(problems(&err), vec!["batch.micro-batch"]);
    let ok = with("[batch]\nprompts-per-step = 4\nmini-batch-prompts = 2\nmicro-batch = 4\nepochs = 2\n[grpo]\ngroup-size = 4")
        .unwrap();
    assert_eq!(ok.batch.optimizer_steps_per_step(), 4);
    assert_eq!(ok.batch.accumulation_steps(4), 2);
}

#[test]
fn switches_and_reward_sources() {
    let cfg = with("[grpo]\ndual-clip = false\nkl-coef = 0.001\nkl-estimator = \"low_var_kl\"\n[optimizer]\ngrad-clip = false").unwrap();
    assert_eq!(cfg.grpo.dual_clip, None);
    assert_eq!(cfg.grpo.kl_estimator, KlEstimator::K3);
    assert!(cfg.grpo.needs_reference());
    assert_eq!(cfg.optimizer.grad_clip, None);

    let cfg =
        with("[reward]\ntype = \"deepeyes-visual\"\n[reward.weights]\naccuracy = 0.8").unwrap();
    match cfg.reward_source() {
        RewardSource::Inline(t) => assert_eq!(t["type"].as_str(), Some("deepeyes-visual")),
        other => panic!("{other:?}"),
    }
    let err = parse(&format!(
        "reward-file = \"r.toml\"\n{MINIMAL}\n[reward]\ntype = \"x\""
    ))
    .unwrap_err();
    assert_eq!(problems(&err), vec!["reward-file"]);

    let cfg = with("[tools.image_zoom_in_tool]\nmin-side = 31").unwrap();
    assert_eq!(
        cfg.tools["image_zoom_in_tool"]["min-side"].as_integer(),
        Some(31)
    );

    let err = with("[grpo]\ngroup-size = 1\n[grpo.dynamic-sampling]\nenabled = true").unwrap_err();
    assert_eq!(problems(&err), vec!["grpo.dynamic-sampling.enabled"]);
}

#[test]
fn round_trips_through_toml() {
    let cfg = TrainConfig::load(&example_path()).unwrap();
    let text = cfg.to_toml_string().unwrap();
    assert_eq!(parse(&text).unwrap(), cfg);
    let off = with("[grpo]\ndual-clip = false\n[optimizer]\ngrad-clip = false").unwrap();
    assert_eq!(parse(&off.to_toml_string().unwrap()).unwrap(), off);
}

#[test]
fn missing_files_are_reported_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{}\n").unwrap();
    let text = format!(
        "output-dir = \"r\"\nreward-file = \"{}\"\n[data]\nkind = \"jsonl\"\npaths = [\"{}\", \"{}\"]\n[model]\nbundle = \"{}\"",
        dir.path().join("nope.toml").display(),
        data.display(),
        dir.path().join("missing.jsonl").display(),
        dir.path().join("no-bundle").display(),
    );
    let cfg = parse(&text).unwrap();
    let err = cfg.check_paths("test.toml").unwrap_err();
    assert_eq!(
        problems(&err),
        vec!["data.paths[1]", "model.bundle", "reward-file"]
    );
    assert!(TrainConfig::load(&dir.path().join("absent.toml")).is_err());
}

#[test]
fn a_lora_table_is_read_and_checked() {
    let cfg =
        with("[lora]\nrank = 8\nalpha = 16\ntarget-modules = [\"q_proj\", \"v_proj\"]").unwrap();
    let lora = cfg.lora.expect("the [lora] table");
    assert_eq!((lora.rank, lora.scale()), (8, 2.0));
    let err = with("[lora]\nrank = 8\nalpha = 16\ndropout = 0.1\ntarget-modules = \"all-linear\"")
        .unwrap_err();
    assert_eq!(problems(&err), ["lora"]);
    assert!(err.to_string().contains("dropout"), "{err}");
    let err = with("[lora]\nrank = 8\nalpha = 16\ntarget-modules = \"(\"").unwrap_err();
    assert_eq!(problems(&err), ["lora"]);
    assert!(with("[lora]\nrank = 8\nalpha = 16\ntarget-modules = \"all-linear\"\nr = 3").is_err());
}
