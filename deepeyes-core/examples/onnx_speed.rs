//! Prefill and decode speed of a bundle on the tiny model's golden two-image prompt, printed as
//! one JSON line. `scripts/bench_tiny_backend.py` runs it next to PyTorch eager on the same
//! weights.
//!
//! ```sh
//! cargo run --release -p deepeyes-core --example onnx_speed -- \
//!     tests/data/tiny-qwen2_5_vl [--threads 1] [--reps 20] [--decode 64]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use deepeyes_core::onnx::{LogitsOf, OnnxModel, OnnxOptions};
use deepeyes_core::preprocess::PixelValues;
use safetensors::SafeTensors;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).expect("golden tensor");
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

fn tensor_i64(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    st.tensor(name)
        .expect("golden tensor")
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(
        args.first()
            .map_or("tests/data/tiny-qwen2_5_vl", String::as_str),
    );
    let threads = arg(&args, "--threads", 1);
    let reps = arg(&args, "--reps", 20);
    let decode = arg(&args, "--decode", 64);

    let model = OnnxModel::load(
        root.join("bundle"),
        &OnnxOptions {
            threads,
            ..OnnxOptions::default()
        },
    )?;
    let bytes = std::fs::read(root.join("golden/golden.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (shape, pixels) = tensor_f32(&st, "pixel_values");
    let grids: Vec<[u32; 3]> = tensor_i64(&st, "image_grid_thw")
        .chunks(3)
        .map(|g| [g[0] as u32, g[1] as u32, g[2] as u32])
        .collect();
    let d = shape[1];
    let mut start = 0;
    let images: Vec<PixelValues> = grids
        .iter()
        .map(|&g| {
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
    let ids: Vec<u32> = tensor_i64(&st, "prompt_ids")
        .into_iter()
        .map(|v| v as u32)
        .collect();

    // Prefill: vision encoder for both images + embedding + decoder over the whole prompt.
    let mut prefill_s = Vec::with_capacity(reps);
    let mut prompt_len = 0;
    for rep in 0..reps + 2 {
        let t = Instant::now();
        let prompt = model.prepare(&ids, &images)?;
        let (logits, _) = model.prefill(&[&prompt], LogitsOf::Last)?;
        let dt = t.elapsed().as_secs_f64();
        prompt_len = prompt.input_ids.len();
        std::hint::black_box(&logits);
        if rep >= 2 {
            prefill_s.push(dt);
        }
    }
    // Decode: greedy steps with the KV cache after the prompt.
    let prompt = model.prepare(&ids, &images)?;
    let mut decode_s = Vec::with_capacity(reps);
    for rep in 0..reps.div_ceil(4) + 1 {
        let (logits, mut state) = model.prefill(&[&prompt], LogitsOf::Last)?;
        let mut token = argmax(&logits[0]);
        let t = Instant::now();
        for _ in 0..decode {
            let out = model.step(&mut state, &[token])?;
            token = argmax(&out[0]);
        }
        if rep >= 1 {
            decode_s.push(t.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let p = median(&mut prefill_s);
    let dstep = median(&mut decode_s);
    let json = serde_json::json!({
        "backend": "rust-ort",
        "threads": threads,
        "prompt_tokens": prompt_len,
        "prefill_ms": p * 1e3,
        "prefill_tokens_per_s": prompt_len as f64 / p,
        "decode_tokens": decode,
        "decode_ms_per_token": dstep * 1e3 / decode as f64,
        "decode_tokens_per_s": decode as f64 / dstep,
    });
    #[allow(clippy::print_stdout)]
    {
        println!("{json}");
    }
    Ok(())
}
