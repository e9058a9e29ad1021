//! The A8 x KV4 attention products (docs/numerics.md N16-N19) on a CPU layout of one KV head's
//! cache, equal integer for integer to `golden::kv::KvCache::{qk, pv}`.
//!
//! [`KvHeadCpu`] mirrors a golden [`KvCache`] ([`KvHeadCpu::sync`] appends only what changed:
//! new 4-bit key groups and value tokens, and re-copies the small 8-bit window). Its layout makes
//! both 4-bit products *row dot products* over the reduction index, like a W4 weight row:
//! - keys of a group token-major (`[t][c]`, reduction over channels `c`),
//! - 4-bit values channel-major (`[c][t]`, reduction over tokens `t`, with spare capacity),
//!
//! each row in 32-element W4 chunks (byte `i` of a chunk holds `c[i] | c[16 + i] << 4`), so the
//! SIMD path is the same `vpmaddubsw` kernel as the weights (codes <= 15, cannot saturate).
//! The fold multipliers (N17) depend only on the cache's scales, so they are computed at sync
//! time with golden's own `scale_multipliers`.
//!
//! Per product (N17, N19): `xf = sat(round_shift(x * fscale, SF), 8)`, `Z = sum xf * zero`,
//! `acc[o] = sat(16 * sum xf * code[o] - Z, acc_bits)`, then the N14 output stage. The 8-bit
//! window (N18): `Q x K^T` is `sat(sum q * k_i8, acc_bits)`; `P x V` folds with zero 0.

use tessera_golden::kv::KvCache;
use tessera_golden::numerics::{max_signed, min_signed, Datapath};
use tessera_golden::ops::{OpError, OutputStage};
use tessera_golden::quant::scale_multipliers;

use crate::isa::Isa;
use crate::weights::CHUNK;

/// Bytes of one 32-element W4 chunk.
const CHUNK_BYTES4: usize = CHUNK / 2;

/// Why a KV product could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvKernelError {
    /// The cache was built for another head size.
    HeadDim { expected: usize, got: usize },
    /// A length did not match (query, probabilities or an output buffer).
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// [`KvHeadCpu::sync`] saw a cache that is not an extension of the mirrored one.
    NotAppendOnly,
    /// A bad output stage or accumulator width.
    Op(OpError),
}

impl std::fmt::Display for KvKernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvKernelError::HeadDim { expected, got } => {
                write!(f, "KV head_dim {got} differs from the mirror's {expected}")
            }
            KvKernelError::Shape {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected} elements, got {got}"),
            KvKernelError::NotAppendOnly => write!(
                f,
                "the KV cache shrank or changed its group length: rebuild the mirror"
            ),
            KvKernelError::Op(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for KvKernelError {}

impl From<OpError> for KvKernelError {
    fn from(e: OpError) -> Self {
        KvKernelError::Op(e)
    }
}

/// Caller-owned buffers of the KV products (grown on demand, reused across calls).
#[derive(Debug, Default, Clone)]
pub struct KvScratch {
    xf: Vec<i8>,
    p: Vec<i32>,
}

/// A CPU mirror of one KV head's cache (see the module docs).
#[derive(Debug, Clone)]
pub struct KvHeadCpu {
    head_dim: usize,
    kv_group_len: usize,
    sf: u32,
    acc_bits: u32,
    /// Chunks per key row (over channels).
    key_chunks: usize,
    /// Token-major W4 chunks of every 4-bit key group, `groups * kv_group_len` rows.
    keys4: Vec<u8>,
    kzero: Vec<u8>,
    /// Fold multipliers per (group, channel) and `s_ref` per group.
    kfscale: Vec<u16>,
    ks_ref: Vec<f32>,
    /// 4-bit value tokens.
    n4: usize,
    /// Capacity (tokens) of each channel-major value row, a multiple of 32.
    vcap: usize,
    values4: Vec<u8>,
    vzero: Vec<u8>,
    vfscale: Vec<u16>,
    vs_ref: f32,
    vscale: Vec<f32>,
    /// 8-bit window, token-major, with per-token scales and the value fold.
    wkeys: Vec<i8>,
    wvalues: Vec<i8>,
    wkscale: Vec<f32>,
    wvfscale: Vec<u16>,
    wvs_ref: f32,
}

impl KvHeadCpu {
    /// An empty mirror for caches built with `dp` and `head_dim`.
    #[must_use]
    pub fn new(dp: &Datapath, head_dim: usize) -> Self {
        KvHeadCpu {
            head_dim,
            kv_group_len: dp.kv_group_len,
            sf: dp.scale_frac_bits(),
            acc_bits: dp.acc_bits,
            key_chunks: head_dim.div_ceil(CHUNK),
            keys4: Vec::new(),
            kzero: Vec::new(),
            kfscale: Vec::new(),
            ks_ref: Vec::new(),
            n4: 0,
            vcap: 0,
            values4: Vec::new(),
            vzero: Vec::new(),
            vfscale: Vec::new(),
            vs_ref: 0.0,
            vscale: Vec::new(),
            wkeys: Vec::new(),
            wvalues: Vec::new(),
            wkscale: Vec::new(),
            wvfscale: Vec::new(),
            wvs_ref: 0.0,
        }
    }

    /// Tokens mirrored (4-bit, then window).
    #[must_use]
    pub fn len(&self) -> usize {
        self.n4 + self.wkscale.len()
    }
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// 4-bit key groups mirrored.
    #[must_use]
    pub fn key_groups(&self) -> usize {
        self.ks_ref.len()
    }
    /// `s_ref` of 4-bit key group `j` (for N20 dequantization, `frac_bits` 4).
    #[must_use]
    pub fn key_group_s_ref(&self, j: usize) -> f32 {
        self.ks_ref[j]
    }
    /// `s_ref` of the 4-bit values and of the window values (N20).
    #[must_use]
    pub fn value_s_ref(&self) -> (f32, f32) {
        (self.vs_ref, self.wvs_ref)
    }
    /// The window tokens' key scales (N20 with `frac_bits` 0).
    #[must_use]
    pub fn window_key_scales(&self) -> &[f32] {
        &self.wkscale
    }

    /// Brings the mirror up to date with `cache` (the same head, grown by `push`): appends new
    /// 4-bit key groups and value tokens and re-copies the 8-bit window.
    pub fn sync(&mut self, cache: &KvCache) -> Result<(), KvKernelError> {
        if cache.head_dim() != self.head_dim {
            return Err(KvKernelError::HeadDim {
                expected: self.head_dim,
                got: cache.head_dim(),
            });
        }
        let hd = self.head_dim;
        let n4_new = cache.n4_tokens();
        if n4_new < self.n4 || !n4_new.is_multiple_of(self.kv_group_len.max(1)) {
            return Err(KvKernelError::NotAppendOnly);
        }
        let groups_new = n4_new / self.kv_group_len.max(1);
        let key_row = self.key_chunks * CHUNK_BYTES4;
        for j in self.key_groups()..groups_new {
            let (codes_tc, kscale, kzero) = cache.key_group4(j);
            let base = self.keys4.len();
            self.keys4.resize(base + self.kv_group_len * key_row, 0);
            for t in 0..self.kv_group_len {
                for c in 0..hd {
                    set_nibble(
                        &mut self.keys4[base + t * key_row..],
                        c,
                        codes_tc[t * hd + c],
                    );
                }
            }
            self.kzero.extend_from_slice(kzero);
            let (s_ref, fscale) = scale_multipliers(kscale, self.sf);
            self.kfscale.extend_from_slice(&fscale);
            self.ks_ref.push(s_ref);
        }
        if n4_new > self.n4 {
            let (codes_tc, vscale, vzero) = cache.values4();
            if n4_new > self.vcap {
                self.grow_values(n4_new);
            }
            let vrow = self.vcap / 2;
            for t in self.n4..n4_new {
                for c in 0..hd {
                    set_nibble(&mut self.values4[c * vrow..], t, codes_tc[t * hd + c]);
                }
            }
            self.vzero.extend_from_slice(&vzero[self.n4..n4_new]);
            self.vscale.extend_from_slice(&vscale[self.n4..n4_new]);
            self.n4 = n4_new;
            let (s_ref, fscale) = scale_multipliers(&self.vscale, self.sf);
            self.vs_ref = s_ref;
            self.vfscale = fscale;
        }
        let (wk, wv) = cache.window();
        self.wkeys.clear();
        self.wvalues.clear();
        self.wkscale.clear();
        let mut wvscale = Vec::with_capacity(wv.len());
        for (k, v) in wk.iter().zip(wv) {
            self.wkeys.extend_from_slice(&k.codes_i8);
            self.wvalues.extend_from_slice(&v.codes_i8);
            self.wkscale.push(k.scale_x);
            wvscale.push(v.scale_x);
        }
        let (s_ref, fscale) = scale_multipliers(&wvscale, self.sf);
        self.wvs_ref = s_ref;
        self.wvfscale = fscale;
        Ok(())
    }

    fn grow_values(&mut self, need: usize) {
        let new_cap = need.max(2 * self.vcap).max(64).div_ceil(CHUNK) * CHUNK;
        let (old_row, new_row) = (self.vcap / 2, new_cap / 2);
        let mut v = vec![0u8; self.head_dim * new_row];
        for c in 0..self.head_dim {
            // Chunk bytes are position-independent within a row: whole chunks copy as they are.
            v[c * new_row..c * new_row + old_row]
                .copy_from_slice(&self.values4[c * old_row..(c + 1) * old_row]);
        }
        self.values4 = v;
        self.vcap = new_cap;
    }

    /// N19 `Q x K^T` for one query: `acc_out[t]`, `y_out[t]` for every token in age order
    /// (the 4-bit groups, then the window), exactly golden's `QkOut` (`groups4[j].acc_i64`
    /// concatenated with `window_acc_i64`, and the same for `y`).
    pub fn qk(
        &self,
        isa: Isa,
        q_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc_out: &mut [i64],
        y_out: &mut [i32],
    ) -> Result<(), KvKernelError> {
        stage.check()?;
        check_len("query codes", self.head_dim, q_i8.len())?;
        check_len("scores output", self.len(), acc_out.len())?;
        check_len("scores output", self.len(), y_out.len())?;
        let hd = self.head_dim;
        let (lo, hi) = (min_signed(self.acc_bits), max_signed(self.acc_bits));
        let xlen = self.key_chunks * CHUNK;
        grow(&mut scratch.xf, xlen);
        grow(&mut scratch.p, self.kv_group_len);
        let key_row = self.key_chunks * CHUNK_BYTES4;
        let gl = self.kv_group_len;
        for j in 0..self.key_groups() {
            let xf = &mut scratch.xf[..xlen];
            fold_into(
                q_i8,
                &self.kfscale[j * hd..(j + 1) * hd],
                self.sf,
                &mut xf[..hd],
            );
            xf[hd..].fill(0);
            let z = dot_i8_u8(&xf[..hd], &self.kzero[j * hd..(j + 1) * hd]);
            let rows = &self.keys4[j * gl * key_row..(j + 1) * gl * key_row];
            let p = &mut scratch.p[..gl];
            dot4_rows(isa, xf, rows, gl, self.key_chunks, p);
            for (t, &pt) in p.iter().enumerate() {
                acc_out[j * gl + t] = ((i64::from(pt) << 4) - z).clamp(lo, hi);
            }
        }
        let n4 = self.n4;
        if isa == Isa::Avx2 && isa.is_available() && hd < (1 << 17) {
            // |q * k| <= 2^14 per channel: the i32 sums are exact for hd < 2^17.
            crate::avx2::window_qk(q_i8, &self.wkeys, &mut acc_out[n4..], lo, hi);
        } else {
            for (t, k) in self.wkeys.chunks_exact(hd).enumerate() {
                let dot: i64 = q_i8
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| i64::from(i32::from(a) * i32::from(b)))
                    .sum();
                acc_out[n4 + t] = dot.clamp(lo, hi);
            }
        }
        crate::weights::apply_stage(stage, acc_out, y_out)?;
        Ok(())
    }

    /// N19 `P x V` for one query (`p_i8`: one code per token in age order): per channel the
    /// 4-bit part (`acc4`, `y4`) and the window part (`accw`, `yw`), exactly golden's
    /// `PvOut { kv4, window }` `acc_i64` / `y_i64` (zeros for an empty part).
    #[allow(clippy::too_many_arguments)]
    pub fn pv(
        &self,
        isa: Isa,
        p_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc4: &mut [i64],
        accw: &mut [i64],
        y4: &mut [i32],
        yw: &mut [i32],
    ) -> Result<(), KvKernelError> {
        stage.check()?;
        let hd = self.head_dim;
        check_len("probability codes", self.len(), p_i8.len())?;
        for (what, len) in [
            ("acc4", acc4.len()),
            ("accw", accw.len()),
            ("y4", y4.len()),
            ("yw", yw.len()),
        ] {
            check_len(what, hd, len)?;
        }
        let (lo, hi) = (min_signed(self.acc_bits), max_signed(self.acc_bits));
        let n4 = self.n4;
        // 4-bit part: rows = channels, reduction over the n4 tokens.
        let chunks = n4.div_ceil(CHUNK);
        let xlen = chunks * CHUNK;
        grow(&mut scratch.xf, xlen.max(self.wkscale.len()).max(1));
        grow(&mut scratch.p, hd);
        let xf = &mut scratch.xf[..xlen];
        fold_into(&p_i8[..n4], &self.vfscale, self.sf, &mut xf[..n4]);
        xf[n4..].fill(0);
        let z = dot_i8_u8(&xf[..n4], &self.vzero);
        let vrow = self.vcap / 2;
        let p = &mut scratch.p[..hd];
        if chunks == 0 {
            p.fill(0);
        } else {
            dot4_rows_strided(isa, xf, &self.values4, vrow, hd, chunks, p);
        }
        for (a, &pc) in acc4.iter_mut().zip(p.iter()) {
            *a = ((i64::from(pc) << 4) - z).clamp(lo, hi);
        }
        // Window: fold with zero 0, signed 8-bit codes.
        let nw = self.wkscale.len();
        let xw = &mut scratch.xf[..nw];
        fold_into(&p_i8[n4..], &self.wvfscale, self.sf, xw);
        let pw = &mut scratch.p[..hd];
        pw.fill(0);
        if isa == Isa::Avx2 && isa.is_available() && nw < (1 << 17) {
            crate::avx2::window_pv(xw, &self.wvalues[..nw * hd], pw);
        } else {
            for (t, &x) in xw.iter().enumerate() {
                let x = i32::from(x);
                for (a, &v) in pw.iter_mut().zip(&self.wvalues[t * hd..(t + 1) * hd]) {
                    *a += x * i32::from(v); // |.| <= nw * 128 * 127, < 2^31 for nw < 2^17
                }
            }
        }
        for (a, &pc) in accw.iter_mut().zip(pw.iter()) {
            *a = i64::from(pc).clamp(lo, hi);
        }
        crate::weights::apply_stage(stage, acc4, y4)?;
        crate::weights::apply_stage(stage, accw, yw)?;
        Ok(())
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KvKernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KvKernelError::Shape {
            what,
            expected,
            got,
        })
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Sets element `i` of a row of W4 chunks to `code` (the row starts zeroed).
fn set_nibble(row: &mut [u8], i: usize, code: u8) {
    let (chunk, pos) = (i / CHUNK, i % CHUNK);
    let byte = chunk * CHUNK_BYTES4 + pos % 16;
    row[byte] |= (code & 0x0F) << (4 * (pos / 16));
}

/// N17 the fold into `out`: `sat(round_shift(x * m, sf), 8)`, equal to golden's `fold_i8`
/// (tested exhaustively over `x` against it) without allocating. The N2 rounding shift is
/// evaluated in `i32`, which is exact here: `|x * m| <= 128 * 2^15 = 2^22` (`m <= 2^SF`, N17).
pub fn fold_into(x_i8: &[i8], fscale_q: &[u16], sf: u32, out: &mut [i8]) {
    assert_eq!(
        x_i8.len(),
        fscale_q.len(),
        "fold_into: one multiplier per element"
    );
    assert_eq!(x_i8.len(), out.len(), "fold_into: output length");
    assert!((1..=15).contains(&sf), "fold_into: SF {sf} not in 1..=15");
    let half = 1i32 << (sf - 1);
    for ((o, &x), &m) in out.iter_mut().zip(x_i8).zip(fscale_q) {
        let prod = i32::from(x) * i32::from(m);
        // N2: (x + 2^(s-1) - [x < 0]) >> s, ties away from zero.
        let v = (prod + half - i32::from(prod < 0)) >> sf;
        *o = v.clamp(-128, 127) as i8;
    }
}

fn dot_i8_u8(x: &[i8], z: &[u8]) -> i64 {
    x.iter()
        .zip(z)
        .map(|(&a, &b)| i64::from(i32::from(a) * i32::from(b)))
        .sum()
}

/// `p[r] = sum_e x[e] * code[r][e]` over `rows` contiguous rows of `chunks` W4 chunks.
fn dot4_rows(isa: Isa, x_pad: &[i8], rows: &[u8], n_rows: usize, chunks: usize, p: &mut [i32]) {
    dot4_rows_strided(isa, x_pad, rows, chunks * CHUNK_BYTES4, n_rows, chunks, p);
}

/// As [`dot4_rows`] with a row stride of `stride` bytes (`>= chunks * 16`).
fn dot4_rows_strided(
    isa: Isa,
    x_pad: &[i8],
    rows: &[u8],
    stride: usize,
    n_rows: usize,
    chunks: usize,
    p: &mut [i32],
) {
    assert!(x_pad.len() >= chunks * CHUNK && p.len() >= n_rows);
    assert!(n_rows == 0 || rows.len() >= (n_rows - 1) * stride + chunks * CHUNK_BYTES4);
    if isa == Isa::Avx2 && isa.is_available() {
        crate::avx2::dot4_rows(x_pad, rows, stride, n_rows, chunks, p);
        return;
    }
    for (r, pr) in p.iter_mut().enumerate().take(n_rows) {
        let row = &rows[r * stride..r * stride + chunks * CHUNK_BYTES4];
        let mut acc = 0i32; // |.| <= e * 128 * 15 < 2^31 for e < 2^20
        for (w, x) in row
            .chunks_exact(CHUNK_BYTES4)
            .zip(x_pad.chunks_exact(CHUNK))
        {
            for i in 0..16 {
                acc += i32::from(x[i]) * i32::from(w[i] & 0x0F)
                    + i32::from(x[16 + i]) * i32::from(w[i] >> 4);
            }
        }
        *pr = acc;
    }
}
