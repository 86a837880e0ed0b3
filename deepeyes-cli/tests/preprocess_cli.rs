//! `deepeyes preprocess` end to end: the report on stdout (snapshotted) and the `.npy` dump.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deepeyes_core::preprocess::npy::{NpyData, load_npy};
use deepeyes_core::preprocess::preprocess_image;
use deepeyes_core::{Image, ImageLimits, PreprocessConfig};

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/preprocess/cli_sample.png")
}

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .arg("preprocess")
        .args(args)
        .output()
        .expect("the deepeyes binary runs")
}

/// Stdout with the machine-specific paths replaced.
fn report(output: &Output, replacements: &[(&Path, &str)]) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut text = String::from_utf8(output.stdout.clone()).unwrap();
    for (path, name) in replacements {
        text = text.replace(&path.display().to_string(), name);
    }
    text
}

#[test]
fn reports_and_dumps_pixel_values() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("pixels.npy");
    let image = sample();
    let output = deepeyes(&[
        "--image",
        image.to_str().unwrap(),
        "--out",
        npy.to_str().unwrap(),
    ]);
    let text = report(&output, &[(&image, "cli_sample.png"), (&npy, "pixels.npy")]);
    insta::assert_snapshot!("preprocess_default", text);

    // The dump is a real .npy holding exactly what the library computes.
    let array = load_npy(&npy).unwrap();
    assert_eq!(array.shape, vec![8 * 14, 1176]);
    let decoded = Image::open(&image, &ImageLimits::default()).unwrap();
    let expected = preprocess_image(&decoded, &PreprocessConfig::default()).unwrap();
    assert_eq!(array.data, NpyData::F32(expected.data));
}

#[test]
fn pixel_limits_change_the_grid() {
    let image = sample();
    let output = deepeyes(&["--image", image.to_str().unwrap(), "--max-pixels", "6000"]);
    let text = report(&output, &[(&image, "cli_sample.png")]);
    insta::assert_snapshot!("preprocess_max_pixels", text);

    let output = deepeyes(&["--image", image.to_str().unwrap(), "--min-pixels", "50000"]);
    let text = report(&output, &[(&image, "cli_sample.png")]);
    assert!(text.contains("grid (t, h, w):    (1, 14, 22)"), "{text}");
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let output = deepeyes(&["--image", "no/such/image.png"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no/such/image.png"), "{stderr}");

    let image = sample();
    let output = deepeyes(&[
        "--image",
        image.to_str().unwrap(),
        "--min-pixels",
        "900",
        "--max-pixels",
        "800",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("min-pixels (900) exceeds max-pixels (800)"),
        "{stderr}"
    );
}
