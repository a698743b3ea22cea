//! Iteration-level scheduling: which tokens of which sequences run in the next forward step.
//!
//! Sans-IO: the scheduler holds the queues and the block manager and answers
//! [`Scheduler::schedule`] with a [`Plan`]; the caller runs the plan through the model, then
//! reports back with [`Scheduler::complete`] and [`Scheduler::append_token`] /
//! [`Scheduler::finish`]. No clock, no threads, so every policy is tested step by step.
//!
//! A sequence is a token list (prompt, then generated tokens) and a count of tokens whose KV
//! is in the cache. Each step computes some of the rest; a step that reaches the end samples.
//! A preempted sequence loses its blocks and recomputes everything it had (prompt and output)
//! as one longer prompt when readmitted; its cached full blocks usually survive in the prefix
//! cache, so the recompute is mostly cache hits.

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

use crate::EngineError;
use crate::block_manager::{BlockManager, BlockUsage, SeqBlocks};

/// A request's identity inside one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// How prompts and decodes share a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// New prompts run as soon as they arrive; running decodes pause for those steps.
    PrefillFirst,
    /// Running decodes never wait; whole prompts fill what is left of the step's budget.
    DecodeFirst,
    /// A fixed per-step token budget: decodes first, then prompt chunks fill the rest
    /// (Sarathi-style stall-free batching).
    #[default]
    Chunked,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill-first" => Ok(Policy::PrefillFirst),
            "decode-first" => Ok(Policy::DecodeFirst),
            "chunked" => Ok(Policy::Chunked),
            other => Err(format!("unknown policy {other:?} (prefill-first, decode-first, chunked)")),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::PrefillFirst => "prefill-first",
            Policy::DecodeFirst => "decode-first",
            Policy::Chunked => "chunked",
        })
    }
}

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub policy: Policy,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Tokens in one step at most (prefill-first and decode-first).
    pub max_batched_tokens: usize,
    /// Tokens in one step for the chunked policy.
    pub chunk_size: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { policy: Policy::Chunked, max_running: 64, max_batched_tokens: 2048, chunk_size: 256 }
    }
}

/// One sequence's share of a step: compute `tokens[start..start + len]`, and sample the next
/// token if `sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    pub id: RequestId,
    pub start: usize,
    pub len: usize,
    pub sample: bool,
}

/// The next step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// Sequences that lost their blocks this step and went back to waiting.
    pub preempted: Vec<RequestId>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

#[derive(Debug)]
struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    blocks: Option<SeqBlocks>,
    /// Admission order; preemption takes the largest.
    arrival: u64,
}

/// Counters for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tokens run through the model (prefill and decode).
    pub computed_tokens: u64,
    /// Tokens whose KV came from the prefix cache instead.
    pub cached_tokens: u64,
    pub preemptions: u64,
}

/// Queues, sequences and the block manager.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<RequestId, Sequence>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    next_arrival: u64,
    pub stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, num_blocks: usize, block_size: usize) -> Self {
        Self {
            config,
            blocks: BlockManager::new(num_blocks, block_size),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn usage(&self) -> BlockUsage {
        self.blocks.usage()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The most positions one sequence can ever hold.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.num_blocks() * self.blocks.block_size()
    }

    /// Queues a sequence. Fails if it could never fit in the whole pool.
    pub fn add(&mut self, id: RequestId, prompt: Vec<u32>, max_new_tokens: usize) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::BadBatch("empty prompt".into()));
        }
        if self.seqs.contains_key(&id) {
            return Err(EngineError::BadBatch(format!("request {} already exists", id.0)));
        }
        let max_len = prompt.len() + max_new_tokens;
        if max_len > self.capacity_tokens() {
            return Err(EngineError::KvCapacity { len: max_len, capacity: self.capacity_tokens() });
        }
        let prompt_len = prompt.len();
        self.seqs.insert(id, Sequence { tokens: prompt, prompt_len, computed: 0, blocks: None, arrival: 0 });
        self.waiting.push_back(id);
        Ok(())
    }

    /// Removes a sequence wherever it is and frees its blocks. False if unknown.
    pub fn finish(&mut self, id: RequestId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else { return false };
        self.waiting.retain(|w| *w != id);
        self.running.retain(|r| *r != id);
        if let Some(b) = seq.blocks {
            self.blocks.free(b);
        }
        true
    }

    /// All tokens of a sequence (prompt, then output).
    pub fn tokens(&self, id: RequestId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    pub fn prompt_len(&self, id: RequestId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.prompt_len)
    }

    /// Block ids of a running sequence, as the forward pass takes them.
    pub fn block_table(&self, id: RequestId) -> Option<Vec<u32>> {
        self.seqs.get(&id).and_then(|s| s.blocks.as_ref()).map(SeqBlocks::ids)
    }

    /// Records that a step ran: the planned tokens are now in the cache.
    pub fn complete(&mut self, plan: &Plan) {
        for item in &plan.items {
            if let Some(seq) = self.seqs.get_mut(&item.id) {
                seq.computed = seq.computed.max(item.start + item.len);
                if let Some(b) = seq.blocks.as_mut() {
                    self.blocks.commit(b, &seq.tokens, seq.computed);
                }
                self.stats.computed_tokens += item.len as u64;
            }
        }
    }

    /// Adds a sampled token to a sequence that keeps going.
    pub fn append_token(&mut self, id: RequestId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// The next step's plan under the configured policy.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        match self.config.policy {
            Policy::PrefillFirst => {
                let budget = self.config.max_batched_tokens;
                let used = self.continue_prefills(&mut plan, budget);
                self.admit(&mut plan, budget - used, true);
                if plan.is_empty() {
                    self.decodes(&mut plan, usize::MAX);
                }
            }
            Policy::DecodeFirst => {
                let budget = self.config.max_batched_tokens;
                let mut used = self.decodes(&mut plan, budget);
                used += self.continue_prefills(&mut plan, budget - used);
                self.admit(&mut plan, budget - used, false);
            }
            Policy::Chunked => {
                let budget = self.config.chunk_size;
                let mut used = self.decodes(&mut plan, budget);
                used += self.continue_prefills(&mut plan, budget - used);
                self.admit(&mut plan, budget - used, true);
            }
        }
        plan
    }

    /// One decode token for every running sequence that has finished its prompt. A sequence
    /// that needs a new block and finds none preempts the latest arrival (possibly itself).
    fn decodes(&mut self, plan: &mut Plan, budget: usize) -> usize {
        let mut used = 0;
        let order: Vec<RequestId> = self.running.clone();
        for id in order {
            if used >= budget {
                break;
            }
            let Some(seq) = self.seqs.get(&id) else { continue };
            if seq.blocks.is_none() || seq.computed + 1 != seq.tokens.len() {
                continue;
            }
            if !self.make_room(id, plan) {
                continue;
            }
            let seq = &self.seqs[&id];
            plan.items.push(PlanItem { id, start: seq.computed, len: 1, sample: true });
            used += 1;
        }
        used
    }

    /// Grows `id`'s blocks to hold all its tokens, preempting later arrivals while none are
    /// free. False if `id` itself had to be preempted.
    fn make_room(&mut self, id: RequestId, plan: &mut Plan) -> bool {
        loop {
            let seq = self.seqs.get_mut(&id).expect("running sequence exists");
            let len = seq.tokens.len();
            let blocks = seq.blocks.as_mut().expect("running sequence has blocks");
            if self.blocks.grow(blocks, len).is_ok() {
                return true;
            }
            let victim = self
                .running
                .iter()
                .copied()
                .filter(|r| !plan.items.iter().any(|i| i.id == *r))
                .max_by_key(|r| self.seqs[r].arrival)
                .unwrap_or(id);
            self.preempt(victim, plan);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, id: RequestId, plan: &mut Plan) {
        let seq = self.seqs.get_mut(&id).expect("preempted sequence exists");
        if let Some(b) = seq.blocks.take() {
            self.blocks.free(b);
        }
        seq.computed = 0;
        self.running.retain(|r| *r != id);
        // Ahead of every sequence never admitted (arrival 0) and of preempted ones that
        // arrived later, so the oldest work always resumes first.
        let arrival = seq.arrival;
        let pos = self
            .waiting
            .iter()
            .position(|w| {
                let a = self.seqs[w].arrival;
                a == 0 || a > arrival
            })
            .unwrap_or(self.waiting.len());
        self.waiting.insert(pos, id);
        plan.preempted.push(id);
        self.stats.preemptions += 1;
    }

    /// Next chunks of running sequences still in their prompt.
    fn continue_prefills(&mut self, plan: &mut Plan, mut budget: usize) -> usize {
        let mut used = 0;
        for &id in &self.running {
            if budget == 0 {
                break;
            }
            let seq = &self.seqs[&id];
            let remaining = seq.tokens.len() - seq.computed;
            // One token left is a decode step (even the last prompt token): `decodes` runs it.
            if seq.blocks.is_none() || remaining <= 1 || plan.items.iter().any(|i| i.id == id) {
                continue;
            }
            let len = remaining.min(budget);
            plan.items.push(PlanItem { id, start: seq.computed, len, sample: len == remaining });
            budget -= len;
            used += len;
        }
        used
    }

    /// Moves waiting sequences into the running batch while blocks, batch slots and the token
    /// budget allow. Strictly first come, first served: the head blocks everyone behind it.
    /// With `chunk`, a prompt larger than the budget starts with a chunk; otherwise it waits
    /// for a budget that fits it whole, unless nothing else is running.
    fn admit(&mut self, plan: &mut Plan, mut budget: usize, chunk: bool) {
        let watermark = (self.blocks.num_blocks() / 100).max(1);
        while let Some(&id) = self.waiting.front() {
            if self.running.len() >= self.config.max_running || budget == 0 {
                break;
            }
            let seq = &self.seqs[&id];
            let cached = self.blocks.cached_prefix_len(&seq.tokens).min(seq.tokens.len() - 1);
            let remaining = seq.tokens.len() - cached;
            let alone = self.running.is_empty() && plan.is_empty();
            if remaining > budget && !chunk && !alone {
                break;
            }
            let need = seq.tokens.len().div_ceil(self.blocks.block_size());
            if !alone && need + watermark > self.blocks.available() {
                break;
            }
            let Ok((blocks, cached)) = self.blocks.allocate_prompt(&seq.tokens) else { break };
            self.waiting.pop_front();
            let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
            seq.computed = cached;
            seq.blocks = Some(blocks);
            if seq.arrival == 0 {
                self.next_arrival += 1;
                seq.arrival = self.next_arrival;
            }
            self.stats.cached_tokens += cached as u64;
            let remaining = seq.tokens.len() - cached;
            let len = if chunk { remaining.min(budget) } else { remaining };
            plan.items.push(PlanItem { id, start: cached, len, sample: len == remaining });
            budget = budget.saturating_sub(len);
            self.running.push(id);
        }
    }
}
