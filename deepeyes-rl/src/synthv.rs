//! SynthV*: a seeded fine-grained visual-search task in the spirit of V* Bench.
//!
//! Each image is a large cluttered canvas with one small white card; on the card sits a dot whose
//! colour is asked. The card is easy to find at low resolution (it is the brightest small square),
//! but the dot's colour is carried by a fine two-colour checkerboard whose average is the same grey
//! for every answer: any view that shrinks the canvas to the model's global resolution averages the
//! colour away, while a zoom onto the card shows it plainly. A test checks exactly this with a
//! probe on the global view and on a crop.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use deepeyes_core::{Error, Image, Result, Rng};

/// One answer colour: its name and the two checkerboard colours that draw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DotColour {
    /// The answer word.
    pub name: String,
    /// The colour itself.
    pub rgb: [u8; 3],
}

impl DotColour {
    /// The checkerboard partner: the reflection of `rgb` through mid-grey, so that the two
    /// average to grey (128, 128, 128) whatever the answer.
    pub fn partner(&self) -> [u8; 3] {
        self.rgb.map(|c| (256 - i32::from(c)).clamp(0, 255) as u8)
    }
}

/// Parameters of the generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SynthVConfig {
    /// Smallest canvas side in pixels.
    pub canvas_min: u32,
    /// Largest canvas side in pixels.
    pub canvas_max: u32,
    /// Smallest card side in pixels.
    pub card_min: u32,
    /// Largest card side in pixels.
    pub card_max: u32,
    /// Side of the dot in pixels.
    pub dot: u32,
    /// Side of one checkerboard cell of the dot in pixels.
    pub cell: u32,
    /// Fewest clutter shapes.
    pub clutter_min: u32,
    /// Most clutter shapes.
    pub clutter_max: u32,
    /// Fewest distractor squares (card-sized, grey or an answer colour).
    pub distractors_min: u32,
    /// Most distractor squares.
    pub distractors_max: u32,
    /// Amplitude of the uniform per-pixel noise.
    pub noise: u8,
    /// The answer colours.
    pub colours: Vec<DotColour>,
}

impl Default for SynthVConfig {
    fn default() -> Self {
        let colour = |name: &str, rgb| DotColour {
            name: name.into(),
            rgb,
        };
        Self {
            canvas_min: 1024,
            canvas_max: 1024,
            // A card of 5–6 px in the 112 px global view: a bright spot the tiny model can
            // find (at 22–26 px, 2–3 view pixels, its grounding never got off the ground), while
            // the checkerboard keeps the dot's colour unreadable at any such size.
            card_min: 40,
            card_max: 48,
            dot: 12,
            cell: 2,
            clutter_min: 50,
            clutter_max: 100,
            distractors_min: 3,
            distractors_max: 6,
            noise: 12,
            colours: vec![
                colour("red", [230, 60, 60]),
                colour("green", [40, 150, 40]),
                colour("blue", [70, 100, 250]),
                // Not yellow: its partner would be blue-ish and blue's yellow-ish, so the two
                // dots would hold the same pair of colours. Each answer's pair is its own:
                // red/cyan, green/magenta, blue/yellow, black/white.
                colour("black", [10, 10, 10]),
            ],
        }
    }
}

impl SynthVConfig {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::config("synthv", what));
        if self.canvas_min < 128 || self.canvas_min > self.canvas_max {
            return bad("canvas-min must be ≥ 128 and ≤ canvas-max");
        }
        if self.card_min < self.dot + 4 || self.card_min > self.card_max {
            return bad("card-min must exceed dot + 4 and be ≤ card-max");
        }
        if self.cell == 0 || self.dot < 2 * self.cell {
            return bad("cell must be ≥ 1 and dot ≥ 2 × cell");
        }
        if self.colours.len() < 2 || self.colours.len() > 26 {
            return bad("between 2 and 26 colours are needed");
        }
        if self.clutter_min > self.clutter_max || self.distractors_min > self.distractors_max {
            return bad("each minimum must be ≤ its maximum");
        }
        Ok(())
    }
}

/// One generated item.
#[derive(Debug, Clone)]
pub struct SynthVItem {
    /// Stable id, `<split>-<index>`.
    pub id: String,
    /// The canvas.
    pub image: Image,
    /// The question, options included.
    pub question: String,
    /// The answer options (colour names, shuffled).
    pub options: Vec<String>,
    /// Index of the correct option.
    pub answer_index: usize,
    /// The card's box `[x1, y1, x2, y2]` in canvas pixels (the ground-truth zoom region).
    pub card_box: [u32; 4],
    /// The dot's box.
    pub dot_box: [u32; 4],
}

pub(crate) const QUESTIONS: [&str; 3] = [
    "What colour is the dot on the small white card?",
    "The image contains one small white card with a dot in its middle. Which colour is that dot?",
    "Find the little white card. What is the colour of the mark at its centre?",
];

struct Canvas {
    w: u32,
    h: u32,
    px: Vec<u8>,
}

impl Canvas {
    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, rgb: [u8; 3]) {
        let (x0, x1) = (x0.max(0) as u32, (x1.min(i64::from(self.w))).max(0) as u32);
        let (y0, y1) = (y0.max(0) as u32, (y1.min(i64::from(self.h))).max(0) as u32);
        for y in y0..y1 {
            for x in x0..x1 {
                let i = ((y * self.w + x) * 3) as usize;
                self.px[i..i + 3].copy_from_slice(&rgb);
            }
        }
    }

    fn fill_ellipse(&mut self, cx: f64, cy: f64, rx: f64, ry: f64, rgb: [u8; 3]) {
        let (x0, x1) = ((cx - rx).floor() as i64, (cx + rx).ceil() as i64);
        let (y0, y1) = ((cy - ry).floor() as i64, (cy + ry).ceil() as i64);
        for y in y0.max(0)..y1.min(i64::from(self.h)) {
            for x in x0.max(0)..x1.min(i64::from(self.w)) {
                let dx = (x as f64 + 0.5 - cx) / rx;
                let dy = (y as f64 + 0.5 - cy) / ry;
                if dx * dx + dy * dy <= 1.0 {
                    let i = ((y as u32 * self.w + x as u32) * 3) as usize;
                    self.px[i..i + 3].copy_from_slice(&rgb);
                }
            }
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), width: f64, rgb: [u8; 3]) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            self.fill_ellipse(x, y, width / 2.0, width / 2.0, rgb);
        }
    }
}

fn random_colour(rng: &mut Rng, lo: i64, hi: i64) -> [u8; 3] {
    [0, 0, 0].map(|_: u8| rng.range_inclusive(lo, hi) as u8)
}

/// Generates item `index` of a split whose seed is `seed`. The same `(config, seed, index)` always
/// gives the same item.
pub fn generate(config: &SynthVConfig, seed: u64, index: u64, split: &str) -> Result<SynthVItem> {
    config.validate()?;
    let mut rng = Rng::new(Rng::derive_seed(seed, &[index]));
    let side = |rng: &mut Rng| {
        rng.range_inclusive(i64::from(config.canvas_min), i64::from(config.canvas_max)) as u32
    };
    let (w, h) = (side(&mut rng), side(&mut rng));
    let mut canvas = Canvas {
        w,
        h,
        px: Vec::new(),
    };
    let background = random_colour(&mut rng, 20, 140);
    canvas.px = background.repeat((w * h) as usize);

    // Clutter: rectangles, ellipses and lines, a quarter of them in answer colours.
    let n_clutter =
        rng.range_inclusive(i64::from(config.clutter_min), i64::from(config.clutter_max));
    for _ in 0..n_clutter {
        let rgb = if rng.below(4) == 0 {
            config.colours[rng.below(config.colours.len() as u64) as usize].rgb
        } else {
            random_colour(&mut rng, 0, 200)
        };
        let size = rng.range_inclusive(8, 170) as f64;
        let (x, y) = (rng.next_f64() * f64::from(w), rng.next_f64() * f64::from(h));
        match rng.below(3) {
            0 => {
                let aspect = 0.3 + rng.next_f64() * 1.4;
                canvas.fill_rect(
                    x as i64,
                    y as i64,
                    (x + size) as i64,
                    (y + size * aspect) as i64,
                    rgb,
                )
            }
            1 => canvas.fill_ellipse(
                x,
                y,
                size / 2.0,
                size * (0.3 + rng.next_f64() * 0.7) / 2.0,
                rgb,
            ),
            _ => {
                let angle = rng.next_f64() * std::f64::consts::TAU;
                let end = (x + size * angle.cos(), y + size * angle.sin());
                canvas.line((x, y), end, 2.0 + rng.next_f64() * 4.0, rgb);
            }
        }
    }

    let card = rng.range_inclusive(i64::from(config.card_min), i64::from(config.card_max)) as u32;
    let margin = 40.min((w.min(h) - card) / 2);
    let place = |rng: &mut Rng, extent: u32, size: u32| {
        rng.range_inclusive(i64::from(margin), i64::from(extent - size - margin)) as u32
    };
    let (cx, cy) = (place(&mut rng, w, card), place(&mut rng, h, card));
    let card_box = [cx, cy, cx + card, cy + card];

    // Distractors: card-sized squares, never overlapping the card.
    let n_distractors = rng.range_inclusive(
        i64::from(config.distractors_min),
        i64::from(config.distractors_max),
    );
    for _ in 0..n_distractors {
        let s = rng.range_inclusive(
            i64::from(config.card_min.saturating_sub(4)),
            i64::from(config.card_max + 4),
        ) as u32;
        let (x, y) = (
            place(&mut rng, w, s.min(card)),
            place(&mut rng, h, s.min(card)),
        );
        let overlaps = x < card_box[2] + 8
            && x + s + 8 > card_box[0]
            && y < card_box[3] + 8
            && y + s + 8 > card_box[1];
        if overlaps {
            continue;
        }
        let rgb = if rng.below(2) == 0 {
            let g = rng.range_inclusive(110, 175) as u8;
            [g, g, g]
        } else {
            config.colours[rng.below(config.colours.len() as u64) as usize].rgb
        };
        canvas.fill_rect(
            i64::from(x),
            i64::from(y),
            i64::from(x + s),
            i64::from(y + s),
            rgb,
        );
    }

    // The card and its checkerboard dot.
    canvas.fill_rect(
        i64::from(cx),
        i64::from(cy),
        i64::from(cx + card),
        i64::from(cy + card),
        [250, 250, 250],
    );
    let colour_index = rng.below(config.colours.len() as u64) as usize;
    let colour = &config.colours[colour_index];
    let (a, b) = (colour.rgb, colour.partner());
    let (dx, dy) = (cx + (card - config.dot) / 2, cy + (card - config.dot) / 2);
    for y in 0..config.dot {
        for x in 0..config.dot {
            let rgb = if ((x / config.cell) + (y / config.cell)).is_multiple_of(2) {
                a
            } else {
                b
            };
            let i = (((dy + y) * w + dx + x) * 3) as usize;
            canvas.px[i..i + 3].copy_from_slice(&rgb);
        }
    }
    let dot_box = [dx, dy, dx + config.dot, dy + config.dot];

    // Sensor noise everywhere.
    let noise = i64::from(config.noise);
    for v in &mut canvas.px {
        *v = (i64::from(*v) + rng.range_inclusive(-noise, noise)).clamp(0, 255) as u8;
    }

    let mut order: Vec<usize> = (0..config.colours.len()).collect();
    rng.shuffle(&mut order);
    let options: Vec<String> = order
        .iter()
        .map(|&i| config.colours[i].name.clone())
        .collect();
    let answer_index = order
        .iter()
        .position(|&i| i == colour_index)
        .expect("colour is an option");
    let template = QUESTIONS[rng.below(QUESTIONS.len() as u64) as usize];
    let listed: Vec<String> = options
        .iter()
        .enumerate()
        .map(|(i, o)| format!("{}. {o}", (b'A' + i as u8) as char))
        .collect();
    let question = format!("{template}\nOptions:\n{}", listed.join("\n"));
    let image = Image::from_raw(w, h, canvas.px)?;
    Ok(SynthVItem {
        id: format!("{split}-{index:05}"),
        image,
        question,
        options,
        answer_index,
        card_box,
        dot_box,
    })
}

/// The seed of a named split: `train` and `test` draw from disjoint streams of `seed`.
pub fn split_seed(seed: u64, split: &str) -> u64 {
    let tag = split
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)));
    Rng::derive_seed(seed, &[tag])
}

/// One row of the JSONL index, in the format `deepeyes_core::dataset` reads.
#[derive(Debug, Clone, Serialize)]
struct IndexRow<'a> {
    id: &'a str,
    image: String,
    question: &'a str,
    options: &'a [String],
    answer: &'a str,
    answer_index: usize,
    bbox: [u32; 4],
    category: &'static str,
    data_source: &'static str,
}

/// Writes `count` items of `split` into `dir` (PNG files under `dir/images/` and
/// `dir/<split>.jsonl`). Returns the index path.
pub fn write_split(
    config: &SynthVConfig,
    dir: &Path,
    split: &str,
    count: u64,
    seed: u64,
) -> Result<std::path::PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let index = dir.join(format!("{split}.jsonl"));
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(&index).map_err(|e| Error::io(&index, e))?);
    let s = split_seed(seed, split);
    for i in 0..count {
        let item = generate(config, s, i, split)?;
        let rel = format!("images/{}.png", item.id);
        item.image.save_png(dir.join(&rel))?;
        let row = IndexRow {
            id: &item.id,
            image: rel,
            // The question alone: readers render the options from `options` themselves.
            question: item.question.split('\n').next().unwrap_or_default(),
            options: &item.options,
            answer: &item.options[item.answer_index],
            answer_index: item.answer_index,
            bbox: item.card_box,
            category: "colour",
            data_source: "synthv",
        };
        let line = serde_json::to_string(&row).map_err(|e| Error::config("synthv index", e))?;
        writeln!(out, "{line}").map_err(|e| Error::io(&index, e))?;
    }
    out.flush().map_err(|e| Error::io(&index, e))?;
    tracing::info!(split, count, path = %index.display(), "wrote SynthV* split");
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SynthVConfig {
        SynthVConfig {
            clutter_min: 30,
            clutter_max: 40,
            ..SynthVConfig::default()
        }
    }

    /// Mean RGB features of a `k×k` window of `view` centred on `(x, y)`.
    fn window(view: &image::RgbImage, x: f64, y: f64, k: i64) -> Vec<f64> {
        let mut f = Vec::new();
        for dy in -(k / 2)..=(k / 2) {
            for dx in -(k / 2)..=(k / 2) {
                let px = (x as i64 + dx).clamp(0, i64::from(view.width()) - 1) as u32;
                let py = (y as i64 + dy).clamp(0, i64::from(view.height()) - 1) as u32;
                f.extend(view.get_pixel(px, py).0.iter().map(|&c| f64::from(c)));
            }
        }
        f
    }

    /// Leave-one-out nearest-centroid accuracy of `features` against `labels`.
    fn probe(features: &[Vec<f64>], labels: &[usize], classes: usize) -> f64 {
        let dim = features[0].len();
        let mut hits = 0;
        for i in 0..features.len() {
            let mut sums = vec![vec![0.0; dim]; classes];
            let mut counts = vec![0usize; classes];
            for j in (0..features.len()).filter(|&j| j != i) {
                counts[labels[j]] += 1;
                for d in 0..dim {
                    sums[labels[j]][d] += features[j][d];
                }
            }
            let best = (0..classes)
                .min_by(|&a, &b| {
                    let dist = |c: usize| -> f64 {
                        (0..dim)
                            .map(|d| {
                                (features[i][d] - sums[c][d] / counts[c].max(1) as f64).powi(2)
                            })
                            .sum()
                    };
                    dist(a).total_cmp(&dist(b))
                })
                .unwrap();
            hits += usize::from(best == labels[i]);
        }
        hits as f64 / features.len() as f64
    }

    #[test]
    fn deterministic_and_split_disjoint() {
        let cfg = small();
        let a = generate(&cfg, 5, 3, "train").unwrap();
        let b = generate(&cfg, 5, 3, "train").unwrap();
        assert_eq!(a.image, b.image);
        assert_eq!(a.question, b.question);
        assert_ne!(split_seed(5, "train"), split_seed(5, "test"));
        let c = generate(&cfg, 5, 4, "train").unwrap();
        assert_ne!(a.image, c.image);
        assert_eq!(a.options.len(), 4);
        assert!(a.question.contains("A. "));
    }

    #[test]
    fn dot_colour_is_unreadable_globally_but_plain_after_a_zoom() {
        // The model's global view of a 1024² canvas is 112² (16 merged visual tokens); a zoom
        // crop around the card is resized to the same 112².
        let cfg = small();
        let (mut global, mut zoomed, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..80 {
            let item = generate(&cfg, 11, i, "probe").unwrap();
            let colour = cfg
                .colours
                .iter()
                .position(|c| c.name == item.options[item.answer_index])
                .unwrap();
            labels.push(colour);
            let scale = 112.0 / f64::from(item.image.width());
            let view = image::imageops::resize(
                item.image.rgb(),
                112,
                112,
                image::imageops::FilterType::CatmullRom,
            );
            let [x1, y1, x2, y2] = item.card_box;
            let (cx, cy) = (f64::from(x1 + x2) / 2.0, f64::from(y1 + y2) / 2.0);
            global.push(window(&view, cx * scale, cy * scale, 5));
            // A 64-pixel zoom centred on the card.
            let (zx, zy) = (
                (cx as u32).saturating_sub(32),
                (cy as u32).saturating_sub(32),
            );
            let crop = image::imageops::crop_imm(item.image.rgb(), zx, zy, 64, 64).to_image();
            let crop =
                image::imageops::resize(&crop, 112, 112, image::imageops::FilterType::CatmullRom);
            let (dx, dy) = (
                (cx - f64::from(zx)) * 112.0 / 64.0,
                (cy - f64::from(zy)) * 112.0 / 64.0,
            );
            zoomed.push(window(&crop, dx, dy, 9));
        }
        let global_acc = probe(&global, &labels, cfg.colours.len());
        let zoom_acc = probe(&zoomed, &labels, cfg.colours.len());
        assert!(
            global_acc < 0.40,
            "the global view leaks the answer: probe accuracy {global_acc}"
        );
        assert!(
            zoom_acc > 0.90,
            "a zoom does not reveal the answer: probe accuracy {zoom_acc}"
        );
    }

    #[test]
    fn writes_an_index_the_loaders_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthVConfig {
            canvas_min: 256,
            canvas_max: 320,
            clutter_min: 5,
            clutter_max: 10,
            ..small()
        };
        let index = write_split(&cfg, dir.path(), "test", 3, 9).unwrap();
        let text = std::fs::read_to_string(&index).unwrap();
        assert_eq!(text.lines().count(), 3);
        let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(row["data_source"], "synthv");
        assert!(dir.path().join(row["image"].as_str().unwrap()).exists());
    }

    #[test]
    fn bad_configs_are_rejected() {
        let cfg = SynthVConfig {
            card_min: 5,
            ..SynthVConfig::default()
        };
        assert!(generate(&cfg, 0, 0, "x").is_err());
        let err = toml::from_str::<SynthVConfig>("canvas-mim = 3").unwrap_err();
        assert!(err.to_string().contains("canvas-mim"));
    }
}
