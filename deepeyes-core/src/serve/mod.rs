//! The thinking-with-images agent behind an OpenAI-compatible HTTP API (axum on tokio).
//!
//! - `POST /v1/chat/completions`: a question with `image_url` parts (data URLs); the agent loop,
//!   tools included, runs inside the request. `choices[i].message.content` holds the answer,
//!   `reasoning_content` every turn's text, and the `deepeyes` field of each choice the episode:
//!   turns, tool calls with their arguments and outcomes, and the crops as PNG data URLs.
//!   `stream: true` sends one chunk per turn as it ends, then the answer, then `data: [DONE]`.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! - SGLang's native API for remote rollouts: `POST /generate` (token ids and images in, ids and
//!   log-probs out, each call's batch run as sent), `POST /update_weights_from_disk` (new weights
//!   without a restart; needs the API key, or `allow-weight-updates` when none is set),
//!   `GET /get_model_info`, `GET /get_weight_version`.
//!
//! Requests in flight are stepped together: one batched generate call per round, new requests
//! joining at round (turn) boundaries. More than
//! [`ServeConfig::max_requests`] in flight are answered 429. Every refusal is an OpenAI-style
//! JSON error with a 4xx status naming the field at fault, and the server keeps serving.

mod api_error;
mod chat;
mod generate;
mod metrics;
mod scheduler;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub use chat::IGNORED_CHAT_FIELDS;

use crate::agent::AgentConfig;
use crate::error::{Error, Result};
use crate::image::ImageLimits;
use crate::model::VisionLanguageModel;
use crate::preprocess::PreprocessConfig;
use crate::protocol::PromptTemplates;
use crate::tool::Tool;
use crate::trajectory::Trajectory;
use crate::weights::WeightReceiver;

use api_error::ApiError;
use chat::{ChatJob, RequestLimits, Usage};
use metrics::{Metrics, Ticket};
use scheduler::{EpisodeRequest, Event, Job, SchedulerHandle, SchedulerParts};

/// How the server runs and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServeConfig {
    /// The model name clients must send (`model`), and `/v1/models` lists.
    pub model_name: String,
    /// Requests admitted at once (running or waiting for room in the batch); more are answered
    /// 429.
    pub max_requests: usize,
    /// Most episodes stepped in one batched generate round.
    pub max_batch: usize,
    /// Largest request body, in bytes; a larger one is answered 413.
    pub max_body_bytes: usize,
    /// Most images in one request.
    pub max_images: usize,
    /// Most choices (`n`) in one request.
    pub max_choices: usize,
    /// Decode limits of every image a request sends.
    pub image_limits: ImageLimits,
    /// The key clients must send as `Authorization: Bearer <key>` on `/v1/…` and SGLang's
    /// routes; none when unset.
    #[serde(skip_serializing)]
    pub api_key: Option<String>,
    /// Take `/update_weights_from_disk` without an API key (false). With a key set, the key is
    /// what allows it.
    pub allow_weight_updates: bool,
    /// Fetch `http(s)` image URLs in requests (false: only data URLs are taken; a server that
    /// fetches can be made to reach any address it can reach).
    pub allow_image_urls: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "deepeyes".into(),
            max_requests: 64,
            max_batch: 32,
            max_body_bytes: 32 * 1024 * 1024,
            max_images: 8,
            max_choices: 16,
            image_limits: ImageLimits {
                // A request's images are decoded in memory: a tighter cap than files from disk.
                max_file_bytes: 20 * 1024 * 1024,
                ..ImageLimits::default()
            },
            api_key: None,
            allow_weight_updates: false,
            allow_image_urls: false,
        }
    }
}

/// The model a server runs: any backend, and, when it takes new weights, the same model as a
/// [`WeightReceiver`].
#[derive(Clone)]
pub struct ServedModel {
    model: Arc<dyn VisionLanguageModel>,
    receiver: Option<Arc<dyn WeightReceiver + Send + Sync>>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("takes_weights", &self.receiver.is_some())
            .finish_non_exhaustive()
    }
}

impl ServedModel {
    /// A model whose weights never change.
    pub fn fixed(model: Arc<dyn VisionLanguageModel>) -> Self {
        Self {
            model,
            receiver: None,
        }
    }

    /// A model that takes new weights (`/update_weights_from_disk`).
    pub fn updatable<M: VisionLanguageModel + WeightReceiver + Send + Sync + 'static>(
        model: Arc<M>,
    ) -> Self {
        Self {
            model: model.clone(),
            receiver: Some(model),
        }
    }
}

impl ServeConfig {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::config(format!("serve.{field}"), why));
        if self.model_name.trim().is_empty() {
            return bad("model-name", "must not be empty");
        }
        for (field, value) in [
            ("max-requests", self.max_requests),
            ("max-batch", self.max_batch),
            ("max-body-bytes", self.max_body_bytes),
            ("max-images", self.max_images),
            ("max-choices", self.max_choices),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            return bad("api-key", "is set but empty");
        }
        Ok(())
    }
}

/// A running agent server: the batching thread and the HTTP routes over it.
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<ServerState>,
}

struct ServerState {
    config: ServeConfig,
    model: Arc<dyn VisionLanguageModel>,
    image_pad: u32,
    /// The version SGLang's routes report (`default` until weights are loaded).
    weight_version: std::sync::Mutex<String>,
    limits: RequestLimits,
    preprocess: PreprocessConfig,
    scheduler: SchedulerHandle,
    metrics: Arc<Metrics>,
    created: u64,
    next_id: AtomicU64,
}

impl Server {
    /// A server of `model` with `tools`, prompting with `templates` and stepping episodes under
    /// `agent` (the limits the model was trained with). Starts the batching thread.
    pub fn new(
        served: ServedModel,
        tools: Vec<Arc<dyn Tool>>,
        templates: PromptTemplates,
        agent: AgentConfig,
        config: ServeConfig,
    ) -> Result<Self> {
        config.validate()?;
        let model = served.model;
        let preprocess = model.preprocess_config();
        let metrics = Arc::new(Metrics::default());
        let max_images = config.max_images.min(agent.max_images);
        let scheduler = scheduler::spawn(SchedulerParts {
            model: model.clone(),
            tools,
            templates,
            agent,
            max_batch: config.max_batch,
            metrics: metrics.clone(),
            receiver: served.receiver,
        })?;
        let image_pad = match model.codec().encode(crate::protocol::IMAGE_PAD)?.as_slice() {
            [id] => *id,
            other => {
                return Err(Error::Tokenizer(format!(
                    "{} must be one token, but encodes to {other:?}",
                    crate::protocol::IMAGE_PAD
                )));
            }
        };
        let limits = RequestLimits {
            model_name: config.model_name.clone(),
            max_images,
            max_choices: config.max_choices,
            image: config.image_limits,
            preprocess,
            fetch_urls: config.allow_image_urls,
        };
        Ok(Self {
            state: Arc::new(ServerState {
                model,
                image_pad,
                weight_version: std::sync::Mutex::new("default".into()),
                limits,
                preprocess,
                scheduler,
                metrics,
                created: unix_now(),
                next_id: AtomicU64::new(0),
                config,
            }),
        })
    }

    /// The routes, ready for `axum::serve`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .route("/generate", post(sglang_generate))
            .route("/update_weights_from_disk", post(update_weights_from_disk))
            .route("/get_model_info", get(model_info))
            .route("/get_weight_version", get(weight_version))
            .fallback(not_found)
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::Model(format!("the HTTP server failed: {e}")))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// Refuses a `/v1/…` request without the configured key.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.config.api_key else {
            return Ok(());
        };
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::status(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .with_code("invalid_api_key"))
        }
    }

    /// A place among the requests in flight, or 429.
    fn admit(&self) -> Result<Ticket, ApiError> {
        self.metrics.admit(self.config.max_requests).ok_or_else(|| {
            ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} requests are in flight, the most this server takes; retry later",
                    self.config.max_requests
                ),
            )
        })
    }

    fn weight_version(&self) -> String {
        self.weight_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn next_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("chatcmpl-{:x}{n:06x}", self.created)
    }

    /// The seed of a request that sent none: distinct per request.
    fn fresh_seed(&self) -> u64 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        crate::rng::Rng::derive_seed(nanos, &[self.next_id.load(Ordering::Relaxed)])
    }
}

async fn not_found() -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "no such route")
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics_text(State(state): State<Arc<ServerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let response = match state.authorize(&headers) {
        Err(e) => e.into_response(),
        Ok(()) => axum::Json(json!({
            "object": "list",
            "data": [{
                "id": state.config.model_name,
                "object": "model",
                "created": state.created,
                "owned_by": "deepeyes",
            }],
        }))
        .into_response(),
    };
    state.metrics.request(
        "models",
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match admit_chat(&state, &headers, body).await {
        Err(e) => {
            tracing::debug!(status = %e.status, message = %e.message, "refused a chat request");
            e.into_response()
        }
        Ok((job, ticket)) => answer_chat(state.clone(), job, ticket, started).await,
    };
    if response.status() != StatusCode::OK || !is_stream(&response) {
        state.metrics.request(
            "chat",
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    response
}

fn is_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Reads a request body within the size limit, then checks the API key.
async fn read_body(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let too_large = |size: &str| {
        ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is {size}, over this server's limit of {limit} bytes"),
        )
    };
    // A body announced too large is refused before a byte of it is read.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = announced.filter(|&l| l > limit as u64) {
        return Err(too_large(&format!("{length} bytes")));
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large("longer than announced")
        } else {
            ApiError::invalid("body", format!("the request body could not be read: {e}"))
        }
    })?;
    // The key is checked once the body is read: a client told 401 while still sending would
    // see a broken pipe instead of the answer.
    state.authorize(headers)?;
    Ok(body)
}

/// Checks the key, the body and the request, and takes a place among those in flight.
async fn admit_chat(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(ChatJob, Ticket), ApiError> {
    let body = read_body(state, headers, body).await?;
    // Decoding images (and fetching them, when allowed) blocks: off the async workers.
    let limits = state.limits.clone();
    let job = tokio::task::spawn_blocking(move || chat::parse_request(&body, &limits))
        .await
        .map_err(|e| ApiError::from(Error::Model(format!("the request reader failed: {e}"))))??;
    Ok((job, state.admit()?))
}

/// Hands the job to the batching loop and answers from its events.
async fn answer_chat(
    state: Arc<ServerState>,
    job: ChatJob,
    ticket: Ticket,
    started: Instant,
) -> Response {
    let (tx, rx) = unbounded_channel();
    let seed = job.seed.unwrap_or_else(|| state.fresh_seed());
    let submitted = state.scheduler.submit(Job::Episodes(EpisodeRequest {
        task: job.task,
        choices: job.choices,
        seed,
        sampling: job.sampling,
        completion_limit: job.completion_limit,
        report_turns: job.stream,
        events: tx,
    }));
    if let Err(e) = submitted {
        return ApiError::from(e).into_response();
    }
    let reply = Reply {
        id: state.next_id(),
        created: unix_now(),
        choices: job.choices,
        include_usage: job.include_usage,
        state,
    };
    if job.stream {
        reply.stream(rx, ticket, started)
    } else {
        reply.whole(rx, ticket).await
    }
}

/// What every part of one answer shares.
struct Reply {
    id: String,
    created: u64,
    choices: usize,
    include_usage: bool,
    state: Arc<ServerState>,
}

impl Reply {
    /// Waits for every choice and answers with one chat completion.
    async fn whole(self, mut rx: UnboundedReceiver<Event>, _ticket: Ticket) -> Response {
        let mut done: Vec<Option<Box<Trajectory>>> = (0..self.choices).map(|_| None).collect();
        while done.iter().any(Option::is_none) {
            match rx.recv().await {
                Some(Event::Done { choice, trajectory }) => done[choice] = Some(trajectory),
                Some(Event::Turn { .. }) => {}
                Some(Event::Failed(e)) => return ApiError::from(e).into_response(),
                None => {
                    return ApiError::from(Error::Model("the batching loop stopped".into()))
                        .into_response();
                }
            }
        }
        let trajectories: Vec<&Trajectory> = done.iter().flatten().map(|t| &**t).collect();
        let usage = Usage::of(&trajectories, &self.state.preprocess);
        self.state
            .metrics
            .tokens(usage.prompt_tokens, usage.completion_tokens);
        let choices: Vec<Value> = trajectories
            .iter()
            .enumerate()
            .map(|(index, traj)| {
                json!({
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": chat::content(traj),
                        "reasoning_content": chat::reasoning(traj),
                    },
                    "finish_reason": chat::finish_reason(traj.stop),
                    "deepeyes": chat::episode_json(traj),
                })
            })
            .collect();
        axum::Json(json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.config.model_name,
            "choices": choices,
            "usage": usage,
        }))
        .into_response()
    }

    /// One chunk of the stream.
    fn chunk(&self, choices: Value, usage: Option<Usage>) -> SseEvent {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.state.config.model_name,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = json!(usage);
        }
        SseEvent::default().data(chunk.to_string())
    }

    /// Streams each choice's turns as they end (`reasoning_content`, and the turn with its tool
    /// calls and crops under `deepeyes`), then its answer (`content`) with the finish reason,
    /// then `[DONE]`. A failure mid-stream is sent as an `error` chunk.
    fn stream(self, rx: UnboundedReceiver<Event>, ticket: Ticket, started: Instant) -> Response {
        let opening: Vec<SseEvent> = (0..self.choices)
            .map(|index| {
                self.chunk(
                    json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                    None,
                )
            })
            .collect();
        let state = StreamState {
            reply: self,
            rx,
            pending: opening.into(),
            turns_sent: Vec::new(),
            finished: Vec::new(),
            closed: false,
            ticket: Some(ticket),
            started,
        };
        let events = futures_util::stream::unfold(state, |mut s| async move {
            s.next()
                .await
                .map(|event| (Ok::<_, std::convert::Infallible>(event), s))
        });
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

/// The state of one streamed answer.
struct StreamState {
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    pending: std::collections::VecDeque<SseEvent>,
    turns_sent: Vec<usize>,
    finished: Vec<Trajectory>,
    closed: bool,
    ticket: Option<Ticket>,
    started: Instant,
}

impl StreamState {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.closed {
                return None;
            }
            if self.finished.len() == self.reply.choices {
                self.close(None);
                continue;
            }
            match self.rx.recv().await {
                Some(Event::Turn { choice, trajectory }) => self.turns(choice, &trajectory),
                Some(Event::Done { choice, trajectory }) => {
                    self.turns(choice, &trajectory);
                    let delta = json!({"content": chat::content(&trajectory)});
                    let end = self.reply.chunk(
                        json!([{
                            "index": choice,
                            "delta": delta,
                            "finish_reason": chat::finish_reason(trajectory.stop),
                            "deepeyes": {"stop": trajectory.stop, "answer": trajectory.answer},
                        }]),
                        None,
                    );
                    self.pending.push_back(end);
                    self.finished.push(*trajectory);
                }
                Some(Event::Failed(e)) => self.close(Some(ApiError::from(e))),
                None => self.close(Some(ApiError::from(Error::Model(
                    "the batching loop stopped".into(),
                )))),
            }
        }
    }

    /// Queues the turns of `choice` not yet sent.
    fn turns(&mut self, choice: usize, traj: &Trajectory) {
        if self.turns_sent.len() <= choice {
            self.turns_sent.resize(choice + 1, 0);
        }
        for turn in self.turns_sent[choice]..traj.turns.len() {
            let mut text = traj.turns[turn].text.clone();
            if turn > 0 {
                text.insert(0, '\n');
            }
            let chunk = self.reply.chunk(
                json!([{
                    "index": choice,
                    "delta": {"reasoning_content": text},
                    "finish_reason": null,
                    "deepeyes": {"turn": chat::turn_json(traj, turn)},
                }]),
                None,
            );
            self.pending.push_back(chunk);
        }
        self.turns_sent[choice] = traj.turns.len();
    }

    /// Ends the stream: the usage chunk when asked for, or the error, then `[DONE]`.
    fn close(&mut self, error: Option<ApiError>) {
        let status = match &error {
            Some(e) => {
                self.pending.push_back(SseEvent::default().data(e.body()));
                e.status.as_u16()
            }
            None => {
                let trajectories: Vec<&Trajectory> = self.finished.iter().collect();
                let usage = Usage::of(&trajectories, &self.reply.state.preprocess);
                self.reply
                    .state
                    .metrics
                    .tokens(usage.prompt_tokens, usage.completion_tokens);
                if self.reply.include_usage {
                    self.pending
                        .push_back(self.reply.chunk(json!([]), Some(usage)));
                }
                200
            }
        };
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.reply
            .state
            .metrics
            .request("chat", status, self.started.elapsed().as_secs_f64());
        self.ticket = None;
        self.closed = true;
    }
}

/// Counts a request of `route` as answered with `response`'s status.
fn counted(
    state: &ServerState,
    route: &'static str,
    started: Instant,
    response: Response,
) -> Response {
    state.metrics.request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// SGLang's `POST /generate`: the call's requests run as one batch between agent rounds.
async fn sglang_generate(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match run_generate(&state, &headers, body).await {
        Ok(value) => axum::Json(value).into_response(),
        Err(e) => e.into_response(),
    };
    counted(&state, "generate", started, response)
}

async fn run_generate(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let body = read_body(state, headers, body).await?;
    let call = generate::parse(
        &body,
        &generate::GenerateLimits {
            codec: state.model.codec(),
            image_pad: state.image_pad,
            preprocess: state.preprocess,
            image: state.config.image_limits,
            max_images: state.config.max_images,
            max_batch: state.config.max_batch.max(state.config.max_choices),
        },
    )?;
    let _ticket = state.admit()?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    state
        .scheduler
        .submit(Job::Generate {
            requests: call.requests,
            reply,
        })
        .map_err(ApiError::from)?;
    let generations = answer
        .await
        .map_err(|_| ApiError::from(Error::Model("the batching loop stopped".into())))?;
    let version = state.weight_version();
    let mut answers = Vec::with_capacity(generations.len());
    let mut completion = 0;
    for (i, generation) in generations.into_iter().enumerate() {
        let generation = generation.map_err(ApiError::from)?;
        completion += generation.tokens.len();
        let id = call.rids[i].clone().unwrap_or_else(|| state.next_id());
        answers.push(generate::answer(
            &generation,
            state.model.codec(),
            id,
            call.prompt_tokens[i],
            call.return_logprob[i],
            &version,
        ));
    }
    state
        .metrics
        .tokens(call.prompt_tokens.iter().sum(), completion);
    Ok(if call.batched {
        Value::Array(answers)
    } else {
        answers.remove(0)
    })
}

/// SGLang's `POST /update_weights_from_disk`: the weights of a bundle, checkpoint or
/// `.safetensors` file, taken between rounds; `weight_version` is reported from then on.
async fn update_weights_from_disk(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = match load_weights(&state, &headers, body).await {
        Ok(message) => {
            axum::Json(json!({"success": true, "message": message, "num_paused_requests": 0}))
                .into_response()
        }
        Err(e) => {
            let status = e.status;
            (
                status,
                axum::Json(
                    json!({"success": false, "message": e.message, "num_paused_requests": 0}),
                ),
            )
                .into_response()
        }
    };
    counted(&state, "update_weights", started, response)
}

async fn load_weights(
    state: &ServerState,
    headers: &HeaderMap,
    body: Body,
) -> Result<String, ApiError> {
    let body = read_body(state, headers, body).await?;
    if state.config.api_key.is_none() && !state.config.allow_weight_updates {
        return Err(ApiError::status(
            StatusCode::FORBIDDEN,
            "weight updates need an API key (--api-key-env) or --allow-weight-updates",
        ));
    }
    let request: generate::UpdateWeightsIn = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            "body",
            format!("not an update_weights_from_disk request: {e}"),
        )
    })?;
    let path = std::path::PathBuf::from(&request.model_path);
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path
    };
    let read = file.clone();
    let weights =
        tokio::task::spawn_blocking(move || crate::onnx::weights::read_safetensors(&read))
            .await
            .map_err(|e| ApiError::from(Error::Model(format!("the weight reader failed: {e}"))))?
            .map_err(|e| ApiError::invalid("model_path", format!("{}: {e}", file.display())))?;
    let (reply, done) = tokio::sync::oneshot::channel();
    state
        .scheduler
        .submit(Job::Weights {
            weights: Box::new(weights),
            reply,
        })
        .map_err(ApiError::from)?;
    done.await
        .map_err(|_| ApiError::from(Error::Model("the batching loop stopped".into())))?
        .map_err(|e| ApiError::invalid("model_path", format!("{}: {e}", file.display())))?;
    let version = request
        .weight_version
        .unwrap_or_else(|| request.model_path.clone());
    *state
        .weight_version
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = version.clone();
    tracing::info!(path = %file.display(), %version, "took new weights");
    Ok(format!(
        "loaded {} as weight version {version}",
        file.display()
    ))
}

/// SGLang's `GET /get_model_info`.
async fn model_info(State(state): State<Arc<ServerState>>) -> Response {
    axum::Json(json!({
        "model_path": state.config.model_name,
        "tokenizer_path": state.config.model_name,
        "is_generation": true,
        "weight_version": state.weight_version(),
    }))
    .into_response()
}

/// SGLang's `GET /get_weight_version`.
async fn weight_version(State(state): State<Arc<ServerState>>) -> Response {
    axum::Json(json!({"weight_version": state.weight_version()})).into_response()
}
