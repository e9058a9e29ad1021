//! GPTQ (Frantar et al., papers.md) for the engine's weight grid (docs/numerics.md N7, N9).
//!
//! Calibration: the f32 model runs over calibration chunks with [`Linear::Capture`] on the
//! first layer of each input (Q/K/V share one input, gate/up another, then O and down), giving
//! `H = X^T X` per input. Per weight matrix, with `Hinv = (H + damp * mean(diag H) * I)^-1` and
//! `U` its upper Cholesky factor, columns are quantized one at a time and each column's error
//! `(w - q) / U[i][i]` is fed back onto the not yet quantized columns (`w[j] -= err * U[i][j]`).
//! A group's N7 parameters (`scale_g`, `zero_u8`, from golden's `quantize_group_asym`) are set
//! from the error-updated weights when its first column is reached, or, with act-order (columns
//! in order of decreasing `H[i][i]`), from the original weights ("static groups"). The result is
//! an ordinary golden `QuantWeights` (codes, N9 multipliers from `scale_multipliers`).

use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use tessera_golden::numerics::{round_clamp_f32, Datapath};
use tessera_golden::quant::{quantize_group_asym, scale_multipliers, QuantWeights};

use super::cli::progress_bar;
use super::engine::{format_of_bits, linear_f32, linears_mut, quantize_linear};
use super::model::Model;
use super::ops::{CaptureLinear, Linear};
use super::tokenizer::Tokenizer;
use super::{Error, Result};

/// GPTQ options.
#[derive(Debug, Clone)]
pub struct GptqOptions {
    pub damp: f64,
    pub act_order: bool,
    pub calib_tokens: usize,
}

/// Lower Cholesky factor of a symmetric positive definite `a` (`n x n`, row-major), in place.
fn cholesky(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(Error::new(
                "GPTQ: the Hessian is not positive definite (raise --damp)",
            ));
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &head[j * n..j * n + j];
        tail.par_chunks_mut(n).for_each(|row_i| {
            let s: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
            row_i[j] = (row_i[j] - s) / d;
        });
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    Ok(())
}

/// The upper factor `U` with `U^T U = h^-1` (GPTQ's `Hinv`), row-major.
fn hinv_upper(mut h: Vec<f64>, n: usize) -> Result<Vec<f64>> {
    cholesky(&mut h, n)?; // h = L, H = L L^T
                          // Linv (lower) solves L X = I; stored transposed (row `col` of `lt` is column `col` of
                          // Linv) so every inner loop reads contiguous memory.
    let mut lt = vec![0f64; n * n];
    lt.par_chunks_mut(n).enumerate().for_each(|(col, x)| {
        for i in col..n {
            let li = &h[i * n..i * n + i];
            let s: f64 = li[col..i].iter().zip(&x[col..i]).map(|(a, b)| a * b).sum();
            let rhs = if i == col { 1.0 } else { 0.0 };
            x[i] = (rhs - s) / h[i * n + i];
        }
    });
    // Hinv = Linv^T Linv: Hinv[i][j] = sum_k Linv[k][i] Linv[k][j] = lt[i] . lt[j] (k >= i, j).
    let mut hinv = vec![0f64; n * n];
    hinv.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, out) in row.iter_mut().enumerate() {
            let k0 = i.max(j);
            *out = lt[i * n + k0..(i + 1) * n]
                .iter()
                .zip(&lt[j * n + k0..(j + 1) * n])
                .map(|(a, b)| a * b)
                .sum();
        }
    });
    cholesky(&mut hinv, n)?; // Hinv = L2 L2^T, U = L2^T
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = hinv[i * n + j];
        }
    }
    Ok(u)
}

/// `H = X^T X` (f64) of `x` (`t x k`, row-major).
fn hessian(x: &[f32], k: usize) -> Vec<f64> {
    let t = x.len() / k;
    let mut xt = vec![0f32; k * t];
    for r in 0..t {
        for c in 0..k {
            xt[c * t + r] = x[r * k + c];
        }
    }
    let mut h = vec![0f64; k * k];
    h.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        let a = &xt[i * t..(i + 1) * t];
        for (j, out) in row.iter_mut().enumerate().skip(i) {
            let b = &xt[j * t..(j + 1) * t];
            *out = a
                .iter()
                .zip(b)
                .map(|(&p, &q)| f64::from(p) * f64::from(q))
                .sum();
        }
    });
    for i in 0..k {
        for j in 0..i {
            h[i * k + j] = h[j * k + i];
        }
    }
    h
}

/// What GPTQ needs of one Hessian: the column order, the dead columns and `U`.
#[derive(Debug, Clone)]
pub struct Prepared {
    order: Vec<usize>,
    dead: Vec<bool>,
    u: Vec<f64>,
}

/// Dead columns, act-order, dampening and `U` (upper Cholesky factor of `Hinv`) of `h` (`k x k`).
pub fn prepare(h: &[f64], k: usize, opts: &GptqOptions) -> Result<Prepared> {
    let mut h = h.to_vec();
    let mut dead = vec![false; k];
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            dead[i] = true;
        }
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    let mut order: Vec<usize> = (0..k).collect();
    if opts.act_order {
        order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
    }
    // Permuted, dampened Hessian.
    let mut hp = vec![0f64; k * k];
    for (pi, &i) in order.iter().enumerate() {
        for (pj, &j) in order.iter().enumerate() {
            hp[pi * k + pj] = h[i * k + j];
        }
        hp[pi * k + pi] += opts.damp * mean_diag;
    }
    let u = hinv_upper(hp, k)?;
    Ok(Prepared { order, dead, u })
}

/// GPTQ of one `[n][k]` matrix `w` (Hessian prepared by [`prepare`]) at `bits` on `dp`.
pub fn gptq_matrix(
    w: &[f32],
    n: usize,
    k: usize,
    prep: &Prepared,
    bits: u32,
    dp: &Datapath,
    opts: &GptqOptions,
) -> Result<QuantWeights> {
    let format = format_of_bits(bits)?;
    let l = dp.w_group_len;
    let groups = k.div_ceil(l);
    let (order, dead, u) = (&prep.order, &prep.dead, &prep.u);
    let max_code = (1i64 << bits) - 1;
    let lattice = (1u32 << (8 - bits)) as f32;
    let sf = dp.scale_frac_bits();
    let rows: Vec<(Vec<u8>, Vec<f32>, Vec<u8>)> = w
        .par_chunks(k)
        .map(|w_row| -> Result<(Vec<u8>, Vec<f32>, Vec<u8>)> {
            let mut wr: Vec<f64> = w_row.iter().map(|&v| f64::from(v)).collect();
            for (i, d) in dead.iter().enumerate() {
                if *d {
                    wr[i] = 0.0;
                }
            }
            let mut scale = vec![0f32; groups];
            let mut zero = vec![0u8; groups];
            let mut set = vec![false; groups];
            let group_params = |vals: &[f64]| -> Result<(f32, u8)> {
                let v: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
                let gq = quantize_group_asym(&v, bits)
                    .map_err(|e| Error::new(format!("GPTQ group: {e}")))?;
                Ok((gq.scale_g, gq.zero_u8))
            };
            if opts.act_order {
                for g in 0..groups {
                    let r = g * l..((g + 1) * l).min(k);
                    (scale[g], zero[g]) = group_params(&wr[r])?;
                    set[g] = true;
                }
            }
            let mut codes = vec![0u8; k];
            // Work in permuted order.
            let mut wp: Vec<f64> = order.iter().map(|&i| wr[i]).collect();
            for pi in 0..k {
                let i = order[pi];
                let g = i / l;
                if !set[g] {
                    // Not act-order: the order is the identity, so this group's columns are
                    // exactly wp[pi .. pi + len].
                    let end = ((g + 1) * l).min(k);
                    let vals = wp[pi..pi + (end - i)].to_vec();
                    (scale[g], zero[g]) = group_params(&vals)?;
                    set[g] = true;
                }
                let (s, z) = (scale[g], f32::from(zero[g]) / lattice);
                let x = wp[pi] as f32;
                let (q, dq) = if s == 0.0 {
                    (0i64, 0f64)
                } else {
                    let q = round_clamp_f32(x / s + z, 0, max_code);
                    (q, f64::from(s) * (q as f64 - f64::from(z)))
                };
                codes[i] = q as u8;
                let err = (wp[pi] - dq) / u[pi * k + pi];
                let urow = &u[pi * k..(pi + 1) * k];
                for pj in pi + 1..k {
                    wp[pj] -= err * urow[pj];
                }
            }
            Ok((codes, scale, zero))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut codes = Vec::with_capacity(n * k);
    let mut gscale_q = Vec::with_capacity(n * groups);
    let mut zero_u8 = Vec::with_capacity(n * groups);
    let mut row_scale = Vec::with_capacity(n);
    for (c, s, z) in rows {
        codes.extend_from_slice(&c);
        let (rs, m) = scale_multipliers(&s, sf);
        row_scale.push(rs);
        gscale_q.extend_from_slice(&m);
        zero_u8.extend_from_slice(&z);
    }
    QuantWeights::from_codes(
        format,
        n,
        k,
        l,
        dp.w_scale_bits,
        &codes,
        gscale_q,
        zero_u8,
        row_scale,
    )
    .map_err(|e| Error::new(format!("GPTQ: {e}")))
}

/// Quantizes every linear layer of `model` (f32) with GPTQ on calibration text `text`; the
/// output head (and any layer at 8 bits) by round to nearest. `bits_of(name)` chooses the bits.
pub fn quantize_model(
    model: &mut Model,
    tok: &Tokenizer,
    text: &str,
    dp: &Datapath,
    opts: &GptqOptions,
    bits_of: &(dyn Fn(&str) -> u32 + Sync),
) -> Result<Vec<(String, Arc<QuantWeights>)>> {
    // Calibration: capture the inputs of Q (shared by K, V), O, gate (shared by up) and down.
    let capture_names = ["attn_q", "attn_output", "ffn_gate", "ffn_down"];
    let mut stores: Vec<(String, Arc<Mutex<Vec<f32>>>)> = Vec::new();
    for (name, l) in linears_mut(model) {
        if capture_names.iter().any(|c| name.ends_with(c)) {
            let inputs = Arc::new(Mutex::new(Vec::new()));
            stores.push((name.clone(), inputs.clone()));
            let inner = Box::new(l.clone());
            *l = Linear::Capture(CaptureLinear { inner, inputs });
        }
    }
    let ctx = 512.min(model.cfg.ctx_len);
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos_id);
    }
    ids.extend(tok.encode(text)?);
    let n_chunks = (opts.calib_tokens.div_ceil(ctx)).min(ids.len() / ctx);
    if n_chunks == 0 {
        return Err(Error::new(format!(
            "the calibration text has {} tokens: at least {ctx} are needed",
            ids.len()
        )));
    }
    let bar = progress_bar("calibrating [{bar:30}] {pos}/{len} chunks");
    bar.set_length(n_chunks as u64);
    for c in 0..n_chunks {
        let mut chunk = ids[c * ctx..(c + 1) * ctx].to_vec();
        if let (true, Some(b)) = (tok.add_bos, tok.bos_id) {
            chunk[0] = b;
        }
        let mut s = model.session();
        model.forward_rows(&mut s, &chunk, 1)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Restore the f32 layers.
    for (_, l) in linears_mut(model) {
        if let Linear::Capture(c) = l {
            let inner = (*c.inner).clone();
            *l = inner;
        }
    }
    let mut hessians = std::collections::HashMap::new();
    let mut out = Vec::new();
    let todo: Vec<(String, Arc<Vec<f32>>, usize, usize)> = linears_mut(model)
        .into_iter()
        .map(|(name, l)| (name, linear_f32(l), l.n_in(), l.n_out()))
        .collect();
    let bar = progress_bar("quantizing (gptq) [{bar:30}] {pos}/{len} tensors {msg}");
    bar.set_length(todo.len() as u64);
    for (name, w, n_in, n_out) in &todo {
        bar.set_message(name.clone());
        let bits = bits_of(name);
        let source = {
            let (blk, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
            match leaf {
                "attn_q" | "attn_k" | "attn_v" => Some(format!("{blk}.attn_q")),
                "ffn_gate" | "ffn_up" => Some(format!("{blk}.ffn_gate")),
                "attn_output" | "ffn_down" => Some(name.clone()),
                _ => None,
            }
        };
        let q = match source {
            Some(src) if bits < 8 => {
                if !hessians.contains_key(&src) {
                    hessians.clear();
                    let x = stores
                        .iter()
                        .find(|(n, _)| *n == src)
                        .map(|(_, s)| s.lock().map(|v| v.clone()).unwrap_or_default())
                        .unwrap_or_default();
                    if x.len() < *n_in {
                        return Err(Error::new(format!("GPTQ: no calibration inputs for {src}")));
                    }
                    let h = hessian(&x, *n_in);
                    hessians.insert(src.clone(), prepare(&h, *n_in, opts)?);
                }
                gptq_matrix(w, *n_out, *n_in, &hessians[&src], bits, dp, opts)
                    .map_err(|e| Error::new(format!("{name}: {e}")))?
            }
            _ => quantize_linear(w, *n_in, *n_out, format_of_bits(bits)?, dp)
                .map_err(|e| Error::new(format!("{name}: {e}")))?,
        };
        out.push((name.clone(), Arc::new(q)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tessera_golden::quant::{quantize_weights, WeightFormat};

    #[test]
    fn hinv_upper_factors_the_inverse() {
        let n = 7;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = ((i * 3 + j * 5) % 7) as f64 * 0.1 + if i == j { 3.0 } else { 0.0 };
            }
        }
        let h: Vec<f64> = (0..n * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum()
            })
            .collect();
        let u = hinv_upper(h.clone(), n).unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "upper triangular");
            }
        }
        // (U^T U) H = I.
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|m| {
                        (0..n).map(|k| u[k * n + i] * u[k * n + m]).sum::<f64>() * h[m * n + j]
                    })
                    .sum();
                assert!(
                    (v - f64::from(u8::from(i == j))).abs() < 1e-9,
                    "{i} {j} {v}"
                );
            }
        }
    }

    #[test]
    fn gptq_with_a_diagonal_hessian_is_round_to_nearest() {
        let dp = Datapath {
            w_group_len: 16,
            w_scale_bits: 16,
            acc_bits: 48,
            kv_group_len: 32,
            kv_recent_window: 64,
        };
        let (n, k) = (5, 40);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let h: Vec<f64> = (0..k * k)
            .map(|e| f64::from(u8::from(e / k == e % k)))
            .collect();
        let opts = GptqOptions {
            damp: 0.01,
            act_order: false,
            calib_tokens: 0,
        };
        let prep = prepare(&h, k, &opts).unwrap();
        for (bits, f) in [(2, WeightFormat::W2), (4, WeightFormat::W4)] {
            let g = gptq_matrix(&w, n, k, &prep, bits, &dp, &opts).unwrap();
            let r = quantize_weights(&w, n, k, f, &dp).unwrap();
            assert_eq!(g.packed(), r.packed());
            assert_eq!(g.gscale_q(), r.gscale_q());
            assert_eq!(g.zero_u8(), r.zero_u8());
            assert_eq!(g.row_scale(), r.row_scale());
        }
    }
}
