//! `tandem`: one binary for every role. Each subcommand parses its own flags and calls into
//! the library crates.

mod bench_engine;
mod bench_transfer;
mod fetch;
mod sizing;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tandem_engine::chat::ChatMessage;
use tandem_engine::generate::{Finish, Generator};
use tandem_engine::model::{Loaded, load};
use tandem_engine::runner::{EngineConfig, EngineCore, EngineHandle};
use tandem_engine::sampler::{Sampler, SamplingParams};
use tandem_engine::scheduler::{Policy, SchedulerConfig};
use tandem_engine::{IncrementalDecoder, KvDtype, Tokenizer};

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Disaggregated prefill/decode LLM serving")]
struct Cli {
    /// Worker threads for model compute [default: all cores].
    #[arg(long, global = true, env = "TANDEM_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt and print tokens/s.
    Generate(GenerateArgs),
    /// Download and verify the default model into the cache; prints its path.
    FetchModel {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Render TEXT as a user message through the model's chat template first.
        #[arg(long)]
        chat: bool,
        /// Do not add the model's BOS token (or other special tokens).
        #[arg(long)]
        no_special: bool,
        text: String,
    },
    /// Serve the model behind an OpenAI-compatible API (one process: gateway and engine).
    Serve(ServeArgs),
    /// Measure KV transfer: memcpy, raw TCP and tandem's protocol over QUIC, side by side.
    BenchTransfer {
        /// Transfers per cell; the report gives medians and p99.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Prompt lengths in tokens, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "128,1024,8192")]
        sizes: Vec<usize>,
    },
    /// Make a development cluster CA and node certificates for mutual TLS.
    Certs {
        /// Directory for ca.pem, ca.key and NODE.pem / NODE.key (created; an existing CA there is reused).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Node names, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "router,prefill-0,decode-0")]
        nodes: Vec<String>,
        /// Extra host names or IP addresses every node certificate is valid for.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// Measure prefill and decode throughput and per-policy latency on this machine.
    BenchEngine(BenchEngineArgs),
    /// Print the text of a JSON array of token ids (read from stdin when IDS is omitted).
    Detokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Leave out special tokens such as <|im_end|>.
        #[arg(long)]
        skip_special: bool,
        ids: Option<String>,
    },
}

#[derive(Debug, Args)]
struct CacheArgs {
    /// Where fetched models are kept [default: $XDG_CACHE_HOME/tandem or ~/.cache/tandem].
    #[arg(long, env = "TANDEM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A GGUF file or a Hugging Face directory; the default model is fetched when omitted.
    #[arg(long, env = "TANDEM_MODEL")]
    model: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV cache element type: f16 or f32.
    #[arg(long, default_value = "f16")]
    kv_dtype: KvDtype,
    /// Print the generated token ids as a JSON array after the text.
    #[arg(long)]
    print_ids: bool,
}

#[derive(Debug, Args)]
struct EngineArgs {
    /// Scheduling policy: chunked, prefill-first or decode-first.
    #[arg(long, env = "TANDEM_POLICY", default_value = "chunked")]
    policy: Policy,
    /// Sequences in the running batch at most.
    #[arg(long, env = "TANDEM_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Tokens per step for prefill-first and decode-first.
    #[arg(long, env = "TANDEM_MAX_BATCHED_TOKENS", default_value_t = 2048)]
    max_batched_tokens: usize,
    /// Tokens per step of the chunked policy.
    #[arg(long, env = "TANDEM_CHUNK_SIZE", default_value_t = 256)]
    chunk_size: usize,
    /// KV pool size, e.g. 2GiB [default: 1GiB].
    #[arg(long, env = "TANDEM_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<String>,
    /// KV pool as a fraction of available memory (instead of --kv-cache-bytes).
    #[arg(long, env = "TANDEM_KV_CACHE_FRACTION")]
    kv_cache_fraction: Option<f64>,
    #[arg(long, env = "TANDEM_KV_DTYPE", default_value = "f16")]
    kv_dtype: KvDtype,
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
}

impl EngineArgs {
    fn config(&self, model: &tandem_engine::Model) -> Result<EngineConfig> {
        if !(1..=1024).contains(&self.block_size) {
            bail!("--block-size must be in 1..=1024, got {}", self.block_size);
        }
        if self.max_running == 0 || self.max_batched_tokens == 0 || self.chunk_size == 0 {
            bail!("--max-running, --max-batched-tokens and --chunk-size must be positive");
        }
        let budget = sizing::kv_budget(self.kv_cache_bytes.as_deref(), self.kv_cache_fraction)?;
        let num_blocks = EngineConfig::blocks_for_bytes(model, budget, self.block_size, self.kv_dtype);
        if num_blocks < 2 {
            bail!("a KV budget of {budget} bytes holds {num_blocks} blocks; raise --kv-cache-bytes");
        }
        Ok(EngineConfig {
            scheduler: SchedulerConfig {
                policy: self.policy,
                max_running: self.max_running,
                max_batched_tokens: self.max_batched_tokens,
                chunk_size: self.chunk_size,
            },
            block_size: self.block_size,
            num_blocks,
            kv_dtype: self.kv_dtype,
            threads: rayon::current_num_threads(),
        })
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    port: u16,
    /// Accepted API keys (Bearer tokens), comma-separated; none means no authentication.
    #[arg(long = "api-key", env = "TANDEM_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// The model id clients use [default: the model file's name].
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Requests admitted at once; more get 429.
    #[arg(long, env = "TANDEM_MAX_INFLIGHT", default_value_t = 256)]
    max_inflight: usize,
    /// Seconds a request may wait for its first token before it fails with 504 [default: no limit].
    #[arg(long, env = "TANDEM_QUEUE_TIMEOUT")]
    queue_timeout: Option<f64>,
    /// Seconds a request may take in all before it fails with 504 [default: no limit].
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT")]
    request_timeout: Option<f64>,
}

#[derive(Debug, Args)]
struct BenchEngineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64")]
    batches: Vec<usize>,
    /// Decode steps timed per batch.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Requests in the mixed workload.
    #[arg(long, default_value_t = 32)]
    mixed_requests: usize,
    /// Arrival rate of the mixed workload, requests per second.
    #[arg(long, default_value_t = 1.0)]
    mixed_rate: f64,
    /// KV pool size, e.g. 2GiB [default: 1GiB].
    #[arg(long, env = "TANDEM_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<String>,
    /// KV pool as a fraction of available memory (instead of --kv-cache-bytes).
    #[arg(long, env = "TANDEM_KV_CACHE_FRACTION")]
    kv_cache_fraction: Option<f64>,
    #[arg(long, default_value = "f16")]
    kv_dtype: KvDtype,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Per-step token budget of the chunked policy.
    #[arg(long, default_value_t = 256)]
    chunk_size: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    // Run the command on a worker of the compute pool, so that each parallel op is shared
    // with the calling thread instead of handed to sleeping workers and waited for.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .thread_name(|i| format!("tandem-compute-{i}"))
        .build()
        .context("starting the compute thread pool")?;
    pool.install(|| dispatch(cli.command))
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Generate(args) => generate(args),
        Command::BenchEngine(args) => bench(args),
        Command::Serve(args) => serve(args),
        Command::BenchTransfer { runs, sizes } => {
            if runs == 0 || sizes.is_empty() || sizes.contains(&0) {
                bail!("--runs and every --sizes entry must be positive");
            }
            bench_transfer::run(runs, &sizes)
        }
        Command::Certs { out, nodes, hosts } => certs(&out, &nodes, &hosts),
        Command::FetchModel { cache } => {
            let path = fetch::fetch(&fetch::cache_dir(cache.cache_dir.as_deref())?)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Tokenize { model, chat, no_special, text } => {
            let loaded = open_model(&model)?;
            let ids = if chat {
                let prompt = render_chat(&loaded.tokenizer, None, &text)?;
                loaded.tokenizer.encode(&prompt, false)?
            } else {
                loaded.tokenizer.encode(&text, !no_special)?
            };
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Command::Detokenize { model, skip_special, ids } => {
            let text = match ids {
                Some(t) => t,
                None => std::io::read_to_string(std::io::stdin()).context("reading ids from stdin")?,
            };
            let ids: Vec<u32> = serde_json::from_str(text.trim()).context("IDS must be a JSON array of token ids")?;
            let loaded = open_model(&model)?;
            let vocab = loaded.tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                bail!("token id {bad} is outside the vocabulary of {vocab}");
            }
            print!("{}", loaded.tokenizer.decode(&ids, skip_special)?);
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if args.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    let path = model_path(&args.model)?;
    let loaded = load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()));
    let config = args.engine.config(&loaded.model)?;
    let limits = tandem_router::ModelLimits {
        name: name.clone(),
        context_length: loaded.model.config.context_length,
        vocab_size: loaded.model.config.vocab_size,
    };
    let tok = Arc::new(loaded.tokenizer);
    let engine = EngineHandle::spawn(EngineCore::new(Arc::new(loaded.model), tok.clone(), config))?;
    let app = tandem_router::router(
        engine,
        tok,
        limits,
        tandem_router::ServerConfig {
            api_keys: args.api_keys.clone(),
            max_inflight: args.max_inflight,
            queue_timeout: seconds("--queue-timeout", args.queue_timeout)?,
            request_timeout: seconds("--request-timeout", args.request_timeout)?,
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tandem-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "tandem serving {name} on http://{addr} ({} blocks of {} tokens, policy {})",
            config.num_blocks, config.block_size, config.scheduler.policy
        );
        eprintln!(
            "try: curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n  -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
        );
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! { _ = ctrl_c => {}, _ = term => {} }
            eprintln!("shutting down: finishing in-flight requests");
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("serving HTTP")
    })
}

fn seconds(flag: &str, v: Option<f64>) -> Result<Option<std::time::Duration>> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(std::time::Duration::from_secs_f64(s))),
        Some(s) => bail!("{flag} must be a positive number of seconds, got {s}"),
    }
}

fn certs(out: &std::path::Path, nodes: &[String], hosts: &[String]) -> Result<()> {
    use tandem_kv_transfer::tls::{PemPair, make_ca, make_node_cert};
    if nodes.is_empty() {
        bail!("--nodes names no node");
    }
    for n in nodes {
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            bail!("node name {n:?} must be letters, digits, '-' or '.'");
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, text: &str, secret: bool| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    let (ca_cert, ca_key) = (out.join("ca.pem"), out.join("ca.key"));
    let ca = if ca_cert.exists() && ca_key.exists() {
        eprintln!("reusing the CA in {}", out.display());
        PemPair { cert: std::fs::read_to_string(&ca_cert)?, key: std::fs::read_to_string(&ca_key)? }
    } else {
        let ca = make_ca("tandem development CA")?;
        write("ca.pem", &ca.cert, false)?;
        write("ca.key", &ca.key, true)?;
        ca
    };
    for n in nodes {
        let pair = make_node_cert(&ca, n, hosts).with_context(|| format!("certificate for {n}"))?;
        write(&format!("{n}.pem"), &pair.cert, false)?;
        write(&format!("{n}.key"), &pair.key, true)?;
    }
    println!("wrote a CA and {} node certificates to {}", nodes.len(), out.display());
    Ok(())
}

fn bench(args: BenchEngineArgs) -> Result<()> {
    if args.runs == 0 || args.batches.contains(&0) || args.decode_steps == 0 || args.mixed_requests == 0 {
        bail!("--runs, --batches, --decode-steps and --mixed-requests must be positive");
    }
    if !(args.mixed_rate.is_finite() && args.mixed_rate > 0.0) {
        bail!("--mixed-rate must be a positive number of requests per second");
    }
    if !(1..=1024).contains(&args.block_size) || args.chunk_size == 0 {
        bail!("--block-size must be in 1..=1024 and --chunk-size positive");
    }
    let loaded = open_model(&args.model)?;
    let budget = sizing::kv_budget(args.kv_cache_bytes.as_deref(), args.kv_cache_fraction)?;
    let num_blocks = EngineConfig::blocks_for_bytes(&loaded.model, budget, args.block_size, args.kv_dtype);
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let need = (max_batch * (32 + args.decode_steps + 1)).max(64 * 320).div_ceil(args.block_size);
    if num_blocks < need {
        bail!(
            "a KV budget of {budget} bytes holds {num_blocks} blocks; this benchmark needs {need} (raise --kv-cache-bytes)"
        );
    }
    let opts = bench_engine::BenchOptions {
        runs: args.runs,
        batches: args.batches,
        decode_steps: args.decode_steps,
        mixed_requests: args.mixed_requests,
        mixed_rate: args.mixed_rate,
        kv_dtype: args.kv_dtype,
        block_size: args.block_size,
        num_blocks,
        chunk_size: args.chunk_size,
    };
    bench_engine::run(Arc::new(loaded.model), Arc::new(loaded.tokenizer), &loaded.name, &opts)
}

fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(p) => Ok(p.clone()),
        None => fetch::default_model(&fetch::cache_dir(args.cache.cache_dir.as_deref())?),
    }
}

fn open_model(args: &ModelArgs) -> Result<Loaded> {
    let path = model_path(args)?;
    load(&path).with_context(|| format!("loading model {}", path.display()))
}

fn render_chat(tok: &Tokenizer, system: Option<&str>, user: &str) -> Result<String> {
    let template = tok.chat_template.as_ref().context("this model has no chat template; drop --chat")?;
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", user));
    Ok(template.render(&messages, true)?)
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let loaded = open_model(&args.model)?;
    let tok = &loaded.tokenizer;
    let prompt_ids = if args.chat {
        tok.encode(&render_chat(tok, args.system.as_deref(), &args.prompt)?, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let ctx = loaded.model.config.context_length;
    if prompt_ids.len() + args.max_tokens > ctx {
        bail!(
            "prompt ({} tokens) plus --max-tokens {} exceeds the model's context length {ctx}",
            prompt_ids.len(),
            args.max_tokens
        );
    }
    let mut generator = Generator::new(&loaded.model, prompt_ids.len() + args.max_tokens, args.kv_dtype);
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ..SamplingParams::default()
    });
    let mut decoder = IncrementalDecoder::new(true);
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut write_err = None;
    let (finish, stats) = generator.generate(&prompt_ids, args.max_tokens, &tok.eos_ids, &mut sampler, |id| {
        ids.push(id);
        match decoder.push(tok, id) {
            Ok(Some(text)) => {
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    write_err = Some(anyhow::Error::from(e));
                    return false;
                }
                true
            }
            Ok(None) => true,
            Err(e) => {
                write_err = Some(e.into());
                false
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e);
    }
    if let Some(rest) = decoder.finish(tok)? {
        out.write_all(rest.as_bytes())?;
    }
    writeln!(out)?;
    if args.print_ids {
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    out.flush()?;
    let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s | finish: {}",
        stats.prompt_tokens,
        rate(stats.prompt_tokens, stats.prompt_time),
        stats.generated_tokens,
        rate(stats.generated_tokens, stats.generate_time),
        match finish {
            Finish::Eos => "stop",
            Finish::Length | Finish::Stopped => "length",
        }
    );
    Ok(())
}
