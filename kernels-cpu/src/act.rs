//! N5 (docs/numerics.md) for the weight products' activations: `golden::quant::quantize_token`
//! into caller-owned buffers, on the path an [`Isa`] names (the AVX2 path does eight lanes at a
//! time; both give golden's codes and scale exactly, tested against it).

use crate::isa::Isa;

/// N5 of one token into `out`: `Some(scale_x)` (`absmax / 127`) and golden's codes
/// `round_half_away(x / scale_x)` clamped to `[-127, 127]` (all 0 for a zero scale), or `None`
/// when an input is not finite (`out` is then unspecified). An unavailable `isa` runs as
/// [`Isa::Scalar`].
///
/// # Panics
/// If `out` is not as long as `x`.
pub fn quantize_token_isa(isa: Isa, x: &[f32], out: &mut [i8]) -> Option<f32> {
    assert_eq!(x.len(), out.len(), "quantize_token_isa: one code per input");
    if isa.has_avx2() && isa.is_available() {
        return crate::avx2::quantize_token_n5(x, out);
    }
    quantize_token_portable(x, out)
}

/// The portable path of [`quantize_token_isa`] (golden's operations in golden's order, with
/// [`round_clamp_i8`] for N1 + the clamp).
pub(crate) fn quantize_token_portable(x: &[f32], out: &mut [i8]) -> Option<f32> {
    if !x.iter().all(|v| v.is_finite()) {
        return None;
    }
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale_x = absmax / 127.0;
    if scale_x == 0.0 {
        out.fill(0);
        return Some(0.0);
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = round_clamp_i8(v / scale_x);
    }
    Some(scale_x)
}

/// golden's `round_clamp_f32(y, -127, 127)` (N1, N4) without libm's `roundf`:
/// [`crate::kv::round_clamp`] (clamp to `[-128, 128]`, truncate, the exact fraction decides the
/// tie-away step). `y` must not be NaN. The AVX2 path does the same operations per lane.
#[inline]
pub(crate) fn round_clamp_i8(y: f32) -> i8 {
    #[allow(clippy::cast_possible_truncation)] // clamped to [-127, 127]
    let q = crate::kv::round_clamp(y, -127, 127) as i8;
    q
}

/// N20 for a run of one token's outputs, in the runtime's split form: `out[i] = y[i] as f32 *
/// ((c * f64::from(scale_w[i])) as f32)` (`c` = the per-call constant times the token's
/// activation scale, in `f64`). The same IEEE operations on every path (`f64` multiply, round
/// to `f32`, convert, `f32` multiply; no fused multiply-add), so the same `f32`s; on AVX2 CPUs
/// they run eight lanes at a time.
///
/// # Panics
/// If the three slices differ in length.
pub fn dequant_run(c: f64, y: &[i32], scale_w: &[f32], out: &mut [f32]) {
    assert!(
        y.len() == out.len() && scale_w.len() == out.len(),
        "dequant_run: one scale and one output per accumulator"
    );
    if Isa::Avx2.is_available() {
        crate::avx2::dequant_run_avx2(c, y, scale_w, out);
        return;
    }
    dequant_run_portable(c, y, scale_w, out);
}

#[inline(always)]
pub(crate) fn dequant_run_portable(c: f64, y: &[i32], scale_w: &[f32], out: &mut [f32]) {
    for ((o, &v), &sw) in out.iter_mut().zip(y).zip(scale_w) {
        *o = v as f32 * ((c * f64::from(sw)) as f32);
    }
}

/// `2^(i/32)` as `f64` bits, minus `i << 47` (so adding `k << 47` for `k = 32 e + i` gives
/// `2^(k/32)`): the table of the expf below.
pub(crate) const EXPF_TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// The expf constants: `32 / ln 2`, the rounding shift `1.5 * 2^52`, and the polynomial for
/// `2^(r/32)` (`C0 r^3 + C1 r^2 + C2 r + 1`).
pub(crate) const EXPF_INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe); // 0x1.71547652b82fep+5
pub(crate) const EXPF_SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000); // 0x1.8p52
pub(crate) const EXPF_C: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394), // 0x1.c6af84b912394p-5 / 32^3
    f64::from_bits(0x3f2e_bfce_50fa_c4f3), // 0x1.ebfce50fac4f3p-3 / 32^2
    f64::from_bits(0x3f96_2e42_ff0c_52d6), // 0x1.62e42ff0c52d6p-1 / 32
];

/// `e^x` for the host's `f32` softmax and SiLU (docs/numerics.md N21), the same on every CPU
/// and every path: for `|x| < 88` the algorithm of glibc's `expf` (Arm's optimized routines,
/// `x * 32 / ln 2 = k + r` by a rounding shift, `2^(k/32)` from [`EXPF_TAB`], a cubic in `r`,
/// all in `f64` with fused multiply-adds where glibc's FMA build has them, rounded once to
/// `f32`), which gives glibc's results bit for bit on x86-64 (checked for every `f32` with `|x|
/// < 88` against this machine's libm: `examples/expf_exhaustive`); elsewhere (`|x| >= 88`,
/// infinities, NaN: overflow to infinity, underflow towards 0) the platform's `f32::exp`.
#[must_use]
pub fn expf(x: f32) -> f32 {
    if x.abs() < 88.0 {
        expf_core(x)
    } else {
        x.exp()
    }
}

#[inline(always)]
fn expf_core(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd0 = EXPF_INV_LN2_N.mul_add(xd, EXPF_SHIFT);
    let ki = kd0.to_bits();
    let kd = kd0 - EXPF_SHIFT;
    let r = EXPF_INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(EXPF_TAB[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = EXPF_C[0].mul_add(r, EXPF_C[1]);
    let r2 = r * r;
    let y = EXPF_C[2].mul_add(r, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

/// [`expf`] of every element in place; four lanes at a time on CPUs with AVX2 and FMA (the
/// same operations per lane, so the same results).
pub fn expf_in_place(x: &mut [f32]) {
    if Isa::Avx2.is_available() && crate::avx2::fma_detected() {
        crate::avx2::expf_in_place_avx2(x);
        return;
    }
    for v in x {
        *v = expf(*v);
    }
}

/// `out[r] = sum_i f64(x[r d + i]) * f64(x[r d + i])` for each row `r` of `d` values, each row
/// summed in index order from zero with separate multiplies and adds: the `f64` of
/// `row.iter().map(|&v| f64::from(v) * f64::from(v)).sum()`. On AVX2 CPUs four rows run at a
/// time, one `f64` lane each (the same operations per lane, so the same sums), which takes the
/// latency of the sequential additions off the row count.
///
/// # Panics
/// If `x.len() != out.len() * d`.
pub fn sum_squares_rows(x: &[f32], d: usize, out: &mut [f64]) {
    assert_eq!(x.len(), out.len() * d, "sum_squares_rows: rows of d values");
    let mut r0 = 0;
    if Isa::Avx2.is_available() && d > 0 {
        r0 = out.len() / 4 * 4;
        crate::avx2::sum_squares_rows4(&x[..r0 * d], d, &mut out[..r0]);
    }
    for (o, row) in out[r0..].iter_mut().zip(x[r0 * d..].chunks_exact(d.max(1))) {
        *o = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    }
    if d == 0 {
        out.fill(0.0);
    }
}
