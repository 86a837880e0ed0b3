//! `deepeyes run`: answer one question about one image with a model bundle and the tools, and
//! print the episode: the model's reasoning turn by turn, each tool call with its box, where each
//! crop was saved, and the answer. `--trace` also writes the episode as JSON with, for every
//! turn, the exact input token ids, the generated ids with their log-probs and each image's grid,
//! so a run can be replayed and checked.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::model::FinishReason;
use deepeyes_core::onnx::OnnxModel;
use deepeyes_core::{
    Agent, AgentConfig, Image, ImageLimits, ImageSource, PreprocessConfig, SamplingParams,
    StopReason, Task, ToolCall, ToolOutcome, Trajectory, VisionLanguageModel,
};
use serde::Serialize;

/// Arguments of `deepeyes run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The model bundle directory (written by scripts/export_qwen2_5_vl.py).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The image to ask about.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// The question.
    #[arg(long)]
    question: String,
    #[command(flatten)]
    limits: super::AgentLimitArgs,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    temperature: f32,
    /// Nucleus sampling mass (with a temperature above 0).
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Seed of the sampling stream.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Write the episode as JSON to this file; crops are saved next to it.
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    #[command(flatten)]
    bundle: super::BundleRunArgs,
}

/// The JSON trace of one episode.
#[derive(Debug, Serialize)]
pub(crate) struct Trace {
    /// Trace format version.
    version: u32,
    model: ModelInfo,
    question: String,
    image: InputImage,
    seed: u64,
    agent: AgentConfig,
    turns: Vec<TurnTrace>,
    answer: Option<String>,
    stop: StopReason,
}

/// Which model ran, and where.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelInfo {
    pub(crate) bundle: PathBuf,
    pub(crate) provider: String,
    pub(crate) gpu: bool,
    pub(crate) onnxruntime: String,
    pub(crate) onnxruntime_version: String,
}

/// The input image.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InputImage {
    pub(crate) path: PathBuf,
    pub(crate) width: u32,
    pub(crate) height: u32,
}

/// What a trace records besides the trajectory.
#[derive(Debug, Clone)]
pub(crate) struct TraceHeader {
    pub(crate) model: ModelInfo,
    pub(crate) question: String,
    pub(crate) image: InputImage,
    pub(crate) seed: u64,
    pub(crate) agent: AgentConfig,
}

#[derive(Debug, Serialize)]
struct TurnTrace {
    turn: usize,
    /// The context the model continued, one `<|image_pad|>` per image.
    input_token_ids: Vec<u32>,
    /// The context's images, in pad order.
    images: Vec<ImageTrace>,
    generated_ids: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    finish: FinishReason,
    seed: u64,
    tool_calls: Vec<CallTrace>,
}

#[derive(Debug, Serialize)]
struct ImageTrace {
    index: usize,
    source: ImageSource,
    width: u32,
    height: u32,
    grid_thw: [u32; 3],
    image_tokens: usize,
}

#[derive(Debug, Serialize)]
struct CallTrace {
    raw: String,
    call: Option<ToolCall>,
    bbox: Option<serde_json::Value>,
    outcome: ToolOutcome,
    /// Where the image this call returned was saved, relative to the trace file.
    crop: Option<String>,
}

/// Builds the trace of `traj`; `crops[i]` is where the image returned by tool call `i` was saved.
pub(crate) fn build_trace(
    traj: &Trajectory,
    preprocess: &PreprocessConfig,
    crops: &[Option<String>],
    header: TraceHeader,
) -> anyhow::Result<Trace> {
    let mut turns = Vec::with_capacity(traj.turns.len());
    for (k, t) in traj.turns.iter().enumerate() {
        let end = t.context_len + t.generated;
        let mut images = Vec::with_capacity(t.context_images);
        for i in 0..t.context_images {
            let (width, height) = traj.image_sizes[i];
            let grid_thw = preprocess.grid_thw(height, width)?;
            images.push(ImageTrace {
                index: i,
                source: traj.image_sources[i],
                width,
                height,
                grid_thw,
                image_tokens: preprocess.image_token_count(height, width)?,
            });
        }
        let tool_calls = traj
            .tool_calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.turn == k)
            .map(|(i, c)| CallTrace {
                raw: c.raw.clone(),
                bbox: c
                    .call
                    .as_ref()
                    .and_then(|c| c.arguments.get("bbox_2d").cloned()),
                call: c.call.clone(),
                outcome: c.outcome.clone(),
                crop: crops.get(i).cloned().flatten(),
            })
            .collect();
        turns.push(TurnTrace {
            turn: k,
            input_token_ids: traj.tokens[..t.context_len].to_vec(),
            images,
            generated_ids: traj.tokens[t.context_len..end].to_vec(),
            logprobs: traj.logprobs[t.context_len..end].to_vec(),
            text: t.text.clone(),
            finish: t.finish,
            seed: t.seed,
            tool_calls,
        });
    }
    Ok(Trace {
        version: 1,
        model: header.model,
        question: header.question,
        image: header.image,
        seed: header.seed,
        agent: header.agent,
        turns,
        answer: traj.answer.clone(),
        stop: traj.stop,
    })
}

/// The human-readable episode.
pub(crate) fn render(trace: &Trace) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model:    {} ({})",
        trace.model.bundle.display(),
        trace.model.provider
    );
    let _ = writeln!(
        s,
        "image:    {} ({}×{})",
        trace.image.path.display(),
        trace.image.width,
        trace.image.height
    );
    let _ = writeln!(s, "question: {}", trace.question);
    for t in &trace.turns {
        let grids: Vec<String> = t
            .images
            .iter()
            .map(|i| format!("{}×{}", i.grid_thw[1], i.grid_thw[2]))
            .collect();
        let _ = writeln!(
            s,
            "\n── turn {} ── {} context tokens, images {} → {} tokens ({})",
            t.turn + 1,
            t.input_token_ids.len(),
            if grids.is_empty() {
                "none".to_string()
            } else {
                grids.join(", ")
            },
            t.generated_ids.len(),
            match t.finish {
                FinishReason::Stop => "stopped",
                FinishReason::Length => "hit the token limit",
            }
        );
        let _ = writeln!(s, "{}", t.text.trim_end());
        for c in &t.tool_calls {
            let name = c.call.as_ref().map_or("<unparsed>", |c| c.name.as_str());
            let bbox = c
                .bbox
                .as_ref()
                .map_or(String::new(), |b| format!(" bbox {b}"));
            let result = match &c.outcome {
                ToolOutcome::Ok { images, text, .. } => {
                    let mut r = format!("ok, {images} image(s)");
                    if let Some(path) = &c.crop {
                        let _ = write!(r, ", saved to {path}");
                    }
                    if let Some(text) = text {
                        let _ = write!(r, ", text {text:?}");
                    }
                    r
                }
                ToolOutcome::Error { message } => format!("error: {message}"),
                ToolOutcome::Dropped { reason } => format!("dropped: {reason}"),
            };
            let _ = writeln!(s, "→ tool call {name}{bbox}: {result}");
        }
    }
    let _ = writeln!(s);
    match &trace.answer {
        Some(a) => {
            let _ = writeln!(s, "answer: {a}");
        }
        None => {
            let _ = writeln!(s, "no answer ({})", stop_words(trace.stop));
        }
    }
    s
}

fn stop_words(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Answered => "answered",
        StopReason::NoAction => "the model neither answered nor called a tool",
        StopReason::TurnLength => "a turn hit the token limit",
        StopReason::MaxTurns => "the turn limit was reached",
        StopReason::TokenBudget => "the token budget was used up",
        StopReason::ImageLimit => "the image limit was reached",
    }
}

/// Saves the image each tool call returned next to `trace` as `<stem>-call<i>-<k>.png`; returns
/// the file name per call (the first image's).
fn save_crops(traj: &Trajectory, trace: &Path) -> anyhow::Result<Vec<Option<String>>> {
    let dir = trace.parent().unwrap_or(Path::new("."));
    let stem = trace
        .file_stem()
        .map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
    let mut names = vec![None; traj.tool_calls.len()];
    let mut per_call = vec![0usize; traj.tool_calls.len()];
    for im in &traj.images {
        if let ImageSource::ToolCall { call } = im.source {
            let k = per_call[call];
            per_call[call] += 1;
            let name = format!("{stem}-call{call}-{k}.png");
            let path = dir.join(&name);
            im.image
                .save_png(&path)
                .with_context(|| format!("saving the crop {}", path.display()))?;
            if names[call].is_none() {
                names[call] = Some(name);
            }
        }
    }
    Ok(names)
}

/// Runs the episode and prints it.
pub(crate) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let image = Image::open(&args.image, &ImageLimits::default())
        .with_context(|| format!("reading the image {}", args.image.display()))?;
    let (templates, registry) = args.bundle.templates_and_tools(&args.model)?;
    let limits = args.limits.agent_config(&args.model, args.temperature)?;
    let config = AgentConfig {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
        },
        ..limits
    };
    let options = args.bundle.onnx_options();
    let model = OnnxModel::load(&args.model, &options)
        .with_context(|| format!("loading the model bundle {}", args.model.display()))?;
    let agent = Agent::new(&model, registry.tools(), templates, config.clone())
        .context("setting up the agent")?;
    let task = Task {
        question: args.question.clone(),
        images: vec![image.clone()],
    };
    let traj = agent.run(&task, args.seed).context("running the episode")?;

    let crops = match &args.trace {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating the trace directory {}", dir.display()))?;
            }
            save_crops(&traj, path)?
        }
        None => vec![None; traj.tool_calls.len()],
    };
    let device = model.device();
    let rt = model.runtime_info();
    let trace = build_trace(
        &traj,
        &model.preprocess_config(),
        &crops,
        TraceHeader {
            model: ModelInfo {
                bundle: args.model.clone(),
                provider: device.provider.clone(),
                gpu: device.gpu,
                onnxruntime: rt.library.display().to_string(),
                onnxruntime_version: rt.version.clone(),
            },
            question: args.question.clone(),
            image: InputImage {
                path: args.image.clone(),
                width: image.width(),
                height: image.height(),
            },
            seed: args.seed,
            agent: config,
        },
    )?;
    let mut out = std::io::stdout().lock();
    out.write_all(render(&trace).as_bytes())?;
    if let Some(path) = &args.trace {
        let json = serde_json::to_string_pretty(&trace)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the trace {}", path.display()))?;
        writeln!(out, "trace: {}", path.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepeyes_core::trajectory::{ToolCallRecord, TrajectoryImage, TurnRecord};

    /// A two-turn episode: a zoom-in call, then an answer.
    fn episode() -> Trajectory {
        let img = Image::from_raw(640, 480, vec![0; 640 * 480 * 3]).unwrap();
        let crop = Image::from_raw(100, 80, vec![0; 100 * 80 * 3]).unwrap();
        // prompt 4 tokens (one pad = 9), turn 1: 3 tokens, observation 2 tokens (one pad), turn 2: 2.
        let tokens = vec![1, 9, 2, 3, 10, 11, 12, 4, 9, 13, 14];
        let mask = vec![0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1];
        let logprobs = vec![
            0.0, 0.0, 0.0, 0.0, -0.5, -0.25, -1.0, 0.0, 0.0, -0.125, -2.0,
        ];
        Trajectory {
            tokens,
            mask,
            logprobs,
            prompt_len: 4,
            images: vec![
                TrajectoryImage {
                    image: img,
                    source: ImageSource::Input { index: 0 },
                },
                TrajectoryImage {
                    image: crop,
                    source: ImageSource::ToolCall { call: 0 },
                },
            ],
            image_sources: vec![ImageSource::Input { index: 0 }, ImageSource::ToolCall { call: 0 }],
            image_sizes: vec![(640, 480), (100, 80)],
            tool_calls: vec![ToolCallRecord {
                turn: 0,
                raw: r#"{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 100]}}"#.into(),
                call: Some(ToolCall {
                    name: "image_zoom_in_tool".into(),
                    arguments: serde_json::json!({"bbox_2d": [10, 20, 110, 100]}),
                }),
                outcome: ToolOutcome::Ok {
                    images: 1,
                    text: None,
                    region: None,
                },
            }],
            turns: vec![
                TurnRecord {
                    context_len: 4,
                    context_images: 1,
                    generated: 3,
                    text: "<think>The sign is small.</think><tool_call>…</tool_call>".into(),
                    finish: FinishReason::Stop,
                    seed: 7,
                },
                TurnRecord {
                    context_len: 9,
                    context_images: 2,
                    generated: 2,
                    text: "<answer>STOP</answer>".into(),
                    finish: FinishReason::Stop,
                    seed: 8,
                },
            ],
            answer: Some("STOP".into()),
            stop: StopReason::Answered,
        }
    }

    fn trace() -> Trace {
        build_trace(
            &episode(),
            &PreprocessConfig::default(),
            &[Some("run-call0-0.png".into())],
            TraceHeader {
                model: ModelInfo {
                    bundle: "models/tiny".into(),
                    provider: "CPUExecutionProvider".into(),
                    gpu: false,
                    onnxruntime: "/lib/libonnxruntime.so.1.32.0".into(),
                    onnxruntime_version: "1.32.0".into(),
                },
                question: "What does the sign say?".into(),
                image: InputImage {
                    path: "street.png".into(),
                    width: 640,
                    height: 480,
                },
                seed: 3,
                agent: AgentConfig::default(),
            },
        )
        .unwrap()
    }

    #[test]
    fn the_trace_records_each_turn_exactly() {
        let t = trace();
        assert_eq!(t.turns.len(), 2);
        assert_eq!(t.turns[0].input_token_ids, vec![1, 9, 2, 3]);
        assert_eq!(t.turns[0].generated_ids, vec![10, 11, 12]);
        assert_eq!(t.turns[0].logprobs, vec![-0.5, -0.25, -1.0]);
        assert_eq!(t.turns[0].images.len(), 1);
        assert_eq!(t.turns[0].images[0].grid_thw, [1, 34, 46]);
        assert_eq!(t.turns[1].input_token_ids.len(), 9);
        assert_eq!(t.turns[1].images[1].grid_thw, [1, 6, 8]);
        assert_eq!(t.turns[1].generated_ids, vec![13, 14]);
        assert_eq!(
            t.turns[0].tool_calls[0].bbox,
            Some(serde_json::json!([10, 20, 110, 100]))
        );
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["turns"][1]["images"][1]["source"]["kind"], "tool_call");
        assert_eq!(json["answer"], "STOP");
    }

    #[test]
    fn the_printed_episode() {
        insta::assert_snapshot!(render(&trace()));
    }
}
