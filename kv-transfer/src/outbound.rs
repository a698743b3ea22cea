//! The sending side: a KV frame for some layers of some blocks, as a header plus the list of
//! source slices to write after it (vectored, so the payload goes from the sender's pool to
//! the transport without an intermediate buffer).

use std::ops::Range;

use crate::frame::encode_frame;
use crate::layout::KvLayout;
use crate::message::{KvHeader, Message};

/// Where KV to send comes from: the sender's pool.
pub trait KvSource {
    /// Keys (`values == false`) or values of `block` in `layer`: `half_block_bytes()` bytes.
    fn half_block(&self, layer: u32, block: u32, values: bool) -> &[u8];
}

/// One KV frame: layers `layers` of the sender's `src_blocks`, to land in the receiver's
/// `dst_blocks` (same order). Returns the preamble and header, then the payload slices in
/// wire order.
pub fn encode_kv<'a, S: KvSource + ?Sized>(
    layout: &KvLayout,
    request_id: u64,
    trace_context: &str,
    layers: Range<u32>,
    src_blocks: &[u32],
    dst_blocks: &[u32],
    source: &'a S,
) -> (Vec<u8>, Vec<&'a [u8]>) {
    debug_assert_eq!(src_blocks.len(), dst_blocks.len());
    let n_layers = layers.end.saturating_sub(layers.start);
    let byte_len = n_layers as u64 * dst_blocks.len() as u64 * layout.block_layer_bytes() as u64;
    let header = KvHeader {
        request_id,
        trace_context: trace_context.to_string(),
        layer_start: layers.start,
        layer_count: n_layers,
        block_ids: dst_blocks.to_vec(),
        dtype: layout.dtype.code(),
        byte_len,
    };
    let mut payload = Vec::with_capacity(2 * n_layers as usize * src_blocks.len());
    for layer in layers {
        for &b in src_blocks {
            payload.push(source.half_block(layer, b, false));
            payload.push(source.half_block(layer, b, true));
        }
    }
    (encode_frame(&Message::Kv(header), byte_len), payload)
}
