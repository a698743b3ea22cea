//! The Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) over a paged KV
//! cache.
//!
//! One [`Model::forward`] call takes any mix of prefill chunks and single decode tokens of
//! different sequences, each at its own position: the batch shape a continuous-batching
//! scheduler produces. Projections run once over all tokens of the batch; attention runs per
//! token against that token's own sequence.

use tandem_kernels::attention::{AttnSeq, paged_attention};
use tandem_kernels::matmul;
use tandem_kernels::ops::{self, KvElem, PagedLayout, Rope, RopeStyle};

use crate::EngineError;
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::kv::{KvCache, LayerKv};
use crate::weights::{Format, TensorRef, TensorStore};

/// Which positions of a sequence's chunk need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// None: a prefill chunk that is not the prompt's last.
    None,
    /// The last token only: the usual case for sampling.
    Last,
    /// Every token: scoring a prompt, checking against a reference.
    All,
}

/// One sequence's share of a batch: `tokens` sit at positions `start_pos..`; positions before
/// `start_pos` are already in the cache through `block_table`.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    pub logits: LogitsMode,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: TensorRef,
    wk: TensorRef,
    wv: TensorRef,
    wo: TensorRef,
    bias: Option<[Vec<f32>; 3]>,
    ffn_norm: Vec<f32>,
    w_gate: TensorRef,
    w_up: TensorRef,
    w_down: TensorRef,
}

/// A loaded Llama-family network.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    store: TensorStore,
    rope: Rope,
    embed: TensorRef,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: TensorRef,
}

/// Tensor names in each file convention.
struct Names(Format);

impl Names {
    fn global(&self, what: &str) -> &'static str {
        match (self.0, what) {
            (Format::Gguf, "embed") => "token_embd.weight",
            (Format::Gguf, "norm") => "output_norm.weight",
            (Format::Gguf, _) => "output.weight",
            (Format::HuggingFace, "embed") => "model.embed_tokens.weight",
            (Format::HuggingFace, "norm") => "model.norm.weight",
            (Format::HuggingFace, _) => "lm_head.weight",
        }
    }

    fn layer(&self, i: usize, what: &str) -> String {
        match self.0 {
            Format::Gguf => {
                let n = match what {
                    "attn_norm" => "attn_norm.weight",
                    "q" => "attn_q.weight",
                    "k" => "attn_k.weight",
                    "v" => "attn_v.weight",
                    "o" => "attn_output.weight",
                    "q_bias" => "attn_q.bias",
                    "k_bias" => "attn_k.bias",
                    "v_bias" => "attn_v.bias",
                    "ffn_norm" => "ffn_norm.weight",
                    "gate" => "ffn_gate.weight",
                    "up" => "ffn_up.weight",
                    _ => "ffn_down.weight",
                };
                format!("blk.{i}.{n}")
            }
            Format::HuggingFace => {
                let n = match what {
                    "attn_norm" => "input_layernorm.weight",
                    "q" => "self_attn.q_proj.weight",
                    "k" => "self_attn.k_proj.weight",
                    "v" => "self_attn.v_proj.weight",
                    "o" => "self_attn.o_proj.weight",
                    "q_bias" => "self_attn.q_proj.bias",
                    "k_bias" => "self_attn.k_proj.bias",
                    "v_bias" => "self_attn.v_proj.bias",
                    "ffn_norm" => "post_attention_layernorm.weight",
                    "gate" => "mlp.gate_proj.weight",
                    "up" => "mlp.up_proj.weight",
                    _ => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{n}")
            }
        }
    }
}

impl Model {
    /// Binds every tensor the forward pass uses, checking each shape against `config`.
    pub fn new(config: ModelConfig, store: TensorStore) -> Result<Self, EngineError> {
        config.validate()?;
        let c = &config;
        let names = Names(store.format);
        let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let embed = store.matrix(names.global("embed"), c.vocab_size, c.hidden)?;
        let lm_head = if store.contains(names.global("output")) {
            store.matrix(names.global("output"), c.vocab_size, c.hidden)?
        } else {
            embed.clone()
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |w: &str| names.layer(i, w);
            let bias = if c.qkv_bias {
                Some([
                    store.vector(&n("q_bias"), q_dim)?,
                    store.vector(&n("k_bias"), kv_dim)?,
                    store.vector(&n("v_bias"), kv_dim)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: store.vector(&n("attn_norm"), c.hidden)?,
                wq: store.matrix(&n("q"), q_dim, c.hidden)?,
                wk: store.matrix(&n("k"), kv_dim, c.hidden)?,
                wv: store.matrix(&n("v"), kv_dim, c.hidden)?,
                wo: store.matrix(&n("o"), c.hidden, q_dim)?,
                bias,
                ffn_norm: store.vector(&n("ffn_norm"), c.hidden)?,
                w_gate: store.matrix(&n("gate"), c.intermediate, c.hidden)?,
                w_up: store.matrix(&n("up"), c.intermediate, c.hidden)?,
                w_down: store.matrix(&n("down"), c.hidden, c.intermediate)?,
            });
        }
        let norm = store.vector(names.global("norm"), c.hidden)?;
        // GGUF's converter permutes Llama/Mistral q/k rows into adjacent rotary pairs; it
        // leaves Qwen2 and every Hugging Face checkpoint in rotate-half order.
        let style = match (store.format, c.arch) {
            (Format::Gguf, Arch::Llama | Arch::Mistral) => RopeStyle::Interleaved,
            _ => RopeStyle::HalfSplit,
        };
        let factors: Option<Vec<f32>> = if store.format == Format::Gguf && store.contains("rope_freqs.weight") {
            Some(store.vector("rope_freqs.weight", c.rope_dim / 2)?)
        } else {
            match c.rope_scaling {
                RopeScaling::None => None,
                RopeScaling::Linear(f) => Some(vec![f as f32; c.rope_dim / 2]),
                RopeScaling::Llama3(s) => Some(s.freq_factors(c.rope_dim, c.rope_theta)),
            }
        };
        if let Some(f) = &factors
            && f.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(EngineError::BadTensor { name: "rope_freqs.weight".into(), why: "non-positive factor".into() });
        }
        let rope = Rope::new(style, c.rope_dim, c.rope_theta, factors.as_deref());
        Ok(Self { config, store, rope, embed, layers, norm, lm_head })
    }

    /// A KV cache shaped for this model.
    pub fn new_kv_cache(&self, block_size: usize, num_blocks: usize, dtype: crate::KvDtype) -> KvCache {
        let c = &self.config;
        KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, block_size, num_blocks, dtype)
    }

    /// Runs one batch. Writes the batch's K/V into `kv` and returns, per sequence, the logits
    /// its [`LogitsMode`] asked for (rows of `vocab_size`, concatenated).
    pub fn forward(&self, batch: &[SeqInput<'_>], kv: &mut KvCache) -> Result<Vec<Vec<f32>>, EngineError> {
        let c = &self.config;
        self.check_batch(batch, kv)?;
        let (hidden, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);

        // Per-token bookkeeping: which sequence, which position.
        let mut tok_seq = Vec::new();
        let mut tok_pos = Vec::new();
        let mut tokens = Vec::new();
        for (s, seq) in batch.iter().enumerate() {
            for (i, &t) in seq.tokens.iter().enumerate() {
                tok_seq.push(s);
                tok_pos.push(seq.start_pos + i);
                tokens.push(t);
            }
        }
        let n = tokens.len();
        if n == 0 {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }

        let mut attn_seqs = Vec::with_capacity(batch.len());
        let mut first_row = 0;
        for seq in batch {
            if !seq.tokens.is_empty() {
                attn_seqs.push(AttnSeq {
                    first_row,
                    n_tokens: seq.tokens.len(),
                    start_pos: seq.start_pos,
                    block_table: seq.block_table,
                });
            }
            first_row += seq.tokens.len();
        }

        let embed = self.store.weight(&self.embed)?;
        let mut x = vec![0f32; n * hidden];
        for (row, &t) in x.chunks_exact_mut(hidden).zip(&tokens) {
            embed.dequantize_row(t as usize, row)?;
        }

        let mut xn = vec![0f32; n * hidden];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * hidden];
        let mut gate = vec![0f32; n * c.intermediate];
        let mut up = vec![0f32; n * c.intermediate];

        for (li, layer) in self.layers.iter().enumerate() {
            for (o, i) in xn.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
                ops::rms_norm(i, &layer.attn_norm, c.rms_eps, o);
            }
            matmul(&self.store.weight(&layer.wq)?, &xn, &mut q)?;
            matmul(&self.store.weight(&layer.wk)?, &xn, &mut k)?;
            matmul(&self.store.weight(&layer.wv)?, &xn, &mut v)?;
            if let Some([bq, bk, bv]) = &layer.bias {
                q.chunks_exact_mut(q_dim).for_each(|r| ops::add_assign(r, bq));
                k.chunks_exact_mut(kv_dim).for_each(|r| ops::add_assign(r, bk));
                v.chunks_exact_mut(kv_dim).for_each(|r| ops::add_assign(r, bv));
            }
            for t in 0..n {
                self.rope.apply(&mut q[t * q_dim..(t + 1) * q_dim], hd, tok_pos[t]);
                self.rope.apply(&mut k[t * kv_dim..(t + 1) * kv_dim], hd, tok_pos[t]);
            }
            let layout = kv.layout;
            match &mut kv.layers[li] {
                LayerKv::F16 { k: kc, v: vc } => {
                    store_kv(layout, batch, &tok_seq, &tok_pos, &k, &v, kc, vc);
                    paged_attention(&attn_seqs, &q, c.n_heads, layout, kc, vc, &mut attn);
                }
                LayerKv::F32 { k: kc, v: vc } => {
                    store_kv(layout, batch, &tok_seq, &tok_pos, &k, &v, kc, vc);
                    paged_attention(&attn_seqs, &q, c.n_heads, layout, kc, vc, &mut attn);
                }
            }
            matmul(&self.store.weight(&layer.wo)?, &attn, &mut proj)?;
            ops::add_assign(&mut x, &proj);

            for (o, i) in xn.chunks_exact_mut(hidden).zip(x.chunks_exact(hidden)) {
                ops::rms_norm(i, &layer.ffn_norm, c.rms_eps, o);
            }
            matmul(&self.store.weight(&layer.w_gate)?, &xn, &mut gate)?;
            matmul(&self.store.weight(&layer.w_up)?, &xn, &mut up)?;
            ops::silu_mul(&mut gate, &up);
            matmul(&self.store.weight(&layer.w_down)?, &gate, &mut proj)?;
            ops::add_assign(&mut x, &proj);
        }

        // Final norm and LM head only for the rows that want logits.
        let mut wanted = Vec::new();
        let mut first = 0;
        for seq in batch {
            let len = seq.tokens.len();
            match seq.logits {
                LogitsMode::None => {}
                LogitsMode::Last => wanted.push(first + len - 1),
                LogitsMode::All => wanted.extend(first..first + len),
            }
            first += len;
        }
        let mut normed = vec![0f32; wanted.len() * hidden];
        for (o, &t) in normed.chunks_exact_mut(hidden).zip(&wanted) {
            ops::rms_norm(&x[t * hidden..(t + 1) * hidden], &self.norm, c.rms_eps, o);
        }
        let mut logits = vec![0f32; wanted.len() * c.vocab_size];
        matmul(&self.store.weight(&self.lm_head)?, &normed, &mut logits)?;
        let mut out: Vec<Vec<f32>> = batch.iter().map(|_| Vec::new()).collect();
        for (row, &t) in logits.chunks_exact(c.vocab_size).zip(&wanted) {
            out[tok_seq[t]].extend_from_slice(row);
        }
        Ok(out)
    }

    fn check_batch(&self, batch: &[SeqInput<'_>], kv: &KvCache) -> Result<(), EngineError> {
        let c = &self.config;
        if kv.layers.len() != c.n_layers || kv.layout.n_kv_heads != c.n_kv_heads || kv.layout.head_dim != c.head_dim {
            return Err(EngineError::BadBatch("KV cache shape does not match the model".into()));
        }
        for (s, seq) in batch.iter().enumerate() {
            if seq.tokens.is_empty() && seq.logits != LogitsMode::None {
                return Err(EngineError::BadBatch(format!("sequence {s} has no tokens but asks for logits")));
            }
            if let Some(&id) = seq.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(EngineError::TokenOutOfRange { id, vocab: c.vocab_size });
            }
            let end = seq.start_pos + seq.tokens.len();
            if end > c.context_length {
                return Err(EngineError::ContextOverflow { len: end, max: c.context_length });
            }
            let need = end.div_ceil(kv.layout.block_size);
            if seq.block_table.len() < need {
                return Err(EngineError::BadBatch(format!(
                    "sequence {s}: block table has {} blocks, {end} positions need {need}",
                    seq.block_table.len()
                )));
            }
            if let Some(&b) = seq.block_table[..need].iter().find(|&&b| b as usize >= kv.num_blocks) {
                return Err(EngineError::BadBatch(format!(
                    "sequence {s}: block {b} is outside the pool of {}",
                    kv.num_blocks
                )));
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn store_kv<T: KvElem>(
    layout: PagedLayout,
    batch: &[SeqInput<'_>],
    tok_seq: &[usize],
    tok_pos: &[usize],
    k: &[f32],
    v: &[f32],
    kc: &mut [T],
    vc: &mut [T],
) {
    let hd = layout.head_dim;
    let kv_dim = layout.n_kv_heads * hd;
    for t in 0..tok_seq.len() {
        let table = batch[tok_seq[t]].block_table;
        for h in 0..layout.n_kv_heads {
            let off = layout.offset(table, tok_pos[t], h);
            let src = t * kv_dim + h * hd;
            for d in 0..hd {
                kc[off + d] = T::from_f32(k[src + d]);
                vc[off + d] = T::from_f32(v[src + d]);
            }
        }
    }
}
