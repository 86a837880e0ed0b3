//! Crop and resize helpers on [`Image`], built on `fast_image_resize`.
//!
//! A crop copies only the pixels of its rectangle (never the whole image); a crop followed by a
//! resize is one fused pass that reads the source rectangle in place. [`crop_to_model_input`] is
//! the path a model backend takes for every image: crop (optional), then Qwen2.5-VL's smart
//! resize, with bicubic (Catmull-Rom) resampling as HF's image processor uses.

use std::cell::RefCell;

use deepeyes_core::{Image, ImageLimits, PreprocessConfig};
use fast_image_resize as fir;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::CropRect;

/// A resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (triangle) filter.
    Bilinear,
    /// Bicubic Catmull-Rom, the equivalent of Pillow's `BICUBIC` (HF's Qwen2-VL default).
    #[default]
    CatmullRom,
    /// Lanczos with a radius of 3.
    Lanczos3,
}

impl Filter {
    fn algorithm(self) -> fir::ResizeAlg {
        match self {
            Self::Nearest => fir::ResizeAlg::Nearest,
            Self::Bilinear => fir::ResizeAlg::Convolution(fir::FilterType::Bilinear),
            Self::CatmullRom => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
            Self::Lanczos3 => fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3),
        }
    }
}

thread_local! {
    // The resizer keeps scratch buffers between calls; one per thread avoids reallocating them.
    static RESIZER: RefCell<fir::Resizer> = RefCell::new(fir::Resizer::new());
}

fn check_rect(op: &'static str, image: &Image, rect: CropRect) -> Result<()> {
    if rect.fits(image.width(), image.height()) {
        Ok(())
    } else {
        Err(Error::image(
            op,
            format!(
                "rectangle {rect} is empty or does not lie inside the {}×{} image",
                image.width(),
                image.height()
            ),
        ))
    }
}

fn check_output(op: &'static str, width: u32, height: u32) -> Result<()> {
    let limit = ImageLimits::default().max_pixels;
    if width == 0 || height == 0 {
        return Err(Error::image(
            op,
            format!("output size {width}×{height} is empty"),
        ));
    }
    if u64::from(width) * u64::from(height) > limit {
        return Err(Error::image(
            op,
            format!("output size {width}×{height} exceeds the limit of {limit} pixels"),
        ));
    }
    Ok(())
}

/// Bytes of intermediate rows one band may hold (a share of a typical L2 cache).
const BAND_BYTES: f64 = (BAND_KIB * 1024) as f64;
const BAND_KIB: usize = 512;

/// Output rows per band for an output `width` px wide and a vertical scale of `scale_y` source
/// rows per output row.
fn band_rows(width: u32, scale_y: f64) -> u32 {
    let intermediate_row = f64::from(width) * 3.0 * scale_y.max(1.0);
    ((BAND_BYTES / intermediate_row) as u32).max(16)
}

/// Output images smaller than this many pixels are resized on the calling thread only: below it,
/// starting a second thread costs more than it saves.
const PARALLEL_MIN_PIXELS: u64 = 1 << 18;

/// The fewest output rows worth giving a thread of their own.
const MIN_STRIPE_ROWS: usize = 128;

/// The number of threads [`crop_resize`] uses for large outputs: the cores the process may use,
/// at most 8 (the resize is memory-bound beyond that).
pub fn default_resize_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Crops `rect` out of `image` and resizes it to `width × height` in one pass, splitting large
/// outputs across [`default_resize_threads`] threads.
pub fn crop_resize(
    image: &Image,
    rect: CropRect,
    width: u32,
    height: u32,
    filter: Filter,
) -> Result<Image> {
    crop_resize_threads(image, rect, width, height, filter, default_resize_threads())
}

/// [`crop_resize`] with an explicit thread count (1 = the calling thread only). The output is
/// identical for every thread count: each thread resizes a horizontal stripe of output rows, and
/// a stripe reads the source pixels beyond its edges exactly as the whole resize would.
pub fn crop_resize_threads(
    image: &Image,
    rect: CropRect,
    width: u32,
    height: u32,
    filter: Filter,
    threads: usize,
) -> Result<Image> {
    check_rect("crop-resize", image, rect)?;
    check_output("crop-resize", width, height)?;
    if (rect.width, rect.height) == (width, height) {
        return Ok(image.crop(rect)?);
    }
    let src = fir::images::ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        fir::PixelType::U8x3,
    )
    .map_err(|e| Error::image("crop-resize", format!("source image: {e}")))?;
    let row_bytes = width as usize * 3;
    let mut out = vec![0u8; row_bytes * height as usize];
    let threads = if u64::from(width) * u64::from(height) < PARALLEL_MIN_PIXELS {
        1
    } else {
        // Each stripe re-reads a few source rows beyond its edges; keep stripes tall enough
        // that this stays negligible (a 3000×84 strip is faster on one thread).
        threads.clamp(1, (height as usize / MIN_STRIPE_ROWS).max(1))
    };
    if threads == 1 {
        resize_stripe(&src, rect, width, height, 0, &mut out, filter)?;
    } else {
        let rows_per_thread = (height as usize).div_ceil(threads);
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = out
                .chunks_mut(rows_per_thread * row_bytes)
                .enumerate()
                .map(|(i, stripe)| {
                    let src = &src;
                    let first_row = (i * rows_per_thread) as u32;
                    scope.spawn(move || {
                        resize_stripe(src, rect, width, height, first_row, stripe, filter)
                    })
                })
                .collect();
            for worker in workers {
                worker
                    .join()
                    .map_err(|_| Error::image("crop-resize", "a resize thread panicked"))??;
            }
            Ok(())
        })?;
    }
    Ok(Image::from_raw(width, height, out)?)
}

/// Resizes the output rows `first_row..first_row + stripe.len() / (3·width)` of the crop-resize
/// of `rect` to `width × height` into `stripe`.
fn resize_stripe(
    src: &fir::images::ImageRef<'_>,
    rect: CropRect,
    width: u32,
    height: u32,
    first_row: u32,
    stripe: &mut [u8],
    filter: Filter,
) -> Result<()> {
    let rows = (stripe.len() / (width as usize * 3)) as u32;
    let mut dst = fir::images::Image::from_slice_u8(width, rows, stripe, fir::PixelType::U8x3)
        .map_err(|e| Error::image("crop-resize", e.to_string()))?;
    // Cache blocking: resize in bands of output rows so the intermediate (horizontally resampled)
    // rows of a band stay in cache instead of streaming a whole-image buffer through memory.
    // Each band is the same resize restricted to a sub-box of the source, and the filter reads
    // source pixels beyond a box edge just as beyond a crop edge, so the bands join seamlessly.
    let scale_y = f64::from(rect.height) / f64::from(height);
    let band = band_rows(width, scale_y).min(rows);
    RESIZER.with(|r| -> Result<()> {
        let mut resizer = r.borrow_mut();
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + band).min(rows);
            let top = f64::from(rect.y) + f64::from(first_row + r0) * scale_y;
            let bottom = f64::from(rect.y) + f64::from(first_row + r1) * scale_y;
            let options = fir::ResizeOptions::new()
                .resize_alg(filter.algorithm())
                .crop(f64::from(rect.x), top, f64::from(rect.width), bottom - top);
            let mut view = fir::images::CroppedImageMut::new(&mut dst, 0, r0, width, r1 - r0)
                .map_err(|e| Error::image("crop-resize", e.to_string()))?;
            resizer
                .resize(src, &mut view, &options)
                .map_err(|e| Error::image("crop-resize", e.to_string()))?;
            r0 = r1;
        }
        Ok(())
    })
}

/// Resizes the whole of `image` to `width × height`.
pub fn resize(image: &Image, width: u32, height: u32, filter: Filter) -> Result<Image> {
    crop_resize(
        image,
        CropRect::full(image.width(), image.height()),
        width,
        height,
        filter,
    )
}

/// Crops `rect` (the whole image when `None`) and resizes it to the size the model takes it at:
/// Qwen2.5-VL's smart resize under `preprocess` (sides multiples of 28, area within the min/max
/// pixel bounds).
pub fn crop_to_model_input(
    image: &Image,
    rect: Option<CropRect>,
    preprocess: &PreprocessConfig,
    filter: Filter,
) -> Result<Image> {
    let rect = rect.unwrap_or_else(|| CropRect::full(image.width(), image.height()));
    check_rect("crop-to-model-input", image, rect)?;
    let (h, w) = preprocess.smart_resize(rect.height, rect.width)?;
    crop_resize(image, rect, w, h, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic gradient-and-noise test image.
    fn pattern(w: u32, h: u32) -> Image {
        let mut raw = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3u32 {
                    raw.push(((x * 7 + y * 13 + c * 85 + (x * y) % 31) % 256) as u8);
                }
            }
        }
        Image::from_raw(w, h, raw).unwrap()
    }

    #[test]
    fn crop_copies_exactly_the_rectangle() {
        let img = pattern(50, 40);
        let rect = CropRect::from_edges(3, 5, 20, 31).unwrap();
        let out = img.crop(rect).unwrap();
        assert_eq!((out.width(), out.height()), (17, 26));
        for y in 0..26 {
            for x in 0..17 {
                assert_eq!(out.rgb().get_pixel(x, y), img.rgb().get_pixel(x + 3, y + 5));
            }
        }
    }

    #[test]
    fn crop_rejects_rectangles_outside() {
        let img = pattern(10, 10);
        let err = img
            .crop(CropRect::from_edges(5, 5, 11, 8).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("10×10"), "{err}");
        let empty = CropRect {
            x: 0,
            y: 0,
            width: 0,
            height: 3,
        };
        assert!(img.crop(empty).is_err());
    }

    #[test]
    fn threaded_crop_resize_equals_single_threaded() {
        // Above PARALLEL_MIN_PIXELS, so 2 and 3 threads really split the output into stripes.
        let img = pattern(900, 700);
        let rect = CropRect::from_edges(37, 21, 837, 661).unwrap();
        for (w, h) in [(812, 644), (560, 476)] {
            let one = crop_resize_threads(&img, rect, w, h, Filter::CatmullRom, 1).unwrap();
            for threads in [2, 3] {
                let many =
                    crop_resize_threads(&img, rect, w, h, Filter::CatmullRom, threads).unwrap();
                assert!(
                    one.as_raw() == many.as_raw(),
                    "{threads} threads differ from one at {w}×{h}"
                );
            }
        }
    }

    #[test]
    fn crop_resize_matches_crop_then_resize() {
        let img = pattern(120, 90);
        let rect = CropRect::from_edges(10, 20, 90, 80).unwrap();
        let fused = crop_resize(&img, rect, 40, 30, Filter::CatmullRom).unwrap();
        let cropped = img.crop(rect).unwrap();
        let two_step = resize(&cropped, 40, 30, Filter::CatmullRom).unwrap();
        assert_eq!((fused.width(), fused.height()), (40, 30));
        // The fused pass may read pixels just outside the crop for its filter support; away from
        // the border the two must agree.
        let (mut sum, mut n) = (0u64, 0u64);
        for y in 3..27 {
            for x in 3..37 {
                let a = fused.rgb().get_pixel(x, y).0;
                let b = two_step.rgb().get_pixel(x, y).0;
                for c in 0..3 {
                    sum += u64::from(a[c].abs_diff(b[c]));
                    n += 1;
                }
            }
        }
        assert!(
            sum as f64 / (n as f64) < 1.0,
            "mean abs diff {}",
            sum as f64 / n as f64
        );
    }

    #[test]
    fn banded_resize_matches_a_single_pass() {
        // Tall enough for several bands in both directions of scaling.
        let img = pattern(300, 2400);
        for (w, h) in [(290, 2500), (150, 1000), (310, 2300)] {
            let rect = CropRect::from_edges(5, 7, 297, 2390).unwrap();
            assert!(h > band_rows(w, f64::from(rect.height) / f64::from(h)));
            let banded = crop_resize(&img, rect, w, h, Filter::CatmullRom).unwrap();
            let src =
                fir::images::ImageRef::new(300, 2400, img.as_raw(), fir::PixelType::U8x3).unwrap();
            let mut whole = fir::images::Image::new(w, h, fir::PixelType::U8x3);
            let options = fir::ResizeOptions::new()
                .resize_alg(Filter::CatmullRom.algorithm())
                .crop(5.0, 7.0, 292.0, 2383.0);
            fir::Resizer::new()
                .resize(&src, &mut whole, &options)
                .unwrap();
            let diffs: Vec<u8> = banded
                .as_raw()
                .iter()
                .zip(whole.buffer())
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let max = diffs.iter().copied().max().unwrap();
            let changed = diffs.iter().filter(|&&d| d > 0).count();
            assert!(max <= 1, "{w}×{h}: max diff {max}");
            assert!(
                changed * 1000 < diffs.len(),
                "{w}×{h}: {changed} values differ"
            );
        }
    }

    #[test]
    fn uniform_image_stays_uniform() {
        let img = Image::from_rgb(image::RgbImage::from_pixel(
            64,
            48,
            image::Rgb([9, 99, 199]),
        ))
        .unwrap();
        for filter in [
            Filter::Nearest,
            Filter::Bilinear,
            Filter::CatmullRom,
            Filter::Lanczos3,
        ] {
            let out = resize(&img, 23, 91, filter).unwrap();
            assert!(
                out.rgb().pixels().all(|p| p.0 == [9, 99, 199]),
                "{filter:?}"
            );
        }
    }

    #[test]
    fn model_input_size_is_smart_resized() {
        let pre = PreprocessConfig::default();
        let img = pattern(300, 200);
        let out = crop_to_model_input(&img, None, &pre, Filter::CatmullRom).unwrap();
        let (h, w) = pre.smart_resize(200, 300).unwrap();
        assert_eq!((out.height(), out.width()), (h, w));
        // A tiny crop is upscaled to at least min_pixels.
        let rect = CropRect::from_edges(0, 0, 10, 10).unwrap();
        let out = crop_to_model_input(&img, Some(rect), &pre, Filter::CatmullRom).unwrap();
        assert_eq!((out.width(), out.height()), (56, 56));
    }

    #[test]
    fn output_size_limits() {
        let img = pattern(8, 8);
        assert!(resize(&img, 0, 8, Filter::Nearest).is_err());
        let err = resize(&img, 100_000, 100_000, Filter::Nearest).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }
}
