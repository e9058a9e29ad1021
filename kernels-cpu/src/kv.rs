//! The A8 x KV4 attention products (docs/numerics.md N16-N19, N22) on a CPU layout of one KV
//! head's cache, equal integer for integer to `golden::kv::KvCache::{qk, pv}`.
//!
//! [`KvHeadCpu`] holds one KV head's cache in two ways:
//! - as a mirror of a golden [`KvCache`]: [`KvHeadCpu::sync`] is incremental: it copies only
//!   the new 8-bit tokens and, when a group leaves the window, that group's 4-bit keys and
//!   value tokens (from golden's packed codes, nothing else unpacked);
//! - on its own ([`KvHeadCpu::with_bits`], the runtime's CPU backend): [`KvHeadCpu::push`]
//!   computes what golden's `push` followed by `sync` leaves, bit for bit (tested on every
//!   field): N5 codes into the window ([`quantize_query_into`]), and when a group leaves it the
//!   N7 4-bit codes of its keys per channel and values per token from their 8-bit values
//!   ([`quantize_kv4_into`], golden's `quantize_group_asym(.., 4)` into caller buffers), with no
//!   allocation once [`KvHeadCpu::reserve`] has sized the buffers for the context.
//!
//! Either way a fold group's multipliers are recomputed only when its `s_ref` changed. The
//! layout makes both 4-bit products *row dot products* over the reduction index, like a W4
//! weight row:
//! - keys of a group token-major (`[t][c]`, reduction over channels `c`),
//! - 4-bit values channel-major (`[c][t]`, reduction over tokens `t`, with spare capacity),
//!
//! each row in 32-element W4 chunks (byte `i` of a chunk holds `c[i] | c[16 + i] << 4`), so the
//! SIMD path is the same `vpmaddubsw` kernel as the weights (codes <= 15, cannot saturate).
//! The fold multipliers (N17) depend only on the cache's scales (golden's `scale_multipliers`,
//! restated without allocating in [`fold_multipliers`] and tested equal).
//!
//! Prefill: with [`KvHeadCpu::sync_retaining`] (or [`KvHeadCpu::push_retaining`]) it also keeps the 8-bit codes of tokens
//! that left the window, so [`KvHeadCpu::qk_at`] / [`KvHeadCpu::pv2_at`] give the products of
//! the cache *as it was* at any earlier length: a prompt pushes all its tokens, then every
//! query attends independently (in parallel), with the integers of a token-by-token run.
//! [`KvHeadCpu::pv2_at`] runs both N22 probability planes in one pass over the value codes.
//!
//! Per product (N17, N19): `xf = sat(round_shift(x * fscale, SF), 8)`, `Z = sum xf * zero`,
//! `acc[o] = sat(16 * sum xf * code[o] - Z, acc_bits)`, then the N14 output stage. The 8-bit
//! window (N18): `Q x K^T` is `sat(sum q * k_i8, acc_bits)`; `P x V` folds with zero 0.

use tessera_golden::kv::{KvCache, KvError, KvMemory, KV8_BITS, P_CODE_MAX, P_PLANE_BITS};
use tessera_golden::numerics::{max_signed, min_signed, sat_u, Datapath};
use tessera_golden::ops::{OpError, OutputStage};
use tessera_golden::pack::{kv4_key_group_bytes, kv4_value_token_bytes};

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
    /// A product at a length whose 8-bit tokens are not held ([`KvHeadCpu::qk_at`]).
    History {
        len: usize,
        start: usize,
        end: usize,
    },
    /// A bad output stage or accumulator width.
    Op(OpError),
    /// [`KvHeadCpu::push`]: a key or value element was not finite (N5); nothing was pushed.
    NonFinite { what: &'static str },
    /// [`KvHeadCpu::push`]: the range of a 4-bit key channel or value token overflowed `f32`
    /// (N7, as golden's `RangeOverflow`); nothing was pushed.
    RangeOverflow { what: &'static str },
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
            KvKernelError::History { len, start, end } => write!(
                f,
                "KV product at length {len}: the mirror holds lengths {start}..={end} only"
            ),
            KvKernelError::Op(e) => write!(f, "{e}"),
            KvKernelError::NonFinite { what } => {
                write!(
                    f,
                    "{what} to push is not finite: quantize only finite values"
                )
            }
            KvKernelError::RangeOverflow { what } => {
                write!(f, "{what}: value range overflows f32")
            }
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
    /// Fold multipliers of a past length's value fold groups ([`KvHeadCpu::pv_at`]).
    folds: ValueFolds,
    /// The second activation row of [`KvHeadCpu::pv2_at`].
    xf2: Vec<i8>,
}

impl KvScratch {
    /// Sizes the buffers for every product of `mirror` (or of a mirror of the same head size and
    /// group length) at up to `tokens` tokens, so that those products allocate nothing (except
    /// `pv_at` / `pv2_at` at a past length without given folds, which compute them here).
    pub fn reserve(&mut self, mirror: &KvHeadCpu, tokens: usize) {
        let x = (mirror.key_chunks * CHUNK)
            .max(tokens.div_ceil(CHUNK) * CHUNK)
            .max(1);
        grow(&mut self.xf, x);
        grow(&mut self.xf2, x);
        grow(&mut self.p, (2 * mirror.head_dim).max(mirror.kv_group_len));
    }
}

/// A CPU mirror of one KV head's cache (see the module docs).
///
/// It holds the 8-bit codes of tokens `w0..len` (the window, plus, after
/// [`KvHeadCpu::sync_retaining`], tokens quantized to 4 bits since the last
/// [`KvHeadCpu::trim_history`]), so that the products can also be taken as the cache was at an
/// earlier length ([`KvHeadCpu::qk_at`], [`KvHeadCpu::pv_at`]): a prompt's queries see exactly
/// what a token-by-token decode would, after every key and value of the prompt was pushed.
#[derive(Debug, Clone)]
pub struct KvHeadCpu {
    head_dim: usize,
    kv_group_len: usize,
    kv_recent_window: usize,
    /// N16b (KV8): no token is ever quantized to 4 bits (set from the cache at sync).
    kv8: bool,
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
    /// Fold multipliers of the `n4` value tokens (one fold group) and their `s_ref`.
    vfscale: Vec<u16>,
    vs_ref: f32,
    vscale: Vec<f32>,
    /// Tokens mirrored.
    n: usize,
    /// First token whose 8-bit codes are held (`w0 <= n4`).
    w0: usize,
    /// 8-bit codes of tokens `w0..n`, token-major, with per-token scales.
    wkeys: Vec<i8>,
    wvalues: Vec<i8>,
    wkscale: Vec<f32>,
    wvscale: Vec<f32>,
    /// The value fold of the current window (tokens `n4..n`).
    wvfscale: Vec<u16>,
    wvs_ref: f32,
    /// [`Self::push`]'s buffers for one 4-bit group, sized at construction.
    push: PushScratch,
}

/// One 4-bit group's codes, scales and zero points, computed by [`KvHeadCpu::push`] before any
/// of them is stored (so a failed quantization changes nothing).
#[derive(Debug, Clone, Default)]
struct PushScratch {
    /// The host's `f32` values of one key channel or one value token (N16).
    deq: Vec<f32>,
    /// Key codes, channel-major `[c][t]`, with per-channel scales and zero points.
    kcodes: Vec<u8>,
    kscale: Vec<f32>,
    kzero: Vec<u8>,
    /// Value codes, token-major `[t][c]`, with per-token scales and zero points.
    vcodes: Vec<u8>,
    vscale: Vec<f32>,
    vzero: Vec<u8>,
}

impl PushScratch {
    fn new(head_dim: usize, kv_group_len: usize) -> Self {
        let (hd, gl) = (head_dim, kv_group_len);
        PushScratch {
            deq: vec![0.0; hd.max(gl)],
            kcodes: vec![0; hd * gl],
            kscale: vec![0.0; hd],
            kzero: vec![0; hd],
            vcodes: vec![0; gl * hd],
            vscale: vec![0.0; gl],
            vzero: vec![0; gl],
        }
    }
}

impl KvHeadCpu {
    /// An empty mirror for caches built with `dp` and `head_dim`.
    #[must_use]
    pub fn new(dp: &Datapath, head_dim: usize) -> Self {
        KvHeadCpu {
            head_dim,
            kv_group_len: dp.kv_group_len,
            kv_recent_window: dp.kv_recent_window,
            kv8: false,
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
            n: 0,
            w0: 0,
            wkeys: Vec::new(),
            wvalues: Vec::new(),
            wkscale: Vec::new(),
            wvscale: Vec::new(),
            wvfscale: Vec::new(),
            wvs_ref: 0.0,
            push: PushScratch::new(head_dim, dp.kv_group_len),
        }
    }

    /// An empty mirror that owns its cache: tokens enter with [`Self::push`] (no golden
    /// [`KvCache`] beside it), `kv_bits` 4 (KV4, N16) or 8 (KV8, N16b). The datapath is checked
    /// as golden's `KvCache::with_bits` checks it (the same errors).
    pub fn with_bits(dp: &Datapath, head_dim: usize, kv_bits: u32) -> Result<Self, KvError> {
        KvCache::with_bits(dp, head_dim, kv_bits)?;
        let mut m = Self::new(dp, head_dim);
        m.kv8 = kv_bits == KV8_BITS;
        Ok(m)
    }

    /// Reserves room for `tokens` tokens in all (pushed or synced), so that neither
    /// [`Self::push`] nor [`Self::sync`] allocates before [`Self::len`] reaches it (for a
    /// session: its context length). Beyond it the buffers grow (amortized doubling).
    pub fn reserve(&mut self, tokens: usize) {
        let (hd, gl) = (self.head_dim, self.kv_group_len.max(1));
        let n4 = self.n4_at(tokens);
        let groups = n4 / gl;
        let key_row = self.key_chunks * CHUNK_BYTES4;
        reserve_total(&mut self.keys4, groups * gl * key_row);
        reserve_total(&mut self.kzero, groups * hd);
        reserve_total(&mut self.kfscale, groups * hd);
        reserve_total(&mut self.ks_ref, groups);
        // `grow_values` ends at most at max(2 * n4, n4 + CHUNK - 1, 64) tokens a row.
        reserve_total(&mut self.values4, hd * (n4 + CHUNK));
        reserve_total(&mut self.vzero, n4);
        reserve_total(&mut self.vscale, n4);
        reserve_total(&mut self.vfscale, n4);
        // The 8-bit codes held: the window, or with a retained history up to every token.
        let held = tokens - self.w0.min(tokens);
        reserve_total(&mut self.wkeys, held * hd);
        reserve_total(&mut self.wvalues, held * hd);
        reserve_total(&mut self.wkscale, held);
        reserve_total(&mut self.wvscale, held);
        reserve_total(&mut self.wvfscale, tokens);
    }

    /// Tokens mirrored (4-bit, then window).
    #[must_use]
    pub fn len(&self) -> usize {
        self.n
    }
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens per 4-bit key group (N16).
    #[must_use]
    pub fn kv_group_len(&self) -> usize {
        self.kv_group_len
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
        &self.wkscale[self.n4 - self.w0..]
    }

    /// Tokens at 4 bits when the cache held `len` tokens (N16; 0 for KV8, N16b).
    #[must_use]
    pub fn n4_at(&self, len: usize) -> usize {
        if self.kv8 {
            0
        } else {
            let gl = self.kv_group_len.max(1);
            gl * (len.saturating_sub(self.kv_recent_window) / gl)
        }
    }

    /// The earliest length the products can still be taken at ([`Self::qk_at`]): the 8-bit
    /// codes of tokens before it were dropped.
    #[must_use]
    pub fn history_start(&self) -> usize {
        self.w0
    }

    /// The key scales of the window as it was at `len` tokens (tokens `n4_at(len)..len`).
    ///
    /// # Panics
    /// If `len` is not in `history_start()..=len()` (see [`Self::qk_at`]).
    #[must_use]
    pub fn window_key_scales_at(&self, len: usize) -> &[f32] {
        let n4l = self.n4_at(len);
        assert!(
            n4l >= self.w0 && len <= self.n,
            "length outside the held history"
        );
        &self.wkscale[n4l - self.w0..len - self.w0]
    }

    /// Brings the mirror up to date with `cache` (the same head, grown by `push`): appends new
    /// 4-bit key groups and value tokens and the new 8-bit tokens, and drops the 8-bit codes of
    /// tokens that left the window. Only what changed is copied; the folds of the fold groups
    /// are recomputed only when their `s_ref` changed.
    pub fn sync(&mut self, cache: &KvCache) -> Result<(), KvKernelError> {
        self.sync_retaining(cache, false)
    }

    /// As [`Self::sync`]; with `retain` the 8-bit codes of tokens that left the window are kept
    /// (until [`Self::trim_history`]), for [`Self::qk_at`] / [`Self::pv_at`] at earlier lengths.
    /// Sync after every push: the products are then valid at every length since the history
    /// started. (When several pushes quantized tokens to 4 bits between two syncs, their 8-bit
    /// codes were never seen and the history restarts at the current 4-bit boundary.)
    pub fn sync_retaining(&mut self, cache: &KvCache, retain: bool) -> Result<(), KvKernelError> {
        if cache.head_dim() != self.head_dim {
            return Err(KvKernelError::HeadDim {
                expected: self.head_dim,
                got: cache.head_dim(),
            });
        }
        let hd = self.head_dim;
        let gl = self.kv_group_len.max(1);
        let kv8 = cache.kv_bits() == tessera_golden::kv::KV8_BITS;
        if self.n > 0 && kv8 != self.kv8 {
            return Err(KvKernelError::NotAppendOnly);
        }
        self.kv8 = kv8;
        let (n_new, n4_new) = (cache.len(), cache.n4_tokens());
        if n_new < self.n || n4_new < self.n4 || n4_new != self.n4_at(n_new) {
            return Err(KvKernelError::NotAppendOnly);
        }
        // New 4-bit key groups: unpack their N11b channel-major nibbles into token rows.
        let ch_bytes = gl.div_ceil(2);
        for j in self.key_groups()..n4_new / gl {
            let (packed, kscale, kzero) = cache.key_group4_packed(j);
            for (t, row) in self.new_key_group().enumerate() {
                for c in 0..hd {
                    let code = (packed[c * ch_bytes + t / 2] >> (4 * (t % 2))) & 0x0F;
                    set_nibble(row, c, code);
                }
            }
            self.end_key_group(kscale, kzero);
        }
        // New 4-bit value tokens, into the channel-major rows.
        if n4_new > self.n4 {
            let (packed, vscale, vzero) = cache.values4_packed();
            let tb = hd.div_ceil(2);
            let old = self.n4;
            for t in old..n4_new {
                let tok = &packed[t * tb..(t + 1) * tb];
                self.set_value_token(t, |c| (tok[c / 2] >> (4 * (c % 2))) & 0x0F);
            }
            self.end_value_tokens(&vscale[old..n4_new], &vzero[old..n4_new]);
        }
        // New 8-bit tokens: those of the cache's window not held yet.
        let (wk, wv) = cache.window();
        let first = self.n.max(n4_new);
        if first > self.n {
            if retain && n_new == self.n + 1 {
                // The one new token went to 4 bits at once (it completed a group older than
                // the window): no length synced (`..=n` before, `n_new` now) has it in its
                // window, so a placeholder keeps the history contiguous.
                let hd = self.head_dim;
                self.wkeys.resize(self.wkeys.len() + hd, 0);
                self.wvalues.resize(self.wvalues.len() + hd, 0);
                self.wkscale.push(0.0);
                self.wvscale.push(0.0);
            } else {
                // Tokens went to 4 bits before this mirror saw them at 8 bits, and lengths it
                // never saw may have had them in the window: restart the history.
                self.drop_history(first);
            }
        }
        let old_window_start = self.n4_window_start_before(first);
        for (k, v) in wk.iter().zip(wv).skip(first - n4_new) {
            self.wkeys.extend_from_slice(&k.codes_i8);
            self.wvalues.extend_from_slice(&v.codes_i8);
            self.wkscale.push(k.scale_x);
            self.wvscale.push(v.scale_x);
        }
        self.n = n_new;
        if !retain {
            self.trim_history();
        }
        self.end_window(old_window_start, None);
        Ok(())
    }

    /// Appends one 4-bit key group's zeroed token rows to `keys4` and returns them (one row of
    /// `key_chunks` W4 chunks per token), for [`Self::end_key_group`].
    fn new_key_group(&mut self) -> std::slice::ChunksExactMut<'_, u8> {
        let key_row = self.key_chunks * CHUNK_BYTES4;
        let base = self.keys4.len();
        let gl = self.kv_group_len.max(1);
        self.keys4.resize(base + gl * key_row, 0);
        self.keys4[base..].chunks_exact_mut(key_row)
    }

    /// The metadata of the key group [`Self::new_key_group`] appended: zero points, and the
    /// group's fold multipliers and `s_ref` from its per-channel scales.
    fn end_key_group(&mut self, kscale: &[f32], kzero: &[u8]) {
        self.kzero.extend_from_slice(kzero);
        let f0 = self.kfscale.len();
        self.kfscale.resize(f0 + self.head_dim, 0);
        let s_ref = fold_multipliers(kscale, self.sf, &mut self.kfscale[f0..]);
        self.ks_ref.push(s_ref);
    }

    /// Writes 4-bit value token `t` (`>= n4`), `code(c)` per channel, into the channel-major
    /// rows (grown first when `t` is past their capacity).
    fn set_value_token(&mut self, t: usize, code: impl Fn(usize) -> u8) {
        if t >= self.vcap {
            self.grow_values(t + 1);
        }
        let vrow = self.vcap / 2;
        for (c, row) in self.values4.chunks_exact_mut(vrow).enumerate() {
            set_nibble(row, t, code(c));
        }
    }

    /// Appends the scales and zero points of the value tokens [`Self::set_value_token`] wrote
    /// (from `n4` on) and brings the 4-bit value fold up to date.
    fn end_value_tokens(&mut self, vscale: &[f32], vzero: &[u8]) {
        let old = self.n4;
        let n4_new = old + vscale.len();
        self.vzero.extend_from_slice(vzero);
        self.vscale.extend_from_slice(vscale);
        self.vfscale.resize(n4_new, 0);
        // s_ref only grows: the old multipliers stand unless it changed.
        let s_ref = max_scale(&self.vscale);
        let from = if s_ref.to_bits() == self.vs_ref.to_bits() {
            old
        } else {
            0
        };
        fold_multipliers_with(
            &self.vscale[from..],
            s_ref,
            self.sf,
            &mut self.vfscale[from..],
        );
        self.vs_ref = s_ref;
        self.n4 = n4_new;
    }

    /// The window's value fold, recomputed when its first token or `s_ref` changed
    /// (`old_window_start`: the window start the current `wvfscale` was computed for, if it
    /// can be extended). `s_ref`: the window's `max_scale`, when the caller knows it.
    fn end_window(&mut self, old_window_start: Option<usize>, s_ref: Option<f32>) {
        let ws = &self.wvscale[self.n4 - self.w0..];
        let s_ref = s_ref.unwrap_or_else(|| max_scale(ws));
        let keep = if old_window_start == Some(self.n4) && s_ref.to_bits() == self.wvs_ref.to_bits()
        {
            self.wvfscale.len().min(ws.len())
        } else {
            0
        };
        self.wvfscale.resize(ws.len(), 0);
        fold_multipliers_with(&ws[keep..], s_ref, self.sf, &mut self.wvfscale[keep..]);
        self.wvs_ref = s_ref;
    }

    /// Whether the next [`Self::push`] quantizes a group to 4 bits (its costly case: about
    /// `2 * kv_group_len * head_dim` N7 codes; otherwise it quantizes one token, N5).
    #[must_use]
    pub fn next_push_evicts(&self) -> bool {
        self.n4_at(self.n + 1) > self.n4
    }

    /// N16: appends one token's key and value (`head_dim` floats each) to a mirror that owns its
    /// cache ([`Self::with_bits`]), computing what golden's `KvCache::push` followed by
    /// [`Self::sync`] leaves in the mirror, without allocating (after [`Self::reserve`]): the
    /// token's N5 codes enter the 8-bit window; when the oldest `kv_group_len` window tokens are
    /// all older than the last `kv_recent_window` (KV4 only), they are quantized to 4 bits
    /// from their 8-bit values, keys per channel and values per token (N7 with `B = 4`, the
    /// same `f32` operations as golden's `quantize_group_asym`). On an error (a non-finite
    /// input, or a 4-bit group whose range overflows `f32`) nothing changes.
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<(), KvKernelError> {
        self.push_retaining(k, v, false)
    }

    /// As [`Self::push`]; with `retain` the 8-bit codes of tokens that left the window are kept,
    /// as [`Self::sync_retaining`] keeps them (for [`Self::qk_at`] / [`Self::pv_at`] at every
    /// length since the history started, until [`Self::trim_history`]).
    pub fn push_retaining(
        &mut self,
        k: &[f32],
        v: &[f32],
        retain: bool,
    ) -> Result<(), KvKernelError> {
        let hd = self.head_dim;
        check_len("key", hd, k.len())?;
        check_len("value", hd, v.len())?;
        // N5 into the window (golden's `quantize_token`, tested equal).
        let row = self.wkeys.len();
        self.wkeys.resize(row + hd, 0);
        self.wvalues.resize(row + hd, 0);
        let ks = quantize_query_into(k, &mut self.wkeys[row..]);
        let vs = quantize_query_into(v, &mut self.wvalues[row..]);
        let (Some(ks), Some(vs)) = (ks, vs) else {
            self.wkeys.truncate(row);
            self.wvalues.truncate(row);
            let what = if ks.is_none() { "key" } else { "value" };
            return Err(KvKernelError::NonFinite { what });
        };
        self.wkscale.push(ks);
        self.wvscale.push(vs);
        let n_new = self.n + 1;
        let old_n4 = self.n4;
        if self.next_push_evicts() {
            // One group leaves the window (tokens n4..n4 + gl): quantize it, then store it.
            let mut ps = std::mem::take(&mut self.push);
            let r = self.quantize_group4(&mut ps);
            if r.is_ok() {
                self.store_group4(&ps);
            }
            self.push = ps;
            if let Err(e) = r {
                self.wkeys.truncate(row);
                self.wvalues.truncate(row);
                self.wkscale.pop();
                self.wvscale.pop();
                return Err(e);
            }
            if retain && self.n4 == n_new {
                // The new token went to 4 bits at once (a zero-length window): as
                // `sync_retaining`, its history entry is a placeholder (no length has it in
                // its window).
                self.wkeys[row..].fill(0);
                self.wvalues[row..].fill(0);
                *self.wkscale.last_mut().expect("pushed above") = 0.0;
                *self.wvscale.last_mut().expect("pushed above") = 0.0;
            }
        }
        self.n = n_new;
        if !retain {
            self.trim_history();
        }
        // The same window plus one token: its s_ref is the old one or the new token's scale
        // (a maximum over finite scales >= 0, the same in any order).
        let s_ref = (self.n4 == old_n4).then(|| self.wvs_ref.max(vs));
        self.end_window(Some(old_n4), s_ref);
        Ok(())
    }

    /// N16 + N7 (`B = 4`) of the group of window tokens `n4..n4 + kv_group_len` from their
    /// 8-bit codes into `ps` (nothing stored): keys per channel over the group's tokens, values
    /// per token over the channels, each from the host's `f32` value `code * scale` (one `f32`
    /// multiply, as golden's cache computes it).
    fn quantize_group4(&self, ps: &mut PushScratch) -> Result<(), KvKernelError> {
        let (hd, gl) = (self.head_dim, self.kv_group_len);
        let t0 = self.n4 - self.w0;
        let (keys, kscale) = (
            &self.wkeys[t0 * hd..(t0 + gl) * hd],
            &self.wkscale[t0..t0 + gl],
        );
        for c in 0..hd {
            let w = &mut ps.deq[..gl];
            for ((x, row), &s) in w.iter_mut().zip(keys.chunks_exact(hd)).zip(kscale) {
                *x = f32::from(row[c]) * s;
            }
            let codes = &mut ps.kcodes[c * gl..(c + 1) * gl];
            let (scale, zero) =
                quantize_kv4_into(w, codes).ok_or(KvKernelError::RangeOverflow {
                    what: "4-bit key channel",
                })?;
            ps.kscale[c] = scale;
            ps.kzero[c] = zero;
        }
        let vals = &self.wvalues[t0 * hd..(t0 + gl) * hd];
        for (t, (row, &s)) in vals
            .chunks_exact(hd)
            .zip(&self.wvscale[t0..t0 + gl])
            .enumerate()
        {
            let w = &mut ps.deq[..hd];
            for (x, &code) in w.iter_mut().zip(row) {
                *x = f32::from(code) * s;
            }
            let codes = &mut ps.vcodes[t * hd..(t + 1) * hd];
            let (scale, zero) =
                quantize_kv4_into(w, codes).ok_or(KvKernelError::RangeOverflow {
                    what: "4-bit value token",
                })?;
            ps.vscale[t] = scale;
            ps.vzero[t] = zero;
        }
        Ok(())
    }

    /// Stores the group [`Self::quantize_group4`] computed as 4-bit keys and values.
    fn store_group4(&mut self, ps: &PushScratch) {
        let (hd, gl) = (self.head_dim, self.kv_group_len);
        for (t, row) in self.new_key_group().enumerate() {
            for c in 0..hd {
                set_nibble(row, c, ps.kcodes[c * gl + t]);
            }
        }
        self.end_key_group(&ps.kscale, &ps.kzero);
        for (t, codes) in ps.vcodes.chunks_exact(hd).enumerate() {
            self.set_value_token(self.n4 + t, |c| codes[c]);
        }
        self.end_value_tokens(&ps.vscale, &ps.vzero);
    }

    /// KV memory in bytes as golden's `KvCache::memory` counts it for the cache this mirror
    /// holds (N11b layout: packed 4-bit codes, 8-bit window codes, one byte per zero point,
    /// `f32` scales), from the token counts.
    #[must_use]
    pub fn memory(&self) -> KvMemory {
        let hd = self.head_dim;
        let groups = self.key_groups();
        let window = self.n - self.n4;
        let f32_bytes = std::mem::size_of::<f32>();
        KvMemory {
            codes4_bytes: groups * kv4_key_group_bytes(self.kv_group_len, hd)
                + self.n4 * kv4_value_token_bytes(hd),
            codes8_bytes: 2 * window * hd,
            zero_bytes: groups * hd + self.n4,
            scale_bytes: f32_bytes * (groups * hd + self.n4 + 2 * window),
        }
    }

    /// The first token of the window the current `wvfscale` was computed for, if it is still
    /// valid to extend (nothing was dropped from the history since).
    fn n4_window_start_before(&self, first: usize) -> Option<usize> {
        (first == self.n).then(|| self.n4_at(self.n))
    }

    fn drop_history(&mut self, new_w0: usize) {
        self.wkeys.clear();
        self.wvalues.clear();
        self.wkscale.clear();
        self.wvscale.clear();
        self.wvfscale.clear();
        self.w0 = new_w0;
    }

    /// Drops the 8-bit codes of tokens that are held at 4 bits (kept by
    /// [`Self::sync_retaining`]): afterwards only the current length's products can be taken.
    pub fn trim_history(&mut self) {
        let drop = self.n4 - self.w0;
        if drop > 0 {
            let hd = self.head_dim;
            self.wkeys.drain(..drop * hd);
            self.wvalues.drain(..drop * hd);
            self.wkscale.drain(..drop);
            self.wvscale.drain(..drop);
            self.w0 = self.n4;
        }
    }

    /// Widens the channel-major value rows to hold at least `need` tokens (amortized doubling),
    /// in place: within the capacity [`Self::reserve`] made, nothing is allocated.
    fn grow_values(&mut self, need: usize) {
        let new_cap = need.max(2 * self.vcap).max(64).div_ceil(CHUNK) * CHUNK;
        let (old_row, new_row) = (self.vcap / 2, new_cap / 2);
        self.values4.resize(self.head_dim * new_row, 0);
        // Last channel first: row `c` moves to `c * new_row >= c * old_row`, past the old rows
        // still to move. Chunk bytes are position-independent within a row: whole chunks move
        // as they are, and the row's new tail is zeroed (set_nibble ORs into zeroed bytes).
        for c in (1..self.head_dim).rev() {
            self.values4
                .copy_within(c * old_row..(c + 1) * old_row, c * new_row);
            self.values4[c * new_row + old_row..(c + 1) * new_row].fill(0);
        }
        if self.head_dim > 0 {
            self.values4[old_row..new_row].fill(0);
        }
        self.vcap = new_cap;
    }

    fn check_history(&self, len: usize) -> Result<usize, KvKernelError> {
        let n4l = self.n4_at(len);
        if len > self.n || n4l < self.w0 {
            return Err(KvKernelError::History {
                len,
                start: self.w0,
                end: self.n,
            });
        }
        Ok(n4l)
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
        self.qk_at(isa, self.n, q_i8, stage, scratch, acc_out, y_out)
    }

    /// [`Self::qk`] as golden's cache computed it when it held the first `len` tokens (its 4-bit
    /// groups then were `0..n4_at(len) / kv_group_len`, its window tokens `n4_at(len)..len`);
    /// `len` in `history_start()..=len()` up to the group rounding (an error otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_at(
        &self,
        isa: Isa,
        len: usize,
        q_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc_out: &mut [i64],
        y_out: &mut [i32],
    ) -> Result<(), KvKernelError> {
        stage.check()?;
        let n4 = self.check_history(len)?;
        check_len("query codes", self.head_dim, q_i8.len())?;
        check_len("scores output", len, acc_out.len())?;
        check_len("scores output", len, y_out.len())?;
        let hd = self.head_dim;
        let (lo, hi) = (min_signed(self.acc_bits), max_signed(self.acc_bits));
        let xlen = self.key_chunks * CHUNK;
        grow(&mut scratch.xf, xlen);
        grow(&mut scratch.p, self.kv_group_len);
        let key_row = self.key_chunks * CHUNK_BYTES4;
        let gl = self.kv_group_len;
        for j in 0..n4 / gl.max(1) {
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
            let r = j * gl..(j + 1) * gl;
            finish_part(
                p,
                hd,
                4,
                z,
                self.acc_bits,
                stage,
                &mut acc_out[r.clone()],
                true,
                &mut y_out[r],
            )?;
        }
        let wkeys = &self.wkeys[(n4 - self.w0) * hd..(len - self.w0) * hd];
        if isa == Isa::Avx512Vnni && isa.is_available() && hd == 64 {
            crate::avx2::window_qk_vnni64(q_i8, wkeys, &mut acc_out[n4..], lo, hi);
        } else if isa.has_avx2() && isa.is_available() && hd < (1 << 17) {
            // |q * k| <= 2^14 per channel: the i32 sums are exact for hd < 2^17.
            crate::avx2::window_qk(q_i8, wkeys, &mut acc_out[n4..], lo, hi);
        } else {
            for (t, k) in wkeys.chunks_exact(hd).enumerate() {
                let dot: i64 = q_i8
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| i64::from(i32::from(a) * i32::from(b)))
                    .sum();
                acc_out[n4 + t] = dot.clamp(lo, hi);
            }
        }
        stage_into(stage, &acc_out[n4..], &mut y_out[n4..])?;
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
        self.pv_at(isa, self.n, p_i8, stage, scratch, acc4, accw, y4, yw)
            .map(|_| ())
    }

    /// [`Self::pv`] as golden's cache computed it when it held the first `len` tokens (see
    /// [`Self::qk_at`]). Returns the `s_ref` of the 4-bit values and of the window values then
    /// (N20; 0 for an empty part).
    #[allow(clippy::too_many_arguments)]
    pub fn pv_at(
        &self,
        isa: Isa,
        len: usize,
        p_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc4: &mut [i64],
        accw: &mut [i64],
        y4: &mut [i32],
        yw: &mut [i32],
    ) -> Result<(f32, f32), KvKernelError> {
        let n4 = self.check_history(len)?;
        if n4 == self.n4 && len == self.n {
            let f = FoldsRef {
                len,
                n4,
                s4: self.vs_ref,
                m4: &self.vfscale,
                sw: self.wvs_ref,
                mw: &self.wvfscale,
            };
            return self.pv_core(isa, &f, p_i8, stage, scratch, acc4, accw, y4, yw);
        }
        let mut folds = std::mem::take(&mut scratch.folds);
        folds.valid = false; // the scratch may have served another mirror
        let r = self.value_folds_at(len, &mut folds).and_then(|()| {
            self.pv_core(
                isa,
                &folds.as_ref(),
                p_i8,
                stage,
                scratch,
                acc4,
                accw,
                y4,
                yw,
            )
        });
        scratch.folds = folds;
        r
    }

    /// The value products' fold multipliers (N17) as they were at `len` tokens, into `folds`
    /// for [`Self::pv_with`] (several queries or probability planes at one length share them).
    /// `folds` belongs to this mirror: its 4-bit part is reused when the 4-bit token count at
    /// `len` is the one it was computed for, and the window multipliers of a shorter length with
    /// the same window start and `s_ref` are kept (only the new tokens' are computed).
    pub fn value_folds_at(&self, len: usize, folds: &mut ValueFolds) -> Result<(), KvKernelError> {
        let n4 = self.check_history(len)?;
        // The same window start as the folds' (shorter or equal) length: its first tokens'
        // multipliers stand unless the window's s_ref changed.
        let same_start = folds.valid && folds.n4 == n4 && folds.len <= len;
        if !(folds.valid && folds.n4 == n4) {
            folds.m4.resize(n4, 0);
            folds.s4 = fold_multipliers(&self.vscale[..n4], self.sf, &mut folds.m4);
            folds.n4 = n4;
        }
        let nw = len - n4;
        let ws = &self.wvscale[n4 - self.w0..len - self.w0];
        let s_ref = max_scale(ws);
        let keep = if same_start && s_ref.to_bits() == folds.sw.to_bits() {
            folds.len - n4
        } else {
            0
        };
        folds.mw.resize(nw, 0);
        fold_multipliers_with(&ws[keep..], s_ref, self.sf, &mut folds.mw[keep..]);
        folds.sw = s_ref;
        folds.len = len;
        folds.valid = true;
        Ok(())
    }

    /// [`Self::pv_at`] at the length `folds` was computed for ([`Self::value_folds_at`]).
    #[allow(clippy::too_many_arguments)]
    pub fn pv_with(
        &self,
        isa: Isa,
        folds: &ValueFolds,
        p_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc4: &mut [i64],
        accw: &mut [i64],
        y4: &mut [i32],
        yw: &mut [i32],
    ) -> Result<(f32, f32), KvKernelError> {
        assert!(folds.valid, "pv_with: folds not computed");
        let n4 = self.check_history(folds.len)?;
        assert_eq!(n4, folds.n4, "pv_with: folds of another length");
        self.pv_core(
            isa,
            &folds.as_ref(),
            p_i8,
            stage,
            scratch,
            acc4,
            accw,
            y4,
            yw,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn pv_core(
        &self,
        isa: Isa,
        f: &FoldsRef<'_>,
        p_i8: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        acc4: &mut [i64],
        accw: &mut [i64],
        y4: &mut [i32],
        yw: &mut [i32],
    ) -> Result<(f32, f32), KvKernelError> {
        stage.check()?;
        let (len, n4) = (f.len, f.n4);
        let hd = self.head_dim;
        check_len("probability codes", len, p_i8.len())?;
        for (what, n) in [
            ("acc4", acc4.len()),
            ("accw", accw.len()),
            ("y4", y4.len()),
            ("yw", yw.len()),
        ] {
            check_len(what, hd, n)?;
        }
        let (lo, hi) = (min_signed(self.acc_bits), max_signed(self.acc_bits));
        let nw = len - n4;
        // 4-bit part: rows = channels, reduction over the n4 tokens.
        let chunks = n4.div_ceil(CHUNK);
        let xlen = chunks * CHUNK;
        grow(&mut scratch.xf, xlen.max(nw).max(1));
        grow(&mut scratch.p, hd);
        fold_into(&p_i8[..n4], f.m4, self.sf, &mut scratch.xf[..n4]);
        let xf = &mut scratch.xf[..xlen];
        xf[n4..].fill(0);
        let z = dot_i8_u8(&xf[..n4], &self.vzero[..n4]);
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
        let xw = &mut scratch.xf[..nw];
        fold_into(&p_i8[n4..], f.mw, self.sf, xw);
        let wvalues = &self.wvalues[(n4 - self.w0) * hd..(len - self.w0) * hd];
        let pw = &mut scratch.p[..hd];
        pw.fill(0);
        if isa.has_avx2() && isa.is_available() && nw < (1 << 17) {
            crate::avx2::window_pv(xw, wvalues, pw);
        } else {
            for (t, &x) in xw.iter().enumerate() {
                let x = i32::from(x);
                for (a, &v) in pw.iter_mut().zip(&wvalues[t * hd..(t + 1) * hd]) {
                    *a += x * i32::from(v); // |.| <= nw * 128 * 127, < 2^31 for nw < 2^17
                }
            }
        }
        for (a, &pc) in accw.iter_mut().zip(pw.iter()) {
            *a = i64::from(pc).clamp(lo, hi);
        }
        stage_into(stage, acc4, y4)?;
        stage_into(stage, accw, yw)?;
        Ok((f.s4, f.sw))
    }
}

impl KvHeadCpu {
    /// The first part of the mirrored state in which `self` and `other` differ (`None`: the
    /// same cache, every code, scale, zero point, fold multiplier and held 8-bit code, `f32`s
    /// by their bits; capacities and scratch aside). For tests: [`Self::push`] must leave
    /// exactly the state of golden's `push` followed by [`Self::sync`].
    #[must_use]
    pub fn first_difference(&self, other: &Self) -> Option<&'static str> {
        fn bits(a: &[f32]) -> impl Iterator<Item = u32> + '_ {
            a.iter().map(|x| x.to_bits())
        }
        let checks: [(&'static str, bool); 24] = [
            ("head_dim", self.head_dim == other.head_dim),
            ("kv_group_len", self.kv_group_len == other.kv_group_len),
            (
                "kv_recent_window",
                self.kv_recent_window == other.kv_recent_window,
            ),
            ("kv8", self.kv8 == other.kv8),
            ("sf", self.sf == other.sf),
            ("acc_bits", self.acc_bits == other.acc_bits),
            ("keys4", self.keys4 == other.keys4),
            ("kzero", self.kzero == other.kzero),
            ("kfscale", self.kfscale == other.kfscale),
            ("ks_ref", bits(&self.ks_ref).eq(bits(&other.ks_ref))),
            ("n4", self.n4 == other.n4),
            (
                "vcap / values4",
                self.vcap == other.vcap && self.values4 == other.values4,
            ),
            ("vzero", self.vzero == other.vzero),
            ("vfscale", self.vfscale == other.vfscale),
            ("vs_ref", self.vs_ref.to_bits() == other.vs_ref.to_bits()),
            ("vscale", bits(&self.vscale).eq(bits(&other.vscale))),
            ("n", self.n == other.n),
            ("w0", self.w0 == other.w0),
            ("wkeys", self.wkeys == other.wkeys),
            ("wvalues", self.wvalues == other.wvalues),
            ("wkscale", bits(&self.wkscale).eq(bits(&other.wkscale))),
            ("wvscale", bits(&self.wvscale).eq(bits(&other.wvscale))),
            ("wvfscale", self.wvfscale == other.wvfscale),
            ("wvs_ref", self.wvs_ref.to_bits() == other.wvs_ref.to_bits()),
        ];
        checks.iter().find(|(_, same)| !same).map(|(what, _)| *what)
    }
}

/// `P x V` outputs of both N22 probability planes of one query ([`KvHeadCpu::pv2_at`]): per
/// channel the N14 outputs of the 4-bit part and of the window part, high and low plane.
#[derive(Debug, Default, Clone)]
pub struct Pv2Out {
    pub y4_hi: Vec<i32>,
    pub yw_hi: Vec<i32>,
    pub y4_lo: Vec<i32>,
    pub yw_lo: Vec<i32>,
    acc: Vec<i64>,
}

impl Pv2Out {
    /// Sizes the outputs for heads of `head_dim` channels ([`KvHeadCpu::pv2_at`] then
    /// allocates nothing).
    pub fn reserve(&mut self, head_dim: usize) {
        for v in [
            &mut self.y4_hi,
            &mut self.yw_hi,
            &mut self.y4_lo,
            &mut self.yw_lo,
        ] {
            v.resize(head_dim, 0);
        }
        self.acc.resize(4 * head_dim, 0);
    }
}

impl KvHeadCpu {
    /// [`Self::pv_at`] of the two probability planes of one query (N22) in one pass over the
    /// value codes: the same integers as two [`Self::pv_at`] calls. `folds`: the value folds at
    /// `len` ([`Self::value_folds_at`]), or `None` to take (current length) or compute them.
    /// Returns the `s_ref` of the 4-bit and window values (as [`Self::pv_at`]).
    #[allow(clippy::too_many_arguments)]
    pub fn pv2_at(
        &self,
        isa: Isa,
        len: usize,
        folds: Option<&ValueFolds>,
        p_hi: &[i8],
        p_lo: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        out: &mut Pv2Out,
    ) -> Result<(f32, f32), KvKernelError> {
        let n4 = self.check_history(len)?;
        if let Some(f) = folds {
            assert!(
                f.valid && f.len == len && f.n4 == n4,
                "pv2_at: folds of another length"
            );
            return self.pv2_core(isa, &f.as_ref(), p_hi, p_lo, stage, scratch, out);
        }
        if n4 == self.n4 && len == self.n {
            let f = FoldsRef {
                len,
                n4,
                s4: self.vs_ref,
                m4: &self.vfscale,
                sw: self.wvs_ref,
                mw: &self.wvfscale,
            };
            return self.pv2_core(isa, &f, p_hi, p_lo, stage, scratch, out);
        }
        let mut folds = std::mem::take(&mut scratch.folds);
        folds.valid = false; // the scratch may have served another mirror
        let r = self
            .value_folds_at(len, &mut folds)
            .and_then(|()| self.pv2_core(isa, &folds.as_ref(), p_hi, p_lo, stage, scratch, out));
        scratch.folds = folds;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn pv2_core(
        &self,
        isa: Isa,
        f: &FoldsRef<'_>,
        p_hi: &[i8],
        p_lo: &[i8],
        stage: &OutputStage,
        scratch: &mut KvScratch,
        out: &mut Pv2Out,
    ) -> Result<(f32, f32), KvKernelError> {
        stage.check()?;
        let (len, n4) = (f.len, f.n4);
        let hd = self.head_dim;
        check_len("probability codes", len, p_hi.len())?;
        check_len("probability codes", len, p_lo.len())?;
        for v in [
            &mut out.y4_hi,
            &mut out.yw_hi,
            &mut out.y4_lo,
            &mut out.yw_lo,
        ] {
            v.resize(hd, 0);
        }
        out.acc.resize(4 * hd, 0);
        let nw = len - n4;
        let chunks = n4.div_ceil(CHUNK);
        let xlen = chunks * CHUNK;
        let need = xlen.max(nw).max(1);
        grow(&mut scratch.xf, need);
        grow(&mut scratch.xf2, need);
        grow(&mut scratch.p, 2 * hd);
        // 4-bit part: both planes folded, then one pass over the channel rows.
        fold_into(&p_hi[..n4], f.m4, self.sf, &mut scratch.xf[..n4]);
        fold_into(&p_lo[..n4], f.m4, self.sf, &mut scratch.xf2[..n4]);
        let (xa, xb) = (&mut scratch.xf[..xlen], &mut scratch.xf2[..xlen]);
        xa[n4..].fill(0);
        xb[n4..].fill(0);
        let za = dot_i8_u8(&xa[..n4], &self.vzero[..n4]);
        let zb = dot_i8_u8(&xb[..n4], &self.vzero[..n4]);
        let (pa, pb) = scratch.p[..2 * hd].split_at_mut(hd);
        if chunks == 0 {
            pa.fill(0);
            pb.fill(0);
        } else if isa.has_avx2() && isa.is_available() {
            crate::avx2::dot4_rows2(xa, xb, &self.values4, self.vcap / 2, hd, chunks, pa, pb);
        } else {
            dot4_rows_strided(isa, xa, &self.values4, self.vcap / 2, hd, chunks, pa);
            dot4_rows_strided(isa, xb, &self.values4, self.vcap / 2, hd, chunks, pb);
        }
        let (acc_a, rest) = out.acc.split_at_mut(hd);
        let (acc_b, rest) = rest.split_at_mut(hd);
        let (accw_a, accw_b) = rest.split_at_mut(hd);
        let ab = self.acc_bits;
        finish_part(pa, n4, 4, za, ab, stage, acc_a, false, &mut out.y4_hi)?;
        finish_part(pb, n4, 4, zb, ab, stage, acc_b, false, &mut out.y4_lo)?;
        // Window: fold with zero 0, signed 8-bit codes.
        fold_into(&p_hi[n4..], f.mw, self.sf, &mut scratch.xf[..nw]);
        fold_into(&p_lo[n4..], f.mw, self.sf, &mut scratch.xf2[..nw]);
        let (xa, xb) = (&scratch.xf[..nw], &scratch.xf2[..nw]);
        let wvalues = &self.wvalues[(n4 - self.w0) * hd..(len - self.w0) * hd];
        pa.fill(0);
        pb.fill(0);
        if isa.has_avx2() && isa.is_available() && nw < (1 << 17) {
            crate::avx2::window_pv2(xa, xb, wvalues, pa, pb);
        } else {
            for ((&ta, &tb), v) in xa.iter().zip(xb).zip(wvalues.chunks_exact(hd)) {
                let (ta, tb) = (i32::from(ta), i32::from(tb));
                for ((a, b), &c) in pa.iter_mut().zip(pb.iter_mut()).zip(v) {
                    *a += ta * i32::from(c); // |.| < 2^31 for nw < 2^17
                    *b += tb * i32::from(c);
                }
            }
        }
        finish_part(pa, nw, 0, 0, ab, stage, accw_a, false, &mut out.yw_hi)?;
        finish_part(pb, nw, 0, 0, ab, stage, accw_b, false, &mut out.yw_lo)?;
        Ok((f.s4, f.sw))
    }
}

/// The fold multipliers (N17) of the value products at one length of one mirror
/// ([`KvHeadCpu::value_folds_at`]): the 4-bit tokens' fold group and the window's.
#[derive(Debug, Default, Clone)]
pub struct ValueFolds {
    valid: bool,
    len: usize,
    n4: usize,
    s4: f32,
    m4: Vec<u16>,
    sw: f32,
    mw: Vec<u16>,
}

impl ValueFolds {
    fn as_ref(&self) -> FoldsRef<'_> {
        FoldsRef {
            len: self.len,
            n4: self.n4,
            s4: self.s4,
            m4: &self.m4,
            sw: self.sw,
            mw: &self.mw,
        }
    }
}

struct FoldsRef<'a> {
    len: usize,
    n4: usize,
    s4: f32,
    m4: &'a [u16],
    sw: f32,
    mw: &'a [u16],
}

/// N22 (golden's `quantize_probs_into`) without its per-element error path: `scale_p = max p /
/// 16383`, `code = clamp(round_half_away(p / scale_p), 0, 16383)`, `hi = code >> 7`,
/// `lo = code & 127`. Returns `None` (planes unspecified) when a probability is negative or not
/// finite. The rounding is done in integers (`p / scale_p >= 0`: truncate, then add one when the
/// exact fractional part is `>= 0.5`), which is round-half-away for non-negative values, so the
/// codes equal golden's (tested against it).
///
/// # Panics
/// If `hi` or `lo` is not as long as `p`.
pub fn quantize_probs_into(p: &[f32], hi: &mut [i8], lo: &mut [i8]) -> Option<f32> {
    if avx2_detected() {
        return crate::avx2::quantize_probs_into(p, hi, lo);
    }
    quantize_probs_portable(p, hi, lo)
}

/// [`quantize_probs_into`]'s body (also compiled for AVX2 by `avx2::quantize_probs_into`: the
/// same `f32` and integer operations, so the same codes).
#[inline(always)]
pub(crate) fn quantize_probs_portable(p: &[f32], hi: &mut [i8], lo: &mut [i8]) -> Option<f32> {
    assert!(
        hi.len() == p.len() && lo.len() == p.len(),
        "quantize_probs_into: one code per probability in each plane"
    );
    // Eight lanes of running maxima (from 0) and one flag: vectorizes. When every value is
    // finite and >= 0 the maximum does not depend on the order it is taken in.
    let mut m8 = [0.0f32; 8];
    let mut ok = true;
    let mut chunks = p.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in m8.iter_mut().zip(c) {
            ok &= (0.0..=f32::MAX).contains(&v);
            *m = if v > *m { v } else { *m };
        }
    }
    for &v in chunks.remainder() {
        ok &= (0.0..=f32::MAX).contains(&v);
        m8[0] = if v > m8[0] { v } else { m8[0] };
    }
    if !ok {
        return None;
    }
    let max = m8.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
    let Some(scale_p) = prob_scale(max, hi, lo) else {
        return Some(0.0);
    };
    for ((&v, h), l) in p.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        (*h, *l) = prob_code(v, scale_p);
    }
    Some(scale_p)
}

/// N22's probability scale `max / 16383` for a row whose largest probability is `max`; when
/// it is 0 every code is 0, so both planes are zeroed and `None` is returned.
#[inline(always)]
pub(crate) fn prob_scale(max: f32, hi: &mut [i8], lo: &mut [i8]) -> Option<f32> {
    #[allow(clippy::cast_precision_loss)] // 16383 is exact in f32
    let scale_p = max / P_CODE_MAX as f32;
    if scale_p == 0.0 {
        hi.fill(0);
        lo.fill(0);
        return None;
    }
    Some(scale_p)
}

/// N22's two plane codes of one probability `v >= 0` for `scale_p > 0`: the quotient is
/// clamped to [`P_CODE_MAX`] (so in `[0, 16383]`, where the truncating cast and the
/// subtraction are exact) and rounded half up.
#[inline(always)]
pub(crate) fn prob_code(v: f32, scale_p: f32) -> (i8, i8) {
    #[allow(clippy::cast_precision_loss)] // 16383 is exact in f32
    let x = (v / scale_p).min(P_CODE_MAX as f32);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let t = x as i32;
    #[allow(clippy::cast_precision_loss)]
    let code = t + i32::from(x - t as f32 >= 0.5);
    let code = code.min(P_CODE_MAX as i32);
    #[allow(clippy::cast_possible_truncation)]
    (
        (code >> P_PLANE_BITS) as i8,
        (code & ((1 << P_PLANE_BITS) - 1)) as i8,
    )
}

/// N5 (golden's `quantize_token`) for one query into `out`, without allocating: `scale =
/// absmax / 127`, `code = clamp(round_half_away(q / scale), -127, 127)`; `None` when an input is
/// not finite. The rounding is done in integers on the clamped quotient (truncate toward zero,
/// then step away from zero when the exact fractional part is at least one half), which is
/// round-half-away, so the codes equal golden's (tested against it). The same N5 as the weight
/// products' activations: [`crate::act::quantize_token_isa`] on AVX2 when present.
///
/// # Panics
/// If `out` is not as long as `x`.
pub fn quantize_query_into(x: &[f32], out: &mut [i8]) -> Option<f32> {
    let isa = if avx2_detected() {
        crate::Isa::Avx2
    } else {
        crate::Isa::Scalar
    };
    crate::act::quantize_token_isa(isa, x, out)
}

/// Golden's `quantize_group_asym(w, 4)` (N7 with `B = 4`) into `codes` without allocating:
/// `Some((scale_g, zero_u8))`, or `None` where golden returns an error (a non-finite value, or
/// a range `hi - lo` that overflows `f32`). The same `f32` operations in the same order; the
/// final rounding of each code is [`round_clamp`] (tested equal to golden's, also at ties).
///
/// # Panics
/// If `codes` is not as long as `w`, or `w` is empty.
pub fn quantize_kv4_into(w: &[f32], codes: &mut [u8]) -> Option<(f32, u8)> {
    if avx2_detected() {
        crate::avx2::quantize_kv4_into(w, codes)
    } else {
        quantize_kv4_portable(w, codes)
    }
}

/// [`quantize_kv4_into`]'s body (also compiled for AVX2 by `avx2::quantize_kv4_into`). `lo` and
/// `hi` are taken in eight lanes (which vectorizes): the minimum and maximum of a set of
/// non-NaN floats do not depend on the order (a NaN is skipped, as `f32::min` / `f32::max`
/// skip it, and then rejected), except for the sign of a zero result, which changes nothing
/// below (`hi == lo`, `hi - lo` and the rounded zero point `-lo / scale_g * 16` are the same for
/// `+0.0` and `-0.0`).
#[inline(always)]
pub(crate) fn quantize_kv4_portable(w: &[f32], codes: &mut [u8]) -> Option<(f32, u8)> {
    const BITS: u32 = 4;
    assert_eq!(
        w.len(),
        codes.len(),
        "quantize_kv4_into: one code per value"
    );
    assert!(!w.is_empty(), "quantize_kv4_into: empty group");
    // golden: check_finite, then lo / hi from 0 (the grid holds 0.0).
    let (mut lo8, mut hi8) = ([0.0f32; 8], [0.0f32; 8]);
    let mut nan = false;
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        for ((l, h), &v) in lo8.iter_mut().zip(hi8.iter_mut()).zip(c) {
            nan |= v.is_nan();
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    for &v in chunks.remainder() {
        nan |= v.is_nan();
        lo8[0] = if v < lo8[0] { v } else { lo8[0] };
        hi8[0] = if v > hi8[0] { v } else { hi8[0] };
    }
    let lo = lo8.iter().fold(0.0f32, |m, &v| if v < m { v } else { m });
    let hi = hi8.iter().fold(0.0f32, |m, &v| if v > m { v } else { m });
    if !(lo.is_finite() && hi.is_finite()) || nan {
        return None;
    }
    if hi == lo {
        codes.fill(0);
        return Some((0.0, 0));
    }
    let range = hi - lo;
    if !range.is_finite() {
        return None;
    }
    let max_code = (1i32 << BITS) - 1;
    #[allow(clippy::cast_precision_loss)] // 15 is exact
    let scale_g = range / max_code as f32;
    if scale_g == 0.0 {
        codes.fill(0);
        return Some((0.0, 0));
    }
    #[allow(clippy::cast_precision_loss)] // 2^(8 - B) is exact
    let lattice = (1u32 << (8 - BITS)) as f32;
    // `round_clamp` is golden's `round_clamp_f32` on [0, 255] (tested equal; the quotient is
    // not NaN: `lo` is finite and `scale_g > 0`).
    let zero = sat_u(i64::from(round_clamp(-lo / scale_g * lattice, 0, 255)), 8);
    let zero_u8 = u8::try_from(zero).expect("sat_u(.., 8) fits u8");
    let zero_f32 = f32::from(zero_u8) / lattice;
    for (q, &v) in codes.iter_mut().zip(w) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in [0, 15]
        {
            *q = round_clamp(v / scale_g + zero_f32, 0, max_code) as u8;
        }
    }
    Some((scale_g, zero_u8))
}

/// golden's `round_clamp_f32(y, lo, hi)` (N1 then a clamp) for a small integer range
/// (`|lo|, |hi| < 2^22`) without the libm `roundf` call, so loops over it vectorize: `y` is
/// clamped to `[lo - 1, hi + 1]` first (which does not change the clamped result), truncated,
/// and the fraction `y - trunc(y)` (exact in `f32` for `|y| < 2^23`) decides the tie-away step.
/// `y` must not be NaN (callers check finiteness first); `+-inf` clamps to `hi` / `lo`.
#[inline(always)]
#[must_use]
pub fn round_clamp(y: f32, lo: i32, hi: i32) -> i32 {
    #[allow(clippy::cast_precision_loss)] // |lo|, |hi| < 2^22: exact
    let y = y.clamp((lo - 1) as f32, (hi + 1) as f32);
    #[allow(clippy::cast_possible_truncation)]
    let t = y as i32;
    #[allow(clippy::cast_precision_loss)]
    let frac = y - t as f32;
    let r = t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5);
    r.clamp(lo, hi)
}

/// Grows `v`'s capacity to at least `total` elements (no change when it has that already).
fn reserve_total<T>(v: &mut Vec<T>, total: usize) {
    v.reserve_exact(total.saturating_sub(v.len()));
}

/// `max_e s_e` from 0, as golden's `scale_multipliers` takes `s_ref`.
fn max_scale(scales: &[f32]) -> f32 {
    scales.iter().fold(0.0f32, |m, &s| m.max(s))
}

/// golden's `scale_multipliers` (N17) into `out` without allocating; returns `s_ref`.
/// Scales are finite and `>= 0` (they come from golden's cache).
pub fn fold_multipliers(scales: &[f32], sf: u32, out: &mut [u16]) -> f32 {
    let s_ref = max_scale(scales);
    fold_multipliers_with(scales, s_ref, sf, out);
    s_ref
}

/// The multipliers of `scales` against a given `s_ref` (the maximum of their fold group):
/// `round_half_away(s / s_ref * 2^sf)` clamped to `[0, 2^sf]`, as golden computes them.
fn fold_multipliers_with(scales: &[f32], s_ref: f32, sf: u32, out: &mut [u16]) {
    assert_eq!(scales.len(), out.len(), "one multiplier per scale");
    assert!(sf <= 15, "fold multipliers: SF {sf} > 15");
    if s_ref == 0.0 {
        out.fill(0);
        return;
    }
    let one_q = 1i32 << sf;
    #[allow(clippy::cast_precision_loss)] // a power of two is exact in f32
    let pow = (1u64 << sf) as f32;
    // `round_clamp` is golden's `round_clamp_f32` on `[0, 2^15]` (tested equal), without the
    // libm call, so the loop vectorizes; the quotient is not NaN (`s_ref > 0`, scales finite).
    for (o, &s) in out.iter_mut().zip(scales) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in [0, 2^15]
        {
            *o = round_clamp(s / s_ref * pow, 0, one_q) as u16;
        }
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
    if avx2_detected() {
        crate::avx2::fold_into(x_i8, fscale_q, sf, out);
    } else {
        fold_portable(x_i8, fscale_q, sf, out);
    }
}

/// Whether the CPU has AVX2 (the elementwise loops above then run compiled for it).
#[inline]
fn avx2_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`fold_into`]'s body (also compiled for AVX2, as [`quantize_probs_portable`]).
#[inline(always)]
pub(crate) fn fold_portable(x_i8: &[i8], fscale_q: &[u16], sf: u32, out: &mut [i8]) {
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

/// `sum x[e] * z[e]` (a fold group's zero term, N17), compiled for AVX2 when present.
fn dot_i8_u8(x: &[i8], z: &[u8]) -> i64 {
    if avx2_detected() {
        crate::avx2::dot_i8_u8(x, z)
    } else {
        dot_i8_u8_portable(x, z)
    }
}

/// [`dot_i8_u8`]'s body: `|x * z| <= 128 * 255 < 2^15`, so `i32` sums of `2^16` products are
/// exact (the loop over each block vectorizes), and the blocks are added in `i64`.
#[inline(always)]
pub(crate) fn dot_i8_u8_portable(x: &[i8], z: &[u8]) -> i64 {
    x.chunks(1 << 16)
        .zip(z.chunks(1 << 16))
        .map(|(xb, zb)| {
            i64::from(
                xb.iter()
                    .zip(zb)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum::<i32>(),
            )
        })
        .sum()
}

/// `acc[i] = clamp((p[i] << shift) - z, lo, hi)` (a fold group's accumulators, N17 / N13),
/// compiled for AVX2 when present.
fn shift_sub_clamp(p: &[i32], shift: u32, z: i64, lo: i64, hi: i64, acc: &mut [i64]) {
    if avx2_detected() {
        crate::avx2::shift_sub_clamp(p, shift, z, lo, hi, acc);
    } else {
        shift_sub_clamp_portable(p, shift, z, lo, hi, acc);
    }
}

/// [`shift_sub_clamp`]'s body (`shift <= 4`: `|p << shift| < 2^36`, exact in `i64`).
#[inline(always)]
pub(crate) fn shift_sub_clamp_portable(
    p: &[i32],
    shift: u32,
    z: i64,
    lo: i64,
    hi: i64,
    acc: &mut [i64],
) {
    for (a, &x) in acc.iter_mut().zip(p) {
        *a = ((i64::from(x) << shift) - z).clamp(lo, hi);
    }
}

/// One fold group's (or the window's) outputs from its `i32` dot products `p` over `n_elems`
/// reduction elements: `acc[i] = sat((p[i] << shift) - z, acc_bits)` (N17 / N13) and `y` by the
/// N14 `stage`. When `n_elems <= 2^15` every `|p << shift| + |z| <= 2^15 * (128 * 15 * 16 +
/// 128 * 255) < 2^31` (`shift <= 4`, codes <= 15, zero points <= 255; for the 8-bit window
/// `shift` 0, `z` 0, `|p| <= 2^15 * 2^14`), so for the identity stage both clamps run in one
/// `i32` pass (the accumulator bounds clamped into `i32`'s range, where a wider `acc_bits`
/// clamps nothing); otherwise [`shift_sub_clamp`] then [`stage_into`]. Without `keep_acc`, `acc`
/// is scratch: the one-pass path leaves it unwritten.
#[allow(clippy::too_many_arguments)]
fn finish_part(
    p: &[i32],
    n_elems: usize,
    shift: u32,
    z: i64,
    acc_bits: u32,
    stage: &OutputStage,
    acc: &mut [i64],
    keep_acc: bool,
    y: &mut [i32],
) -> Result<(), OpError> {
    let (lo, hi) = (min_signed(acc_bits), max_signed(acc_bits));
    let fits = n_elems <= 1 << 15 && shift <= 4 && z.unsigned_abs() < 1 << 31;
    if fits && stage.out_mult == 1 && stage.out_shift == 0 && p.len() == y.len() {
        stage.check()?;
        let (olo, ohi) = (min_signed(stage.out_bits), max_signed(stage.out_bits));
        let (i32lo, i32hi) = (i64::from(i32::MIN), i64::from(i32::MAX));
        #[allow(clippy::cast_possible_truncation)] // clamped into i32's range, and |z| < 2^31
        let (alo, ahi, z) = (lo.max(i32lo) as i32, hi.min(i32hi) as i32, z as i32);
        #[allow(clippy::cast_possible_truncation)] // out_bits <= 32
        let (olo, ohi) = (olo.max(i32lo) as i32, ohi.min(i32hi) as i32);
        let f = FinishI32 {
            shift,
            z,
            alo,
            ahi,
            olo,
            ohi,
        };
        match (avx2_detected(), keep_acc) {
            (true, true) => crate::avx2::finish_i32(p, f, acc, y),
            (true, false) => crate::avx2::finish_i32_y(p, f, y),
            (false, true) => finish_i32_portable(p, f, acc, y),
            (false, false) => finish_i32_y_portable(p, f, y),
        }
        return Ok(());
    }
    shift_sub_clamp(p, shift, z, lo, hi, acc);
    stage_into(stage, acc, y)
}

/// [`finish_part`]'s `i32` pass: `a = clamp((p << shift) - z, alo, ahi)`, `acc = a`, `y =
/// clamp(a, olo, ohi)` (exact under [`finish_part`]'s bound).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FinishI32 {
    pub shift: u32,
    pub z: i32,
    pub alo: i32,
    pub ahi: i32,
    pub olo: i32,
    pub ohi: i32,
}

impl FinishI32 {
    /// The accumulator `clamp((x << shift) - z, alo, ahi)`.
    #[inline(always)]
    fn acc(self, x: i32) -> i32 {
        ((x << self.shift) - self.z).clamp(self.alo, self.ahi)
    }
}

/// [`FinishI32`] over `p` into `acc` and `y`.
#[inline(always)]
pub(crate) fn finish_i32_portable(p: &[i32], f: FinishI32, acc: &mut [i64], y: &mut [i32]) {
    assert!(acc.len() == p.len() && y.len() == p.len(), "finish: shapes");
    for ((a, o), &x) in acc.iter_mut().zip(y.iter_mut()).zip(p) {
        let v = f.acc(x);
        *a = i64::from(v);
        *o = v.clamp(f.olo, f.ohi);
    }
}

/// [`finish_i32_portable`] without the accumulators.
#[inline(always)]
pub(crate) fn finish_i32_y_portable(p: &[i32], f: FinishI32, y: &mut [i32]) {
    assert!(y.len() == p.len(), "finish: shapes");
    for (o, &x) in y.iter_mut().zip(p) {
        *o = f.acc(x).clamp(f.olo, f.ohi);
    }
}

/// N14 for the KV products: the identity stage (`out_mult` 1, `out_shift` 0, the runtime's)
/// is only N3's clamp to `out_bits`, done here in a loop compiled for AVX2 when present (the
/// same integers as `weights::apply_stage`, which takes every other stage).
fn stage_into(stage: &OutputStage, acc: &[i64], y: &mut [i32]) -> Result<(), OpError> {
    if stage.out_mult == 1 && stage.out_shift == 0 && acc.len() == y.len() {
        stage.check()?;
        let (lo, hi) = (min_signed(stage.out_bits), max_signed(stage.out_bits));
        if avx2_detected() {
            crate::avx2::clamp_i64_into(acc, y, lo, hi);
        } else {
            clamp_i64_portable(acc, y, lo, hi);
        }
        return Ok(());
    }
    crate::weights::apply_stage(stage, acc, y)
}

/// [`stage_into`]'s identity loop: `y[i] = clamp(acc[i], lo, hi)` (`lo`, `hi` within `i32`).
#[inline(always)]
pub(crate) fn clamp_i64_portable(acc: &[i64], y: &mut [i32], lo: i64, hi: i64) {
    for (o, &a) in y.iter_mut().zip(acc) {
        #[allow(clippy::cast_possible_truncation)] // clamped into i32's range
        {
            *o = a.clamp(lo, hi) as i32;
        }
    }
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
    if isa.has_avx2() && isa.is_available() {
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
