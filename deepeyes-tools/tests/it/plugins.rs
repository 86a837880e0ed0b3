//! Loading real plugin libraries: the example, and the deliberately broken ones.

use std::sync::Arc;

use deepeyes_core::{PreprocessConfig, Tool, ToolContext, ToolError, ToolOutput};
use deepeyes_tools::{
    Error, LoadedPlugin, PluginConfig, PluginError, PluginLimits, ToolOrigin, ToolRegistry,
    ToolsConfig,
};
use serde_json::{Value, json};

use crate::support::{pattern, plugin};

fn call(tool: &dyn Tool, args: Value) -> Result<ToolOutput, ToolError> {
    let images = [pattern(320, 240)];
    let pre = PreprocessConfig::default();
    tool.call(
        &args,
        &ToolContext {
            original_images: &images,
            preprocess: &pre,
        },
    )
}

fn load_err(krate: &str) -> PluginError {
    LoadedPlugin::load(plugin(krate)).expect_err("the plugin must be refused")
}

#[test]
fn example_plugin_loads_lists_and_runs() {
    let path = plugin("grid-overlay-plugin");
    let mut config = ToolsConfig::default();
    config.plugins.push(PluginConfig::new(&path));
    let registry = ToolRegistry::from_config(&config).unwrap();
    assert_eq!(
        registry.names(),
        [
            "image_zoom_in_tool",
            "image_rotate_tool",
            "image_grid_overlay_tool"
        ]
    );
    let info = registry.infos().pop().unwrap();
    assert_eq!(
        info.origin,
        ToolOrigin::Plugin {
            path: path.canonicalize().unwrap()
        }
    );
    assert!(info.enabled);
    assert!(info.spec.description.contains("coordinate grid"));
    assert_eq!(
        info.spec.parameters["properties"]["step"]["type"],
        "integer"
    );
    let offered: Vec<String> = registry.specs().into_iter().map(|s| s.name).collect();
    assert_eq!(offered, ["image_zoom_in_tool", "image_grid_overlay_tool"]);

    let tool = registry.get("image_grid_overlay_tool").unwrap();
    let out = call(&*tool, json!({"step": 100})).unwrap();
    assert_eq!(
        out.text.as_deref(),
        Some("Grid lines every 100 px over the 320×240 image: x = 100 to 300, y = 100 to 200.")
    );
    assert_eq!((out.images[0].width(), out.images[0].height()), (320, 240));
    let err = call(&*tool, json!({"step": 2})).unwrap_err();
    assert!(
        err.message
            .starts_with("invalid arguments for image_grid_overlay_tool"),
        "{err}"
    );

    let plugin = LoadedPlugin::load(&path).unwrap();
    assert!(plugin.thread_safe());
    assert_eq!(plugin.plugin_version(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn thread_safe_plugin_runs_concurrently() {
    let plugin = LoadedPlugin::load(plugin("grid-overlay-plugin")).unwrap();
    let tool = Arc::new(
        plugin
            .instantiate(&Value::Null, PluginLimits::default())
            .unwrap(),
    );
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let tool = Arc::clone(&tool);
            std::thread::spawn(move || {
                for _ in 0..5 {
                    assert_eq!(call(&*tool, json!({})).unwrap().images.len(), 1);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn a_plugin_cannot_take_a_used_name() {
    let path = plugin("grid-overlay-plugin");
    let mut registry = ToolRegistry::from_config(&ToolsConfig::default()).unwrap();
    registry.load_plugin(&PluginConfig::new(&path)).unwrap();
    let err = registry.load_plugin(&PluginConfig::new(&path)).unwrap_err();
    let Error::Plugin(PluginError::DuplicateName { name, .. }) = &err else {
        panic!("expected a duplicate name, got {err}");
    };
    assert_eq!(name, "image_grid_overlay_tool");
    assert!(err.to_string().contains("grid_overlay_plugin"), "{err}");
    assert_eq!(registry.len(), 3);
}

#[test]
fn wrong_abi_version_is_refused() {
    let err = load_err("wrong-abi-plugin");
    assert!(
        matches!(
            err,
            PluginError::AbiMismatch {
                plugin_major: 2,
                plugin_minor: 0,
                host_major: 1,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("wrong_abi_plugin") && msg.contains("ABI version 2.0"),
        "{msg}"
    );
}

#[test]
fn missing_symbol_is_refused() {
    let err = load_err("missing-symbol-plugin");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            PluginError::MissingSymbol {
                symbol: "deepeyes_tool_plugin_v1",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("missing_symbol_plugin"), "{msg}");
}

#[test]
fn bad_descriptor_is_refused() {
    let err = load_err("bad-descriptor-plugin");
    let msg = err.to_string();
    assert!(matches!(err, PluginError::BadDescriptor { .. }), "{msg}");
    assert!(msg.contains("struct_size is 16"), "{msg}");
}

#[test]
fn not_a_library_and_not_found_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnotes.so");
    std::fs::write(&fake, "just some notes").unwrap();
    let err = LoadedPlugin::load(&fake).unwrap_err();
    assert!(matches!(err, PluginError::Open { .. }), "{err}");
    assert!(err.to_string().contains("libnotes.so"), "{err}");
    let err = LoadedPlugin::load(dir.path().join("libmissing.so")).unwrap_err();
    assert!(matches!(err, PluginError::NotFound { .. }), "{err}");
}

fn misbehaving(
    config: Value,
    limits: PluginLimits,
) -> Result<deepeyes_tools::DynTool, PluginError> {
    LoadedPlugin::load(plugin("misbehaving-plugin"))
        .unwrap()
        .instantiate(&config, limits)
}

#[test]
fn a_panicking_call_is_an_error_and_the_host_keeps_running() {
    let tool = misbehaving(json!({"greeting": "hello"}), PluginLimits::default()).unwrap();
    assert_eq!(
        call(&tool, json!({"mode": "ok"})).unwrap().text.as_deref(),
        Some("hello (call 1 of this instance)")
    );
    let err = call(&tool, json!({"mode": "panic"})).unwrap_err();
    assert_eq!(
        err.message,
        "misbehaving_tool crashed: the tool panicked: deliberate panic in misbehaving_tool"
    );
    assert_eq!(tool.restarts(), 1);
    // The instance was recreated with the same configuration.
    assert_eq!(
        call(&tool, json!({"mode": "ok"})).unwrap().text.as_deref(),
        Some("hello (call 1 of this instance)")
    );
}

#[test]
fn oversized_outputs_are_reported() {
    // Default limit: 1 MiB of text; the plugin sends 2 MiB.
    let tool = misbehaving(Value::Null, PluginLimits::default()).unwrap();
    let err = call(&tool, json!({"mode": "huge-text"})).unwrap_err();
    assert_eq!(
        err.message,
        "misbehaving_tool returned an output that is too large: its text output is 2097152 bytes, over the limit of 1048576 bytes"
    );
    let limits = PluginLimits {
        max_image_pixels: 32 * 32,
        ..PluginLimits::default()
    };
    let tool = misbehaving(Value::Null, limits).unwrap();
    assert!(call(&tool, json!({"mode": "huge-image", "side": 32})).is_ok());
    let err = call(&tool, json!({"mode": "huge-image", "side": 33})).unwrap_err();
    assert!(
        err.message
            .contains("33×33 = 1089 pixels, over the limit of 1024"),
        "{err}"
    );
    assert_eq!(
        call(&tool, json!({"mode": "ok"})).unwrap().text.as_deref(),
        Some("ok (call 3 of this instance)")
    );
}

#[test]
fn error_statuses_reach_the_model_as_text() {
    let tool = misbehaving(Value::Null, PluginLimits::default()).unwrap();
    for (mode, message) in [
        ("fail", "deliberate failure"),
        (
            "bad-args",
            "invalid arguments for misbehaving_tool: this mode always refuses its arguments",
        ),
        (
            "unsupported",
            "misbehaving_tool does not support this: nothing is supported here",
        ),
    ] {
        assert_eq!(
            call(&tool, json!({ "mode": mode })).unwrap_err().message,
            message
        );
    }
    let out = call(&tool, json!({"mode": "echo-image"})).unwrap();
    assert_eq!(out.text.as_deref(), Some("320x240 first pixel [0, 0, 0]"));
    assert_eq!(out.images[0], pattern(320, 240));
}

#[test]
fn failing_create_is_a_typed_error() {
    let err = misbehaving(json!({"fail-create": true}), PluginLimits::default()).unwrap_err();
    assert!(matches!(err, PluginError::Create { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("misbehaving_plugin") && msg.contains("fail-create is set"),
        "{msg}"
    );
    let msg = misbehaving(json!({"panic-create": true}), PluginLimits::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("the tool panicked: panicking in create as configured"),
        "{msg}"
    );
}

#[test]
fn invalid_utf8_and_inconsistent_images_are_reported() {
    let plugin = LoadedPlugin::load(plugin("raw-plugin")).unwrap();
    let tool = plugin
        .instantiate(&Value::Null, PluginLimits::default())
        .unwrap();
    let err = call(&tool, json!({})).unwrap_err();
    assert!(
        err.message
            .starts_with("raw_tool returned text that is not valid UTF-8"),
        "{err}"
    );
    let err = call(&tool, json!({"mode": "bad-image"})).unwrap_err();
    assert_eq!(
        err.message,
        "raw_tool returned a 4×4 RGB image with 10 bytes instead of 48"
    );
    // The host is unharmed: other plugins still work.
    let grid = LoadedPlugin::load(crate::support::plugin("grid-overlay-plugin")).unwrap();
    let grid = grid
        .instantiate(&Value::Null, PluginLimits::default())
        .unwrap();
    assert!(call(&grid, json!({})).is_ok());
}

#[test]
fn plugins_configured_from_toml() {
    let dir = tempfile::tempdir().unwrap();
    let lib = plugin("misbehaving-plugin");
    let file = dir.path().join("tools.toml");
    std::fs::write(
        &file,
        format!(
            "[rotate]\nenabled = true\n\n[[plugins]]\npath = {:?}\nconfig = {{ greeting = \"configured\" }}\nlimits = {{ max-text-bytes = 64 }}\n",
            lib.display().to_string()
        ),
    )
    .unwrap();
    let registry = ToolRegistry::from_config(&ToolsConfig::from_toml_file(&file).unwrap()).unwrap();
    assert_eq!(registry.specs().len(), 3);
    let tool = registry.get("misbehaving_tool").unwrap();
    assert_eq!(
        call(&*tool, json!({"mode": "ok"})).unwrap().text.as_deref(),
        Some("configured (call 1 of this instance)")
    );
    let err = call(&*tool, json!({"mode": "huge-text", "bytes": 65})).unwrap_err();
    assert!(err.message.contains("over the limit of 64 bytes"), "{err}");
}
