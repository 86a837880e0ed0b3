//! `POST /v1/chat/completions`: OpenAI's chat request, read strictly, turned into an agent task;
//! the agent's episode turned back into a chat completion (or a stream of chunks).
//!
//! The types are written here rather than taken from a protocol crate (async-openai was the
//! candidate): the request must refuse unknown fields except a documented list of ignored ones,
//! a policy of this server rather than of the protocol, and the response carries
//! `reasoning_content` and the `deepeyes` episode, which the typed OpenAI crates do not model
//! (async-openai's own maintainers of its wasm fork note its types drop such extra fields).

use base64::Engine as _;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::agent::Task;
use crate::image::{Image, ImageLimits};
use crate::model::SamplingParams;
use crate::preprocess::PreprocessConfig;
use crate::trajectory::{ImageSource, StopReason, Trajectory};

use super::api_error::ApiError;

/// Request fields OpenAI clients and evaluation harnesses send that do not apply to an agent
/// and are accepted and ignored (their values are not checked).
pub const IGNORED_CHAT_FIELDS: &[&str] = &[
    "user",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "stop",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "response_format",
    "chat_template_kwargs",
    "reasoning_effort",
];

/// OpenAI's chat completion request, as far as it applies.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Not OpenAI's, but vLLM's and SGLang's: keep the `k` most likely tokens.
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// Everything else: refused unless named in [`IGNORED_CHAT_FIELDS`].
    #[serde(flatten)]
    other: std::collections::BTreeMap<String, IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
    /// A participant's name: not shown to the model.
    #[serde(default, rename = "name")]
    _name: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageUrl {
    url: String,
    /// OpenAI's resolution hint; the model sees each image at its own preprocessing.
    #[serde(default, rename = "detail")]
    _detail: Option<IgnoredAny>,
}

/// Limits a request is checked against.
#[derive(Debug, Clone)]
pub(crate) struct RequestLimits {
    pub(crate) model_name: String,
    pub(crate) max_images: usize,
    pub(crate) max_choices: usize,
    pub(crate) image: ImageLimits,
    pub(crate) preprocess: PreprocessConfig,
    /// Fetch `http(s)` image URLs (otherwise only data URLs are taken).
    pub(crate) fetch_urls: bool,
}

/// A checked request: what the agent runs and how to answer.
#[derive(Debug)]
pub(crate) struct ChatJob {
    pub(crate) task: Task,
    pub(crate) choices: usize,
    pub(crate) seed: Option<u64>,
    pub(crate) sampling: SamplingParams,
    pub(crate) completion_limit: Option<usize>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

/// Reads and checks a request body. Every refusal names the field at fault.
pub(crate) fn parse_request(body: &[u8], limits: &RequestLimits) -> Result<ChatJob, ApiError> {
    let request: ChatRequest = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_slice(body),
    )
    .map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::invalid(
            param.clone(),
            format!(
                "the request is not a valid chat completion request: {param}: {}",
                e.inner()
            ),
        )
    })?;
    if let Some(field) = request
        .other
        .keys()
        .find(|k| !IGNORED_CHAT_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            field.clone(),
            format!(
                "unknown field `{field}`; besides the fields this server reads it ignores only {}",
                IGNORED_CHAT_FIELDS.join(", ")
            ),
        ));
    }
    if request.model != limits.model_name {
        return Err(ApiError::status(
            axum::http::StatusCode::NOT_FOUND,
            format!(
                "the model '{}' does not exist; this server serves '{}'",
                request.model, limits.model_name
            ),
        )
        .with_code("model_not_found"));
    }
    let sampling = sampling(&request)?;
    let completion_limit = completion_limit(&request)?;
    let choices = request.n.unwrap_or(1) as usize;
    if choices == 0 || choices > limits.max_choices {
        return Err(ApiError::invalid(
            "n",
            format!("must be between 1 and {}", limits.max_choices),
        ));
    }
    let task = task(&request.messages, limits)?;
    let stream = request.stream.unwrap_or(false);
    Ok(ChatJob {
        task,
        choices,
        seed: request.seed,
        sampling,
        completion_limit,
        stream,
        include_usage: stream && request.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn sampling(request: &ChatRequest) -> Result<SamplingParams, ApiError> {
    // OpenAI's default temperature and top_p.
    let temperature = request.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "must be between 0 and 2"));
    }
    let top_p = request.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k: request.top_k.unwrap_or(0) as usize,
    })
}

fn completion_limit(request: &ChatRequest) -> Result<Option<usize>, ApiError> {
    let limit = match (request.max_completion_tokens, request.max_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                format!("max_completion_tokens = {a} and max_tokens = {b} disagree; send one"),
            ));
        }
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    match limit {
        Some(0) => Err(ApiError::invalid(
            if request.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            },
            "must be at least 1",
        )),
        other => Ok(other.map(|n| n as usize)),
    }
}

/// The question and images of the conversation: the text and image parts of its user messages,
/// in order. System and developer messages are accepted and their text is not shown to the model
/// (its system prompt lists the tools it was trained with); assistant and tool messages are
/// refused, since the agent answers one question.
fn task(messages: &[ChatMessage], limits: &RequestLimits) -> Result<Task, ApiError> {
    let mut texts = Vec::new();
    let mut images = Vec::new();
    let mut users = 0;
    for (m, message) in messages.iter().enumerate() {
        match message.role.as_str() {
            "system" | "developer" => continue,
            "user" => users += 1,
            "assistant" | "tool" | "function" => {
                return Err(ApiError::invalid(
                    format!("messages[{m}].role"),
                    format!(
                        "'{}' messages are not taken: the agent answers one question and runs its tools itself",
                        message.role
                    ),
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{m}].role"),
                    format!("unknown role '{other}'"),
                ));
            }
        }
        match &message.content {
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{m}].content"),
                    "a user message needs content",
                ));
            }
            Some(MessageContent::Text(text)) => texts.push(text.clone()),
            Some(MessageContent::Parts(parts)) => {
                for (p, part) in parts.iter().enumerate() {
                    match part {
                        ContentPart::Text { text } => texts.push(text.clone()),
                        ContentPart::ImageUrl { image_url } => {
                            let param = format!("messages[{m}].content[{p}].image_url");
                            if images.len() == limits.max_images {
                                return Err(ApiError::invalid(
                                    param,
                                    format!(
                                        "too many images: at most {} per request",
                                        limits.max_images
                                    ),
                                ));
                            }
                            images.push(image(&image_url.url, &param, limits)?);
                        }
                    }
                }
            }
        }
    }
    if users == 0 {
        return Err(ApiError::invalid("messages", "no user message"));
    }
    let question = texts.join("\n");
    if question.trim().is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the user messages hold no text",
        ));
    }
    Ok(Task { question, images })
}

/// Decodes one `data:image/…;base64,…` URL into an image the model can take.
fn image(url: &str, param: &str, limits: &RequestLimits) -> Result<Image, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        if limits.fetch_urls && (url.starts_with("http://") || url.starts_with("https://")) {
            return decoded(&fetch(url, param, limits)?, param, limits);
        }
        let shown: String = url.chars().take(40).collect();
        return Err(ApiError::invalid(
            param,
            format!(
                "only data URLs are taken (data:image/png;base64,…), not '{shown}': this server fetches nothing unless started with --allow-image-urls"
            ),
        ));
    };
    let Some((media, payload)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            param,
            "a data URL needs a ',' before its data",
        ));
    };
    let Some(media) = media.strip_suffix(";base64") else {
        return Err(ApiError::invalid(
            param,
            "the data URL is not base64 (…;base64,…)",
        ));
    };
    if !media.is_empty() && !media.starts_with("image/") {
        return Err(ApiError::invalid(
            param,
            format!("the data URL's type is '{media}', not an image"),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| {
            ApiError::invalid(param, format!("the image's base64 does not decode: {e}"))
        })?;
    if bytes.len() as u64 > limits.image.max_file_bytes {
        return Err(ApiError::invalid(
            param,
            format!(
                "the image is {} bytes, over the limit of {}",
                bytes.len(),
                limits.image.max_file_bytes
            ),
        ));
    }
    decoded(&bytes, param, limits)
}

/// Downloads an image URL, refusing a body over the image size limit.
fn fetch(url: &str, param: &str, limits: &RequestLimits) -> Result<Vec<u8>, ApiError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| ApiError::invalid(param, format!("fetching {url}: {e}")))?;
    response
        .body_mut()
        .with_config()
        .limit(limits.image.max_file_bytes)
        .read_to_vec()
        .map_err(|e| ApiError::invalid(param, format!("reading {url}: {e}")))
}

/// Decodes image bytes under the limits and checks the model can take the image.
fn decoded(bytes: &[u8], param: &str, limits: &RequestLimits) -> Result<Image, ApiError> {
    let image = Image::decode(bytes, param, &limits.image)
        .map_err(|e| ApiError::invalid(param, e.to_string()))?;
    limits
        .preprocess
        .image_token_count(image.height(), image.width())
        .map_err(|e| ApiError::invalid(param, format!("the model cannot take this image: {e}")))?;
    Ok(image)
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
}

impl Usage {
    /// The prompt's tokens (each image counted as the visual tokens it becomes) and the tokens
    /// generated over every turn of every choice. Tool observations count in neither.
    pub(crate) fn of(choices: &[&Trajectory], preprocess: &PreprocessConfig) -> Self {
        let Some(first) = choices.first() else {
            return Self::default();
        };
        let mut prompt = first.prompt_len;
        for (source, &(w, h)) in first.image_sources.iter().zip(&first.image_sizes) {
            if matches!(source, ImageSource::Input { .. }) {
                // One pad stands for the image's visual tokens.
                prompt += preprocess.image_token_count(h, w).unwrap_or(1) - 1;
            }
        }
        let completion = choices.iter().map(|t| t.generated_count()).sum();
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// OpenAI's finish reason for how an episode stopped: a limit cut it (`length`) or the model
/// ended it (`stop`).
pub(crate) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Answered | StopReason::NoAction => "stop",
        StopReason::TurnLength
        | StopReason::TokenBudget
        | StopReason::MaxTurns
        | StopReason::ImageLimit => "length",
    }
}

/// What a harness reads: the text inside `<answer>…</answer>`, or the last turn's text.
pub(crate) fn content(traj: &Trajectory) -> String {
    traj.answer.clone().unwrap_or_else(|| {
        traj.turns
            .last()
            .map_or_else(String::new, |t| t.text.clone())
    })
}

/// Every turn's text, in order: the model's reasoning, tool calls included.
pub(crate) fn reasoning(traj: &Trajectory) -> String {
    traj.turns
        .iter()
        .map(|t| t.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Turn `turn` of an episode as the `deepeyes` extension shows it: its text, each tool call with
/// its arguments and outcome, and the crops it returned as PNG data URLs.
pub(crate) fn turn_json(traj: &Trajectory, turn: usize) -> Value {
    let t = &traj.turns[turn];
    let calls: Vec<Value> = traj
        .tool_calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.turn == turn)
        .map(|(i, c)| {
            let crops: Vec<String> = traj
                .images
                .iter()
                .filter(|im| im.source == ImageSource::ToolCall { call: i })
                .filter_map(|im| im.image.to_png().ok())
                .map(|png| {
                    format!(
                        "data:image/png;base64,{}",
                        base64::engine::general_purpose::STANDARD.encode(png)
                    )
                })
                .collect();
            json!({
                "name": c.call.as_ref().map(|c| c.name.clone()),
                "arguments": c.call.as_ref().map(|c| c.arguments.clone()),
                "raw": c.raw,
                "outcome": c.outcome,
                "crops": crops,
            })
        })
        .collect();
    json!({
        "turn": turn,
        "text": t.text,
        "finish": t.finish,
        "tool_calls": calls,
    })
}

/// The whole episode as the `deepeyes` extension of a choice.
pub(crate) fn episode_json(traj: &Trajectory) -> Value {
    json!({
        "stop": traj.stop,
        "answer": traj.answer,
        "turns": (0..traj.turns.len()).map(|k| turn_json(traj, k)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            model_name: "tiny".into(),
            max_images: 2,
            max_choices: 4,
            image: ImageLimits::default(),
            preprocess: PreprocessConfig::default(),
            fetch_urls: false,
        }
    }

    fn png_url(w: u32, h: u32) -> String {
        let png = Image::from_raw(w, h, vec![200; (w * h * 3) as usize])
            .unwrap()
            .to_png()
            .unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        )
    }

    fn parse(body: Value) -> Result<ChatJob, ApiError> {
        parse_request(body.to_string().as_bytes(), &limits())
    }

    #[test]
    fn a_vlmevalkit_style_request_becomes_a_task() {
        let job = parse(json!({
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What colour is the dot?"},
                    {"type": "image_url", "image_url": {"url": png_url(64, 48), "detail": "low"}},
                ]},
            ],
            "max_tokens": 64, "n": 1, "temperature": 0, "user": "someone", "stop": ["\n"],
        }))
        .unwrap();
        assert_eq!(job.task.question, "What colour is the dot?");
        assert_eq!(job.task.images.len(), 1);
        assert_eq!(
            (job.task.images[0].width(), job.task.images[0].height()),
            (64, 48)
        );
        assert_eq!(job.sampling.temperature, 0.0);
        assert_eq!(job.completion_limit, Some(64));
        assert!(!job.stream);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let cases = [
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": -1}),
                "max_tokens",
                "expected u32",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "temprature": 1}),
                "temprature",
                "unknown field",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 0}),
                "max_tokens",
                "at least 1",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "temperature": 3}),
                "temperature",
                "between",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "n": 9}),
                "n",
                "between",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "assistant", "content": "a"}]}),
                "messages[0].role",
                "one question",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
                "messages[0].content[1].image_url",
                "image",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
                "messages[0].content[1].image_url",
                "data URLs",
            ),
            (
                json!({"model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"},
                {"type": "image_url", "image_url": {"url": png_url(32, 32)}},
                {"type": "image_url", "image_url": {"url": png_url(32, 32)}},
                {"type": "image_url", "image_url": {"url": png_url(32, 32)}}]}]}),
                "messages[0].content[3].image_url",
                "too many images",
            ),
            (
                json!({"model": "tiny", "messages": []}),
                "messages",
                "no user message",
            ),
        ];
        for (body, param, words) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            assert!(err.message.contains(words), "{body}: {}", err.message);
        }
        let err = parse(json!({"model": "other", "messages": [{"role": "user", "content": "q"}]}))
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::NOT_FOUND);
        assert!(err.body().contains("model_not_found"), "{}", err.body());
    }
}
