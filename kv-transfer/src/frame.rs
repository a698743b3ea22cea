//! Frames: a fixed 20-byte preamble, an rkyv header, then (for KV frames) raw payload bytes.
//!
//! ```text
//! magic "TDKV" | version u16 | flags u16 (0) | header_len u32 | payload_len u64 | header | payload
//! ```
//!
//! [`FrameDecoder`] is a streaming decoder: it takes whatever bytes arrived, consumes what it
//! can, and separates "incomplete" (wait for more) from "invalid" (an error). Lengths are
//! checked against limits before anything is allocated for them, and the payload is never
//! buffered: it comes back as slices of the caller's input, to be copied once, straight into
//! the destination blocks.

use crate::KvTransferError;
use crate::message::Message;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TDKV";
/// Bytes before the header.
pub const PREAMBLE_LEN: usize = 20;
/// Largest header accepted: a header lists block ids, so this bounds a frame to about 16K
/// blocks, far more than one request's layer needs.
pub const MAX_HEADER_LEN: u32 = 64 * 1024;

/// Serializes a frame's preamble and header; `payload_len` bytes must follow it.
pub fn encode_frame(msg: &Message, payload_len: u64) -> Vec<u8> {
    let header = msg.to_bytes();
    let mut out = Vec::with_capacity(PREAMBLE_LEN + header.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&header);
    out
}

/// What the decoder produced from the bytes it consumed.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A validated message; `payload_len` bytes of payload follow as [`Decoded::Payload`].
    Message { message: Message, payload_len: u64 },
    /// The next slice of the current frame's payload.
    Payload(&'a [u8]),
}

#[derive(Debug)]
enum State {
    Preamble { buf: [u8; PREAMBLE_LEN], have: usize },
    Header { buf: Vec<u8>, need: usize, payload_len: u64 },
    Payload { remaining: u64 },
}

/// Streaming frame decoder for one direction of one connection.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: u64,
    state: State,
}

impl FrameDecoder {
    /// A decoder refusing payloads larger than `max_payload` bytes.
    pub fn new(max_payload: u64) -> Self {
        Self { max_payload, state: State::Preamble { buf: [0; PREAMBLE_LEN], have: 0 } }
    }

    /// Whether the stream is between frames (a clean place to end).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Preamble { have: 0, .. })
    }

    /// At end of stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), KvTransferError> {
        match &self.state {
            State::Preamble { have: 0, .. } => Ok(()),
            State::Preamble { have, .. } => Err(KvTransferError::Truncated((PREAMBLE_LEN - have) as u64)),
            State::Header { buf, need, payload_len } => {
                Err(KvTransferError::Truncated((need - buf.len()) as u64 + payload_len))
            }
            State::Payload { remaining } => Err(KvTransferError::Truncated(*remaining)),
        }
    }

    /// Consumes a prefix of `input`. Returns how many bytes were used and, when one completed,
    /// a message or a payload slice. Call again with the rest until it consumes nothing.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Decoded<'a>>), KvTransferError> {
        match &mut self.state {
            State::Preamble { buf, have } => {
                let n = (PREAMBLE_LEN - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                if *have < PREAMBLE_LEN {
                    return Ok((n, None));
                }
                let pre = *buf;
                let magic = [pre[0], pre[1], pre[2], pre[3]];
                if magic != MAGIC {
                    return Err(KvTransferError::BadMagic(magic));
                }
                let version = u16::from_le_bytes([pre[4], pre[5]]);
                if version != PROTOCOL_VERSION {
                    return Err(KvTransferError::UnsupportedVersion(version));
                }
                let flags = u16::from_le_bytes([pre[6], pre[7]]);
                if flags != 0 {
                    return Err(KvTransferError::ReservedFlags(flags));
                }
                let header_len = u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]);
                if header_len == 0 || header_len > MAX_HEADER_LEN {
                    return Err(KvTransferError::HeaderTooLarge { len: header_len, max: MAX_HEADER_LEN });
                }
                let payload_len = u64::from_le_bytes(pre[12..20].try_into().unwrap_or([0xff; 8]));
                if payload_len > self.max_payload {
                    return Err(KvTransferError::PayloadTooLarge { len: payload_len, max: self.max_payload });
                }
                let need = header_len as usize;
                self.state = State::Header { buf: Vec::with_capacity(need), need, payload_len };
                Ok((n, None))
            }
            State::Header { buf, need, payload_len } => {
                let n = (*need - buf.len()).min(input.len());
                buf.extend_from_slice(&input[..n]);
                if buf.len() < *need {
                    return Ok((n, None));
                }
                let message = Message::from_bytes(buf)?;
                let payload_len = *payload_len;
                match &message {
                    Message::Kv(h) if h.byte_len != payload_len => {
                        return Err(KvTransferError::MalformedHeader(format!(
                            "KV header declares {} bytes but the frame carries {payload_len}",
                            h.byte_len
                        )));
                    }
                    Message::Kv(_) => {}
                    other if payload_len != 0 => {
                        return Err(KvTransferError::UnexpectedPayload { kind: other.kind(), len: payload_len });
                    }
                    _ => {}
                }
                self.state = if payload_len > 0 {
                    State::Payload { remaining: payload_len }
                } else {
                    State::Preamble { buf: [0; PREAMBLE_LEN], have: 0 }
                };
                Ok((n, Some(Decoded::Message { message, payload_len })))
            }
            State::Payload { remaining } => {
                let n = (*remaining).min(input.len() as u64) as usize;
                if n == 0 {
                    return Ok((0, None));
                }
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.state = State::Preamble { buf: [0; PREAMBLE_LEN], have: 0 };
                }
                Ok((n, Some(Decoded::Payload(&input[..n]))))
            }
        }
    }
}

#[cfg(test)]
mod tests;
