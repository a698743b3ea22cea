//! The messages KV frames carry, archived with rkyv and validated with bytecheck once, at the
//! boundary, before any field is used.

use rkyv::{Archive, Deserialize, Serialize};

use crate::KvTransferError;
use crate::layout::KvLayout;

/// The header of a frame that carries KV: which request, which layers, which of the
/// receiver's blocks, and how many payload bytes follow (`layer_count × block_ids.len()`
/// block-layers, each keys then values, layers outermost).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct KvHeader {
    pub request_id: u64,
    /// W3C `traceparent` of the request's trace, empty when not traced.
    pub trace_context: String,
    pub layer_start: u32,
    pub layer_count: u32,
    /// Block ids in the receiver's pool, from the receiver's admission.
    pub block_ids: Vec<u32>,
    /// `KvDtype::code()` of the payload.
    pub dtype: u8,
    pub byte_len: u64,
}

/// Everything a KV connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub enum Message {
    /// First frame of each side: who I am and the KV layout I hold.
    Hello { node_id: String, layout: KvLayout },
    /// Layers of some blocks of one request; the payload follows the header.
    Kv(KvHeader),
    /// The sender has sent every block-layer of the request, and the first sampled token.
    Done { request_id: u64, first_token: u32 },
    /// Either side gives up on a request; its blocks are released on both sides.
    Cancel { request_id: u64, reason: String },
    /// Keeps leases alive and detects a stalled peer.
    Heartbeat { seq: u64 },
    /// The peer refused the connection; the reason names why.
    Refuse { reason: String },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Kv(_) => "Kv",
            Message::Done { .. } => "Done",
            Message::Cancel { .. } => "Cancel",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Refuse { .. } => "Refuse",
        }
    }

    /// Serializes the message (the frame's header bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|v| v.to_vec()).unwrap_or_default()
    }

    /// Validates then deserializes header bytes. `bytes` may have any alignment: they are
    /// copied into an aligned buffer first (headers are small).
    pub fn from_bytes(bytes: &[u8]) -> Result<Message, KvTransferError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Message, rkyv::rancor::Error>(&aligned)
            .map_err(|e| KvTransferError::MalformedHeader(e.to_string()))
    }
}
