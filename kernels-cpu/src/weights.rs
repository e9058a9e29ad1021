//! The weight operation (docs/numerics.md N12-N15) on a CPU-friendly re-packing of
//! [`QuantWeights`].
//!
//! # Layout
//! Each row is cut into its groups (N7), and each group is padded with code 0 to whole
//! 32-element *chunks* (`chunks_per_group = ceil(L / 32)`). A chunk of codes `c[0..32]` is
//! stored in `32 * B / 8` bytes so that one shift-and-mask expands it into 32 lanes:
//! - W8: `c[0..32]` as bytes;
//! - W4: byte `i` (0..16) holds `c[i] | c[16 + i] << 4`;
//! - W2 and ternary: the row's chunks go by *blocks* of four (chunks `4b..4b + 4` in 32 bytes
//!   at byte `32 b`): byte `i` (0..32) of a block holds code `i` of its four chunks,
//!   `c0[i] | c1[i] << 2 | c2[i] << 4 | c3[i] << 6`, so one load and a shift-and-mask per chunk
//!   expand four chunks. The last `n % 4` chunks of a row (no whole block) are 8 bytes each:
//!   byte `i` (0..8) holds `c[i] | c[8+i] << 2 | c[16+i] << 4 | c[24+i] << 6`. Either way chunk
//!   `ci` of a row starts at byte `8 ci` (of its block when it is in one).
//!
//! *GEMV quads* (W2 and ternary with `chunks_per_group == 1`): a second copy of the rows for the
//! one-token product (`avx2.rs`). A row's groups go by quads of four (the last `groups % 4`
//! groups stay single 8-byte chunks in their own order); quad `q` is 32 bytes holding four virtual chunks `c` (2 bits each, chunk `c` at
//! bits `2c`), whose byte `i` is element `8c + 2 (j / 4) + i % 2` of group `4q + j % 4` with
//! `j = i / 2` ([`quad_source`]): every byte pair, an `i16` lane of `vpmaddubsw`, lies in one
//! group, lane `j` in group `j % 4`. The row's quads and tail chunks are followed by its group
//! scales and zero points (padded to a multiple of 4 groups) in one run of bytes. The token is permuted the same
//! way once per call (`Scratch`), with its group sums as `i16`.
//!
//! Activations are copied once per call into the same padded layout (zeros in the padding, so
//! padding adds nothing, as in N12) and the per-group sums `S` are computed once per token.
//!
//! # Arithmetic (exactly N12-N13)
//! Per (token, row, group): `P_code = sum x * code` (the SIMD paths use `vpmaddubsw` with
//! codes <= 15, which cannot saturate: `2 * 15 * 128 < 2^15`; W8 codes are split into nibbles,
//! or on the AVX2 GEMV path widened to `i16` for `vpmaddwd`),
//! `P = P_code << (8 - B)` (the lattice, N10), `G = P - zero * S`, then in `i64`
//! `acc = sat(acc + gscale * G, acc_bits)` per group in ascending order: the saturation is
//! never skipped, so the result equals golden for every `k` and every `acc_bits`.
//!
//! `row_bound[n] = sum_g gscale * L_g * 128 * 255` bounds every partial accumulator of row `n`.
//! When it is `<= 2^(acc_bits - 1) - 1` no group addition can saturate, the ordered sum is the
//! plain exact sum, and the AVX2 path may regroup it (the *folded* path for W2, W4 and
//! ternary, `avx2.rs`): `acc = (sum_g gscale * P_code) << (8 - B) - sum_g gscale * zero * S`,
//! with `gscale` multiplied inside `vpmaddwd` per chunk and no per-group reduction. Rows whose
//! bound does not prove it keep the ordered per-group path, in the same call.

use rayon::prelude::*;
use tessera_golden::numerics::{max_signed, min_signed, round_shift, Datapath};
use tessera_golden::ops::{OpError, OutputStage, ACC_BITS_MAX, ACC_BITS_MIN};
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::QuantWeights;

use crate::isa::Isa;
use crate::mem::Bytes;
use crate::team::Team;

/// Elements per chunk (one AVX2 register of `u8` codes).
pub const CHUNK: usize = 32;

/// Largest padded group length the SIMD paths take: their per-group `i32` lane sums stay exact
/// for `L * 255 * 128 < 2^31`; longer groups run on the scalar path (`i64`).
const SIMD_MAX_GROUP: usize = 16 * 1024;

/// Operations below this many multiply-accumulates (padded) run on the calling thread.
const PAR_MIN_MACS: usize = 128 * 1024;

/// Whether GEMMs of tensors with a quad copy take the tiled quad path (on unless switched off
/// by [`set_gemm_quad`]).
static GEMM_QUAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// For benchmarks and tests: switches the GEMM's tiled quad path (W2 / ternary tensors with a
/// quad copy, AVX2) on or off process-wide, so one process can time or test both paths side
/// by side; off, those GEMMs take the folded path. Both give the same integers.
#[doc(hidden)]
pub fn set_gemm_quad(on: bool) {
    GEMM_QUAD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Rows per rayon task (at least).
const MIN_ROWS_PER_TASK: usize = 16;

/// GEMV on a [`Team`]: *guided* tasks, claimed dynamically (a late or descheduled member
/// leaves its share to the others): each task takes `1 / (2 * members)` of the rows left, at
/// least [`TEAM_MIN_ROWS`], a whole number of 64-byte lines of `i64` outputs
/// ([`TEAM_ROW_ALIGN`]); so the first tasks are large (few claims) and the last ones small (the
/// member that finishes first waits at most one small task for the other). Limits: at most
/// [`TEAM_MAX_TASKS`] tasks (the last one takes the rest).
const TEAM_ROW_ALIGN: usize = 8;
const TEAM_MIN_ROWS: usize = 64;
const TEAM_MAX_TASKS: usize = 48;

/// The guided task boundaries of [`TEAM_ROW_ALIGN`] for `n_rows` rows and `members` threads:
/// task `i` is rows `b[i]..b[i + 1]`; returns the number of tasks (`b[0] = 0`,
/// `b[tasks] = n_rows`, strictly increasing).
fn guided_bounds(n_rows: usize, members: usize, b: &mut [usize; TEAM_MAX_TASKS + 1]) -> usize {
    let mut tasks = 0;
    let mut r = 0;
    while r < n_rows {
        let left = n_rows - r;
        let take = if tasks + 1 == TEAM_MAX_TASKS {
            left
        } else {
            (left / (2 * members.max(1)))
                .max(TEAM_MIN_ROWS)
                .next_multiple_of(TEAM_ROW_ALIGN)
                .min(left)
        };
        r += take;
        tasks += 1;
        b[tasks] = r;
    }
    b[0] = 0;
    debug_assert!(tasks <= TEAM_MAX_TASKS && b[tasks] == n_rows);
    tasks
}

/// GEMM: rows computed per sub-block before their accumulators are transposed to `[t][n]`
/// (`16 * m * 8` bytes, L1-resident for the prompt lengths of a prefill).
const TRANSPOSE_ROWS: usize = 16;

/// [`PreparedWeights::gemm_epilogue`]: rows whose N14 outputs are collected (`[t][row]`,
/// `4 * m` bytes a row) before each token's run of them goes to the epilogue, so that its output
/// writes are runs of whole cache lines.
const EPILOGUE_ROWS: usize = 64;

/// An output buffer shared by a product's row tasks, each writing only its own rows (the
/// GEMM's `i64` accumulators, the guided GEMV's accumulators and N14 outputs).
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);

// SAFETY: only used by `gemm_acc_in`, `gemm_epilogue_in`, `gemv_tasks` and `gemv_epilogue_in`,
// whose tasks write disjoint elements (GEMM row blocks, guided GEMV row ranges) of a `T: Send`
// buffer.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// [`PreparedWeights::pad_tile`]'s view of a [`Scratch`]'s activation copies (each tile task
/// writes its own tokens' elements).
#[derive(Clone, Copy)]
struct PadBufs {
    x_pad: OutPtr<i8>,
    s_sum: OutPtr<i32>,
    x_quad_m: OutPtr<i8>,
    s_pair: OutPtr<i32>,
    s_tr: OutPtr<i64>,
}

impl PadBufs {
    fn of(s: &mut Scratch) -> PadBufs {
        PadBufs {
            x_pad: OutPtr(s.x_pad.as_mut_ptr()),
            s_sum: OutPtr(s.s_sum.as_mut_ptr()),
            x_quad_m: OutPtr(s.x_quad_m.as_mut_ptr()),
            s_pair: OutPtr(s.s_pair.as_mut_ptr()),
            s_tr: OutPtr(s.s_tr.as_mut_ptr()),
        }
    }
}

impl<T> OutPtr<T> {
    /// # Safety
    /// `i` is inside the buffer the pointer was taken from.
    #[inline]
    #[allow(unsafe_code)]
    unsafe fn at(self, i: usize) -> *mut T {
        // SAFETY: forwarded from the caller's contract.
        unsafe { self.0.add(i) }
    }
}

/// A part of the output of [`PreparedWeights::gemm_epilogue`]: rows `row0..row0 + np` of the
/// tensor, stored `[t][np]` at `ptr`.
#[derive(Clone, Copy)]
struct PartPtr<T> {
    row0: usize,
    np: usize,
    ptr: *mut T,
}

// SAFETY: only used by `gemm_epilogue`, whose tasks write disjoint elements (their own rows).
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for PartPtr<T> {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for PartPtr<T> {}

/// Most output parts of one epilogue call (Q, K, V of a fused tensor are three).
pub const MAX_PARTS: usize = 8;

/// The output parts of an epilogue call (`outs[p]` is `[t][np]`, rows of consecutive parts
/// consecutive), as raw pointers in a fixed array: no allocation.
struct Parts<T> {
    n: usize,
    p: [PartPtr<T>; MAX_PARTS],
}

impl<T: Send> Parts<T> {
    fn new(outs: &mut [&mut [T]], m_tokens: usize) -> Result<Parts<T>, OpError> {
        if outs.len() > MAX_PARTS {
            return Err(OpError::Shape {
                what: "output parts (at most MAX_PARTS)",
                expected: MAX_PARTS,
                got: outs.len(),
            });
        }
        let mut p: [PartPtr<T>; MAX_PARTS] = std::array::from_fn(|_| PartPtr {
            row0: 0,
            np: 0,
            ptr: std::ptr::null_mut(),
        });
        let mut row0 = 0;
        for (slot, o) in p.iter_mut().zip(outs.iter_mut()) {
            if o.len() % m_tokens != 0 {
                return Err(OpError::Shape {
                    what: "output part (whole token rows)",
                    expected: o.len().next_multiple_of(m_tokens),
                    got: o.len(),
                });
            }
            let np = o.len() / m_tokens;
            *slot = PartPtr {
                row0,
                np,
                ptr: o.as_mut_ptr(),
            };
            row0 += np;
        }
        Ok(Parts { n: outs.len(), p })
    }

    /// `epi(t, r, y_run, out_run)` for token `t`'s N14 outputs `y` of rows `row..`, split at
    /// the part boundaries.
    fn emit<F>(&self, t: usize, row: usize, y: &[i32], epi: &F)
    where
        F: Fn(usize, usize, &[i32], &mut [T]) + Sync,
    {
        let mut r = row;
        for p in &self.p[..self.n] {
            let end = (row + y.len()).min(p.row0 + p.np);
            if r >= end {
                continue;
            }
            // SAFETY: rows r..end lie in part p (r >= p.row0, end <= p.row0 + p.np), so token
            // t's elements t * np + (r - row0).. of its `m_tokens * np` are in bounds (the
            // caller passes t < m_tokens); each (t, row) is emitted once, by the one task that
            // owns the row, and nothing else reads or writes the parts meanwhile.
            #[allow(unsafe_code)]
            let out = unsafe {
                std::slice::from_raw_parts_mut(p.ptr.add(t * p.np + (r - p.row0)), end - r)
            };
            epi(t, r, &y[r - row..end - row], out);
            r = end;
        }
    }
}

/// A weight tensor re-packed for the CPU kernels (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct PreparedWeights {
    format: WeightFormat,
    n_rows: usize,
    k: usize,
    group_len: usize,
    groups: usize,
    chunks_per_group: usize,
    chunk_bytes: usize,
    row_bytes: usize,
    w_scale_bits: u32,
    /// The group layout's rows (on huge pages when large, see [`crate::mem`]).
    data: Bytes,
    gscale_q: Vec<u16>,
    zero_u8: Vec<u8>,
    row_scale: Vec<f32>,
    row_bound: Vec<u64>,
    /// The largest `row_bound` (0 for no rows).
    max_row_bound: u64,
    /// The GEMV quad copy (W2 / ternary with one chunk a group, else empty; module docs).
    quad: QuadWeights,
}

/// W2 / ternary rows with `chunks_per_group == 1` re-packed for the GEMV (see "GEMV quads" in
/// the module docs): each row is one run of `stride = 32 quads + 8 tail + 3 meta` bytes (one
/// stream for the prefetchers): `quads = groups / 4` blocks of 32 bytes, the `tail = groups % 4`
/// last groups as single 8-byte chunks (the group layout's format), then the group scales
/// (`u16`, little endian) and the zero points padded with zeros to `meta = 4 ceil(groups / 4)`
/// groups; [`QUAD_SLACK`] zero bytes follow the last row (the zero term reads whole blocks of
/// 16 groups; past the row the sums it multiplies are 0).
#[derive(Debug, Clone, Default)]
struct QuadWeights {
    quads: usize,
    tail: usize,
    meta: usize,
    stride: usize,
    data: Bytes,
}

impl QuadWeights {
    /// Activations of one token in this layout: `128 * quads + 32 * tail`.
    fn x_len(&self) -> usize {
        128 * self.quads + 32 * self.tail
    }
}

/// Readable bytes past the last row of [`QuadWeights`].
pub(crate) const QUAD_SLACK: usize = 64;

/// Caller-owned buffers of a weight operation. Sized once ([`Scratch::for_weights`]) they are
/// reused: a call allocates nothing unless a larger shape than before is used.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    x_pad: Vec<i8>,
    s_sum: Vec<i32>,
    /// GEMM only: `S` transposed to `[g][t]` with a token stride of `m` rounded up to 4 (the
    /// padding zero), as `i64` (see `avx2.rs`, the tiled folded path).
    s_tr: Vec<i64>,
    acc_nt: Vec<i64>,
    /// GEMM with an epilogue: each task's N14 outputs of one sub-block (`[row][t]`) and of
    /// `EPILOGUE_ROWS` rows (`[t][row]`).
    y_sub: Vec<i32>,
    /// [`PreparedWeights::gemv_epilogue_in`]: the accumulators and N14 outputs of one token.
    gemv_acc: Vec<i64>,
    gemv_y: Vec<i32>,
    /// The GEMV quad layout's activations and `i16` group sums (one token).
    x_quad: Vec<i8>,
    s_quad: Vec<i16>,
    /// GEMM only: every token's activations in the quad layout (`[t][x_len]`, see
    /// [`QuadWeights`]), for the tiled quad path of `avx2.rs`.
    x_quad_m: Vec<i8>,
    /// GEMM with a quad copy: the group sums of pairs of groups as two `i16` in an `i32`
    /// (`[g / 2][t]`, low half group `2p`, high half `2p + 1`; token stride `m` rounded up to
    /// 8, groups and tokens past the end zero), for the quad path's zero term.
    s_pair: Vec<i32>,
}

impl Scratch {
    #[must_use]
    pub fn new() -> Self {
        Scratch::default()
    }

    /// Buffers large enough for `m_tokens` tokens against `w` (and anything smaller).
    #[must_use]
    pub fn for_weights(w: &PreparedWeights, m_tokens: usize) -> Self {
        let mut s = Scratch::default();
        s.reserve(w, m_tokens);
        s
    }

    /// Grows the buffers for `m_tokens` tokens against `w` (never shrinks).
    pub fn reserve(&mut self, w: &PreparedWeights, m_tokens: usize) {
        let xp = m_tokens * w.padded_len();
        if self.x_pad.len() < xp {
            self.x_pad.resize(xp, 0);
        }
        let ss = m_tokens * w.groups;
        if self.s_sum.len() < ss {
            self.s_sum.resize(ss, 0);
        }
        if m_tokens > 1 && self.acc_nt.len() < m_tokens * w.n_rows {
            self.acc_nt.resize(m_tokens * w.n_rows, 0);
        }
        let st = w.groups * s_tr_stride(m_tokens);
        if m_tokens > 1 && self.s_tr.len() < st {
            self.s_tr.resize(st, 0);
        }
        if self.x_quad.len() < w.quad.x_len() {
            self.x_quad.resize(w.quad.x_len(), 0);
        }
        if self.s_quad.len() < w.quad.meta.next_multiple_of(16) {
            self.s_quad.resize(w.quad.meta.next_multiple_of(16), 0);
        }
        let xqm = m_tokens.next_multiple_of(TOK_TILE) * w.quad.x_len();
        if m_tokens > 1 && self.x_quad_m.len() < xqm {
            self.x_quad_m.resize(xqm, 0);
        }
        let sp = w.groups.div_ceil(2) * s_pair_stride(m_tokens);
        if m_tokens > 1 && w.quad.stride > 0 && self.s_pair.len() < sp {
            self.s_pair.resize(sp, 0);
        }
    }
}

/// Read-only view of everything a row kernel needs (shared by the scalar and SIMD paths).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowCtx<'a> {
    pub bits: u32,
    pub lattice_shift: u32,
    pub groups: usize,
    pub chunks_per_group: usize,
    pub chunk_bytes: usize,
    pub row_bytes: usize,
    pub data: &'a [u8],
    pub gscale_q: &'a [u16],
    pub zero_u8: &'a [u8],
    pub acc_lo: i64,
    pub acc_hi: i64,
    /// `[n]`: `sum_g gscale * L_g * 128 * 255`, a bound on every partial accumulator of the
    /// row; when it is `<= acc_hi` no group addition can saturate and the SIMD path may add
    /// the groups in any order (the result is the same exact sum).
    pub row_bound: &'a [u64],
    /// The largest of `row_bound`: when it proves no saturation, every row does (the GEMV
    /// then skips the per-row check and its stream).
    pub max_row_bound: u64,
    /// The GEMV quad copy: blocks per row (0 when there is none), metadata groups per row,
    /// bytes per row, the rows (then [`QUAD_SLACK`] zeros).
    pub quads: usize,
    pub quad_tail: usize,
    pub quad_meta: usize,
    pub quad_stride: usize,
    pub quad_data: &'a [u8],
}

/// A GEMM's tokens in the quad layout (`[t][128 quads + 32 tail]`) and their group sums in
/// pairs ([`s_pair_stride`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuadM<'a> {
    pub x: &'a [i8],
    pub s_pair: &'a [i32],
}

/// One token's activations in the GEMV quad layout (`128 * quads` codes) and its group sums
/// as `i16` (`|S| <= 32 * 128`), zero-padded to the tensor's `quad_meta` groups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuadX<'a> {
    pub x: &'a [i8],
    pub s: &'a [i16],
}

impl RowCtx<'_> {
    /// Whether no partial accumulator of `row` can reach the saturation range (N13).
    #[inline]
    pub fn no_saturation(&self, row: usize) -> bool {
        self.row_bound[row] <= self.acc_hi.unsigned_abs()
    }

    /// Whether no row can reach the saturation range ([`Self::no_saturation`] for every row).
    #[inline]
    pub fn no_saturation_all(&self) -> bool {
        self.max_row_bound <= self.acc_hi.unsigned_abs()
    }
}

impl RowCtx<'_> {
    /// N12-N13 for one row and one padded token, given the group's `P_code` sums.
    #[inline]
    pub fn accumulate(&self, row: usize, g: usize, p_code: i64, s: i32, acc: i64) -> i64 {
        let idx = row * self.groups + g;
        let g_i64 = (p_code << self.lattice_shift) - i64::from(self.zero_u8[idx]) * i64::from(s);
        (acc + i64::from(self.gscale_q[idx]) * g_i64).clamp(self.acc_lo, self.acc_hi)
    }
}

impl From<&QuantWeights> for PreparedWeights {
    fn from(w: &QuantWeights) -> Self {
        let format = w.format();
        let bits = format.bits() as usize;
        let (n_rows, k, group_len) = (w.n_rows(), w.k(), w.k_group_len());
        let groups = w.groups_per_row();
        let chunks_per_group = group_len.div_ceil(CHUNK);
        let chunk_bytes = CHUNK * bits / 8;
        let row_bytes = groups * chunks_per_group * chunk_bytes;
        let codes = w.codes();
        let mut data = vec![0u8; n_rows * row_bytes];
        let n_chunks = groups * chunks_per_group;
        let mut chunks = vec![[0u8; CHUNK]; n_chunks];
        let mut quad = QuadWeights::default();
        let mut quad_data = Vec::new();
        if bits == 2 && chunks_per_group == 1 && groups > 0 {
            quad.quads = groups / 4;
            quad.tail = groups % 4;
            quad.meta = groups.next_multiple_of(4);
            quad.stride = 32 * quad.quads + 8 * quad.tail + 3 * quad.meta;
            quad_data = vec![0u8; n_rows * quad.stride + QUAD_SLACK];
            for row in 0..n_rows {
                let at = row * quad.stride + 32 * quad.quads + 8 * quad.tail;
                let (gs, zero) = quad_data[at..at + 3 * quad.meta].split_at_mut(2 * quad.meta);
                for g in 0..groups {
                    gs[2 * g..2 * g + 2]
                        .copy_from_slice(&w.gscale_q()[row * groups + g].to_le_bytes());
                    zero[g] = w.zero_u8()[row * groups + g];
                }
            }
        }
        for (row, out_row) in data.chunks_exact_mut(row_bytes.max(1)).enumerate() {
            let codes_row = &codes[row * k..(row + 1) * k];
            for g in 0..groups {
                for c in 0..chunks_per_group {
                    let chunk = &mut chunks[g * chunks_per_group + c];
                    for (i, slot) in chunk.iter_mut().enumerate() {
                        let in_group = c * CHUNK + i;
                        let j = g * group_len + in_group;
                        *slot = if in_group < group_len && j < k {
                            codes_row[j]
                        } else {
                            0
                        };
                    }
                }
            }
            let blocked = if bits == 2 { block_chunks(n_chunks) } else { 0 };
            for (b, out) in out_row[..blocked * chunk_bytes]
                .chunks_exact_mut(4 * chunk_bytes)
                .enumerate()
            {
                let c = &chunks[4 * b..4 * b + 4];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = c[0][i] | (c[1][i] << 2) | (c[2][i] << 4) | (c[3][i] << 6);
                }
            }
            for (ci, chunk) in chunks.iter().enumerate().skip(blocked) {
                let at = ci * chunk_bytes;
                encode_chunk(chunk, bits, &mut out_row[at..at + chunk_bytes]);
            }
            if quad.stride > 0 {
                let at = row * quad.stride;
                let (quads, tail) = quad_data[at..at + 32 * quad.quads + 8 * quad.tail]
                    .split_at_mut(32 * quad.quads);
                for (q, out) in quads.chunks_exact_mut(32).enumerate() {
                    for (i, o) in out.iter_mut().enumerate() {
                        for c in 0..4 {
                            let (gq, e) = quad_source(c, i);
                            *o |= chunks[4 * q + gq][e] << (2 * c);
                        }
                    }
                }
                for (t, out) in tail.chunks_exact_mut(8).enumerate() {
                    encode_chunk(&chunks[4 * quad.quads + t], 2, out);
                }
            }
        }
        let row_bound: Vec<u64> = (0..n_rows)
            .map(|row| {
                (0..groups)
                    .map(|g| {
                        let len = (group_len.min(k - g * group_len)) as u64;
                        u64::from(w.gscale_q()[row * groups + g]) * len * 128 * 255
                    })
                    .sum()
            })
            .collect();
        quad.data = Bytes::new(quad_data);
        PreparedWeights {
            max_row_bound: row_bound.iter().copied().max().unwrap_or(0),
            row_bound,
            format,
            n_rows,
            k,
            group_len,
            groups,
            chunks_per_group,
            chunk_bytes,
            row_bytes,
            w_scale_bits: w.w_scale_bits(),
            data: Bytes::new(data),
            gscale_q: w.gscale_q().to_vec(),
            zero_u8: w.zero_u8().to_vec(),
            row_scale: w.row_scale().to_vec(),
            quad,
        }
    }
}

/// Token stride of the transposed group sums `s_tr` (`[g][t]`, GEMM): `m` rounded up to 4, so
/// a 4-token `i64` vector load at any token block start stays in the buffer.
#[inline]
pub(crate) fn s_tr_stride(m_tokens: usize) -> usize {
    m_tokens.next_multiple_of(4)
}

/// Token stride of the paired group sums `s_pair` (GEMM, quad path): `m` rounded up to 8, so an
/// 8-token `i32` vector load at any tile start stays in the buffer.
#[inline]
pub(crate) fn s_pair_stride(m_tokens: usize) -> usize {
    m_tokens.next_multiple_of(TOK_TILE)
}

/// Tokens a tile of the token-major VNNI GEMM ([`tok_permute`]): the 16 `i32` lanes of a
/// 512-bit vector.
pub(crate) const TOK_TILE: usize = 16;

/// The longest padded row (`32 * groups` codes) the token-major VNNI GEMM takes (its row
/// panel is on the stack); longer rows take the AVX2 quad GEMM.
pub(crate) const TOK_MAX_K: usize = 4096;

/// Whether a W2 / ternary tensor with `groups` groups of one chunk runs its GEMM token-major
/// on [`Isa::Avx512Vnni`] (else on the AVX2 quad GEMM).
#[inline]
pub(crate) fn tok_layout(groups: usize) -> bool {
    32 * groups <= TOK_MAX_K
}

/// The GEMM's padded tokens `xp` (`m` rows of `plen` codes) token-major for the VNNI GEMM:
/// tile `j` (tokens `16 j..16 j + 16`), four-code step `c` (codes `4 c..4 c + 4` of each
/// token) is 64 bytes at `(j * plen / 4 + c) * 64`, lane `l` holding token `16 j + l`'s four
/// codes (zeros for tokens past `m`). `out` is `m.next_multiple_of(16) * plen` codes.
pub(crate) fn tok_permute(xp: &[i8], m: usize, plen: usize, out: &mut [i8]) {
    assert!(plen.is_multiple_of(4) && xp.len() >= m * plen);
    let m16 = m.next_multiple_of(TOK_TILE);
    assert_eq!(out.len(), m16 * plen, "token-major layout length");
    let steps = plen / 4;
    for (j, tile) in out.chunks_exact_mut(TOK_TILE * plen).enumerate() {
        for l in 0..TOK_TILE {
            let t = TOK_TILE * j + l;
            for c in 0..steps {
                let dst = &mut tile[64 * c + 4 * l..64 * c + 4 * l + 4];
                if t < m {
                    dst.copy_from_slice(&xp[t * plen + 4 * c..t * plen + 4 * c + 4]);
                } else {
                    dst.fill(0);
                }
            }
        }
    }
}

/// The GEMV quad layout (module docs): byte `i` of virtual chunk `c` (0..4) of a quad holds
/// element `e` of the quad's group `gq` (0..4), returned as `(gq, e)`. Byte pairs (`i16` lanes
/// of `vpmaddubsw`) stay within one group: lane `j = i / 2` belongs to group `j % 4`.
#[inline]
pub(crate) fn quad_source(c: usize, i: usize) -> (usize, usize) {
    let j = i / 2;
    (j % 4, 8 * c + 2 * (j / 4) + i % 2)
}

/// One padded token `xp` (one chunk a group, `groups * 32` codes) in the quad layout: pair `j`
/// of virtual chunk `c` of quad `q` is pair `4c + j / 4` of group `4q + j % 4` ([`quad_source`]);
/// the `groups % 4` tail groups' chunks follow in their own order. `out` is `128 * quads + 32 *
/// tail` codes.
pub(crate) fn quad_permute(xp: &[i8], quads: usize, out: &mut [i8]) {
    assert_eq!(out.len(), xp.len(), "quad layout length");
    let (xq, xt) = out.split_at_mut(128 * quads);
    for (q, xq) in xq.chunks_exact_mut(128).enumerate() {
        for (c, xc) in xq.chunks_exact_mut(32).enumerate() {
            for (j, pair) in xc.chunks_exact_mut(2).enumerate() {
                let e = (4 * q + j % 4) * CHUNK + 8 * c + 2 * (j / 4);
                pair.copy_from_slice(&xp[e..e + 2]);
            }
        }
    }
    xt.copy_from_slice(&xp[128 * quads..]);
}

/// W2 and ternary: how many of a row's `n_chunks` chunks are stored in blocks of four (the
/// rest, `n_chunks % 4`, as single 8-byte chunks; see the module docs).
#[inline]
pub(crate) fn block_chunks(n_chunks: usize) -> usize {
    n_chunks / 4 * 4
}

fn encode_chunk(c: &[u8; CHUNK], bits: usize, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(c),
        4 => {
            for i in 0..16 {
                out[i] = c[i] | (c[16 + i] << 4);
            }
        }
        2 => {
            for i in 0..8 {
                out[i] = c[i] | (c[8 + i] << 2) | (c[16 + i] << 4) | (c[24 + i] << 6);
            }
        }
        _ => unreachable!("weight formats have 2, 4 or 8 bits"),
    }
}

impl PreparedWeights {
    /// The rows of `parts` stacked into one tensor (e.g. the Q, K and V projections, which read
    /// the same activations), so one call computes them all: every row is computed exactly as in
    /// its own tensor. `None` when the parts differ in format, `k`, group length or scale width.
    #[must_use]
    pub fn concat_rows(parts: &[&PreparedWeights]) -> Option<PreparedWeights> {
        let first = *parts.first()?;
        if parts.iter().any(|p| {
            p.format != first.format
                || p.k != first.k
                || p.group_len != first.group_len
                || p.w_scale_bits != first.w_scale_bits
        }) {
            return None;
        }
        let mut out = first.clone();
        let mut data = first.data.to_vec();
        let mut quad_data = first.quad.data.to_vec();
        for p in &parts[1..] {
            out.n_rows += p.n_rows;
            data.extend_from_slice(&p.data);
            out.gscale_q.extend_from_slice(&p.gscale_q);
            out.zero_u8.extend_from_slice(&p.zero_u8);
            out.row_scale.extend_from_slice(&p.row_scale);
            out.row_bound.extend_from_slice(&p.row_bound);
            out.max_row_bound = out.max_row_bound.max(p.max_row_bound);
            // Same format, k and group length, so the same quad shape; the slack stays at the
            // end.
            if out.quad.stride > 0 {
                quad_data.truncate((out.n_rows - p.n_rows) * out.quad.stride);
                quad_data.extend_from_slice(&p.quad.data);
            }
        }
        out.data = Bytes::new(data);
        out.quad.data = Bytes::new(quad_data);
        Some(out)
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
        self.group_len
    }
    /// `[n]` per-row `f32` scales (N9), for dequantization (N20).
    #[must_use]
    pub fn row_scale(&self) -> &[f32] {
        &self.row_scale
    }
    /// Bytes the kernels stream per call: re-packed codes plus group metadata (3 bytes a group).
    #[must_use]
    pub fn weight_bytes(&self) -> usize {
        self.data.len() + 3 * self.gscale_q.len()
    }
    /// Padded activation length: `groups * chunks_per_group * 32`.
    #[must_use]
    pub fn padded_len(&self) -> usize {
        self.groups * self.chunks_per_group * CHUNK
    }

    fn row_ctx(&self, acc_bits: u32) -> RowCtx<'_> {
        RowCtx {
            bits: self.format.bits(),
            lattice_shift: self.format.lattice_shift(),
            groups: self.groups,
            chunks_per_group: self.chunks_per_group,
            chunk_bytes: self.chunk_bytes,
            row_bytes: self.row_bytes,
            data: &self.data,
            gscale_q: &self.gscale_q,
            zero_u8: &self.zero_u8,
            acc_lo: min_signed(acc_bits),
            acc_hi: max_signed(acc_bits),
            row_bound: &self.row_bound,
            max_row_bound: self.max_row_bound,
            quads: self.quad.quads,
            quad_tail: self.quad.tail,
            quad_meta: self.quad.meta,
            quad_stride: self.quad.stride,
            quad_data: &self.quad.data,
        }
    }

    /// One padded token `xp` with group sums `s` in the GEMV quad layout (`scratch.x_quad`,
    /// `scratch.s_quad`): pair `j` of virtual chunk `c` of quad `q` is pair `4c + j / 4` of group
    /// `4q + j % 4` ([`quad_source`]); groups past the row are zeros.
    fn quad_activations(&self, scratch: &mut Scratch) {
        let groups = self.groups;
        let (xp, sp) = (&scratch.x_pad, &scratch.s_sum);
        quad_permute(
            &xp[..groups * CHUNK],
            self.quad.quads,
            &mut scratch.x_quad[..self.quad.x_len()],
        );
        let sq = &mut scratch.s_quad[..self.quad.meta.next_multiple_of(16)];
        for (g, v) in sq.iter_mut().enumerate() {
            // |S| <= 32 * 128 (one chunk a group): exact in i16.
            *v = if g < groups { sp[g] as i16 } else { 0 };
        }
    }

    /// The GEMM's tokens in the quad layout and their paired group sums (filled by
    /// `pad_activations`), or none.
    fn quad_tokens<'s>(
        &self,
        x_quad_m: &'s [i8],
        s_pair: &'s [i32],
        m_tokens: usize,
    ) -> Option<QuadM<'s>> {
        let on = GEMM_QUAD.load(std::sync::atomic::Ordering::Relaxed);
        (on && self.quad.stride > 0).then(|| QuadM {
            x: &x_quad_m[..m_tokens.next_multiple_of(TOK_TILE) * self.quad.x_len()],
            s_pair: &s_pair[..self.groups.div_ceil(2) * s_pair_stride(m_tokens)],
        })
    }

    fn check(
        &self,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        out: usize,
    ) -> Result<(), OpError> {
        if !(ACC_BITS_MIN..=ACC_BITS_MAX).contains(&dp.acc_bits) {
            return Err(OpError::AccBits {
                acc_bits: dp.acc_bits,
            });
        }
        if m_tokens == 0 {
            return Err(OpError::ZeroSize { what: "tokens M" });
        }
        if dp.w_group_len != self.group_len {
            return Err(OpError::DatapathMismatch {
                what: "w_group_len",
                datapath: dp.w_group_len,
                tensor: self.group_len,
            });
        }
        if dp.w_scale_bits != self.w_scale_bits {
            return Err(OpError::DatapathMismatch {
                what: "w_scale_bits",
                datapath: dp.w_scale_bits as usize,
                tensor: self.w_scale_bits as usize,
            });
        }
        if x_i8.len() != m_tokens * self.k {
            return Err(OpError::Shape {
                what: "activation codes",
                expected: m_tokens * self.k,
                got: x_i8.len(),
            });
        }
        if out != m_tokens * self.n_rows {
            return Err(OpError::Shape {
                what: "output",
                expected: m_tokens * self.n_rows,
                got: out,
            });
        }
        Ok(())
    }

    /// Copies token rows into the padded layout and computes `S[t][g]` (N12).
    /// `isa` is the effective path: on [`Isa::Avx512Vnni`] a GEMM's tokens go token-major
    /// ([`tok_permute`]) when the rows are short enough ([`tok_layout`]), else into the quad
    /// layout.
    fn pad_activations(&self, x_i8: &[i8], m_tokens: usize, scratch: &mut Scratch, isa: Isa) {
        self.pad_activations_on(None, x_i8, m_tokens, scratch, isa);
    }

    /// The kernels' copies of `m_tokens` activation rows: padded rows (`x_pad`), group sums
    /// (`s_sum`), and for a GEMM the tokens in the quad or token-major layout (`x_quad_m`), the
    /// paired sums (`s_pair`) and the transposed ones (`s_tr`). A GEMM's are made by tiles of
    /// [`TOK_TILE`] tokens, each tile writing only its own tokens' elements (and its columns'
    /// entries past `m_tokens` as zeros), on `team` when the caller leads it, else in order:
    /// the same bytes either way.
    fn pad_activations_on(
        &self,
        team: Option<&Team>,
        x_i8: &[i8],
        m_tokens: usize,
        scratch: &mut Scratch,
        isa: Isa,
    ) {
        scratch.reserve(self, m_tokens);
        if m_tokens == 1 {
            let mut bufs = PadBufs::of(scratch);
            // SAFETY: the buffers were reserved for one token above; one tile, one thread.
            #[allow(unsafe_code)]
            unsafe {
                self.pad_tile(x_i8, 1, 0, isa, &mut bufs);
            }
            return;
        }
        let tiles = m_tokens.div_ceil(TOK_TILE);
        let bufs = PadBufs::of(scratch);
        let one = |j: usize| {
            let mut b = bufs;
            // SAFETY: the buffers were reserved for `m_tokens` above and stay borrowed (through
            // `bufs`) until every tile is done; tile `j` writes only its own tokens' elements,
            // and each tile index runs once (`for_each` or the loop below).
            #[allow(unsafe_code)]
            unsafe {
                self.pad_tile(x_i8, m_tokens, j, isa, &mut b);
            }
        };
        match team.filter(|t| t.is_leading() && t.threads() > 1 && tiles > 1) {
            Some(team) => team.for_each(tiles, |j, _| one(j)),
            None => (0..tiles).for_each(one),
        }
    }

    /// Tile `j` (tokens `16 j..min(16 j + 16, m)`) of [`Self::pad_activations_on`].
    ///
    /// # Safety
    /// `b` points into a [`Scratch`] reserved for `m` tokens of this tensor, and no other
    /// thread reads or writes tile `j`'s elements meanwhile.
    #[allow(unsafe_code)]
    unsafe fn pad_tile(&self, x_i8: &[i8], m: usize, j: usize, isa: Isa, b: &mut PadBufs) {
        let plen = self.padded_len();
        let lp = self.chunks_per_group * CHUNK;
        let groups = self.groups;
        let t0 = j * TOK_TILE;
        let t1 = (t0 + TOK_TILE).min(m);
        for t in t0..t1 {
            let x = &x_i8[t * self.k..(t + 1) * self.k];
            // SAFETY: token t's padded row and group sums (t < m, reserved), this tile's own.
            let (xp, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(b.x_pad.at(t * plen), plen),
                    std::slice::from_raw_parts_mut(b.s_sum.at(t * groups), groups),
                )
            };
            for g in 0..groups {
                let src = &x[g * self.group_len..((g + 1) * self.group_len).min(self.k)];
                let dst = &mut xp[g * lp..(g + 1) * lp];
                dst[..src.len()].copy_from_slice(src);
                dst[src.len()..].fill(0);
                s[g] = src.iter().map(|&v| i32::from(v)).sum();
            }
        }
        if m == 1 {
            return;
        }
        // The tile's padded rows and sums, written above by this task.
        // SAFETY: tokens t0..t1 of both buffers (reserved), this tile's own.
        let (xp, ss) = unsafe {
            (
                std::slice::from_raw_parts(b.x_pad.at(t0 * plen).cast_const(), (t1 - t0) * plen),
                std::slice::from_raw_parts(
                    b.s_sum.at(t0 * groups).cast_const(),
                    (t1 - t0) * groups,
                ),
            )
        };
        let sum = |t: usize, g: usize| -> i32 {
            if t < t1 && g < groups {
                ss[(t - t0) * groups + g]
            } else {
                0
            }
        };
        if self.quad.stride > 0 {
            let xl = self.quad.x_len();
            if isa == Isa::Avx512Vnni && tok_layout(groups) {
                // SAFETY: tile j of the token-major copy (`TOK_TILE * plen` codes, reserved
                // for `m.next_multiple_of(TOK_TILE)` tokens), this tile's own.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        b.x_quad_m.at(j * TOK_TILE * plen),
                        TOK_TILE * plen,
                    )
                };
                tok_permute(xp, t1 - t0, plen, out);
            } else {
                for t in t0..t1 {
                    // SAFETY: token t's quad copy (reserved), this tile's own.
                    let out = unsafe { std::slice::from_raw_parts_mut(b.x_quad_m.at(t * xl), xl) };
                    quad_permute(
                        &xp[(t - t0) * plen..(t - t0 + 1) * plen],
                        self.quad.quads,
                        out,
                    );
                }
            }
            let stride = s_pair_stride(m);
            for p in 0..groups.div_ceil(2) {
                for t in t0..t0 + TOK_TILE {
                    // |S| <= 32 * 128 (one chunk a group): exact in i16.
                    let half = |g: usize| u32::from(sum(t, g) as i16 as u16);
                    let v = (half(2 * p) | (half(2 * p + 1) << 16)) as i32;
                    // SAFETY: entry t of pair p's column (t < stride = m rounded up to a
                    // tile), this tile's own.
                    unsafe { *b.s_pair.at(p * stride + t) = v };
                }
            }
        }
        let stride = s_tr_stride(m);
        for g in 0..groups {
            for t in t0..(t0 + TOK_TILE).min(stride) {
                // SAFETY: entry t of group g's column (t < stride), this tile's own.
                unsafe { *b.s_tr.at(g * stride + t) = i64::from(sum(t, g)) };
            }
        }
    }

    /// N12-N13: the saturated accumulators `acc[t][n]` (row-major `[t][n]`) of `m_tokens`
    /// activation rows `x_i8` (`[t][k]`), exactly `golden::ops::weight_acc`. GEMV is
    /// `m_tokens = 1`. Runs on the current rayon pool (install a pool to pin the thread count).
    ///
    /// `isa` must be available ([`Isa::is_available`]); an unavailable path runs as
    /// [`Isa::Scalar`].
    pub fn gemm_acc(
        &self,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        scratch: &mut Scratch,
        acc_out: &mut [i64],
    ) -> Result<(), OpError> {
        self.gemm_acc_in(None, isa, dp, x_i8, m_tokens, scratch, acc_out)
    }

    /// As [`Self::gemm_acc`]; a GEMV (`m_tokens = 1`) whose caller leads `team`
    /// ([`Team::lead`]) spreads its rows over the team instead of rayon (the same integers:
    /// each row is computed by the same kernel whichever thread runs it).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_acc_in(
        &self,
        team: Option<&Team>,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        scratch: &mut Scratch,
        acc_out: &mut [i64],
    ) -> Result<(), OpError> {
        self.check(dp, x_i8, m_tokens, acc_out.len())?;
        let isa = self.effective_isa(isa);
        self.pad_activations_on(team, x_i8, m_tokens, scratch, isa);
        let ctx = self.row_ctx(dp.acc_bits);
        let plen = self.padded_len();
        let groups = self.groups;
        let rows_per_task = MIN_ROWS_PER_TASK.max(self.n_rows / (4 * rayon::current_num_threads()));
        // Small operations run on the calling thread: splitting them costs more than it saves.
        let sequential = self.n_rows * plen * m_tokens < PAR_MIN_MACS;
        if m_tokens == 1 {
            self.gemv_tasks(team, isa, &ctx, scratch, acc_out, &|_, _| {});
            return Ok(());
        }
        let xp = &scratch.x_pad[..m_tokens * plen];
        let xq = self.quad_tokens(&scratch.x_quad_m, &scratch.s_pair, m_tokens);
        let s = &scratch.s_sum[..m_tokens * groups];
        let s_tr = &scratch.s_tr[..groups * s_tr_stride(m_tokens)];
        let acc_nt = &mut scratch.acc_nt[..m_tokens * self.n_rows];
        let out = OutPtr(acc_out.as_mut_ptr());
        let n_rows = self.n_rows;
        // Rows `row0..row0 + block.len() / m` for all tokens, by sub-blocks of TRANSPOSE_ROWS
        // rows computed into `block` (`[row][t]`) and written to `acc_out` (`[t][n]`) while
        // still in L1.
        // Only the first sub-block of `block` is used, again and again, so it stays in cache.
        let run = |row0: usize, block: &mut [i64]| {
            let block_rows = block.len() / m_tokens;
            for b0 in (0..block_rows).step_by(TRANSPOSE_ROWS) {
                let rows = TRANSPOSE_ROWS.min(block_rows - b0);
                let r0 = row0 + b0;
                let sub = &mut block[..rows * m_tokens];
                rows_many_tokens(isa, &ctx, r0, m_tokens, plen, xp, xq, s, s_tr, sub);
                for t in 0..m_tokens {
                    // SAFETY: rows r0..r0 + rows of token t lie inside `acc_out` (checked length
                    // m_tokens * n_rows); tasks own disjoint row ranges, so no two tasks write
                    // the same element and nothing reads `acc_out` meanwhile.
                    #[allow(unsafe_code)]
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out.at(t * n_rows + r0), rows) };
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = sub[i * m_tokens + t];
                    }
                }
            }
        };
        if sequential {
            run(0, acc_nt);
        } else {
            acc_nt
                .par_chunks_mut(rows_per_task * m_tokens)
                .enumerate()
                .for_each(|(task, block)| run(task * rows_per_task, block));
        }
        Ok(())
    }

    /// GEMV (`m_tokens = 1`) on the process-wide path [`Isa::selected`]: `acc_out[n]`.
    pub fn gemv_acc(
        &self,
        dp: &Datapath,
        x_i8: &[i8],
        scratch: &mut Scratch,
        acc_out: &mut [i64],
    ) -> Result<(), OpError> {
        self.gemm_acc(Isa::selected(), dp, x_i8, 1, scratch, acc_out)
    }

    /// N12-N14: `y[t][n]` (row-major), exactly `golden::ops::weight_op`. `acc` is scratch of
    /// `m_tokens * n_rows` accumulators (returned filled).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        stage: &OutputStage,
        scratch: &mut Scratch,
        acc: &mut [i64],
        y_out: &mut [i32],
    ) -> Result<(), OpError> {
        stage.check()?;
        self.gemm_acc(isa, dp, x_i8, m_tokens, scratch, acc)?;
        apply_stage(stage, acc, y_out)
    }

    /// The one-token product's row tasks (after `pad_activations`): rows of `acc_out` on the
    /// calling thread (small products), as guided tasks of a `team` the caller leads, or as
    /// rayon tasks; each task then calls `after(row0, acc)` with its rows' accumulators (on the
    /// thread that ran it, while they are in L1).
    fn gemv_tasks(
        &self,
        team: Option<&Team>,
        isa: Isa,
        ctx: &RowCtx<'_>,
        scratch: &mut Scratch,
        acc_out: &mut [i64],
        after: &(dyn Fn(usize, &[i64]) + Sync),
    ) {
        assert_eq!(acc_out.len(), self.n_rows, "GEMV output length");
        let plen = self.padded_len();
        let groups = self.groups;
        let use_quad = isa.has_avx2() && self.quad.stride > 0;
        if use_quad {
            self.quad_activations(scratch);
        }
        let qx = use_quad.then(|| QuadX {
            x: &scratch.x_quad[..self.quad.x_len()],
            s: &scratch.s_quad[..self.quad.meta.next_multiple_of(16)],
        });
        let xp = &scratch.x_pad[..plen];
        let s = &scratch.s_sum[..groups];
        if self.n_rows * plen < PAR_MIN_MACS {
            rows_one_token(isa, ctx, 0, xp, s, qx, acc_out);
            after(0, acc_out);
            return;
        }
        if let Some(team) = team.filter(|t| t.is_leading() && t.threads() > 1) {
            let mut b = [0usize; TEAM_MAX_TASKS + 1];
            let tasks = guided_bounds(self.n_rows, team.threads(), &mut b);
            let out = OutPtr(acc_out.as_mut_ptr());
            team.for_each(tasks, |task, _| {
                let (r0, r1) = (b[task], b[task + 1]);
                // SAFETY: rows r0..r1 lie inside `acc_out` (b is increasing and ends at
                // n_rows = acc_out.len(), asserted); `for_each` runs each task index once,
                // so the ranges of the tasks are disjoint, and `acc_out` stays mutably
                // borrowed (nothing else reads or writes it) until every task has finished.
                #[allow(unsafe_code)]
                let out = unsafe { std::slice::from_raw_parts_mut(out.at(r0), r1 - r0) };
                rows_one_token(isa, ctx, r0, xp, s, qx, out);
                after(r0, out);
            });
            return;
        }
        let rows_per_task = MIN_ROWS_PER_TASK.max(self.n_rows / (4 * rayon::current_num_threads()));
        acc_out
            .par_chunks_mut(rows_per_task)
            .enumerate()
            .for_each(|(task, out)| {
                rows_one_token(isa, ctx, task * rows_per_task, xp, s, qx, out);
                after(task * rows_per_task, out);
            });
    }

    /// The one-token [`Self::gemm_epilogue`] on a decode `team` (when the caller leads it; else
    /// as [`Self::gemm_acc_in`] without one): each GEMV task applies the N14 `stage` to its own
    /// rows and hands them to `epi(0, row, y, out)` (split at the parts of `outs`, at most
    /// [`MAX_PARTS`]), so neither the stage nor the caller's N20 runs on one thread after the
    /// product. Allocates nothing once `scratch` has grown to the tensor.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_epilogue_in<T, F>(
        &self,
        team: Option<&Team>,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut Scratch,
        outs: &mut [&mut [T]],
        epi: F,
    ) -> Result<(), OpError>
    where
        T: Send,
        F: Fn(usize, usize, &[i32], &mut [T]) + Sync,
    {
        stage.check()?;
        let total: usize = outs.iter().map(|o| o.len()).sum();
        self.check(dp, x_i8, 1, total)?;
        let parts = Parts::new(outs, 1)?;
        let isa = self.effective_isa(isa);
        self.pad_activations(x_i8, 1, scratch, isa);
        let ctx = self.row_ctx(dp.acc_bits);
        if scratch.gemv_acc.len() < self.n_rows {
            scratch.gemv_acc.resize(self.n_rows, 0);
            scratch.gemv_y.resize(self.n_rows, 0);
        }
        // Moved out for the call (no allocation): the tasks write disjoint rows of both.
        let mut acc = std::mem::take(&mut scratch.gemv_acc);
        let mut y = std::mem::take(&mut scratch.gemv_y);
        let y_ptr = OutPtr(y.as_mut_ptr());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let after = |r0: usize, a: &[i64]| {
            assert!(r0 + a.len() <= self.n_rows, "task rows inside the tensor");
            // SAFETY: rows r0..r0 + a.len() lie inside `y` (n_rows long or more, asserted);
            // each row belongs to one task (gemv_tasks), so no two tasks touch the same
            // element, and `y` is not otherwise used until gemv_tasks returns.
            #[allow(unsafe_code)]
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.at(r0), a.len()) };
            if apply_stage(stage, a, yr).is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            parts.emit(0, r0, yr, &epi);
        };
        self.gemv_tasks(team, isa, &ctx, scratch, &mut acc[..self.n_rows], &after);
        scratch.gemv_acc = acc;
        scratch.gemv_y = y;
        if failed.into_inner() {
            // The stage was checked above: not reached.
            return Err(OpError::Shape {
                what: "stage output",
                expected: self.n_rows,
                got: 0,
            });
        }
        Ok(())
    }

    /// N12-N14 with a caller's epilogue (e.g. N20 dequantization), exactly
    /// `golden::ops::weight_op` followed by `epi`: for every token `t` and run of rows
    /// `row..row + y.len()` (within one output part), `epi(t, row, y, out)` gets the N14 outputs
    /// `y[i] = y[t][row + i]` and the part's elements `out[i]` of token `t`, row `row + i`.
    ///
    /// The output is `outs`, parts of consecutive rows (`outs[p]` is `[t][np]`, the parts' `np`
    /// summing to the tensor's rows; e.g. the Q, K and V of a [`Self::concat_rows`] tensor). For
    /// `m_tokens > 1` every GEMM sub-block of `TRANSPOSE_ROWS` rows goes from the kernel's `i64`
    /// accumulators through the stage while it is in L1, into a `[t][row]` buffer of
    /// `EPILOGUE_ROWS` rows whose token runs then go to `epi`, in the same rayon tasks as the
    /// GEMM (no `[t][n]` accumulator pass); one token is [`Self::gemv_epilogue_in`] without a
    /// team (the stage and `epi` in each GEMV task). At most [`MAX_PARTS`] parts.
    ///
    /// `isa` as in [`Self::gemm_acc`]. Runs on the current rayon pool; `epi` may be called from
    /// any of its threads, in any order.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_epilogue<T, F>(
        &self,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        stage: &OutputStage,
        scratch: &mut Scratch,
        outs: &mut [&mut [T]],
        epi: F,
    ) -> Result<(), OpError>
    where
        T: Send,
        F: Fn(usize, usize, &[i32], &mut [T]) + Sync,
    {
        self.gemm_epilogue_in(None, isa, dp, x_i8, m_tokens, stage, scratch, outs, epi)
    }

    /// As [`Self::gemm_epilogue`]; when the caller leads `team` ([`Team::lead`]) the tasks
    /// (GEMM row blocks, or the GEMV's rows for one token) run on the team instead of rayon:
    /// the same tasks, so the same integers, without waking rayon's sleeping workers.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_epilogue_in<T, F>(
        &self,
        team: Option<&Team>,
        isa: Isa,
        dp: &Datapath,
        x_i8: &[i8],
        m_tokens: usize,
        stage: &OutputStage,
        scratch: &mut Scratch,
        outs: &mut [&mut [T]],
        epi: F,
    ) -> Result<(), OpError>
    where
        T: Send,
        F: Fn(usize, usize, &[i32], &mut [T]) + Sync,
    {
        if m_tokens == 1 {
            // The GEMV path, allocating nothing.
            return self.gemv_epilogue_in(team, isa, dp, x_i8, stage, scratch, outs, epi);
        }
        stage.check()?;
        let total: usize = outs.iter().map(|o| o.len()).sum();
        self.check(dp, x_i8, m_tokens, total)?;
        let parts = Parts::new(outs, m_tokens)?;
        // Token `t`'s N14 outputs `y` of rows `row..row + y.len()`, split at the part boundaries.
        let emit = |t: usize, row: usize, y: &[i32]| parts.emit(t, row, y, &epi);
        let isa = self.effective_isa(isa);
        self.pad_activations_on(team, x_i8, m_tokens, scratch, isa);
        let ctx = self.row_ctx(dp.acc_bits);
        let plen = self.padded_len();
        let groups = self.groups;
        let rows_per_task = MIN_ROWS_PER_TASK.max(self.n_rows / (4 * rayon::current_num_threads()));
        let tasks = self.n_rows.div_ceil(rows_per_task);
        let sub_len = TRANSPOSE_ROWS * m_tokens;
        // Per task: the stage's `[row][t]` outputs of a sub-block, then `[t][EPILOGUE_ROWS]`.
        let task_len = sub_len + EPILOGUE_ROWS * m_tokens;
        if scratch.y_sub.len() < tasks * task_len {
            scratch.y_sub.resize(tasks * task_len, 0);
        }
        let sequential = self.n_rows * plen * m_tokens < PAR_MIN_MACS;
        // The weight-lattice stage's shift and N3 bounds (see `stage_unchecked`).
        let lattice = (stage.out_mult == 1 && (1..=61).contains(&stage.out_shift)).then(|| {
            (
                stage.out_shift,
                min_signed(stage.out_bits),
                max_signed(stage.out_bits),
            )
        });
        let xp = &scratch.x_pad[..m_tokens * plen];
        let xq = self.quad_tokens(&scratch.x_quad_m, &scratch.s_pair, m_tokens);
        let s = &scratch.s_sum[..m_tokens * groups];
        let s_tr = &scratch.s_tr[..groups * s_tr_stride(m_tokens)];
        let acc_nt = &mut scratch.acc_nt[..m_tokens * self.n_rows];
        let y_sub = &mut scratch.y_sub[..tasks * task_len];
        // Rows `row0..row0 + block.len() / m` by sub-blocks of TRANSPOSE_ROWS rows: the kernel
        // writes `[row][t]` accumulators into the start of `block`, the stage makes `ysub`, and
        // each token's outputs are gathered and emitted (all in L1).
        let run = |row0: usize, block: &mut [i64], ysub: &mut [i32]| {
            let block_rows = block.len() / m_tokens;
            let (ys, yt) = ysub.split_at_mut(sub_len);
            for e0 in (0..block_rows).step_by(EPILOGUE_ROWS) {
                let erows = EPILOGUE_ROWS.min(block_rows - e0);
                for b0 in (e0..e0 + erows).step_by(TRANSPOSE_ROWS) {
                    let rows = TRANSPOSE_ROWS.min(e0 + erows - b0);
                    let sub = &mut block[..rows * m_tokens];
                    rows_many_tokens(isa, &ctx, row0 + b0, m_tokens, plen, xp, xq, s, s_tr, sub);
                    // The stage into `yt` (`[t][EPILOGUE_ROWS]`; contiguous reads, writes
                    // within L1/L2): the lattice stage inline when every accumulator allows it
                    // (as in `stage_unchecked`), else `stage_unchecked` and a transposition.
                    let c0 = b0 - e0;
                    // The kernels' accumulators are N13's, saturated to `acc_bits <= 48`
                    // (checked above): always below 2^62, so no scan of `sub` is needed.
                    debug_assert!(below_2_62(sub));
                    if let Some((sh, lo, hi)) = lattice {
                        if isa.has_avx2() {
                            let yt = &mut yt[c0..];
                            crate::avx2::stage_transpose(
                                isa == Isa::Avx512Vnni,
                                sub,
                                rows,
                                m_tokens,
                                sh,
                                lo,
                                hi,
                                yt,
                                EPILOGUE_ROWS,
                            );
                            continue;
                        }
                        for (i, ar) in sub.chunks_exact(m_tokens).enumerate() {
                            for (t, &a) in ar.iter().enumerate() {
                                yt[t * EPILOGUE_ROWS + c0 + i] = stage_shift_one(a, sh, lo, hi);
                            }
                        }
                    } else {
                        let ys = &mut ys[..rows * m_tokens];
                        stage_unchecked(stage, sub, ys);
                        for (i, yr) in ys.chunks_exact(m_tokens).enumerate() {
                            for (t, &v) in yr.iter().enumerate() {
                                yt[t * EPILOGUE_ROWS + c0 + i] = v;
                            }
                        }
                    }
                }
                for (t, y) in yt.chunks_exact(EPILOGUE_ROWS).enumerate() {
                    emit(t, row0 + e0, &y[..erows]);
                }
            }
        };
        if sequential {
            acc_nt
                .chunks_mut(rows_per_task * m_tokens)
                .zip(y_sub.chunks_mut(task_len))
                .enumerate()
                .for_each(|(task, (block, ysub))| run(task * rows_per_task, block, ysub));
        } else if let Some(team) = team.filter(|t| t.is_leading() && t.threads() > 1) {
            let block_len = rows_per_task * m_tokens;
            let (acc_p, y_p) = (OutPtr(acc_nt.as_mut_ptr()), OutPtr(y_sub.as_mut_ptr()));
            let (acc_len, y_len) = (acc_nt.len(), y_sub.len());
            team.for_each(tasks, |task, _| {
                let a0 = task * block_len;
                let a1 = (a0 + block_len).min(acc_len);
                let y0 = task * task_len;
                assert!(
                    a0 < a1 && y0 + task_len <= y_len,
                    "GEMM task inside its buffers"
                );
                // SAFETY: task `task`'s chunks of `acc_nt` (`block_len` elements, the last one
                // shorter) and of `y_sub` (`task_len`) are inside them (asserted) and are the
                // chunks the rayon path hands to that task: `for_each` runs each index once,
                // so no two tasks share an element, and both buffers stay mutably borrowed
                // (unused elsewhere) until every task has finished.
                #[allow(unsafe_code)]
                let (block, ysub) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(acc_p.at(a0), a1 - a0),
                        std::slice::from_raw_parts_mut(y_p.at(y0), task_len),
                    )
                };
                run(task * rows_per_task, block, ysub);
            });
        } else {
            acc_nt
                .par_chunks_mut(rows_per_task * m_tokens)
                .zip(y_sub.par_chunks_mut(task_len))
                .enumerate()
                .for_each(|(task, (block, ysub))| run(task * rows_per_task, block, ysub));
        }
        Ok(())
    }

    fn effective_isa(&self, isa: Isa) -> Isa {
        if isa.has_avx2() && isa.is_available() && self.chunks_per_group * CHUNK <= SIMD_MAX_GROUP {
            isa
        } else {
            Isa::Scalar
        }
    }
}

/// N14 on every accumulator: `y = sat(round_shift(acc * out_mult, out_shift), out_bits)`, exactly
/// `OutputStage::apply` (`out_bits <= 32`, so `y` fits `i32`).
pub fn apply_stage(stage: &OutputStage, acc: &[i64], y_out: &mut [i32]) -> Result<(), OpError> {
    stage.check()?;
    if acc.len() != y_out.len() {
        return Err(OpError::Shape {
            what: "output stage output",
            expected: acc.len(),
            got: y_out.len(),
        });
    }
    stage_unchecked(stage, acc, y_out);
    Ok(())
}

/// [`apply_stage`]'s work for a checked stage and `acc.len() == y_out.len()`.
fn stage_unchecked(stage: &OutputStage, acc: &[i64], y_out: &mut [i32]) {
    // N3 bounds of `out_bits` (<= 32, so they fit i32), computed once per call.
    let (lo, hi) = (min_signed(stage.out_bits), max_signed(stage.out_bits));
    if stage.out_mult == 1 && stage.out_shift == 0 {
        // The identity stage (the runtime's KV stage): only the N3 saturation remains.
        for (y, &a) in y_out.iter_mut().zip(acc) {
            *y = a.clamp(lo, hi) as i32;
        }
        return;
    }
    let mult = i64::from(stage.out_mult);
    let s = stage.out_shift;
    if stage.out_mult == 1 && (1..=61).contains(&s) {
        // The weight lattice stage: N2's `(a + 2^(s-1) - [a<0]) >> s` in i64, exact when
        // `|a| < 2^62` (the bias is at most 2^60); anything larger takes golden's `round_shift`.
        let half = 1i64 << (s - 1);
        // One branch-free pass when every accumulator is in range (the normal case: |acc| <
        // 2^47), so the loop has no call in it and vectorizes.
        if below_2_62(acc) {
            if Isa::Avx2.is_available() {
                crate::avx2::stage_shift_into(acc, y_out, s, lo, hi);
            } else {
                stage_shift_portable(acc, y_out, s, lo, hi);
            }
            return;
        }
        for (y, &a) in y_out.iter_mut().zip(acc) {
            let r = if a.unsigned_abs() < 1 << 62 {
                (a + half - i64::from(a < 0)) >> s
            } else {
                round_shift(a, s)
            };
            *y = r.clamp(lo, hi) as i32;
        }
        return;
    }
    for (y, &a) in y_out.iter_mut().zip(acc) {
        // |acc| <= 2^47 (acc_bits <= 48) and out_mult < 2^16: the product is exact.
        *y = round_shift(a * mult, s).clamp(lo, hi) as i32;
    }
}

/// Whether every `|a| < 2^62` (one OR over the magnitudes, which vectorizes: the OR has bit 62
/// or 63 set exactly when some magnitude does).
#[inline]
fn below_2_62(acc: &[i64]) -> bool {
    acc.iter().fold(0u64, |m, a| m | a.unsigned_abs()) < 1 << 62
}

/// [`stage_shift_portable`] for one accumulator (`|a| < 2^62`).
#[inline]
pub(crate) fn stage_shift_one(a: i64, s: u32, lo: i64, hi: i64) -> i32 {
    let half = 1i64 << (s - 1);
    ((a + half - i64::from(a < 0)) >> s).clamp(lo, hi) as i32
}

/// N14's weight-lattice stage for accumulators all below `2^62` in magnitude (shift `s` in
/// 1..=61): N2's `(a + 2^(s-1) - [a<0]) >> s`, then N3's clamp to `[lo, hi]` (`out_bits <= 32`).
#[inline]
pub(crate) fn stage_shift_portable(acc: &[i64], y_out: &mut [i32], s: u32, lo: i64, hi: i64) {
    let half = 1i64 << (s - 1);
    for (y, &a) in y_out.iter_mut().zip(acc) {
        *y = ((a + half - i64::from(a < 0)) >> s).clamp(lo, hi) as i32;
    }
}

/// Rows `row0..row0 + out.len()` for one token (`qx`: the token in the GEMV quad layout, when
/// the tensor has one and the path uses it).
fn rows_one_token(
    isa: Isa,
    ctx: &RowCtx<'_>,
    row0: usize,
    xp: &[i8],
    s: &[i32],
    qx: Option<QuadX<'_>>,
    out: &mut [i64],
) {
    match isa {
        Isa::Avx2 | Isa::Avx512Vnni => crate::avx2::rows_one_token(ctx, row0, xp, s, qx, out),
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = row_acc_scalar(ctx, row0 + i, xp, s);
            }
        }
    }
}

/// Rows for `m` tokens; `out` is `[row][t]`.
#[allow(clippy::too_many_arguments)]
fn rows_many_tokens(
    isa: Isa,
    ctx: &RowCtx<'_>,
    row0: usize,
    m: usize,
    plen: usize,
    xp: &[i8],
    xq: Option<QuadM<'_>>,
    s: &[i32],
    s_tr: &[i64],
    out: &mut [i64],
) {
    match isa {
        Isa::Avx2 => crate::avx2::rows_many_tokens(ctx, row0, m, plen, xp, xq, s, s_tr, out, false),
        Isa::Avx512Vnni => {
            crate::avx2::rows_many_tokens(ctx, row0, m, plen, xp, xq, s, s_tr, out, true);
        }
        _ => {
            for (i, o_row) in out.chunks_exact_mut(m).enumerate() {
                for (t, o) in o_row.iter_mut().enumerate() {
                    let x = &xp[t * plen..(t + 1) * plen];
                    let st = &s[t * ctx.groups..(t + 1) * ctx.groups];
                    *o = row_acc_scalar(ctx, row0 + i, x, st);
                }
            }
        }
    }
}

/// The portable path: one row, one padded token. Each chunk is decoded into 32 codes and
/// dotted in `i32` (exact: `|.| <= 32 * 255 * 128 < 2^21`; plain loops the compiler
/// vectorizes for the baseline ISA), groups summed in `i64`.
fn row_acc_scalar(ctx: &RowCtx<'_>, row: usize, xp: &[i8], s: &[i32]) -> i64 {
    match ctx.bits {
        2 => row_acc_scalar_b::<2>(ctx, row, xp, s),
        4 => row_acc_scalar_b::<4>(ctx, row, xp, s),
        _ => row_acc_scalar_b::<8>(ctx, row, xp, s),
    }
}

/// Chunk `ci` of a row (`row` is the row's bytes, `blocked` its [`block_chunks`]).
#[inline]
fn decode_chunk<const B: u32>(row: &[u8], ci: usize, blocked: usize, c: &mut [u8; CHUNK]) {
    let cb = CHUNK * B as usize / 8;
    match B {
        8 => c.copy_from_slice(&row[ci * cb..(ci + 1) * cb]),
        4 => {
            let w = &row[ci * cb..(ci + 1) * cb];
            for i in 0..16 {
                c[i] = w[i] & 0x0F;
                c[16 + i] = w[i] >> 4;
            }
        }
        _ if ci < blocked => {
            let block = &row[ci / 4 * 32..ci / 4 * 32 + 32];
            let shift = 2 * (ci % 4);
            for (o, &b) in c.iter_mut().zip(block) {
                *o = (b >> shift) & 0x03;
            }
        }
        _ => {
            let w = &row[ci * cb..(ci + 1) * cb];
            for l in 0..4 {
                for i in 0..8 {
                    c[8 * l + i] = (w[i] >> (2 * l)) & 0x03;
                }
            }
        }
    }
}

fn row_acc_scalar_b<const B: u32>(ctx: &RowCtx<'_>, row: usize, xp: &[i8], s: &[i32]) -> i64 {
    let data = &ctx.data[row * ctx.row_bytes..(row + 1) * ctx.row_bytes];
    let blocked = block_chunks(ctx.groups * ctx.chunks_per_group);
    let mut acc = 0i64;
    let mut codes = [0u8; CHUNK];
    for (g, &s_g) in s.iter().enumerate().take(ctx.groups) {
        let mut p_code = 0i64;
        for c in 0..ctx.chunks_per_group {
            let ci = g * ctx.chunks_per_group + c;
            decode_chunk::<B>(data, ci, blocked, &mut codes);
            let x = &xp[ci * CHUNK..(ci + 1) * CHUNK];
            let p: i32 = x
                .iter()
                .zip(&codes)
                .map(|(&xv, &cv)| i32::from(xv) * i32::from(cv))
                .sum();
            p_code += i64::from(p);
        }
        acc = ctx.accumulate(row, g, p_code, s_g, acc);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guided_gemv_tasks_cover_every_row_once_in_aligned_shrinking_ranges() {
        for members in 1..=4 {
            for n_rows in [
                1usize,
                7,
                8,
                63,
                64,
                65,
                192,
                576,
                960,
                1536,
                3072,
                49152,
                1 << 20,
            ] {
                let mut b = [0usize; TEAM_MAX_TASKS + 1];
                let tasks = guided_bounds(n_rows, members, &mut b);
                assert!(
                    (1..=TEAM_MAX_TASKS).contains(&tasks),
                    "{n_rows} rows: {tasks} tasks"
                );
                assert_eq!((b[0], b[tasks]), (0, n_rows));
                for i in 0..tasks {
                    let len = b[i + 1] - b[i];
                    assert!(len > 0, "{n_rows} rows: empty task {i}");
                    if i + 1 < tasks {
                        assert_eq!(b[i + 1] % TEAM_ROW_ALIGN, 0, "aligned task ends");
                        assert!(len >= TEAM_MIN_ROWS);
                        // Never growing, but for the last (it takes the rest).
                        if i + 2 < tasks {
                            assert!(b[i + 2] - b[i + 1] <= len, "{n_rows} rows: task {i}");
                        }
                    }
                }
            }
        }
    }
}
