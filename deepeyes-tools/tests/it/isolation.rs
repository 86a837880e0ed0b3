//! Plugins that take their process down (segfault, abort, hang, runaway allocation) run isolated
//! in a plugin host process, and the in-process timeout.

use std::time::{Duration, Instant};

use deepeyes_core::{PreprocessConfig, Tool, ToolContext, ToolError, ToolOutput};
use deepeyes_tools::{
    Error, IsolateOptions, IsolatedTool, LoadedPlugin, PluginConfig, PluginError, PluginLimits,
    ToolRegistry, ToolsConfig,
};
use serde_json::{Value, json};

use crate::support::{pattern, plugin, test_host, use_test_host};

fn call(tool: &dyn Tool, args: Value) -> Result<ToolOutput, ToolError> {
    let images = [pattern(64, 48)];
    let pre = PreprocessConfig::default();
    tool.call(
        &args,
        &ToolContext {
            original_images: &images,
            preprocess: &pre,
        },
    )
}

fn options(timeout: Duration, memory_mib: u64) -> IsolateOptions {
    IsolateOptions {
        limits: PluginLimits::default(),
        timeout,
        memory_limit_bytes: Some(memory_mib << 20),
        host: Some(test_host()),
    }
}

/// `crashing_tool` in a host process: 1 s per call, 1 GiB of address space.
fn crashing() -> IsolatedTool {
    IsolatedTool::start(
        plugin("crashing-plugin"),
        &Value::Null,
        options(Duration::from_secs(1), 1024),
    )
    .unwrap()
}

fn ok_text(tool: &dyn Tool) -> String {
    call(tool, json!({"mode": "ok"}))
        .unwrap()
        .text
        .expect("ok mode answers with text")
}

/// Runs `mode`, which must kill the child with a tool error, then checks the next call runs in
/// a fresh child. Returns the error.
fn survives(tool: &IsolatedTool, mode: &str) -> String {
    let first = tool.child_id().expect("a child runs");
    assert_eq!(ok_text(tool), format!("call 1 in process {first}"));
    let restarts = tool.restarts();
    let err = call(tool, json!({ "mode": mode })).unwrap_err().message;
    assert_eq!(tool.child_id(), None, "the dead child is gone");
    let text = ok_text(tool);
    let second = tool.child_id().expect("a fresh child runs");
    assert_ne!(first, second);
    assert_eq!(text, format!("call 1 in process {second}"));
    assert_eq!(tool.restarts(), restarts + 1);
    assert_ne!(second, std::process::id());
    err
}

#[test]
fn a_segfault_kills_only_the_plugin_process() {
    let tool = crashing();
    assert_eq!(
        survives(&tool, "segfault"),
        "crashing_tool crashed: its plugin process was killed by signal 11 (SIGSEGV); it is restarted for the next call"
    );
}

#[test]
fn an_abort_kills_only_the_plugin_process() {
    let tool = crashing();
    assert_eq!(
        survives(&tool, "abort"),
        "crashing_tool crashed: its plugin process was killed by signal 6 (SIGABRT); it is restarted for the next call"
    );
}

#[test]
fn a_hanging_call_times_out_and_the_process_is_killed() {
    let tool = IsolatedTool::start(
        plugin("crashing-plugin"),
        &Value::Null,
        options(Duration::from_millis(500), 1024),
    )
    .unwrap();
    let start = Instant::now();
    let err = survives(&tool, "hang");
    let elapsed = start.elapsed();
    assert_eq!(
        err,
        "crashing_tool timed out: its plugin process did not answer within 0.5 s and was killed; it is restarted for the next call"
    );
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // A call under the timeout is untouched.
    assert_eq!(
        call(&tool, json!({"mode": "sleep", "ms": 50}))
            .unwrap()
            .text
            .as_deref(),
        Some("slept 50 ms")
    );
}

#[test]
fn a_runaway_allocation_hits_the_memory_cap() {
    let tool = IsolatedTool::start(
        plugin("crashing-plugin"),
        &Value::Null,
        options(Duration::from_secs(5), 256),
    )
    .unwrap();
    let err = survives(&tool, "allocate");
    // Which allocation fails first (a block, or something else near the cap) varies.
    let (head, tail) = err
        .split_once(" bytes failed)")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        head.starts_with("crashing_tool ran out of memory: its plugin process hit its memory cap of 256 MiB (memory allocation of ")
            && head.rsplit(' ').next().is_some_and(|n| n.parse::<u64>().is_ok()),
        "{err}"
    );
    assert_eq!(
        tail,
        " and was killed by signal 6 (SIGABRT); it is restarted for the next call"
    );
}

#[test]
fn isolated_results_and_errors_equal_in_process_ones() {
    let grid = plugin("grid-overlay-plugin");
    let inside = LoadedPlugin::load(&grid)
        .unwrap()
        .instantiate(&Value::Null, PluginLimits::default())
        .unwrap();
    let outside =
        IsolatedTool::start(&grid, &Value::Null, options(Duration::from_secs(5), 1024)).unwrap();
    assert_eq!(outside.spec(), inside.spec());
    assert_eq!(outside.plugin_version(), env!("CARGO_PKG_VERSION"));
    let a = call(&inside, json!({"step": 16})).unwrap();
    let b = call(&outside, json!({"step": 16})).unwrap();
    assert_eq!((a.text, a.images), (b.text, b.images));
    assert_eq!(
        call(&outside, json!({"step": 2})).unwrap_err(),
        call(&inside, json!({"step": 2})).unwrap_err()
    );

    // Panics and over-limit outputs read the same, and a panic does not cost the process.
    let limits = PluginLimits {
        max_text_bytes: 64,
        ..PluginLimits::default()
    };
    let lib = plugin("misbehaving-plugin");
    let inside = LoadedPlugin::load(&lib)
        .unwrap()
        .instantiate(&Value::Null, limits)
        .unwrap();
    let outside = IsolatedTool::start(
        &lib,
        &Value::Null,
        IsolateOptions {
            limits,
            ..options(Duration::from_secs(5), 1024)
        },
    )
    .unwrap();
    let pid = outside.child_id();
    for args in [
        json!({"mode": "panic"}),
        json!({"mode": "huge-text", "bytes": 65}),
        json!({"mode": "bad-args"}),
        json!({"mode": "echo-image"}),
        json!({"mode": "ok"}),
    ] {
        let a = call(&inside, args.clone());
        let b = call(&outside, args.clone());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!((a.text, a.images), (b.text, b.images), "{args}"),
            (Err(a), Err(b)) => assert_eq!(a, b, "{args}"),
            (a, b) => panic!("{args}: in process {a:?}, isolated {b:?}"),
        }
    }
    assert_eq!(outside.child_id(), pid);
    assert_eq!(outside.restarts(), 0);
}

#[test]
fn isolated_load_errors_name_the_plugin() {
    let lib = plugin("wrong-abi-plugin");
    let err =
        IsolatedTool::start(&lib, &Value::Null, options(Duration::from_secs(5), 1024)).unwrap_err();
    let PluginError::InHost { message, .. } = &err else {
        panic!("expected the host's loader error, got {err}");
    };
    assert_eq!(
        message,
        &LoadedPlugin::load(&lib).unwrap_err().to_string(),
        "the same error as in process"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("wrong_abi_plugin") && msg.contains("ABI version 2.0"),
        "{msg}"
    );
    let err = IsolatedTool::start(
        "/no/such/libplugin.so",
        &Value::Null,
        options(Duration::from_secs(5), 1024),
    )
    .unwrap_err();
    assert!(matches!(err, PluginError::NotFound { .. }), "{err}");
}

fn registry_from(dir: &std::path::Path, plugins: &str) -> deepeyes_tools::Result<ToolRegistry> {
    let file = dir.join("tools.toml");
    std::fs::write(&file, plugins).unwrap();
    ToolRegistry::from_config(&ToolsConfig::from_toml_file(&file)?)
}

#[test]
fn isolation_is_configured_per_plugin_in_toml() {
    use_test_host();
    let dir = tempfile::tempdir().unwrap();
    let lib = plugin("crashing-plugin").display().to_string();
    let registry = registry_from(
        dir.path(),
        &format!(
            "[[plugins]]\npath = {lib:?}\nisolate = true\ntimeout-secs = 0.5\nmemory-limit-mib = 512\n"
        ),
    )
    .unwrap();
    let tool = registry.get("crashing_tool").unwrap();
    let text = ok_text(&*tool);
    assert!(
        text.starts_with("call 1 in process") && !text.ends_with(&std::process::id().to_string()),
        "{text}"
    );
    let err = call(&*tool, json!({"mode": "hang"})).unwrap_err().message;
    assert!(err.contains("did not answer within 0.5 s"), "{err}");
    assert!(ok_text(&*tool).starts_with("call 1 in process"));

    for (extra, key, reason) in [
        (
            "timeout-secs = 0",
            "timeout-secs",
            "positive number of seconds",
        ),
        (
            "timeout-secs = -1",
            "timeout-secs",
            "positive number of seconds",
        ),
        (
            "memory-limit-mib = 64",
            "memory-limit-mib",
            "only to isolated plugins",
        ),
        (
            "isolate = true\nmemory-limit-mib = 0",
            "memory-limit-mib",
            "positive number of MiB",
        ),
    ] {
        let err = registry_from(
            dir.path(),
            &format!("[[plugins]]\npath = {lib:?}\n{extra}\n"),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("crashing_plugin") && msg.contains(key) && msg.contains(reason),
            "{extra}: {msg}"
        );
    }
}

#[test]
fn a_disabled_plugin_loads_nothing() {
    use_test_host();
    let dir = tempfile::tempdir().unwrap();
    // A library that would fail to load, and a path with nothing behind it, in and out of
    // process: disabled, none is opened, and no tool appears.
    let broken = plugin("wrong-abi-plugin").display().to_string();
    for path in [broken.as_str(), "/no/such/libplugin.so"] {
        for isolate in [false, true] {
            let toml =
                format!("[[plugins]]\npath = {path:?}\nenabled = false\nisolate = {isolate}\n");
            let registry = registry_from(dir.path(), &toml).unwrap();
            assert_eq!(
                registry.names(),
                ["image_zoom_in_tool", "image_rotate_tool"],
                "{toml}"
            );
            let enabled = toml.replace("enabled = false", "enabled = true");
            assert!(registry_from(dir.path(), &enabled).is_err(), "{enabled}");
        }
    }
    // Through the registry's own API too.
    let mut registry = ToolRegistry::new();
    let mut config = PluginConfig::new(plugin("wrong-abi-plugin"));
    config.enabled = false;
    registry.load_plugin(&config).unwrap();
    assert!(registry.is_empty());
}

#[test]
fn an_in_process_call_past_its_timeout_is_abandoned() {
    let tool = LoadedPlugin::load(plugin("crashing-plugin"))
        .unwrap()
        .instantiate(&Value::Null, PluginLimits::default())
        .unwrap()
        .with_timeout(Some(Duration::from_millis(300)));
    let pid = std::process::id();
    assert_eq!(ok_text(&tool), format!("call 1 in process {pid}"));
    let start = Instant::now();
    let err = call(&tool, json!({"mode": "sleep", "ms": 3000})).unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(
        err.message,
        "crashing_tool timed out after 0.3 s; the call was abandoned and the tool restarted"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(2000),
        "{elapsed:?}"
    );
    assert_eq!(tool.restarts(), 1);
    // A fresh instance answers at once, while the abandoned call still sleeps on its thread.
    let start = Instant::now();
    assert_eq!(ok_text(&tool), format!("call 1 in process {pid}"));
    assert!(start.elapsed() < Duration::from_millis(300));
}
