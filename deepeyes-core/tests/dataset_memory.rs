//! Peak memory while streaming a verl parquet file stays flat when the file grows 10×.
//!
//! Each file is streamed in a child process (this test binary re-run with one ignored test), so
//! the peak resident set (`VmHWM`) measured belongs to the streaming alone. The full-size
//! measurement is `scripts/measure_dataset_memory.sh`; its figures are in `docs/DATASETS.md`.
#![cfg(all(feature = "parquet", target_os = "linux"))]

use std::path::{Path, PathBuf};
use std::process::Command;

use deepeyes_core::Image;
use deepeyes_core::dataset::{
    LoadOptions, PromptMessage, VerlParquetReader, VerlParquetWriter, VerlRow, VerlWriterConfig,
};

const CHILD_ENV: &str = "DEEPEYES_DATASET_MEMORY_FILE";
const MIB: u64 = 1024;

/// A PNG of random pixels: incompressible, so the file is as large as the pixels.
fn noise_png(side: u32, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes = (0..side * side * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    Image::from_raw(side, side, bytes)
        .unwrap()
        .to_png()
        .unwrap()
}

/// Writes `rows` rows, each with its own noise image (a repeated image would be stored once,
/// dictionary-encoded, and the file would not grow).
fn write_file(path: &Path, rows: usize, side: u32) {
    let mut w = VerlParquetWriter::create(
        path,
        VerlWriterConfig {
            row_group_rows: 64,
            zstd: false,
        },
    )
    .unwrap();
    for i in 0..rows {
        w.write(VerlRow {
            data_source: "vstar".into(),
            prompt: vec![PromptMessage {
                role: "user".into(),
                content: format!("<image>\nquestion {i}"),
            }],
            images: vec![noise_png(side, i as u64)],
            ground_truth: format!("answer {i}"),
            question: format!("question {i}"),
            index: i64::try_from(i).unwrap(),
            ..VerlRow::default()
        })
        .unwrap();
    }
    assert_eq!(w.finish().unwrap(), rows as u64);
}

fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs in the child: streams the file named by `CHILD_ENV` and writes
/// `<items> <image bytes> <peak KiB>` next to it.
#[test]
#[ignore = "run by streaming_peak_memory_is_flat_in_file_size in a child process"]
fn child_stream() {
    let Some(path) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let mut reader = VerlParquetReader::open(&path, &LoadOptions::default()).unwrap();
    let (mut items, mut bytes) = (0u64, 0u64);
    for record in &mut reader {
        let item = record.unwrap();
        items += 1;
        bytes += item.images[0].bytes().len() as u64;
    }
    let report = format!("{items} {bytes} {}", peak_kib());
    std::fs::write(path.with_extension("peak"), report).unwrap();
}

fn stream_in_child(path: &Path) -> (u64, u64, u64) {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_stream", "--ignored", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .status()
        .unwrap();
    assert!(status.success(), "child failed on {}", path.display());
    let report = std::fs::read_to_string(path.with_extension("peak")).unwrap();
    let v: Vec<u64> = report.split(' ').map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

#[test]
fn streaming_peak_memory_is_flat_in_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("x1.parquet");
    let large = dir.path().join("x10.parquet");
    write_file(&small, 120, 96);
    write_file(&large, 1200, 96);
    let large_size = std::fs::metadata(&large).unwrap().len();
    assert!(large_size > 30 * MIB * MIB, "{large_size} bytes");

    let (n1, bytes1, peak1) = stream_in_child(&small);
    let (n10, bytes10, peak10) = stream_in_child(&large);
    assert_eq!((n1, n10), (120, 1200));
    assert!(bytes10 > 9 * bytes1, "{bytes1} vs {bytes10} image bytes");
    // Holding the rows would add the ~30 MiB of extra image bytes; streaming adds nothing
    // beyond allocator noise.
    assert!(
        peak10 <= peak1 + 8 * MIB,
        "peak grew from {peak1} KiB to {peak10} KiB for a 10× larger file"
    );
    assert!(
        peak10 < 64 * MIB,
        "peak {peak10} KiB while streaming a {large_size}-byte file"
    );
}
