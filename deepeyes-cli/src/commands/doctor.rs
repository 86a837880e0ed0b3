//! `deepeyes doctor`: which ONNX Runtime library deepeyes loads (path, version, how it was
//! found), which execution providers it offers, and whether a GPU is used; with `--model`, also
//! loads a bundle and runs one tiny prefill through it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use deepeyes_core::VisionLanguageModel;
use deepeyes_core::onnx::{LogitsOf, OnnxModel, OnnxOptions, probe_gpu, runtime};

/// Arguments of `deepeyes doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Also load this model bundle and run a short prefill through it.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Fail (exit status 1) unless the graphs can run on a GPU.
    #[arg(long)]
    require_gpu: bool,
}

/// Prints the report.
pub(crate) fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let rt = runtime().context("loading ONNX Runtime")?;
    let info = rt.info();
    writeln!(out, "ONNX Runtime")?;
    writeln!(out, "  library:    {}", info.library.display())?;
    writeln!(out, "  version:    {}", info.version)?;
    writeln!(out, "  found via:  {}", info.source)?;
    writeln!(out, "  providers:  {}", info.providers.join(", "))?;
    writeln!(
        out,
        "  cuda:       {}",
        if cfg!(feature = "cuda") {
            "compiled in"
        } else {
            "not compiled in (build with --features cuda)"
        }
    )?;
    let gpu_problem = probe_gpu().context("probing the CUDA provider")?;
    match &gpu_problem {
        None => writeln!(out, "  gpu:        yes (the CUDA provider registers)")?,
        Some(why) => writeln!(out, "  gpu:        no ({why})")?,
    }

    let mut gpu_used = gpu_problem.is_none();
    if let Some(dir) = &args.model {
        let options = OnnxOptions {
            require_gpu: args.require_gpu,
            ..OnnxOptions::default()
        };
        let model = OnnxModel::load(dir, &options)
            .with_context(|| format!("loading the model bundle {}", dir.display()))?;
        let cfg = model.config();
        let device = model.device();
        gpu_used = device.gpu;
        writeln!(out, "Model")?;
        writeln!(out, "  bundle:     {}", dir.display())?;
        writeln!(
            out,
            "  text:       {} layers, hidden {}, vocabulary {}",
            cfg.text.num_layers, cfg.text.hidden_size, cfg.text.vocab_size
        )?;
        writeln!(
            out,
            "  vision:     {} blocks, hidden {}, patch {}, window {}",
            cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.patch_size, cfg.vision.window_size
        )?;
        writeln!(out, "  provider:   {}", device.provider)?;
        writeln!(
            out,
            "  gpu used:   {}",
            if device.gpu { "yes" } else { "no" }
        )?;
        let tokens = model
            .codec()
            .encode("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")?;
        let started = Instant::now();
        let prompt = model.prepare(&tokens, &[])?;
        let (logits, _) = model.prefill(&[&prompt], LogitsOf::Last)?;
        let finite = logits[0].iter().all(|l| l.is_finite());
        writeln!(
            out,
            "  smoke test: prefill of {} tokens in {:.1} ms, logits {}",
            tokens.len(),
            started.elapsed().as_secs_f64() * 1e3,
            if finite { "finite" } else { "NOT FINITE" }
        )?;
        if !finite {
            return Ok(ExitCode::FAILURE);
        }
    }
    writeln!(out, "GPU used: {}", if gpu_used { "yes" } else { "no" })?;
    if args.require_gpu && !gpu_used {
        writeln!(out, "error: a GPU was required (--require-gpu)")?;
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
