//! The image and crops shared by the criterion bench and the `crop_timing` example (which
//! `scripts/bench_crop_pillow.py` runs next to Pillow). The Python script rebuilds the same image
//! from the same formula.

use deepeyes_core::Image;
use deepeyes_tools::CropRect;

/// The synthetic test image: `((7x + 13y + 85c) xor (xy >> 4)) & 255`, which has detail at every
/// scale (a flat image would flatter every resampler).
pub(crate) fn bench_image(width: u32, height: u32) -> Image {
    let mut raw = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..u64::from(height) {
        for x in 0..u64::from(width) {
            for c in 0..3u64 {
                raw.push((((x * 7 + y * 13 + c * 85) ^ ((x * y) >> 4)) & 255) as u8);
            }
        }
    }
    Image::from_raw(width, height, raw).expect("valid size")
}

const fn rect(x: u32, y: u32, width: u32, height: u32) -> CropRect {
    CropRect {
        x,
        y,
        width,
        height,
    }
}

/// Crops of the 4000×3000 image: typical zoom-ins from small to the whole image.
pub(crate) const BENCH_CROPS: &[CropRect] = &[
    rect(1000, 800, 1600, 1200),
    rect(200, 150, 400, 300),
    rect(1500, 500, 2000, 2000),
    rect(3000, 2500, 120, 90),
    rect(500, 1400, 3000, 80),
    rect(0, 0, 4000, 3000),
];
