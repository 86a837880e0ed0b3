//! The one item type every dataset and benchmark loader yields.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::image::{Image, ImageLimits};

/// Where a row came from: the file, and the row and/or line inside it.
///
/// `row` is the 0-based index of the data row in the file (the same number pandas' `df.iloc[row]`
/// uses; header lines are not rows). `line` is the 1-based physical line of text files, where the
/// row starts. A V* item is a whole `.json` file, so both are `None` there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Position {
    /// The file that holds the row.
    pub file: PathBuf,
    /// 0-based data row index, when the file holds many rows.
    pub row: Option<u64>,
    /// 1-based line where the row starts, for text formats.
    pub line: Option<u64>,
}

impl Position {
    /// A position that is a whole file.
    pub fn file(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            row: None,
            line: None,
        }
    }

    /// Row `row` (0-based) of a binary file.
    pub fn row(file: impl Into<PathBuf>, row: u64) -> Self {
        Self {
            file: file.into(),
            row: Some(row),
            line: None,
        }
    }

    /// Row `row` (0-based) of a text file, starting on `line` (1-based).
    pub fn line(file: impl Into<PathBuf>, row: u64, line: u64) -> Self {
        Self {
            file: file.into(),
            row: Some(row),
            line: Some(line),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        match (self.line, self.row) {
            (Some(line), Some(row)) => write!(f, ":{line} (row {row})"),
            (Some(line), None) => write!(f, ":{line}"),
            (None, Some(row)) => write!(f, " (row {row})"),
            (None, None) => Ok(()),
        }
    }
}

/// One image of an item, kept encoded and decoded on demand.
///
/// Loaders check every image's header (format, width, height, the [`ImageLimits`]) before they
/// yield the item, so an item never carries bytes that are not an image; with
/// [`ImageCheck::Decode`](super::ImageCheck::Decode) they also decode the pixels and keep them.
/// Keeping the encoded bytes is what keeps memory small: a 7680×4320 HR-Bench 8K JPEG is a few
/// MB encoded and 100 MB decoded, and a shuffling sampler may hold thousands of items.
#[derive(Clone)]
pub struct ItemImage {
    bytes: Arc<[u8]>,
    origin: String,
    width: u32,
    height: u32,
    format: &'static str,
    decoded: Option<Image>,
}

impl ItemImage {
    /// Checks the header of `bytes` under `limits` and wraps them. `origin` names the image in
    /// errors (for example `"data.parquet (row 3) image 0"`).
    pub fn from_encoded(
        bytes: impl Into<Arc<[u8]>>,
        origin: impl Into<String>,
        limits: &ImageLimits,
    ) -> crate::Result<Self> {
        let bytes = bytes.into();
        let origin = origin.into();
        let (width, height, format) = probe(&bytes, &origin, limits)?;
        Ok(Self {
            bytes,
            origin,
            width,
            height,
            format,
            decoded: None,
        })
    }

    /// Like [`ItemImage::from_encoded`], and also decodes the pixels now and keeps them, so a
    /// truncated or corrupt body is found at load time and [`ItemImage::decode`] is free.
    pub fn from_encoded_decoded(
        bytes: impl Into<Arc<[u8]>>,
        origin: impl Into<String>,
        limits: &ImageLimits,
    ) -> crate::Result<Self> {
        let mut image = Self::from_encoded(bytes, origin, limits)?;
        image.decoded = Some(Image::decode(&image.bytes, &image.origin, limits)?);
        Ok(image)
    }

    /// The encoded bytes, exactly as stored in the dataset.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the image came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Width in pixels, from the header.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels, from the header.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The encoding, as a lower-case name such as `"jpeg"` or `"png"`.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// Whether the decoded pixels are already held.
    pub fn is_decoded(&self) -> bool {
        self.decoded.is_some()
    }

    /// The decoded pixels: the kept ones if the loader decoded them, else decoded now under
    /// `limits`.
    pub fn decode(&self, limits: &ImageLimits) -> crate::Result<Image> {
        match &self.decoded {
            Some(image) => Ok(image.clone()),
            None => Image::decode(&self.bytes, &self.origin, limits),
        }
    }
}

impl fmt::Debug for ItemImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ItemImage({} {}×{}, {} bytes, {})",
            self.format,
            self.width,
            self.height,
            self.bytes.len(),
            self.origin
        )
    }
}

impl PartialEq for ItemImage {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.origin == other.origin
    }
}

impl Serialize for ItemImage {
    /// Serialises the metadata only (origin, format, size), never the bytes.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("ItemImage", 5)?;
        s.serialize_field("origin", &self.origin)?;
        s.serialize_field("format", self.format)?;
        s.serialize_field("width", &self.width)?;
        s.serialize_field("height", &self.height)?;
        s.serialize_field("encoded_bytes", &self.bytes.len())?;
        s.end()
    }
}

/// Reads the format and size of an encoded image from its header and applies `limits`, without
/// decoding pixels.
pub(crate) fn probe(
    bytes: &[u8],
    origin: &str,
    limits: &ImageLimits,
) -> crate::Result<(u32, u32, &'static str)> {
    let fail = |reason: String| crate::Error::Image {
        origin: origin.to_string(),
        reason,
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(fail(format!(
            "not a recognised image format ({} bytes starting {:02x?})",
            bytes.len(),
            &bytes[..bytes.len().min(8)]
        )));
    };
    let name = format_name(format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| fail(format!("cannot read {name} header: {e}")))?;
    if width == 0 || height == 0 {
        return Err(fail(format!("empty image ({width}×{height})")));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(fail(format!(
            "{width}×{height} = {pixels} pixels exceeds the limit of {} pixels",
            limits.max_pixels
        )));
    }
    if pixels.saturating_mul(4) > limits.max_decoded_bytes {
        return Err(fail(format!(
            "{width}×{height} would need more than the {}-byte decode limit",
            limits.max_decoded_bytes
        )));
    }
    Ok((width, height, name))
}

fn format_name(format: image::ImageFormat) -> &'static str {
    use image::ImageFormat as F;
    match format {
        F::Png => "png",
        F::Jpeg => "jpeg",
        F::Gif => "gif",
        F::WebP => "webp",
        F::Tiff => "tiff",
        F::Bmp => "bmp",
        _ => "other",
    }
}

/// A ground-truth box of the object a question is about, in pixels of the original image,
/// as `[x1, y1, x2, y2]` (top-left, bottom-right), the frame `image_zoom_in_tool` uses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroundTruthBox {
    /// `[x1, y1, x2, y2]` with `x1 < x2` and `y1 < y2`.
    pub bbox: [f64; 4],
    /// The object's name, when the dataset gives one (V*'s `target_object`).
    pub label: Option<String>,
    /// Which of the item's images the box is in.
    pub image: usize,
}

/// One chat message of a dataset's stored prompt (verl's `prompt` column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text, with `<image>` placeholders where the images go.
    pub content: String,
}

/// One question of a dataset or benchmark, whatever file format it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// A stable identifier, unique within its file (used to resume an evaluation).
    pub id: String,
    /// Which dataset the row belongs to (`vstar`, `chart`, `thinklite_eureka`, `hrbench`,
    /// `synthv`, …); reward functions route on it.
    pub data_source: String,
    /// The question text, without options and without prompt scaffolding.
    pub question: String,
    /// The answer options in stored order; empty for an open-ended question.
    pub options: Vec<String>,
    /// For a multiple-choice item, the index of the correct option in [`Item::options`].
    pub correct_option: Option<usize>,
    /// The ground-truth answer text (the correct option's text for a multiple-choice item).
    pub answer: String,
    /// The images, in prompt order; the first is the one tools crop by default.
    pub images: Vec<ItemImage>,
    /// Ground-truth boxes of the objects the question is about, when known.
    pub boxes: Vec<GroundTruthBox>,
    /// A category for per-category scores (V*: `direct_attributes`; HR-Bench: `single`/`cross`).
    pub category: Option<String>,
    /// The prompt messages stored with the row (verl parquet only; empty otherwise).
    pub prompt: Vec<PromptMessage>,
    /// Every other field of the row, as JSON.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Where the row came from.
    pub position: Position,
}

impl Item {
    /// Whether the item has answer options.
    pub fn is_multiple_choice(&self) -> bool {
        !self.options.is_empty()
    }

    /// The letter of the correct option in stored order (`A` for index 0).
    pub fn answer_letter(&self) -> Option<char> {
        self.correct_option.and_then(option_letter)
    }

    /// The ground-truth boxes on the first image, the one zoom tools crop from: what a reported
    /// crop region is compared with.
    pub fn first_image_boxes(&self) -> Vec<[f64; 4]> {
        self.boxes
            .iter()
            .filter(|b| b.image == 0)
            .map(|b| b.bbox)
            .collect()
    }

    /// Decodes every image under `limits`.
    pub fn decode_images(&self, limits: &ImageLimits) -> crate::Result<Vec<Image>> {
        self.images.iter().map(|img| img.decode(limits)).collect()
    }
}

/// The letter for option `index` (`0 → 'A'`), for up to 26 options.
pub fn option_letter(index: usize) -> Option<char> {
    u8::try_from(index)
        .ok()
        .filter(|&i| i < 26)
        .map(|i| char::from(b'A' + i))
}

/// The option index of a letter (`'A'`/`'a'` → 0).
pub fn letter_index(letter: char) -> Option<usize> {
    let upper = letter.to_ascii_uppercase();
    upper
        .is_ascii_uppercase()
        .then(|| usize::from(upper as u8 - b'A'))
}

/// The file a dataset row names as `written`, relative to the dataset's `root`. Unless
/// `outside_allowed`, a row may not reach outside `root`: an absolute path, or one whose `..`
/// climbs above it, is refused (a dataset from elsewhere must not read `/etc/shadow` or
/// `../../.ssh/id_rsa`). The check is on the path as written; symbolic links inside `root` are
/// followed, as laid out by whoever made the folder (Hugging Face's cache links into `blobs/`).
pub(crate) fn resolve(
    root: &Path,
    written: &str,
    outside_allowed: bool,
) -> Result<PathBuf, String> {
    use std::path::Component;
    let path = Path::new(written);
    if outside_allowed {
        return Ok(if path.is_absolute() {
            path.to_path_buf()
        } else {
            root.join(path)
        });
    }
    let refuse = |why: &str| {
        Err(format!(
            "path `{written}` {why}, outside the dataset folder {} (allow-paths-outside-root = true \
             allows it)",
            root.display()
        ))
    };
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => depth -= 1,
            Component::ParentDir => return refuse("climbs above it"),
            Component::RootDir | Component::Prefix(_) => return refuse("is absolute"),
        }
    }
    Ok(root.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        Image::from_rgb(image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3])))
            .unwrap()
            .to_png()
            .unwrap()
    }

    #[test]
    fn position_display() {
        assert_eq!(Position::file("a/b.json").to_string(), "a/b.json");
        assert_eq!(
            Position::row("d.parquet", 7).to_string(),
            "d.parquet (row 7)"
        );
        assert_eq!(Position::line("h.tsv", 2, 4).to_string(), "h.tsv:4 (row 2)");
    }

    #[test]
    fn letters_round_trip() {
        for i in 0..26 {
            assert_eq!(letter_index(option_letter(i).unwrap()), Some(i));
        }
        assert_eq!(option_letter(26), None);
        assert_eq!(letter_index('b'), Some(1));
        assert_eq!(letter_index('1'), None);
    }

    #[test]
    fn header_probe_reads_size_and_applies_limits() {
        let img = ItemImage::from_encoded(png(9, 4), "x", &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height(), img.format()), (9, 4, "png"));
        assert!(!img.is_decoded());
        assert_eq!(img.decode(&ImageLimits::default()).unwrap().width(), 9);
        let small = ImageLimits {
            max_pixels: 10,
            ..ImageLimits::default()
        };
        let err = ItemImage::from_encoded(png(9, 4), "big", &small).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let err = ItemImage::from_encoded(b"hello".to_vec(), "junk", &ImageLimits::default())
            .unwrap_err();
        assert!(err.to_string().contains("junk"), "{err}");
    }

    #[test]
    fn eager_decode_catches_a_truncated_body() {
        let mut bytes = png(64, 64);
        bytes.truncate(bytes.len() - 20);
        // The header is intact, so the cheap check passes...
        assert!(ItemImage::from_encoded(bytes.clone(), "cut", &ImageLimits::default()).is_ok());
        // ...and the full decode does not.
        assert!(ItemImage::from_encoded_decoded(bytes, "cut", &ImageLimits::default()).is_err());
    }

    proptest::proptest! {
        /// Whatever a row writes, a path it is allowed to read lies under the root once its
        /// `..`s are folded; refused paths are the absolute ones and those that climb out.
        #[test]
        fn resolved_paths_never_leave_the_root(
            parts in proptest::collection::vec(
                proptest::prop_oneof!["a", "b.png", "..", ".", "", "/"],
                0..8,
            )
        ) {
            let written = parts.join("/");
            let root = Path::new("/data/set");
            match resolve(root, &written, false) {
                Ok(path) => {
                    let mut folded: Vec<&std::ffi::OsStr> = Vec::new();
                    for c in path.components() {
                        match c {
                            std::path::Component::ParentDir => {
                                folded.pop();
                            }
                            std::path::Component::Normal(n) => folded.push(n),
                            _ => {}
                        }
                    }
                    proptest::prop_assert!(folded.len() >= 2, "{written:?} -> {path:?}");
                    proptest::prop_assert_eq!(&folded[..2], &["data", "set"].map(std::ffi::OsStr::new)[..]);
                }
                Err(e) => proptest::prop_assert!(
                    written.starts_with('/') || e.contains("climbs above it"),
                    "{written:?}: {e}"
                ),
            }
            proptest::prop_assert!(resolve(root, &written, true).is_ok());
        }
    }
}
