//! Times `preprocess_image` on image files and prints one JSON object per image; the Rust half
//! of `scripts/bench_preprocess.py`, which runs transformers' processor on the same files.
//!
//! ```text
//! cargo run --release -p deepeyes-core --no-default-features --example bench_preprocess -- \
//!     [--iters N] [--min-time-ms T] [--dump DIR] IMAGE...
//! ```
//!
//! Decoding is not timed. `--dump DIR` writes each image's pixel values to `DIR/<stem>.npy` so
//! the script can compare them with transformers' output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use deepeyes_core::preprocess::npy::save_npy_f32;
use deepeyes_core::preprocess::{Preprocessor, normalize_patchify, preprocess_image, resize_rgb};
use deepeyes_core::{Image, ImageLimits, PreprocessConfig};

struct Options {
    iters: usize,
    min_time_ms: f64,
    dump: Option<PathBuf>,
    images: Vec<PathBuf>,
}

fn parse() -> Result<Options, String> {
    let mut opts = Options {
        iters: 20,
        min_time_ms: 0.0,
        dump: None,
        images: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--iters" => {
                opts.iters = value("--iters")?
                    .parse()
                    .map_err(|e| format!("--iters: {e}"))?;
            }
            "--min-time-ms" => {
                opts.min_time_ms = value("--min-time-ms")?
                    .parse()
                    .map_err(|e| format!("--min-time-ms: {e}"))?;
            }
            "--dump" => opts.dump = Some(PathBuf::from(value("--dump")?)),
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
            path => opts.images.push(PathBuf::from(path)),
        }
    }
    if opts.images.is_empty() || opts.iters == 0 {
        return Err(
            "usage: bench_preprocess [--iters N] [--min-time-ms T] [--dump DIR] IMAGE...".into(),
        );
    }
    Ok(opts)
}

/// User + system CPU time of this process (all threads, finished ones included) from
/// `/proc/self/stat`, in seconds; `None` off Linux. The kernel counts in ticks of 1/100 s, so it
/// is read around a whole timing loop, not around one call.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn bench(path: &Path, opts: &Options, cfg: &PreprocessConfig) -> Result<String, String> {
    let image = Image::open(path, &ImageLimits::default()).map_err(|e| e.to_string())?;
    // One untimed run (page faults of the first allocation, lazy CPU feature detection).
    let pixels = preprocess_image(&image, cfg).map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(opts.iters);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    while times.len() < opts.iters || started.elapsed().as_secs_f64() * 1e3 < opts.min_time_ms {
        let t = Instant::now();
        let out = preprocess_image(&image, cfg).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    // CPU time per call, all threads: on a shared machine the wall-clock time of a long call
    // also counts the time other processes held the cores.
    let cpu_ms = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) => format!("{:.4}", (b - a) * 1e3 / times.len() as f64),
        _ => "null".into(),
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // The same through one `Preprocessor` and one reused output buffer: no allocation at all.
    let mut pre = Preprocessor::new(*cfg).map_err(|e| e.to_string())?;
    let mut buffer = Vec::new();
    let images = [image.clone()];
    let mut reuse_times = Vec::with_capacity(times.len());
    pre.preprocess_into(&images, &mut buffer)
        .map_err(|e| e.to_string())?;
    let cpu_before = process_cpu_seconds();
    for _ in 0..times.len() {
        let t = Instant::now();
        pre.preprocess_into(&images, &mut buffer)
            .map_err(|e| e.to_string())?;
        reuse_times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&buffer);
    }
    let reuse_cpu_ms = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) => format!("{:.4}", (b - a) * 1e3 / reuse_times.len() as f64),
        _ => "null".into(),
    };
    reuse_times.sort_by(f64::total_cmp);
    let reuse_median = reuse_times[reuse_times.len() / 2];
    // The two stages alone, as many runs again.
    let (h, w) = cfg
        .smart_resize(image.height(), image.width())
        .map_err(|e| e.to_string())?;
    let mut resize_times = Vec::with_capacity(times.len());
    let mut patchify_times = Vec::with_capacity(times.len());
    for _ in 0..times.len() {
        let t = Instant::now();
        let resized = resize_rgb(&image, h, w, cfg.resample).map_err(|e| e.to_string())?;
        resize_times.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let out = normalize_patchify(&resized, cfg).map_err(|e| e.to_string())?;
        patchify_times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    resize_times.sort_by(f64::total_cmp);
    patchify_times.sort_by(f64::total_cmp);
    let resize_median = resize_times[resize_times.len() / 2];
    let patchify_median = patchify_times[patchify_times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    if let Some(dir) = &opts.dump {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default();
        save_npy_f32(
            dir.join(format!("{stem}.npy")),
            &pixels.shape(),
            &pixels.data,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(format!(
        "{{\"image\": {:?}, \"height\": {}, \"width\": {}, \"resized\": [{}, {}], \"grid_thw\": [{}, {}, {}], \
         \"runs\": {}, \"median_ms\": {median:.4}, \"mean_ms\": {mean:.4}, \"min_ms\": {:.4}, \
         \"cpu_ms\": {cpu_ms}, \
         \"reused_buffer_median_ms\": {reuse_median:.4}, \"reused_buffer_cpu_ms\": {reuse_cpu_ms}, \"resize_median_ms\": {resize_median:.4}, \
         \"patchify_median_ms\": {patchify_median:.4}}}",
        path.display().to_string(),
        image.height(),
        image.width(),
        pixels.resized.0,
        pixels.resized.1,
        pixels.grid_thw[0],
        pixels.grid_thw[1],
        pixels.grid_thw[2],
        times.len(),
        times[0],
    ))
}

fn main() -> std::process::ExitCode {
    let opts = match parse() {
        Ok(opts) => opts,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = PreprocessConfig::default();
    let mut out = std::io::stdout().lock();
    for path in &opts.images {
        match bench(path, &opts, &cfg) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "{}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
