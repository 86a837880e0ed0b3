//! Tool plugins through the built `deepeyes` binary: an isolated plugin runs in
//! `deepeyes plugin-host` (the binary is its own host), its crash is the call's tool error, and a
//! disabled plugin is not loaded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use deepeyes_core::Image;

/// The plugin crates these tests load.
const PLUGIN_CRATES: &[&str] = &["crashing-plugin", "wrong-abi-plugin"];

/// Builds the plugin crates with the cargo, profile and target directory that built this test
/// (once) and returns the directory holding the libraries.
fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // <target>/[<triple>/]<profile>/deps/plugins_cli-<hash>
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let root = profile_dir
            .ancestors()
            .find(|p| p.join("CACHEDIR.TAG").exists())
            .unwrap_or_else(|| profile_dir.parent().unwrap())
            .to_path_buf();
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args(["build", "--profile", &profile, "--target-dir"])
            .arg(&root)
            .env_remove("CARGO_TARGET_DIR");
        let triple_dir = profile_dir.parent().unwrap();
        if triple_dir != root {
            cmd.arg("--target").arg(triple_dir.file_name().unwrap());
        }
        for krate in PLUGIN_CRATES {
            cmd.args(["-p", krate]);
        }
        let out = cmd.output().expect("running cargo build");
        assert!(
            out.status.success(),
            "building the plugin crates failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    })
}

fn plugin(krate: &str) -> PathBuf {
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        krate.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    plugin_dir().join(file)
}

fn deepeyes(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepeyes"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("DEEPEYES_PLUGIN_HOST")
        .output()
        .expect("running deepeyes")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A tools config in `dir` with one plugin table, and a small input image.
fn setup(dir: &Path, plugin_table: &str) -> (PathBuf, PathBuf) {
    let config = dir.join("tools.toml");
    std::fs::write(&config, format!("[[plugins]]\n{plugin_table}\n")).unwrap();
    let image = dir.join("input.png");
    Image::from_raw(8, 6, vec![7; 8 * 6 * 3])
        .unwrap()
        .save_png(&image)
        .unwrap();
    (config, image)
}

fn call(config: &Path, image: &Path, args: &str) -> Output {
    deepeyes(&[
        "tools",
        "call",
        "crashing_tool",
        "--config",
        config.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--args",
        args,
    ])
}

#[test]
fn an_isolated_plugin_runs_in_deepeyes_itself_and_its_crash_is_a_tool_error() {
    let dir = tempfile::tempdir().unwrap();
    let lib = plugin("crashing-plugin").display().to_string();
    let (config, image) = setup(
        dir.path(),
        &format!("path = {lib:?}\nisolate = true\ntimeout-secs = 1\n"),
    );
    let out = call(&config, &image, r#"{"mode": "ok"}"#);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(r#""text":"call 1 in process "#), "{stdout}");

    for (mode, error) in [
        (
            "segfault",
            "crashing_tool crashed: its plugin process was killed by signal 11 (SIGSEGV); it is restarted for the next call",
        ),
        (
            "hang",
            "crashing_tool timed out: its plugin process did not answer within 1 s and was killed; it is restarted for the next call",
        ),
    ] {
        let out = call(&config, &image, &format!(r#"{{"mode": "{mode}"}}"#));
        assert_eq!(out.status.code(), Some(2), "{mode}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("{{\"ok\":false,\"error\":\"{error}\"}}\n"),
            "{mode}"
        );
    }
}

#[test]
fn a_disabled_plugin_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let broken = plugin("wrong-abi-plugin").display().to_string();
    for table in [
        format!("path = {broken:?}\nenabled = false"),
        "path = \"/no/such/libplugin.so\"\nenabled = false\nisolate = true".to_string(),
    ] {
        let (config, _) = setup(dir.path(), &table);
        let out = deepeyes(&["tools", "list", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{table}: {}", text(&out.stderr));
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = listing["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["image_zoom_in_tool", "image_rotate_tool"],
            "{table}"
        );
    }
    // Enabled, the same broken library is refused, by name.
    let (config, _) = setup(dir.path(), &format!("path = {broken:?}\nisolate = true"));
    let out = deepeyes(&["tools", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("wrong_abi_plugin") && err.contains("ABI version 2.0"),
        "{err}"
    );
}
