//! `deepeyes preprocess`: show what the Qwen2.5-VL preprocessing makes of one image (sizes, grid,
//! how many image tokens the prompt must hold) and optionally dump the pixel values, to debug
//! image-token count mismatches.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::preprocess::npy::save_npy_f32;
use deepeyes_core::preprocess::preprocess_image;
use deepeyes_core::{Image, ImageLimits, PreprocessConfig};

/// Arguments of `deepeyes preprocess`.
#[derive(Debug, Args)]
pub(crate) struct PreprocessArgs {
    /// The image file (PNG, JPEG, WebP, GIF, BMP or TIFF).
    #[arg(long)]
    image: PathBuf,
    /// Smallest area after resizing, in pixels [default: 3136 = 4·28²].
    #[arg(long, value_name = "N")]
    min_pixels: Option<u64>,
    /// Largest area after resizing, in pixels [default: 12845056 = 16384·28²].
    #[arg(long, value_name = "N")]
    max_pixels: Option<u64>,
    /// Write the pixel values to this file as a float32 .npy array of shape (patches, 1176).
    #[arg(long, value_name = "FILE.npy")]
    out: Option<PathBuf>,
}

/// Preprocesses the image and prints the report.
pub(crate) fn run(args: PreprocessArgs) -> anyhow::Result<ExitCode> {
    let defaults = PreprocessConfig::default();
    let cfg = PreprocessConfig {
        min_pixels: args.min_pixels.unwrap_or(defaults.min_pixels),
        max_pixels: args.max_pixels.unwrap_or(defaults.max_pixels),
        ..defaults
    };
    cfg.validate("command line")?;
    let image = Image::open(&args.image, &ImageLimits::default())?;
    let pixels = preprocess_image(&image, &cfg)
        .with_context(|| format!("preprocessing {}", args.image.display()))?;

    let [t, gh, gw] = pixels.grid_thw;
    let merge = cfg.merge_size * cfg.merge_size;
    let tokens = pixels.num_patches() / merge as usize;
    let (mut min, mut max, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
    for &v in &pixels.data {
        min = min.min(v);
        max = max.max(v);
        sum += f64::from(v);
    }
    let mean = sum / pixels.data.len().max(1) as f64;

    let mut out = std::io::stdout().lock();
    writeln!(out, "image:             {}", args.image.display())?;
    writeln!(
        out,
        "original (h × w):  {} × {}",
        image.height(),
        image.width()
    )?;
    writeln!(
        out,
        "resized (h × w):   {} × {}  (multiples of {}, area in [{}, {}])",
        pixels.resized.0,
        pixels.resized.1,
        cfg.factor(),
        cfg.min_pixels,
        cfg.max_pixels
    )?;
    writeln!(out, "grid (t, h, w):    ({t}, {gh}, {gw})")?;
    writeln!(
        out,
        "pixel values:      {} × {} float32",
        pixels.num_patches(),
        pixels.patch_dim()
    )?;
    writeln!(
        out,
        "image tokens:      {tokens}  (<|vision_start|> + {tokens} × <|image_pad|> + <|vision_end|>)"
    )?;
    writeln!(
        out,
        "value range:       min {min:.4}, mean {mean:.4}, max {max:.4}"
    )?;
    if let Some(path) = &args.out {
        save_npy_f32(path, &pixels.shape(), &pixels.data)?;
        writeln!(out, "wrote:             {}", path.display())?;
    }
    Ok(ExitCode::SUCCESS)
}
