//! Speed of the ways to run one program (`tessera bench cosim`): the verilated engine alone,
//! the golden cycle model alone, and both in lock step (one thread, and the two-thread pipeline).

use std::time::Instant;

use tessera_golden::config::EngineConfig;

use crate::check::{lockstep_lib, model_only, record, Stimulus, Threads};
use crate::ffi::Lib;
use crate::suites::cases;

/// Cycles, wall seconds and CPU seconds (all threads) of one run.
pub type Timing = (u64, f64, f64);

/// Cycles and seconds of each run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub ops: usize,
    /// The verilated engine alone, replaying recorded inputs (batched, no state read).
    pub raw: Timing,
    /// The golden side alone (cycle model, driver, state words).
    pub model: Timing,
    /// Lock step on one thread.
    pub lockstep1: Timing,
    /// Lock step with the golden side on a second thread.
    pub lockstep2: Timing,
    /// `/proc/loadavg`'s first three fields, and the cores available.
    pub load: String,
}

fn rate((c, t, _): Timing) -> f64 {
    c as f64 / t.max(1e-9)
}

fn cpu_rate((c, _, u): Timing) -> f64 {
    c as f64 / u.max(1e-9)
}

/// CPU seconds used by this process so far (`/proc/self/stat` utime + stime, all threads
/// including finished ones; 0 where unavailable).
#[must_use]
pub fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Times `f`, which returns the cycles it ran.
pub fn timed(f: impl FnOnce() -> Result<u64, String>) -> Result<Timing, String> {
    let (t, u) = (Instant::now(), cpu_seconds());
    let c = f()?;
    Ok((c, t.elapsed().as_secs_f64(), cpu_seconds() - u))
}

impl BenchReport {
    /// The side-by-side table.
    #[must_use]
    pub fn table(&self, name: &str) -> String {
        let mut s = format!(
            "co-simulation speed, {name}, {} random ops ({})\n{:<30} {:>10} {:>9} {:>12} {:>9} {:>14}\n",
            self.ops, self.load, "run", "cycles", "seconds", "cycles/s", "CPU s", "cycles/CPU-s"
        );
        for (what, r) in [
            ("raw Verilator", self.raw),
            ("golden cycle model", self.model),
            ("lock-step checked, 1 thread", self.lockstep1),
            ("lock-step checked, 2 threads", self.lockstep2),
        ] {
            s.push_str(&format!(
                "{what:<30} {:>10} {:>9.3} {:>12.0} {:>9.2} {:>14.0}\n",
                r.0,
                r.1,
                rate(r),
                r.2,
                cpu_rate(r)
            ));
        }
        let best = if rate(self.lockstep2) > rate(self.lockstep1) {
            self.lockstep2
        } else {
            self.lockstep1
        };
        s.push_str(&format!(
            "lock-step (best) costs {:.2}x the raw Verilator run per cycle\n",
            rate(self.raw) / rate(best).max(1e-9)
        ));
        s
    }
}

/// The 8 x 8 bench config: tiny with an 8 x 8 array.
pub fn bench_config() -> Result<EngineConfig, String> {
    let mut cfg = EngineConfig::preset("tiny").map_err(|e| e.to_string())?;
    cfg.name = "bench8x8".into();
    cfg.array.rows = 8;
    cfg.array.cols = 8;
    cfg.validate().map_err(|e| {
        e.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(cfg)
}

fn load_line() -> String {
    let la = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    format!("load average {la}, {cores} cores")
}

/// One random program of `ops` operations.
pub fn bench_stimulus(cfg: &EngineConfig, ops: usize, seed: u64) -> Result<Stimulus, String> {
    let mut all = cases(cfg, "random", seed, ops)?;
    let mut prog = all.remove(0).prog;
    for c in all {
        prog.cmds.extend(c.prog.cmds);
        prog.din.extend(c.prog.din);
    }
    Ok(Stimulus {
        cmds: prog.cmds,
        din: prog.din.iter().map(|w| w.0.clone()).collect(),
        stall: false,
        stall_seed: seed,
    })
}

/// Runs one random program of `ops` operations every way.
pub fn bench(lib: &Lib, cfg: &EngineConfig, ops: usize, seed: u64) -> Result<BenchReport, String> {
    let stim = bench_stimulus(cfg, ops, seed)?;
    let max = 1u64 << 40;
    let rec = record(cfg, &stim, max)?;
    let raw = timed(|| Ok(rec.replay(lib, seed)))?;
    let model = timed(|| model_only(cfg, &stim, max))?;
    let ls = |th: Threads| {
        timed(|| match lockstep_lib(lib, cfg, &stim, seed, max, th)? {
            Ok(c) => Ok(c.cycles),
            Err(mm) => Err(format!("lock-step mismatch: {mm}")),
        })
    };
    let (lockstep1, lockstep2) = (ls(Threads::One)?, ls(Threads::Two)?);
    Ok(BenchReport {
        ops,
        raw,
        model,
        lockstep1,
        lockstep2,
        load: load_line(),
    })
}
