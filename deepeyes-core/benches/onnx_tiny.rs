//! Criterion benches of the ONNX Runtime backend on the tiny Qwen2.5-VL fixture: the multimodal
//! prefill of the golden two-image prompt (265 tokens) and one decode step with the KV cache.
//! Needs the ONNX Runtime library (`scripts/setup_ort.sh`). For the side-by-side comparison with
//! PyTorch eager, run `scripts/bench_tiny_backend.py`.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deepeyes_core::onnx::{LogitsOf, OnnxModel, OnnxOptions, PreparedPrompt};
use deepeyes_core::preprocess::PixelValues;
use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-qwen2_5_vl")
}

fn load() -> (OnnxModel, Vec<u32>, Vec<PixelValues>) {
    let model = OnnxModel::load(
        fixture().join("bundle"),
        &OnnxOptions {
            threads: 1,
            ..OnnxOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(fixture().join("golden/golden.safetensors")).expect("golden file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name)
            .expect("tensor")
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let px = st.tensor("pixel_values").expect("pixels");
    let d = px.shape()[1];
    let pixels: Vec<f32> = px
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut start = 0;
    let images = i64s("image_grid_thw")
        .chunks(3)
        .map(|g| {
            let g = [g[0] as u32, g[1] as u32, g[2] as u32];
            let n = (g[0] * g[1] * g[2]) as usize;
            let data = pixels[start * d..(start + n) * d].to_vec();
            start += n;
            PixelValues {
                data,
                grid_thw: g,
                resized: (g[1] * 14, g[2] * 14),
            }
        })
        .collect();
    let ids = i64s("prompt_ids").into_iter().map(|v| v as u32).collect();
    (model, ids, images)
}

fn benches(c: &mut Criterion) {
    let (model, ids, images) = load();
    let prompt: PreparedPrompt = model.prepare(&ids, &images).expect("prepare");
    let mut g = c.benchmark_group("onnx_tiny");
    g.throughput(Throughput::Elements(prompt.input_ids.len() as u64));
    g.bench_function("prefill_two_images", |b| {
        b.iter(|| {
            let p = model.prepare(&ids, &images).expect("prepare");
            model.prefill(&[&p], LogitsOf::Last).expect("prefill")
        });
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_step", |b| {
        let (_, mut state) = model.prefill(&[&prompt], LogitsOf::Last).expect("prefill");
        let mut n = 0;
        b.iter(|| {
            // Restart from the prompt now and then so the cache stays short.
            if n % 256 == 0 {
                state = model
                    .prefill(&[&prompt], LogitsOf::Last)
                    .expect("prefill")
                    .1;
            }
            n += 1;
            model.step(&mut state, &[7]).expect("step")
        });
    });
    g.finish();
}

criterion_group!(onnx, benches);
criterion_main!(onnx);
