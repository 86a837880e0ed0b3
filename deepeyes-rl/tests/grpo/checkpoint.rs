//! Checkpoints: round trip, RNG continuation, damage detection, crash leftovers, pruning.

use std::collections::BTreeMap;

use deepeyes_core::Rng;
use deepeyes_rl::TrainConfig;
use deepeyes_rl::checkpoint::{
    CONFIG_FILE, Checkpoint, CheckpointWriter, DataCursor, MANIFEST_FILE, TrainState,
    latest_intact, list_checkpoints, prune_checkpoints, write_file_atomic,
};
use deepeyes_rl::metrics::ToolCollapseDetector;

fn state(step: u64, rng: &Rng) -> TrainState {
    let mut detector = ToolCollapseDetector::new(0.1, 5);
    detector.observe(0, 0.0);
    TrainState {
        step,
        rngs: BTreeMap::from([("data".to_string(), rng.clone())]),
        data_cursor: DataCursor {
            epoch: 1,
            position: 42,
        },
        extra: serde_json::json!({ "tool_collapse": detector }),
    }
}

fn config_text() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/train/example.toml");
    TrainConfig::load(&path).unwrap().to_toml_string().unwrap()
}

#[test]
fn round_trip_continues_the_rng_exactly() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    for _ in 0..5 {
        rng.next_u64();
    }
    let weights: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut w = CheckpointWriter::begin(root.path(), 16).unwrap();
    w.add_bytes("model.safetensors", &weights).unwrap();
    w.add_with("optimizer.bin", |out| {
        for chunk in weights.chunks(1000) {
            out.write_all(chunk)?;
        }
        Ok(())
    })
    .unwrap();
    let dir = w.commit(&state(16, &rng), &config_text()).unwrap();
    assert!(dir.ends_with("step-00000016"));

    let ckpt = latest_intact(root.path()).unwrap().0.unwrap();
    assert_eq!(ckpt.dir(), dir);
    assert_eq!(ckpt.state().step, 16);
    assert_eq!(
        ckpt.state().data_cursor,
        DataCursor {
            epoch: 1,
            position: 42
        }
    );
    assert_eq!(
        ckpt.blob_names().collect::<Vec<_>>(),
        vec!["model.safetensors", "optimizer.bin"]
    );
    assert_eq!(ckpt.read_blob("optimizer.bin").unwrap(), weights);
    ckpt.verify_blob("model.safetensors").unwrap();
    let mut restored = ckpt.state().rngs["data"].clone();
    assert_eq!(
        (0..8).map(|_| restored.next_u64()).collect::<Vec<_>>(),
        (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
    );
    let detector: ToolCollapseDetector =
        serde_json::from_value(ckpt.state().extra["tool_collapse"].clone()).unwrap();
    assert_eq!(detector.consecutive_below(), 1);
    let cfg = TrainConfig::from_toml_str(&ckpt.config_toml().unwrap(), "ckpt").unwrap();
    assert_eq!(cfg.steps, 80);
    assert!(
        ckpt.read_blob("nope")
            .unwrap_err()
            .to_string()
            .contains("model.safetensors, optimizer.bin")
    );
}

#[test]
fn damage_is_reported_by_name() {
    let root = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::begin(root.path(), 1).unwrap();
    w.add_bytes("model.safetensors", b"0123456789").unwrap();
    let dir = w.commit(&TrainState::new(1), "x = 1\n").unwrap();

    // Same size, different content: caught when read.
    std::fs::write(dir.join("model.safetensors"), b"0123456780").unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let err = ckpt.read_blob("model.safetensors").unwrap_err();
    assert!(
        err.to_string().contains("model.safetensors is damaged"),
        "{err}"
    );
    assert!(ckpt.verify_blob("model.safetensors").is_err());

    // Truncated: caught when opened.
    std::fs::write(dir.join("model.safetensors"), b"0123").unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("is 4 bytes"), "{err}");

    // Config edited behind the manifest's back.
    std::fs::write(dir.join("model.safetensors"), b"0123456789").unwrap();
    std::fs::write(dir.join("config.toml"), b"x = 2\n").unwrap();
    assert!(Checkpoint::open(&dir).unwrap().config_toml().is_err());

    // Another format version.
    let manifest = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    std::fs::write(
        dir.join(MANIFEST_FILE),
        manifest.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("format version 99"), "{err}");

    std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(
        err.to_string().contains("not a finished checkpoint"),
        "{err}"
    );
}

#[test]
fn unfinished_writes_leave_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let mut w = CheckpointWriter::begin(root.path(), 1).unwrap();
    w.add_bytes("a.bin", b"a").unwrap();
    w.commit(&TrainState::new(1), "").unwrap();

    // A writer dropped mid-way (an error in the engine's serialiser) removes its folder.
    let mut w = CheckpointWriter::begin(root.path(), 2).unwrap();
    let err = w
        .add_with("b.bin", |_| Err(std::io::Error::other("disk full")))
        .unwrap_err();
    assert!(err.to_string().contains("disk full"));
    drop(w);
    // A killed process leaves its temporary folder: ignored by readers, removed by the next
    // writer.
    std::fs::create_dir(root.path().join(".tmp-step-00000003-999")).unwrap();
    std::fs::write(root.path().join(".tmp-step-00000003-999/a.bin"), b"partial").unwrap();
    assert_eq!(
        latest_intact(root.path()).unwrap().0.unwrap().state().step,
        1
    );
    assert_eq!(list_checkpoints(root.path()).unwrap().len(), 1);
    let w = CheckpointWriter::begin(root.path(), 4).unwrap();
    drop(w);
    let names: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000001"]);

    // A damaged newest checkpoint falls back to the previous one.
    let mut w = CheckpointWriter::begin(root.path(), 5).unwrap();
    w.add_bytes("a.bin", b"abc").unwrap();
    let dir5 = w.commit(&TrainState::new(5), "").unwrap();
    std::fs::write(dir5.join("a.bin"), b"a").unwrap();
    assert_eq!(
        latest_intact(root.path()).unwrap().0.unwrap().state().step,
        1
    );
}

#[test]
fn replace_prune_and_validation() {
    let root = tempfile::tempdir().unwrap();
    for step in [1, 2, 3, 3] {
        let mut w = CheckpointWriter::begin(root.path(), step).unwrap();
        w.add_bytes("a.bin", format!("{step}").as_bytes()).unwrap();
        w.commit(&TrainState::new(step), "").unwrap();
    }
    let steps: Vec<u64> = list_checkpoints(root.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(prune_checkpoints(root.path(), 0).unwrap().is_empty());
    assert_eq!(prune_checkpoints(root.path(), 2).unwrap().len(), 1);
    assert_eq!(list_checkpoints(root.path()).unwrap()[0].0, 2);

    let mut w = CheckpointWriter::begin(root.path(), 9).unwrap();
    for bad in ["", ".hidden", "a/b", "manifest.json", "config.toml", "x y"] {
        assert!(w.add_bytes(bad, b"").is_err(), "{bad:?} accepted");
    }
    w.add_bytes("ok.bin", b"").unwrap();
    assert!(
        w.add_bytes("ok.bin", b"")
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    let err = w.commit(&TrainState::new(8), "").unwrap_err();
    assert!(err.to_string().contains("step 9"), "{err}");
    assert!(
        list_checkpoints(&root.path().join("absent"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn atomic_file_write_replaces_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.txt");
    write_file_atomic(&path, b"one").unwrap();
    write_file_atomic(&path, b"two").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Writes checkpoints 1 and 2 with a weights blob, an optimizer blob and a config.
fn two_checkpoints(root: &std::path::Path) -> std::path::PathBuf {
    let mut newest = std::path::PathBuf::new();
    for step in [1, 2] {
        let mut w = CheckpointWriter::begin(root, step).unwrap();
        w.add_bytes("model.safetensors", &vec![step as u8; 4096])
            .unwrap();
        std::fs::write(w.dir().join("tokenizer.json"), b"{\"model\": {}}").unwrap();
        w.adopt("tokenizer.json").unwrap();
        w.add_bytes("optimizer.bpk", b"moments").unwrap();
        newest = w.commit(&TrainState::new(step), "steps = 2\n").unwrap();
    }
    newest
}

#[test]
fn any_damaged_file_of_the_newest_checkpoint_falls_back_to_the_previous() {
    let names = [
        "model.safetensors",
        "tokenizer.json",
        "optimizer.bpk",
        MANIFEST_FILE,
        CONFIG_FILE,
    ];
    for name in names {
        for truncate in [false, true] {
            let root = tempfile::tempdir().unwrap();
            let newest = two_checkpoints(root.path());
            let (intact, skipped) = latest_intact(root.path()).unwrap();
            assert_eq!(intact.unwrap().state().step, 2);
            assert!(skipped.is_empty());

            let path = newest.join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            if truncate {
                bytes.truncate(bytes.len() / 2);
            } else {
                // Same size, one byte changed: only the hash can tell.
                let last = bytes.len() - 2;
                bytes[last] ^= 0x20;
            }
            std::fs::write(&path, &bytes).unwrap();

            let (intact, skipped) = latest_intact(root.path()).unwrap();
            let intact = intact.unwrap_or_else(|| panic!("{name}: nothing intact: {skipped:?}"));
            assert_eq!(intact.state().step, 1, "{name} (truncated: {truncate})");
            assert_eq!(skipped.len(), 1, "{name}");
            assert_eq!(skipped[0].dir, newest);
            assert!(!skipped[0].reason.is_empty());
        }
    }
}

#[test]
fn a_checkpoint_of_the_old_format_is_skipped_with_what_to_do() {
    let root = tempfile::tempdir().unwrap();
    let old = root.path().join("step-000004");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("trainer-state.json"), b"{}").unwrap();
    let (intact, skipped) = latest_intact(root.path()).unwrap();
    assert!(intact.is_none());
    assert!(
        skipped[0].reason.contains("--overwrite"),
        "{:?}",
        skipped[0]
    );
}

#[test]
fn a_kill_while_replacing_a_step_keeps_the_good_copy() {
    // Rewriting step 2 moves the good copy aside, then renames the new one into place; a kill
    // between the two leaves only the copy aside, which the next writer puts back.
    let root = tempfile::tempdir().unwrap();
    let newest = two_checkpoints(root.path());
    let aside = root.path().join(".old-step-00000002-4242");
    std::fs::rename(&newest, &aside).unwrap();
    drop(CheckpointWriter::begin(root.path(), 3).unwrap());
    assert!(!aside.exists());
    let (intact, _) = latest_intact(root.path()).unwrap();
    assert_eq!(intact.unwrap().state().step, 2);
}
