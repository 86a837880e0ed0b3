//! `image_grid_overlay_tool`, an example deepeyes tool plugin.
//!
//! It draws a coordinate grid over the original input image, each line labelled with its pixel
//! coordinate, so a model can read off the numbers it needs for an `image_zoom_in_tool` bounding
//! box instead of guessing them. The whole plugin is one schema ([`spec`]), one function
//! ([`call`]) and one `export_tool!` line; see README.md for building and loading it.

use deepeyes_tools::abi::{CallError, ImageRef, Reply, RgbImage, ToolSpec, Value, serde_json};

/// Smallest accepted distance between grid lines, in pixels.
const MIN_STEP: u64 = 16;
/// Roughly how many lines the automatic step aims for along the longer side.
const TARGET_LINES: u32 = 10;

/// The tool's schema.
pub fn spec() -> ToolSpec {
    ToolSpec {
        name: "image_grid_overlay_tool".into(),
        description: "Draw a labelled coordinate grid over the input image. Every grid line is marked with its pixel coordinate in the original image, which helps you choose precise bounding boxes for zooming in.".into(),
        parameters: serde_json::json!({
            "type": "object",
            "properties": {
                "step": {
                    "type": "integer",
                    "minimum": MIN_STEP,
                    "description": "Distance between grid lines in pixels; when omitted, a round step giving about ten lines along the longer side is used."
                }
            }
        }),
    }
}

/// A round step that puts about [`TARGET_LINES`] lines along `long_side`.
fn auto_step(long_side: u32) -> u32 {
    const ROUND: [u32; 12] = [16, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000];
    ROUND
        .into_iter()
        .find(|&s| long_side / s <= TARGET_LINES)
        .unwrap_or(long_side.div_ceil(TARGET_LINES).max(MIN_STEP as u32))
}

/// 3×5 bitmaps of the digits 0–9, one row per 3-bit number (most significant bit on the left).
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b001, 0b001, 0b001],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

const INK: [u8; 3] = [255, 230, 0];
const SHADOW: [u8; 3] = [0, 0, 0];

/// Tightly packed RGB pixels being drawn on.
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && x < i64::from(self.width) && y < i64::from(self.height) {
            let i = (y as usize * self.width as usize + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// A dashed line (alternating ink and shadow every 4 px) stays visible on any background.
    fn vertical(&mut self, x: i64) {
        for y in 0..i64::from(self.height) {
            self.put(x, y, if (y / 4) % 2 == 0 { INK } else { SHADOW });
        }
    }

    fn horizontal(&mut self, y: i64) {
        for x in 0..i64::from(self.width) {
            self.put(x, y, if (x / 4) % 2 == 0 { INK } else { SHADOW });
        }
    }

    /// Writes `value` with its top-left corner at `(x, y)`, each font pixel `scale` px wide, on a
    /// shadow box.
    fn label(&mut self, x: i64, y: i64, value: u32, scale: i64) {
        let text = value.to_string();
        let w = (text.len() as i64 * 4 + 1) * scale;
        let h = 7 * scale;
        for dy in 0..h {
            for dx in 0..w {
                self.put(x + dx, y + dy, SHADOW);
            }
        }
        for (k, ch) in text.bytes().enumerate() {
            let glyph = DIGITS[usize::from(ch - b'0')];
            let gx = x + (k as i64 * 4 + 1) * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                self.put(
                                    gx + col * scale + sx,
                                    y + (row as i64 + 1) * scale + sy,
                                    INK,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Draws the grid: the tool's one function.
pub fn call(args: &Value, image: Option<ImageRef<'_>>) -> Result<Reply, CallError> {
    let image = image.ok_or_else(|| CallError::Failed("there is no input image".into()))?;
    let (width, height) = (image.width(), image.height());
    let step = match args.get("step") {
        None | Some(Value::Null) => auto_step(width.max(height)),
        Some(v) => match v.as_u64() {
            Some(s) if s >= MIN_STEP => u32::try_from(s).unwrap_or(u32::MAX),
            _ => {
                return Err(CallError::BadArguments(format!(
                    "step must be an integer of at least {MIN_STEP} pixels, got {v}"
                )));
            }
        },
    };
    let mut canvas = Canvas {
        width,
        height,
        pixels: image.to_rgb_image().into_raw(),
    };
    // Labels grow with the image so they stay legible after the model's resize.
    let scale = i64::from((width.min(height) / 300).clamp(1, 8));
    let xs: Vec<u32> = (1..).map(|k| k * step).take_while(|&x| x < width).collect();
    let ys: Vec<u32> = (1..)
        .map(|k| k * step)
        .take_while(|&y| y < height)
        .collect();
    for &x in &xs {
        canvas.vertical(i64::from(x));
    }
    for &y in &ys {
        canvas.horizontal(i64::from(y));
    }
    for &x in &xs {
        canvas.label(i64::from(x) + 2, 2, x, scale);
    }
    for &y in &ys {
        canvas.label(2, i64::from(y) + 2, y, scale);
    }
    let describe = |v: &[u32], axis: &str| match (v.first(), v.last()) {
        (Some(first), Some(last)) => format!("{axis} = {first} to {last}"),
        _ => format!("no {axis} lines (the image is smaller than one step)"),
    };
    let text = format!(
        "Grid lines every {step} px over the {width}×{height} image: {}, {}.",
        describe(&xs, "x"),
        describe(&ys, "y")
    );
    let drawn = RgbImage::from_raw(width, height, canvas.pixels)
        .ok_or_else(|| CallError::Failed("internal error: canvas size mismatch".into()))?;
    Ok(Reply::image(drawn).with_text(text))
}

deepeyes_tools::export_tool!(
    name: c"image_grid_overlay_tool",
    spec: spec,
    call: call,
    // `call` only reads its inputs and allocates its output: it may run on many threads at once.
    thread_safe: true,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32) -> Vec<u8> {
        vec![128; (w * h * 3) as usize]
    }

    #[test]
    fn auto_step_is_round() {
        assert_eq!(auto_step(640), 100);
        assert_eq!(auto_step(1000), 100);
        assert_eq!(auto_step(7680), 1000);
        assert_eq!(auto_step(100), 16);
        assert_eq!(auto_step(1_000_000), 100_000);
    }

    #[test]
    fn draws_lines_and_labels() {
        let pixels = gray(320, 200);
        let img = ImageRef::new(320, 200, 320 * 3, &pixels).unwrap();
        let reply = call(&serde_json::json!({"step": 100}), Some(img)).unwrap();
        let out = reply.image.unwrap();
        assert_eq!((out.width(), out.height()), (320, 200));
        // x = 100 is a dashed line: ink at y = 50 (50 / 4 = 12, even).
        assert_eq!(out.get_pixel(100, 50).0, INK);
        // Far from any line or label the image is untouched.
        assert_eq!(out.get_pixel(150, 150).0, [128, 128, 128]);
        let text = reply.text.unwrap();
        assert!(
            text.contains("every 100 px") && text.contains("x = 100 to 300"),
            "{text}"
        );
        assert!(text.contains("y = 100 to 100"), "{text}");
    }

    #[test]
    fn bad_step_is_a_bad_argument() {
        let pixels = gray(8, 8);
        let img = ImageRef::new(8, 8, 24, &pixels).unwrap();
        for step in [
            serde_json::json!(3),
            serde_json::json!("50"),
            serde_json::json!(-5),
        ] {
            let err = call(&serde_json::json!({ "step": step }), Some(img)).unwrap_err();
            assert!(matches!(err, CallError::BadArguments(_)), "{err:?}");
        }
        assert!(call(&serde_json::json!({}), None).is_err());
    }
}
