//! Bounding boxes: parsing, coordinate frames, clamping and validation with DeepEyes' rules.
//!
//! A model writes `bbox_2d = [x1, y1, x2, y2]`. What those numbers mean depends on the
//! [`CoordinateFrame`]; DeepEyes uses absolute pixels of the original image ([`Original`]) while
//! the model actually sees a smart-resized copy, and the two disagree a lot above the max-pixels
//! cap (DeepEyes issue #141). Every frame is mapped to original-image pixels first; then the box is
//! clamped and validated exactly as DeepEyes does, on floats, and finally rounded half-to-even
//! (Python's `round`, which Pillow's `crop` applies).
//!
//! [`Original`]: CoordinateFrame::Original

use std::fmt;
use std::str::FromStr;

use crate::PreprocessConfig;
use crate::preprocess::round_half_even;
use serde::{Deserialize, Serialize};

/// What the four numbers of a `bbox_2d` are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoordinateFrame {
    /// Absolute pixels of the original input image (DeepEyes' convention).
    #[default]
    Original,
    /// Absolute pixels of the smart-resized image the model was shown; mapped back to the
    /// original by the exact per-axis scale factors of the resize.
    Resized,
    /// A 0–1000 grid over each axis (Qwen2-VL's relative convention).
    Relative,
    /// Fractions 0–1 of each axis.
    RelativeUnit,
}

impl CoordinateFrame {
    /// Every frame, in documentation order.
    pub const ALL: [CoordinateFrame; 4] = [
        Self::Original,
        Self::Resized,
        Self::Relative,
        Self::RelativeUnit,
    ];

    /// The frame's name as written in config files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Resized => "resized",
            Self::Relative => "relative",
            Self::RelativeUnit => "relative-unit",
        }
    }

    /// A phrase for the model describing what coordinates in this frame mean.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Original => "absolute pixel coordinates in the original input image",
            Self::Resized => "absolute pixel coordinates in the input image as you see it",
            Self::Relative => {
                "coordinates on a 0-1000 grid over the input image (0 = left/top edge, 1000 = right/bottom edge)"
            }
            Self::RelativeUnit => {
                "coordinates as fractions 0-1 of the input image (0 = left/top edge, 1 = right/bottom edge)"
            }
        }
    }

    /// Per-axis factors `(sx, sy)` such that `x_original = x * sx`, `y_original = y * sy`, for an
    /// original image of `width × height`.
    fn scale(
        self,
        width: u32,
        height: u32,
        preprocess: &PreprocessConfig,
    ) -> Result<(f64, f64), String> {
        let (w, h) = (f64::from(width), f64::from(height));
        Ok(match self {
            Self::Original => (1.0, 1.0),
            Self::Resized => {
                let (rh, rw) = preprocess.smart_resize(height, width).map_err(|e| {
                    format!("cannot use resized-image coordinates for this image: {e}")
                })?;
                (w / f64::from(rw), h / f64::from(rh))
            }
            Self::Relative => (w / 1000.0, h / 1000.0),
            Self::RelativeUnit => (w, h),
        })
    }

    /// Maps a box in this frame to original-image pixels of a `width × height` image. The
    /// `preprocess` config defines the resized image for [`CoordinateFrame::Resized`].
    pub fn to_original(
        self,
        bbox: [f64; 4],
        width: u32,
        height: u32,
        preprocess: &PreprocessConfig,
    ) -> Result<[f64; 4], String> {
        if self == Self::Original {
            return Ok(bbox);
        }
        let (sx, sy) = self.scale(width, height, preprocess)?;
        Ok([bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy])
    }

    /// Maps a box in original-image pixels to this frame (the inverse of
    /// [`to_original`](Self::to_original)); useful to convert dataset annotations.
    pub fn from_original(
        self,
        bbox: [f64; 4],
        width: u32,
        height: u32,
        preprocess: &PreprocessConfig,
    ) -> Result<[f64; 4], String> {
        if self == Self::Original {
            return Ok(bbox);
        }
        let (sx, sy) = self.scale(width, height, preprocess)?;
        Ok([bbox[0] / sx, bbox[1] / sy, bbox[2] / sx, bbox[3] / sy])
    }
}

impl fmt::Display for CoordinateFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CoordinateFrame {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown coordinate frame '{s}' (expected one of: {})",
                    Self::ALL.map(Self::as_str).join(", ")
                )
            })
    }
}

/// DeepEyes' validity rules for a zoom-in box (after clamping to the image).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ZoomLimits {
    /// Both sides must be strictly longer than this, in original pixels (DeepEyes: 30).
    pub min_side: f64,
    /// `long side / short side` must not exceed this (DeepEyes: 100).
    pub max_aspect_ratio: f64,
}

impl Default for ZoomLimits {
    fn default() -> Self {
        Self {
            min_side: 30.0,
            max_aspect_ratio: 100.0,
        }
    }
}

impl ZoomLimits {
    /// Checks the values make sense; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.min_side.is_finite() && self.min_side >= 0.0) {
            return Err(format!(
                "min-side must be a finite number >= 0, got {}",
                self.min_side
            ));
        }
        if !(self.max_aspect_ratio.is_finite() && self.max_aspect_ratio >= 1.0) {
            return Err(format!(
                "max-aspect-ratio must be a finite number >= 1, got {}",
                self.max_aspect_ratio
            ));
        }
        Ok(())
    }
}

pub use crate::image::CropRect;

/// A validated zoom-in box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolvedBox {
    /// The box in original pixels after clamping, `[left, top, right, bottom]`, as floats (the
    /// values the limits were checked on).
    pub clamped: [f64; 4],
    /// The pixel rectangle it rounds to (half to even), which is what gets cropped.
    pub rect: CropRect,
}

/// Reads `bbox_2d` from a call's arguments: exactly four numbers. The error is the text the model
/// sees.
pub fn parse_bbox(args: &serde_json::Value) -> Result<[f64; 4], String> {
    let Some(obj) = args.as_object() else {
        return Err(format!(
            "the arguments must be a JSON object like {{\"bbox_2d\": [x1, y1, x2, y2]}}, got {args}"
        ));
    };
    let Some(value) = obj.get("bbox_2d") else {
        return Err("missing argument 'bbox_2d' (four numbers [x1, y1, x2, y2])".into());
    };
    let Some(items) = value.as_array() else {
        return Err(format!(
            "bbox_2d must be an array of four numbers [x1, y1, x2, y2], got {value}"
        ));
    };
    if items.len() != 4 {
        return Err(format!(
            "bbox_2d must hold exactly four numbers [x1, y1, x2, y2], got {} ({value})",
            items.len()
        ));
    }
    let mut out = [0.0; 4];
    for (i, (slot, item)) in out.iter_mut().zip(items).enumerate() {
        *slot = item
            .as_f64()
            .ok_or_else(|| format!("bbox_2d[{i}] must be a number, got {item}"))?;
    }
    Ok(out)
}

fn fmt_box(b: &[f64; 4]) -> String {
    format!("[{}, {}, {}, {}]", b[0], b[1], b[2], b[3])
}

/// Maps `bbox` (in `frame`) onto a `width × height` original image, clamps it, checks DeepEyes'
/// rules, and rounds it to pixels. Never panics; every rejection is the text the model sees.
pub fn resolve_bbox(
    bbox: [f64; 4],
    frame: CoordinateFrame,
    width: u32,
    height: u32,
    preprocess: &PreprocessConfig,
    limits: &ZoomLimits,
) -> Result<ResolvedBox, String> {
    if width == 0 || height == 0 {
        return Err(format!("the image is empty ({width}×{height})"));
    }
    if let Some(i) = bbox.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "bbox_2d[{i}] is {}, but every coordinate must be a finite number",
            bbox[i]
        ));
    }
    let mapped = frame.to_original(bbox, width, height, preprocess)?;
    if mapped.iter().any(|v| v.is_nan()) {
        return Err(format!(
            "bbox_2d {} cannot be mapped to image pixels",
            fmt_box(&bbox)
        ));
    }
    let (w, h) = (f64::from(width), f64::from(height));
    // `max`/`min` with finite or infinite (never NaN) values: a huge mapped value clamps to the
    // edge exactly as DeepEyes' Python does.
    let clamped = [
        mapped[0].max(0.0),
        mapped[1].max(0.0),
        mapped[2].min(w),
        mapped[3].min(h),
    ];
    let [left, top, right, bottom] = clamped;
    let where_ = if frame == CoordinateFrame::Original {
        String::new()
    } else {
        format!(" ({frame} frame; {} in image pixels)", fmt_box(&clamped))
    };
    if !(left < right && top < bottom) {
        return Err(format!(
            "bbox_2d {}{where_} is empty after clipping to the {width}×{height} image: x1 must be less than x2 and y1 less than y2",
            fmt_box(&bbox)
        ));
    }
    let (bw, bh) = (right - left, bottom - top);
    let short = bw.min(bh);
    let ratio = bw.max(bh) / short;
    if ratio > limits.max_aspect_ratio {
        return Err(format!(
            "bbox_2d {}{where_} is {bw}×{bh} px; its aspect ratio {ratio:.1} exceeds {}",
            fmt_box(&bbox),
            limits.max_aspect_ratio
        ));
    }
    if short <= limits.min_side {
        return Err(format!(
            "bbox_2d {}{where_} is only {bw}×{bh} px; both sides must be longer than {} px",
            fmt_box(&bbox),
            limits.min_side
        ));
    }
    // Clamped to [0, w] / [0, h] and finite, so the rounded values fit in u32.
    let px = |v: f64| round_half_even(v) as u32;
    let rect = CropRect::from_edges(px(left), px(top), px(right), px(bottom)).ok_or_else(|| {
        format!(
            "bbox_2d {}{where_} rounds to an empty pixel region",
            fmt_box(&bbox)
        )
    })?;
    Ok(ResolvedBox { clamped, rect })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> ZoomLimits {
        ZoomLimits::default()
    }

    fn resolve(b: [f64; 4], w: u32, h: u32) -> Result<ResolvedBox, String> {
        resolve_bbox(
            b,
            CoordinateFrame::Original,
            w,
            h,
            &PreprocessConfig::default(),
            &limits(),
        )
    }

    #[test]
    fn parse_accepts_four_numbers_only() {
        assert_eq!(
            parse_bbox(&json!({"bbox_2d": [1, 2.5, 3, 4]})).unwrap(),
            [1.0, 2.5, 3.0, 4.0]
        );
        for (args, needle) in [
            (json!({"bbox": [1, 2, 3, 4]}), "missing argument 'bbox_2d'"),
            (json!({"bbox_2d": [1, 2, 3]}), "exactly four"),
            (json!({"bbox_2d": [1, 2, 3, 4, 5]}), "exactly four"),
            (
                json!({"bbox_2d": [1, "2", 3, 4]}),
                "bbox_2d[1] must be a number",
            ),
            (
                json!({"bbox_2d": [1, null, 3, 4]}),
                "bbox_2d[1] must be a number",
            ),
            (json!({"bbox_2d": "1,2,3,4"}), "must be an array"),
            (json!([1, 2, 3, 4]), "must be a JSON object"),
        ] {
            let err = parse_bbox(&args).unwrap_err();
            assert!(err.contains(needle), "{args}: {err}");
        }
    }

    #[test]
    fn clamps_like_deepeyes() {
        let r = resolve([-50.0, -10.0, 700.0, 900.0], 640, 480).unwrap();
        assert_eq!(r.clamped, [0.0, 0.0, 640.0, 480.0]);
        assert_eq!(r.rect, CropRect::full(640, 480));
    }

    #[test]
    fn rejects_inverted_and_empty() {
        assert!(resolve([100.0, 100.0, 50.0, 200.0], 640, 480).is_err());
        assert!(resolve([100.0, 200.0, 150.0, 200.0], 640, 480).is_err());
        // Entirely outside the image: empty after clamping.
        let err = resolve([700.0, 10.0, 800.0, 100.0], 640, 480).unwrap_err();
        assert!(err.contains("empty after clipping"), "{err}");
    }

    #[test]
    fn min_side_is_strict() {
        // 30 px is rejected, 31 accepted (DeepEyes: min(h, w) > 30).
        let err = resolve([0.0, 0.0, 30.0, 100.0], 640, 480).unwrap_err();
        assert!(err.contains("longer than 30"), "{err}");
        assert_eq!(
            resolve([0.0, 0.0, 31.0, 100.0], 640, 480).unwrap().rect,
            CropRect::from_edges(0, 0, 31, 100).unwrap()
        );
        // Float sizes are checked before rounding.
        assert!(resolve([0.0, 0.0, 30.000001, 100.0], 640, 480).is_ok());
    }

    #[test]
    fn aspect_ratio_limit() {
        // 31 × 3100 = ratio 100 exactly: allowed; 31 × 3101: refused.
        assert!(resolve([0.0, 0.0, 31.0, 3100.0], 100, 4000).is_ok());
        let err = resolve([0.0, 0.0, 31.0, 3101.0], 100, 4000).unwrap_err();
        assert!(err.contains("aspect ratio"), "{err}");
    }

    #[test]
    fn thresholds_are_configurable() {
        let loose = ZoomLimits {
            min_side: 5.0,
            max_aspect_ratio: 2.0,
        };
        let r = resolve_bbox(
            [0.0, 0.0, 10.0, 10.0],
            CoordinateFrame::Original,
            64,
            64,
            &PreprocessConfig::default(),
            &loose,
        );
        assert!(r.is_ok());
        let r = resolve_bbox(
            [0.0, 0.0, 10.0, 30.0],
            CoordinateFrame::Original,
            64,
            64,
            &PreprocessConfig::default(),
            &loose,
        );
        assert!(r.unwrap_err().contains("aspect ratio"));
    }

    #[test]
    fn rounds_half_to_even_like_pillow() {
        // Python: round(10.5) = 10, round(11.5) = 12, round(60.5) = 60, round(99.5) = 100.
        let r = resolve([10.5, 11.5, 60.5, 99.5], 640, 480).unwrap();
        assert_eq!(r.rect, CropRect::from_edges(10, 12, 60, 100).unwrap());
        let r = resolve([0.4, 0.6, 40.49, 40.51], 640, 480).unwrap();
        assert_eq!(r.rect, CropRect::from_edges(0, 1, 40, 41).unwrap());
    }

    #[test]
    fn non_finite_is_refused() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for i in 0..4 {
                let mut b = [0.0, 0.0, 100.0, 100.0];
                b[i] = bad;
                let err = resolve(b, 640, 480).unwrap_err();
                assert!(err.contains("finite"), "{err}");
            }
        }
    }

    #[test]
    fn frame_names_round_trip() {
        for f in CoordinateFrame::ALL {
            assert_eq!(f.as_str().parse::<CoordinateFrame>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
        }
        assert!("pixels".parse::<CoordinateFrame>().is_err());
    }

    #[test]
    fn relative_frames_map_to_pixels() {
        let pre = PreprocessConfig::default();
        let (w, h) = (640, 480);
        assert_eq!(
            CoordinateFrame::Relative
                .to_original([0.0, 250.0, 500.0, 1000.0], w, h, &pre)
                .unwrap(),
            [0.0, 120.0, 320.0, 480.0]
        );
        assert_eq!(
            CoordinateFrame::RelativeUnit
                .to_original([0.25, 0.5, 0.75, 1.0], w, h, &pre)
                .unwrap(),
            [160.0, 240.0, 480.0, 480.0]
        );
    }

    #[test]
    fn resized_frame_small_image_is_close_to_original() {
        // 640×480 is smart-resized to 644×476: the frames differ by a few pixels.
        let pre = PreprocessConfig::default();
        let mapped = CoordinateFrame::Resized
            .to_original([0.0, 0.0, 644.0, 476.0], 640, 480, &pre)
            .unwrap();
        assert_eq!(mapped, [0.0, 0.0, 640.0, 480.0]);
        let mid = CoordinateFrame::Resized
            .to_original([322.0, 238.0, 322.0, 238.0], 640, 480, &pre)
            .unwrap();
        assert_eq!(mid, [320.0, 240.0, 320.0, 240.0]);
    }

    #[test]
    fn resized_frame_above_max_pixels() {
        // HR-Bench 8K: 7680×4320 = 33 Mpx is above the 12.8 Mpx cap and shown as 4760×2688.
        let pre = PreprocessConfig::default();
        let (w, h) = (7680, 4320);
        assert_eq!(pre.smart_resize(h, w).unwrap(), (2688, 4760));
        let full = CoordinateFrame::Resized
            .to_original([0.0, 0.0, 4760.0, 2688.0], w, h, &pre)
            .unwrap();
        assert_eq!(full, [0.0, 0.0, 7680.0, 4320.0]);
        let centre = CoordinateFrame::Resized
            .to_original([2380.0, 1344.0, 2380.0, 1344.0], w, h, &pre)
            .unwrap();
        assert_eq!(centre, [3840.0, 2160.0, 3840.0, 2160.0]);
        // The same numbers read as original pixels point somewhere else entirely (issue #141).
        let as_original = resolve([2380.0, 1344.0, 2480.0, 1444.0], w, h).unwrap();
        let as_resized = resolve_bbox(
            [2380.0, 1344.0, 2480.0, 1444.0],
            CoordinateFrame::Resized,
            w,
            h,
            &pre,
            &limits(),
        )
        .unwrap();
        assert_eq!(
            as_original.rect,
            CropRect::from_edges(2380, 1344, 2480, 1444).unwrap()
        );
        // x: 2380·7680/4760 = 3840, 2480·7680/4760 = 4001.3…; y: ·4320/2688 = 2160, 2320.7…
        assert_eq!(
            as_resized.rect,
            CropRect::from_edges(3840, 2160, 4001, 2321).unwrap()
        );
    }

    #[test]
    fn frames_round_trip() {
        let pre = PreprocessConfig::default();
        for (w, h) in [(640, 480), (7680, 4320), (1, 1), (12_000, 9_000)] {
            for f in CoordinateFrame::ALL {
                let b = [1.0, 2.0, f64::from(w) - 1.0, f64::from(h)];
                let there = f.from_original(b, w, h, &pre).unwrap();
                let back = f.to_original(there, w, h, &pre).unwrap();
                for (a, c) in b.iter().zip(back) {
                    assert!((a - c).abs() < 1e-9, "{f} {w}×{h}: {b:?} -> {back:?}");
                }
            }
        }
    }

    #[test]
    fn resized_frame_reports_unresizable_images() {
        let err = CoordinateFrame::Resized
            .to_original([0.0; 4], 1000, 2, &PreprocessConfig::default())
            .unwrap_err();
        assert!(err.contains("aspect ratio"), "{err}");
    }

    #[test]
    fn limits_validation_names_the_key() {
        let bad = ZoomLimits {
            min_side: -1.0,
            ..ZoomLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("min-side"));
        let bad = ZoomLimits {
            max_aspect_ratio: 0.5,
            ..ZoomLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("max-aspect-ratio"));
    }
}
