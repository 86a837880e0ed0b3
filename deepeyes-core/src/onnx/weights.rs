//! Replacing a bundle's weights without re-exporting it.
//!
//! A bundle written by `scripts/export_qwen2_5_vl.py` carries `weights.json`: for every graph
//! initializer that holds a model parameter, the Hugging Face name of that parameter, whether the
//! exporter stored it transposed, and its shape in the graph. Next to it sits `model.safetensors`,
//! the bundle's weights of record. [`crate::onnx::OnnxModel::load`] hands those tensors to ONNX
//! Runtime as session initializers, so whatever weights sit in the bundle are the ones that run;
//! [`crate::onnx::OnnxModel::load_with_weights`] takes them from memory instead (a trainer
//! refreshing its rollout model after an update, without touching the disk).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{OnnxError, OnnxResult};

/// The weight map's file name inside a bundle.
pub const WEIGHT_MAP_FILE: &str = "weights.json";
/// The `format` field of a weight map.
pub const WEIGHT_MAP_FORMAT: &str = "deepeyes-weight-map";

pub use crate::weights::{HostTensor, Weights};
use crate::weights::{TensorView, WeightSource};

/// One initializer that holds a parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapEntry {
    /// The initializer's name in the graph.
    pub initializer: String,
    /// The parameter's Hugging Face name.
    pub param: String,
    /// Whether the graph stores the parameter transposed (2-D only).
    pub transpose: bool,
    /// The initializer's shape in the graph.
    pub shape: Vec<usize>,
}

impl MapEntry {
    /// The parameter's shape in the checkpoint: the graph's, reversed when stored transposed.
    fn param_shape(&self) -> Vec<usize> {
        if self.transpose {
            self.shape.iter().rev().copied().collect()
        } else {
            self.shape.clone()
        }
    }

    /// Whether a parameter of `shape` (`None`: the weights lack it) is what this initializer
    /// needs; the reason when it is not, naming both.
    fn check_param_shape(&self, shape: Option<&[usize]>) -> Result<(), String> {
        let want = self.param_shape();
        match shape {
            None => Err(format!(
                "initializer {} needs parameter {}, which the weights do not hold",
                self.initializer, self.param
            )),
            Some(shape) if shape != want => Err(format!(
                "parameter {} has shape {shape:?}, but initializer {} needs {want:?}",
                self.param, self.initializer
            )),
            Some(_) => Ok(()),
        }
    }
}

/// `weights.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightMap {
    /// Always [`WEIGHT_MAP_FORMAT`].
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// The safetensors file of the bundle's weights, relative to the bundle.
    pub params: String,
    /// Entries per graph (`vision`, `embed`, `decoder`).
    pub graphs: BTreeMap<String, Vec<MapEntry>>,
    /// The graphs' own initializers hold exactly the weights of [`params`](Self::params), as
    /// the exporter leaves them; [`crate::onnx::OnnxModel::load`] then runs the graphs as they
    /// are instead of reading the safetensors file (for a 7B, 15 GB read and 30 GB converted for
    /// nothing). Whoever writes other weights into the bundle clears it (the trainer's export
    /// does); absent means false.
    #[serde(
        default,
        rename = "graphs-current",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub graphs_current: bool,
}

fn bad(path: &Path, reason: impl Into<String>) -> OnnxError {
    OnnxError::Bundle {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl WeightMap {
    /// Reads `weights.json` from `dir`; `None` when the bundle has none (its graphs then run
    /// the weights embedded at export).
    pub fn load(dir: &Path) -> OnnxResult<Option<Self>> {
        let path = dir.join(WEIGHT_MAP_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(&path, e.to_string())),
        };
        let map: Self = serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))?;
        if map.format != WEIGHT_MAP_FORMAT || map.version != 1 {
            return Err(bad(
                &path,
                format!(
                    "format {:?} version {} is not {WEIGHT_MAP_FORMAT:?} version 1",
                    map.format, map.version
                ),
            ));
        }
        for entries in map.graphs.values() {
            for e in entries {
                if e.transpose && e.shape.len() != 2 {
                    return Err(bad(
                        &path,
                        format!("{}: only 2-D initializers can be transposed", e.initializer),
                    ));
                }
            }
        }
        Ok(Some(map))
    }

    /// The entries of graph `name` (none when absent).
    pub fn entries(&self, name: &str) -> &[MapEntry] {
        self.graphs.get(name).map_or(&[], Vec::as_slice)
    }

    /// The weights file of the bundle in `dir`.
    pub fn params_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.params)
    }

    /// Checks that the safetensors file `params` holds every parameter the graphs need, in the
    /// shape they need it (read from the file's header alone, so a 7B costs nothing): a bundle
    /// whose graphs cannot run some weights is refused when it is written, not when it is loaded.
    pub fn check_shapes(&self, params: &Path) -> OnnxResult<()> {
        let shapes = safetensors_shapes(params)?;
        for e in self.graphs.values().flatten() {
            e.check_param_shape(shapes.get(&e.param).map(Vec::as_slice))
                .map_err(|reason| bad(params, reason))?;
        }
        Ok(())
    }

    /// Writes the map as `weights.json` into `dir`.
    pub fn save(&self, dir: &Path) -> OnnxResult<()> {
        let path = dir.join(WEIGHT_MAP_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| bad(&path, e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| bad(&path, e.to_string()))
    }
}

/// The shape of every tensor of a safetensors file, read from its header.
pub fn safetensors_shapes(path: &Path) -> OnnxResult<BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(path, format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    // The format caps its header at 100 MB.
    if len > 100_000_000 {
        return Err(bad(
            path,
            format!("a {len}-byte header is not safetensors'"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(path, format!("a truncated safetensors header: {e}")))?;
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(path, format!("the safetensors header: {e}")))?;
    entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, entry)| {
            let shape = serde_json::from_value::<Vec<usize>>(entry["shape"].clone())
                .map_err(|e| bad(path, format!("tensor {name}: its shape: {e}")))?;
            Ok((name, shape))
        })
        .collect()
}

/// Reads every tensor of a safetensors file as `f32` (F32, BF16, F16 and F64 are accepted).
pub fn read_safetensors(path: &Path) -> OnnxResult<Weights> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
    parse_safetensors(&bytes).map_err(|reason| bad(path, reason))
}

/// Parses safetensors bytes as `f32` tensors; the error names the tensor at fault.
pub fn parse_safetensors(bytes: &[u8]) -> Result<Weights, String> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut out = Weights::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(format!(
                    "tensor {name}: dtype {other:?} is not a float type"
                ));
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let shift = f.leading_zeros() - 21;
            let frac = (f << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (frac << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// The value of one initializer: the parameter, transposed when the graph stores it so, checked
/// against the graph's shape. Errors name the parameter and the file that maps it.
pub(crate) fn initializer_value(
    entry: &MapEntry,
    weights: &dyn WeightSource,
    map_path: &Path,
) -> OnnxResult<HostTensor> {
    let mut data = vec![0.0; entry.shape.iter().product()];
    fill_initializer(entry, weights, map_path, &mut data)?;
    Ok(HostTensor {
        shape: entry.shape.clone(),
        data,
    })
}

/// The parameter behind `entry`, checked to have the shape the graph needs (reversed when the
/// graph stores it transposed). Errors name the parameter and the file that maps it.
pub(crate) fn mapped_param<'w>(
    entry: &MapEntry,
    weights: &'w dyn WeightSource,
    map_path: &Path,
) -> OnnxResult<TensorView<'w>> {
    let param = weights.tensor(&entry.param);
    entry
        .check_param_shape(param.as_ref().map(|p| p.shape))
        .map_err(|reason| bad(map_path, reason))?;
    let param = param.expect("checked present");
    if param.data.len() != entry.shape.iter().product::<usize>() {
        return Err(bad(
            map_path,
            format!(
                "parameter {} holds {} values for shape {:?}",
                entry.param,
                param.data.len(),
                param.shape
            ),
        ));
    }
    Ok(param)
}

/// Writes one initializer's values into `out`, which holds exactly its elements: the parameter,
/// transposed when the graph stores it so.
pub(crate) fn fill_initializer(
    entry: &MapEntry,
    weights: &dyn WeightSource,
    map_path: &Path,
    out: &mut [f32],
) -> OnnxResult<()> {
    let rows = entry.shape.first().copied().unwrap_or(1);
    fill_initializer_rows(entry, weights, map_path, 0..rows, out)
}

/// Values per row of an initializer (its first dimension): the product of the others.
pub(crate) fn row_len(entry: &MapEntry) -> usize {
    entry.shape.iter().skip(1).product()
}

/// Writes rows `rows` (of the initializer's first dimension, the graph's layout) into `out`,
/// which holds exactly those rows, so that several threads can each write a part of one large
/// initializer.
pub(crate) fn fill_initializer_rows(
    entry: &MapEntry,
    weights: &dyn WeightSource,
    map_path: &Path,
    rows: Range<usize>,
    out: &mut [f32],
) -> OnnxResult<()> {
    let param = mapped_param(entry, weights, map_path)?;
    let width = row_len(entry);
    let total = entry.shape.first().copied().unwrap_or(1);
    if out.len() != rows.len() * width || rows.end > total {
        return Err(bad(
            map_path,
            format!(
                "rows {rows:?} of initializer {} ({total} rows of {width}) do not fit {} values",
                entry.initializer,
                out.len(),
            ),
        ));
    }
    if !entry.transpose {
        out.copy_from_slice(&param.data[rows.start * width..rows.end * width]);
        return Ok(());
    }
    // The graph's row c is the parameter's column c.
    transpose_into(param.data, param.shape[0], param.shape[1], rows, out);
    Ok(())
}

/// Writes columns `columns` of the `[rows, cols]` row-major `src`, transposed, into `out`
/// (`[columns.len(), rows]`), in tiles that stay in cache: a 151936 × 2048 output head
/// transposed row by row writes one value per cache line and takes seconds.
fn transpose_into(src: &[f32], rows: usize, cols: usize, columns: Range<usize>, out: &mut [f32]) {
    const TILE: usize = 64;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in columns.clone().step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &src[r * cols..(r + 1) * cols];
                for c in c0..(c0 + TILE).min(columns.end) {
                    out[(c - columns.start) * rows + r] = row[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed TinyEyes bundle's weights fit its graphs; a map whose embedding needs
    /// another vocabulary, or a parameter the file lacks, is refused, naming the parameter.
    #[test]
    fn shapes_are_checked_from_the_safetensors_header() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tinyeyes");
        let map = WeightMap::load(&dir)
            .unwrap()
            .expect("the bundle has a weight map");
        let params = map.params_path(&dir);
        map.check_shapes(&params).unwrap();
        let shapes = safetensors_shapes(&params).unwrap();
        let vocab = shapes["model.embed_tokens.weight"][0];
        let mut other = map.clone();
        let entry = other
            .graphs
            .values_mut()
            .flatten()
            .find(|e| e.param == "model.embed_tokens.weight")
            .unwrap();
        entry.shape[if entry.transpose { 1 } else { 0 }] = vocab + 12;
        let err = other.check_shapes(&params).unwrap_err().to_string();
        assert!(
            err.contains("model.embed_tokens.weight") && err.contains(&format!("{}", vocab + 12)),
            "{err}"
        );
        let mut missing = map.clone();
        missing.graphs.values_mut().flatten().next().unwrap().param = "model.no_such.weight".into();
        let err = missing.check_shapes(&params).unwrap_err().to_string();
        assert!(err.contains("model.no_such.weight"), "{err}");
    }

    #[test]
    fn half_precision_converts_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }

    #[test]
    fn tiled_transpose_matches_the_definition_across_tile_edges() {
        for (rows, cols) in [(1, 1), (3, 130), (130, 67), (64, 64), (65, 129)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut out = vec![-1.0; rows * cols];
            transpose_into(&src, rows, cols, 0..cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        src[r * cols + c],
                        "{rows}×{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn initializers_written_in_row_pieces_equal_the_whole() {
        let (r, c) = (70, 130);
        let mut w = Weights::new();
        let data = (0..r * c).map(|i| i as f32).collect();
        w.insert(
            "p".into(),
            HostTensor {
                shape: vec![r, c],
                data,
            },
        );
        let map = Path::new("weights.json");
        for transpose in [false, true] {
            let shape = if transpose { vec![c, r] } else { vec![r, c] };
            let entry = MapEntry {
                initializer: "i".into(),
                param: "p".into(),
                transpose,
                shape: shape.clone(),
            };
            let whole = initializer_value(&entry, &w, map).unwrap().data;
            let width = row_len(&entry);
            let mut pieces = vec![0.0; whole.len()];
            for start in (0..shape[0]).step_by(17) {
                let rows = start..(start + 17).min(shape[0]);
                let out = &mut pieces[rows.start * width..rows.end * width];
                fill_initializer_rows(&entry, &w, map, rows, out).unwrap();
            }
            assert_eq!(pieces, whole, "transpose {transpose}");
            let e = fill_initializer_rows(&entry, &w, map, 0..2, &mut [0.0; 3]).unwrap_err();
            assert!(e.to_string().contains("do not fit 3 values"), "{e}");
        }
    }

    #[test]
    fn transposed_initializers_are_built_and_shapes_checked() {
        let mut w = Weights::new();
        w.insert(
            "p".into(),
            HostTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            },
        );
        let entry = MapEntry {
            initializer: "val_1".into(),
            param: "p".into(),
            transpose: true,
            shape: vec![3, 2],
        };
        let t = initializer_value(&entry, &w, Path::new("weights.json")).unwrap();
        assert_eq!(t.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let wrong = MapEntry {
            shape: vec![2, 2],
            ..entry.clone()
        };
        let e = initializer_value(&wrong, &w, Path::new("weights.json")).unwrap_err();
        assert!(
            e.to_string().contains("parameter p has shape [2, 3]"),
            "{e}"
        );
        let missing = MapEntry {
            param: "q".into(),
            ..entry
        };
        let e = initializer_value(&missing, &w, Path::new("weights.json")).unwrap_err();
        assert!(e.to_string().contains("needs parameter q"), "{e}");
    }
}
