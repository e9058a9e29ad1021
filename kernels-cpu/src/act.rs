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
