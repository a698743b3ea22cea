//! Two connections wired back to back on a virtual clock: handshake, a layer-by-layer
//! transfer, refusal of a mismatched peer, stall detection, heartbeats and cancellation.

mod common;

use std::time::{Duration, Instant};

use common::Pool;

use tandem_kv_transfer::{
    Connection, ConnectionConfig, ConnectionEvent, KvDtype, KvLayout, KvSource, KvTransferError, encode_kv,
};

fn layout(block_size: u32) -> KvLayout {
    KvLayout { model_id: "tiny".into(), n_layers: 2, n_kv_heads: 1, head_dim: 4, block_size, dtype: KvDtype::F32 }
}

struct Side {
    conn: Connection,
    pool: Pool,
    events: Vec<ConnectionEvent>,
}

struct Pair {
    a: Side,
    b: Side,
    now: Instant,
}

impl Pair {
    fn new(la: KvLayout, lb: KvLayout) -> Self {
        let now = Instant::now();
        let cfg = |id: &str, l: &KvLayout| ConnectionConfig {
            node_id: id.into(),
            layout: l.clone(),
            max_payload: 1 << 20,
            idle_timeout: Duration::from_secs(3),
        };
        Pair {
            a: Side {
                conn: Connection::new(cfg("prefill-0", &la), now),
                pool: Pool::new(&la, 8, |i| (i as u8).wrapping_add(1)),
                events: vec![],
            },
            b: Side {
                conn: Connection::new(cfg("decode-0", &lb), now),
                pool: Pool::new(&lb, 8, |i| (i as u8).wrapping_add(100)),
                events: vec![],
            },
            now,
        }
    }

    /// Moves every queued byte both ways until quiet, then collects events.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(bytes) = self.a.conn.poll_transmit() {
                let _ = self.b.conn.handle_bytes(&mut self.b.pool, &bytes, self.now);
                moved = true;
            }
            while let Some(bytes) = self.b.conn.poll_transmit() {
                let _ = self.a.conn.handle_bytes(&mut self.a.pool, &bytes, self.now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        while let Some(e) = self.a.conn.poll_event() {
            self.a.events.push(e);
        }
        while let Some(e) = self.b.conn.poll_event() {
            self.b.events.push(e);
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.conn.handle_timeout(self.now);
        self.b.conn.handle_timeout(self.now);
    }

    /// Sends layers of `src` → `dst` as whole frames (header and payload together).
    fn send_layer(&mut self, request: u64, layer: u32, src: &[u32], dst: &[u32]) {
        let l = self.a.conn.layout().clone();
        let (mut bytes, payload) = encode_kv(&l, request, "", layer..layer + 1, src, dst, &self.a.pool);
        for p in payload {
            bytes.extend_from_slice(p);
        }
        self.a.conn.send_frame(Some(request), bytes, self.now);
    }
}

#[test]
fn handshake_then_layer_by_layer_transfer_completes() {
    let mut p = Pair::new(layout(2), layout(2));
    p.drive();
    assert_eq!(p.a.events, vec![ConnectionEvent::Open { peer: "decode-0".into() }]);
    assert_eq!(p.b.events, vec![ConnectionEvent::Open { peer: "prefill-0".into() }]);
    p.b.conn.expect(5, &[6, 7]);
    p.send_layer(5, 0, &[0, 1], &[6, 7]);
    p.drive();
    assert_eq!(p.b.events.len(), 1, "no completion before every layer");
    p.send_layer(5, 1, &[0, 1], &[6, 7]);
    p.a.conn.send_done(5, 321, p.now);
    p.drive();
    assert_eq!(p.b.events.last(), Some(&ConnectionEvent::Complete { request_id: 5, first_token: 321 }));
    for layer in 0..2 {
        for (s, d) in [(0u32, 6u32), (1, 7)] {
            for v in [false, true] {
                assert_eq!(KvSource::half_block(&p.b.pool, layer, d, v), KvSource::half_block(&p.a.pool, layer, s, v));
            }
        }
    }
}

#[test]
fn mismatched_layouts_refuse_each_other_with_the_reason() {
    let mut p = Pair::new(layout(2), layout(4));
    p.drive();
    let closed = |evs: &[ConnectionEvent]| {
        evs.iter().find_map(|e| match e {
            ConnectionEvent::Closed { error, .. } => error.clone(),
            _ => None,
        })
    };
    let eb = closed(&p.b.events).expect("decode side closed");
    assert!(
        matches!(&eb, KvTransferError::Incompatible { detail, .. } if detail.contains("block size 4 vs 2")),
        "{eb}"
    );
    assert!(p.a.conn.is_closed() && p.b.conn.is_closed());
    assert!(!p.a.events.iter().any(|e| matches!(e, ConnectionEvent::Open { .. })));
}

#[test]
fn a_stalled_peer_fails_only_its_requests_and_heartbeats_keep_a_quiet_one_alive() {
    let mut p = Pair::new(layout(2), layout(2));
    p.drive();
    p.b.conn.expect(8, &[1]);
    p.b.conn.expect(9, &[2]);
    // Quiet but healthy: heartbeats flow, nothing closes over a long time.
    for _ in 0..20 {
        p.advance(Duration::from_millis(900));
        p.drive();
    }
    assert!(p.a.conn.is_open() && p.b.conn.is_open());
    // The prefill side stops talking (its heartbeats are lost): the decode side gives up
    // after the idle timeout and fails exactly the requests that were in flight.
    p.advance(Duration::from_millis(2000));
    while p.a.conn.poll_transmit().is_some() {}
    p.advance(Duration::from_millis(1100));
    p.drive();
    let closed = p.b.events.iter().find_map(|e| match e {
        ConnectionEvent::Closed { error, requests } => Some((error.clone(), requests.clone())),
        _ => None,
    });
    let (error, requests) = closed.expect("stalled connection closes");
    assert!(matches!(error, Some(KvTransferError::Stalled { .. })));
    assert_eq!(requests, vec![8, 9]);
}

#[test]
fn cancel_releases_the_request_on_both_sides() {
    let mut p = Pair::new(layout(2), layout(2));
    p.drive();
    p.b.conn.expect(5, &[6]);
    p.send_layer(5, 0, &[0], &[6]);
    p.a.conn.cancel(5, "client disconnected", p.now);
    p.drive();
    assert!(p.b.events.contains(&ConnectionEvent::Cancelled { request_id: 5, reason: "client disconnected".into() }));
    // A late frame for the cancelled request is a protocol error that closes the connection.
    p.send_layer(5, 1, &[0], &[6]);
    p.drive();
    assert!(p.b.conn.is_closed());
}

#[test]
fn frames_before_the_handshake_are_refused() {
    let now = Instant::now();
    let l = layout(2);
    let cfg = ConnectionConfig {
        node_id: "x".into(),
        layout: l.clone(),
        max_payload: 1024,
        idle_timeout: Duration::from_secs(1),
    };
    let mut c = Connection::new(cfg, now);
    let mut pool = Pool::new(&l, 8, |_| 0);
    let done = tandem_kv_transfer::frame::encode_frame(
        &tandem_kv_transfer::Message::Done { request_id: 1, first_token: 1 },
        0,
    );
    let err = c.handle_bytes(&mut pool, &done, now).unwrap_err();
    assert!(matches!(err, KvTransferError::Protocol(m) if m.contains("before the handshake")));
    assert!(c.is_closed());
}
