//! A minimal reader and writer of NumPy `.npy` files (format 1.0/2.0/3.0, C order,
//! little-endian `f32`, `u32` and `u8`), for debugging dumps and golden test fixtures.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The element type and values of an [`NpyArray`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum NpyData {
    /// `<f4`.
    F32(Vec<f32>),
    /// `<u4`.
    U32(Vec<u32>),
    /// `|u1`.
    U8(Vec<u8>),
}

impl NpyData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::U8(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An n-dimensional array read from a `.npy` file, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The dimensions.
    pub shape: Vec<usize>,
    /// The values.
    pub data: NpyData,
}

/// The header of a version 1.0 `.npy` file holding `shape` elements of type `descr`.
fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("{one},"),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + header length (2) + dict + newline, padded to 64 bytes.
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes `data` as a `.npy` array of type `<f4` and the given `shape` (C order).
pub fn write_npy_f32<W: Write>(
    mut writer: W,
    shape: &[usize],
    data: &[f32],
) -> std::io::Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("shape {shape:?} holds {count} values, got {}", data.len()),
        ));
    }
    writer.write_all(&header("<f4", shape))?;
    // Write in chunks so a large array needs no second full-size buffer.
    let mut buf = Vec::with_capacity(data.len().min(1 << 16) * 4);
    for chunk in data.chunks(1 << 16) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        writer.write_all(&buf)?;
    }
    writer.flush()
}

/// Saves `data` as a `<f4` `.npy` file of the given `shape` at `path`.
pub fn save_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    write_npy_f32(std::io::BufWriter::new(file), shape, data).map_err(|e| Error::io(path, e))
}

/// Parses a `.npy` file's bytes; `origin` names the file in errors.
pub fn parse_npy(bytes: &[u8], origin: &str) -> Result<NpyArray> {
    let bad =
        |reason: String| Error::config(origin, format!("not a supported .npy file: {reason}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing the \\x93NUMPY magic".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (
            usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
            10usize,
        ),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("truncated header".into()))?;
    let dict =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Result<&str> {
        let at = dict
            .find(&format!("'{key}'"))
            .ok_or_else(|| bad(format!("header lacks '{key}'")))?;
        let rest = dict[at + key.len() + 2..].trim_start();
        rest.strip_prefix(':')
            .map(str::trim_start)
            .ok_or_else(|| bad(format!("malformed '{key}'")))
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| bad("malformed 'descr'".into()))?;
    if !field("fortran_order")?.starts_with("False") {
        return Err(bad("Fortran-order arrays are not supported".into()));
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("malformed 'shape'".into()))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad dimension {s:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let body = &bytes[end..];
    let need = |size: usize| -> Result<&[u8]> {
        let n = count
            .checked_mul(size)
            .ok_or_else(|| bad("shape overflows".into()))?;
        if body.len() != n {
            return Err(bad(format!(
                "shape {shape:?} of '{descr}' needs {n} data bytes, found {}",
                body.len()
            )));
        }
        Ok(body)
    };
    let data = match descr {
        "<f4" => NpyData::F32(
            need(4)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "<u4" => NpyData::U32(
            need(4)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        "|u1" | "<u1" => NpyData::U8(need(1)?.to_vec()),
        other => return Err(bad(format!("unsupported dtype '{other}'"))),
    };
    Ok(NpyArray { shape, data })
}

/// Reads the `.npy` file at `path`.
pub fn load_npy(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_layout() {
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut bytes = Vec::new();
        write_npy_f32(&mut bytes, &[2, 3], &data).unwrap();
        let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
        assert_eq!((10 + header_len) % 64, 0, "data must start 64-byte aligned");
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        let text = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"),
            "{text}"
        );
        let back = parse_npy(&bytes, "mem").unwrap();
        assert_eq!(back.shape, vec![2, 3]);
        assert_eq!(back.data, NpyData::F32(data));
    }

    #[test]
    fn one_dimensional_shape_has_a_trailing_comma() {
        let mut bytes = Vec::new();
        write_npy_f32(&mut bytes, &[3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("'shape': (3,)"));
        assert_eq!(parse_npy(&bytes, "mem").unwrap().shape, vec![3]);
    }

    #[test]
    fn errors_name_the_file() {
        let mut bytes = Vec::new();
        write_npy_f32(&mut bytes, &[4], &[0.0; 4]).unwrap();
        let err = parse_npy(&bytes[..bytes.len() - 1], "cut.npy").unwrap_err();
        assert!(err.to_string().contains("cut.npy"), "{err}");
        assert!(parse_npy(b"hello", "junk.npy").is_err());
        assert!(write_npy_f32(Vec::new(), &[5], &[0.0; 4]).is_err());
    }
}
