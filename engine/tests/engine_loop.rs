//! The engine loop end to end on a tiny random model: batching, chunking, preemption and the
//! prefix cache never change a request's tokens, every request ends, and the pool returns to
//! idle.

mod common;

use std::sync::Arc;

use common::{Spec, Variant, Weights};
use tandem_engine::KvDtype;
use tandem_engine::model::load;
use tandem_engine::runner::{EngineConfig, EngineCore, EngineHandle, FinishReason, GenerateRequest, TokenEvent};
use tandem_engine::sampler::SamplingParams;
use tandem_engine::scheduler::{Policy, SchedulerConfig};
use tandem_kernels::TensorType;

struct Tiny {
    _dir: tempfile::TempDir,
    model: Arc<tandem_engine::Model>,
    tok: Arc<tandem_engine::Tokenizer>,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::random(Spec::tiny(Variant::Llama), 31);
    let path = dir.path().join("m.gguf");
    w.write_gguf(&path, TensorType::Q8_0);
    let loaded = load(&path).unwrap();
    Tiny { _dir: dir, model: Arc::new(loaded.model), tok: Arc::new(loaded.tokenizer) }
}

fn engine(t: &Tiny, policy: Policy, num_blocks: usize, chunk: usize) -> EngineHandle {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { policy, max_running: 64, max_batched_tokens: 256, chunk_size: chunk },
        block_size: 4,
        num_blocks,
        kv_dtype: KvDtype::F16,
        threads: 2,
    };
    EngineHandle::spawn(EngineCore::new(t.model.clone(), t.tok.clone(), cfg)).unwrap()
}

/// Collects a stream: token ids, concatenated text, end.
fn collect(mut s: tandem_engine::runner::RequestStream) -> (Vec<u32>, String, tandem_engine::runner::EndInfo) {
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut first = true;
    while let Some(ev) = s.blocking_next() {
        match ev {
            TokenEvent::First(t) => {
                assert!(first, "First must come first");
                first = false;
                ids.push(t.id);
                text.push_str(&t.text);
            }
            TokenEvent::Token(t) => {
                assert!(!first, "Token before First");
                ids.push(t.id);
                text.push_str(&t.text);
            }
            TokenEvent::End(e) => {
                text.push_str(&e.text);
                return (ids, text, e);
            }
        }
    }
    panic!("stream closed without End");
}

fn workload() -> Vec<GenerateRequest> {
    (0..33u32)
        .map(|i| {
            let len = 1 + (i as usize * 11) % 40;
            let prompt: Vec<u32> = (0..len as u32).map(|t| (t * 7 + i * 3) % 96).collect();
            let mut r = GenerateRequest::greedy(prompt, 4 + (i as usize * 5) % 20);
            r.ignore_eos = true;
            if i % 3 == 1 {
                r.params =
                    SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 40, seed: i as u64, ..Default::default() };
            }
            if i % 5 == 2 {
                r.params.presence_penalty = 0.5;
                r.params.repetition_penalty = 1.1;
            }
            r
        })
        .collect()
}

fn run_alone(t: &Tiny, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    let e = engine(t, Policy::Chunked, 512, 64);
    reqs.iter().map(|r| collect(e.submit(r.clone()).unwrap()).0).collect()
}

fn run_together(e: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(|s| collect(s).0).collect()
}

#[test]
fn outputs_do_not_depend_on_batching_chunking_policy_or_preemption() {
    let t = tiny();
    let reqs = workload();
    let alone = run_alone(&t, &reqs);
    for (policy, blocks, chunk) in [
        (Policy::Chunked, 512, 16),
        (Policy::Chunked, 512, 5),
        (Policy::PrefillFirst, 512, 64),
        (Policy::DecodeFirst, 512, 64),
        // 24 blocks of 4 tokens cannot hold 33 sequences: preemption and recompute.
        (Policy::Chunked, 24, 16),
        (Policy::DecodeFirst, 24, 64),
    ] {
        let e = engine(&t, policy, blocks, chunk);
        let together = run_together(&e, &reqs);
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "{policy} blocks={blocks} chunk={chunk}: request {i} differs");
            assert_eq!(a.len(), reqs[i].max_tokens);
        }
        let stats = e.blocking_stats().unwrap();
        assert_eq!(stats.blocks.used, 0, "{policy}: blocks still held after every request ended");
        if blocks == 24 {
            assert!(stats.scheduler.preemptions > 0, "{policy}: the small pool should have forced preemption");
        }
    }
}

#[test]
fn prefix_cache_hit_gives_the_same_output_and_skips_compute() {
    let t = tiny();
    let e = engine(&t, Policy::Chunked, 256, 64);
    let prompt: Vec<u32> = (0..37).map(|i| (i * 5) % 96).collect();
    let mut req = GenerateRequest::greedy(prompt, 6);
    req.ignore_eos = true;
    let (a, _, end_a) = collect(e.submit(req.clone()).unwrap());
    let before = e.blocking_stats().unwrap().scheduler;
    let (b, _, end_b) = collect(e.submit(req.clone()).unwrap());
    let after = e.blocking_stats().unwrap().scheduler;
    assert_eq!(a, b);
    assert_eq!(end_a.cached_tokens, 0);
    assert_eq!(end_b.cached_tokens, 36, "nine full blocks of four come from the cache");
    // Second run computes 1 prompt token + 5 decode steps.
    assert_eq!(after.computed_tokens - before.computed_tokens, 6);
    assert_eq!(after.cached_tokens - before.cached_tokens, 36);
}

#[test]
fn stop_conditions_and_logprobs() {
    let t = tiny();
    let e = engine(&t, Policy::Chunked, 256, 64);
    let prompt: Vec<u32> = vec![10, 20, 30];
    let mut base = GenerateRequest::greedy(prompt, 12);
    base.ignore_eos = true;
    let (ids, text, end) = collect(e.submit(base.clone()).unwrap());
    assert_eq!(end.reason, FinishReason::Length);
    assert_eq!(end.completion_tokens, 12);
    assert_eq!(text, t.tok.decode(&ids, true).unwrap());

    // A stop token id ends generation before that token.
    let mut r = base.clone();
    r.stop_token_ids = vec![ids[3]];
    let (ids2, _, end) = collect(e.submit(r).unwrap());
    assert_eq!(end.reason, FinishReason::Stop);
    assert_eq!(ids2, ids[..ids.iter().position(|&x| x == ids[3]).unwrap()]);

    // A stop string spanning tokens cuts the text just before it.
    let stop: String = text.chars().skip(4).take(3).collect();
    let mut r = base.clone();
    r.stop = vec![stop.clone()];
    let (_, text3, end) = collect(e.submit(r).unwrap());
    assert_eq!(end.reason, FinishReason::Stop);
    assert_eq!(text3, text[..text.find(&stop).unwrap()]);

    // Logprobs: the chosen token's, and greedy picks the most likely.
    let mut r = base.clone();
    r.logprobs = Some(5);
    let mut s = e.submit(r).unwrap();
    match s.blocking_next().unwrap() {
        TokenEvent::First(tok) => {
            assert_eq!(tok.top_logprobs.len(), 5);
            assert_eq!(tok.top_logprobs[0].0, tok.id);
            assert_eq!(tok.logprob, Some(tok.top_logprobs[0].1));
            assert!(tok.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        }
        other => panic!("expected First, got {other:?}"),
    }
}

#[test]
fn invalid_requests_end_with_a_named_error() {
    let t = tiny();
    let e = engine(&t, Policy::Chunked, 16, 64);
    let cases = [
        (GenerateRequest::greedy(vec![], 4), "no tokens"),
        (GenerateRequest::greedy(vec![500], 4), "outside the vocabulary"),
        (GenerateRequest::greedy(vec![1; 10], 0), "max_tokens"),
        (GenerateRequest::greedy(vec![1; 200], 100), "context length"),
        (GenerateRequest::greedy(vec![1; 40], 40), "KV pool"),
    ];
    for (req, want) in cases {
        let (_, _, end) = collect(e.submit(req).unwrap());
        match end.reason {
            FinishReason::Error(m) => assert!(m.contains(want), "{m:?} should mention {want:?}"),
            other => panic!("expected an error mentioning {want:?}, got {other:?}"),
        }
    }
    let mut bad = GenerateRequest::greedy(vec![1], 4);
    bad.params.top_p = 2.0;
    let (_, _, end) = collect(e.submit(bad).unwrap());
    assert!(matches!(end.reason, FinishReason::Error(m) if m.contains("top_p")));
}

#[test]
fn dropping_a_stream_aborts_and_frees_its_blocks() {
    let t = tiny();
    let e = engine(&t, Policy::Chunked, 64, 64);
    let mut req = GenerateRequest::greedy(vec![1, 2, 3, 4, 5], 200);
    req.ignore_eos = true;
    let mut s = e.submit(req.clone()).unwrap();
    assert!(matches!(s.blocking_next(), Some(TokenEvent::First(_))));
    drop(s);
    // A second request runs to completion after the abort; then nothing is held.
    let mut short = req;
    short.max_tokens = 3;
    let (ids, _, _) = collect(e.submit(short).unwrap());
    assert_eq!(ids.len(), 3);
    let stats = e.blocking_stats().unwrap();
    assert_eq!(stats.blocks.used, 0);
    assert_eq!((stats.running, stats.waiting), (0, 0));

    // Explicit abort reports Aborted.
    let mut long = GenerateRequest::greedy(vec![7; 5], 200);
    long.ignore_eos = true;
    let mut s = e.submit(long).unwrap();
    s.abort();
    let mut reason = None;
    while let Some(ev) = s.blocking_next() {
        if let TokenEvent::End(end) = ev {
            reason = Some(end.reason);
        }
    }
    assert_eq!(reason, Some(FinishReason::Aborted));
}
