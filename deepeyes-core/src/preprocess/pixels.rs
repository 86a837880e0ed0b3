//! The pixel pipeline: resize to the smart-resize size, normalise, and cut into flattened patches
//! in the order the Qwen2.5-VL vision encoder expects.
//!
//! The layout matches transformers' `Qwen2VLImageProcessor` (`patchify`): patches are listed
//! merge block by merge block (row-major over `merge_size × merge_size` blocks, row-major inside
//! each block), and each patch is flattened as `[channel][temporal][row][column]`, a still image
//! being repeated over the `temporal_patch_size` frames.

use fast_image_resize as fir;

use super::{PreprocessConfig, ResampleFilter};
use crate::error::{Error, Result};
use crate::image::Image;

/// The preprocessed pixels of one image, ready for the vision encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// Row-major `[num_patches, 3 * temporal_patch_size * patch_size²]` (`[N, 1176]` for
    /// Qwen2.5-VL), in transformers' patch order.
    pub data: Vec<f32>,
    /// The grid in patches: `[t, h, w]` (`t` is 1 for a still image).
    pub grid_thw: [u32; 3],
    /// The size the image was resized to, `(height, width)` in pixels.
    pub resized: (u32, u32),
}

impl PixelValues {
    /// Number of patches (rows of [`data`](Self::data)): `t * h * w`.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().map(|&d| d as usize).product()
    }

    /// Length of one flattened patch (columns of [`data`](Self::data)).
    pub fn patch_dim(&self) -> usize {
        self.data.len().checked_div(self.num_patches()).unwrap_or(0)
    }

    /// The shape of [`data`](Self::data): `[num_patches, patch_dim]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.num_patches(), self.patch_dim()]
    }
}

fn resize_error(reason: impl std::fmt::Display) -> Error {
    Error::Image {
        origin: "<resize>".into(),
        reason: reason.to_string(),
    }
}

/// The fast_image_resize algorithm of a filter.
fn algorithm(filter: ResampleFilter) -> fir::ResizeAlg {
    match filter {
        ResampleFilter::Nearest => fir::ResizeAlg::Nearest,
        ResampleFilter::Bilinear => fir::ResizeAlg::Convolution(fir::FilterType::Bilinear),
        ResampleFilter::Bicubic => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
        ResampleFilter::Lanczos3 => fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3),
    }
}

/// Grows `buf` to at least `len` bytes (never shrinks it, so a reused buffer is not rewritten)
/// and returns its first `len` bytes.
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// One single-direction (or same-size) resize pass of packed RGB bytes into `dst`.
///
/// Outputs of at least [`PARALLEL_MIN_PIXELS`] are split into horizontal stripes of output rows,
/// one per thread (up to `threads`). A stripe is the same resize restricted to a sub-box of the
/// source, and the filter reads source rows beyond a box edge just as the whole resize does, so
/// the result is byte-identical to one pass (unit-tested).
fn resize_pass(
    resizer: &mut fir::Resizer,
    alg: fir::ResizeAlg,
    src: (&[u8], u32, u32),
    dst: (&mut [u8], u32, u32),
    threads: usize,
) -> Result<()> {
    let (src, sw, sh) = src;
    let (dst, dw, dh) = dst;
    let src =
        fir::images::ImageRef::new(sw, sh, src, fir::PixelType::U8x3).map_err(resize_error)?;
    let threads = if u64::from(dw) * u64::from(dh) < PARALLEL_MIN_PIXELS {
        1
    } else {
        threads.clamp(1, (dh as usize / MIN_STRIPE_ROWS).max(1))
    };
    if threads == 1 {
        let mut dst = fir::images::Image::from_slice_u8(dw, dh, dst, fir::PixelType::U8x3)
            .map_err(resize_error)?;
        let options = fir::ResizeOptions::new().resize_alg(alg);
        return resizer
            .resize(&src, &mut dst, &options)
            .map_err(resize_error);
    }
    let rows_per_thread = (dh as usize).div_ceil(threads);
    let row_bytes = dw as usize * 3;
    let scale_y = f64::from(sh) / f64::from(dh);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = dst
            .chunks_mut(rows_per_thread * row_bytes)
            .enumerate()
            .map(|(i, stripe)| {
                let src = &src;
                let first = (i * rows_per_thread) as f64;
                scope.spawn(move || -> Result<()> {
                    let rows = (stripe.len() / row_bytes) as u32;
                    let mut dst =
                        fir::images::Image::from_slice_u8(dw, rows, stripe, fir::PixelType::U8x3)
                            .map_err(resize_error)?;
                    let top = first * scale_y;
                    let bottom = (first + f64::from(rows)) * scale_y;
                    let options = fir::ResizeOptions::new().resize_alg(alg).crop(
                        0.0,
                        top,
                        f64::from(sw),
                        bottom - top,
                    );
                    fir::Resizer::new()
                        .resize(src, &mut dst, &options)
                        .map_err(resize_error)
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| resize_error("a resize thread panicked"))??;
        }
        Ok(())
    })
}

/// Output images smaller than this many pixels are resized on one thread: below it, starting
/// threads costs more than it saves.
const PARALLEL_MIN_PIXELS: u64 = 1 << 18;

/// The fewest output rows worth giving a thread of their own.
const MIN_STRIPE_ROWS: usize = 128;

/// Threads for the large-image parts of preprocessing: the available cores, at most 8.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Resizes `image` to `height × width` into `resized[..height * width * 3]`, using `rows` for
/// the intermediate image. Both buffers only grow, so repeated calls allocate nothing.
///
/// Two single-direction passes, horizontal first, each rounded to 8 bits: the order Pillow and
/// torchvision's `uint8` kernel use. (Asked for both directions at once, fast_image_resize runs
/// the vertical pass first on 8-bit images, which moves the result by about 0.2 level on
/// average.)
fn resize_into(
    resizer: &mut fir::Resizer,
    image: &Image,
    (height, width): (u32, u32),
    filter: ResampleFilter,
    rows: &mut Vec<u8>,
    resized: &mut Vec<u8>,
    threads: usize,
) -> Result<()> {
    if height == 0 || width == 0 {
        return Err(resize_error(format!(
            "cannot resize {}×{} to an empty {width}×{height}",
            image.width(),
            image.height()
        )));
    }
    let alg = algorithm(filter);
    let (sw, sh) = (image.width(), image.height());
    let out_len = height as usize * width as usize * 3;
    match (width == sw, height == sh) {
        (true, true) => scratch(resized, out_len).copy_from_slice(image.as_raw()),
        (false, true) | (true, false) => resize_pass(
            resizer,
            alg,
            (image.as_raw(), sw, sh),
            (scratch(resized, out_len), width, height),
            threads,
        )?,
        (false, false) => {
            let mid_len = width as usize * sh as usize * 3;
            let mid = scratch(rows, mid_len);
            resize_pass(
                resizer,
                alg,
                (image.as_raw(), sw, sh),
                (&mut *mid, width, sh),
                threads,
            )?;
            resize_pass(
                resizer,
                alg,
                (mid, width, sh),
                (scratch(resized, out_len), width, height),
                threads,
            )?;
        }
    }
    Ok(())
}

/// Resizes `image` to `height × width` with `filter`.
///
/// [`ResampleFilter::Bicubic`] is a Catmull-Rom convolution (`a = -0.5`) whose support widens
/// with the downscale factor and whose weights are 8-bit-image fixed point, as in Pillow and in
/// torchvision's CPU `uint8` antialiased bicubic kernel, which the transformers processor uses;
/// the result equals torchvision's bit for bit on every golden fixture.
pub fn resize_rgb(
    image: &Image,
    height: u32,
    width: u32,
    filter: ResampleFilter,
) -> Result<image::RgbImage> {
    let mut out = Vec::new();
    resize_into(
        &mut fir::Resizer::new(),
        image,
        (height, width),
        filter,
        &mut Vec::new(),
        &mut out,
        worker_threads(),
    )?;
    image::RgbImage::from_raw(width, height, out)
        .ok_or_else(|| resize_error("the resizer returned a buffer of the wrong size"))
}

/// Per channel, the normalised value of each 8-bit level. Computed in `f32` the way
/// transformers does it (mean and std scaled by 255, then `(x - mean) / std`), so an
/// identical resized image gives bit-identical pixel values.
fn level_table(cfg: &PreprocessConfig) -> [[f32; 256]; 3] {
    let mut table = [[0.0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        let mean = cfg.image_mean[c] * 255.0;
        let std = cfg.image_std[c] * 255.0;
        for (level, v) in row.iter_mut().enumerate() {
            *v = (level as f32 - mean) / std;
        }
    }
    table
}

/// The grid `(t, h, w)` of an image and the size it must be resized to, if any.
type ResizePlan = ([u32; 3], Option<(u32, u32)>);

/// The patch grid `(h, w)` of a resized image, checking that both sides are multiples of the
/// merge factor.
fn patch_grid(height: u32, width: u32, cfg: &PreprocessConfig) -> Result<(u32, u32)> {
    let factor = cfg.factor();
    if height == 0 || width == 0 || !height.is_multiple_of(factor) || !width.is_multiple_of(factor)
    {
        return Err(Error::Image {
            origin: format!("{width}×{height}"),
            reason: format!(
                "a resized image's sides must be positive multiples of {factor} \
                 (patch-size × merge-size)"
            ),
        });
    }
    Ok((height / cfg.patch_size, width / cfg.patch_size))
}

/// Normalises the RGB bytes of a `height × width` image and writes its patches into `out`
/// (exactly `grid_h * grid_w * patch_dim` values).
///
/// Works one merge-block row (`patch_size * merge_size` image rows) at a time: those rows are
/// first normalised into a planar strip (`[channel][row][column]`, a few megabytes at most, so it
/// stays in cache), and the patches are then copied out of it in the order they are stored,
/// each 14-value run written once per temporal frame. `out` is therefore written front to back
/// exactly once, and the per-value work is one table lookup in a long, simple loop.
fn write_patches(
    rgb: &[u8],
    height: usize,
    width: usize,
    cfg: &PreprocessConfig,
    table: &[[f32; 256]; 3],
    out: &mut [f32],
) {
    let p = cfg.patch_size as usize;
    let m = cfg.merge_size as usize;
    let t = cfg.temporal_patch_size as usize;
    let factor = p * m;
    let patch_dim = 3 * t * p * p;
    let block_dim = m * m * patch_dim;
    debug_assert_eq!(out.len(), (height / p) * (width / p) * patch_dim);
    if out.is_empty() {
        return;
    }
    let plane = factor * width; // one channel of the strip
    let mut strip = vec![0.0f32; 3 * plane];
    let block_row_dim = (width / factor) * block_dim;
    for (block_row, dst) in out.chunks_exact_mut(block_row_dim).enumerate() {
        let rows = &rgb[block_row * factor * width * 3..][..factor * width * 3];
        let (red, rest) = strip.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for ((px, r), (g, b)) in rows
            .chunks_exact(3)
            .zip(red.iter_mut())
            .zip(green.iter_mut().zip(blue.iter_mut()))
        {
            *r = table[0][usize::from(px[0])];
            *g = table[1][usize::from(px[1])];
            *b = table[2][usize::from(px[2])];
        }
        // Patches in merge-window order: block column, row in block, column in block.
        for (index, patch) in dst.chunks_exact_mut(patch_dim).enumerate() {
            let (block, inner) = (index / (m * m), index % (m * m));
            let (mh, mw) = (inner / m, inner % m);
            let x0 = (block * m + mw) * p;
            for (c, channel) in patch.chunks_exact_mut(t * p * p).enumerate() {
                let source = &strip[c * plane + mh * p * width + x0..];
                // A still image is the same frame at every temporal position.
                for frame in channel.chunks_exact_mut(p * p) {
                    if p == QWEN_PATCH {
                        copy_runs::<QWEN_PATCH>(source, width, frame);
                    } else {
                        copy_runs_dyn(source, width, p, frame);
                    }
                }
            }
        }
    }
}

/// Qwen2.5-VL's patch side, for which [`write_patches`] copies fixed-size runs (inlined moves
/// instead of a `memcpy` call per 14 values, which cost a fifth of the whole pipeline).
const QWEN_PATCH: usize = 14;

/// Copies the `P × P` square at the start of `source` (rows `stride` apart) into `frame`.
fn copy_runs<const P: usize>(source: &[f32], stride: usize, frame: &mut [f32]) {
    for (py, run) in frame.chunks_exact_mut(P).enumerate() {
        let run: &mut [f32; P] = run.try_into().expect("chunks_exact_mut(P) yields P values");
        let from: &[f32; P] = source[py * stride..py * stride + P]
            .try_into()
            .expect("a slice of P values");
        *run = *from;
    }
}

/// [`copy_runs`] for a patch side known only at run time.
fn copy_runs_dyn(source: &[f32], stride: usize, p: usize, frame: &mut [f32]) {
    for (py, run) in frame.chunks_exact_mut(p).enumerate() {
        run.copy_from_slice(&source[py * stride..py * stride + p]);
    }
}

/// Normalises and patchifies an image that already has its final size (both sides multiples of
/// `patch_size * merge_size`), with no resizing. [`preprocess_image`] is this after the resize.
pub fn normalize_patchify(
    resized: &image::RgbImage,
    cfg: &PreprocessConfig,
) -> Result<PixelValues> {
    cfg.validate("preprocess")?;
    let (grid_h, grid_w) = patch_grid(resized.height(), resized.width(), cfg)?;
    let mut data = vec![0.0f32; grid_h as usize * grid_w as usize * cfg.patch_dim()];
    let dims = (resized.height() as usize, resized.width() as usize);
    write_patches_parallel(resized.as_raw(), dims, cfg, &level_table(cfg), &mut data);
    Ok(PixelValues {
        data,
        grid_thw: [1, grid_h, grid_w],
        resized: (resized.height(), resized.width()),
    })
}

/// Reusable Qwen2.5-VL preprocessing: a validated [`PreprocessConfig`] plus the resizer and
/// scratch buffers, which only grow, so preprocessing image after image allocates nothing but
/// the output (and nothing at all through [`preprocess_into`](Self::preprocess_into) with a
/// reused output). A fresh multi-megabyte buffer costs a page fault per 4 KiB on first touch,
/// about half the CPU time of the whole pipeline for a large image. The free functions
/// ([`preprocess_image`], [`preprocess_images`]) build a temporary one.
///
/// The scratch buffers keep the largest sizes seen (about 8 bytes per resized pixel); drop the
/// `Preprocessor` to release them.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    cfg: PreprocessConfig,
    table: [[f32; 256]; 3],
    resizer: fir::Resizer,
    rows: Vec<u8>,
    resized: Vec<u8>,
}

impl Preprocessor {
    /// A preprocessor for `cfg`; fails if the config is invalid.
    pub fn new(cfg: PreprocessConfig) -> Result<Self> {
        cfg.validate("preprocess")?;
        Ok(Self {
            cfg,
            table: level_table(&cfg),
            resizer: fir::Resizer::new(),
            rows: Vec::new(),
            resized: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PreprocessConfig {
        &self.cfg
    }

    /// The grid of `image` and, when it needs resizing, that size; `None` when it already has
    /// its target size.
    fn plan(&self, image: &Image) -> Result<ResizePlan> {
        let (height, width) = self.cfg.smart_resize(image.height(), image.width())?;
        let (grid_h, grid_w) = patch_grid(height, width, &self.cfg)?;
        let resize =
            ((height, width) != (image.height(), image.width())).then_some((height, width));
        Ok(([1, grid_h, grid_w], resize))
    }

    /// Resizes (if needed) and writes the patches of `image` into `out`, which holds exactly its
    /// values.
    fn write(&mut self, image: &Image, resize: Option<(u32, u32)>, out: &mut [f32]) -> Result<()> {
        let (rgb, dims) = match resize {
            None => (image.as_raw(), (image.height(), image.width())),
            Some(dims) => {
                resize_into(
                    &mut self.resizer,
                    image,
                    dims,
                    self.cfg.resample,
                    &mut self.rows,
                    &mut self.resized,
                    worker_threads(),
                )?;
                let len = dims.0 as usize * dims.1 as usize * 3;
                (&self.resized[..len], dims)
            }
        };
        let dims = (dims.0 as usize, dims.1 as usize);
        write_patches_parallel(rgb, dims, &self.cfg, &self.table, out);
        Ok(())
    }

    /// Preprocesses one image (see [`preprocess_image`]).
    pub fn preprocess(&mut self, image: &Image) -> Result<PixelValues> {
        let (grid_thw, resize) = self.plan(image)?;
        let patches = grid_thw[1] as usize * grid_thw[2] as usize;
        let mut data = vec![0.0f32; patches * self.cfg.patch_dim()];
        self.write(image, resize, &mut data)?;
        let p = self.cfg.patch_size;
        let resized = (grid_thw[1] * p, grid_thw[2] * p);
        tracing::debug!(
            original = ?(image.height(), image.width()),
            ?resized,
            grid = ?grid_thw,
            "preprocessed image"
        );
        Ok(PixelValues {
            data,
            grid_thw,
            resized,
        })
    }

    /// Preprocesses several images into `out` (replacing its contents; its allocation is
    /// reused), concatenated in order as for a multi-image prompt. Returns each image's grid.
    pub fn preprocess_into(
        &mut self,
        images: &[Image],
        out: &mut Vec<f32>,
    ) -> Result<Vec<[u32; 3]>> {
        let patch_dim = self.cfg.patch_dim();
        let plans = images
            .iter()
            .map(|image| self.plan(image))
            .collect::<Result<Vec<_>>>()?;
        let total: usize = plans
            .iter()
            .map(|(g, _)| g[1] as usize * g[2] as usize * patch_dim)
            .sum();
        // Every value is overwritten below; only growth needs initialising.
        out.truncate(total);
        out.resize(total, 0.0);
        let mut rest = out.as_mut_slice();
        for (image, (grid, resize)) in images.iter().zip(&plans) {
            let (mine, tail) = rest.split_at_mut(grid[1] as usize * grid[2] as usize * patch_dim);
            self.write(image, *resize, mine)?;
            rest = tail;
        }
        Ok(plans.into_iter().map(|(grid, _)| grid).collect())
    }
}

/// Qwen2.5-VL preprocessing of one image: smart resize, resize with `cfg.resample`, rescale to
/// `[0, 1]`, normalise with `cfg.image_mean`/`image_std`, and patchify (see the module docs for
/// the layout). To preprocess many images, keep a [`Preprocessor`] instead.
///
/// ```
/// use deepeyes_core::preprocess::{PatternKind, preprocess_image, test_pattern};
/// use deepeyes_core::PreprocessConfig;
///
/// let image = test_pattern(480, 640, PatternKind::Smooth, 0)?;
/// let pixels = preprocess_image(&image, &PreprocessConfig::default())?;
/// assert_eq!(pixels.resized, (476, 644));
/// assert_eq!(pixels.grid_thw, [1, 34, 46]);
/// assert_eq!(pixels.shape(), [34 * 46, 1176]);
/// # Ok::<(), deepeyes_core::Error>(())
/// ```
pub fn preprocess_image(image: &Image, cfg: &PreprocessConfig) -> Result<PixelValues> {
    Preprocessor::new(*cfg)?.preprocess(image)
}

/// Preprocesses several images and concatenates their patches, as the processor does for a
/// multi-image prompt: returns the `[sum of patches, patch_dim]` values (row-major) and each
/// image's grid, in order.
pub fn preprocess_images(
    images: &[Image],
    cfg: &PreprocessConfig,
) -> Result<(Vec<f32>, Vec<[u32; 3]>)> {
    let mut data = Vec::new();
    let grids = Preprocessor::new(*cfg)?.preprocess_into(images, &mut data)?;
    Ok((data, grids))
}

/// Patches per thread below which splitting the work is not worth a thread.
const PATCHES_PER_THREAD: usize = 1024;

/// [`write_patches`] on bands of merge-block rows in parallel (scoped threads, up to the
/// available parallelism, at most 8), for large images; inline for small ones. Each band writes
/// its own contiguous range of `out`, so the result is identical to the sequential one.
fn write_patches_parallel(
    rgb: &[u8],
    (height, width): (usize, usize),
    cfg: &PreprocessConfig,
    table: &[[f32; 256]; 3],
    out: &mut [f32],
) {
    let band = (cfg.factor() as usize) * width * 3; // bytes of one merge-block row
    let block_rows = height / cfg.factor() as usize;
    let patches = out.len() / cfg.patch_dim();
    let threads = worker_threads()
        .min(patches / PATCHES_PER_THREAD)
        .min(block_rows);
    if threads <= 1 {
        write_patches(rgb, height, width, cfg, table, out);
        return;
    }
    let rows_per_thread = block_rows.div_ceil(threads);
    let out_per_block_row = out.len() / block_rows;
    std::thread::scope(|scope| {
        for (rgb, dst) in rgb
            .chunks(rows_per_thread * band)
            .zip(out.chunks_mut(rows_per_thread * out_per_block_row))
        {
            let rows = rgb.len() / (width * 3);
            scope.spawn(move || write_patches(rgb, rows, width, cfg, table, dst));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{PatternKind, test_pattern};

    /// Where pixel `(y, x)`, channel `c`, frame `frame` of a resized image lands in the
    /// flattened pixel values, derived directly from transformers' reshape/permute:
    /// `[gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, C, T, p, p]`.
    fn index_of(
        y: usize,
        x: usize,
        c: usize,
        frame: usize,
        grid_w: usize,
        cfg: &PreprocessConfig,
    ) -> usize {
        let (p, m, t) = (
            cfg.patch_size as usize,
            cfg.merge_size as usize,
            cfg.temporal_patch_size as usize,
        );
        let (gy, py, gx, px) = (y / p, y % p, x / p, x % p);
        let (bh, mh, bw, mw) = (gy / m, gy % m, gx / m, gx % m);
        let patch = ((bh * (grid_w / m) + bw) * m + mh) * m + mw;
        patch * (3 * t * p * p) + ((c * t + frame) * p + py) * p + px
    }

    #[test]
    fn threaded_resize_equals_one_thread() {
        let image = test_pattern(700, 900, PatternKind::Mixed, 5).unwrap();
        // Both directions, a single direction, upscale and downscale, all above the threshold.
        for (h, w) in [(644, 812), (700, 560), (560, 900), (980, 1204)] {
            let run = |threads| {
                let mut out = Vec::new();
                resize_into(
                    &mut fir::Resizer::new(),
                    &image,
                    (h, w),
                    ResampleFilter::Bicubic,
                    &mut Vec::new(),
                    &mut out,
                    threads,
                )
                .unwrap();
                out
            };
            let one = run(1);
            for threads in [2, 3] {
                assert!(one == run(threads), "{threads} threads differ at {w}×{h}");
            }
        }
    }

    #[test]
    fn layout_matches_the_reference_permutation() {
        let image = test_pattern(56, 84, PatternKind::Mixed, 3).unwrap();
        let qwen = PreprocessConfig::default();
        // Qwen2.5-VL's 14-pixel patches take the fixed-size copy; the others the general one.
        let other_patch = PreprocessConfig {
            patch_size: 7,
            min_pixels: 28 * 28,
            ..qwen
        };
        let other_merge_and_frames = PreprocessConfig {
            merge_size: 3,
            temporal_patch_size: 3,
            min_pixels: 28 * 28,
            ..other_patch
        };
        // 56 × 84 is a multiple of 28, so the first two keep their size; the third (multiples
        // of 21) is resized to 63 × 84.
        for (cfg, resized_to, grid) in [
            (qwen, (56, 84), [1, 4, 6]),
            (other_patch, (56, 84), [1, 8, 12]),
            (other_merge_and_frames, (63, 84), [1, 9, 12]),
        ] {
            let pixels = preprocess_image(&image, &cfg).unwrap();
            assert_eq!(pixels.resized, resized_to, "{cfg:?}");
            assert_eq!(pixels.grid_thw, grid, "{cfg:?}");
            let (h, w) = (resized_to.0 as usize, resized_to.1 as usize);
            let resized = if (h, w) == (56, 84) {
                image.rgb().clone()
            } else {
                resize_rgb(&image, h as u32, w as u32, cfg.resample).unwrap()
            };
            let grid_w = w / cfg.patch_size as usize;
            assert_eq!(pixels.patch_dim(), cfg.patch_dim());
            let table = level_table(&cfg);
            let mut seen = vec![false; pixels.data.len()];
            for y in 0..h {
                for x in 0..w {
                    let px = resized.get_pixel(x as u32, y as u32).0;
                    for c in 0..3 {
                        for frame in 0..cfg.temporal_patch_size as usize {
                            let at = index_of(y, x, c, frame, grid_w, &cfg);
                            seen[at] = true;
                            let want = table[c][usize::from(px[c])];
                            assert_eq!(pixels.data[at], want, "{cfg:?}: y={y} x={x} c={c}");
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s), "{cfg:?}: every value has a pixel");
        }
    }

    #[test]
    fn normalisation_constants() {
        let table = level_table(&PreprocessConfig::default());
        // (0 - 0.48145466) / 0.26862954 and (255 - 0.40821073*255) / (0.27577711*255).
        assert!((table[0][0] + 1.792_266_8).abs() < 1e-5);
        assert!((table[2][255] - 2.145_897_7).abs() < 1e-5);
    }

    #[test]
    fn several_images_concatenate() {
        let cfg = PreprocessConfig::default();
        let a = test_pattern(60, 90, PatternKind::Mixed, 1).unwrap();
        let b = test_pattern(30, 200, PatternKind::Smooth, 0).unwrap();
        let (data, grids) = preprocess_images(&[a.clone(), b.clone()], &cfg).unwrap();
        let pa = preprocess_image(&a, &cfg).unwrap();
        let pb = preprocess_image(&b, &cfg).unwrap();
        assert_eq!(grids, vec![pa.grid_thw, pb.grid_thw]);
        assert_eq!(data.len(), pa.data.len() + pb.data.len());
        assert_eq!(&data[..pa.data.len()], pa.data.as_slice());
        assert_eq!(&data[pa.data.len()..], pb.data.as_slice());
        let (empty, no_grids) = preprocess_images(&[], &cfg).unwrap();
        assert!(empty.is_empty() && no_grids.is_empty());
    }

    #[test]
    fn parallel_patchify_equals_sequential() {
        let cfg = PreprocessConfig::default();
        let table = level_table(&cfg);
        // 78 × 138 patches: several bands whenever more than one core is available.
        let image = test_pattern(1092, 1932, PatternKind::Mixed, 5).unwrap();
        let len = 78 * 138 * cfg.patch_dim();
        let mut sequential = vec![0.0f32; len];
        write_patches(image.as_raw(), 1092, 1932, &cfg, &table, &mut sequential);
        let mut parallel = vec![f32::NAN; len];
        write_patches_parallel(image.as_raw(), (1092, 1932), &cfg, &table, &mut parallel);
        assert!(
            sequential == parallel,
            "every value must be written, identically"
        );
    }

    #[test]
    fn a_reused_preprocessor_gives_the_same_values() {
        let cfg = PreprocessConfig::default();
        let big = test_pattern(300, 400, PatternKind::Mixed, 1).unwrap();
        let small = test_pattern(60, 90, PatternKind::Smooth, 0).unwrap();
        let exact = test_pattern(56, 84, PatternKind::Mixed, 2).unwrap();
        let wide_only = test_pattern(56, 90, PatternKind::Mixed, 3).unwrap();
        let mut pre = Preprocessor::new(cfg).unwrap();
        let mut buffer = vec![f32::NAN; 7];
        // Big first, so later images run on larger, dirty scratch buffers.
        for image in [&big, &small, &exact, &wide_only, &big] {
            let fresh = normalize_patchify(
                &resize_rgb(
                    image,
                    cfg.smart_resize(image.height(), image.width()).unwrap().0,
                    cfg.smart_resize(image.height(), image.width()).unwrap().1,
                    cfg.resample,
                )
                .unwrap(),
                &cfg,
            )
            .unwrap();
            assert_eq!(pre.preprocess(image).unwrap(), fresh, "{image:?}");
            let grids = pre
                .preprocess_into(&[(*image).clone()], &mut buffer)
                .unwrap();
            assert_eq!(buffer, fresh.data);
            assert_eq!(grids, vec![fresh.grid_thw]);
        }
        assert_eq!(pre.preprocess(&wide_only).unwrap().resized, (56, 84));
        assert!(
            Preprocessor::new(PreprocessConfig {
                merge_size: 0,
                ..cfg
            })
            .is_err()
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = PreprocessConfig::default();
        let odd = image::RgbImage::new(30, 28);
        let err = normalize_patchify(&odd, &cfg).unwrap_err();
        assert!(err.to_string().contains("multiples of 28"), "{err}");
        let thin = test_pattern(1, 300, PatternKind::Smooth, 0).unwrap();
        assert!(preprocess_image(&thin, &cfg).is_err());
        let bad_std = PreprocessConfig {
            image_std: [0.2, 0.0, 0.2],
            ..cfg
        };
        let err = preprocess_image(&thin, &bad_std).unwrap_err();
        assert!(err.to_string().contains("image-std[1]"), "{err}");
        let image = test_pattern(8, 8, PatternKind::Smooth, 0).unwrap();
        assert!(resize_rgb(&image, 0, 4, ResampleFilter::Bicubic).is_err());
    }

    #[test]
    fn every_filter_resizes() {
        let image = test_pattern(40, 50, PatternKind::Smooth, 0).unwrap();
        for filter in [
            ResampleFilter::Nearest,
            ResampleFilter::Bilinear,
            ResampleFilter::Bicubic,
            ResampleFilter::Lanczos3,
        ] {
            let out = resize_rgb(&image, 28, 84, filter).unwrap();
            assert_eq!((out.width(), out.height()), (84, 28));
        }
    }
}
