//! One KV connection between two nodes, as a sans-IO state machine: bytes and `now` in,
//! bytes, events and a timer deadline out. Transports (QUIC streams, shared memory, sockets)
//! only move the bytes; every decision is made here and tested without a runtime or a clock.
//!
//! Methods, in quinn-proto's order: getters; `handle_*` (input); mutators (`expect`,
//! `send_*`); `poll_*` (output).
//!
//! Lifecycle: each side sends `Hello` (node id and KV layout) first. A peer whose layout hash
//! differs is refused with a message naming the differing fields, and the connection closes.
//! Afterwards any bytes from the peer prove it alive; if nothing arrives for `idle_timeout`
//! the peer is declared stalled, the connection closes, and every request it carried fails
//! (only those: other connections go on). Heartbeats are sent every `idle_timeout / 3` so an
//! idle but healthy peer never looks stalled.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::KvTransferError;
use crate::frame::{Decoded, FrameDecoder, encode_frame};
use crate::inbound::{Inbound, InboundEvent, KvSink};
use crate::layout::KvLayout;
use crate::message::Message;

/// Tunables of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub node_id: String,
    pub layout: KvLayout,
    /// Largest KV frame payload accepted.
    pub max_payload: u64,
    /// A peer silent this long is stalled.
    pub idle_timeout: Duration,
}

/// What happened on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Handshake done: the peer's layout matches ours.
    Open { peer: String },
    /// Every block-layer of a request arrived (receiving side).
    Complete { request_id: u64, first_token: u32 },
    /// The peer cancelled a request.
    Cancelled { request_id: u64, reason: String },
    /// The connection is over; `requests` were still in flight on it and have failed.
    Closed { error: Option<KvTransferError>, requests: Vec<u64> },
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Handshake,
    Open { peer: String },
    Closed,
}

/// A KV connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    state: State,
    decoder: FrameDecoder,
    inbound: Inbound,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<ConnectionEvent>,
    last_heard: Instant,
    last_sent: Instant,
    heartbeat_seq: u64,
    /// Requests this side is sending (so a closed connection can fail them).
    sending: Vec<u64>,
}

impl Connection {
    /// A connection that greets its peer at once.
    pub fn new(config: ConnectionConfig, now: Instant) -> Self {
        let hello = Message::Hello { node_id: config.node_id.clone(), layout: config.layout.clone() };
        let mut transmit = VecDeque::new();
        transmit.push_back(encode_frame(&hello, 0));
        Self {
            decoder: FrameDecoder::new(config.max_payload),
            inbound: Inbound::new(config.layout.clone()),
            config,
            state: State::Handshake,
            transmit,
            events: VecDeque::new(),
            last_heard: now,
            last_sent: now,
            heartbeat_seq: 0,
            sending: Vec::new(),
        }
    }

    // Getters.

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn peer(&self) -> Option<&str> {
        match &self.state {
            State::Open { peer } => Some(peer),
            _ => None,
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.config.layout
    }

    // Input.

    /// Bytes from the peer. KV payload is written into `sink` as it arrives. An invalid byte
    /// closes the connection (the error is in the `Closed` event and returned).
    pub fn handle_bytes(&mut self, sink: &mut impl KvSink, data: &[u8], now: Instant) -> Result<(), KvTransferError> {
        if self.is_closed() {
            return Ok(());
        }
        self.last_heard = now;
        let mut rest = data;
        while !rest.is_empty() {
            let step = self.decoder.decode(rest).and_then(|(n, item)| {
                match item {
                    Some(Decoded::Message { message, .. }) => self.on_message(message)?,
                    Some(Decoded::Payload(p)) => self.inbound.on_payload(sink, p)?,
                    None => {}
                }
                Ok(n)
            });
            match step {
                Ok(n) => rest = &rest[n..],
                Err(e) => {
                    self.close(Some(e.clone()));
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The peer closed its side.
    pub fn handle_eof(&mut self) {
        let err = self.decoder.finish().err();
        self.close(err);
    }

    /// Timers: stall detection and heartbeats.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if now.duration_since(self.last_heard) >= self.config.idle_timeout {
            let silent_ms = now.duration_since(self.last_heard).as_millis();
            self.close(Some(KvTransferError::Stalled { silent_ms }));
            return;
        }
        if self.is_open() && now.duration_since(self.last_sent) >= self.config.idle_timeout / 3 {
            self.heartbeat_seq += 1;
            self.push(encode_frame(&Message::Heartbeat { seq: self.heartbeat_seq }, 0), now);
        }
    }

    // Mutators.

    /// Registers a request this side receives into `blocks`.
    pub fn expect(&mut self, request_id: u64, blocks: &[u32]) {
        self.inbound.expect(request_id, blocks);
    }

    /// Queues frame bytes from [`crate::encode_kv`] or [`encode_frame`]. A transport that
    /// writes KV payload from the pool without copying passes the header here and writes the
    /// payload slices right after it; others pass the whole frame.
    pub fn send_frame(&mut self, request_id: Option<u64>, header: Vec<u8>, now: Instant) {
        if let Some(r) = request_id.filter(|r| !self.sending.contains(r)) {
            self.sending.push(r);
        }
        self.push(header, now);
    }

    /// All KV of a request was sent; `first_token` is the prefill's sampled token.
    pub fn send_done(&mut self, request_id: u64, first_token: u32, now: Instant) {
        self.sending.retain(|r| *r != request_id);
        self.push(encode_frame(&Message::Done { request_id, first_token }, 0), now);
    }

    /// Gives up on a request on both sides.
    pub fn cancel(&mut self, request_id: u64, reason: &str, now: Instant) {
        self.sending.retain(|r| *r != request_id);
        self.inbound.forget(request_id);
        self.push(encode_frame(&Message::Cancel { request_id, reason: reason.to_string() }, 0), now);
    }

    // Output.

    /// The next bytes to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ConnectionEvent> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let stall = self.last_heard + self.config.idle_timeout;
        let beat = self.last_sent + self.config.idle_timeout / 3;
        Some(if self.is_open() { stall.min(beat) } else { stall })
    }

    fn push(&mut self, bytes: Vec<u8>, now: Instant) {
        if !self.is_closed() {
            self.transmit.push_back(bytes);
            self.last_sent = now;
        }
    }

    fn on_message(&mut self, message: Message) -> Result<(), KvTransferError> {
        match (&self.state, message) {
            (State::Handshake, Message::Hello { node_id, layout }) => {
                let ours = self.config.layout.compat_hash();
                let theirs = layout.compat_hash();
                if ours != theirs {
                    let err =
                        KvTransferError::Incompatible { ours, peer: theirs, detail: self.config.layout.diff(&layout) };
                    // Tell the peer why before closing.
                    self.transmit.push_back(encode_frame(&Message::Refuse { reason: err.to_string() }, 0));
                    return Err(err);
                }
                self.state = State::Open { peer: node_id.clone() };
                self.events.push_back(ConnectionEvent::Open { peer: node_id });
                Ok(())
            }
            (State::Handshake, Message::Refuse { reason }) | (State::Open { .. }, Message::Refuse { reason }) => {
                Err(KvTransferError::Refused(reason))
            }
            (State::Handshake, other) => {
                Err(KvTransferError::Protocol(format!("{} before the handshake", other.kind())))
            }
            (State::Open { .. }, Message::Hello { .. }) => {
                Err(KvTransferError::Protocol("second Hello on an open connection".into()))
            }
            (State::Open { .. }, Message::Cancel { request_id, reason }) => {
                self.sending.retain(|r| *r != request_id);
                self.inbound.forget(request_id);
                self.events.push_back(ConnectionEvent::Cancelled { request_id, reason });
                Ok(())
            }
            (State::Open { .. }, msg) => {
                if let Some(ev) = self.inbound.on_message(&msg)? {
                    self.events.push_back(match ev {
                        InboundEvent::Complete { request_id, first_token } => {
                            ConnectionEvent::Complete { request_id, first_token }
                        }
                        InboundEvent::Cancelled { request_id, reason } => {
                            ConnectionEvent::Cancelled { request_id, reason }
                        }
                    });
                }
                Ok(())
            }
            (State::Closed, _) => Ok(()),
        }
    }

    fn close(&mut self, error: Option<KvTransferError>) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        let mut requests: Vec<u64> = self.inbound.pending().chain(self.sending.iter().copied()).collect();
        requests.sort_unstable();
        requests.dedup();
        for r in &requests {
            self.inbound.forget(*r);
        }
        self.sending.clear();
        self.events.push_back(ConnectionEvent::Closed { error, requests });
    }
}
