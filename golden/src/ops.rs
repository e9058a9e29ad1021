//! The bit-exact reference of one engine weight operation (docs/numerics.md N12-N15) and its
//! dequantization (N20). Written for clarity, not speed: every bound the contract states is
//! asserted, so an overflow in the model is a failed assertion, never a silent wrap.

use std::fmt;

use crate::numerics::{round_shift, sat, Datapath, SHIFT_MAX};
use crate::quant::QuantWeights;

/// Accumulator widths the engine supports (N13).
pub const ACC_BITS_MIN: u32 = 32;
pub const ACC_BITS_MAX: u32 = 48;

/// Why a weight operation could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// A length did not match the declared shape.
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A size parameter was zero.
    ZeroSize { what: &'static str },
    /// The tensor was quantized for another datapath (group length or scale width).
    DatapathMismatch {
        what: &'static str,
        datapath: usize,
        tensor: usize,
    },
    /// `acc_bits` outside 32..=48 (N13).
    AccBits { acc_bits: u32 },
    /// An output stage parameter outside its range (N14).
    OutputStage { what: &'static str, value: u64 },
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            OpError::ZeroSize { what } => write!(f, "{what} must be at least 1"),
            OpError::DatapathMismatch {
                what,
                datapath,
                tensor,
            } => write!(
                f,
                "{what} of the tensor ({tensor}) differs from the datapath's ({datapath})"
            ),
            OpError::AccBits { acc_bits } => {
                write!(
                    f,
                    "acc_bits {acc_bits} not in {ACC_BITS_MIN}..={ACC_BITS_MAX}"
                )
            }
            OpError::OutputStage { what, value } => {
                write!(f, "output stage {what} {value} out of range")
            }
        }
    }
}

impl std::error::Error for OpError {}

/// N14: `y = sat(round_shift(acc * out_mult, out_shift), out_bits)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputStage {
    /// Integer multiplier, `>= 1` (1 = identity).
    pub out_mult: u16,
    /// Rounding right shift, 0..=62.
    pub out_shift: u32,
    /// Output width, one of 8, 16, 32.
    pub out_bits: u32,
}

impl OutputStage {
    /// The runtime's stage for weight operations (N14): `out_shift = SF` drops the group-scale
    /// fraction, so `y` is in lattice units and `|y| <= k * 128 * 255`; it cannot saturate for
    /// `k <= K_MAX_LATTICE_I32`.
    #[must_use]
    pub const fn weight_lattice_i32(scale_frac_bits: u32) -> OutputStage {
        OutputStage {
            out_mult: 1,
            out_shift: scale_frac_bits,
            out_bits: 32,
        }
    }

    /// Largest `k` for which [`Self::weight_lattice_i32`] cannot saturate: `(2^31 - 1) / (128 * 255)`.
    pub const K_MAX_LATTICE_I32: usize = ((1u64 << 31) - 1) as usize / (128 * 255);

    /// `out_mult = 1, out_shift = 0, out_bits = 32`: the runtime's stage for the KV products,
    /// whose accumulators fit 32 bits for `head_dim` and context lengths below 2^16 (N14).
    /// A weight operation's accumulator can exceed 32 bits: use [`Self::weight_lattice_i32`].
    pub const IDENTITY_I32: OutputStage = OutputStage {
        out_mult: 1,
        out_shift: 0,
        out_bits: 32,
    };

    /// Checks the ranges of N14.
    pub fn check(&self) -> Result<(), OpError> {
        if self.out_mult == 0 {
            return Err(OpError::OutputStage {
                what: "out_mult",
                value: 0,
            });
        }
        if self.out_shift > SHIFT_MAX {
            return Err(OpError::OutputStage {
                what: "out_shift",
                value: u64::from(self.out_shift),
            });
        }
        if !matches!(self.out_bits, 8 | 16 | 32) {
            return Err(OpError::OutputStage {
                what: "out_bits",
                value: u64::from(self.out_bits),
            });
        }
        Ok(())
    }

    /// N14 on one accumulator of at most `acc_bits` (<= 48) bits.
    ///
    /// # Panics
    /// If [`OutputStage::check`] fails (callers check user stages first, as [`weight_op`] does).
    #[must_use]
    pub fn apply(&self, acc_i64: i64) -> i64 {
        assert!(
            self.check().is_ok(),
            "OutputStage::apply: unchecked stage {self:?}"
        );
        assert!(
            acc_i64.unsigned_abs() <= 1u64 << (ACC_BITS_MAX - 1),
            "OutputStage::apply: acc {acc_i64} wider than {ACC_BITS_MAX} bits"
        );
        // |acc| <= 2^47 and out_mult < 2^16, so the product is exact in i64 (N14).
        let product_i64 = acc_i64
            .checked_mul(i64::from(self.out_mult))
            .expect("|acc * out_mult| < 2^63");
        sat(round_shift(product_i64, self.out_shift), self.out_bits)
    }
}

fn check_acc_bits(acc_bits: u32) -> Result<(), OpError> {
    if (ACC_BITS_MIN..=ACC_BITS_MAX).contains(&acc_bits) {
        Ok(())
    } else {
        Err(OpError::AccBits { acc_bits })
    }
}

/// N12 bound on a group partial sum: `|G| <= L * 128 * 255` for a group of `L` elements.
#[must_use]
pub fn group_sum_bound(k_group_len: usize) -> i64 {
    i64::try_from(k_group_len).expect("group length fits i64") * 128 * 255
}

/// N12 `gpsum_bits = 1 + ceil(log2(L * 128 * 255 + 1))`: the signed width of a group partial sum.
#[must_use]
pub fn gpsum_bits(k_group_len: usize) -> u32 {
    let magnitude = u64::try_from(group_sum_bound(k_group_len)).expect("bound >= 0");
    1 + (u64::BITS - magnitude.leading_zeros())
}

/// The three exact sums of N12 for one token, row and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSums {
    /// `P = sum x_i8 * wl`.
    pub p_i64: i64,
    /// `S = sum x_i8` (shared by every row).
    pub s_i64: i64,
    /// `G = P - zero_u8 * S`.
    pub g_i64: i64,
}

/// N12 for token row `x_i8` (length `k`) against weight row `row` given its unpacked codes
/// `codes_row` (length `k`): one [`GroupSums`] per group, ascending. Positions past `k` are
/// zero activations, so the padding codes add nothing.
///
/// # Panics
/// If the lengths do not match the tensor (an internal invariant of [`weight_acc`]).
#[must_use]
pub fn group_partial_sums(
    w: &QuantWeights,
    row: usize,
    codes_row: &[u8],
    x_i8: &[i8],
) -> Vec<GroupSums> {
    assert_eq!(x_i8.len(), w.k(), "group_partial_sums: activation length");
    assert_eq!(
        codes_row.len(),
        w.k(),
        "group_partial_sums: code row length"
    );
    assert!(
        row < w.n_rows(),
        "group_partial_sums: row {row} out of range"
    );
    let k_group_len = w.k_group_len();
    let lattice_shift = w.format().lattice_shift();
    let groups = w.groups_per_row();
    let bound = group_sum_bound(k_group_len);
    let mut sums = Vec::with_capacity(groups);
    for g in 0..groups {
        let zero_u8 = i64::from(w.zero_u8()[row * groups + g]);
        let range = g * k_group_len..((g + 1) * k_group_len).min(w.k());
        let mut p_i64 = 0i64;
        let mut s_i64 = 0i64;
        for j in range {
            let x = i64::from(x_i8[j]);
            let wl_u8 = i64::from(codes_row[j]) << lattice_shift; // N10: in [0, 255]
            assert!(
                (0..=255).contains(&wl_u8),
                "N10: lattice weight {wl_u8} outside [0, 255]"
            );
            p_i64 += x * wl_u8;
            s_i64 += x;
        }
        let g_i64 = p_i64 - zero_u8 * s_i64;
        assert!(p_i64.abs() <= bound, "N12: |P| = {} > {bound}", p_i64.abs());
        assert!(
            s_i64.abs() <= bound / 255,
            "N12: |S| = {} too large",
            s_i64.abs()
        );
        assert!(g_i64.abs() <= bound, "N12: |G| = {} > {bound}", g_i64.abs());
        sums.push(GroupSums {
            p_i64,
            s_i64,
            g_i64,
        });
    }
    sums
}

/// N13 for one (token, row): `acc_{g+1} = sat(acc_g + gscale_q[g] * G[g], acc_bits)`, groups in
/// ascending order, saturating after every addition.
#[must_use]
pub fn accumulate_groups(gscale_q: &[u16], sums: &[GroupSums], sf: u32, acc_bits: u32) -> i64 {
    assert_eq!(
        gscale_q.len(),
        sums.len(),
        "accumulate_groups: one multiplier per group"
    );
    assert!(
        (ACC_BITS_MIN..=ACC_BITS_MAX).contains(&acc_bits),
        "accumulate_groups: acc_bits {acc_bits}"
    );
    let mut acc_i64 = 0i64;
    for (&m, s) in gscale_q.iter().zip(sums) {
        assert!(u32::from(m) <= 1u32 << sf, "N9: gscale {m} > 2^{sf}");
        let scaled_i64 = i64::from(m) * s.g_i64; // exact: |.| <= 2^SF * |G| < 2^(SF + 23)
        acc_i64 = sat(acc_i64 + scaled_i64, acc_bits);
    }
    acc_i64
}

fn check_op_inputs(
    dp: &Datapath,
    x_i8: &[i8],
    m_tokens: usize,
    w: &QuantWeights,
) -> Result<(), OpError> {
    check_acc_bits(dp.acc_bits)?;
    if m_tokens == 0 {
        return Err(OpError::ZeroSize { what: "tokens M" });
    }
    if dp.w_group_len != w.k_group_len() {
        return Err(OpError::DatapathMismatch {
            what: "w_group_len",
            datapath: dp.w_group_len,
            tensor: w.k_group_len(),
        });
    }
    if dp.w_scale_bits != w.w_scale_bits() {
        return Err(OpError::DatapathMismatch {
            what: "w_scale_bits",
            datapath: dp.w_scale_bits as usize,
            tensor: w.w_scale_bits() as usize,
        });
    }
    if x_i8.len() != m_tokens * w.k() {
        return Err(OpError::Shape {
            what: "activation codes",
            expected: m_tokens * w.k(),
            got: x_i8.len(),
        });
    }
    Ok(())
}

/// N12 + N13 for `m_tokens` activation rows (`x_i8` row-major `[t][k]`) against every weight
/// row: the saturated accumulators `acc[t][n]`.
pub fn weight_acc(
    dp: &Datapath,
    x_i8: &[i8],
    m_tokens: usize,
    w: &QuantWeights,
) -> Result<Vec<Vec<i64>>, OpError> {
    check_op_inputs(dp, x_i8, m_tokens, w)?;
    let codes = w.codes();
    let groups = w.groups_per_row();
    let sf = w.scale_frac_bits();
    let mut acc = Vec::with_capacity(m_tokens);
    for x_row in x_i8.chunks_exact(w.k()) {
        let mut acc_row = Vec::with_capacity(w.n_rows());
        for row in 0..w.n_rows() {
            let codes_row = &codes[row * w.k()..(row + 1) * w.k()];
            let sums = group_partial_sums(w, row, codes_row, x_row);
            let gscale_q = &w.gscale_q()[row * groups..(row + 1) * groups];
            acc_row.push(accumulate_groups(gscale_q, &sums, sf, dp.acc_bits));
        }
        acc.push(acc_row);
    }
    Ok(acc)
}

/// N12-N14: the engine's integer outputs `y[t][n]` of one weight operation (GEMM for
/// `m_tokens > 1`, GEMV for 1; N15: the same function).
pub fn weight_op(
    dp: &Datapath,
    x_i8: &[i8],
    m_tokens: usize,
    w: &QuantWeights,
    stage: &OutputStage,
) -> Result<Vec<Vec<i64>>, OpError> {
    stage.check()?;
    let acc = weight_acc(dp, x_i8, m_tokens, w)?;
    Ok(acc
        .into_iter()
        .map(|row| row.into_iter().map(|a| stage.apply(a)).collect())
        .collect())
}

/// Lattice fractional bits of a weight operation's output: `SF + 8 - B` (N20).
#[must_use]
pub fn weight_frac_bits(w: &QuantWeights) -> u32 {
    w.scale_frac_bits() + w.format().lattice_shift()
}

/// N20: the `f32` factor that turns an engine output `y` into a real value:
/// `2^out_shift / out_mult * scale_x * scale_w * 2^-frac_bits`, where for a weight operation
/// `scale_w = row_scale[n]` and `frac_bits = SF + 8 - B` ([`weight_frac_bits`]); for KV
/// products see `kv`. Evaluated in `f64` (exact but for two roundings) and rounded once to `f32`;
/// the host computes `y as f32 * factor`.
#[must_use]
pub fn dequant_factor(stage: &OutputStage, scale_x: f32, scale_w: f32, frac_bits: u32) -> f32 {
    assert!(
        stage.check().is_ok(),
        "dequant_factor: unchecked stage {stage:?}"
    );
    assert!(
        frac_bits <= 62,
        "dequant_factor: frac_bits {frac_bits} > 62"
    );
    let shift_exp = i32::try_from(stage.out_shift).expect("out_shift <= 62")
        - i32::try_from(frac_bits).expect("frac_bits <= 62");
    let factor_f64 =
        2f64.powi(shift_exp) / f64::from(stage.out_mult) * f64::from(scale_x) * f64::from(scale_w);
    #[allow(clippy::cast_possible_truncation)] // the host works in f32 (N20)
    let factor_f32 = factor_f64 as f32;
    factor_f32
}

/// N20 applied to a whole weight operation: `y_f32[t][n] = y[t][n] * dequant_factor(...)`.
#[must_use]
pub fn dequantize_weight_op(
    y: &[Vec<i64>],
    stage: &OutputStage,
    scale_x: &[f32],
    w: &QuantWeights,
) -> Vec<Vec<f32>> {
    assert_eq!(
        y.len(),
        scale_x.len(),
        "dequantize_weight_op: one scale per token"
    );
    let frac_bits = weight_frac_bits(w);
    y.iter()
        .zip(scale_x)
        .map(|(row, &sx)| {
            row.iter()
                .zip(w.row_scale())
                .map(|(&v, &rs)| {
                    #[allow(clippy::cast_precision_loss)] // the host works in f32 (N20)
                    let v_f32 = v as f32;
                    v_f32 * dequant_factor(stage, sx, rs, frac_bits)
                })
                .collect()
        })
        .collect()
}

/// Float reference: `y[t][n] = sum_j x[t][j] * w[n][j]` in `f64`, for `x` row-major `[m][k]`
/// and `w` row-major `[n][k]` (e.g. dequantized operands).
#[must_use]
pub fn matmul_ref_f64(
    x: &[f32],
    m_tokens: usize,
    w: &[f32],
    n_rows: usize,
    k: usize,
) -> Vec<Vec<f64>> {
    assert_eq!(x.len(), m_tokens * k, "matmul_ref_f64: x shape");
    assert_eq!(w.len(), n_rows * k, "matmul_ref_f64: w shape");
    x.chunks_exact(k)
        .map(|x_row| {
            w.chunks_exact(k)
                .map(|w_row| {
                    x_row
                        .iter()
                        .zip(w_row)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum()
                })
                .collect()
        })
        .collect()
}
