//! Co-simulation suites: directed programs (each mode, each dataflow, tile edges, odd sizes,
//! saturation, back-pressure stalls, mode switches, the attention fold) and constrained-random
//! streams, built with `tessera_hdl_gen::testprog` (the same builders as hdl-gen's Verilator
//! test). Every program runs in lock step ([`crate::check::lockstep`]) and its drained outputs
//! are also compared with the functional golden model's results (`golden::ops`, `golden::kv`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use tessera_golden::config::{EngineConfig, WeightMode};
use tessera_golden::engine::{Dataflow, StreamLayout};
use tessera_golden::ops::OutputStage;
use tessera_hdl_gen::testprog::{add_fold_op, add_op, lattice, op, stage, Op, Program, Rng};

use crate::check::{lockstep, Mismatch, Stimulus};
use crate::verilate::Engine;

/// Suite names, in run order (`all` runs every one).
pub const SUITES: [&str; 11] = [
    "modes",
    "dataflows",
    "edges",
    "odd",
    "saturation",
    "stalls",
    "switch",
    "attention",
    "ksplit",
    "random",
    "short",
];

/// Ops per program of the random suite (keeps a reproduction short).
const OPS_PER_PROGRAM: usize = 12;

/// Ops per program of the short suite (its ops are short, so a program of 48 stays short).
const SHORT_OPS_PER_PROGRAM: usize = 48;

/// One program of a suite, with its stall setting.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub prog: Program,
    pub ops: usize,
    pub stall: bool,
    pub stall_seed: u64,
}

/// The result of one suite.
#[derive(Debug, Clone)]
pub struct SuiteReport {
    pub suite: String,
    pub cases: usize,
    pub ops: usize,
    pub cycles: u64,
    pub secs: f64,
    /// The first failure (a mismatch, or outputs that differ from the functional model).
    pub failure: Option<Failure>,
}

/// Why a suite failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub case: String,
    pub message: String,
    pub mismatch: Option<Mismatch>,
}

impl SuiteReport {
    /// The one-line summary.
    #[must_use]
    pub fn line(&self) -> String {
        let per_s = |x: f64| if self.secs > 0.0 { x / self.secs } else { 0.0 };
        match &self.failure {
            None => format!(
                "suite {}: PASS {} programs, {} ops, {} cycles checked, {:.2} s ({:.0} checked cycles/s, {:.0} ops/s)",
                self.suite,
                self.cases,
                self.ops,
                self.cycles,
                self.secs,
                per_s(self.cycles as f64),
                per_s(self.ops as f64)
            ),
            Some(f) => format!("suite {}: FAIL in {}: {}", self.suite, f.case, f.message),
        }
    }
}

fn max_gemm_k(cfg: &EngineConfig, mode: WeightMode) -> usize {
    let l = cfg.quant.w_group_len as usize;
    let bpg = l * mode.bits() as usize / 8;
    let by_wgt = cfg.buffers.wgt_depth as usize / bpg * l;
    let meta = (cfg.buffers.wgt_depth * 4 / cfg.quant.w_group_len) as usize;
    by_wgt.min(meta * l).min(cfg.buffers.act_depth as usize)
}

fn out_addr(cfg: &EngineConfig, i: usize) -> u32 {
    let rows = cfg.array.rows;
    (rows * i as u32) % (cfg.buffers.out_depth - rows + 1)
}

fn program(cfg: &EngineConfig, rng: &mut Rng, ops: &[Op]) -> Program {
    let mut p = Program::default();
    for (i, o) in ops.iter().enumerate() {
        add_op(&mut p, cfg, rng, o, out_addr(cfg, i));
    }
    p
}

fn case(name: &str, prog: Program, ops: usize, stall: bool, seed: u64) -> Case {
    Case {
        name: name.to_string(),
        prog,
        ops,
        stall,
        stall_seed: seed,
    }
}

/// A random op that fits `cfg`'s buffers; `short`: `k <= 2 L` (the short suite: many ops per
/// cycle, still every mode, dataflow, shape and output stage).
fn random_op(cfg: &EngineConfig, rng: &mut Rng, i: usize, short: bool) -> Op {
    let modes = cfg.modes();
    let mode = modes[rng.below(modes.len() as u64) as usize];
    let (rows, cols) = (cfg.array.rows as usize, cfg.array.cols as usize);
    let gemv = rng.below(2) == 1;
    let kmax = if gemv {
        cfg.buffers.act_depth as usize
    } else {
        max_gemm_k(cfg, mode)
    };
    let l = cfg.quant.w_group_len as usize;
    let k = if short {
        match rng.below(3) {
            0 => 1 + rng.below(8) as usize,
            1 => l * (1 + rng.below(2) as usize),
            _ => 1 + rng.below(2 * l as u64) as usize,
        }
    } else {
        match rng.below(4) {
            0 => 1 + rng.below(8) as usize,
            1 => l * (1 + rng.below(3) as usize),
            _ => 1 + rng.below(kmax as u64) as usize,
        }
    }
    .min(kmax);
    let st = match rng.below(5) {
        0 => OutputStage::IDENTITY_I32,
        1 => stage(1 + rng.below(65535) as u16, rng.below(40) as u32, 8),
        2 => stage(1 + rng.below(65535) as u16, rng.below(40) as u32, 16),
        _ => lattice(cfg),
    };
    let extreme = match rng.below(10) {
        0 => 1,
        1 => 2,
        _ => 0,
    };
    let (df, m, n) = if gemv {
        (
            Dataflow::Gemv,
            1,
            1 + rng.below((rows * cols) as u64) as usize,
        )
    } else {
        (
            Dataflow::Gemm,
            1 + rng.below(rows as u64) as usize,
            1 + rng.below(cols as u64) as usize,
        )
    };
    op(&format!("random op {i}"), mode, df, m, n, k, st, extreme)
}

/// The cases of `suite` for `cfg` (`ops`: size of the random suite).
pub fn cases(cfg: &EngineConfig, suite: &str, seed: u64, ops: usize) -> Result<Vec<Case>, String> {
    use Dataflow::{Gemm, Gemv};
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let (rows, cols) = (cfg.array.rows as usize, cfg.array.cols as usize);
    let pes = rows * cols;
    let l = cfg.quant.w_group_len as usize;
    let lat = lattice(cfg);
    let modes = cfg.modes();
    let both = |name: &str, prog: Program, n: usize, seed: u64| {
        vec![
            case(name, prog.clone(), n, false, seed),
            case(&format!("{name} (stalls)"), prog, n, true, seed),
        ]
    };
    let mut out = Vec::new();
    match suite {
        "modes" => {
            for &md in &modes {
                let k = (3 * l + 5).min(max_gemm_k(cfg, md));
                let ops = [
                    op(
                        &format!("{} gemm", md.name()),
                        md,
                        Gemm,
                        rows,
                        cols,
                        k,
                        lat,
                        0,
                    ),
                    op(&format!("{} gemv", md.name()), md, Gemv, 1, pes, k, lat, 0),
                ];
                out.extend(both(
                    &format!("mode {}", md.name()),
                    program(cfg, &mut rng, &ops),
                    2,
                    seed,
                ));
            }
        }
        "dataflows" => {
            let md = WeightMode::W2;
            let ops = [
                op("gemm full tile", md, Gemm, rows, cols, 2 * l, lat, 0),
                op("gemv all PEs", md, Gemv, 1, pes, 2 * l, lat, 0),
                op("gemm one token", md, Gemm, 1, cols, l, lat, 0),
                op("gemv one channel", md, Gemv, 1, 1, l, lat, 0),
            ];
            out.extend(both("dataflows", program(cfg, &mut rng, &ops), 4, seed));
        }
        "edges" => {
            let md = WeightMode::W4;
            let kmax = max_gemm_k(cfg, md);
            let ops = [
                op("k=1", md, Gemm, rows, cols, 1, lat, 0),
                op("k=L", md, Gemm, rows, cols, l, lat, 0),
                op("k=L+1", md, Gemm, rows, cols, l + 1, lat, 0),
                op("k=max gemm", md, Gemm, rows, cols, kmax, lat, 0),
                op(
                    "k=act_depth gemv",
                    WeightMode::W2,
                    Gemv,
                    1,
                    pes,
                    cfg.buffers.act_depth as usize,
                    lat,
                    0,
                ),
                op("1x1", md, Gemm, 1, 1, l - 1, lat, 0),
            ];
            let mut p = program(cfg, &mut rng, &ops);
            // The last output entries of outb.
            let last = Op {
                label: "out at the end of outb".into(),
                ..op("", md, Gemm, rows, cols, 7, lat, 0)
            };
            add_op(
                &mut p,
                cfg,
                &mut rng,
                &last,
                cfg.buffers.out_depth - rows as u32,
            );
            out.extend(both("edges", p, ops.len() + 1, seed));
        }
        "odd" => {
            let mut ops = Vec::new();
            for i in 0..6 {
                let md = modes[i % modes.len()];
                let k = (2 * (rng.below(3 * l as u64) as usize) + 1).min(max_gemm_k(cfg, md));
                let m = 1 + (rng.below(rows as u64) as usize);
                let n = 1 + (rng.below(cols as u64) as usize);
                ops.push(op(
                    &format!("odd gemm {m}x{n} k={k}"),
                    md,
                    Gemm,
                    m,
                    n,
                    k,
                    lat,
                    0,
                ));
                let n = 1 + 2 * (rng.below(pes.div_ceil(2) as u64) as usize);
                ops.push(op(
                    &format!("odd gemv n={n} k={k}"),
                    md,
                    Gemv,
                    1,
                    n.min(pes),
                    k,
                    lat,
                    0,
                ));
            }
            out.extend(both(
                "odd sizes",
                program(cfg, &mut rng, &ops),
                ops.len(),
                seed,
            ));
        }
        "saturation" => {
            let id = OutputStage::IDENTITY_I32;
            let big = cfg.buffers.act_depth as usize;
            let ops = [
                op(
                    "extreme w2 gemm",
                    WeightMode::W2,
                    Gemm,
                    rows,
                    cols,
                    max_gemm_k(cfg, WeightMode::W2),
                    id,
                    1,
                ),
                op(
                    "acc saturation gemv",
                    WeightMode::W2,
                    Gemv,
                    1,
                    pes,
                    big,
                    id,
                    2,
                ),
                op(
                    "8-bit output",
                    WeightMode::W4,
                    Gemm,
                    rows,
                    cols,
                    3 * l,
                    stage(3, 20, 8),
                    0,
                ),
                op(
                    "16-bit output",
                    WeightMode::W4,
                    Gemv,
                    1,
                    pes,
                    3 * l,
                    stage(1000, 21, 16),
                    0,
                ),
                op(
                    "32-bit output",
                    WeightMode::W2,
                    Gemm,
                    rows,
                    cols,
                    l,
                    stage(65535, 0, 32),
                    1,
                ),
            ];
            out.extend(both(
                "saturation",
                program(cfg, &mut rng, &ops),
                ops.len(),
                seed,
            ));
        }
        "stalls" => {
            let ops: Vec<Op> = (0..6).map(|i| random_op(cfg, &mut rng, i, false)).collect();
            let p = program(cfg, &mut rng, &ops);
            for s in 0..3 {
                out.push(case(
                    &format!("stalls seed {s}"),
                    p.clone(),
                    ops.len(),
                    true,
                    seed + s,
                ));
            }
        }
        "switch" => {
            // Consecutive commands switch mode and dataflow with no idle gap in between.
            let mut ops = Vec::new();
            for i in 0..8 {
                let md = modes[i % modes.len()];
                let df = if i % 2 == 0 { Gemm } else { Gemv };
                let (m, n) = if df == Gemm { (rows, cols) } else { (1, pes) };
                ops.push(op(
                    &format!("switch {i} {}", md.name()),
                    md,
                    df,
                    m,
                    n,
                    (l + i).min(max_gemm_k(cfg, md)),
                    lat,
                    0,
                ));
            }
            out.extend(both(
                "mode switches",
                program(cfg, &mut rng, &ops),
                ops.len(),
                seed,
            ));
        }
        "attention" => {
            let id = OutputStage::IDENTITY_I32;
            let e = (l + 13).min(cfg.buffers.act_depth as usize);
            let mut p = Program::default();
            add_fold_op(
                &mut p,
                cfg,
                &mut rng,
                "q.k kv4",
                false,
                pes,
                e,
                id,
                out_addr(cfg, 0),
            );
            if modes.contains(&WeightMode::W8) {
                add_fold_op(
                    &mut p,
                    cfg,
                    &mut rng,
                    "p.v window",
                    true,
                    pes,
                    e,
                    id,
                    out_addr(cfg, 1),
                );
            }
            add_fold_op(
                &mut p,
                cfg,
                &mut rng,
                "q.k kv4 sat8",
                false,
                pes.max(2) - 1,
                e,
                stage(1, 6, 8),
                out_addr(cfg, 2),
            );
            let after = op(
                "w2 gemv after fold",
                WeightMode::W2,
                Gemv,
                1,
                pes,
                l,
                lat,
                0,
            );
            add_op(&mut p, cfg, &mut rng, &after, out_addr(cfg, 3));
            out.extend(both("attention fold", p, 4, seed));
        }
        "ksplit" => {
            // Two RUNs per op, the first with keep = 1: every mode, both dataflows, random
            // shapes, the split after a random number of groups.
            let mut ops = Vec::new();
            for i in 0..8 {
                let md = modes[i % modes.len()];
                let gemv = i % 2 == 1;
                let kmax = if gemv {
                    cfg.buffers.act_depth as usize
                } else {
                    max_gemm_k(cfg, md)
                };
                let gmax = (kmax / l).min(4);
                if gmax < 2 {
                    continue;
                }
                let groups = 2 + rng.below(gmax as u64 - 1) as usize;
                let k = (groups - 1) * l + 1 + rng.below(l as u64) as usize;
                let split = l * (1 + rng.below(groups as u64 - 1) as usize);
                let (df, m, n) = if gemv {
                    (Gemv, 1, 1 + rng.below(pes as u64) as usize)
                } else {
                    (
                        Gemm,
                        1 + rng.below(rows as u64) as usize,
                        1 + rng.below(cols as u64) as usize,
                    )
                };
                ops.push(Op {
                    split,
                    ..op(
                        &format!("{} {df:?} k={k} split at {split}", md.name()),
                        md,
                        df,
                        m,
                        n,
                        k,
                        lat,
                        0,
                    )
                });
            }
            let n = ops.len();
            out.extend(both("k-split", program(cfg, &mut rng, &ops), n, seed));
        }
        "random" | "short" => {
            let short = suite == "short";
            let per = if short {
                SHORT_OPS_PER_PROGRAM
            } else {
                OPS_PER_PROGRAM
            };
            let mut done = 0;
            let mut j = 0u64;
            while done < ops {
                let n = per.min(ops - done);
                let list: Vec<Op> = (0..n)
                    .map(|i| random_op(cfg, &mut rng, done + i, short))
                    .collect();
                let stall = j % 2 == 1;
                out.push(case(
                    &format!("{suite} program {j}"),
                    program(cfg, &mut rng, &list),
                    n,
                    stall,
                    seed + j,
                ));
                done += n;
                j += 1;
            }
        }
        other => {
            return Err(format!(
                "unknown suite {other:?}: one of {}, all",
                SUITES.join(", ")
            ))
        }
    }
    Ok(out)
}

/// Runs the cases of `suite` in lock step; stops at the first failure.
pub fn run_suite(
    eng: &Engine,
    suite: &str,
    seed: u64,
    ops: usize,
    wave_dir: Option<&Path>,
) -> Result<SuiteReport, String> {
    let cfg = &eng.cfg;
    let cs = cases(cfg, suite, seed, ops)?;
    let lay = StreamLayout::new(cfg);
    let t = Instant::now();
    let mut rep = SuiteReport {
        suite: suite.to_string(),
        cases: 0,
        ops: 0,
        cycles: 0,
        secs: 0.0,
        failure: None,
    };
    for c in &cs {
        let stim = Stimulus {
            cmds: c.prog.cmds.clone(),
            din: c.prog.din.iter().map(|w| w.0.clone()).collect(),
            stall: c.stall,
            stall_seed: c.stall_seed,
        };
        let max = 200 * (stim.din.len() as u64 + 64 * stim.cmds.len() as u64) + 100_000;
        let res = lockstep(eng, &stim, seed, max, wave_dir)?;
        rep.cases += 1;
        match res {
            Err(mm) => {
                rep.failure = Some(Failure {
                    case: c.name.clone(),
                    message: mm.to_string(),
                    mismatch: Some(mm),
                });
                break;
            }
            Ok(clean) => {
                rep.cycles += clean.cycles;
                rep.ops += c.ops;
                if let Some(msg) = functional_diff(&lay, &c.prog, &clean) {
                    rep.failure = Some(Failure {
                        case: c.name.clone(),
                        message: msg,
                        mismatch: None,
                    });
                    break;
                }
            }
        }
    }
    rep.secs = t.elapsed().as_secs_f64();
    Ok(rep)
}

/// The functional model's results against what the engine (and the cycle model) drained.
fn functional_diff(
    lay: &StreamLayout,
    prog: &Program,
    clean: &crate::check::Clean,
) -> Option<String> {
    if clean.err {
        return Some("err_o was raised".into());
    }
    if clean.din_consumed != prog.din.len() {
        return Some(format!(
            "{} of {} din words consumed",
            clean.din_consumed,
            prog.din.len()
        ));
    }
    let ow = lay.out_words as usize;
    if clean.out.len() != prog.expect.len() * ow {
        return Some(format!(
            "{} dout words, the functional model expects {}",
            clean.out.len(),
            prog.expect.len() * ow
        ));
    }
    for (i, (want, label)) in prog.expect.iter().zip(&prog.labels).enumerate() {
        let words: Vec<_> = clean.out[i * ow..(i + 1) * ow]
            .iter()
            .map(|b| tessera_golden::engine::Word(b.clone()))
            .collect();
        let got: Vec<i64> = lay.out_entry(&words).into_iter().map(i64::from).collect();
        if &got != want {
            return Some(format!(
                "{label}: engine {got:?}, functional golden {want:?}"
            ));
        }
    }
    None
}

/// JSON report of suites.
#[must_use]
pub fn json(config: &str, seed: u64, reps: &[SuiteReport]) -> String {
    let suites: Vec<serde_json::Value> = reps
        .iter()
        .map(|r| {
            let mm = r.failure.as_ref().and_then(|f| f.mismatch.as_ref());
            serde_json::json!({
                "suite": r.suite,
                "pass": r.failure.is_none(),
                "programs": r.cases,
                "ops": r.ops,
                "cycles": r.cycles,
                "seconds": r.secs,
                "failure": r.failure.as_ref().map(|f| serde_json::json!({
                    "case": f.case,
                    "message": f.message,
                    "cycle": mm.map(|m| m.cycle),
                    "signal": mm.map(|m| m.signal.clone()),
                    "expected": mm.map(|m| m.expected.clone()),
                    "actual": mm.map(|m| m.actual.clone()),
                    "command": mm.map(|m| m.cmd.clone()),
                    "waveform": mm.and_then(|m| m.wave.as_ref().map(|w| w.display().to_string())),
                })),
            })
        })
        .collect();
    serde_json::json!({"config": config, "seed": seed, "suites": suites}).to_string()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML of suites (one test case per suite).
#[must_use]
pub fn junit(config: &str, reps: &[SuiteReport]) -> String {
    let fails = reps.iter().filter(|r| r.failure.is_some()).count();
    let total: f64 = reps.iter().map(|r| r.secs).sum();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuite name=\"tessera cosim {}\" tests=\"{}\" failures=\"{fails}\" time=\"{total:.3}\">",
        xml_escape(config),
        reps.len()
    );
    for r in reps {
        let _ = write!(
            s,
            "  <testcase classname=\"cosim.{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(config),
            r.suite,
            r.secs
        );
        match &r.failure {
            None => s.push_str("/>\n"),
            Some(f) => {
                let _ = writeln!(
                    s,
                    ">\n    <failure message=\"{}\"/>\n  </testcase>",
                    xml_escape(&format!("{}: {}", f.case, f.message))
                );
            }
        }
    }
    s.push_str("</testsuite>\n");
    s
}
