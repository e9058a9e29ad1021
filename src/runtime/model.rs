//! The f32 reference forward pass of a Llama-architecture model (as llama.cpp's LLM_ARCH_LLAMA):
//! RMSNorm, "normal" (adjacent-pair) RoPE on the GGUF-permuted Q/K weights, grouped-query
//! attention with a KV cache, SiLU-gated FFN, and an output head (tied to the token embedding
//! when the file has no `output.weight`).
//!
//! Weight products and attention products go through [`Linear`] and [`KvCache`] (module
//! [`super::ops`]), the dispatch points for the later quantized modes.

use std::sync::{Arc, Mutex, PoisonError};

use rayon::prelude::*;

use super::gguf::Gguf;
use super::ops::{Backend, Isa, KvCache, KvKind, Linear, LinearScratch, Team};
use super::{Error, Result};

/// Sizes and constants of a Llama-architecture model, all read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Training context length (the most positions a session accepts).
    pub ctx_len: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

/// Most of any one size we accept from metadata (bounds allocations before tensors are checked).
const MAX_DIM: u64 = 1 << 20;

impl LlamaConfig {
    /// Reads the config from `{arch}.*` metadata; the architecture must be `llama`.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::new(format!(
                "unsupported model architecture {arch:?} (only \"llama\" is implemented)"
            )));
        }
        let size = |key: &str| -> Result<usize> {
            let v = g.get_u64(&format!("{arch}.{key}"))?;
            if v == 0 || v > MAX_DIM {
                return Err(Error::new(format!(
                    "GGUF metadata {arch}.{key} = {v} is out of range 1..={MAX_DIM}"
                )));
            }
            Ok(v as usize)
        };
        let n_layer = size("block_count")?;
        let d_model = size("embedding_length")?;
        let n_ff = size("feed_forward_length")?;
        let n_head = size("attention.head_count")?;
        let n_head_kv = match g.get(&format!("{arch}.attention.head_count_kv")) {
            Some(_) => size("attention.head_count_kv")?,
            None => n_head,
        };
        let ctx_len = size("context_length")?;
        if !d_model.is_multiple_of(n_head) {
            return Err(Error::new(format!(
                "embedding_length {d_model} is not a multiple of head_count {n_head}"
            )));
        }
        let head_dim = match g.get(&format!("{arch}.attention.key_length")) {
            Some(_) => size("attention.key_length")?,
            None => d_model / n_head,
        };
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(Error::new(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            )));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(Error::new(format!("head dimension {head_dim} is odd")));
        }
        if let Some(v) = g.get(&format!("{arch}.attention.value_length")) {
            if v.as_u64() != Some(head_dim as u64) {
                return Err(Error::new(format!(
                    "value_length {v:?} differs from key_length {head_dim} (not supported)"
                )));
            }
        }
        if let Some(v) = g.get(&format!("{arch}.rope.dimension_count")) {
            if v.as_u64() != Some(head_dim as u64) {
                return Err(Error::new(format!(
                    "partial RoPE (rope.dimension_count {v:?} != head dim {head_dim}) is not supported"
                )));
            }
        }
        if g.get(&format!("{arch}.rope.scaling.type"))
            .is_some_and(|v| {
                !matches!(v.as_str(), Some("none") | Some("linear"))
                    || g.get(&format!("{arch}.rope.scaling.factor"))
                        .and_then(|f| f.as_f64())
                        .is_some_and(|f| f != 1.0)
            })
        {
            return Err(Error::new("RoPE scaling is not supported"));
        }
        let rope_base = match g.get(&format!("{arch}.rope.freq_base")) {
            Some(_) => g.get_f64(&format!("{arch}.rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        let rms_eps = g.get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))? as f32;
        let emb = g
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::new("GGUF tensor \"token_embd.weight\" is missing"))?;
        let vocab = match emb.dims.as_slice() {
            [d, v] if *d == d_model as u64 && *v > 0 && *v <= 1 << 24 => *v as usize,
            d => {
                return Err(Error::new(format!(
                    "token_embd.weight has dims {d:?}, expected [{d_model}, vocab]"
                )))
            }
        };
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(Error::new(format!("rope.freq_base {rope_base} is not > 1")));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(Error::new(format!(
                "layer_norm_rms_epsilon {rms_eps} is not > 0"
            )));
        }
        Ok(LlamaConfig {
            n_layer,
            d_model,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            vocab,
            ctx_len,
            rope_base,
            rms_eps,
        })
    }

    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// A loaded model (immutable; a [`Session`] holds the per-sequence state).
#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: LlamaConfig,
    /// Token embedding, `vocab` rows of `d_model`.
    pub embed: Arc<Vec<f32>>,
    pub layers: Vec<Layer>,
    pub out_norm: Vec<f32>,
    /// Output head (`d_model` -> `vocab`); shares `embed` when tied.
    pub output: Linear,
    /// The KV cache a [`Session`] gets (set with [`Model::set_kv`]).
    pub kv: KvKind,
}

/// The state of one sequence: the KV caches, the next position, and the forward pass's
/// buffers (grown to the largest step seen, so a decode step allocates nothing).
#[derive(Debug, Clone)]
pub struct Session {
    pub caches: Vec<KvCache>,
    pub pos: usize,
    pub ws: Workspace,
    /// Decode steps lead the session's thread team (see [`Model::forward_into`]); on unless
    /// `TESSERA_DECODE_TEAM=0` ([`DECODE_TEAM_ENV`]), set by [`Model::session`].
    pub decode_team: bool,
    /// Prompts (several tokens a pass) lead the team too; on unless `TESSERA_PREFILL_TEAM=0`
    /// ([`PREFILL_TEAM_ENV`]), set by [`Model::session`].
    pub prefill_team: bool,
}

/// Buffers of one forward step (activations, scores, logits, the linears' scratch).
#[derive(Debug, Clone, Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    scores: Vec<f32>,
    hn: Vec<f32>,
    logits: Vec<f32>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    lin: LinearScratch,
    /// Time per part of the forward pass, when enabled ([`Session::enable_profile`]).
    pub profile: Option<Profile>,
}

/// Parts of a forward step, for `tessera bench run --profile`.
pub const PROFILE_PARTS: [&str; 12] = [
    "embed+rope table",
    "rms norms",
    "wq+wk+wv",
    "rope",
    "kv push+sync",
    "q.K scores",
    "softmax",
    "p.V",
    "wo",
    "gate+up",
    "silu*up+residuals",
    "down",
];
/// Index of the output head's time in [`Profile::secs`] (after the parts above).
pub const PROFILE_HEAD: usize = PROFILE_PARTS.len();

/// Accumulated seconds per part ([`PROFILE_PARTS`], then the output head) over the steps run
/// since it was enabled or reset.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub secs: [f64; PROFILE_PARTS.len() + 1],
    pub steps: usize,
    /// Decode thread team tasks run by the leader and by helpers (filled by the bench).
    pub team_tasks: (u64, u64),
}

impl Profile {
    /// `(name, seconds)` of every part, the output head last.
    pub fn parts(&self) -> Vec<(&'static str, f64)> {
        PROFILE_PARTS
            .iter()
            .copied()
            .chain(std::iter::once("output head"))
            .zip(self.secs)
            .collect()
    }
}

impl Session {
    /// The decode thread team of this session (see [`Model::forward_into`]).
    pub fn team(&self) -> &Team {
        &self.ws.lin.team
    }

    /// Starts (or restarts) timing every part of the forward pass.
    pub fn enable_profile(&mut self) {
        self.ws.profile = Some(Profile::default());
    }
}

/// Adds the time since `*t` to part `i` when profiling, and restarts `*t`.
#[inline]
fn lap(p: &mut Option<Profile>, t: &mut Option<std::time::Instant>, i: usize) {
    if let (Some(p), Some(t0)) = (p.as_mut(), t.as_mut()) {
        let now = std::time::Instant::now();
        p.secs[i] += (now - *t0).as_secs_f64();
        *t0 = now;
    }
}

/// `v[..len]`, grown (zero-filled) when shorter.
fn buf(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

impl Model {
    /// Loads a Llama GGUF, dequantizing every weight to f32. `progress` is called after each
    /// tensor with (done, total).
    pub fn from_gguf(g: &Gguf, progress: impl FnMut(usize, usize)) -> Result<Model> {
        Self::from_gguf_with(g, progress, |_, _, _| Ok(None))
    }

    /// As [`Self::from_gguf`], but a linear layer (`blk.{i}.attn_q`, ..., `output`) that
    /// `provide(name, n_in, n_out)` returns is used instead of the GGUF's (a .tsr file's
    /// quantized tensors); the GGUF need not hold those.
    pub fn from_gguf_with(
        g: &Gguf,
        mut progress: impl FnMut(usize, usize),
        mut provide: impl FnMut(&str, usize, usize) -> Result<Option<Linear>>,
    ) -> Result<Model> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let (d, ff, qd, kvd) = (
            cfg.d_model as u64,
            cfg.n_ff as u64,
            cfg.q_dim() as u64,
            cfg.kv_dim() as u64,
        );
        let tied = g.tensor("output.weight").is_none();
        let total = 2 + usize::from(!tied) + cfg.n_layer * 9;
        let mut done = 0;
        let mut load = |name: &str, dims: &[u64]| -> Result<Vec<f32>> {
            let t = g.tensor_f32(name, dims)?;
            done += 1;
            progress(done, total);
            Ok(t)
        };
        let embed = Arc::new(load("token_embd.weight", &[d, cfg.vocab as u64])?);
        let out_norm = load("output_norm.weight", &[d])?;
        let output = if let Some(l) = provide("output", cfg.d_model, cfg.vocab)? {
            l
        } else if !tied {
            Linear::f32(
                Arc::new(load("output.weight", &[d, cfg.vocab as u64])?),
                cfg.d_model,
                cfg.vocab,
            )
        } else {
            Linear::f32(embed.clone(), cfg.d_model, cfg.vocab)
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut lin = |n: &str, n_in: u64, n_out: u64| -> Result<Linear> {
                if let Some(l) = provide(&format!("blk.{i}.{n}"), n_in as usize, n_out as usize)? {
                    return Ok(l);
                }
                let w = load(&format!("blk.{i}.{n}.weight"), &[n_in, n_out])?;
                Ok(Linear::f32(Arc::new(w), n_in as usize, n_out as usize))
            };
            let wq = lin("attn_q", d, qd)?;
            let wk = lin("attn_k", d, kvd)?;
            let wv = lin("attn_v", d, kvd)?;
            let wo = lin("attn_output", qd, d)?;
            let w_gate = lin("ffn_gate", d, ff)?;
            let w_up = lin("ffn_up", d, ff)?;
            let w_down = lin("ffn_down", ff, d)?;
            layers.push(Layer {
                attn_norm: load(&format!("blk.{i}.attn_norm.weight"), &[d])?,
                ffn_norm: load(&format!("blk.{i}.ffn_norm.weight"), &[d])?,
                wq,
                wk,
                wv,
                wo,
                w_gate,
                w_up,
                w_down,
            });
        }
        Ok(Model {
            cfg,
            embed,
            layers,
            out_norm,
            output,
            kv: KvKind::F32,
        })
    }

    /// Sets the KV cache kind of new sessions, checking it can be built.
    pub fn set_kv(&mut self, kv: KvKind) -> Result<()> {
        KvCache::new(kv, self.cfg.n_head_kv, self.cfg.head_dim)?;
        self.kv = kv;
        Ok(())
    }

    /// Runs every engine layer (and the KV products of new sessions) on `backend`, with kernel
    /// path `isa` for [`Backend::Cpu`]; the load-time re-packing happens here (in parallel).
    pub fn set_backend(&mut self, backend: Backend, isa: Isa) {
        let mut all: Vec<&mut Linear> = Vec::new();
        for l in &mut self.layers {
            all.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ]);
        }
        all.push(&mut self.output);
        all.par_iter_mut().for_each(|l| l.set_backend(backend, isa));
        // Layers that read the same input run as one kernel call on the CPU backend.
        self.layers.par_iter_mut().for_each(|l| {
            l.wq.fuse_with(&[&l.wk, &l.wv]);
            l.w_gate.fuse_with(&[&l.w_up]);
        });
    }

    /// The backend and kernel path of the engine layers (the KV products follow them); golden
    /// when no layer is an engine layer.
    pub fn backend(&self) -> (Backend, Isa) {
        self.layers
            .first()
            .and_then(|l| l.wq.engine())
            .or_else(|| self.output.engine())
            .map_or((Backend::Golden, Isa::Scalar), |e| (e.backend(), e.isa()))
    }

    /// Bytes of weights one decode step reads through the linear layers (the roofline's
    /// numerator; the embedding row and norms are negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain(std::iter::once(&self.output))
            .map(Linear::weight_bytes)
            .sum()
    }

    /// A fresh session (empty KV caches).
    pub fn session(&self) -> Session {
        let (backend, isa) = self.backend();
        let c = &self.cfg;
        let new = || {
            // `set_kv` checked that this kind builds; f32 cannot fail. The CPU backend's
            // caches reserve the whole context: a decode step never grows them.
            KvCache::with_context(self.kv, c.n_head_kv, c.head_dim, backend, isa, c.ctx_len)
                .unwrap_or_else(|_| KvCache::f32(c.n_head_kv, c.head_dim))
        };
        Session {
            caches: (0..c.n_layer).map(|_| new()).collect(),
            pos: 0,
            ws: Workspace {
                // Grown to the context by the steps otherwise (one position a step).
                scores: Vec::with_capacity(c.ctx_len),
                ..Workspace::default()
            },
            decode_team: decode_team_from_env(),
            prefill_team: prefill_team_from_env(),
        }
    }

    /// Runs `tokens` (a whole prompt, or one generated token) at the session's next positions and
    /// returns the logits of the last token (`vocab` values), or of every token when `all_logits`
    /// (`tokens.len() * vocab` values).
    pub fn forward(&self, s: &mut Session, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let rows = if all_logits { tokens.len() } else { 1 };
        self.forward_rows(s, tokens, rows)
    }

    /// As [`Self::forward`], returning the logits of the last `rows` tokens
    /// (`rows * vocab` values, `1 <= rows <= tokens.len()`).
    pub fn forward_rows(&self, s: &mut Session, tokens: &[u32], rows: usize) -> Result<Vec<f32>> {
        Ok(self.forward_into(s, tokens, rows)?.to_vec())
    }

    /// As [`Self::forward_rows`], the logits borrowed from the session's workspace: a decode
    /// step allocates nothing once the workspace has grown (engine layers on the CPU backend).
    ///
    /// The pass runs on a worker thread of the current rayon pool (in place when the caller is
    /// one already): the parallel kernels inside it then fork from a worker, which keeps working
    /// while the others join, instead of each of the ~120 weight products of a step injecting a
    /// job from outside the pool and blocking until a worker finishes it (two thread wake-ups
    /// per product).
    ///
    /// A decode step (one token) whose linears all run on the CPU backend leads the session's
    /// thread team ([`Team`]) with as many threads as the rayon pool: its helpers spin between
    /// the step's products, so a GEMV costs a few atomic operations of synchronisation instead
    /// of a rayon wake-up (the same integers: only which thread computes a row changes). A
    /// prompt leads it as well (its products and their activation copies, N5, batched
    /// attention, RMS norms, RoPE and residual additions run their tasks on the team: +7%
    /// prefill against rayon in paired runs, docs/performance.md). The other backends (whose
    /// products fork on rayon) run without it; so does every decode step when
    /// [`Session::decode_team`] is unset (`TESSERA_DECODE_TEAM=0`, [`DECODE_TEAM_ENV`]; on by
    /// default since the quiet-machine pairs in docs/performance.md), and every prompt when
    /// [`Session::prefill_team`] is (`TESSERA_PREFILL_TEAM=0`).
    pub fn forward_into<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        rows: usize,
    ) -> Result<&'s [f32]> {
        let team_on = if tokens.len() == 1 {
            s.decode_team
        } else {
            s.prefill_team
        };
        let threads = if team_on && self.all_linears_on_cpu_backend() {
            rayon::current_num_threads()
        } else {
            1
        };
        let team = s.ws.lin.team.clone();
        team.lead(threads, || self.forward_on_worker(s, tokens, rows))
    }

    /// Whether every linear layer is an engine layer on [`Backend::Cpu`] (then no product of a
    /// decode step uses rayon).
    fn all_linears_on_cpu_backend(&self) -> bool {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain(std::iter::once(&self.output))
            .all(|l| matches!(l, Linear::Engine(e) if e.backend() == Backend::Cpu))
    }

    fn forward_on_worker<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        rows: usize,
    ) -> Result<&'s [f32]> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(Error::new("forward pass on no tokens"));
        }
        if rows == 0 || rows > n {
            return Err(Error::new(format!(
                "cannot return {rows} logit rows of {n} tokens"
            )));
        }
        if s.pos + n > c.ctx_len {
            return Err(Error::new(format!(
                "context full: {} + {n} tokens exceed the model's context length {}",
                s.pos, c.ctx_len
            )));
        }
        let (d, hd, qd, kvd) = (c.d_model, c.head_dim, c.q_dim(), c.kv_dim());
        let ws = &mut s.ws;
        let prof = &mut ws.profile;
        let mut t = prof.as_ref().map(|_| std::time::Instant::now());
        let x = buf(&mut ws.x, n * d);
        for (xr, &t) in x.chunks_exact_mut(d).zip(tokens) {
            let t = t as usize;
            if t >= c.vocab {
                return Err(Error::new(format!(
                    "token id {t} is out of the vocabulary (size {})",
                    c.vocab
                )));
            }
            xr.copy_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let rope = RopeTable::new(
            s.pos,
            n,
            hd,
            c.rope_base,
            &mut ws.rope_cos,
            &mut ws.rope_sin,
        );
        let group = c.n_head / c.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let h = buf(&mut ws.h, n * d);
        let q = buf(&mut ws.q, n * qd);
        let k = buf(&mut ws.k, n * kvd);
        let v = buf(&mut ws.v, n * kvd);
        let att = buf(&mut ws.att, n * qd);
        let o = buf(&mut ws.o, n * d);
        let g = buf(&mut ws.g, n * c.n_ff);
        let u = buf(&mut ws.u, n * c.n_ff);
        let scores = buf(&mut ws.scores, s.pos + n);
        let lin = &mut ws.lin;
        lap(prof, &mut t, 0);

        for (layer, cache) in self.layers.iter().zip(s.caches.iter_mut()) {
            if cache.len() != s.pos {
                return Err(Error::new("KV cache out of step with the session position"));
            }
            rms_norm_on(&lin.team, x, &layer.attn_norm, c.rms_eps, h);
            lap(prof, &mut t, 1);
            if !layer
                .wq
                .forward_fused(h, n, &mut [&mut *q, &mut *k, &mut *v], lin)
            {
                layer.wq.forward_ws(h, n, q, lin);
                layer.wk.forward_ws(h, n, k, lin);
                layer.wv.forward_ws(h, n, v, lin);
            }
            lap(prof, &mut t, 2);
            if n > 1 && cache.batches_prefill() {
                // A prompt on the CPU backend: every position pushed, then all (position, head)
                // attentions in parallel, each seeing the cache exactly as it was right after
                // its own push (so as the token-by-token loop below); timed as "q.K scores".
                rope.apply_tokens(&lin.team, q, qd, k, kvd);
                lap(prof, &mut t, 3);
                cache.attend_prefill(&lin.team, k, v, q, n, c.n_head, scale, att);
                lap(prof, &mut t, 5);
            } else if n == 1 && cache.batches_prefill() {
                // A decode step on the CPU backend: the KV heads' pushes, then the query heads'
                // attentions, as tasks of the decode team (the same results as the loop below).
                rope.apply(0, q);
                rope.apply(0, k);
                lap(prof, &mut t, 3);
                cache.push_decode(&lin.team, k, v);
                lap(prof, &mut t, 4);
                let mut secs = prof.as_ref().map(|_| [0f64; 3]);
                cache.attend_decode(&lin.team, q, c.n_head, scale, att, secs.as_mut());
                // The step's wall time, split over the three parts as the tasks spent it.
                if let (Some(p), Some(t0), Some(secs)) = (prof.as_mut(), t.as_mut(), secs) {
                    let now = std::time::Instant::now();
                    let wall = (now - *t0).as_secs_f64();
                    let total: f64 = secs.iter().sum();
                    for (i, s) in secs.iter().enumerate() {
                        let share = if total > 0.0 { s / total } else { 1.0 / 3.0 };
                        p.secs[5 + i] += wall * share;
                    }
                    *t0 = now;
                }
            } else {
                // Token by token: store position t, then attend from it, so that a prefill sees the
                // cache exactly as a token-by-token decode would (the KV4 cache quantizes groups as
                // they leave the recent window; the f32 results are the same either way).
                for i in 0..n {
                    rope.apply(i, &mut q[i * qd..(i + 1) * qd]);
                    rope.apply(i, &mut k[i * kvd..(i + 1) * kvd]);
                    lap(prof, &mut t, 3);
                    cache.push(&k[i * kvd..(i + 1) * kvd], &v[i * kvd..(i + 1) * kvd]);
                    lap(prof, &mut t, 4);
                    let n_ctx = s.pos + i + 1;
                    for head in 0..c.n_head {
                        let kvh = head / group;
                        let sc = &mut scores[..n_ctx];
                        cache.scores(
                            kvh,
                            &q[i * qd + head * hd..i * qd + (head + 1) * hd],
                            scale,
                            sc,
                        );
                        lap(prof, &mut t, 5);
                        softmax(sc);
                        lap(prof, &mut t, 6);
                        cache.weighted_sum(
                            kvh,
                            sc,
                            &mut att[i * qd + head * hd..i * qd + (head + 1) * hd],
                        );
                        lap(prof, &mut t, 7);
                    }
                }
            }
            layer.wo.forward_ws(att, n, o, lin);
            lap(prof, &mut t, 8);
            add_on(&lin.team, x, o);
            lap(prof, &mut t, 10);

            rms_norm_on(&lin.team, x, &layer.ffn_norm, c.rms_eps, h);
            lap(prof, &mut t, 1);
            if !layer
                .w_gate
                .forward_fused(h, n, &mut [&mut *g, &mut *u], lin)
            {
                layer.w_gate.forward_ws(h, n, g, lin);
                layer.w_up.forward_ws(h, n, u, lin);
            }
            lap(prof, &mut t, 9);
            silu_mul(&lin.team, g, u);
            lap(prof, &mut t, 10);
            layer.w_down.forward_ws(g, n, o, lin);
            lap(prof, &mut t, 11);
            add_on(&lin.team, x, o);
            lap(prof, &mut t, 10);
        }
        s.pos += n;

        let last = &x[(n - rows) * d..];
        let hn = buf(&mut ws.hn, rows * d);
        rms_norm(last, &self.out_norm, c.rms_eps, hn);
        lap(prof, &mut t, 1);
        let logits = buf(&mut ws.logits, rows * c.vocab);
        self.output.forward_ws(hn, rows, logits, lin);
        lap(prof, &mut t, PROFILE_HEAD);
        if let Some(p) = prof.as_mut() {
            p.steps += 1;
        }
        Ok(&s.ws.logits[..rows * c.vocab])
    }
}

/// Runs `f` on a worker thread of the current rayon pool (in place when the caller is one):
/// a generation loop run this way starts each step's forward pass in place
/// ([`Model::forward_into`]) instead of injecting it into the pool from outside (which wakes a
/// worker and blocks the caller every step, and lets the pool's injector queue allocate).
pub fn on_pool_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Environment variable that switches the decode thread team off (`0`) or on (`1`, the default)
/// for new sessions ([`Session::decode_team`]). On a quiet machine the team decodes faster than
/// rayon's fork/join per product; on a machine whose cores are busy with other processes it can
/// be slower (docs/performance.md), hence the switch.
pub const DECODE_TEAM_ENV: &str = "TESSERA_DECODE_TEAM";

/// Whether [`DECODE_TEAM_ENV`] leaves the team on (read once; another value than `0`/`1` is
/// reported once and means the default, on).
fn decode_team_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| switch_from_env(DECODE_TEAM_ENV, "the decode team"))
}

/// A `0` / `1` switch from the environment variable `var`, on when unset; another value is
/// reported (naming `what` stays on) and means on.
fn switch_from_env(var: &str, what: &str) -> bool {
    match std::env::var(var) {
        Err(_) => true,
        Ok(v) if v == "1" => true,
        Ok(v) if v == "0" => false,
        Ok(v) => {
            eprintln!("warning: {var}={v:?} is not 0 or 1; {what} stays on");
            true
        }
    }
}

/// Environment variable that switches the thread team off (`0`) or on (`1`, the default) for
/// prompts (several tokens a forward pass): the products' and the batched attention's tasks
/// then run on the team, whose helpers spin between loops, instead of forking on rayon.
pub const PREFILL_TEAM_ENV: &str = "TESSERA_PREFILL_TEAM";

/// Whether [`PREFILL_TEAM_ENV`] leaves the prompt team on (read once, as
/// [`decode_team_from_env`]).
fn prefill_team_from_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| switch_from_env(PREFILL_TEAM_ENV, "the prompt team"))
}

/// cos/sin of RoPE angles for `n` positions from `pos0`, llama.cpp's "normal" mode: element pairs
/// `(2i, 2i+1)` of each head rotate by `pos * base^(-2i/head_dim)`.
struct RopeTable<'a> {
    head_dim: usize,
    cos: &'a [f32],
    sin: &'a [f32],
}

impl<'a> RopeTable<'a> {
    /// Fills `cos`/`sin` (cleared first, reused across steps).
    fn new(
        pos0: usize,
        n: usize,
        head_dim: usize,
        base: f32,
        cos: &'a mut Vec<f32>,
        sin: &'a mut Vec<f32>,
    ) -> RopeTable<'a> {
        let half = head_dim / 2;
        cos.clear();
        sin.clear();
        for t in 0..n {
            let p = (pos0 + t) as f64;
            for i in 0..half {
                let theta = p * f64::from(base).powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(theta.cos() as f32);
                sin.push(theta.sin() as f32);
            }
        }
        RopeTable {
            head_dim,
            cos: &cos[..],
            sin: &sin[..],
        }
    }

    /// [`Self::apply`] to every token of `q` (rows of `qd`) and `k` (rows of `kvd`), by
    /// blocks of tokens on `team` when the caller leads it (each token is rotated alone, so the
    /// same values), else in order.
    fn apply_tokens(&self, team: &Team, q: &mut [f32], qd: usize, k: &mut [f32], kvd: usize) {
        const TOKENS: usize = 16;
        let n = q.len() / qd.max(1);
        let blocks = q
            .chunks_mut(TOKENS * qd)
            .zip(k.chunks_mut(TOKENS * kvd))
            .enumerate();
        if !(team.is_leading() && team.threads() > 1) {
            for (b, (qb, kb)) in blocks {
                self.apply_block(b * TOKENS, qb, qd, kb, kvd);
            }
            return;
        }
        // Each task takes the next block from one shared iterator.
        let blocks = Mutex::new(blocks);
        team.for_each(n.div_ceil(TOKENS), |_, _| {
            let next = blocks.lock().unwrap_or_else(PoisonError::into_inner).next();
            if let Some((b, (qb, kb))) = next {
                self.apply_block(b * TOKENS, qb, qd, kb, kvd);
            }
        });
    }

    /// Tokens `t0..` of `qb` and `kb` (rows of `qd` and `kvd`).
    fn apply_block(&self, t0: usize, qb: &mut [f32], qd: usize, kb: &mut [f32], kvd: usize) {
        for (i, (qr, kr)) in qb.chunks_mut(qd).zip(kb.chunks_mut(kvd)).enumerate() {
            self.apply(t0 + i, qr);
            self.apply(t0 + i, kr);
        }
    }

    /// Rotates every head of token `t`'s vector `x` (length a multiple of head_dim).
    fn apply(&self, t: usize, x: &mut [f32]) {
        let half = self.head_dim / 2;
        let (cs, sn) = (
            &self.cos[t * half..(t + 1) * half],
            &self.sin[t * half..(t + 1) * half],
        );
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cs[i] - b * sn[i];
                head[2 * i + 1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

/// RMSNorm of each row of `x` (rows of `w.len()`), times `w`. The mean square is summed in f64
/// as ggml does.
/// [`rms_norm`] by blocks of rows on `team` when the caller leads it (rows are normalized
/// alone, so the same values), else on the calling thread.
fn rms_norm_on(team: &Team, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    const ROWS: usize = 16;
    let d = w.len();
    if !(team.is_leading() && team.threads() > 1) || d == 0 || x.len() <= ROWS * d {
        rms_norm(x, w, eps, out);
        return;
    }
    team.for_each_chunk_mut(out, ROWS * d, |i, ob, _| {
        rms_norm(&x[i * ROWS * d..i * ROWS * d + ob.len()], w, eps, ob);
    });
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    // Each row's sum of squares in f64, in index order (`kernels_cpu::sum_squares_rows`: a
    // prompt's rows four at a time on AVX2, the same sums), by blocks of rows on the stack.
    const ROWS: usize = 64;
    let mut ss = [0f64; ROWS];
    for (xb, ob) in x
        .chunks(ROWS * d.max(1))
        .zip(out.chunks_mut(ROWS * d.max(1)))
    {
        let rows = xb.len().checked_div(d).unwrap_or(0);
        tessera_kernels_cpu::sum_squares_rows(&xb[..rows * d], d, &mut ss[..rows]);
        for ((xr, or), &ssr) in xb.chunks_exact(d).zip(ob.chunks_exact_mut(d)).zip(&ss) {
            let scale = 1.0 / ((ssr / d as f64) as f32 + eps).sqrt();
            for ((o, &xi), &wi) in or.iter_mut().zip(xr).zip(w) {
                *o = xi * scale * wi;
            }
        }
    }
}

/// In-place softmax. The exponentials are `kernels_cpu::expf` (glibc's `expf`, bit for bit,
/// on every CPU; vectorized where AVX2 and FMA are), summed in index order.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v -= m;
    }
    tessera_kernels_cpu::expf_in_place(x);
    let mut sum = 0f32;
    for v in x.iter() {
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// [`softmax`] of each row of `x` (rows of `len`), the same values: up to four rows at a time
/// with their ordered maxima and sums interleaved (each row's chain of `f32` additions is
/// latency-bound alone; interleaved, the rows' chains overlap).
pub fn softmax_rows(x: &mut [f32], len: usize) {
    if len == 0 {
        return;
    }
    assert!(x.len().is_multiple_of(len), "softmax_rows: whole rows");
    for rows in x.chunks_mut(4 * len) {
        match rows.len() / len {
            4 => softmax_interleaved::<4>(rows, len),
            3 => softmax_interleaved::<3>(rows, len),
            2 => softmax_interleaved::<2>(rows, len),
            _ => softmax(rows),
        }
    }
}

/// [`softmax`] of `R` rows of `len` (`x.len() == R * len`), each row's operations in
/// [`softmax`]'s order.
fn softmax_interleaved<const R: usize>(x: &mut [f32], len: usize) {
    assert_eq!(x.len(), R * len);
    let mut m = [f32::NEG_INFINITY; R];
    for j in 0..len {
        for (r, mr) in m.iter_mut().enumerate() {
            *mr = mr.max(x[r * len + j]);
        }
    }
    for (row, &mr) in x.chunks_exact_mut(len).zip(&m) {
        for v in row.iter_mut() {
            *v -= mr;
        }
    }
    tessera_kernels_cpu::expf_in_place(x);
    let mut sum = [0f32; R];
    for j in 0..len {
        for (r, sr) in sum.iter_mut().enumerate() {
            *sr += x[r * len + j];
        }
    }
    for (row, &sr) in x.chunks_exact_mut(len).zip(&sum) {
        let inv = 1.0 / sr;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Elements per task of [`silu_mul`].
const SILU_CHUNK: usize = 384;

/// `g[i] = silu(g[i]) * u[i]`, in chunks: a prompt's on rayon, a decode step's on the decode
/// `team` when the step leads it (elementwise, so the same values in any order).
fn silu_mul(team: &Team, g: &mut [f32], u: &[f32]) {
    let one = |gc: &mut [f32], uc: &[f32]| {
        // silu's `exp(-x)` for the whole chunk at once (vectorized), then its division.
        let mut e = [0f32; SILU_CHUNK];
        let e = &mut e[..gc.len()];
        for (ei, &gi) in e.iter_mut().zip(gc.iter()) {
            *ei = -gi;
        }
        tessera_kernels_cpu::expf_in_place(e);
        for ((gi, ui), &ei) in gc.iter_mut().zip(uc).zip(e.iter()) {
            *gi = *gi / (1.0 + ei) * ui;
        }
    };
    if g.len() > 4 * SILU_CHUNK && !team.is_leading() {
        g.par_chunks_mut(SILU_CHUNK)
            .zip(u.par_chunks(SILU_CHUNK))
            .for_each(|(gc, uc)| one(gc, uc));
    } else {
        team.for_each_chunk_mut(g, SILU_CHUNK, |i, gc, _| one(gc, &u[i * SILU_CHUNK..]));
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + tessera_kernels_cpu::expf(-x))
}

/// [`add`] by blocks on `team` when the caller leads it (a prompt's residuals), else in order:
/// the same sums.
fn add_on(team: &Team, x: &mut [f32], y: &[f32]) {
    const BLOCK: usize = 2048;
    if !(team.is_leading() && team.threads() > 1) || x.len() <= BLOCK {
        add(x, y);
        return;
    }
    team.for_each_chunk_mut(x, BLOCK, |i, xb, _| add(xb, &y[i * BLOCK..]));
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::{softmax, softmax_rows};

    /// `softmax_rows` gives each row exactly `softmax`'s bits: 1 to 9 rows (the interleaved
    /// groups of 4, 3 and 2 and a single row), lengths 1 to 70, rows holding infinities, a NaN,
    /// huge spreads and ties.
    #[test]
    fn softmax_rows_equal_softmax_row_by_row() {
        let mut z = 5u64;
        let mut next = move || {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 60.0 - 30.0
        };
        for rows in 1..=9usize {
            for len in [1usize, 2, 3, 7, 64, 70] {
                let mut x: Vec<f32> = (0..rows * len).map(|_| next()).collect();
                if len > 2 {
                    x[1] = f32::NEG_INFINITY;
                    if rows > 1 {
                        x[len + 1] = f32::INFINITY;
                    }
                    let n = x.len();
                    x[len.min(n - 1)] = x[0];
                }
                if rows > 4 && len > 2 {
                    x[4 * len + 2] = f32::NAN;
                }
                let mut want = x.clone();
                for r in want.chunks_exact_mut(len) {
                    softmax(r);
                }
                softmax_rows(&mut x, len);
                for (i, (a, b)) in x.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "rows {rows} len {len} at {i}");
                }
            }
        }
    }
}
