//! A KV pool in ordinary memory, `[layer][block][keys|values]`: both a [`KvSource`] and a
//! [`KvSink`]. For tests, benchmarks and tools that move KV without an engine.

use crate::inbound::KvSink;
use crate::layout::KvLayout;
use crate::outbound::KvSource;

/// `blocks` blocks of every layer, contiguous.
#[derive(Debug, Clone)]
pub struct MemPool {
    pub half: usize,
    pub blocks: usize,
    pub bytes: Vec<u8>,
}

impl MemPool {
    /// A pool whose byte `i` is `fill(i)`.
    pub fn new(layout: &KvLayout, blocks: usize, fill: impl Fn(usize) -> u8) -> Self {
        let half = layout.half_block_bytes();
        let n = layout.n_layers as usize * blocks * 2 * half;
        MemPool { half, blocks, bytes: (0..n).map(fill).collect() }
    }

    /// Byte range of the keys (`values == false`) or values of `block` in `layer`.
    pub fn at(&self, layer: u32, block: u32, values: bool) -> std::ops::Range<usize> {
        let i = ((layer as usize * self.blocks + block as usize) * 2 + values as usize) * self.half;
        i..i + self.half
    }
}

impl KvSource for MemPool {
    fn half_block(&self, layer: u32, block: u32, values: bool) -> &[u8] {
        &self.bytes[self.at(layer, block, values)]
    }
}

impl KvSink for MemPool {
    fn half_block(&mut self, layer: u32, block: u32, values: bool) -> &mut [u8] {
        let r = self.at(layer, block, values);
        &mut self.bytes[r]
    }
}
