//! The KV4 cache of one KV head (docs/numerics.md N16), the fold (N17), the 8-bit window
//! products (N18), the attention products `Q x K^T` and `P x V` (N19) and the probability
//! codes (N22).
//!
//! Token order everywhere is age order: the 4-bit tokens (oldest first), then the 8-bit window.

use std::collections::VecDeque;
use std::fmt;

use crate::numerics::{round_shift, sat, Datapath};
use crate::ops::{dequant_factor, OpError, OutputStage, ACC_BITS_MAX, ACC_BITS_MIN};
use crate::pack::{
    kv4_key_group_bytes, kv4_value_token_bytes, pack_kv4_keys, pack_kv4_values, unpack_kv4_keys,
    unpack_kv4_values, PackError,
};
use crate::quant::{
    quantize_group_asym, quantize_token, scale_multipliers, QuantError, TokenCodes,
};

/// Bits of a KV4 code and its shift onto the 8-bit lattice (`8 - 4`).
pub const KV4_BITS: u32 = 4;
/// The KV8 variant (N16b): every token stays in the 8-bit window.
pub const KV8_BITS: u32 = 8;
pub const KV4_LATTICE_SHIFT: u32 = 8 - KV4_BITS;

/// Why a KV cache operation failed.
#[derive(Debug, Clone, PartialEq)]
pub enum KvError {
    /// A length did not match the declared shape.
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The datapath's KV sizes are unusable (zero group, window not a multiple of the group...).
    BadDatapath { what: &'static str },
    /// A float input could not be quantized.
    Quant(QuantError),
    /// The output stage or accumulator width is out of range.
    Op(OpError),
    /// A probability was negative or not finite (N19).
    Probability { index: usize, value: f32 },
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected {expected} elements, got {got}")
            }
            KvError::BadDatapath { what } => write!(f, "bad KV datapath: {what}"),
            KvError::Quant(e) => write!(f, "KV quantization failed: {e}"),
            KvError::Op(e) => write!(f, "KV product failed: {e}"),
            KvError::Probability { index, value } => write!(
                f,
                "probability at index {index} is {value}: probabilities must be finite and >= 0 (softmax outputs)"
            ),
        }
    }
}

impl std::error::Error for KvError {}

impl From<QuantError> for KvError {
    fn from(e: QuantError) -> Self {
        KvError::Quant(e)
    }
}

impl From<OpError> for KvError {
    fn from(e: OpError) -> Self {
        KvError::Op(e)
    }
}

impl From<PackError> for KvError {
    fn from(e: PackError) -> Self {
        KvError::Quant(QuantError::Pack(e))
    }
}

/// N22: bits of one probability plane's codes (`[0, 127]`, the non-negative half of `i8`).
pub const P_PLANE_BITS: u32 = 7;
/// N22: largest probability code, `128 * 127 + 127` (two 7-bit planes).
pub const P_CODE_MAX: i64 = (1 << (2 * P_PLANE_BITS)) - 1;

/// Probability codes of one query (N19, N22): `p_t ~= (128 * hi_i8[t] + lo_i8[t]) * scale_p`,
/// both planes in `[0, 127]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbCodes {
    /// High plane, `code >> 7`.
    pub hi_i8: Vec<i8>,
    /// Low plane, `code & 127`.
    pub lo_i8: Vec<i8>,
    /// `max_t p_t / 16383`; 0 when every `p_t` is 0.
    pub scale_p: f32,
}

impl ProbCodes {
    /// The 14-bit code of token `t`, `128 * hi + lo`.
    #[must_use]
    pub fn code(&self, t: usize) -> i64 {
        (i64::from(self.hi_i8[t]) << P_PLANE_BITS) + i64::from(self.lo_i8[t])
    }
}

/// N22: probabilities are 14-bit codes split into two 7-bit planes:
/// `scale_p = max p / 16383`, `code = quantize_f32(p, scale_p, 0, 16383)`, `hi = code >> 7`,
/// `lo = code & 127`. Negative or non-finite `p` is an error.
pub fn quantize_probs(p: &[f32]) -> Result<ProbCodes, KvError> {
    let mut hi_i8 = vec![0i8; p.len()];
    let mut lo_i8 = vec![0i8; p.len()];
    let scale_p = quantize_probs_into(p, &mut hi_i8, &mut lo_i8)?;
    Ok(ProbCodes {
        hi_i8,
        lo_i8,
        scale_p,
    })
}

/// [`quantize_probs`] into caller-owned planes (`hi`, `lo` as long as `p`); returns `scale_p`.
/// On an error the planes' contents are unspecified.
///
/// # Panics
/// If `hi` or `lo` is not as long as `p`.
pub fn quantize_probs_into(p: &[f32], hi: &mut [i8], lo: &mut [i8]) -> Result<f32, KvError> {
    assert!(
        hi.len() == p.len() && lo.len() == p.len(),
        "quantize_probs_into: one code per probability in each plane"
    );
    let mut max = 0.0f32;
    for (index, &value) in p.iter().enumerate() {
        if !value.is_finite() || value < 0.0 {
            return Err(KvError::Probability { index, value });
        }
        max = max.max(value);
    }
    #[allow(clippy::cast_precision_loss)] // 16383 is exact in f32
    let scale_p = max / P_CODE_MAX as f32;
    if scale_p == 0.0 {
        hi.fill(0);
        lo.fill(0);
        return Ok(0.0);
    }
    for ((&v, h), l) in p.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        let code = crate::numerics::quantize_f32(v, scale_p, 0, P_CODE_MAX)
            .expect("finite probability and scale");
        *h = i8::try_from(code >> P_PLANE_BITS).expect("code <= 16383 gives hi <= 127");
        *l = i8::try_from(code & ((1 << P_PLANE_BITS) - 1)).expect("lo <= 127");
    }
    Ok(scale_p)
}

/// N17 the fold: `xf_i8[e] = sat(round_shift(x_i8[e] * fscale_q[e], sf), 8)`.
/// Saturation never triggers since `fscale_q <= 2^sf` (asserted).
#[must_use]
pub fn fold_i8(x_i8: &[i8], fscale_q: &[u16], sf: u32) -> Vec<i8> {
    assert_eq!(
        x_i8.len(),
        fscale_q.len(),
        "fold_i8: one multiplier per element"
    );
    x_i8.iter()
        .zip(fscale_q)
        .map(|(&x, &m)| {
            assert!(u32::from(m) <= 1u32 << sf, "N17: fscale {m} > 2^{sf}");
            let xf = round_shift(i64::from(x) * i64::from(m), sf);
            assert!(
                (-128..=127).contains(&xf),
                "N17: fold saturated ({x} * {m} >> {sf})"
            );
            i8::try_from(sat(xf, 8)).expect("sat(.., 8) fits i8")
        })
        .collect()
}

/// N17 the folded product: `Z = sum_e xf[e] * zero[e]` and, for every output `o`,
/// `acc[o] = sum_e xf[e] * wl[o][e] - Z`, exact. `wl_oe` is row-major `[o][e]` lattice weights
/// (`code << 4` for KV4, the signed 8-bit code for the window), `zero_e` the zero points
/// (0 in the window). Returns `(Z, acc)`.
#[must_use]
pub fn folded_products(xf_i8: &[i8], wl_oe: &[i64], zero_e: &[i64]) -> (i64, Vec<i64>) {
    let e_len = xf_i8.len();
    assert_eq!(
        zero_e.len(),
        e_len,
        "folded_products: one zero point per element"
    );
    assert!(
        e_len == 0 || wl_oe.len().is_multiple_of(e_len),
        "folded_products: [o][e] shape"
    );
    let bound = i64::try_from(e_len).expect("length fits i64") * 128 * 255;
    let z_i64: i64 = xf_i8
        .iter()
        .zip(zero_e)
        .map(|(&x, &z)| i64::from(x) * z)
        .sum();
    let acc = if e_len == 0 {
        Vec::new()
    } else {
        wl_oe
            .chunks_exact(e_len)
            .map(|row| {
                let dot: i64 = xf_i8.iter().zip(row).map(|(&x, &w)| i64::from(x) * w).sum();
                let acc_i64 = dot - z_i64;
                assert!(
                    acc_i64.abs() <= bound,
                    "N17: |acc| {} > {bound}",
                    acc_i64.abs()
                );
                acc_i64
            })
            .collect()
    };
    (z_i64, acc)
}

/// One folded product's engine results and what the host needs to dequantize them (N17, N20).
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedAcc {
    /// `s_ref = max_e s_e` of the fold group.
    pub s_ref: f32,
    /// `fscale_q[e]` in `[0, 2^SF]`.
    pub fscale_q: Vec<u16>,
    /// The folded operand `xf_i8[e]`.
    pub xf_i8: Vec<i8>,
    /// `Z`, shared by every output.
    pub z_i64: i64,
    /// `sat(acc, acc_bits)` per output (N19: the fold group is one N13 group).
    pub acc_i64: Vec<i64>,
    /// N14 output per output.
    pub y_i64: Vec<i64>,
    /// Lattice fractional bits of `y` for [`dequant_factor`]: 4 for KV4, 0 in the window.
    pub frac_bits: u32,
}

impl FoldedAcc {
    /// N20: real values `y * dequant_factor(stage, scale_x, s_ref, frac_bits)`.
    #[must_use]
    pub fn dequantize(&self, stage: &OutputStage, scale_x: f32) -> Vec<f32> {
        let factor = dequant_factor(stage, scale_x, self.s_ref, self.frac_bits);
        #[allow(clippy::cast_precision_loss)] // the host works in f32 (N20)
        self.y_i64.iter().map(|&y| y as f32 * factor).collect()
    }
}

/// Result of `Q x K^T` for one query (N19).
#[derive(Debug, Clone, PartialEq)]
pub struct QkOut {
    /// One folded product per 4-bit key group, outputs = the group's tokens.
    pub groups4: Vec<FoldedAcc>,
    /// Window tokens (N18): `sat(sum_c q_i8[c] * k_i8[t][c], acc_bits)`.
    pub window_acc_i64: Vec<i64>,
    /// N14 output of the window accumulators.
    pub window_y_i64: Vec<i64>,
    /// The window tokens' key scales (N5), for dequantization with `frac_bits = 0`.
    pub window_scale_k: Vec<f32>,
}

impl QkOut {
    /// N20: the real scores `q . k_t` of every token in age order, given the query scale.
    #[must_use]
    pub fn scores_f32(&self, stage: &OutputStage, scale_q: f32) -> Vec<f32> {
        let mut scores: Vec<f32> = self
            .groups4
            .iter()
            .flat_map(|g| g.dequantize(stage, scale_q))
            .collect();
        for (&y, &sk) in self.window_y_i64.iter().zip(&self.window_scale_k) {
            #[allow(clippy::cast_precision_loss)] // the host works in f32 (N20)
            scores.push(y as f32 * dequant_factor(stage, scale_q, sk, 0));
        }
        scores
    }
}

/// Result of `P x V` for one query (N19): two folded products, outputs = channels.
#[derive(Debug, Clone, PartialEq)]
pub struct PvOut {
    /// Over the 4-bit value tokens (`frac_bits` 4).
    pub kv4: FoldedAcc,
    /// Over the 8-bit window tokens (`frac_bits` 0, zero points 0).
    pub window: FoldedAcc,
}

impl PvOut {
    /// N20: the real output `sum_t p_t v_t` per channel of one A8 probability row with scale
    /// `scale_p` (both parts; the runtime's two planes go through [`PvPlanes::output_f32`]).
    #[must_use]
    pub fn output_f32(&self, stage: &OutputStage, scale_p: f32) -> Vec<f32> {
        let a = self.kv4.dequantize(stage, scale_p);
        let b = self.window.dequantize(stage, scale_p);
        a.iter().zip(&b).map(|(x, y)| x + y).collect()
    }
}

/// `P x V` of both probability planes of one query (N22): two engine products.
#[derive(Debug, Clone, PartialEq)]
pub struct PvPlanes {
    pub hi: PvOut,
    pub lo: PvOut,
}

impl PvPlanes {
    /// N22 + N20: per channel and part (4-bit tokens, window), the host combines the planes
    /// exactly, `y = 128 * y_hi + y_lo` (`i64`), and dequantizes `y` with the part's factor
    /// (`scale_p` from [`quantize_probs`]); the two parts are added in `f32` as in
    /// [`PvOut::output_f32`].
    #[must_use]
    pub fn output_f32(&self, stage: &OutputStage, scale_p: f32) -> Vec<f32> {
        let part = |h: &FoldedAcc, l: &FoldedAcc| -> Vec<f32> {
            assert!(
                h.s_ref.to_bits() == l.s_ref.to_bits() && h.frac_bits == l.frac_bits,
                "N22: both planes see the same value scales"
            );
            let factor = dequant_factor(stage, scale_p, h.s_ref, h.frac_bits);
            h.y_i64
                .iter()
                .zip(&l.y_i64)
                .map(|(&a, &b)| {
                    #[allow(clippy::cast_precision_loss)] // the host works in f32 (N20)
                    let y = ((a << P_PLANE_BITS) + b) as f32;
                    y * factor
                })
                .collect()
        };
        let a = part(&self.hi.kv4, &self.lo.kv4);
        let b = part(&self.hi.window, &self.lo.window);
        a.iter().zip(&b).map(|(x, y)| x + y).collect()
    }
}

/// Memory a KV cache uses, in bytes (N11b layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMemory {
    /// Packed 4-bit key and value codes.
    pub codes4_bytes: usize,
    /// 8-bit window codes (keys and values).
    pub codes8_bytes: usize,
    /// 4-bit zero points, one byte each.
    pub zero_bytes: usize,
    /// `f32` scales: per (key group, channel), per 4-bit value token, per window token (K and V).
    pub scale_bytes: usize,
}

impl KvMemory {
    #[must_use]
    pub fn total(&self) -> usize {
        self.codes4_bytes + self.codes8_bytes + self.zero_bytes + self.scale_bytes
    }
}

/// One 4-bit key token group (N16, N11b).
#[derive(Debug, Clone, PartialEq)]
struct KeyGroup4 {
    /// N11b: channel-major packed codes.
    packed: Vec<u8>,
    /// Per channel.
    kscale: Vec<f32>,
    kzero_u8: Vec<u8>,
}

/// The KV cache of one KV head (N16).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    head_dim: usize,
    kv_group_len: usize,
    kv_recent_window: usize,
    /// `SF` of the fold multipliers (N17).
    scale_frac_bits: u32,
    acc_bits: u32,
    /// 4 (KV4, N16) or 8 (KV8, N16b: no token is ever quantized to 4 bits).
    kv_bits: u32,
    key_groups: Vec<KeyGroup4>,
    /// N11b token-major packed value codes of the 4-bit tokens.
    values4_packed: Vec<u8>,
    vscale: Vec<f32>,
    vzero_u8: Vec<u8>,
    window_k: VecDeque<TokenCodes>,
    window_v: VecDeque<TokenCodes>,
}

impl KvCache {
    /// An empty KV4 cache for one head of `head_dim` channels (N16).
    pub fn new(dp: &Datapath, head_dim: usize) -> Result<Self, KvError> {
        Self::with_bits(dp, head_dim, KV4_BITS)
    }

    /// An empty cache of `kv_bits` 4 (KV4, N16) or 8 (KV8, N16b: every token stays in the 8-bit
    /// window, as if `kv_recent_window` were unbounded).
    pub fn with_bits(dp: &Datapath, head_dim: usize, kv_bits: u32) -> Result<Self, KvError> {
        if kv_bits != KV4_BITS && kv_bits != KV8_BITS {
            return Err(KvError::BadDatapath {
                what: "kv_bits is not 4 or 8",
            });
        }
        if head_dim == 0 {
            return Err(KvError::BadDatapath {
                what: "head_dim is 0",
            });
        }
        if dp.kv_group_len == 0 {
            return Err(KvError::BadDatapath {
                what: "kv_group_len is 0",
            });
        }
        if !dp.kv_recent_window.is_multiple_of(dp.kv_group_len) {
            return Err(KvError::BadDatapath {
                what: "kv_recent_window is not a multiple of kv_group_len",
            });
        }
        if !(8..=16).contains(&dp.w_scale_bits) {
            return Err(KvError::BadDatapath {
                what: "w_scale_bits not in 8..=16",
            });
        }
        if !(ACC_BITS_MIN..=ACC_BITS_MAX).contains(&dp.acc_bits) {
            return Err(OpError::AccBits {
                acc_bits: dp.acc_bits,
            }
            .into());
        }
        Ok(KvCache {
            head_dim,
            kv_group_len: dp.kv_group_len,
            kv_recent_window: dp.kv_recent_window,
            scale_frac_bits: dp.scale_frac_bits(),
            acc_bits: dp.acc_bits,
            kv_bits,
            key_groups: Vec::new(),
            values4_packed: Vec::new(),
            vscale: Vec::new(),
            vzero_u8: Vec::new(),
            window_k: VecDeque::new(),
            window_v: VecDeque::new(),
        })
    }

    #[must_use]
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// 4 (KV4) or 8 (KV8, N16b).
    #[must_use]
    pub fn kv_bits(&self) -> u32 {
        self.kv_bits
    }

    /// Tokens held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.n4_tokens() + self.window_tokens()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens stored at 4 bits: `kv_group_len * floor(max(0, n - kv_recent_window) / kv_group_len)`.
    #[must_use]
    pub fn n4_tokens(&self) -> usize {
        self.key_groups.len() * self.kv_group_len
    }

    /// Tokens in the 8-bit window.
    #[must_use]
    pub fn window_tokens(&self) -> usize {
        self.window_k.len()
    }

    /// N16: appends one token's key and value (`head_dim` floats each). Keys and values enter the
    /// 8-bit window (N5); whenever the oldest `kv_group_len` window tokens are all older than the
    /// last `kv_recent_window` tokens they are quantized to 4 bits, from their 8-bit values.
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        if k.len() != self.head_dim {
            return Err(KvError::Shape {
                what: "key",
                expected: self.head_dim,
                got: k.len(),
            });
        }
        if v.len() != self.head_dim {
            return Err(KvError::Shape {
                what: "value",
                expected: self.head_dim,
                got: v.len(),
            });
        }
        let kq = quantize_token(k)?;
        let vq = quantize_token(v)?;
        self.window_k.push_back(kq);
        self.window_v.push_back(vq);
        if self.kv_bits == KV8_BITS {
            return Ok(());
        }
        while self.window_k.len() >= self.kv_recent_window + self.kv_group_len {
            self.evict_group()?;
        }
        assert!(self.window_k.len() < self.kv_recent_window + self.kv_group_len);
        assert_eq!(self.window_k.len(), self.window_v.len());
        Ok(())
    }

    /// The f32 value the host holds for an 8-bit code: `code * scale` (N5).
    fn dequant8(tok: &TokenCodes) -> Vec<f32> {
        tok.codes_i8
            .iter()
            .map(|&c| f32::from(c) * tok.scale_x)
            .collect()
    }

    fn evict_group(&mut self) -> Result<(), KvError> {
        let group_tokens = self.kv_group_len;
        let keys: Vec<Vec<f32>> = self
            .window_k
            .drain(..group_tokens)
            .map(|t| Self::dequant8(&t))
            .collect();
        let values: Vec<Vec<f32>> = self
            .window_v
            .drain(..group_tokens)
            .map(|t| Self::dequant8(&t))
            .collect();
        // Keys: per channel, over the group's tokens (N7 with B = 4).
        let mut codes_tc = vec![0u8; group_tokens * self.head_dim];
        let mut kscale = Vec::with_capacity(self.head_dim);
        let mut kzero_u8 = Vec::with_capacity(self.head_dim);
        for c in 0..self.head_dim {
            let channel: Vec<f32> = keys.iter().map(|k| k[c]).collect();
            let gq = quantize_group_asym(&channel, KV4_BITS)?;
            for (t, &code) in gq.codes.iter().enumerate() {
                codes_tc[t * self.head_dim + c] = code;
            }
            kscale.push(gq.scale_g);
            kzero_u8.push(gq.zero_u8);
        }
        let packed = pack_kv4_keys(&codes_tc, group_tokens, self.head_dim)?;
        self.key_groups.push(KeyGroup4 {
            packed,
            kscale,
            kzero_u8,
        });
        // Values: per token, over the channels (N7 with B = 4).
        for v in &values {
            let gq = quantize_group_asym(v, KV4_BITS)?;
            self.values4_packed
                .extend(pack_kv4_values(&gq.codes, 1, self.head_dim)?);
            self.vscale.push(gq.scale_g);
            self.vzero_u8.push(gq.zero_u8);
        }
        Ok(())
    }

    /// KV memory in bytes, from the actual stored buffers (N11b layout).
    #[must_use]
    pub fn memory(&self) -> KvMemory {
        let groups = self.key_groups.len();
        let key_codes: usize = self.key_groups.iter().map(|g| g.packed.len()).sum();
        assert_eq!(
            key_codes,
            groups * kv4_key_group_bytes(self.kv_group_len, self.head_dim)
        );
        assert_eq!(
            self.values4_packed.len(),
            self.n4_tokens() * kv4_value_token_bytes(self.head_dim)
        );
        let f32_bytes = std::mem::size_of::<f32>();
        KvMemory {
            codes4_bytes: key_codes + self.values4_packed.len(),
            codes8_bytes: 2 * self.window_tokens() * self.head_dim,
            zero_bytes: groups * self.head_dim + self.vzero_u8.len(),
            scale_bytes: f32_bytes
                * (groups * self.head_dim + self.vscale.len() + 2 * self.window_tokens()),
        }
    }

    /// Total KV memory in bytes ([`KvMemory::total`]).
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.memory().total()
    }

    /// Unpacked key codes `[t][c]` of 4-bit key group `j`, with its per-channel scales and zeros.
    #[must_use]
    pub fn key_group4(&self, j: usize) -> (Vec<u8>, &[f32], &[u8]) {
        let g = &self.key_groups[j];
        let codes = unpack_kv4_keys(&g.packed, self.kv_group_len, self.head_dim)
            .expect("key groups are packed by push");
        (codes, &g.kscale, &g.kzero_u8)
    }

    /// N11b packed codes of 4-bit key group `j` (channel-major, `ceil(kv_group_len / 2)` bytes
    /// per channel, low nibble first) with its per-channel scales and zeros, without unpacking.
    #[must_use]
    pub fn key_group4_packed(&self, j: usize) -> (&[u8], &[f32], &[u8]) {
        let g = &self.key_groups[j];
        (&g.packed, &g.kscale, &g.kzero_u8)
    }

    /// N11b packed 4-bit value codes of every 4-bit token (token-major,
    /// [`kv4_value_token_bytes`] per token, low nibble first) with per-token scales and zeros,
    /// without unpacking.
    #[must_use]
    pub fn values4_packed(&self) -> (&[u8], &[f32], &[u8]) {
        (&self.values4_packed, &self.vscale, &self.vzero_u8)
    }

    /// Unpacked 4-bit value codes `[t][c]` with per-token scales and zeros.
    #[must_use]
    pub fn values4(&self) -> (Vec<u8>, &[f32], &[u8]) {
        let codes = unpack_kv4_values(&self.values4_packed, self.n4_tokens(), self.head_dim)
            .expect("values are packed by push");
        (codes, &self.vscale, &self.vzero_u8)
    }

    /// The 8-bit window tokens (keys, values), oldest first.
    #[must_use]
    pub fn window(&self) -> (&VecDeque<TokenCodes>, &VecDeque<TokenCodes>) {
        (&self.window_k, &self.window_v)
    }

    /// The keys the engine represents, `[t][c]` in age order, in `f32` (computed in `f64`):
    /// `kscale * ((kq << 4) - kzero) / 16` for 4-bit tokens, `k_i8 * scale` in the window.
    #[must_use]
    pub fn dequantized_keys(&self) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(self.len());
        for j in 0..self.key_groups.len() {
            let (codes, kscale, kzero) = self.key_group4(j);
            for t in 0..self.kv_group_len {
                out.push(
                    (0..self.head_dim)
                        .map(|c| dequant4(codes[t * self.head_dim + c], kscale[c], kzero[c]))
                        .collect(),
                );
            }
        }
        out.extend(self.window_k.iter().map(Self::dequant8));
        out
    }

    /// The values the engine represents, `[t][c]` in age order (see [`Self::dequantized_keys`]).
    #[must_use]
    pub fn dequantized_values(&self) -> Vec<Vec<f32>> {
        let (codes, vscale, vzero) = self.values4();
        let mut out: Vec<Vec<f32>> = codes
            .chunks_exact(self.head_dim)
            .zip(vscale.iter().zip(vzero))
            .map(|(row, (&s, &z))| row.iter().map(|&q| dequant4(q, s, z)).collect())
            .collect();
        out.extend(self.window_v.iter().map(Self::dequant8));
        out
    }

    fn finish(&self, acc_exact: &[i64], stage: &OutputStage) -> (Vec<i64>, Vec<i64>) {
        let acc: Vec<i64> = acc_exact.iter().map(|&a| sat(a, self.acc_bits)).collect();
        let y = acc.iter().map(|&a| stage.apply(a)).collect();
        (acc, y)
    }

    /// N17 + N19 for one fold group.
    fn fold_group(
        &self,
        x_i8: &[i8],
        scales: &[f32],
        wl_oe: &[i64],
        zero_e: &[i64],
        frac_bits: u32,
        stage: &OutputStage,
    ) -> FoldedAcc {
        let (s_ref, fscale_q) = scale_multipliers(scales, self.scale_frac_bits);
        let xf_i8 = fold_i8(x_i8, &fscale_q, self.scale_frac_bits);
        let (z_i64, acc_exact) = folded_products(&xf_i8, wl_oe, zero_e);
        let (acc_i64, y_i64) = self.finish(&acc_exact, stage);
        FoldedAcc {
            s_ref,
            fscale_q,
            xf_i8,
            z_i64,
            acc_i64,
            y_i64,
            frac_bits,
        }
    }

    /// N19 `Q x K^T` for one query of `head_dim` A8 codes (any `i8`, including -128).
    pub fn qk(&self, q_i8: &[i8], stage: &OutputStage) -> Result<QkOut, KvError> {
        stage.check()?;
        if q_i8.len() != self.head_dim {
            return Err(KvError::Shape {
                what: "query codes",
                expected: self.head_dim,
                got: q_i8.len(),
            });
        }
        let mut groups4 = Vec::with_capacity(self.key_groups.len());
        for j in 0..self.key_groups.len() {
            let (codes_tc, kscale, kzero) = self.key_group4(j);
            // Reduction over channels e = c, outputs o = tokens t: wl[t][c] = kq << 4.
            let wl_oe: Vec<i64> = codes_tc
                .iter()
                .map(|&q| i64::from(q) << KV4_LATTICE_SHIFT)
                .collect();
            let zero_e: Vec<i64> = kzero.iter().map(|&z| i64::from(z)).collect();
            groups4.push(self.fold_group(q_i8, kscale, &wl_oe, &zero_e, KV4_LATTICE_SHIFT, stage));
        }
        // N18: the window keys are a W8-style product with no zero point and no fold.
        let window_exact: Vec<i64> = self
            .window_k
            .iter()
            .map(|k| {
                k.codes_i8
                    .iter()
                    .zip(q_i8)
                    .map(|(&a, &b)| i64::from(a) * i64::from(b))
                    .sum()
            })
            .collect();
        let (window_acc_i64, window_y_i64) = self.finish(&window_exact, stage);
        let window_scale_k = self.window_k.iter().map(|k| k.scale_x).collect();
        Ok(QkOut {
            groups4,
            window_acc_i64,
            window_y_i64,
            window_scale_k,
        })
    }

    /// N19 `P x V` for one query: `p_i8` has one A8 code per token in age order (one plane of
    /// [`quantize_probs`], N22; the engine accepts any `i8`).
    pub fn pv(&self, p_i8: &[i8], stage: &OutputStage) -> Result<PvOut, KvError> {
        stage.check()?;
        if p_i8.len() != self.len() {
            return Err(KvError::Shape {
                what: "probability codes",
                expected: self.len(),
                got: p_i8.len(),
            });
        }
        let n4 = self.n4_tokens();
        let hd = self.head_dim;
        // 4-bit part: reduction over tokens e = t, outputs o = channels c.
        let (codes_tc, vscale, vzero) = self.values4();
        let mut wl_oe = vec![0i64; hd * n4];
        for t in 0..n4 {
            for c in 0..hd {
                wl_oe[c * n4 + t] = i64::from(codes_tc[t * hd + c]) << KV4_LATTICE_SHIFT;
            }
        }
        let zero_e: Vec<i64> = vzero.iter().map(|&z| i64::from(z)).collect();
        let kv4 = self.fold_group(
            &p_i8[..n4],
            vscale,
            &wl_oe,
            &zero_e,
            KV4_LATTICE_SHIFT,
            stage,
        );
        // N18: the window, folded with zero 0 and lattice shift 0 (signed 8-bit codes).
        let nw = self.window_tokens();
        let mut wl_window = vec![0i64; hd * nw];
        for (t, tok) in self.window_v.iter().enumerate() {
            for c in 0..hd {
                wl_window[c * nw + t] = i64::from(tok.codes_i8[c]);
            }
        }
        let scales_w: Vec<f32> = self.window_v.iter().map(|t| t.scale_x).collect();
        let window = self.fold_group(&p_i8[n4..], &scales_w, &wl_window, &vec![0; nw], 0, stage);
        let kv4 = if n4 == 0 {
            FoldedAcc {
                acc_i64: vec![0; hd],
                y_i64: vec![0; hd],
                ..kv4
            }
        } else {
            kv4
        };
        let window = if nw == 0 {
            FoldedAcc {
                acc_i64: vec![0; hd],
                y_i64: vec![0; hd],
                ..window
            }
        } else {
            window
        };
        Ok(PvOut { kv4, window })
    }

    /// N22 `P x V` of one query's probability codes: [`Self::pv`] of each plane.
    pub fn pv_probs(&self, probs: &ProbCodes, stage: &OutputStage) -> Result<PvPlanes, KvError> {
        Ok(PvPlanes {
            hi: self.pv(&probs.hi_i8, stage)?,
            lo: self.pv(&probs.lo_i8, stage)?,
        })
    }
}

fn dequant4(code: u8, scale: f32, zero_u8: u8) -> f32 {
    let eff = (i32::from(code) << KV4_LATTICE_SHIFT) - i32::from(zero_u8);
    #[allow(clippy::cast_possible_truncation)] // to the f32 the host uses
    let v = (f64::from(scale) * f64::from(eff) / 16.0) as f32;
    v
}

/// Float reference attention of one query in `f64`: `softmax(q . k_t / sqrt(d)) . V`, with
/// `keys` and `values` `[t][c]`. Returns `(probabilities, output)`.
#[must_use]
pub fn attention_ref_f64(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(
        keys.len(),
        values.len(),
        "attention_ref_f64: one value per key"
    );
    assert!(!keys.is_empty(), "attention_ref_f64: no tokens");
    #[allow(clippy::cast_precision_loss)]
    let inv_sqrt_d = 1.0 / (q.len() as f64).sqrt();
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(k)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>()
                * inv_sqrt_d
        })
        .collect();
    let probs = softmax_f64(&scores);
    let mut out = vec![0.0f64; q.len()];
    for (p, v) in probs.iter().zip(values) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * f64::from(x);
        }
    }
    (probs, out)
}

/// Numerically stable softmax in `f64` (reference only; the host's softmax is its own).
#[must_use]
pub fn softmax_f64(scores: &[f64]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}
