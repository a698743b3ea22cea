//! `tandem bench-engine`: offline measurements of the engine on one machine, no network.
//!
//! 1. Prefill throughput for 128- and 512-token prompts.
//! 2. Decode throughput at batch 1, 4, 16, 32, 64 (steady state: every sequence past its
//!    prompt, timing only decode steps).
//! 3. A fixed mixed workload (Poisson arrivals, mixed prompt and output lengths, same seed
//!    every run) under each scheduling policy: TTFT and TPOT p50 / p99.
//!
//! Each figure is the median of `--runs` repetitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_engine::runner::{EngineConfig, EngineCore, EngineHandle, GenerateRequest, TokenEvent};
use tandem_engine::scheduler::{Policy, RequestId, SchedulerConfig};
use tandem_engine::{KvDtype, Model, Tokenizer};

/// Options of one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runs: usize,
    pub batches: Vec<usize>,
    pub decode_steps: usize,
    pub mixed_requests: usize,
    pub mixed_rate: f64,
    pub kv_dtype: KvDtype,
    pub block_size: usize,
    pub num_blocks: usize,
    pub chunk_size: usize,
}

fn core(model: &Arc<Model>, tok: &Arc<Tokenizer>, o: &BenchOptions, policy: Policy, max_running: usize) -> EngineCore {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { policy, max_running, max_batched_tokens: 2048, chunk_size: o.chunk_size },
        block_size: o.block_size,
        num_blocks: o.num_blocks,
        kv_dtype: o.kv_dtype,
        threads: rayon::current_num_threads(),
    };
    EngineCore::new(model.clone(), tok.clone(), cfg)
}

/// Prompt ids of `len` tokens from ordinary text, so attention sees a realistic sequence.
fn prompt(tok: &Tokenizer, len: usize, salt: usize) -> Result<Vec<u32>> {
    const TEXT: &str = "The history of computing is a story of people building machines to extend the reach \
        of the human mind, from the abacus and the mechanical calculators of the seventeenth century to the \
        analytical engine, the first electronic computers, transistors, integrated circuits and the networks \
        that now connect billions of devices around the world. ";
    let mut ids = tok.encode(&format!("Request {salt}. "), false)?;
    let body = tok.encode(TEXT, false)?;
    while ids.len() < len {
        ids.extend_from_slice(&body);
    }
    ids.truncate(len);
    Ok(ids)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn drain(core: &mut EngineCore) {
    while core.has_work() {
        core.step();
    }
}

/// Prefill tokens/s for one prompt of `len` tokens (one request, whole prompt in one step).
fn prefill_rate(model: &Arc<Model>, tok: &Arc<Tokenizer>, o: &BenchOptions, len: usize, run: usize) -> Result<f64> {
    let mut c = core(model, tok, o, Policy::PrefillFirst, 1);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut req = GenerateRequest::greedy(prompt(tok, len, run)?, 1);
    req.ignore_eos = true;
    c.add(RequestId(1), req, tx);
    let t = Instant::now();
    drain(&mut c);
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

/// Decode tokens/s with `batch` sequences decoding together.
fn decode_rate(model: &Arc<Model>, tok: &Arc<Tokenizer>, o: &BenchOptions, batch: usize, run: usize) -> Result<f64> {
    let mut c = core(model, tok, o, Policy::PrefillFirst, batch);
    let mut sinks = Vec::new();
    for i in 0..batch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        sinks.push(rx);
        let mut req = GenerateRequest::greedy(prompt(tok, 32, run * 1000 + i)?, o.decode_steps + 1);
        req.ignore_eos = true;
        c.add(RequestId(i as u64 + 1), req, tx);
    }
    // Prefill every sequence (each produces its first token), then time pure decode steps.
    while c.stats().waiting > 0 || c.stats().scheduler.computed_tokens < (batch * 32) as u64 {
        c.step();
    }
    let t = Instant::now();
    let before = c.stats().scheduler.computed_tokens;
    drain(&mut c);
    let decoded = c.stats().scheduler.computed_tokens - before;
    drop(sinks);
    Ok(decoded as f64 / t.elapsed().as_secs_f64())
}

/// Per-request TTFT and TPOT of the mixed workload under `policy`, in seconds.
fn mixed(model: &Arc<Model>, tok: &Arc<Tokenizer>, o: &BenchOptions, policy: Policy) -> Result<(Vec<f64>, Vec<f64>)> {
    let handle = EngineHandle::spawn(core(model, tok, o, policy, 64))?;
    let mut rng = StdRng::seed_from_u64(20261127);
    let mut at = 0.0f64;
    let mut plan = Vec::new();
    for i in 0..o.mixed_requests {
        at += -(1.0 - rng.random::<f64>()).ln() / o.mixed_rate;
        let plen = rng.random_range(32..=256usize);
        let olen = rng.random_range(16..=64usize);
        let mut req = GenerateRequest::greedy(prompt(tok, plen, i)?, olen);
        req.ignore_eos = true;
        plan.push((at, req));
    }
    let start = Instant::now();
    let mut workers = Vec::new();
    for (at, req) in plan {
        let wait = Duration::from_secs_f64(at).saturating_sub(start.elapsed());
        std::thread::sleep(wait);
        let sent = Instant::now();
        let mut stream = handle.submit(req)?;
        workers.push(std::thread::spawn(move || {
            let mut first = None;
            let mut n = 0usize;
            while let Some(ev) = stream.blocking_next() {
                match ev {
                    TokenEvent::First(_) => {
                        first = Some(sent.elapsed());
                        n += 1;
                    }
                    TokenEvent::Token(_) => n += 1,
                    TokenEvent::End(_) => break,
                }
            }
            let total = sent.elapsed();
            let ttft = first.unwrap_or(total);
            let tpot = if n > 1 { (total - ttft).as_secs_f64() / (n - 1) as f64 } else { 0.0 };
            (ttft.as_secs_f64(), tpot)
        }));
    }
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    for w in workers {
        let Ok((a, b)) = w.join() else { bail!("a benchmark client thread panicked") };
        ttft.push(a);
        tpot.push(b);
    }
    Ok((ttft, tpot))
}

/// Runs everything and prints a Markdown report.
pub fn run(model: Arc<Model>, tok: Arc<Tokenizer>, name: &str, o: &BenchOptions) -> Result<()> {
    let threads = rayon::current_num_threads();
    println!("# tandem bench-engine\n");
    println!(
        "model `{name}`, {threads} threads, KV {:?} in {} blocks of {}, median of {} runs\n",
        o.kv_dtype, o.num_blocks, o.block_size, o.runs
    );
    println!("| measurement | tokens/s |\n| --- | ---: |");
    for len in [128, 512] {
        let r = median((0..o.runs).map(|i| prefill_rate(&model, &tok, o, len, i)).collect::<Result<_>>()?);
        println!("| prefill, {len}-token prompt | {r:.1} |");
    }
    for &b in &o.batches {
        let r = median((0..o.runs).map(|i| decode_rate(&model, &tok, o, b, i)).collect::<Result<_>>()?);
        println!("| decode, batch {b} | {r:.1} |");
    }
    println!(
        "\nMixed workload: {} requests, Poisson arrivals at {} req/s, prompts 32-256 tokens, outputs 16-64 tokens \
         (fixed seed), chunk size {}:\n",
        o.mixed_requests, o.mixed_rate, o.chunk_size
    );
    println!(
        "| policy | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for policy in [Policy::PrefillFirst, Policy::DecodeFirst, Policy::Chunked] {
        let mut rows = Vec::new();
        for _ in 0..o.runs {
            let (ttft, tpot) = mixed(&model, &tok, o, policy)?;
            rows.push([
                percentile(&ttft, 50.0),
                percentile(&ttft, 99.0),
                percentile(&tpot, 50.0),
                percentile(&tpot, 99.0),
            ]);
        }
        let m = |k: usize| median(rows.iter().map(|r| r[k] * 1000.0).collect());
        println!("| {policy} | {:.0} | {:.0} | {:.1} | {:.1} |", m(0), m(1), m(2), m(3));
    }
    Ok(())
}
