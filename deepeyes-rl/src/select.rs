//! Tool-use-oriented data selection, as DeepEyes chose its training data.
//!
//! Two stages, each with the model that will be trained:
//! 1. **Difficulty**: answer every item `k` times (sampled); drop the items answered right all
//!    `k` times (nothing to learn) or never (no signal for GRPO: every group reward is equal).
//! 2. **Tool usefulness**: answer the remaining items `k` times again with the image replaced by
//!    the crop of the ground-truth box (what a perfect zoom would show); keep the items whose
//!    accuracy rises with the crop, the ones where zooming is what turns a wrong answer right.
//!    Items without a box cannot be checked; they are kept or dropped by `require_box`.
//!
//! Every decision is recorded per item, with the counts of each stage in a [`SelectionReport`].

use std::collections::BTreeMap;

use deepeyes_core::CropRect;
use deepeyes_core::dataset::Item;
use deepeyes_core::{Image, ImageLimits};
use serde::{Deserialize, Serialize};

use crate::eval::{EvalResult, Evaluator, ItemRecord};

/// Why an item was kept or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Right in every sample: too easy.
    AlwaysRight,
    /// Wrong in every sample: too hard.
    NeverRight,
    /// The ground-truth crop does not raise accuracy: zooming would not help.
    CropDoesNotHelp,
    /// No ground-truth box, and boxes are required.
    NoBox,
    /// Kept: mixed results, and the crop helps (or the item has no box and boxes are optional).
    Kept,
    /// Dropped: the item could not be evaluated (an image that does not decode, an episode that
    /// failed); the log names the cause.
    Failed,
}

impl Decision {
    /// Whether the item is kept.
    pub fn kept(self) -> bool {
        self == Self::Kept
    }
}

/// The selection of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The item id.
    pub id: String,
    /// Correct answers out of `k` on the full image.
    pub correct: usize,
    /// Correct answers out of `k` on the ground-truth crop (when checked).
    pub crop_correct: Option<usize>,
    /// Samples per item.
    pub k: usize,
    /// The decision.
    pub decision: Decision,
}

/// Counts of each stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectionReport {
    /// Items read.
    pub items: usize,
    /// Dropped as always right.
    pub always_right: usize,
    /// Dropped as never right.
    pub never_right: usize,
    /// Items with mixed results (entering stage 2).
    pub mixed: usize,
    /// Mixed items checked with their crop.
    pub crop_checked: usize,
    /// Of those, the ones the crop helps.
    pub crop_helps: usize,
    /// Mixed items without a box.
    pub no_box: usize,
    /// Items kept.
    pub kept: usize,
    /// Items that could not be evaluated (dropped).
    #[serde(default)]
    pub failed: usize,
}

impl SelectionReport {
    /// Adds one decision.
    pub fn add(&mut self, s: &Selection) {
        self.items += 1;
        match s.decision {
            Decision::AlwaysRight => self.always_right += 1,
            Decision::NeverRight => self.never_right += 1,
            Decision::Failed => self.failed += 1,
            _ => self.mixed += 1,
        }
        if s.crop_correct.is_some() {
            self.crop_checked += 1;
        }
        match s.decision {
            Decision::Kept if s.crop_correct.is_some() => self.crop_helps += 1,
            Decision::NoBox => self.no_box += 1,
            Decision::Kept => self.no_box += 1,
            _ => {}
        }
        if s.decision.kept() {
            self.kept += 1;
        }
    }

    /// The counts as `name → value`, for printing.
    pub fn rows(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            ("1 items", self.items),
            ("2 always right (dropped)", self.always_right),
            ("3 never right (dropped)", self.never_right),
            ("4 mixed", self.mixed),
            ("5 checked with the crop", self.crop_checked),
            ("6 crop helps", self.crop_helps),
            ("7 no box", self.no_box),
            ("8 kept", self.kept),
            ("9 could not be evaluated (dropped)", self.failed),
        ])
    }
}

fn correct(record: &ItemRecord) -> usize {
    record.samples.iter().filter(|s| s.verdict.correct).count()
}

/// The crop of the first ground-truth box on the first image, clamped to it.
fn ground_truth_crop(item: &Item, image: &Image) -> Option<Image> {
    let b = item.boxes.iter().find(|b| b.image == 0)?;
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    let clamp = |v: f64, hi: f64| v.clamp(0.0, hi).round() as u32;
    let rect = CropRect::from_edges(
        clamp(b.bbox[0], w),
        clamp(b.bbox[1], h),
        clamp(b.bbox[2], w),
        clamp(b.bbox[3], h),
    )?;
    image.crop(rect).ok()
}

/// Selects among `items` with `evaluator` (configured with `samples = k` and a sampling
/// temperature). `require_box` drops mixed items that have no ground-truth box.
pub fn select(
    evaluator: &Evaluator<'_>,
    items: Vec<Item>,
    require_box: bool,
) -> EvalResult<Vec<Selection>> {
    let k = evaluator.config().samples;
    let limits = ImageLimits::default();
    let prepared: Vec<_> = items.into_iter().map(|i| evaluator.prepare(i)).collect();
    let mut out = Vec::with_capacity(prepared.len());
    for chunk in prepared.chunks(evaluator.config().batch_items.max(1)) {
        let records = evaluator.evaluate(chunk)?;
        // Stage 2 for the mixed items that have a box.
        let mut crop_items = Vec::new();
        let mut crop_images = Vec::new();
        for (p, r) in chunk.iter().zip(&records) {
            let c = correct(r);
            if c == 0 || c == k || r.failed.is_some() {
                continue;
            }
            let originals = p.item.decode_images(&limits)?;
            if let Some(crop) = originals
                .first()
                .and_then(|im| ground_truth_crop(&p.item, im))
            {
                crop_items.push(p.clone());
                crop_images.push(vec![crop]);
            }
        }
        let crop_records = if crop_items.is_empty() {
            Vec::new()
        } else {
            evaluator.evaluate_with_images(&crop_items, crop_images)?
        };
        let crop_correct: BTreeMap<&str, usize> = crop_records
            .iter()
            .map(|r| (r.id.as_str(), correct(r)))
            .collect();
        for r in &records {
            let c = correct(r);
            let with_crop = crop_correct.get(r.id.as_str()).copied();
            let decision = if r.failed.is_some() {
                Decision::Failed
            } else if c == k {
                Decision::AlwaysRight
            } else if c == 0 {
                Decision::NeverRight
            } else {
                match with_crop {
                    Some(cc) if cc > c => Decision::Kept,
                    Some(_) => Decision::CropDoesNotHelp,
                    None if require_box => Decision::NoBox,
                    None => Decision::Kept,
                }
            };
            tracing::debug!(item = %r.id, correct = c, ?with_crop, ?decision, "selection");
            out.push(Selection {
                id: r.id.clone(),
                correct: c,
                crop_correct: with_crop,
                k,
                decision,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(correct: usize, crop: Option<usize>, decision: Decision) -> Selection {
        Selection {
            id: "x".into(),
            correct,
            crop_correct: crop,
            k: 4,
            decision,
        }
    }

    #[test]
    fn the_report_counts_each_stage() {
        let mut r = SelectionReport::default();
        r.add(&sel(4, None, Decision::AlwaysRight));
        r.add(&sel(0, None, Decision::NeverRight));
        r.add(&sel(2, Some(4), Decision::Kept));
        r.add(&sel(2, Some(1), Decision::CropDoesNotHelp));
        r.add(&sel(1, None, Decision::NoBox));
        r.add(&sel(0, None, Decision::Failed));
        assert_eq!(
            (r.items, r.always_right, r.never_right, r.mixed, r.failed),
            (6, 1, 1, 1 + 1 + 1, 1)
        );
        assert_eq!(
            (r.crop_checked, r.crop_helps, r.no_box, r.kept),
            (2, 1, 1, 1)
        );
    }
}
