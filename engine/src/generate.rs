//! Single-sequence generation: chunked prefill of a prompt, then one decode step per token.
//!
//! This is what `tandem generate` runs and what the model tests check; serving many
//! sequences at once is the scheduler's job and reuses [`Model::forward`] the same way.

use std::time::{Duration, Instant};

use crate::EngineError;
use crate::kv::{BlockPool, DEFAULT_BLOCK_SIZE, KvCache, KvDtype};
use crate::model::{LogitsMode, Model, SeqInput};
use crate::sampler::Sampler;

/// Prompt tokens per prefill step: bounds activation memory for long prompts.
pub const PREFILL_CHUNK: usize = 512;

/// Timings of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generate_time: Duration,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token (not passed to the callback).
    Eos,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Stopped,
}

/// One model with a KV cache big enough for one sequence of the model's full context.
#[derive(Debug)]
pub struct Generator<'m> {
    pub model: &'m Model,
    kv: KvCache,
    pool: BlockPool,
}

impl<'m> Generator<'m> {
    /// A cache for `max_len` positions (prompt plus generated tokens).
    pub fn new(model: &'m Model, max_len: usize, dtype: KvDtype) -> Self {
        let max_len = max_len.min(model.config.context_length);
        let blocks = max_len.div_ceil(DEFAULT_BLOCK_SIZE).max(1);
        Self { model, kv: model.new_kv_cache(DEFAULT_BLOCK_SIZE, blocks, dtype), pool: BlockPool::new(blocks) }
    }

    /// Blocks not held by any sequence (all of them between calls).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    /// Runs `prompt` and generates up to `max_tokens`, calling `on_token` with each new id;
    /// `on_token` returns `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Finish, GenStats), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::BadBatch("empty prompt".into()));
        }
        let total = prompt.len() + max_tokens;
        let cap = self.pool.total_blocks() * DEFAULT_BLOCK_SIZE;
        if total > cap {
            return Err(EngineError::ContextOverflow { len: total, max: cap });
        }
        let blocks = self.pool.allocate(total.div_ceil(DEFAULT_BLOCK_SIZE))?;
        let result = self.run(prompt, max_tokens, eos, sampler, &mut on_token, &blocks);
        self.pool.release(blocks);
        result
    }

    fn run(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        sampler: &mut Sampler,
        on_token: &mut impl FnMut(u32) -> bool,
        blocks: &[u32],
    ) -> Result<(Finish, GenStats), EngineError> {
        let mut stats = GenStats { prompt_tokens: prompt.len(), ..Default::default() };
        let start = Instant::now();
        let mut logits = Vec::new();
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            let last = (i + 1) * PREFILL_CHUNK >= prompt.len();
            let seq = SeqInput {
                tokens: chunk,
                start_pos: i * PREFILL_CHUNK,
                block_table: blocks,
                logits: if last { LogitsMode::Last } else { LogitsMode::None },
            };
            logits = self.model.forward(&[seq], &mut self.kv)?.pop().unwrap_or_default();
        }
        stats.prompt_time = start.elapsed();
        let start = Instant::now();
        let mut finish = Finish::Length;
        for pos in prompt.len()..prompt.len() + max_tokens {
            let next = sampler.sample(&logits);
            if eos.contains(&next) {
                finish = Finish::Eos;
                break;
            }
            stats.generated_tokens += 1;
            if !on_token(next) {
                finish = Finish::Stopped;
                break;
            }
            if stats.generated_tokens == max_tokens {
                break;
            }
            let seq = SeqInput { tokens: &[next], start_pos: pos, block_table: blocks, logits: LogitsMode::Last };
            logits = self.model.forward(&[seq], &mut self.kv)?.pop().unwrap_or_default();
        }
        stats.generate_time = start.elapsed();
        Ok((finish, stats))
    }
}
