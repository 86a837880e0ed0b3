//! The thinking-with-images protocol: Qwen2.5-VL ChatML rendering, prompt templates, and the
//! parser of one assistant turn.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tool::{ToolCall, ToolSpec};

mod rendered;

pub use rendered::Rendered;

/// Starts a ChatML message.
pub const IM_START: &str = "<|im_start|>";
/// Ends a ChatML message.
pub const IM_END: &str = "<|im_end|>";
/// Opens an image.
pub const VISION_START: &str = "<|vision_start|>";
/// Stands for an image's visual tokens (one per image; the backend expands it).
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// Closes an image.
pub const VISION_END: &str = "<|vision_end|>";
/// The three markers of one image, as they appear in the context.
pub const IMAGE_MARKERS: &str = "<|vision_start|><|image_pad|><|vision_end|>";
/// Opens a tool call.
pub const TOOL_CALL_START: &str = "<tool_call>";
/// Closes a tool call.
pub const TOOL_CALL_END: &str = "</tool_call>";
/// Opens the final answer.
pub const ANSWER_START: &str = "<answer>";
/// Closes the final answer.
pub const ANSWER_END: &str = "</answer>";

/// The file in a model bundle that holds the prompt templates it was trained with.
pub const BUNDLE_TEMPLATES_FILE: &str = "templates.toml";

/// The wording of every prompt the protocol renders. Placeholders in braces are filled in; every
/// field can be overridden from a TOML file (for instance with the prompt a released checkpoint
/// was trained with).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PromptTemplates {
    /// The system prompt. `{tools}` becomes the tools' JSON signatures, one per line.
    pub system: String,
    /// The first user turn. `{images}` becomes the image markers of the input images, `{question}`
    /// the question.
    pub user: String,
    /// A successful tool observation (the content of a user turn). `{images}` becomes the image
    /// markers of the returned images, `{text}` the returned text.
    pub tool_response: String,
    /// A failed tool call (the content of a user turn). `{error}` becomes the error text.
    pub tool_error: String,
}

impl Default for PromptTemplates {
    fn default() -> Self {
        Self {
            system: DEFAULT_SYSTEM.to_string(),
            user: DEFAULT_USER.to_string(),
            tool_response: DEFAULT_TOOL_RESPONSE.to_string(),
            tool_error: "Error: {error}".to_string(),
        }
    }
}

const DEFAULT_SYSTEM: &str = "You are a careful visual assistant. When a detail of an image is too small to make out, you can look closer with a tool.

# Tools

Each available tool is described by one JSON signature below:
<tools>
{tools}
</tools>

# Calling a tool

Write a single JSON object holding the tool's name and its arguments between <tool_call> and </tool_call>, for instance:
<tool_call>
{\"name\": \"image_zoom_in_tool\", \"arguments\": {\"bbox_2d\": [48, 120, 320, 400], \"label\": \"the sign above the door\"}}
</tool_call>
The result comes back to you inside <tool_response> and </tool_response>.";

const DEFAULT_USER: &str = "{images}{question}
Reason step by step inside <think> and </think>. If something you need is too small to see, call a tool inside <tool_call> and </tool_call> to look closer, as often as it helps. Once you are sure, give only the final answer inside <answer> and </answer>.";

const DEFAULT_TOOL_RESPONSE: &str = "<tool_response>{images}{text}
Keep reasoning inside <think> and </think>: look closer again if needed, or give the final answer inside <answer> and </answer>.</tool_response>";

impl PromptTemplates {
    /// Reads templates from a TOML file; missing fields keep their defaults, unknown fields are
    /// errors that name the field.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The templates a model bundle was trained with: its [`BUNDLE_TEMPLATES_FILE`] when
    /// present, else the built-in ones.
    pub fn for_bundle(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(BUNDLE_TEMPLATES_FILE);
        if path.is_file() {
            Self::from_toml_file(path)
        } else {
            Ok(Self::default())
        }
    }

    /// The templates as TOML text (what [`from_toml_str`](Self::from_toml_str) reads back).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("templates are plain strings")
    }

    /// Parses templates from TOML text; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::config(origin, e))
    }

    /// The system message content listing `tools` (their signatures count as outside text: a
    /// plugin's description cannot place a marker).
    pub fn render_system(&self, tools: &[ToolSpec]) -> Rendered {
        let signatures: Vec<String> = tools.iter().map(ToolSpec::signature_json).collect();
        Rendered::fill(
            &self.system,
            &[("tools", &Rendered::untrusted(&signatures.join("\n")))],
        )
    }

    /// The first user message content; the question is outside text.
    pub fn render_user(&self, question: &str, images: usize) -> Rendered {
        Rendered::fill(
            &self.user,
            &[
                ("images", &Rendered::trusted(&IMAGE_MARKERS.repeat(images))),
                ("question", &Rendered::untrusted(question)),
            ],
        )
    }

    /// A successful observation's content; the tool's text is outside text.
    pub fn render_tool_response(&self, images: usize, text: Option<&str>) -> Rendered {
        Rendered::fill(
            &self.tool_response,
            &[
                ("images", &Rendered::trusted(&IMAGE_MARKERS.repeat(images))),
                ("text", &Rendered::untrusted(text.unwrap_or(""))),
            ],
        )
    }

    /// A failed call's content; the error (which may quote the model's call) is outside text.
    pub fn render_tool_error(&self, error: &str) -> Rendered {
        Rendered::fill(&self.tool_error, &[("error", &Rendered::untrusted(error))])
    }
}

/// One ChatML message: `<|im_start|>role\ncontent<|im_end|>`.
pub fn chatml_message(role: &str, content: &Rendered) -> Rendered {
    let mut out = Rendered::trusted(&format!("{IM_START}{role}\n"));
    out.push(content);
    out.push_trusted(IM_END);
    out
}

/// The full prompt up to the first assistant header. An empty `system` is left out.
pub fn render_prompt(system: &Rendered, user: &Rendered) -> Rendered {
    let mut out = Rendered::default();
    if !system.text().is_empty() {
        out.push(&chatml_message("system", system));
        out.push_trusted("\n");
    }
    out.push(&chatml_message("user", user));
    out.push_trusted(&format!("\n{IM_START}assistant\n"));
    out
}

/// The text appended after an assistant turn to hand `content` back as a user turn and open the
/// next assistant turn. `close_turn` adds the `<|im_end|>` the model did not write (when it was
/// stopped at `</tool_call>`).
pub fn render_observation(content: &Rendered, close_turn: bool) -> Rendered {
    let mut out = Rendered::default();
    if close_turn {
        out.push_trusted(IM_END);
    }
    out.push_trusted("\n");
    out.push(&chatml_message("user", content));
    out.push_trusted(&format!("\n{IM_START}assistant\n"));
    out
}

/// Which `<tool_call>` of a turn is executed when there are several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallSelection {
    /// The first one.
    First,
    /// The last one (DeepEyes' training behaviour).
    #[default]
    Last,
    /// All of them, in order.
    All,
}

/// A `<tool_call>` block of a turn, parsed or not.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// The text between the tags.
    pub raw: String,
    /// The call, or why it could not be parsed (the error text the model will see).
    pub call: std::result::Result<ToolCall, String>,
}

/// What one assistant turn asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnAction {
    /// An `<answer>` was given: the episode ends (even if a tool call is present too).
    Answer(String),
    /// One or more tool calls to execute.
    ToolCalls(Vec<ParsedCall>),
    /// Neither an answer nor a tool call: the episode ends.
    Finish,
}

/// The content of every complete `open…close` block, in order.
fn blocks<'t>(text: &'t str, open: &str, close: &str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        match after.find(close) {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + close.len()..];
            }
            None => break,
        }
    }
    out
}

/// The text of the last complete `<answer>…</answer>` block, trimmed.
pub fn extract_answer(text: &str) -> Option<String> {
    blocks(text, ANSWER_START, ANSWER_END)
        .last()
        .map(|a| a.trim().to_string())
}

/// Parses the JSON inside a `<tool_call>` block.
pub fn parse_tool_call(raw: &str) -> std::result::Result<ToolCall, String> {
    let value: serde_json::Value = serde_json::from_str(raw.trim())
        .map_err(|e| format!("the tool call is not valid JSON ({e})"))?;
    let obj = value.as_object().ok_or_else(|| {
        "the tool call must be a JSON object with \"name\" and \"arguments\"".to_string()
    })?;
    let name = obj
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or_else(|| "the tool call has no string \"name\"".to_string())?;
    let arguments = match obj.get("arguments") {
        None => return Err(format!("the call of '{name}' has no \"arguments\" object")),
        // Some models write the arguments as a JSON string holding the object.
        Some(serde_json::Value::String(s)) => serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| format!("the \"arguments\" string of '{name}' is not valid JSON ({e})"))?,
        Some(v) => v.clone(),
    };
    if !arguments.is_object() {
        return Err(format!(
            "the \"arguments\" of '{name}' must be a JSON object"
        ));
    }
    Ok(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// Parses one assistant turn with DeepEyes' precedence: an answer ends the episode; otherwise the
/// selected tool call(s) are executed; otherwise the episode ends.
pub fn parse_turn(text: &str, selection: CallSelection) -> TurnAction {
    if let Some(answer) = extract_answer(text) {
        return TurnAction::Answer(answer);
    }
    let calls = blocks(text, TOOL_CALL_START, TOOL_CALL_END);
    let chosen: Vec<&str> = match selection {
        CallSelection::First => calls.first().copied().into_iter().collect(),
        CallSelection::Last => calls.last().copied().into_iter().collect(),
        CallSelection::All => calls,
    };
    if chosen.is_empty() {
        return TurnAction::Finish;
    }
    TurnAction::ToolCalls(
        chosen
            .into_iter()
            .map(|raw| ParsedCall {
                raw: raw.to_string(),
                call: parse_tool_call(raw),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn answer_wins_over_tool_call() {
        let t = "<think>x</think><tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call><answer> B </answer>";
        assert_eq!(
            parse_turn(t, CallSelection::Last),
            TurnAction::Answer("B".into())
        );
    }

    #[test]
    fn last_call_is_used_by_default() {
        let t = "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call><tool_call>{\"name\":\"b\",\"arguments\":{\"k\":1}}</tool_call>";
        let TurnAction::ToolCalls(calls) = parse_turn(t, CallSelection::Last) else {
            panic!("expected a call");
        };
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].call.as_ref().unwrap().name, "b");
        let TurnAction::ToolCalls(calls) = parse_turn(t, CallSelection::First) else {
            panic!("expected a call");
        };
        assert_eq!(calls[0].call.as_ref().unwrap().name, "a");
        let TurnAction::ToolCalls(calls) = parse_turn(t, CallSelection::All) else {
            panic!("expected calls");
        };
        assert_eq!(calls.len(), 2);
    }

    #[test]
    fn malformed_calls_become_error_texts() {
        for (raw, needle) in [
            ("{not json", "not valid JSON"),
            ("[1,2]", "JSON object"),
            ("{\"arguments\":{}}", "\"name\""),
            ("{\"name\":\"z\"}", "no \"arguments\""),
            ("{\"name\":\"z\",\"arguments\":3}", "must be a JSON object"),
        ] {
            let err = parse_tool_call(raw).unwrap_err();
            assert!(err.contains(needle), "{raw}: {err}");
        }
        let call = parse_tool_call("{\"name\":\"z\",\"arguments\":\"{\\\"a\\\":1}\"}").unwrap();
        assert_eq!(call.arguments["a"], 1);
    }

    #[test]
    fn no_action_and_unclosed_tags_finish() {
        assert_eq!(
            parse_turn("just text", CallSelection::Last),
            TurnAction::Finish
        );
        assert_eq!(
            parse_turn("<answer>unclosed", CallSelection::Last),
            TurnAction::Finish
        );
    }

    #[test]
    fn templates_from_toml_are_strict() {
        let t =
            PromptTemplates::from_toml_str("user = \"{images}Q: {question}\"", "t.toml").unwrap();
        assert_eq!(
            t.render_user("why?", 1).text(),
            format!("{IMAGE_MARKERS}Q: why?")
        );
        assert_eq!(t.system, PromptTemplates::default().system);
        let err = PromptTemplates::from_toml_str("sytem = \"x\"", "t.toml").unwrap_err();
        assert!(err.to_string().contains("sytem"), "{err}");
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_turn(&text, CallSelection::All);
        }

        #[test]
        fn parser_never_panics_on_tag_soup(parts in proptest::collection::vec(
            prop_oneof![
                Just("<tool_call>"), Just("</tool_call>"), Just("<answer>"), Just("</answer>"),
                Just("{\"name\":"), Just("\"arguments\":{"), Just("}"), Just("é"), Just("x"),
            ], 0..30)) {
            let text: String = parts.concat();
            let _ = parse_turn(&text, CallSelection::Last);
        }

        #[test]
        fn well_formed_call_round_trips(
            name in "[a-z_]{1,20}",
            x1 in -1e6f64..1e6, y1 in -1e6f64..1e6, x2 in -1e6f64..1e6, y2 in -1e6f64..1e6,
            label in "[ -~&&[^<>]]{0,30}",
            think in "[ -~&&[^<>]]{0,50}",
        ) {
            let call = ToolCall {
                name: name.clone(),
                arguments: serde_json::json!({"bbox_2d": [x1, y1, x2, y2], "label": label}),
            };
            let text = format!("<think>{think}</think>\n<tool_call>\n{}\n</tool_call>", serde_json::to_string(&call).unwrap());
            match parse_turn(&text, CallSelection::Last) {
                TurnAction::ToolCalls(calls) => {
                    prop_assert_eq!(calls.len(), 1);
                    prop_assert_eq!(calls[0].call.as_ref().unwrap(), &call);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
