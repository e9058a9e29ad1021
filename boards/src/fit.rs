//! Resource fit: yosys `synth_xilinx` estimates against a board's budget, and the search for the
//! largest array (and buffers) under a utilisation limit.
//!
//! Synthesising a 2,048-PE engine with yosys takes far longer than a fit search can afford on
//! two cores, so the search uses a **model calibrated by yosys**: the PE module of each
//! candidate config is synthesised on its own (seconds), the rest of the logic (controller,
//! feeders, skew registers, output stages, AXI top) is taken from a yosys run of the whole tiny
//! board top and scaled by `(rows + cols) / 8`; DSPs are one per PE plus what the tiny run
//! shows outside the PEs; block RAM comes from `derive()`'s buffer estimate (URAM counted as
//! 8 BRAM36 each, since Vivado maps deep buffers there). `tessera fit --synth` runs yosys on
//! the chosen config to check it. Every yosys result is cached by config hash in
//! `<cache>/<build_dir_name>/<top|pe>-<family>-<verilog hash>/stats.txt`, so repeated fits are fast.
//!
//! yosys's limits, stated in every report: it maps carry chains to CARRY4 even on
//! UltraScale+ (Vivado uses CARRY8: more, shorter cells), it does not retime or share
//! registers as Vivado does (pessimistic FF counts), and it decides BRAM/LUTRAM/URAM mapping
//! on its own rules, so the LUT and FF figures are an upper estimate, not a Vivado report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::board::{Board, Resources};
use crate::wrapper::board_design;
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::engine::generate;
use tessera_hdl_gen::{yosys_synth, Design, Family, SynthOptions, SynthStats};

/// The caveat printed with every estimate.
pub const YOSYS_LIMITS: &str = "yosys 0.23 synth_xilinx estimate, not a Vivado report: carry \
chains are mapped to CARRY4 even on UltraScale+ (Vivado uses CARRY8), flip-flop counts are \
pessimistic (no retiming or register sharing), RAM mapping follows yosys's own rules";

/// Resource counts (BRAM in 36 Kb equivalents).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub lut: f64,
    pub ff: f64,
    pub dsp: f64,
    pub bram36: f64,
    pub uram: f64,
}

impl Usage {
    /// From yosys's cell counts: RAMB18 counted as half a RAMB36; shift registers (SRL) and
    /// distributed RAM cells counted by the LUTs they occupy (RAM64M8/RAM32M16: 8, RAM64M/
    /// RAM32M: 4, other RAM cells: 2).
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn from_stats(s: &SynthStats) -> Usage {
        let count = |p: &str| -> u64 {
            s.cells
                .iter()
                .filter(|(k, _)| k.starts_with(p))
                .map(|(_, v)| v)
                .sum()
        };
        let lutram: u64 = s
            .cells
            .iter()
            .filter(|(k, _)| k.starts_with("RAM") && !k.starts_with("RAMB"))
            .map(|(k, v)| {
                let w = match k.as_str() {
                    "RAM64M8" | "RAM32M16" => 8,
                    "RAM64M" | "RAM32M" => 4,
                    _ => 2,
                };
                w * v
            })
            .sum();
        Usage {
            lut: (s.luts() + count("SRL") + lutram) as f64,
            ff: s.ffs() as f64,
            dsp: s.dsps() as f64,
            bram36: count("RAMB36") as f64 + count("RAMB18") as f64 / 2.0,
            uram: s.urams() as f64,
        }
    }
}

/// Where synthesis results are cached.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

fn family_dir(f: Family) -> &'static str {
    f.yosys_name()
}

fn stats_to_text(s: &SynthStats) -> String {
    let mut t = format!("total {}\n", s.total_cells);
    for (k, v) in &s.cells {
        let _ = writeln!(t, "{k} {v}");
    }
    t
}

fn stats_from_text(t: &str) -> Option<SynthStats> {
    let mut s = SynthStats {
        cells: BTreeMap::new(),
        total_cells: 0,
    };
    for line in t.lines() {
        let (k, v) = line.split_once(' ')?;
        let v: u64 = v.parse().ok()?;
        if k == "total" {
            s.total_cells = v;
        } else {
            s.cells.insert(k.to_string(), v);
        }
    }
    Some(s)
}

/// 64-bit FNV-1a (a cache key, not a security hash).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Cache {
    /// A cache under `root` (created when needed).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    fn synth(
        &self,
        cfg: &EngineConfig,
        opts: &SynthOptions,
        what: &str,
        design: impl FnOnce() -> Result<Design, String>,
    ) -> Result<(SynthStats, bool), String> {
        let family = opts.family;
        let d = cfg.derive();
        let design = design()?;
        // The key is the config hash plus a hash of the Verilog text, so a generator change
        // never reuses a stale result.
        let text: String = design
            .render()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(n, t)| n + &t)
            .collect();
        // The PE's Verilog does not depend on the array shape: share it across configs.
        let base = if what == "pe" {
            self.root.join("pe")
        } else {
            self.root.join(&d.build_dir_name)
        };
        // Flat results keep their historical folder name; hierarchical ones say so.
        let dir = base.join(format!(
            "{what}{}-{}-{:016x}",
            if opts.flatten { "" } else { "-hier" },
            family_dir(family),
            fnv1a(text.as_bytes())
        ));
        let stats_file = dir.join("stats.txt");
        if let Ok(t) = std::fs::read_to_string(&stats_file) {
            if let Some(s) = stats_from_text(&t) {
                return Ok((s, true));
            }
        }
        let w = design.write(&dir).map_err(|e| e.to_string())?;
        let s = yosys_synth(&w, opts).map_err(|e| e.to_string())?;
        std::fs::write(&stats_file, stats_to_text(&s))
            .map_err(|e| format!("writing {}: {e}", stats_file.display()))?;
        Ok((s, false))
    }

    /// yosys on the whole board top (engine + AXI wrapper) of `cfg`, flattened (the tiny
    /// calibration: closest to Vivado, which optimises across the hierarchy); `true` when
    /// cached.
    pub fn synth_top(
        &self,
        cfg: &EngineConfig,
        family: Family,
    ) -> Result<(SynthStats, bool), String> {
        let opts = SynthOptions {
            family,
            ..SynthOptions::default()
        };
        self.synth(cfg, &opts, "top", || {
            board_design(cfg).map_err(|e| e.to_string())
        })
    }

    /// yosys on the whole board top of `cfg`, hierarchical (each module once, totals by
    /// instance count): the run that finishes for 2,048 PEs; `true` when cached.
    pub fn synth_top_hier(
        &self,
        cfg: &EngineConfig,
        family: Family,
    ) -> Result<(SynthStats, bool), String> {
        self.synth(cfg, &SynthOptions::hierarchical(family), "top", || {
            board_design(cfg).map_err(|e| e.to_string())
        })
    }

    /// yosys on the PE module of `cfg` alone.
    pub fn synth_pe(
        &self,
        cfg: &EngineConfig,
        family: Family,
    ) -> Result<(SynthStats, bool), String> {
        let opts = SynthOptions {
            family,
            ..SynthOptions::default()
        };
        self.synth(cfg, &opts, "pe", || {
            let full = generate(cfg).map_err(|e| e.to_string())?;
            let pe = full
                .module("tessera_pe")
                .ok_or("engine design has no tessera_pe")?
                .clone();
            let mut d = Design::new("tessera_pe");
            d.add(pe).map_err(|e| e.to_string())?;
            Ok(d)
        })
    }
}

/// The calibration the model needs: the tiny board top, synthesised once per family.
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    /// The whole tiny board top.
    pub tiny_top: Usage,
    /// The tiny config's PE.
    pub tiny_pe: Usage,
    /// PEs of the tiny config.
    pub tiny_pes: f64,
    /// `rows + cols` of the tiny config.
    pub tiny_edge: f64,
}

impl Calibration {
    /// Synthesises (or reads from the cache) the tiny top and PE for `family`.
    pub fn load(cache: &Cache, family: Family) -> Result<Calibration, String> {
        let tiny = EngineConfig::preset("tiny").map_err(|e| e.to_string())?;
        let top = Usage::from_stats(&cache.synth_top(&tiny, family)?.0);
        let pe = Usage::from_stats(&cache.synth_pe(&tiny, family)?.0);
        #[allow(clippy::cast_precision_loss)]
        Ok(Calibration {
            tiny_top: top,
            tiny_pe: pe,
            tiny_pes: f64::from(tiny.array.rows * tiny.array.cols),
            tiny_edge: f64::from(tiny.array.rows + tiny.array.cols),
        })
    }
}

/// Estimated usage of `cfg`: `pes * PE(cfg)` + the tiny top's non-PE logic scaled by
/// `(rows + cols) / tiny's`, BRAM from `derive()` (the buffers; URAM left at 0, the budget
/// counts URAM as BRAM capacity).
#[must_use]
pub fn model(cfg: &EngineConfig, pe: &Usage, cal: &Calibration) -> Usage {
    let d = cfg.derive();
    let pes = f64::from(d.pe_count);
    let edge = f64::from(cfg.array.rows + cfg.array.cols) / cal.tiny_edge;
    let rest = |top: f64, p: f64| (top - cal.tiny_pes * p).max(0.0) * edge;
    Usage {
        lut: pes * pe.lut + rest(cal.tiny_top.lut, cal.tiny_pe.lut),
        ff: pes * pe.ff + rest(cal.tiny_top.ff, cal.tiny_pe.ff),
        dsp: pes * pe.dsp.max(1.0) + rest(cal.tiny_top.dsp, cal.tiny_pe.dsp),
        bram36: f64::from(d.total_bram36),
        uram: 0.0,
    }
}

/// One resource's share of the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub resource: &'static str,
    pub used: f64,
    pub available: f64,
    pub fraction: f64,
}

/// Utilisation of every resource; BRAM is compared with `bram36 + 8 * uram` (URAM288 holds
/// eight 36 Kb blocks' worth of bits).
#[must_use]
pub fn shares(u: &Usage, r: &Resources) -> Vec<Share> {
    #[allow(clippy::cast_precision_loss)]
    let mk = |resource, used: f64, available: u64| Share {
        resource,
        used,
        available: available as f64,
        fraction: if available == 0 {
            if used > 0.0 {
                f64::INFINITY
            } else {
                0.0
            }
        } else {
            used / available as f64
        },
    };
    vec![
        mk("LUT", u.lut, r.lut),
        mk("FF", u.ff, r.ff),
        mk("DSP", u.dsp, r.dsp),
        mk(
            "BRAM36+URAM",
            u.bram36 + 8.0 * u.uram,
            r.bram36 + 8 * r.uram,
        ),
    ]
}

/// The share with the largest fraction.
#[must_use]
pub fn binding(sh: &[Share]) -> &Share {
    sh.iter()
        .max_by(|a, b| a.fraction.total_cmp(&b.fraction))
        .expect("four shares")
}

/// `cfg` with another array shape; the stream widened to hold one activation row per beat.
#[must_use]
pub fn with_array(base: &EngineConfig, rows: u32, cols: u32) -> EngineConfig {
    let mut c = base.clone();
    c.array.rows = rows;
    c.array.cols = cols;
    let need = (rows * 8).next_power_of_two().max(32);
    if c.interface.stream_bits < need {
        c.interface.stream_bits = need;
    }
    if c.buffers.out_depth < rows {
        c.buffers.out_depth = rows.next_power_of_two();
    }
    c
}

/// One evaluated candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub cfg: EngineConfig,
    pub usage: Usage,
    pub shares: Vec<Share>,
    pub fits: bool,
}

/// Result of a fit search.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// The power-of-two candidates evaluated, largest first.
    pub tried: Vec<Candidate>,
    /// The largest fitting candidate of any shape the config allows, after growing its
    /// buffers.
    pub best: Option<Candidate>,
    /// The largest fitting power-of-two candidate, after growing its buffers.
    pub best_pow2: Option<Candidate>,
}

fn evaluate(
    cfg: &EngineConfig,
    board: &Board,
    pe: &Usage,
    cal: &Calibration,
    limit: f64,
) -> Result<Candidate, String> {
    let usage = model(cfg, pe, cal);
    let sh = shares(&usage, &board.resources);
    let fits = sh.iter().all(|s| s.fraction <= limit);
    Ok(Candidate {
        cfg: cfg.clone(),
        usage,
        shares: sh,
        fits,
    })
}

/// Array shapes tried first: powers of two, `rows <= cols`, up to 64 x 64, largest PE count
/// first.
#[must_use]
pub fn shapes() -> Vec<(u32, u32)> {
    let p = [4u32, 8, 16, 32, 64];
    let mut v: Vec<(u32, u32)> = p
        .iter()
        .flat_map(|&r| p.iter().filter(move |&&c| c >= r).map(move |&c| (r, c)))
        .collect();
    v.sort_by_key(|&(r, c)| (std::cmp::Reverse(r * c), std::cmp::Reverse(r)));
    v
}

/// Every shape the config allows (`array.rows`, `array.cols` in 1..=64, any value), with
/// `4 <= rows <= cols`, largest PE count first, then the squarer shape (more rows).
#[must_use]
pub fn all_shapes() -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = (4u32..=64)
        .flat_map(|r| (r..=64).map(move |c| (r, c)))
        .collect();
    v.sort_by_key(|&(r, c)| (std::cmp::Reverse(r * c), std::cmp::Reverse(r)));
    v
}

/// Finds the largest array (then the largest weight buffer, doubling `wgt_depth` up to 64 Ki
/// entries; `act_depth` stays as given, it is sized by the model's longest `k`) of `base`
/// under `limit` on `board`. The power-of-two shapes are tried and reported first; then every
/// shape the config allows (rows and cols need not be powers of two) is evaluated with the
/// same model, and the one with the most PEs under the limit wins (`best`; `best_pow2` is
/// the largest power-of-two fit). The PE is synthesised once: its Verilog does not depend on
/// the array shape.
pub fn fit(
    board: &Board,
    base: &EngineConfig,
    limit: f64,
    cache: &Cache,
) -> Result<FitResult, String> {
    let cal = Calibration::load(cache, board.yosys_family())?;
    let pe = Usage::from_stats(&cache.synth_pe(base, board.yosys_family())?.0);
    let mut tried = Vec::new();
    let mut best_pow2 = None;
    for (r, c) in shapes() {
        let cfg = with_array(base, r, c);
        if cfg.validate().is_err() {
            continue;
        }
        let cand = evaluate(&cfg, board, &pe, &cal, limit)?;
        let fits = cand.fits;
        tried.push(cand.clone());
        if fits {
            best_pow2 = Some(cand);
            break;
        }
    }
    let mut best = None;
    for (r, c) in all_shapes() {
        let cfg = with_array(base, r, c);
        if cfg.validate().is_err() {
            continue;
        }
        let cand = evaluate(&cfg, board, &pe, &cal, limit)?;
        if cand.fits {
            best = Some(cand);
            break;
        }
    }
    for b in [best.as_mut(), best_pow2.as_mut()].into_iter().flatten() {
        loop {
            let mut g = b.cfg.clone();
            g.buffers.wgt_depth *= 2;
            if g.buffers.wgt_depth > 65536 || g.validate().is_err() {
                break;
            }
            let cand = evaluate(&g, board, &pe, &cal, limit)?;
            if !cand.fits {
                break;
            }
            *b = cand;
        }
    }
    Ok(FitResult {
        tried,
        best,
        best_pow2,
    })
}

/// A text table of one candidate's shares.
#[must_use]
pub fn share_table(sh: &[Share], limit: f64) -> String {
    let mut s = String::from("  resource       used    available   util\n");
    for x in sh {
        let _ = writeln!(
            s,
            "  {:<12} {:>9.0} {:>12.0} {:>6.1}%{}",
            x.resource,
            x.used,
            x.available,
            x.fraction * 100.0,
            if x.fraction > limit {
                "  over the limit"
            } else {
                ""
            }
        );
    }
    s
}

/// The default cache folder: `target/tessera-fit` under the current directory.
#[must_use]
pub fn default_cache_dir() -> PathBuf {
    Path::new("target").join("tessera-fit")
}
