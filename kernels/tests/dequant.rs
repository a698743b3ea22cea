//! Dequantization of every supported block format against values produced by the `gguf`
//! Python package (llama.cpp's reference reader) from the same random blocks; see
//! `fixtures/gen_dequant.py`.

use tandem_kernels::TensorType;
use tandem_kernels::quant::dequantize_row;

#[test]
fn dequantization_matches_gguf_py() {
    let text = include_str!("fixtures/dequant.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
    let mut seen = Vec::new();
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let ty = match name {
            "Q4_0" => TensorType::Q4_0,
            "Q4_1" => TensorType::Q4_1,
            "Q8_0" => TensorType::Q8_0,
            "Q4_K" => TensorType::Q4_K,
            "Q5_K" => TensorType::Q5_K,
            "Q6_K" => TensorType::Q6_K,
            "F16" => TensorType::F16,
            "BF16" => TensorType::BF16,
            other => panic!("fixture has unexpected type {other}"),
        };
        let hex = case["bytes"].as_str().unwrap();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, &bytes, &mut got).unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= scale * 1e-6, "{name} element {i}: {g} vs {w}");
        }
        seen.push(name.to_string());
    }
    assert_eq!(seen.len(), 8, "fixture lost a type: {seen:?}");
}
