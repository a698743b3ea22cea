//! tandem's model engine: model files, tokenizer, chat templates and the Llama-family
//! forward pass over a paged KV cache.
//!
//! What this crate is: everything needed to turn token ids into logits on one process, for
//! any batch mixing prefill chunks and decode steps. What it is not: a server. Scheduling
//! across requests, the network and HTTP live in the node and router crates; the arithmetic
//! lives in `tandem-kernels`.

pub mod block_manager;
pub mod chat;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use kv::{BlockPool, KvCache, KvDtype};
pub use model::{LogitsMode, Model, SeqInput};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

use tandem_kernels::KernelError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("model architecture {0:?} is not supported (llama, mistral and qwen2 are)")]
    UnsupportedArch(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("config {field}: {why}")]
    BadConfig { field: String, why: String },
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("tensor {name:?}: {why}")]
    BadTensor { name: String, why: String },
    #[error("safetensors file {path}: {why}")]
    SafeTensors { path: String, why: String },
    #[error("cannot read {path}: {why}")]
    Io { path: String, why: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("batch: {0}")]
    BadBatch(String),
    #[error("KV cache out of blocks: needed {needed}, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence of {len} tokens exceeds the context length {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("request needs {len} KV positions but the whole KV pool holds {capacity}")]
    KvCapacity { len: usize, capacity: usize },
}

impl EngineError {
    pub(crate) fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        EngineError::Io { path: path.display().to_string(), why: e.to_string() }
    }
}
