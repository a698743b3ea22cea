//! Model loading and the forward pass.
//!
//! [`Model`] opens a GGUF file or a Hugging Face directory, validates every tensor it will
//! touch against the config, and runs batches through [`llama`].

pub mod llama;

use std::path::{Path, PathBuf};

use crate::EngineError;
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::{Format, TensorStore};

pub use llama::{LogitsMode, Model, SeqInput};

/// A model on disk, opened: its config, its tensors and its tokenizer.
#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// A short name for the model, from its metadata or directory.
    pub name: String,
}

/// Which format a path holds: a GGUF file, or a directory with `config.json`.
pub fn detect_format(path: &Path) -> Result<Format, EngineError> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return Ok(Format::HuggingFace);
        }
        return Err(EngineError::io(path, "directory has no config.json (expected a Hugging Face model)"));
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).map_err(|e| EngineError::io(path, e))?;
    if &magic == b"GGUF" {
        Ok(Format::Gguf)
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        Ok(Format::HuggingFace)
    } else {
        Err(EngineError::io(path, "neither a GGUF file nor a Hugging Face model directory"))
    }
}

/// Opens a model and its tokenizer from `path`.
pub fn load(path: &Path) -> Result<Loaded, EngineError> {
    match detect_format(path)? {
        Format::Gguf => {
            let file = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&file)?;
            let store = TensorStore::from_gguf(&file)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            let name = file
                .get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| file_stem(path));
            let model = Model::new(config, store)?;
            Ok(Loaded { model, tokenizer, name })
        }
        Format::HuggingFace => {
            let dir: PathBuf =
                if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(path).to_path_buf() };
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
            let config = ModelConfig::from_hf_json(&text)?;
            let store = TensorStore::from_hf_dir(&dir)?;
            let tokenizer = Tokenizer::from_hf_dir(&dir)?;
            let model = Model::new(config, store)?;
            Ok(Loaded { model, tokenizer, name: file_stem(&dir) })
        }
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}
