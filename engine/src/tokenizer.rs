//! Text ↔ token ids, built on Hugging Face's `tokenizers` so ids match the model's reference
//! tokenizer.
//!
//! A Hugging Face directory brings its own `tokenizer.json`. A GGUF file carries the vocabulary,
//! merges and token types in metadata plus the *name* of its pre-tokenizer
//! (`tokenizer.ggml.pre`); [`Tokenizer::from_gguf`] rebuilds the equivalent `tokenizer.json`
//! (byte-level BPE, the named split regex, special tokens) and hands it to the same library,
//! so both formats run one tokenizer implementation.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use serde_json::{Value as Json, json};

use crate::EngineError;
use crate::chat::ChatTemplate;
use crate::gguf::{GgufFile, Value};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Texts of special tokens that end a turn in common chat formats; a model whose metadata
/// names only one EOS still stops on these.
const END_OF_GENERATION: &[&str] =
    &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|end_of_text|>"];

/// A model's tokenizer, its special ids and its chat template.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by [`Tokenizer::encode`] when the model asks for it and the tokenizer itself
    /// does not (GGUF); `None` when the tokenizer handles BOS itself or the model has none.
    manual_bos: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Rebuilds the tokenizer a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Tokenizer(m);
        let model = file.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("(none)");
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" is); \
                 use the model's Hugging Face directory with tokenizer.json instead"
            )));
        }
        let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let tokens: Vec<&str> = str_array(file, "tokenizer.ggml.tokens")?;
        let merges: Vec<&str> = str_array(file, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| err("tokenizer.ggml.token_type is not an array".into()))?
                .iter()
                .map(|t| t.as_i64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }

        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.entry(tok.to_string()).or_insert(json!(id));
            if *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
        let merges: Vec<Json> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').ok_or_else(|| err(format!("merge {m:?} has no space")))?;
                Ok(json!([a, b]))
            })
            .collect::<Result<_, EngineError>>()?;
        let (pre_tokenizer, normalizer, ignore_merges) = pre_tokenizer_for(pre)?;
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges,
            },
        });
        let inner = tokenizers::Tokenizer::from_str(&doc.to_string()).map_err(|e| err(e.to_string()))?;

        let id_key =
            |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let bos = id_key("tokenizer.ggml.bos_token_id");
        let add_bos = file.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        let mut eos_ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
                .iter()
                .filter_map(|k| id_key(k))
                .collect();
        for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TOKEN_TYPE_CONTROL && END_OF_GENERATION.contains(tok) {
                eos_ids.push(id as u32);
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let bos_token = bos.map(|b| tokens[b as usize].to_string());
        let eos_token = id_key("tokenizer.ggml.eos_token_id").map(|e| tokens[e as usize].to_string());
        let chat_template = match file.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(src) => Some(ChatTemplate::new(src, bos_token.clone(), eos_token.clone())?),
            None => None,
        };
        Ok(Self { inner, manual_bos: bos.filter(|_| add_bos), bos_token, eos_token, eos_ids, chat_template })
    }

    /// Loads `tokenizer.json`, with special tokens and the chat template from
    /// `tokenizer_config.json` and EOS ids from `generation_config.json` where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: Json = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let special = |k: &str| match cfg.get(k) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        };
        let bos_token = special("bos_token");
        let eos_token = special("eos_token");
        let mut eos_ids: Vec<u32> = eos_token.iter().filter_map(|t| inner.token_to_id(t)).collect();
        if let Some(gen_cfg) = read_json(&dir.join("generation_config.json"))? {
            match gen_cfg.get("eos_token_id") {
                Some(Json::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Json::Array(a)) => eos_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let template = match cfg.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: the "default" one serves plain chat.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match template {
            Some(src) => Some(ChatTemplate::new(&src, bos_token.clone(), eos_token.clone())?),
            None => None,
        };
        Ok(Self { inner, manual_bos: None, bos_token, eos_token, eos_ids, chat_template })
    }

    /// Token ids of `text`. Special tokens written in the text become their ids.
    /// `add_special` adds BOS (and whatever the tokenizer's post-processor adds) as the model
    /// expects for a raw prompt; pass `false` for text a chat template already rendered.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special {
            ids.extend(self.manual_bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        self.inner.decode(ids, skip_special).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Byte-level BPE splits multi-byte characters across tokens. Each step decodes a short
/// window of recent ids twice (without and with the new id) and emits only the new suffix,
/// and only once it no longer ends in a replacement character: a character that spans tokens
/// comes out whole, once its last byte arrives. Decoding a window (not single tokens) also
/// keeps decoder rules such as SentencePiece's leading-space strip from firing mid-text.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self { skip_special, ..Self::default() }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, EngineError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(delta) = full.get(prefix.len()..)
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(delta.to_string()));
        }
        Ok(None)
    }

    /// Whatever is still held back at the end of the stream (an incomplete character becomes
    /// U+FFFD here, and only here).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>, EngineError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).filter(|s| !s.is_empty()).map(str::to_string))
    }
}

/// The pre-tokenizer (and normalizer, and whether whole-word vocab hits skip merging) that a
/// `tokenizer.ggml.pre` name stands for, as in each model's own `tokenizer.json`.
fn pre_tokenizer_for(pre: &str) -> Result<(Json, Json, bool), EngineError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level(true), Json::Null, false),
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            Json::Null,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => {
            (json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]}), Json::Null, true)
        }
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
            json!({"type": "NFC"}),
            false,
        ),
        other => {
            return Err(EngineError::Tokenizer(format!(
                "GGUF pre-tokenizer {other:?} is not supported (default, gpt2, smollm, starcoder, llama3, qwen2 are)"
            )));
        }
    })
}

fn str_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, EngineError> {
    let v = file.get(key).ok_or_else(|| EngineError::Tokenizer(format!("{key} is missing")))?;
    v.as_array()
        .ok_or_else(|| EngineError::Tokenizer(format!("{key} is not an array")))?
        .iter()
        .map(|s| s.as_str().ok_or_else(|| EngineError::Tokenizer(format!("{key} holds a non-string"))))
        .collect()
}

fn read_json(path: &Path) -> Result<Option<Json>, EngineError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(path, e)),
    }
}

/// Ids by token text, for tests and tools.
pub fn vocab_map(tok: &Tokenizer) -> HashMap<String, u32> {
    tok.inner.get_vocab(true)
}
