//! `kiln serve`: an OpenAI-compatible HTTP server on the batched engine (axum on tokio).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streaming as server-sent events
//! or not), `GET /v1/models`, `GET /health` (ready once the model is loaded), `GET /metrics`
//! (Prometheus), `POST /tokenize`, `POST /detokenize`, and `GET /`, a chat page.
//!
//! Each request's choices go to the [`Engine`]; one bridge thread per choice forwards its events
//! to the async handler and notices when the client has gone (the stream's receiver is dropped),
//! which cancels the choice, so its blocks are freed at the engine's next step. Bad requests get
//! OpenAI's error JSON and never reach the engine.

pub mod metrics;
pub mod openai;

use crate::engine::{Engine, EngineConfig, Event, FinishReason, Request, Usage};
use crate::model::Model;
use crate::{KilnError, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::Metrics;
use openai::{ApiError, ApiResult, Fields};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// The model name `/v1/models` lists and responses carry; default: the model file's name.
    pub model_name: Option<String>,
    pub engine: EngineConfig,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long running streams may take to finish.
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            model_name: None,
            engine: EngineConfig::default(),
            max_body_bytes: 1 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The loaded model and its engine.
struct Ready {
    engine: Engine,
    model: Arc<Model>,
    name: String,
}

struct AppState {
    ready: OnceLock<Ready>,
    metrics: Metrics,
    /// Set on SIGINT/SIGTERM: /health turns unready so load balancers stop sending.
    draining: AtomicBool,
}

impl AppState {
    fn ready(&self) -> ApiResult<&Ready> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the model is still loading")
                .with_code("model_loading")
        })
    }

    fn reject(&self, e: ApiError) -> Response {
        let outcome = if e.status == StatusCode::SERVICE_UNAVAILABLE { "busy" } else { "rejected" };
        self.metrics.requests.with_label_values(&[outcome]).inc();
        error_response(e)
    }
}

fn error_response(e: ApiError) -> Response {
    let mut response = (e.status, Json(e.body())).into_response();
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// Bind, load the model (while already answering /health with "loading"), serve until SIGINT
/// or SIGTERM, then let running streams finish for up to `shutdown_timeout`.
pub fn run(options: ServeOptions, load: impl FnOnce() -> Result<Model> + Send + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| KilnError::Request(format!("could not start the async runtime: {e}")))?;
    runtime.block_on(serve(options, load))
}

async fn serve(options: ServeOptions, load: impl FnOnce() -> Result<Model> + Send + 'static) -> Result<()> {
    let addr = format!("{}:{}", options.host, options.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| KilnError::Request(format!("cannot listen on {addr}: {e}")))?;
    let local: SocketAddr = listener.local_addr().map_err(|e| KilnError::Request(e.to_string()))?;
    eprintln!("kiln serve: listening on http://{local}");

    let state =
        Arc::new(AppState { ready: OnceLock::new(), metrics: Metrics::new(), draining: AtomicBool::new(false) });
    let (failed_tx, mut failed_rx) = mpsc::channel::<KilnError>(1);
    {
        let (state, engine_config, name) = (state.clone(), options.engine.clone(), options.model_name.clone());
        tokio::task::spawn_blocking(move || {
            let started = load().and_then(|model| {
                let model = Arc::new(model);
                let engine = Engine::start(model.clone(), engine_config)?;
                let name = name.unwrap_or_else(|| default_model_name(&model));
                Ok(Ready { engine, model, name })
            });
            match started {
                Ok(ready) => {
                    let s = ready.engine.stats();
                    eprintln!(
                        "kiln serve: ready: {} ({} KV blocks of {} positions, {:.1} MiB; context {})",
                        ready.name,
                        s.blocks_total,
                        s.block_size,
                        s.kv_bytes as f64 / 1048576.0,
                        ready.engine.max_context()
                    );
                    let _ = state.ready.set(ready);
                }
                Err(e) => {
                    let _ = failed_tx.blocking_send(e);
                }
            }
        });
    }

    let app = router(state.clone(), options.max_body_bytes);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let server = tokio::spawn(async move { server.await });

    // Wait for a signal or a failed load.
    // (A load that succeeded drops its sender: that branch is then disabled, not taken.)
    let load_error = tokio::select! {
        _ = shutdown_signal() => None,
        Some(e) = failed_rx.recv() => Some(e),
    };
    if let Some(e) = &load_error {
        eprintln!("kiln serve: loading failed: {e}");
    } else {
        eprintln!(
            "kiln serve: shutting down: no new connections; running streams get up to {:.0} s",
            options.shutdown_timeout.as_secs_f64()
        );
    }
    state.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    match tokio::time::timeout(options.shutdown_timeout, server).await {
        Ok(_) => eprintln!("kiln serve: all connections closed"),
        Err(_) => eprintln!("kiln serve: shutdown deadline reached; closing the remaining streams"),
    }
    match load_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn default_model_name(model: &Model) -> String {
    let p = &model.dir;
    let name = if p.is_file() { p.file_stem() } else { p.file_name() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln".into())
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/", get(chat_page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

async fn not_found() -> Response {
    error_response(ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route"))
}

async fn method_not_allowed() -> Response {
    error_response(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed"))
}

async fn chat_page() -> Html<&'static str> {
    Html(include_str!("chat.html"))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response();
    }
    match st.ready.get() {
        // The GPU device was lost: this replica can serve nothing more until it restarts.
        Some(r) if r.engine.stats().stopped.is_some() => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "failed", "reason": r.engine.stats().stopped})))
                .into_response()
        }
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.ready.get().map(|r| r.engine.stats());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render(stats.as_ref())).into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    match st.ready() {
        Ok(r) => {
            let card = |id: String, parent: Option<&str>| {
                json!({
                    "id": id,
                    "object": "model",
                    "created": unix_time(),
                    "owned_by": "kiln",
                    "root": r.name,
                    "parent": parent,
                    "max_model_len": r.engine.max_context(),
                })
            };
            let mut data = vec![card(r.name.clone(), None)];
            // Each LoRA adapter is a model of its own, as vLLM lists them.
            data.extend(
                r.model.weights.lora.list.iter().map(|(a, _, _)| card(format!("{}:{a}", r.name), Some(&r.name))),
            );
            Json(json!({ "object": "list", "data": data })).into_response()
        }
        Err(e) => error_response(e),
    }
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The body as a JSON object: 413 past the size limit, 400 for anything malformed.
fn body_object(body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Map<String, Value>> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is over the server's size limit (--max-body)".to_string()
        } else {
            e.body_text()
        };
        ApiError::new(status, "invalid_request_error", message)
    })?;
    openai::parse_object(&bytes)
}

async fn tokenize(State(st): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let ready = st.ready()?;
        let obj = body_object(body)?;
        let tokenizer = &ready.model.tokenizer;
        let tokens = if obj.contains_key("messages") {
            let messages = openai::messages(&obj)?;
            tokenizer.encode_chat(&messages, true).map_err(|e| ApiError::bad("messages", e.to_string()))?
        } else {
            let f = Fields(&obj);
            let text = f.str("prompt")?.ok_or_else(|| ApiError::bad("prompt", "`prompt` or `messages` is required"))?;
            let special = f.bool("add_special_tokens")?.unwrap_or(true);
            tokenizer.encode(text, special).map_err(|e| ApiError::bad("prompt", e.to_string()))?
        };
        Ok(json!({"tokens": tokens, "count": tokens.len(), "max_model_len": ready.engine.max_context()}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

async fn detokenize(State(st): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let ready = st.ready()?;
        let obj = body_object(body)?;
        let vocab = ready.model.config.vocab_size as u64;
        let ids: Option<Vec<u32>> = obj
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_u64().filter(|&t| t < vocab).map(|t| t as u32)).collect());
        let ids = ids.ok_or_else(|| {
            ApiError::bad("tokens", format!("`tokens` must be a list of token ids below the vocabulary size {vocab}"))
        })?;
        let text = ready.model.tokenizer.decode(&ids, false).map_err(|e| ApiError::bad("tokens", e.to_string()))?;
        Ok(json!({"prompt": text}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

/// One choice's events, forwarded from its bridge thread.
type ChoiceEvent = (usize, Event);

/// Forward each request's events to one async channel, recording latency metrics. A bridge
/// whose receiver is gone (the client disconnected) drops its request, which cancels it.
fn bridge(st: &Arc<AppState>, requests: Vec<Request>, arrival: Instant) -> mpsc::Receiver<ChoiceEvent> {
    let (tx, rx) = mpsc::channel(256);
    for (index, request) in requests.into_iter().enumerate() {
        let (tx, st) = (tx.clone(), st.clone());
        std::thread::spawn(move || {
            let mut last: Option<Instant> = None;
            let mut finished = false;
            loop {
                match request.events().recv_timeout(Duration::from_millis(50)) {
                    Ok(event) => {
                        let m = &st.metrics;
                        match &event {
                            Event::Token { .. } => {
                                let now = Instant::now();
                                match last {
                                    None => m.time_to_first_token.observe(now.duration_since(arrival).as_secs_f64()),
                                    Some(t) => m.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
                                }
                                last = Some(now);
                            }
                            Event::Done { reason, usage } => {
                                let outcome = match reason {
                                    FinishReason::MaxTokens => "length",
                                    FinishReason::Cancelled => "cancelled",
                                    _ => "stop",
                                };
                                m.requests.with_label_values(&[outcome]).inc();
                                m.prompt_tokens.inc_by(usage.prompt_tokens as u64);
                                m.generation_tokens.inc_by(usage.generated_tokens as u64);
                                m.prefix_cache_hit_tokens.inc_by(usage.cached_tokens as u64);
                            }
                            Event::Failed(_) => m.requests.with_label_values(&["error"]).inc(),
                            Event::Text(_) => {}
                        }
                        finished = matches!(event, Event::Done { .. } | Event::Failed(_));
                        if tx.blocking_send((index, event)).is_err() || finished {
                            break;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if tx.is_closed() {
                            break;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            if !finished {
                // The client is gone: dropping the request cancels it.
                st.metrics.requests.with_label_values(&["cancelled"]).inc();
            }
        });
    }
    rx
}

/// A validated generation request, ready to submit: each prompt's token ids and the params.
struct Job {
    /// The model the request named: the base's name, or `base:adapter` for a LoRA adapter.
    model: String,
    prompts: Vec<Vec<u32>>,
    generation: openai::Generation,
    /// Chat: `logprobs` with `top_logprobs`; completions: the `logprobs` count.
    logprobs: Option<usize>,
}

/// Check lengths against the context, fill in max_tokens, and submit every choice.
fn submit(ready: &Ready, job: &mut Job) -> ApiResult<Vec<Request>> {
    let ctx = ready.engine.max_context();
    let mut requests = Vec::new();
    for prompt in &job.prompts {
        if prompt.len() >= ctx {
            return Err(ApiError::bad(
                "messages",
                format!("the prompt is {} tokens, over the context of {ctx} tokens", prompt.len()),
            )
            .with_code("context_length_exceeded"));
        }
        let max = job.generation.max_tokens.unwrap_or(ctx - prompt.len());
        if prompt.len() + max > ctx {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "{} prompt tokens + {max} new tokens exceed the context of {ctx} tokens; ask for at most {}",
                    prompt.len(),
                    ctx - prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    for prompt in &job.prompts {
        let mut params = job.generation.params.clone();
        params.max_tokens = job.generation.max_tokens.unwrap_or(ctx - prompt.len());
        params.logprobs = job.logprobs;
        match ready.engine.submit_n(prompt.clone(), params, job.generation.n) {
            Ok(r) => requests.extend(r),
            Err(KilnError::Busy(m)) => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("server busy: {m}"))
                    .with_code("server_busy"))
            }
            Err(e @ KilnError::Stopped(_)) => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string()))
            }
            Err(e) => return Err(ApiError::bad("", e.to_string())),
        }
    }
    Ok(requests)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, body, Endpoint::Chat).await
}

async fn completions(State(st): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    generate(st, body, Endpoint::Completions).await
}

/// Read a request of either endpoint into a job.
fn read_job(ready: &Ready, body: std::result::Result<Bytes, BytesRejection>, endpoint: Endpoint) -> ApiResult<Job> {
    let obj = body_object(body)?;
    let model = &ready.model;
    let mut generation = openai::generation(&obj, &model.generation)?;
    let f = Fields(&obj);
    let (model_id, adapters) = adapter_of(ready, f.str("model")?)?;
    generation.params.adapters = adapters;
    let (prompts, logprobs) = match endpoint {
        Endpoint::Chat => {
            let messages = openai::messages(&obj)?;
            let ids =
                model.tokenizer.encode_chat(&messages, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
            let top = f.int_in("top_logprobs", 0, 20)?;
            let logprobs = match (f.bool("logprobs")?.unwrap_or(false), top) {
                (true, top) => Some(top.unwrap_or(0) as usize),
                (false, Some(_)) => return Err(ApiError::bad("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
                (false, None) => None,
            };
            (vec![ids], logprobs)
        }
        Endpoint::Completions => {
            if obj.get("echo").and_then(Value::as_bool) == Some(true) {
                return Err(ApiError::bad("echo", "`echo` is not supported"));
            }
            let prompts = openai::prompts(&obj, &model.tokenizer)?;
            if prompts.iter().any(Vec::is_empty) {
                return Err(ApiError::bad("prompt", "a prompt is empty"));
            }
            let vocab = model.config.vocab_size as u32;
            if prompts.iter().flatten().any(|&t| t >= vocab) {
                return Err(ApiError::bad("prompt", format!("a token id is outside the vocabulary of {vocab}")));
            }
            (prompts, f.int_in("logprobs", 0, 20)?.map(|k| k as usize))
        }
    };
    Ok(Job { model: model_id, prompts, generation, logprobs })
}

/// The model a request names: the served model (or no name: the base), `base:adapter` or just
/// `adapter` for one of the LoRA adapters loaded with `--lora` (vLLM names adapters as models).
/// Returns the name to echo and the adapter mask. Another name that is not an adapter is taken
/// as the base (clients often send a fixed name); `base:unknown` is 404.
fn adapter_of(ready: &Ready, requested: Option<&str>) -> ApiResult<(String, u32)> {
    let lora = &ready.model.weights.lora;
    let Some(name) = requested else { return Ok((ready.name.clone(), 0)) };
    let adapter = name.strip_prefix(&format!("{}:", ready.name)).unwrap_or(name);
    if let Ok(mask) = lora.mask(&[adapter]) {
        return Ok((format!("{}:{adapter}", ready.name), mask));
    }
    if name.starts_with(&format!("{}:", ready.name)) {
        let known: Vec<String> = lora.list.iter().map(|(n, _, _)| format!("{}:{n}", ready.name)).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "the model `{name}` does not exist; served: {}{}",
                ready.name,
                known.iter().map(|k| format!(", {k}")).collect::<String>()
            ),
        )
        .with_code("model_not_found"));
    }
    Ok((ready.name.clone(), 0))
}

async fn generate(st: Arc<AppState>, body: std::result::Result<Bytes, BytesRejection>, endpoint: Endpoint) -> Response {
    let arrival = Instant::now();
    let ready = match st.ready() {
        Ok(r) => r,
        Err(e) => return st.reject(e),
    };
    let mut job = match read_job(ready, body, endpoint) {
        Ok(j) => j,
        Err(e) => return st.reject(e),
    };
    let requests = match submit(ready, &mut job) {
        Ok(r) => r,
        Err(e) => return st.reject(e),
    };
    let events = bridge(&st, requests, arrival);
    let response = Responder {
        st: st.clone(),
        id: format!("{}-{:016x}", if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, rand::random::<u64>()),
        created: unix_time(),
        endpoint,
        model: job.model.clone(),
        choices: job.prompts.len() * job.generation.n,
        prompt_tokens: job.prompts.iter().map(Vec::len).sum(),
        logprobs: job.logprobs,
        include_usage: job.generation.include_usage,
    };
    if job.generation.stream {
        response.stream(events)
    } else {
        response.collect(events).await
    }
}

/// Builds a request's response from its choices' events.
struct Responder {
    st: Arc<AppState>,
    id: String,
    created: u64,
    endpoint: Endpoint,
    /// The model name to echo (`base:adapter` for an adapter).
    model: String,
    choices: usize,
    prompt_tokens: usize,
    logprobs: Option<usize>,
    include_usage: bool,
}

/// What one choice has produced.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<Value>,
    /// Completions: the legacy logprob lists.
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    reason: Option<FinishReason>,
    usage: Usage,
}

impl Responder {
    fn model_name(&self) -> &str {
        &self.model
    }

    fn tokenizer(&self) -> &crate::tokenizer::Tokenizer {
        &self.st.ready.get().expect("a generation runs only once the model is loaded").model.tokenizer
    }

    /// A chat `logprobs.content` entry, or the completions' per-token lists, for one token.
    fn record_logprob(&self, choice: &mut Choice, id: u32, lp: &crate::engine::TokenLogprob) {
        let tokenizer = self.tokenizer();
        match self.endpoint {
            Endpoint::Chat => choice.logprobs.push(openai::chat_logprob(tokenizer, id, lp)),
            Endpoint::Completions => {
                choice.token_logprobs.push(lp.logprob);
                let top: Map<String, Value> =
                    lp.top.iter().map(|&(t, l)| (openai::token_text(tokenizer, t), json!(l))).collect();
                choice.top_logprobs.push(Value::Object(top));
            }
        }
    }

    fn completion_logprobs(&self, choice: &Choice, offset0: usize) -> Value {
        let tokenizer = self.tokenizer();
        let tokens: Vec<String> = choice.tokens.iter().map(|&t| openai::token_text(tokenizer, t)).collect();
        let mut offset = offset0;
        let offsets: Vec<usize> = tokens
            .iter()
            .map(|t| {
                let o = offset;
                offset += t.len();
                o
            })
            .collect();
        json!({
            "tokens": tokens,
            "token_logprobs": choice.token_logprobs,
            "top_logprobs": choice.top_logprobs,
            "text_offset": offsets,
        })
    }

    /// Wait for every choice and answer with one JSON object.
    async fn collect(self, mut events: mpsc::Receiver<ChoiceEvent>) -> Response {
        let mut choices: Vec<Choice> = (0..self.choices).map(|_| Choice::default()).collect();
        let mut done = 0;
        while done < self.choices {
            let Some((i, event)) = events.recv().await else { break };
            let c = &mut choices[i];
            match event {
                Event::Token { id, text, logprob } => {
                    c.tokens.push(id);
                    c.text += &text;
                    if let Some(lp) = &logprob {
                        self.record_logprob(c, id, lp);
                    }
                }
                Event::Text(t) => c.text += &t,
                Event::Done { reason, usage } => {
                    c.reason = Some(reason);
                    c.usage = usage;
                    done += 1;
                }
                Event::Failed(m) => {
                    return error_response(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m));
                }
            }
        }
        if done < self.choices {
            return error_response(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the engine stopped",
            ));
        }
        let usages: Vec<Usage> = choices.iter().map(|c| c.usage).collect();
        let usage = self.usage(&usages);
        let body = match self.endpoint {
            Endpoint::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model_name(),
                "choices": choices.iter().enumerate().map(|(i, c)| json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs.map(|_| json!({"content": c.logprobs})),
                    "finish_reason": c.reason.as_ref().map(openai::finish_reason),
                })).collect::<Value>(),
                "usage": usage,
            }),
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model_name(),
                "choices": choices.iter().enumerate().map(|(i, c)| json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": self.logprobs.map(|_| self.completion_logprobs(c, 0)),
                    "finish_reason": c.reason.as_ref().map(openai::finish_reason),
                })).collect::<Value>(),
                "usage": usage,
            }),
        };
        Json(body).into_response()
    }

    /// Usage across choices: each prompt once (choices of one prompt share it).
    fn usage(&self, usages: &[Usage]) -> Value {
        openai::total_usage(usages, self.prompt_tokens)
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model_name(),
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }

    /// One choice's delta: chat `{"delta": {"content"}}`, completions `{"text"}`.
    fn delta(&self, index: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
            }
            Endpoint::Completions => {
                json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
            }
        }
    }

    /// Stream server-sent events in OpenAI's order: (chat) a role chunk per choice, content
    /// deltas, a finish chunk per choice, a usage chunk if asked for, then `[DONE]`.
    fn stream(self, mut events: mpsc::Receiver<ChoiceEvent>) -> Response {
        let (tx, rx) = mpsc::channel::<std::result::Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let send = |v: Value| SseEvent::default().data(v.to_string());
            if self.endpoint == Endpoint::Chat {
                for i in 0..self.choices {
                    let role = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                    if tx.send(Ok(send(self.chunk(role, None)))).await.is_err() {
                        return;
                    }
                }
            }
            let mut usages = vec![Usage::default(); self.choices];
            let mut offsets = vec![0usize; self.choices];
            let mut done = 0;
            while done < self.choices {
                let Some((i, event)) = events.recv().await else { break };
                let chunk = match event {
                    Event::Token { id, text, logprob } => {
                        let logprobs = logprob.as_ref().map(|lp| {
                            let mut c = Choice::default();
                            c.tokens.push(id);
                            self.record_logprob(&mut c, id, lp);
                            match self.endpoint {
                                Endpoint::Chat => json!({"content": c.logprobs}),
                                Endpoint::Completions => self.completion_logprobs(&c, offsets[i]),
                            }
                        });
                        if text.is_empty() && logprobs.is_none() {
                            continue;
                        }
                        offsets[i] += text.len();
                        self.delta(i, &text, logprobs, None)
                    }
                    Event::Text(text) => self.delta(i, &text, None, None),
                    Event::Done { reason, usage } => {
                        usages[i] = usage;
                        done += 1;
                        self.delta(i, "", None, Some(openai::finish_reason(&reason)))
                    }
                    Event::Failed(m) => {
                        let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m);
                        let _ = tx.send(Ok(send(e.body()))).await;
                        return;
                    }
                };
                if tx.send(Ok(send(self.chunk(chunk, None)))).await.is_err() {
                    return; // the client is gone: dropping `events` cancels the choices
                }
            }
            if self.include_usage {
                let usage = self.usage(&usages);
                if tx.send(Ok(send(self.chunk(json!([]), Some(usage))))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
    }
}
