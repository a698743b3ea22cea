//! An in-memory KV pool that is both a transfer source and sink:
//! `[layer][block][keys|values][half_block_bytes]`.
#![allow(dead_code)]

use tandem_kv_transfer::{KvLayout, KvSink, KvSource};

pub struct Pool {
    pub half: usize,
    pub blocks: usize,
    pub bytes: Vec<u8>,
}

impl Pool {
    pub fn new(l: &KvLayout, blocks: usize, fill: impl Fn(usize) -> u8) -> Self {
        let half = l.half_block_bytes();
        let n = l.n_layers as usize * blocks * 2 * half;
        Pool { half, blocks, bytes: (0..n).map(fill).collect() }
    }

    pub fn at(&self, layer: u32, block: u32, values: bool) -> std::ops::Range<usize> {
        let i = ((layer as usize * self.blocks + block as usize) * 2 + values as usize) * self.half;
        i..i + self.half
    }
}

impl KvSource for Pool {
    fn half_block(&self, layer: u32, block: u32, values: bool) -> &[u8] {
        &self.bytes[self.at(layer, block, values)]
    }
}

impl KvSink for Pool {
    fn half_block(&mut self, layer: u32, block: u32, values: bool) -> &mut [u8] {
        let r = self.at(layer, block, values);
        &mut self.bytes[r]
    }
}
