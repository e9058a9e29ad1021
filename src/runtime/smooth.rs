//! SmoothQuant-style per-channel smoothing of activation outliers (host side, offline).
//!
//! SmolLM2's activations have a few channels whose magnitude is far above the rest, so a
//! per-token A8 scale (docs/numerics.md N5) set by the largest channel leaves the others with few
//! levels. Smoothing divides each input channel `j` of a linear layer by `s_j` and multiplies
//! column `j` of its weights by `s_j`: the product is unchanged in real arithmetic, and the
//! division is folded offline into whatever produced the input, so the engine's contract is
//! untouched (the engine sees different weights and different activations, nothing else):
//!
//! - Q/K/V and gate/up: their input is an RMSNorm output, so `s_j` divides the norm weight.
//! - O: its input is the attention output `sum_t p_t v_t`, linear in each value channel, so `s`
//!   divides the V-projection's output row (one `s` per KV-head channel, shared by the query
//!   heads of the group; the value cache then holds the smoothed values).
//! - down: its input is `silu(gate) * up`, linear in `up`, so `s_j` divides the up-projection's
//!   row `j`.
//!
//! `s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)` (SmoothQuant, Xiao et al. 2023), with the
//! activation maxima measured on calibration text (`data/calibration.txt`, never the evaluation
//! text) by the f32 model, and the weight maxima over every matrix that reads the input.

use std::sync::{Arc, Mutex};

use super::model::Model;
use super::ops::{CaptureLinear, Linear};
use super::tokenizer::Tokenizer;
use super::{Error, Result};

/// Per-channel `max |x_j|` of the inputs of one layer's linears (f32 model, calibration text).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// Input of Q/K/V (the attention RMSNorm output), `d_model` channels.
    pub attn_in: Vec<f32>,
    /// Input of O (the attention output), `n_head * head_dim` channels.
    pub o_in: Vec<f32>,
    /// Input of gate/up (the FFN RMSNorm output), `d_model` channels.
    pub ffn_in: Vec<f32>,
    /// Input of down (`silu(gate) * up`), `n_ff` channels.
    pub down_in: Vec<f32>,
}

/// Activation statistics of every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ActStats {
    pub layers: Vec<LayerStats>,
    /// Tokens the statistics were measured on.
    pub tokens: usize,
}

/// The default migration strength of the quantized modes (`--smooth`), chosen on the
/// calibration text (docs/accuracy.md).
pub const DEFAULT_ALPHA: f32 = 0.8;

/// The calibration text (`data/calibration.txt`, built in so the runtime needs no data files).
pub const CALIBRATION_TEXT: &str = include_str!("../../data/calibration.txt");

/// Tokens of calibration text the statistics are measured on (one 512-token chunk).
pub const CALIBRATION_TOKENS: usize = 512;

/// Smooths an f32 `model` for a quantized mode with migration strength `alpha` at every site
/// (in `(0, 1]`): statistics from [`CALIBRATION_TOKENS`] tokens of [`CALIBRATION_TEXT`] (BOS
/// first when the model wants one), then [`smooth_model`]. A model whose linears are not all
/// f32 (a .tsr) is an error. `progress(done, total)` after each calibration chunk.
pub fn smooth_for_engine(
    model: &mut Model,
    tok: &Tokenizer,
    alpha: f32,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(Error::new(format!(
            "--smooth {alpha}: the migration strength must be in (0, 1], or 0 for none"
        )));
    }
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos_id);
    }
    ids.extend(tok.encode(CALIBRATION_TEXT)?);
    let ctx = CALIBRATION_TOKENS.min(model.cfg.ctx_len);
    let chunks: Vec<Vec<u32>> = ids
        .chunks_exact(ctx)
        .take(CALIBRATION_TOKENS.div_ceil(ctx))
        .map(<[u32]>::to_vec)
        .collect();
    if chunks.is_empty() {
        return Err(Error::new("smoothing: the calibration text is too short"));
    }
    progress(0, chunks.len());
    let stats = collect_stats(model, &chunks)?;
    progress(chunks.len(), chunks.len());
    smooth_model(
        model,
        &stats,
        SmoothOptions {
            alpha_norm: alpha,
            alpha_inner: alpha,
        },
    )
}

/// Where smoothing is applied, and its migration strength `alpha` in `[0, 1]` (0 = off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothOptions {
    /// For Q/K/V and gate/up (folded into the RMSNorm weights).
    pub alpha_norm: f32,
    /// For O (folded into V) and down (folded into up).
    pub alpha_inner: f32,
}

impl SmoothOptions {
    /// No smoothing.
    pub const OFF: SmoothOptions = SmoothOptions {
        alpha_norm: 0.0,
        alpha_inner: 0.0,
    };

    pub fn is_off(&self) -> bool {
        self.alpha_norm == 0.0 && self.alpha_inner == 0.0
    }
}

fn absmax_cols(x: &[f32], k: usize, out: &mut [f32]) {
    for row in x.chunks_exact(k) {
        for (m, &v) in out.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
}

/// Runs the f32 `model` over `chunks` (each from an empty cache) and records the per-channel
/// input maxima of every layer's Q, O, gate and down linears.
pub fn collect_stats(model: &Model, chunks: &[Vec<u32>]) -> Result<ActStats> {
    let mut m = model.clone();
    let c = m.cfg.clone();
    let qd = c.n_head * c.head_dim;
    let mut stats: Vec<LayerStats> = (0..c.n_layer)
        .map(|_| LayerStats {
            attn_in: vec![0.0; c.d_model],
            o_in: vec![0.0; qd],
            ffn_in: vec![0.0; c.d_model],
            down_in: vec![0.0; c.n_ff],
        })
        .collect();
    let wrap = |l: &mut Linear| -> Arc<Mutex<Vec<f32>>> {
        let inputs = Arc::new(Mutex::new(Vec::new()));
        let inner = Box::new(l.clone());
        *l = Linear::Capture(CaptureLinear {
            inner,
            inputs: inputs.clone(),
        });
        inputs
    };
    let mut caps = Vec::with_capacity(c.n_layer);
    for l in &mut m.layers {
        caps.push([
            wrap(&mut l.wq),
            wrap(&mut l.wo),
            wrap(&mut l.w_gate),
            wrap(&mut l.w_down),
        ]);
    }
    let mut tokens = 0;
    for chunk in chunks {
        let mut s = m.session();
        m.forward(&mut s, chunk, false)?;
        tokens += chunk.len();
        for (st, cap) in stats.iter_mut().zip(&caps) {
            let dst: [(&mut Vec<f32>, usize); 4] = [
                (&mut st.attn_in, c.d_model),
                (&mut st.o_in, qd),
                (&mut st.ffn_in, c.d_model),
                (&mut st.down_in, c.n_ff),
            ];
            for ((out, k), inputs) in dst.into_iter().zip(cap) {
                let mut v = inputs
                    .lock()
                    .map_err(|_| Error::new("smoothing calibration: poisoned capture"))?;
                absmax_cols(&v, k, out);
                v.clear();
            }
        }
    }
    Ok(ActStats {
        layers: stats,
        tokens,
    })
}

/// Per-channel `max |W[:, j]|` over the columns of every matrix in `ws` (all `n_in == k`).
fn weight_col_absmax(ws: &[&[f32]], k: usize) -> Vec<f32> {
    let mut out = vec![0f32; k];
    for w in ws {
        absmax_cols(w, k, &mut out);
    }
    out
}

/// `s_j = xmax_j^alpha / wmax_j^(1 - alpha)`, 1 where either maximum is 0 or the result is not
/// a positive finite number.
#[must_use]
pub fn smoothing_factors(xmax: &[f32], wmax: &[f32], alpha: f32) -> Vec<f32> {
    xmax.iter()
        .zip(wmax)
        .map(|(&x, &w)| {
            if x <= 0.0 || w <= 0.0 {
                return 1.0;
            }
            let s = (f64::from(x).powf(f64::from(alpha))
                / f64::from(w).powf(f64::from(1.0 - alpha))) as f32;
            if s.is_finite() && s > 0.0 {
                s.clamp(1e-4, 1e4)
            } else {
                1.0
            }
        })
        .collect()
}

fn f32_weights<'a>(l: &'a Linear, name: &str) -> Result<&'a [f32]> {
    match l {
        Linear::F32(d) => Ok(&d.w),
        _ => Err(Error::new(format!(
            "smoothing needs the f32 weights of {name} (smooth before quantizing)"
        ))),
    }
}

/// `W[:, j] *= s[j]` (row-major `[n_out][n_in]`).
fn scale_cols(l: &mut Linear, s: &[f32]) {
    if let Linear::F32(d) = l {
        let w = Arc::make_mut(&mut d.w);
        for row in w.chunks_exact_mut(d.n_in) {
            for (x, &f) in row.iter_mut().zip(s) {
                *x *= f;
            }
        }
    }
}

/// `W[r, :] /= s[r]`.
fn div_rows(l: &mut Linear, s: &[f32]) {
    if let Linear::F32(d) = l {
        let n_in = d.n_in;
        let w = Arc::make_mut(&mut d.w);
        for (row, &f) in w.chunks_exact_mut(n_in).zip(s) {
            for x in row {
                *x /= f;
            }
        }
    }
}

/// Folds smoothing into `model`'s f32 weights (before quantization): exact in real arithmetic,
/// so the f32 forward pass changes only by float rounding.
pub fn smooth_model(model: &mut Model, stats: &ActStats, opts: SmoothOptions) -> Result<()> {
    let c = model.cfg.clone();
    if stats.layers.len() != c.n_layer {
        return Err(Error::new(format!(
            "smoothing statistics have {} layers, the model {}",
            stats.layers.len(),
            c.n_layer
        )));
    }
    let hd = c.head_dim;
    let group = c.n_head / c.n_head_kv;
    for (l, st) in model.layers.iter_mut().zip(&stats.layers) {
        if opts.alpha_norm > 0.0 {
            let wmax = weight_col_absmax(
                &[
                    f32_weights(&l.wq, "attn_q")?,
                    f32_weights(&l.wk, "attn_k")?,
                    f32_weights(&l.wv, "attn_v")?,
                ],
                c.d_model,
            );
            let s = smoothing_factors(&st.attn_in, &wmax, opts.alpha_norm);
            for (g, &f) in l.attn_norm.iter_mut().zip(&s) {
                *g /= f;
            }
            scale_cols(&mut l.wq, &s);
            scale_cols(&mut l.wk, &s);
            scale_cols(&mut l.wv, &s);

            let wmax = weight_col_absmax(
                &[
                    f32_weights(&l.w_gate, "ffn_gate")?,
                    f32_weights(&l.w_up, "ffn_up")?,
                ],
                c.d_model,
            );
            let s = smoothing_factors(&st.ffn_in, &wmax, opts.alpha_norm);
            for (g, &f) in l.ffn_norm.iter_mut().zip(&s) {
                *g /= f;
            }
            scale_cols(&mut l.w_gate, &s);
            scale_cols(&mut l.w_up, &s);
        }
        if opts.alpha_inner > 0.0 {
            // O: one factor per KV-head channel (kvh, c), the maxima over the group's heads.
            let wo_max = weight_col_absmax(&[f32_weights(&l.wo, "attn_output")?], c.n_head * hd);
            let kvd = c.n_head_kv * hd;
            let (mut xk, mut wk) = (vec![0f32; kvd], vec![0f32; kvd]);
            for h in 0..c.n_head {
                let kvh = h / group;
                for ch in 0..hd {
                    let (src, dst) = (h * hd + ch, kvh * hd + ch);
                    xk[dst] = xk[dst].max(st.o_in[src]);
                    wk[dst] = wk[dst].max(wo_max[src]);
                }
            }
            let s_kv = smoothing_factors(&xk, &wk, opts.alpha_inner);
            let s_o: Vec<f32> = (0..c.n_head * hd)
                .map(|j| s_kv[(j / hd / group) * hd + j % hd])
                .collect();
            div_rows(&mut l.wv, &s_kv);
            scale_cols(&mut l.wo, &s_o);

            let wmax = weight_col_absmax(&[f32_weights(&l.w_down, "ffn_down")?], c.n_ff);
            let s = smoothing_factors(&st.down_in, &wmax, opts.alpha_inner);
            div_rows(&mut l.w_up, &s);
            scale_cols(&mut l.w_down, &s);
        }
    }
    Ok(())
}
