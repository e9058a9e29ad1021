//! Float -> code quantizers (docs/numerics.md N5, N7, N8, N9) and the quantized weight tensor.
//!
//! Everything here runs on the host in `f32`; the engine only ever sees the integer codes,
//! `gscale_q` multipliers and `zero_u8` zero points a [`QuantWeights`] holds.

use std::fmt;

use crate::numerics::{quantize_f32, round_clamp_f32, sat_u, Datapath, NonFinite};
use crate::pack::{pack_weights, unpack_weights, PackError};

pub use crate::pack::WeightFormat;

/// Smallest and largest `w_scale_bits` the quantizer accepts (N9: `gscale` is a `u16`).
pub const W_SCALE_BITS_MIN: u32 = 8;
pub const W_SCALE_BITS_MAX: u32 = 16;

/// Zero point of a ternary tensor: code 1 means 0.0, on the 8-bit lattice `1 << 6` (N8).
pub const TERNARY_ZERO_U8: u8 = 64;

/// Why a float tensor could not be quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantError {
    /// An input value was NaN or infinite (N4).
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    /// A group's range `hi - lo` (or its absmean sum) overflowed `f32`.
    RangeOverflow { what: &'static str, index: usize },
    /// A length did not match the declared shape.
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A size parameter was zero.
    ZeroSize { what: &'static str },
    /// `w_scale_bits` outside 8..=16 (N9).
    ScaleBits { w_scale_bits: u32 },
    /// A hand-built tensor's metadata broke a rule (N8, N9).
    BadMetadata { what: &'static str, index: usize },
    /// The codes could not be packed (N11).
    Pack(PackError),
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantError::NonFinite { what, index, value } => {
                write!(
                    f,
                    "{what} at index {index} is not finite ({value}): quantize only finite values"
                )
            }
            QuantError::RangeOverflow { what, index } => {
                write!(f, "{what} {index}: value range overflows f32")
            }
            QuantError::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            QuantError::ZeroSize { what } => write!(f, "{what} must be at least 1"),
            QuantError::ScaleBits { w_scale_bits } => write!(
                f,
                "w_scale_bits {w_scale_bits} not in {W_SCALE_BITS_MIN}..={W_SCALE_BITS_MAX}"
            ),
            QuantError::BadMetadata { what, index } => {
                write!(f, "invalid {what} at index {index}")
            }
            QuantError::Pack(e) => write!(f, "packing failed: {e}"),
        }
    }
}

impl std::error::Error for QuantError {}

impl From<PackError> for QuantError {
    fn from(e: PackError) -> Self {
        QuantError::Pack(e)
    }
}

fn check_finite(what: &'static str, values: &[f32]) -> Result<(), QuantError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            what,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

fn from_non_finite(e: NonFinite, index: usize) -> QuantError {
    QuantError::NonFinite {
        what: e.what,
        index,
        value: e.value,
    }
}

/// `2^e` as `f32`, exact for `e` in 0..=62.
fn pow2_f32(e: u32) -> f32 {
    assert!(e <= 62, "pow2_f32: exponent {e} > 62");
    #[allow(clippy::cast_precision_loss)] // a power of two is exact in f32
    let p = (1u64 << e) as f32;
    p
}

/// Codes of one token and its scale (N5).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenCodes {
    pub codes_i8: Vec<i8>,
    /// `absmax / 127`, kept by the host (N6); 0.0 for an all-zero token.
    pub scale_x: f32,
}

/// N5: per-token symmetric int8. `scale_x = absmax / 127` (`f32`); codes in `[-127, 127]`.
/// If `scale_x == 0` (all-zero token, or `absmax / 127` underflows) every code is 0.
pub fn quantize_token(x: &[f32]) -> Result<TokenCodes, QuantError> {
    check_finite("activation", x)?;
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale_x = absmax / 127.0;
    if scale_x == 0.0 {
        return Ok(TokenCodes {
            codes_i8: vec![0; x.len()],
            scale_x: 0.0,
        });
    }
    let mut codes_i8 = Vec::with_capacity(x.len());
    for (index, &v) in x.iter().enumerate() {
        let q = quantize_f32(v, scale_x, -127, 127).map_err(|e| from_non_finite(e, index))?;
        codes_i8.push(i8::try_from(q).expect("quantize_f32 clamps to [-127, 127]"));
    }
    Ok(TokenCodes { codes_i8, scale_x })
}

/// Activation codes of `m` tokens of length `k`, row-major, with one scale per token (N5, N6).
#[derive(Debug, Clone, PartialEq)]
pub struct ActCodes {
    pub m_tokens: usize,
    pub k: usize,
    /// `[t][j]`, `k` contiguous.
    pub codes_i8: Vec<i8>,
    pub scale_x: Vec<f32>,
}

/// N5 for every token of a row-major `[m][k]` float matrix.
pub fn quantize_tokens(x: &[f32], m_tokens: usize, k: usize) -> Result<ActCodes, QuantError> {
    if m_tokens == 0 || k == 0 {
        return Err(QuantError::ZeroSize {
            what: "activation rows and k",
        });
    }
    if x.len() != m_tokens * k {
        return Err(QuantError::Shape {
            what: "activations",
            expected: m_tokens * k,
            got: x.len(),
        });
    }
    let mut codes_i8 = Vec::with_capacity(x.len());
    let mut scale_x = Vec::with_capacity(m_tokens);
    for (t, row) in x.chunks_exact(k).enumerate() {
        let tok = quantize_token(row).map_err(|e| match e {
            QuantError::NonFinite { what, index, value } => QuantError::NonFinite {
                what,
                index: t * k + index,
                value,
            },
            other => other,
        })?;
        codes_i8.extend_from_slice(&tok.codes_i8);
        scale_x.push(tok.scale_x);
    }
    Ok(ActCodes {
        m_tokens,
        k,
        codes_i8,
        scale_x,
    })
}

/// One quantized group: codes, the `f32` step `scale_g` and the zero point on the 8-bit lattice.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupCodes {
    pub codes: Vec<u8>,
    pub scale_g: f32,
    pub zero_u8: u8,
}

/// N7: group-wise asymmetric min-max codes of `bits` in {2, 4, 8} with a zero point of
/// `8 - bits` fractional bits. An all-zero group (or one whose step underflows `f32` to 0) has
/// `scale_g = 0`, `zero_u8 = 0` and codes 0.
pub fn quantize_group_asym(w: &[f32], bits: u32) -> Result<GroupCodes, QuantError> {
    assert!(
        matches!(bits, 2 | 4 | 8),
        "quantize_group_asym: bits {bits} not in {{2, 4, 8}}"
    );
    if w.is_empty() {
        return Err(QuantError::ZeroSize {
            what: "group length",
        });
    }
    check_finite("weight", w)?;
    let lo = w.iter().fold(0.0f32, |m, &v| m.min(v));
    let hi = w.iter().fold(0.0f32, |m, &v| m.max(v));
    let zero_group = GroupCodes {
        codes: vec![0; w.len()],
        scale_g: 0.0,
        zero_u8: 0,
    };
    if hi == lo {
        return Ok(zero_group);
    }
    let range = hi - lo;
    if !range.is_finite() {
        return Err(QuantError::RangeOverflow {
            what: "group",
            index: 0,
        });
    }
    let max_code = (1i64 << bits) - 1;
    #[allow(clippy::cast_precision_loss)] // max_code <= 255
    let scale_g = range / max_code as f32;
    if scale_g == 0.0 {
        return Ok(zero_group);
    }
    let lattice = pow2_f32(8 - bits);
    // -lo / scale_g <= 2^B - 1, so the zero point never needs the saturation in practice.
    let zero_i64 = sat_u(round_clamp_f32(-lo / scale_g * lattice, 0, 255), 8);
    let zero_u8 = u8::try_from(zero_i64).expect("sat_u(.., 8) fits u8");
    let zero_f32 = f32::from(zero_u8) / lattice;
    let codes = w
        .iter()
        .map(|&v| {
            let q = round_clamp_f32(v / scale_g + zero_f32, 0, max_code);
            u8::try_from(q).expect("clamped to [0, 2^B - 1]")
        })
        .collect();
    Ok(GroupCodes {
        codes,
        scale_g,
        zero_u8,
    })
}

/// N8: ternary (BitNet b1.58) codes {0, 1, 2} for {-1, 0, +1}, `scale_g = mean |w|` (summed in
/// index order in `f32`), zero point fixed at 64. An all-zero group (or one whose absmean
/// underflows to 0) has `scale_g = 0` and every code 1 (the code for 0.0).
pub fn quantize_group_ternary(w: &[f32]) -> Result<GroupCodes, QuantError> {
    if w.is_empty() {
        return Err(QuantError::ZeroSize {
            what: "group length",
        });
    }
    check_finite("weight", w)?;
    let sum_abs = w.iter().fold(0.0f32, |s, v| s + v.abs());
    if !sum_abs.is_finite() {
        return Err(QuantError::RangeOverflow {
            what: "ternary group",
            index: 0,
        });
    }
    #[allow(clippy::cast_precision_loss)] // group lengths are far below 2^24
    let scale_g = sum_abs / w.len() as f32;
    if scale_g == 0.0 {
        return Ok(GroupCodes {
            codes: vec![1; w.len()],
            scale_g: 0.0,
            zero_u8: TERNARY_ZERO_U8,
        });
    }
    let mut codes = Vec::with_capacity(w.len());
    for (index, &v) in w.iter().enumerate() {
        let q = quantize_f32(v, scale_g, -1, 1).map_err(|e| from_non_finite(e, index))?;
        codes.push(u8::try_from(q + 1).expect("q + 1 in {0, 1, 2}"));
    }
    Ok(GroupCodes {
        codes,
        scale_g,
        zero_u8: TERNARY_ZERO_U8,
    })
}

/// N9 (and the fold scales of N17): `s_ref = max_e s_e` and
/// `m_e = round_half_away(s_e / s_ref * 2^sf)` in `[0, 2^sf]`, computed in `f32`.
/// All-zero scales give `s_ref = 0` and every multiplier 0.
///
/// # Panics
/// If a scale is negative or not finite, or `sf > 15` (the quantizers never produce those).
#[must_use]
pub fn scale_multipliers(scales: &[f32], sf: u32) -> (f32, Vec<u16>) {
    assert!(
        sf <= 15,
        "scale_multipliers: {sf} fractional bits do not fit a u16 multiplier"
    );
    assert!(
        scales.iter().all(|s| s.is_finite() && *s >= 0.0),
        "scale_multipliers: scales must be finite and >= 0"
    );
    let s_ref = scales.iter().fold(0.0f32, |m, &s| m.max(s));
    if s_ref == 0.0 {
        return (0.0, vec![0; scales.len()]);
    }
    let one_q = 1i64 << sf;
    let mults = scales
        .iter()
        .map(|&s| {
            let m = round_clamp_f32(s / s_ref * pow2_f32(sf), 0, one_q);
            u16::try_from(m).expect("multiplier in [0, 2^sf] with sf <= 15")
        })
        .collect();
    (s_ref, mults)
}

/// A quantized weight matrix `W[n][k]` as the engine stores it (N7-N11).
///
/// Invariants (checked at construction): codes legal for the format, `gscale_q <= 2^SF`,
/// ternary zero points are 64, row scales finite and `>= 0`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeights {
    format: WeightFormat,
    n_rows: usize,
    k: usize,
    k_group_len: usize,
    w_scale_bits: u32,
    /// N11 layout: `n_rows * packed_row_bytes` bytes.
    packed: Vec<u8>,
    /// `[n][g]`, in `[0, 2^SF]` (N9).
    gscale_q: Vec<u16>,
    /// `[n][g]`, `8 - B` fractional bits (N7).
    zero_u8: Vec<u8>,
    /// `[n]`, host side (N9).
    row_scale: Vec<f32>,
    /// `[n][g]`, the unrounded N7 step `scale_g` (host diagnostics and error bounds; the engine
    /// never sees it). For tensors built with [`QuantWeights::from_codes`] it is
    /// `row_scale * gscale_q / 2^SF`.
    group_scale_f32: Vec<f32>,
}

impl QuantWeights {
    /// Builds a tensor from unpacked `[n][k]` codes and its metadata, checking every invariant.
    #[allow(clippy::too_many_arguments)]
    pub fn from_codes(
        format: WeightFormat,
        n_rows: usize,
        k: usize,
        k_group_len: usize,
        w_scale_bits: u32,
        codes: &[u8],
        gscale_q: Vec<u16>,
        zero_u8: Vec<u8>,
        row_scale: Vec<f32>,
    ) -> Result<Self, QuantError> {
        let packed = pack_weights(codes, n_rows, k, k_group_len, format)?;
        Self::from_packed(
            format,
            n_rows,
            k,
            k_group_len,
            w_scale_bits,
            packed,
            gscale_q,
            zero_u8,
            row_scale,
        )
    }

    /// Builds a tensor from N11-packed codes and its metadata, checking every invariant.
    #[allow(clippy::too_many_arguments)]
    pub fn from_packed(
        format: WeightFormat,
        n_rows: usize,
        k: usize,
        k_group_len: usize,
        w_scale_bits: u32,
        packed: Vec<u8>,
        gscale_q: Vec<u16>,
        zero_u8: Vec<u8>,
        row_scale: Vec<f32>,
    ) -> Result<Self, QuantError> {
        if !(W_SCALE_BITS_MIN..=W_SCALE_BITS_MAX).contains(&w_scale_bits) {
            return Err(QuantError::ScaleBits { w_scale_bits });
        }
        // Validates shape, codes and padding.
        unpack_weights(&packed, n_rows, k, k_group_len, format)?;
        let groups = k.div_ceil(k_group_len);
        let meta = n_rows * groups;
        if gscale_q.len() != meta {
            return Err(QuantError::Shape {
                what: "gscale",
                expected: meta,
                got: gscale_q.len(),
            });
        }
        if zero_u8.len() != meta {
            return Err(QuantError::Shape {
                what: "zero_u8",
                expected: meta,
                got: zero_u8.len(),
            });
        }
        if row_scale.len() != n_rows {
            return Err(QuantError::Shape {
                what: "row_scale",
                expected: n_rows,
                got: row_scale.len(),
            });
        }
        let one_q = 1u32 << (w_scale_bits - 1);
        if let Some(index) = gscale_q.iter().position(|&m| u32::from(m) > one_q) {
            return Err(QuantError::BadMetadata {
                what: "gscale (> 2^SF, N9)",
                index,
            });
        }
        if format == WeightFormat::Ternary {
            if let Some(index) = zero_u8.iter().position(|&z| z != TERNARY_ZERO_U8) {
                return Err(QuantError::BadMetadata {
                    what: "ternary zero point (must be 64, N8)",
                    index,
                });
            }
        }
        if let Some(index) = row_scale.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(QuantError::BadMetadata {
                what: "row_scale (finite, >= 0)",
                index,
            });
        }
        let sf_pow = pow2_f32(w_scale_bits - 1);
        let group_scale_f32 = gscale_q
            .iter()
            .enumerate()
            .map(|(i, &m)| row_scale[i / groups] * (f32::from(m) / sf_pow))
            .collect();
        Ok(QuantWeights {
            format,
            n_rows,
            k,
            k_group_len,
            w_scale_bits,
            packed,
            gscale_q,
            zero_u8,
            row_scale,
            group_scale_f32,
        })
    }

    #[must_use]
    pub fn format(&self) -> WeightFormat {
        self.format
    }
    #[must_use]
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    #[must_use]
    pub fn k(&self) -> usize {
        self.k
    }
    #[must_use]
    pub fn k_group_len(&self) -> usize {
        self.k_group_len
    }
    #[must_use]
    pub fn w_scale_bits(&self) -> u32 {
        self.w_scale_bits
    }
    /// `SF = w_scale_bits - 1` (N9).
    #[must_use]
    pub fn scale_frac_bits(&self) -> u32 {
        self.w_scale_bits - 1
    }
    /// `ceil(k / k_group_len)`.
    #[must_use]
    pub fn groups_per_row(&self) -> usize {
        self.k.div_ceil(self.k_group_len)
    }
    /// The N11 bytes.
    #[must_use]
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    /// `[n][g]` group-scale multipliers (N9).
    #[must_use]
    pub fn gscale_q(&self) -> &[u16] {
        &self.gscale_q
    }
    /// `[n][g]` zero points (N7).
    #[must_use]
    pub fn zero_u8(&self) -> &[u8] {
        &self.zero_u8
    }
    /// `[n]` per-row `f32` scales (N9).
    #[must_use]
    pub fn row_scale(&self) -> &[f32] {
        &self.row_scale
    }
    /// `[n][g]` unrounded N7 group steps (see the field's documentation).
    #[must_use]
    pub fn group_scale_f32(&self) -> &[f32] {
        &self.group_scale_f32
    }

    /// Unpacked `[n][k]` codes (no padding).
    #[must_use]
    pub fn codes(&self) -> Vec<u8> {
        unpack_weights(
            &self.packed,
            self.n_rows,
            self.k,
            self.k_group_len,
            self.format,
        )
        .expect("packed codes were validated at construction")
    }

    /// Bytes the engine stores: packed codes, `gscale` (2 bytes), `zero_u8` (1 byte) per group.
    /// `row_scale` stays on the host (N9) and is not counted.
    #[must_use]
    pub fn engine_bytes(&self) -> usize {
        self.packed.len() + 3 * self.gscale_q.len()
    }

    /// The weights the engine computes with, in `f32`:
    /// `row_scale * gscale_q / 2^SF * (wl - zero_u8) / 2^(8-B)` (N9, N10), evaluated in `f64`.
    #[must_use]
    pub fn dequantize(&self) -> Vec<f32> {
        let sf_pow = f64::from(pow2_f32(self.scale_frac_bits()));
        self.dequantize_with(|row, g| {
            f64::from(self.row_scale[row])
                * f64::from(self.gscale_q[row * self.groups_per_row() + g])
                / sf_pow
        })
    }

    /// The N7 grid before N9's rounding: `scale_g * (wl - zero_u8) / 2^(8-B)`.
    #[must_use]
    pub fn dequantize_with_group_scales(&self) -> Vec<f32> {
        self.dequantize_with(|row, g| {
            f64::from(self.group_scale_f32[row * self.groups_per_row() + g])
        })
    }

    fn dequantize_with(&self, step: impl Fn(usize, usize) -> f64) -> Vec<f32> {
        let codes = self.codes();
        let shift = self.format.lattice_shift();
        let lattice = f64::from(pow2_f32(shift));
        let groups = self.groups_per_row();
        let mut out = Vec::with_capacity(self.n_rows * self.k);
        for row in 0..self.n_rows {
            for j in 0..self.k {
                let g = j / self.k_group_len;
                let wl = i32::from(codes[row * self.k + j]) << shift;
                let eff = wl - i32::from(self.zero_u8[row * groups + g]);
                #[allow(clippy::cast_possible_truncation)] // to the f32 the host uses
                out.push((step(row, g) * f64::from(eff) / lattice) as f32);
            }
        }
        out
    }
}

/// N7-N11: quantizes a row-major `W[n][k]` with the group length and scale width of `dp`.
pub fn quantize_weights(
    w: &[f32],
    n_rows: usize,
    k: usize,
    format: WeightFormat,
    dp: &Datapath,
) -> Result<QuantWeights, QuantError> {
    if n_rows == 0 || k == 0 || dp.w_group_len == 0 {
        return Err(QuantError::ZeroSize {
            what: "rows n, k and w_group_len",
        });
    }
    if !(W_SCALE_BITS_MIN..=W_SCALE_BITS_MAX).contains(&dp.w_scale_bits) {
        return Err(QuantError::ScaleBits {
            w_scale_bits: dp.w_scale_bits,
        });
    }
    if w.len() != n_rows * k {
        return Err(QuantError::Shape {
            what: "weights",
            expected: n_rows * k,
            got: w.len(),
        });
    }
    check_finite("weight", w)?;
    let k_group_len = dp.w_group_len;
    let groups = k.div_ceil(k_group_len);
    let mut codes = Vec::with_capacity(n_rows * k);
    let mut gscale_q = Vec::with_capacity(n_rows * groups);
    let mut zero_u8 = Vec::with_capacity(n_rows * groups);
    let mut row_scale = Vec::with_capacity(n_rows);
    let mut group_scale_f32 = Vec::with_capacity(n_rows * groups);
    for (row, w_row) in w.chunks_exact(k).enumerate() {
        let mut scales = Vec::with_capacity(groups);
        for (g, w_group) in w_row.chunks(k_group_len).enumerate() {
            let gq = match format {
                WeightFormat::Ternary => quantize_group_ternary(w_group),
                _ => quantize_group_asym(w_group, format.bits()),
            }
            .map_err(|e| match e {
                QuantError::RangeOverflow { what, .. } => QuantError::RangeOverflow {
                    what,
                    index: row * groups + g,
                },
                other => other,
            })?;
            codes.extend_from_slice(&gq.codes);
            scales.push(gq.scale_g);
            zero_u8.push(gq.zero_u8);
        }
        let (s_row, mults) = scale_multipliers(&scales, dp.scale_frac_bits());
        row_scale.push(s_row);
        gscale_q.extend_from_slice(&mults);
        group_scale_f32.extend_from_slice(&scales);
    }
    let mut qw = QuantWeights::from_codes(
        format,
        n_rows,
        k,
        k_group_len,
        dp.w_scale_bits,
        &codes,
        gscale_q,
        zero_u8,
        row_scale,
    )?;
    qw.group_scale_f32 = group_scale_f32;
    Ok(qw)
}
