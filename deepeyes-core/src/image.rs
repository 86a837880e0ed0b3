//! RGB images with hard decode limits.
//!
//! Every image that enters deepeyes (a dataset row, a CLI argument, a tool output) goes through
//! [`Image::decode`] or [`Image::from_rgb`], so a decompression bomb or a 20000×20000 file is an
//! error that names the image, never an out-of-memory abort.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Hard limits applied when decoding an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ImageLimits {
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest number of bytes the decoder may allocate.
    pub max_decoded_bytes: u64,
    /// Largest image file read from disk, in bytes: a larger one is refused before it is read.
    pub max_file_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // HR-Bench 8K images are 7680×4320 (33 Mpx); 100 Mpx leaves room while a 20000×20000
        // (400 Mpx) file is refused before a byte of pixel data is allocated.
        Self {
            max_pixels: 100_000_000,
            max_decoded_bytes: 512 * 1024 * 1024,
            // An HR-Bench 8K JPEG is a few MB and a 33 Mpx PNG under 100 MB.
            max_file_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Reads the image file at `path`, refusing one larger than `limits.max_file_bytes` without
/// reading it (and never reading more than that, should the file grow meanwhile).
pub fn read_image_file(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let too_large = |size: u64| Error::Image {
        origin: path.display().to_string(),
        reason: format!(
            "the file has {size} bytes, over the limit of {} (max-file-bytes)",
            limits.max_file_bytes
        ),
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size > limits.max_file_bytes {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limits.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// An 8-bit RGB image, cheap to clone (the pixels are shared).
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    pixels: Arc<image::RgbImage>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}×{})", self.width(), self.height())
    }
}

impl Image {
    /// Wraps decoded pixels. Fails on an empty image.
    pub fn from_rgb(pixels: image::RgbImage) -> Result<Self> {
        if pixels.width() == 0 || pixels.height() == 0 {
            return Err(Error::Image {
                origin: "<pixels>".into(),
                reason: format!("empty image ({}×{})", pixels.width(), pixels.height()),
            });
        }
        Ok(Self {
            pixels: Arc::new(pixels),
        })
    }

    /// Builds an image from tightly packed RGB bytes (`width * height * 3` of them).
    pub fn from_raw(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        let expected = width as usize * height as usize * 3;
        let got = rgb.len();
        let pixels = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| Error::Image {
            origin: "<raw>".into(),
            reason: format!("{width}×{height} RGB needs {expected} bytes, got {got}"),
        })?;
        Self::from_rgb(pixels)
    }

    /// Decodes an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF) under `limits`.
    /// `origin` names the image in errors.
    pub fn decode(bytes: &[u8], origin: &str, limits: &ImageLimits) -> Result<Self> {
        let fail = |reason: String| Error::Image {
            origin: origin.to_string(),
            reason,
        };
        let reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if reader.format().is_none() {
            return Err(fail("not a recognised image format".into()));
        }
        // Read the header first so an oversized image is refused before any allocation.
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| fail(format!("cannot read header: {e}")))?;
        let pixels = u64::from(w) * u64::from(h);
        if pixels > limits.max_pixels {
            return Err(fail(format!(
                "{w}×{h} = {pixels} pixels exceeds the limit of {} pixels",
                limits.max_pixels
            )));
        }
        if pixels.saturating_mul(4) > limits.max_decoded_bytes {
            return Err(fail(format!(
                "{w}×{h} would need more than the {}-byte decode limit",
                limits.max_decoded_bytes
            )));
        }
        let mut reader = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        let mut decoder_limits = image::Limits::default();
        decoder_limits.max_alloc = Some(limits.max_decoded_bytes);
        decoder_limits.max_image_width = Some(w);
        decoder_limits.max_image_height = Some(h);
        reader.limits(decoder_limits);
        let decoded = reader
            .decode()
            .map_err(|e| fail(format!("cannot decode: {e}")))?;
        Self::from_rgb(decoded.into_rgb8()).map_err(|_| fail("empty image".into()))
    }

    /// Reads and decodes the image file at `path` under `limits`.
    pub fn open(path: impl AsRef<Path>, limits: &ImageLimits) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_image_file(path, limits)?;
        Self::decode(&bytes, &path.display().to_string(), limits)
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.pixels.width()
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.pixels.height()
    }

    /// The pixels.
    pub fn rgb(&self) -> &image::RgbImage {
        &self.pixels
    }

    /// An identity of the pixel buffer: clones of one image share it (and its id), images built
    /// or decoded separately do not. Valid while the image is alive; for caching work per image.
    pub fn buffer_id(&self) -> usize {
        Arc::as_ptr(&self.pixels) as usize
    }

    /// The tightly packed RGB bytes, row by row.
    pub fn as_raw(&self) -> &[u8] {
        self.pixels.as_raw()
    }

    /// The pixels inside `rect`, copied (the whole image is shared, not copied). Fails when
    /// `rect` is empty or reaches outside the image.
    pub fn crop(&self, rect: CropRect) -> Result<Image> {
        if !rect.fits(self.width(), self.height()) {
            return Err(Error::Image {
                origin: "<crop>".into(),
                reason: format!(
                    "rectangle {rect} is empty or does not lie inside the {}×{} image",
                    self.width(),
                    self.height()
                ),
            });
        }
        if rect == CropRect::full(self.width(), self.height()) {
            return Ok(self.clone());
        }
        let stride = self.width() as usize * 3;
        let row_len = rect.width as usize * 3;
        let first = rect.y as usize * stride + rect.x as usize * 3;
        let src = self.as_raw();
        let mut out = Vec::with_capacity(row_len * rect.height as usize);
        for row in 0..rect.height as usize {
            let start = first + row * stride;
            out.extend_from_slice(&src[start..start + row_len]);
        }
        Image::from_raw(rect.width, rect.height, out)
    }

    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.pixels
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                origin: "<png encode>".into(),
                reason: e.to_string(),
            })?;
        Ok(out)
    }

    /// Writes the image as a PNG file.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_png()?).map_err(|e| Error::io(path, e))
    }
}

/// An integer pixel rectangle inside an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CropRect {
    /// Left edge (inclusive).
    pub x: u32,
    /// Top edge (inclusive).
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl CropRect {
    /// A rectangle from its edges `[left, top, right, bottom)`; `None` when empty or inverted.
    pub fn from_edges(left: u32, top: u32, right: u32, bottom: u32) -> Option<Self> {
        (left < right && top < bottom).then(|| Self {
            x: left,
            y: top,
            width: right - left,
            height: bottom - top,
        })
    }

    /// The whole of a `width × height` image.
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }

    /// Right edge (exclusive).
    pub fn right(&self) -> u64 {
        u64::from(self.x) + u64::from(self.width)
    }

    /// Bottom edge (exclusive).
    pub fn bottom(&self) -> u64 {
        u64::from(self.y) + u64::from(self.height)
    }

    /// The edges `[left, top, right, bottom]` as numbers, the form boxes are compared in.
    pub fn edges(&self) -> [f64; 4] {
        [
            f64::from(self.x),
            f64::from(self.y),
            self.right() as f64,
            self.bottom() as f64,
        ]
    }

    /// The best IoU of this rectangle with any of `boxes` (`[x1, y1, x2, y2]` in the same
    /// image's pixels); `None` when there are no boxes.
    pub fn best_iou(&self, boxes: &[[f64; 4]]) -> Option<f64> {
        boxes.iter().map(|&b| iou(self.edges(), b)).reduce(f64::max)
    }

    /// Whether the rectangle holds the centre of any of `boxes` (`[x1, y1, x2, y2]` in the same
    /// image's pixels): whether a crop of it shows what the box marks. `None` without boxes.
    pub fn holds_centre_of(&self, boxes: &[[f64; 4]]) -> Option<bool> {
        let [l, t, r, b] = self.edges();
        (!boxes.is_empty()).then(|| {
            boxes.iter().any(|bx| {
                let (cx, cy) = ((bx[0] + bx[2]) / 2.0, (bx[1] + bx[3]) / 2.0);
                l <= cx && cx < r && t <= cy && cy < b
            })
        })
    }

    /// Whether the rectangle is non-empty and lies inside a `width × height` image.
    pub fn fits(&self, width: u32, height: u32) -> bool {
        self.width > 0
            && self.height > 0
            && self.right() <= u64::from(width)
            && self.bottom() <= u64::from(height)
    }
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when either is empty or inverted.
pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = [
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ];
    let i = area(inter);
    let u = area(a) + area(b) - i;
    if u > 0.0 { i / u } else { 0.0 }
}

impl std::fmt::Display for CropRect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}×{} at ({}, {})",
            self.width, self.height, self.x, self.y
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_boxes_and_rectangles() {
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]), 1.0);
        assert!((iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]), 0.0);
        assert_eq!(iou([10.0, 0.0, 0.0, 10.0], [0.0, 0.0, 10.0, 10.0]), 0.0);
        assert_eq!(iou([0.0; 4], [0.0; 4]), 0.0);
        let rect = CropRect::from_edges(0, 0, 10, 10).unwrap();
        assert_eq!(rect.best_iou(&[]), None);
        let best = rect.best_iou(&[[20.0, 20.0, 30.0, 30.0], [5.0, 0.0, 15.0, 10.0]]);
        assert!((best.unwrap() - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn crop_copies_exactly_the_rectangle_and_refuses_outside() {
        let raw: Vec<u8> = (0..4 * 3 * 3).map(|v| v as u8).collect();
        let img = Image::from_raw(4, 3, raw.clone()).unwrap();
        let out = img.crop(CropRect::from_edges(1, 1, 3, 3).unwrap()).unwrap();
        assert_eq!((out.width(), out.height()), (2, 2));
        assert_eq!(
            out.as_raw(),
            &[15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32]
        );
        let whole = img.crop(CropRect::full(4, 3)).unwrap();
        assert_eq!(whole.buffer_id(), img.buffer_id());
        let err = img
            .crop(CropRect::from_edges(2, 0, 5, 3).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("4×3"), "{err}");
    }

    #[test]
    fn clones_share_a_buffer_id_and_separate_images_do_not() {
        let a = Image::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let b = Image::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(a.clone().buffer_id(), a.buffer_id());
        assert_ne!(a.buffer_id(), b.buffer_id());
    }

    fn png_of(w: u32, h: u32) -> Vec<u8> {
        Image::from_rgb(image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30])))
            .unwrap()
            .to_png()
            .unwrap()
    }

    #[test]
    fn decodes_png_round_trip() {
        let img = Image::decode(&png_of(7, 5), "t.png", &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (7, 5));
        assert_eq!(&img.as_raw()[..3], &[10, 20, 30]);
    }

    #[test]
    fn refuses_too_many_pixels_before_decoding() {
        let limits = ImageLimits {
            max_pixels: 30,
            ..ImageLimits::default()
        };
        let err = Image::decode(&png_of(7, 5), "big.png", &limits).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("big.png") && msg.contains("exceeds"), "{msg}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn refuses_huge_header_without_allocating() {
        // A PNG header claiming 20000×20000: only the IHDR is valid, no pixel data follows.
        let mut png = png_of(1, 1);
        png[16..20].copy_from_slice(&20000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20000u32.to_be_bytes());
        // Keep the IHDR checksum valid so only the size is at fault.
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = Image::decode(&png, "bomb.png", &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("20000×20000"), "{err}");
    }

    #[test]
    fn corrupt_and_truncated_images_are_errors() {
        let png = png_of(16, 16);
        let truncated = &png[..png.len() / 2];
        assert!(Image::decode(truncated, "cut.png", &ImageLimits::default()).is_err());
        let err =
            Image::decode(b"not an image at all", "junk.bin", &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("junk.bin"), "{err}");
    }

    #[test]
    fn raw_length_is_checked() {
        assert!(Image::from_raw(2, 2, vec![0; 11]).is_err());
        assert!(Image::from_raw(2, 2, vec![0; 12]).is_ok());
        assert!(Image::from_raw(0, 2, vec![]).is_err());
    }
}
