//! A tiny GGUF writer for the runtime tests (v3, little-endian), and quantizers for the block
//! formats the reader dequantizes.
#![allow(dead_code)]

use std::sync::Arc;

use tessera::runtime::gguf::f32_to_f16;
use tessera::runtime::model::{Layer, LlamaConfig, Model};
use tessera::runtime::ops::{KvKind, Linear};
use tessera_golden::numerics::Datapath;

/// A metadata value to write.
#[derive(Debug, Clone)]
pub enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements.
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    pub fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    pub fn str(s: &str) -> V {
        V::Str(s.to_string())
    }

    pub fn strs<S: AsRef<str>>(items: &[S]) -> V {
        V::Arr(8, items.iter().map(|s| V::str(s.as_ref())).collect())
    }
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn put_value(out: &mut Vec<u8>, v: &V) {
    match v {
        V::U8(x) => out.push(*x),
        V::I8(x) => out.push(*x as u8),
        V::U16(x) => out.extend(x.to_le_bytes()),
        V::I16(x) => out.extend(x.to_le_bytes()),
        V::U32(x) => out.extend(x.to_le_bytes()),
        V::I32(x) => out.extend(x.to_le_bytes()),
        V::F32(x) => out.extend(x.to_le_bytes()),
        V::Bool(x) => out.push(u8::from(*x)),
        V::Str(s) => put_str(out, s),
        V::Arr(t, items) => {
            out.extend(t.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        V::U64(x) => out.extend(x.to_le_bytes()),
        V::I64(x) => out.extend(x.to_le_bytes()),
        V::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// A tensor to write: name, dims (ggml order, fastest first), ggml type id, raw data.
#[derive(Debug, Clone)]
pub struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

impl T {
    pub fn f32(name: &str, dims: &[u64], x: &[f32]) -> T {
        T {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty: 0,
            data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Writes a GGUF v3 image with `alignment` (None: default 32, no metadata key).
pub fn write_gguf(kv: &[(&str, V)], tensors: &[T], alignment: Option<u32>) -> Vec<u8> {
    let align = u64::from(alignment.unwrap_or(32));
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    let n_kv = kv.len() + usize::from(alignment.is_some());
    out.extend((n_kv as u64).to_le_bytes());
    if let Some(a) = alignment {
        put_str(&mut out, "general.alignment");
        out.extend(4u32.to_le_bytes());
        out.extend(a.to_le_bytes());
    }
    for (k, v) in kv {
        put_str(&mut out, k);
        out.extend(v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(align) * align;
    }
    if !tensors.is_empty() {
        while !(out.len() as u64).is_multiple_of(align) {
            out.push(0);
        }
    }
    let base = out.len() as u64;
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize((base + off) as usize, 0);
        out.extend(&t.data);
    }
    out
}

fn f16b(x: f32) -> [u8; 2] {
    f32_to_f16(x).to_le_bytes()
}

/// Q8_0 blocks of `x` (length a multiple of 32), as ggml's quantize_row_q8_0_ref.
pub fn quant_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16b(d));
        out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Q4_1 blocks of `x`, as ggml's quantize_row_q4_1_ref.
pub fn quant_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let min = b.iter().copied().fold(f32::INFINITY, f32::min);
        let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16b(d));
        out.extend(f16b(min));
        for j in 0..16 {
            let q0 = (((b[j] - min) * id + 0.5) as u8).min(15);
            let q1 = (((b[j + 16] - min) * id + 0.5) as u8).min(15);
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// A deterministic pseudo-random f32 stream in [-1, 1).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// The engine datapath of the random-model tests: small KV groups, so that a sequence of a few
/// tens of tokens has several 4-bit key/value groups and an 8-bit window.
pub const DP_SMALL_KV: Datapath = Datapath {
    w_group_len: 32,
    w_scale_bits: 16,
    acc_bits: 48,
    kv_group_len: 4,
    kv_recent_window: 8,
};

/// A random model: `n_head` query heads of 16 over `n_kv` KV heads, context `ctx`.
pub fn tiny_model(seed: u64, n_head: usize, n_kv: usize, ctx: usize) -> Model {
    let (ff, hd, vocab) = (112, 16, 50);
    let d = n_head * hd;
    let cfg = LlamaConfig {
        n_layer: 2,
        d_model: d,
        n_ff: ff,
        n_head,
        n_head_kv: n_kv,
        head_dim: hd,
        vocab,
        ctx_len: ctx,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
    };
    let mut r = Rng(seed);
    let kvd = n_kv * hd;
    let lin = |r: &mut Rng, n_in: usize, n_out: usize| {
        Linear::f32(Arc::new(r.vec(n_in * n_out, 0.25)), n_in, n_out)
    };
    let norm = |r: &mut Rng| {
        (0..d)
            .map(|_| 1.0 + 0.2 * r.next_f32())
            .collect::<Vec<f32>>()
    };
    let embed = Arc::new(r.vec(vocab * d, 1.0));
    let layers = (0..2)
        .map(|_| Layer {
            attn_norm: norm(&mut r),
            wq: lin(&mut r, d, d),
            wk: lin(&mut r, d, kvd),
            wv: lin(&mut r, d, kvd),
            wo: lin(&mut r, d, d),
            ffn_norm: norm(&mut r),
            w_gate: lin(&mut r, d, ff),
            w_up: lin(&mut r, d, ff),
            w_down: lin(&mut r, ff, d),
        })
        .collect();
    Model {
        cfg,
        embed: embed.clone(),
        layers,
        out_norm: norm(&mut r),
        output: Linear::f32(embed, d, vocab),
        kv: KvKind::F32,
    }
}
