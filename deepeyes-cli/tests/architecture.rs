//! `docs/ARCHITECTURE.md` draws the dependency graph of the workspace's crates; this test holds
//! the drawing to what the manifests say (`cargo metadata`), edge for edge.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The normal (non-dev, non-build) dependency edges between `deepeyes-*` packages.
fn manifest_edges() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut edges = BTreeSet::new();
    for package in meta["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        if !name.starts_with("deepeyes-") {
            continue;
        }
        for dep in package["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if dep_name.starts_with("deepeyes-") && dep["kind"].is_null() {
                edges.insert((name.to_string(), dep_name.to_string()));
            }
        }
    }
    edges
}

/// The edges of the mermaid graph in `docs/ARCHITECTURE.md` (`deepeyes_a --> deepeyes_b`).
fn drawn_edges() -> BTreeSet<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let graph = text
        .split("```mermaid")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has a mermaid crate graph");
    graph
        .lines()
        .filter_map(|line| line.trim().split_once("-->"))
        .map(|(from, to)| {
            let name = |id: &str| id.trim().replace('_', "-");
            (name(from), name(to))
        })
        .collect()
}

#[test]
fn the_architecture_drawing_has_exactly_the_manifests_edges() {
    let manifests = manifest_edges();
    let drawn = drawn_edges();
    assert!(
        manifests.contains(&("deepeyes-cli".into(), "deepeyes-rl".into())),
        "cargo metadata was read: {manifests:?}"
    );
    let missing: Vec<_> = manifests.difference(&drawn).collect();
    let extra: Vec<_> = drawn.difference(&manifests).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/ARCHITECTURE.md misses {missing:?} and draws {extra:?}, which no Cargo.toml has"
    );
}

#[test]
fn the_rl_crate_reaches_tools_and_rewards_only_through_core() {
    let edges = manifest_edges();
    for forbidden in ["deepeyes-tools", "deepeyes-reward"] {
        assert!(
            !edges.contains(&("deepeyes-rl".into(), forbidden.into())),
            "deepeyes-rl depends on {forbidden}"
        );
    }
}
