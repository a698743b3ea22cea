use super::*;
use crate::message::KvHeader;
use proptest::prelude::*;

fn kv(request_id: u64, byte_len: u64) -> Message {
    Message::Kv(KvHeader {
        request_id,
        trace_context: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        layer_start: 0,
        layer_count: 1,
        block_ids: vec![3, 9],
        dtype: 1,
        byte_len,
    })
}

fn stream() -> (Vec<u8>, Vec<(Message, Vec<u8>)>) {
    let frames = vec![
        (Message::Heartbeat { seq: 7 }, vec![]),
        (kv(1, 10), (0..10).collect::<Vec<u8>>()),
        (Message::Done { request_id: 1, first_token: 42 }, vec![]),
        (Message::Cancel { request_id: 2, reason: "client left".into() }, vec![]),
        (kv(3, 300), (0..300).map(|i| i as u8).collect()),
    ];
    let mut bytes = Vec::new();
    for (m, p) in &frames {
        bytes.extend(encode_frame(m, p.len() as u64));
        bytes.extend(p);
    }
    (bytes, frames)
}

/// Decodes `bytes` fed in pieces of `chunk` bytes.
fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<(Message, Vec<u8>)>, KvTransferError> {
    let mut d = FrameDecoder::new(1 << 20);
    let mut out: Vec<(Message, Vec<u8>)> = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        let mut rest = piece;
        loop {
            let (n, item) = d.decode(rest)?;
            match item {
                Some(Decoded::Message { message, .. }) => out.push((message, Vec::new())),
                Some(Decoded::Payload(p)) => out.last_mut().expect("payload after a message").1.extend_from_slice(p),
                None => {}
            }
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
        }
    }
    d.finish()?;
    Ok(out)
}

#[test]
fn round_trips_in_any_chunking() {
    let (bytes, frames) = stream();
    for chunk in [1, 2, 3, 7, 19, 20, 21, 64, 1000, bytes.len()] {
        assert_eq!(decode_all(&bytes, chunk).unwrap(), frames, "chunk {chunk}");
    }
}

#[test]
fn every_truncation_is_incomplete_never_a_message_too_many() {
    let (bytes, frames) = stream();
    for cut in 0..bytes.len() {
        match decode_all(&bytes[..cut], 13) {
            Err(KvTransferError::Truncated(_)) => {}
            Ok(got) => assert!(got.len() < frames.len() && frames.starts_with(&got), "cut {cut}"),
            Err(e) => panic!("cut {cut}: {e}"),
        }
    }
}

#[test]
fn named_errors() {
    let good = encode_frame(&Message::Heartbeat { seq: 1 }, 0);
    let first = |b: &[u8]| decode_all(b, b.len()).unwrap_err();

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(first(&b), KvTransferError::BadMagic(_)));
    let mut b = good.clone();
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(first(&b), KvTransferError::UnsupportedVersion(2));
    let mut b = good.clone();
    b[6] = 1;
    assert_eq!(first(&b), KvTransferError::ReservedFlags(1));
    let mut b = good.clone();
    b[8..12].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
    assert!(matches!(first(&b), KvTransferError::HeaderTooLarge { .. }));
    let mut b = good.clone();
    b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(first(&b), KvTransferError::PayloadTooLarge { .. }));
    let mut b = good.clone();
    b[12..20].copy_from_slice(&5u64.to_le_bytes());
    b.extend([0u8; 5]);
    assert_eq!(first(&b), KvTransferError::UnexpectedPayload { kind: "Heartbeat", len: 5 });
    let mut b = good.clone();
    let last = b.len() - 1;
    for x in &mut b[PREAMBLE_LEN..=last] {
        *x = 0xff;
    }
    assert!(matches!(first(&b), KvTransferError::MalformedHeader(_)));
    let mut b = encode_frame(&kv(1, 10), 11);
    b.extend([0u8; 11]);
    assert!(matches!(first(&b), KvTransferError::MalformedHeader(m) if m.contains("declares 10")));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
        let _ = decode_all(&bytes, chunk);
    }

    #[test]
    fn corrupted_streams_never_panic(flips in proptest::collection::vec((any::<usize>(), 1u8..), 1..8), chunk in 1usize..64) {
        let (mut bytes, _) = stream();
        let n = bytes.len();
        for (at, x) in flips {
            bytes[at % n] ^= x;
        }
        let _ = decode_all(&bytes, chunk);
    }

    #[test]
    fn valid_preamble_with_random_header_never_panics(header in proptest::collection::vec(any::<u8>(), 1..300)) {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&header);
        let _ = decode_all(&b, 7);
    }
}
