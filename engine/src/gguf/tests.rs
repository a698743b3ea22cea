use super::*;
use proptest::prelude::*;

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("u8", Value::U8(7))
        .meta("i8", Value::I8(-7))
        .meta("u16", Value::U16(700))
        .meta("i16", Value::I16(-700))
        .meta("u32", Value::U32(70000))
        .meta("i32", Value::I32(-70000))
        .meta("f32", Value::F32(1.5))
        .meta("bool", Value::Bool(true))
        .meta("u64", Value::U64(1 << 40))
        .meta("i64", Value::I64(-(1 << 40)))
        .meta("f64", Value::F64(-2.25))
        .meta("strings", string_array(["a", "bc", ""]))
        .meta(
            "nested",
            Value::Array(ValueType::Array, vec![Value::Array(ValueType::U32, vec![Value::U32(1), Value::U32(2)])]),
        );
    w.tensor("a", &[32, 2], TensorType::Q8_0, vec![1u8; 68]);
    w.tensor("b", &[3], TensorType::F32, vec![2u8; 12]);
    w.to_bytes()
}

#[test]
fn round_trips_every_value_type() {
    let bytes = sample();
    let h = parse_header(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.metadata["i16"], Value::I16(-700));
    assert_eq!(h.metadata["f64"], Value::F64(-2.25));
    assert_eq!(h.metadata["strings"].as_array().unwrap().len(), 3);
    assert_eq!(h.metadata["nested"].as_array().unwrap()[0].as_array().unwrap()[1], Value::U32(2));
    assert_eq!(h.tensors[0].len, Some(68));
    assert_eq!(h.tensors[1].offset % 32, 0);
    let t = &h.tensors[1];
    let start = (h.data_offset + t.offset) as usize;
    assert_eq!(&bytes[start..start + 12], &[2u8; 12]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    let last_tensor_end = bytes.len();
    for cut in 0..last_tensor_end {
        assert!(parse_header(&bytes[..cut]).is_err(), "truncated to {cut} bytes parsed");
    }
}

#[test]
fn named_errors_for_lying_headers() {
    let mut bad = sample();
    bad[0] = b'X';
    assert!(matches!(parse_header(&bad), Err(GgufError::BadMagic(_))));

    let mut v1 = sample();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(parse_header(&v1).unwrap_err(), GgufError::UnsupportedVersion(1));

    let mut be = sample();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(parse_header(&be).unwrap_err(), GgufError::BigEndian);

    let mut many = sample();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse_header(&many), Err(GgufError::ImpossibleCount { .. })));

    let mut w = GgufWriter::new();
    w.tensor("w", &[32, 1 << 20], TensorType::Q8_0, vec![0u8; 34]);
    let err = parse_header(&w.to_bytes()).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("\"w\""));

    let mut w = GgufWriter::new();
    w.tensor("z", &[0, 4], TensorType::F32, vec![]);
    assert!(matches!(parse_header(&w.to_bytes()), Err(GgufError::BadShape { .. })));

    let mut w = GgufWriter::new();
    w.tensor("r", &[33], TensorType::Q4_0, vec![0u8; 18]);
    assert!(matches!(parse_header(&w.to_bytes()), Err(GgufError::RaggedTensor { .. })));

    let mut w = GgufWriter::new();
    w.meta("k", Value::U8(1)).meta("k", Value::U8(2));
    assert_eq!(parse_header(&w.to_bytes()).unwrap_err(), GgufError::DuplicateKey("k".into()));

    let mut w = GgufWriter::new();
    w.meta("general.alignment", Value::U32(24));
    assert_eq!(parse_header(&w.to_bytes()).unwrap_err(), GgufError::BadAlignment(24));

    let mut w = GgufWriter::new();
    w.tensor("huge", &[u64::MAX / 2, 4], TensorType::F32, vec![]);
    assert!(matches!(parse_header(&w.to_bytes()), Err(GgufError::BadShape { .. })));

    let mut w = GgufWriter::new();
    w.tensor("t", &[4], TensorType::F32, vec![0u8; 16]);
    let mut b = w.to_bytes();
    let type_at = b.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b't']).unwrap() + 9 + 4 + 8;
    b[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert_eq!(parse_header(&b).unwrap_err(), GgufError::UnknownTensorType { name: "t".into(), id: 99 });
}

#[test]
fn deep_nesting_is_refused() {
    let mut v = Value::Array(ValueType::U8, vec![]);
    for _ in 0..10 {
        v = Value::Array(ValueType::Array, vec![v]);
    }
    let mut w = GgufWriter::new();
    w.meta("deep", v);
    assert!(matches!(parse_header(&w.to_bytes()), Err(GgufError::NestedTooDeep { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn bit_flips_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = sample();
        let n = bytes.len();
        for (at, x) in flips {
            bytes[at % n] ^= x.max(1);
        }
        if let Ok(h) = parse_header(&bytes) {
            // Whatever parsed must describe bytes inside the file.
            for t in &h.tensors {
                if let Some(len) = t.len {
                    prop_assert!(h.data_offset + t.offset + len <= n as u64);
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
        bytes.append(&mut tail);
        let _ = parse_header(&bytes);
    }
}
