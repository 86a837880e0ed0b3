//! `image_rotate_tool`: rotates the original input image counter-clockwise about its centre,
//! keeping the canvas size (corners are cut, uncovered areas are black), as DeepEyes' toolbox
//! does with Pillow's `Image.rotate(angle)`.
//!
//! The geometry reproduces Pillow's: the angle is reduced modulo 360; 0, 180, and 90/270 on a
//! square image are exact transposes; any other angle samples the nearest source pixel through
//! the inverse affine map, with the matrix entries rounded to 15 decimals and 16.16 fixed-point
//! stepping while the coordinates fit (Pillow's `affine_fixed`), floating point beyond.

use deepeyes_core::{Image, Tool, ToolContext, ToolError, ToolOutput, ToolSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The name the model calls the rotate tool by.
pub const ROTATE_TOOL_NAME: &str = "image_rotate_tool";

/// Configuration of `image_rotate_tool`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RotateConfig {
    /// Whether the tool is offered to the model. Off by default: DeepEyes keeps the tool in its
    /// code but does not list it in the V2 system prompt.
    pub enabled: bool,
}

/// Python's `round(x, 15)`: the nearest double to `x` rounded to 15 decimal places.
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// Rotates `image` by `degrees` counter-clockwise about its centre, same canvas size, black
/// fill, nearest-neighbour sampling (Pillow's `rotate` defaults).
pub fn rotate_ccw(image: &Image, degrees: f64) -> Result<Image> {
    if !degrees.is_finite() {
        return Err(Error::image(
            "rotate",
            format!("angle must be a finite number of degrees, got {degrees}"),
        ));
    }
    let angle = degrees.rem_euclid(360.0);
    let (w, h) = (image.width(), image.height());
    let rgb = image.rgb();
    let exact = if angle == 0.0 {
        Some(rgb.clone())
    } else if angle == 180.0 {
        Some(image::imageops::rotate180(rgb))
    } else if angle == 90.0 && w == h {
        // Pillow's ROTATE_90 turns counter-clockwise; the image crate's rotate270 turns clockwise
        // by 270, which is the same.
        Some(image::imageops::rotate270(rgb))
    } else if angle == 270.0 && w == h {
        Some(image::imageops::rotate90(rgb))
    } else {
        None
    };
    if let Some(pixels) = exact {
        return Ok(Image::from_rgb(pixels)?);
    }
    let m = affine_matrix(angle, w, h);
    let out = if fits_fixed(&m, w, h) {
        affine_fixed(image, &m)
    } else {
        affine_float(image, &m)
    };
    Ok(Image::from_raw(w, h, out)?)
}

/// The inverse map output → input of a rotation by `angle` degrees about the image centre, as
/// `[a, b, c, d, e, f]`: `x_in = a·x + b·y + c`, `y_in = d·x + e·y + f`.
fn affine_matrix(angle: f64, w: u32, h: u32) -> [f64; 6] {
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let theta = -angle.to_radians();
    let (cos, sin) = (round15(theta.cos()), round15(theta.sin()));
    let (a, b, d, e) = (cos, sin, round15(-theta.sin()), cos);
    let c = a * -cx + b * -cy + 0.0 + cx;
    let f = d * -cx + e * -cy + 0.0 + cy;
    [a, b, c, d, e, f]
}

fn fits_fixed(m: &[f64; 6], w: u32, h: u32) -> bool {
    let (w, h) = (f64::from(w), f64::from(h));
    [(0.0, 0.0), (w, h), (0.0, h), (w, 0.0)]
        .iter()
        .all(|&(x, y)| {
            (x * m[0] + y * m[1] + m[2]).abs() < 32768.0
                && (x * m[3] + y * m[4] + m[5]).abs() < 32768.0
        })
}

fn copy_pixel(out: &mut [u8], o: usize, src: &[u8], w: usize, xin: i64, yin: i64) {
    let i = (yin as usize * w + xin as usize) * 3;
    out[o..o + 3].copy_from_slice(&src[i..i + 3]);
}

/// Nearest-neighbour affine sampling in 16.16 fixed point, stepping per pixel like Pillow.
fn affine_fixed(image: &Image, m: &[f64; 6]) -> Vec<u8> {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    let mut a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    let src = image.as_raw();
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        let (mut xx, mut yy) = (a2, a5);
        for x in 0..w {
            let (xin, yin) = (xx >> 16, yy >> 16);
            if (0..w).contains(&xin) && (0..h).contains(&yin) {
                copy_pixel(
                    &mut out,
                    ((y * w + x) * 3) as usize,
                    src,
                    w as usize,
                    xin,
                    yin,
                );
            }
            xx += a0;
            yy += a3;
        }
        a2 += a1;
        a5 += a4;
    }
    out
}

/// Nearest-neighbour affine sampling in floating point (Pillow's path for coordinates beyond
/// the 16.16 range).
fn affine_float(image: &Image, m: &[f64; 6]) -> Vec<u8> {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    // Pillow's COORD: negative → -1 (outside), otherwise truncate.
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut xo = m[2] + m[1] * 0.5 + m[0] * 0.5;
    let mut yo = m[5] + m[4] * 0.5 + m[3] * 0.5;
    let src = image.as_raw();
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        let (mut xx, mut yy) = (xo, yo);
        for x in 0..w {
            let (xin, yin) = (coord(xx), coord(yy));
            if (0..w).contains(&xin) && (0..h).contains(&yin) {
                copy_pixel(
                    &mut out,
                    ((y * w + x) * 3) as usize,
                    src,
                    w as usize,
                    xin,
                    yin,
                );
            }
            xx += m[0];
            yy += m[3];
        }
        xo += m[1];
        yo += m[4];
    }
    out
}

/// `image_rotate_tool`: rotates the first original input image by `angle` degrees
/// counter-clockwise.
#[derive(Debug, Clone, Default)]
pub struct RotateTool;

impl RotateTool {
    /// The rotate tool.
    pub fn new() -> Self {
        Self
    }
}

impl Tool for RotateTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: ROTATE_TOOL_NAME.into(),
            description: "Rotate the input image counter-clockwise by the given angle in degrees, about its centre and keeping its size (corners that leave the frame are cut off). Use it to read text or objects that appear sideways or upside down.".into(),
            parameters: serde_json::json!({
                "type": "object",
                "properties": {
                    "angle": {
                        "type": "number",
                        "description": "Rotation angle in degrees, counter-clockwise (for example 90 turns a sideways text upright when it reads bottom-to-top)."
                    }
                },
                "required": ["angle"]
            }),
        }
    }

    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> std::result::Result<ToolOutput, ToolError> {
        let Some(obj) = args.as_object() else {
            return Err(ToolError::new(format!(
                "the arguments must be a JSON object like {{\"angle\": 90}}, got {args}"
            )));
        };
        let angle = match obj.get("angle") {
            None => {
                return Err(ToolError::new(
                    "missing argument 'angle' (a number of degrees)",
                ));
            }
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ToolError::new(format!("angle must be a number, got {v}")))?,
        };
        let image = ctx
            .original_images
            .first()
            .ok_or_else(|| ToolError::new("there is no input image to rotate"))?;
        let rotated = rotate_ccw(image, angle).map_err(|e| ToolError::new(e.to_string()))?;
        Ok(ToolOutput::image(rotated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepeyes_core::PreprocessConfig;

    /// The pattern `tests/data/make_rotate_fixtures.py` draws.
    pub(crate) fn fixture_pattern(w: u32, h: u32) -> Image {
        let mut raw = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                raw.push(((x * 37 + y * 11) % 256) as u8);
                raw.push(((x * x + 3 * y) % 256) as u8);
                raw.push(((x * y * 5 + 17) % 256) as u8);
            }
        }
        Image::from_raw(w, h, raw).unwrap()
    }

    fn load_fixture(name: &str) -> Image {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        Image::open(&path, &deepeyes_core::ImageLimits::default()).unwrap()
    }

    #[test]
    fn matches_pillow_fixtures() {
        // Produced by Pillow (tests/data/make_rotate_fixtures.py) from the same pattern.
        for (angle, file) in [
            (30.0, "rotate_37x23_30.png"),
            (-45.0, "rotate_37x23_-45.png"),
            (90.0, "rotate_37x23_90.png"),
            (270.0, "rotate_37x23_270.png"),
            (123.4, "rotate_37x23_123.4.png"),
            (180.0, "rotate_37x23_180.png"),
            (725.0, "rotate_37x23_725.png"),
        ] {
            let got = rotate_ccw(&fixture_pattern(37, 23), angle).unwrap();
            let want = load_fixture(file);
            assert_eq!(got.as_raw(), want.as_raw(), "angle {angle}");
        }
        let got = rotate_ccw(&fixture_pattern(20, 20), 90.0).unwrap();
        assert_eq!(got.as_raw(), load_fixture("rotate_20x20_90.png").as_raw());
    }

    #[test]
    fn full_turns_are_identity() {
        let img = fixture_pattern(13, 7);
        for a in [0.0, 360.0, -360.0, 720.0] {
            assert_eq!(rotate_ccw(&img, a).unwrap(), img, "{a}");
        }
    }

    #[test]
    fn float_path_agrees_with_fixed_path() {
        let img = fixture_pattern(41, 29);
        let m = affine_matrix(33.0, 41, 29);
        let fixed = affine_fixed(&img, &m);
        let float = affine_float(&img, &m);
        let differ = fixed
            .chunks(3)
            .zip(float.chunks(3))
            .filter(|(a, b)| a != b)
            .count();
        // The two differ only where a sample lands within 2^-16 of a pixel edge.
        assert!(differ * 100 < 41 * 29, "{differ} pixels differ");
    }

    #[test]
    fn non_finite_angle_is_an_error() {
        let img = fixture_pattern(4, 4);
        assert!(rotate_ccw(&img, f64::NAN).is_err());
        assert!(rotate_ccw(&img, f64::INFINITY).is_err());
    }

    #[test]
    fn tool_rejects_bad_arguments() {
        let images = [fixture_pattern(8, 8)];
        let pre = PreprocessConfig::default();
        let ctx = ToolContext {
            original_images: &images,
            preprocess: &pre,
        };
        let tool = RotateTool::new();
        for (args, needle) in [
            (serde_json::json!({}), "missing argument 'angle'"),
            (serde_json::json!({"angle": "90"}), "must be a number"),
            (serde_json::json!([90]), "JSON object"),
        ] {
            let err = tool.call(&args, &ctx).unwrap_err();
            assert!(err.message.contains(needle), "{err}");
        }
        let out = tool.call(&serde_json::json!({"angle": 90}), &ctx).unwrap();
        assert_eq!(out.images.len(), 1);
        let none = ToolContext {
            original_images: &[],
            preprocess: &pre,
        };
        assert!(tool.call(&serde_json::json!({"angle": 90}), &none).is_err());
    }
}
