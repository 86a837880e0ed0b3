//! The base stage's samples: canvases, the boxes TinyEyes writes on them, and the grounding,
//! perception and action-format conversations built on them.

use deepeyes_core::PreprocessConfig;
use deepeyes_core::geometry::resolve_bbox;

use super::*;

/// One white card of a canvas and the pixels around it that every crop of it is cut from.
pub(super) struct Card {
    /// The card's box in canvas pixels.
    pub(super) bbox: [u32; 4],
    /// The canvas pixels within a crop's reach of the card, and where they sit on the canvas.
    region: Image,
    origin: (u32, u32),
}

impl Card {
    /// Twice the card's centre x in canvas pixels: orders cards left to right without rounding.
    pub(super) fn doubled_centre_x(&self) -> u32 {
        self.bbox[0] + self.bbox[2]
    }
}

/// One canvas, kept small: its global view (already preprocessed) and its cards' surroundings.
pub(super) struct Canvas {
    pub(super) view: ImageInput,
    /// The view's size in pixels `(width, height)`: the extent of the boxes' frame on this
    /// canvas.
    pub(super) view_size: (u32, u32),
    pub(super) canvas: (u32, u32),
    /// The preprocessing that made the view, which defines the boxes' frame.
    preprocess: PreprocessConfig,
    /// Every white card: the one with the coloured dot first, then the decoys.
    pub(super) cards: Vec<Card>,
    pub(super) dot: [u32; 4],
    pub(super) colour: usize,
    pub(super) question_stem: String,
}

impl Canvas {
    /// The card the grounding question is answered with: the leftmost (one right answer per
    /// canvas, whatever the number of cards).
    pub(super) fn leftmost(&self) -> usize {
        (0..self.cards.len())
            .min_by_key(|&k| self.cards[k].doubled_centre_x())
            .expect("a canvas has a card")
    }

    /// The card nearest to the right of card `k` (by centre), if any: where a left-to-right
    /// search looks next.
    pub(super) fn right_of(&self, k: usize) -> Option<usize> {
        let centre = |j: usize| self.cards[j].doubled_centre_x();
        (0..self.cards.len())
            .filter(|&j| j != k && (centre(j), j) > (centre(k), k))
            .min_by_key(|&j| (centre(j), j))
    }

    /// The cards an action-format zoom looks at: the leftmost, then, while there are fewer than
    /// `max_looks` and a card lies right of the last one, that card with probability `share`
    /// at each step (the format of a left-to-right search, whatever the crops show).
    pub(super) fn scan(&self, max_looks: u32, share: f64, rng: &mut Rng) -> Vec<usize> {
        let mut looks = vec![self.leftmost()];
        while looks.len() < max_looks as usize {
            let Some(next) = self.right_of(*looks.last().expect("one look at least")) else {
                break;
            };
            if rng.next_f64() >= share {
                break;
            }
            looks.push(next);
        }
        looks
    }

    /// Canvas pixels per view pixel along x and y.
    fn scale(&self) -> (f64, f64) {
        (
            f64::from(self.canvas.0) / f64::from(self.view_size.0),
            f64::from(self.canvas.1) / f64::from(self.view_size.1),
        )
    }

    /// The fewest coordinate steps a box side needs on each axis to pass the zoom tool's
    /// minimum side on this canvas.
    pub(super) fn min_bins(&self) -> (u32, u32) {
        let (sx, sy) = self.scale();
        let need = |s: f64| {
            let mut bins = 1;
            while f64::from(bins * COORDINATE_STEP) * s <= ZOOM_LIMITS.min_side {
                bins += 1;
            }
            bins
        };
        (need(sx), need(sy))
    }

    /// The merged view cell (raster order) holding canvas point `(x, y)`.
    pub(super) fn cell_at(&self, x: f64, y: f64) -> usize {
        let [_, gh, gw] = self.view.grid;
        let (mh, mw) = (gh / 2, gw / 2);
        let col = ((x / f64::from(self.canvas.0) * mw as f64) as usize).min(mw - 1);
        let row = ((y / f64::from(self.canvas.1) * mh as f64) as usize).min(mh - 1);
        row * mw + col
    }

    /// The merged view cell holding card `k`'s centre.
    pub(super) fn card_cell(&self, k: usize) -> usize {
        let [x1, y1, x2, y2] = self.cards[k].bbox.map(f64::from);
        self.cell_at((x1 + x2) / 2.0, (y1 + y2) / 2.0)
    }

    /// The cells of the view over a card.
    pub(super) fn card_cells(&self) -> Vec<usize> {
        (0..self.cards.len()).map(|k| self.card_cell(k)).collect()
    }

    /// A box in the `resized` frame mapped to canvas pixels (unclamped), by the resize's exact
    /// per-axis factors.
    pub(super) fn to_canvas(&self, bbox: [u32; 4]) -> [f64; 4] {
        let (sx, sy) = self.scale();
        let [x1, y1, x2, y2] = bbox.map(f64::from);
        [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
    }

    /// The canvas rectangle the zoom tool crops for `bbox` (in [`ZOOM_FRAME`]), or its
    /// refusal: the tool's own resolution ([`resolve_bbox`]) under [`ZOOM_LIMITS`].
    pub(super) fn resolve(&self, bbox: [u32; 4]) -> TrainResult<CropRect> {
        let (w, h) = self.canvas;
        resolve_bbox(
            bbox.map(f64::from),
            ZOOM_FRAME,
            w,
            h,
            &self.preprocess,
            &ZOOM_LIMITS,
        )
        .map(|resolved| resolved.rect)
        .map_err(|why| data_err(Path::new("base-stage box"), format!("{bbox:?}: {why}")))
    }

    /// The dot's centre in canvas pixels.
    fn dot_centre(&self) -> (u32, u32) {
        (
            (self.dot[0] + self.dot[2]) / 2,
            (self.dot[1] + self.dot[3]) / 2,
        )
    }

    /// Whether the canvas rectangle `rect` holds the dot's centre.
    pub(super) fn shows_dot(&self, rect: CropRect) -> bool {
        let (cx, cy) = self.dot_centre();
        rect.x <= cx && cx < rect.x + rect.width && rect.y <= cy && cy < rect.y + rect.height
    }
}

/// The coordinate-step span `[first, last)` of the view that covers canvas span `lo..hi` scaled
/// by `s` canvas px per view px.
fn span_bins(lo: u32, hi: u32, s: f64) -> (u32, u32) {
    let step = f64::from(COORDINATE_STEP);
    let first = (f64::from(lo) / s / step).floor() as u32;
    let last = (f64::from(hi) / s / step).ceil() as u32;
    (first, last.max(first + 1))
}

/// The side of the boxes the base writes around a card spanning `first..last` steps: at least
/// [`MIN_BOX_BINS`], and the card's span if that is wider.
pub(super) fn box_bins(first: u32, last: u32) -> u32 {
    (last - first).max(MIN_BOX_BINS)
}

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
            weight: 1.0,
            card_cells: c.card_cells(),
            ground_cell: Some(c.card_cell(c.leftmost())),
            merged_width: c.view.grid[2] / 2,
            crop_dots: Vec::new(),
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

    /// A random box (in the `resized` frame) holding card `k`, each side from the fewest steps the tool
    /// accepts on this canvas up to [`MAX_PERCEPTION_BINS`] (wider crops of a large canvas are
    /// shrunk to the view and blur the dot's checkerboard).
    pub(super) fn box_around(c: &Canvas, k: usize, rng: &mut Rng) -> [u32; 4] {
        let (sx, sy) = c.scale();
        let (min_x, min_y) = c.min_bins();
        let card = c.cards[k].bbox;
        let axis = |lo: u32, hi: u32, s: f64, min: u32, extent: u32, rng: &mut Rng| {
            let (first, last) = span_bins(lo, hi, s);
            let need = (last - first).max(min);
            let widest = MAX_PERCEPTION_BINS.max(need);
            let side = need + rng.below(u64::from(widest - need + 1)) as u32;
            let bins = extent / COORDINATE_STEP;
            let lowest = last.saturating_sub(side);
            let start = (lowest + rng.below(u64::from(first.max(lowest) - lowest + 1)) as u32)
                .min(bins.saturating_sub(side));
            (start * COORDINATE_STEP, (start + side) * COORDINATE_STEP)
        };
        let (x1, x2) = axis(card[0], card[2], sx, min_x, c.view_size.0, rng);
        let (y1, y2) = axis(card[1], card[3], sy, min_y, c.view_size.1, rng);
        [x1, y1, x2, y2]
    }

    /// The box the base writes for card `k`: [`box_bins`] steps a side, centred on the card,
    /// inside the view.
    pub(super) fn card_box(c: &Canvas, k: usize) -> [u32; 4] {
        let (sx, sy) = c.scale();
        let card = c.cards[k].bbox;
        let axis = |lo: u32, hi: u32, s: f64, extent: u32| {
            let (first, last) = span_bins(lo, hi, s);
            let side = box_bins(first, last);
            let centre = f64::from(lo + hi) / 2.0 / s / f64::from(COORDINATE_STEP);
            let start = (centre - f64::from(side) / 2.0).round().max(0.0) as u32;
            let start = start.min((extent / COORDINATE_STEP).saturating_sub(side));
            (start * COORDINATE_STEP, (start + side) * COORDINATE_STEP)
        };
        let (x1, x2) = axis(card[0], card[2], sx, c.view_size.0);
        let (y1, y2) = axis(card[1], card[3], sy, c.view_size.1);
        [x1, y1, x2, y2]
    }

    /// [`BaseStage::card_box`] moved by up to a step along each axis (inside the view): the
    /// imprecise boxes of the action format.
    pub(super) fn noisy_card_box(c: &Canvas, k: usize, rng: &mut Rng) -> [u32; 4] {
        let [x1, y1, x2, y2] = Self::card_box(c, k);
        let mut shift = |lo: u32, hi: u32, extent: u32| {
            let side = hi - lo;
            let d = rng.range_inclusive(-1, 1) * i64::from(COORDINATE_STEP);
            let start = (i64::from(lo) + d).clamp(0, i64::from(extent - side)) as u32;
            (start, start + side)
        };
        let (x1, x2) = shift(x1, x2, c.view_size.0);
        let (y1, y2) = shift(y1, y2, c.view_size.1);
        [x1, y1, x2, y2]
    }

    pub(super) fn box_text(bbox: [u32; 4]) -> String {
        let [x1, y1, x2, y2] = bbox;
        format!("[{x1}, {y1}, {x2}, {y2}]")
    }

    pub(super) fn ground_sample(&self, c: &Canvas) -> TrainResult<Sample> {
        let mut s = self.start(c, GROUND_QUESTION)?;
        let target = Self::box_text(Self::card_box(c, c.leftmost()));
        self.push_written(&mut s, &TinyEyesFormat::answer(&target), true)?;
        self.push_written(&mut s, deepeyes_core::protocol::IM_END, true)?;
        Ok(s)
    }

    /// Appends a zoom call on `bbox` of card `k` (supervised or not) and the crop the tool
    /// returns, the dot repainted in `repaint` when given.
    fn look(
        &mut self,
        s: &mut Sample,
        c: &Canvas,
        (k, bbox): (usize, [u32; 4]),
        supervised: bool,
        repaint: Option<usize>,
        rng: &mut Rng,
    ) -> TrainResult<bool> {
        let rect = c.resolve(bbox)?;
        let crop = crop_image(&self.synthv, c, k, rect, repaint, rng)?;
        let crop = ImageInput::from(self.preprocessor.preprocess(&crop)?);
        self.push_written(s, &TinyEyesFormat::zoom_call(bbox), supervised)?;
        self.push(s, &self.format.crop_returned(), false)?;
        let shows = c.shows_dot(rect);
        if shows && k == 0 {
            let cell = dot_cell(c, rect, crop.grid);
            let colour = repaint.unwrap_or(c.colour);
            s.crop_dots.push((s.sequence.images.len(), cell, colour));
        }
        s.sequence.images.push(crop);
        Ok(shows && k == 0)
    }

    /// The colour question, a zoom on a box around the dotted card (and, on half the canvases
    /// with decoys, one around a decoy before or after it), the crops, then the answer: the
    /// loss is on the answer only. Training crops get a random dot colour and that label;
    /// held-out ones keep theirs.
    pub(super) fn perceive_sample(
        &mut self,
        c: Arc<Canvas>,
        rng: &mut Rng,
        held_out: bool,
    ) -> TrainResult<Sample> {
        let question = self.colour_question(&c, rng);
        let colour = if held_out {
            c.colour
        } else {
            rng.below(self.synthv.colours.len() as u64) as usize
        };
        let decoy = (!held_out && c.cards.len() > 1 && rng.next_f64() < 0.5)
            .then(|| 1 + rng.below(c.cards.len() as u64 - 1) as usize);
        let decoy_first = rng.next_f64() < 0.5;
        let mut s = self.start(&c, &question)?;
        s.weight = self.config.perception_weight as f32;
        let mut looks = vec![0];
        if let Some(d) = decoy {
            looks.insert(usize::from(!decoy_first), d);
        }
        for k in looks {
            let bbox = Self::box_around(&c, k, rng);
            let repaint = (!held_out && k == 0).then_some(colour);
            self.look(&mut s, &c, (k, bbox), false, repaint, rng)?;
        }
        self.finish(&mut s, colour)?;
        Ok(s)
    }

    /// The action format: mostly a direct answer with a guessed colour; with `zoom-share`, a
    /// call on a noisy box of the leftmost card and, with `second-look-share` at each step
    /// while a card lies to the right of the last and fewer than `max-looks` were taken,
    /// whatever the crops showed, a call on that card ([`Canvas::scan`]); then the answer the
    /// crops support (the dot's colour if one showed it, else a guess). The loss covers calls
    /// and answer: the format of one look and of more (a left-to-right search), not when any
    /// pays.
    pub(super) fn act_sample(&mut self, c: Arc<Canvas>, rng: &mut Rng) -> TrainResult<Sample> {
        let question = self.colour_question(&c, rng);
        let guess = rng.below(self.synthv.colours.len() as u64) as usize;
        let mut s = self.start(&c, &question)?;
        if rng.next_f64() >= self.config.zoom_share {
            self.finish(&mut s, guess)?;
            return Ok(s);
        }
        let looks = c.scan(self.config.max_looks, self.config.second_look_share, rng);
        let mut seen = false;
        for k in looks {
            let bbox = Self::noisy_card_box(&c, k, rng);
            seen |= self.look(&mut s, &c, (k, bbox), true, None, rng)?;
        }
        self.finish(&mut s, if seen { c.colour } else { guess })?;
        Ok(s)
    }
}

/// The pixels of the zoom tool's crop `rect` of card `k`'s surroundings, the dot repainted in
/// `colour` (an index into `synthv.colours`) when given.
pub(super) fn crop_image(
    synthv: &SynthVConfig,
    c: &Canvas,
    k: usize,
    rect: CropRect,
    colour: Option<usize>,
    rng: &mut Rng,
) -> TrainResult<Image> {
    let card = &c.cards[k];
    let (ox, oy) = card.origin;
    let (rw, rh) = (card.region.width(), card.region.height());
    // Crops are of boxes around the card, inside its region; clamp for safety.
    let rx1 = rect.x.saturating_sub(ox).min(rw - 1);
    let ry1 = rect.y.saturating_sub(oy).min(rh - 1);
    let rx2 = (rect.x + rect.width).saturating_sub(ox).clamp(rx1 + 1, rw);
    let ry2 = (rect.y + rect.height).saturating_sub(oy).clamp(ry1 + 1, rh);
    let local = CropRect::from_edges(rx1, ry1, rx2, ry2).expect("a non-empty box");
    let crop = card.region.crop(local)?;
    let Some(colour) = colour else {
        return Ok(crop);
    };
    let colour = &synthv.colours[colour];
    let (a, b) = (colour.rgb, colour.partner());
    let noise = i64::from(synthv.noise);
    let (w, h) = (crop.width(), crop.height());
    // The checkerboard the generator draws: cells in canvas coordinates.
    let cell = synthv.checker_cell(c.canvas.0, c.canvas.1);
    let mut px = crop.as_raw().to_vec();
    for y in c.dot[1]..c.dot[3] {
        for x in c.dot[0]..c.dot[2] {
            let (Some(cx), Some(cy)) = (x.checked_sub(ox + rx1), y.checked_sub(oy + ry1)) else {
                continue;
            };
            if cx >= w || cy >= h {
                continue;
            }
            let on = (x / cell + y / cell).is_multiple_of(2);
            let rgb = if on { a } else { b };
            let i = ((cy * w + cx) * 3) as usize;
            for k in 0..3 {
                px[i + k] =
                    (i64::from(rgb[k]) + rng.range_inclusive(-noise, noise)).clamp(0, 255) as u8;
            }
        }
    }
    Ok(Image::from_raw(w, h, px)?)
}

/// The merged cell (raster order) of the crop of canvas `rect`, preprocessed to `grid`, that
/// holds the dot's centre (the crop must show it).
pub(super) fn dot_cell(c: &Canvas, rect: CropRect, grid: [usize; 3]) -> usize {
    let (cx, cy) = c.dot_centre();
    let (mh, mw) = (grid[1] / 2, grid[2] / 2);
    let fx = f64::from(cx - rect.x) / f64::from(rect.width);
    let fy = f64::from(cy - rect.y) / f64::from(rect.height);
    let col = ((fx * mw as f64) as usize).min(mw.saturating_sub(1));
    let row = ((fy * mh as f64) as usize).min(mh.saturating_sub(1));
    row * mw + col
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
    let (rh, rw) = pre.config().smart_resize(h, w)?;
    let view = ImageInput::from(pre.preprocess(&item.image)?);
    // A crop reaches at most MAX_PERCEPTION_BINS steps (or the card's span) plus a step of
    // noise beyond the card on each side.
    let per_bin = f64::from(COORDINATE_STEP)
        * (f64::from(w) / f64::from(rw)).max(f64::from(h) / f64::from(rh));
    let reach = (f64::from(MAX_PERCEPTION_BINS + 2) * per_bin).ceil() as u32;
    let cards = std::iter::once(item.card_box)
        .chain(item.decoy_boxes.iter().copied())
        .map(|bbox| {
            let [x1, y1, x2, y2] = bbox;
            let rect = CropRect::from_edges(
                x1.saturating_sub(reach),
                y1.saturating_sub(reach),
                (x2 + reach).min(w),
                (y2 + reach).min(h),
            )
            .expect("the card lies inside the canvas");
            Ok(Card {
                bbox,
                region: item.image.crop(rect)?,
                origin: (rect.x, rect.y),
            })
        })
        .collect::<TrainResult<Vec<_>>>()?;
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
        view_size: (rw, rh),
        canvas: (w, h),
        preprocess: *pre.config(),
        cards,
        dot: item.dot_box,
        colour,
        question_stem: stem,
    })
}
