//! Shared helpers of the model tests: the transformers golden file and its checkpoint.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use deepeyes_rl::network::{Grid, ImageInput, Sequence};
use safetensors::SafeTensors;

/// Repository root.
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One golden tensor as f64 values (ints converted) with its shape.
#[derive(Debug, Clone)]
pub(crate) struct Arr {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f64>,
}

impl Arr {
    pub(crate) fn ints(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }
    pub(crate) fn f32s(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

/// `tests/data/burn/golden.safetensors`, written by `scripts/gen_burn_golden.py`.
pub(crate) struct Golden {
    pub(crate) tensors: HashMap<String, Arr>,
    pub(crate) meta: HashMap<String, String>,
}

impl Golden {
    pub(crate) fn load() -> Golden {
        Self::load_file(&repo_root().join("tests/data/burn/golden.safetensors"))
    }

    pub(crate) fn load_file(path: &std::path::Path) -> Golden {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("golden header");
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).expect("golden file");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let d = view.data();
            let data: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
                safetensors::Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("golden tensor {name}: unexpected dtype {other:?}"),
            };
            tensors.insert(
                name,
                Arr {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Golden { tensors, meta }
    }

    pub(crate) fn get(&self, name: &str) -> &Arr {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden has no tensor {name}"))
    }

    /// The checkpoint directory the golden values were computed with.
    pub(crate) fn checkpoint(&self) -> PathBuf {
        repo_root().join(self.meta.get("checkpoint").expect("checkpoint metadata"))
    }

    pub(crate) fn grids(&self) -> Vec<Grid> {
        self.get("image_grid_thw")
            .ints()
            .chunks(3)
            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
            .collect()
    }

    /// The two images of the multimodal prompt, split from `pixel_values`.
    pub(crate) fn images(&self, patch_dim: usize) -> Vec<ImageInput> {
        let pix = self.get("pixel_values").f32s();
        let mut off = 0;
        self.grids()
            .into_iter()
            .map(|grid| {
                let n = grid.iter().product::<usize>() * patch_dim;
                let patches = pix[off..off + n].to_vec();
                off += n;
                ImageInput { grid, patches }
            })
            .collect()
    }

    pub(crate) fn input_ids(&self) -> Vec<u32> {
        self.get("input_ids")
            .ints()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    }

    /// The multimodal prompt with expanded pads.
    pub(crate) fn mm_sequence(&self, patch_dim: usize) -> Sequence {
        Sequence {
            score_from: 0,
            tokens: self.input_ids(),
            images: self.images(patch_dim),
        }
    }

    pub(crate) fn text_sequence(&self) -> Sequence {
        Sequence {
            score_from: 0,
            tokens: self
                .get("text_input_ids")
                .ints()
                .into_iter()
                .map(|v| v as u32)
                .collect(),
            images: vec![],
        }
    }
}

/// Max |a − b| over two equally long slices.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).abs())
        .fold(0.0, f64::max)
}
