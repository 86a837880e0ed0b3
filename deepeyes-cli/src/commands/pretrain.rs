//! `deepeyes pretrain-synthetic`: TinyEyes' supervised base stage on SynthV* (grounding,
//! perception of crops, the answer and tool-call formats), from a seed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_rl::checkpoint::latest_intact;
use deepeyes_rl::tinyeyes::{BaseStage, BaseStageConfig, init_checkpoint};

/// Arguments of `deepeyes pretrain-synthetic`.
#[derive(Debug, Args)]
pub(crate) struct PretrainArgs {
    /// Output directory: `checkpoints/step-NNNNNNNN/` (the two newest saves: the weights as a
    /// Hugging Face directory, the optimizer state and a manifest), `base-metrics.jsonl`, and
    /// `bundle/` when `--bundle-template` is given.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Start from this checkpoint instead of a fresh one (`init-tinyeyes` output, or an earlier
    /// run's `checkpoints/step-NNNNNNNN/`).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// A TinyEyes ONNX bundle whose graphs run the trained weights (`bundle/` is written).
    #[arg(long, value_name = "BUNDLE")]
    bundle_template: Option<PathBuf>,
    /// Seed of the fresh checkpoint, the canvases and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimizer steps.
    #[arg(long, default_value_t = BaseStageConfig::default().steps)]
    steps: u64,
    /// Conversations per step.
    #[arg(long, default_value_t = BaseStageConfig::default().batch_size)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = BaseStageConfig::default().lr)]
    lr: f64,
    /// Steps between held-out evaluations (and checkpoint saves).
    #[arg(long, default_value_t = BaseStageConfig::default().eval_every)]
    eval_every: u64,
    /// Shares of grounding, perception and action-format samples, e.g. `0.4,0.25,0.35`.
    #[arg(long, value_name = "G,P,A", value_delimiter = ',')]
    mix: Option<Vec<f64>>,
    /// Steps on 1024 × 1024 single-card canvases before TinyEyes' distribution.
    #[arg(long, default_value_t = BaseStageConfig::default().square_steps, value_name = "N")]
    square_steps: u64,
    /// Weight of perception samples' supervised tokens in the token-mean loss.
    #[arg(long, default_value_t = BaseStageConfig::default().perception_weight, value_name = "W")]
    perception_weight: f64,
    /// Share of the action format's zooms that look again at the next card to the right.
    #[arg(long, default_value_t = BaseStageConfig::default().second_look_share, value_name = "S")]
    second_look_share: f64,
    /// Most looks in the action format's left-to-right scan (the bundle's agent.toml must allow
    /// one turn more).
    #[arg(long, default_value_t = BaseStageConfig::default().max_looks, value_name = "N")]
    max_looks: u32,
    /// Spread coordinate labels over neighbouring bins (Gaussian σ in bins; 0: hard labels).
    #[arg(long, default_value_t = 0.0, value_name = "SIGMA")]
    soft_coordinates: f64,
    /// Continue the run in `--out` from its last saved step (weights, optimizer, step); the
    /// steps that follow equal those of an uninterrupted run. Give the same settings again.
    #[arg(long)]
    resume: bool,
    /// Training canvases generated up front.
    #[arg(long, default_value_t = BaseStageConfig::default().pool_size)]
    pool_size: usize,
}

/// Runs the base stage.
pub(crate) fn run(args: PretrainArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let checkpoints = args.out.join("checkpoints");
    let resumed = if args.resume {
        let (newest, skipped) = latest_intact(&checkpoints).context("listing checkpoints")?;
        let Some(newest) = newest else {
            let why: String = skipped
                .iter()
                .map(|s| format!("\n  {}: {}", s.dir.display(), s.reason))
                .collect();
            anyhow::bail!(
                "--resume: no intact checkpoint in {}{why}",
                checkpoints.display()
            );
        };
        Some(newest)
    } else {
        None
    };
    // The folder whose tokenizer, configs and templates each save copies: the newest checkpoint
    // once there is one (pruning keeps it).
    let mut source = match (&resumed, &args.from) {
        (Some(c), _) => c.dir().to_path_buf(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => {
            let dir = args.out.join("init");
            init_checkpoint(&dir, args.seed)
                .with_context(|| format!("initialising TinyEyes in {}", dir.display()))?;
            dir
        }
    };
    let config = BaseStageConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        eval_every: args.eval_every,
        pool_size: args.pool_size,
        seed: args.seed,
        soft_coordinates: args.soft_coordinates,
        square_steps: args.square_steps,
        perception_weight: args.perception_weight,
        second_look_share: args.second_look_share,
        max_looks: args.max_looks,
        // The shares are checked (and normalised) by the base stage itself.
        mix: match args.mix.as_deref() {
            Some(&[g, p, a]) => [g, p, a],
            Some(other) => anyhow::bail!("--mix needs three shares G,P,A; got {other:?}"),
            None => BaseStageConfig::default().mix,
        },
        ..BaseStageConfig::default()
    };
    let stage = if let Some(checkpoint) = &resumed {
        BaseStage::resume(checkpoint, config.clone())
    } else {
        BaseStage::new(&source, config.clone())
    };
    let mut stage =
        stage.with_context(|| format!("setting up the base stage from {}", source.display()))?;
    let metrics_path = args.out.join("base-metrics.jsonl");
    // On resume, keep the records up to the saved step (a killed run may have written more).
    let kept: Vec<String> = if args.resume {
        std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= stage.step_count())
            })
            .map(str::to_owned)
            .collect()
    } else {
        Vec::new()
    };
    let mut metrics = std::io::BufWriter::new(
        std::fs::File::create(&metrics_path)
            .with_context(|| format!("creating {}", metrics_path.display()))?,
    );
    for line in kept {
        writeln!(metrics, "{line}")?;
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{:>6} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "step",
        "loss",
        "lr",
        "grad",
        "card tok",
        "card cell",
        "box IoU",
        "box hit",
        "percept",
        "p(zoom)",
        "s/step"
    )?;
    let mut window = (0.0, 0.0, 0usize);
    while stage.step_count() < config.steps {
        let step = stage.train_step()?;
        window.0 += step.loss;
        window.1 += step.seconds;
        window.2 += 1;
        let done = stage.step_count();
        let eval_now = (config.eval_every > 0 && done.is_multiple_of(config.eval_every))
            || done == config.steps;
        if eval_now {
            let e = stage.evaluate()?;
            let loss = window.0 / window.2 as f64;
            writeln!(
                stdout,
                "{done:>6} {loss:>8.4} {:>9.2e} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7.2}",
                step.lr,
                step.grad_norm,
                e.card_token_acc,
                e.card_cell_acc,
                e.ground_iou,
                e.ground_hit,
                e.perception_acc,
                e.zoom_prob,
                window.1 / window.2 as f64
            )?;
            writeln!(
                metrics,
                "{}",
                serde_json::json!({
                    "step": done, "loss": loss, "lr": step.lr, "grad_norm": step.grad_norm,
                    "ground_iou": e.ground_iou, "ground_hit": e.ground_hit,
                    "perception_acc": e.perception_acc, "zoom_prob": e.zoom_prob,
                    "card_cell_acc": e.card_cell_acc, "card_token_acc": e.card_token_acc,
                    "seconds_per_step": window.1 / window.2 as f64,
                })
            )?;
            metrics.flush()?;
            window = (0.0, 0.0, 0);
            source = stage
                .save(&source, &checkpoints)
                .with_context(|| format!("saving a checkpoint in {}", checkpoints.display()))?;
        }
    }
    // Every evaluation saves, the last step included; a run of zero steps saves the start.
    if config.steps == 0 {
        source = stage.save(&source, &checkpoints)?;
    }
    if let Some(template) = &args.bundle_template {
        let bundle = args.out.join("bundle");
        deepeyes_rl::trainer::export_bundle(stage.model(), template, &bundle)
            .with_context(|| format!("writing the bundle {}", bundle.display()))?;
        // The template's graphs and bundle config stay; the weights are new, and so may be the
        // tokenizer (the init draws it from its seed): the bundle carries the base's own.
        let tokenizer = source.join("tokenizer.json");
        std::fs::copy(&tokenizer, bundle.join("tokenizer.json"))
            .with_context(|| format!("copying {} into the bundle", tokenizer.display()))?;
        writeln!(stdout, "wrote {}", bundle.display())?;
    }
    writeln!(stdout, "wrote {}", source.display())?;
    Ok(ExitCode::SUCCESS)
}
