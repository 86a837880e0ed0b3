//! Update-step time of the burn Qwen2.5-VL: forward + backward + AdamW on a batch of token
//! sequences, per step and per token, against the feasibility probe (burn 0.22.1, a 0.92M-param
//! pre-LN transformer, batch 8×64: 64 ms/step with ndarray, 60 ms with flex).
//!
//! `cargo bench -p deepeyes-rl --bench model_step` prints a summary table first (mean of 8 timed
//! steps after 2 warm-up steps), then criterion's measurements.

#![allow(clippy::print_stdout, missing_docs)]

use std::time::{Duration, Instant};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use criterion::{Criterion, criterion_group};
use deepeyes_rl::network::{
    Batch, ComputeDevice, ImageInput, PadLayout, Qwen25Vl, Qwen25VlConfig, Sequence, tensor2,
};

/// The feasibility figure: ms per step of the 0.92M-param probe at batch 8×64.
const FEASIBILITY_MS_PER_STEP: f64 = 64.0;
const FEASIBILITY_TOKENS: usize = 8 * 64;

struct Case {
    name: &'static str,
    config: Qwen25VlConfig,
    batch: Batch,
}

/// A decoder sized like the feasibility probe: hidden 128, 4 heads, FF 512, 2 layers, vocab 2048.
fn probe_sized() -> Qwen25VlConfig {
    let mut c = Qwen25VlConfig::tiny();
    c.text.vocab_size = 2048;
    c.text.hidden_size = 128;
    c.text.intermediate_size = 512;
    c.text.num_attention_heads = 4;
    c.text.num_key_value_heads = 4;
    c.text.mrope_section = [8, 4, 4];
    c.vision.out_hidden_size = 128;
    c.image_token_id = 2047;
    c.video_token_id = 2046;
    c.vision_start_token_id = 2045;
    c.vision_end_token_id = 2044;
    c
}

fn text_batch(cfg: &Qwen25VlConfig, rows: usize, len: usize) -> Batch {
    let seqs: Vec<Sequence> = (0..rows)
        .map(|r| Sequence {
            score_from: 0,
            tokens: (0..len)
                .map(|i| ((r * 131 + i * 17) % 1000) as u32)
                .collect(),
            images: vec![],
        })
        .collect();
    Batch::new(cfg, &seqs, PadLayout::OnePerImage).expect("text batch")
}

/// Rows of 64 expanded tokens: a 8×8-patch image (16 tokens) between text.
fn multimodal_batch(cfg: &Qwen25VlConfig, rows: usize) -> Batch {
    let pd = cfg.vision.patch_dim();
    let seqs: Vec<Sequence> = (0..rows)
        .map(|r| {
            let mut tokens: Vec<u32> = (0..20).map(|i| ((r * 37 + i * 11) % 1000) as u32).collect();
            tokens.extend([
                cfg.vision_start_token_id,
                cfg.image_token_id,
                cfg.vision_end_token_id,
            ]);
            tokens.extend((0..26).map(|i| ((r * 53 + i * 7) % 1000) as u32));
            Sequence {
                score_from: 0,
                tokens,
                images: vec![ImageInput {
                    grid: [1, 8, 8],
                    patches: (0..64 * pd)
                        .map(|i| ((i + r) as f32 * 0.013).sin())
                        .collect(),
                }],
            }
        })
        .collect();
    Batch::new(cfg, &seqs, PadLayout::OnePerImage).expect("multimodal batch")
}

/// Rows shaped like a TinyEyes zoom episode: 70 tokens, two 8×8-patch images (16 merged tokens
/// each), so 100 expanded positions.
fn tinyeyes_batch(cfg: &Qwen25VlConfig, rows: usize) -> Batch {
    let pd = cfg.vision.patch_dim();
    let image = |r: usize, k: usize| ImageInput {
        grid: [1, 8, 8],
        patches: (0..64 * pd)
            .map(|i| ((i + 7 * r + 131 * k) as f32 * 0.013).sin())
            .collect(),
    };
    let text = |r: usize, n: usize, salt: usize| {
        (0..n).map(move |i| (20 + (r * 37 + i * 11 + salt) % 600) as u32)
    };
    let seqs: Vec<Sequence> = (0..rows)
        .map(|r| {
            let marker = [
                cfg.vision_start_token_id,
                cfg.image_token_id,
                cfg.vision_end_token_id,
            ];
            let mut tokens: Vec<u32> = text(r, 3, 0).collect();
            tokens.extend(marker);
            tokens.extend(text(r, 40, 1));
            tokens.extend(marker);
            tokens.extend(text(r, 21, 2));
            Sequence {
                score_from: 0,
                tokens,
                images: vec![image(r, 0), image(r, 1)],
            }
        })
        .collect();
    Batch::new(cfg, &seqs, PadLayout::OnePerImage).expect("TinyEyes batch")
}

fn cases() -> Vec<Case> {
    let tiny = Qwen25VlConfig::tiny();
    let tinyeyes = deepeyes_rl::tinyeyes::tinyeyes_model_config(688);
    let probe = probe_sized();
    vec![
        Case {
            name: "probe-sized decoder, text 8x64",
            batch: text_batch(&probe, 8, 64),
            config: probe,
        },
        Case {
            name: "tiny Qwen2.5-VL, text 8x64",
            batch: text_batch(&tiny, 8, 64),
            config: tiny.clone(),
        },
        Case {
            name: "tiny Qwen2.5-VL, 8x(48 text + 16 image)",
            batch: multimodal_batch(&tiny, 8),
            config: tiny,
        },
        Case {
            name: "TinyEyes, 32x(70 tokens + 2 images)",
            batch: tinyeyes_batch(&tinyeyes, 32),
            config: tinyeyes,
        },
    ]
}

struct Trainer {
    model: Option<Qwen25Vl>,
    optim: burn::optim::ModuleOptimizer,
    device: Device,
}

impl Trainer {
    fn new(cfg: &Qwen25VlConfig) -> Self {
        let device = ComputeDevice::Flex.device(true).expect("device");
        Self {
            model: Some(Qwen25Vl::random(cfg, 1, &device).expect("model")),
            optim: AdamWConfig::new().with_weight_decay(0.01).init(),
            device,
        }
    }

    /// One GRPO-shaped update: per-token weights times log-probs, backward, AdamW.
    fn step(&mut self, batch: &Batch) {
        let model = self.model.take().expect("model");
        let scores = model.score_tokens(batch, false).expect("scores");
        let w: Vec<f32> = scores.mask.iter().map(|m| m * 0.01).collect();
        let w = tensor2(w, batch.batch, batch.score_len, &self.device).expect("weights");
        let grads = (w * scores.logprobs).sum().neg().backward();
        let grads = GradientsParams::from_grads(grads, &model);
        self.model = Some(self.optim.step(1e-4, model, grads));
    }
}

fn summary() {
    println!("burn Qwen2.5-VL update step (forward + backward + AdamW), flex CPU backend");
    println!(
        "feasibility probe: {FEASIBILITY_MS_PER_STEP:.0} ms/step, {:.3} ms/token (0.92M params, 8x64)",
        FEASIBILITY_MS_PER_STEP / FEASIBILITY_TOKENS as f64
    );
    for case in cases() {
        let mut t = Trainer::new(&case.config);
        let params = t.model.as_ref().map_or(0, burn::module::Module::num_params);
        for _ in 0..2 {
            t.step(&case.batch);
        }
        let steps = 8;
        let start = Instant::now();
        for _ in 0..steps {
            t.step(&case.batch);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(steps);
        let tokens = case.batch.lengths.iter().sum::<usize>();
        println!(
            "{:<42} params {:>8}  tokens {:>4}  {:>8.1} ms/step  {:.3} ms/token  ({:.2}x the probe per token)",
            case.name,
            params,
            tokens,
            ms,
            ms / tokens as f64,
            (ms / tokens as f64) / (FEASIBILITY_MS_PER_STEP / FEASIBILITY_TOKENS as f64)
        );
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("model_step");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for case in cases() {
        let mut t = Trainer::new(&case.config);
        group.bench_function(case.name, |b| b.iter(|| t.step(&case.batch)));
    }
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    summary();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
