//! The tool side of the protocol: what a tool is, what it receives and what it returns.
//!
//! Registries, the built-in zoom-in tool and plugins live in `deepeyes-tools`; this module holds
//! only the trait they all implement, so the agent loop can run any of them.

use serde::{Deserialize, Serialize};

use crate::image::{CropRect, Image};
use crate::preprocess::PreprocessConfig;

/// The JSON description of a tool, as listed to the model inside `<tools>…</tools>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// The name the model calls the tool by; unique in a registry.
    pub name: String,
    /// What the tool does, in words the model reads.
    pub description: String,
    /// A JSON schema (`{"type": "object", "properties": …, "required": …}`) of the arguments.
    pub parameters: serde_json::Value,
}

impl ToolSpec {
    /// The one-line JSON signature rendered into the system prompt, formatted as Qwen2.5-VL's chat
    /// template writes it (`{"type": "function", "function": {…}}`, Python's separators, keys in
    /// schema order).
    pub fn signature_json(&self) -> String {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        function.insert("description".into(), self.description.clone().into());
        function.insert("parameters".into(), self.parameters.clone());
        let mut outer = serde_json::Map::new();
        outer.insert("type".into(), "function".into());
        outer.insert("function".into(), function.into());
        python_json(&serde_json::Value::Object(outer))
    }
}

/// Serialises JSON as Python's `json.dumps` does by default: `", "` and `": "` separators,
/// non-ASCII kept as is.
pub fn python_json(value: &serde_json::Value) -> String {
    use serde::Serialize;

    struct PythonFormatter;
    impl serde_json::ser::Formatter for PythonFormatter {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }

    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value
        .serialize(&mut ser)
        .expect("serialising a JSON value into memory cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_qwen_template_formatting() {
        let spec = ToolSpec {
            name: "zoom".into(),
            description: "Zoom é.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"bbox_2d": {"type": "array", "items": {"type": "number"}}}, "required": ["bbox_2d"]}),
        };
        assert_eq!(
            spec.signature_json(),
            r#"{"type": "function", "function": {"name": "zoom", "description": "Zoom é.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array", "items": {"type": "number"}}}, "required": ["bbox_2d"]}}}"#
        );
    }
}

/// A tool call as the model wrote it: a name and a JSON object of arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// The arguments object.
    pub arguments: serde_json::Value,
}

/// What a successful tool call returns: text and/or images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolOutput {
    /// Text shown to the model, if any.
    pub text: Option<String>,
    /// Images shown to the model (each goes through the model's preprocessing).
    pub images: Vec<Image>,
    /// The region of the episode's first input image, in its original pixels, that the returned
    /// image shows, when the tool cut one out. Grounding (IoU against ground-truth boxes) is
    /// measured on this, in training and evaluation alike, whatever frame the call's arguments
    /// were written in.
    pub region: Option<CropRect>,
}

impl ToolOutput {
    /// An output holding one image.
    pub fn image(image: Image) -> Self {
        Self {
            text: None,
            images: vec![image],
            region: None,
        }
    }

    /// This output, reporting that its image shows `region` of the first input image.
    #[must_use]
    pub fn with_region(mut self, region: CropRect) -> Self {
        self.region = Some(region);
        self
    }

    /// An output holding text only.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            images: Vec::new(),
            region: None,
        }
    }
}

/// Why a tool call failed. The message is what the model sees (after `Error: `); the episode
/// continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    /// The text the model sees.
    pub message: String,
}

impl ToolError {
    /// A tool error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// What a tool may look at besides its arguments.
#[derive(Debug, Clone)]
pub struct ToolContext<'a> {
    /// The episode's input images, as decoded (never resized). Crops are cut from these.
    pub original_images: &'a [Image],
    /// The model's image preprocessing, for tools whose coordinates refer to what the model saw.
    pub preprocess: &'a PreprocessConfig,
}

/// The file in a model bundle that holds the tools configuration it was trained with (the
/// tools crate's `ToolsConfig` in TOML: the zoom tool's coordinate frame and limits, plugins),
/// which commands use unless given another: a policy that states its boxes in one frame must
/// have them read in that frame.
pub const BUNDLE_TOOLS_FILE: &str = "tools.toml";

/// A tool the model can call.
///
/// Implementations must not panic on any argument value: every problem becomes a [`ToolError`],
/// whose message goes back to the model.
///
/// ```
/// use deepeyes_core::tool::{Tool, ToolContext, ToolError, ToolOutput, ToolSpec};
///
/// struct Echo;
/// impl Tool for Echo {
///     fn spec(&self) -> ToolSpec {
///         ToolSpec {
///             name: "echo".into(),
///             description: "Repeats its `text` argument.".into(),
///             parameters: serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
///         }
///     }
///     fn call(&self, args: &serde_json::Value, _ctx: &ToolContext<'_>) -> Result<ToolOutput, ToolError> {
///         let text = args.get("text").and_then(|t| t.as_str()).ok_or_else(|| ToolError::new("missing string argument 'text'"))?;
///         Ok(ToolOutput::text(text))
///     }
/// }
/// ```
pub trait Tool: Send + Sync {
    /// The tool's name, description and argument schema.
    fn spec(&self) -> ToolSpec;

    /// Runs the tool on `args` (the `"arguments"` object of the call).
    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> Result<ToolOutput, ToolError>;

    /// The tool's name; by default the spec's.
    fn name(&self) -> String {
        self.spec().name
    }
}

/// A tool made of a spec and a closure.
pub struct FnTool<F> {
    spec: ToolSpec,
    f: F,
}

impl<F> std::fmt::Debug for FnTool<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnTool").field("spec", &self.spec).finish()
    }
}

impl<F> FnTool<F>
where
    F: Fn(&serde_json::Value, &ToolContext<'_>) -> Result<ToolOutput, ToolError> + Send + Sync,
{
    /// A tool described by `spec` that runs `f`.
    pub fn new(spec: ToolSpec, f: F) -> Self {
        Self { spec, f }
    }
}

impl<F> Tool for FnTool<F>
where
    F: Fn(&serde_json::Value, &ToolContext<'_>) -> Result<ToolOutput, ToolError> + Send + Sync,
{
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn call(
        &self,
        args: &serde_json::Value,
        ctx: &ToolContext<'_>,
    ) -> Result<ToolOutput, ToolError> {
        (self.f)(args, ctx)
    }
}
