//! The data-dependent inputs of Qwen2.5-VL, computed from image grids.
//!
//! Qwen2.5-VL's vision tower and its multimodal rotary embedding depend on the images' patch grids
//! `(t, h, w)` through loops that no exported graph can express. This module computes those
//! pieces in plain Rust, so any backend (the ONNX graphs, a training model) can take them as
//! inputs:
//!
//! - [`vision_position_ids`]: the `(row, column)` of every patch, in merge-block order, for the
//!   vision tower's 2-D rotary embedding;
//! - [`window_index`]: the permutation that groups merged tokens by attention window, and the
//!   window boundaries;
//! - [`frame_seqlens`]: the boundaries of full attention (one block per image frame);
//! - [`segment_mask`]: an additive block-diagonal attention bias from boundaries;
//! - [`rope_index`]: the 3-D (temporal, height, width) positions of a token sequence whose image
//!   pads have been expanded, and the offset later tokens use (the "rope delta").
//!
//! Every function follows transformers' Qwen2.5-VL implementation (5.x) step for step; the tests
//! compare them with values dumped from it (`tests/data/tiny-qwen2_5_vl/golden/`).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The vision tower's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VisionGeometry {
    /// Side of one patch in pixels (14).
    pub patch_size: u32,
    /// Patches merged per side into one language token (2).
    pub spatial_merge_size: u32,
    /// Side of one attention window in pixels (112).
    pub window_size: u32,
}

impl Default for VisionGeometry {
    fn default() -> Self {
        Self {
            patch_size: 14,
            spatial_merge_size: 2,
            window_size: 112,
        }
    }
}

impl VisionGeometry {
    /// Patches per merged token (`merge²`).
    pub fn merge_unit(&self) -> usize {
        (self.spatial_merge_size as usize).pow(2)
    }

    /// Side of a window in merged tokens.
    pub fn window_tokens(&self) -> usize {
        (self.window_size / self.spatial_merge_size / self.patch_size) as usize
    }

    /// Checks the values can describe a vision tower.
    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.spatial_merge_size == 0 {
            return Err(Error::config(
                "vision",
                "patch-size and spatial-merge-size must be positive",
            ));
        }
        if self.window_tokens() == 0 {
            return Err(Error::config(
                "vision",
                format!(
                    "window-size {} is smaller than one merged token ({} pixels)",
                    self.window_size,
                    self.patch_size * self.spatial_merge_size
                ),
            ));
        }
        Ok(())
    }

    /// Checks a grid is non-empty and made of whole merge blocks.
    pub fn check_grid(&self, grid: [u32; 3]) -> Result<()> {
        let [t, h, w] = grid;
        let m = self.spatial_merge_size;
        if t == 0 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return Err(Error::Model(format!(
                "image grid {grid:?} is not a positive grid of whole {m}×{m} merge blocks"
            )));
        }
        Ok(())
    }

    /// Patches of a grid (`t·h·w`).
    pub fn patches(grid: [u32; 3]) -> usize {
        grid.iter().map(|&d| d as usize).product()
    }

    /// Language tokens of a grid (`t·h·w / merge²`).
    pub fn merged_tokens(&self, grid: [u32; 3]) -> usize {
        Self::patches(grid) / self.merge_unit()
    }
}

/// The `(row, column)` of every patch of `grids`, concatenated, in the processor's patch order
/// (merge block by merge block, each frame in turn). Shape `[patches][2]`.
pub fn vision_position_ids(grids: &[[u32; 3]], geo: &VisionGeometry) -> Result<Vec<[i64; 2]>> {
    let m = geo.spatial_merge_size as usize;
    let mut out = Vec::with_capacity(grids.iter().map(|&g| VisionGeometry::patches(g)).sum());
    for &grid in grids {
        geo.check_grid(grid)?;
        let [t, h, w] = grid.map(|d| d as usize);
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            out.push([(bh * m + ih) as i64, (bw * m + iw) as i64]);
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The window permutation of the merged tokens and the window boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowIndex {
    /// `window_index[k]` is the merged token placed `k`-th when tokens are grouped by window.
    pub window_index: Vec<i64>,
    /// Cumulative window lengths in patches, starting at 0, with repeated values (empty windows)
    /// removed.
    pub cu_window_seqlens: Vec<i64>,
}

/// Groups the merged tokens of `grids` into attention windows of
/// `window_tokens × window_tokens` merged tokens (partial windows at the right and bottom edges).
pub fn window_index(grids: &[[u32; 3]], geo: &VisionGeometry) -> Result<WindowIndex> {
    geo.validate()?;
    let win = geo.window_tokens();
    let unit = geo.merge_unit() as i64;
    let m = geo.spatial_merge_size as usize;
    let mut index = Vec::new();
    let mut cu = vec![0i64];
    let mut offset = 0i64;
    for &grid in grids {
        geo.check_grid(grid)?;
        let [t, h, w] = grid.map(|d| d as usize);
        let (lh, lw) = (h / m, w / m);
        // transformers pads each side by `win - len % win`, a whole empty window when the side
        // is a multiple of `win`; those empty windows only repeat a boundary, removed below.
        let nh = (lh + win - lh % win) / win;
        let nw = (lw + win - lw % win) / win;
        for f in 0..t {
            for wh in 0..nh {
                for ww in 0..nw {
                    let mut len = 0i64;
                    for r in wh * win..((wh + 1) * win).min(lh) {
                        for c in ww * win..((ww + 1) * win).min(lw) {
                            index.push(offset + (f * lh * lw + r * lw + c) as i64);
                            len += 1;
                        }
                    }
                    let last = *cu.last().unwrap_or(&0);
                    cu.push(last + len * unit);
                }
            }
        }
        offset += (t * lh * lw) as i64;
    }
    cu.dedup();
    Ok(WindowIndex {
        window_index: index,
        cu_window_seqlens: cu,
    })
}

/// The inverse permutation of `index` (`argsort`): `reverse[index[k]] = k`.
pub fn reverse_index(index: &[i64]) -> Result<Vec<i64>> {
    let mut reverse = vec![-1i64; index.len()];
    for (k, &i) in index.iter().enumerate() {
        let slot = usize::try_from(i)
            .ok()
            .and_then(|i| reverse.get_mut(i))
            .ok_or_else(|| Error::Model(format!("window index {i} out of range")))?;
        if *slot != -1 {
            return Err(Error::Model(format!("window index {i} repeats")));
        }
        *slot = k as i64;
    }
    Ok(reverse)
}

/// Cumulative patch counts of full attention: one block per frame of each grid.
pub fn frame_seqlens(grids: &[[u32; 3]]) -> Vec<i64> {
    let mut cu = vec![0i64];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = *cu.last().unwrap_or(&0);
            cu.push(last + i64::from(h) * i64::from(w));
        }
    }
    cu
}

/// An additive `[n, n]` attention bias (row-major) from cumulative boundaries: 0 where both
/// positions are in the same block, `masked` elsewhere (`-inf` for ONNX Runtime; the training
/// engine needs a finite value so that gradients stay finite).
pub fn segment_mask(cu_seqlens: &[i64], n: usize, masked: f32) -> Result<Vec<f32>> {
    let end = cu_seqlens.last().copied().unwrap_or(0);
    if cu_seqlens.first() != Some(&0)
        || end != n as i64
        || cu_seqlens.windows(2).any(|w| w[1] < w[0])
    {
        return Err(Error::Model(format!(
            "attention boundaries {cu_seqlens:?} do not cover {n} positions"
        )));
    }
    let mut mask = vec![masked; n * n];
    for w in cu_seqlens.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        for row in a..b {
            mask[row * n + a..row * n + b].fill(0.0);
        }
    }
    Ok(mask)
}

/// Everything the vision encoder takes besides the pixels, for a list of images.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionInputs {
    /// Patches in total.
    pub patches: usize,
    /// `[patches][2]` rotary positions.
    pub pos_ids: Vec<[i64; 2]>,
    /// `[patches / merge²]` window permutation.
    pub window_index: Vec<i64>,
    /// `[patches / merge²]` its inverse.
    pub reverse_index: Vec<i64>,
    /// `[patches, patches]` additive bias of the windowed blocks (in window order).
    pub window_mask: Vec<f32>,
    /// `[patches, patches]` additive bias of the full-attention blocks (in window order).
    pub full_mask: Vec<f32>,
}

/// Computes [`VisionInputs`] for `grids`.
pub fn vision_inputs(grids: &[[u32; 3]], geo: &VisionGeometry) -> Result<VisionInputs> {
    let pos_ids = vision_position_ids(grids, geo)?;
    let n = pos_ids.len();
    let win = window_index(grids, geo)?;
    let reverse = reverse_index(&win.window_index)?;
    // Window permutation moves whole images (and frames) as blocks, so the frame boundaries stay
    // valid in window order.
    let window_mask = segment_mask(&win.cu_window_seqlens, n, f32::NEG_INFINITY)?;
    let full_mask = segment_mask(&frame_seqlens(grids), n, f32::NEG_INFINITY)?;
    Ok(VisionInputs {
        patches: n,
        pos_ids,
        window_index: win.window_index,
        reverse_index: reverse,
        window_mask,
        full_mask,
    })
}

/// 3-D rotary positions of a token sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    /// `[3][len]`: temporal, height and width positions of every token.
    pub positions: [Vec<i64>; 3],
    /// `max position + 1 - len`: a token at sequence index `i ≥ len` gets position `i + delta`
    /// on all three axes.
    pub delta: i64,
}

impl RopeIndex {
    /// The position of a token at sequence index `index` appended after the indexed tokens.
    pub fn next_position(&self, index: usize) -> i64 {
        index as i64 + self.delta
    }
}

/// Computes the mRoPE positions of `tokens`, whose runs of `image_pad` are the expanded visual
/// tokens of `grids` in order (transformers' `get_rope_index` with `mm_token_type_ids` set to 1
/// on image pads). Text tokens advance all three axes by one; an image's tokens take
/// `(start + frame, start + row, start + column)` on its merged grid, and the text after it
/// starts at `start + max(rows, columns)`.
///
/// Each maximal run of pads is one image and must hold exactly its grid's token count, as in
/// transformers 5.x (which groups consecutive image tokens): images whose pads touch need a
/// separator token (the agent's templates always wrap each in `<|vision_start|>…<|vision_end|>`).
/// Fails when the pads do not match the grids.
///
/// This is the one definition of the mRoPE index: the ONNX Runtime backend and the burn training
/// engine both call it.
pub fn rope_index(
    tokens: &[u32],
    image_pad: u32,
    grids: &[[u32; 3]],
    geo: &VisionGeometry,
) -> Result<RopeIndex> {
    let mut positions: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(tokens.len()));
    let m = geo.spatial_merge_size;
    let mut current = 0i64;
    let mut next_grid = 0usize;
    let mut i = 0usize;
    while i < tokens.len() {
        if tokens[i] != image_pad {
            for axis in &mut positions {
                axis.push(current);
            }
            current += 1;
            i += 1;
            continue;
        }
        let grid = *grids.get(next_grid).ok_or_else(|| {
            Error::Model(format!(
                "the sequence holds more image-pad runs than the {} image grids given",
                grids.len()
            ))
        })?;
        geo.check_grid(grid)?;
        next_grid += 1;
        let count = geo.merged_tokens(grid);
        let run = tokens[i..].iter().take_while(|&&t| t == image_pad).count();
        if run != count {
            return Err(Error::Model(format!(
                "image {} (grid {grid:?}) needs {count} image-pad tokens but the run at index {i} holds {run} (adjacent images need a separator token)",
                next_grid - 1
            )));
        }
        let (t, h, w) = (grid[0], grid[1] / m, grid[2] / m);
        for f in 0..t {
            for r in 0..h {
                for c in 0..w {
                    positions[0].push(current + i64::from(f));
                    positions[1].push(current + i64::from(r));
                    positions[2].push(current + i64::from(c));
                }
            }
        }
        current += i64::from(h.max(w));
        i += count;
    }
    if next_grid != grids.len() {
        return Err(Error::Model(format!(
            "{} image grids were given but the sequence holds pads for {next_grid}",
            grids.len()
        )));
    }
    let max = positions
        .iter()
        .flat_map(|axis| axis.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok(RopeIndex {
        delta: max + 1 - tokens.len() as i64,
        positions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_ids_follow_merge_blocks() {
        let geo = VisionGeometry::default();
        let ids = vision_position_ids(&[[1, 2, 4]], &geo).unwrap();
        let expected: Vec<[i64; 2]> = vec![
            [0, 0],
            [0, 1],
            [1, 0],
            [1, 1],
            [0, 2],
            [0, 3],
            [1, 2],
            [1, 3],
        ];
        assert_eq!(ids, expected);
    }

    #[test]
    fn windows_of_a_small_grid() {
        // 8×12 patches = 4×6 merged tokens; windows are 4×4 merged tokens: one full window
        // (16 tokens) and one partial (4×2 = 8 tokens).
        let geo = VisionGeometry::default();
        let w = window_index(&[[1, 8, 12]], &geo).unwrap();
        assert_eq!(w.cu_window_seqlens, vec![0, 64, 96]);
        assert_eq!(&w.window_index[..5], &[0, 1, 2, 3, 6]);
        assert_eq!(&w.window_index[16..20], &[4, 5, 10, 11]);
        let rev = reverse_index(&w.window_index).unwrap();
        for (k, &i) in w.window_index.iter().enumerate() {
            assert_eq!(rev[i as usize], k as i64);
        }
    }

    #[test]
    fn window_index_of_one_window_is_identity() {
        let w = window_index(&[[1, 8, 8]], &VisionGeometry::default()).unwrap();
        assert_eq!(w.window_index, (0..16).collect::<Vec<i64>>());
        assert_eq!(w.cu_window_seqlens, vec![0, 64]);
    }

    #[test]
    fn window_index_splits_large_grids() {
        // 6×5 merged tokens with 4×4 windows: windows of 4×4, 4×1, 2×4 and 2×1 tokens.
        let w = window_index(&[[1, 12, 10]], &VisionGeometry::default()).unwrap();
        assert_eq!(w.cu_window_seqlens, vec![0, 64, 80, 112, 120]);
        assert_eq!(&w.window_index[..4], &[0, 1, 2, 3]);
        assert_eq!(&w.window_index[16..20], &[4, 9, 14, 19]);
        let mut sorted = w.window_index.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..30).collect::<Vec<i64>>());
    }

    #[test]
    fn masks_are_block_diagonal() {
        let finite = segment_mask(&[0, 2, 3], 3, -1e9).unwrap();
        assert_eq!(
            finite,
            vec![0.0, 0.0, -1e9, 0.0, 0.0, -1e9, -1e9, -1e9, 0.0]
        );
        let mask = segment_mask(&[0, 2, 3], 3, f32::NEG_INFINITY).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask, vec![0.0, 0.0, inf, 0.0, 0.0, inf, inf, inf, 0.0]);
        assert!(segment_mask(&[0, 2], 3, f32::NEG_INFINITY).is_err());
    }

    #[test]
    fn rope_index_of_one_image() {
        // text(2) image(2×3 merged) text(1)
        let geo = VisionGeometry::default();
        let pad = 9;
        let tokens = [1, 2, pad, pad, pad, pad, pad, pad, 3];
        let r = rope_index(&tokens, pad, &[[1, 4, 6]], &geo).unwrap();
        assert_eq!(r.positions[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(r.positions[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(r.positions[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(r.delta, 6 - 9);
        assert_eq!(r.next_position(9), 6);
    }

    #[test]
    fn rope_index_rejects_mismatched_pads() {
        let geo = VisionGeometry::default();
        assert!(rope_index(&[5, 5, 5], 5, &[[1, 4, 4]], &geo).is_err());
        assert!(rope_index(&[1, 2], 5, &[[1, 4, 4]], &geo).is_err());
        assert!(rope_index(&[5, 5, 5, 5], 5, &[], &geo).is_err());
        assert!(vision_position_ids(&[[1, 3, 4]], &geo).is_err());
    }

    #[test]
    fn touching_images_need_a_separator() {
        // Two 2×2-token images: pads that touch form one run of 8, which is no image's count.
        let geo = VisionGeometry::default();
        let grids = [[1, 4, 4], [1, 4, 4]];
        let err = rope_index(&[1, 5, 5, 5, 5, 5, 5, 5, 5, 2], 5, &grids, &geo).unwrap_err();
        assert!(err.to_string().contains("separator"), "{err}");
        let apart = rope_index(&[1, 5, 5, 5, 5, 3, 5, 5, 5, 5, 2], 5, &grids, &geo).unwrap();
        assert_eq!(apart.positions[0].len(), 11);
    }
}
