//! The HTTP surface: OpenAI's endpoints plus health, readiness and metrics, over an engine.
//!
//! Typed events inside, SSE only here at the edge. Backpressure is explicit: at most
//! `max_inflight` requests are admitted; the next one gets a 429 with `Retry-After`. A client
//! that disconnects drops its response stream, which drops the engine stream, which aborts
//! the request and frees its blocks at the engine's next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;
use tandem_engine::Tokenizer;
use tandem_engine::runner::{EndInfo, EngineHandle, FinishReason, RequestStream, TokenEvent, TokenOut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::*;
use crate::error::ApiError;
use crate::validate::{self, LogprobsFormat, ModelLimits, ValidRequest};

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Accepted bearer tokens; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Requests admitted at once; more get 429.
    pub max_inflight: usize,
    /// Largest request body in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// Longest a request may wait for its first token; `None` waits as long as it takes.
    pub queue_timeout: Option<Duration>,
    /// Longest a request may take in all.
    pub request_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_inflight: 256,
            max_body_bytes: 4 << 20,
            queue_timeout: None,
            request_timeout: None,
        }
    }
}

/// Metric names, `tandem_` prefixed with unit suffixes.
pub mod metric {
    pub const REQUESTS: &str = "tandem_requests_total";
    pub const PROMPT_TOKENS: &str = "tandem_prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "tandem_generation_tokens_total";
    pub const INFLIGHT: &str = "tandem_requests_inflight";
    pub const KV_BLOCKS: &str = "tandem_kv_blocks";
    pub const SEQUENCES: &str = "tandem_sequences";
    pub const PREEMPTIONS: &str = "tandem_preemptions_total";
    pub const PREFIX_CACHE_HIT_TOKENS: &str = "tandem_prefix_cache_hit_tokens_total";
}

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    client_error: AtomicU64,
    server_error: AtomicU64,
    aborted: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

#[derive(Debug)]
struct AppState {
    engine: EngineHandle,
    tok: Arc<Tokenizer>,
    limits: ModelLimits,
    config: ServerConfig,
    permits: Arc<Semaphore>,
    counters: Counters,
    started: u64,
    next_id: AtomicU64,
}

/// The gateway's routes over `engine`.
pub fn router(engine: EngineHandle, tok: Arc<Tokenizer>, limits: ModelLimits, config: ServerConfig) -> Router {
    let state = Arc::new(AppState {
        engine,
        tok,
        limits,
        permits: Arc::new(Semaphore::new(config.max_inflight)),
        config,
        counters: Counters::default(),
        started: unix_now(),
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::Invalid { message: "unknown endpoint".into(), param: None }.into_response() })
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.config.api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k) if state.config.api_keys.iter().any(|a| a == k) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(state: &AppState, body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| ApiError::TooLarge(state.config.max_body_bytes))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Invalid { message: format!("invalid JSON body: {e}"), param: None })
}

fn count_error(state: &AppState, e: &ApiError) {
    let c = if e.status().is_server_error() { &state.counters.server_error } else { &state.counters.client_error };
    c.fetch_add(1, Ordering::Relaxed);
}

async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(state, headers, body, Endpoint::Chat, validate::chat).await
}

async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(state, headers, body, Endpoint::Completion, validate::completion).await
}

/// Auth, parse, validate, admit, then answer; any refusal becomes its OpenAI error.
async fn handle<R: serde::de::DeserializeOwned>(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
    validate: fn(R, &Tokenizer, &ModelLimits) -> Result<ValidRequest, ApiError>,
) -> Response {
    let result = async {
        authorize(&state, &headers)?;
        let req: R = read_json(&state, body).await?;
        start(&state, validate(req, &state.tok, &state.limits)?)
    }
    .await;
    match result {
        Ok((valid, permit, stream)) => respond(state, valid, permit, stream, endpoint).await,
        Err(e) => {
            count_error(&state, &e);
            e.into_response()
        }
    }
}

fn start(
    state: &AppState,
    valid: ValidRequest,
) -> Result<(ValidRequest, OwnedSemaphorePermit, RequestStream), ApiError> {
    let permit =
        state.permits.clone().try_acquire_owned().map_err(|_| ApiError::Overloaded(state.config.max_inflight))?;
    let stream = state.engine.submit(valid.request.clone()).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok((valid, permit, stream))
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return e.into_response();
    }
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.limits.name.clone(),
            object: "model",
            created: state.started,
            owned_by: "tandem",
            max_model_len: state.limits.context_length,
        }],
    })
    .into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_running() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::Unavailable("the engine has stopped".into()).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let c = &state.counters;
    let inflight = state.config.max_inflight - state.permits.available_permits();
    let mut out = String::new();
    out.push_str(&format!("# HELP {} Requests by outcome.\n# TYPE {} counter\n", metric::REQUESTS, metric::REQUESTS));
    for (outcome, v) in
        [("ok", &c.ok), ("client_error", &c.client_error), ("server_error", &c.server_error), ("aborted", &c.aborted)]
    {
        out.push_str(&format!("{}{{outcome=\"{outcome}\"}} {}\n", metric::REQUESTS, v.load(Ordering::Relaxed)));
    }
    for (name, help, v) in [
        (metric::PROMPT_TOKENS, "Prompt tokens of finished requests.", &c.prompt_tokens),
        (metric::GENERATION_TOKENS, "Generated tokens of finished requests.", &c.generation_tokens),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", v.load(Ordering::Relaxed)));
    }
    out.push_str(&format!("# HELP {0} Requests being served.\n# TYPE {0} gauge\n{0} {inflight}\n", metric::INFLIGHT));
    if let Ok(st) = state.engine.stats().await {
        out.push_str(&format!("# HELP {0} KV cache blocks by state.\n# TYPE {0} gauge\n", metric::KV_BLOCKS));
        for (k, v) in [("used", st.blocks.used), ("cached", st.blocks.cached), ("free", st.blocks.free)] {
            out.push_str(&format!("{}{{state=\"{k}\"}} {v}\n", metric::KV_BLOCKS));
        }
        out.push_str(&format!("# HELP {0} Sequences in the engine by state.\n# TYPE {0} gauge\n", metric::SEQUENCES));
        for (k, v) in [("running", st.running), ("waiting", st.waiting)] {
            out.push_str(&format!("{}{{state=\"{k}\"}} {v}\n", metric::SEQUENCES));
        }
        for (name, help, v) in [
            (metric::PREEMPTIONS, "Sequences preempted for lack of KV blocks.", st.scheduler.preemptions),
            (
                metric::PREFIX_CACHE_HIT_TOKENS,
                "Prompt tokens served from the prefix cache.",
                st.scheduler.cached_tokens,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

fn finish_reason(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn record_end(state: &AppState, end: &EndInfo) {
    let c = &state.counters;
    let counter = match end.reason {
        FinishReason::Stop | FinishReason::Length => &c.ok,
        FinishReason::Aborted => &c.aborted,
        FinishReason::Error(_) => &c.server_error,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    c.prompt_tokens.fetch_add(end.prompt_tokens as u64, Ordering::Relaxed);
    c.generation_tokens.fetch_add(end.completion_tokens as u64, Ordering::Relaxed);
}

fn usage(end: &EndInfo) -> Usage {
    Usage {
        prompt_tokens: end.prompt_tokens,
        completion_tokens: end.completion_tokens,
        total_tokens: end.prompt_tokens + end.completion_tokens,
        prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: end.cached_tokens }),
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn chat_logprob(tok: &Tokenizer, t: &TokenOut) -> Option<TokenLogprob> {
    let lp = t.logprob?;
    let token = token_text(tok, t.id);
    Some(TokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp,
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|(id, lp)| {
                let token = token_text(tok, *id);
                TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: *lp }
            })
            .collect(),
    })
}

fn completion_logprobs(tok: &Tokenizer, toks: &[TokenOut], offset0: usize) -> CompletionLogprobs {
    let mut out =
        CompletionLogprobs { tokens: vec![], token_logprobs: vec![], top_logprobs: vec![], text_offset: vec![] };
    let mut offset = offset0;
    for t in toks {
        let text = token_text(tok, t.id);
        out.text_offset.push(offset);
        offset += t.text.len();
        out.tokens.push(text);
        out.token_logprobs.push(t.logprob.unwrap_or(0.0));
        out.top_logprobs
            .push(t.top_logprobs.iter().map(|(id, lp)| (token_text(tok, *id), serde_json::json!(lp))).collect());
    }
    out
}

async fn respond(
    state: Arc<AppState>,
    valid: ValidRequest,
    permit: OwnedSemaphorePermit,
    stream: RequestStream,
    endpoint: Endpoint,
) -> Response {
    let id = format!(
        "{}-{:x}{:08x}",
        if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
        state.started,
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if valid.stream {
        let events = sse_stream(state, valid, permit, stream, endpoint, id);
        return Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    }
    collect(state, valid, permit, stream, endpoint, id).await
}

async fn collect(
    state: Arc<AppState>,
    valid: ValidRequest,
    _permit: OwnedSemaphorePermit,
    mut stream: RequestStream,
    endpoint: Endpoint,
    id: String,
) -> Response {
    let mut guard = AbortGuard { state: state.clone(), ended: false };
    let started = tokio::time::Instant::now();
    let mut text = String::new();
    let mut toks = Vec::new();
    let end = loop {
        let ev = match next_event(&state.config, started, !toks.is_empty(), &mut stream).await {
            Ok(ev) => ev,
            Err(e) => {
                count_error(&state, &e);
                guard.ended = true;
                return e.into_response();
            }
        };
        match ev {
            Some(TokenEvent::First(t)) | Some(TokenEvent::Token(t)) => {
                text.push_str(&t.text);
                toks.push(t);
            }
            Some(TokenEvent::End(end)) => break end,
            None => return ApiError::Internal("the engine stopped".into()).into_response(),
        }
    };
    guard.ended = true;
    record_end(&state, &end);
    text.push_str(&end.text);
    if let FinishReason::Error(m) = &end.reason {
        return ApiError::Internal(m.clone()).into_response();
    }
    let created = unix_now();
    let model = state.limits.name.clone();
    match endpoint {
        Endpoint::Chat => {
            let logprobs = matches!(valid.logprobs, LogprobsFormat::Chat { .. })
                .then(|| ChatLogprobs { content: toks.iter().filter_map(|t| chat_logprob(&state.tok, t)).collect() });
            Json(ChatCompletion {
                id,
                object: "chat.completion",
                created,
                model,
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage { role: "assistant", content: text },
                    logprobs,
                    finish_reason: finish_reason(&end.reason),
                }],
                usage: usage(&end),
            })
            .into_response()
        }
        Endpoint::Completion => {
            let logprobs = matches!(valid.logprobs, LogprobsFormat::Completion { .. })
                .then(|| completion_logprobs(&state.tok, &toks, 0));
            Json(Completion {
                id,
                object: "text_completion",
                created,
                model,
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs,
                    finish_reason: Some(finish_reason(&end.reason)),
                }],
                usage: Some(usage(&end)),
            })
            .into_response()
        }
    }
}

/// The next engine event, or a timeout error once the request's deadline passes (queue
/// deadline until the first token, total deadline always). Dropping the stream on timeout
/// aborts the request in the engine.
async fn next_event(
    config: &ServerConfig,
    started: tokio::time::Instant,
    first_seen: bool,
    stream: &mut RequestStream,
) -> Result<Option<TokenEvent>, ApiError> {
    let total = config.request_timeout.map(|d| (started + d, "request"));
    let queue = if first_seen { None } else { config.queue_timeout.map(|d| (started + d, "queue")) };
    let deadline = [total, queue].into_iter().flatten().min_by_key(|(t, _)| *t);
    match deadline {
        None => Ok(stream.next().await),
        Some((at, which)) => match tokio::time::timeout_at(at, stream.next()).await {
            Ok(ev) => Ok(ev),
            Err(_) => {
                stream.abort();
                let limit = if which == "queue" { config.queue_timeout } else { config.request_timeout };
                Err(ApiError::Timeout(format!(
                    "the request exceeded its {which} timeout of {} ms and was aborted",
                    limit.map_or(0, |d| d.as_millis())
                )))
            }
        },
    }
}

fn data<T: Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// Counts a request as aborted if its response is dropped before the engine's `End` (the
/// client went away; dropping the engine stream has already aborted the request).
struct AbortGuard {
    state: Arc<AppState>,
    ended: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.state.counters.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct SseState {
    guard: AbortGuard,
    state: Arc<AppState>,
    valid: ValidRequest,
    _permit: OwnedSemaphorePermit,
    stream: RequestStream,
    endpoint: Endpoint,
    id: String,
    created: u64,
    sent_role: bool,
    started: tokio::time::Instant,
    first_seen: bool,
    offset: usize,
    pending: std::collections::VecDeque<Event>,
    done: bool,
}

impl SseState {
    fn chat_chunk(&self, delta: Delta, logprobs: Option<ChatLogprobs>, finish: Option<&'static str>) -> Event {
        data(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.state.limits.name.clone(),
            choices: vec![ChunkChoice { index: 0, delta, logprobs, finish_reason: finish }],
            usage: None,
        })
    }

    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> Event {
        data(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.state.limits.name.clone(),
            choices: vec![CompletionChoice { index: 0, text, logprobs, finish_reason: finish }],
            usage: None,
        })
    }

    fn on_token(&mut self, t: TokenOut) {
        let wants_logprobs = self.valid.logprobs != LogprobsFormat::None;
        if t.text.is_empty() && !wants_logprobs {
            return;
        }
        let ev = match self.endpoint {
            Endpoint::Chat => {
                let lp = chat_logprob(&self.state.tok, &t).map(|l| ChatLogprobs { content: vec![l] });
                self.chat_chunk(Delta { role: None, content: Some(t.text.clone()) }, lp, None)
            }
            Endpoint::Completion => {
                let lp =
                    wants_logprobs.then(|| completion_logprobs(&self.state.tok, std::slice::from_ref(&t), self.offset));
                self.completion_chunk(t.text.clone(), lp, None)
            }
        };
        self.offset += t.text.len();
        self.pending.push_back(ev);
    }

    fn on_end(&mut self, end: EndInfo) {
        self.guard.ended = true;
        record_end(&self.state, &end);
        if let FinishReason::Error(m) = &end.reason {
            self.pending.push_back(data(&ApiError::Internal(m.clone()).body()));
            self.pending.push_back(Event::default().data("[DONE]"));
            return;
        }
        let reason = finish_reason(&end.reason);
        let tail = end.text.clone();
        let ev = match self.endpoint {
            Endpoint::Chat => {
                if !tail.is_empty() {
                    let e = self.chat_chunk(Delta { role: None, content: Some(tail) }, None, None);
                    self.pending.push_back(e);
                }
                self.chat_chunk(Delta { role: None, content: None }, None, Some(reason))
            }
            Endpoint::Completion => self.completion_chunk(tail, None, Some(reason)),
        };
        self.pending.push_back(ev);
        if self.valid.include_usage {
            let u = usage(&end);
            let ev = match self.endpoint {
                Endpoint::Chat => data(&ChatChunk {
                    id: self.id.clone(),
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: self.state.limits.name.clone(),
                    choices: vec![],
                    usage: Some(u),
                }),
                Endpoint::Completion => data(&Completion {
                    id: self.id.clone(),
                    object: "text_completion",
                    created: self.created,
                    model: self.state.limits.name.clone(),
                    choices: vec![],
                    usage: Some(u),
                }),
            };
            self.pending.push_back(ev);
        }
        self.pending.push_back(Event::default().data("[DONE]"));
    }
}

fn sse_stream(
    state: Arc<AppState>,
    valid: ValidRequest,
    permit: OwnedSemaphorePermit,
    stream: RequestStream,
    endpoint: Endpoint,
    id: String,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let s = SseState {
        guard: AbortGuard { state: state.clone(), ended: false },
        state,
        valid,
        _permit: permit,
        stream,
        endpoint,
        id,
        created: unix_now(),
        sent_role: false,
        started: tokio::time::Instant::now(),
        first_seen: false,
        offset: 0,
        pending: Default::default(),
        done: false,
    };
    stream::unfold(s, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            if s.endpoint == Endpoint::Chat && !s.sent_role {
                s.sent_role = true;
                let ev = s.chat_chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None, None);
                return Some((Ok(ev), s));
            }
            let ev = match next_event(&s.state.config, s.started, s.first_seen, &mut s.stream).await {
                Ok(ev) => ev,
                Err(e) => {
                    count_error(&s.state, &e);
                    s.done = true;
                    s.guard.ended = true;
                    s.pending.push_back(data(&e.body()));
                    s.pending.push_back(Event::default().data("[DONE]"));
                    continue;
                }
            };
            match ev {
                Some(TokenEvent::First(t)) | Some(TokenEvent::Token(t)) => {
                    s.first_seen = true;
                    s.on_token(t)
                }
                Some(TokenEvent::End(end)) => {
                    s.done = true;
                    s.on_end(end);
                }
                None => {
                    s.done = true;
                    s.guard.ended = true;
                    s.pending.push_back(data(&ApiError::Internal("the engine stopped".into()).body()));
                }
            }
        }
    })
    .boxed()
}
