//! The engine operations of the forward pass, each behind one enum so that a quantized mode
//! (w8a8kv8, w2a8kv4, calling `tessera-golden`'s integer ops) can add a variant without touching
//! the model code:
//!
//! - [`Linear`]: every weight matrix product `y = W x` (Q, K, V, O, gate, up, down, output head);
//! - [`KvCache`]: the key/value store of one layer and the two attention products, `q . K^T`
//!   ([`KvCache::scores`]) and `p . V` ([`KvCache::weighted_sum`]).
//!
//! Variants: `F32` (the reference: dequantized weights, float everything) and `Engine` (the
//! engine's integer arithmetic: a weight operation is N5 + N12-N14 + N20 of docs/numerics.md, an
//! attention product N16-N20). The engine variants run on one of two [`Backend`]s that give the
//! same integers (and so the same `f32` bits):
//!
//! - [`Backend::Golden`]: `tessera-golden`'s functions row by row (in parallel over output rows,
//!   codes unpacked once at load), exactly `golden::ops::weight_op` and `golden::kv::KvCache::{qk,
//!   pv}`: the readable specification;
//! - [`Backend::Cpu`] (the default): `tessera-kernels-cpu`, with every linear re-packed at load
//!   into [`PreparedWeights`], SIMD dispatch by [`Isa`] (`TESSERA_FORCE_ISA`), caller-owned
//!   scratch ([`Workspace`], held by the session: no allocation per decode step) and one
//!   [`KvHeadCpu`] per (layer, KV head) holding the cache (its native push gives golden's cache
//!   bit for bit, reserved for the session's context: no allocation per push either).
//!
//! Both backends quantize activations with N5 and dequantize with N20 the same way, in the same
//! order of `f32`/`f64` operations (tests/runtime_backends.rs compares logits bit for bit).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use rayon::prelude::*;
use tessera_golden::kv::{quantize_probs, KvCache as GoldenKvCache, P_PLANE_BITS};
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::{
    accumulate_groups, dequant_factor, group_partial_sums, weight_frac_bits, OutputStage,
};
use tessera_golden::quant::{quantize_token, quantize_tokens, QuantWeights};
pub use tessera_kernels_cpu::Isa;
pub use tessera_kernels_cpu::Team;
use tessera_kernels_cpu::{
    quantize_token_isa, KvHeadCpu, KvScratch, PreparedWeights, Pv2Out, Scratch, ValueFolds,
};

use super::{Error, Result};

/// Output rows computed per parallel task.
const ROW_BLOCK: usize = 64;

/// Positions per task of the batched prefill attention ([`KvCache::attend_prefill`]).
const PREFILL_BLOCK: usize = 8;

/// Positions the CPU backend's KV caches reserve when the context length is not given
/// ([`KvCache::with_backend`]); a session reserves its model's context length instead.
pub const DEFAULT_KV_TOKENS: usize = 4096;

/// A dense f32 matrix of `n_out` rows by `n_in` columns, row-major (a GGUF weight dequantized).
#[derive(Debug, Clone)]
pub struct DenseF32 {
    pub w: Arc<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
}

/// Which implementation runs the engine's integer operations (same integers either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// `tessera-golden`'s reference functions (the readable specification; slow).
    Golden,
    /// `tessera-kernels-cpu` (re-packed weights, SIMD, multi-threaded over output rows).
    #[default]
    Cpu,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Golden => "golden",
            Backend::Cpu => "cpu",
        }
    }
}

/// A quantized weight matrix run on the engine's integer datapath.
#[derive(Debug, Clone)]
pub struct EngineLinear {
    pub w: Arc<QuantWeights>,
    /// `w.codes()`, unpacked on first use by the golden backend (`[n][k]`).
    codes: OnceLock<Arc<Vec<u8>>>,
    /// The kernels-cpu re-packing, made by [`EngineLinear::set_backend`] (or on first use).
    prepared: OnceLock<Arc<PreparedWeights>>,
    pub dp: Datapath,
    backend: Backend,
    isa: Isa,
    /// CPU backend: this layer's rows stacked with those of the layers that read the same input
    /// (Q with K and V, gate with up), run as one kernel call ([`Linear::forward_fused`]).
    fused: Option<Arc<FusedRows>>,
}

/// Several weight matrices with the same input, stacked into one [`PreparedWeights`].
#[derive(Debug)]
struct FusedRows {
    w: PreparedWeights,
    frac_bits: u32,
    scale_frac_bits: u32,
}

impl EngineLinear {
    /// Checks that `w` matches the datapath (group length, scale width) and unpacks its codes.
    pub fn new(w: Arc<QuantWeights>, dp: Datapath) -> Result<EngineLinear> {
        if w.k_group_len() != dp.w_group_len || w.w_scale_bits() != dp.w_scale_bits {
            return Err(Error::new(format!(
                "weights quantized with group {} / scale bits {} but the engine datapath has group {} / scale bits {}",
                w.k_group_len(),
                w.w_scale_bits(),
                dp.w_group_len,
                dp.w_scale_bits
            )));
        }
        if !(tessera_golden::ops::ACC_BITS_MIN..=tessera_golden::ops::ACC_BITS_MAX)
            .contains(&dp.acc_bits)
        {
            return Err(Error::new(format!(
                "acc_bits {} not in 32..=48",
                dp.acc_bits
            )));
        }
        if w.k() > OutputStage::K_MAX_LATTICE_I32 {
            return Err(Error::new(format!(
                "k = {} too large for the i32 output stage",
                w.k()
            )));
        }
        Ok(EngineLinear {
            w,
            codes: OnceLock::new(),
            prepared: OnceLock::new(),
            dp,
            backend: Backend::Golden,
            isa: Isa::selected(),
            fused: None,
        })
    }

    /// The backend [`Linear::forward`] uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The kernel path of [`Backend::Cpu`].
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Selects the backend (and the kernel path for [`Backend::Cpu`]) and does its load-time
    /// work now (the CPU re-packing, or golden's unpacked codes), not in the decode loop.
    pub fn set_backend(&mut self, backend: Backend, isa: Isa) {
        self.backend = backend;
        self.isa = isa;
        self.fused = None;
        match backend {
            Backend::Golden => {
                self.golden_codes();
            }
            Backend::Cpu => {
                self.prepared();
            }
        }
    }

    fn golden_codes(&self) -> &Arc<Vec<u8>> {
        self.codes.get_or_init(|| Arc::new(self.w.codes()))
    }

    /// The kernels-cpu re-packing of the weights (made once).
    pub fn prepared(&self) -> &Arc<PreparedWeights> {
        self.prepared
            .get_or_init(|| Arc::new(PreparedWeights::from(&*self.w)))
    }

    /// Bytes of weights (codes and group metadata) one product streams on the CPU backend.
    pub fn weight_bytes(&self) -> usize {
        self.prepared().weight_bytes()
    }

    /// The engine outputs `y[t][n]` (N12-N14 with `OutputStage::weight_lattice_i32`) of
    /// activation codes `x_i8` (`[t][k]`), computed with golden's functions, rows in parallel.
    pub fn forward_int(&self, x_i8: &[i8], n_tok: usize) -> Vec<i64> {
        let w = &*self.w;
        let (k, n_out) = (w.k(), w.n_rows());
        assert_eq!(x_i8.len(), n_tok * k, "activation codes size");
        let groups = w.groups_per_row();
        let sf = w.scale_frac_bits();
        let stage = OutputStage::weight_lattice_i32(sf);
        // Transposed: [n][t], one task per block of output rows.
        let codes = self.golden_codes();
        let mut yt = vec![0i64; n_out * n_tok];
        yt.par_chunks_mut(n_tok).enumerate().for_each(|(row, ys)| {
            let codes_row = &codes[row * k..(row + 1) * k];
            let gscale = &w.gscale_q()[row * groups..(row + 1) * groups];
            for (t, yv) in ys.iter_mut().enumerate() {
                let sums = group_partial_sums(w, row, codes_row, &x_i8[t * k..(t + 1) * k]);
                *yv = stage.apply(accumulate_groups(gscale, &sums, sf, self.dp.acc_bits));
            }
        });
        let mut y = vec![0i64; n_tok * n_out];
        for o in 0..n_out {
            for t in 0..n_tok {
                y[t * n_out + o] = yt[o * n_tok + t];
            }
        }
        y
    }

    /// N5 on each token, the engine operation, N20 dequantization (as
    /// `golden::ops::dequantize_weight_op`) on the selected backend. A non-finite activation
    /// gives NaN outputs. `ws` is only used (and grown) by the CPU backend.
    pub fn forward_ws(&self, x: &[f32], n_tok: usize, y: &mut [f32], ws: &mut LinearScratch) {
        match self.backend {
            Backend::Golden => self.forward_golden(x, n_tok, y),
            Backend::Cpu => self.forward_cpu(x, n_tok, y, ws),
        }
    }

    /// As [`Self::forward_ws`] with a scratch of its own (allocates).
    pub fn forward(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        self.forward_ws(x, n_tok, y, &mut LinearScratch::default());
    }

    /// The kernels-cpu path: N5 into `ws`, `gemm_acc` on [`PreparedWeights`], the N14 stage with
    /// `apply_stage`, N20 with the same `f64` expression as golden's `dequant_factor`.
    fn forward_cpu(&self, x: &[f32], n_tok: usize, y: &mut [f32], ws: &mut LinearScratch) {
        let w = &*self.w;
        let (k, n_out) = (w.k(), w.n_rows());
        assert_eq!(x.len(), n_tok * k, "matmul input size");
        assert_eq!(y.len(), n_tok * n_out, "matmul output size");
        let pw = self.prepared();
        if !ws.quantize_inputs(self.isa, x, n_tok, k) {
            y.fill(f32::NAN);
            return;
        }
        let stage = OutputStage::weight_lattice_i32(w.scale_frac_bits());
        let c = DequantConst::new(&stage, weight_frac_bits(w));
        if n_tok > 1 {
            // A prompt: N14 and N20 per GEMM sub-block, in the GEMM's tasks.
            let ok = pw.gemm_epilogue_in(
                Some(&ws.team),
                self.isa,
                &self.dp,
                &ws.codes[..n_tok * k],
                n_tok,
                &stage,
                &mut ws.kernels,
                &mut [&mut *y],
                dequant_epilogue(c, &ws.scale_x[..n_tok], w.row_scale()),
            );
            if ok.is_err() {
                // Shapes and the datapath were checked at construction: not reached.
                y.fill(f32::NAN);
            }
            return;
        }
        // A decode step: N14 and N20 in the GEMV's tasks (on the team the step leads).
        let ok = pw.gemv_epilogue_in(
            Some(&ws.team),
            self.isa,
            &self.dp,
            &ws.codes[..k],
            &stage,
            &mut ws.kernels,
            &mut [&mut *y],
            dequant_epilogue(c, &ws.scale_x[..1], w.row_scale()),
        );
        if ok.is_err() {
            // Shapes and the datapath were checked at construction: not reached.
            y.fill(f32::NAN);
        }
    }

    fn forward_golden(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        let w = &*self.w;
        let (k, n_out) = (w.k(), w.n_rows());
        assert_eq!(y.len(), n_tok * n_out, "matmul output size");
        let Ok(acts) = quantize_tokens(x, n_tok, k) else {
            y.fill(f32::NAN);
            return;
        };
        let yi = self.forward_int(&acts.codes_i8, n_tok);
        let stage = OutputStage::weight_lattice_i32(w.scale_frac_bits());
        let frac = weight_frac_bits(w);
        for t in 0..n_tok {
            for o in 0..n_out {
                let factor = dequant_factor(&stage, acts.scale_x[t], w.row_scale()[o], frac);
                y[t * n_out + o] = yi[t * n_out + o] as f32 * factor;
            }
        }
    }
}

/// A linear layer (no bias): the dispatch point for weight products.
#[derive(Debug, Clone)]
pub enum Linear {
    F32(DenseF32),
    /// The engine's integer arithmetic (A8 activations, W2/W4/W8 weights).
    Engine(EngineLinear),
    /// Calibration: runs `inner` and appends every input row to `inputs` (GPTQ's Hessian).
    Capture(CaptureLinear),
}

/// A linear layer that records its inputs (calibration for `tessera quantize --method gptq`).
#[derive(Debug, Clone)]
pub struct CaptureLinear {
    pub inner: Box<Linear>,
    pub inputs: Arc<std::sync::Mutex<Vec<f32>>>,
}

impl Linear {
    /// An f32 linear layer; `w.len()` must be `n_out * n_in`.
    pub fn f32(w: Arc<Vec<f32>>, n_in: usize, n_out: usize) -> Linear {
        assert_eq!(w.len(), n_in * n_out, "weight size");
        Linear::F32(DenseF32 { w, n_in, n_out })
    }

    pub fn n_in(&self) -> usize {
        match self {
            Linear::F32(d) => d.n_in,
            Linear::Engine(e) => e.w.k(),
            Linear::Capture(c) => c.inner.n_in(),
        }
    }

    pub fn n_out(&self) -> usize {
        match self {
            Linear::F32(d) => d.n_out,
            Linear::Engine(e) => e.w.n_rows(),
            Linear::Capture(c) => c.inner.n_out(),
        }
    }

    /// `y[t] = W x[t]` for `n_tok` tokens: `x` is `n_tok * n_in`, `y` is `n_tok * n_out`.
    pub fn forward(&self, x: &[f32], n_tok: usize, y: &mut [f32]) {
        self.forward_ws(x, n_tok, y, &mut LinearScratch::default());
    }

    /// As [`Self::forward`], with caller-owned scratch (no allocation once it is grown).
    pub fn forward_ws(&self, x: &[f32], n_tok: usize, y: &mut [f32], ws: &mut LinearScratch) {
        match self {
            Linear::F32(d) => matmul_f32(&d.w, d.n_in, d.n_out, x, n_tok, y),
            Linear::Engine(e) => e.forward_ws(x, n_tok, y, ws),
            Linear::Capture(c) => {
                if let Ok(mut v) = c.inputs.lock() {
                    v.extend_from_slice(x);
                }
                c.inner.forward_ws(x, n_tok, y, ws);
            }
        }
    }

    /// The engine layer inside (through a calibration wrapper), if any.
    pub fn engine(&self) -> Option<&EngineLinear> {
        match self {
            Linear::F32(_) => None,
            Linear::Engine(e) => Some(e),
            Linear::Capture(c) => c.inner.engine(),
        }
    }

    /// On the CPU backend, stacks this layer's rows with those of `others` (layers reading the
    /// same input, in output order) for [`Self::forward_fused`]. Returns whether it did: every
    /// layer must be an engine layer on the CPU backend with the same format, `k` and datapath.
    pub fn fuse_with(&mut self, others: &[&Linear]) -> bool {
        let Linear::Engine(e) = self else {
            return false;
        };
        let engines: Option<Vec<&EngineLinear>> = others
            .iter()
            .map(|l| match l {
                Linear::Engine(o) => Some(o),
                _ => None,
            })
            .collect();
        let Some(engines) = engines else {
            return false;
        };
        if e.backend != Backend::Cpu
            || engines
                .iter()
                .any(|o| o.backend != Backend::Cpu || o.dp != e.dp || o.isa != e.isa)
        {
            return false;
        }
        let mut parts: Vec<&PreparedWeights> = vec![e.prepared()];
        parts.extend(engines.iter().map(|o| o.prepared().as_ref()));
        let Some(w) = PreparedWeights::concat_rows(&parts) else {
            return false;
        };
        e.fused = Some(Arc::new(FusedRows {
            w,
            frac_bits: weight_frac_bits(&e.w),
            scale_frac_bits: e.w.scale_frac_bits(),
        }));
        true
    }

    /// `outs[i] = W_i x` for this layer and the layers it was fused with ([`Self::fuse_with`]),
    /// in one kernel call: the same values as one [`Self::forward_ws`] per layer. Returns false
    /// (computing nothing) when the layer is not fused.
    pub fn forward_fused(
        &self,
        x: &[f32],
        n_tok: usize,
        outs: &mut [&mut [f32]],
        ws: &mut LinearScratch,
    ) -> bool {
        let Linear::Engine(e) = self else {
            return false;
        };
        let Some(f) = e.fused.as_deref() else {
            return false;
        };
        let (k, total) = (f.w.k(), f.w.n_rows());
        assert_eq!(x.len(), n_tok * k, "matmul input size");
        assert_eq!(
            outs.iter().map(|o| o.len()).sum::<usize>(),
            n_tok * total,
            "fused outputs size"
        );
        if !ws.quantize_inputs(e.isa, x, n_tok, k) {
            outs.iter_mut().for_each(|o| o.fill(f32::NAN));
            return true;
        }
        let stage = OutputStage::weight_lattice_i32(f.scale_frac_bits);
        let c = DequantConst::new(&stage, f.frac_bits);
        let rs = f.w.row_scale();
        if n_tok > 1 {
            // A prompt: N14 and N20 per GEMM sub-block, in the GEMM's tasks.
            let ok = f.w.gemm_epilogue_in(
                Some(&ws.team),
                e.isa,
                &e.dp,
                &ws.codes[..n_tok * k],
                n_tok,
                &stage,
                &mut ws.kernels,
                outs,
                dequant_epilogue(c, &ws.scale_x[..n_tok], rs),
            );
            if ok.is_err() {
                outs.iter_mut().for_each(|o| o.fill(f32::NAN));
            }
            return true;
        }
        // A decode step: N14 and N20 in the GEMV's tasks (on the team the step leads).
        let ok = f.w.gemv_epilogue_in(
            Some(&ws.team),
            e.isa,
            &e.dp,
            &ws.codes[..k],
            &stage,
            &mut ws.kernels,
            outs,
            dequant_epilogue(c, &ws.scale_x[..1], rs),
        );
        if ok.is_err() {
            outs.iter_mut().for_each(|o| o.fill(f32::NAN));
        }
        true
    }

    /// Sets the backend of an engine layer (see [`EngineLinear::set_backend`]); f32: no-op.
    pub fn set_backend(&mut self, backend: Backend, isa: Isa) {
        match self {
            Linear::F32(_) => {}
            Linear::Engine(e) => e.set_backend(backend, isa),
            Linear::Capture(c) => c.inner.set_backend(backend, isa),
        }
    }

    /// Bytes of weights one product reads (f32: 4 per weight; engine: the CPU re-packing).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::F32(d) => 4 * d.n_in * d.n_out,
            Linear::Engine(e) => e.weight_bytes(),
            Linear::Capture(c) => c.inner.weight_bytes(),
        }
    }
}

/// Caller-owned buffers of a CPU-backend weight operation (grown to the largest shape seen,
/// never shrunk): N5 codes and scales and kernels-cpu's [`Scratch`] (accumulators, N14 outputs);
/// and the decode thread team (a GEMV whose caller leads it runs on it, see
/// `Model::forward_into`; a clone shares the team).
#[derive(Debug, Default, Clone)]
pub struct LinearScratch {
    pub team: Team,
    kernels: Scratch,
    codes: Vec<i8>,
    scale_x: Vec<f32>,
}

impl LinearScratch {
    /// Grows the buffers for `n_tok` tokens of `k` inputs and quantizes `x`
    /// per token (N5, on the kernel path `isa`: the same codes and scales as
    /// [`quantize_token_into`]) into `codes` / `scale_x`; false when an input is not finite.
    fn quantize_inputs(&mut self, isa: Isa, x: &[f32], n_tok: usize, k: usize) -> bool {
        grow(&mut self.codes, n_tok * k);
        grow(&mut self.scale_x, n_tok);
        let one = |(xr, (c, s)): (&[f32], (&mut [i8], &mut f32))| {
            quantize_token_isa(isa, xr, c).map(|v| *s = v).is_some()
        };
        let (x, codes, scales) = (
            &x[..n_tok * k],
            &mut self.codes[..n_tok * k],
            &mut self.scale_x[..n_tok],
        );
        if n_tok == 1 {
            // A decode step: no fork (the step may be leading the team).
            return one((x, (codes, &mut scales[0])));
        }
        // A prompt: tokens are independent, so in parallel (the same codes and scales): on
        // the team when the pass leads it (its helpers spin between loops), else on rayon.
        if self.team.is_leading() && self.team.threads() > 1 {
            const TOKENS_PER_TASK: usize = 8;
            let chunks = x.chunks(TOKENS_PER_TASK * k).zip(
                codes
                    .chunks_mut(TOKENS_PER_TASK * k)
                    .zip(scales.chunks_mut(TOKENS_PER_TASK)),
            );
            let n_tasks = n_tok.div_ceil(TOKENS_PER_TASK);
            // Each task takes the next chunks from one shared iterator (the lock is held only
            // to take them).
            let chunks = Mutex::new(chunks);
            let finite = AtomicBool::new(true);
            self.team.for_each(n_tasks, |_, _| {
                let Some((xc, (cc, sc))) = lock(&chunks).next() else {
                    return;
                };
                // Every token of the chunk (no short cut), as the rayon path's reduce.
                let failed = xc
                    .chunks(k)
                    .zip(cc.chunks_mut(k).zip(sc.iter_mut()))
                    .map(one)
                    .filter(|ok| !ok)
                    .count();
                if failed > 0 {
                    finite.store(false, Ordering::Relaxed);
                }
            });
            return finite.into_inner();
        }
        x.par_chunks(k)
            .zip(codes.par_chunks_mut(k).zip(scales.par_iter_mut()))
            .map(one)
            .reduce(|| true, |a, b| a && b)
    }
}

/// N20 as a [`PreparedWeights::gemm_epilogue`] epilogue: token `t`'s N14 outputs `y` of rows
/// `row..` into `out` (golden's `dequant_factor` per element, split by [`DequantConst`]),
/// `y * factor(scale_x[t], rs[row + i])`.
fn dequant_epilogue<'a>(
    c: DequantConst,
    scale_x: &'a [f32],
    rs: &'a [f32],
) -> impl Fn(usize, usize, &[i32], &mut [f32]) + Sync + 'a {
    move |t, row, y, out| {
        // `factor`'s operations, vectorized where the CPU allows (the same f32s).
        tessera_kernels_cpu::dequant_run(c.with_x(scale_x[t]).0, y, &rs[row..row + y.len()], out);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// N5 (`golden::quant::quantize_token`) into `out` without allocating: `Some(scale_x)`, or
/// `None` for a non-finite input: kernels-cpu's portable N5 (golden's operations in golden's
/// order; rounding by `kv::round_clamp`, without libm), the same codes and scale as golden.
pub fn quantize_token_into(x: &[f32], out: &mut [i8]) -> Option<f32> {
    quantize_token_isa(Isa::Scalar, x, out)
}

/// golden's `dequant_factor` (N20) split so the per-call constant is computed once: the same
/// `f64` operations in the same order, `((2^e / out_mult) * scale_x) * scale_w`, so the same
/// `f32` (tests/runtime_backends.rs).
#[derive(Debug, Clone, Copy)]
struct DequantConst(f64);

impl DequantConst {
    fn new(stage: &OutputStage, frac_bits: u32) -> Self {
        let shift_exp = stage.out_shift as i32 - frac_bits as i32;
        DequantConst(2f64.powi(shift_exp) / f64::from(stage.out_mult))
    }

    #[inline]
    fn with_x(self, scale_x: f32) -> DequantConst {
        DequantConst(self.0 * f64::from(scale_x))
    }

    #[inline]
    fn factor(self, scale_w: f32) -> f32 {
        (self.0 * f64::from(scale_w)) as f32
    }
}

/// Dot product with eight independent accumulators (vectorizes without fast-math).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

fn matmul_f32(w: &[f32], n_in: usize, n_out: usize, x: &[f32], n_tok: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n_tok * n_in, "matmul input size");
    assert_eq!(y.len(), n_tok * n_out, "matmul output size");
    if n_tok == 1 {
        y.par_chunks_mut(ROW_BLOCK).enumerate().for_each(|(b, ys)| {
            let r0 = b * ROW_BLOCK;
            for (j, yo) in ys.iter_mut().enumerate() {
                let o = r0 + j;
                *yo = dot(&w[o * n_in..(o + 1) * n_in], x);
            }
        });
        return;
    }
    // Several tokens: compute y transposed (rows of W outermost, so each row is read once per
    // block), then transpose back.
    let mut yt = vec![0f32; n_out * n_tok];
    yt.par_chunks_mut(ROW_BLOCK * n_tok)
        .enumerate()
        .for_each(|(b, ys)| {
            let r0 = b * ROW_BLOCK;
            for (j, yrow) in ys.chunks_mut(n_tok).enumerate() {
                let o = r0 + j;
                let wr = &w[o * n_in..(o + 1) * n_in];
                for (t, v) in yrow.iter_mut().enumerate() {
                    *v = dot(wr, &x[t * n_in..(t + 1) * n_in]);
                }
            }
        });
    for o in 0..n_out {
        for t in 0..n_tok {
            y[t * n_out + o] = yt[o * n_tok + t];
        }
    }
}

/// An f32 key/value cache of one layer: `len` positions of `n_kv_head * head_dim` values each.
#[derive(Debug, Clone, Default)]
pub struct KvF32 {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// One layer's key/value cache on the engine (KV4, N16, or KV8, N16b): on the golden backend
/// one golden cache per KV head; on the CPU backend one kernels-cpu [`KvHeadCpu`] per KV head,
/// which owns the cache (its native push computes golden's push, bit for bit; `heads` is then
/// empty). Both products use `OutputStage::IDENTITY_I32` (N14); queries are N5 per head,
/// probabilities N19 per query.
#[derive(Debug, Clone)]
pub struct KvEngine {
    /// [`Backend::Golden`]: golden's cache of each KV head (empty on [`Backend::Cpu`]).
    pub heads: Vec<GoldenKvCache>,
    pub head_dim: usize,
    /// NaN went in (a non-finite key, value, query or probability): outputs are NaN.
    poisoned: bool,
    /// [`Backend::Cpu`]: the kernels-cpu caches of the KV heads and their scratch.
    cpu: Option<Box<KvCpu>>,
}

/// The kernels-cpu side of one layer's engine cache: one [`KvHeadCpu`] per KV head, pushed
/// natively ([`KvHeadCpu::push`]), and caller-owned buffers; everything is reserved for
/// `max_tokens` positions when the cache is made, so neither a push nor a product allocates
/// before the cache holds that many (the session's context length).
#[derive(Debug, Clone)]
struct KvCpu {
    isa: Isa,
    mirrors: Vec<KvHeadCpu>,
    bufs: AttnBufs,
    /// One set of buffers per member of the decode team ([`KvCache::attend_decode`]).
    members: MemberBufs,
    /// Positions reserved for (buffers of new team members are sized for it too).
    max_tokens: usize,
    /// `head_dim` zeros: what a non-finite key or value is replaced by (as [`KvCache::push`]).
    zeros: Vec<f32>,
}

/// Per-member buffers (scratch only: a clone starts empty).
#[derive(Debug, Default)]
struct MemberBufs(Vec<Mutex<AttnBufs>>);

impl Clone for MemberBufs {
    fn clone(&self) -> Self {
        MemberBufs::default()
    }
}

/// Buffers of one query's attention products on the CPU backend (one set per thread).
#[derive(Debug, Clone, Default)]
struct AttnBufs {
    scratch: KvScratch,
    codes: Vec<i8>,
    /// The low probability plane (N22); `codes` holds the high one.
    codes_lo: Vec<i8>,
    acc: Vec<i64>,
    y: Vec<i32>,
    /// `P x V` outputs of both planes (N22).
    pv2: Pv2Out,
    /// Scores / probabilities of the batched prefill and of [`KvCache::attend_decode`].
    scores: Vec<f32>,
    /// Seconds in q.K scores, softmax and p.V of [`KvCache::attend_decode`] tasks (profiling).
    secs: [f64; 3],
}

impl AttnBufs {
    /// Buffers for the products of `mirror`'s head at up to `tokens` positions, sized now.
    fn new(mirror: &KvHeadCpu, head_dim: usize, tokens: usize) -> AttnBufs {
        let mut scratch = KvScratch::default();
        scratch.reserve(mirror, tokens);
        let mut pv2 = Pv2Out::default();
        pv2.reserve(head_dim);
        AttnBufs {
            scratch,
            codes: vec![0; head_dim.max(tokens)],
            codes_lo: vec![0; tokens],
            acc: vec![0; tokens],
            y: vec![0; tokens],
            pv2,
            scores: vec![0.0; tokens],
            secs: [0.0; 3],
        }
    }
}

/// Which cache a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    F32,
    /// Golden cache with `bits` 4 or 8 on datapath `dp`.
    Engine {
        dp: Datapath,
        bits: u32,
    },
}

/// One layer's key/value cache: the dispatch point for the two attention products.
#[derive(Debug, Clone)]
pub enum KvCache {
    F32(KvF32),
    Engine(KvEngine),
}

impl KvCache {
    pub fn f32(n_kv_head: usize, head_dim: usize) -> KvCache {
        KvCache::F32(KvF32 {
            k: Vec::new(),
            v: Vec::new(),
            n_kv_head,
            head_dim,
        })
    }

    /// An empty cache of `kind` on the golden backend.
    pub fn new(kind: KvKind, n_kv_head: usize, head_dim: usize) -> Result<KvCache> {
        Self::with_backend(kind, n_kv_head, head_dim, Backend::Golden, Isa::Scalar)
    }

    /// An empty cache of `kind` whose engine products run on `backend` (kernel path `isa`),
    /// with the CPU backend's buffers reserved for [`DEFAULT_KV_TOKENS`] positions (beyond
    /// them they grow, amortized); [`Self::with_context`] when the context length is known.
    pub fn with_backend(
        kind: KvKind,
        n_kv_head: usize,
        head_dim: usize,
        backend: Backend,
        isa: Isa,
    ) -> Result<KvCache> {
        Self::with_context(kind, n_kv_head, head_dim, backend, isa, DEFAULT_KV_TOKENS)
    }

    /// As [`Self::with_backend`], with the CPU backend's caches and buffers reserved for
    /// `max_tokens` positions (a session's context length): no push or product allocates until
    /// the cache holds that many.
    pub fn with_context(
        kind: KvKind,
        n_kv_head: usize,
        head_dim: usize,
        backend: Backend,
        isa: Isa,
        max_tokens: usize,
    ) -> Result<KvCache> {
        match kind {
            KvKind::F32 => Ok(KvCache::f32(n_kv_head, head_dim)),
            KvKind::Engine { dp, bits } => {
                let err = |e| Error::new(format!("KV cache: {e}"));
                if backend == Backend::Cpu {
                    let mut mirrors = (0..n_kv_head)
                        .map(|_| KvHeadCpu::with_bits(&dp, head_dim, bits))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(err)?;
                    for m in &mut mirrors {
                        m.reserve(max_tokens);
                    }
                    // Golden's checks of the datapath (with_bits above) for zero heads too.
                    GoldenKvCache::with_bits(&dp, head_dim, bits).map_err(err)?;
                    let bufs = match mirrors.first() {
                        Some(m) => AttnBufs::new(m, head_dim, max_tokens),
                        None => AttnBufs::default(),
                    };
                    return Ok(KvCache::Engine(KvEngine {
                        heads: Vec::new(),
                        head_dim,
                        poisoned: false,
                        cpu: Some(Box::new(KvCpu {
                            isa,
                            mirrors,
                            bufs,
                            members: MemberBufs::default(),
                            max_tokens,
                            zeros: vec![0.0; head_dim],
                        })),
                    }));
                }
                let heads = (0..n_kv_head)
                    .map(|_| GoldenKvCache::with_bits(&dp, head_dim, bits))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(err)?;
                Ok(KvCache::Engine(KvEngine {
                    heads,
                    head_dim,
                    poisoned: false,
                    cpu: None,
                }))
            }
        }
    }

    /// Bytes the cache holds (f32: 4 per value; engine: golden's `KvMemory::total`, which the
    /// CPU backend's caches compute with golden's formula from their token counts).
    pub fn memory_bytes(&self) -> usize {
        match self {
            KvCache::F32(c) => 4 * (c.k.len() + c.v.len()),
            KvCache::Engine(KvEngine { cpu: Some(cpu), .. }) => {
                cpu.mirrors.iter().map(|m| m.memory().total()).sum()
            }
            KvCache::Engine(e) => e.heads.iter().map(GoldenKvCache::memory_bytes).sum(),
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        match self {
            KvCache::F32(c) => c.k.len() / (c.n_kv_head * c.head_dim).max(1),
            KvCache::Engine(KvEngine { cpu: Some(cpu), .. }) => {
                cpu.mirrors.first().map_or(0, KvHeadCpu::len)
            }
            KvCache::Engine(e) => e.heads.first().map_or(0, GoldenKvCache::len),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one position's keys and values (`n_kv_head * head_dim` each, RoPE applied to k).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        match self {
            KvCache::F32(c) => {
                assert_eq!(k.len(), c.n_kv_head * c.head_dim, "k size");
                assert_eq!(v.len(), c.n_kv_head * c.head_dim, "v size");
                c.k.extend_from_slice(k);
                c.v.extend_from_slice(v);
            }
            KvCache::Engine(KvEngine {
                head_dim,
                poisoned,
                cpu: Some(cpu),
                ..
            }) => {
                let hd = *head_dim;
                assert_eq!(k.len(), cpu.mirrors.len() * hd, "k size");
                assert_eq!(v.len(), cpu.mirrors.len() * hd, "v size");
                let finite = k.iter().chain(v).all(|x| x.is_finite());
                *poisoned |= !finite;
                for (h, m) in cpu.mirrors.iter_mut().enumerate() {
                    let (kh, vh) = if finite {
                        (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd])
                    } else {
                        (&cpu.zeros[..], &cpu.zeros[..])
                    };
                    // As golden's push below: fails only on a 4-bit group whose range
                    // overflows f32 (then nothing is pushed).
                    *poisoned |= m.push(kh, vh).is_err();
                }
            }
            KvCache::Engine(e) => {
                let hd = e.head_dim;
                assert_eq!(k.len(), e.heads.len() * hd, "k size");
                assert_eq!(v.len(), e.heads.len() * hd, "v size");
                let finite = k.iter().chain(v).all(|x| x.is_finite());
                e.poisoned |= !finite;
                for (h, cache) in e.heads.iter_mut().enumerate() {
                    let (kh, vh) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
                    let r = if finite {
                        cache.push(kh, vh)
                    } else {
                        let zeros = vec![0f32; hd];
                        cache.push(&zeros, &zeros)
                    };
                    // Shapes are checked above and inputs are finite: push fails only on a
                    // 4-bit group whose range overflows f32.
                    e.poisoned |= r.is_err();
                }
            }
        }
    }

    /// As [`Self::push`] (one position's keys and values, `n_kv_head * head_dim` each, RoPE
    /// applied to `k`); on the CPU backend the native push of each KV head's [`KvHeadCpu`]
    /// (which allocates nothing): in order on the calling thread, or, when a head quantizes a
    /// group to 4 bits in this push (once every `kv_group_len` steps), one task per KV head on
    /// the decode `team` when the caller leads it (else in order: tasks of a few microseconds
    /// are not worth a rayon fork).
    pub fn push_decode(&mut self, team: &Team, k: &[f32], v: &[f32]) {
        let KvCache::Engine(KvEngine {
            head_dim,
            poisoned,
            cpu: Some(cpu),
            ..
        }) = self
        else {
            self.push(k, v);
            return;
        };
        let (hd, n_kv) = (*head_dim, cpu.mirrors.len());
        assert_eq!(k.len(), n_kv * hd, "k size");
        assert_eq!(v.len(), n_kv * hd, "v size");
        // As [`Self::push`], the heads in any order.
        let finite = k.iter().chain(v).all(|x| x.is_finite());
        *poisoned |= !finite;
        let zeros = &cpu.zeros[..];
        // As golden's push: fails only on a 4-bit group whose range overflows f32.
        let push = |h: usize, mirror: &mut KvHeadCpu| -> bool {
            if finite {
                let r = h * hd..(h + 1) * hd;
                mirror.push(&k[r.clone()], &v[r]).is_ok()
            } else {
                mirror.push(zeros, zeros).is_ok()
            }
        };
        if !cpu.mirrors.iter().any(KvHeadCpu::next_push_evicts) {
            // One token's N5 codes per head, well under a microsecond: not worth a team loop.
            for (h, mirror) in cpu.mirrors.iter_mut().enumerate() {
                *poisoned |= !push(h, mirror);
            }
            return;
        }
        let failed = AtomicBool::new(false);
        let mirrors = Mutex::new(cpu.mirrors.iter_mut().enumerate());
        team.for_each(n_kv, |_, _| {
            let next = lock(&mirrors).next();
            if let Some((h, mirror)) = next {
                if !push(h, mirror) {
                    failed.store(true, Ordering::Relaxed);
                }
            }
        });
        *poisoned |= failed.into_inner();
    }

    /// The attention of the last position pushed (a decode step) on the CPU backend, on the
    /// decode `team` (when the caller leads it, else in order on the calling thread): every
    /// query head's output into `att` (`n_head * head_dim`) from `q` (RoPE applied), one task
    /// per query head (scores, softmax, `P x V` with the buffers of the member that runs it):
    /// the same integers and `f32` operations as [`Self::scores`], softmax and
    /// [`Self::weighted_sum`] head after head. With `secs`, adds the seconds the tasks spent in
    /// scores, softmax and `P x V` (summed over threads). Returns false, doing nothing, when the
    /// cache is not a CPU-backend engine cache.
    pub fn attend_decode(
        &mut self,
        team: &Team,
        q: &[f32],
        n_head: usize,
        scale: f32,
        att: &mut [f32],
        secs: Option<&mut [f64; 3]>,
    ) -> bool {
        let KvCache::Engine(KvEngine {
            head_dim,
            poisoned,
            cpu: Some(cpu),
            ..
        }) = self
        else {
            return false;
        };
        let (hd, n_kv) = (*head_dim, cpu.mirrors.len());
        assert_eq!(q.len(), n_head * hd, "q size");
        assert_eq!(att.len(), n_head * hd, "attention output size");
        assert!(
            n_kv > 0 && n_head.is_multiple_of(n_kv),
            "query heads are a multiple of KV heads"
        );
        // Every query head, one task each, with the buffers of the member that runs it.
        cpu.add_members(team.threads().max(1), hd);
        let (isa, mirrors, bufs, poisoned) = (cpu.isa, &cpu.mirrors, &cpu.members.0, *poisoned);
        let group = n_head / n_kv;
        let timed = secs.is_some();
        team.for_each_chunk_mut(att, hd, |head, out, member| {
            let mut guard = lock(&bufs[member.min(bufs.len() - 1)]);
            let b = &mut *guard;
            let m = &mirrors[head / group];
            let len = m.len();
            grow(&mut b.scores, len);
            let mut sc = std::mem::take(&mut b.scores);
            let s = &mut sc[..len];
            let t0 = timed.then(std::time::Instant::now);
            let qh = &q[head * hd..(head + 1) * hd];
            attn_scores(m, isa, b, len, poisoned, qh, scale, s);
            let t1 = timed.then(std::time::Instant::now);
            super::model::softmax(s);
            let t2 = timed.then(std::time::Instant::now);
            attn_weighted_sum(m, isa, b, len, poisoned, None, s, out);
            if let (Some(t0), Some(t1), Some(t2)) = (t0, t1, t2) {
                let t3 = std::time::Instant::now();
                b.secs[0] += (t1 - t0).as_secs_f64();
                b.secs[1] += (t2 - t1).as_secs_f64();
                b.secs[2] += (t3 - t2).as_secs_f64();
            }
            b.scores = sc;
        });
        if let Some(secs) = secs {
            for b in bufs {
                let mut b = lock(b);
                for (s, bs) in secs.iter_mut().zip(&mut b.secs) {
                    *s += std::mem::take(bs);
                }
            }
        }
        true
    }

    /// Whether [`Self::attend_prefill`] runs (an engine cache on the CPU backend).
    pub fn batches_prefill(&self) -> bool {
        matches!(self, KvCache::Engine(KvEngine { cpu: Some(_), .. }))
    }

    /// The attention of `n` new positions on the CPU backend, batched: pushes every position's
    /// keys and values (`k`, `v`: `n * n_kv_head * head_dim`, RoPE applied) and computes the
    /// output of every (position, query head) into `att` (`n * n_head * head_dim`) from `q`
    /// (RoPE applied): position `i` attends to the cache as it was right after its own push
    /// (the KV4 mirrors retain the 8-bit codes of tokens quantized meanwhile), the same integers
    /// and `f32` operations as pushing and attending token by token. Returns false, doing
    /// nothing, when the cache is not a CPU-backend engine cache.
    ///
    /// Work on rayon: one task per KV head pushes all `n` positions into it (golden's push and
    /// the mirror's sync; heads are independent), then spawns one task per block of
    /// [`PREFILL_BLOCK`] positions for the query heads of its group (each with the value folds of
    /// its positions). The pushes of one head thus overlap the attention of another, and work
    /// stealing balances the blocks (later positions see more keys). When the caller leads
    /// `team` (a prompt's forward pass, `Model::forward_into`), the same tasks run on it
    /// instead, as one loop: the heads' pushes first, then every (head, block), each waiting
    /// until its head is pushed.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_prefill(
        &mut self,
        team: &Team,
        k: &[f32],
        v: &[f32],
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        att: &mut [f32],
    ) -> bool {
        let KvCache::Engine(KvEngine {
            head_dim,
            poisoned,
            cpu: Some(cpu),
            ..
        }) = self
        else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let (hd, n_kv) = (*head_dim, cpu.mirrors.len());
        let kvd = n_kv * hd;
        let qd = n_head * hd;
        assert_eq!(k.len(), n * kvd, "k size");
        assert_eq!(v.len(), n * kvd, "v size");
        assert_eq!(q.len(), n * qd, "q size");
        assert_eq!(att.len(), n * qd, "attention output size");
        assert!(
            n_kv > 0 && n_head.is_multiple_of(n_kv),
            "query heads are a multiple of KV heads"
        );
        let group = n_head / n_kv;
        let pos0 = cpu.mirrors.first().map_or(0, KvHeadCpu::len);
        // Whether each position's keys and values are finite (else zeros are pushed, as
        // `push` does), and whether the cache was poisoned right after each push by a
        // non-finite input (as a token-by-token run sees; push failures are applied below).
        let finite: Vec<bool> = k
            .chunks_exact(kvd)
            .zip(v.chunks_exact(kvd))
            .map(|(kr, vr)| kr.iter().chain(vr).all(|x| x.is_finite()))
            .collect();
        let poisoned_after: Vec<bool> = finite
            .iter()
            .scan(*poisoned, |p, &f| {
                *p |= !f;
                Some(*p)
            })
            .collect();
        // The first position whose push failed on any head (only a 4-bit group whose range
        // overflows f32: shapes are checked and inputs finite).
        let first_failed = AtomicUsize::new(usize::MAX);
        // Per KV head, per block of positions: each position's outputs of the head's group.
        let mut outs: Vec<Vec<Vec<&mut [f32]>>> = (0..n_kv)
            .map(|_| (0..n.div_ceil(PREFILL_BLOCK)).map(|_| Vec::new()).collect())
            .collect();
        for (i, row) in att.chunks_mut(qd).enumerate() {
            for (h, part) in row.chunks_mut(group * hd).enumerate() {
                outs[h][i / PREFILL_BLOCK].push(part);
            }
        }
        let on_team = team.is_leading() && team.threads() > 1;
        let members = rayon::current_num_threads().max(team.threads()).max(1);
        cpu.add_members(members, hd);
        let (isa, bufs, zeros) = (cpu.isa, &cpu.members.0, &cpu.zeros);
        let (finite, poisoned_after, first_failed) = (&finite, &poisoned_after, &first_failed);
        // Head h's pushes of every position, keeping the 8-bit history for the attentions.
        let push_head = |h: usize, mirror: &mut KvHeadCpu| {
            for (i, &fin) in finite.iter().enumerate() {
                let (kh, vh) = if fin {
                    let r = i * kvd + h * hd..i * kvd + (h + 1) * hd;
                    (&k[r.clone()], &v[r])
                } else {
                    (&zeros[..], &zeros[..])
                };
                if mirror.push_retaining(kh, vh, true).is_err() {
                    first_failed.fetch_min(i, Ordering::Relaxed);
                }
            }
        };
        // The attentions of block `blk` of positions of KV head `h` (after its pushes).
        let block = |m: &KvHeadCpu, h: usize, blk: usize, outs_b: &mut [&mut [f32]], me: usize| {
            let mut guard = lock(&bufs[me.min(bufs.len() - 1)]);
            let b = &mut *guard;
            let mut folds = ValueFolds::default();
            for (j, out_i) in outs_b.iter_mut().enumerate() {
                let i = blk * PREFILL_BLOCK + j;
                let len = pos0 + i + 1;
                grow(&mut b.scores, group * len);
                let mut sc = std::mem::take(&mut b.scores);
                // The value folds at this length, shared by the group's query heads and both
                // probability planes.
                let folds_ok = m.value_folds_at(len, &mut folds).is_ok();
                let pz = poisoned_after[i] || !folds_ok;
                // The group's query heads see the same keys: their scores, then their
                // softmaxes together (row by row the same values), then their outputs.
                let sc_g = &mut sc[..group * len];
                for (g, s) in sc_g.chunks_exact_mut(len).enumerate() {
                    let head = h * group + g;
                    let qh = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
                    attn_scores(m, isa, b, len, pz, qh, scale, s);
                }
                super::model::softmax_rows(sc_g, len);
                for (out, s) in out_i.chunks_mut(hd).zip(sc_g.chunks_exact(len)) {
                    attn_weighted_sum(m, isa, b, len, pz, Some(&folds), s, out);
                }
                b.scores = sc;
            }
        };
        if on_team {
            // On the team the pass leads, one loop: the heads' pushes (tasks 0..n_kv, claimed
            // first), then every (head, block) attention, each waiting until its head's push
            // is done (the push was claimed earlier, so it is running; a helper that finished
            // its push goes on to the blocks of the heads already pushed instead of idling).
            // The same work as below, so the same results.
            let n_kv = cpu.mirrors.len();
            let heads: Vec<RwLock<&mut KvHeadCpu>> =
                cpu.mirrors.iter_mut().map(RwLock::new).collect();
            let pushed: Vec<AtomicBool> = (0..n_kv).map(|_| AtomicBool::new(false)).collect();
            /// A (head, block, outputs) attention task, taken once by the task that runs it.
            type BlockTask<'o> = Mutex<Option<(usize, usize, Vec<&'o mut [f32]>)>>;
            let blocks: Vec<BlockTask<'_>> = outs
                .into_iter()
                .enumerate()
                .flat_map(|(h, o)| {
                    o.into_iter()
                        .enumerate()
                        .map(move |(blk, b)| Mutex::new(Some((h, blk, b))))
                })
                .collect();
            /// Marks a head pushed when its push task ends, even by a panic (which the team
            /// resumes on the leader), so that no block task waits forever.
            struct Pushed<'a>(&'a AtomicBool);
            impl Drop for Pushed<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            team.for_each(n_kv + blocks.len(), |i, me| {
                if i < n_kv {
                    let _done = Pushed(&pushed[i]);
                    let mut m = heads[i].write().unwrap_or_else(PoisonError::into_inner);
                    push_head(i, &mut m);
                    return;
                }
                let Some((h, blk, mut outs_b)) = lock(&blocks[i - n_kv]).take() else {
                    return;
                };
                let mut rounds = 0u32;
                while !pushed[h].load(Ordering::Acquire) {
                    if rounds < 1 << 10 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                    rounds = rounds.saturating_add(1);
                }
                let m = heads[h].read().unwrap_or_else(PoisonError::into_inner);
                block(&m, h, blk, &mut outs_b, me);
            });
        } else {
            let (push_head, block) = (&push_head, &block);
            rayon::scope(|s| {
                let per_head = cpu.mirrors.iter_mut().zip(outs);
                for (h, (mirror, outs_h)) in per_head.enumerate() {
                    s.spawn(move |s| {
                        push_head(h, mirror);
                        let m: &KvHeadCpu = mirror;
                        for (blk, mut outs_b) in outs_h.into_iter().enumerate() {
                            s.spawn(move |_| {
                                let me = rayon::current_thread_index().unwrap_or(0);
                                block(m, h, blk, &mut outs_b, me);
                            });
                        }
                    });
                }
            });
        }
        let failed = first_failed.load(Ordering::Relaxed);
        if failed < n {
            // A token-by-token run is poisoned from that push on: NaN outputs.
            att[failed * qd..].fill(f32::NAN);
        }
        *poisoned |= poisoned_after[n - 1] || failed < n;
        for m in &mut cpu.mirrors {
            m.trim_history();
        }
        true
    }

    /// Drops positions from `len` on (to reuse a prefix). The engine cache cannot drop
    /// quantized tokens: an error unless `len` is the current length.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            KvCache::F32(c) => {
                let w = c.n_kv_head * c.head_dim;
                c.k.truncate(len * w);
                c.v.truncate(len * w);
                Ok(())
            }
            KvCache::Engine(_) => {
                if self.len() == len {
                    Ok(())
                } else {
                    Err(Error::new("the engine KV cache cannot be truncated"))
                }
            }
        }
    }

    /// `scores[j] = scale * (q . K[j, kv_head])` for positions `j < scores.len()`.
    pub fn scores(&mut self, kv_head: usize, q: &[f32], scale: f32, scores: &mut [f32]) {
        if let KvCache::Engine(KvEngine {
            cpu: Some(cpu),
            poisoned,
            ..
        }) = self
        {
            cpu.scores(*poisoned, kv_head, q, scale, scores);
            return;
        }
        match self {
            KvCache::F32(c) => {
                let (hd, w) = (c.head_dim, c.n_kv_head * c.head_dim);
                for (j, s) in scores.iter_mut().enumerate() {
                    let k = &c.k[j * w + kv_head * hd..j * w + (kv_head + 1) * hd];
                    *s = dot(q, k) * scale;
                }
            }
            KvCache::Engine(e) => {
                let cache = &e.heads[kv_head];
                assert_eq!(
                    scores.len(),
                    cache.len(),
                    "engine scores cover the whole cache"
                );
                let stage = OutputStage::IDENTITY_I32;
                let out = match quantize_token(q) {
                    Ok(qc) if !e.poisoned => cache
                        .qk(&qc.codes_i8, &stage)
                        .ok()
                        .map(|o| o.scores_f32(&stage, qc.scale_x)),
                    _ => None,
                };
                match out {
                    Some(v) => {
                        for (s, x) in scores.iter_mut().zip(v) {
                            *s = x * scale;
                        }
                    }
                    None => scores.fill(f32::NAN),
                }
            }
        }
    }

    /// `out = sum_j p[j] * V[j, kv_head]` for positions `j < p.len()`.
    pub fn weighted_sum(&mut self, kv_head: usize, p: &[f32], out: &mut [f32]) {
        if let KvCache::Engine(KvEngine {
            cpu: Some(cpu),
            poisoned,
            ..
        }) = self
        {
            cpu.weighted_sum(*poisoned, kv_head, p, out);
            return;
        }
        match self {
            KvCache::F32(c) => {
                let (hd, w) = (c.head_dim, c.n_kv_head * c.head_dim);
                out.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    let v = &c.v[j * w + kv_head * hd..j * w + (kv_head + 1) * hd];
                    for (o, &vi) in out.iter_mut().zip(v) {
                        *o += pj * vi;
                    }
                }
            }
            KvCache::Engine(e) => {
                let cache = &e.heads[kv_head];
                assert_eq!(p.len(), cache.len(), "engine P x V covers the whole cache");
                let stage = OutputStage::IDENTITY_I32;
                let res = match quantize_probs(p) {
                    Ok(pc) if !e.poisoned => cache
                        .pv_probs(&pc, &stage)
                        .ok()
                        .map(|o| o.output_f32(&stage, pc.scale_p)),
                    _ => None,
                };
                match res {
                    Some(v) => out.copy_from_slice(&v),
                    None => out.fill(f32::NAN),
                }
            }
        }
    }
}

impl KvCpu {
    /// Buffers for `members` members of the decode team (or rayon threads), each sized for
    /// `max_tokens` positions.
    fn add_members(&mut self, members: usize, head_dim: usize) {
        while self.members.0.len() < members {
            let b = match self.mirrors.first() {
                Some(m) => AttnBufs::new(m, head_dim, self.max_tokens),
                None => AttnBufs::default(),
            };
            self.members.0.push(Mutex::new(b));
        }
    }

    fn scores(&mut self, poisoned: bool, kv_head: usize, q: &[f32], scale: f32, out: &mut [f32]) {
        let m = &self.mirrors[kv_head];
        attn_scores(
            m,
            self.isa,
            &mut self.bufs,
            m.len(),
            poisoned,
            q,
            scale,
            out,
        );
    }

    fn weighted_sum(&mut self, poisoned: bool, kv_head: usize, p: &[f32], out: &mut [f32]) {
        let m = &self.mirrors[kv_head];
        attn_weighted_sum(m, self.isa, &mut self.bufs, m.len(), poisoned, None, p, out);
    }
}

/// As golden's `QkOut::scores_f32` then `* scale`, for the cache as it was at `n` tokens: group
/// `j`'s scores with `dequant_factor(stage, scale_q, s_ref_j, 4)`, window tokens with their key
/// scale and 0.
#[allow(clippy::too_many_arguments)]
fn attn_scores(
    m: &KvHeadCpu,
    isa: Isa,
    b: &mut AttnBufs,
    n: usize,
    poisoned: bool,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    assert_eq!(out.len(), n, "engine scores cover the whole cache");
    let stage = OutputStage::IDENTITY_I32;
    let hd = q.len();
    grow(&mut b.codes, hd);
    let scale_q = match tessera_kernels_cpu::kv::quantize_query_into(q, &mut b.codes[..hd]) {
        Some(s) if !poisoned => s,
        _ => {
            out.fill(f32::NAN);
            return;
        }
    };
    grow(&mut b.acc, n);
    grow(&mut b.y, n);
    let (acc, y) = (&mut b.acc[..n], &mut b.y[..n]);
    if m.qk_at(isa, n, &b.codes[..hd], &stage, &mut b.scratch, acc, y)
        .is_err()
    {
        out.fill(f32::NAN);
        return;
    }
    let c = DequantConst::new(&stage, 4).with_x(scale_q);
    // Tokens in 4-bit key groups (then the window); one factor per group.
    let n4 = m.n4_at(n);
    let gl = m.kv_group_len().max(1);
    for (j, (og, yg)) in out[..n4].chunks_mut(gl).zip(y[..n4].chunks(gl)).enumerate() {
        let f = c.factor(m.key_group_s_ref(j));
        for (o, &yv) in og.iter_mut().zip(yg) {
            *o = (yv as f32 * f) * scale;
        }
    }
    let c0 = DequantConst::new(&stage, 0).with_x(scale_q);
    for ((o, &yv), &sk) in out[n4..]
        .iter_mut()
        .zip(&y[n4..])
        .zip(m.window_key_scales_at(n))
    {
        *o = (yv as f32 * c0.factor(sk)) * scale;
    }
}

/// As golden's `PvPlanes::output_f32` (N22) for the cache as it was at `n` tokens: `P x V` of
/// each probability plane, then per part `y = 128 * y_hi + y_lo`, the 4-bit part (`frac_bits`
/// 4) plus the window part (`frac_bits` 0), each dequantized with its `s_ref`. `folds`: the
/// value folds at `n` ([`KvHeadCpu::value_folds_at`]), or computed here.
#[allow(clippy::too_many_arguments)]
fn attn_weighted_sum(
    m: &KvHeadCpu,
    isa: Isa,
    b: &mut AttnBufs,
    n: usize,
    poisoned: bool,
    folds: Option<&ValueFolds>,
    p: &[f32],
    out: &mut [f32],
) {
    assert_eq!(p.len(), n, "engine P x V covers the whole cache");
    let stage = OutputStage::IDENTITY_I32;
    if poisoned {
        out.fill(f32::NAN);
        return;
    }
    grow(&mut b.codes, n);
    grow(&mut b.codes_lo, n);
    let Some(scale_p) =
        tessera_kernels_cpu::kv::quantize_probs_into(p, &mut b.codes[..n], &mut b.codes_lo[..n])
    else {
        out.fill(f32::NAN);
        return;
    };
    let Ok((s4, sw)) = m.pv2_at(
        isa,
        n,
        folds,
        &b.codes[..n],
        &b.codes_lo[..n],
        &stage,
        &mut b.scratch,
        &mut b.pv2,
    ) else {
        out.fill(f32::NAN);
        return;
    };
    let f4 = DequantConst::new(&stage, 4).with_x(scale_p).factor(s4);
    let fw = DequantConst::new(&stage, 0).with_x(scale_p).factor(sw);
    let o2 = &b.pv2;
    let (y4h, y4l, ywh, ywl) = (&o2.y4_hi[..], &o2.y4_lo[..], &o2.yw_hi[..], &o2.yw_lo[..]);
    // With every plane output below 2^23 in magnitude, `128 * hi + lo` is below 2^31: the sum
    // in `i32` and its `f32` are those of the `i64` sum (the same integer, rounded once), in a
    // loop that vectorizes (no `i64 -> f32` conversion without AVX-512).
    let small = |v: &[i32]| v.iter().fold(0u32, |m, &x| m | x.unsigned_abs()) < 1 << 23;
    if small(y4h) && small(y4l) && small(ywh) && small(ywl) {
        let planes = y4h.iter().zip(y4l).zip(ywh.iter().zip(ywl));
        for (o, ((&ah, &al), (&bh, &bl))) in out.iter_mut().zip(planes) {
            let a = (ah << P_PLANE_BITS) + al;
            let b = (bh << P_PLANE_BITS) + bl;
            *o = a as f32 * f4 + b as f32 * fw;
        }
        return;
    }
    let planes = y4h.iter().zip(y4l).zip(ywh.iter().zip(ywl));
    for (o, ((&ah, &al), (&bh, &bl))) in out.iter_mut().zip(planes) {
        let a = (i64::from(ah) << P_PLANE_BITS) + i64::from(al);
        let b = (i64::from(bh) << P_PLANE_BITS) + i64::from(bl);
        *o = a as f32 * f4 + b as f32 * fw;
    }
}

#[cfg(test)]
mod tests {
    use super::{quantize_token_into, Isa};
    use tessera_golden::quant::quantize_token;
    use tessera_kernels_cpu::quantize_token_isa;

    /// The N5 the weight products use (`quantize_token_isa`, on every available path, SIMD body
    /// and scalar tail) and [`quantize_token_into`] give golden's codes and scale: tokens holding
    /// 127 (scale exactly 1, so each quotient is the value itself) and the ties, their
    /// neighbours, and a sweep of floats of `|y| <= 127`, cut at several lengths.
    #[test]
    fn n5_token_paths_equal_golden_at_ties_and_a_sweep() {
        let mut ys = vec![0.0f32, -0.0, 1e-45, -1e-45, 0.499_999_97, -0.499_999_97];
        for n in -127..127 {
            let tie = n as f32 + 0.5;
            ys.extend([tie, tie.next_up(), tie.next_down(), n as f32]);
        }
        let top = 127.0f32.to_bits();
        ys.extend((0..=top).step_by(997).flat_map(|b| {
            let y = f32::from_bits(b);
            [y, -y]
        }));
        for (i, chunk) in ys.chunks(509).enumerate() {
            let mut row = vec![127.0f32];
            row.extend_from_slice(chunk);
            let row = &row[..row.len() - i % 7];
            let want = quantize_token(row).expect("finite");
            let mut got = vec![0i8; row.len()];
            let s = quantize_token_into(row, &mut got).expect("finite");
            assert_eq!(
                (s.to_bits(), &got),
                (want.scale_x.to_bits(), &want.codes_i8)
            );
            for isa in Isa::available() {
                let s = quantize_token_isa(isa, row, &mut got).expect("finite");
                assert_eq!(
                    (s.to_bits(), &got),
                    (want.scale_x.to_bits(), &want.codes_i8),
                    "{isa:?}"
                );
            }
        }
    }
}
