//! Broken, truncated and lying model files: every one must give an error that names the
//! problem, never a panic or a read out of bounds.

mod common;

use std::path::Path;

use common::{Spec, Variant, Weights};
use proptest::prelude::*;
use tandem_engine::gguf::{GgufWriter, Value, string_array};
use tandem_engine::model::load;
use tandem_kernels::TensorType;

/// Rewrites one tensor into the writer and returns true, or returns false to keep it.
type TensorEdit = dyn Fn(&mut GgufWriter, &str, &tandem_engine::gguf::TensorInfo, Vec<u8>) -> bool;

/// A complete tiny GGUF model, tokenizer included.
fn tiny_gguf(dir: &Path) -> Vec<u8> {
    let w = Weights::random(Spec::tiny(Variant::Llama), 21);
    let path = dir.join("base.gguf");
    w.write_gguf(&path, TensorType::Q8_0);
    // Re-emit with a real byte-level vocabulary so the tokenizer builds too.
    let f = tandem_engine::gguf::GgufFile::open(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut out = GgufWriter::new();
    for (k, v) in &f.header.metadata {
        if !k.starts_with("tokenizer.") {
            out.meta(k, v.clone());
        }
    }
    let mut tokens: Vec<String> = (0..94u8).map(|i| ((b'!' + i) as char).to_string()).collect();
    tokens.extend(["!\"".to_string(), "#$".to_string()]);
    out.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("smollm".into()))
        .meta("tokenizer.ggml.tokens", string_array(tokens))
        .meta("tokenizer.ggml.merges", string_array(["! \"", "# $"]))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(0))
        .meta("tokenizer.chat_template", Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()));
    for t in &f.header.tensors {
        let start = (f.header.data_offset + t.offset) as usize;
        let data = bytes[start..start + t.len.unwrap() as usize].to_vec();
        out.tensor(&t.name, &t.shape, t.ty, data);
    }
    out.to_bytes()
}

fn load_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    load(&p).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn the_tiny_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf(dir.path());
    load_bytes(dir.path(), "ok.gguf", &bytes).unwrap();
}

#[test]
fn every_truncation_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf(dir.path());
    for cut in (0..bytes.len()).step_by(61).chain([bytes.len() - 1]) {
        let err = load_bytes(dir.path(), "cut.gguf", &bytes[..cut]).unwrap_err();
        assert!(!err.is_empty());
    }
}

#[test]
fn named_errors_for_wrong_models() {
    let dir = tempfile::tempdir().unwrap();
    let good = tempfile::tempdir().unwrap();
    let bytes = tiny_gguf(good.path());
    let f = {
        std::fs::write(dir.path().join("g.gguf"), &bytes).unwrap();
        tandem_engine::gguf::GgufFile::open(&dir.path().join("g.gguf")).unwrap()
    };
    let rebuild = |edit: &TensorEdit, meta: &dyn Fn(&str, &Value) -> Option<Value>| {
        let mut out = GgufWriter::new();
        for (k, v) in &f.header.metadata {
            if let Some(v) = meta(k, v) {
                out.meta(k, v);
            }
        }
        for t in &f.header.tensors {
            let start = (f.header.data_offset + t.offset) as usize;
            let data = bytes[start..start + t.len.unwrap() as usize].to_vec();
            if !edit(&mut out, &t.name, t, data.clone()) {
                out.tensor(&t.name, &t.shape, t.ty, data);
            }
        }
        out.to_bytes()
    };
    let keep = |_: &str, v: &Value| Some(v.clone());
    let untouched = |_: &mut GgufWriter, _: &str, _: &tandem_engine::gguf::TensorInfo, _: Vec<u8>| false;

    let missing = rebuild(&|_, n, _, _| n == "blk.1.ffn_down.weight", &keep);
    let err = load_bytes(dir.path(), "a.gguf", &missing).unwrap_err();
    assert!(err.contains("blk.1.ffn_down.weight") && err.contains("missing"), "{err}");

    let wrong_shape = rebuild(
        &|w, n, t, d| {
            if n == "blk.0.ffn_gate.weight" {
                w.tensor(n, &[t.shape[1], t.shape[0]], t.ty, d);
                return true;
            }
            false
        },
        &keep,
    );
    let err = load_bytes(dir.path(), "b.gguf", &wrong_shape).unwrap_err();
    assert!(err.contains("blk.0.ffn_gate.weight") && err.contains("shape"), "{err}");

    let iq = rebuild(
        &|w, n, t, _| {
            if n == "blk.0.ffn_up.weight" {
                w.tensor(n, &t.shape, TensorType::IQ2_XS, vec![0u8; 64]);
                return true;
            }
            false
        },
        &keep,
    );
    let err = load_bytes(dir.path(), "c.gguf", &iq).unwrap_err();
    assert!(err.contains("IQ2_XS") && err.contains("blk.0.ffn_up.weight"), "{err}");

    let neox = rebuild(&untouched, &|k, v| {
        Some(if k == "general.architecture" { Value::String("gptneox".into()) } else { v.clone() })
    });
    let err = load_bytes(dir.path(), "d.gguf", &neox).unwrap_err();
    assert!(err.contains("\"gptneox\""), "{err}");

    let heads =
        rebuild(&untouched, &|k, v| Some(if k == "llama.attention.head_count_kv" { Value::U32(3) } else { v.clone() }));
    let err = load_bytes(dir.path(), "e.gguf", &heads).unwrap_err();
    assert!(err.contains("n_kv_heads"), "{err}");

    let no_vocab = rebuild(&untouched, &|k, v| (k != "tokenizer.ggml.tokens").then(|| v.clone()));
    let err = load_bytes(dir.path(), "f.gguf", &no_vocab).unwrap_err();
    assert!(err.contains("tokenizer.ggml.tokens"), "{err}");

    let spm = rebuild(&untouched, &|k, v| {
        Some(if k == "tokenizer.ggml.model" { Value::String("llama".into()) } else { v.clone() })
    });
    let err = load_bytes(dir.path(), "g2.gguf", &spm).unwrap_err();
    assert!(err.contains("\"llama\""), "{err}");

    let template = rebuild(&untouched, &|k, v| {
        Some(if k == "tokenizer.chat_template" { Value::String("{% if %}".into()) } else { v.clone() })
    });
    let err = load_bytes(dir.path(), "h.gguf", &template).unwrap_err();
    assert!(err.contains("chat template"), "{err}");
}

#[test]
fn broken_hugging_face_directories_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Qwen2), 2);
    w.write_hf(dir.path());
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let model_err = |d: &Path| load(d).map(|_| ()).unwrap_err().to_string();
    // No tokenizer.json: the weights are fine, the tokenizer is named as missing.
    assert!(model_err(dir.path()).contains("tokenizer.json"));

    for cut in [0, 7, 8, 100, st.len() / 2, st.len() - 1] {
        std::fs::write(dir.path().join("model.safetensors"), &st[..cut]).unwrap();
        assert!(model_err(dir.path()).contains("safetensors"), "cut at {cut}");
    }
    let mut huge = st.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.path().join("model.safetensors"), &huge).unwrap();
    assert!(model_err(dir.path()).contains("safetensors"));
    std::fs::write(dir.path().join("model.safetensors"), &st).unwrap();

    std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": {"a": "../../etc/passwd"}}"#)
        .unwrap();
    assert!(model_err(dir.path()).contains("leaves the model directory"));
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();

    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    assert!(model_err(dir.path()).contains("config.json"));
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "falcon"}"#).unwrap();
    assert!(model_err(dir.path()).contains("config.json") || model_err(dir.path()).contains("falcon"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bit_flipped_models_never_panic(flips in proptest::collection::vec((any::<usize>(), 1u8..), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = tiny_gguf(dir.path());
        let n = bytes.len();
        // Most of the file is tensor data; aim half the flips at the header.
        for (i, (at, x)) in flips.into_iter().enumerate() {
            let at = if i % 2 == 0 { at % 4096.min(n) } else { at % n };
            bytes[at] ^= x;
        }
        let _ = load_bytes(dir.path(), "flip.gguf", &bytes);
    }
}
