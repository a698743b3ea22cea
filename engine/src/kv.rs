//! The paged KV cache: fixed-size blocks of token slots, addressed through a block table per
//! sequence, so sequences grow without reallocating and blocks can later be shared or sent.
//!
//! [`KvCache`] is storage only. [`BlockPool`] is the simplest allocator over it (a free
//! list); prefix sharing and eviction belong to the engine's block manager.

use half::f16;
use tandem_kernels::ops::PagedLayout;

use crate::EngineError;

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Element type of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Half the memory of f32; the default.
    #[default]
    F16,
    /// Exact; for checking against a reference.
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            other => Err(format!("unknown KV dtype {other:?} (f16 or f32)")),
        }
    }
}

/// One layer's keys and values, `[block][slot][kv_head][head_dim]` each.
#[derive(Debug)]
pub enum LayerKv {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

/// Keys and values of every layer for `num_blocks` blocks.
#[derive(Debug)]
pub struct KvCache {
    pub layout: PagedLayout,
    pub num_blocks: usize,
    pub dtype: KvDtype,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Self {
        let layout = PagedLayout { block_size, n_kv_heads, head_dim };
        let n = num_blocks * block_size * n_kv_heads * head_dim;
        let layers = (0..n_layers)
            .map(|_| match dtype {
                KvDtype::F16 => LayerKv::F16 { k: vec![f16::ZERO; n], v: vec![f16::ZERO; n] },
                KvDtype::F32 => LayerKv::F32 { k: vec![0.0; n], v: vec![0.0; n] },
            })
            .collect();
        Self { layout, num_blocks, dtype, layers }
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        2 * self.layers.len()
            * self.layout.block_size
            * self.layout.n_kv_heads
            * self.layout.head_dim
            * self.dtype.bytes()
    }
}

/// A free list of block ids.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self { free: (0..num_blocks as u32).rev().collect(), total: num_blocks }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, EngineError> {
        if n > self.free.len() {
            return Err(EngineError::OutOfBlocks { needed: n, free: self.free.len() });
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
        debug_assert!(self.free.len() <= self.total, "block released twice");
    }
}
