//! Rounding and saturation helpers: the only definitions in the project (docs/numerics.md N1-N4).
//!
//! Every other module (golden ops, kernels-cpu, the host runtime) calls these; none restates them.

/// Largest shift `round_shift` accepts (N2): the golden model computes in `i64`.
pub const SHIFT_MAX: u32 = 62;

/// N1: round half away from zero (the mode of `f32::round`).
#[must_use]
pub fn round_half_away_f32(v: f32) -> f32 {
    v.round()
}

/// N2: rounding arithmetic right shift, ties away from zero: `(x + 2^(s-1) - [x<0]) >> s`.
#[must_use]
pub fn round_shift(x: i64, s: u32) -> i64 {
    assert!(s <= SHIFT_MAX, "round_shift: shift {s} > {SHIFT_MAX}");
    if s == 0 {
        return x;
    }
    let half = 1i64 << (s - 1);
    let bias = half - i64::from(x < 0);
    // Exact in i128 so that x near i64::MAX cannot wrap.
    let sum = i128::from(x) + i128::from(bias);
    i64::try_from(sum >> s).expect("shifted value fits i64 since s >= 1")
}

/// Smallest value of a `bits`-wide two's-complement integer.
#[must_use]
pub fn min_signed(bits: u32) -> i64 {
    assert!(
        (1..=64).contains(&bits),
        "min_signed: bits {bits} not in 1..=64"
    );
    if bits == 64 {
        i64::MIN
    } else {
        -(1i64 << (bits - 1))
    }
}

/// Largest value of a `bits`-wide two's-complement integer.
#[must_use]
pub fn max_signed(bits: u32) -> i64 {
    assert!(
        (1..=64).contains(&bits),
        "max_signed: bits {bits} not in 1..=64"
    );
    if bits == 64 {
        i64::MAX
    } else {
        (1i64 << (bits - 1)) - 1
    }
}

/// N3: clamp to the signed range of `bits` bits.
#[must_use]
pub fn sat(x: i64, bits: u32) -> i64 {
    x.clamp(min_signed(bits), max_signed(bits))
}

/// N3: clamp to the unsigned range of `bits` bits (`bits` in 1..=62).
#[must_use]
pub fn sat_u(x: i64, bits: u32) -> i64 {
    assert!((1..=62).contains(&bits), "sat_u: bits {bits} not in 1..=62");
    x.clamp(0, (1i64 << bits) - 1)
}

/// A float input or scale was NaN or infinite (N4).
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    /// What was being quantized (for the error message).
    pub what: &'static str,
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is not finite ({}): quantize only finite values",
            self.what, self.value
        )
    }
}

impl std::error::Error for NonFinite {}

/// N4: `clamp(round_half_away(v / scale), lo, hi)` in `f32`. `scale` must be finite and > 0.
pub fn quantize_f32(v: f32, scale: f32, lo: i64, hi: i64) -> Result<i64, NonFinite> {
    if !v.is_finite() {
        return Err(NonFinite {
            what: "input value",
            value: v,
        });
    }
    if !scale.is_finite() || scale <= 0.0 {
        return Err(NonFinite {
            what: "quantizer scale",
            value: scale,
        });
    }
    assert!(lo <= hi, "quantize_f32: empty range [{lo}, {hi}]");
    Ok(round_clamp_f32(v / scale, lo, hi))
}

/// N1 then a clamp: `clamp(round_half_away(v), lo, hi)` as an integer. `v` must not be NaN;
/// `+-inf` (e.g. a quotient that overflowed `f32`) clamps to `hi` / `lo`. Used by N4's
/// `quantize_f32` and by the quantizers whose formula is not a plain `v / scale` (N7, N9).
#[must_use]
pub fn round_clamp_f32(v: f32, lo: i64, hi: i64) -> i64 {
    assert!(
        !v.is_nan(),
        "round_clamp_f32: NaN (callers reject non-finite inputs first)"
    );
    assert!(lo <= hi, "round_clamp_f32: empty range [{lo}, {hi}]");
    let r = round_half_away_f32(v);
    if !r.is_finite() {
        return if r > 0.0 { hi } else { lo };
    }
    // Clamp in f32 first so the cast cannot saturate silently at i64's range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let q = r.clamp(lo as f32, hi as f32) as i64;
    q.clamp(lo, hi)
}

/// The sizes of the integer datapath that the numerics rules depend on, taken from
/// `EngineConfig` (`EngineConfig::datapath()`). Golden ops take this, never the whole config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datapath {
    /// Weight group length along the input dimension (N7), in elements.
    pub w_group_len: usize,
    /// Width of a group-scale multiplier (N9); `SF = w_scale_bits - 1`.
    pub w_scale_bits: u32,
    /// Accumulator width (N13), saturated after every group.
    pub acc_bits: u32,
    /// Tokens per key group of the KV4 cache (N16).
    pub kv_group_len: usize,
    /// Most recent tokens kept at 8 bits (N16), a multiple of `kv_group_len`.
    pub kv_recent_window: usize,
}

impl Datapath {
    /// Fractional bits of a group-scale multiplier (N9).
    #[must_use]
    pub fn scale_frac_bits(&self) -> u32 {
        self.w_scale_bits - 1
    }
}
