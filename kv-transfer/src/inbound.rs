//! The receiving side of KV transfers: which requests may write which blocks, and the payload
//! of each KV frame written straight into those blocks as it streams in.
//!
//! A decode node registers a request with [`Inbound::expect`] when it admits it (the blocks it
//! allocated that the prefill node must fill). Every KV header is then checked against that
//! registration before a byte of its payload is accepted: unknown request, layers out of range,
//! a block outside the allocation, a block-layer sent twice, a wrong dtype or a length that
//! does not add up is an error naming the problem, and nothing is written.

use std::collections::{HashMap, HashSet};

use crate::KvTransferError;
use crate::layout::KvLayout;
use crate::message::{KvHeader, Message};

/// Where received KV goes: the receiver's pool, addressed by (layer, block, keys or values).
pub trait KvSink {
    /// The destination of the keys (`values == false`) or values of `block` in `layer`:
    /// exactly `layout.half_block_bytes()` bytes. Only called for validated blocks.
    fn half_block(&mut self, layer: u32, block: u32, values: bool) -> &mut [u8];
}

/// What a message meant for the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundEvent {
    /// Every block-layer of the request arrived; decoding can start with `first_token`.
    Complete { request_id: u64, first_token: u32 },
    /// The sender gave up on the request.
    Cancelled { request_id: u64, reason: String },
}

#[derive(Debug)]
struct Expected {
    allowed: HashSet<u32>,
    received: HashSet<(u32, u32)>,
    needed: usize,
}

#[derive(Debug)]
struct Current {
    request_id: u64,
    layer_start: u32,
    blocks: Vec<u32>,
    /// Index of the half-block being written: layer-major, then block, then keys/values.
    segment: usize,
    offset: usize,
    segments: usize,
}

/// Receiver state for one connection.
#[derive(Debug)]
pub struct Inbound {
    layout: KvLayout,
    expected: HashMap<u64, Expected>,
    current: Option<Current>,
}

impl Inbound {
    pub fn new(layout: KvLayout) -> Self {
        Self { layout, expected: HashMap::new(), current: None }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Registers a request whose sender will fill every layer of `blocks`.
    pub fn expect(&mut self, request_id: u64, blocks: &[u32]) {
        let allowed: HashSet<u32> = blocks.iter().copied().collect();
        let needed = allowed.len() * self.layout.n_layers as usize;
        self.expected.insert(request_id, Expected { allowed, received: HashSet::new(), needed });
    }

    /// Forgets a request (cancelled, failed or finished elsewhere). Later frames for it are
    /// errors. False if it was not registered.
    pub fn forget(&mut self, request_id: u64) -> bool {
        if self.current.as_ref().is_some_and(|c| c.request_id == request_id) {
            self.current = None;
        }
        self.expected.remove(&request_id).is_some()
    }

    /// Requests still waiting for KV.
    pub fn pending(&self) -> impl Iterator<Item = u64> + '_ {
        self.expected.keys().copied()
    }

    /// Block-layers still missing for a request.
    pub fn missing(&self, request_id: u64) -> Option<usize> {
        self.expected.get(&request_id).map(|e| e.needed - e.received.len())
    }

    /// Handles a decoded message. KV headers are validated and prepare the payload writes.
    pub fn on_message(&mut self, msg: &Message) -> Result<Option<InboundEvent>, KvTransferError> {
        match msg {
            Message::Kv(h) => {
                self.start_kv(h)?;
                Ok(None)
            }
            Message::Done { request_id, first_token } => {
                let exp = self.expected.get(request_id).ok_or(KvTransferError::UnknownRequest(*request_id))?;
                let missing = exp.needed - exp.received.len();
                if missing > 0 || self.current.is_some() {
                    return Err(KvTransferError::Incomplete { request: *request_id, missing });
                }
                self.expected.remove(request_id);
                Ok(Some(InboundEvent::Complete { request_id: *request_id, first_token: *first_token }))
            }
            Message::Cancel { request_id, reason } => {
                self.forget(*request_id);
                Ok(Some(InboundEvent::Cancelled { request_id: *request_id, reason: reason.clone() }))
            }
            Message::Hello { .. } | Message::Heartbeat { .. } | Message::Refuse { .. } => Ok(None),
        }
    }

    fn start_kv(&mut self, h: &KvHeader) -> Result<(), KvTransferError> {
        let request = h.request_id;
        let exp = self.expected.get(&request).ok_or(KvTransferError::UnknownRequest(request))?;
        let end = h.layer_start.checked_add(h.layer_count).filter(|e| *e <= self.layout.n_layers && h.layer_count > 0);
        let Some(end) = end else {
            return Err(KvTransferError::LayerRange {
                request,
                start: h.layer_start,
                end: h.layer_start.saturating_add(h.layer_count),
                layers: self.layout.n_layers,
            });
        };
        if h.block_ids.is_empty() {
            return Err(KvTransferError::EmptyKv { request });
        }
        if h.dtype != self.layout.dtype.code() {
            return Err(KvTransferError::WrongDtype { request, got: h.dtype, want: self.layout.dtype.code() });
        }
        let needed = (h.layer_count as u64)
            .checked_mul(h.block_ids.len() as u64)
            .and_then(|n| n.checked_mul(self.layout.block_layer_bytes() as u64));
        if needed != Some(h.byte_len) {
            return Err(KvTransferError::LengthMismatch {
                request,
                declared: h.byte_len,
                needed: needed.unwrap_or(u64::MAX),
                layers: h.layer_count,
                blocks: h.block_ids.len(),
            });
        }
        let mut seen = HashSet::new();
        for &b in &h.block_ids {
            if !exp.allowed.contains(&b) {
                return Err(KvTransferError::ForeignBlock { request, block: b });
            }
            for layer in h.layer_start..end {
                if exp.received.contains(&(layer, b)) || !seen.insert((layer, b)) {
                    return Err(KvTransferError::Duplicate { request, layer, block: b });
                }
            }
        }
        let exp = self.expected.get_mut(&request).ok_or(KvTransferError::UnknownRequest(request))?;
        exp.received.extend(seen);
        self.current = Some(Current {
            request_id: request,
            layer_start: h.layer_start,
            segments: 2 * h.layer_count as usize * h.block_ids.len(),
            blocks: h.block_ids.clone(),
            segment: 0,
            offset: 0,
        });
        Ok(())
    }

    /// Writes the next payload bytes of the current KV frame into `sink`.
    pub fn on_payload(&mut self, sink: &mut impl KvSink, mut bytes: &[u8]) -> Result<(), KvTransferError> {
        let half = self.layout.half_block_bytes();
        while !bytes.is_empty() {
            let Some(cur) = self.current.as_mut() else {
                return Err(KvTransferError::Protocol("payload bytes outside a KV frame".into()));
            };
            let per_layer = 2 * cur.blocks.len();
            let layer = cur.layer_start + (cur.segment / per_layer) as u32;
            let block = cur.blocks[(cur.segment % per_layer) / 2];
            let values = cur.segment % 2 == 1;
            let dst = sink.half_block(layer, block, values);
            let n = (half - cur.offset).min(bytes.len());
            dst[cur.offset..cur.offset + n].copy_from_slice(&bytes[..n]);
            cur.offset += n;
            bytes = &bytes[n..];
            if cur.offset == half {
                cur.offset = 0;
                cur.segment += 1;
                if cur.segment == cur.segments {
                    self.current = None;
                }
            }
        }
        Ok(())
    }
}
