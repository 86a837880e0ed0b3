//! Teacher-forced evaluation of the base on held-out canvases.

use super::*;

impl BaseStage {
    /// Teacher-forced evaluation on the held-out canvases (see [`BaseEval`]).
    pub fn evaluate(&mut self) -> TrainResult<BaseEval> {
        let mut rng = Rng::new(Rng::derive_seed(self.config.seed, &[2]));
        let n = self.eval.len();
        if n == 0 {
            return Ok(BaseEval::default());
        }
        let model = self.model.take().expect("the model is present");
        let image_pad = model.config.image_token_id;
        let result = (|| -> TrainResult<BaseEval> {
            let mut ground = Vec::new();
            let mut perceive = Vec::new();
            let mut first = Vec::new();
            for c in self.eval.clone() {
                ground.push(self.ground_sample(&c)?);
                perceive.push(self.perceive_sample(Arc::clone(&c), &mut rng, true)?);
                let q = self.colour_question(&c, &mut rng);
                first.push(self.start(&c, &q)?);
            }
            let mut e = BaseEval::default();
            // One pass over the grounding samples reads two things: first the token after the
            // global view's `<|vision_end|>` (finding: does it name the leftmost card's cell?),
            // then the argmax of each coordinate given the true ones before it (grounding).
            let picks = argmax_at(&model, &ground, |s| {
                let tokens = &s.sequence.tokens;
                // The prediction read at token t is made at t - 1: the vision end is pad + 1.
                let vision_end = tokens.iter().position(|&id| id == image_pad).map(|p| p + 2);
                // The four coordinates are the supervised tokens after `<answer>[`.
                let coordinates = (0..s.supervised.len())
                    .filter(|&t| s.supervised[t] && self.is_coordinate(tokens[t]));
                vision_end.into_iter().chain(coordinates).collect()
            })?;
            for (ci, pick) in picks.iter().enumerate() {
                let c = &self.eval[ci];
                let Some((cell, coordinates)) = pick.split_first() else {
                    continue;
                };
                let width = c.view.grid[2] / 2;
                if *cell == self.cell_token(c.card_cell(c.leftmost()), width) {
                    e.card_cell_acc += 1.0;
                }
                let values: Vec<Option<u32>> = coordinates
                    .iter()
                    .map(|&id| self.coordinate_value(id))
                    .collect();
                if let [Some(x1), Some(y1), Some(x2), Some(y2)] = values[..] {
                    let (iou, hit) = box_against_cards(c, [x1, y1, x2, y2]);
                    e.ground_iou += iou;
                    e.ground_hit += f64::from(u8::from(hit));
                }
            }
            // Detection: the view token most sure it holds a card.
            let detected = card_scores(&model, &ground, self.card_token)?;
            for (ci, scores) in detected.iter().enumerate() {
                let best = scores
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(k, _)| k);
                if best.is_some_and(|k| self.eval[ci].card_cells().contains(&k)) {
                    e.card_token_acc += 1.0;
                }
            }
            // Perception: the colour token right after `<answer>`.
            let picks = argmax_at(&model, &perceive, |s| {
                let t = s
                    .sequence
                    .tokens
                    .iter()
                    .rposition(|&id| id == self.answer_id)
                    .map_or(0, |p| p + 1);
                vec![t]
            })?;
            for (ci, pick) in picks.iter().enumerate() {
                if pick.first() == Some(&self.colour_tokens[self.eval[ci].colour]) {
                    e.perception_acc += 1.0;
                }
            }
            // Zoom propensity: p(<tool_call>) as the first assistant token.
            e.zoom_prob = first_token_prob(&model, &first, self.tool_call_id)?;
            e.ground_iou /= n as f64;
            e.ground_hit /= n as f64;
            e.perception_acc /= n as f64;
            e.card_cell_acc /= n as f64;
            e.card_token_acc /= n as f64;
            Ok(e)
        })();
        self.model = Some(model);
        result
    }

    pub(super) fn is_coordinate(&self, id: u32) -> bool {
        self.coordinate_value(id).is_some()
    }

    pub(super) fn coordinate_value(&self, id: u32) -> Option<u32> {
        self.coordinate_tokens
            .iter()
            .position(|&(a, b)| a == id || b == id)
            .map(|k| k as u32 * COORDINATE_STEP)
    }
}

/// A box (in the `resized` frame) judged against canvas `c`'s white cards, in canvas pixels: its IoU
/// with the nearest card, and whether it holds a card's centre.
pub(super) fn box_against_cards(c: &Canvas, bbox: [u32; 4]) -> (f64, bool) {
    let b = c.to_canvas(bbox);
    let mut best = 0.0f64;
    let mut hit = false;
    for card in &c.cards {
        let card = card.bbox.map(f64::from);
        best = best.max(deepeyes_core::image::iou(b, card));
        let (cx, cy) = ((card[0] + card[2]) / 2.0, (card[1] + card[3]) / 2.0);
        hit |= b[0] <= cx && cx < b[2] && b[1] <= cy && cy < b[3];
    }
    (best, hit)
}

/// Runs `samples` through the model in chunks and hands `visit` each sample with its row of
/// expanded token ids (every image pad spelled out) and a lookup of the next-token logits at an
/// expanded position (`None` past the row).
pub(super) fn visit_rows(
    model: &Qwen25Vl,
    samples: &[Sample],
    mut visit: impl for<'r> FnMut(&Sample, &'r [u32], &'r dyn Fn(usize) -> Option<&'r [f32]>),
) -> TrainResult<()> {
    for chunk in samples.chunks(16) {
        let seqs: Vec<Sequence> = chunk.iter().map(|s| s.sequence.clone()).collect();
        let batch = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
        let logits = model.logits(&batch)?.detach();
        let [_, seq, vocab] = logits.dims();
        let host = to_host(logits);
        for (i, s) in chunk.iter().enumerate() {
            let ids = &batch.input_ids[i * batch.seq..(i + 1) * batch.seq];
            let at = |e: usize| {
                (e < seq).then(|| &host[(i * seq + e) * vocab..(i * seq + e + 1) * vocab])
            };
            visit(s, ids, &at);
        }
    }
    Ok(())
}

/// Like [`visit_rows`], with the logits looked up after an unexpanded token `t` of the sample.
pub(super) fn visit_logits(
    model: &Qwen25Vl,
    samples: &[Sample],
    mut visit: impl FnMut(&Sample, &dyn Fn(usize) -> Option<Vec<f32>>),
) -> TrainResult<()> {
    let pad = model.config.image_token_id;
    visit_rows(model, samples, |s, ids, at| {
        // Each earlier image pad expands to its tokens: find token t's expanded position.
        let row = |t: usize| at(expanded_index(ids, t, pad)).map(<[f32]>::to_vec);
        visit(s, &row);
    })
}

/// For each sample, the argmax token at the positions `which` picks (token indices whose
/// prediction is read: the model's guess for token `t` given tokens `..t`).
pub(super) fn argmax_at(
    model: &Qwen25Vl,
    samples: &[Sample],
    which: impl Fn(&Sample) -> Vec<usize>,
) -> TrainResult<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(samples.len());
    visit_logits(model, samples, |s, logits_after| {
        let picks = which(s)
            .into_iter()
            .filter(|&t| t > 0)
            .filter_map(|t| logits_after(t - 1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(k, _)| k as u32)
            })
            .collect();
        out.push(picks);
    })?;
    Ok(out)
}

/// For each sample, the log-probability of token `id` at each token of its first image.
pub(super) fn card_scores(
    model: &Qwen25Vl,
    samples: &[Sample],
    id: u32,
) -> TrainResult<Vec<Vec<f32>>> {
    let pad = model.config.image_token_id;
    let mut out = Vec::with_capacity(samples.len());
    visit_rows(model, samples, |_, ids, at| {
        let start = ids.iter().position(|&t| t == pad).unwrap_or(ids.len());
        let run = ids[start..].iter().take_while(|&&t| t == pad).count();
        let scores = (start..start + run)
            .filter_map(at)
            .map(|logits| {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
                logits[id as usize] - max - z.ln()
            })
            .collect();
        out.push(scores);
    })?;
    Ok(out)
}

/// Mean probability of token `id` right after each sample's prompt.
pub(super) fn first_token_prob(model: &Qwen25Vl, samples: &[Sample], id: u32) -> TrainResult<f64> {
    let mut total = 0.0;
    visit_logits(model, samples, |s, logits_after| {
        if let Some(row) = logits_after(s.sequence.tokens.len() - 1) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
            total += f64::from(row[id as usize] - max).exp() / z;
        }
    })?;
    Ok(total / samples.len().max(1) as f64)
}

/// The expanded position of unexpanded token `t` in a batch row of expanded `ids`.
pub(super) fn expanded_index(ids: &[u32], t: usize, image_pad: u32) -> usize {
    // Image pads before `t` each expand to their merged tokens; the batch records the expanded
    // ids, so walk them: count unexpanded tokens until `t` is reached.
    let mut unexpanded = 0;
    let mut e = 0;
    while e < ids.len() {
        let pad_run = if ids[e] == image_pad {
            ids[e..].iter().take_while(|&&x| x == image_pad).count()
        } else {
            1
        };
        if unexpanded == t {
            return e + pad_run - 1;
        }
        unexpanded += 1;
        e += pad_run;
    }
    ids.len()
}
