//! SGLang's native token-level API, as far as deepeyes' rollouts need it: `POST /generate`
//! (token ids and images in, token ids and log-probs out), `POST /update_weights_from_disk`,
//! `GET /get_model_info`, `GET /get_weight_version`. Field names and shapes follow SGLang's
//! `GenerateReqInput` and its responses (docs/SERVE.md lists every field taken).

use base64::Engine as _;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use crate::image::{Image, ImageLimits};
use crate::model::{FinishReason, Generation, SamplingParams, TokenCodec};
use crate::preprocess::PreprocessConfig;

use super::api_error::ApiError;
use super::scheduler::OwnedGenerate;

/// SGLang's `/generate` request (`GenerateReqInput`), the fields deepeyes takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenerateIn {
    /// One request's ids, or a batch of them.
    input_ids: Value,
    /// Per request: nothing, one image, or a list of images (data URLs or bare base64).
    #[serde(default)]
    image_data: Value,
    /// One set for all, or one per request.
    #[serde(default)]
    sampling_params: Value,
    #[serde(default)]
    return_logprob: Value,
    #[serde(default)]
    stream: bool,
    /// Request ids: echoed in `meta_info.id`.
    #[serde(default)]
    rid: Value,
    #[serde(default, rename = "logprob_start_len")]
    _logprob_start_len: Option<IgnoredAny>,
    #[serde(default, rename = "return_text_in_logprobs")]
    _return_text_in_logprobs: Option<IgnoredAny>,
}

/// SGLang's sampling parameters, the ones deepeyes takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplingIn {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// SGLang's `-1` (and 0) mean no top-k cut.
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    sampling_seed: Option<u64>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    n: Option<u32>,
    /// Text always keeps special tokens here (deepeyes' protocol is written in them).
    #[serde(default, rename = "skip_special_tokens")]
    _skip_special_tokens: Option<IgnoredAny>,
    #[serde(default, rename = "spaces_between_special_tokens")]
    _spaces_between_special_tokens: Option<IgnoredAny>,
}

/// What the handler needs to check a request.
pub(crate) struct GenerateLimits<'a> {
    pub(crate) codec: &'a dyn TokenCodec,
    pub(crate) image_pad: u32,
    pub(crate) preprocess: PreprocessConfig,
    pub(crate) image: ImageLimits,
    pub(crate) max_images: usize,
    pub(crate) max_batch: usize,
}

/// A checked `/generate` call.
#[derive(Debug)]
pub(crate) struct GenerateCall {
    pub(crate) requests: Vec<OwnedGenerate>,
    pub(crate) batched: bool,
    pub(crate) return_logprob: Vec<bool>,
    pub(crate) rids: Vec<Option<String>>,
    /// Each request's prompt length with images expanded.
    pub(crate) prompt_tokens: Vec<usize>,
}

/// Element `i` of a per-request field: the field itself when it is not a list (or, for a single
/// request, always).
fn per_request(value: &Value, i: usize, batched: bool) -> Value {
    match value {
        Value::Array(items) if batched => items.get(i).cloned().unwrap_or(Value::Null),
        other => other.clone(),
    }
}

/// Reads and checks a `/generate` body.
pub(crate) fn parse(body: &[u8], limits: &GenerateLimits<'_>) -> Result<GenerateCall, ApiError> {
    let input: GenerateIn = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_slice(body),
    )
    .map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(path.clone(), format!("{path}: {}", e.inner()))
    })?;
    if input.stream {
        return Err(ApiError::invalid(
            "stream",
            "streamed /generate is not supported",
        ));
    }
    let batched = matches!(
        input.input_ids.as_array().and_then(|a| a.first()),
        Some(Value::Array(_))
    );
    let ids: Vec<Vec<u32>> = if batched {
        serde_json::from_value(input.input_ids.clone())
    } else {
        serde_json::from_value(input.input_ids.clone()).map(|one| vec![one])
    }
    .map_err(|e| {
        ApiError::invalid(
            "input_ids",
            format!("a list of token ids or a list of such lists: {e}"),
        )
    })?;
    if ids.is_empty() || ids.len() > limits.max_batch {
        return Err(ApiError::invalid(
            "input_ids",
            format!("1 to {} requests per call", limits.max_batch),
        ));
    }
    let mut call = GenerateCall {
        requests: Vec::with_capacity(ids.len()),
        batched,
        return_logprob: Vec::new(),
        rids: Vec::new(),
        prompt_tokens: Vec::new(),
    };
    for (i, tokens) in ids.into_iter().enumerate() {
        let field = |name: &str| {
            if batched {
                format!("{name}[{i}]")
            } else {
                name.to_string()
            }
        };
        let images = images(
            &per_request(&input.image_data, i, batched),
            &field("image_data"),
            limits,
        )?;
        let (tokens, prompt) = collapse_pads(tokens, &images, &field("input_ids"), limits)?;
        let params = per_request(&input.sampling_params, i, batched);
        let params: SamplingIn = if params.is_null() {
            SamplingIn::default()
        } else {
            serde_path_to_error::deserialize(params).map_err(|e| {
                let path = format!("{}.{}", field("sampling_params"), e.path());
                ApiError::invalid(path.clone(), format!("{path}: {}", e.inner()))
            })?
        };
        call.requests.push(request(
            tokens,
            images,
            params,
            &field("sampling_params"),
            limits,
        )?);
        call.return_logprob.push(
            per_request(&input.return_logprob, i, batched)
                .as_bool()
                .unwrap_or(false),
        );
        call.rids.push(
            per_request(&input.rid, i, batched)
                .as_str()
                .map(str::to_string),
        );
        call.prompt_tokens.push(prompt);
    }
    Ok(call)
}

fn images(value: &Value, param: &str, limits: &GenerateLimits<'_>) -> Result<Vec<Image>, ApiError> {
    let items: Vec<&Value> = match value {
        Value::Null => Vec::new(),
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    if items.len() > limits.max_images {
        return Err(ApiError::invalid(
            param,
            format!("too many images: at most {}", limits.max_images),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let param = format!("{param}[{k}]");
            let Some(text) = item.as_str() else {
                return Err(ApiError::invalid(
                    param,
                    "an image is a data URL or base64 text",
                ));
            };
            let payload = match text.strip_prefix("data:") {
                Some(rest) => rest
                    .split_once(";base64,")
                    .map(|(_, data)| data)
                    .ok_or_else(|| ApiError::invalid(&param, "the data URL is not base64"))?,
                None if text.starts_with("http://")
                    || text.starts_with("https://")
                    || text.starts_with('/') =>
                {
                    return Err(ApiError::invalid(
                        param,
                        "image URLs and paths are not fetched: send the image as base64",
                    ));
                }
                None => text,
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(payload.trim())
                .map_err(|e| {
                    ApiError::invalid(&param, format!("the image's base64 does not decode: {e}"))
                })?;
            Image::decode(&bytes, &param, &limits.image)
                .map_err(|e| ApiError::invalid(&param, e.to_string()))
        })
        .collect()
}

/// One `<|image_pad|>` per image, as deepeyes' backend takes them: a run of pads as long as the
/// image's visual token count (a context already expanded) becomes one. Returns the ids and the
/// prompt length with every image expanded.
fn collapse_pads(
    tokens: Vec<u32>,
    images: &[Image],
    param: &str,
    limits: &GenerateLimits<'_>,
) -> Result<(Vec<u32>, usize), ApiError> {
    let counts: Vec<usize> = images
        .iter()
        .map(|im| limits.preprocess.image_token_count(im.height(), im.width()))
        .collect::<crate::Result<_>>()
        .map_err(|e| ApiError::invalid(param, format!("the model cannot take an image: {e}")))?;
    let mut out = Vec::with_capacity(tokens.len());
    let mut image = 0;
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] != limits.image_pad {
            out.push(tokens[i]);
            i += 1;
            continue;
        }
        let run = tokens[i..]
            .iter()
            .take_while(|&&t| t == limits.image_pad)
            .count();
        let Some(&want) = counts.get(image) else {
            return Err(ApiError::invalid(
                param,
                format!("more image pads than the {} images sent", images.len()),
            ));
        };
        if run != 1 && run != want {
            return Err(ApiError::invalid(
                param,
                format!(
                    "image {image} has a run of {run} pads: send one pad per image, or exactly its {want} visual tokens"
                ),
            ));
        }
        out.push(limits.image_pad);
        image += 1;
        i += run;
    }
    if image != images.len() {
        return Err(ApiError::invalid(
            param,
            format!("{image} image pads for {} images", images.len()),
        ));
    }
    if out.is_empty() {
        return Err(ApiError::invalid(param, "no tokens"));
    }
    let prompt = out.len() - image + counts.iter().sum::<usize>();
    Ok((out, prompt))
}

fn request(
    tokens: Vec<u32>,
    images: Vec<Image>,
    params: SamplingIn,
    param: &str,
    limits: &GenerateLimits<'_>,
) -> Result<OwnedGenerate, ApiError> {
    let temperature = params.temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::invalid(
            format!("{param}.temperature"),
            "must be a finite number ≥ 0",
        ));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("{param}.top_p"),
            "must be in (0, 1]",
        ));
    }
    if params.ignore_eos {
        return Err(ApiError::invalid(
            format!("{param}.ignore_eos"),
            "only false is supported",
        ));
    }
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            format!("{param}.n"),
            "only 1 is supported: send the request n times",
        ));
    }
    // SGLang's default.
    let max_new_tokens = params.max_new_tokens.unwrap_or(128);
    if max_new_tokens == 0 {
        return Err(ApiError::invalid(
            format!("{param}.max_new_tokens"),
            "must be at least 1",
        ));
    }
    let mut stop_sequences: Vec<Vec<u32>> = params
        .stop_token_ids
        .unwrap_or_default()
        .into_iter()
        .map(|id| vec![id])
        .collect();
    let stops: Vec<String> = match params.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(other) => serde_json::from_value(other).map_err(|_| {
            ApiError::invalid(format!("{param}.stop"), "a string or a list of strings")
        })?,
    };
    for stop in stops {
        let ids = limits
            .codec
            .encode(&stop)
            .map_err(|e| ApiError::invalid(format!("{param}.stop"), e.to_string()))?;
        if !ids.is_empty() {
            stop_sequences.push(ids);
        }
    }
    let top_k = params.top_k.unwrap_or(-1);
    Ok(OwnedGenerate {
        tokens,
        images,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k: usize::try_from(top_k).unwrap_or(0),
        },
        seed: params.sampling_seed.unwrap_or(0),
        max_new_tokens,
        stop_sequences,
        // Only the context may hold image pads.
        banned_tokens: vec![limits.image_pad],
    })
}

/// One request's answer in SGLang's shape.
pub(crate) fn answer(
    generation: &Generation,
    codec: &dyn TokenCodec,
    id: String,
    prompt_tokens: usize,
    logprobs: bool,
    weight_version: &str,
) -> Value {
    let finish = match generation.finish {
        FinishReason::Stop => json!({"type": "stop", "matched": generation.tokens.last()}),
        FinishReason::Length => json!({"type": "length", "length": generation.tokens.len()}),
    };
    let mut meta = json!({
        "id": id,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generation.tokens.len(),
        "cached_tokens": 0,
        "weight_version": weight_version,
    });
    if logprobs {
        meta["output_token_logprobs"] = generation
            .logprobs
            .iter()
            .zip(&generation.tokens)
            // The f32's shortest decimal, so a client reading it as f32 gets the same bits
            // (widened to f64 it would print as -0.25146210193634033).
            .map(|(lp, id)| json!([lp.to_string().parse::<f64>().unwrap_or(f64::NAN), id, null]))
            .collect();
    }
    json!({
        "text": codec.decode(&generation.tokens).unwrap_or_default(),
        "output_ids": generation.tokens,
        "meta_info": meta,
    })
}

/// SGLang's `/update_weights_from_disk` request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateWeightsIn {
    /// A bundle or checkpoint directory (its `model.safetensors`), or a `.safetensors` file.
    pub(crate) model_path: String,
    /// The version the server reports from now on.
    #[serde(default)]
    pub(crate) weight_version: Option<String>,
    #[serde(default, rename = "load_format")]
    _load_format: Option<IgnoredAny>,
    #[serde(default, rename = "flush_cache")]
    _flush_cache: Option<IgnoredAny>,
    #[serde(default, rename = "abort_all_requests")]
    _abort_all_requests: Option<IgnoredAny>,
    // Options of SGLang's GPU engine with no meaning here.
    #[serde(default, rename = "is_async")]
    _is_async: Option<IgnoredAny>,
    #[serde(default, rename = "torch_empty_cache")]
    _torch_empty_cache: Option<IgnoredAny>,
    #[serde(default, rename = "keep_pause")]
    _keep_pause: Option<IgnoredAny>,
    #[serde(default, rename = "recapture_cuda_graph")]
    _recapture_cuda_graph: Option<IgnoredAny>,
    #[serde(default, rename = "token_step")]
    _token_step: Option<IgnoredAny>,
    #[serde(default, rename = "manifest")]
    _manifest: Option<IgnoredAny>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A codec of single characters, for request checking without a model.
    struct Chars;

    impl TokenCodec for Chars {
        fn encode(&self, text: &str) -> crate::Result<Vec<u32>> {
            Ok(text.chars().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32]) -> crate::Result<String> {
            Ok(ids.iter().filter_map(|&i| char::from_u32(i)).collect())
        }
    }

    fn limits() -> GenerateLimits<'static> {
        GenerateLimits {
            codec: &Chars,
            image_pad: 9,
            preprocess: PreprocessConfig::default(),
            image: ImageLimits::default(),
            max_images: 4,
            max_batch: 8,
        }
    }

    fn b64_png(w: u32, h: u32) -> String {
        let png = Image::from_raw(w, h, vec![90; (w * h * 3) as usize])
            .unwrap()
            .to_png()
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    }

    #[test]
    fn single_and_batched_requests_with_images_and_expanded_pads() {
        let limits = limits();
        let visual = limits.preprocess.image_token_count(56, 56).unwrap();
        let mut expanded = vec![1, 2];
        expanded.extend(std::iter::repeat_n(9, visual));
        expanded.push(3);
        let body = json!({
            "input_ids": [[1, 9, 3], expanded],
            "image_data": [b64_png(56, 56), [format!("data:image/png;base64,{}", b64_png(56, 56))]],
            "sampling_params": [{"temperature": 0, "max_new_tokens": 5, "stop_token_ids": [7]},
                                {"temperature": 1, "top_k": -1, "sampling_seed": 3, "stop": "ab"}],
            "return_logprob": true,
            "rid": ["a", "b"],
        });
        let call = parse(body.to_string().as_bytes(), &limits).unwrap();
        assert!(call.batched);
        assert_eq!(call.requests[0].tokens, vec![1, 9, 3]);
        assert_eq!(
            call.requests[1].tokens,
            vec![1, 2, 9, 3],
            "the run of pads became one"
        );
        assert_eq!(call.prompt_tokens, vec![2 + visual, 3 + visual]);
        assert_eq!(call.requests[0].stop_sequences, vec![vec![7]]);
        assert_eq!(call.requests[1].stop_sequences, vec![vec![97, 98]]);
        assert_eq!(call.requests[1].seed, 3);
        assert_eq!(call.requests[1].sampling.top_k, 0);
        assert_eq!(call.requests[0].banned_tokens, vec![9]);
        assert_eq!(call.rids, vec![Some("a".into()), Some("b".into())]);

        let one = parse(json!({"input_ids": [4, 5]}).to_string().as_bytes(), &limits).unwrap();
        assert!(!one.batched);
        assert_eq!(one.requests[0].max_new_tokens, 128, "SGLang's default");
    }

    /// A contract fixture in SGLang's documented shape (`tests/data/sglang`).
    fn fixture(name: &str) -> String {
        let path = format!("{}/../tests/data/sglang/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn sglangs_documented_generate_request_is_taken() {
        let text = fixture("generate_request.json").replace("IMAGE", &b64_png(56, 56));
        let limits = GenerateLimits {
            image_pad: 151655,
            ..limits()
        };
        let call = parse(text.as_bytes(), &limits).unwrap();
        assert!(call.batched);
        assert_eq!(call.requests.len(), 2);
        assert_eq!(call.requests[0].images.len(), 1);
        assert_eq!(call.requests[1].images.len(), 2);
        assert_eq!(call.requests[0].seed, 11);
        assert_eq!(call.requests[0].stop_sequences, vec![vec![151645]]);
        assert_eq!(call.requests[1].sampling.temperature, 0.0);
        assert_eq!(call.requests[1].max_new_tokens, 32);
        assert_eq!(call.return_logprob, vec![true, true]);
        assert_eq!(call.rids[1].as_deref(), Some("group-0-sample-1"));
    }

    #[test]
    fn sglangs_update_request_with_every_option_is_taken() {
        let request: UpdateWeightsIn =
            serde_json::from_str(&fixture("update_weights_request.json")).unwrap();
        assert_eq!(request.weight_version.as_deref(), Some("7"));
        assert!(request.model_path.ends_with("version-7.safetensors"));
    }

    #[test]
    fn bad_generate_requests_name_the_field() {
        let limits = limits();
        let cases = [
            (json!({"input_ids": [1, 9]}), "input_ids", "image pads"),
            (
                json!({"input_ids": [1, 9, 9], "image_data": b64_png(56, 56)}),
                "input_ids",
                "run of 2",
            ),
            (
                json!({"input_ids": [1], "image_data": "/etc/passwd"}),
                "image_data[0]",
                "not fetched",
            ),
            (
                json!({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}),
                "sampling_params.max_new_tokens",
                "at least 1",
            ),
            (
                json!({"input_ids": [1], "sampling_params": {"min_p": 0.1}}),
                "sampling_params.min_p",
                "unknown field",
            ),
            (
                json!({"input_ids": [1], "stream": true}),
                "stream",
                "not supported",
            ),
            (json!({"input_ids": "hello"}), "input_ids", "token ids"),
            (json!({"text": "hello"}), "text", "unknown field"),
        ];
        for (body, param, words) in cases {
            let err = parse(body.to_string().as_bytes(), &limits).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
            assert!(err.message.contains(words), "{body}: {}", err.message);
        }
    }
}
