//! Fixtures shared by the CLI tests.

use std::path::{Path, PathBuf};

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of the V* fixture folder in `dir/vstar` whose item `direct_attributes/sa_10001` has a
/// picture cut short: its header still reads (so the loader keeps the row), its pixels do not.
pub(crate) fn vstar_with_a_truncated_image(dir: &Path) -> PathBuf {
    let source = repo().join("tests/data/datasets/vstar");
    let data = dir.join("vstar");
    for category in ["direct_attributes", "relative_position"] {
        std::fs::create_dir_all(data.join(category)).unwrap();
        for entry in std::fs::read_dir(source.join(category)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), data.join(category).join(entry.file_name())).unwrap();
        }
    }
    let noise: Vec<u8> = (0..64 * 64 * 3u32)
        .map(|i| (i * 7919 % 251) as u8)
        .collect();
    let png = deepeyes_core::Image::from_raw(64, 64, noise)
        .unwrap()
        .to_png()
        .unwrap();
    std::fs::write(
        data.join("direct_attributes/sa_10001.jpg"),
        &png[..png.len() / 2],
    )
    .unwrap();
    data
}
