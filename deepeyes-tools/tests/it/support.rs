//! Building the plugin crates once per test run, and small shared helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use deepeyes_core::Image;
use deepeyes_tools::PluginHost;

/// Every plugin crate the tests load.
const PLUGIN_CRATES: &[&str] = &[
    "grid-overlay-plugin",
    "misbehaving-plugin",
    "raw-plugin",
    "wrong-abi-plugin",
    "missing-symbol-plugin",
    "bad-descriptor-plugin",
    "crashing-plugin",
];

/// Where cargo puts this test binary's artifacts: `(target root, profile dir, target triple)`.
fn layout() -> (PathBuf, PathBuf, Option<String>) {
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/[<triple>/]<profile>/deps/it-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <profile>/deps")
        .to_path_buf();
    let root = profile_dir
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| profile_dir.parent().expect("target dir"))
        .to_path_buf();
    let triple_dir = profile_dir.parent().expect("target dir");
    let triple = (triple_dir != root).then(|| {
        triple_dir
            .file_name()
            .expect("triple")
            .to_string_lossy()
            .into_owned()
    });
    (root, profile_dir, triple)
}

/// Builds every plugin crate with the cargo and target directory that built this test (once),
/// and returns the directory holding the libraries.
fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let (root, profile_dir, triple) = layout();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&workspace)
            .arg("build")
            .arg("--profile")
            .arg(&profile)
            .arg("--target-dir")
            .arg(&root)
            .env_remove("CARGO_TARGET_DIR");
        if let Some(triple) = triple {
            cmd.arg("--target").arg(triple);
        }
        for krate in PLUGIN_CRATES {
            cmd.arg("-p").arg(krate);
        }
        let output = cmd
            .output()
            .expect("running cargo build for the plugin crates");
        assert!(
            output.status.success(),
            "building the plugin crates failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir
    })
}

/// The built library of plugin crate `krate`.
pub(crate) fn plugin(krate: &str) -> PathBuf {
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        krate.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let path = plugin_dir().join(file);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A deterministic test image with distinct pixels.
pub(crate) fn pattern(w: u32, h: u32) -> Image {
    let mut raw = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            raw.extend_from_slice(&[(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8]);
        }
    }
    Image::from_raw(w, h, raw).expect("valid size")
}

/// This crate's plugin host binary, as cargo built it for these tests.
pub(crate) fn test_host() -> PluginHost {
    PluginHost::new(env!("CARGO_BIN_EXE_deepeyes-plugin-host"))
}

/// Makes [`test_host`] the default host, for plugins isolated through a registry config (a test
/// binary has no `deepeyes-plugin-host` next to it).
pub(crate) fn use_test_host() {
    PluginHost::set_default(test_host());
}
