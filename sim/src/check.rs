//! Lock-step checking: every cycle the same inputs go into the verilated engine and the golden
//! cycle model, and their states are compared. The first difference stops the run; it is
//! reported with the cycle, the signal, both values, the command being executed, and a VCD
//! waveform of the cycles before it (a second run with tracing on from a window before the
//! mismatch; tracing is off otherwise).
//!
//! The work is batched: the golden side (the cycle model and the [`Driver`]) runs [`BATCH`]
//! cycles ahead, recording each cycle's inputs and its packed state words
//! ([`CycleModel::state_words`]); the verilated engine then runs the whole batch in one C call
//! (`tsim_run`), writing its own state words, and the two buffers are compared as slices. The
//! driver reacts to the model's ports, not the hardware's, which is exact up to the first
//! mismatch: until then both showed the same ports, so both got the same inputs. With two
//! threads ([`Threads::Two`]) the model fills the next batch while Verilator runs the current one.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel};

use tessera_golden::config::EngineConfig;
use tessera_golden::cycle::{
    state_len, CycleInputs, CycleModel, CycleState, Driver, ModelParams, SCALAR_PATHS,
};
use tessera_golden::engine::Cmd;

use crate::ffi::{flag, Dut, Lib};
use crate::verilate::Engine;

/// Cycles per batch: one FFI call and one slice compare per batch.
pub const BATCH: usize = 1024;

/// How the golden side and Verilator share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Alternate: fill a batch, run it, compare.
    One,
    /// A pipeline: the golden side on a second thread, one batch ahead.
    Two,
}

impl Threads {
    /// [`Threads::Two`] when the machine has two or more cores, unless `TESSERA_SIM_THREADS=1`.
    #[must_use]
    pub fn auto() -> Threads {
        if std::env::var("TESSERA_SIM_THREADS").is_ok_and(|v| v.trim() == "1") {
            return Threads::One;
        }
        match std::thread::available_parallelism() {
            Ok(n) if n.get() >= 2 => Threads::Two,
            _ => Threads::One,
        }
    }
}

/// Cycles of reset before cycle 0.
pub const RESET_CYCLES: u32 = 2;

/// Cycles of waveform before a mismatch.
pub const WAVE_WINDOW: u64 = 2000;

/// A program: commands and `din` words (`stream_bits / 8` bytes each).
#[derive(Debug, Clone, Default)]
pub struct Stimulus {
    pub cmds: Vec<u64>,
    pub din: Vec<Vec<u8>>,
    /// Random stalls on `cmd`, `din` and `dout` (seeded by `stall_seed`).
    pub stall: bool,
    pub stall_seed: u64,
}

/// The first difference between the hardware and the model.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub cycle: u64,
    pub signal: String,
    pub expected: String,
    pub actual: String,
    /// Index and text of the command being executed (the last one accepted).
    pub cmd_index: Option<usize>,
    pub cmd: String,
    /// The waveform file, if one was written.
    pub wave: Option<PathBuf>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cycle {}: {} expected {} (golden) got {} (rtl) during command {} {}",
            self.cycle,
            self.signal,
            self.expected,
            self.actual,
            self.cmd_index.map_or("-".to_string(), |i| format!("#{i}")),
            self.cmd
        )?;
        if let Some(w) = &self.wave {
            write!(f, "; waveform {}", w.display())?;
        }
        Ok(())
    }
}

/// A clean run.
#[derive(Debug, Clone)]
pub struct Clean {
    pub cycles: u64,
    /// `dout` words in order.
    pub out: Vec<Vec<u8>>,
    pub err: bool,
    pub din_consumed: usize,
}

/// Converts a packed state vector ([`CycleModel::state_words`], `tsim_state`) into a
/// [`CycleState`].
pub fn decode_state(v: &[i64], rows: usize, cols: usize, stream_bytes: usize, s: &mut CycleState) {
    let b = |x: i64| x != 0;
    let u = |x: i64| x as u32;
    s.cmd_ready = b(v[0]);
    s.din_ready = b(v[1]);
    s.dout_valid = b(v[2]);
    s.busy = b(v[3]);
    s.err = b(v[4]);
    s.state = v[5] as u8;
    s.mode = v[6] as u8;
    s.gemv = b(v[7]);
    s.keep = b(v[8]);
    s.fold = b(v[9]);
    s.beat = u(v[10]);
    s.grp = u(v[11]);
    s.tmr = u(v[12]);
    s.ptr = u(v[13]);
    s.cnt = u(v[14]);
    s.wcnt = u(v[15]);
    s.z = v[16];
    let n = SCALAR_PATHS.len();
    let dwords = stream_bytes.div_ceil(8);
    s.dout_data.clear();
    if s.dout_valid {
        for w in 0..dwords {
            s.dout_data
                .extend_from_slice(&(v[n + w] as u64).to_le_bytes());
        }
        s.dout_data.truncate(stream_bytes);
    }
    s.acc.clear();
    s.acc
        .extend_from_slice(&v[n + dwords..n + dwords + rows * cols]);
}

/// The first differing word of two packed state vectors, as (signal path, expected, actual).
fn word_diff(
    want: &[i64],
    got: &[i64],
    cols: usize,
    stream_bytes: usize,
) -> Option<(String, String, String)> {
    let n = SCALAR_PATHS.len();
    let dwords = stream_bytes.div_ceil(8);
    let i = want.iter().zip(got).position(|(a, b)| a != b)?;
    if i < n {
        return Some((
            SCALAR_PATHS[i].to_string(),
            want[i].to_string(),
            got[i].to_string(),
        ));
    }
    if i < n + dwords {
        let hex = |v: &[i64]| {
            let mut bytes: Vec<u8> = v[n..n + dwords]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            bytes.truncate(stream_bytes);
            let h: String = bytes.iter().rev().map(|b| format!("{b:02x}")).collect();
            format!("0x{h}")
        };
        return Some(("dout_data_o".into(), hex(want), hex(got)));
    }
    let a = i - n - dwords;
    Some((
        format!("u_array.u_pe_r{}_c{}.acc_q", a / cols, a % cols),
        want[i].to_string(),
        got[i].to_string(),
    ))
}

fn flags(inp: &CycleInputs) -> u32 {
    let mut f = flag::RST_N;
    if inp.cmd_valid {
        f |= flag::CMD_VALID;
    }
    if inp.din_valid {
        f |= flag::DIN_VALID;
    }
    if inp.dout_ready {
        f |= flag::DOUT_READY;
    }
    f
}

fn cmd_text(cmds: &[u64], i: Option<usize>) -> String {
    match i.and_then(|i| cmds.get(i)) {
        Some(&w) => match Cmd::decode(w) {
            Ok(c) => format!("{c:?}"),
            Err(e) => format!("{w:#018x} ({e})"),
        },
        None => "(none yet)".into(),
    }
}

/// Up to [`BATCH`] cycles: the inputs, the expected state words and the command index.
#[derive(Debug)]
struct Batch {
    /// Cycle of entry 0.
    first: u64,
    n: usize,
    flags: Vec<u32>,
    cmds: Vec<u64>,
    din: Vec<u8>,
    /// Expected state words, `state_len` per cycle (empty when not recorded).
    exp: Vec<i64>,
    /// Commands accepted before the cycle.
    accepted: Vec<u32>,
}

impl Batch {
    fn new(din_bytes: usize, sl: usize, states: bool) -> Batch {
        Batch {
            first: 0,
            n: 0,
            flags: vec![0; BATCH],
            cmds: vec![0; BATCH],
            din: vec![0; BATCH * din_bytes],
            exp: if states {
                vec![0; BATCH * sl]
            } else {
                Vec::new()
            },
            accepted: vec![0; BATCH],
        }
    }
}

/// The golden side: the cycle model driven by the stimulus.
#[derive(Debug)]
struct Golden {
    model: CycleModel,
    drv: Driver,
    inp: CycleInputs,
    sl: usize,
    db: usize,
    cycle: u64,
    max_cycles: u64,
    ncmds: usize,
}

impl Golden {
    fn new(cfg: &EngineConfig, stim: &Stimulus, max_cycles: u64) -> Result<Golden, String> {
        let model = CycleModel::new(cfg)?;
        let db = (model.params().layout.stream_bits / 8) as usize;
        let sl = model.state_len();
        let drv = Driver::new(
            stim.cmds.clone(),
            stim.din.clone(),
            db,
            stim.stall,
            stim.stall_seed,
        );
        Ok(Golden {
            model,
            drv,
            inp: CycleInputs::default(),
            sl,
            db,
            cycle: 0,
            max_cycles,
            ncmds: stim.cmds.len(),
        })
    }

    fn done(&self) -> bool {
        self.drv.done()
    }

    /// Fills `b` with the next cycles (at most [`BATCH`]; a batch ends before cycle `split` so
    /// that tracing can start there). Records the state words when `b.exp` has room for them.
    fn fill(&mut self, b: &mut Batch, split: Option<u64>) -> Result<(), String> {
        let (sl, db) = (self.sl, self.db);
        let states = !b.exp.is_empty();
        b.first = self.cycle;
        b.n = 0;
        while b.n < BATCH && !self.drv.done() {
            if b.n > 0 && split == Some(self.cycle) {
                break;
            }
            if self.cycle >= self.max_cycles {
                return Err(format!(
                    "program did not finish in {} cycles (command {} of {})",
                    self.max_cycles,
                    self.drv.cmd_index(),
                    self.ncmds
                ));
            }
            let i = b.n;
            let m = &self.model;
            if states {
                m.state_words(&mut b.exp[i * sl..(i + 1) * sl]);
            }
            self.drv.inputs(&mut self.inp);
            b.flags[i] = flags(&self.inp);
            b.cmds[i] = self.inp.cmd;
            b.din[i * db..(i + 1) * db].copy_from_slice(&self.inp.din[..db]);
            b.accepted[i] = self.drv.cmd_index() as u32;
            let dout = m.dout_valid().then(|| m.dout_data());
            self.drv
                .advance_ports(m.cmd_ready(), m.din_ready(), m.busy(), dout, &self.inp);
            self.model.step(&self.inp);
            self.cycle += 1;
            b.n += 1;
        }
        Ok(())
    }

    fn finish(self) -> Clean {
        Clean {
            cycles: self.cycle,
            err: self.model.err(),
            din_consumed: self.drv.din_consumed(),
            out: self.drv.out,
        }
    }
}

/// The hardware side: the verilated engine, run a batch at a time and compared.
struct Hw<'a, 'p> {
    dut: Dut<'a>,
    got: Vec<i64>,
    sl: usize,
    db: usize,
    cols: usize,
    trace: Option<(u64, &'p Path)>,
    tracing: bool,
}

impl<'a, 'p> Hw<'a, 'p> {
    fn new(lib: &'a Lib, p: &ModelParams, seed: u64, trace: Option<(u64, &'p Path)>) -> Hw<'a, 'p> {
        let mut dut = Dut::new(lib, seed);
        let db = lib.din_bytes;
        let zero = vec![0u8; db];
        for _ in 0..RESET_CYCLES {
            dut.cycle(0, 0, &zero);
        }
        Hw {
            dut,
            got: vec![0; BATCH * lib.state_len],
            sl: lib.state_len,
            db,
            cols: p.cols,
            trace,
            tracing: false,
        }
    }

    /// Runs `b`; the index in `b` of the first cycle whose state differs, if any.
    fn check(&mut self, b: &Batch) -> Result<Option<usize>, String> {
        if let Some((from, path)) = self.trace {
            if !self.tracing && b.first >= from {
                self.dut.trace_on(path)?;
                self.tracing = true;
            }
        }
        let (n, sl) = (b.n, self.sl);
        self.dut.run(
            &b.flags[..n],
            &b.cmds[..n],
            &b.din[..n * self.db],
            Some(&mut self.got[..n * sl]),
        );
        if self.got[..n * sl] == b.exp[..n * sl] {
            return Ok(None);
        }
        Ok((0..n).find(|&i| self.got[i * sl..(i + 1) * sl] != b.exp[i * sl..(i + 1) * sl]))
    }

    fn mismatch(&self, b: &Batch, i: usize, stim: &Stimulus) -> Mismatch {
        let sl = self.sl;
        let (want, got) = (
            &b.exp[i * sl..(i + 1) * sl],
            &self.got[i * sl..(i + 1) * sl],
        );
        let (signal, expected, actual) =
            word_diff(want, got, self.cols, self.db).unwrap_or_default();
        let ci = (b.accepted[i] as usize).checked_sub(1);
        Mismatch {
            cycle: b.first + i as u64,
            signal,
            expected,
            actual,
            cmd_index: ci,
            cmd: cmd_text(&stim.cmds, ci),
            wave: None,
        }
    }

    fn stop_trace(&mut self) {
        if self.tracing {
            self.dut.trace_off();
            self.tracing = false;
        }
    }
}

/// Runs `stim` in lock step on `eng`'s fast library. `wave_dir`: where to write the waveform
/// of a mismatch (the run is repeated with tracing on `eng`'s traced build, verilated on first
/// use).
pub fn lockstep(
    eng: &Engine,
    stim: &Stimulus,
    reset_seed: u64,
    max_cycles: u64,
    wave_dir: Option<&Path>,
) -> Result<Result<Clean, Mismatch>, String> {
    let th = Threads::auto();
    let cfg = &eng.cfg;
    match run(&eng.lib, cfg, stim, reset_seed, max_cycles, None, th)? {
        Ok(c) => Ok(Ok(c)),
        Err(mut mm) => {
            if let Some(dir) = wave_dir {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let path = dir.join(format!("mismatch_cycle{}.vcd", mm.cycle));
                let from = mm.cycle.saturating_sub(WAVE_WINDOW);
                let lib = eng
                    .waveform_lib()
                    .map_err(|e| format!("{mm}; building the waveform library: {e}"))?;
                let again = run(
                    lib,
                    cfg,
                    stim,
                    reset_seed,
                    max_cycles,
                    Some((from, &path)),
                    th,
                )?;
                if let Err(m2) = again {
                    mm = m2;
                }
                mm.wave = Some(path);
            }
            Ok(Err(mm))
        }
    }
}

/// Lock step on one library, no waveform (the bench).
pub fn lockstep_lib(
    lib: &Lib,
    cfg: &EngineConfig,
    stim: &Stimulus,
    reset_seed: u64,
    max_cycles: u64,
    threads: Threads,
) -> Result<Result<Clean, Mismatch>, String> {
    run(lib, cfg, stim, reset_seed, max_cycles, None, threads)
}

fn check_sizes(lib: &Lib, p: &ModelParams) -> Result<(), String> {
    let sbytes = (p.layout.stream_bits / 8) as usize;
    if lib.din_bytes != sbytes || lib.state_len != state_len(p) {
        return Err(format!(
            "the library's din is {} bytes and its state {} words, the config's {sbytes} and {}: \
             RTL and config disagree",
            lib.din_bytes,
            lib.state_len,
            state_len(p)
        ));
    }
    Ok(())
}

fn run(
    lib: &Lib,
    cfg: &EngineConfig,
    stim: &Stimulus,
    reset_seed: u64,
    max_cycles: u64,
    trace: Option<(u64, &Path)>,
    threads: Threads,
) -> Result<Result<Clean, Mismatch>, String> {
    let mut gold = Golden::new(cfg, stim, max_cycles)?;
    let p = gold.model.params().clone();
    check_sizes(lib, &p)?;
    let split = trace.map(|(from, _)| from);
    let mut hw = Hw::new(lib, &p, reset_seed, trace);
    let (db, sl) = (gold.db, gold.sl);
    let found = match threads {
        Threads::One => {
            let mut b = Batch::new(db, sl, true);
            let mut found = None;
            while !gold.done() {
                gold.fill(&mut b, split)?;
                if let Some(i) = hw.check(&b)? {
                    found = Some(hw.mismatch(&b, i, stim));
                    break;
                }
            }
            found
        }
        Threads::Two => {
            let (tx, rx) = sync_channel::<Result<Batch, String>>(2);
            let (back_tx, back_rx) = channel::<Batch>();
            let (found, g) = std::thread::scope(|s| -> Result<_, String> {
                let producer = s.spawn(move || {
                    let mut spare: Vec<Batch> = (0..3).map(|_| Batch::new(db, sl, true)).collect();
                    while let Some(mut b) = spare.pop().or_else(|| back_rx.recv().ok()) {
                        let r = gold.fill(&mut b, split).map(|()| b);
                        let stop = r.is_err() || gold.done();
                        if tx.send(r).is_err() || stop {
                            break;
                        }
                    }
                    gold
                });
                let mut found = None;
                let mut err = None;
                for msg in rx {
                    match msg {
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                        Ok(b) => match hw.check(&b) {
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                            Ok(Some(i)) => {
                                found = Some(hw.mismatch(&b, i, stim));
                                break;
                            }
                            Ok(None) => {
                                let _ = back_tx.send(b);
                            }
                        },
                    }
                }
                drop(back_tx);
                let g = producer
                    .join()
                    .map_err(|_| "the golden-model thread panicked".to_string())?;
                match err {
                    Some(e) => Err(e),
                    None => Ok((found, g)),
                }
            })?;
            gold = g;
            found
        }
    };
    hw.stop_trace();
    match found {
        Some(mm) => Ok(Err(mm)),
        None => Ok(Ok(gold.finish())),
    }
}

/// Runs the golden side alone (model, driver and state words, no hardware): cycles run.
pub fn model_only(cfg: &EngineConfig, stim: &Stimulus, max_cycles: u64) -> Result<u64, String> {
    let mut gold = Golden::new(cfg, stim, max_cycles)?;
    let mut b = Batch::new(gold.db, gold.sl, true);
    while !gold.done() {
        gold.fill(&mut b, None)?;
    }
    Ok(gold.cycle)
}

/// A program's inputs, recorded from the golden side, to replay into the verilated engine
/// alone (the raw-speed measurement of `tessera bench cosim`).
#[derive(Debug)]
pub struct Recorded {
    batches: Vec<Batch>,
    /// Cycles recorded.
    pub cycles: u64,
}

/// Records `stim`'s per-cycle inputs (the driver reacting to the cycle model's ports).
pub fn record(cfg: &EngineConfig, stim: &Stimulus, max_cycles: u64) -> Result<Recorded, String> {
    let mut gold = Golden::new(cfg, stim, max_cycles)?;
    let mut batches = Vec::new();
    while !gold.done() {
        let mut b = Batch::new(gold.db, gold.sl, false);
        gold.fill(&mut b, None)?;
        batches.push(b);
    }
    Ok(Recorded {
        batches,
        cycles: gold.cycle,
    })
}

impl Recorded {
    /// Replays the inputs into a fresh instance of `lib` (no state read, no compare): cycles
    /// run.
    pub fn replay(&self, lib: &Lib, reset_seed: u64) -> u64 {
        let mut dut = Dut::new(lib, reset_seed);
        let zero = vec![0u8; lib.din_bytes];
        for _ in 0..RESET_CYCLES {
            dut.cycle(0, 0, &zero);
        }
        let mut n = 0;
        for b in &self.batches {
            dut.run(
                &b.flags[..b.n],
                &b.cmds[..b.n],
                &b.din[..b.n * lib.din_bytes],
                None,
            );
            n += b.n as u64;
        }
        n
    }
}
