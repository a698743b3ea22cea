//! Tiny random models written by the tests themselves, in both file formats, and an
//! obviously-correct f64 forward pass (no cache, no paging, no batching) to check the engine
//! against.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use tandem_engine::gguf::{GgufWriter, Value, ValueType, string_array};
use tandem_kernels::TensorType;
use tandem_kernels::quant::{dequantize_row, quantize_row};

/// A small deterministic generator (SplitMix64), so the weights depend only on the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    pub fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    Llama,
    /// Qwen2: q/k/v biases, GGUF keeps rotate-half order.
    Qwen2,
    /// Llama with Llama-3 RoPE scaling.
    Llama3Scaled,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub variant: Variant,
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub theta: f64,
    pub eps: f64,
    pub tied: bool,
}

impl Spec {
    pub fn tiny(variant: Variant) -> Self {
        Spec {
            variant,
            vocab: 96,
            hidden: 64,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            theta: 10000.0,
            eps: 1e-5,
            tied: false,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// Llama-3 scaling parameters used by the scaled variant.
    pub fn llama3(&self) -> Option<(f64, f64, f64, f64)> {
        (self.variant == Variant::Llama3Scaled).then_some((8.0, 1.0, 4.0, 64.0))
    }
    /// Inverse frequency of each rotary pair, written out independently of the engine.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        (0..d / 2)
            .map(|i| {
                let f = self.theta.powf(-((2 * i) as f64) / d as f64);
                match self.llama3() {
                    None => f,
                    Some((factor, low, high, orig)) => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < orig / high {
                            f
                        } else if wavelen > orig / low {
                            f / factor
                        } else {
                            let s = (orig / wavelen - low) / (high - low);
                            (1.0 - s) * f / factor + s * f
                        }
                    }
                }
            })
            .collect()
    }
}

/// Weights in Hugging Face naming and layout (`[out, in]` row-major, rotate-half q/k).
pub struct Weights {
    pub spec: Spec,
    pub t: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    pub fn random(spec: Spec, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut t = HashMap::new();
        let (h, hd) = (spec.hidden, spec.head_dim());
        let (qd, kvd) = (spec.heads * hd, spec.kv_heads * hd);
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
            t.insert(name, (shape, v));
        };
        put("model.embed_tokens.weight".into(), vec![spec.vocab, h], 1.0, 0.0);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}.");
            put(format!("{p}input_layernorm.weight"), vec![h], 0.2, 1.0);
            put(format!("{p}self_attn.q_proj.weight"), vec![qd, h], 0.3, 0.0);
            put(format!("{p}self_attn.k_proj.weight"), vec![kvd, h], 0.3, 0.0);
            put(format!("{p}self_attn.v_proj.weight"), vec![kvd, h], 0.3, 0.0);
            put(format!("{p}self_attn.o_proj.weight"), vec![h, qd], 0.2, 0.0);
            if spec.variant == Variant::Qwen2 {
                put(format!("{p}self_attn.q_proj.bias"), vec![qd], 0.5, 0.0);
                put(format!("{p}self_attn.k_proj.bias"), vec![kvd], 0.5, 0.0);
                put(format!("{p}self_attn.v_proj.bias"), vec![kvd], 0.5, 0.0);
            }
            put(format!("{p}post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
            put(format!("{p}mlp.gate_proj.weight"), vec![spec.inter, h], 0.2, 0.0);
            put(format!("{p}mlp.up_proj.weight"), vec![spec.inter, h], 0.2, 0.0);
            put(format!("{p}mlp.down_proj.weight"), vec![h, spec.inter], 0.2, 0.0);
        }
        put("model.norm.weight".into(), vec![h], 0.2, 1.0);
        if !spec.tied {
            put("lm_head.weight".into(), vec![spec.vocab, h], 0.3, 0.0);
        }
        Weights { spec, t }
    }

    pub fn get(&self, name: &str) -> &[f32] {
        &self.t[name].1
    }

    /// Rounds every matrix through `ty` (what a quantized GGUF of these weights holds), so the
    /// reference sees exactly the values the engine reads.
    pub fn quantized(&self, ty: TensorType) -> Weights {
        let mut t = self.t.clone();
        for (shape, v) in t.values_mut() {
            if shape.len() == 2 {
                let cols = shape[1];
                for row in v.chunks_mut(cols) {
                    let q = quantize_row(ty, row).unwrap();
                    dequantize_row(ty, &q, row).unwrap();
                }
            }
        }
        Weights { spec: self.spec.clone(), t }
    }

    pub fn write_hf(&self, dir: &Path) {
        let s = &self.spec;
        let arch = if s.variant == Variant::Qwen2 { "qwen2" } else { "llama" };
        let mut cfg = serde_json::json!({
            "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": arch,
            "hidden_size": s.hidden, "intermediate_size": s.inter, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
            "rms_norm_eps": s.eps, "rope_theta": s.theta, "max_position_embeddings": 256,
            "tie_word_embeddings": s.tied,
        });
        if let Some((factor, low, high, orig)) = s.llama3() {
            cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": orig as usize});
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        self.write_shards(dir, 1);
    }

    /// Writes the weights as `shards` safetensors files plus `model.safetensors.index.json`
    /// (a single `model.safetensors` when `shards == 1`).
    pub fn write_shards(&self, dir: &Path, shards: usize) {
        let mut names: Vec<&String> = self.t.keys().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for shard in 0..shards {
            let file = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", shard + 1, shards)
            };
            let mine: Vec<&String> = names.iter().copied().skip(shard).step_by(shards).collect();
            let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = mine
                .iter()
                .map(|k| {
                    let (shape, v) = &self.t[*k];
                    ((*k).clone(), shape.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
                .iter()
                .map(|(k, shape, b)| {
                    (
                        k.clone(),
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).unwrap(),
                    )
                })
                .collect();
            std::fs::write(dir.join(&file), safetensors::tensor::serialize(views, None).unwrap()).unwrap();
            for k in mine {
                weight_map.insert(k.clone(), serde_json::Value::String(file.clone()));
            }
        }
        if shards > 1 {
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
    }

    /// Writes the same network as llama.cpp's converter would: GGUF names, q/k rows permuted
    /// into adjacent rotary pairs for llama, matrices stored as `ty`.
    pub fn write_gguf(&self, path: &Path, ty: TensorType) {
        let s = &self.spec;
        let hd = s.head_dim();
        let arch = if s.variant == Variant::Qwen2 { "qwen2" } else { "llama" };
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String(arch.into()))
            .meta(&format!("{arch}.block_count"), Value::U32(s.layers as u32))
            .meta(&format!("{arch}.context_length"), Value::U32(256))
            .meta(&format!("{arch}.embedding_length"), Value::U32(s.hidden as u32))
            .meta(&format!("{arch}.feed_forward_length"), Value::U32(s.inter as u32))
            .meta(&format!("{arch}.attention.head_count"), Value::U32(s.heads as u32))
            .meta(&format!("{arch}.attention.head_count_kv"), Value::U32(s.kv_heads as u32))
            .meta(&format!("{arch}.rope.freq_base"), Value::F32(s.theta as f32))
            .meta(&format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(s.eps as f32))
            .meta(&format!("{arch}.vocab_size"), Value::U32(s.vocab as u32))
            .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
            .meta("tokenizer.ggml.pre", Value::String("gpt2".into()))
            .meta("tokenizer.ggml.tokens", string_array(tiny_vocab()))
            .meta("tokenizer.ggml.merges", Value::Array(ValueType::String, vec![]))
            .meta("tokenizer.ggml.eos_token_id", Value::U32(93));
        let permute = |v: &[f32], n_head: usize, cols: usize| -> Vec<f32> {
            // HF row h*hd + s*(hd/2) + i  →  GGUF row h*hd + 2i + s.
            let mut out = vec![0f32; v.len()];
            for h in 0..n_head {
                for s_ in 0..2 {
                    for i in 0..hd / 2 {
                        let src = h * hd + s_ * hd / 2 + i;
                        let dst = h * hd + 2 * i + s_;
                        out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
                    }
                }
            }
            out
        };
        let add = |w: &mut GgufWriter, name: &str, shape: &[usize], v: &[f32], ty: TensorType| {
            let cols = *shape.last().unwrap();
            let data: Vec<u8> = v.chunks(cols).flat_map(|r| quantize_row(ty, r).unwrap()).collect();
            let ggml_shape: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            w.tensor(name, &ggml_shape, ty, data);
        };
        let (eshape, emb) = &self.t["model.embed_tokens.weight"];
        add(&mut w, "token_embd.weight", eshape, emb, ty);
        for l in 0..s.layers {
            let p = format!("model.layers.{l}.");
            let g = |n: &str| &self.t[&format!("{p}{n}")];
            let b = format!("blk.{l}.");
            add(
                &mut w,
                &format!("{b}attn_norm.weight"),
                &g("input_layernorm.weight").0,
                &g("input_layernorm.weight").1,
                TensorType::F32,
            );
            let (qs, q) = g("self_attn.q_proj.weight");
            let (ks, k) = g("self_attn.k_proj.weight");
            let (q, k) = if arch == "llama" {
                (permute(q, s.heads, s.hidden), permute(k, s.kv_heads, s.hidden))
            } else {
                (q.clone(), k.clone())
            };
            add(&mut w, &format!("{b}attn_q.weight"), qs, &q, ty);
            add(&mut w, &format!("{b}attn_k.weight"), ks, &k, ty);
            add(
                &mut w,
                &format!("{b}attn_v.weight"),
                &g("self_attn.v_proj.weight").0,
                &g("self_attn.v_proj.weight").1,
                ty,
            );
            add(
                &mut w,
                &format!("{b}attn_output.weight"),
                &g("self_attn.o_proj.weight").0,
                &g("self_attn.o_proj.weight").1,
                ty,
            );
            if s.variant == Variant::Qwen2 {
                for (hf, gg) in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")] {
                    let (shape, v) = g(&format!("self_attn.{hf}.bias"));
                    add(&mut w, &format!("{b}{gg}.bias"), shape, v, TensorType::F32);
                }
            }
            add(
                &mut w,
                &format!("{b}ffn_norm.weight"),
                &g("post_attention_layernorm.weight").0,
                &g("post_attention_layernorm.weight").1,
                TensorType::F32,
            );
            add(&mut w, &format!("{b}ffn_gate.weight"), &g("mlp.gate_proj.weight").0, &g("mlp.gate_proj.weight").1, ty);
            add(&mut w, &format!("{b}ffn_up.weight"), &g("mlp.up_proj.weight").0, &g("mlp.up_proj.weight").1, ty);
            add(&mut w, &format!("{b}ffn_down.weight"), &g("mlp.down_proj.weight").0, &g("mlp.down_proj.weight").1, ty);
        }
        add(&mut w, "output_norm.weight", &[s.hidden], self.get("model.norm.weight"), TensorType::F32);
        if !s.tied {
            add(&mut w, "output.weight", &[s.vocab, s.hidden], self.get("lm_head.weight"), ty);
        }
        if s.llama3().is_some() {
            // llama.cpp stores Llama-3 scaling as per-pair frequency divisors.
            let base: Vec<f64> = (0..hd / 2).map(|i| s.theta.powf(-((2 * i) as f64) / hd as f64)).collect();
            let factors: Vec<f32> = base.iter().zip(s.inv_freq()).map(|(b, f)| (b / f) as f32).collect();
            add(&mut w, "rope_freqs.weight", &[hd / 2], &factors, TensorType::F32);
        }
        std::fs::write(path, w.to_bytes()).unwrap();
    }

    /// Logits of every position of `tokens`, recomputed from scratch in f64.
    pub fn reference_logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let s = &self.spec;
        let (h, hd) = (s.hidden, s.head_dim());
        let group = s.heads / s.kv_heads;
        let inv_freq = s.inv_freq();
        let n = tokens.len();
        let w = |name: &str| -> Vec<f64> { self.get(name).iter().map(|&x| x as f64).collect() };
        let matvec = |m: &[f64], x: &[f64]| -> Vec<f64> {
            m.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
        };
        let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
            let r = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + s.eps).sqrt();
            x.iter().zip(g).map(|(v, g)| v / r * g).collect()
        };
        let rope = |x: &mut [f64], pos: usize| {
            for head in x.chunks_mut(hd) {
                for (i, f) in inv_freq.iter().enumerate() {
                    let (sin, cos) = (pos as f64 * f).sin_cos();
                    let (a, b) = (head[i], head[i + hd / 2]);
                    head[i] = a * cos - b * sin;
                    head[i + hd / 2] = a * sin + b * cos;
                }
            }
        };
        let emb = w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> =
            tokens.iter().map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        for l in 0..s.layers {
            let p = format!("model.layers.{l}.");
            let (wq, wk, wv, wo) = (
                w(&format!("{p}self_attn.q_proj.weight")),
                w(&format!("{p}self_attn.k_proj.weight")),
                w(&format!("{p}self_attn.v_proj.weight")),
                w(&format!("{p}self_attn.o_proj.weight")),
            );
            let bias = |n: &str, v: &mut Vec<f64>| {
                if s.variant == Variant::Qwen2 {
                    for (a, b) in v.iter_mut().zip(w(&format!("{p}self_attn.{n}.bias"))) {
                        *a += b;
                    }
                }
            };
            let g1 = w(&format!("{p}input_layernorm.weight"));
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let xn = rms(x, &g1);
                let mut q = matvec(&wq, &xn);
                let mut k = matvec(&wk, &xn);
                let mut v = matvec(&wv, &xn);
                bias("q_proj", &mut q);
                bias("k_proj", &mut k);
                bias("v_proj", &mut v);
                rope(&mut q, pos);
                rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for i in 0..n {
                let mut attn = vec![0f64; s.heads * hd];
                for head in 0..s.heads {
                    let kvh = head / group;
                    let q = &qs[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for d in 0..hd {
                            attn[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                        }
                    }
                }
                let o = matvec(&wo, &attn);
                for (a, b) in xs[i].iter_mut().zip(o) {
                    *a += b;
                }
            }
            let g2 = w(&format!("{p}post_attention_layernorm.weight"));
            let (wg, wu, wd) = (
                w(&format!("{p}mlp.gate_proj.weight")),
                w(&format!("{p}mlp.up_proj.weight")),
                w(&format!("{p}mlp.down_proj.weight")),
            );
            for x in xs.iter_mut() {
                let xn = rms(x, &g2);
                let gate = matvec(&wg, &xn);
                let up = matvec(&wu, &xn);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                for (a, b) in x.iter_mut().zip(matvec(&wd, &act)) {
                    *a += b;
                }
            }
        }
        let gn = w("model.norm.weight");
        let head = if s.tied { w("model.embed_tokens.weight") } else { w("lm_head.weight") };
        xs.iter().map(|x| matvec(&head, &rms(x, &gn))).collect()
    }
}

/// A 96-token byte-level vocabulary: printable ASCII (`!`..`~`, ids 0..94) plus space `Ġ`
/// (94) and newline `Ċ` (95), written the way GPT-2 byte-level BPE writes them.
pub fn tiny_vocab() -> Vec<String> {
    let mut v: Vec<String> = (b'!'..=b'~').map(|b| (b as char).to_string()).collect();
    v.push("\u{120}".into());
    v.push("\u{10a}".into());
    v
}

/// `tokenizer.json` for [`tiny_vocab`]: byte-level BPE with no merges.
pub fn tiny_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        tiny_vocab().into_iter().enumerate().map(|(i, t)| (t, serde_json::json!(i))).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []},
    })
    .to_string()
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let num = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    num / den
}
