//! The engine's forward pass against an f64 reference on tiny random models written in both
//! file formats, and the paging/batching invariants: incremental decode equals full
//! recompute, a mixed batch equals each sequence alone.

mod common;

use common::{Spec, Variant, Weights, rel_err};
use tandem_engine::config::ModelConfig;
use tandem_engine::gguf::GgufFile;
use tandem_engine::weights::TensorStore;
use tandem_engine::{KvCache, KvDtype, LogitsMode, Model, SeqInput};
use tandem_kernels::TensorType;

fn load_hf(w: &Weights, dir: &std::path::Path) -> Model {
    w.write_hf(dir);
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Model::new(cfg, TensorStore::from_hf_dir(dir).unwrap()).unwrap()
}

fn load_gguf(w: &Weights, path: &std::path::Path, ty: TensorType) -> Model {
    w.write_gguf(path, ty);
    let f = GgufFile::open(path).unwrap();
    Model::new(ModelConfig::from_gguf(&f).unwrap(), TensorStore::from_gguf(&f).unwrap()).unwrap()
}

const PROMPT: [u32; 13] = [5, 17, 93, 0, 42, 42, 8, 61, 77, 3, 12, 90, 33];

/// Logits of every prompt position in one prefill call, through a scrambled block table.
fn all_logits(m: &Model, tokens: &[u32], dtype: KvDtype) -> Vec<Vec<f32>> {
    let mut kv = m.new_kv_cache(4, 16, dtype);
    let table: Vec<u32> = (0..16).rev().collect();
    let seq = SeqInput { tokens, start_pos: 0, block_table: &table, logits: LogitsMode::All };
    let flat = m.forward(&[seq], &mut kv).unwrap().pop().unwrap();
    flat.chunks(m.config.vocab_size).map(<[f32]>::to_vec).collect()
}

fn check_against_reference(m: &Model, w: &Weights, tol: f64, dtype: KvDtype) {
    let got = all_logits(m, &PROMPT, dtype);
    let want = w.reference_logits(&PROMPT);
    for (pos, (g, r)) in got.iter().zip(&want).enumerate() {
        let e = rel_err(g, r);
        assert!(e < tol, "position {pos}: relative error {e:e} over {tol:e}");
    }
}

#[test]
fn every_variant_and_format_matches_the_f64_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (i, variant) in [Variant::Llama, Variant::Qwen2, Variant::Llama3Scaled].into_iter().enumerate() {
        for tied in [false, true] {
            let w = Weights::random(Spec { tied, ..Spec::tiny(variant) }, 7 + i as u64);
            let hf = dir.path().join(format!("hf-{i}-{tied}"));
            std::fs::create_dir(&hf).unwrap();
            check_against_reference(&load_hf(&w, &hf), &w, 1e-3, KvDtype::F32);
            let gguf = dir.path().join(format!("m-{i}-{tied}.gguf"));
            check_against_reference(&load_gguf(&w, &gguf, TensorType::F32), &w, 1e-3, KvDtype::F32);
        }
    }
}

#[test]
fn quantized_gguf_matches_the_reference_of_its_rounded_weights() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::F16, TensorType::BF16] {
        let w = Weights::random(Spec::tiny(Variant::Llama), 11);
        let path = dir.path().join(format!("{ty}.gguf"));
        let m = load_gguf(&w, &path, ty);
        check_against_reference(&m, &w.quantized(ty), 1e-3, KvDtype::F32);
    }
}

#[test]
fn f16_kv_stays_close_to_f32_kv() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Llama), 3);
    let m = load_gguf(&w, &dir.path().join("m.gguf"), TensorType::F32);
    check_against_reference(&m, &w, 1e-2, KvDtype::F16);
}

#[test]
fn incremental_paged_decode_equals_full_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Qwen2), 5);
    let m = load_gguf(&w, &dir.path().join("m.gguf"), TensorType::Q8_0);
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let full = all_logits(&m, &PROMPT, dtype);
        let mut kv = m.new_kv_cache(4, 16, dtype);
        let table = [9u32, 2, 14, 0, 7];
        // A 6-token prefill, a 3-token chunk, then single-token decode steps.
        let mut pieces: Vec<(usize, usize)> = vec![(0, 6), (6, 9)];
        pieces.extend((9..PROMPT.len()).map(|p| (p, p + 1)));
        for (a, b) in pieces {
            let seq = SeqInput { tokens: &PROMPT[a..b], start_pos: a, block_table: &table, logits: LogitsMode::All };
            let out = m.forward(&[seq], &mut kv).unwrap().pop().unwrap();
            for (i, row) in out.chunks(m.config.vocab_size).enumerate() {
                assert_eq!(row, &full[a + i][..], "{dtype:?} position {}", a + i);
            }
        }
    }
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Llama), 9);
    let m = load_gguf(&w, &dir.path().join("m.gguf"), TensorType::Q4_1);
    let a: Vec<u32> = PROMPT.to_vec();
    let b: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let c: Vec<u32> = vec![60, 50, 40];
    let (ta, tb, tc) = ([0u32, 1, 2, 3], [4u32, 5, 6], [7u32, 8]);

    // Alone: A's first 8 tokens, then its next 5; B's first 9 then one decode token; C whole.
    let alone = |kv: &mut KvCache, tokens: &[u32], start: usize, table: &[u32]| {
        let seq = SeqInput { tokens, start_pos: start, block_table: table, logits: LogitsMode::All };
        m.forward(&[seq], kv).unwrap().pop().unwrap()
    };
    let mut kv = m.new_kv_cache(4, 9, KvDtype::F16);
    alone(&mut kv, &a[..8], 0, &ta);
    alone(&mut kv, &b[..9], 0, &tb);
    let want_a = alone(&mut kv, &a[8..], 8, &ta);
    let want_b = alone(&mut kv, &b[9..], 9, &tb);
    let want_c = alone(&mut kv, &c, 0, &tc);

    // Together: a prefill chunk, a decode step and a whole prompt in one call.
    let mut kv = m.new_kv_cache(4, 9, KvDtype::F16);
    alone(&mut kv, &a[..8], 0, &ta);
    alone(&mut kv, &b[..9], 0, &tb);
    let batch = [
        SeqInput { tokens: &a[8..], start_pos: 8, block_table: &ta, logits: LogitsMode::All },
        SeqInput { tokens: &b[9..], start_pos: 9, block_table: &tb, logits: LogitsMode::All },
        SeqInput { tokens: &c, start_pos: 0, block_table: &tc, logits: LogitsMode::All },
    ];
    let got = m.forward(&batch, &mut kv).unwrap();
    assert_eq!(got[0], want_a);
    assert_eq!(got[1], want_b);
    assert_eq!(got[2], want_c);
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Llama), 1);
    let m = load_gguf(&w, &dir.path().join("m.gguf"), TensorType::F32);
    let mut kv = m.new_kv_cache(4, 4, KvDtype::F32);
    let run = |kv: &mut KvCache, tokens: &[u32], start: usize, table: &[u32]| {
        let seq = SeqInput { tokens, start_pos: start, block_table: table, logits: LogitsMode::Last };
        m.forward(&[seq], kv).map(|_| ()).unwrap_err().to_string()
    };
    assert!(run(&mut kv, &[96], 0, &[0]).contains("outside the vocabulary"));
    assert!(run(&mut kv, &[1; 5], 0, &[0]).contains("block table has 1 blocks"));
    assert!(run(&mut kv, &[1], 0, &[4]).contains("outside the pool"));
    assert!(run(&mut kv, &[1], 300, &[0; 80]).contains("context length"));
    let other = Model::new(
        ModelConfig { n_layers: 1, ..m.config.clone() },
        TensorStore::from_gguf(&GgufFile::open(&dir.path().join("m.gguf")).unwrap()).unwrap(),
    )
    .unwrap();
    let mut small = other.new_kv_cache(4, 4, KvDtype::F32);
    let seq = SeqInput { tokens: &[1], start_pos: 0, block_table: &[0], logits: LogitsMode::Last };
    assert!(m.forward(&[seq], &mut small).is_err());
}
