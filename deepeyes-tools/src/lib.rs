//! # deepeyes-tools
//!
//! The tools a deepeyes agent can call while it reasons about an image, and the registry that
//! offers them to the model.
//!
//! - [`zoom`]: `image_zoom_in_tool`, the tool DeepEyes trains the model to use, with explicit
//!   [coordinate frames](geometry::CoordinateFrame);
//! - [`rotate`]: `image_rotate_tool` (counter-clockwise, canvas not expanded);
//! - [`resize`]: crop and resize helpers built on `fast_image_resize`, including
//!   [`crop_resize`](resize::crop_resize), the crop → model-input path a backend needs;
//! - [`registry`]: unique names, enable/disable/configure from TOML, built-ins and plugins behind
//!   the one [`deepeyes_core::Tool`] trait;
//! - [`abi`] and [`plugin`]: tools loaded at run time from shared libraries through a versioned C
//!   ABI, and the [`export_tool!`] macro a plugin author uses.
//!
//! ```
//! use deepeyes_tools::{ToolRegistry, ToolsConfig};
//!
//! let registry = ToolRegistry::from_config(&ToolsConfig::default()).unwrap();
//! let names: Vec<String> = registry.specs().into_iter().map(|s| s.name).collect();
//! assert_eq!(names, ["image_zoom_in_tool"]);
//! // `registry.tools()` is what `deepeyes_core::Agent::new` takes.
//! assert_eq!(registry.tools().len(), 1);
//! ```

// FFI: the plugin ABI types, the functions the `export_tool!` macro exports from a plugin, and
// the host-side loader must dereference raw pointers handed across the C boundary and call
// foreign functions. `unsafe_code` is denied everywhere else in the workspace; it is allowed only
// in these two modules, and every `unsafe` block there carries a SAFETY comment.
#[allow(unsafe_code)]
pub mod abi;
pub mod error;
/// Zoom boxes' frames and rules, defined in core (the base stage of the RL crate predicts the
/// tool's crops with them) and re-exported here where the tool's users look for them.
pub use deepeyes_core::geometry;
#[allow(unsafe_code)]
pub mod plugin;
pub mod registry;
pub mod resize;
pub mod rotate;
pub mod zoom;

pub use error::{Error, Result};
pub use geometry::{CoordinateFrame, CropRect, ZoomLimits};
pub use plugin::isolate::{IsolateOptions, IsolatedTool, PluginHost};
pub use plugin::{DynTool, LoadedPlugin, PluginError, PluginLimits};
pub use registry::{PluginConfig, ToolInfo, ToolOrigin, ToolRegistry, ToolsConfig};
pub use resize::{Filter, crop_resize, crop_to_model_input, resize};
pub use rotate::{RotateConfig, RotateTool, rotate_ccw};
pub use zoom::{ZoomInConfig, ZoomInTool};
