//! Parse, don't validate: an OpenAI request becomes a [`ValidRequest`] (token ids, resolved
//! limits, no `Option`s) or an [`ApiError`] naming the field. Only valid requests reach the
//! engine.

use std::sync::atomic::{AtomicU64, Ordering};

use tandem_engine::Tokenizer;
use tandem_engine::chat::ChatMessage;
use tandem_engine::runner::GenerateRequest;
use tandem_engine::sampler::{MAX_TOP_LOGPROBS, SamplingParams};

use crate::api::{ChatRequest, CompletionRequest, Content, Prompt, Sampling, Stop};
use crate::error::ApiError;

/// OpenAI's limit on stop sequences.
pub const MAX_STOP: usize = 4;

/// What the served model allows.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub name: String,
    pub context_length: usize,
    pub vocab_size: usize,
}

/// How logprobs are reported, by endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    Chat { top: usize },
    Completion { top: usize },
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
}

pub fn chat(req: ChatRequest, tok: &Tokenizer, limits: &ModelLimits) -> Result<ValidRequest, ApiError> {
    check_model(req.model.as_deref(), limits)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must contain at least one message"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool" | "developer") {
            return Err(ApiError::invalid(&format!("messages[{i}].role"), format!("unknown role {:?}", m.role)));
        }
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content part of type {:?} is not supported (text only)", p.kind),
                            ));
                        }
                    }
                }
                t
            }
        };
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        messages.push(ChatMessage::new(role, &text));
    }
    let template = tok
        .chat_template
        .as_ref()
        .ok_or_else(|| ApiError::invalid("messages", "this model has no chat template; use /v1/completions"))?;
    let text = template.render(&messages, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = tok.encode(&text, false).map_err(|e| ApiError::Internal(e.to_string()))?;
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid("top_logprobs", "`top_logprobs` requires `logprobs: true`"));
        }
        (false, _) => None,
        (true, n) => Some(bounded("top_logprobs", n.unwrap_or(0), 0, MAX_TOP_LOGPROBS as i64)? as usize),
    };
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let logprobs = top.map_or(LogprobsFormat::None, |top| LogprobsFormat::Chat { top });
    finish(prompt, max_tokens, &req.sampling, logprobs, limits)
}

pub fn completion(req: CompletionRequest, tok: &Tokenizer, limits: &ModelLimits) -> Result<ValidRequest, ApiError> {
    check_model(req.model.as_deref(), limits)?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let prompt = match req.prompt {
        Prompt::Text(t) => tok.encode(&t, true).map_err(|e| ApiError::Internal(e.to_string()))?,
        Prompt::Texts(ts) if ts.len() == 1 => {
            tok.encode(&ts[0], true).map_err(|e| ApiError::Internal(e.to_string()))?
        }
        Prompt::Texts(ts) => {
            return Err(ApiError::invalid("prompt", format!("one prompt per request is supported, got {}", ts.len())));
        }
        Prompt::Ids(ids) => ids
            .iter()
            .map(|&i| {
                u32::try_from(i)
                    .ok()
                    .filter(|&i| (i as usize) < limits.vocab_size)
                    .ok_or_else(|| ApiError::invalid("prompt", format!("token id {i} is outside the vocabulary")))
            })
            .collect::<Result<_, _>>()?,
    };
    let logprobs = match req.logprobs {
        None => LogprobsFormat::None,
        Some(n) => LogprobsFormat::Completion { top: bounded("logprobs", n, 0, 5)? as usize },
    };
    // The legacy endpoint's documented default.
    let max_tokens = Some(("max_tokens", req.max_tokens.unwrap_or(16)));
    finish(prompt, max_tokens, &req.sampling, logprobs, limits)
}

fn check_model(model: Option<&str>, limits: &ModelLimits) -> Result<(), ApiError> {
    match model {
        Some(m) if !m.is_empty() && m != limits.name => Err(ApiError::UnknownModel(m.to_string())),
        _ => Ok(()),
    }
}

fn bounded(param: &str, v: i64, lo: i64, hi: i64) -> Result<i64, ApiError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {v}")))
    }
}

fn float(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {x}"))),
    }
}

/// A seed for requests that did not set one: distinct per request, so unseeded sampling
/// differs between requests as clients expect.
fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

fn finish(
    prompt: Vec<u32>,
    max_tokens: Option<(&str, i64)>,
    s: &Sampling,
    logprobs: LogprobsFormat,
    limits: &ModelLimits,
) -> Result<ValidRequest, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt encodes to no tokens"));
    }
    if prompt.len() >= limits.context_length {
        return Err(ApiError::invalid(
            "messages",
            format!("the prompt is {} tokens, this model's context length is {}", prompt.len(), limits.context_length),
        ));
    }
    let room = limits.context_length - prompt.len();
    let max_tokens = match max_tokens {
        None => room,
        Some((param, n)) => {
            if n < 1 {
                return Err(ApiError::invalid(param, format!("`{param}` must be at least 1, got {n}")));
            }
            if n as u64 > room as u64 {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "the prompt ({} tokens) plus `{param}` ({n}) exceeds this model's context length of {}",
                        prompt.len(),
                        limits.context_length
                    ),
                ));
            }
            n as usize
        }
    };
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid("n", format!("only `n: 1` is supported, got {n}")));
    }
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop sequences, got {}", stop.len())));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 or positive, got {k}"))),
    };
    let params = SamplingParams {
        temperature: float("temperature", s.temperature, 0.0, 2.0, 1.0)?,
        top_p: float("top_p", s.top_p, f32::MIN_POSITIVE, 1.0, 1.0)?,
        top_k,
        min_p: float("min_p", s.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty: float("repetition_penalty", s.repetition_penalty, 0.01, 10.0, 1.0)?,
        presence_penalty: float("presence_penalty", s.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: float("frequency_penalty", s.frequency_penalty, -2.0, 2.0, 0.0)?,
        seed: s.seed.map_or_else(fresh_seed, |v| v as u64),
    };
    let top = match logprobs {
        LogprobsFormat::None => None,
        LogprobsFormat::Chat { top } | LogprobsFormat::Completion { top } => Some(top),
    };
    Ok(ValidRequest {
        request: GenerateRequest {
            prompt,
            params,
            max_tokens,
            stop_token_ids: Vec::new(),
            stop,
            ignore_eos: s.ignore_eos.unwrap_or(false),
            logprobs: top,
        },
        stream: s.stream.unwrap_or(false),
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
    })
}
