//! Deterministic synthetic images for golden tests and benchmarks.
//!
//! `scripts/gen_preprocess_golden.py` and `scripts/bench_preprocess.py` compute the very same
//! pixels with numpy, so a test image of any size can be rebuilt on both sides from
//! `(height, width, kind, seed)` instead of being committed. Everything is integer arithmetic on
//! wrapping `u32`/exact `i64` values, which numpy reproduces bit for bit.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::image::Image;

/// What a [`test_pattern`] image contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatternKind {
    /// Colour gradients, a 9×7 checkerboard (sharp edges) and per-pixel hash noise: a hard case
    /// for resamplers, since every pixel differs from its neighbours.
    Mixed,
    /// Colour gradients with an inverted disk in the middle: smooth areas and one curved edge,
    /// closer to a photograph.
    Smooth,
}

/// A 32-bit hash of a pixel coordinate, channel and seed (wrapping arithmetic throughout).
fn hash32(x: u32, y: u32, c: u32, seed: u32) -> u32 {
    let mut h = x.wrapping_mul(0x9E37_79B1)
        ^ y.wrapping_mul(0x85EB_CA77)
        ^ c.wrapping_mul(0xC2B2_AE3D)
        ^ seed.wrapping_mul(0x27D4_EB2F);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    h
}

/// One 8-bit value of the pattern at column `x`, row `y`, channel `c` (0 = R).
fn value(x: u32, y: u32, c: u32, height: u32, width: u32, kind: PatternKind, seed: u32) -> u8 {
    let gx = u64::from(x) * 255 / u64::from(width.saturating_sub(1).max(1));
    let gy = u64::from(y) * 255 / u64::from(height.saturating_sub(1).max(1));
    let base = match c {
        0 => gx,
        1 => gy,
        _ => (gx + gy) / 2,
    };
    match kind {
        PatternKind::Mixed => {
            let checker = u64::from((x / 9 + y / 7) % 2) * 64;
            let noise = u64::from(hash32(x, y, c, seed) % 32);
            (base * 3 / 4 + checker + noise).min(255) as u8
        }
        PatternKind::Smooth => {
            let dx = 2 * i64::from(x) + 1 - i64::from(width);
            let dy = 2 * i64::from(y) + 1 - i64::from(height);
            let short = i64::from(height.min(width));
            if 9 * (dx * dx + dy * dy) < 4 * short * short {
                (255 - base) as u8
            } else {
                base as u8
            }
        }
    }
}

/// A deterministic `height × width` RGB test image (see [`PatternKind`]). `seed` changes the
/// noise of [`PatternKind::Mixed`]. Fails only on an empty size.
pub fn test_pattern(height: u32, width: u32, kind: PatternKind, seed: u32) -> Result<Image> {
    let mut rgb = Vec::with_capacity(height as usize * width as usize * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                rgb.push(value(x, y, c, height, width, kind, seed));
            }
        }
    }
    Image::from_raw(width, height, rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Values computed with the numpy twin in scripts/gen_preprocess_golden.py.
        assert_eq!(hash32(0, 0, 0, 0), 0);
        assert_eq!(hash32(5, 9, 2, 123), 1_872_465_025);
        let img = test_pattern(3, 4, PatternKind::Mixed, 7).unwrap();
        assert_eq!((img.width(), img.height()), (4, 3));
        assert_eq!(
            img.as_raw(),
            &[
                3, 14, 17, 92, 31, 56, 139, 2, 80, 208, 20, 98, 0, 121, 72, 92, 102, 91, 129, 107,
                115, 212, 126, 164, 16, 194, 101, 81, 222, 154, 156, 211, 174, 221, 197, 221
            ]
        );
        let smooth = test_pattern(5, 5, PatternKind::Smooth, 0).unwrap();
        // The centre pixel is inside the disk: 255 - gradient.
        let px = smooth.rgb().get_pixel(2, 2).0;
        assert_eq!(px, [255 - 127, 255 - 127, 255 - 127]);
        // A corner is outside the disk.
        assert_eq!(smooth.rgb().get_pixel(4, 0).0, [255, 0, 127]);
    }

    #[test]
    fn seeds_change_the_noise_only_for_mixed() {
        let a = test_pattern(16, 16, PatternKind::Mixed, 1).unwrap();
        let b = test_pattern(16, 16, PatternKind::Mixed, 2).unwrap();
        assert_ne!(a, b);
        let c = test_pattern(16, 16, PatternKind::Smooth, 1).unwrap();
        let d = test_pattern(16, 16, PatternKind::Smooth, 2).unwrap();
        assert_eq!(c, d);
        assert!(test_pattern(0, 3, PatternKind::Smooth, 0).is_err());
    }
}
