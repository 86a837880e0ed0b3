//! The tiny Qwen2.5-VL fixture (`tests/data/tiny-qwen2_5_vl`): its bundle and the golden
//! outputs transformers produced for it (regenerate with the command in its README).

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// The fixture's root directory.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-qwen2_5_vl")
}

/// The ONNX bundle.
pub fn bundle() -> PathBuf {
    root().join("bundle")
}

/// The same model exported with its weights in `<graph>.onnx.data` files (the layout of any
/// model over 1.5 GB, a 7B included).
pub fn bundle_external() -> PathBuf {
    root().join("bundle-external")
}

/// A tensor of the golden file, with its shape.
#[derive(Debug, Clone)]
pub struct Array<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// The golden outputs.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn load() -> Self {
        let path = root().join("golden/golden.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn view(&self, name: &str, dtype: Dtype) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("golden.safetensors parses");
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
        assert_eq!(t.dtype(), dtype, "dtype of {name}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, name: &str) -> Array<f32> {
        let (shape, bytes) = self.view(name, Dtype::F32);
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Array { shape, data }
    }

    pub fn i64(&self, name: &str) -> Array<i64> {
        let (shape, bytes) = self.view(name, Dtype::I64);
        let data = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Array { shape, data }
    }

    pub fn u32s(&self, name: &str) -> Vec<u32> {
        self.i64(name)
            .data
            .into_iter()
            .map(|v| u32::try_from(v).expect("token id fits u32"))
            .collect()
    }

    pub fn grids(&self) -> Vec<[u32; 3]> {
        self.i64("image_grid_thw")
            .data
            .chunks(3)
            .map(|g| [g[0] as u32, g[1] as u32, g[2] as u32])
            .collect()
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
