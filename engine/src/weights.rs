//! Where tensors live: named byte ranges of memory-mapped model files.
//!
//! The forward pass holds [`TensorRef`]s (which map, which bytes, what layout) instead of
//! borrowed slices, so the model can own its maps without self-references, and the weights are
//! never copied out of the page cache.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use tandem_kernels::{TensorType, WeightMatrix};

use crate::EngineError;
use crate::gguf::GgufFile;

/// Which convention the file follows; it decides name mapping and RoPE pair layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gguf,
    HuggingFace,
}

/// A tensor in row-major `rows × cols` form (1-D tensors are one row).
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub name: String,
    pub map: usize,
    pub range: Range<usize>,
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
}

/// The maps of one model and the index of the tensors in them.
#[derive(Debug)]
pub struct TensorStore {
    pub format: Format,
    maps: Vec<Arc<Mmap>>,
    index: HashMap<String, TensorRef>,
}

impl TensorStore {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, EngineError> {
        let mut index = HashMap::new();
        for t in &file.header.tensors {
            let (cols, rows) = match t.shape.as_slice() {
                [n] => (*n, 1),
                [c, r] => (*c, *r),
                [c, r, rest @ ..] if rest.iter().all(|d| *d == 1) => (*c, *r),
                _ => {
                    // Only 1-D and 2-D tensors take part in a Llama forward pass; keep others
                    // out of the index so asking for one is a clear "missing" error.
                    continue;
                }
            };
            let range = match t.len {
                Some(_) => file.tensor_range(&t.name)?,
                None => 0..0,
            };
            index.insert(
                t.name.clone(),
                TensorRef { name: t.name.clone(), map: 0, range, ty: t.ty, rows: rows as usize, cols: cols as usize },
            );
        }
        Ok(Self { format: Format::Gguf, maps: vec![file.map().clone()], index })
    }

    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, EngineError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::SafeTensors { path: index_path.display().to_string(), why: e.to_string() })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| EngineError::SafeTensors {
                path: index_path.display().to_string(),
                why: "no \"weight_map\" object".into(),
            })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(EngineError::SafeTensors {
                        path: index_path.display().to_string(),
                        why: format!("shard name {f:?} leaves the model directory"),
                    });
                }
            }
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let file = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: read-only private map; see `GgufFile::open` for the truncation contract.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let bad = |why: String| EngineError::SafeTensors { path: path.display().to_string(), why };
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let ty = match info.dtype {
                    safetensors::Dtype::F32 => TensorType::F32,
                    safetensors::Dtype::F16 => TensorType::F16,
                    safetensors::Dtype::BF16 => TensorType::BF16,
                    other => {
                        return Err(EngineError::BadTensor { name, why: format!("dtype {other:?} is not supported") });
                    }
                };
                let (rows, cols) = match info.shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    _ => continue,
                };
                let (s, e) = info.data_offsets;
                let range = base + s..base + e;
                if range.end > map.len() || (e - s) != rows * cols * if ty == TensorType::F32 { 4 } else { 2 } {
                    return Err(bad(format!("tensor {name:?} has a byte range that does not match its shape")));
                }
                index.insert(name.clone(), TensorRef { name: name.clone(), map: i, range, ty, rows, cols });
            }
            maps.push(Arc::new(map));
        }
        Ok(Self { format: Format::HuggingFace, maps, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<&TensorRef, EngineError> {
        let t = self.index.get(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        if !t.ty.is_supported() {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("tensor type {} has no CPU kernel", t.ty),
            });
        }
        Ok(t)
    }

    /// A `rows × cols` matrix, checking the shape the architecture expects.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<TensorRef, EngineError> {
        let t = self.get(name)?;
        if (t.rows, t.cols) != (rows, cols) {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("shape {}x{} where the config implies {rows}x{cols}", t.rows, t.cols),
            });
        }
        Ok(t.clone())
    }

    /// A small vector (norm weight, bias) expanded to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.get(name)?;
        if t.rows * t.cols != len {
            return Err(EngineError::BadTensor {
                name: name.into(),
                why: format!("{} elements where the config implies {len}", t.rows * t.cols),
            });
        }
        let mut out = vec![0f32; len];
        let w = WeightMatrix::new(t.ty, 1, len, self.bytes(t))?;
        w.dequantize_row(0, &mut out)?;
        Ok(out)
    }

    pub fn bytes(&self, t: &TensorRef) -> &[u8] {
        &self.maps[t.map][t.range.clone()]
    }

    /// A kernel view of a matrix; its length was checked when the store was built.
    pub fn weight(&self, t: &TensorRef) -> Result<WeightMatrix<'_>, EngineError> {
        Ok(WeightMatrix::new(t.ty, t.rows, t.cols, self.bytes(t))?)
    }
}
