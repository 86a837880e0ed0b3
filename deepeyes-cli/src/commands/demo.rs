//! `deepeyes demo`: the paper's effect on two CPU cores. TinyEyes' committed base model is
//! evaluated on held-out SynthV* items, trained with GRPO and DeepEyes' reward on SynthV*
//! (live table), evaluated again, and one annotated episode of the trained policy is shown.
//!
//! Writes into `--out`: `data/` (the SynthV* splits), `eval-base/` and `eval-trained/` (traces
//! and summaries), `train/` (metrics JSONL, checkpoints, the trained bundle in `train/final`),
//! `curves.png`, `trace/` (the input with the zoom box drawn, each crop) and `summary.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::dataset::DatasetKind;
use deepeyes_core::dataset::prepare_item;
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_core::trajectory::ToolOutcome;
use deepeyes_core::{Agent, Image, ImageLimits, Task};
use deepeyes_reward::{PipelineConfig, Registry};
use deepeyes_rl::TrainConfig;
use deepeyes_rl::eval::EvalSummary;
use deepeyes_rl::metrics::ToolCollapseDetector;
use deepeyes_rl::trainer::Trainer;
use serde_json::json;

use super::eval::EvalArgs;
use super::synthv::SynthVArgs;

/// The GRPO settings of the demo (`configs/train/tinyeyes-demo.toml`).
const DEMO_CONFIG: &str = include_str!("../../../configs/train/tinyeyes-demo.toml");
/// `--lora`: the learning rate and `[lora]` table replacing the demo's full updates.
const DEMO_LORA: &str = include_str!("../../../configs/train/tinyeyes-demo-lora.toml");
/// The ablation's reward: DeepEyes' without the tool bonus.
const NO_BONUS_REWARD: &str = include_str!("../../../configs/rewards/deepeyes-no-tool-bonus.toml");
/// The other ablation's reward: the tool bonus paid for every returned crop, right or wrong.
const UNCONDITIONAL_BONUS_REWARD: &str =
    include_str!("../../../configs/rewards/deepeyes-unconditional-tool-bonus.toml");

/// Arguments of `deepeyes demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "runs/demo", value_name = "DIR")]
    out: PathBuf,
    /// The base model bundle to start from.
    #[arg(long, default_value = "assets/tinyeyes", value_name = "DIR")]
    model: PathBuf,
    /// GRPO steps (8 prompts × 16 samples each).
    #[arg(long, default_value_t = 150, value_name = "N")]
    steps: u64,
    /// SynthV* training items.
    #[arg(long, default_value_t = 512, value_name = "N")]
    train_items: u64,
    /// Held-out SynthV* items for the evaluations before and after training.
    #[arg(long, default_value_t = 200, value_name = "N")]
    eval_items: u64,
    /// The ablation: DeepEyes' reward without the tool bonus.
    #[arg(long)]
    no_tool_bonus: bool,
    /// The other ablation: the tool bonus paid for every returned crop, right answer or not.
    #[arg(long, conflicts_with = "no_tool_bonus")]
    unconditional_tool_bonus: bool,
    /// Seed of the data and of training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train LoRA adapters on the frozen base instead of every weight
    /// (`configs/train/tinyeyes-demo-lora.toml`).
    #[arg(long)]
    lora: bool,
}

/// `configs/train/tinyeyes-demo-lora.toml`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoLora {
    lr: f64,
    lora: deepeyes_rl::network::LoraConfig,
}

/// The numbers compared before and after training.
fn headline(s: &EvalSummary) -> serde_json::Value {
    json!({
        "accuracy": s.overall,
        "items": s.items,
        "tool_calls_per_answer": s.tools.calls_per_sample,
        "answers_with_calls": s.tools.samples_with_calls,
        "valid_crop_rate": s.tools.valid_crop_rate,
        "zoom_iou": s.tools.mean_iou,
        "by_looks": s.tools.by_looks,
        "look_again_after_hit": s.tools.look_again_after_hit,
        "look_again_after_miss": s.tools.look_again_after_miss,
    })
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// The settings the data in `data/` was written with; written last, so a split interrupted
/// half-way is never taken for finished.
const DATA_STAMP: &str = "settings.json";

/// Greedy evaluation of `model` on the held-out split.
fn evaluate(model: &Path, data: &Path, out: &Path, seed: u64) -> anyhow::Result<EvalSummary> {
    super::eval::evaluate(&EvalArgs {
        model: model.to_path_buf(),
        bench: DatasetKind::SynthV,
        data: data.to_path_buf(),
        allow_paths_outside_root: false,
        samples: 1,
        seed,
        judge: None,
        out: out.to_path_buf(),
        no_shuffle: false,
        limit: None,
        // The bundle's agent.toml: the limits of the demo's training rollouts
        // (configs/train/tinyeyes-demo.toml), carried by the base and every checkpoint.
        limits: super::AgentLimitArgs::default(),
        env: super::AllowEnvArgs::default(),
        temperature: 0.0,
        batch: 8,
        threads: 1,
        tools_config: None,
        templates: None,
    })
}

/// Draws a `width`-px red frame of `bbox` onto `image`.
fn draw_box(image: &mut image::RgbImage, bbox: [f64; 4], width: u32) {
    let (w, h) = (image.width(), image.height());
    let clamp = |v: f64, max: u32| (v.max(0.0) as u32).min(max.saturating_sub(1));
    let (x1, y1, x2, y2) = (
        clamp(bbox[0], w),
        clamp(bbox[1], h),
        clamp(bbox[2], w),
        clamp(bbox[3], h),
    );
    for t in 0..width {
        for x in x1..=x2 {
            for y in [y1.saturating_add(t).min(h - 1), y2.saturating_sub(t)] {
                image.put_pixel(x, y, image::Rgb([255, 0, 0]));
            }
        }
        for y in y1..=y2 {
            for x in [x1.saturating_add(t).min(w - 1), x2.saturating_sub(t)] {
                image.put_pixel(x, y, image::Rgb([255, 0, 0]));
            }
        }
    }
}

/// Runs the trained policy greedily on the first held-out item, prints the episode and saves
/// the input with its zoom boxes drawn and every crop.
fn annotated_trace(
    bundle: &Path,
    test: &Path,
    out: &Path,
    seed: u64,
    stdout: &mut impl Write,
) -> anyhow::Result<()> {
    let mut reader = deepeyes_core::dataset::open(
        DatasetKind::SynthV,
        test,
        &deepeyes_core::dataset::LoadOptions::default(),
    )?;
    let item = loop {
        match reader.next().context("the test split is empty")? {
            Ok(item) => break item,
            Err(deepeyes_core::dataset::ReadError::Skipped(bad)) => {
                tracing::warn!("skipping {bad}");
            }
            Err(deepeyes_core::dataset::ReadError::Fatal(e)) => {
                return Err(e).context("reading the test split");
            }
        }
    };
    let prepared = prepare_item(item, seed, true);
    let images = prepared.item.decode_images(&ImageLimits::default())?;
    let model = OnnxModel::load(
        bundle,
        &OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        },
    )
    .with_context(|| format!("loading {}", bundle.display()))?;
    let (_, registry) = super::load_tools(None, Some(bundle))?;
    let templates = super::load_templates(None, Some(bundle))?;
    let agent = Agent::new(
        &model,
        registry.tools(),
        templates,
        super::AgentLimitArgs::default().agent_config(bundle, 0.0)?,
    )?;
    let task = Task {
        question: prepared.question.clone(),
        images: images.clone(),
    };
    let trajectory = agent.run(&task, seed)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    writeln!(
        stdout,
        "\none episode of the trained policy (greedy), item {}:",
        prepared.item.id
    )?;
    writeln!(
        stdout,
        "  question: {}",
        prepared.question.replace('\n', " | ")
    )?;
    for turn in &trajectory.turns {
        writeln!(stdout, "  model:    {}", turn.text.trim())?;
    }
    let mut annotated = images[0].rgb().clone();
    let mut crops = 0;
    for call in &trajectory.tool_calls {
        let bbox = call
            .call
            .as_ref()
            .and_then(|c| c.arguments.get("bbox_2d"))
            .and_then(|b| serde_json::from_value::<[f64; 4]>(b.clone()).ok());
        match (&call.outcome, bbox) {
            (ToolOutcome::Ok { region, .. }, Some(bbox)) => {
                // The box as written is in the bundle's frame (TinyEyes: pixels of its view);
                // the region the crop showed is in the input's pixels.
                let shown = region.map(|r| {
                    let (x, y) = (f64::from(r.x), f64::from(r.y));
                    [x, y, x + f64::from(r.width), y + f64::from(r.height)]
                });
                draw_box(&mut annotated, shown.unwrap_or(bbox), 3);
                match shown {
                    Some(shown) => writeln!(
                        stdout,
                        "  zoom:     {bbox:?} (crop returned: {shown:?} of the input)"
                    )?,
                    None => writeln!(stdout, "  zoom:     {bbox:?} (crop returned)")?,
                }
            }
            (ToolOutcome::Error { message }, _) => {
                writeln!(stdout, "  zoom:     rejected: {message}")?;
            }
            (outcome, _) => writeln!(stdout, "  zoom:     {outcome:?}")?,
        }
    }
    for image in trajectory.images.iter().skip(1) {
        crops += 1;
        let path = out.join(format!("crop-{crops}.png"));
        image.image.save_png(&path)?;
        writeln!(stdout, "  crop:     {}", path.display())?;
    }
    if let Some(truth) = prepared.item.boxes.first() {
        writeln!(stdout, "  card box: {:?}", truth.bbox)?;
    }
    writeln!(stdout, "  truth:    {}", prepared.item.answer)?;
    let path = out.join("input-with-zoom.png");
    Image::from_raw(annotated.width(), annotated.height(), annotated.into_raw())?
        .save_png(&path)?;
    writeln!(stdout, "  image:    {} (zoom boxes in red)", path.display())?;
    // The same episode through `deepeyes run`: the tiny model only knows questions worded and
    // laid out as in training, so the replay passes the item's question exactly as rendered.
    let input = out.join("input.png");
    images[0].save_png(&input)?;
    let quoted = prepared
        .question
        .replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace('\n', "\\n");
    writeln!(
        stdout,
        "  replay:   deepeyes run --model {} --threads 1 --image {} --question $'{quoted}'",
        bundle.display(),
        input.display()
    )?;
    Ok(())
}

/// Runs the demo.
pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    let data = args.out.join("data");
    let (train, test) = (data.join("train.jsonl"), data.join("test.jsonl"));
    // TinyEyes' distribution: any canvas size and shape, 0-2 decoy cards.
    let distribution = deepeyes_rl::synthv::SynthVConfig::tinyeyes();
    let stamp = json!({
        "seed": args.seed, "train": args.train_items, "test": args.eval_items,
        "synthv": distribution,
    });
    let written = std::fs::read_to_string(data.join(DATA_STAMP))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if written.as_ref() == Some(&stamp) && train.is_file() && test.is_file() {
        writeln!(stdout, "reusing the SynthV* data in {}", data.display())?;
    } else {
        writeln!(
            stdout,
            "writing {} training and {} held-out SynthV* items to {}",
            args.train_items,
            args.eval_items,
            data.display()
        )?;
        super::synthv::write_with(
            &distribution,
            &SynthVArgs {
                out: data.clone(),
                train: args.train_items,
                test: args.eval_items,
                seed: args.seed,
                config: None,
            },
        )?;
        // Evaluations of earlier data would be resumed as if they were of this data.
        for dir in ["eval-base", "eval-trained"] {
            let dir = args.out.join(dir);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing the stale {}", dir.display()))?;
            }
        }
        std::fs::write(data.join(DATA_STAMP), stamp.to_string())
            .with_context(|| format!("writing {}", data.join(DATA_STAMP).display()))?;
    }

    writeln!(
        stdout,
        "\nevaluating the base model {} (greedy)",
        args.model.display()
    )?;
    let before = evaluate(&args.model, &test, &args.out.join("eval-base"), args.seed)?;

    let mut config = TrainConfig::from_toml_str(DEMO_CONFIG, "configs/train/tinyeyes-demo.toml")
        .context("the built-in demo config")?;
    config.output_dir = args.out.join("train");
    config.steps = args.steps;
    config.data.paths = vec![train.clone()];
    config.model.bundle = args.model.clone();
    config.seeds.data = args.seed;
    config.seeds.rollout = args.seed;
    if args.lora {
        let lora: DemoLora =
            toml::from_str(DEMO_LORA).context("configs/train/tinyeyes-demo-lora.toml")?;
        config.optimizer.lr = lora.lr;
        config.seeds.adapters = args.seed;
        config.lora = Some(lora.lora);
        config
            .validate("configs/train/tinyeyes-demo-lora.toml")
            .context("the built-in LoRA demo config")?;
    }
    let (reward_toml, reward_file, reward_name) = if args.no_tool_bonus {
        (
            NO_BONUS_REWARD,
            "configs/rewards/deepeyes-no-tool-bonus.toml",
            "DeepEyes without the tool bonus (ablation)",
        )
    } else if args.unconditional_tool_bonus {
        (
            UNCONDITIONAL_BONUS_REWARD,
            "configs/rewards/deepeyes-unconditional-tool-bonus.toml",
            "DeepEyes with the tool bonus paid for any returned crop (ablation)",
        )
    } else {
        (
            deepeyes_reward::DEEPEYES_TOML,
            "configs/rewards/deepeyes.toml",
            "DeepEyes (accuracy + format + tool bonus)",
        )
    };
    let rewards = PipelineConfig::from_toml_str(reward_toml, reward_file)
        .context("the built-in reward pipeline")?;
    // SynthV* answers are option names or letters: the rules decide every answer, and an
    // answer they cannot match is wrong. No judge server is needed.
    let mut rewards = rewards;
    rewards.judge = None;
    let reward = std::sync::Arc::new(rewards.build(&Registry::new())?);
    let tools = super::train::config_tools(&config)?;
    let collapse = ToolCollapseDetector::new(
        config.metrics.tool_collapse_threshold,
        config.metrics.tool_collapse_steps,
    );
    let every = config.checkpoint.every;
    let train_dir = config.output_dir.clone();
    writeln!(
        stdout,
        "\nGRPO{}: {} steps of 8 prompts × 16 samples, reward {}",
        if args.lora { " with LoRA adapters" } else { "" },
        args.steps,
        reward_name
    )?;
    // The demo owns its output folder: a rerun starts its training over.
    super::train::discard_run(&config)?;
    let mut trainer = Trainer::new(config, tools, reward)
        .context("setting up training")?
        .with_onnx_options(OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        });
    drop(stdout);
    super::train::train_loop(&mut trainer, args.steps, every, collapse)?;
    let mut stdout = std::io::stdout().lock();
    let trained = trainer
        .export(&train_dir.join("final"))
        .context("writing the trained bundle")?;

    writeln!(
        stdout,
        "\nevaluating the trained policy {} (greedy)",
        trained.display()
    )?;
    let after = evaluate(&trained, &test, &args.out.join("eval-trained"), args.seed)?;

    let curves = args.out.join("curves.png");
    super::plot::write_curves_png(
        &train_dir.join("metrics.jsonl"),
        &curves,
        &format!(
            "deepeyes demo: TinyEyes GRPO on SynthV*, {} steps",
            args.steps
        ),
    )?;

    writeln!(stdout, "\nheld-out SynthV* ({} items, greedy)", after.items)?;
    writeln!(
        stdout,
        "{:<10} {:>9} {:>12} {:>12} {:>9}",
        "", "accuracy", "calls/answer", "valid crops", "zoom IoU"
    )?;
    for (name, s) in [("base", &before), ("trained", &after)] {
        writeln!(
            stdout,
            "{name:<10} {:>9.3} {:>12.3} {:>12} {:>9}",
            s.overall,
            s.tools.calls_per_sample,
            opt(s.tools.valid_crop_rate),
            opt(s.tools.mean_iou)
        )?;
    }
    let summary = json!({
        "steps": args.steps,
        "tool_bonus": !args.no_tool_bonus,
        "unconditional_tool_bonus": args.unconditional_tool_bonus,
        "lora": args.lora,
        "base": headline(&before),
        "trained": headline(&after),
        "accuracy_gain": after.overall - before.overall,
        "trained_bundle": trained,
        "curves": curves,
    });
    let summary_path = args.out.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;

    annotated_trace(
        &trained,
        &test,
        &args.out.join("trace"),
        args.seed,
        &mut stdout,
    )?;
    writeln!(
        stdout,
        "\ncurves: {}\nmetrics: {}\ntrained bundle: {} (`deepeyes run` it as the replay line above does)\nsummary: {}",
        curves.display(),
        train_dir.join("metrics.jsonl").display(),
        trained.display(),
        summary_path.display()
    )?;
    Ok(ExitCode::SUCCESS)
}
