//! The decoder's per-chunk inputs for a left-padded batch: token ids, mRoPE positions and the
//! additive attention bias. Pure functions, tested without ONNX Runtime.
//!
//! Rows are left-padded to a common length so every row's last prompt token sits at the same
//! index. A padding position attends only to itself (so its hidden states stay finite) and no
//! real position ever attends to padding.

use crate::vision::RopeIndex;

/// One row of a batch: an expanded prompt and its positions.
#[derive(Debug, Clone)]
pub(crate) struct Row<'a> {
    /// Token ids with every image pad expanded.
    pub(crate) ids: &'a [u32],
    /// Their 3-D positions.
    pub(crate) rope: &'a RopeIndex,
}

/// The padding layout of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Padded length (the longest row).
    pub(crate) len: usize,
    /// Padding before each row.
    pub(crate) offsets: Vec<usize>,
}

impl Layout {
    pub(crate) fn of(rows: &[Row<'_>]) -> Self {
        let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        Self {
            len,
            offsets: rows.iter().map(|r| len - r.ids.len()).collect(),
        }
    }
}

/// Token ids of padded positions `[start, end)`, `[B, end - start]` row-major.
pub(crate) fn chunk_ids(
    rows: &[Row<'_>],
    layout: &Layout,
    start: usize,
    end: usize,
    pad: u32,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(rows.len() * (end - start));
    for (row, &off) in rows.iter().zip(&layout.offsets) {
        for i in start..end {
            out.push(if i < off { pad } else { row.ids[i - off] } as i64);
        }
    }
    out
}

/// Positions `[3, B, end - start]` of padded positions `[start, end)` (padding gets 0).
pub(crate) fn chunk_positions(
    rows: &[Row<'_>],
    layout: &Layout,
    start: usize,
    end: usize,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(3 * rows.len() * (end - start));
    for axis in 0..3 {
        for (row, &off) in rows.iter().zip(&layout.offsets) {
            for i in start..end {
                out.push(if i < off {
                    0
                } else {
                    row.rope.positions[axis][i - off]
                });
            }
        }
    }
    out
}

/// Additive bias `[B, 1, end - start, end]` for queries at padded positions `[start, end)` over
/// keys `[0, end)`: causal, no attention to padding, padding attends to itself.
pub(crate) fn chunk_bias(offsets: &[usize], start: usize, end: usize) -> Vec<f32> {
    let width = end;
    let mut out = vec![f32::NEG_INFINITY; offsets.len() * (end - start) * width];
    let mut k = 0;
    for &off in offsets {
        for q in start..end {
            let row = &mut out[k..k + width];
            if q < off {
                row[q] = 0.0;
            } else {
                row[off..=q].fill(0.0);
            }
            k += width;
        }
    }
    out
}

/// Positions `[3, B, 1]` of one decode step at padded index `index` (the cache length).
pub(crate) fn step_positions(offsets: &[usize], deltas: &[i64], index: usize) -> Vec<i64> {
    let one: Vec<i64> = offsets
        .iter()
        .zip(deltas)
        .map(|(&off, &d)| (index - off) as i64 + d)
        .collect();
    let mut out = Vec::with_capacity(3 * one.len());
    for _ in 0..3 {
        out.extend_from_slice(&one);
    }
    out
}

/// Bias `[B, 1, 1, index + 1]` of one decode step at padded index `index`.
pub(crate) fn step_bias(offsets: &[usize], index: usize) -> Vec<f32> {
    let width = index + 1;
    let mut out = vec![0.0f32; offsets.len() * width];
    for (r, &off) in offsets.iter().enumerate() {
        out[r * width..r * width + off].fill(f32::NEG_INFINITY);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(len: usize, delta: i64) -> RopeIndex {
        let p: Vec<i64> = (0..len as i64).collect();
        RopeIndex {
            positions: [p.clone(), p.clone(), p],
            delta,
        }
    }

    #[test]
    fn left_padding_layout_and_ids() {
        let (ra, rb) = (rope(3, 0), rope(1, 0));
        let rows = [
            Row {
                ids: &[5, 6, 7],
                rope: &ra,
            },
            Row {
                ids: &[8],
                rope: &rb,
            },
        ];
        let layout = Layout::of(&rows);
        assert_eq!(
            layout,
            Layout {
                len: 3,
                offsets: vec![0, 2]
            }
        );
        assert_eq!(chunk_ids(&rows, &layout, 0, 3, 0), vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(chunk_ids(&rows, &layout, 1, 3, 0), vec![6, 7, 0, 8]);
        let pos = chunk_positions(&rows, &layout, 0, 3);
        assert_eq!(&pos[..6], &[0, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn bias_is_causal_and_hides_padding() {
        let inf = f32::NEG_INFINITY;
        // Row 0 unpadded, row 1 with one pad; queries 1..3 over keys 0..3.
        let b = chunk_bias(&[0, 1], 1, 3);
        assert_eq!(
            b,
            vec![
                0.0, 0.0, inf, // row 0, q1
                0.0, 0.0, 0.0, // row 0, q2
                inf, 0.0, inf, // row 1, q1
                inf, 0.0, 0.0, // row 1, q2
            ]
        );
        // A padding query attends to itself only.
        let b = chunk_bias(&[2], 0, 3);
        assert_eq!(&b[..3], &[0.0, inf, inf]);
        assert_eq!(&b[3..6], &[inf, 0.0, inf]);
        assert_eq!(&b[6..9], &[inf, inf, 0.0]);
    }

    #[test]
    fn decode_steps_continue_each_row() {
        assert_eq!(
            step_positions(&[0, 2], &[-5, 1], 4),
            vec![-1, 3, -1, 3, -1, 3]
        );
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            step_bias(&[0, 2], 3),
            vec![0.0, 0.0, 0.0, 0.0, inf, inf, 0.0, 0.0]
        );
    }
}
