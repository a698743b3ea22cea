//! The KV block manager: which block holds what, who is using it, and which finished blocks
//! are kept as a prefix cache.
//!
//! A pure data structure (no threads, no clock, no device): the scheduler calls it to
//! allocate and free, the forward pass only ever sees block ids. Every operation is O(1) per
//! block: a free list, an intrusive LRU list of evictable cached blocks, and a hash map from
//! prefix hash to block.
//!
//! A full block is identified by a hash chain over token ids, `h_i = H(h_{i-1}, tokens_i)`,
//! so a block's hash names the whole prefix up to and including it: two requests share a block
//! only if everything before it matches too. Unreferenced blocks that carry a hash stay in the
//! cache until their slot is needed, least recently used first.

use std::collections::HashMap;

use crate::EngineError;

/// A block's index in the KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// The hash of a full block's tokens and of every token before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

impl BlockHash {
    /// Chains `tokens` (one full block) onto `parent` with XXH3-64, a hash with a published
    /// specification: every node and the router compute the same value for the same prefix,
    /// whatever build or platform they run.
    pub fn chain(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut bytes = Vec::with_capacity(8 + 4 * tokens.len());
        bytes.extend_from_slice(&parent.map_or(0x7461_6e64_656d_0000, |p| p.0).to_le_bytes());
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        BlockHash(xxhash_rust::xxh3::xxh3_64(&bytes))
    }

    /// The hashes of every full block of `tokens`.
    pub fn prefix_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(tokens.len() / block_size);
        let mut parent = None;
        for chunk in tokens.chunks_exact(block_size) {
            let h = BlockHash::chain(parent, chunk);
            out.push(h);
            parent = Some(h);
        }
        out
    }
}

/// The blocks one sequence holds, in position order, and how many of them are registered
/// in the prefix cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    pub table: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered (`hashes.len() <= table.len()`).
    pub hashes: Vec<BlockHash>,
}

impl SeqBlocks {
    /// Block ids as the forward pass takes them.
    pub fn ids(&self) -> Vec<u32> {
        self.table.iter().map(|b| b.0).collect()
    }
}

const NIL: u32 = u32::MAX;

/// Occupancy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockUsage {
    /// Referenced by at least one sequence.
    pub used: usize,
    /// Unreferenced but holding a cached prefix (evictable).
    pub cached: usize,
    /// Never used or evicted.
    pub free: usize,
}

/// The pool's bookkeeping.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, BlockId>,
    free: Vec<BlockId>,
    // Intrusive doubly linked LRU list of evictable blocks (refcount 0 with a hash).
    prev: Vec<u32>,
    next: Vec<u32>,
    lru_head: u32,
    lru_tail: u32,
    evictable: usize,
    /// Tokens whose KV was found in the cache instead of computed, over the manager's life.
    pub cache_hit_tokens: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            lru_head: NIL,
            lru_tail: NIL,
            evictable: 0,
            cache_hit_tokens: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that an allocation could take now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable
    }

    pub fn usage(&self) -> BlockUsage {
        let free = self.free.len();
        BlockUsage { used: self.refs.len() - free - self.evictable, cached: self.evictable, free }
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.refs[b.0 as usize]
    }

    /// How many leading tokens of `tokens` are cached, in whole blocks, without taking them.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        BlockHash::prefix_hashes(tokens, self.block_size).iter().take_while(|h| self.by_hash.contains_key(h)).count()
            * self.block_size
    }

    /// Gives a new sequence blocks for `tokens` (its prompt), reusing cached blocks of its
    /// longest cached prefix. Returns the blocks and how many leading tokens are already
    /// computed. At least one token is always left to compute, since sampling needs the last
    /// position's logits. On failure nothing is held.
    pub fn allocate_prompt(&mut self, tokens: &[u32]) -> Result<(SeqBlocks, usize), EngineError> {
        let hashes = BlockHash::prefix_hashes(tokens, self.block_size);
        let mut hits: Vec<(BlockId, BlockHash)> = Vec::new();
        for h in &hashes {
            match self.by_hash.get(h) {
                Some(&b) => hits.push((b, *h)),
                None => break,
            }
        }
        if hits.len() * self.block_size >= tokens.len() {
            hits.pop();
        }
        let need = tokens.len().div_ceil(self.block_size).max(1);
        let fresh = need - hits.len();
        // Taking a hit out of the LRU list reduces what is evictable; count it first.
        let hits_evictable = hits.iter().filter(|(b, _)| self.refs[b.0 as usize] == 0).count();
        if fresh > self.available() - hits_evictable {
            return Err(EngineError::OutOfBlocks { needed: fresh, free: self.available() - hits_evictable });
        }
        let mut seq = SeqBlocks::default();
        for (b, h) in &hits {
            self.retain(*b);
            seq.table.push(*b);
            seq.hashes.push(*h);
        }
        for _ in 0..fresh {
            let b = self.take_block().ok_or(EngineError::OutOfBlocks { needed: 1, free: 0 })?;
            seq.table.push(b);
        }
        let cached = hits.len() * self.block_size;
        self.cache_hit_tokens += cached as u64;
        Ok((seq, cached))
    }

    /// Makes sure `seq` has room for `len` positions, taking new blocks at the end.
    pub fn grow(&mut self, seq: &mut SeqBlocks, len: usize) -> Result<(), EngineError> {
        let need = len.div_ceil(self.block_size);
        if need > seq.table.len() {
            let extra = need - seq.table.len();
            if extra > self.available() {
                return Err(EngineError::OutOfBlocks { needed: extra, free: self.available() });
            }
            for _ in 0..extra {
                let b = self.take_block().ok_or(EngineError::OutOfBlocks { needed: 1, free: 0 })?;
                seq.table.push(b);
            }
        }
        Ok(())
    }

    /// Registers the full blocks among `tokens[..computed]` (whose KV is now written) in the
    /// prefix cache. If another sequence registered the same prefix meanwhile, this sequence
    /// keeps its own copy and the cache keeps the first.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        let full = (computed / self.block_size).min(seq.table.len());
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied();
            let h = BlockHash::chain(parent, &tokens[i * self.block_size..(i + 1) * self.block_size]);
            let b = seq.table[i];
            if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(h) {
                e.insert(b);
                self.hash_of[b.0 as usize] = Some(h);
            }
            seq.hashes.push(h);
        }
    }

    /// Releases every block of `seq`. Blocks nobody else holds become evictable cache (if
    /// they carry a hash) or free.
    pub fn free(&mut self, seq: SeqBlocks) {
        // Release from the end so a sequence's earlier blocks end up more recently used:
        // eviction then drops a prefix's tail before its head.
        for b in seq.table.into_iter().rev() {
            self.release(b);
        }
    }

    fn retain(&mut self, b: BlockId) {
        let i = b.0 as usize;
        if self.refs[i] == 0 {
            self.lru_unlink(b.0);
        }
        self.refs[i] += 1;
    }

    fn release(&mut self, b: BlockId) {
        let i = b.0 as usize;
        debug_assert!(self.refs[i] > 0, "block {i} released more often than taken");
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.lru_push_back(b.0);
            } else {
                self.free.push(b);
            }
        }
    }

    /// A block with refcount 1: a free one, else the least recently used cached one.
    fn take_block(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let head = self.lru_head;
                if head == NIL {
                    return None;
                }
                self.lru_unlink(head);
                if let Some(h) = self.hash_of[head as usize].take() {
                    self.by_hash.remove(&h);
                }
                BlockId(head)
            }
        };
        self.refs[b.0 as usize] = 1;
        Some(b)
    }

    fn lru_push_back(&mut self, i: u32) {
        self.prev[i as usize] = self.lru_tail;
        self.next[i as usize] = NIL;
        if self.lru_tail != NIL {
            self.next[self.lru_tail as usize] = i;
        } else {
            self.lru_head = i;
        }
        self.lru_tail = i;
        self.evictable += 1;
    }

    fn lru_unlink(&mut self, i: u32) {
        let (p, n) = (self.prev[i as usize], self.next[i as usize]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.lru_head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.lru_tail = p;
        }
        self.prev[i as usize] = NIL;
        self.next[i as usize] = NIL;
        self.evictable -= 1;
    }
}

#[cfg(test)]
mod tests;
