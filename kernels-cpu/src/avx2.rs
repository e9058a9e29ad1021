//! AVX2 row kernels for the weight operation (the layout and arithmetic are described in
//! `weights.rs`). Every entry point checks the CPU feature and the slice bounds its unsafe
//! code relies on, then calls the `#[target_feature(enable = "avx2")]` implementation.
//!
//! Why `vpmaddubsw` is exact here: it multiplies unsigned bytes (the codes) by signed bytes (the
//! activations, any `i8` including -128) and adds adjacent pairs with `i16` saturation. The
//! codes fed to it are at most 15 (W2: 3, W4: 15, W8: split into two nibbles), so a pair is at
//! most `2 * 15 * 128 = 3840 < 2^15`: it never saturates. `vpmaddwd` with 1 (or 16 for the W8
//! high nibble) then widens to `i32` lanes, which hold a group's sum exactly for padded group
//! lengths up to `SIMD_MAX_GROUP`.
//!
//! Two paths per row (W2, W4, ternary), chosen per row by `RowCtx::no_saturation`:
//! - *ordered* (`row1`, `rows_m_one`, `rows_m`): per group an exact `i32` `P_code`
//!   (horizontal sums of eight groups at once, `hsum8`), then `gscale * G` in `i64`
//!   (`scale8`) added with saturation after every group in ascending order (N13); the only
//!   path for rows whose `row_bound` exceeds the accumulator range.
//! - *folded* (`row_fold` GEMV, `fold_rows` GEMM), for rows whose bound proves no saturation:
//!   `vpmaddwd(vpmaddubsw(codes, x), gscale)` gives `i32` lanes of `gscale * P_code` pieces,
//!   summed over up to `fold_span` chunks (32 W2, 8 W4: a lane is at most
//!   `2^15 * 4 * cmax * 128 = cmax * 2^24`) and then widened to `i64`; per row and token the
//!   lattice shift is applied and `sum_g gscale * zero * S` (the zero term, exact `i64`)
//!   subtracted. `gscale = 2^15` does not fit `i16`: it is stored as `-32768` and the
//!   `vpmaddubsw` output is negated first (`vpsignw` with the same vector, GEMV), or, in the
//!   GEMM where a decoded chunk serves all the tokens, the chunk's codes are doubled and the
//!   multiplier halved to `2^14` once per chunk (`fold_pre`). `gscale = 0` gives 0 either way.
//!
//! The folded GEMM is register-tiled, two rows by four tokens. `rows_m_b` pairs the folded
//! rows of its 16-row sub-block (not necessarily adjacent: ordered rows in between keep their
//! path; a last odd row runs alone, `R = 1`). `fold_rows` walks k-blocks of `fold_span`
//! chunks: the pair's chunks of the block are decoded and `fold_pre`'d once into a `Panel`
//! (codes and multiplier vectors, and `gscale * zero` of the groups whose first chunk is in
//! the block), then `fold_tile` runs every tile of four tokens (the `m % 4` tail as one tile
//! of 1-3) with its 2 x 4 `i32x8` accumulators in registers: per chunk the two rows' codes
//! and multipliers are loaded once and each token's 32 activations once, then `vpmaddubsw`,
//! `vpmaddwd`, `vpaddd` per (row, token), no spills. For 2 or 4 chunks per group (g64,
//! g128) the group's `vpmaddubsw` pairs are first summed in `i16` (exact: at most
//! `4 * 2 * 30 * 128 = 30720` with doubled W4 codes), one `vpmaddwd` per group. At the end of
//! the block each accumulator is widened to `i64` and reduced, four tokens per vector
//! (`hsum64x4`), shifted by the lattice, and the block's zero term subtracted, computed for
//! four tokens at once: `vpmuldq` of the `gscale * zero` broadcast by `S` transposed to
//! `[g][t]` (`s_tr`, filled once per call by `weights.rs`; `|gscale * zero| < 2^24`,
//! `|S| < 2^31`, the products exact in `i64`). The blocks' `i64` results are added into the
//! `[row][t]` output. Each step regroups the same exact sum (no saturation, by the row
//! bound), so the output is the N13 accumulator.
//!
//! GEMV quad path (`rows_quad`, `row_quad_n`, two rows a pass; W2 and ternary with one chunk a group, i.e.
//! `L <= 32`, the decode step's layers): the tensor keeps a second copy of its rows in the
//! *quad layout* (`weights.rs`), where a block of 32 bytes holds four virtual chunks whose
//! `i16` lane `j` (byte pair `2j, 2j + 1`) belongs to group `j % 4` of the quad's four groups,
//! and the token's activations are permuted the same way once per call. Per quad:
//! - the four chunks' `vpmaddubsw` outputs are added in `i16`: a lane sums four pairs of one
//!   group, `|.| <= 4 * 2 * 3 * 128 = 3072`, exact;
//! - one `vpsignw` (the `2^15 -> -32768` case, as in the folded path) and one `vpmaddwd` with
//!   the four group scales broadcast as one `u64` (a plain load, no shuffle): a lane is at most
//!   `2 * 3072 * 2^15 < 2^28`, so `i32` lanes take 8 quads (`QUAD_SPAN`) before widening;
//! - so per chunk about 4 vector uops instead of the folded path's 7-8 (no per-chunk scale
//!   broadcast or `vpsignw`, one multiply per quad instead of one per chunk).
//!
//! The last `groups % 4` groups of a row (e.g. 2 of the 18 of `k = 576`) are single chunks
//! taken as on the folded path (`fold_dot`, added to the same `i32` lanes), not a padded quad.
//!
//! The zero term `sum_g gscale * zero * S` (`zero_term_quad`) is also `vpmaddwd`: `gz =
//! gscale * zero < 2^23` is formed from `vpmullw` / `vpmulhuw` as `lo = gz mod 2^15` and
//! `hi = gz >> 15`, both non-negative `i16`, against `S` as `i16` (`|S| <= 4096`); its lanes, the
//! lattice shift and the main lanes are combined in `i64` lanes and reduced once per row. Rows
//! whose bound does not prove no saturation take the ordered path (`row1`) on the group layout.
//!
//! GEMV prefetch (`prefetch_span`, `prefetch_lines`): the quad rows and the W8 rows are
//! prefetched 4 KiB ahead of the row being computed (a task first requests the whole distance):
//! a decode step streams every tensor from DRAM once, and the hardware prefetchers stop at
//! page boundaries.
//!
//! W8 GEMV (`dot8_mem`) widens codes (`vpmovzxbw`) and activations (`vpmovsxbw`) to `i16` and
//! uses `vpmaddwd` directly (pairs `<= 2 * 255 * 128`), two multiplies per chunk instead of the
//! nibble split's four; the W8 GEMM keeps the nibble split (its decoded nibbles are shared by
//! the token block, the activations would have to be widened per row).
#![allow(unsafe_code)]

/// Runs `$body` (a block whose `unsafe` calls enter a `#[target_feature(enable = "avx2")]`
/// module, each with its `SAFETY` comment) after asserting that the CPU has AVX2; off x86_64
/// the body is not compiled and the call is unreachable (`Isa::Avx2` is never available there).
macro_rules! on_avx2 {
    ($body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            assert!(
                std::arch::is_x86_feature_detected!("avx2"),
                "AVX2 path on a CPU without AVX2"
            );
            $body
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("Isa::Avx2 is never available off x86_64")
    }};
}

use crate::weights::{QuadM, QuadX, RowCtx, QUAD_SLACK};

/// [`crate::act::dequant_run`] compiled for AVX2 (the portable loop, vectorized: the same
/// operations per element).
pub(crate) fn dequant_run_avx2(c: f64, y: &[i32], scale_w: &[f32], out: &mut [f32]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked just above); the body is safe code.
        unsafe { n20_imp::dequant_run(c, y, scale_w, out) }
    })
}

/// Whether the CPU has FMA (for [`expf_in_place_avx2`]).
pub(crate) fn fma_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`crate::act::expf_in_place`] on AVX2 + FMA: four lanes in `f64`, the table by a gather,
/// every operation of `act::expf_core` in the same order (fused where it fuses); a block of
/// four with any `|x| >= 88` or NaN, and the tail, go through the scalar `act::expf`.
pub(crate) fn expf_in_place_avx2(x: &mut [f32]) {
    on_avx2!({
        assert!(fma_detected(), "FMA path on a CPU without FMA");
        // SAFETY: AVX2 and FMA are present (checked just above); the loads and stores stay
        // inside `x` (blocks of four below its length).
        unsafe { n20_imp::expf_in_place(x) }
    })
}

/// [`crate::act::sum_squares_rows`] for a multiple of four rows: rows `4 b..4 b + 4` in the
/// four `f64` lanes of one vector (gathered a column at a time), the sequential sum per lane.
pub(crate) fn sum_squares_rows4(x: &[f32], d: usize, out: &mut [f64]) {
    assert!(out.len().is_multiple_of(4) && x.len() == out.len() * d && d > 0);
    assert!(
        x.len() <= i32::MAX as usize,
        "row offsets fit the gather's i32 indices"
    );
    on_avx2!({
        // SAFETY: AVX2 is present (checked just above); every gathered index is below
        // x.len() (rows of d values, asserted).
        unsafe { n20_imp::sum_squares_rows4(x, d, out) }
    })
}

#[cfg(target_arch = "x86_64")]
mod n20_imp {
    use std::arch::x86_64::*;

    use crate::act::{expf, EXPF_C, EXPF_INV_LN2_N, EXPF_SHIFT, EXPF_TAB};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_squares_rows4(x: &[f32], d: usize, out: &mut [f64]) {
        let p = x.as_ptr();
        let di = d as i32;
        let idx = _mm_setr_epi32(0, di, 2 * di, 3 * di);
        for (b, o) in out.chunks_exact_mut(4).enumerate() {
            let base = b * 4 * d;
            let mut acc = _mm256_setzero_pd();
            for i in 0..d {
                // SAFETY: x[base + r d + i] for r < 4, i < d is in bounds (caller).
                let v = unsafe { _mm_i32gather_ps::<4>(p.add(base + i), idx) };
                let v = _mm256_cvtps_pd(v);
                acc = _mm256_add_pd(acc, _mm256_mul_pd(v, v));
            }
            // SAFETY: o is four f64.
            unsafe { _mm256_storeu_pd(o.as_mut_ptr(), acc) };
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expf_in_place(x: &mut [f32]) {
        let n4 = x.len() / 4 * 4;
        let p = x.as_mut_ptr();
        let (c, shift) = (_mm256_set1_pd(EXPF_INV_LN2_N), _mm256_set1_pd(EXPF_SHIFT));
        let (c0, c1, c2) = (
            _mm256_set1_pd(EXPF_C[0]),
            _mm256_set1_pd(EXPF_C[1]),
            _mm256_set1_pd(EXPF_C[2]),
        );
        let one = _mm256_set1_pd(1.0);
        let lim = _mm_set1_ps(88.0);
        let mut i = 0;
        while i < n4 {
            // SAFETY: x[i..i + 4] is in bounds (i + 4 <= n4 <= len).
            unsafe {
                let v = _mm_loadu_ps(p.add(i));
                let a = _mm_andnot_ps(_mm_set1_ps(-0.0), v);
                if _mm_movemask_ps(_mm_cmplt_ps(a, lim)) != 0xF {
                    for j in i..i + 4 {
                        *p.add(j) = expf(*p.add(j));
                    }
                    i += 4;
                    continue;
                }
                let xd = _mm256_cvtps_pd(v);
                let kd0 = _mm256_fmadd_pd(c, xd, shift);
                let ki = _mm256_castpd_si256(kd0);
                let kd = _mm256_sub_pd(kd0, shift);
                let r = _mm256_fmsub_pd(c, xd, kd);
                let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
                let t = _mm256_i64gather_epi64::<8>(EXPF_TAB.as_ptr().cast::<i64>(), idx);
                let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
                let z = _mm256_fmadd_pd(c0, r, c1);
                let r2 = _mm256_mul_pd(r, r);
                let y = _mm256_fmadd_pd(c2, r, one);
                let y = _mm256_fmadd_pd(z, r2, y);
                _mm_storeu_ps(p.add(i), _mm256_cvtpd_ps(_mm256_mul_pd(y, s)));
            }
            i += 4;
        }
        for v in &mut x[n4..] {
            *v = expf(*v);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dequant_run(c: f64, y: &[i32], scale_w: &[f32], out: &mut [f32]) {
        crate::act::dequant_run_portable(c, y, scale_w, out);
    }
}

/// Rows `row0..row0 + out.len()` for one padded token `xp` with group sums `s` (and `qx`, the
/// token in the GEMV quad layout, for tensors that have one).
pub(crate) fn rows_one_token(
    ctx: &RowCtx<'_>,
    row0: usize,
    xp: &[i8],
    s: &[i32],
    qx: Option<QuadX<'_>>,
    out: &mut [i64],
) {
    check_bounds(ctx, row0, out.len(), 1, xp.len(), s.len());
    if let Some(qx) = qx {
        check_quad_bounds(ctx, row0, out.len(), qx);
    }
    on_avx2!({
        // SAFETY: AVX2 is present (checked just above) and check_bounds (and check_quad_bounds
        // when qx is given) asserted every slice length the raw loads in `imp` rely on.
        unsafe { imp::rows_one_token(ctx, row0, xp, s, qx, out) }
    })
}

/// Rows for `m` tokens (padded rows of `plen` in `xp`); `out` is `[row][t]`. `s_tr` holds the
/// group sums transposed (`[g][t]`, token stride `s_tr_stride(m)`, padding zero).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_many_tokens(
    ctx: &RowCtx<'_>,
    row0: usize,
    m: usize,
    plen: usize,
    xp: &[i8],
    xq: Option<QuadM<'_>>,
    s: &[i32],
    s_tr: &[i64],
    out: &mut [i64],
    vnni: bool,
) {
    assert_eq!(out.len() % m, 0, "rows_many_tokens: [row][t] output");
    assert!(
        !vnni || crate::Isa::Avx512Vnni.is_available(),
        "AVX-512 VNNI path on a CPU without it"
    );
    if let Some(xq) = xq {
        check_quad_layout(ctx, row0, out.len() / m);
        assert!(xq.x.len() >= m * plen, "quad-layout activations too short");
        assert!(
            xq.s_pair.len() >= ctx.groups.div_ceil(2) * crate::weights::s_pair_stride(m),
            "paired group sums too short"
        );
    }
    assert_eq!(
        plen,
        ctx.groups * ctx.chunks_per_group * 32,
        "padded length"
    );
    check_bounds(ctx, row0, out.len() / m, m, xp.len(), s.len());
    assert!(
        s_tr.len() >= ctx.groups * crate::weights::s_tr_stride(m),
        "transposed group sums too short"
    );
    on_avx2!({
        // SAFETY: as in rows_one_token: AVX2 checked (and AVX-512 F/BW/VL/VNNI when `vnni`,
        // asserted above), bounds asserted by check_bounds and just above (s_tr).
        unsafe { imp::rows_many_tokens(ctx, row0, m, xp, xq, s, s_tr, out, vnni) }
    })
}

fn check_bounds(ctx: &RowCtx<'_>, row0: usize, rows: usize, m: usize, xp_len: usize, s_len: usize) {
    let plen = ctx.groups * ctx.chunks_per_group * 32;
    assert_eq!(
        ctx.row_bytes,
        ctx.groups * ctx.chunks_per_group * ctx.chunk_bytes
    );
    assert_eq!(ctx.chunk_bytes, 32 * ctx.bits as usize / 8);
    assert!(
        ctx.data.len() >= (row0 + rows) * ctx.row_bytes,
        "weight rows out of range"
    );
    assert!(ctx.gscale_q.len() >= (row0 + rows) * ctx.groups);
    assert!(ctx.zero_u8.len() >= (row0 + rows) * ctx.groups);
    assert!(xp_len >= m * plen, "padded activations too short");
    assert!(s_len >= m * ctx.groups, "group sums too short");
}

fn check_quad_bounds(ctx: &RowCtx<'_>, row0: usize, rows: usize, qx: QuadX<'_>) {
    check_quad_layout(ctx, row0, rows);
    // Whole blocks of 16 groups are read: the scales up to 2 * 12 bytes past the row's, the
    // zero points up to 12 bytes past the row (inside the slack for the last row); the
    // token's sums as far (zeros there).
    let meta16 = ctx.quad_meta.next_multiple_of(16);
    assert!(qx.x.len() >= 128 * ctx.quads + 32 * ctx.quad_tail && qx.s.len() >= meta16);
}

/// The quad copy's shape and that rows `row0..row0 + rows` (and the slack) are in it.
fn check_quad_layout(ctx: &RowCtx<'_>, row0: usize, rows: usize) {
    assert!(ctx.bits == 2 && ctx.chunks_per_group == 1 && ctx.groups > 0);
    assert_eq!((ctx.quads, ctx.quad_tail), (ctx.groups / 4, ctx.groups % 4));
    assert_eq!(ctx.quad_meta, ctx.groups.next_multiple_of(4));
    assert!(ctx.quad_meta < 16 << 10, "zero_term_quad's hi lanes");
    assert_eq!(
        ctx.quad_stride,
        32 * ctx.quads + 8 * ctx.quad_tail + 3 * ctx.quad_meta
    );
    assert!(ctx.quad_data.len() >= (row0 + rows) * ctx.quad_stride + QUAD_SLACK);
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use crate::weights::{QuadM, QuadX, RowCtx};

    /// Expands one chunk into (codes or low nibbles, high nibbles); for B < 8 the second is unused.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode<const B: u32>(w: *const u8) -> (__m256i, __m256i) {
        match B {
            2 => {
                // SAFETY (caller): 8 readable bytes at w.
                let q = unsafe { std::ptr::read_unaligned(w.cast::<u64>()) };
                let v =
                    _mm256_srlv_epi64(_mm256_set1_epi64x(q as i64), _mm256_set_epi64x(6, 4, 2, 0));
                (
                    _mm256_and_si256(v, _mm256_set1_epi8(3)),
                    _mm256_setzero_si256(),
                )
            }
            4 => {
                // SAFETY (caller): 16 readable bytes at w.
                let v = unsafe { _mm_loadu_si128(w.cast::<__m128i>()) };
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(v, m);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
            }
            _ => {
                // SAFETY (caller): 32 readable bytes at w.
                let v = unsafe { _mm256_loadu_si256(w.cast::<__m256i>()) };
                let m = _mm256_set1_epi8(0x0F);
                (
                    _mm256_and_si256(v, m),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
                )
            }
        }
    }

    /// W2 / ternary: the four chunks of the 32-byte block at `w` (see `weights.rs`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_block2(w: *const u8) -> [__m256i; 4] {
        // SAFETY (caller): 32 readable bytes at w.
        let v = unsafe { _mm256_loadu_si256(w.cast::<__m256i>()) };
        let m = _mm256_set1_epi8(3);
        [
            _mm256_and_si256(v, m),
            _mm256_and_si256(_mm256_srli_epi16(v, 2), m),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
            _mm256_and_si256(_mm256_srli_epi16(v, 6), m),
        ]
    }

    /// Chunk `ci` of the row at `w`; W2 / ternary chunks below `blocked` are in blocks of four.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_at<const B: u32>(
        w: *const u8,
        ci: usize,
        blocked: usize,
    ) -> (__m256i, __m256i) {
        if B == 2 && ci < blocked {
            // SAFETY (caller): the row holds chunk ci, so its block's 32 bytes.
            let v = unsafe { _mm256_loadu_si256(w.add(ci / 4 * 32).cast::<__m256i>()) };
            let v = _mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * (ci % 4) as i32));
            (
                _mm256_and_si256(v, _mm256_set1_epi8(3)),
                _mm256_setzero_si256(),
            )
        } else {
            // SAFETY (caller): chunk ci's bytes at 8 * B / 2 * ci are readable.
            unsafe { decode::<B>(w.add(ci * 4 * B as usize)) }
        }
    }

    /// `i32x8` partial sums of `code * x` over one chunk (exact; see the module docs).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot<const B: u32>(c: (__m256i, __m256i), x: __m256i) -> __m256i {
        let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(c.0, x), _mm256_set1_epi16(1));
        if B == 8 {
            let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(c.1, x), _mm256_set1_epi16(16));
            _mm256_add_epi32(lo, hi)
        } else {
            lo
        }
    }

    /// W8 on one thread's GEMV path: `i32x8` partial sums of one chunk, codes and activations
    /// widened to `i16` (`vpmovzxbw`, `vpmovsxbw`) and multiplied by `vpmaddwd` (pairs at most
    /// `2 * 255 * 128 < 2^31`): two multiplies per chunk instead of the nibble split's four.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot8_mem(w: *const u8, x: *const i8) -> __m256i {
        // SAFETY (caller): 32 readable bytes at w and at x.
        unsafe {
            let c0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(w.cast::<__m128i>()));
            let c1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(w.add(16).cast::<__m128i>()));
            let x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.cast::<__m128i>()));
            let x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(16).cast::<__m128i>()));
            _mm256_add_epi32(_mm256_madd_epi16(c0, x0), _mm256_madd_epi16(c1, x1))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_x(xp: *const i8) -> __m256i {
        // SAFETY (caller): 32 readable bytes at xp.
        unsafe { _mm256_loadu_si256(xp.cast::<__m256i>()) }
    }

    /// The four horizontal sums of `a, b, c, d`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn hsum4(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> [i32; 4] {
        let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        let r = _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256(abcd, 1),
        );
        let mut out = [0i32; 4];
        // SAFETY: out is 16 writable bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast::<__m128i>(), r) };
        out
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn hsum1(a: __m256i) -> i32 {
        let r = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        let r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0b01_00_11_10));
        let r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0b10_11_00_01));
        _mm_cvtsi128_si32(r)
    }

    /// One group's `i32x8` partial sums for one token: chunks `ci0..ci0 + cg` of the row at `w`
    /// (`blocked` as in [`decode_at`]) against the group's activations at `x`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group_dot<const B: u32>(
        w: *const u8,
        ci0: usize,
        blocked: usize,
        x: *const i8,
        cg: usize,
    ) -> __m256i {
        let mut acc = _mm256_setzero_si256();
        for c in 0..cg {
            if B == 8 {
                // SAFETY (caller): the group's cg chunks are readable in the row and at x.
                acc = _mm256_add_epi32(acc, unsafe {
                    dot8_mem(w.add((ci0 + c) * 32), x.add(c * 32))
                });
                continue;
            }
            // SAFETY (caller): the group's cg chunks are readable in the row and at x.
            let (codes, xv) =
                unsafe { (decode_at::<B>(w, ci0 + c, blocked), load_x(x.add(c * 32))) };
            acc = _mm256_add_epi32(acc, dot::<B>(codes, xv));
        }
        acc
    }

    /// # Safety
    /// AVX2 present; bounds as asserted by `super::check_bounds` (one token).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_one_token(
        ctx: &RowCtx<'_>,
        row0: usize,
        xp: &[i8],
        s: &[i32],
        qx: Option<QuadX<'_>>,
        out: &mut [i64],
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            if let Some(qx) = qx {
                return rows_quad(ctx, row0, xp, s, qx, out);
            }
            match ctx.bits {
                2 => rows1::<2>(ctx, row0, xp, s, out),
                4 => rows1::<4>(ctx, row0, xp, s, out),
                _ => rows1::<8>(ctx, row0, xp, s, out),
            }
        }
    }

    /// The eight horizontal sums of `v[0..8]`, in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn hsum8(v: &[__m256i; 8]) -> __m256i {
        let ab = _mm256_hadd_epi32(v[0], v[1]);
        let cd = _mm256_hadd_epi32(v[2], v[3]);
        let ef = _mm256_hadd_epi32(v[4], v[5]);
        let gh = _mm256_hadd_epi32(v[6], v[7]);
        let abcd = _mm256_hadd_epi32(ab, cd);
        let efgh = _mm256_hadd_epi32(ef, gh);
        _mm256_add_epi32(
            _mm256_permute2x128_si256(abcd, efgh, 0x20),
            _mm256_permute2x128_si256(abcd, efgh, 0x31),
        )
    }

    /// `gscale * G` for eight consecutive groups as two `i64x4`: groups `g, g+2, g+4, g+6`
    /// and `g+1, g+3, g+5, g+7`. `G = (P << ls) - zero * S` is exact in `i32`
    /// (`|.| <= 2 * L * 255 * 128 < 2^31`), the products exact in `i64`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scale8(
        p8: __m256i,
        ls: i32,
        zero: *const u8,
        gscale: *const u16,
        s: *const i32,
    ) -> (__m256i, __m256i) {
        // SAFETY (caller): 8 readable elements at zero, gscale and s.
        let (z, gs, sv) = unsafe {
            (
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(zero.cast::<__m128i>())),
                _mm256_cvtepu16_epi32(_mm_loadu_si128(gscale.cast::<__m128i>())),
                _mm256_loadu_si256(s.cast::<__m256i>()),
            )
        };
        let gv = _mm256_sub_epi32(
            _mm256_sll_epi32(p8, _mm_cvtsi32_si128(ls)),
            _mm256_mullo_epi32(z, sv),
        );
        let even = _mm256_mul_epi32(gv, gs);
        let odd = _mm256_mul_epi32(_mm256_srli_epi64(gv, 32), _mm256_srli_epi64(gs, 32));
        (even, odd)
    }

    /// One row for one padded token: blocks of eight groups reduced and scaled in vectors;
    /// groups are added with per-group saturation in ascending order unless the row's bound
    /// proves no saturation can happen (then a plain exact `i64` sum gives the same result).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row1<const B: u32, const ONE: bool>(
        ctx: &RowCtx<'_>,
        row: usize,
        xp: &[i8],
        s: &[i32],
    ) -> i64 {
        let (cg, cb, groups) = (ctx.chunks_per_group, ctx.chunk_bytes, ctx.groups);
        let blocked = crate::weights::block_chunks(groups * cg);
        let gstride_x = cg * 32;
        let w = ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr();
        let x = xp.as_ptr();
        let meta = row * groups;
        let zero = ctx.zero_u8[meta..meta + groups].as_ptr();
        let gscale = ctx.gscale_q[meta..meta + groups].as_ptr();
        let sp = s[..groups].as_ptr();
        let ls = ctx.lattice_shift as i32;
        let fast = ctx.no_saturation_all() || ctx.no_saturation(row);
        let mut acc = 0i64;
        let mut acc_v = _mm256_setzero_si256();
        let mut g = 0;
        while g + 8 <= groups {
            let mut v = [_mm256_setzero_si256(); 8];
            if ONE && B == 2 {
                // One chunk per group, chunks g..g + 8 in two whole blocks (g + 8 <= blocked
                // as g is a multiple of 8 and g + 8 <= groups = chunks).
                for h in 0..2 {
                    // SAFETY: blocks (g + 4h) / 4 lie inside the row; the 32 activations of
                    // each of their chunks inside the padded token (check_bounds).
                    unsafe {
                        let codes = decode_block2(w.add((g + 4 * h) * cb));
                        for (j, cj) in codes.into_iter().enumerate() {
                            let q = 4 * h + j;
                            v[q] =
                                dot::<B>((cj, _mm256_setzero_si256()), load_x(x.add((g + q) * 32)));
                        }
                    }
                }
            } else {
                for (q, vq) in v.iter_mut().enumerate() {
                    // SAFETY: group g + q < groups lies inside the row (row_bytes = groups *
                    // cg * cb) and the padded token (groups * cg * 32), asserted by
                    // check_bounds.
                    *vq = unsafe {
                        if ONE && B == 8 {
                            dot8_mem(w.add((g + q) * cb), x.add((g + q) * 32))
                        } else if ONE {
                            // One chunk per group (L <= 32): no inner loop.
                            dot::<B>(
                                decode::<B>(w.add((g + q) * cb)),
                                load_x(x.add((g + q) * 32)),
                            )
                        } else {
                            group_dot::<B>(w, (g + q) * cg, blocked, x.add((g + q) * gstride_x), cg)
                        }
                    };
                }
            }
            // SAFETY: groups g..g+8 of the row's metadata and of s are in range.
            let (even, odd) =
                unsafe { scale8(hsum8(&v), ls, zero.add(g), gscale.add(g), sp.add(g)) };
            if fast {
                acc_v = _mm256_add_epi64(acc_v, _mm256_add_epi64(even, odd));
            } else {
                let (mut e, mut o) = ([0i64; 4], [0i64; 4]);
                // SAFETY: e and o are 32 writable bytes each.
                unsafe {
                    _mm256_storeu_si256(e.as_mut_ptr().cast::<__m256i>(), even);
                    _mm256_storeu_si256(o.as_mut_ptr().cast::<__m256i>(), odd);
                }
                for q in 0..4 {
                    acc = (acc + e[q]).clamp(ctx.acc_lo, ctx.acc_hi);
                    acc = (acc + o[q]).clamp(ctx.acc_lo, ctx.acc_hi);
                }
            }
            g += 8;
        }
        if fast {
            let mut lanes = [0i64; 4];
            // SAFETY: lanes is 32 writable bytes.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), acc_v) };
            acc = lanes.iter().sum();
        }
        while g < groups {
            // SAFETY: group g lies inside the row and the padded token (see above).
            let p = unsafe { hsum1(group_dot::<B>(w, g * cg, blocked, x.add(g * gstride_x), cg)) };
            acc = ctx.accumulate(row, g, i64::from(p), s[g], acc);
            g += 1;
        }
        acc
    }

    /// How far ahead of the row being computed the GEMV prefetches its weights (W8 rows and
    /// the quad copy): a 4 KiB page, so the stream is requested across page boundaries, where
    /// the hardware prefetchers stop, and a task's first row requests the whole distance at
    /// once (the weights of a decode step come from DRAM, each tensor once per token).
    const PREFETCH: usize = 4096;

    /// Prefetches (into L1) the cache lines of `data[from..to]` (clipped to `data`): a task's
    /// first `PREFETCH` bytes, requested at once.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_span(data: &[u8], from: usize, to: usize) {
        let mut at = from;
        while at < to.min(data.len()) {
            // SAFETY: at < data.len(): the address is inside the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().add(at).cast::<i8>()) };
            at += 64;
        }
    }

    /// Prefetches the `lines` cache lines from `data[at]` on, `PREFETCH` bytes past a row's end:
    /// the same number every row (a loop the branch predictor learns; a line is sometimes
    /// requested twice). The addresses may lie past the slice: a prefetch never faults and
    /// nothing is read through them.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_lines(data: &[u8], at: usize, lines: usize) {
        let p = data.as_ptr().wrapping_add(at);
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * l).cast::<i8>());
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn rows1<const B: u32>(
        ctx: &RowCtx<'_>,
        row0: usize,
        xp: &[i8],
        s: &[i32],
        out: &mut [i64],
    ) {
        let one = ctx.chunks_per_group == 1;
        if B == 8 {
            prefetch_span(
                ctx.data,
                row0 * ctx.row_bytes,
                row0 * ctx.row_bytes + PREFETCH,
            );
        }
        let pf_lines = ctx.row_bytes.div_ceil(64) + 1;
        let all_fast = ctx.no_saturation_all();
        for (i, o) in out.iter_mut().enumerate() {
            let row = row0 + i;
            if B == 8 {
                prefetch_lines(ctx.data, row * ctx.row_bytes + PREFETCH, pf_lines);
            }
            // SAFETY: forwarded from the caller's contract (row0 + i is a checked row).
            *o = unsafe {
                if B != 8 && (all_fast || ctx.no_saturation(row)) {
                    match ctx.chunks_per_group {
                        1 => row_fold::<B, 1>(ctx, row, xp, s),
                        2 => row_fold::<B, 2>(ctx, row, xp, s),
                        4 => row_fold::<B, 4>(ctx, row, xp, s),
                        _ => row_fold::<B, 0>(ctx, row, xp, s),
                    }
                } else if one {
                    row1::<B, true>(ctx, row, xp, s)
                } else {
                    row1::<B, false>(ctx, row, xp, s)
                }
            };
        }
    }

    /// # Safety
    /// AVX2 present (and AVX-512 F/BW/VL/VNNI when `vnni`; `xq` then in the VNNI quad
    /// layout); bounds as asserted by `super::check_bounds` (`m` tokens) and `s_tr`
    /// (`groups * s_tr_stride(m)` elements).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_many_tokens(
        ctx: &RowCtx<'_>,
        row0: usize,
        m: usize,
        xp: &[i8],
        xq: Option<QuadM<'_>>,
        s: &[i32],
        s_tr: &[i64],
        out: &mut [i64],
        vnni: bool,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            match ctx.bits {
                2 => rows_m_b::<2>(ctx, row0, m, xp, xq, s, s_tr, out, vnni),
                4 => rows_m_b::<4>(ctx, row0, m, xp, xq, s, s_tr, out, false),
                _ => rows_m_b::<8>(ctx, row0, m, xp, xq, s, s_tr, out, false),
            }
        }
    }

    /// GEMM rows of one width: W2 / W4 rows whose bound proves no saturation take the tiled
    /// folded path ([`fold_rows`]) two at a time (a last odd one alone), or, for tensors with
    /// a quad copy when `xq` (the tokens in the quad layout) is given, the tiled quad path
    /// ([`quad_rows`]) one at a time; the others the per-group ordered one.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_m_b<const B: u32>(
        ctx: &RowCtx<'_>,
        row0: usize,
        m: usize,
        xp: &[i8],
        xq: Option<QuadM<'_>>,
        s: &[i32],
        s_tr: &[i64],
        out: &mut [i64],
        vnni: bool,
    ) {
        let one = ctx.chunks_per_group == 1;
        // SAFETY (both): AVX-512 F/BW/VL/VNNI present when `vnni` (caller's contract), else
        // AVX2; the rest forwarded to quad_rows' contract.
        let quad = |fold: &[usize], o: *mut i64, xq: QuadM<'_>| unsafe {
            if vnni && crate::weights::tok_layout(ctx.groups) {
                vnni::tok_rows(ctx, row0, fold, m, xq, o);
            } else {
                quad_rows(ctx, row0, fold, m, xq, o);
            }
        };
        let rows = out.len() / m;
        let o = out.as_mut_ptr();
        if let Some(xq) = xq.filter(|_| B == 2 && ctx.quads > 0) {
            // Folded rows in groups of QUAD_ROWS (their panels and a token tile's activations
            // stay in L1 together), the others on the ordered path.
            let mut fold = [0usize; vnni::TOK_ROWS];
            let cap = if vnni && crate::weights::tok_layout(ctx.groups) {
                vnni::TOK_ROWS
            } else {
                QUAD_ROWS
            };
            let mut nf = 0;
            for i in 0..rows {
                let row = row0 + i;
                // SAFETY: forwarded from the caller's contract (row is a checked row of both
                // layouts, xq holds m tokens); rows of `out` are disjoint m-element slices.
                unsafe {
                    if ctx.no_saturation(row) {
                        fold[nf] = i;
                        nf += 1;
                        if nf == cap || i + 1 == rows {
                            quad(&fold[..nf], o, xq);
                            nf = 0;
                        }
                    } else {
                        let o_row = std::slice::from_raw_parts_mut(o.add(i * m), m);
                        rows_m_one::<B>(ctx, row, m, xp, s, o_row);
                    }
                }
            }
            if nf > 0 {
                quad(&fold[..nf], o, xq);
            }
            return;
        }
        // One panel for the block's folded rows (zeroed once per call, not per row pair).
        let z = _mm256_setzero_si256();
        let mut panel = Panel {
            codes: [[z; 2]; PANEL],
            gsv: [[z; 2]; PANEL],
            gz: [[z; 2]; PANEL],
        };
        // A folded row waiting for a partner (its index in the block).
        let mut pending: Option<usize> = None;
        for i in 0..rows {
            let row = row0 + i;
            // SAFETY: forwarded from the caller's contract (row0 + i and row0 + j are checked
            // rows); rows i and j < i of `out` are disjoint `m`-element slices of it.
            unsafe {
                if B != 8 && ctx.no_saturation(row) {
                    match pending.take() {
                        Some(j) => fold_rows::<B, 2>(
                            &mut panel,
                            ctx,
                            [row0 + j, row],
                            m,
                            xp,
                            s_tr,
                            [o.add(j * m), o.add(i * m)],
                        ),
                        None => pending = Some(i),
                    }
                    continue;
                }
                let o_row = std::slice::from_raw_parts_mut(o.add(i * m), m);
                if one {
                    rows_m_one::<B>(ctx, row, m, xp, s, o_row);
                } else {
                    rows_m::<B>(ctx, row, m, xp, s, o_row);
                }
            }
        }
        if let Some(j) = pending {
            // SAFETY: as above.
            unsafe { fold_rows::<B, 1>(&mut panel, ctx, [row0 + j], m, xp, s_tr, [o.add(j * m)]) };
        }
    }

    // ---- The folded path (W2, W4, ternary; rows whose `row_bound` proves no saturation) ----
    //
    // With no saturation the accumulator is the exact sum
    // `sum_g gscale_g * G_g = (sum_g gscale_g * P_code_g) << ls - sum_g gscale_g * zero_g * S_g`,
    // so the group scale is multiplied into the chunk's `vpmaddwd` (instead of 1) and no
    // per-group horizontal sum is needed: the `i32` lanes collect `gscale * P_code` pieces of many
    // groups, are widened to `i64` before they can overflow, and the lattice shift and the zero
    // term (a dot over the row's groups) are applied once per row and token.

    /// Chunks whose [`fold_dot`] lanes may be added in `i32` before widening: a lane is at most
    /// `2^15 * 4 * cmax * 128 = cmax * 2^24` (W2/ternary `cmax = 3`: 42 chunks fit `i32`, W4
    /// `cmax = 15`: 8 fit). A multiple of 4 (chunks are processed four at a time).
    const fn fold_span(b: u32) -> usize {
        if b == 2 {
            32
        } else {
            8
        }
    }

    /// The group scale in all sixteen `i16` lanes (`2^15` wraps to `-32768`, see [`fold_dot`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn gs_vec(gscale: *const u16) -> __m256i {
        // SAFETY (caller): gscale is readable.
        _mm256_set1_epi16(unsafe { gscale.read() } as i16)
    }

    /// `i32x8` lanes summing to `gscale * P_code` of one chunk. `vpmaddubsw` pairs are exact
    /// (`|.| <= 2 * cmax * 128`); `vpsignw` negates them where `gsv` is negative (only for
    /// `gscale = 2^15`, stored as `-32768`: `(-m) * (-32768) = 2^15 m`) and zeroes them where
    /// `gscale = 0` (the product is 0 anyway); `vpmaddwd` with `gsv` is then exact.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold_dot(codes: __m256i, x: __m256i, gsv: __m256i) -> __m256i {
        let m = _mm256_maddubs_epi16(codes, x);
        _mm256_madd_epi16(_mm256_sign_epi16(m, gsv), gsv)
    }

    /// `acc64 + widen(v)` (the eight `i32` lanes of `v` added into four `i64` lanes).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn widen_add(acc64: __m256i, v: __m256i) -> __m256i {
        let lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
        let hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
        _mm256_add_epi64(acc64, _mm256_add_epi64(lo, hi))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum64(v: __m256i) -> i64 {
        let r = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_cvtsi128_si64(r).wrapping_add(_mm_extract_epi64(r, 1))
    }

    /// `sum_g gscale_g * zero_g * S_g` over `groups` groups: `zero * S` is exact in `i32`
    /// (`|S| <= L * 128 <= 2^21`), the products with `gscale` exact in `i64`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero_term(zero: *const u8, gscale: *const u16, s: *const i32, groups: usize) -> i64 {
        let mut acc = _mm256_setzero_si256();
        let mut g = 0;
        while g + 8 <= groups {
            // SAFETY (caller): groups elements are readable at zero, gscale and s.
            let (z, gs, sv) = unsafe {
                (
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(zero.add(g).cast::<__m128i>())),
                    _mm256_cvtepu16_epi32(_mm_loadu_si128(gscale.add(g).cast::<__m128i>())),
                    _mm256_loadu_si256(s.add(g).cast::<__m256i>()),
                )
            };
            let zs = _mm256_mullo_epi32(z, sv);
            acc = _mm256_add_epi64(acc, _mm256_mul_epi32(zs, gs));
            acc = _mm256_add_epi64(
                acc,
                _mm256_mul_epi32(_mm256_srli_epi64(zs, 32), _mm256_srli_epi64(gs, 32)),
            );
            g += 8;
        }
        let mut r = hsum64(acc);
        while g < groups {
            // SAFETY (caller): as above.
            let (z, gs, sg) = unsafe { (*zero.add(g), *gscale.add(g), *s.add(g)) };
            r += i64::from(gs) * i64::from(z) * i64::from(sg);
            g += 1;
        }
        r
    }

    /// The codes of the four chunks `ci..ci + 4` of the row at `w` (`ci % 4 == 0`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quad_codes<const B: u32>(w: *const u8, ci: usize, blocked: usize) -> [__m256i; 4] {
        // SAFETY (caller): chunks ci..ci + 4 lie inside the row; in blocks when below blocked.
        unsafe {
            if B == 2 && ci < blocked {
                decode_block2(w.add(ci * 8))
            } else {
                [
                    decode_at::<B>(w, ci, blocked).0,
                    decode_at::<B>(w, ci + 1, blocked).0,
                    decode_at::<B>(w, ci + 2, blocked).0,
                    decode_at::<B>(w, ci + 3, blocked).0,
                ]
            }
        }
    }

    /// The `gsv` of chunk `ci`'s group (`CG` chunks a group, or `cg` when `CG == 0`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_gs<const CG: usize>(gscale: *const u16, ci: usize, cg: usize) -> __m256i {
        let g = match CG {
            1 => ci,
            2 => ci / 2,
            4 => ci / 4,
            _ => ci / cg,
        };
        // SAFETY (caller): chunk ci lies inside the row, so its group g < groups.
        unsafe { gs_vec(gscale.add(g)) }
    }

    /// The group scales of chunks `ci..ci + 4`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quad_gs<const CG: usize>(gscale: *const u16, ci: usize, cg: usize) -> [__m256i; 4] {
        // SAFETY (caller): chunks ci..ci + 4 lie inside the row.
        unsafe {
            match CG {
                4 => [chunk_gs::<4>(gscale, ci, 4); 4],
                2 => {
                    let (a, b) = (
                        chunk_gs::<2>(gscale, ci, 2),
                        chunk_gs::<2>(gscale, ci + 2, 2),
                    );
                    [a, a, b, b]
                }
                _ => [
                    chunk_gs::<CG>(gscale, ci, cg),
                    chunk_gs::<CG>(gscale, ci + 1, cg),
                    chunk_gs::<CG>(gscale, ci + 2, cg),
                    chunk_gs::<CG>(gscale, ci + 3, cg),
                ],
            }
        }
    }

    /// One row, one padded token, on the folded path (the row's bound must prove no
    /// saturation): exactly the N13 accumulator.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row_fold<const B: u32, const CG: usize>(
        ctx: &RowCtx<'_>,
        row: usize,
        xp: &[i8],
        s: &[i32],
    ) -> i64 {
        let (cg, groups) = (ctx.chunks_per_group, ctx.groups);
        let n_chunks = groups * cg;
        let blocked = crate::weights::block_chunks(n_chunks);
        let w = ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr();
        let meta = row * groups;
        let zero = ctx.zero_u8[meta..meta + groups].as_ptr();
        let gscale = ctx.gscale_q[meta..meta + groups].as_ptr();
        let x = xp[..n_chunks * 32].as_ptr();
        let (mut acc64, mut acc32) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let (mut since, mut ci) = (0usize, 0usize);
        while ci + 4 <= n_chunks {
            // SAFETY: chunks ci..ci + 4 <= n_chunks lie inside the row and the padded token
            // (asserted by check_bounds); ci is a multiple of 4.
            unsafe {
                let codes = quad_codes::<B>(w, ci, blocked);
                let gsv = quad_gs::<CG>(gscale, ci, cg);
                for j in 0..4 {
                    let xv = load_x(x.add((ci + j) * 32));
                    acc32 = _mm256_add_epi32(acc32, fold_dot(codes[j], xv, gsv[j]));
                }
            }
            ci += 4;
            since += 4;
            if since == fold_span(B) {
                acc64 = widen_add(acc64, acc32);
                acc32 = _mm256_setzero_si256();
                since = 0;
            }
        }
        while ci < n_chunks {
            // SAFETY: chunk ci < n_chunks (as above). The quads leave at most fold_span - 4
            // chunks in acc32, the tail adds at most 3: still within fold_span.
            unsafe {
                let codes = decode_at::<B>(w, ci, blocked).0;
                let xv = load_x(x.add(ci * 32));
                acc32 =
                    _mm256_add_epi32(acc32, fold_dot(codes, xv, chunk_gs::<CG>(gscale, ci, cg)));
            }
            ci += 1;
        }
        let p = hsum64(widen_add(acc64, acc32));
        // SAFETY: the row's groups of metadata and the token's groups of s are in range.
        let z = unsafe { zero_term(zero, gscale, s[..groups].as_ptr(), groups) };
        (p << ctx.lattice_shift) - z
    }

    // ---- The GEMV quad path (W2 / ternary, one chunk a group; see the module docs) ----

    /// Quads whose [`row_quad_n`] lanes may be added in `i32` before widening: a quad's lane is
    /// at most `2 * 4 * 768 * 2^15 < 2^28` (an `i16` lane of the quad's four `vpmaddubsw`
    /// sums is at most `4 * 2 * 3 * 128 = 3072`), so 8 quads stay below `2^31`.
    const QUAD_SPAN: usize = 8;

    /// Rows on the GEMV quad path where the bound proves no saturation, the others on the
    /// ordered path of the group layout.
    #[target_feature(enable = "avx2")]
    unsafe fn rows_quad(
        ctx: &RowCtx<'_>,
        row0: usize,
        xp: &[i8],
        s: &[i32],
        qx: QuadX<'_>,
        out: &mut [i64],
    ) {
        let qb = ctx.quad_stride;
        prefetch_span(ctx.quad_data, row0 * qb, row0 * qb + PREFETCH);
        let pf_lines = qb.div_ceil(64) + 1;
        let all_fast = ctx.no_saturation_all();
        let mut i = 0;
        if all_fast {
            // Four (then two) rows a pass: each activation load and group-sum load serves all.
            while i + 4 <= out.len() {
                let row = row0 + i;
                prefetch_lines(ctx.quad_data, row * qb + PREFETCH, 4 * pf_lines);
                // SAFETY: rows row..row + 4 are checked rows of the quad layout (caller's
                // contract); all_fast proves none can saturate.
                let four = unsafe { row_quad_n::<4>(ctx, row, qx) };
                out[i..i + 4].copy_from_slice(&four);
                i += 4;
            }
            while i + 2 <= out.len() {
                let row = row0 + i;
                prefetch_lines(ctx.quad_data, row * qb + PREFETCH, 2 * pf_lines);
                // SAFETY: rows row, row + 1 are checked rows of the quad layout (caller's
                // contract); all_fast proves neither can saturate.
                let pair = unsafe { row_quad_n::<2>(ctx, row, qx) };
                out[i..i + 2].copy_from_slice(&pair);
                i += 2;
            }
        }
        for (i, o) in out.iter_mut().enumerate().skip(i) {
            let row = row0 + i;
            prefetch_lines(ctx.quad_data, row * qb + PREFETCH, pf_lines);
            // SAFETY: forwarded from the caller's contract (row0 + i is a checked row of both
            // layouts).
            *o = unsafe {
                if all_fast || ctx.no_saturation(row) {
                    row_quad_n::<1>(ctx, row, qx)[0]
                } else {
                    row1::<2, true>(ctx, row, xp, s)
                }
            };
        }
    }

    /// `R` consecutive rows from `row` on the GEMV quad path (every row's bound must prove no
    /// saturation; `R` is 1, 2 or 4): per quad of four groups, the four chunks' `vpmaddubsw`
    /// pairs summed in `i16` (exact, `<= 3072`), negated where the scale is `2^15` (`vpsignw`,
    /// as in [`fold_dot`]) and multiplied by the four group scales in one `vpmaddwd` (lane `j`
    /// holds group `j % 4`); then the lattice shift and [`zero_term_quad`] (computed first, so
    /// its latency overlaps the quads). With `R > 1` each activation load serves every row, and
    /// `R = 4` ends in one four-row horizontal sum; each row's operations and result are those
    /// of `R = 1` (the `i64` lane sums wrap alike in any order). In cache, one thread,
    /// `examples/decode_step` with `SHAPES=3072,576`: 0.152 ms (pairs, zero term last) -> 0.146
    /// (zero term first) -> 0.142 ms (four rows).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row_quad_n<const R: usize>(ctx: &RowCtx<'_>, row: usize, qx: QuadX<'_>) -> [i64; R] {
        let (quads, tail, meta) = (ctx.quads, ctx.quad_tail, ctx.quad_meta);
        // SAFETY (all raw reads below): check_quad_bounds asserted that rows `row..row + R`
        // (checked rows, caller's contract) each have `quads` blocks of 32 bytes and `tail`
        // chunks of 8 in quad_data, then `meta = 4 quads + 4` (or `4 quads` without a tail)
        // groups of metadata, and the token `128 * quads + 32 * tail` codes and `meta` sums.
        let (mut w, mut gs) = ([std::ptr::null::<u8>(); R], [std::ptr::null::<u8>(); R]);
        for r in 0..R {
            w[r] = unsafe { ctx.quad_data.as_ptr().add((row + r) * ctx.quad_stride) };
            gs[r] = unsafe { w[r].add(quads * 32 + tail * 8) };
        }
        let x = qx.x.as_ptr();
        let m3 = _mm256_set1_epi8(3);
        let z0 = _mm256_setzero_si256();
        // The zero terms first: independent of the quads, so their latency overlaps the loop.
        let mut zt = [(z0, z0); R];
        for r in 0..R {
            // SAFETY: meta groups of row r's metadata and of the token's sums (see above).
            zt[r] = unsafe { zero_term_quad(gs[r], gs[r].add(2 * meta), qx.s.as_ptr(), meta) };
        }
        let (mut acc64, mut acc32) = ([z0; R], [z0; R]);
        let mut since = 0;
        for q in 0..quads {
            // SAFETY: quad q < quads of both rows and of the token (see above).
            unsafe {
                let xq = x.add(q * 128);
                let xv = [
                    load_x(xq),
                    load_x(xq.add(32)),
                    load_x(xq.add(64)),
                    load_x(xq.add(96)),
                ];
                for r in 0..R {
                    let v = _mm256_loadu_si256(w[r].add(q * 32).cast::<__m256i>());
                    let c0 = _mm256_and_si256(v, m3);
                    let c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
                    let c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
                    let c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
                    let m01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c0, xv[0]),
                        _mm256_maddubs_epi16(c1, xv[1]),
                    );
                    let m23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c2, xv[2]),
                        _mm256_maddubs_epi16(c3, xv[3]),
                    );
                    let m = _mm256_add_epi16(m01, m23);
                    let gsv = _mm256_set1_epi64x(std::ptr::read_unaligned(
                        gs[r].add(8 * q).cast::<i64>(),
                    ));
                    acc32[r] = _mm256_add_epi32(
                        acc32[r],
                        _mm256_madd_epi16(_mm256_sign_epi16(m, gsv), gsv),
                    );
                }
            }
            since += 1;
            if since == QUAD_SPAN {
                for r in 0..R {
                    acc64[r] = widen_add(acc64[r], acc32[r]);
                    acc32[r] = z0;
                }
                since = 0;
            }
        }
        for t in 0..tail {
            // SAFETY: tail chunk t of each row and of the token, its group's scale (see above).
            // The quads leave at most 7 quads' lanes in acc32 (below 7 * 2^27.6), a tail chunk
            // adds at most 2 * 768 * 2^15 < 2^25.6 (as in the folded path): still below 2^31.
            unsafe {
                let g = 4 * quads + t;
                let xv = load_x(x.add(32 * g));
                for r in 0..R {
                    let codes = decode::<2>(w[r].add(quads * 32 + 8 * t)).0;
                    let gsv =
                        _mm256_set1_epi16(std::ptr::read_unaligned(gs[r].add(2 * g).cast::<i16>()));
                    acc32[r] = _mm256_add_epi32(acc32[r], fold_dot(codes, xv, gsv));
                }
            }
        }
        let ls = _mm_cvtsi32_si128(ctx.lattice_shift as i32);
        let mut d = [z0; R];
        for r in 0..R {
            let (z_lo, z_hi) = zt[r];
            let p = _mm256_sll_epi64(widen_add(acc64[r], acc32[r]), ls);
            d[r] = _mm256_sub_epi64(p, _mm256_add_epi64(z_lo, _mm256_slli_epi64(z_hi, 15)));
        }
        // The lane sums wrap like i64 additions in any order (the exact total fits i64 by the
        // row bound).
        let mut out = [0i64; R];
        if R == 4 {
            // SAFETY: out is 4 i64.
            unsafe {
                _mm256_storeu_si256(
                    out.as_mut_ptr().cast::<__m256i>(),
                    hsum64x4([d[0], d[1], d[2], d[3]]),
                );
            }
        } else {
            for r in 0..R {
                out[r] = hsum64(d[r]);
            }
        }
        out
    }

    /// `sum_g gscale_g * zero_g * S_g` over `n` groups with `vpmaddwd`, in whole blocks of 16
    /// groups, as two `i64x4` whose lanes sum to `Z_lo` and `Z_hi`, the sum being
    /// `Z_lo + Z_hi * 2^15`. `gz = gscale * zero < 2^23` (scales are at most `2^15`) is split
    /// as `gz = hi * 2^15 + lo`: `lo` is the low 16-bit product (`vpmullw`) masked to 15 bits,
    /// `hi = (gscale * 2 zero) >> 16` (`vpmulhuw`, `< 2^8`), both non-negative `i16`; `S` is
    /// `i16` (`|S| <= 32 * 128`). A `lo` pair is below `2 * 2^15 * 2^12 = 2^28` (its `i32`
    /// lanes are widened every 4 blocks), a `hi` pair below `2^21` (widened at the end: exact
    /// for fewer than `2^10` blocks, asserted). Past the `n` groups the block reads the bytes
    /// that follow (the zero points, the next row, the slack) as scales and zero points: any
    /// such lane still gives `0 <= lo < 2^15` and `0 <= hi <= 510`, and its sum `S` is 0.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero_term_quad(
        gs: *const u8,
        zero: *const u8,
        s: *const i16,
        n: usize,
    ) -> (__m256i, __m256i) {
        let z0 = _mm256_setzero_si256();
        let mask = _mm256_set1_epi16(0x7FFF);
        let (mut lo64, mut lo, mut hi) = (z0, z0, z0);
        let mut g = 0;
        let mut since = 0;
        while g < n {
            // SAFETY (caller): 16 scales at gs + 2g, 16 bytes at zero + g, 16 sums at s + g.
            let (gsv, z, sv) = unsafe {
                (
                    _mm256_loadu_si256(gs.add(2 * g).cast::<__m256i>()),
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(zero.add(g).cast::<__m128i>())),
                    _mm256_loadu_si256(s.add(g).cast::<__m256i>()),
                )
            };
            let l = _mm256_and_si256(_mm256_mullo_epi16(gsv, z), mask);
            let h = _mm256_mulhi_epu16(gsv, _mm256_add_epi16(z, z));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(l, sv));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(h, sv));
            g += 16;
            since += 1;
            if since == 4 {
                lo64 = widen_add(lo64, lo);
                lo = z0;
                since = 0;
            }
        }
        (widen_add(lo64, lo), widen_add(z0, hi))
    }

    /// For GEMM, where a decoded chunk serves many tokens: moves the `gscale = 2^15` case from
    /// the `i16` multiplier into the codes once per chunk, so no per-token [`fold_dot`] sign
    /// is needed: where `gsv` is `-32768` the codes are doubled (W2 `<= 6`, W4 `<= 30`:
    /// `vpmaddubsw` still cannot saturate, `2 * 30 * 128 < 2^15`) and the multiplier becomes
    /// `2^14`; other groups are unchanged (`gscale < 2^15` is non-negative in `i16`). The
    /// lane bound of [`fold_span`] is unchanged (the products are the same).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold_pre(codes: __m256i, gsv: __m256i) -> (__m256i, __m256i) {
        let dbl = _mm256_cmpeq_epi16(gsv, _mm256_set1_epi16(i16::MIN));
        (
            _mm256_add_epi8(codes, _mm256_and_si256(codes, dbl)),
            // -32768 ^ 0xC000 = 0x4000 = 2^14.
            _mm256_xor_si256(
                gsv,
                _mm256_and_si256(dbl, _mm256_set1_epi16(0xC000_u16 as i16)),
            ),
        )
    }

    /// [`fold_dot`] after [`fold_pre`] (`gsv` non-negative): `vpmaddubsw`, `vpmaddwd`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fold_dot_pre(codes: __m256i, x: __m256i, gsv: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), gsv)
    }

    /// Chunks per k-block of the tiled path: the largest [`fold_span`].
    const PANEL: usize = 32;

    /// The chunks of one k-block of a tile's rows (`[chunk][row]`, up to two rows), decoded
    /// and [`fold_pre`]'d once for all tokens, and the `gscale * zero` of the groups starting
    /// in the block (`[group - first][row]`, as `i64x4` broadcasts).
    struct Panel {
        codes: [[__m256i; 2]; PANEL],
        gsv: [[__m256i; 2]; PANEL],
        gz: [[__m256i; 2]; PANEL],
    }

    /// `R` rows (`R <= 2`, the row numbers need not be adjacent) for `m` tokens on the folded
    /// path, written to `outs[r][0..m]`. By k-blocks of [`fold_span`] chunks: the rows'
    /// chunks are decoded into a [`Panel`], then every tile of up to four tokens runs
    /// [`fold_tile`] over the block and adds its exact `i64` results into the outputs.
    ///
    /// # Safety
    /// AVX2 present; the rows are checked rows and the bounds of `rows_many_tokens` hold;
    /// each `outs[r]` has `m` writable elements, not aliased.
    #[target_feature(enable = "avx2")]
    unsafe fn fold_rows<const B: u32, const R: usize>(
        panel: &mut Panel,
        ctx: &RowCtx<'_>,
        rows: [usize; R],
        m: usize,
        xp: &[i8],
        s_tr: &[i64],
        outs: [*mut i64; R],
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            match ctx.chunks_per_group {
                1 => fold_rows_cg::<B, 1, R>(panel, ctx, rows, m, xp, s_tr, outs),
                2 => fold_rows_cg::<B, 2, R>(panel, ctx, rows, m, xp, s_tr, outs),
                4 => fold_rows_cg::<B, 4, R>(panel, ctx, rows, m, xp, s_tr, outs),
                _ => fold_rows_cg::<B, 0, R>(panel, ctx, rows, m, xp, s_tr, outs),
            }
        }
    }

    /// [`fold_rows`] for `CG` chunks per group (`0`: any, `ctx.chunks_per_group`).
    #[target_feature(enable = "avx2")]
    unsafe fn fold_rows_cg<const B: u32, const CG: usize, const R: usize>(
        panel: &mut Panel,
        ctx: &RowCtx<'_>,
        rows: [usize; R],
        m: usize,
        xp: &[i8],
        s_tr: &[i64],
        outs: [*mut i64; R],
    ) {
        let (cg, groups) = (ctx.chunks_per_group, ctx.groups);
        let n_chunks = groups * cg;
        let plen = n_chunks * 32;
        let blocked = crate::weights::block_chunks(n_chunks);
        let stride = crate::weights::s_tr_stride(m);
        let w = rows.map(|row| ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr());
        let gscale = rows.map(|row| ctx.gscale_q[row * groups..(row + 1) * groups].as_ptr());
        let zero = rows.map(|row| ctx.zero_u8[row * groups..(row + 1) * groups].as_ptr());
        let x = xp[..m * plen].as_ptr();
        let st = s_tr[..groups * stride].as_ptr();
        let ls = ctx.lattice_shift as i32;
        for o in outs {
            // SAFETY: m writable elements at o (caller).
            unsafe { std::ptr::write_bytes(o, 0, m) };
        }
        let mut c0 = 0;
        while c0 < n_chunks {
            let kb = fold_span(B).min(n_chunks - c0);
            for c in 0..kb {
                for r in 0..R {
                    // SAFETY: chunk c0 + c < n_chunks lies inside row r (check_bounds).
                    (panel.codes[c][r], panel.gsv[c][r]) = unsafe {
                        fold_pre(
                            decode_at::<B>(w[r], c0 + c, blocked).0,
                            chunk_gs::<CG>(gscale[r], c0 + c, cg),
                        )
                    };
                }
            }
            // The groups whose first chunk is in this block (at most kb of them).
            let (g_lo, g_hi) = (c0.div_ceil(cg), (c0 + kb).div_ceil(cg));
            for g in g_lo..g_hi {
                for r in 0..R {
                    // SAFETY: g < groups: the row's metadata has groups elements.
                    let (gs, zp) = unsafe { (*gscale[r].add(g), *zero[r].add(g)) };
                    panel.gz[g - g_lo][r] = _mm256_set1_epi64x(i64::from(gs) * i64::from(zp));
                }
            }
            let blk = (c0, kb, g_lo, g_hi);
            let mut t = 0;
            // SAFETY: every tile's tokens t..t + T are < m, their padded rows and the s_tr
            // columns t..t + 4 (t + 4 <= stride) in range; outs[r] + t has T elements.
            unsafe {
                while t + 4 <= m {
                    fold_tile::<CG, R, 4>(
                        panel,
                        blk,
                        x.add(t * plen),
                        plen,
                        st.add(t),
                        stride,
                        ls,
                        outs.map(|o| o.add(t)),
                    );
                    t += 4;
                }
                let rest = outs.map(|o| o.add(t));
                let (xt, stt) = (x.add(t * plen), st.add(t));
                match m - t {
                    1 => fold_tile::<CG, R, 1>(panel, blk, xt, plen, stt, stride, ls, rest),
                    2 => fold_tile::<CG, R, 2>(panel, blk, xt, plen, stt, stride, ls, rest),
                    3 => fold_tile::<CG, R, 3>(panel, blk, xt, plen, stt, stride, ls, rest),
                    _ => {}
                }
            }
            c0 += kb;
        }
    }

    // ---- The tiled quad path (GEMM, W2 / ternary with a quad copy) ----

    /// Tokens per tile of [`quad_tile`].
    const QUAD_TILE: usize = 8;

    /// Rows per group of [`quad_rows`]: their panels (~1.8 KB each) and one token tile's
    /// activations (up to 8 KB) stay in L1 while the tile runs over the group's rows.
    const QUAD_ROWS: usize = 8;

    /// One k-block of a row on the quad path, shared by all its token tiles: per quad the four
    /// virtual chunks' codes and the four group scales (lane `j` of group `j % 4`), each
    /// [`fold_pre`]'d (codes doubled and the multiplier halved in the lanes of `2^15` groups);
    /// the tail chunks (group layout, with the last block) likewise; and per pair of the
    /// block's groups `gz = gscale * zero` split as `gz = hi * 2^15 + lo` (`0 <= lo < 2^15`,
    /// `0 <= hi < 2^8`: `gz < 2^15 * 2^8`), two `i16` of a pair in an `i32` (low half the even
    /// group), for the zero term's `vpmaddwd`.
    #[derive(Clone, Copy)]
    struct QuadPanel {
        codes: [[__m256i; 4]; QUAD_SPAN],
        gsv: [__m256i; QUAD_SPAN],
        tail: [(__m256i, __m256i); 3],
        gz_lo: [i32; 2 * QUAD_SPAN + 2],
        gz_hi: [i32; 2 * QUAD_SPAN + 2],
    }

    /// Rows `row0 + i` for `i` in `fold` (each row's bound proves no saturation; at most
    /// [`QUAD_ROWS`]) for `m` tokens (`xq`: the quad layout and paired group sums), written to
    /// `o[i * m..(i + 1) * m]`: the same exact sum as the folded path, regrouped. By k-blocks
    /// of up to [`QUAD_SPAN`] quads (7 when the rows have tail chunks, which join the last
    /// block): each row's [`QuadPanel`] of the block is built once, then every tile of
    /// [`QUAD_TILE`] tokens (a last one of fewer) runs [`quad_tile`] for each row, the tile's
    /// activations staying in L1. Lane bound: a quad adds at most `2 * 6144 * 2^14 < 2^27.6`
    /// to an `i32` lane (`i16` sums of four `vpmaddubsw` pairs are at most `4 * 2 * 6 * 128 =
    /// 6144` with doubled codes, the multiplier then `2^14`; undoubled `3072 * (2^15 - 1)`,
    /// the same bound), a tail chunk `2 * 1536 * 2^14 = 2^25.6`: 8 quads, or 7 quads and 3
    /// tail chunks, stay below `2^31`.
    ///
    /// # Safety
    /// AVX2 present; the rows are checked rows of both layouts (`check_bounds`,
    /// `check_quad_layout`); `xq` holds `m` tokens (`x`) and `ceil(groups / 2) *
    /// s_pair_stride(m)` paired sums; `o` has `m` writable elements for each row `i` of `fold`
    /// at `i * m`, not aliased.
    #[target_feature(enable = "avx2")]
    unsafe fn quad_rows(
        ctx: &RowCtx<'_>,
        row0: usize,
        fold: &[usize],
        m: usize,
        xq: QuadM<'_>,
        o: *mut i64,
    ) {
        let (quads, tail, groups) = (ctx.quads, ctx.quad_tail, ctx.groups);
        let xlen = 32 * groups;
        let stride = crate::weights::s_pair_stride(m);
        let x = xq.x[..m * xlen].as_ptr();
        let sp = xq.s_pair[..groups.div_ceil(2) * stride].as_ptr();
        let ls = ctx.lattice_shift as i32;
        let nr = fold.len();
        assert!(nr <= QUAD_ROWS);
        let mut outs = [std::ptr::null_mut::<i64>(); QUAD_ROWS];
        for (r, &i) in fold.iter().enumerate() {
            // SAFETY: m writable elements at o + i * m (caller).
            unsafe {
                outs[r] = o.add(i * m);
                std::ptr::write_bytes(outs[r], 0, m);
            }
        }
        let span = if tail > 0 { QUAD_SPAN - 1 } else { QUAD_SPAN };
        let z = _mm256_setzero_si256();
        let mut panels = [QuadPanel {
            codes: [[z; 4]; QUAD_SPAN],
            gsv: [z; QUAD_SPAN],
            tail: [(z, z); 3],
            gz_lo: [0; 2 * QUAD_SPAN + 2],
            gz_hi: [0; 2 * QUAD_SPAN + 2],
        }; QUAD_ROWS];
        let m3 = _mm256_set1_epi8(3);
        let mut q0 = 0;
        while q0 < quads {
            let nq = span.min(quads - q0);
            let nt = if q0 + nq == quads { tail } else { 0 };
            // The block's groups g_lo..g_hi as pairs p_lo..p_hi (g_lo is even; a last odd
            // group pairs with a zero one: zero `gz`, and its sums are zero).
            let (g_lo, g_hi) = (4 * q0, 4 * (q0 + nq) + nt);
            let (p_lo, p_hi) = (g_lo / 2, g_hi.div_ceil(2));
            for (p, &i) in panels.iter_mut().zip(fold) {
                let row = row0 + i;
                // SAFETY (raw reads): the row's quad copy has `quads` blocks of 32 bytes,
                // `tail` chunks of 8, then `meta >= groups` scales (u16 LE) (caller's contract).
                let w = unsafe { ctx.quad_data.as_ptr().add(row * ctx.quad_stride) };
                let gs = unsafe { w.add(32 * quads + 8 * tail) };
                let gscale = &ctx.gscale_q[row * groups..(row + 1) * groups];
                let zero = &ctx.zero_u8[row * groups..(row + 1) * groups];
                for q in 0..nq {
                    // SAFETY: quad q0 + q < quads of the row and its four scales (see above).
                    let (v, gsv) = unsafe {
                        (
                            _mm256_loadu_si256(w.add(32 * (q0 + q)).cast::<__m256i>()),
                            _mm256_set1_epi64x(std::ptr::read_unaligned(
                                gs.add(8 * (q0 + q)).cast::<i64>(),
                            )),
                        )
                    };
                    let c = [
                        _mm256_and_si256(v, m3),
                        _mm256_and_si256(_mm256_srli_epi16(v, 2), m3),
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), m3),
                        _mm256_and_si256(_mm256_srli_epi16(v, 6), m3),
                    ];
                    for (pc, cj) in p.codes[q].iter_mut().zip(c) {
                        (*pc, p.gsv[q]) = fold_pre(cj, gsv);
                    }
                }
                for t in 0..nt {
                    let g = 4 * quads + t;
                    // SAFETY: tail chunk t of the row (see above).
                    let codes = unsafe { decode::<2>(w.add(32 * quads + 8 * t)).0 };
                    p.tail[t] = fold_pre(codes, _mm256_set1_epi16(gscale[g] as i16));
                }
                for pr in p_lo..p_hi {
                    (p.gz_lo[pr - p_lo], p.gz_hi[pr - p_lo]) = gz_pair(gscale, zero, pr, g_hi);
                }
            }
            let blk = (q0, nq, nt, p_lo, p_hi);
            let mut t = 0;
            // SAFETY: each tile's tokens t..t + T < m are rows of xq.x, their s_pair columns
            // t..t + 8 <= stride, and outs[r][t..t + T] are writable.
            unsafe {
                while t + QUAD_TILE <= m {
                    let (xt, spt) = (x.add(t * xlen), sp.add(t));
                    for r in 0..nr {
                        quad_tile::<QUAD_TILE>(
                            &panels[r],
                            blk,
                            xt,
                            xlen,
                            spt,
                            stride,
                            ls,
                            outs[r].add(t),
                        );
                    }
                    t += QUAD_TILE;
                }
                let (xt, spt) = (x.add(t * xlen), sp.add(t));
                for r in 0..nr {
                    let (p, ot) = (&panels[r], outs[r].add(t));
                    match m - t {
                        1 => quad_tile::<1>(p, blk, xt, xlen, spt, stride, ls, ot),
                        2 => quad_tile::<2>(p, blk, xt, xlen, spt, stride, ls, ot),
                        3 => quad_tile::<3>(p, blk, xt, xlen, spt, stride, ls, ot),
                        4 => quad_tile::<4>(p, blk, xt, xlen, spt, stride, ls, ot),
                        5 => quad_tile::<5>(p, blk, xt, xlen, spt, stride, ls, ot),
                        6 => quad_tile::<6>(p, blk, xt, xlen, spt, stride, ls, ot),
                        7 => quad_tile::<7>(p, blk, xt, xlen, spt, stride, ls, ot),
                        _ => {}
                    }
                }
            }
            q0 += nq;
        }
    }

    /// The quad micro-kernel: one row times `T <= 8` tokens over the k-block `blk = (q0, nq,
    /// nt, p_lo, p_hi)` of `p`, `T` `i32x8` accumulators in registers. Per quad and token:
    /// four `vpmaddubsw` (activations as memory operands), three `vpaddw`, one `vpmaddwd` by
    /// the four group scales, one `vpaddd` (`1.25` multiplies per chunk instead of the
    /// folded tile's 2); per tail chunk and token: `vpmaddubsw`, `vpmaddwd`, `vpaddd`. The
    /// block's zero term `sum_g gscale * zero * S` for eight tokens at once: per pair of
    /// groups one `vpmaddwd` of the tokens' paired sums by the pair's `lo` halves and one by
    /// the `hi` halves (`|S| <= 2^12`: a `lo` product pair is below `2 * 2^15 * 2^12 = 2^28`,
    /// 8 pairs are summed in `i32` before widening, `16 * (2^15 - 1) * 2^12 < 2^31`; a `hi`
    /// pair is below `2 * 2^8 * 2^12 = 2^21`). Then each accumulator is widened and reduced
    /// to `i64`, shifted by the lattice, `Z_lo + Z_hi * 2^15` subtracted, and the result added
    /// into `out[0..T]`.
    ///
    /// # Safety
    /// AVX2 present; `x` is token 0's row of the quad layout (tokens `0..T` at stride `xlen`);
    /// `sp + pr * stride` has 8 readable elements for the block's pairs; `out` has `T`
    /// writable elements.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quad_tile<const T: usize>(
        p: &QuadPanel,
        blk: (usize, usize, usize, usize, usize),
        x: *const i8,
        xlen: usize,
        sp: *const i32,
        stride: usize,
        ls: i32,
        out: *mut i64,
    ) {
        let (q0, nq, nt, p_lo, p_hi) = blk;
        let quads_all = (xlen / 32 - nt) / 4;
        let mut acc = [_mm256_setzero_si256(); T];
        for q in 0..nq {
            let (c, gv) = (p.codes[q], p.gsv[q]);
            for u in 0..T {
                // SAFETY: quad q0 + q of token u (caller).
                unsafe {
                    let xu = x.add(u * xlen + 128 * (q0 + q));
                    let m01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c[0], load_x(xu)),
                        _mm256_maddubs_epi16(c[1], load_x(xu.add(32))),
                    );
                    let m23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(c[2], load_x(xu.add(64))),
                        _mm256_maddubs_epi16(c[3], load_x(xu.add(96))),
                    );
                    acc[u] =
                        _mm256_add_epi32(acc[u], _mm256_madd_epi16(_mm256_add_epi16(m01, m23), gv));
                }
            }
        }
        for t in 0..nt {
            let (c, gv) = p.tail[t];
            for u in 0..T {
                // SAFETY: tail chunk t of token u (caller).
                let xv = unsafe { load_x(x.add(u * xlen + 128 * quads_all + 32 * t)) };
                acc[u] = _mm256_add_epi32(acc[u], fold_dot_pre(c, xv, gv));
            }
        }
        let z0 = _mm256_setzero_si256();
        let n = p_hi - p_lo;
        // SAFETY: eight elements at sp + pr * stride for the block's pairs (caller).
        let (zl64, zh64) =
            unsafe { zero_term_tile(sp.add(p_lo * stride), stride, &p.gz_lo[..n], &p.gz_hi[..n]) };
        let lsv = _mm_cvtsi32_si128(ls);
        for v in 0..T.div_ceil(4) {
            let zt = _mm256_add_epi64(zl64[v], _mm256_slli_epi64(zh64[v], 15));
            let mut wv = [z0; 4];
            for i in 0..4 {
                if 4 * v + i < T {
                    wv[i] = widen_add(z0, acc[4 * v + i]);
                }
            }
            let r = _mm256_sub_epi64(_mm256_sll_epi64(hsum64x4(wv), lsv), zt);
            // SAFETY: out[4v..min(T, 4v + 4)] are writable (caller).
            unsafe {
                if 4 * v + 4 <= T {
                    let o = out.add(4 * v).cast::<__m256i>();
                    _mm256_storeu_si256(o, _mm256_add_epi64(_mm256_loadu_si256(o), r));
                } else {
                    let mut lanes = [0i64; 4];
                    _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), r);
                    for i in 0..T - 4 * v {
                        *out.add(4 * v + i) += lanes[i];
                    }
                }
            }
        }
    }

    /// The GEMM of W2 / ternary rows on AVX-512 VNNI ([`crate::Isa::Avx512Vnni`]): token-major
    /// ([`vnni::tok_rows`]) for rows up to `TOK_MAX_K` codes (longer rows take the AVX2
    /// [`quad_rows`]).
    mod vnni {
        use std::arch::x86_64::*;

        use super::decode_at;
        use crate::weights::{QuadM, RowCtx};

        /// Rows a call of [`tok_rows`] takes (their panels stay in L1 while every block of
        /// token tiles passes them).
        pub(super) const TOK_ROWS: usize = 16;

        /// The token-major VNNI GEMM of rows `row0 + i` for `i` in `fold` (each row's bound
        /// proves no saturation), `m` tokens in the layout of `crate::weights::tok_permute`
        /// (`xq.x`) with paired group sums (`xq.s_pair`, token stride a multiple of 16):
        /// lanes are tokens, so no horizontal sums. Each row's codes are decoded once into a
        /// panel (`u8`, natural order); then by blocks of one or two tiles of 16 tokens (two
        /// while they fit `TOK_L1` bytes of codes), every four rows run [`tok_block`] on the
        /// block, so a block's token codes are read from cache by all rows and each load
        /// serves four rows.
        ///
        /// # Safety
        /// AVX2 and AVX-512 F/BW/VL/VNNI present; the rows are checked rows of both layouts;
        /// `32 * groups <= TOK_MAX_K`; `xq.x` holds `m.next_multiple_of(16) * 32 * groups`
        /// codes, `xq.s_pair` `ceil(groups / 2) * s_pair_stride(m)` sums; `o` has `m`
        /// writable elements for each row `i` of `fold` at `i * m`, not aliased.
        #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(super) unsafe fn tok_rows(
            ctx: &RowCtx<'_>,
            row0: usize,
            fold: &[usize],
            m: usize,
            xq: QuadM<'_>,
            o: *mut i64,
        ) {
            use crate::weights::{TOK_MAX_K, TOK_TILE};
            // Two tiles a block while they take at most 48 KiB (k <= 1536): at k = 1536 this
            // measured 4-6% faster than one tile a block, though the panels then leave L1.
            const TOK_L1: usize = 48 << 10;
            let groups = ctx.groups;
            let plen = 32 * groups;
            assert!(plen <= TOK_MAX_K && ctx.chunks_per_group == 1 && ctx.bits == 2);
            assert!(fold.len() <= TOK_ROWS);
            let m16 = m.next_multiple_of(TOK_TILE);
            let tiles = m16 / TOK_TILE;
            let stride = crate::weights::s_pair_stride(m);
            assert_eq!(stride % TOK_TILE, 0);
            let xt = xq.x[..m16 * plen].as_ptr();
            let sp = xq.s_pair[..groups.div_ceil(2) * stride].as_ptr();
            let blocked = crate::weights::block_chunks(groups);
            // Not zeroed (48 KiB a call): only each row's first `plen` codes, `groups` scales
            // and `ceil(groups / 2)` zero-term pairs are written, then read.
            let mut codes = [[std::mem::MaybeUninit::<u8>::uninit(); TOK_MAX_K]; TOK_ROWS];
            let mut gs = [[std::mem::MaybeUninit::<i32>::uninit(); TOK_MAX_K / 32]; TOK_ROWS];
            let mut gzl = [[std::mem::MaybeUninit::<i32>::uninit(); TOK_MAX_K / 64]; TOK_ROWS];
            let mut gzh = [[std::mem::MaybeUninit::<i32>::uninit(); TOK_MAX_K / 64]; TOK_ROWS];
            for (r, &i) in fold.iter().enumerate() {
                let row = row0 + i;
                let w = ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr();
                for g in 0..groups {
                    // SAFETY: chunk g of the row (one chunk a group); 32 bytes of the panel.
                    unsafe {
                        let c = decode_at::<2>(w, g, blocked).0;
                        _mm256_storeu_si256(codes[r].as_mut_ptr().add(32 * g).cast(), c);
                    }
                }
                let gscale = &ctx.gscale_q[row * groups..(row + 1) * groups];
                let zero = &ctx.zero_u8[row * groups..(row + 1) * groups];
                // Sixteen groups a step: the scales as `i32`, and `gscale * zero` (`< 2^23`)
                // split as `hi * 2^15 + lo`, each half narrowed to `i16` so that consecutive
                // groups pair up in one `i32` (`lo_0 | lo_1 << 16`, as `super::gz_pair`);
                // lanes past `groups` are loaded as 0, so an odd last pair's upper half is 0.
                for g0 in (0..groups).step_by(16) {
                    let k: __mmask16 = if groups - g0 >= 16 {
                        0xFFFF
                    } else {
                        (1u16 << (groups - g0)) - 1
                    };
                    // SAFETY: the masked lanes g0..min(g0 + 16, groups) of both slices are in
                    // range; the stores write 16 `i32` at g0 and 8 at g0 / 2, inside the panels
                    // (`TOK_MAX_K / 32` and `TOK_MAX_K / 64` long: multiples of 16 and 8, and
                    // `groups <= TOK_MAX_K / 32`).
                    unsafe {
                        let gsv = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                            k,
                            gscale.as_ptr().add(g0).cast(),
                        ));
                        let zv = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                            k,
                            zero.as_ptr().add(g0).cast(),
                        ));
                        let gz = _mm512_mullo_epi32(gsv, zv);
                        let lo = _mm512_and_si512(gz, _mm512_set1_epi32(0x7FFF));
                        let hi = _mm512_srli_epi32(gz, 15);
                        _mm512_storeu_si512(gs[r].as_mut_ptr().add(g0).cast(), gsv);
                        _mm256_storeu_si256(
                            gzl[r].as_mut_ptr().add(g0 / 2).cast(),
                            _mm512_cvtepi32_epi16(lo),
                        );
                        _mm256_storeu_si256(
                            gzh[r].as_mut_ptr().add(g0 / 2).cast(),
                            _mm512_cvtepi32_epi16(hi),
                        );
                    }
                }
                debug_assert!((0..groups.div_ceil(2)).all(|pr| {
                    // SAFETY: pairs 0..ceil(groups / 2) were written above.
                    let (lo, hi) = unsafe { (gzl[r][pr].assume_init(), gzh[r][pr].assume_init()) };
                    (lo, hi) == super::gz_pair(gscale, zero, pr, groups)
                }));
            }
            // The next call's rows (the following sub-block): prefetched now, so that their
            // panels are not built from memory stalls (1 thread, weights cycling through L3:
            // ~5% of the call).
            let next = row0 + TOK_ROWS..(row0 + 2 * TOK_ROWS).min(ctx.row_bound.len());
            if !next.is_empty() {
                let spans = [
                    (
                        ctx.data,
                        next.start * ctx.row_bytes,
                        next.end * ctx.row_bytes,
                    ),
                    (ctx.zero_u8, next.start * groups, next.end * groups),
                ];
                for (bytes, a, b) in spans {
                    for off in (a..b.min(bytes.len())).step_by(64) {
                        // SAFETY: `off` is inside `bytes` (a prefetch reads nothing anyway).
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(off).cast()) };
                    }
                }
                let (a, b) = (
                    next.start * groups,
                    (next.end * groups).min(ctx.gscale_q.len()),
                );
                for off in (a..b).step_by(32) {
                    // SAFETY: `off` is inside `gscale_q`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(ctx.gscale_q.as_ptr().add(off).cast()) };
                }
            }
            let pairs = groups.div_ceil(2);
            let panel = |r: usize| RowPanel {
                // SAFETY: row r of `fold` (r < fold.len()) had its codes 0..plen written above.
                codes: unsafe { std::slice::from_raw_parts(codes[r].as_ptr().cast::<u8>(), plen) },
                // SAFETY (all three): row r's first `groups` scales and `ceil(groups / 2)`
                // pairs were written above.
                gs: unsafe { std::slice::from_raw_parts(gs[r].as_ptr().cast::<i32>(), groups) },
                gz_lo: unsafe { std::slice::from_raw_parts(gzl[r].as_ptr().cast::<i32>(), pairs) },
                gz_hi: unsafe { std::slice::from_raw_parts(gzh[r].as_ptr().cast::<i32>(), pairs) },
                ls: ctx.lattice_shift,
            };
            let nt = if 2 * TOK_TILE * plen <= TOK_L1 { 2 } else { 1 };
            let nr = fold.len();
            let mut j = 0;
            while j < tiles {
                let n = nt.min(tiles - j);
                let mut r = 0;
                while r < nr {
                    let rr = (nr - r).min(4);
                    let at = |i: usize| r + i.min(rr - 1);
                    let ps = [panel(at(0)), panel(at(1)), panel(at(2)), panel(at(3))];
                    // SAFETY: tiles j..j + n of xt, their s_pair columns, and the rows'
                    // outputs (caller's contract).
                    unsafe {
                        let outs = [0, 1, 2, 3].map(|i| o.add(fold[at(i)] * m));
                        let a = (&ps, xt, plen, sp, stride, j, m, outs);
                        match (rr, n) {
                            (4, 2) => tok_block::<4, 2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (4, _) => tok_block::<4, 1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (3, 2) => tok_block::<3, 2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (3, _) => tok_block::<3, 1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (2, 2) => tok_block::<2, 2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (2, _) => tok_block::<2, 1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (_, 2) => tok_block::<1, 2>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                            (_, _) => tok_block::<1, 1>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7),
                        }
                    }
                    r += rr;
                }
                j += n;
            }
        }

        /// One row's decoded codes, group scales, paired `gscale * zero` halves and lattice
        /// shift, for [`tok_block`].
        struct RowPanel<'a> {
            codes: &'a [u8],
            gs: &'a [i32],
            gz_lo: &'a [i32],
            gz_hi: &'a [i32],
            ls: u32,
        }

        /// `R <= 4` rows (`p[..R]`, results to `outs[..R]`) times `N` tiles of 16 tokens from
        /// tile `j0`. Per group, row and tile: eight `vpdpbusd` of the row's four-code steps
        /// (broadcast) by the tokens' codes give the group's
        /// exact sums `P` (`|P| <= 32 * 3 * 128 = 12288`); one `vpmulld` by `gscale` (`<=
        /// 2^15`: `< 2^28.6`) and one `vpaddd` add them to an `i32` accumulator that is widened
        /// to `i64` every four groups (`< 2^30.6`). Each token-code load serves the `R` rows.
        /// The zero term `sum_g gscale * zero * S` by pairs of groups as in
        /// [`super::zero_term_tile`], sixteen tokens at once (`lo` pairs below `2^28` summed
        /// four at a time in `i32`, `hi` pairs below `2^21`, fewer than `2^10` pairs), per tile
        /// for the `R` rows together (one row's two chains alone are latency-bound: that took
        /// ~17% of the kernel); then the lattice shift, and the results are stored (tokens past
        /// `m` masked).
        ///
        /// # Safety
        /// As [`tok_rows`]: tiles `j0..j0 + N` exist in `xt`, `sp + pr * stride + 16 (j0 + N)`
        /// is in range for every pair `pr`, and `outs[r][0..m]` are writable.
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tok_block<const R: usize, const N: usize>(
            p: &[RowPanel<'_>; 4],
            xt: *const i8,
            plen: usize,
            sp: *const i32,
            stride: usize,
            j0: usize,
            m: usize,
            outs: [*mut i64; 4],
        ) {
            let z = _mm512_setzero_si512();
            let groups = p[0].gs.len();
            let tile_bytes = 16 * plen;
            let mut acc32 = [[z; N]; R];
            let mut acc64 = [[[z; 2]; N]; R];
            let widen = |acc64: &mut [__m512i; 2], v: __m512i| {
                acc64[0] =
                    _mm512_add_epi64(acc64[0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)));
                acc64[1] = _mm512_add_epi64(
                    acc64[1],
                    _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)),
                );
            };
            for g in 0..groups {
                // R * N independent chains of eight steps (enough to cover the products'
                // latency); each broadcast serves N tiles, each token load R rows. With one
                // tile, odd steps go to a second set of chains (`part2`), else R chains of
                // eight dependent steps would leave half the multipliers idle.
                let mut part = [[z; N]; R];
                let mut part2 = [[z; N]; R];
                for c in 0..8 {
                    let step = 8 * g + c;
                    // SAFETY: code step `step` of each panel (32 * groups codes); tile j0 + j's
                    // step `step` (caller).
                    unsafe {
                        let mut wb = [z; R];
                        for r in 0..R {
                            wb[r] = _mm512_set1_epi32(std::ptr::read_unaligned(
                                p[r].codes.as_ptr().add(4 * step).cast::<i32>(),
                            ));
                        }
                        for j in 0..N {
                            let xv = _mm512_loadu_si512(
                                xt.add((j0 + j) * tile_bytes + 64 * step).cast(),
                            );
                            for r in 0..R {
                                if N == 1 && c % 2 == 1 {
                                    part2[r][j] = _mm512_dpbusd_epi32(part2[r][j], wb[r], xv);
                                } else {
                                    part[r][j] = _mm512_dpbusd_epi32(part[r][j], wb[r], xv);
                                }
                            }
                        }
                    }
                }
                for r in 0..R {
                    let gsv = _mm512_set1_epi32(p[r].gs[g]);
                    for j in 0..N {
                        let pj = if N == 1 {
                            _mm512_add_epi32(part[r][j], part2[r][j])
                        } else {
                            part[r][j]
                        };
                        acc32[r][j] = _mm512_add_epi32(acc32[r][j], _mm512_mullo_epi32(pj, gsv));
                    }
                }
                if g % 4 == 3 {
                    for r in 0..R {
                        for j in 0..N {
                            widen(&mut acc64[r][j], acc32[r][j]);
                            acc32[r][j] = z;
                        }
                    }
                }
            }
            // The zero terms, per tile all R rows together (R independent chains of
            // `vpdpwssd` each for `lo` and `hi`, so the products' latency is covered).
            let pairs = p[0].gz_lo.len();
            for j in 0..N {
                let (mut zl, mut zh, mut zl64) = ([z; R], [z; R], [[z; 2]; R]);
                let mut pr = 0;
                while pr < pairs {
                    let end = (pr + 4).min(pairs);
                    for q in pr..end {
                        // SAFETY: sixteen sums of pair q for tile j0 + j (caller).
                        let sv = unsafe {
                            _mm512_loadu_si512(sp.add(q * stride + 16 * (j0 + j)).cast())
                        };
                        for r in 0..R {
                            let (lo, hi) = (p[r].gz_lo[q], p[r].gz_hi[q]);
                            zl[r] = _mm512_dpwssd_epi32(zl[r], sv, _mm512_set1_epi32(lo));
                            zh[r] = _mm512_dpwssd_epi32(zh[r], sv, _mm512_set1_epi32(hi));
                        }
                    }
                    for r in 0..R {
                        widen(&mut zl64[r], zl[r]);
                        zl[r] = z;
                    }
                    pr = end;
                }
                for r in 0..R {
                    let lsv = _mm_cvtsi32_si128(p[r].ls as i32);
                    widen(&mut acc64[r][j], acc32[r][j]);
                    let mut zh64 = [z; 2];
                    widen(&mut zh64, zh[r]);
                    for h in 0..2 {
                        let zt = _mm512_add_epi64(zl64[r][h], _mm512_slli_epi64(zh64[h], 15));
                        let v = _mm512_sub_epi64(_mm512_sll_epi64(acc64[r][j][h], lsv), zt);
                        let t0 = 16 * (j0 + j) + 8 * h;
                        if t0 < m {
                            let n = (m - t0).min(8);
                            let k: __mmask8 = if n == 8 { 0xFF } else { (1u8 << n) - 1 };
                            // SAFETY: outs[r][t0..t0 + n] are writable (t0 + n <= m).
                            unsafe { _mm512_mask_storeu_epi64(outs[r].add(t0).cast(), k, v) };
                        }
                    }
                }
            }
        }
    }

    /// Groups `2 pr` and `2 pr + 1` (those below `g_end`; others 0) of a row's `gscale * zero`
    /// (`< 2^23`) split as `gz = hi * 2^15 + lo` and paired as `i16` halves of two `i32`: `(lo_0
    /// | lo_1 << 16, hi_0 | hi_1 << 16)`, the multipliers of the zero term's `vpmaddwd` by the
    /// tokens' paired group sums.
    #[inline]
    fn gz_pair(gscale: &[u16], zero: &[u8], pr: usize, g_end: usize) -> (i32, i32) {
        let (mut lo, mut hi) = (0u32, 0u32);
        for h in 0..2 {
            let g = 2 * pr + h;
            if g < g_end {
                let gz = u32::from(gscale[g]) * u32::from(zero[g]);
                debug_assert!(gz < 1 << 23);
                lo |= (gz & 0x7FFF) << (16 * h);
                hi |= (gz >> 15) << (16 * h);
            }
        }
        (lo as i32, hi as i32)
    }

    /// The zero term `sum_g gscale * zero * S` of one k-block for eight tokens, as `(Z_lo,
    /// Z_hi)` in two `i64x4` each (tokens `0..4`, `4..8`; the term is `Z_lo + Z_hi * 2^15`):
    /// per pair of groups one `vpmaddwd` of the tokens' paired sums (`sp + i * stride`) by the
    /// pair's `lo` halves and one by its `hi` halves, in four independent chains (a single
    /// chain is a latency-bound series of dependent multiply-adds). A `lo` product pair is
    /// below `2 * 2^15 * 2^12 = 2^28` (`|S| <= 2^12`), a chain holds at most 5 of the at most
    /// 20 pairs: below `2^31`; a `hi` pair is below `2^21`.
    ///
    /// # Safety
    /// `sp + i * stride` has eight readable `i32` for `i < lo.len()`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero_term_tile(
        sp: *const i32,
        stride: usize,
        lo: &[i32],
        hi: &[i32],
    ) -> ([__m256i; 2], [__m256i; 2]) {
        let n = lo.len();
        assert!(hi.len() == n && n <= 20, "zero_term_tile: at most 20 pairs");
        let z0 = _mm256_setzero_si256();
        let (mut zl, mut zh) = ([z0; 4], [z0; 4]);
        let mut i = 0;
        while i < n {
            for j in 0..4.min(n - i) {
                // SAFETY: pair i + j < n (caller).
                let sv = unsafe { _mm256_loadu_si256(sp.add((i + j) * stride).cast::<__m256i>()) };
                zl[j] =
                    _mm256_add_epi32(zl[j], _mm256_madd_epi16(sv, _mm256_set1_epi32(lo[i + j])));
                zh[j] =
                    _mm256_add_epi32(zh[j], _mm256_madd_epi16(sv, _mm256_set1_epi32(hi[i + j])));
            }
            i += 4;
        }
        let zl64 = widen2(widen2(widen2(widen2([z0; 2], zl[0]), zl[1]), zl[2]), zl[3]);
        let zh = _mm256_add_epi32(
            _mm256_add_epi32(zh[0], zh[1]),
            _mm256_add_epi32(zh[2], zh[3]),
        );
        (zl64, widen2([z0; 2], zh))
    }

    /// Eight `i32` lanes (tokens `0..8`) added into two `i64x4` (tokens `0..4`, `4..8`).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn widen2(acc: [__m256i; 2], v: __m256i) -> [__m256i; 2] {
        [
            _mm256_add_epi64(acc[0], _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v))),
            _mm256_add_epi64(
                acc[1],
                _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)),
            ),
        ]
    }

    /// `[sum(v[0]), sum(v[1]), sum(v[2]), sum(v[3])]` of four `i64x4`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum64x4(v: [__m256i; 4]) -> __m256i {
        let a = _mm256_add_epi64(
            _mm256_unpacklo_epi64(v[0], v[1]),
            _mm256_unpackhi_epi64(v[0], v[1]),
        );
        let b = _mm256_add_epi64(
            _mm256_unpacklo_epi64(v[2], v[3]),
            _mm256_unpackhi_epi64(v[2], v[3]),
        );
        _mm256_add_epi64(
            _mm256_permute2x128_si256(a, b, 0x20),
            _mm256_permute2x128_si256(a, b, 0x31),
        )
    }

    /// The micro-kernel: `R` rows times `T <= 4` tokens over the k-block `blk = (c0, kb, g_lo,
    /// g_hi)` of `panel`, `R * T` `i32x8` accumulators in registers (each activation load
    /// serves `R` rows, each panel chunk `T` tokens: `vpmaddubsw`, `vpmaddwd`, `vpaddd` per row,
    /// token and chunk). `kb <= fold_span` chunks keep the lanes exact; they are then widened
    /// and reduced to `i64` per (row, token), shifted by the lattice and the block's zero term
    /// `sum_g gscale * zero * S` (`vpmuldq` of the `gz` broadcasts by four tokens' `S` from
    /// `s_tr`, exact in `i64`) subtracted, and added into `outs[r][0..T]`.
    ///
    /// # Safety
    /// AVX2 present; `x` is token 0's padded row (tokens `0..T` at stride `plen`, each with
    /// chunks `c0..c0 + kb`); `st + g * stride` has four readable elements for the block's
    /// groups; `outs[r]` has `T` writable elements.
    // (row, token) index the accumulators, the panel and the activations alike.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn fold_tile<const CG: usize, const R: usize, const T: usize>(
        panel: &Panel,
        blk: (usize, usize, usize, usize),
        x: *const i8,
        plen: usize,
        st: *const i64,
        stride: usize,
        ls: i32,
        outs: [*mut i64; R],
    ) {
        let (c0, kb, g_lo, g_hi) = blk;
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        // SAFETY: chunks c0..c0 + kb of tokens 0..T are readable at x (caller).
        let x = unsafe { x.add(c0 * 32) };
        if CG == 2 || CG == 4 {
            // The group's CG chunks share gsv: their vpmaddubsw pairs are summed in i16
            // first (exact: at most 4 * 2 * 30 * 128 = 30720 < 2^15 with doubled codes), so one
            // vpmaddwd serves CG chunks. kb is a multiple of CG (blocks start on group starts).
            let mut c = 0;
            while c < kb {
                for u in 0..T {
                    // SAFETY: as above (c + CG <= kb).
                    let xu = unsafe { x.add(u * plen + c * 32) };
                    for r in 0..R {
                        // SAFETY: as above.
                        let mut p = _mm256_maddubs_epi16(panel.codes[c][r], unsafe { load_x(xu) });
                        for j in 1..CG {
                            // SAFETY: as above.
                            let xv = unsafe { load_x(xu.add(j * 32)) };
                            p = _mm256_add_epi16(
                                p,
                                _mm256_maddubs_epi16(panel.codes[c + j][r], xv),
                            );
                        }
                        acc[r][u] =
                            _mm256_add_epi32(acc[r][u], _mm256_madd_epi16(p, panel.gsv[c][r]));
                    }
                }
                c += CG;
            }
        } else {
            for c in 0..kb {
                let (cv, gv) = (panel.codes[c], panel.gsv[c]);
                for u in 0..T {
                    // SAFETY: as above.
                    let xv = unsafe { load_x(x.add(u * plen + c * 32)) };
                    for r in 0..R {
                        acc[r][u] = _mm256_add_epi32(acc[r][u], fold_dot_pre(cv[r], xv, gv[r]));
                    }
                }
            }
        }
        let mut zt = [_mm256_setzero_si256(); R];
        for g in g_lo..g_hi {
            // SAFETY: four elements at st + g * stride (caller).
            let sv = unsafe { _mm256_loadu_si256(st.add(g * stride).cast::<__m256i>()) };
            for r in 0..R {
                zt[r] = _mm256_add_epi64(zt[r], _mm256_mul_epi32(sv, panel.gz[g - g_lo][r]));
            }
        }
        let lsv = _mm_cvtsi32_si128(ls);
        for r in 0..R {
            let mut wv = [_mm256_setzero_si256(); 4];
            for u in 0..T {
                wv[u] = widen_add(_mm256_setzero_si256(), acc[r][u]);
            }
            let v = _mm256_sub_epi64(_mm256_sll_epi64(hsum64x4(wv), lsv), zt[r]);
            // SAFETY: T writable elements at outs[r] (caller).
            unsafe {
                if T == 4 {
                    let o = outs[r].cast::<__m256i>();
                    _mm256_storeu_si256(o, _mm256_add_epi64(_mm256_loadu_si256(o), v));
                } else {
                    let mut lanes = [0i64; 4];
                    _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), v);
                    for (u, l) in lanes.iter().enumerate().take(T) {
                        *outs[r].add(u) += l;
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX2 present; bounds as asserted by `super::dot4_rows`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot4_rows(
        x_pad: &[i8],
        rows: &[u8],
        stride: usize,
        n_rows: usize,
        chunks: usize,
        p: &mut [i32],
    ) {
        let x = x_pad.as_ptr();
        let mut r = 0;
        while r + 4 <= n_rows {
            let mut a = [_mm256_setzero_si256(); 4];
            for c in 0..chunks {
                // SAFETY: chunk c of rows r..r+4 and of x are in bounds (caller's contract).
                unsafe {
                    let xv = load_x(x.add(c * 32));
                    for (q, aq) in a.iter_mut().enumerate() {
                        let codes = decode::<4>(rows.as_ptr().add((r + q) * stride + c * 16));
                        *aq = _mm256_add_epi32(*aq, dot::<4>(codes, xv));
                    }
                }
            }
            p[r..r + 4].copy_from_slice(&hsum4(a[0], a[1], a[2], a[3]));
            r += 4;
        }
        while r < n_rows {
            // SAFETY: row r's chunks and x are in bounds (caller's contract).
            p[r] = hsum1(unsafe { group_dot::<4>(rows.as_ptr().add(r * stride), 0, 0, x, chunks) });
            r += 1;
        }
    }

    /// Tokens per block of [`rows_m_one`] (its per-token vector accumulators live on the stack).
    const TOKEN_BLOCK: usize = 16;

    /// GEMM rows for one chunk per group (L <= 32): each block of eight groups is decoded once
    /// and reused by every token of a block of [`TOKEN_BLOCK`] tokens; per token the groups are
    /// reduced and scaled in vectors as in `row1` (plain `i64` sum only when the row bound
    /// proves no saturation, else per-group saturation in ascending order).
    #[target_feature(enable = "avx2")]
    unsafe fn rows_m_one<const B: u32>(
        ctx: &RowCtx<'_>,
        row0: usize,
        m: usize,
        xp: &[i8],
        s: &[i32],
        out: &mut [i64],
    ) {
        let (cb, groups) = (ctx.chunk_bytes, ctx.groups);
        let plen = groups * 32;
        let ls = ctx.lattice_shift as i32;
        let g8 = groups / 8 * 8;
        let blocked = crate::weights::block_chunks(groups);
        for (i, o_row) in out.chunks_exact_mut(m).enumerate() {
            let row = row0 + i;
            let w = ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr();
            let meta = row * groups;
            let zero = ctx.zero_u8[meta..meta + groups].as_ptr();
            let gscale = ctx.gscale_q[meta..meta + groups].as_ptr();
            let fast = ctx.no_saturation(row);
            let mut t0 = 0;
            while t0 < m {
                let tb = TOKEN_BLOCK.min(m - t0);
                let mut acc_v = [_mm256_setzero_si256(); TOKEN_BLOCK];
                let mut acc = [0i64; TOKEN_BLOCK];
                let mut g = 0;
                while g < g8 {
                    let mut codes = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 8];
                    if B == 2 {
                        // Chunks g..g + 8: two whole blocks (g + 8 <= g8 <= blocked).
                        for h in 0..2 {
                            // SAFETY: block (g + 4h) / 4 lies inside the row (check_bounds).
                            let c4 = unsafe { decode_block2(w.add((g + 4 * h) * cb)) };
                            for (j, cj) in c4.into_iter().enumerate() {
                                codes[4 * h + j].0 = cj;
                            }
                        }
                    } else {
                        for (q, c) in codes.iter_mut().enumerate() {
                            // SAFETY: chunk g + q < groups lies inside the row (check_bounds).
                            *c = unsafe { decode::<B>(w.add((g + q) * cb)) };
                        }
                    }
                    for u in 0..tb {
                        let t = t0 + u;
                        let mut v = [_mm256_setzero_si256(); 8];
                        for (q, vq) in v.iter_mut().enumerate() {
                            // SAFETY: token t < m and chunk g + q < groups lie inside xp
                            // (m * plen bytes, check_bounds).
                            *vq = dot::<B>(codes[q], unsafe {
                                load_x(xp.as_ptr().add(t * plen + (g + q) * 32))
                            });
                        }
                        // SAFETY: groups g..g+8 of the metadata and of token t's sums exist.
                        let (even, odd) = unsafe {
                            scale8(
                                hsum8(&v),
                                ls,
                                zero.add(g),
                                gscale.add(g),
                                s.as_ptr().add(t * groups + g),
                            )
                        };
                        if fast {
                            acc_v[u] = _mm256_add_epi64(acc_v[u], _mm256_add_epi64(even, odd));
                        } else {
                            let (mut e, mut o) = ([0i64; 4], [0i64; 4]);
                            // SAFETY: e and o are 32 writable bytes each.
                            unsafe {
                                _mm256_storeu_si256(e.as_mut_ptr().cast::<__m256i>(), even);
                                _mm256_storeu_si256(o.as_mut_ptr().cast::<__m256i>(), odd);
                            }
                            for q in 0..4 {
                                acc[u] = (acc[u] + e[q]).clamp(ctx.acc_lo, ctx.acc_hi);
                                acc[u] = (acc[u] + o[q]).clamp(ctx.acc_lo, ctx.acc_hi);
                            }
                        }
                    }
                    g += 8;
                }
                for u in 0..tb {
                    let t = t0 + u;
                    let mut a = acc[u];
                    if fast {
                        let mut lanes = [0i64; 4];
                        // SAFETY: lanes is 32 writable bytes.
                        unsafe {
                            _mm256_storeu_si256(lanes.as_mut_ptr().cast::<__m256i>(), acc_v[u]);
                        }
                        a = lanes.iter().sum();
                    }
                    for gr in g8..groups {
                        // SAFETY: chunk gr of the row and of token t are in range.
                        let p = unsafe {
                            hsum1(dot::<B>(
                                decode_at::<B>(w, gr, blocked),
                                load_x(xp.as_ptr().add(t * plen + gr * 32)),
                            ))
                        };
                        a = ctx.accumulate(row, gr, i64::from(p), s[t * groups + gr], a);
                    }
                    o_row[t] = a;
                }
                t0 += tb;
            }
        }
    }

    /// Four tokens at a time share each decoded chunk; the remaining tokens go one by one.
    #[target_feature(enable = "avx2")]
    unsafe fn rows_m<const B: u32>(
        ctx: &RowCtx<'_>,
        row0: usize,
        m: usize,
        xp: &[i8],
        s: &[i32],
        out: &mut [i64],
    ) {
        let (cg, groups) = (ctx.chunks_per_group, ctx.groups);
        let plen = groups * cg * 32;
        let blocked = crate::weights::block_chunks(groups * cg);
        for (i, o_row) in out.chunks_exact_mut(m).enumerate() {
            let row = row0 + i;
            let w = ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes].as_ptr();
            let mut t = 0;
            while t + 4 <= m {
                let x = xp[t * plen..(t + 4) * plen].as_ptr();
                let mut acc = [0i64; 4];
                for g in 0..groups {
                    let mut a = [_mm256_setzero_si256(); 4];
                    for c in 0..cg {
                        let ci = g * cg + c;
                        // SAFETY: chunk ci < groups * cg lies inside the row; the four tokens'
                        // chunk ci lie inside xp[t * plen..(t + 4) * plen] (check_bounds).
                        unsafe {
                            let codes = decode_at::<B>(w, ci, blocked);
                            for (q, aq) in a.iter_mut().enumerate() {
                                let xv = load_x(x.add(q * plen + ci * 32));
                                *aq = _mm256_add_epi32(*aq, dot::<B>(codes, xv));
                            }
                        }
                    }
                    let p = hsum4(a[0], a[1], a[2], a[3]);
                    for q in 0..4 {
                        acc[q] = ctx.accumulate(
                            row,
                            g,
                            i64::from(p[q]),
                            s[(t + q) * groups + g],
                            acc[q],
                        );
                    }
                }
                o_row[t..t + 4].copy_from_slice(&acc);
                t += 4;
            }
            while t < m {
                // SAFETY: token t's padded row and sums are in range (check_bounds).
                unsafe {
                    rows1::<B>(
                        ctx,
                        row,
                        &xp[t * plen..(t + 1) * plen],
                        &s[t * groups..(t + 1) * groups],
                        std::slice::from_mut(&mut o_row[t]),
                    );
                }
                t += 1;
            }
        }
    }
}

/// `p[r] = sum_e x[e] * code[r][e]` over W4-chunk rows (KV products; codes <= 15).
pub(crate) fn dot4_rows(
    x_pad: &[i8],
    rows: &[u8],
    stride: usize,
    n_rows: usize,
    chunks: usize,
    p: &mut [i32],
) {
    assert!(x_pad.len() >= chunks * 32 && p.len() >= n_rows);
    assert!(n_rows == 0 || rows.len() >= (n_rows - 1) * stride + chunks * 16);
    assert!(
        chunks * 32 <= 1 << 20,
        "i32 lanes exact for up to 2^20 elements"
    );
    on_avx2!({
        // SAFETY: AVX2 present; every row r < n_rows has chunks * 16 readable bytes at
        // r * stride and x_pad has chunks * 32 (asserted above).
        unsafe { imp::dot4_rows(x_pad, rows, stride, n_rows, chunks, p) }
    })
}

/// The 8-bit window products (N18) on plain `i8` rows, compiled for AVX2 (the loops are the
/// portable ones; enabling the feature lets the compiler vectorize them): `qk[t] = sum_c q[c] *
/// keys[t][c]` and `pv[c] += sum_t x[t] * values[t][c]`, exact in `i32` for `hd < 2^17` and
/// windows under `2^17` tokens (asserted by the callers).
pub(crate) fn window_qk(q: &[i8], keys: &[i8], out: &mut [i64], lo: i64, hi: i64) {
    on_avx2!({
        assert!(
            keys.len() >= out.len() * q.len(),
            "window_qk: keys of every token"
        );
        // SAFETY: AVX2 is present (checked above); every token t < out.len() has q.len() keys
        // (asserted above).
        unsafe { win_imp::qk(q, keys, out, lo, hi) }
    })
}

/// [`window_qk`] for head dimension 64 on AVX-512 VNNI: one 512-bit `vpdpbusd` a token of the
/// keys biased to `u8` (`k + 128`) by the query (`i8`), minus `128 * sum(q)` (exact for every
/// `i8`, -128 included: a lane sums four products below `2^15`, a token below `2^21`), sixteen
/// tokens' lanes reduced together; the last `n % 16` tokens on the AVX2 path.
pub(crate) fn window_qk_vnni64(q: &[i8], keys: &[i8], out: &mut [i64], lo: i64, hi: i64) {
    assert!(
        crate::Isa::Avx512Vnni.is_available(),
        "AVX-512 VNNI path on a CPU without it"
    );
    assert!(
        q.len() == 64 && keys.len() >= out.len() * 64,
        "window_qk_vnni64: 64 channels, keys of every token"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 VNNI (and AVX2) present, asserted above; every token t < out.len() has
    // 64 keys (asserted above).
    unsafe {
        win_imp::qk64_vnni(q, keys, out, lo, hi);
    }
}

/// See [`window_qk`].
pub(crate) fn window_pv(x: &[i8], values: &[i8], pv: &mut [i32]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { window_imp::pv(x, values, pv) }
    })
}

#[cfg(target_arch = "x86_64")]
mod window_imp {
    #[target_feature(enable = "avx2")]
    pub(super) fn pv2(x_a: &[i8], x_b: &[i8], values: &[i8], pv_a: &mut [i32], pv_b: &mut [i32]) {
        let hd = pv_a.len();
        assert_eq!(pv_b.len(), hd);
        for ((&ta, &tb), v) in x_a.iter().zip(x_b).zip(values.chunks_exact(hd)) {
            let (ta, tb) = (i16::from(ta), i16::from(tb));
            for ((a, b), &c) in pv_a.iter_mut().zip(pv_b.iter_mut()).zip(v) {
                let c = i16::from(c);
                *a += i32::from(ta * c);
                *b += i32::from(tb * c);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn pv(x: &[i8], values: &[i8], pv: &mut [i32]) {
        let hd = pv.len();
        for (&xt, v) in x.iter().zip(values.chunks_exact(hd)) {
            let xt = i16::from(xt);
            for (a, &b) in pv.iter_mut().zip(v) {
                *a += i32::from(xt * i16::from(b));
            }
        }
    }
}

/// [`dot4_rows`] for two activation rows at once (the two N22 probability planes of one
/// query): each W4 chunk is loaded and expanded once for both. Same bounds as [`dot4_rows`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot4_rows2(
    x_a: &[i8],
    x_b: &[i8],
    rows: &[u8],
    stride: usize,
    n_rows: usize,
    chunks: usize,
    p_a: &mut [i32],
    p_b: &mut [i32],
) {
    assert!(x_a.len() >= chunks * 32 && x_b.len() >= chunks * 32);
    assert!(p_a.len() >= n_rows && p_b.len() >= n_rows);
    assert!(n_rows == 0 || rows.len() >= (n_rows - 1) * stride + chunks * 16);
    assert!(
        chunks * 32 <= 1 << 20,
        "i32 lanes exact for up to 2^20 elements"
    );
    on_avx2!({
        // SAFETY: AVX2 present; every row r < n_rows has chunks * 16 readable bytes at
        // r * stride and both x rows have chunks * 32 (asserted above).
        unsafe { kv_imp::dot4_rows2(x_a, x_b, rows, stride, n_rows, chunks, p_a, p_b) }
    })
}

/// [`window_pv`] for two activation rows at once (each value token read once for both).
pub(crate) fn window_pv2(
    x_a: &[i8],
    x_b: &[i8],
    values: &[i8],
    pv_a: &mut [i32],
    pv_b: &mut [i32],
) {
    on_avx2!({
        let hd = pv_a.len();
        assert!(
            pv_b.len() == hd && x_b.len() == x_a.len(),
            "window_pv2: shapes"
        );
        assert!(
            values.len() >= x_a.len() * hd,
            "window_pv2: values of every token"
        );
        // One OR over both rows (vectorizes): the sign bit is set iff some activation is < 0.
        let signs = x_a.iter().chain(x_b).fold(0u8, |m, &x| m | x as u8);
        if signs & 0x80 == 0 {
            // SAFETY: AVX2 is present (checked above); bounds asserted above, and every
            // activation is in 0..=127 (checked just above), as `win_imp::pv2` requires.
            unsafe { win_imp::pv2(x_a, x_b, values, pv_a, pv_b) }
        } else {
            // SAFETY: AVX2 is present (checked above); the body is safe code.
            unsafe { window_imp::pv2(x_a, x_b, values, pv_a, pv_b) }
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod kv_imp {
    use std::arch::x86_64::*;

    use super::imp::hsum4;

    /// The 32 codes of one W4 chunk (byte `i` holds codes `i` and `16 + i`), as `u8` lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode4(w: *const u8) -> __m256i {
        // SAFETY (caller): 16 readable bytes at w.
        let v = unsafe { _mm_loadu_si128(w.cast::<__m128i>()) };
        let m = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
    }

    /// `i32x8` partial sums of `code * x` (codes <= 15: `maddubs` cannot saturate).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot(c: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1))
    }

    /// # Safety
    /// AVX2 present; bounds as asserted by `super::dot4_rows2`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot4_rows2(
        x_a: &[i8],
        x_b: &[i8],
        rows: &[u8],
        stride: usize,
        n_rows: usize,
        chunks: usize,
        p_a: &mut [i32],
        p_b: &mut [i32],
    ) {
        let (xa, xb, w) = (x_a.as_ptr(), x_b.as_ptr(), rows.as_ptr());
        let mut r = 0;
        while r < n_rows {
            // Four rows per pass (the last pass re-reads row n_rows - 1 for missing ones).
            let rr = [
                r,
                (r + 1).min(n_rows - 1),
                (r + 2).min(n_rows - 1),
                (r + 3).min(n_rows - 1),
            ];
            let mut a = [_mm256_setzero_si256(); 4];
            let mut b = [_mm256_setzero_si256(); 4];
            for c in 0..chunks {
                // SAFETY: chunk c of rows rr and of both x rows are in bounds (caller).
                unsafe {
                    let va = _mm256_loadu_si256(xa.add(c * 32).cast::<__m256i>());
                    let vb = _mm256_loadu_si256(xb.add(c * 32).cast::<__m256i>());
                    for q in 0..4 {
                        let codes = decode4(w.add(rr[q] * stride + c * 16));
                        a[q] = _mm256_add_epi32(a[q], dot(codes, va));
                        b[q] = _mm256_add_epi32(b[q], dot(codes, vb));
                    }
                }
            }
            let (sa, sb) = (hsum4(a[0], a[1], a[2], a[3]), hsum4(b[0], b[1], b[2], b[3]));
            let k = (n_rows - r).min(4);
            p_a[r..r + k].copy_from_slice(&sa[..k]);
            p_b[r..r + k].copy_from_slice(&sb[..k]);
            r += k;
        }
    }
}

/// The elementwise loops of the KV products (`kv::quantize_probs_into`, `fold_into`) compiled for AVX2: the portable bodies, inlined into functions with the
/// feature enabled so the compiler vectorizes them 8 lanes wide (the same IEEE `f32` and
/// integer operations per element, so the same results).
pub(crate) fn quantize_probs_into(p: &[f32], hi: &mut [i8], lo: &mut [i8]) -> Option<f32> {
    on_avx2!({
        assert!(
            hi.len() == p.len() && lo.len() == p.len(),
            "quantize_probs_into: one code per probability in each plane"
        );
        // SAFETY: AVX2 is present (checked above); both planes are as long as p (asserted).
        unsafe { probs_imp::quantize_probs(p, hi, lo) }
    })
}

/// N22's probability codes (`kv::quantize_probs_portable`) with explicit AVX2, eight
/// probabilities a step: the same IEEE `f32` operations per element (`vmaxps` as the portable
/// `if v > m { v } else { m }`, `vdivps`, `vminps` as `f32::min` on non-NaN values,
/// `vcvttps2dq` as the truncating cast of a value in `[0, 16383]`), so the same codes; the
/// tail of fewer than eight is the portable body.
#[cfg(target_arch = "x86_64")]
mod probs_imp {
    use std::arch::x86_64::*;

    use tessera_golden::kv::{P_CODE_MAX, P_PLANE_BITS};

    /// # Safety
    /// AVX2 present; `hi.len() == lo.len() == p.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_probs(p: &[f32], hi: &mut [i8], lo: &mut [i8]) -> Option<f32> {
        let n = p.len();
        let n8 = n / 8 * 8;
        let pp = p.as_ptr();
        // Validity (every v in [0, f32::MAX]: ordered compares, false for NaN) and the maximum.
        let (zero, fmax) = (_mm256_setzero_ps(), _mm256_set1_ps(f32::MAX));
        let mut m = zero;
        let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n.
            let v = unsafe { _mm256_loadu_ps(pp.add(i)) };
            let good = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GE_OQ>(v, zero),
                _mm256_cmp_ps::<_CMP_LE_OQ>(v, fmax),
            );
            ok = _mm256_and_ps(ok, good);
            // max_ps(v, m) = if v > m { v } else { m }, the portable update.
            m = _mm256_max_ps(v, m);
            i += 8;
        }
        if _mm256_movemask_ps(ok) != 0xFF {
            return None;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes is 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let mut max = 0.0f32;
        for &v in lanes.iter().chain(&p[n8..]) {
            if !(0.0..=f32::MAX).contains(&v) {
                return None;
            }
            max = if v > max { v } else { max };
        }
        let Some(scale_p) = crate::kv::prob_scale(max, hi, lo) else {
            return Some(0.0);
        };
        #[allow(clippy::cast_precision_loss)] // 16383 is exact in f32
        let (sv, cm) = (_mm256_set1_ps(scale_p), _mm256_set1_ps(P_CODE_MAX as f32));
        let (half, cmi) = (_mm256_set1_ps(0.5), _mm256_set1_epi32(P_CODE_MAX as i32));
        let lo_mask = _mm256_set1_epi32((1 << P_PLANE_BITS) - 1);
        let (hp, lp) = (hi.as_mut_ptr(), lo.as_mut_ptr());
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n for p and both planes.
            unsafe {
                let v = _mm256_loadu_ps(pp.add(i));
                // min_ps(a, b) = if a < b { a } else { b }: f32::min for non-NaN a (the
                // quotient of finite v >= 0 by scale_p > 0, at most +inf).
                let x = _mm256_min_ps(_mm256_div_ps(v, sv), cm);
                let t = _mm256_cvttps_epi32(x);
                let frac = _mm256_sub_ps(x, _mm256_cvtepi32_ps(t));
                let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half));
                let code = _mm256_min_epi32(_mm256_sub_epi32(t, up), cmi);
                let h = _mm256_srli_epi32::<P_PLANE_BITS_I>(code);
                let l = _mm256_and_si256(code, lo_mask);
                // Pack 8 i32 (all in 0..=127) to 8 bytes each.
                let hl = _mm256_packs_epi32(h, l); // [h0-3 l0-3 | h4-7 l4-7] as i16
                let b = _mm256_packs_epi16(hl, hl); // bytes: [h0-3 l0-3 h0-3 l0-3 | h4-7 l4-7 ..]
                let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
                let b = _mm256_castsi256_si128(b); // [h0-3 h4-7 l0-3 l4-7]
                _mm_storel_epi64(hp.add(i).cast::<__m128i>(), b);
                _mm_storel_epi64(lp.add(i).cast::<__m128i>(), _mm_srli_si128::<8>(b));
            }
            i += 8;
        }
        for ((&v, h), l) in p[n8..].iter().zip(&mut hi[n8..]).zip(&mut lo[n8..]) {
            (*h, *l) = crate::kv::prob_code(v, scale_p);
        }
        Some(scale_p)
    }

    /// [`P_PLANE_BITS`] as a shift immediate.
    #[allow(clippy::cast_possible_wrap)]
    const P_PLANE_BITS_I: i32 = P_PLANE_BITS as i32;
}

/// See [`quantize_probs_into`].
pub(crate) fn fold_into(x_i8: &[i8], fscale_q: &[u16], sf: u32, out: &mut [i8]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::fold(x_i8, fscale_q, sf, out) }
    })
}

/// N14's weight-lattice stage loop (`weights::stage_shift_portable`) compiled for AVX2, as
/// above: the same integer operations per element.
pub(crate) fn stage_shift_into(acc: &[i64], y: &mut [i32], s: u32, lo: i64, hi: i64) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::stage_shift(acc, y, s, lo, hi) }
    })
}

/// `kv::dot_i8_u8_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn dot_i8_u8(x: &[i8], z: &[u8]) -> i64 {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::dot_i8_u8(x, z) }
    })
}

/// `kv::shift_sub_clamp_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn shift_sub_clamp(p: &[i32], shift: u32, z: i64, lo: i64, hi: i64, acc: &mut [i64]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::shift_sub_clamp(p, shift, z, lo, hi, acc) }
    })
}

/// `kv::clamp_i64_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn clamp_i64_into(acc: &[i64], y: &mut [i32], lo: i64, hi: i64) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::clamp_i64(acc, y, lo, hi) }
    })
}

/// `kv::finish_i32_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn finish_i32(p: &[i32], f: crate::kv::FinishI32, acc: &mut [i64], y: &mut [i32]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::finish_i32(p, f, acc, y) }
    })
}

/// `kv::quantize_kv4_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn quantize_kv4_into(w: &[f32], codes: &mut [u8]) -> Option<(f32, u8)> {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::quantize_kv4(w, codes) }
    })
}

/// `kv::finish_i32_y_portable` compiled for AVX2 (see [`quantize_probs_into`]).
pub(crate) fn finish_i32_y(p: &[i32], f: crate::kv::FinishI32, y: &mut [i32]) {
    on_avx2!({
        // SAFETY: AVX2 is present (checked above); the body is safe code.
        unsafe { elem_imp::finish_i32_y(p, f, y) }
    })
}

#[cfg(target_arch = "x86_64")]
mod elem_imp {
    #[target_feature(enable = "avx2")]
    pub(super) fn finish_i32_y(p: &[i32], f: crate::kv::FinishI32, y: &mut [i32]) {
        crate::kv::finish_i32_y_portable(p, f, y);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn quantize_kv4(w: &[f32], codes: &mut [u8]) -> Option<(f32, u8)> {
        crate::kv::quantize_kv4_portable(w, codes)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn finish_i32(p: &[i32], f: crate::kv::FinishI32, acc: &mut [i64], y: &mut [i32]) {
        crate::kv::finish_i32_portable(p, f, acc, y);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn dot_i8_u8(x: &[i8], z: &[u8]) -> i64 {
        crate::kv::dot_i8_u8_portable(x, z)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn shift_sub_clamp(
        p: &[i32],
        shift: u32,
        z: i64,
        lo: i64,
        hi: i64,
        acc: &mut [i64],
    ) {
        crate::kv::shift_sub_clamp_portable(p, shift, z, lo, hi, acc);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn clamp_i64(acc: &[i64], y: &mut [i32], lo: i64, hi: i64) {
        crate::kv::clamp_i64_portable(acc, y, lo, hi);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn fold(x_i8: &[i8], fscale_q: &[u16], sf: u32, out: &mut [i8]) {
        crate::kv::fold_portable(x_i8, fscale_q, sf, out);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn stage_shift(acc: &[i64], y: &mut [i32], s: u32, lo: i64, hi: i64) {
        crate::weights::stage_shift_portable(acc, y, s, lo, hi);
    }
}

/// The 8-bit window products (N18) with explicit AVX2 (see [`window_qk`], [`window_pv2`]).
///
/// `qk`: keys and the query are widened to `i16` (`vpmovsxbw`) and multiplied with `vpmaddwd`
/// (pairs `<= 2 * 128 * 128 = 2^15`, exact in `i32`), eight tokens at a time reduced with one
/// `vphaddd` tree; any `i8` codes. `pv2`: four tokens' value rows are interleaved so that each
/// `i32` lane holds one channel's four codes, and `vpmaddubsw` multiplies them by the four
/// tokens' activations taken as *unsigned* bytes, which needs activations in `0..=127` (the
/// folded probabilities of N22 are, the caller checks): a pair is then at most
/// `2 * 127 * 128 = 32512 < 2^15`, no saturation; `vpmaddwd` with 1 widens to `i32`.
#[cfg(target_arch = "x86_64")]
mod win_imp {
    use std::arch::x86_64::*;

    use super::imp::{hsum1, hsum8};

    /// 16 `i8` at `p` widened to `i16`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(p: *const i8) -> __m256i {
        // SAFETY (caller): 16 readable bytes at p.
        _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p.cast::<__m128i>()) })
    }

    /// # Safety
    /// AVX2 present; `keys.len() >= out.len() * q.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn qk(q: &[i8], keys: &[i8], out: &mut [i64], lo: i64, hi: i64) {
        let hd = q.len();
        let n = out.len();
        let v16 = hd / 16 * 16;
        let kp = keys.as_ptr();
        let tail = |t: usize| -> i32 {
            q[v16..]
                .iter()
                .zip(&keys[t * hd + v16..(t + 1) * hd])
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum()
        };
        let mut t = 0;
        while t + 8 <= n {
            let mut acc = [_mm256_setzero_si256(); 8];
            let mut c = 0;
            while c < v16 {
                // SAFETY: channels c..c + 16 <= hd of q and of tokens t..t + 8 < n are in
                // bounds (caller's contract).
                unsafe {
                    let qv = load16(q.as_ptr().add(c));
                    for (u, a) in acc.iter_mut().enumerate() {
                        let kv = load16(kp.add((t + u) * hd + c));
                        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(qv, kv));
                    }
                }
                c += 16;
            }
            let mut s = [0i32; 8];
            // SAFETY: s is 32 writable bytes.
            unsafe { _mm256_storeu_si256(s.as_mut_ptr().cast::<__m256i>(), hsum8(&acc)) };
            for (u, &su) in s.iter().enumerate() {
                let d = if v16 < hd { su + tail(t + u) } else { su };
                out[t + u] = i64::from(d).clamp(lo, hi);
            }
            t += 8;
        }
        while t < n {
            let mut a = _mm256_setzero_si256();
            let mut c = 0;
            while c < v16 {
                // SAFETY: as above for token t < n.
                unsafe {
                    let qv = load16(q.as_ptr().add(c));
                    let kv = load16(kp.add(t * hd + c));
                    a = _mm256_add_epi32(a, _mm256_madd_epi16(qv, kv));
                }
                c += 16;
            }
            let d = hsum1(a) + if v16 < hd { tail(t) } else { 0 };
            out[t] = i64::from(d).clamp(lo, hi);
            t += 1;
        }
    }

    /// See `super::window_qk_vnni64`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI and AVX2 present; `q.len() == 64`, `keys.len() >= out.len() * 64`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn qk64_vnni(q: &[i8], keys: &[i8], out: &mut [i64], lo: i64, hi: i64) {
        let z = _mm512_setzero_si512();
        // SAFETY: q has 64 bytes (caller).
        let qv = unsafe { _mm512_loadu_si512(q.as_ptr().cast()) };
        let corr = 128 * q.iter().map(|&v| i32::from(v)).sum::<i32>();
        let bias = _mm512_set1_epi8(i8::MIN);
        let kp = keys.as_ptr();
        let n16 = out.len() / 16 * 16;
        let pair = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
        };
        let quad = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
        };
        let lanes = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(
                _mm512_shuffle_i32x4(a, b, 0b10_00_10_00),
                _mm512_shuffle_i32x4(a, b, 0b11_01_11_01),
            )
        };
        for t0 in (0..n16).step_by(16) {
            let mut v = [z; 16];
            for (u, vu) in v.iter_mut().enumerate() {
                // SAFETY: token t0 + u < n16 <= out.len() has 64 keys (caller).
                let k = unsafe { _mm512_loadu_si512(kp.add((t0 + u) * 64).cast()) };
                *vu = _mm512_dpbusd_epi32(z, _mm512_xor_si512(k, bias), qv);
            }
            // Lane u of the result is token t0 + u's sum (pairs of i32 lanes, then 64-bit
            // halves, then 128-bit quarters).
            let a: [__m512i; 8] = std::array::from_fn(|i| pair(v[2 * i], v[2 * i + 1]));
            let b: [__m512i; 4] = std::array::from_fn(|i| quad(a[2 * i], a[2 * i + 1]));
            let sums = lanes(lanes(b[0], b[1]), lanes(b[2], b[3]));
            let mut s = [0i32; 16];
            // SAFETY: s is 64 writable bytes.
            unsafe { _mm512_storeu_si512(s.as_mut_ptr().cast(), sums) };
            for (o, &su) in out[t0..t0 + 16].iter_mut().zip(&s) {
                *o = i64::from(su - corr).clamp(lo, hi);
            }
        }
        if n16 < out.len() {
            // SAFETY: AVX2 present; the remaining tokens have 64 keys each (caller).
            unsafe { qk(q, &keys[n16 * 64..], &mut out[n16..], lo, hi) };
        }
    }

    /// Channels `c0..c0 + 32` of both planes over every token: `pv_x[c] += sum_t x[t] * v[t][c]`.
    ///
    /// # Safety
    /// AVX2 present; `c0 + 32 <= hd`, `values.len() >= x_a.len() * hd`, `x_b.len() ==
    /// x_a.len()`, every activation in `0..=127`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pv2_block(
        x_a: &[i8],
        x_b: &[i8],
        values: &[i8],
        hd: usize,
        c0: usize,
    ) -> ([__m256i; 4], [__m256i; 4]) {
        let nw = x_a.len();
        let vp = values.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut a = [_mm256_setzero_si256(); 4];
        let mut b = [_mm256_setzero_si256(); 4];
        // One pass: four tokens' rows at `v[0..4]` (channels c0..c0 + 32) and their activations
        // as one little-endian word per plane (byte i is token i's).
        let mut pass = |v: [__m256i; 4], xa4: i32, xb4: i32| {
            let (xa4, xb4) = (_mm256_set1_epi32(xa4), _mm256_set1_epi32(xb4));
            // Per 128-bit lane, bytes of channels interleaved: [v0 v1 v2 v3] per channel.
            let l01 = _mm256_unpacklo_epi8(v[0], v[1]);
            let h01 = _mm256_unpackhi_epi8(v[0], v[1]);
            let l23 = _mm256_unpacklo_epi8(v[2], v[3]);
            let h23 = _mm256_unpackhi_epi8(v[2], v[3]);
            let q = [
                _mm256_unpacklo_epi16(l01, l23), // channels 0-3 | 16-19
                _mm256_unpackhi_epi16(l01, l23), // 4-7 | 20-23
                _mm256_unpacklo_epi16(h01, h23), // 8-11 | 24-27
                _mm256_unpackhi_epi16(h01, h23), // 12-15 | 28-31
            ];
            for i in 0..4 {
                let pa = _mm256_maddubs_epi16(xa4, q[i]);
                let pb = _mm256_maddubs_epi16(xb4, q[i]);
                a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(pa, ones));
                b[i] = _mm256_add_epi32(b[i], _mm256_madd_epi16(pb, ones));
            }
        };
        let n4 = nw / 4 * 4;
        let mut t = 0;
        while t < n4 {
            // SAFETY: tokens t..t + 4 <= nw of both activation rows and of the values,
            // channels c0..c0 + 32 <= hd (caller's contract).
            unsafe {
                let row = vp.add(t * hd + c0);
                let v = [
                    _mm256_loadu_si256(row.cast::<__m256i>()),
                    _mm256_loadu_si256(row.add(hd).cast::<__m256i>()),
                    _mm256_loadu_si256(row.add(2 * hd).cast::<__m256i>()),
                    _mm256_loadu_si256(row.add(3 * hd).cast::<__m256i>()),
                ];
                let xa4 = std::ptr::read_unaligned(x_a.as_ptr().add(t).cast::<i32>());
                let xb4 = std::ptr::read_unaligned(x_b.as_ptr().add(t).cast::<i32>());
                pass(v, xa4, xb4);
            }
            t += 4;
        }
        if n4 < nw {
            // The last 1..=3 tokens: missing ones re-read token n4 with activations 0.
            let k = nw - n4;
            let xw = |x: &[i8]| -> i32 {
                let mut w = 0u32;
                for i in 0..k {
                    w |= u32::from(x[n4 + i] as u8) << (8 * i);
                }
                w as i32
            };
            // SAFETY: tokens n4 + min(i, k - 1) < nw, channels c0..c0 + 32 <= hd (caller).
            let v: [__m256i; 4] = std::array::from_fn(|i| unsafe {
                _mm256_loadu_si256(vp.add((n4 + i.min(k - 1)) * hd + c0).cast::<__m256i>())
            });
            pass(v, xw(x_a), xw(x_b));
        }
        (a, b)
    }

    /// Adds the channel sums of a [`pv2_block`] (lane order above) to `out[0..32]`.
    ///
    /// # Safety
    /// AVX2 present; `out.len() >= 32`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add_block(out: &mut [i32], s: [__m256i; 4]) {
        let ordered = [
            _mm256_permute2x128_si256(s[0], s[1], 0x20), // 0-7
            _mm256_permute2x128_si256(s[2], s[3], 0x20), // 8-15
            _mm256_permute2x128_si256(s[0], s[1], 0x31), // 16-23
            _mm256_permute2x128_si256(s[2], s[3], 0x31), // 24-31
        ];
        let o = out[..32].as_mut_ptr().cast::<__m256i>();
        for (i, v) in ordered.into_iter().enumerate() {
            // SAFETY: out[8i..8i + 8] is in bounds (the slice above is 32 long).
            unsafe {
                _mm256_storeu_si256(o.add(i), _mm256_add_epi32(_mm256_loadu_si256(o.add(i)), v))
            };
        }
    }

    /// # Safety
    /// AVX2 present; `values.len() >= x_a.len() * pv_a.len()`, `x_b.len() == x_a.len()`,
    /// `pv_b.len() == pv_a.len()`, every activation in `0..=127`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pv2(
        x_a: &[i8],
        x_b: &[i8],
        values: &[i8],
        pv_a: &mut [i32],
        pv_b: &mut [i32],
    ) {
        let hd = pv_a.len();
        let v32 = hd / 32 * 32;
        let mut c0 = 0;
        while c0 < v32 {
            // SAFETY: c0 + 32 <= hd, the other bounds are the caller's contract.
            unsafe {
                let (a, b) = pv2_block(x_a, x_b, values, hd, c0);
                add_block(&mut pv_a[c0..], a);
                add_block(&mut pv_b[c0..], b);
            }
            c0 += 32;
        }
        if v32 < hd {
            for ((&ta, &tb), v) in x_a.iter().zip(x_b).zip(values.chunks_exact(hd)) {
                let (ta, tb) = (i32::from(ta), i32::from(tb));
                for ((a, b), &c) in pv_a[v32..].iter_mut().zip(&mut pv_b[v32..]).zip(&v[v32..]) {
                    *a += ta * i32::from(c);
                    *b += tb * i32::from(c);
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod win_tests {
    /// A small deterministic generator (splitmix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Mostly random codes, often the extremes -128 / 127.
        fn i8(&mut self) -> i8 {
            match self.next() % 6 {
                0 => -128,
                1 => 127,
                _ => self.next() as i8,
            }
        }
    }

    /// The explicit AVX2 N22 codes equal the portable body's: ties `(k + 0.5) * scale` and
    /// their neighbours, zeros of both signs, denormals, the maximum anywhere, every length
    /// (tails), and the invalid rows (negative, NaN, inf) anywhere in the row.
    #[test]
    fn quantize_probs_avx2_matches_portable() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(5);
        let scale = 1.0f32 / 16383.0;
        let mut pool = vec![0.0f32, -0.0, 1.0, 1e-45, 1e-40, f32::MIN_POSITIVE];
        for k in (0..16383).step_by(13) {
            for v in [(k as f32 + 0.5) * scale, k as f32 * scale] {
                pool.extend([v, v.next_down().max(0.0), v.next_up()]);
            }
        }
        let check = |p: &[f32]| {
            let n = p.len();
            let (mut h1, mut l1, mut h2, mut l2) =
                (vec![0i8; n], vec![0i8; n], vec![0i8; n], vec![0i8; n]);
            let a = super::quantize_probs_into(p, &mut h1, &mut l1);
            let b = crate::kv::quantize_probs_portable(p, &mut h2, &mut l2);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "scale, n {n}");
            if a.is_some() {
                assert_eq!((h1, l1), (h2, l2), "codes, n {n}");
            }
        };
        for n in 0..80usize {
            for round in 0..6 {
                let mut p: Vec<f32> = (0..n)
                    .map(|_| pool[(rng.next() % pool.len() as u64) as usize])
                    .collect();
                if n > 0 && round % 2 == 0 {
                    p[(rng.next() % n as u64) as usize] = 1.0; // scale exactly 1 / 16383
                }
                if n > 0 && round == 5 {
                    let s = (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 1e-38;
                    p.iter_mut().for_each(|v| *v *= s); // tiny rows, denormal scales
                }
                check(&p);
                if n > 0 {
                    let at = (rng.next() % n as u64) as usize;
                    for bad in [-1e-30f32, f32::NAN, f32::INFINITY, -0.5] {
                        let mut q = p.clone();
                        q[at] = bad;
                        check(&q);
                    }
                }
            }
        }
    }

    /// The one-pass `i32` fold-group outputs (`kv::finish_i32*`, AVX2 builds and portable)
    /// equal the `i64` reference (`(p << shift) - z` clamped to the accumulator bounds, then to
    /// the output bounds) at the extremes of their bound (`|p << shift| + |z| < 2^31`), every
    /// length (tails) and accumulator / output widths below and above 32 bits.
    #[test]
    fn finish_i32_matches_i64_reference() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(23);
        let lim = 1i64 << 30;
        for n in 0..70usize {
            for &(shift, acc_bits, out_bits) in &[
                (4u32, 48u32, 32u32),
                (4, 20, 32),
                (0, 48, 16),
                (0, 24, 12),
                (4, 32, 32),
            ] {
                let z = (rng.next() % (2 * lim as u64)) as i64 - lim;
                let pmax = (lim >> shift) - 1;
                let p: Vec<i32> = (0..n)
                    .map(|i| match i % 5 {
                        0 => pmax as i32,
                        1 => -pmax as i32,
                        2 => 0,
                        _ => ((rng.next() % (2 * pmax as u64)) as i64 - pmax) as i32,
                    })
                    .collect();
                let (alo, ahi) = (-(1i64 << (acc_bits - 1)), (1i64 << (acc_bits - 1)) - 1);
                let (olo, ohi) = (-(1i64 << (out_bits - 1)), (1i64 << (out_bits - 1)) - 1);
                let want_acc: Vec<i64> = p
                    .iter()
                    .map(|&x| ((i64::from(x) << shift) - z).clamp(alo, ahi))
                    .collect();
                let want_y: Vec<i32> = want_acc.iter().map(|&a| a.clamp(olo, ohi) as i32).collect();
                let c = |v: i64| v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
                let f = crate::kv::FinishI32 {
                    shift,
                    z: z as i32,
                    alo: c(alo),
                    ahi: c(ahi),
                    olo: c(olo),
                    ohi: c(ohi),
                };
                let (mut a1, mut y1, mut a2, mut y2) =
                    (vec![0i64; n], vec![0i32; n], vec![0i64; n], vec![0i32; n]);
                super::finish_i32(&p, f, &mut a1, &mut y1);
                crate::kv::finish_i32_portable(&p, f, &mut a2, &mut y2);
                assert_eq!((&a1, &y1), (&want_acc, &want_y), "avx2 n {n} shift {shift}");
                assert_eq!((&a2, &y2), (&want_acc, &want_y), "portable n {n}");
                let (mut y3, mut y4) = (vec![0i32; n], vec![0i32; n]);
                super::finish_i32_y(&p, f, &mut y3);
                crate::kv::finish_i32_y_portable(&p, f, &mut y4);
                assert_eq!((&y3, &y4), (&want_y, &want_y), "y only n {n}");
            }
        }
    }

    #[test]
    fn elementwise_avx2_builds_match_portable() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(11);
        for n in [0usize, 1, 7, 8, 9, 31, 64, 65, 200] {
            let p: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    0 => 0.0,
                    1 => 1.0,
                    _ => (rng.next() >> 40) as f32 / (1u64 << 24) as f32,
                })
                .collect();
            let (mut h1, mut l1, mut h2, mut l2) =
                (vec![0i8; n], vec![0i8; n], vec![0i8; n], vec![0i8; n]);
            let a = super::quantize_probs_into(&p, &mut h1, &mut l1);
            let b = crate::kv::quantize_probs_portable(&p, &mut h2, &mut l2);
            assert_eq!((a.map(f32::to_bits), h1, l1), (b.map(f32::to_bits), h2, l2));
            let xi: Vec<i8> = (0..n).map(|_| rng.i8()).collect();
            for sf in [1u32, 8, 15] {
                let m: Vec<u16> = (0..n)
                    .map(|_| (rng.next() % ((1 << sf) + 1)) as u16)
                    .collect();
                let (mut f1, mut f2) = (vec![0i8; n], vec![0i8; n]);
                super::fold_into(&xi, &m, sf, &mut f1);
                crate::kv::fold_portable(&xi, &m, sf, &mut f2);
                assert_eq!(f1, f2, "fold n {n} sf {sf}");
            }
        }
    }

    #[test]
    fn window_kernels_match_scalar() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(7);
        for hd in [1usize, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 130] {
            for nw in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 67, 96] {
                let keys: Vec<i8> = (0..nw * hd).map(|_| rng.i8()).collect();
                let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
                // Accumulator bounds that clamp some dot products, and wide ones.
                for (lo, hi) in [(i64::MIN, i64::MAX), (-20_000, 20_000)] {
                    let mut got = vec![0i64; nw];
                    super::window_qk(&q, &keys, &mut got, lo, hi);
                    let want: Vec<i64> = keys
                        .chunks_exact(hd)
                        .map(|k| {
                            let d: i64 = q
                                .iter()
                                .zip(k)
                                .map(|(&a, &b)| i64::from(a) * i64::from(b))
                                .sum();
                            d.clamp(lo, hi)
                        })
                        .collect();
                    assert_eq!(got, want, "window_qk hd {hd} nw {nw}");
                }
                // Probabilities: non-negative (the vpmaddubsw path, with the extreme 127), and
                // any i8 (the portable fallback).
                for signed in [false, true] {
                    let x = |rng: &mut Rng| -> Vec<i8> {
                        (0..nw)
                            .map(|_| {
                                let v = rng.i8();
                                if signed {
                                    v
                                } else {
                                    v.max(0)
                                }
                            })
                            .collect()
                    };
                    let (xa, xb) = (x(&mut rng), x(&mut rng));
                    let init: Vec<i32> = (0..hd).map(|c| c as i32 * 3 - 40).collect();
                    let (mut pa, mut pb) = (init.clone(), init.clone());
                    super::window_pv2(&xa, &xb, &keys, &mut pa, &mut pb);
                    let (mut wa, mut wb) = (init.clone(), init);
                    for ((&ta, &tb), v) in xa.iter().zip(&xb).zip(keys.chunks_exact(hd)) {
                        for c in 0..hd {
                            wa[c] += i32::from(ta) * i32::from(v[c]);
                            wb[c] += i32::from(tb) * i32::from(v[c]);
                        }
                    }
                    assert_eq!(
                        (pa, pb),
                        (wa, wb),
                        "window_pv2 hd {hd} nw {nw} signed {signed}"
                    );
                }
            }
        }
    }
}

// ---- N5 activation quantization (`act::quantize_token_isa`) ----

/// N5 of one token on AVX2 (see [`crate::act::quantize_token_isa`]).
pub(crate) fn quantize_token_n5(x: &[f32], out: &mut [i8]) -> Option<f32> {
    assert_eq!(x.len(), out.len(), "quantize_token_n5: one code per input");
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            std::arch::is_x86_feature_detected!("avx2"),
            "AVX2 path on a CPU without AVX2"
        );
        // SAFETY: AVX2 is present (checked above); `out` is as long as `x` (asserted).
        unsafe { n5_imp::quantize_token(x, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX2 is never available off x86_64");
}

#[cfg(target_arch = "x86_64")]
mod n5_imp {
    use std::arch::x86_64::*;

    use crate::act::round_clamp_i8;

    /// golden's `quantize_token`: the absolute maximum (order-independent for finite inputs:
    /// every `|v|` is a non-negative finite float and `max` of such is exact) and the finiteness
    /// check in one pass, then per lane `v / scale` (`vdivps`, the IEEE quotient as the scalar
    /// division), [`round_clamp_i8`]'s operations ([`code`]), and a pack to bytes. The last
    /// `len % 32` elements take [`round_clamp_i8`] itself.
    ///
    /// # Safety
    /// AVX2 is available; `out.len() == x.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_token(x: &[f32], out: &mut [i8]) -> Option<f32> {
        let n = x.len();
        let p = x.as_ptr();
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let fmax = _mm256_set1_ps(f32::MAX);
        let z = _mm256_setzero_ps();
        let (mut m0, mut m1) = (z, z);
        let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: elements i..i + 16 of `x` exist.
            let (a, b) = unsafe {
                (
                    _mm256_and_ps(_mm256_loadu_ps(p.add(i)), abs),
                    _mm256_and_ps(_mm256_loadu_ps(p.add(i + 8)), abs),
                )
            };
            // `|v| <= MAX` is false for +-inf and NaN.
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LE_OQ>(a, fmax));
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LE_OQ>(b, fmax));
            m0 = _mm256_max_ps(m0, a);
            m1 = _mm256_max_ps(m1, b);
            i += 16;
        }
        while i + 8 <= n {
            // SAFETY: elements i..i + 8 of `x` exist.
            let a = unsafe { _mm256_and_ps(_mm256_loadu_ps(p.add(i)), abs) };
            ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LE_OQ>(a, fmax));
            m0 = _mm256_max_ps(m0, a);
            i += 8;
        }
        if _mm256_movemask_ps(ok) != 0xff {
            return None;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(m0, m1)) };
        let mut absmax = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
        for &v in &x[i..] {
            if !v.is_finite() {
                return None;
            }
            absmax = absmax.max(v.abs());
        }
        let scale_x = absmax / 127.0;
        if scale_x == 0.0 {
            out.fill(0);
            return Some(0.0);
        }
        let sv = _mm256_set1_ps(scale_x);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let o = out.as_mut_ptr();
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: elements i..i + 32 of `x` and `out` exist.
            unsafe {
                let r0 = code(sv, _mm256_loadu_ps(p.add(i)));
                let r1 = code(sv, _mm256_loadu_ps(p.add(i + 8)));
                let r2 = code(sv, _mm256_loadu_ps(p.add(i + 16)));
                let r3 = code(sv, _mm256_loadu_ps(p.add(i + 24)));
                // In [-127, 127], so the saturating packs are exact; per 128-bit lane they
                // interleave groups of four, which the dword permutation puts back in order.
                let b = _mm256_packs_epi16(_mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3));
                let b = _mm256_permutevar8x32_epi32(b, perm);
                _mm256_storeu_si256(o.add(i).cast::<__m256i>(), b);
            }
            i += 32;
        }
        for (c, &v) in out[i..].iter_mut().zip(&x[i..]) {
            *c = round_clamp_i8(v / scale_x);
        }
        Some(scale_x)
    }

    /// Eight codes of [`round_clamp_i8`]`(v / scale)` as `i32` lanes: `y` clamped to
    /// `[-128, 128]`, truncated, plus one where the exact fraction is `>= 0.5`, minus one where
    /// it is `<= -0.5`, clamped to `[-127, 127]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn code(scale: __m256, v: __m256) -> __m256i {
        let y = _mm256_div_ps(v, scale);
        let y = _mm256_min_ps(
            _mm256_max_ps(y, _mm256_set1_ps(-128.0)),
            _mm256_set1_ps(128.0),
        );
        let t = _mm256_cvttps_epi32(y);
        let frac = _mm256_sub_ps(y, _mm256_cvtepi32_ps(t));
        // Compare masks are -1 where true: t + [frac >= 0.5] - [frac <= -0.5].
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5)));
        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, _mm256_set1_ps(-0.5)));
        let r = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
        _mm256_min_epi32(
            _mm256_max_epi32(r, _mm256_set1_epi32(-127)),
            _mm256_set1_epi32(127),
        )
    }
}

// ---- The GEMM epilogue's lattice stage and transposition (`weights::gemm_epilogue`) ----

/// `yt[t * ld + i] = stage_shift_one(sub[i * m + t], s, lo, hi)` for `i < rows`, `t < m`: N14's
/// lattice stage (`weights::stage_shift_portable`'s operations) of a `[row][t]` block of
/// accumulators, written transposed. Every `|sub[..]| < 2^62`, `s` in `1..=61`, and
/// `[lo, hi]` within `i32`. `wide`: the AVX-512 version (8 rows x 8 tokens a block; the CPU
/// must have [`crate::Isa::Avx512Vnni`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_transpose(
    wide: bool,
    sub: &[i64],
    rows: usize,
    m: usize,
    s: u32,
    lo: i64,
    hi: i64,
    yt: &mut [i32],
    ld: usize,
) {
    assert!(
        sub.len() >= rows * m && rows <= ld,
        "stage_transpose: block size"
    );
    assert!(m == 0 || rows == 0 || yt.len() >= (m - 1) * ld + rows);
    assert!((1..=61).contains(&s) && lo >= i64::from(i32::MIN) && hi <= i64::from(i32::MAX));
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            std::arch::is_x86_feature_detected!("avx2"),
            "AVX2 path on a CPU without AVX2"
        );
        if wide {
            assert!(
                crate::Isa::Avx512Vnni.is_available(),
                "AVX-512 path on a CPU without AVX-512"
            );
            // SAFETY: AVX-512 F/BW/VL present (checked above); the sizes are asserted above.
            return unsafe { epi_imp::stage_transpose512(sub, rows, m, s, lo, hi, yt, ld) };
        }
        // SAFETY: AVX2 is present (checked above); the sizes are asserted above.
        unsafe { epi_imp::stage_transpose(sub, rows, m, s, lo, hi, yt, ld) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX2 is never available off x86_64");
}

#[cfg(target_arch = "x86_64")]
mod epi_imp {
    use std::arch::x86_64::*;

    use crate::weights::stage_shift_one;

    /// The blocks' remainders one element at a time: `yt[t * ld + r]` for `r` in `rows`, `t` in
    /// `toks`, with the stage `(s, lo, hi)` of `stage_shift_one`.
    fn stage_scalar(
        sub: &[i64],
        m: usize,
        rows: std::ops::Range<usize>,
        toks: std::ops::Range<usize>,
        (s, lo, hi): (u32, i64, i64),
        yt: &mut [i32],
        ld: usize,
    ) {
        for r in rows {
            for t in toks.clone() {
                yt[t * ld + r] = stage_shift_one(sub[r * m + t], s, lo, hi);
            }
        }
    }

    /// See [`super::stage_transpose`]: blocks of 4 rows x 4 tokens (four `i64` vectors staged,
    /// their low `i32` halves transposed with unpacks), the remaining rows and tokens one by
    /// one. The arithmetic shift right of `b = a + 2^(s-1) - [a < 0]` (`|b| < 2^63`) is
    /// `((b ^ 2^63) >>> s) - 2^(63-s)` (exact: `b + 2^63` is non-negative and `2^63` a multiple
    /// of `2^s`).
    ///
    /// # Safety
    /// AVX2 is available; the sizes as asserted by the caller.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn stage_transpose(
        sub: &[i64],
        rows: usize,
        m: usize,
        s: u32,
        lo: i64,
        hi: i64,
        yt: &mut [i32],
        ld: usize,
    ) {
        let half = _mm256_set1_epi64x(1i64 << (s - 1));
        let sign = _mm256_set1_epi64x(i64::MIN);
        let bias = _mm256_set1_epi64x((1u64 << 63 >> s) as i64);
        let cnt = _mm_cvtsi32_si128(s as i32);
        let (lov, hiv) = (_mm256_set1_epi64x(lo), _mm256_set1_epi64x(hi));
        let zero = _mm256_setzero_si256();
        let low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        let stage4 = |a: __m256i| -> __m128i {
            let neg = _mm256_cmpgt_epi64(zero, a);
            let b = _mm256_add_epi64(_mm256_add_epi64(a, half), neg);
            let r = _mm256_sub_epi64(_mm256_srl_epi64(_mm256_xor_si256(b, sign), cnt), bias);
            let r = _mm256_blendv_epi8(r, lov, _mm256_cmpgt_epi64(lov, r));
            let r = _mm256_blendv_epi8(r, hiv, _mm256_cmpgt_epi64(r, hiv));
            _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(r, low))
        };
        let (p, o) = (sub.as_ptr(), yt.as_mut_ptr());
        let (r4, m4) = (rows / 4 * 4, m / 4 * 4);
        for i in (0..r4).step_by(4) {
            for t in (0..m4).step_by(4) {
                // SAFETY: rows i..i + 4 and tokens t..t + 4 are inside `sub` (rows * m) and
                // their outputs (t + j) * ld + i..+4 inside `yt` (i + 4 <= rows <= ld).
                unsafe {
                    let x0 = stage4(_mm256_loadu_si256(p.add(i * m + t).cast()));
                    let x1 = stage4(_mm256_loadu_si256(p.add((i + 1) * m + t).cast()));
                    let x2 = stage4(_mm256_loadu_si256(p.add((i + 2) * m + t).cast()));
                    let x3 = stage4(_mm256_loadu_si256(p.add((i + 3) * m + t).cast()));
                    let t0 = _mm_unpacklo_epi32(x0, x1);
                    let t1 = _mm_unpacklo_epi32(x2, x3);
                    let t2 = _mm_unpackhi_epi32(x0, x1);
                    let t3 = _mm_unpackhi_epi32(x2, x3);
                    _mm_storeu_si128(o.add(t * ld + i).cast(), _mm_unpacklo_epi64(t0, t1));
                    _mm_storeu_si128(o.add((t + 1) * ld + i).cast(), _mm_unpackhi_epi64(t0, t1));
                    _mm_storeu_si128(o.add((t + 2) * ld + i).cast(), _mm_unpacklo_epi64(t2, t3));
                    _mm_storeu_si128(o.add((t + 3) * ld + i).cast(), _mm_unpackhi_epi64(t2, t3));
                }
            }
            stage_scalar(sub, m, i..i + 4, m4..m, (s, lo, hi), yt, ld);
        }
        stage_scalar(sub, m, r4..rows, 0..m, (s, lo, hi), yt, ld);
    }

    /// [`stage_transpose`] on AVX-512: blocks of 8 rows x 8 tokens (eight `i64` vectors staged
    /// with AVX-512's arithmetic shift and `i64` min / max, narrowed to `i32`, transposed as an
    /// 8 x 8 `i32` matrix), the remaining rows and tokens one by one. `b = a + 2^(s-1) - [a <
    /// 0]` is below `2^63` in magnitude (`|a| < 2^62`), and `b >> s` (arithmetic) is
    /// `stage_shift_one`'s rounding.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; the sizes as asserted by the caller.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn stage_transpose512(
        sub: &[i64],
        rows: usize,
        m: usize,
        s: u32,
        lo: i64,
        hi: i64,
        yt: &mut [i32],
        ld: usize,
    ) {
        let half = _mm512_set1_epi64(1i64 << (s - 1));
        let one = _mm512_set1_epi64(1);
        let cnt = _mm_cvtsi32_si128(s as i32);
        let (lov, hiv) = (_mm512_set1_epi64(lo), _mm512_set1_epi64(hi));
        let zero = _mm512_setzero_si512();
        let stage8 = |a: __m512i| -> __m256i {
            let neg = _mm512_cmplt_epi64_mask(a, zero);
            let b = _mm512_mask_sub_epi64(
                _mm512_add_epi64(a, half),
                neg,
                _mm512_add_epi64(a, half),
                one,
            );
            let r = _mm512_min_epi64(_mm512_max_epi64(_mm512_sra_epi64(b, cnt), lov), hiv);
            _mm512_cvtepi64_epi32(r)
        };
        let (p, o) = (sub.as_ptr(), yt.as_mut_ptr());
        let (r8, m8) = (rows / 8 * 8, m / 8 * 8);
        for i in (0..r8).step_by(8) {
            for t in (0..m8).step_by(8) {
                // SAFETY: rows i..i + 8 and tokens t..t + 8 are inside `sub` (rows * m) and
                // their outputs (t + j) * ld + i..+8 inside `yt` (i + 8 <= rows <= ld).
                unsafe {
                    let x: [__m256i; 8] = std::array::from_fn(|j| {
                        stage8(_mm512_loadu_si512(p.add((i + j) * m + t).cast()))
                    });
                    // x[j] = row i + j, tokens t..t + 8: transpose to token-major.
                    let a0 = _mm256_unpacklo_epi32(x[0], x[1]);
                    let a1 = _mm256_unpackhi_epi32(x[0], x[1]);
                    let a2 = _mm256_unpacklo_epi32(x[2], x[3]);
                    let a3 = _mm256_unpackhi_epi32(x[2], x[3]);
                    let a4 = _mm256_unpacklo_epi32(x[4], x[5]);
                    let a5 = _mm256_unpackhi_epi32(x[4], x[5]);
                    let a6 = _mm256_unpacklo_epi32(x[6], x[7]);
                    let a7 = _mm256_unpackhi_epi32(x[6], x[7]);
                    let b0 = _mm256_unpacklo_epi64(a0, a2);
                    let b1 = _mm256_unpackhi_epi64(a0, a2);
                    let b2 = _mm256_unpacklo_epi64(a1, a3);
                    let b3 = _mm256_unpackhi_epi64(a1, a3);
                    let b4 = _mm256_unpacklo_epi64(a4, a6);
                    let b5 = _mm256_unpackhi_epi64(a4, a6);
                    let b6 = _mm256_unpacklo_epi64(a5, a7);
                    let b7 = _mm256_unpackhi_epi64(a5, a7);
                    let out = [
                        _mm256_permute2x128_si256::<0x20>(b0, b4),
                        _mm256_permute2x128_si256::<0x20>(b1, b5),
                        _mm256_permute2x128_si256::<0x20>(b2, b6),
                        _mm256_permute2x128_si256::<0x20>(b3, b7),
                        _mm256_permute2x128_si256::<0x31>(b0, b4),
                        _mm256_permute2x128_si256::<0x31>(b1, b5),
                        _mm256_permute2x128_si256::<0x31>(b2, b6),
                        _mm256_permute2x128_si256::<0x31>(b3, b7),
                    ];
                    for (j, v) in out.into_iter().enumerate() {
                        _mm256_storeu_si256(o.add((t + j) * ld + i).cast(), v);
                    }
                }
            }
            stage_scalar(sub, m, i..i + 8, m8..m, (s, lo, hi), yt, ld);
        }
        stage_scalar(sub, m, r8..rows, 0..m, (s, lo, hi), yt, ld);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod epi_tests {
    use crate::weights::stage_shift_one;

    /// `stage_transpose` equals the scalar stage per element, transposed: every shift, both
    /// `i32` and narrow bounds, accumulators up to `+-(2^62 - 1)`, row and token tails.
    #[test]
    fn stage_transpose_equals_scalar() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut z = 99u64;
        let mut next = move || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut v = z;
            v = (v ^ (v >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            v = (v ^ (v >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            v ^ (v >> 31)
        };
        for s in 1..=61u32 {
            for (lo, hi) in [(i64::from(i32::MIN), i64::from(i32::MAX)), (-128, 127)] {
                for (rows, m) in [
                    (4usize, 4usize),
                    (5, 9),
                    (16, 13),
                    (3, 2),
                    (8, 17),
                    (0, 3),
                    (16, 16),
                    (9, 24),
                ] {
                    let sub: Vec<i64> = (0..rows * m)
                        .map(|j| match j % 9 {
                            0 => (1 << 62) - 1,
                            1 => -(1 << 62) + 1,
                            2 => -1,
                            3 => 1 << (s - 1),
                            4 => -(1 << (s - 1)),
                            _ => (next() as i64) >> (2 + next() % 62),
                        })
                        .collect();
                    let ld = rows + 3;
                    for wide in [false, true] {
                        if wide && !crate::Isa::Avx512Vnni.is_available() {
                            continue;
                        }
                        let mut got = vec![7i32; m * ld];
                        super::stage_transpose(wide, &sub, rows, m, s, lo, hi, &mut got, ld);
                        for t in 0..m {
                            for i in 0..ld {
                                let want = if i < rows {
                                    stage_shift_one(sub[i * m + t], s, lo, hi)
                                } else {
                                    7
                                };
                                assert_eq!(
                                    got[t * ld + i],
                                    want,
                                    "s {s} rows {rows} m {m} t {t} i {i} wide {wide}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
