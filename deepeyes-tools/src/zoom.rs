//! `image_zoom_in_tool`: crops a region of the original input image, with DeepEyes' semantics.
//!
//! Arguments: `bbox_2d = [x1, y1, x2, y2]` (four numbers in the configured
//! [`CoordinateFrame`]) and an optional string `label`. The box is mapped to original pixels,
//! clamped to the image, validated (non-empty, aspect ratio ≤ 100, both sides > 30 px by default)
//! and rounded half to even; the crop is always cut from the first *original* input image, never
//! from an earlier crop, and returned at original resolution. The model backend then runs its
//! usual preprocessing (smart resize) on it like on any image.

use deepeyes_core::{Image, PreprocessConfig, Tool, ToolContext, ToolError, ToolOutput, ToolSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::{
    CoordinateFrame, CropRect, ResolvedBox, ZoomLimits, parse_bbox, resolve_bbox,
};

/// The name the model calls the zoom-in tool by.
pub const ZOOM_IN_TOOL_NAME: &str = "image_zoom_in_tool";

/// Configuration of `image_zoom_in_tool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ZoomInConfig {
    /// Whether the tool is offered to the model.
    pub enabled: bool,
    /// What the model's coordinates are measured in.
    pub frame: CoordinateFrame,
    /// Both sides of the clamped box must be strictly longer than this many original pixels.
    pub min_side: f64,
    /// The clamped box's `long side / short side` must not exceed this.
    pub max_aspect_ratio: f64,
}

impl Default for ZoomInConfig {
    /// DeepEyes' settings.
    fn default() -> Self {
        let limits = ZoomLimits::default();
        Self {
            enabled: true,
            frame: CoordinateFrame::Original,
            min_side: limits.min_side,
            max_aspect_ratio: limits.max_aspect_ratio,
        }
    }
}

impl ZoomInConfig {
    /// The validity limits.
    pub fn limits(&self) -> ZoomLimits {
        ZoomLimits {
            min_side: self.min_side,
            max_aspect_ratio: self.max_aspect_ratio,
        }
    }
}

/// `image_zoom_in_tool`.
#[derive(Debug, Clone)]
pub struct ZoomInTool {
    frame: CoordinateFrame,
    limits: ZoomLimits,
}

impl Default for ZoomInTool {
    fn default() -> Self {
        Self {
            frame: CoordinateFrame::Original,
            limits: ZoomLimits::default(),
        }
    }
}

impl ZoomInTool {
    /// A zoom-in tool with `config`'s frame and limits; fails on nonsensical limits, naming the
    /// key.
    pub fn new(config: &ZoomInConfig) -> Result<Self> {
        let limits = config.limits();
        limits
            .validate()
            .map_err(|reason| Error::config("zoom-in", reason))?;
        Ok(Self {
            frame: config.frame,
            limits,
        })
    }

    /// The coordinate frame.
    pub fn frame(&self) -> CoordinateFrame {
        self.frame
    }

    /// The validity limits.
    pub fn limits(&self) -> ZoomLimits {
        self.limits
    }

    /// Maps, clamps, validates and rounds `bbox` for a `width × height` original image.
    pub fn resolve(
        &self,
        bbox: [f64; 4],
        width: u32,
        height: u32,
        preprocess: &PreprocessConfig,
    ) -> std::result::Result<ResolvedBox, ToolError> {
        resolve_bbox(bbox, self.frame, width, height, preprocess, &self.limits)
            .map_err(ToolError::new)
    }

    /// Crops `image` at `bbox` (in this tool's frame): the crop, and the region of `image` it
    /// shows.
    pub fn zoom(
        &self,
        image: &Image,
        bbox: [f64; 4],
        preprocess: &PreprocessConfig,
    ) -> std::result::Result<(Image, CropRect), ToolError> {
        let region = self
            .resolve(bbox, image.width(), image.height(), preprocess)?
            .rect;
        let crop = image
            .crop(region)
            .map_err(|e| ToolError::new(format!("cropping failed: {e}")))?;
        Ok((crop, region))
    }
}

impl Tool for ZoomInTool {
    fn spec(&self) -> ToolSpec {
        let bbox_doc = format!(
            "The region to zoom in on as [x1, y1, x2, y2]: (x1, y1) is its top-left corner and (x2, y2) its bottom-right corner, in {}.",
            self.frame.describe()
        );
        ToolSpec {
            name: ZOOM_IN_TOOL_NAME.into(),
            description: "Zoom in on a region of the input image: the region given by a bounding box is cropped from the full-resolution image and shown to you, optionally with a label naming what you are looking for.".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                        "description": bbox_doc,
                    },
                    "label": {
                        "type": "string",
                        "description": "What the region contains or what you are looking for (optional)."
                    }
                },
                "required": ["bbox_2d"]
            }),
        }
    }

    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> std::result::Result<ToolOutput, ToolError> {
        let bbox = parse_bbox(args).map_err(ToolError::new)?;
        match args.get("label") {
            None | Some(serde_json::Value::Null | serde_json::Value::String(_)) => {}
            Some(other) => {
                return Err(ToolError::new(format!(
                    "label must be a string, got {other}"
                )));
            }
        }
        let image = ctx
            .original_images
            .first()
            .ok_or_else(|| ToolError::new("there is no input image to zoom into"))?;
        let (crop, region) = self.zoom(image, bbox, ctx.preprocess)?;
        Ok(ToolOutput::image(crop).with_region(region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn pattern(w: u32, h: u32) -> Image {
        let mut raw = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                raw.extend_from_slice(&[(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8]);
            }
        }
        Image::from_raw(w, h, raw).unwrap()
    }

    fn call(
        tool: &ZoomInTool,
        images: &[Image],
        args: serde_json::Value,
    ) -> std::result::Result<ToolOutput, ToolError> {
        let pre = PreprocessConfig::default();
        let ctx = ToolContext {
            original_images: images,
            preprocess: &pre,
        };
        tool.call(&args, &ctx)
    }

    #[test]
    fn crops_the_original_at_full_resolution() {
        let images = [pattern(640, 480), pattern(50, 50)];
        let out = call(
            &ZoomInTool::default(),
            &images,
            json!({"bbox_2d": [100, 50, 300.5, 251.5], "label": "a thing"}),
        )
        .unwrap();
        assert_eq!(out.images.len(), 1);
        assert!(out.text.is_none());
        let crop = &out.images[0];
        // round(300.5) = 300, round(251.5) = 252.
        assert_eq!((crop.width(), crop.height()), (200, 202));
        assert_eq!(crop.rgb().get_pixel(0, 0).0, [100, 50, 150]);
        assert_eq!(crop.rgb().get_pixel(199, 201).0, [43, 251, 38]);
    }

    #[test]
    fn rejections_are_tool_errors() {
        let images = [pattern(640, 480)];
        let tool = ZoomInTool::default();
        for (args, needle) in [
            (json!({"bbox_2d": [10, 10, 40, 200]}), "longer than 30"),
            (
                json!({"bbox_2d": [300, 10, 200, 200]}),
                "empty after clipping",
            ),
            (json!({"bbox_2d": [10, 10, 200]}), "exactly four"),
            (json!({"bbox_2d": [10, 10, 200, "x"]}), "must be a number"),
            (
                json!({"bbox_2d": [10, 10, 200, 200], "label": 3}),
                "label must be a string",
            ),
            (json!({}), "missing argument 'bbox_2d'"),
        ] {
            let err = call(&tool, &images, args.clone()).unwrap_err();
            assert!(err.message.contains(needle), "{args}: {}", err.message);
        }
        let err = call(&tool, &[], json!({"bbox_2d": [0, 0, 100, 100]})).unwrap_err();
        assert!(err.message.contains("no input image"));
    }

    #[test]
    fn each_frame_selects_the_same_region() {
        // A 7680×4320 image (above max_pixels) is too big to allocate in a unit test; the mapping
        // is covered in geometry. Here a 1000×800 image: 1000×800 → smart resize 1008×812.
        let images = [pattern(1000, 800)];
        let pre = PreprocessConfig::default();
        assert_eq!(pre.smart_resize(800, 1000).unwrap(), (812, 1008));
        let want = CropRect::from_edges(250, 200, 750, 600).unwrap();
        for (frame, bbox) in [
            (CoordinateFrame::Original, json!([250, 200, 750, 600])),
            (CoordinateFrame::Resized, json!([252, 203, 756, 609])),
            (CoordinateFrame::Relative, json!([250, 250, 750, 750])),
            (
                CoordinateFrame::RelativeUnit,
                json!([0.25, 0.25, 0.75, 0.75]),
            ),
        ] {
            let tool = ZoomInTool::new(&ZoomInConfig {
                frame,
                ..ZoomInConfig::default()
            })
            .unwrap();
            let out = call(&tool, &images, json!({ "bbox_2d": bbox })).unwrap();
            let resolved = tool
                .resolve(
                    parse_bbox(&json!({ "bbox_2d": bbox })).unwrap(),
                    1000,
                    800,
                    &pre,
                )
                .unwrap();
            assert_eq!(resolved.rect, want, "{frame}");
            assert_eq!((out.images[0].width(), out.images[0].height()), (500, 400));
            assert!(
                tool.spec().parameters["properties"]["bbox_2d"]["description"]
                    .as_str()
                    .unwrap()
                    .contains(frame.describe())
            );
        }
    }

    #[test]
    fn nonsensical_limits_are_config_errors() {
        let err = ZoomInTool::new(&ZoomInConfig {
            max_aspect_ratio: f64::NAN,
            ..ZoomInConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("max-aspect-ratio"), "{err}");
    }

    fn any_coord() -> impl Strategy<Value = f64> {
        prop_oneof![
            3 => -100.0..5000.0f64,
            1 => any::<f64>(),
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
            1 => Just(f64::NEG_INFINITY),
            1 => Just(-0.0),
            1 => prop_oneof![Just(1e300), Just(-1e300), Just(f64::MAX), Just(f64::MIN_POSITIVE)],
        ]
    }

    fn any_frame() -> impl Strategy<Value = CoordinateFrame> {
        prop::sample::select(CoordinateFrame::ALL.to_vec())
    }

    /// What a successful resolution must satisfy.
    fn check_resolved(
        r: &ResolvedBox,
        w: u32,
        h: u32,
        limits: &ZoomLimits,
    ) -> std::result::Result<(), TestCaseError> {
        prop_assert!(r.rect.fits(w, h), "{:?} outside {w}×{h}", r.rect);
        let [l, t, rr, b] = r.clamped;
        prop_assert!(0.0 <= l && l < rr && rr <= f64::from(w));
        prop_assert!(0.0 <= t && t < b && b <= f64::from(h));
        let (bw, bh) = (rr - l, b - t);
        prop_assert!(bw.min(bh) > limits.min_side);
        prop_assert!(bw.max(bh) / bw.min(bh) <= limits.max_aspect_ratio);
        // Rounding moves each edge by at most half a pixel.
        let (pw, ph) = (f64::from(r.rect.width), f64::from(r.rect.height));
        prop_assert!((pw - bw).abs() <= 1.0 && (ph - bh).abs() <= 1.0);
        prop_assert!(pw.min(ph) > limits.min_side - 1.0);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_box_any_size_never_panics(
            bbox in [any_coord(), any_coord(), any_coord(), any_coord()],
            w in prop_oneof![1u32..64, 1u32..5000, Just(u32::MAX), 30_000u32..200_000],
            h in prop_oneof![1u32..64, 1u32..5000, Just(u32::MAX), 30_000u32..200_000],
            frame in any_frame(),
            min_side in prop_oneof![Just(30.0), 0.0..100.0f64],
        ) {
            let tool = ZoomInTool::new(&ZoomInConfig { frame, min_side, ..ZoomInConfig::default() }).unwrap();
            if let Ok(r) = tool.resolve(bbox, w, h, &PreprocessConfig::default()) {
                check_resolved(&r, w, h, &tool.limits())?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn crops_of_real_images_respect_limits(
            bbox in [any_coord(), any_coord(), any_coord(), any_coord()],
            w in 1u32..200,
            h in 1u32..200,
            frame in any_frame(),
            min_side in prop_oneof![Just(30.0), 0.0..40.0f64],
        ) {
            let images = [pattern(w, h)];
            let tool = ZoomInTool::new(&ZoomInConfig { frame, min_side, ..ZoomInConfig::default() }).unwrap();
            // serde_json cannot hold NaN/inf: they become null, which must be refused too.
            let args = json!({"bbox_2d": bbox});
            match call(&tool, &images, args) {
                Ok(out) => {
                    prop_assert!(bbox.iter().all(|v| v.is_finite()));
                    let r = tool.resolve(bbox, w, h, &PreprocessConfig::default()).unwrap();
                    check_resolved(&r, w, h, &tool.limits())?;
                    let crop = &out.images[0];
                    prop_assert_eq!((crop.width(), crop.height()), (r.rect.width, r.rect.height));
                    prop_assert_eq!(crop.rgb().get_pixel(0, 0), images[0].rgb().get_pixel(r.rect.x, r.rect.y));
                }
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
        }
    }
}
