//! Speed of the three ways to run one program (`tessera bench cosim`): the verilated engine
//! alone, the golden cycle model alone, and both in lock step.

use std::time::Instant;

use tessera_golden::config::EngineConfig;
use tessera_golden::cycle::{CycleInputs, CycleModel, CycleState, Driver};

use crate::check::{lockstep, raw_run, Stimulus};
use crate::ffi::Lib;
use crate::suites::cases;

/// Cycles and seconds of each run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub ops: usize,
    pub raw: (u64, f64),
    pub model: (u64, f64),
    pub lockstep: (u64, f64),
}

impl BenchReport {
    /// The side-by-side table.
    #[must_use]
    pub fn table(&self, name: &str) -> String {
        let mut s = format!(
            "co-simulation speed, {name}, {} random ops, one thread\n{:<22} {:>10} {:>9} {:>12}\n",
            self.ops, "run", "cycles", "seconds", "cycles/s"
        );
        for (what, (c, t)) in [
            ("raw Verilator", self.raw),
            ("golden cycle model", self.model),
            ("lock-step checked", self.lockstep),
        ] {
            s.push_str(&format!(
                "{what:<22} {c:>10} {t:>9.3} {:>12.0}\n",
                c as f64 / t.max(1e-9)
            ));
        }
        let per = |(c, t): (u64, f64)| t / c.max(1) as f64;
        s.push_str(&format!(
            "lock-step costs {:.2}x the raw Verilator run per cycle\n",
            per(self.lockstep) / per(self.raw).max(1e-15)
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

/// Runs one random program of `ops` operations three ways.
pub fn bench(lib: &Lib, cfg: &EngineConfig, ops: usize, seed: u64) -> Result<BenchReport, String> {
    let mut all = cases(cfg, "random", seed, ops)?;
    let mut prog = all.remove(0).prog;
    for c in all {
        prog.cmds.extend(c.prog.cmds);
        prog.din.extend(c.prog.din);
    }
    let stim = Stimulus {
        cmds: prog.cmds,
        din: prog.din.iter().map(|w| w.0.clone()).collect(),
        stall: false,
        stall_seed: seed,
    };
    let sbytes = (cfg.interface.stream_bits / 8) as usize;
    let max = 1u64 << 40;
    let t = Instant::now();
    let raw_cycles = raw_run(lib, &stim, sbytes, max);
    let raw = (raw_cycles, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut m = CycleModel::new(cfg)?;
    let mut d = Driver::new(stim.cmds.clone(), stim.din.clone(), sbytes, false, seed);
    let (mut inp, mut st) = (CycleInputs::default(), CycleState::default());
    while !d.done() {
        m.state_into(&mut st);
        d.inputs(&mut inp);
        m.step(&inp);
        d.advance(&st, &inp);
    }
    let model = (m.cycle(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let res = lockstep(lib, cfg, &stim, seed, max, None)?;
    let secs = t.elapsed().as_secs_f64();
    let cycles = match res {
        Ok(c) => c.cycles,
        Err(mm) => return Err(format!("lock-step mismatch: {mm}")),
    };
    Ok(BenchReport {
        ops,
        raw,
        model,
        lockstep: (cycles, secs),
    })
}
