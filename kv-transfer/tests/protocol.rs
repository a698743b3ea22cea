//! Sender and receiver pools exchanging a request's KV layer by layer through the frame
//! codec, and every kind of lying frame refused before a byte is written.

mod common;

use common::Pool;
use proptest::prelude::*;
use tandem_kv_transfer::frame::encode_frame;
use tandem_kv_transfer::inbound::InboundEvent;
use tandem_kv_transfer::{
    Decoded, FrameDecoder, Inbound, KvDtype, KvHeader, KvLayout, KvSource, KvTransferError, Message, encode_kv,
};

fn layout() -> KvLayout {
    KvLayout { model_id: "tiny".into(), n_layers: 3, n_kv_heads: 2, head_dim: 4, block_size: 2, dtype: KvDtype::F16 }
}

/// Feeds a byte stream through decoder and receiver, in `chunk`-sized pieces.
fn receive(
    inbound: &mut Inbound,
    sink: &mut Pool,
    bytes: &[u8],
    chunk: usize,
) -> Result<Vec<InboundEvent>, KvTransferError> {
    let mut d = FrameDecoder::new(1 << 24);
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (n, item) = d.decode(rest)?;
            match item {
                Some(Decoded::Message { message, .. }) => events.extend(inbound.on_message(&message)?),
                Some(Decoded::Payload(p)) => inbound.on_payload(sink, p)?,
                None => {}
            }
            rest = &rest[n..];
        }
    }
    d.finish()?;
    Ok(events)
}

fn frame_bytes(header: Vec<u8>, payload: Vec<&[u8]>) -> Vec<u8> {
    let mut out = header;
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

#[test]
fn layer_by_layer_transfer_fills_exactly_the_named_blocks() {
    let l = layout();
    let sender = Pool::new(&l, 8, |i| (i * 7 % 251) as u8);
    let before = Pool::new(&l, 6, |_| 0xAA).bytes;
    // The receiver already holds some blocks (cached prefix); the sender fills these three.
    let src = [5u32, 1, 7];
    let dst = [4u32, 0, 2];
    let mut stream = Vec::new();
    for layer in 0..l.n_layers {
        let (h, p) = encode_kv(&l, 9, "", layer..layer + 1, &src, &dst, &sender);
        stream.extend(frame_bytes(h, p));
    }
    stream.extend(encode_frame(&Message::Done { request_id: 9, first_token: 17 }, 0));
    for chunk in [1, 5, 64, stream.len()] {
        let mut rx = Pool { half: l.half_block_bytes(), blocks: 6, bytes: before.clone() };
        let mut ib = Inbound::new(l.clone());
        ib.expect(9, &dst);
        assert_eq!(ib.missing(9), Some(9));
        let events = receive(&mut ib, &mut rx, &stream, chunk).unwrap();
        assert_eq!(events, vec![InboundEvent::Complete { request_id: 9, first_token: 17 }]);
        assert_eq!(ib.missing(9), None, "a completed request is forgotten");
        for layer in 0..l.n_layers {
            for b in 0..6u32 {
                for v in [false, true] {
                    let got = &rx.bytes[rx.at(layer, b, v)];
                    match dst.iter().position(|&d| d == b) {
                        Some(i) => assert_eq!(got, KvSource::half_block(&sender, layer, src[i], v)),
                        None => assert_eq!(got, &before[rx.at(layer, b, v)], "block {b} must be untouched"),
                    }
                }
            }
        }
    }
}

type Check = fn(&KvTransferError) -> bool;

#[test]
fn lying_frames_are_refused_before_anything_is_written() {
    let l = layout();
    let sender = Pool::new(&l, 8, |i| i as u8);
    let kv = |h: KvHeader| {
        let n = h.byte_len as usize;
        let mut b = encode_frame(&Message::Kv(h), n as u64);
        b.extend(std::iter::repeat_n(0x55u8, n));
        b
    };
    let good = KvHeader {
        request_id: 1,
        trace_context: String::new(),
        layer_start: 0,
        layer_count: 1,
        block_ids: vec![2],
        dtype: KvDtype::F16.code(),
        byte_len: l.block_layer_bytes() as u64,
    };
    let two = 2 * good.byte_len;
    let cases: Vec<(KvHeader, Check)> = vec![
        (KvHeader { request_id: 99, ..good.clone() }, |e| matches!(e, KvTransferError::UnknownRequest(99))),
        (KvHeader { layer_start: 3, ..good.clone() }, |e| matches!(e, KvTransferError::LayerRange { .. })),
        (KvHeader { layer_start: u32::MAX, ..good.clone() }, |e| matches!(e, KvTransferError::LayerRange { .. })),
        (KvHeader { layer_count: 0, byte_len: 0, ..good.clone() }, |e| matches!(e, KvTransferError::LayerRange { .. })),
        (KvHeader { block_ids: vec![5], ..good.clone() }, |e| {
            matches!(e, KvTransferError::ForeignBlock { block: 5, .. })
        }),
        (KvHeader { block_ids: vec![2, 2], byte_len: two, ..good.clone() }, |e| {
            matches!(e, KvTransferError::Duplicate { .. })
        }),
        (KvHeader { dtype: 2, ..good.clone() }, |e| matches!(e, KvTransferError::WrongDtype { .. })),
        (KvHeader { byte_len: good.byte_len - 1, ..good.clone() }, |e| {
            matches!(e, KvTransferError::LengthMismatch { .. })
        }),
        (KvHeader { block_ids: vec![], byte_len: 0, ..good.clone() }, |e| matches!(e, KvTransferError::EmptyKv { .. })),
    ];
    for (h, want) in cases {
        let mut rx = Pool::new(&l, 6, |_| 0);
        let mut ib = Inbound::new(l.clone());
        ib.expect(1, &[2, 3]);
        let err = receive(&mut ib, &mut rx, &kv(h.clone()), 7).unwrap_err();
        assert!(want(&err), "{h:?} gave {err}");
        assert!(rx.bytes.iter().all(|&b| b == 0), "{h:?} wrote into the pool");
    }
    // A block-layer sent twice across frames is refused, and so is Done before all arrived.
    let mut rx = Pool::new(&l, 6, |_| 0);
    let (h, p) = encode_kv(&l, 1, "", 0..1, &[0], &[2], &sender);
    let once = frame_bytes(h, p);
    let mut ib = Inbound::new(l.clone());
    ib.expect(1, &[2]);
    let twice = [once.clone(), once.clone()].concat();
    let err = receive(&mut ib, &mut rx, &twice, 9).unwrap_err();
    assert!(matches!(err, KvTransferError::Duplicate { layer: 0, block: 2, .. }), "{err}");
    let mut ib = Inbound::new(l.clone());
    ib.expect(1, &[2]);
    let early = [once, encode_frame(&Message::Done { request_id: 1, first_token: 0 }, 0)].concat();
    let err = receive(&mut ib, &mut rx, &early, 9).unwrap_err();
    assert!(matches!(err, KvTransferError::Incomplete { missing: 2, .. }), "{err}");
    // Cancel releases the request: it is no longer expected.
    let mut ib = Inbound::new(l.clone());
    ib.expect(1, &[2]);
    let cancel = encode_frame(&Message::Cancel { request_id: 1, reason: "client left".into() }, 0);
    let ev = receive(&mut ib, &mut rx, &cancel, 4).unwrap();
    assert_eq!(ev, vec![InboundEvent::Cancelled { request_id: 1, reason: "client left".into() }]);
    assert_eq!(ib.missing(1), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever header a peer invents, nothing lands outside the request's blocks.
    #[test]
    fn invented_headers_never_write_outside_the_allocation(
        layer_start in 0u32..5,
        layer_count in 0u32..5,
        blocks in proptest::collection::vec(0u32..8, 0..5),
        dtype in 0u8..4,
        fudge in -3i64..3,
        chunk in 1usize..100,
    ) {
        let l = layout();
        let needed = layer_count as i64 * blocks.len() as i64 * l.block_layer_bytes() as i64;
        let byte_len = (needed + fudge).max(0) as u64;
        let h = KvHeader { request_id: 1, trace_context: String::new(), layer_start, layer_count, block_ids: blocks, dtype, byte_len };
        let mut bytes = encode_frame(&Message::Kv(h), byte_len);
        bytes.extend(std::iter::repeat_n(0x77u8, byte_len as usize));
        let mut rx = Pool::new(&l, 8, |_| 0);
        let mut ib = Inbound::new(l.clone());
        ib.expect(1, &[1, 6]);
        let _ = receive(&mut ib, &mut rx, &bytes, chunk);
        for layer in 0..l.n_layers {
            for b in 0..8u32 {
                if b != 1 && b != 6 {
                    for v in [false, true] {
                        let r = rx.at(layer, b, v);
                        prop_assert!(rx.bytes[r].iter().all(|&x| x == 0), "block {} written", b);
                    }
                }
            }
        }
    }
}
