//! GGUF reader: header, metadata, tensor infos and tensor bytes, with every field checked.
//!
//! Contract: [`GgufFile::open`] parses the header and tensor table of a GGUF v2/v3 file and
//! never trusts a count or a length it reads: each is bounded by what is left in the file
//! before anything is allocated, so a forged header yields a [`GgufError`] naming the file and
//! the field, not a panic or a multi-GB allocation. Tensor bytes are read on demand with
//! [`GgufFile::tensor_bytes`] (positional reads, no mmap: the caller repacks them into its own
//! layout, and page-cache pages are not charged to the process' RSS).
//!
//! [`GgufFile::from_bytes`] parses a GGUF held in memory (a vocabulary built in-process, a test
//! fixture) with the same parser and the same checks; its errors name the label it was given
//! in place of a path, so the same bytes fail with the same message either way.
//!
//! Layout reference: ggml's `docs/gguf.md` — magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count, metadata key/values, tensor infos, padding to `general.alignment`
//! (default 32), then tensor data. Dimensions are in ggml order: `dims[0]` is the innermost
//! (contiguous) one, so a `[out, in]` weight matrix is stored as `dims = [in, out]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub mod quants;
mod types;
pub use types::GgmlType;

/// Largest single string we accept (chat templates are a few KB; token strings are tiny).
const MAX_STRING_BYTES: u64 = 16 << 20;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a GGUF file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}. Check the path, or run `ferrolm pull` to install the default model")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\"). ferrolm loads GGUF models; convert others with llama.cpp's convert_hf_to_gguf.py")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated at byte {offset} while reading {field}: the file is incomplete, download it again")]
    Truncated {
        path: PathBuf,
        field: String,
        offset: u64,
    },
    #[error("{path}: invalid {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("{path}: tensor `{name}` not found")]
    MissingTensor { path: PathBuf, name: String },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type that fits in a u64 (GGUF writers differ on u32 vs i32 vs u64).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is contiguous.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the tensor data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor table; tensor data stays on disk until asked for.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub file_len: u64,
    storage: Storage,
}

/// Where the tensor data of a [`GgufFile`] lives.
enum Storage {
    /// On disk, read on demand with positional reads.
    File(File),
    /// In memory: the whole file, as given to [`GgufFile::from_bytes`].
    Memory(Vec<u8>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::File(file) => f.debug_tuple("File").field(file).finish(),
            Storage::Memory(b) => write!(f, "Memory({} bytes)", b.len()),
        }
    }
}

/// What the parser found before the tensor data: everything of a [`GgufFile`] but its storage.
struct Header {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// Bounded reader: knows the file length, so every length it reads is checked against what
/// is left before anything is allocated. Generic over the source so that a file and a buffer
/// go through exactly the same checks.
struct Reader<'a, R: Read> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Reader<'_, R> {
    fn truncated(&self, field: &str) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_owned(),
            field: field.to_owned(),
            offset: self.pos,
        }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N], GgufError> {
        if self.len - self.pos < N as u64 {
            return Err(self.truncated(field));
        }
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => self.truncated(field),
                _ => GgufError::Io {
                    path: self.path.to_owned(),
                    source: e,
                },
            })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, field: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(field)?))
    }

    /// A count of items each taking at least `min_item_bytes` in the file.
    fn count(&mut self, field: &str, min_item_bytes: u64) -> Result<u64, GgufError> {
        let n = self.u64(field)?;
        let left = self.len - self.pos;
        if n.saturating_mul(min_item_bytes) > left {
            return Err(self.invalid(
                field,
                format!("count {n} cannot fit in the {left} bytes left in the file (corrupt or truncated header)"),
            ));
        }
        Ok(n)
    }

    fn string(&mut self, field: &str) -> Result<String, GgufError> {
        let n = self.u64(field)?;
        if n > MAX_STRING_BYTES {
            return Err(self.invalid(
                field,
                format!("string length {n} exceeds the {MAX_STRING_BYTES}-byte limit"),
            ));
        }
        if n > self.len - self.pos {
            return Err(self.truncated(field));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| GgufError::Io {
            path: self.path.to_owned(),
            source: e,
        })?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| self.invalid(field, "string is not valid UTF-8"))
    }

    fn value(&mut self, field: &str, type_id: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.bytes(field)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(field)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(field)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(field)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(field)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(field)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(field)?)),
            7 => match u8::from_le_bytes(self.bytes(field)?) {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.invalid(field, format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(field)?),
            9 => {
                if depth > 0 {
                    return Err(self.invalid(field, "nested arrays are not supported"));
                }
                let elem_type = self.u32(field)?;
                let min_size = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.invalid(field, format!("unknown array element type {t}"))),
                };
                let n = self.count(field, min_size)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(field, elem_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(field)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(field)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(field)?)),
            t => return Err(self.invalid(field, format!("unknown metadata value type {t}"))),
        })
    }
}

/// Parse everything up to the tensor data: magic, version, metadata, tensor infos. Every
/// tensor's data range is checked to lie inside the `r.len` bytes of the file.
fn parse<R: Read>(mut r: Reader<'_, R>) -> Result<Header, GgufError> {
    let len = r.len;
    let magic: [u8; 4] = r.bytes("magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic {
            path: r.path.to_owned(),
            found: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion {
            path: r.path.to_owned(),
            version,
        });
    }
    // A tensor info takes at least 8 (name len) + 4 (n_dims) + 8 (one dim) + 4 + 8 bytes.
    let n_tensors = r.count("tensor_count", 32)?;
    // A key/value takes at least 8 (key len) + 4 (type) + 1 byte.
    let n_kv = r.count("metadata_kv_count", 13)?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let type_id = r.u32(&format!("metadata `{key}` type"))?;
        let value = r.value(&format!("metadata `{key}`"), type_id, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(r.invalid(
                    "general.alignment",
                    format!("{v:?} is not a power of two up to 1 MiB"),
                ))
            }
        },
    };

    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor #{i} name"))?;
        let field = |what: &str| format!("tensor `{name}` {what}");
        let n_dims = r.u32(&field("n_dims"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.invalid(
                &field("n_dims"),
                format!("{n_dims} is outside 1..={MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&field("dims"))?);
        }
        let type_id = r.u32(&field("type"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            r.invalid(
                &field("type"),
                format!(
                    "unknown or unsupported ggml type id {type_id} (supported: F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)"
                ),
            )
        })?;
        let rel_offset = r.u64(&field("offset"))?;
        infos.push((name, dims, ggml_type, rel_offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;

    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, ggml_type, rel_offset) in infos {
        let bad = |reason: String| GgufError::Invalid {
            path: r.path.to_owned(),
            field: format!("tensor `{name}`"),
            reason,
        };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        if dims[0] % ggml_type.block_size() != 0 {
            return Err(bad(format!(
                "rows of {} values cannot be stored as {:?}, whose blocks hold {} (K-quants need \
                 rows of a multiple of 256, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 a multiple of 32; F32, F16 \
                 and BF16 any length: llama-quantize falls back to one of those for such a \
                 tensor; requantize the file with it)",
                dims[0],
                ggml_type,
                ggml_type.block_size()
            )));
        }
        let n_bytes = (n_elements / ggml_type.block_size())
            .checked_mul(ggml_type.block_bytes())
            .ok_or_else(|| bad("byte size overflows".into()))?;
        if rel_offset % alignment != 0 {
            return Err(bad(format!(
                "offset {rel_offset} is not aligned to {alignment}"
            )));
        }
        let offset = data_start
            .checked_add(rel_offset)
            .ok_or_else(|| bad("offset overflows".into()))?;
        let end = offset
            .checked_add(n_bytes)
            .ok_or_else(|| bad("offset + size overflows".into()))?;
        if end > len {
            return Err(bad(format!(
                "data [{offset}, {end}) runs past the end of the file ({len} bytes): the file is truncated, download it again"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        });
    }
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
    })
}

impl GgufFile {
    /// Parse the header and tensor table of `path`, checking every field.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_owned();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(GgufError::Invalid {
                path,
                field: "path".into(),
                reason: "is a directory, expected a .gguf file".into(),
            });
        }
        let len = meta.len();
        let header = parse(Reader {
            inner: BufReader::with_capacity(1 << 16, &file),
            pos: 0,
            len,
            path: &path,
        })?;
        Ok(Self::assemble(path, header, len, Storage::File(file)))
    }

    /// Parse a whole GGUF file held in memory, with the same checks as [`GgufFile::open`].
    /// `label` stands for the path in errors and in [`GgufFile::path`] (nothing is read
    /// from it); [`GgufFile::tensor_bytes`] copies out of `bytes`.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        let path = label.into();
        let len = bytes.len() as u64;
        let header = parse(Reader {
            inner: bytes.as_slice(),
            pos: 0,
            len,
            path: &path,
        })?;
        Ok(Self::assemble(path, header, len, Storage::Memory(bytes)))
    }

    fn assemble(path: PathBuf, h: Header, file_len: u64, storage: Storage) -> Self {
        GgufFile {
            path,
            version: h.version,
            alignment: h.alignment,
            metadata: h.metadata,
            tensors: h.tensors,
            file_len,
            storage,
        }
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_owned(),
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    /// Read one tensor's raw bytes (in its ggml block layout).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        match &self.storage {
            Storage::File(file) => {
                let mut buf = vec![0u8; info.n_bytes as usize];
                file.read_exact_at(&mut buf, info.offset).map_err(io)?;
                Ok(buf)
            }
            Storage::Memory(bytes) => {
                // `info` may come from another file: bound it by this buffer, never panic.
                let range = usize::try_from(info.offset)
                    .ok()
                    .zip(usize::try_from(info.n_bytes).ok())
                    .and_then(|(start, n)| Some(start..start.checked_add(n)?));
                match range.and_then(|r| bytes.get(r)) {
                    Some(b) => Ok(b.to_vec()),
                    None => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                }
            }
        }
    }

    /// Total bytes of tensor data.
    pub fn tensor_data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    // ---- typed metadata accessors -------------------------------------------------------

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    fn wrong(&self, key: &str, v: &Value, expected: &'static str) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_owned(),
            found: v.type_name(),
            expected,
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.wrong(key, v, "string")),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, v, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, v, "number"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, v, "bool")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(self.wrong(key, v, "array of strings")),
                })
                .collect(),
            v => Err(self.wrong(key, v, "array of strings")),
        }
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match *v {
                    Value::I64(x) => Ok(x),
                    _ => v
                        .as_u64()
                        .map(|x| x as i64)
                        .or(match *v {
                            Value::I32(x) => Some(x.into()),
                            Value::I16(x) => Some(x.into()),
                            Value::I8(x) => Some(x.into()),
                            _ => None,
                        })
                        .ok_or_else(|| self.wrong(key, v, "array of integers")),
                })
                .collect(),
            v => Err(self.wrong(key, v, "array of integers")),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| self.wrong(key, v, "array of numbers"))
                })
                .collect(),
            v => Err(self.wrong(key, v, "array of numbers")),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }
}

pub mod writer;
