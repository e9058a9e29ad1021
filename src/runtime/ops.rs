//! The engine operations of the forward pass, each behind one enum so that a quantized mode
//! (w8a8kv8, w2a8kv4, calling `tessera-golden`'s integer ops) can add a variant without touching
//! the model code:
//!
//! - [`Linear`]: every weight matrix product `y = W x` (Q, K, V, O, gate, up, down, output head);
//! - [`KvCache`]: the key/value store of one layer and the two attention products, `q . K^T`
//!   ([`KvCache::scores`]) and `p . V` ([`KvCache::weighted_sum`]).
//!
//! Variants: `F32` (the reference: dequantized weights, float everything) and `Engine` /
//! `Golden` (the engine's integer arithmetic, computed by `tessera-golden`: a weight operation is
//! N5 + N12-N14 + N20 of docs/numerics.md, an attention product N16-N20). The engine variants
//! call golden's functions row by row (in parallel over output rows, with the codes unpacked once
//! at load), so their results are those of `golden::ops::weight_op` exactly (tested).

use std::sync::Arc;

use rayon::prelude::*;
use tessera_golden::kv::{quantize_probs, KvCache as GoldenKvCache};
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::{
    accumulate_groups, dequant_factor, group_partial_sums, weight_frac_bits, OutputStage,
};
use tessera_golden::quant::{quantize_token, quantize_tokens, QuantWeights};

use super::{Error, Result};

/// Output rows computed per parallel task.
const ROW_BLOCK: usize = 64;

/// A dense f32 matrix of `n_out` rows by `n_in` columns, row-major (a GGUF weight dequantized).
#[derive(Debug, Clone)]
pub struct DenseF32 {
    pub w: Arc<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
}

/// A quantized weight matrix run on the engine's integer datapath (golden model).
#[derive(Debug, Clone)]
pub struct EngineLinear {
    pub w: Arc<QuantWeights>,
    /// `w.codes()`, unpacked once (`[n][k]`).
    codes: Arc<Vec<u8>>,
    pub dp: Datapath,
}

impl EngineLinear {
    /// Checks that `w` matches the datapath (group length, scale width) and unpacks its codes.
    pub fn new(w: Arc<QuantWeights>, dp: Datapath) -> Result<EngineLinear> {
        if w.k_group_len() != dp.w_group_len || w.w_scale_bits() != dp.w_scale_bits {
            return Err(Error::new(format!(
                "weights quantized with group {} / scale bits {} but the engine datapath has group {} / scale bits {}",
                w.k_group_len(),
                w.w_scale_bits(),
                dp.w_group_len,
                dp.w_scale_bits
            )));
        }
        if !(tessera_golden::ops::ACC_BITS_MIN..=tessera_golden::ops::ACC_BITS_MAX)
            .contains(&dp.acc_bits)
        {
            return Err(Error::new(format!(
                "acc_bits {} not in 32..=48",
                dp.acc_bits
            )));
        }
        if w.k() > OutputStage::K_MAX_LATTICE_I32 {
            return Err(Error::new(format!(
                "k = {} too large for the i32 output stage",
                w.k()
            )));
        }
        let codes = Arc::new(w.codes());
        Ok(EngineLinear { w, codes, dp })
    }

    /// The engine outputs `y[t][n]` (N12-N14 with `OutputStage::weight_lattice_i32`) of
    /// activation codes `x_i8` (`[t][k]`), computed with golden's functions, rows in parallel.
    pub fn forward_int(&self, x_i8: &[i8], n_tok: usize) -> Vec<i64> {
        let w = &*self.w;
        let (k, n_out) = (w.k(), w.n_rows());
        assert_eq!(x_i8.len(), n_tok * k, "activation codes size");
        let groups = w.groups_per_row();
        let sf = w.scale_frac_bits();
        let stage = OutputStage::weight_lattice_i32(sf);
        // Transposed: [n][t], one task per block of output rows.
        let mut yt = vec![0i64; n_out * n_tok];
        yt.par_chunks_mut(n_tok).enumerate().for_each(|(row, ys)| {
            let codes_row = &self.codes[row * k..(row + 1) * k];
            let gscale = &w.gscale_q()[row * groups..(row + 1) * groups];
            for (t, yv) in ys.iter_mut().enumerate() {
                let sums = group_partial_sums(w, row, codes_row, &x_i8[t * k..(t + 1) * k]);
                *yv = stage.apply(accumulate_groups(gscale, &sums, sf, self.dp.acc_bits));
            }
        });
        let mut y = vec![0i64; n_tok * n_out];
        for o in 0..n_out {
            for t in 0..n_tok {
                y[t * n_out + o] = yt[o * n_tok + t];
            }
        }
        y
    }

    /// N5 on each token, the engine operation, N20 dequantization (as
    /// `golden::ops::dequantize_weight_op`). A non-finite activation gives NaN outputs.
    pub fn forward(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        let w = &*self.w;
        let (k, n_out) = (w.k(), w.n_rows());
        assert_eq!(y.len(), n_tok * n_out, "matmul output size");
        let Ok(acts) = quantize_tokens(x, n_tok, k) else {
            y.fill(f32::NAN);
            return;
        };
        let yi = self.forward_int(&acts.codes_i8, n_tok);
        let stage = OutputStage::weight_lattice_i32(w.scale_frac_bits());
        let frac = weight_frac_bits(w);
        for t in 0..n_tok {
            for o in 0..n_out {
                let factor = dequant_factor(&stage, acts.scale_x[t], w.row_scale()[o], frac);
                y[t * n_out + o] = yi[t * n_out + o] as f32 * factor;
            }
        }
    }
}

/// A linear layer (no bias): the dispatch point for weight products.
#[derive(Debug, Clone)]
pub enum Linear {
    F32(DenseF32),
    /// The engine's integer arithmetic (A8 activations, W2/W4/W8 weights).
    Engine(EngineLinear),
    /// Calibration: runs `inner` and appends every input row to `inputs` (GPTQ's Hessian).
    Capture(CaptureLinear),
}

/// A linear layer that records its inputs (calibration for `tessera quantize --method gptq`).
#[derive(Debug, Clone)]
pub struct CaptureLinear {
    pub inner: Box<Linear>,
    pub inputs: Arc<std::sync::Mutex<Vec<f32>>>,
}

impl Linear {
    /// An f32 linear layer; `w.len()` must be `n_out * n_in`.
    pub fn f32(w: Arc<Vec<f32>>, n_in: usize, n_out: usize) -> Linear {
        assert_eq!(w.len(), n_in * n_out, "weight size");
        Linear::F32(DenseF32 { w, n_in, n_out })
    }

    pub fn n_in(&self) -> usize {
        match self {
            Linear::F32(d) => d.n_in,
            Linear::Engine(e) => e.w.k(),
            Linear::Capture(c) => c.inner.n_in(),
        }
    }

    pub fn n_out(&self) -> usize {
        match self {
            Linear::F32(d) => d.n_out,
            Linear::Engine(e) => e.w.n_rows(),
            Linear::Capture(c) => c.inner.n_out(),
        }
    }

    /// `y[t] = W x[t]` for `n_tok` tokens: `x` is `n_tok * n_in`, `y` is `n_tok * n_out`.
    pub fn forward(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        match self {
            Linear::F32(d) => matmul_f32(&d.w, d.n_in, d.n_out, x, n_tok, y),
            Linear::Engine(e) => e.forward(x, n_tok, y),
            Linear::Capture(c) => {
                if let Ok(mut v) = c.inputs.lock() {
                    v.extend_from_slice(x);
                }
                c.inner.forward(x, n_tok, y);
            }
        }
    }
}

/// Dot product with eight independent accumulators (vectorizes without fast-math).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

fn matmul_f32(w: &[f32], n_in: usize, n_out: usize, x: &[f32], n_tok: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tok * n_in, "matmul input size");
    assert_eq!(y.len(), n_tok * n_out, "matmul output size");
    if n_tok == 1 {
        y.par_chunks_mut(ROW_BLOCK).enumerate().for_each(|(b, ys)| {
            let r0 = b * ROW_BLOCK;
            for (j, yo) in ys.iter_mut().enumerate() {
                let o = r0 + j;
                *yo = dot(&w[o * n_in..(o + 1) * n_in], x);
            }
        });
        return;
    }
    // Several tokens: compute y transposed (rows of W outermost, so each row is read once per
    // block), then transpose back.
    let mut yt = vec![0f32; n_out * n_tok];
    yt.par_chunks_mut(ROW_BLOCK * n_tok)
        .enumerate()
        .for_each(|(b, ys)| {
            let r0 = b * ROW_BLOCK;
            for (j, yrow) in ys.chunks_mut(n_tok).enumerate() {
                let o = r0 + j;
                let wr = &w[o * n_in..(o + 1) * n_in];
                for (t, v) in yrow.iter_mut().enumerate() {
                    *v = dot(wr, &x[t * n_in..(t + 1) * n_in]);
                }
            }
        });
    for o in 0..n_out {
        for t in 0..n_tok {
            y[t * n_out + o] = yt[o * n_tok + t];
        }
    }
}

/// An f32 key/value cache of one layer: `len` positions of `n_kv_head * head_dim` values each.
#[derive(Debug, Clone, Default)]
pub struct KvF32 {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// One layer's key/value cache on the engine: one golden cache per KV head (KV4, N16, or KV8,
/// N16b). Both products use `OutputStage::IDENTITY_I32` (N14); queries are N5 per head,
/// probabilities N19 per query.
#[derive(Debug, Clone)]
pub struct KvEngine {
    pub heads: Vec<GoldenKvCache>,
    pub head_dim: usize,
    /// NaN went in (a non-finite key, value, query or probability): outputs are NaN.
    poisoned: bool,
}

/// Which cache a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    F32,
    /// Golden cache with `bits` 4 or 8 on datapath `dp`.
    Engine {
        dp: Datapath,
        bits: u32,
    },
}

/// One layer's key/value cache: the dispatch point for the two attention products.
#[derive(Debug, Clone)]
pub enum KvCache {
    F32(KvF32),
    Engine(KvEngine),
}

impl KvCache {
    pub fn f32(n_kv_head: usize, head_dim: usize) -> KvCache {
        KvCache::F32(KvF32 {
            k: Vec::new(),
            v: Vec::new(),
            n_kv_head,
            head_dim,
        })
    }

    /// An empty cache of `kind`.
    pub fn new(kind: KvKind, n_kv_head: usize, head_dim: usize) -> Result<KvCache> {
        match kind {
            KvKind::F32 => Ok(KvCache::f32(n_kv_head, head_dim)),
            KvKind::Engine { dp, bits } => {
                let heads = (0..n_kv_head)
                    .map(|_| GoldenKvCache::with_bits(&dp, head_dim, bits))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::new(format!("KV cache: {e}")))?;
                Ok(KvCache::Engine(KvEngine {
                    heads,
                    head_dim,
                    poisoned: false,
                }))
            }
        }
    }

    /// Bytes the cache holds (f32: 4 per value; engine: golden's `KvMemory::total`).
    pub fn memory_bytes(&self) -> usize {
        match self {
            KvCache::F32(c) => 4 * (c.k.len() + c.v.len()),
            KvCache::Engine(e) => e.heads.iter().map(GoldenKvCache::memory_bytes).sum(),
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        match self {
            KvCache::F32(c) => c.k.len() / (c.n_kv_head * c.head_dim).max(1),
            KvCache::Engine(e) => e.heads.first().map_or(0, GoldenKvCache::len),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one position's keys and values (`n_kv_head * head_dim` each, RoPE applied to k).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        match self {
            KvCache::F32(c) => {
                assert_eq!(k.len(), c.n_kv_head * c.head_dim, "k size");
                assert_eq!(v.len(), c.n_kv_head * c.head_dim, "v size");
                c.k.extend_from_slice(k);
                c.v.extend_from_slice(v);
            }
            KvCache::Engine(e) => {
                let hd = e.head_dim;
                assert_eq!(k.len(), e.heads.len() * hd, "k size");
                assert_eq!(v.len(), e.heads.len() * hd, "v size");
                let finite = k.iter().chain(v).all(|x| x.is_finite());
                e.poisoned |= !finite;
                for (h, cache) in e.heads.iter_mut().enumerate() {
                    let (kh, vh) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
                    let zeros = vec![0f32; hd];
                    let r = if finite {
                        cache.push(kh, vh)
                    } else {
                        cache.push(&zeros, &zeros)
                    };
                    // Shapes are checked above and inputs are finite: push cannot fail.
                    e.poisoned |= r.is_err();
                }
            }
        }
    }

    /// Drops positions from `len` on (to reuse a prefix). The engine cache cannot drop
    /// quantized tokens: an error unless `len` is the current length.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            KvCache::F32(c) => {
                let w = c.n_kv_head * c.head_dim;
                c.k.truncate(len * w);
                c.v.truncate(len * w);
                Ok(())
            }
            KvCache::Engine(e) => {
                if e.heads.first().map_or(0, GoldenKvCache::len) == len {
                    Ok(())
                } else {
                    Err(Error::new("the engine KV cache cannot be truncated"))
                }
            }
        }
    }

    /// `scores[j] = scale * (q . K[j, kv_head])` for positions `j < scores.len()`.
    pub fn scores(&self, kv_head: usize, q: &[f32], scale: f32, scores: &mut [f32]) {
        match self {
            KvCache::F32(c) => {
                let (hd, w) = (c.head_dim, c.n_kv_head * c.head_dim);
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &c.k[j * w + kv_head * hd..j * w + (kv_head + 1) * hd];
                    *s = dot(q, k) * scale;
                }
            }
            KvCache::Engine(e) => {
                let cache = &e.heads[kv_head];
                assert_eq!(
                    scores.len(),
                    cache.len(),
                    "engine scores cover the whole cache"
                );
                let stage = OutputStage::IDENTITY_I32;
                let out = match quantize_token(q) {
                    Ok(qc) if !e.poisoned => cache
                        .qk(&qc.codes_i8, &stage)
                        .ok()
                        .map(|o| o.scores_f32(&stage, qc.scale_x)),
                    _ => None,
                };
                match out {
                    Some(v) => {
                        for (s, x) in scores.iter_mut().zip(v) {
                            *s = x * scale;
                        }
                    }
                    None => scores.fill(f32::NAN),
                }
            }
        }
    }

    /// `out = sum_j p[j] * V[j, kv_head]` for positions `j < p.len()`.
    pub fn weighted_sum(&self, kv_head: usize, p: &[f32], out: &mut [f32]) {
        match self {
            KvCache::F32(c) => {
                let (hd, w) = (c.head_dim, c.n_kv_head * c.head_dim);
                out.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    let v = &c.v[j * w + kv_head * hd..j * w + (kv_head + 1) * hd];
                    for (o, &vi) in out.iter_mut().zip(v) {
                        *o += pj * vi;
                    }
                }
            }
            KvCache::Engine(e) => {
                let cache = &e.heads[kv_head];
                assert_eq!(p.len(), cache.len(), "engine P x V covers the whole cache");
                let stage = OutputStage::IDENTITY_I32;
                let res = match quantize_probs(p) {
                    Ok(pc) if !e.poisoned => cache
                        .pv(&pc.p_i8, &stage)
                        .ok()
                        .map(|o| o.output_f32(&stage, pc.scale_p)),
                    _ => None,
                };
                match res {
                    Some(v) => out.copy_from_slice(&v),
                    None => out.fill(f32::NAN),
                }
            }
        }
    }
}
