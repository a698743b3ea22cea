//! The node-to-node KV-cache wire protocol.
//!
//! What this crate is: the sans-IO core that prefill and decode nodes use to move finished KV
//! blocks: the frame format ([`frame`]), the messages it carries ([`message`]), the layout
//! both ends must share ([`layout`]), and the per-request bookkeeping that turns a byte stream
//! into writes straight into the receiver's KV pool ([`inbound`]) or a KV pool into frames
//! ([`outbound`]). It takes bytes and returns bytes and events; sockets, QUIC streams and
//! shared-memory rings are thin shells around it.
//!
//! What it is not: a KV pool or a scheduler. It knows block ids and byte ranges, never tensors,
//! and depends on no other tandem crate.

pub mod connection;
pub mod frame;
pub mod inbound;
pub mod layout;
pub mod mem;
pub mod message;
pub mod outbound;
pub mod quic;
pub mod tls;

pub use connection::{Connection, ConnectionConfig, ConnectionEvent};
pub use frame::{Decoded, FrameDecoder, PROTOCOL_VERSION};
pub use inbound::{Inbound, InboundEvent, KvSink};
pub use layout::{KvDtype, KvLayout};
pub use message::{KvHeader, Message};
pub use outbound::{KvSource, encode_kv};

/// Everything that can be wrong with a peer's bytes or a transfer's bookkeeping. Each variant
/// names the offending value; the connection (or the request, where noted) is failed with it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KvTransferError {
    #[error("bad frame magic {0:02x?} (not a tandem KV stream)")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("reserved frame flags {0:#06x} are set")]
    ReservedFlags(u16),
    #[error("frame header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { len: u32, max: u32 },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: u64, max: u64 },
    #[error("malformed frame header: {0}")]
    MalformedHeader(String),
    #[error("{kind} message carries a {len}-byte payload; only KV frames have one")]
    UnexpectedPayload { kind: &'static str, len: u64 },
    #[error("peer layout hash {peer:#018x} does not match ours {ours:#018x} ({detail})")]
    Incompatible { ours: u64, peer: u64, detail: String },
    #[error("request {0} is not expected here (never admitted, finished or cancelled)")]
    UnknownRequest(u64),
    #[error("request {request}: layers {start}..{end} are outside the model's {layers}")]
    LayerRange { request: u64, start: u32, end: u32, layers: u32 },
    #[error("request {request}: block {block} is not part of its allocation")]
    ForeignBlock { request: u64, block: u32 },
    #[error("request {request}: layer {layer} of block {block} was already received")]
    Duplicate { request: u64, layer: u32, block: u32 },
    #[error("request {request}: KV dtype {got} does not match the layout's {want}")]
    WrongDtype { request: u64, got: u8, want: u8 },
    #[error(
        "request {request}: header says {declared} payload bytes, {layers} layers of {blocks} blocks need {needed}"
    )]
    LengthMismatch { request: u64, declared: u64, needed: u64, layers: u32, blocks: usize },
    #[error("request {request}: the KV frame has no blocks")]
    EmptyKv { request: u64 },
    #[error("request {request}: Done with {missing} block-layers still missing")]
    Incomplete { request: u64, missing: usize },
    #[error("peer stalled: nothing received for {silent_ms} ms")]
    Stalled { silent_ms: u128 },
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("stream ended inside a frame ({0} bytes short)")]
    Truncated(u64),
}
