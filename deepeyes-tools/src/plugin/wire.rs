//! The messages between a host and its plugin-host child, and their framing on a pipe.
//!
//! A frame is a little-endian `u32` byte count followed by that many bytes: a little-endian
//! `u32` length of a JSON header, the header, then raw bytes (pixels) the header describes. The
//! parent speaks first (`Init`, then one `Call` per tool call); the child answers each request
//! with exactly one reply. Pixels never go through JSON: an image is its `width × height` header
//! and `width * height * 3` tail bytes.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use deepeyes_core::{Image, ToolSpec};
use serde::{Deserialize, Serialize};

use crate::plugin::PluginLimits;

/// Version of this protocol; a child of another version is refused at `Init`.
pub(crate) const PROTOCOL: u32 = 1;

/// A request of the parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Request {
    /// Load the library, create the instance; answered by `Ready` or `Failed`.
    Init {
        /// [`PROTOCOL`] of the parent.
        protocol: u32,
        /// The plugin library.
        path: PathBuf,
        /// The plugin's configuration.
        config: serde_json::Value,
        /// Limits on outputs.
        limits: PluginLimits,
        /// Address-space cap to set before loading the library.
        memory_limit_bytes: Option<u64>,
    },
    /// Run one call; the tail holds the image's pixels. Answered by `Output` or `Failed`.
    Call {
        /// The call's arguments.
        args: serde_json::Value,
        /// The size of the first input image, if any.
        image: Option<ImageSize>,
    },
}

/// A reply of the child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Reply {
    /// The plugin is loaded and its instance created.
    Ready {
        /// [`PROTOCOL`] of the child.
        protocol: u32,
        /// The tool's name.
        name: String,
        /// The plugin's own version.
        plugin_version: String,
        /// The ABI version the plugin was built for.
        abi: (u32, u32),
        /// The tool's spec.
        spec: ToolSpec,
    },
    /// A call's output; the tail holds the images' pixels, one after the other.
    Output {
        /// Text for the model.
        text: Option<String>,
        /// The size of each image.
        images: Vec<ImageSize>,
    },
    /// Loading or a call failed; the message names what and why.
    Failed {
        /// The message.
        message: String,
    },
}

/// The size of an RGB8 image in a frame's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageSize {
    pub(crate) width: u32,
    pub(crate) height: u32,
}

impl ImageSize {
    fn bytes(self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 3
    }
}

/// The size of an image and its pixels, for a frame.
pub(crate) fn image_part(image: &Image) -> (ImageSize, &[u8]) {
    let size = ImageSize {
        width: image.width(),
        height: image.height(),
    };
    (size, image.as_raw())
}

/// Cuts a frame's tail into the images `sizes` describes.
pub(crate) fn split_images(sizes: &[ImageSize], tail: &[u8]) -> Result<Vec<Image>, String> {
    let total: u64 = sizes.iter().map(|s| s.bytes()).sum();
    if total != tail.len() as u64 {
        return Err(format!(
            "the frame holds {} bytes of pixels, its header describes {total}",
            tail.len()
        ));
    }
    let mut rest = tail;
    let mut images = Vec::with_capacity(sizes.len());
    for size in sizes {
        let (pixels, next) = rest.split_at(size.bytes() as usize);
        rest = next;
        let image = Image::from_raw(size.width, size.height, pixels.to_vec())
            .map_err(|e| format!("unusable image: {e}"))?;
        images.push(image);
    }
    Ok(images)
}

/// Writes one frame: `header` as JSON, then the `tail` parts.
pub(crate) fn write_frame(
    out: &mut impl Write,
    header: &impl Serialize,
    tail: &[&[u8]],
) -> io::Result<()> {
    let json = serde_json::to_vec(header).map_err(io::Error::other)?;
    let tail_len: usize = tail.iter().map(|t| t.len()).sum();
    let total = 4 + json.len() + tail_len;
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB");
    out.write_all(&u32::try_from(total).map_err(|_| too_big())?.to_le_bytes())?;
    out.write_all(
        &u32::try_from(json.len())
            .map_err(|_| too_big())?
            .to_le_bytes(),
    )?;
    out.write_all(&json)?;
    for part in tail {
        out.write_all(part)?;
    }
    out.flush()
}

/// Reads one frame of at most `max_bytes`, refusing a larger one before allocating it; returns
/// its header and tail. `Ok(None)` at a clean end of stream.
pub(crate) fn read_frame<T: serde::de::DeserializeOwned>(
    input: &mut impl Read,
    max_bytes: u64,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let total = u64::from(u32::from_le_bytes(len));
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    if total > max_bytes {
        return Err(invalid(format!(
            "a frame of {total} bytes, over the limit of {max_bytes}"
        )));
    }
    let mut frame = vec![0u8; total as usize];
    input.read_exact(&mut frame)?;
    if frame.len() < 4 {
        return Err(invalid(format!("a frame of {total} bytes has no header")));
    }
    let json_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let Some(json) = frame.get(4..4 + json_len) else {
        return Err(invalid(format!(
            "a header of {json_len} bytes in a frame of {total}"
        )));
    };
    let header = serde_json::from_slice(json).map_err(|e| invalid(format!("bad header: {e}")))?;
    let tail = frame.split_off(4 + json_len);
    Ok(Some((header, tail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_images() {
        let image = Image::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let (size, pixels) = image_part(&image);
        let mut buf = Vec::new();
        let reply = Reply::Output {
            text: Some("hi".into()),
            images: vec![size, size],
        };
        write_frame(&mut buf, &reply, &[pixels, pixels]).unwrap();
        let mut input = buf.as_slice();
        let (back, tail): (Reply, _) = read_frame(&mut input, 1 << 20).unwrap().unwrap();
        let Reply::Output { text, images } = back else {
            panic!("{back:?}")
        };
        assert_eq!(text.as_deref(), Some("hi"));
        assert_eq!(
            split_images(&images, &tail).unwrap(),
            [image.clone(), image]
        );
        assert!(read_frame::<Reply>(&mut input, 1 << 20).unwrap().is_none());
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Reply::Failed {
                message: "x".repeat(100),
            },
            &[],
        )
        .unwrap();
        let err = read_frame::<Reply>(&mut buf.as_slice(), 50).unwrap_err();
        assert!(err.to_string().contains("over the limit of 50"), "{err}");
        // Text that is not a frame (a program printing its usage, say).
        let err = read_frame::<Reply>(&mut &b"Usage: deepeyes [OPTIONS]"[..], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        let mut bad = 8u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&100u32.to_le_bytes());
        bad.extend_from_slice(b"{}{}");
        let err = read_frame::<Reply>(&mut bad.as_slice(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("a header of 100 bytes"), "{err}");
        let size = ImageSize {
            width: 2,
            height: 2,
        };
        assert!(split_images(&[size], &[0; 11]).is_err());
    }
}
