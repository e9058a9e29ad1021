//! Performance projection of an LLM on a board: per layer, engine cycles and off-chip bytes,
//! a roofline (engine-bound vs memory-bound per operation), decode and prefill tokens/s.
//! Always **simulated**: nothing here ran on a board.
//!
//! The cycle counts come from one place, the [`CycleEstimate`] trait (named so as not to clash
//! with `golden::cycle::CycleModel`, the cycle-accurate model). [`Analytical`] counts the engine
//! as built (docs/engine.md: GEMV fed by one `din` word per cycle including the per-group
//! metadata header; GEMM tiles with their loads, flush, store and drain, no overlap);
//! `tests/project.rs` checks it against `golden::cycle` on small shapes (equal up to a constant
//! per-op command overhead of about 20 cycles). Another estimate (e.g. one that runs the
//! cycle-accurate model per tile) implements the trait and is passed to [`project`].

use std::fmt::Write as _;

use crate::board::Board;
use tessera_golden::config::{EngineConfig, WeightMode};
use tessera_golden::engine::StreamLayout;

/// Transformer shapes (no weights needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    pub name: &'static str,
    /// Where the dimensions come from.
    pub source: &'static str,
    pub layers: u32,
    pub d_model: u32,
    pub d_ffn: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub vocab: u32,
}

/// The built-in model shapes.
#[must_use]
pub fn models() -> Vec<ModelShape> {
    vec![
        ModelShape {
            name: "smollm2-135m",
            source: "HuggingFaceTB/SmolLM2-135M config.json",
            layers: 30,
            d_model: 576,
            d_ffn: 1536,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
        },
        ModelShape {
            name: "llama2-7b",
            source: "Llama 2 paper (arXiv 2307.09288) / meta-llama/Llama-2-7b config.json",
            layers: 32,
            d_model: 4096,
            d_ffn: 11008,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            vocab: 32000,
        },
    ]
}

/// A model shape by name.
pub fn model_by_name(name: &str) -> Result<ModelShape, String> {
    models()
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = models().iter().map(|m| m.name).collect();
            format!(
                "unknown model {name:?}; built-in models are {}",
                names.join(", ")
            )
        })
}

/// One engine operation: `y[tokens x n] = x[tokens x k] * W[k x n]`, `count` times.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub name: String,
    pub mode: WeightMode,
    /// Tokens (1 for decode).
    pub tokens: u64,
    pub k: u64,
    pub n: u64,
    /// Repetitions (e.g. heads).
    pub count: u64,
    /// Off-chip bytes read (weights + metadata, or the KV cache).
    pub bytes: f64,
}

impl Op {
    /// Multiply-accumulates.
    #[must_use]
    pub fn macs(&self) -> u64 {
        self.tokens * self.k * self.n * self.count
    }
}

/// The single source of cycle counts (swap for the cycle-accurate model).
pub trait CycleEstimate {
    /// Engine cycles for `op`.
    fn cycles(&self, op: &Op) -> u64;
    /// A one-line description printed with the projection.
    fn describe(&self) -> String;
}

/// Analytical cycle counts of the engine as built (docs/engine.md "Throughput").
#[derive(Debug, Clone)]
pub struct Analytical {
    pub cfg: EngineConfig,
    pub layout: StreamLayout,
}

impl Analytical {
    /// For a validated config.
    #[must_use]
    pub fn new(cfg: &EngineConfig) -> Analytical {
        Analytical {
            cfg: cfg.clone(),
            layout: StreamLayout::new(cfg),
        }
    }
}

impl CycleEstimate for Analytical {
    fn cycles(&self, op: &Op) -> u64 {
        let (r, c) = (
            u64::from(self.cfg.array.rows),
            u64::from(self.cfg.array.cols),
        );
        let l = u64::from(self.cfg.quant.w_group_len);
        let ppc = u64::from(op.mode.products_per_pe_cycle());
        let lay = &self.layout;
        let groups = op.k.div_ceil(l);
        let beats_per_group = l / ppc;
        if op.tokens == 1 {
            // GEMV: rows*cols channels per pass; per group a metadata header and L/(8/B) beats
            // of gemv_beat_words words, one din word per cycle.
            let passes = op.n.div_ceil(r * c);
            let per_group =
                u64::from(lay.gemv_meta_words) + beats_per_group * u64::from(lay.gemv_beat_words);
            let drain = r * u64::from(lay.out_words) + (r + c + 6) + (r + 3);
            op.count * passes * (groups * per_group + drain)
        } else {
            // GEMM, token block outer (activations loaded once per block of `rows` tokens),
            // channel tile inner (weights and metadata reloaded per tile), no overlap.
            let blocks = op.tokens.div_ceil(r);
            let tiles = op.n.div_ceil(c);
            let act_load = op.k; // one din word per activation entry
            let beats = groups * beats_per_group;
            let wgt_load = beats * u64::from(lay.wgt_words) + groups * u64::from(lay.meta_words);
            let tile = wgt_load + beats + (r + c + 6) + (r + 3) + r * u64::from(lay.out_words);
            op.count * blocks * (act_load + tiles * tile)
        }
    }

    fn describe(&self) -> String {
        "analytical cycle counts of the engine as built (docs/engine.md): GEMV streamed one din \
         word per cycle with per-group metadata headers; GEMM tiles with weight reloads, flush, \
         store and drain, no overlap; equal to the cycle-accurate model (golden::cycle) up to \
         ~20 cycles of command overhead per op (boards/tests/project.rs)"
            .into()
    }
}

/// Assumptions of a projection, printed with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assumptions {
    /// Engine clock (the config's `target_mhz`).
    pub clock_mhz: u32,
    /// Fraction of the board's peak memory bandwidth achieved.
    pub bw_efficiency: f64,
    /// Context length of the decode step (tokens already in the KV cache).
    pub context: u64,
    /// Prompt length for prefill.
    pub prompt: u64,
    /// Weight mode of the transformer linear layers.
    pub linear_mode: WeightMode,
    /// Weight mode of the LM head.
    pub head_mode: WeightMode,
}

/// One row of the roofline table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub op: Op,
    pub cycles: u64,
    /// Engine time, seconds.
    pub engine_s: f64,
    /// Memory time at the effective bandwidth, seconds.
    pub memory_s: f64,
}

impl Row {
    /// `max(engine, memory)`.
    #[must_use]
    pub fn time_s(&self) -> f64 {
        self.engine_s.max(self.memory_s)
    }
    /// `engine` or `memory`.
    #[must_use]
    pub fn bound(&self) -> &'static str {
        if self.engine_s >= self.memory_s {
            "engine"
        } else {
            "memory"
        }
    }
}

/// A whole projection.
#[derive(Debug, Clone)]
pub struct Projection {
    pub model: ModelShape,
    pub board: String,
    pub assumptions: Assumptions,
    pub cycle_model: String,
    pub peak_gmacs: f64,
    pub bandwidth_gbs: f64,
    /// Decode ops of one layer (times `layers`) followed by the LM head.
    pub decode: Vec<Row>,
    pub prefill: Vec<Row>,
    pub decode_tokens_s: f64,
    pub prefill_tokens_s: f64,
    /// Off-chip bytes per decoded token.
    pub decode_bytes_per_token: f64,
    /// `bandwidth / bytes per token`: the memory roofline of decode.
    pub decode_bandwidth_bound_tokens_s: f64,
    /// Off-chip bytes the model needs resident (weights + metadata + the KV cache at `context`).
    pub resident_bytes: f64,
    /// Bytes of the board's largest memory.
    pub board_memory_bytes: f64,
    /// The engine's `din` width.
    pub stream_bits: u32,
}

/// Off-chip bytes of `k x n` weights in `mode`: codes plus a scale and zero point per group.
#[must_use]
pub fn weight_bytes(cfg: &EngineConfig, mode: WeightMode, k: u64, n: u64) -> f64 {
    let l = u64::from(cfg.quant.w_group_len);
    let code_bits = k * n * u64::from(mode.bits());
    let meta_bits = k.div_ceil(l) * n * u64::from(cfg.quant.w_scale_bits + 8);
    #[allow(clippy::cast_precision_loss)]
    let b = (code_bits + meta_bits) as f64 / 8.0;
    b
}

/// Off-chip bytes of one head's K or V cache at `ctx` tokens: 4-bit codes with a scale and
/// zero point (24 bits) per `kv_group_len` codes, the recent window at 8 bits.
#[must_use]
pub fn kv_bytes(cfg: &EngineConfig, ctx: u64, head_dim: u64) -> f64 {
    let win = u64::from(cfg.quant.kv_recent_window).min(ctx);
    let old = ctx - win;
    let g = u64::from(cfg.quant.kv_group_len);
    let bits = old * head_dim * 4 + old.div_ceil(g) * head_dim * 24 + win * head_dim * 8;
    #[allow(clippy::cast_precision_loss)]
    let b = bits as f64 / 8.0;
    b
}

fn layer_ops(
    m: &ModelShape,
    cfg: &EngineConfig,
    a: &Assumptions,
    tokens: u64,
    ctx: u64,
) -> Vec<Op> {
    let (d, f) = (u64::from(m.d_model), u64::from(m.d_ffn));
    let hd = u64::from(m.head_dim);
    let (h, kvh) = (u64::from(m.heads), u64::from(m.kv_heads));
    let w = a.linear_mode;
    let lin = |name: &str, k: u64, n: u64| Op {
        name: name.to_string(),
        mode: w,
        tokens,
        k,
        n,
        count: 1,
        bytes: weight_bytes(cfg, w, k, n),
    };
    // Attention as W4 GEMV/GEMM over the KV4 cache (the fold stage of docs/engine.md). P x V
    // runs once per 7-bit probability plane (N22: 14-bit codes, two planes), so twice, and
    // streams the value cache twice.
    let kv = kv_bytes(cfg, ctx, hd) * kvh as f64;
    vec![
        lin("q_proj", d, h * hd),
        lin("k_proj", d, kvh * hd),
        lin("v_proj", d, kvh * hd),
        Op {
            name: "attn_qk".into(),
            mode: WeightMode::W4,
            tokens,
            k: hd,
            n: ctx,
            count: h,
            bytes: kv,
        },
        Op {
            name: "attn_pv".into(),
            mode: WeightMode::W4,
            tokens,
            k: ctx,
            n: hd,
            count: 2 * h,
            bytes: 2.0 * kv,
        },
        lin("o_proj", h * hd, d),
        lin("gate_proj", d, f),
        lin("up_proj", d, f),
        lin("down_proj", f, d),
    ]
}

fn rows(ops: Vec<Op>, cm: &dyn CycleEstimate, hz: f64, bw: f64) -> Vec<Row> {
    ops.into_iter()
        .map(|op| {
            let cycles = cm.cycles(&op);
            #[allow(clippy::cast_precision_loss)]
            let engine_s = cycles as f64 / hz;
            let memory_s = op.bytes / bw;
            Row {
                op,
                cycles,
                engine_s,
                memory_s,
            }
        })
        .collect()
}

/// Projects `model` on `board` with `cfg` and the cycle model `cm`.
#[must_use]
pub fn project(
    model: &ModelShape,
    board: &Board,
    cfg: &EngineConfig,
    a: &Assumptions,
    cm: &dyn CycleEstimate,
) -> Projection {
    let hz = f64::from(a.clock_mhz) * 1e6;
    let bw = board.main_memory().bandwidth_gbs * 1e9 * a.bw_efficiency;
    let layers = f64::from(model.layers);
    let head = |tokens| Op {
        name: "lm_head".into(),
        mode: a.head_mode,
        tokens,
        k: u64::from(model.d_model),
        n: u64::from(model.vocab),
        count: 1,
        bytes: weight_bytes(
            cfg,
            a.head_mode,
            u64::from(model.d_model),
            u64::from(model.vocab),
        ),
    };
    let mut dec_ops = layer_ops(model, cfg, a, 1, a.context);
    dec_ops.push(head(1));
    let decode = rows(dec_ops, cm, hz, bw);
    // Prefill: the prompt as one GEMM per layer op; attention over half the prompt on average.
    let mut pre_ops = layer_ops(model, cfg, a, a.prompt, a.prompt.div_ceil(2));
    pre_ops.push(head(1)); // only the last token's logits are needed
    let prefill = rows(pre_ops, cm, hz, bw);
    let total = |rs: &[Row]| -> (f64, f64) {
        let n = rs.len() - 1;
        let t = rs[..n].iter().map(Row::time_s).sum::<f64>() * layers + rs[n].time_s();
        let b = rs[..n].iter().map(|r| r.op.bytes).sum::<f64>() * layers + rs[n].op.bytes;
        (t, b)
    };
    let (dt, db) = total(&decode);
    let (pt, _) = total(&prefill);
    let d = cfg.derive();
    let w2 = d
        .modes
        .iter()
        .find(|m| m.mode == a.linear_mode.name())
        .map_or(0.0, |m| m.peak_gmac_per_s);
    #[allow(clippy::cast_precision_loss)]
    Projection {
        model: model.clone(),
        board: board.name.clone(),
        assumptions: a.clone(),
        cycle_model: cm.describe(),
        peak_gmacs: w2,
        bandwidth_gbs: bw / 1e9,
        decode_tokens_s: 1.0 / dt,
        prefill_tokens_s: a.prompt as f64 / pt,
        decode_bytes_per_token: db,
        decode_bandwidth_bound_tokens_s: bw / db,
        resident_bytes: db,
        stream_bits: cfg.interface.stream_bits,
        board_memory_bytes: board.memory.iter().map(|m| m.size_gib).fold(0.0, f64::max)
            * f64::from(1u32 << 30),
        decode,
        prefill,
    }
}

fn table(s: &mut String, title: &str, rows: &[Row], layers: u32) {
    let _ = writeln!(s, "\n{title}");
    let _ = writeln!(
        s,
        "  {:<10} {:>5} {:>6} {:>7} {:>7} {:>6} {:>11} {:>10} {:>10} {:>8}  bound",
        "op", "x", "mode", "tokens", "k", "n*cnt", "MACs", "MB", "engine us", "mem us"
    );
    for (i, r) in rows.iter().enumerate() {
        let reps = if i + 1 == rows.len() { 1 } else { layers };
        let _ = writeln!(
            s,
            "  {:<10} {:>5} {:>6} {:>7} {:>7} {:>6} {:>11} {:>10.3} {:>10.1} {:>8.1}  {}",
            r.op.name,
            reps,
            r.op.mode.name(),
            r.op.tokens,
            r.op.k,
            r.op.n * r.op.count,
            r.op.macs(),
            r.op.bytes / 1e6,
            r.engine_s * 1e6,
            r.memory_s * 1e6,
            r.bound()
        );
    }
}

impl Projection {
    /// The text report (always labelled simulated).
    #[must_use]
    pub fn report(&self) -> String {
        let a = &self.assumptions;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "SIMULATED projection (analytical, not measured on a board): {} on {}",
            self.model.name, self.board
        );
        let _ = writeln!(
            s,
            "model shape: {} layers, d {}, FFN {}, {} heads ({} KV), head dim {}, vocab {} ({})",
            self.model.layers,
            self.model.d_model,
            self.model.d_ffn,
            self.model.heads,
            self.model.kv_heads,
            self.model.head_dim,
            self.model.vocab,
            self.model.source
        );
        let _ = writeln!(s, "assumptions:");
        let _ = writeln!(
            s,
            "  clock {} MHz (config target); engine peak {:.1} GMAC/s in {}",
            a.clock_mhz,
            self.peak_gmacs,
            a.linear_mode.name()
        );
        let _ = writeln!(s, "  memory bandwidth {:.1} GB/s = board peak x efficiency {:.2}; every weight and KV byte read from off-chip once per use", self.bandwidth_gbs, a.bw_efficiency);
        let _ = writeln!(s, "  linear layers {}, LM head {}, attention W4 over the KV4 cache through the fold stage, P x V twice (N22's two probability planes); decode context {} tokens, prompt {} tokens", a.linear_mode.name(), a.head_mode.name(), a.context, a.prompt);
        let _ = writeln!(s, "  per op time = max(engine, memory) (perfect overlap of loads inside an op); no pruning, batch 1");
        let _ = writeln!(s, "  cycles: {}", self.cycle_model);
        table(
            &mut s,
            "decode, one token (per layer, times layers; then the LM head):",
            &self.decode,
            self.model.layers,
        );
        table(
            &mut s,
            "prefill, whole prompt (per layer, times layers; then the LM head for the last token):",
            &self.prefill,
            self.model.layers,
        );
        let _ = writeln!(s, "\nresult (SIMULATED):");
        let _ = writeln!(s, "  decode  {:.2} tokens/s; {:.1} MB off-chip per token; memory roofline {:.1} tokens/s (bandwidth / bytes per token)", self.decode_tokens_s, self.decode_bytes_per_token / 1e6, self.decode_bandwidth_bound_tokens_s);
        let _ = writeln!(
            s,
            "  prefill {:.1} tokens/s ({} tokens)",
            self.prefill_tokens_s, a.prompt
        );
        let din_gbs = f64::from(self.stream_bits) / 8.0 * f64::from(a.clock_mhz) * 1e6 / 1e9;
        let _ = writeln!(
            s,
            "  the engine's din stream carries {din_gbs:.1} GB/s ({} bits x {} MHz); matching \
             the memory's {:.1} GB/s needs {:.0} such streams (engine instances or a wider din)",
            self.stream_bits,
            a.clock_mhz,
            self.bandwidth_gbs,
            (self.bandwidth_gbs / din_gbs).ceil()
        );
        if self.resident_bytes > self.board_memory_bytes {
            let _ = writeln!(
                s,
                "  WARNING: the model needs {:.2} GB resident but the board's largest memory \
                 holds {:.2} GB: it does not fit",
                self.resident_bytes / 1e9,
                self.board_memory_bytes / 1e9
            );
        }
        s
    }

    /// A log-log roofline plot (SVG): achieved GMAC/s against MACs per byte for every op.
    #[must_use]
    pub fn svg(&self) -> String {
        let (w, h, ml, mb) = (640.0_f64, 420.0_f64, 60.0_f64, 50.0_f64);
        let (x0, x1) = (-1.0_f64, 4.0_f64); // log10 MAC/byte
        let (y0, y1) = (-1.0_f64, 4.0_f64); // log10 GMAC/s
        let px = |x: f64| ml + (x.log10().clamp(x0, x1) - x0) / (x1 - x0) * (w - ml - 20.0);
        let py = |y: f64| h - mb - (y.log10().clamp(y0, y1) - y0) / (y1 - y0) * (h - mb - 30.0);
        let mut s = String::new();
        let _ = writeln!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">");
        let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(s, "<text x=\"{ml}\" y=\"18\" font-size=\"13\">SIMULATED roofline: {} on {} ({} MHz)</text>", self.model.name, self.board, self.assumptions.clock_mhz);
        for e in -1..=4 {
            let v = 10f64.powi(e);
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                px(v),
                py(10f64.powf(y0)),
                px(v),
                py(10f64.powf(y1))
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v}</text>",
                px(v),
                h - mb + 15.0
            );
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                px(10f64.powf(x0)),
                py(v),
                px(10f64.powf(x1)),
                py(v)
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
                ml - 4.0,
                py(v) + 4.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">MACs per off-chip byte</text>",
            w / 2.0,
            h - 12.0
        );
        let _ = writeln!(s, "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">GMAC/s</text>", h / 2.0, h / 2.0);
        // Roofs: memory (slope 1) and engine peak.
        let bw = self.bandwidth_gbs;
        let peak = self.peak_gmacs;
        let ridge = peak / bw;
        let xa = 10f64.powf(x0);
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"black\" stroke-width=\"2\" points=\"{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\"/>",
            px(xa), py(xa * bw), px(ridge), py(peak), px(10f64.powf(x1)), py(peak));
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">peak {:.0} GMAC/s, {:.0} GB/s</text>",
            px(ridge) + 5.0,
            py(peak) - 5.0,
            peak,
            bw
        );
        for (rows, color, label) in [
            (&self.decode, "#c0392b", "decode"),
            (&self.prefill, "#2471a3", "prefill"),
        ] {
            for r in rows {
                #[allow(clippy::cast_precision_loss)]
                let macs = r.op.macs() as f64;
                let ai = macs / r.op.bytes.max(1.0);
                let perf = macs / r.time_s() / 1e9;
                let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"><title>{label} {} ({}-bound)</title></circle>", px(ai), py(perf), r.op.name, r.bound());
            }
        }
        let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"44\" r=\"4\" fill=\"#c0392b\"/><text x=\"{:.1}\" y=\"48\">decode ops</text>", w - 130.0, w - 120.0);
        let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"60\" r=\"4\" fill=\"#2471a3\"/><text x=\"{:.1}\" y=\"64\">prefill ops</text>", w - 130.0, w - 120.0);
        s.push_str("</svg>\n");
        s
    }
}
