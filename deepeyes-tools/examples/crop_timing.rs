//! Times `crop_to_model_input` (crop + smart resize, bicubic) on the bench crops of a 4000×3000
//! image and prints the medians as JSON; `scripts/bench_crop_pillow.py` runs it and times Pillow
//! on the same crops in the same run.
//!
//! ```text
//! cargo run --release -p deepeyes-tools --example crop_timing -- [--reps N] [--threads N] [--dump DIR]
//! ```
//! `--threads N` fixes the resize thread count (default: as `crop_to_model_input`, every core).
//! `--dump DIR` writes each output as raw RGB (`crop_<i>.rgb`) so the script can compare pixels.

use std::io::Write;
use std::time::Instant;

use deepeyes_core::PreprocessConfig;
use deepeyes_tools::resize::{Filter, crop_resize_threads, default_resize_threads};

#[path = "../benches/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut reps = 15usize;
    let mut dump: Option<std::path::PathBuf> = None;
    let mut threads = default_resize_threads();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => reps = args.next().ok_or("--reps needs a value")?.parse()?,
            "--threads" => threads = args.next().ok_or("--threads needs a value")?.parse()?,
            "--dump" => dump = Some(args.next().ok_or("--dump needs a directory")?.into()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let reps = reps.max(1);
    let (width, height) = (4000, 3000);
    let image = common::bench_image(width, height);
    let pre = PreprocessConfig::default();
    let mut results = Vec::new();
    for (i, &rect) in common::BENCH_CROPS.iter().enumerate() {
        // Exactly `crop_to_model_input`, with the thread count made explicit.
        let (out_h, out_w) = pre.smart_resize(rect.height, rect.width)?;
        let run = || crop_resize_threads(&image, rect, out_w, out_h, Filter::CatmullRom, threads);
        // One warm-up run (allocations, resizer buffers), then `reps` timed runs.
        let out = run()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            let timed = run()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(timed);
        }
        times.sort_by(f64::total_cmp);
        if let Some(dir) = &dump {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("crop_{i}.rgb")), out.as_raw())?;
        }
        results.push(serde_json::json!({
            "x": rect.x, "y": rect.y, "width": rect.width, "height": rect.height,
            "out_width": out.width(), "out_height": out.height(),
            "median_ms": times[times.len() / 2],
            "min_ms": times[0],
        }));
    }
    let report = serde_json::json!({
        "image": [width, height],
        "filter": "catmull-rom",
        "reps": reps,
        "threads": threads,
        "results": results,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{report}")?;
    Ok(())
}
