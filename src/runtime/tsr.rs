//! The `.tsr` file: a model quantized for the engine (written by `tessera quantize`, read by
//! `tessera run/ppl/compare --model FILE.tsr`).
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! b"TSR1\0\0\0\0"  u64 header_len  header (JSON, serde)  data
//! ```
//!
//! The header names the scheme, the engine datapath the weights were quantized for, the
//! quantization method, the bits per weight, and one entry per blob of `data` (offset from the
//! start of `data`, length, sha256). Blobs: `host`, a GGUF image holding the source model's
//! metadata (config, tokenizer, chat template) and the tensors that stay on the host (token
//! embedding, norms) in their source types; then one blob per linear layer in the engine layout
//! of docs/numerics.md N11: packed codes, `gscale` (u16 per group), `zero_u8` (u8 per group),
//! `row_scale` (f32 per row), concatenated. Every blob is checked against its sha256 on load.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_golden::numerics::Datapath;
use tessera_golden::pack::packed_row_bytes;
use tessera_golden::quant::{QuantWeights, WeightFormat};

use super::engine::Mode;
use super::gguf::{Gguf, Value};
use super::model::Model;
use super::ops::{EngineLinear, Linear};
use super::tokenizer::Tokenizer;
use super::{Error, Result};

pub const TSR_MAGIC: &[u8; 8] = b"TSR1\0\0\0\0";
/// Largest header accepted (a bound before allocating).
const MAX_HEADER: u64 = 64 << 20;

/// The engine datapath, as stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathJson {
    pub w_group_len: usize,
    pub w_scale_bits: u32,
    pub acc_bits: u32,
    pub kv_group_len: usize,
    pub kv_recent_window: usize,
}

impl From<Datapath> for DatapathJson {
    fn from(d: Datapath) -> Self {
        DatapathJson {
            w_group_len: d.w_group_len,
            w_scale_bits: d.w_scale_bits,
            acc_bits: d.acc_bits,
            kv_group_len: d.kv_group_len,
            kv_recent_window: d.kv_recent_window,
        }
    }
}

impl From<DatapathJson> for Datapath {
    fn from(d: DatapathJson) -> Self {
        Datapath {
            w_group_len: d.w_group_len,
            w_scale_bits: d.w_scale_bits,
            acc_bits: d.acc_bits,
            kv_group_len: d.kv_group_len,
            kv_recent_window: d.kv_recent_window,
        }
    }
}

/// One blob of the data section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

/// One quantized linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    /// Weight bits: 2, 4 or 8.
    pub bits: u32,
    pub n_rows: usize,
    pub k: usize,
    pub blob: Blob,
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// `w2a8kv4` or `w8a8kv8`.
    pub scheme: String,
    /// How the weights were quantized (e.g. `rtn`, `gptq`).
    pub method: String,
    pub datapath: DatapathJson,
    /// Average bits per linear-layer weight, output head excluded (codes with padding, gscale
    /// 16 bits and zero point 8 bits per group, row scale 32 bits per row).
    pub bits_per_weight: f64,
    /// The same with the output head included.
    pub bits_per_weight_with_head: f64,
    pub host: Blob,
    pub tensors: Vec<TensorEntry>,
}

/// Storage bits of a quantized tensor (see [`Header::bits_per_weight`]).
pub fn tensor_bits(w: &QuantWeights) -> u64 {
    let groups = (w.n_rows() * w.groups_per_row()) as u64;
    8 * w.packed().len() as u64 + groups * (16 + 8) + 32 * w.n_rows() as u64
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bits_format(bits: u32) -> Result<WeightFormat> {
    super::engine::format_of_bits(bits)
}

/// Serializes a quantized tensor's blob.
fn tensor_blob(w: &QuantWeights) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.packed().len() + 3 * w.gscale_q().len() + 4 * w.n_rows());
    out.extend_from_slice(w.packed());
    for m in w.gscale_q() {
        out.extend_from_slice(&m.to_le_bytes());
    }
    out.extend_from_slice(w.zero_u8());
    for s in w.row_scale() {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

fn parse_tensor_blob(e: &TensorEntry, dp: &Datapath, bytes: &[u8]) -> Result<QuantWeights> {
    let format = bits_format(e.bits)?;
    if e.n_rows == 0 || e.k == 0 || e.n_rows > 1 << 24 || e.k > 1 << 24 || dp.w_group_len == 0 {
        return Err(Error::new(format!("tensor {}: bad shape", e.name)));
    }
    let packed_len = e.n_rows * packed_row_bytes(e.k, dp.w_group_len, format);
    let groups = e.n_rows * e.k.div_ceil(dp.w_group_len);
    let want = packed_len + 3 * groups + 4 * e.n_rows;
    if bytes.len() != want {
        return Err(Error::new(format!(
            "tensor {}: {} bytes, expected {want} for its shape",
            e.name,
            bytes.len()
        )));
    }
    let (packed, rest) = bytes.split_at(packed_len);
    let (gs, rest) = rest.split_at(2 * groups);
    let (zero, rs) = rest.split_at(groups);
    let gscale: Vec<u16> = gs
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let row_scale: Vec<f32> = rs
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    QuantWeights::from_packed(
        format,
        e.n_rows,
        e.k,
        dp.w_group_len,
        dp.w_scale_bits,
        packed.to_vec(),
        gscale,
        zero.to_vec(),
        row_scale,
    )
    .map_err(|err| Error::new(format!("tensor {}: {err}", e.name)))
}

// ---- a minimal GGUF writer for the host blob ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(..) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn elem_type_id(t: super::gguf::ValueType) -> u32 {
    use super::gguf::ValueType as T;
    match t {
        T::U8 => 0,
        T::I8 => 1,
        T::U16 => 2,
        T::I16 => 3,
        T::U32 => 4,
        T::I32 => 5,
        T::F32 => 6,
        T::Bool => 7,
        T::String => 8,
        T::Array => 9,
        T::U64 => 10,
        T::I64 => 11,
        T::F64 => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(t, items) => {
            out.extend_from_slice(&elem_type_id(*t).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// A GGUF v3 image with all of `g`'s metadata and the tensors `keep` selects, copied raw.
pub fn host_gguf(g: &Gguf, keep: impl Fn(&str) -> bool) -> Vec<u8> {
    let align = g.alignment;
    let tensors: Vec<_> = g.tensors.iter().filter(|t| keep(&t.name)).collect();
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(g.metadata.len() as u64).to_le_bytes());
    for (k, v) in &g.metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&value_type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut rel = 0u64;
    let mut offsets = Vec::new();
    for t in &tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&rel.to_le_bytes());
        offsets.push(rel);
        rel = (rel + t.size).div_ceil(align) * align;
    }
    let pad = |out: &mut Vec<u8>| {
        while !(out.len() as u64).is_multiple_of(align) {
            out.push(0);
        }
    };
    pad(&mut out);
    let data0 = out.len() as u64;
    for (t, off) in tensors.iter().zip(offsets) {
        while (out.len() as u64) < data0 + off {
            out.push(0);
        }
        out.extend_from_slice(g.tensor_bytes(t));
    }
    pad(&mut out);
    out
}

/// Is `path` a .tsr file (by its magic)?
pub fn is_tsr(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == TSR_MAGIC
}

/// Writes a .tsr: `host` (a GGUF image) and the named quantized tensors.
pub fn write(
    path: &Path,
    mode: Mode,
    method: &str,
    dp: &Datapath,
    host: &[u8],
    tensors: &[(String, Arc<QuantWeights>)],
) -> Result<Header> {
    let mut data: Vec<u8> = Vec::new();
    let mut push = |bytes: &[u8]| -> Blob {
        let b = Blob {
            offset: data.len() as u64,
            len: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        };
        data.extend_from_slice(bytes);
        b
    };
    let host_blob = push(host);
    let (mut bits, mut n_w, mut bits_all, mut n_all) = (0u64, 0u64, 0u64, 0u64);
    let mut entries = Vec::new();
    for (name, w) in tensors {
        if w.k_group_len() != dp.w_group_len || w.w_scale_bits() != dp.w_scale_bits {
            return Err(Error::new(format!(
                "tensor {name}: quantized for another datapath"
            )));
        }
        let tb = tensor_bits(w);
        let n = (w.n_rows() * w.k()) as u64;
        bits_all += tb;
        n_all += n;
        if name != "output" {
            bits += tb;
            n_w += n;
        }
        entries.push(TensorEntry {
            name: name.clone(),
            bits: w.format().bits(),
            n_rows: w.n_rows(),
            k: w.k(),
            blob: push(&tensor_blob(w)),
        });
    }
    let header = Header {
        format: "tessera-tsr".to_string(),
        version: 1,
        scheme: mode.name().to_string(),
        method: method.to_string(),
        datapath: (*dp).into(),
        bits_per_weight: bits as f64 / n_w.max(1) as f64,
        bits_per_weight_with_head: bits_all as f64 / n_all.max(1) as f64,
        host: host_blob,
        tensors: entries,
    };
    let json = serde_json::to_vec(&header).map_err(|e| Error::new(format!("header: {e}")))?;
    let io = |e: std::io::Error| Error::new(format!("cannot write {}: {e}", path.display()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(TSR_MAGIC).map_err(io)?;
    f.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&json).map_err(io)?;
    f.write_all(&data).map_err(io)?;
    f.flush().map_err(io)?;
    Ok(header)
}

/// A parsed .tsr: header, host GGUF and the named quantized tensors in file order.
pub type TsrContents = (Header, Gguf, Vec<(String, QuantWeights)>);

/// Reads and checks a .tsr: the header, the host GGUF and every tensor (sha256 verified).
pub fn read(path: &Path) -> Result<TsrContents> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| Error::new(format!("cannot read {shown}: {e}")))?;
    parse(&bytes).map_err(|e| Error::new(format!("{shown}: {e}")))
}

/// Parses a .tsr image (see [`read`]).
pub fn parse(bytes: &[u8]) -> Result<TsrContents> {
    if bytes.len() < 16 || &bytes[..8] != TSR_MAGIC {
        return Err(Error::new(
            "not a .tsr file (bad magic or shorter than 16 bytes)",
        ));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[8..16]);
    let hlen = u64::from_le_bytes(len8);
    if hlen > MAX_HEADER || 16 + hlen > bytes.len() as u64 {
        return Err(Error::new(format!(
            "truncated .tsr file: header of {hlen} bytes does not fit the {}-byte file",
            bytes.len()
        )));
    }
    let hend = 16 + hlen as usize;
    let header: Header = serde_json::from_slice(&bytes[16..hend])
        .map_err(|e| Error::new(format!("bad .tsr header: {e}")))?;
    if header.format != "tessera-tsr" || header.version != 1 {
        return Err(Error::new(format!(
            "unsupported .tsr format {:?} version {}",
            header.format, header.version
        )));
    }
    let data = &bytes[hend..];
    let blob = |name: &str, b: &Blob| -> Result<&[u8]> {
        let end = b
            .offset
            .checked_add(b.len)
            .filter(|&e| e <= data.len() as u64);
        let Some(end) = end else {
            return Err(Error::new(format!(
                "truncated .tsr file: {name} ({} bytes at {}) runs past the end of the data ({} bytes)",
                b.len,
                b.offset,
                data.len()
            )));
        };
        let s = &data[b.offset as usize..end as usize];
        if sha256_hex(s) != b.sha256 {
            return Err(Error::new(format!(
                "checksum mismatch in tensor {name}: the .tsr file is corrupted"
            )));
        }
        Ok(s)
    };
    let host = Gguf::from_bytes(blob("host", &header.host)?.to_vec())
        .map_err(|e| Error::new(format!("host GGUF: {e}")))?;
    let dp: Datapath = header.datapath.into();
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for e in &header.tensors {
        let w = parse_tensor_blob(e, &dp, blob(&e.name, &e.blob)?)?;
        tensors.push((e.name.clone(), w));
    }
    Ok((header, host, tensors))
}

/// Loads a .tsr as a model in its scheme's mode (engine layers, the scheme's KV cache).
pub fn load(path: &Path) -> Result<(Model, Tokenizer, Mode)> {
    let (header, host, tensors) = read(path)?;
    let shown = path.display();
    let mode = Mode::from_name(&header.scheme)
        .filter(|m| *m != Mode::F32)
        .ok_or_else(|| Error::new(format!("{shown}: unknown scheme {:?}", header.scheme)))?;
    let dp: Datapath = header.datapath.into();
    let tok = Tokenizer::from_gguf(&host).map_err(|e| Error::new(format!("{shown}: {e}")))?;
    let mut map: std::collections::HashMap<String, QuantWeights> = tensors.into_iter().collect();
    let model = Model::from_gguf_with(
        &host,
        |_, _| {},
        |name, n_in, n_out| match map.remove(name) {
            None => Ok(None),
            Some(w) => {
                if w.k() != n_in || w.n_rows() != n_out {
                    return Err(Error::new(format!(
                        "tensor {name} is {}x{}, the model needs {n_out}x{n_in}",
                        w.n_rows(),
                        w.k()
                    )));
                }
                Ok(Some(Linear::Engine(EngineLinear::new(Arc::new(w), dp)?)))
            }
        },
    )
    .map_err(|e| Error::new(format!("{shown}: {e}")))?;
    Ok((model, tok, mode))
}
