//! The tool registry: unique names, built-ins and plugins side by side behind the one
//! [`Tool`] trait, enabled, disabled and configured from TOML.
//!
//! ```toml
//! [zoom-in]
//! frame = "original"        # original | resized | relative | relative-unit
//! min-side = 30
//! max-aspect-ratio = 100
//!
//! [rotate]
//! enabled = true
//!
//! [[plugins]]
//! path = "target/release/libgrid_overlay_plugin.so"   # relative to this file
//! config = { color = [255, 0, 0] }
//! limits = { max-text-bytes = 65536 }
//! timeout-secs = 30         # a call past it is a tool error (default 30)
//! isolate = false           # true: run it in a child process (crash-, hang- and OOM-proof)
//! # memory-limit-mib = 4096 # the child's address-space cap (isolate only)
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deepeyes_core::{Tool, ToolSpec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::plugin::isolate::{DEFAULT_MEMORY_LIMIT_MIB, IsolateOptions, IsolatedTool};
use crate::plugin::{DEFAULT_CALL_TIMEOUT, LoadedPlugin, PluginError, PluginLimits};
use crate::rotate::{RotateConfig, RotateTool};
use crate::zoom::{ZoomInConfig, ZoomInTool};

/// Checks a tool name is usable in a prompt and a JSON call: 1–64 characters from
/// `[A-Za-z0-9_-]`.
pub fn validate_tool_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "tool name '{name}' must be 1 to 64 characters long"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "tool name '{name}' contains '{c}'; only letters, digits, '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// One plugin to load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginConfig {
    /// The shared library. In a TOML file, a relative path is resolved against the file's
    /// directory.
    pub path: PathBuf,
    /// Whether the tool is offered to the model. A disabled plugin is not loaded at all: none of
    /// its code runs, and a registry built from the config does not list it.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Configuration handed to the plugin's `create` as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Limits on the plugin's outputs.
    #[serde(default)]
    pub limits: PluginLimits,
    /// The longest one call may run, in seconds. In process, a call past it is abandoned (its
    /// thread keeps running: only isolation can stop it) and the instance recreated; isolated,
    /// the plugin's process is killed and restarted. Either way the call is a tool error.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Run the plugin in a child process of its own (a plugin host), so that a crash, a hang or
    /// a runaway allocation kills only that process, which is restarted for the next call.
    #[serde(default)]
    pub isolate: bool,
    /// The isolated plugin's address-space cap in MiB (RLIMIT_AS; default 4096). Only with
    /// `isolate = true`.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
}

fn enabled_by_default() -> bool {
    true
}

fn default_timeout_secs() -> f64 {
    DEFAULT_CALL_TIMEOUT.as_secs_f64()
}

impl PluginConfig {
    /// A plugin at `path`, enabled, with no configuration and default limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            enabled: true,
            config: serde_json::Value::Null,
            limits: PluginLimits::default(),
            timeout_secs: default_timeout_secs(),
            isolate: false,
            memory_limit_mib: None,
        }
    }

    /// The per-call timeout, checked.
    pub fn timeout(&self) -> Result<Duration> {
        let secs = self.timeout_secs;
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::config(
                    self.origin("timeout-secs"),
                    format!("must be a positive number of seconds, got {secs}"),
                )
            })
    }

    /// How the plugin runs when isolated, checked.
    pub fn isolate_options(&self) -> Result<IsolateOptions> {
        let mib = self.memory_limit_mib.unwrap_or(DEFAULT_MEMORY_LIMIT_MIB);
        if mib == 0 || mib > (u64::MAX >> 20) {
            return Err(Error::config(
                self.origin("memory-limit-mib"),
                format!("must be a positive number of MiB, got {mib}"),
            ));
        }
        Ok(IsolateOptions {
            limits: self.limits,
            timeout: self.timeout()?,
            memory_limit_bytes: Some(mib << 20),
            host: None,
        })
    }

    fn origin(&self, key: &str) -> String {
        format!("plugin {}: {key}", self.path.display())
    }
}

/// Which tools exist and how they are set up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ToolsConfig {
    /// `image_zoom_in_tool`.
    pub zoom_in: ZoomInConfig,
    /// `image_rotate_tool`.
    pub rotate: RotateConfig,
    /// Plugins, loaded in order.
    pub plugins: Vec<PluginConfig>,
}

impl ToolsConfig {
    /// Parses a TOML config; `origin` names it in errors. Relative plugin paths stay as written.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config(origin, e))
    }

    /// Reads a config from a TOML table embedded in another file (the training config's
    /// `[tools]`); `origin` names it in errors.
    pub fn from_table(table: &toml::Table, origin: &str) -> Result<Self> {
        toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e| Error::config(origin, e))
    }

    /// The tools configuration a model bundle carries in its
    /// [`BUNDLE_TOOLS_FILE`](deepeyes_core::tool::BUNDLE_TOOLS_FILE), if it has one (relative
    /// plugin paths resolved against the bundle's folder).
    pub fn for_bundle(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(deepeyes_core::tool::BUNDLE_TOOLS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_toml_file(path).map(Some)
    }

    /// Reads a TOML config file; relative plugin paths are resolved against its directory.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or_else(|| Path::new(""));
        for plugin in &mut config.plugins {
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
        }
        Ok(config)
    }
}

/// Where a registered tool came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolOrigin {
    /// Shipped with deepeyes-tools.
    BuiltIn,
    /// Loaded from the shared library at `path`.
    Plugin {
        /// The library's absolute path.
        path: PathBuf,
    },
    /// Registered by code through [`ToolRegistry::register`].
    Code,
}

impl fmt::Display for ToolOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BuiltIn => f.write_str("built-in"),
            Self::Plugin { path } => write!(f, "{}", path.display()),
            Self::Code => f.write_str("code"),
        }
    }
}

/// A registered tool, as listed.
#[derive(Debug, Clone)]
pub struct ToolInfo {
    /// The tool's spec (its name is `spec.name`).
    pub spec: ToolSpec,
    /// Where it came from.
    pub origin: ToolOrigin,
    /// Whether it is offered to the model.
    pub enabled: bool,
}

struct Entry {
    tool: Arc<dyn Tool>,
    info: ToolInfo,
}

/// The set of tools an agent can call, by unique name, in registration order.
#[derive(Default)]
pub struct ToolRegistry {
    entries: Vec<Entry>,
}

impl fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| (&e.info.spec.name, e.info.origin.to_string(), e.info.enabled)),
            )
            .finish()
    }
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-ins and plugins `config` describes.
    pub fn from_config(config: &ToolsConfig) -> Result<Self> {
        let mut registry = Self::new();
        let zoom = ZoomInTool::new(&config.zoom_in)?;
        registry.register_as(Arc::new(zoom), ToolOrigin::BuiltIn, config.zoom_in.enabled)?;
        registry.register_as(
            Arc::new(RotateTool::new()),
            ToolOrigin::BuiltIn,
            config.rotate.enabled,
        )?;
        for plugin in &config.plugins {
            registry.load_plugin(plugin)?;
        }
        Ok(registry)
    }

    /// Adds a tool written in Rust, enabled.
    pub fn register(&mut self, tool: Arc<dyn Tool>) -> Result<()> {
        self.register_as(tool, ToolOrigin::Code, true)
    }

    /// Adds a tool with an explicit origin and enabled state.
    pub fn register_as(
        &mut self,
        tool: Arc<dyn Tool>,
        origin: ToolOrigin,
        enabled: bool,
    ) -> Result<()> {
        let spec = tool.spec();
        validate_tool_name(&spec.name).map_err(|reason| Error::InvalidName {
            name: spec.name.clone(),
            reason,
        })?;
        if let Some(existing) = self.find(&spec.name) {
            return Err(Error::DuplicateName {
                name: spec.name,
                existing: existing.info.origin.to_string(),
                new: origin.to_string(),
            });
        }
        self.entries.push(Entry {
            tool,
            info: ToolInfo {
                spec,
                origin,
                enabled,
            },
        });
        Ok(())
    }

    /// Loads a plugin and adds its tool: in this process, or in a plugin host process when
    /// `config.isolate`. A disabled plugin is not loaded at all (none of its code runs, and no
    /// tool is added).
    pub fn load_plugin(&mut self, config: &PluginConfig) -> Result<()> {
        if !config.enabled {
            tracing::debug!(path = %config.path.display(), "plugin disabled: not loaded");
            return Ok(());
        }
        if config.memory_limit_mib.is_some() && !config.isolate {
            return Err(Error::config(
                config.origin("memory-limit-mib"),
                "applies only to isolated plugins (isolate = true)",
            ));
        }
        let (tool, path): (Arc<dyn Tool>, PathBuf) = if config.isolate {
            let tool =
                IsolatedTool::start(&config.path, &config.config, config.isolate_options()?)?;
            let path = tool.path().to_path_buf();
            (Arc::new(tool), path)
        } else {
            let timeout = config.timeout()?;
            let plugin = LoadedPlugin::load(&config.path)?;
            self.refuse_taken_name(plugin.name(), plugin.path())?;
            let tool = plugin.instantiate(&config.config, config.limits)?;
            (
                Arc::new(tool.with_timeout(Some(timeout))),
                plugin.path().to_path_buf(),
            )
        };
        self.refuse_taken_name(&tool.name(), &path)?;
        self.register_as(tool, ToolOrigin::Plugin { path }, true)
    }

    fn refuse_taken_name(&self, name: &str, path: &Path) -> Result<()> {
        match self.find(name) {
            Some(existing) => Err(PluginError::DuplicateName {
                path: path.to_path_buf(),
                name: name.to_string(),
                existing: existing.info.origin.to_string(),
            }
            .into()),
            None => Ok(()),
        }
    }

    fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.info.spec.name == name)
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownTool {
            name: name.to_string(),
            available: self.names().join(", "),
        }
    }

    /// Enables or disables a tool by name.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        match self.entries.iter_mut().find(|e| e.info.spec.name == name) {
            Some(entry) => {
                entry.info.enabled = enabled;
                Ok(())
            }
            None => Err(self.unknown(name)),
        }
    }

    /// A tool by name, enabled or not.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Tool>> {
        self.find(name).map(|e| Arc::clone(&e.tool))
    }

    /// A tool by name, or an error listing the registered names.
    pub fn require(&self, name: &str) -> Result<Arc<dyn Tool>> {
        self.get(name).ok_or_else(|| self.unknown(name))
    }

    /// Every registered name, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.info.spec.name.clone())
            .collect()
    }

    /// Every registered tool's listing, in order.
    pub fn infos(&self) -> Vec<ToolInfo> {
        self.entries.iter().map(|e| e.info.clone()).collect()
    }

    /// The specs of the enabled tools, in order: what the system prompt lists.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.enabled().map(|e| e.info.spec.clone()).collect()
    }

    /// The enabled tools, in order: what [`deepeyes_core::Agent::new`] takes.
    pub fn tools(&self) -> Vec<Arc<dyn Tool>> {
        self.enabled().map(|e| Arc::clone(&e.tool)).collect()
    }

    fn enabled(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.info.enabled)
    }

    /// Number of registered tools.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::CoordinateFrame;
    use deepeyes_core::{FnTool, ToolOutput};

    fn echo(name: &str) -> Arc<dyn Tool> {
        Arc::new(FnTool::new(
            ToolSpec {
                name: name.into(),
                description: "echo".into(),
                parameters: serde_json::json!({"type": "object"}),
            },
            |_, _| Ok(ToolOutput::text("hi")),
        ))
    }

    #[test]
    fn defaults_offer_zoom_in_only() {
        let reg = ToolRegistry::from_config(&ToolsConfig::default()).unwrap();
        assert_eq!(reg.names(), ["image_zoom_in_tool", "image_rotate_tool"]);
        let offered: Vec<String> = reg.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(offered, ["image_zoom_in_tool"]);
        assert_eq!(reg.tools().len(), 1);
        assert!(reg.get("image_rotate_tool").is_some());
        assert!(reg.infos().iter().all(|i| i.origin == ToolOrigin::BuiltIn));
    }

    #[test]
    fn names_are_unique() {
        let mut reg = ToolRegistry::from_config(&ToolsConfig::default()).unwrap();
        let err = reg.register(echo("image_zoom_in_tool")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("image_zoom_in_tool") && msg.contains("built-in"),
            "{msg}"
        );
        reg.register(echo("echo")).unwrap();
        assert!(reg.register(echo("echo")).is_err());
        assert_eq!(reg.len(), 3);
    }

    #[test]
    fn invalid_names_are_refused() {
        let mut reg = ToolRegistry::new();
        for bad in ["", "has space", "quote\"d", &"x".repeat(65)] {
            assert!(
                matches!(reg.register(echo(bad)), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(reg.is_empty());
    }

    #[test]
    fn a_disabled_plugin_is_not_loaded() {
        // Not even opened: a path with no library behind it is no error while disabled.
        let mut plugin = PluginConfig::new("/nonexistent/libdisabled_plugin.so");
        plugin.enabled = false;
        let mut config = ToolsConfig::default();
        config.plugins.push(plugin.clone());
        let reg = ToolRegistry::from_config(&config).unwrap();
        assert_eq!(reg.names(), ["image_zoom_in_tool", "image_rotate_tool"]);
        config.plugins[0].enabled = true;
        assert!(ToolRegistry::from_config(&config).is_err());
    }

    #[test]
    fn enable_and_disable() {
        let mut reg = ToolRegistry::from_config(&ToolsConfig::default()).unwrap();
        reg.set_enabled("image_rotate_tool", true).unwrap();
        reg.set_enabled("image_zoom_in_tool", false).unwrap();
        let offered: Vec<String> = reg.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(offered, ["image_rotate_tool"]);
        let err = reg.set_enabled("nope", true).unwrap_err().to_string();
        assert!(
            err.contains("'nope'") && err.contains("image_zoom_in_tool"),
            "{err}"
        );
    }

    #[test]
    fn toml_configures_built_ins() {
        let cfg = ToolsConfig::from_toml_str(
            r#"
            [zoom-in]
            frame = "relative"
            min-side = 10
            max-aspect-ratio = 50

            [rotate]
            enabled = true
            "#,
            "tools.toml",
        )
        .unwrap();
        assert_eq!(cfg.zoom_in.frame, CoordinateFrame::Relative);
        assert_eq!(cfg.zoom_in.min_side, 10.0);
        assert!(cfg.rotate.enabled);
        let reg = ToolRegistry::from_config(&cfg).unwrap();
        assert_eq!(reg.specs().len(), 2);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        for (text, key) in [
            ("[zoom-in]\nmin-sidee = 3\n", "min-sidee"),
            ("[rotate]\nangle = 3\n", "angle"),
            ("[zoom]\n", "zoom"),
            ("[[plugins]]\npath = \"x.so\"\nconfg = {}\n", "confg"),
            (
                "[[plugins]]\npath = \"x.so\"\nlimits = { max-text = 1 }\n",
                "max-text",
            ),
        ] {
            let err = ToolsConfig::from_toml_str(text, "tools.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("tools.toml"),
                "{text}: {err}"
            );
        }
        let err = ToolsConfig::from_toml_str("[zoom-in]\nframe = \"pixels\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pixels"), "{err}");
    }

    #[test]
    fn nonsensical_values_are_rejected_naming_the_key() {
        let cfg =
            ToolsConfig::from_toml_str("[zoom-in]\nmax-aspect-ratio = 0.5\n", "t.toml").unwrap();
        let err = ToolRegistry::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("max-aspect-ratio"), "{err}");
    }

    #[test]
    fn plugin_paths_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tools.toml");
        std::fs::write(
            &file,
            "[[plugins]]\npath = \"plugins/libx.so\"\nconfig = { step = 50 }\n\n[[plugins]]\npath = \"/abs/liby.so\"\nenabled = false\n",
        )
        .unwrap();
        let cfg = ToolsConfig::from_toml_file(&file).unwrap();
        assert_eq!(cfg.plugins[0].path, dir.path().join("plugins/libx.so"));
        assert_eq!(cfg.plugins[0].config, serde_json::json!({"step": 50}));
        assert!(cfg.plugins[0].enabled);
        assert_eq!(cfg.plugins[1].path, PathBuf::from("/abs/liby.so"));
        assert!(!cfg.plugins[1].enabled);
        // Loading fails clearly: the library does not exist.
        let err = ToolRegistry::from_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("libx.so") && err.contains("not found"),
            "{err}"
        );
    }

    #[test]
    fn a_bundle_carries_its_tools_config_or_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ToolsConfig::for_bundle(dir.path()).unwrap(), None);
        let file = dir.path().join(deepeyes_core::tool::BUNDLE_TOOLS_FILE);
        std::fs::write(&file, "[zoom-in]\nframe = \"relative\"\n").unwrap();
        let cfg = ToolsConfig::for_bundle(dir.path()).unwrap().unwrap();
        assert_eq!(cfg.zoom_in.frame, CoordinateFrame::Relative);
        std::fs::write(&file, "[zoom-in]\nframes = \"relative\"\n").unwrap();
        let err = ToolsConfig::for_bundle(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tools.toml") && err.contains("frames"),
            "{err}"
        );
    }
}
