//! Host-side preparation of a batch of multimodal token sequences: pad expansion, embedding
//! scatter indices, mRoPE positions, attention bias and the next-token targets.

use super::config::Qwen25VlConfig;
use super::error::{Result, input_err};
use deepeyes_core::vision;

use super::attention::KeyMask;
use super::text::DecoderInputs;
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
    /// Log-probs are computed for the tokens from this index on (0: every token). The trainer
    /// gives the prompt's length: no prompt token is trained on, and the positions before it
    /// can then be shared by the samples of a group ([`Batch::share_prefixes`]).
    pub score_from: usize,
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
    /// How rows share their common prefixes, after [`Batch::share_prefixes`].
    pub shared: Option<SharedPrefixes>,
}

/// Rows that share a prefix (the prompt and image of a GRPO group's samples) run it once: the
/// decoder runs each distinct prefix as a row of its own, keeping every layer's keys and values,
/// then runs each row's remaining positions (its suffix) attending to its prefix's keys and
/// values and then to its own. The log-probs are those of the full rows; the gradient sums over
/// the rows that share a prefix, as it would over copies.
#[derive(Debug, Clone)]
pub struct SharedPrefixes {
    /// Flat `b·seq + e` positions of the prefix rows, `[prefixes, prefix len]` (padded with a
    /// masked position).
    pub prefix_positions: Vec<i64>,
    /// The prefix rows' positions and causal bias.
    pub prefix: DecoderInputs,
    /// Flat positions of the suffix rows, `[batch, suffix len]`.
    pub suffix_positions: Vec<i64>,
    /// The suffix rows' positions and their bias over `[prefix keys; own keys]`.
    pub suffix: DecoderInputs,
    /// The prefix of each row.
    pub prefix_of_row: Vec<i64>,
    /// For each of [`Batch::targets`], its predicting position among the suffix rows'
    /// `batch · suffix len` positions.
    pub target_rows: Vec<i64>,
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
            for (t, e) in map.iter().enumerate().skip(s.score_from.max(1)) {
                if let Some(e) = *e {
                    targets.push((b * score_len + t, b * seq + e - 1, s.tokens[t]));
                }
            }
        }
        let decoder = DecoderInputs::causal(batch, seq, positions, &lengths)?;
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
            shared: None,
        })
    }

    /// Lets rows that begin alike share that beginning ([`SharedPrefixes`]): each row's prefix is
    /// the longest beginning it has in common with the other rows of its group (same tokens, same
    /// images) that ends before the first position it needs the hidden state of. Rows whose
    /// scoring starts at their first token share nothing.
    pub fn share_prefixes(mut self) -> Result<Self> {
        let (groups, prefix_of_row) = self.prefix_groups();
        let prefix_len: Vec<usize> = groups.iter().map(|&(_, p)| p).collect();
        if prefix_len.iter().all(|&p| p == 0) || groups.len() == self.batch {
            return Ok(self);
        }
        // Each row's prefix length and what remains of it.
        let own: Vec<usize> = prefix_of_row.iter().map(|&g| prefix_len[g]).collect();
        let suffix_len: Vec<usize> = self.lengths.iter().zip(&own).map(|(l, p)| l - p).collect();
        let pseq = prefix_len.iter().copied().max().unwrap_or(0);
        let sseq = suffix_len.iter().copied().max().unwrap_or(0).max(1);
        let seq = self.seq;
        // Flat positions of the prefix rows and the suffix rows; padding repeats a real one.
        let prefix_positions: Vec<i64> = groups
            .iter()
            .flat_map(|&(rep, p)| (0..pseq).map(move |e| (rep * seq + e.min(p.max(1) - 1)) as i64))
            .collect();
        let suffix_positions: Vec<i64> = own
            .iter()
            .zip(&suffix_len)
            .enumerate()
            .flat_map(|(b, (&p, &len))| {
                (0..sseq).map(move |i| (b * seq + p + i.min(len.max(1) - 1)) as i64)
            })
            .collect();
        let prefix = DecoderInputs::causal(
            groups.len(),
            pseq,
            self.mrope_at(&prefix_positions),
            &prefix_len,
        )?;
        let suffix = DecoderInputs::after_prefix(
            self.batch,
            sseq,
            pseq,
            self.mrope_at(&suffix_positions),
            KeyMask::Causal {
                past: pseq,
                prefix: own.clone(),
                lengths: suffix_len.clone(),
            },
        )?;
        let target_rows = self
            .targets
            .iter()
            .map(|&(_, e, _)| ((e / seq) * sseq + e % seq - own[e / seq]) as i64)
            .collect();
        self.shared = Some(SharedPrefixes {
            prefix_positions,
            prefix,
            suffix_positions,
            suffix,
            prefix_of_row: prefix_of_row.iter().map(|&g| g as i64).collect(),
            target_rows,
        });
        Ok(self)
    }

    /// The mRoPE positions (`[3, n]`: temporal, height, width) of `n` flat positions.
    fn mrope_at(&self, flat: &[i64]) -> Vec<i64> {
        let all = self.batch * self.seq;
        let positions = &self.decoder.position_ids;
        (0..3)
            .flat_map(|axis| {
                flat.iter()
                    .map(move |&f| positions[axis * all + f as usize])
            })
            .collect()
    }

    /// Groups of rows with a common beginning: `(first row, prefix length)` per group, and each
    /// row's group. A row joins a group when one of their beginnings (up to the first position
    /// whose hidden state it needs) is a beginning of the other.
    fn prefix_groups(&self) -> (Vec<(usize, usize)>, Vec<usize>) {
        let (seq, plane) = (self.seq, (self.batch * self.seq) as i64);
        // Text positions by token, image positions by feature row (the same image, the same
        // rows).
        let key = |b: usize, e: usize| -> i64 {
            let f = b * seq + e;
            match self.embed_rows[f] {
                r if r >= plane => -(r - plane) - 1,
                _ => i64::from(self.input_ids[f]),
            }
        };
        // Every row keeps at least its last position.
        let mut limit: Vec<usize> = self.lengths.iter().map(|l| l.saturating_sub(1)).collect();
        for &(_, e, _) in &self.targets {
            let (b, pos) = (e / seq, e % seq);
            limit[b] = limit[b].min(pos);
        }
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut prefix_of_row = Vec::with_capacity(self.batch);
        for (b, &limit) in limit.iter().enumerate() {
            let joined = groups.iter_mut().position(|(rep, p)| {
                let n = (*p).min(limit);
                let common = n > 0 && (0..n).all(|e| key(*rep, e) == key(b, e));
                if common {
                    *p = n;
                }
                common
            });
            prefix_of_row.push(joined.unwrap_or_else(|| {
                groups.push((b, limit));
                groups.len() - 1
            }));
        }
        (groups, prefix_of_row)
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
                score_from: 0,
                tokens: vec![5, 1021, pad, 1020, 7, 8],
                images: vec![image(&cfg, [1, 4, 6])],
            },
            Sequence {
                score_from: 0,
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
            score_from: 0,
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
            score_from: 0,
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
                score_from: 0,
                tokens: vec![5000],
                images: vec![],
            }],
            PadLayout::Expanded,
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }
}
