//! Qwen2.5-VL image preprocessing: smart resize, visual token counts, and the pixel pipeline
//! (bicubic resize, CLIP normalisation, patchify into merge-window order).
//!
//! The geometry ([`smart_resize`], [`PreprocessConfig::grid_thw`]) is what the agent loop (token
//! budgets) and the tools (coordinate frames) need; [`preprocess_image`] produces the
//! `pixel_values` a vision encoder consumes, laid out exactly as transformers'
//! `Qwen2VLImageProcessor` lays them out.

mod pattern;
mod pixels;

pub mod npy;

pub use pattern::{PatternKind, test_pattern};
pub use pixels::{
    PixelValues, Preprocessor, normalize_patchify, preprocess_image, preprocess_images, resize_rgb,
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// OpenAI CLIP's per-channel mean (RGB), used by Qwen2-VL and Qwen2.5-VL.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_67, 0.457_827_5, 0.408_210_72];
/// OpenAI CLIP's per-channel standard deviation (RGB), used by Qwen2-VL and Qwen2.5-VL.
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

/// The resampling filter of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResampleFilter {
    /// Nearest neighbour.
    Nearest,
    /// Linear interpolation (a triangle filter, widened when downscaling).
    Bilinear,
    /// Cubic convolution with `a = -0.5` (Catmull-Rom, Pillow's `BICUBIC`), widened when
    /// downscaling: what Qwen2.5-VL's processor uses.
    #[default]
    Bicubic,
    /// Lanczos with three lobes.
    Lanczos3,
}

/// Parameters of Qwen2.5-VL's image preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PreprocessConfig {
    /// Side of one vision patch in pixels (14 for Qwen2.5-VL).
    pub patch_size: u32,
    /// Patches merged per side into one language token (2 for Qwen2.5-VL).
    pub merge_size: u32,
    /// Frames per temporal patch (2; a still image is repeated).
    pub temporal_patch_size: u32,
    /// Smallest `height * width` after resizing.
    pub min_pixels: u64,
    /// Largest `height * width` after resizing.
    pub max_pixels: u64,
    /// Largest accepted `long side / short side`.
    pub max_aspect_ratio: f64,
    /// Per-channel (RGB) mean subtracted from pixels scaled to `[0, 1]`.
    pub image_mean: [f32; 3],
    /// Per-channel (RGB) standard deviation the centred pixels are divided by.
    pub image_std: [f32; 3],
    /// The filter used to resize images to the smart-resize size.
    pub resample: ResampleFilter,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 4 * 28 * 28,
            max_pixels: 16384 * 28 * 28,
            max_aspect_ratio: 200.0,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            resample: ResampleFilter::Bicubic,
        }
    }
}

impl PreprocessConfig {
    /// The side length every resized dimension is a multiple of (`patch_size * merge_size`).
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Length of one flattened patch: `3 * temporal_patch_size * patch_size²` (1176 for
    /// Qwen2.5-VL).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size as usize * (self.patch_size as usize).pow(2)
    }

    /// Checks that the parameters describe a usable pipeline; `origin` names the config in the
    /// error.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::config(origin, reason));
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return bad(format!(
                "patch-size ({}), merge-size ({}) and temporal-patch-size ({}) must be positive",
                self.patch_size, self.merge_size, self.temporal_patch_size
            ));
        }
        if self.patch_size.checked_mul(self.merge_size).is_none() {
            return bad("patch-size × merge-size overflows".into());
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!(
                "min-pixels ({}) exceeds max-pixels ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.max_pixels == 0 {
            return bad("max-pixels must be positive".into());
        }
        // Written so that NaN is refused too.
        if self.max_aspect_ratio.is_nan() || self.max_aspect_ratio < 1.0 {
            return bad(format!(
                "max-aspect-ratio must be at least 1, got {}",
                self.max_aspect_ratio
            ));
        }
        for (c, (&m, &s)) in self.image_mean.iter().zip(&self.image_std).enumerate() {
            if !m.is_finite() {
                return bad(format!("image-mean[{c}] is not finite ({m})"));
            }
            if !(s.is_finite() && s > 0.0) {
                return bad(format!(
                    "image-std[{c}] must be positive and finite, got {s}"
                ));
            }
        }
        Ok(())
    }

    /// The `(height, width)` an image of `height × width` is resized to.
    pub fn smart_resize(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        smart_resize(height, width, self)
    }

    /// How many `<|image_pad|>` tokens an image of `height × width` expands to.
    pub fn image_token_count(&self, height: u32, width: u32) -> Result<usize> {
        let (h, w) = self.smart_resize(height, width)?;
        let f = self.factor();
        Ok((h / f) as usize * (w / f) as usize)
    }

    /// The vision grid `(t, h, w)` in patches for an image of `height × width`.
    pub fn grid_thw(&self, height: u32, width: u32) -> Result<[u32; 3]> {
        let (h, w) = self.smart_resize(height, width)?;
        Ok([1, h / self.patch_size, w / self.patch_size])
    }
}

/// Python's `round`: halves go to the even neighbour.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Qwen2.5-VL's smart resize: both sides become multiples of `factor`, the area lands in
/// `[min_pixels, max_pixels]`, and the aspect ratio is kept as closely as possible.
/// Returns `(height, width)`.
///
/// This follows transformers' `smart_resize` (5.x) operation for operation, so the result is the
/// same in every case: the first rounding may give 0 for a side shorter than `factor / 2`, which
/// the `min_pixels` branch then enlarges. (The `qwen-vl-utils` variant clamps that rounding to
/// `factor` instead, which differs for very thin images such as 10×1999.) A side can only stay 0
/// when `min_pixels` is 0; it is then raised to `factor` (transformers fails there).
pub fn smart_resize(height: u32, width: u32, cfg: &PreprocessConfig) -> Result<(u32, u32)> {
    let bad = |reason: String| Error::Image {
        origin: format!("{width}×{height}"),
        reason,
    };
    if height == 0 || width == 0 {
        return Err(bad("empty image".into()));
    }
    if cfg.factor() == 0 {
        return Err(Error::config(
            "preprocess",
            "patch-size and merge-size must be positive",
        ));
    }
    let factor = f64::from(cfg.factor());
    let (h, w) = (f64::from(height), f64::from(width));
    let ratio = h.max(w) / h.min(w);
    if ratio > cfg.max_aspect_ratio {
        return Err(bad(format!(
            "aspect ratio {ratio:.1} exceeds the limit of {}",
            cfg.max_aspect_ratio
        )));
    }
    let mut h_bar = round_half_even(h / factor) * factor;
    let mut w_bar = round_half_even(w / factor) * factor;
    if h_bar * w_bar > cfg.max_pixels as f64 {
        let beta = (h * w / cfg.max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / factor).floor() * factor);
        w_bar = factor.max((w / beta / factor).floor() * factor);
    } else if h_bar * w_bar < cfg.min_pixels as f64 {
        let beta = (cfg.min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / factor).ceil() * factor;
        w_bar = (w * beta / factor).ceil() * factor;
    }
    Ok((h_bar.max(factor) as u32, w_bar.max(factor) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.6), 3.0);
        assert_eq!(round_half_even(-1.5), -2.0);
    }

    #[test]
    fn known_sizes() {
        let cfg = PreprocessConfig::default();
        // Values computed with transformers' `smart_resize` (factor 28, defaults above).
        assert_eq!(smart_resize(1024, 1024, &cfg).unwrap(), (1036, 1036));
        assert_eq!(smart_resize(10, 10, &cfg).unwrap(), (56, 56));
        assert_eq!(smart_resize(480, 640, &cfg).unwrap(), (476, 644));
        assert_eq!(smart_resize(4320, 7680, &cfg).unwrap(), (2688, 4760));
        assert_eq!(cfg.image_token_count(1024, 1024).unwrap(), 37 * 37);
        // A side under factor/2 rounds to 0 first and the min-pixels branch enlarges both sides
        // (transformers' behaviour; clamping that rounding to 28 would give 28×1988).
        assert_eq!(smart_resize(10, 1999, &cfg).unwrap(), (28, 812));
        assert_eq!(smart_resize(2000, 12, &cfg).unwrap(), (728, 28));
        // Only a zero min-pixels can leave a side at 0; it becomes one factor.
        let no_min = PreprocessConfig {
            min_pixels: 0,
            ..cfg
        };
        assert_eq!(smart_resize(10, 100, &no_min).unwrap(), (28, 112));
    }

    #[test]
    fn config_from_toml() {
        let cfg: PreprocessConfig = toml::from_str(
            "min-pixels = 200704\nresample = \"lanczos3\"\nimage-mean = [0.5, 0.5, 0.5]\n",
        )
        .unwrap();
        assert_eq!(cfg.min_pixels, 200_704);
        assert_eq!(cfg.resample, ResampleFilter::Lanczos3);
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.image_std, CLIP_STD);
        assert_eq!(cfg.patch_dim(), 1176);
        let defaults: PreprocessConfig = toml::from_str("").unwrap();
        assert_eq!(defaults, PreprocessConfig::default());
        let err = toml::from_str::<PreprocessConfig>("max-pixel = 5\n").unwrap_err();
        assert!(err.to_string().contains("max-pixel"), "{err}");
        assert!(toml::from_str::<PreprocessConfig>("resample = \"cubic\"\n").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let cfg = PreprocessConfig::default();
        assert!(cfg.validate("t").is_ok());
        let cases = [
            (
                PreprocessConfig {
                    patch_size: 0,
                    ..cfg
                },
                "patch-size",
            ),
            (
                PreprocessConfig {
                    min_pixels: 10,
                    max_pixels: 5,
                    ..cfg
                },
                "min-pixels (10)",
            ),
            (
                PreprocessConfig {
                    max_aspect_ratio: 0.5,
                    ..cfg
                },
                "max-aspect-ratio",
            ),
            (
                PreprocessConfig {
                    image_std: [1.0, -1.0, 1.0],
                    ..cfg
                },
                "image-std[1]",
            ),
            (
                PreprocessConfig {
                    image_mean: [f32::NAN, 0.0, 0.0],
                    ..cfg
                },
                "image-mean[0]",
            ),
        ];
        for (bad, needle) in cases {
            let err = bad.validate("model.toml").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("model.toml"), "{err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn smart_resize_invariants(h in 1u32..20_000, w in 1u32..20_000) {
            let cfg = PreprocessConfig::default();
            let ratio = f64::from(h.max(w)) / f64::from(h.min(w));
            match smart_resize(h, w, &cfg) {
                Err(_) => proptest::prop_assert!(ratio > cfg.max_aspect_ratio),
                Ok((rh, rw)) => {
                    proptest::prop_assert!(ratio <= cfg.max_aspect_ratio);
                    proptest::prop_assert!(rh % 28 == 0 && rw % 28 == 0 && rh > 0 && rw > 0);
                    let area = u64::from(rh) * u64::from(rw);
                    proptest::prop_assert!(area >= cfg.min_pixels, "{rh}x{rw}");
                    proptest::prop_assert!(area <= cfg.max_pixels, "{rh}x{rw}");
                    let grid = cfg.grid_thw(h, w).unwrap();
                    proptest::prop_assert_eq!(grid, [1, rh / 14, rw / 14]);
                }
            }
        }
    }

    #[test]
    fn rejects_extreme_aspect() {
        assert!(smart_resize(1, 300, &PreprocessConfig::default()).is_err());
        assert!(smart_resize(0, 3, &PreprocessConfig::default()).is_err());
    }
}
