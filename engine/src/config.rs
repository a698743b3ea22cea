//! The model's hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use serde::Deserialize;

use crate::EngineError;
use crate::gguf::GgufFile;

/// The Llama-family layouts tandem runs. They share one forward pass; they differ in
/// projection biases and in how their files lay out rotary pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2, TinyLlama.
    Llama,
    Mistral,
    /// Qwen2-family: biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self, EngineError> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(EngineError::UnsupportedArch(other.to_string())),
        }
    }
}

/// Llama-3's frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position: f64,
}

impl Llama3Scaling {
    /// Per-pair divisors of the inverse frequencies (what GGUF stores as `rope_freqs`).
    pub fn freq_factors(&self, rot_dim: usize, base: f64) -> Vec<f32> {
        let low_wavelen = self.original_max_position / self.low_freq_factor;
        let high_wavelen = self.original_max_position / self.high_freq_factor;
        (0..rot_dim / 2)
            .map(|i| {
                let freq = base.powf(-2.0 * i as f64 / rot_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor as f32
                } else {
                    let smooth = (self.original_max_position / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    let scaled = (1.0 - smooth) * freq / self.factor + smooth * freq;
                    (freq / scaled) as f32
                }
            })
            .collect()
    }
}

/// How positions are stretched for rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by the factor.
    Linear(f64),
    Llama3(Llama3Scaling),
}

/// Everything about the network's shape that the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dimensions rotated per head.
    pub rope_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub context_length: usize,
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Rejects shapes the forward pass cannot run, naming the field.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &str, why: String| Err(EngineError::BadConfig { field: field.to_string(), why });
        for (field, v) in [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if v == 0 || v > 1 << 24 {
                return bad(field, format!("{v} is out of range"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("n_kv_heads", format!("{} does not divide n_heads {}", self.n_kv_heads, self.n_heads));
        }
        if self.rope_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad("rope_dim", format!("{} must be even and at most head_dim {}", self.rope_dim, self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad("rope_theta", format!("{} must be a finite number above 1", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad("rms_eps", format!("{} must be in (0, 1)", self.rms_eps));
        }
        Ok(())
    }

    /// Reads `{arch}.*` keys as llama.cpp's converter writes them.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let arch_name = str_key(file, "general.architecture")?;
        let arch = Arch::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_heads = usize_key(file, &key("attention.head_count"))?;
        let hidden = usize_key(file, &key("embedding_length"))?;
        let head_dim = opt_usize(file, &key("attention.key_length"))?.unwrap_or(hidden / n_heads.max(1));
        let vocab_size = match opt_usize(file, &key("vocab_size"))? {
            Some(v) => v,
            None => file
                .tensor_info("token_embd.weight")
                .and_then(|t| t.shape.get(1).copied())
                .ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))? as usize,
        };
        let rope_scaling = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear(f64_key(file, &key("rope.scaling.factor"))?),
            Some(other) => {
                return Err(EngineError::Unsupported(format!("RoPE scaling type {other:?}")));
            }
        };
        let cfg = ModelConfig {
            arch,
            hidden,
            intermediate: usize_key(file, &key("feed_forward_length"))?,
            n_layers: usize_key(file, &key("block_count"))?,
            n_heads,
            n_kv_heads: opt_usize(file, &key("attention.head_count_kv"))?.unwrap_or(n_heads),
            head_dim,
            rope_dim: opt_usize(file, &key("rope.dimension_count"))?.unwrap_or(head_dim),
            vocab_size,
            rms_eps: f64_key(file, &key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_theta: match file.get(&key("rope.freq_base")) {
                Some(v) => v.as_f64().ok_or_else(|| wrong(&key("rope.freq_base"), "a number"))?,
                None => 10000.0,
            },
            rope_scaling,
            context_length: opt_usize(file, &key("context_length"))?.unwrap_or(2048),
            qkv_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, EngineError> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::BadConfig { field: "config.json".into(), why: e.to_string() })?;
        let arch = match (&c.model_type, c.architectures.first()) {
            (Some(t), _) => Arch::parse(t)?,
            (None, Some(a)) => Arch::parse(a)?,
            (None, None) => {
                return Err(EngineError::UnsupportedArch("(config.json names no model_type)".into()));
            }
        };
        if c.mlp_bias {
            return Err(EngineError::Unsupported("MLP biases (mlp_bias: true)".into()));
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let rope_scaling = match &c.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("default") | None => RopeScaling::None,
                Some("linear") => RopeScaling::Linear(s.factor.unwrap_or(1.0)),
                Some("llama3") => RopeScaling::Llama3(Llama3Scaling {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position: s.original_max_position_embeddings.unwrap_or(8192) as f64,
                }),
                Some(other) => {
                    return Err(EngineError::Unsupported(format!("RoPE scaling type {other:?}")));
                }
            },
        };
        let cfg = ModelConfig {
            arch,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            n_layers: c.num_hidden_layers,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            rope_dim: head_dim,
            vocab_size: c.vocab_size,
            rms_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: c.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            context_length: c.max_position_embeddings.unwrap_or(2048),
            qkv_bias: arch == Arch::Qwen2 || c.attention_bias,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

fn wrong(key: &str, expected: &'static str) -> EngineError {
    EngineError::BadConfig { field: key.to_string(), why: format!("expected {expected}") }
}

fn str_key<'a>(file: &'a GgufFile, key: &str) -> Result<&'a str, EngineError> {
    file.get(key)
        .ok_or_else(|| EngineError::BadConfig { field: key.into(), why: "missing".into() })?
        .as_str()
        .ok_or_else(|| wrong(key, "a string"))
}

fn opt_usize(file: &GgufFile, key: &str) -> Result<Option<usize>, EngineError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| wrong(key, "a non-negative integer")),
    }
}

fn usize_key(file: &GgufFile, key: &str) -> Result<usize, EngineError> {
    opt_usize(file, key)?.ok_or_else(|| EngineError::BadConfig { field: key.into(), why: "missing".into() })
}

fn f64_key(file: &GgufFile, key: &str) -> Result<f64, EngineError> {
    file.get(key)
        .ok_or_else(|| EngineError::BadConfig { field: key.into(), why: "missing".into() })?
        .as_f64()
        .ok_or_else(|| wrong(key, "a number"))
}
