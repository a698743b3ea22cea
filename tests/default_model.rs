//! The default model (SmolLM2-135M-Instruct Q4_1) against references made by other
//! implementations (see `tests/fixtures/README.md`): tokenizer ids, chat template text,
//! greedy tokens and logits of an independent f32 forward pass, and `tandem generate` as a
//! user runs it. The model is fetched through the binary on first use.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use tandem_engine::chat::ChatMessage;
use tandem_engine::generate::Generator;
use tandem_engine::model::{Loaded, load};
use tandem_engine::sampler::{Sampler, SamplingParams};
use tandem_engine::{IncrementalDecoder, KvDtype, LogitsMode, SeqInput};

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new(BIN).arg("fetch-model").output().expect("running tandem fetch-model");
        assert!(out.status.success(), "fetch-model failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

fn model() -> &'static Loaded {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    MODEL.get_or_init(|| load(&model_path()).expect("loading the default model"))
}

#[derive(Deserialize)]
struct TokCase {
    text: String,
    ids_llamacpp: Vec<u32>,
    ids_hf_digits_pretok: Vec<u32>,
}

fn tok_cases() -> Vec<TokCase> {
    serde_json::from_str(include_str!("fixtures/tokenizer_ref.json")).unwrap()
}

#[test]
fn tokenizer_ids_equal_the_reference_tokenizers() {
    let tok = &model().tokenizer;
    let cases = tok_cases();
    assert!(cases.len() >= 60);
    let mut failures = Vec::new();
    for c in &cases {
        assert_eq!(c.ids_llamacpp, c.ids_hf_digits_pretok, "references disagree on {:?}", c.text);
        let ids = tok.encode(&c.text, false).unwrap();
        if ids != c.ids_llamacpp {
            failures.push(format!("{:?}: got {ids:?}, want {:?}", c.text, c.ids_llamacpp));
        }
        assert_eq!(tok.decode(&ids, false).unwrap(), c.text, "round trip of {:?}", c.text);
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn incremental_detokenization_emits_whole_characters_only() {
    let tok = &model().tokenizer;
    for c in tok_cases() {
        let mut dec = IncrementalDecoder::new(false);
        let mut text = String::new();
        for &id in &c.ids_llamacpp {
            if let Some(piece) = dec.push(tok, id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "broken character emitted for {:?}: {piece:?}", c.text);
                text.push_str(&piece);
            }
        }
        text.extend(dec.finish(tok).unwrap());
        assert_eq!(text, c.text);
    }
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessageJson>,
    add_generation_prompt: bool,
    rendered: String,
}

#[derive(Deserialize)]
struct ChatMessageJson {
    role: String,
    content: String,
}

#[test]
fn chat_template_renders_exactly_like_the_models_template() {
    let cases: Vec<ChatCase> = serde_json::from_str(include_str!("fixtures/chat_ref.json")).unwrap();
    assert!(cases.len() >= 4);
    let template = model().tokenizer.chat_template.as_ref().expect("the default model has a chat template");
    for c in cases {
        let msgs: Vec<ChatMessage> = c.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
        assert_eq!(template.render(&msgs, c.add_generation_prompt).unwrap(), c.rendered);
    }
}

#[derive(Deserialize)]
struct GreedyRef {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    top1_minus_top2_logit: Vec<f64>,
    prompt_last_logits: Vec<f64>,
}

/// Below this top-2 logit gap two correct f32 implementations may pick different tokens.
const CLEAR_LEAD: f64 = 0.05;

#[test]
fn greedy_tokens_and_logits_match_an_independent_f32_forward_pass() {
    let m = &model().model;
    let refs: Vec<GreedyRef> =
        include_str!("fixtures/greedy_f32_ref.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(refs.len() >= 3);
    for r in refs {
        // Logits of the prompt's last position, exact f32 path.
        let mut kv = m.new_kv_cache(16, r.prompt_ids.len().div_ceil(16), KvDtype::F32);
        let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
        let seq = SeqInput { tokens: &r.prompt_ids, start_pos: 0, block_table: &table, logits: LogitsMode::Last };
        let logits = m.forward(&[seq], &mut kv).unwrap().pop().unwrap();
        let max_diff = logits.iter().zip(&r.prompt_last_logits).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        let scale = r.prompt_last_logits.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        assert!(max_diff / scale < 1e-3, "prompt logits differ by {max_diff} (scale {scale})");

        // Greedy continuation, compared up to the first step whose lead is not clear.
        let mut generator = Generator::new(m, r.prompt_ids.len() + 32, KvDtype::F32);
        let idle = generator.free_blocks();
        let mut got = Vec::new();
        generator
            .generate(&r.prompt_ids, 32, &[], &mut Sampler::new(SamplingParams::default()), |id| {
                got.push(id);
                true
            })
            .unwrap();
        let clear = r.top1_minus_top2_logit.iter().position(|g| *g < CLEAR_LEAD).unwrap_or(32);
        assert_eq!(got[..clear], r.greedy_ids[..clear], "prompt {:?}", r.prompt_ids);
        assert_eq!(generator.free_blocks(), idle, "generator leaked blocks");
    }
}

#[test]
fn f16_kv_greedy_output_names_paris() {
    let loaded = model();
    let tok = &loaded.tokenizer;
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let mut generator = Generator::new(&loaded.model, prompt.len() + 8, KvDtype::F16);
    let mut ids = Vec::new();
    generator
        .generate(&prompt, 8, &tok.eos_ids, &mut Sampler::new(SamplingParams::default()), |id| {
            ids.push(id);
            true
        })
        .unwrap();
    let text = tok.decode(&ids, true).unwrap();
    assert!(text.contains("Paris"), "continuation was {text:?}");
}

fn tandem(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).arg("--model").arg(model_path()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_generate_answers_and_reports_speed() {
    let (ok, out, err) =
        tandem(&["generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "24"]);
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "answer was {out:?}");
    assert!(err.contains("tokens/s"), "no speed report in {err:?}");

    let seeded = ["generate", "--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0.8"];
    let seeded = [&seeded[..], &["--top-p", "0.9", "--seed", "7"]].concat();
    let (ok, out, _) = tandem(&seeded);
    let (ok2, out2, _) = tandem(&seeded);
    assert!(ok && ok2);
    assert_eq!(out, out2, "the same seed must give the same text");
}

#[test]
fn cli_tokenize_and_detokenize_round_trip() {
    let (ok, out, err) = tandem(&["tokenize", "Hello, world! 123"]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids, model().tokenizer.encode("Hello, world! 123", true).unwrap());
    let (ok, text, _) = tandem(&["detokenize", out.trim()]);
    assert!(ok);
    assert_eq!(text, "Hello, world! 123");

    let (ok, out, _) = tandem(&["tokenize", "--chat", "hi"]);
    assert!(ok);
    let ids: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids[0], 1, "chat prompts start with <|im_start|>");
}

#[test]
fn cli_bad_input_gets_clear_errors() {
    let (ok, _, err) = tandem(&["detokenize", "[1, 99999999]"]);
    assert!(!ok && err.contains("outside the vocabulary"), "{err}");
    let (ok, _, err) = tandem(&["detokenize", "not json"]);
    assert!(!ok && err.contains("JSON array"), "{err}");
    let (ok, _, err) = tandem(&["generate", "--prompt", "x", "--top-p", "0"]);
    assert!(!ok && err.contains("--top-p"), "{err}");
    let (ok, _, err) = tandem(&["generate", "--prompt", "x", "--max-tokens", "100000"]);
    assert!(!ok && err.contains("context length"), "{err}");
    let out = Command::new(BIN).args(["generate", "--prompt", "x", "--model", "/nonexistent.gguf"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));
}

#[test]
fn engine_batching_chunking_and_preemption_keep_greedy_tokens_on_the_default_model() {
    use std::sync::Arc;
    use tandem_engine::runner::{EngineConfig, EngineCore, EngineHandle, GenerateRequest, TokenEvent};
    use tandem_engine::scheduler::{Policy, SchedulerConfig};

    let loaded = load(&model_path()).unwrap();
    let tok = Arc::new(loaded.tokenizer);
    let model = Arc::new(loaded.model);
    let topics = ["the sea", "a robot", "Paris", "mountains", "coffee", "the moon", "rain", "a library"];
    let reqs: Vec<GenerateRequest> = (0..33)
        .map(|i| {
            let text = format!("Write one sentence about {} number {i}.", topics[i % topics.len()]);
            let prompt = tok.encode(&text, true).unwrap();
            let mut r = GenerateRequest::greedy(prompt, 8);
            r.ignore_eos = true;
            r
        })
        .collect();
    let spawn = |policy, num_blocks, chunk_size| {
        let cfg = EngineConfig {
            scheduler: SchedulerConfig { policy, max_running: 64, max_batched_tokens: 512, chunk_size },
            block_size: 16,
            num_blocks,
            kv_dtype: KvDtype::F16,
            threads: 2,
        };
        EngineHandle::spawn(EngineCore::new(model.clone(), tok.clone(), cfg)).unwrap()
    };
    let collect = |mut s: tandem_engine::runner::RequestStream| {
        let mut ids = Vec::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                TokenEvent::First(t) | TokenEvent::Token(t) => ids.push(t.id),
                TokenEvent::End(_) => break,
            }
        }
        ids
    };
    // Alone: four of them, one at a time.
    let solo = spawn(Policy::Chunked, 64, 256);
    let alone: Vec<Vec<u32>> =
        [0usize, 7, 19, 32].iter().map(|&i| collect(solo.submit(reqs[i].clone()).unwrap())).collect();
    // Together: all 33 at once, chunked into 8-token pieces, in a pool too small for all of them.
    for (policy, blocks, chunk) in
        [(Policy::Chunked, 512, 8), (Policy::Chunked, 12, 64), (Policy::PrefillFirst, 512, 64)]
    {
        let e = spawn(policy, blocks, chunk);
        let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let together: Vec<Vec<u32>> = streams.into_iter().map(collect).collect();
        for (k, &i) in [0usize, 7, 19, 32].iter().enumerate() {
            assert_eq!(alone[k], together[i], "{policy} blocks={blocks} chunk={chunk}: request {i}");
        }
        let stats = e.blocking_stats().unwrap();
        assert_eq!(stats.blocks.used, 0, "blocks still held");
        if blocks == 12 {
            assert!(stats.scheduler.preemptions > 0, "12 blocks cannot hold 33 sequences without preemption");
        }
    }
}
