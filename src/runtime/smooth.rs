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

use std::path::Path;
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

/// The last bytes of [`CALIBRATION_TEXT`] are held out: the statistics never see them, so they
/// can judge statistics and migration strengths fairly (docs/accuracy.md).
pub const HELD_OUT_BYTES: usize = 30_000;

/// Chunks of the statistics part (everything but the held-out bytes) the statistics are measured
/// on: 9 is every 512-token chunk of it for SmolLM2.
pub const CALIBRATION_CHUNKS: usize = 9;

/// Tokens per calibration chunk (at most the model's context).
pub const CALIBRATION_CTX: usize = 512;

/// How the per-chunk maxima are combined (docs/accuracy.md: chosen on the held-out part).
pub const CALIBRATION_REDUCE: Reduce = Reduce::Median;

/// The statistics part of [`CALIBRATION_TEXT`]: all but its last [`HELD_OUT_BYTES`] bytes.
#[must_use]
pub fn statistics_text() -> &'static str {
    let t = CALIBRATION_TEXT;
    let mut cut = t.len().saturating_sub(HELD_OUT_BYTES);
    while !t.is_char_boundary(cut) {
        cut += 1;
    }
    &t[..cut]
}

/// The held-out part of [`CALIBRATION_TEXT`] (its last [`HELD_OUT_BYTES`] bytes).
#[must_use]
pub fn held_out_text() -> &'static str {
    &CALIBRATION_TEXT[statistics_text().len()..]
}

/// The smoothing statistics of the engine modes: [`CALIBRATION_REDUCE`] of the per-chunk maxima
/// over the first [`CALIBRATION_CHUNKS`] chunks of [`statistics_text`] (cut as `tessera ppl`
/// cuts a text: BOS first in every chunk when the model wants one). `cache`, if given, is a
/// file keyed by `cache_key` (what the model is): read when it matches, written otherwise (a
/// write failure is only a warning). `progress(done, total)` after each chunk.
pub fn engine_stats(
    model: &Model,
    tok: &Tokenizer,
    cache: Option<(&Path, &str)>,
    progress: &dyn Fn(usize, usize),
) -> Result<ActStats> {
    let ctx = CALIBRATION_CTX.min(model.cfg.ctx_len);
    let chunks = super::ppl::chunks(tok, statistics_text(), ctx, Some(CALIBRATION_CHUNKS))
        .map_err(|e| Error::new(format!("smoothing: calibration text: {e}")))?;
    let key = cache.map(|(_, k)| {
        format!(
            "{k}; smoothing statistics {:?} of per-chunk maxima, {} chunks of {ctx} tokens, text {:016x}",
            CALIBRATION_REDUCE,
            chunks.len(),
            fnv1a(statistics_text().as_bytes())
        )
    });
    if let (Some((path, _)), Some(key)) = (cache, &key) {
        if let Ok(bytes) = std::fs::read(path) {
            if let Some(st) = decode_stats(&bytes, key, &model.cfg) {
                return Ok(st);
            }
        }
    }
    progress(0, chunks.len());
    let mut per = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        per.extend(collect_chunk_stats(model, std::slice::from_ref(c), 0)?);
        progress(i + 1, chunks.len());
    }
    let st = reduce_stats(&per, CALIBRATION_REDUCE);
    if let (Some((path, _)), Some(key)) = (cache, &key) {
        let write = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, encode_stats(&st, key)));
        if let Err(e) = write {
            eprintln!(
                "warning: cannot cache the smoothing statistics in {}: {e}",
                path.display()
            );
        }
    }
    Ok(st)
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

const STATS_MAGIC: &[u8; 8] = b"TSRSMST1";

/// The cache file of [`engine_stats`]: magic, key length and key, token count, then every
/// layer's four vectors as little-endian f32 (their lengths follow from the model's shape).
#[must_use]
pub fn encode_stats(st: &ActStats, key: &str) -> Vec<u8> {
    let mut b = STATS_MAGIC.to_vec();
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend((st.tokens as u64).to_le_bytes());
    b.extend((st.layers.len() as u64).to_le_bytes());
    for l in &st.layers {
        for v in [&l.attn_in, &l.o_in, &l.ffn_in, &l.down_in] {
            b.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    b
}

/// Reads [`encode_stats`]' bytes; `None` if the key differs or the bytes do not fit `cfg`.
#[must_use]
pub fn decode_stats(b: &[u8], key: &str, cfg: &super::model::LlamaConfig) -> Option<ActStats> {
    struct Reader<'a> {
        b: &'a [u8],
        p: usize,
    }
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let s = self.b.get(self.p..self.p.checked_add(n)?)?;
            self.p += n;
            Some(s)
        }
        fn u64(&mut self) -> Option<usize> {
            usize::try_from(u64::from_le_bytes(self.take(8)?.try_into().ok()?)).ok()
        }
        fn f32s(&mut self, n: usize) -> Option<Vec<f32>> {
            Some(
                self.take(n.checked_mul(4)?)?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
    }
    let mut r = Reader { b, p: 0 };
    if r.take(8)? != STATS_MAGIC {
        return None;
    }
    let kl = r.u64()?;
    if r.take(kl)? != key.as_bytes() {
        return None;
    }
    let tokens = r.u64()?;
    if r.u64()? != cfg.n_layer {
        return None;
    }
    let qd = cfg.n_head * cfg.head_dim;
    let mut vec_of = |n: usize| r.f32s(n);
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for _ in 0..cfg.n_layer {
        layers.push(LayerStats {
            attn_in: vec_of(cfg.d_model)?,
            o_in: vec_of(qd)?,
            ffn_in: vec_of(cfg.d_model)?,
            down_in: vec_of(cfg.n_ff)?,
        });
    }
    if r.p != b.len() {
        return None;
    }
    Some(ActStats { layers, tokens })
}

/// Smooths an f32 `model` for a quantized mode with migration strength `alpha` at every site
/// (in `(0, 1]`): statistics from [`engine_stats`] (cached in `cache` if given), then
/// [`smooth_model`]. A model whose linears are not all f32 (a .tsr) is an error.
/// `progress(done, total)` after each calibration chunk.
pub fn smooth_for_engine(
    model: &mut Model,
    tok: &Tokenizer,
    alpha: f32,
    cache: Option<(&Path, &str)>,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(Error::new(format!(
            "--smooth {alpha}: the migration strength must be in (0, 1], or 0 for none"
        )));
    }
    let stats = engine_stats(model, tok, cache, progress)?;
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
/// input maxima of every layer's Q, O, gate and down linears (the maximum over every token).
pub fn collect_stats(model: &Model, chunks: &[Vec<u32>]) -> Result<ActStats> {
    Ok(reduce_stats(
        &collect_chunk_stats(model, chunks, 0)?,
        Reduce::Max,
    ))
}

/// How per-chunk maxima are combined into one per-channel statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The maximum over chunks (the maximum over every token).
    Max,
    /// The mean of the per-chunk maxima.
    Mean,
    /// The median of the per-chunk maxima (the mean of the two middle ones for an even count).
    Median,
}

/// Combines per-chunk statistics (from [`collect_chunk_stats`]) channel by channel; the result
/// does not depend on the chunks' order. `tokens` is their sum.
#[must_use]
pub fn reduce_stats(per_chunk: &[ActStats], how: Reduce) -> ActStats {
    let Some(first) = per_chunk.first() else {
        return ActStats {
            layers: Vec::new(),
            tokens: 0,
        };
    };
    let comb = |get: &dyn Fn(&LayerStats) -> &Vec<f32>, l: usize| -> Vec<f32> {
        let n = get(&first.layers[l]).len();
        (0..n)
            .map(|j| {
                let mut v: Vec<f32> = per_chunk.iter().map(|c| get(&c.layers[l])[j]).collect();
                match how {
                    Reduce::Max => v.iter().copied().fold(0f32, f32::max),
                    Reduce::Mean => {
                        (v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64) as f32
                    }
                    Reduce::Median => {
                        v.sort_by(f32::total_cmp);
                        let m = v.len() / 2;
                        if v.len() % 2 == 1 {
                            v[m]
                        } else {
                            ((f64::from(v[m - 1]) + f64::from(v[m])) / 2.0) as f32
                        }
                    }
                }
            })
            .collect()
    };
    ActStats {
        layers: (0..first.layers.len())
            .map(|l| LayerStats {
                attn_in: comb(&|s| &s.attn_in, l),
                o_in: comb(&|s| &s.o_in, l),
                ffn_in: comb(&|s| &s.ffn_in, l),
                down_in: comb(&|s| &s.down_in, l),
            })
            .collect(),
        tokens: per_chunk.iter().map(|c| c.tokens).sum(),
    }
}

/// Runs the f32 `model` over each of `chunks` (from an empty cache) and returns, per chunk, the
/// per-channel input maxima of every layer's Q, O, gate and down linears over the chunk's
/// positions `skip..` (the first `skip` positions take part in the pass but not in the maxima).
pub fn collect_chunk_stats(
    model: &Model,
    chunks: &[Vec<u32>],
    skip: usize,
) -> Result<Vec<ActStats>> {
    let mut m = model.clone();
    let c = m.cfg.clone();
    let qd = c.n_head * c.head_dim;
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
    let mut out = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        if chunk.len() <= skip {
            return Err(Error::new(format!(
                "smoothing calibration: a chunk of {} tokens, {skip} skipped",
                chunk.len()
            )));
        }
        let mut stats: Vec<LayerStats> = (0..c.n_layer)
            .map(|_| LayerStats {
                attn_in: vec![0.0; c.d_model],
                o_in: vec![0.0; qd],
                ffn_in: vec![0.0; c.d_model],
                down_in: vec![0.0; c.n_ff],
            })
            .collect();
        let mut s = m.session();
        m.forward(&mut s, chunk, false)?;
        for (st, cap) in stats.iter_mut().zip(&caps) {
            let dst: [(&mut Vec<f32>, usize); 4] = [
                (&mut st.attn_in, c.d_model),
                (&mut st.o_in, qd),
                (&mut st.ffn_in, c.d_model),
                (&mut st.down_in, c.n_ff),
            ];
            for ((o, k), inputs) in dst.into_iter().zip(cap) {
                let mut v = inputs
                    .lock()
                    .map_err(|_| Error::new("smoothing calibration: poisoned capture"))?;
                absmax_cols(&v[skip * k..], k, o);
                v.clear();
            }
        }
        out.push(ActStats {
            layers: stats,
            tokens: chunk.len() - skip,
        });
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::model::LlamaConfig;

    fn one(v: [f32; 4], tokens: usize) -> ActStats {
        // One layer, every vector of length 2: channel 0 = v[i], channel 1 = 10 * v[i].
        let pair = |x: f32| vec![x, 10.0 * x];
        ActStats {
            layers: vec![LayerStats {
                attn_in: pair(v[0]),
                o_in: pair(v[1]),
                ffn_in: pair(v[2]),
                down_in: pair(v[3]),
            }],
            tokens,
        }
    }

    #[test]
    fn reduce_stats_hand_values_and_order_independence() {
        let chunks = [
            one([1.0, 4.0, 2.0, 8.0], 3),
            one([3.0, 1.0, 2.0, 1.0], 5),
            one([2.0, 2.0, 5.0, 3.0], 7),
            one([6.0, 3.0, 2.0, 2.0], 11),
        ];
        let max = reduce_stats(&chunks, Reduce::Max);
        let mean = reduce_stats(&chunks, Reduce::Mean);
        let median = reduce_stats(&chunks, Reduce::Median);
        assert_eq!(max.tokens, 26);
        assert_eq!(max.layers[0].attn_in, vec![6.0, 60.0]);
        assert_eq!(max.layers[0].down_in, vec![8.0, 80.0]);
        assert_eq!(mean.layers[0].attn_in, vec![3.0, 30.0]);
        assert_eq!(mean.layers[0].ffn_in, vec![2.75, 27.5]);
        // Even count: the mean of the two middle values.
        assert_eq!(median.layers[0].attn_in, vec![2.5, 25.0]);
        assert_eq!(median.layers[0].o_in, vec![2.5, 25.0]);
        assert_eq!(median.layers[0].ffn_in, vec![2.0, 20.0]);
        assert_eq!(median.layers[0].down_in, vec![2.5, 25.0]);
        // Odd count: the middle value.
        let odd = reduce_stats(&chunks[..3], Reduce::Median);
        assert_eq!(odd.layers[0].down_in, vec![3.0, 30.0]);
        // Any order of the chunks gives the same statistics.
        for how in [Reduce::Max, Reduce::Mean, Reduce::Median] {
            let want = reduce_stats(&chunks, how);
            for perm in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
                let p: Vec<ActStats> = perm.iter().map(|&i| chunks[i].clone()).collect();
                assert_eq!(reduce_stats(&p, how), want, "{how:?} {perm:?}");
            }
        }
        // One chunk: its own maxima.
        assert_eq!(reduce_stats(&chunks[..1], Reduce::Median), chunks[0]);
    }

    #[test]
    fn stats_cache_round_trips_and_rejects_other_keys_and_shapes() {
        let cfg = LlamaConfig {
            n_layer: 1,
            d_model: 2,
            n_ff: 2,
            n_head: 1,
            n_head_kv: 1,
            head_dim: 2,
            vocab: 8,
            ctx_len: 16,
            rope_base: 10000.0,
            rms_eps: 1e-5,
        };
        let st = one([1.5, 2.5, 3.5, 4.5], 9);
        let b = encode_stats(&st, "key a");
        assert_eq!(decode_stats(&b, "key a", &cfg), Some(st));
        assert_eq!(decode_stats(&b, "key b", &cfg), None);
        assert_eq!(decode_stats(&b[..b.len() - 1], "key a", &cfg), None);
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(decode_stats(&longer, "key a", &cfg), None);
        let wider = LlamaConfig { n_ff: 3, ..cfg };
        assert_eq!(decode_stats(&b, "key a", &wider), None);
        assert_eq!(decode_stats(b"garbage", "key a", &wider), None);
    }

    #[test]
    fn statistics_and_held_out_parts_split_the_calibration_text() {
        let (s, h) = (statistics_text(), held_out_text());
        assert_eq!(format!("{s}{h}"), CALIBRATION_TEXT);
        assert!(h.len() >= HELD_OUT_BYTES && h.len() < HELD_OUT_BYTES + 4);
        assert!(s.len() > 10_000, "a statistics part of {} bytes", s.len());
    }

    #[test]
    fn smoothing_factors_hand_values() {
        // s = x^a / w^(1-a); 1 where either maximum is 0.
        let s = smoothing_factors(&[16.0, 4.0, 0.0, 2.0], &[1.0, 4.0, 3.0, 0.0], 0.5);
        assert_eq!(s, vec![4.0, 1.0, 1.0, 1.0]);
        let s = smoothing_factors(&[8.0], &[0.5], 1.0);
        assert_eq!(s, vec![8.0]);
    }
}
