//! GGUF, llama.cpp's single-file model format: metadata key/values, tensor infos, then
//! aligned tensor data.
//!
//! Parsing never trusts a count, length or offset from the file: every one is checked
//! against the bytes that remain before anything is allocated or read, so a truncated,
//! bit-flipped or lying file gives a [`GgufError`] that says where it went wrong. Tensor data is
//! not copied; [`GgufFile`] hands out slices of the memory map.

mod value;
mod write;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use tandem_kernels::TensorType;

pub use value::{Value, ValueType};
pub use write::{GgufWriter, string_array};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Data section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nested arrays deeper than this are refused, so a crafted file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// What is wrong with a GGUF file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file: magic bytes are {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("file truncated: {what} needs {needed} bytes at offset {offset}, only {available} remain")]
    Truncated { what: String, offset: usize, needed: u64, available: usize },
    #[error("{what}: count {count} cannot fit in the {available} bytes that remain")]
    ImpossibleCount { what: String, count: u64, available: usize },
    #[error("metadata key {key:?}: unknown value type id {id}")]
    UnknownValueType { key: String, id: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    NestedTooDeep { key: String },
    #[error("{what}: string is not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("general.alignment must be a power of two, got {0}")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {dims} dimensions (at most {MAX_DIMS})")]
    TooManyDims { name: String, dims: u32 },
    #[error("tensor {name:?}: shape {shape:?} is empty or too large")]
    BadShape { name: String, shape: Vec<u64> },
    #[error("tensor {name:?}: unknown tensor type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: {ty} rows of {cols} elements are not whole blocks")]
    RaggedTensor { name: String, ty: TensorType, cols: u64 },
    #[error("tensor {name:?}: offset {offset} is not aligned to {alignment}")]
    MisalignedTensor { name: String, offset: u64, alignment: u64 },
    #[error("tensor {name:?}: bytes {start}..{end} lie past the end of the data section ({len} bytes)")]
    TensorOutOfBounds { name: String, start: u64, end: u64, len: u64 },
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType { key: String, expected: &'static str, found: String },
    #[error("metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
}

/// One tensor's description; `offset` is relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `shape[0]` is the innermost (contiguous) dimension.
    pub shape: Vec<u64>,
    pub ty: TensorType,
    pub offset: u64,
    /// Byte length, known for every type tandem can compute with.
    pub len: Option<u64>,
}

impl TensorInfo {
    /// Elements in the tensor.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The parsed header of a GGUF file: everything but the tensor bytes.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts in the file.
    pub data_offset: u64,
    pub alignment: u64,
}

/// A GGUF file mapped into memory.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub header: GgufHeader,
    map: Arc<Mmap>,
    by_name: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |e: std::io::Error| GgufError::Io { path: path.display().to_string(), message: e.to_string() };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // the file while it is mapped would fault on access; that is the accepted contract of
        // serving weights from a file (llama.cpp and safetensors do the same).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_map(Arc::new(map))
    }

    /// Parses an existing map.
    pub fn from_map(map: Arc<Mmap>) -> Result<Self, GgufError> {
        let header = parse_header(&map)?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self { header, map, by_name })
    }

    /// The memory map, so that weights can borrow from it for the model's lifetime.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// Absolute byte range of a tensor in the file. Only tensors of supported types have one.
    pub fn tensor_range(&self, name: &str) -> Result<std::ops::Range<usize>, GgufError> {
        let t = self.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let len = t.len.ok_or_else(|| GgufError::WrongType {
            key: name.to_string(),
            expected: "a tensor type with a CPU kernel",
            found: t.ty.to_string(),
        })?;
        let start = (self.header.data_offset + t.offset) as usize;
        Ok(start..start + len as usize)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }
}

/// Parses everything before the tensor data and checks every tensor against the file size.
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic: [u8; 4] = r.take("magic", 4)?.try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("version")?;
    if version.swap_bytes() <= 3 && version > 3 {
        return Err(GgufError::BigEndian);
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
    // 8 + 4 + 8 + 4 + 8.
    r.check_count("metadata count", n_kv, 13)?;
    r.check_count("tensor count", n_tensors, 32)?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&format!("type of {key:?}"))?;
        let value = r.value(&key, ty, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v.as_u64().ok_or_else(|| GgufError::WrongType {
            key: "general.alignment".into(),
            expected: "an unsigned integer",
            found: v.type_name(),
        })?,
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(alignment));
    }

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&format!("tensor {name:?} dimension count"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, dims: n_dims });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            shape.push(r.u64(&format!("tensor {name:?} shape"))?);
        }
        let type_id = r.u32(&format!("tensor {name:?} type"))?;
        let offset = r.u64(&format!("tensor {name:?} offset"))?;
        let ty = TensorType::from_ggml_id(type_id)
            .ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), id: type_id })?;
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|_| d > 0));
        if shape.is_empty() || elements.is_none_or(|e| e > 1 << 40) {
            return Err(GgufError::BadShape { name, shape });
        }
        let len = match ty.layout() {
            None => None,
            Some((block, bytes)) => {
                if shape[0] % block as u64 != 0 {
                    return Err(GgufError::RaggedTensor { name, ty, cols: shape[0] });
                }
                elements.map(|e| e / block as u64 * bytes as u64)
            }
        };
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor { name, offset, alignment });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo { name, shape, ty, offset, len });
    }

    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_offset);
    for t in &tensors {
        if let Some(len) = t.len {
            let end = t.offset.saturating_add(len);
            if end > data_len {
                return Err(GgufError::TensorOutOfBounds { name: t.name.clone(), start: t.offset, end, len: data_len });
            }
        }
    }
    Ok(GgufHeader { version, metadata, tensors, data_offset, alignment })
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, what: &str, n: u64) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn check_count(&self, what: &str, count: u64, min_each: u64) -> Result<(), GgufError> {
        if count.saturating_mul(min_each) > self.remaining() as u64 {
            return Err(GgufError::ImpossibleCount { what: what.to_string(), count, available: self.remaining() });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(what, N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let raw = self.take(what, len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what.to_string() })
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Value, GgufError> {
        let vt = ValueType::from_id(ty).ok_or_else(|| GgufError::UnknownValueType { key: key.to_string(), id: ty })?;
        Ok(match vt {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(self.u32(key)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::WrongType {
                        key: key.to_string(),
                        expected: "a bool (0 or 1)",
                        found: format!("byte {b}"),
                    });
                }
            },
            ValueType::String => Value::String(self.string(&format!("metadata key {key:?}"))?),
            ValueType::U64 => Value::U64(self.u64(key)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestedTooDeep { key: key.to_string() });
                }
                let elem_ty = self.u32(key)?;
                let elem = ValueType::from_id(elem_ty)
                    .ok_or_else(|| GgufError::UnknownValueType { key: key.to_string(), id: elem_ty })?;
                let n = self.u64(key)?;
                self.check_count(&format!("array {key:?}"), n, elem.min_size())?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, elem_ty, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

#[cfg(test)]
mod tests;
