//! Host-side preparation of a batch of multimodal token sequences: pad expansion, embedding
//! scatter indices, mRoPE positions, attention bias and the next-token targets.

use super::config::Qwen25VlConfig;
use super::error::{Result, input_err};
use deepeyes_core::vision;

use super::text::{DecoderInputs, causal_bias};
use super::vision::{Grid, VisionInputs, core_grids};

/// One image, already resized and cut into patches by the image processor.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// `(t, h, w)` patch grid.
    pub grid: Grid,
    /// `[t·h·w, patch_dim]` flattened, normalised patches in the processor's order.
    pub patches: Vec<f32>,
}

impl From<deepeyes_core::preprocess::PixelValues> for ImageInput {
    /// Takes the image processor's output (`deepeyes_core::preprocess::preprocess_image`).
    fn from(p: deepeyes_core::preprocess::PixelValues) -> Self {
        let [t, h, w] = p.grid_thw;
        Self {
            grid: [t as usize, h as usize, w as usize],
            patches: p.data,
        }
    }
}

/// One token sequence with its images, in the order of their pad tokens.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Token ids. How image pads are written is given by [`PadLayout`].
    pub tokens: Vec<u32>,
    /// The images.
    pub images: Vec<ImageInput>,
}

/// How image pad tokens appear in [`Sequence::tokens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadLayout {
    /// One `<|image_pad|>` per image, as a `Trajectory` stores them; expanded here to the image's
    /// token count.
    #[default]
    OnePerImage,
    /// Already expanded: each image's pads appear `t·h·w / merge²` times, as the model sees them.
    Expanded,
}

/// A prepared batch: everything the model needs besides its parameters.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Number of sequences.
    pub batch: usize,
    /// Expanded, padded length.
    pub seq: usize,
    /// Expanded length of each sequence.
    pub lengths: Vec<usize>,
    /// `[batch, seq]` expanded token ids (0 after each sequence's end).
    pub input_ids: Vec<u32>,
    /// The batch's distinct images (sequences of a GRPO group share their prompt's image), one
    /// vision input per grid with that grid's images stacked ([`VisionInputs::stacked`]).
    pub images: Vec<VisionInputs>,
    /// Feature rows the images give, in the order of [`Batch::images`].
    pub image_rows: usize,
    /// For each of the `batch·seq` expanded positions, the row of `[token embeddings (batch·seq);
    /// image features]` it takes its embedding from.
    pub embed_rows: Vec<i64>,
    /// Positions and attention bias.
    pub decoder: DecoderInputs,
    /// Columns of the scores: the longest input sequence (unexpanded for
    /// [`PadLayout::OnePerImage`]).
    pub score_len: usize,
    /// `(flat score index b·score_len + t, flat expanded position predicting it, target token)`
    /// for every scored token: each token after the first that is not an image pad.
    pub targets: Vec<(usize, usize, u32)>,
    /// The mRoPE delta of each sequence (for continuing by decoding).
    pub rope_deltas: Vec<i64>,
}

impl Batch {
    /// Prepares `sequences` for `config`'s model.
    pub fn new(config: &Qwen25VlConfig, sequences: &[Sequence], layout: PadLayout) -> Result<Self> {
        if sequences.is_empty() {
            return Err(input_err("empty batch"));
        }
        let vcfg = &config.vision;
        let geo = vcfg.geometry()?;
        let pad = config.image_token_id;
        let vocab = config.text.vocab_size;
        let mut expanded: Vec<Vec<u32>> = Vec::with_capacity(sequences.len());
        // For every input token, its expanded position (None for image pads).
        let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(sequences.len());
        let mut distinct = DistinctImages::default();
        // For every sequence, the distinct image of each of its images.
        let mut image_ids: Vec<Vec<usize>> = Vec::with_capacity(sequences.len());
        for (b, s) in sequences.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(input_err(format!("sequence {b} is empty")));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(input_err(format!(
                    "sequence {b}: token {t} is outside the vocabulary ({vocab})"
                )));
            }
            let grids: Vec<Grid> = s.images.iter().map(|im| im.grid).collect();
            let counts: Vec<usize> = core_grids(&grids)?
                .into_iter()
                .map(|g| geo.merged_tokens(g))
                .collect();
            let mut ex = Vec::with_capacity(s.tokens.len());
            let mut map = Vec::with_capacity(s.tokens.len());
            match layout {
                PadLayout::OnePerImage => {
                    let pads = s.tokens.iter().filter(|&&t| t == pad).count();
                    if pads != s.images.len() {
                        return Err(input_err(format!(
                            "sequence {b} has {pads} image pad tokens but {} images",
                            s.images.len()
                        )));
                    }
                    let mut k = 0;
                    for &t in &s.tokens {
                        if t == pad {
                            map.push(None);
                            ex.extend(std::iter::repeat_n(pad, counts[k]));
                            k += 1;
                        } else {
                            map.push(Some(ex.len()));
                            ex.push(t);
                        }
                    }
                }
                PadLayout::Expanded => {
                    for (i, &t) in s.tokens.iter().enumerate() {
                        map.push((t != pad).then_some(i));
                    }
                    ex.extend_from_slice(&s.tokens);
                }
            }
            let mut ids = Vec::with_capacity(s.images.len());
            for (k, im) in s.images.iter().enumerate() {
                check_image(im, vcfg)
                    .map_err(|e| input_err(format!("sequence {b}, image {k}: {e}")))?;
                ids.push(distinct.insert(im));
            }
            image_ids.push(ids);
            expanded.push(ex);
            maps.push(map);
        }
        let batch = sequences.len();
        let seq = expanded.iter().map(Vec::len).max().unwrap_or(0);
        let lengths: Vec<usize> = expanded.iter().map(Vec::len).collect();
        let plane = batch * seq;
        let mut input_ids = vec![0u32; plane];
        let mut positions = vec![0i64; 3 * plane];
        let mut embed_rows: Vec<i64> = (0..plane as i64).collect();
        let mut rope_deltas = Vec::with_capacity(batch);
        let (images, starts, image_rows) = distinct.into_inputs(vcfg)?;
        for (b, (ex, s)) in expanded.iter().zip(sequences).enumerate() {
            let grids: Vec<Grid> = s.images.iter().map(|im| im.grid).collect();
            let rope = vision::rope_index(ex, pad, &core_grids(&grids)?, &geo)
                .map_err(|e| input_err(format!("sequence {b}: {e}")))?;
            rope_deltas.push(rope.delta);
            for (axis, values) in rope.positions.iter().enumerate() {
                let row = axis * plane + b * seq;
                positions[row..row + values.len()].copy_from_slice(values);
            }
            // The k-th image's pads take its feature rows, one after the other.
            let (mut k, mut row, mut left) = (0, 0, 0);
            for (e, &t) in ex.iter().enumerate() {
                let flat = b * seq + e;
                input_ids[flat] = t;
                if t == pad {
                    if left == 0 {
                        let d = *image_ids[b].get(k).ok_or_else(|| {
                            input_err(format!("sequence {b} has more image pads than images"))
                        })?;
                        row = plane + starts[d];
                        left = feature_rows(&s.images[k], vcfg)?;
                        k += 1;
                    }
                    embed_rows[flat] = row as i64;
                    row += 1;
                    left -= 1;
                }
            }
        }
        let score_len = maps.iter().map(Vec::len).max().unwrap_or(0);
        let mut targets = Vec::new();
        for (b, (map, s)) in maps.iter().zip(sequences).enumerate() {
            for (t, e) in map.iter().enumerate().skip(1) {
                if let Some(e) = *e {
                    targets.push((b * score_len + t, b * seq + e - 1, s.tokens[t]));
                }
            }
        }
        let decoder = DecoderInputs::new(batch, seq, positions, causal_bias(&lengths, seq))?;
        Ok(Self {
            batch,
            seq,
            lengths,
            input_ids,
            images,
            image_rows,
            embed_rows,
            decoder,
            score_len,
            targets,
            rope_deltas,
        })
    }

    /// `[batch, score_len]` with 1 where a log-prob is defined (see [`Batch::targets`]).
    pub fn score_mask(&self) -> Vec<f32> {
        let mut m = vec![0.0; self.batch * self.score_len];
        for &(i, _, _) in &self.targets {
            m[i] = 1.0;
        }
        m
    }

    /// Number of positions that take an image feature row.
    pub fn image_tokens(&self) -> usize {
        let plane = (self.batch * self.seq) as i64;
        self.embed_rows.iter().filter(|&&r| r >= plane).count()
    }
}

/// Checks that an image's patches fit its grid.
fn check_image(im: &ImageInput, cfg: &super::config::VisionConfig) -> Result<()> {
    let merge = cfg.spatial_merge_size;
    let g = im.grid;
    if g.contains(&0) || !g[1].is_multiple_of(merge) || !g[2].is_multiple_of(merge) {
        return Err(input_err(format!(
            "grid {g:?} must be positive with h and w multiples of {merge}"
        )));
    }
    let want = g.iter().product::<usize>() * cfg.patch_dim();
    if im.patches.len() != want {
        return Err(input_err(format!(
            "patches hold {} values; grid {g:?} needs {want}",
            im.patches.len()
        )));
    }
    Ok(())
}

/// The feature rows (merged tokens) of one image.
fn feature_rows(im: &ImageInput, cfg: &super::config::VisionConfig) -> Result<usize> {
    let geo = cfg.geometry()?;
    Ok(core_grids(&[im.grid])?
        .first()
        .map_or(0, |g| geo.merged_tokens(*g)))
}

/// The distinct images of a batch, found by content: the samples of a GRPO group share their
/// prompt's image, which is then encoded once and its features used by every sample (the
/// gradient sums over the uses, as it would over copies).
#[derive(Default)]
struct DistinctImages<'a> {
    images: Vec<&'a ImageInput>,
    by_content: std::collections::HashMap<(Grid, u64), Vec<usize>>,
}

impl<'a> DistinctImages<'a> {
    /// The index of `im` among the distinct images, adding it if new.
    fn insert(&mut self, im: &'a ImageInput) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for v in &im.patches {
            v.to_bits().hash(&mut h);
        }
        let images = &mut self.images;
        let same = self.by_content.entry((im.grid, h.finish())).or_default();
        if let Some(&d) = same.iter().find(|&&d| images[d].patches == im.patches) {
            return d;
        }
        images.push(im);
        same.push(images.len() - 1);
        images.len() - 1
    }

    /// One stacked vision input per grid (grids in order of first appearance), the first
    /// feature row of each distinct image (counted from the first image row), and the rows in
    /// all.
    fn into_inputs(
        self,
        cfg: &super::config::VisionConfig,
    ) -> Result<(Vec<VisionInputs>, Vec<usize>, usize)> {
        let mut grids: Vec<(Grid, Vec<usize>)> = Vec::new();
        for (d, im) in self.images.iter().enumerate() {
            match grids.iter_mut().find(|(g, _)| *g == im.grid) {
                Some((_, members)) => members.push(d),
                None => grids.push((im.grid, vec![d])),
            }
        }
        let mut starts = vec![0; self.images.len()];
        let mut row = 0;
        let mut inputs = Vec::with_capacity(grids.len());
        for (grid, members) in grids {
            let mut patches = Vec::new();
            for &d in &members {
                starts[d] = row;
                row += feature_rows(self.images[d], cfg)?;
                patches.extend_from_slice(&self.images[d].patches);
            }
            inputs.push(VisionInputs::stacked(patches, grid, members.len(), cfg)?);
        }
        Ok((inputs, starts, row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(cfg: &Qwen25VlConfig, grid: Grid) -> ImageInput {
        ImageInput {
            grid,
            patches: vec![0.0; grid.iter().product::<usize>() * cfg.vision.patch_dim()],
        }
    }

    #[test]
    fn one_pad_per_image_is_expanded_and_aligned() {
        let cfg = Qwen25VlConfig::tiny();
        let pad = cfg.image_token_id;
        let seqs = [
            Sequence {
                tokens: vec![5, 1021, pad, 1020, 7, 8],
                images: vec![image(&cfg, [1, 4, 6])],
            },
            Sequence {
                tokens: vec![3, 4],
                images: vec![],
            },
        ];
        let b = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap();
        assert_eq!(b.lengths, vec![11, 2]);
        assert_eq!((b.seq, b.score_len), (11, 6));
        // Row 0 pads take image rows 22..28; row 1 keeps its own rows.
        assert_eq!(&b.embed_rows[2..8], &[22, 23, 24, 25, 26, 27]);
        // Token 3 (vision_end) of row 0 sits at expanded 8 and is predicted from position 7.
        assert!(b.targets.contains(&(3, 7, 1020)));
        // Token 1 of row 1 is predicted from flat position 11.
        assert!(b.targets.contains(&(6 + 1, 11, 4)));
        // The pad (token 2) and the first tokens are not scored.
        let mask = b.score_mask();
        assert_eq!(&mask[..6], &[0.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(&mask[6..], &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn a_shared_image_is_encoded_once_and_same_grids_together() {
        let cfg = Qwen25VlConfig::tiny();
        let pad = cfg.image_token_id;
        let shared = image(&cfg, [1, 4, 4]);
        let mut other = image(&cfg, [1, 4, 4]);
        other.patches[0] = 1.0;
        let seq = |images: Vec<ImageInput>| Sequence {
            tokens: std::iter::once(7)
                .chain(images.iter().flat_map(|_| [pad, 9]))
                .chain([8])
                .collect(),
            images,
        };
        let seqs = [
            seq(vec![shared.clone()]),
            seq(vec![shared.clone(), other.clone()]),
            seq(vec![image(&cfg, [1, 2, 4])]),
        ];
        let b = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap();
        // Three distinct images, four merged tokens each for 4×4, two for 2×4; the two 4×4
        // ones in one vision call.
        assert_eq!(b.images.len(), 2);
        assert_eq!((b.images[0].count, b.images[1].count), (2, 1));
        assert_eq!(b.image_rows, 4 + 4 + 2);
        let plane = (b.batch * b.seq) as i64;
        // Rows 0 and 1 take the shared image's features from the same rows; row 1's second
        // image takes the next four.
        let rows = |r: usize, from: usize, n: usize| b.embed_rows[r * b.seq + from..][..n].to_vec();
        let first: Vec<i64> = (plane..plane + 4).collect();
        assert_eq!(rows(0, 1, 4), first);
        assert_eq!(rows(1, 1, 4), first);
        assert_eq!(rows(1, 6, 4), (plane + 4..plane + 8).collect::<Vec<_>>());
        assert_eq!(rows(2, 1, 2), vec![plane + 8, plane + 9]);
        assert_eq!(b.image_tokens(), 4 + 8 + 2);
    }

    #[test]
    fn pixel_values_convert() {
        let p = deepeyes_core::preprocess::PixelValues {
            data: vec![0.5; 4 * 1176],
            grid_thw: [1, 2, 2],
            resized: (28, 28),
        };
        let im = ImageInput::from(p);
        assert_eq!(im.grid, [1, 2, 2]);
        assert_eq!(im.patches.len(), 4 * 1176);
    }

    #[test]
    fn pad_count_mismatch_is_an_error() {
        let cfg = Qwen25VlConfig::tiny();
        let seqs = [Sequence {
            tokens: vec![5, cfg.image_token_id, cfg.image_token_id],
            images: vec![image(&cfg, [1, 2, 2])],
        }];
        let e = Batch::new(&cfg, &seqs, PadLayout::OnePerImage).unwrap_err();
        assert!(
            e.to_string().contains("2 image pad tokens but 1 images"),
            "{e}"
        );
        let e = Batch::new(
            &cfg,
            &[Sequence {
                tokens: vec![5000],
                images: vec![],
            }],
            PadLayout::Expanded,
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }
}
