//! The base stage's samples: canvases, and the grounding, perception and action-format
//! conversations built on them.

use super::*;

impl BaseStage {
    /// Appends `text` to `sample`, supervised or not, encoded as the agent encodes its context
    /// ([`Rendered::encode`]), so the base learns from the ids it meets in rollouts.
    pub(super) fn push(
        &self,
        sample: &mut Sample,
        text: &Rendered,
        supervised: bool,
    ) -> TrainResult<()> {
        let ids = text
            .encode(&self.tokenizer)
            .map_err(|e| data_err(Path::new("tokenizer.json"), e))?;
        sample
            .supervised
            .extend(std::iter::repeat_n(supervised, ids.len()));
        sample.sequence.tokens.extend(ids);
        Ok(())
    }

    /// Appends what the model writes itself (a zoom call, an answer): its special tokens are
    /// the ids it generates.
    pub(super) fn push_written(
        &self,
        sample: &mut Sample,
        text: &str,
        supervised: bool,
    ) -> TrainResult<()> {
        self.push(sample, &Rendered::trusted(text), supervised)
    }

    pub(super) fn start(&self, c: &Canvas, question: &str) -> TrainResult<Sample> {
        let mut s = Sample {
            sequence: Sequence {
                score_from: 0,
                tokens: Vec::new(),
                images: vec![c.view.clone()],
            },
            supervised: Vec::new(),
            card_cell: Some(card_cell(c)),
            crop_dot: None,
        };
        self.push(&mut s, &self.format.prompt(question), false)?;
        Ok(s)
    }

    /// The colour question with shuffled options.
    pub(super) fn colour_question(&self, c: &Canvas, rng: &mut Rng) -> String {
        let mut names: Vec<&str> = self
            .synthv
            .colours
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        rng.shuffle(&mut names);
        TinyEyesFormat::multiple_choice(&c.question_stem, &names)
    }

    /// Appends `<answer>colour</answer><|im_end|>`, supervised.
    pub(super) fn finish(&self, s: &mut Sample, colour: usize) -> TrainResult<()> {
        let answer = TinyEyesFormat::answer(&self.synthv.colours[colour].name);
        self.push_written(s, &answer, true)?;
        self.push_written(s, deepeyes_core::protocol::IM_END, true)
    }

    /// A random box on the grid that contains the card, up to 7 bins a side (larger crops shrink
    /// the dot's fine checkerboard until its colour averages away).
    pub(super) fn box_around(c: &Canvas, rng: &mut Rng) -> [u32; 4] {
        let step = COORDINATE_STEP;
        let bins = |extent: u32| extent / step;
        let axis = |lo: u32, hi: u32, extent: u32, rng: &mut Rng| {
            let (first, last) = (lo / step, hi.div_ceil(step));
            let need = (last - first).max(2);
            let side =
                need + rng.below(u64::from(MAX_PERCEPTION_BINS.saturating_sub(need) + 1)) as u32;
            let max_start = bins(extent).saturating_sub(side);
            let lo_start = last.saturating_sub(side);
            let start = (lo_start + rng.below(u64::from(first - lo_start.min(first)) + 1) as u32)
                .min(max_start);
            (start * step, ((start + side) * step).min(extent))
        };
        let (x1, x2) = axis(c.card[0], c.card[2], c.canvas.0, rng);
        let (y1, y2) = axis(c.card[1], c.card[3], c.canvas.1, rng);
        [x1, y1, x2, y2]
    }

    /// The card's box on the grid (edges rounded to the nearest bin, at least 2 bins a side).
    pub(super) fn grid_box(c: &Canvas) -> [u32; 4] {
        let step = COORDINATE_STEP;
        let round = |v: u32| ((v + step / 2) / step) * step;
        let [x1, y1, x2, y2] = c.card.map(round);
        let widen = |lo: u32, hi: u32, extent: u32| {
            if hi >= lo + 2 * step {
                (lo, hi)
            } else {
                let hi = (lo + 2 * step).min(extent);
                (hi - 2 * step, hi)
            }
        };
        let (x1, x2) = widen(x1, x2, c.canvas.0);
        let (y1, y2) = widen(y1, y2, c.canvas.1);
        [x1, y1, x2, y2]
    }

    pub(super) fn box_text(bbox: [u32; 4]) -> String {
        let [x1, y1, x2, y2] = bbox;
        format!("[{x1}, {y1}, {x2}, {y2}]")
    }

    pub(super) fn ground_sample(&self, c: &Canvas) -> TrainResult<Sample> {
        let mut s = self.start(c, GROUND_QUESTION)?;
        let target = TinyEyesFormat::answer(&Self::box_text(Self::grid_box(c)));
        self.push_written(&mut s, &target, true)?;
        self.push_written(&mut s, deepeyes_core::protocol::IM_END, true)?;
        Ok(s)
    }

    pub(super) fn perceive_sample(
        &mut self,
        ci: usize,
        rng: &mut Rng,
        held_out: bool,
    ) -> TrainResult<Sample> {
        let pool = if held_out { &self.eval } else { &self.train };
        let c = &pool[ci];
        let question = self.colour_question(c, rng);
        let bbox = Self::box_around(c, rng);
        // Training crops get a random dot colour (and that label); held-out ones keep theirs.
        let colour = if held_out {
            c.colour
        } else {
            rng.below(self.synthv.colours.len() as u64) as usize
        };
        let crop = crop_view(
            &mut self.preprocessor,
            &self.synthv,
            c,
            bbox,
            (!held_out).then_some(colour),
            rng,
        )?;
        let c = if held_out {
            &self.eval[ci]
        } else {
            &self.train[ci]
        };
        let mut s = self.start(c, &question)?;
        self.push_written(&mut s, &TinyEyesFormat::zoom_call(bbox), false)?;
        self.push(&mut s, &self.format.crop_returned(), false)?;
        s.crop_dot = dot_cell(c, bbox, crop.grid).map(|cell| (cell, colour));
        s.sequence.images.push(crop);
        self.finish(&mut s, colour)?;
        Ok(s)
    }

    pub(super) fn act_sample(&mut self, ci: usize, rng: &mut Rng) -> TrainResult<Sample> {
        let question = self.colour_question(&self.train[ci], rng);
        let guess = rng.below(self.synthv.colours.len() as u64) as usize;
        if rng.next_f64() >= self.config.zoom_share {
            let mut s = self.start(&self.train[ci], &question)?;
            self.finish(&mut s, guess)?;
            return Ok(s);
        }
        let c = &self.train[ci];
        let shift = |v: u32, rng: &mut Rng| {
            let d = rng.range_inclusive(-1, 1) * i64::from(COORDINATE_STEP);
            (i64::from(v) + d).max(0) as u32
        };
        let mut bbox = Self::grid_box(c).map(|v| shift(v, rng));
        bbox = clamp_box(bbox, c.canvas);
        if bbox[2] < bbox[0] + 2 * COORDINATE_STEP {
            bbox[2] = bbox[0] + 2 * COORDINATE_STEP;
        }
        if bbox[3] < bbox[1] + 2 * COORDINATE_STEP {
            bbox[3] = bbox[1] + 2 * COORDINATE_STEP;
        }
        let centre = ((c.dot[0] + c.dot[2]) / 2, (c.dot[1] + c.dot[3]) / 2);
        let shows_dot =
            bbox[0] <= centre.0 && centre.0 < bbox[2] && bbox[1] <= centre.1 && centre.1 < bbox[3];
        let colour = if shows_dot { c.colour } else { guess };
        let crop = crop_view(&mut self.preprocessor, &self.synthv, c, bbox, None, rng)?;
        let mut s = self.start(&self.train[ci], &question)?;
        self.push_written(&mut s, &TinyEyesFormat::zoom_call(bbox), true)?;
        self.push(&mut s, &self.format.crop_returned(), false)?;
        s.crop_dot = dot_cell(c, bbox, crop.grid).map(|cell| (cell, c.colour));
        s.sequence.images.push(crop);
        self.finish(&mut s, colour)?;
        Ok(s)
    }
}

/// The crop of `bbox` as the zoom tool returns it, preprocessed, with the dot repainted in
/// `colour` (an index into `synthv.colours`) when given.
pub(super) fn crop_view(
    pre: &mut Preprocessor,
    synthv: &SynthVConfig,
    c: &Canvas,
    bbox: [u32; 4],
    colour: Option<usize>,
    rng: &mut Rng,
) -> TrainResult<ImageInput> {
    let crop = crop_image(synthv, c, bbox, colour, rng)?;
    Ok(ImageInput::from(pre.preprocess(&crop)?))
}

/// The pixels of [`crop_view`], before preprocessing.
pub(super) fn crop_image(
    synthv: &SynthVConfig,
    c: &Canvas,
    bbox: [u32; 4],
    colour: Option<usize>,
    rng: &mut Rng,
) -> TrainResult<Image> {
    let [x1, y1, x2, y2] = clamp_box(bbox, c.canvas);
    let (ox, oy) = c.region_origin;
    // Boxes are drawn around the card, inside the region; clamp for safety.
    let rx1 = x1.saturating_sub(ox).min(c.region.width() - 1);
    let ry1 = y1.saturating_sub(oy).min(c.region.height() - 1);
    let rx2 = x2.saturating_sub(ox).clamp(rx1 + 1, c.region.width());
    let ry2 = y2.saturating_sub(oy).clamp(ry1 + 1, c.region.height());
    let rect = CropRect::from_edges(rx1, ry1, rx2, ry2).expect("a non-empty box");
    let mut crop = c.region.crop(rect)?;
    if let Some(colour) = colour {
        let colour = &synthv.colours[colour];
        let (a, b) = (colour.rgb, colour.partner());
        let noise = i64::from(synthv.noise);
        let (w, h) = (crop.width(), crop.height());
        let mut px = crop.as_raw().to_vec();
        for y in c.dot[1]..c.dot[3] {
            for x in c.dot[0]..c.dot[2] {
                let (Some(cx), Some(cy)) = (x.checked_sub(ox + rx1), y.checked_sub(oy + ry1))
                else {
                    continue;
                };
                if cx >= w || cy >= h {
                    continue;
                }
                let on =
                    ((x - c.dot[0]) / synthv.cell + (y - c.dot[1]) / synthv.cell).is_multiple_of(2);
                let rgb = if on { a } else { b };
                let i = ((cy * w + cx) * 3) as usize;
                for k in 0..3 {
                    px[i + k] = (i64::from(rgb[k]) + rng.range_inclusive(-noise, noise))
                        .clamp(0, 255) as u8;
                }
            }
        }
        crop = Image::from_raw(w, h, px)?;
    }
    Ok(crop)
}

/// The merged cell (raster order) of the crop of `bbox`, preprocessed to `grid`, that holds the
/// dot's centre; `None` when the crop does not show it.
pub(super) fn dot_cell(c: &Canvas, bbox: [u32; 4], grid: [usize; 3]) -> Option<usize> {
    let [x1, y1, x2, y2] = clamp_box(bbox, c.canvas);
    let (cx, cy) = ((c.dot[0] + c.dot[2]) / 2, (c.dot[1] + c.dot[3]) / 2);
    if !(x1 <= cx && cx < x2 && y1 <= cy && cy < y2) {
        return None;
    }
    let (mh, mw) = (grid[1] / 2, grid[2] / 2);
    let fx = f64::from(cx - x1) / f64::from(x2 - x1);
    let fy = f64::from(cy - y1) / f64::from(y2 - y1);
    let col = ((fx * mw as f64) as usize).min(mw.saturating_sub(1));
    let row = ((fy * mh as f64) as usize).min(mh.saturating_sub(1));
    Some(row * mw + col)
}

/// The merged cell of the global view (raster order over its grid) that holds the card centre.
pub(super) fn card_cell(c: &Canvas) -> usize {
    let [_, gh, gw] = c.view.grid;
    let (mh, mw) = (gh / 2, gw / 2);
    let cx = f64::from(c.card[0] + c.card[2]) / 2.0 / f64::from(c.canvas.0);
    let cy = f64::from(c.card[1] + c.card[3]) / 2.0 / f64::from(c.canvas.1);
    let col = ((cx * mw as f64) as usize).min(mw - 1);
    let row = ((cy * mh as f64) as usize).min(mh - 1);
    row * mw + col
}

pub(super) fn clamp_box(b: [u32; 4], (w, h): (u32, u32)) -> [u32; 4] {
    [b[0].min(w - 1), b[1].min(h - 1), b[2].min(w), b[3].min(h)]
}

/// Generates canvas `i` of a split and keeps only what the base stage needs.
pub(super) fn canvas(
    synthv: &SynthVConfig,
    seed: u64,
    i: u64,
    split: &str,
    pre: &mut Preprocessor,
) -> TrainResult<Canvas> {
    let item = generate(synthv, seed, i, split)?;
    let (w, h) = (item.image.width(), item.image.height());
    let view = ImageInput::from(pre.preprocess(&item.image)?);
    let [x1, y1, x2, y2] = item.card_box;
    let region = CropRect::from_edges(
        x1.saturating_sub(REGION),
        y1.saturating_sub(REGION),
        (x2 + REGION).min(w),
        (y2 + REGION).min(h),
    )
    .expect("the card lies inside the canvas");
    let name = &item.options[item.answer_index];
    let colour = synthv
        .colours
        .iter()
        .position(|c| &c.name == name)
        .expect("the answer is a colour");
    let stem = item
        .question
        .split('\n')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Canvas {
        view,
        region: item.image.crop(region)?,
        region_origin: (region.x, region.y),
        canvas: (w, h),
        card: item.card_box,
        dot: item.dot_box,
        colour,
        question_stem: stem,
    })
}
