//! A small, defensive GGUF (v2/v3) reader: header, metadata key/values of every type, tensor
//! infos, alignment, and dequantization of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to `f32`.
//!
//! The file is memory-mapped (or held in memory, for tests). Every count and length read from the
//! file is checked against the bytes that remain before anything is allocated, so a truncated,
//! oversized or inconsistent file yields a one-line [`Error`], never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use super::{Error, Result};

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays we accept (GGUF files in the wild use 1).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// The bytes of a GGUF file: memory-mapped, or owned (tests, small files).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_file(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and private to this process. Its contents may change if
    // another process modifies the file while it is mapped; we document that a model file must
    // not be modified while Tessera runs (as llama.cpp does). All reads go through bounds-checked
    // slices, so a concurrent truncation can at worst raise SIGBUS, never read out of bounds.
    unsafe { memmap2::Mmap::map(file) }
}

/// A metadata value type (GGUF `gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes in the file.
    fn min_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
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

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (from F32 or F64).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

/// A ggml tensor element type. Types we can read the layout of but not dequantize are kept as
/// `Other` so that a file that merely contains them still opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    /// Another ggml type: its id, block size (elements) and block bytes, when known.
    Other {
        id: u32,
        block: u64,
        bytes: u64,
    },
}

impl GgmlType {
    fn from_u32(id: u32) -> Option<Self> {
        // (block elements, block bytes) from ggml.c's type_traits.
        let (block, bytes) = match id {
            0 => return Some(Self::F32),
            1 => return Some(Self::F16),
            2 => return Some(Self::Q4_0),
            3 => return Some(Self::Q4_1),
            8 => return Some(Self::Q8_0),
            30 => return Some(Self::BF16),
            6 => (32, 22),   // Q5_0
            7 => (32, 24),   // Q5_1
            9 => (32, 36),   // Q8_1
            10 => (256, 84), // Q2_K
            11 => (256, 110),
            12 => (256, 144), // Q4_K
            13 => (256, 176),
            14 => (256, 210), // Q6_K
            15 => (256, 292),
            16 => (256, 66),
            17 => (256, 74),
            18 => (256, 98),
            19 => (256, 50),
            20 => (32, 18),
            21 => (256, 110),
            22 => (256, 82),
            23 => (256, 136),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            29 => (256, 56),
            34 => (256, 54),
            35 => (256, 66),
            39 => (32, 17),
            _ => return None,
        };
        Some(Self::Other { id, block, bytes })
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Other { block, .. } => block,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Other { bytes, .. } => bytes,
        }
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
            Self::Other { id, .. } => id,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("F32"),
            Self::F16 => f.write_str("F16"),
            Self::BF16 => f.write_str("BF16"),
            Self::Q4_0 => f.write_str("Q4_0"),
            Self::Q4_1 => f.write_str("Q4_1"),
            Self::Q8_0 => f.write_str("Q8_0"),
            Self::Other { id, .. } => write!(f, "ggml type {id}"),
        }
    }
}

/// One tensor's description. `dims[0]` is the fastest-varying (contiguous) dimension, as in ggml.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened GGUF file.
pub struct Gguf {
    bytes: Bytes,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order of keys is not kept; keys are unique (duplicates are an error).
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("file_bytes", &self.bytes.as_slice().len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::new(format!(
                "truncated GGUF file: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let n = n as usize; // n <= remaining, which fits in usize
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::new(format!("bad GGUF file: {what} is not valid UTF-8")))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what remains.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<usize> {
        let need = count.checked_mul(min_size);
        match need {
            Some(need) if need <= self.remaining() => Ok(count as usize),
            _ => Err(Error::new(format!(
                "bad GGUF file: {what} count {count} at offset {} cannot fit in the {} bytes left",
                self.pos,
                self.remaining()
            ))),
        }
    }

    fn value(&mut self, ty: ValueType, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(what)?),
            ValueType::I8 => Value::I8(self.u8(what)? as i8),
            ValueType::U16 => Value::U16(self.u16(what)?),
            ValueType::I16 => Value::I16(self.u16(what)? as i16),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(self.u32(what)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(self.u64(what)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(what)?)),
            ValueType::Bool => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::new(format!(
                        "bad GGUF file: {what} has bool byte {b} (must be 0 or 1)"
                    )))
                }
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::new(format!(
                        "bad GGUF file: {what} nests arrays deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let raw = self.u32(what)?;
                let ety = ValueType::from_u32(raw).ok_or_else(|| {
                    Error::new(format!(
                        "bad GGUF file: {what} has unknown array type {raw}"
                    ))
                })?;
                let count = self.u64(what)?;
                let n = self.check_count(count, ety.min_size(), what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(ety, items)
            }
        })
    }
}

impl Gguf {
    /// Opens and parses `path` (memory-mapped).
    pub fn open(path: &Path) -> Result<Gguf> {
        let shown = path.display();
        let file = std::fs::File::open(path)
            .map_err(|e| Error::new(format!("cannot open {shown}: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| Error::new(format!("cannot stat {shown}: {e}")))?
            .len();
        if len == 0 {
            return Err(Error::new(format!("{shown}: empty file, not a GGUF model")));
        }
        let map = map_file(&file).map_err(|e| Error::new(format!("cannot map {shown}: {e}")))?;
        Self::parse(Bytes::Mapped(map)).map_err(|e| Error::new(format!("{shown}: {e}")))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Gguf> {
        let buf = bytes.as_slice();
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::new(format!(
                "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
                magic.to_le_bytes()
            )));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::new(format!(
                "unsupported GGUF version {version} (only 2 and 3 are read)"
            )));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each KV is at least a key length (8) + a type (4) + one byte; each tensor info at least
        // a name length (8) + n_dims (4) + type (4) + offset (8).
        let n_kv = c.check_count(n_kv, 13, "metadata")?;
        let n_tensors = c.check_count(n_tensors, 24, "tensor")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let raw = c.u32(&format!("type of metadata {key:?}"))?;
            let ty = ValueType::from_u32(raw).ok_or_else(|| {
                Error::new(format!(
                    "bad GGUF file: metadata {key:?} has unknown type {raw}"
                ))
            })?;
            let v = c.value(ty, &format!("metadata {key:?}"), 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(Error::new(format!(
                    "bad GGUF file: metadata key {key:?} appears twice"
                )));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::new(format!(
                        "bad GGUF file: general.alignment {v:?} is not a power of two <= 1 MiB"
                    )))
                }
            },
        };

        let mut infos = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&format!("tensor {name:?} n_dims"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::new(format!(
                    "bad GGUF file: tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("tensor {name:?} dims"))?);
            }
            let raw = c.u32(&format!("tensor {name:?} type"))?;
            let ty = GgmlType::from_u32(raw).ok_or_else(|| {
                Error::new(format!(
                    "bad GGUF file: tensor {name:?} has unknown ggml type {raw}"
                ))
            })?;
            let rel = c.u64(&format!("tensor {name:?} offset"))?;
            infos.push((name, dims, ty, rel));
        }
        let data_offset = align_up(c.pos as u64, alignment)
            .ok_or_else(|| Error::new("bad GGUF file: data offset overflows".to_string()))?;
        let file_len = buf.len() as u64;
        // A file with no tensors may end right after the header, without padding.
        if !infos.is_empty() && data_offset > file_len {
            return Err(Error::new(format!(
                "truncated GGUF file: tensor data should start at {data_offset} but the file has {file_len} bytes"
            )));
        }

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(infos.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, ty, rel) in infos {
            if !names.insert(name.clone()) {
                return Err(Error::new(format!(
                    "bad GGUF file: tensor {name:?} appears twice"
                )));
            }
            if !dims[0].is_multiple_of(ty.block_size()) {
                return Err(Error::new(format!(
                    "bad GGUF file: tensor {name:?} row length {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_size()
                )));
            }
            let size = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .and_then(|n| (n / ty.block_size()).checked_mul(ty.block_bytes()))
                .ok_or_else(|| {
                    Error::new(format!(
                        "bad GGUF file: tensor {name:?} dims {dims:?} overflow a 64-bit size"
                    ))
                })?;
            if !rel.is_multiple_of(alignment) {
                return Err(Error::new(format!(
                    "bad GGUF file: tensor {name:?} offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let offset = data_offset.checked_add(rel);
            let end = offset.and_then(|o| o.checked_add(size));
            match (offset, end) {
                (Some(offset), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name,
                    dims,
                    ty,
                    offset,
                    size,
                }),
                _ => {
                    return Err(Error::new(format!(
                        "truncated GGUF file: tensor {name:?} data ({size} bytes at data offset {rel}) runs past the end of the {file_len}-byte file"
                    )))
                }
            }
        }

        Ok(Gguf {
            bytes,
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
        })
    }

    /// Metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Required unsigned integer metadata.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        match self.metadata.get(key) {
            None => Err(Error::new(format!("GGUF metadata {key:?} is missing"))),
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::new(format!(
                    "GGUF metadata {key:?} should be an unsigned integer, is {v:?}"
                ))
            }),
        }
    }

    /// Required float metadata.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.metadata.get(key) {
            None => Err(Error::new(format!("GGUF metadata {key:?} is missing"))),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::new(format!("GGUF metadata {key:?} should be a float, is {v:?}"))
            }),
        }
    }

    /// Required string metadata.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.metadata.get(key) {
            None => Err(Error::new(format!("GGUF metadata {key:?} is missing"))),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::new(format!("GGUF metadata {key:?} should be a string"))),
        }
    }

    /// Required array-of-strings metadata.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| Error::new(format!("GGUF metadata {key:?} is missing")))?;
        let arr = v
            .as_array()
            .ok_or_else(|| Error::new(format!("GGUF metadata {key:?} should be an array")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| Error::new(format!("GGUF metadata {key:?} should hold strings")))
            })
            .collect()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let buf = self.bytes.as_slice();
        // offset + size <= file length was checked in `parse`.
        let start = usize::try_from(t.offset)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let end = usize::try_from(t.offset + t.size)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        &buf[start..end]
    }

    /// Dequantizes tensor `name` to f32, checking it has the expected `dims`.
    pub fn tensor_f32(&self, name: &str, dims: &[u64]) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| Error::new(format!("GGUF tensor {name:?} is missing")))?;
        if t.dims != dims {
            return Err(Error::new(format!(
                "GGUF tensor {name:?} has dims {:?}, expected {dims:?}",
                t.dims
            )));
        }
        dequantize(t.ty, self.tensor_bytes(t), t.n_elements())
            .map_err(|e| Error::new(format!("tensor {name:?}: {e}")))
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// IEEE half to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = (u32::from(h) & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = u32::from(h & 0x3ff);
    let bits = match exp {
        0 => {
            if man == 0 {
                sign
            } else {
                // Subnormal: value = man * 2^-24.
                let v = man as f32 * (1.0 / 16_777_216.0);
                return if sign != 0 { -v } else { v };
            }
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        e => sign | ((u32::from(e) + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE half, round to nearest even (used by writers and tests).
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

/// Dequantizes `n` elements of type `ty` from `data` (which must hold exactly those elements).
pub fn dequantize(ty: GgmlType, data: &[u8], n: u64) -> Result<Vec<f32>> {
    let bs = ty.block_size();
    if !n.is_multiple_of(bs) {
        return Err(Error::new(format!(
            "{n} elements is not a whole number of {ty} blocks"
        )));
    }
    let expect = n / bs * ty.block_bytes();
    if data.len() as u64 != expect {
        return Err(Error::new(format!(
            "{ty} data has {} bytes, expected {expect}",
            data.len()
        )));
    }
    let n = n as usize; // <= data.len() * 8, fits
    let mut out = Vec::with_capacity(n);
    let h = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|b| h(b, 0))),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        ),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = h(b, 0);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = h(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| (f32::from(q & 0xf) - 8.0) * d));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(20) {
                let d = h(b, 0);
                let m = h(b, 2);
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0xf) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Other { .. } => {
            return Err(Error::new(format!(
                "cannot dequantize {ty} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
            )))
        }
    }
    Ok(out)
}
