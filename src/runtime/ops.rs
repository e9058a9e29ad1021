//! The engine operations of the forward pass, each behind one enum so that a quantized mode
//! (w8a8kv8, w2a8kv4, calling `tessera-golden`'s integer ops) can add a variant without touching
//! the model code:
//!
//! - [`Linear`]: every weight matrix product `y = W x` (Q, K, V, O, gate, up, down, output head);
//! - [`KvCache`]: the key/value store of one layer and the two attention products, `q . K^T`
//!   ([`KvCache::scores`]) and `p . V` ([`KvCache::weighted_sum`]).
//!
//! Only the f32 reference variants exist today.

use std::sync::Arc;

use rayon::prelude::*;

/// Output rows computed per parallel task.
const ROW_BLOCK: usize = 64;

/// A dense f32 matrix of `n_out` rows by `n_in` columns, row-major (a GGUF weight dequantized).
#[derive(Debug, Clone)]
pub struct DenseF32 {
    pub w: Arc<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
}

/// A linear layer (no bias): the dispatch point for weight products.
#[derive(Debug, Clone)]
pub enum Linear {
    F32(DenseF32),
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
        }
    }

    pub fn n_out(&self) -> usize {
        match self {
            Linear::F32(d) => d.n_out,
        }
    }

    /// `y[t] = W x[t]` for `n_tok` tokens: `x` is `n_tok * n_in`, `y` is `n_tok * n_out`.
    pub fn forward(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        match self {
            Linear::F32(d) => matmul_f32(&d.w, d.n_in, d.n_out, x, n_tok, y),
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

/// One layer's key/value cache: the dispatch point for the two attention products.
#[derive(Debug, Clone)]
pub enum KvCache {
    F32(KvF32),
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

    /// Positions stored.
    pub fn len(&self) -> usize {
        match self {
            KvCache::F32(c) => c.k.len() / (c.n_kv_head * c.head_dim).max(1),
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
        }
    }

    /// Drops positions from `len` on (to reuse a prefix).
    pub fn truncate(&mut self, len: usize) {
        match self {
            KvCache::F32(c) => {
                let w = c.n_kv_head * c.head_dim;
                c.k.truncate(len * w);
                c.v.truncate(len * w);
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
        }
    }
}
