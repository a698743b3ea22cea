//! The engine's step logic: scheduler plan → forward pass → sampling → token events.
//!
//! Synchronous and owned by one thread ([`super::EngineHandle`] drives it); tests drive it
//! directly. Per request it keeps the sampler (with the request's own seed), the incremental
//! detokenizer and the stop-string matcher, and it owns the KV cache that the scheduler's
//! block ids point into.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::EngineError;
use crate::block_manager::BlockUsage;
use crate::kv::{KvCache, KvDtype};
use crate::model::{LogitsMode, Model, SeqInput};
use crate::sampler::{MAX_TOP_LOGPROBS, Sampler, SamplingParams};
use crate::scheduler::{Plan, RequestId, Scheduler, SchedulerConfig, SchedulerStats};
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// How an engine is sized and scheduled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_dtype: KvDtype,
    /// Compute threads of the engine's own pool; 0 means one per core.
    pub threads: usize,
}

impl EngineConfig {
    /// Blocks that fit in `bytes` of KV memory for `model`.
    pub fn blocks_for_bytes(model: &Model, bytes: usize, block_size: usize, dtype: KvDtype) -> usize {
        let c = &model.config;
        let per_block = 2 * c.n_layers * block_size * c.n_kv_heads * c.head_dim * dtype.bytes();
        bytes / per_block.max(1)
    }
}

/// One generation request, already tokenized and validated by the caller's API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Extra ids that end generation (besides the model's EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// `Some(n)`: report each token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            params: SamplingParams::default(),
            max_tokens,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    /// Text this token completes (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Aborted by the client (or its stream was dropped).
    Aborted,
    /// Failed; the message names why.
    Error(String),
}

/// The end of a request's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndInfo {
    pub reason: FinishReason,
    /// Text still held back when generation ended (the tail of an incomplete character or
    /// of a stop string that never completed).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's stream carries, in order: `First`, any number of `Token`, one `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    First(TokenOut),
    Token(TokenOut),
    End(EndInfo),
}

/// Counters and gauges of a running engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    pub blocks: BlockUsage,
    pub waiting: usize,
    pub running: usize,
    pub scheduler: SchedulerStats,
    pub steps: u64,
}

#[derive(Debug)]
struct ReqState {
    sink: UnboundedSender<TokenEvent>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    req: GenerateRequest,
    output: Vec<u32>,
    started: bool,
    cached_tokens: usize,
}

/// Model, KV cache, scheduler and the state of every live request.
#[derive(Debug)]
pub struct EngineCore {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    sched: Scheduler,
    reqs: HashMap<RequestId, ReqState>,
    steps: u64,
    config: EngineConfig,
}

impl EngineCore {
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, config: EngineConfig) -> Self {
        let kv = model.new_kv_cache(config.block_size, config.num_blocks, config.kv_dtype);
        let sched = Scheduler::new(config.scheduler, config.num_blocks, config.block_size);
        Self { model, tokenizer, kv, sched, reqs: HashMap::new(), steps: 0, config }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            blocks: self.sched.usage(),
            waiting: self.sched.num_waiting(),
            running: self.sched.num_running(),
            scheduler: self.sched.stats,
            steps: self.steps,
        }
    }

    /// Checks a request against the model before it is queued.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(), EngineError> {
        let c = &self.model.config;
        if req.prompt.is_empty() {
            return Err(EngineError::BadBatch("the prompt has no tokens".into()));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::BadBatch("max_tokens must be at least 1".into()));
        }
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        let len = req.prompt.len() + req.max_tokens;
        if len > c.context_length {
            return Err(EngineError::ContextOverflow { len, max: c.context_length });
        }
        if let Some(n) = req.logprobs.filter(|n| *n > MAX_TOP_LOGPROBS) {
            return Err(EngineError::BadBatch(format!("top logprobs {n} exceeds {MAX_TOP_LOGPROBS}")));
        }
        req.params.validate().map_err(EngineError::BadBatch)
    }

    /// Queues a request whose events go to `sink`. An invalid request gets its error as the
    /// stream's `End` right away.
    pub fn add(&mut self, id: RequestId, req: GenerateRequest, sink: UnboundedSender<TokenEvent>) {
        let checked = self.validate(&req).and_then(|_| self.sched.add(id, req.prompt.clone(), req.max_tokens));
        if let Err(e) = checked {
            let _ = sink.send(TokenEvent::End(EndInfo {
                reason: FinishReason::Error(e.to_string()),
                text: String::new(),
                prompt_tokens: req.prompt.len(),
                completion_tokens: 0,
                cached_tokens: 0,
            }));
            return;
        }
        let state = ReqState {
            sink,
            sampler: Sampler::new(req.params),
            decoder: IncrementalDecoder::new(true),
            stops: StopMatcher::new(&req.stop),
            output: Vec::new(),
            started: false,
            cached_tokens: 0,
            req,
        };
        self.reqs.insert(id, state);
    }

    /// Ends a request now; its blocks go back to the pool. False if it already ended.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if !self.reqs.contains_key(&id) {
            return false;
        }
        self.end(id, FinishReason::Aborted, true);
        true
    }

    /// Runs one scheduler step. False when there was nothing to do.
    pub fn step(&mut self) -> bool {
        let plan = self.sched.schedule();
        if plan.is_empty() {
            return false;
        }
        self.steps += 1;
        let logits = match self.run_forward(&plan) {
            Ok(l) => l,
            Err(e) => {
                for item in &plan.items {
                    self.end(item.id, FinishReason::Error(format!("forward pass failed: {e}")), true);
                }
                return true;
            }
        };
        self.sched.complete(&plan);
        for (item, logits) in plan.items.iter().zip(logits) {
            if let Some(state) = self.reqs.get_mut(&item.id) {
                // The first chunk after admission starts where the prefix cache ended.
                if !state.started {
                    state.started = true;
                    state.cached_tokens = item.start.min(state.req.prompt.len());
                }
            }
            if item.sample {
                self.on_sampled(item.id, &logits);
            }
        }
        true
    }

    fn run_forward(&mut self, plan: &Plan) -> Result<Vec<Vec<f32>>, EngineError> {
        let tables: Vec<Vec<u32>> = plan
            .items
            .iter()
            .map(|i| {
                self.sched
                    .block_table(i.id)
                    .ok_or_else(|| EngineError::BadBatch("planned sequence has no blocks".into()))
            })
            .collect::<Result<_, _>>()?;
        let mut inputs = Vec::with_capacity(plan.items.len());
        for (item, table) in plan.items.iter().zip(&tables) {
            let tokens = self.sched.tokens(item.id).ok_or_else(|| EngineError::BadBatch("unknown sequence".into()))?;
            inputs.push(SeqInput {
                tokens: &tokens[item.start..item.start + item.len],
                start_pos: item.start,
                block_table: table,
                logits: if item.sample { LogitsMode::Last } else { LogitsMode::None },
            });
        }
        self.model.forward(&inputs, &mut self.kv)
    }

    fn on_sampled(&mut self, id: RequestId, logits: &[f32]) {
        let context_length = self.model.config.context_length;
        let Some(state) = self.reqs.get_mut(&id) else { return };
        let n_top = state.req.logprobs.unwrap_or(0);
        let s = state.sampler.sample_full(logits, &state.req.prompt, &state.output, n_top);
        let is_stop_id =
            state.req.stop_token_ids.contains(&s.id) || (!state.req.ignore_eos && self.tokenizer.is_eos(s.id));
        if is_stop_id {
            self.end(id, FinishReason::Stop, true);
            return;
        }
        state.output.push(s.id);
        let piece = match state.decoder.push(&self.tokenizer, s.id) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                self.end(id, FinishReason::Error(e.to_string()), true);
                return;
            }
        };
        let (text, stopped) = match state.stops.push(&piece) {
            StopOutcome::Continue(t) => (t, false),
            StopOutcome::Stopped(t) => (t, true),
        };
        let out = TokenOut { id: s.id, text, logprob: state.req.logprobs.map(|_| s.logprob), top_logprobs: s.top };
        let event = if state.output.len() == 1 { TokenEvent::First(out) } else { TokenEvent::Token(out) };
        if state.sink.send(event).is_err() {
            // The receiver is gone: the client disconnected.
            self.end(id, FinishReason::Aborted, true);
            return;
        }
        let total = state.req.prompt.len() + state.output.len();
        if stopped {
            // Whatever followed the stop string is dropped.
            self.end(id, FinishReason::Stop, false);
        } else if state.output.len() >= state.req.max_tokens || total >= context_length {
            self.end(id, FinishReason::Length, true);
        } else {
            self.sched.append_token(id, s.id);
        }
    }

    /// Frees the request everywhere and sends its `End`, with the held-back text when
    /// `flush`.
    fn end(&mut self, id: RequestId, reason: FinishReason, flush: bool) {
        self.sched.finish(id);
        let Some(mut state) = self.reqs.remove(&id) else { return };
        let mut text = String::new();
        if flush {
            if let Ok(Some(rest)) = state.decoder.finish(&self.tokenizer) {
                let (StopOutcome::Continue(t) | StopOutcome::Stopped(t)) = state.stops.push(&rest);
                text.push_str(&t);
            }
            text.push_str(&state.stops.finish());
        }
        let _ = state.sink.send(TokenEvent::End(EndInfo {
            reason,
            text,
            prompt_tokens: state.req.prompt.len(),
            completion_tokens: state.output.len(),
            cached_tokens: state.cached_tokens,
        }));
    }
}
