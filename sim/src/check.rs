//! Lock-step checking: every cycle the same inputs go into the verilated engine and the golden
//! cycle model, and their [`CycleState`]s are compared. The first difference stops the run; it is
//! reported with the cycle, the signal, both values, the command being executed, and a VCD
//! waveform of the cycles before it (a second run with tracing on from a window before the
//! mismatch; tracing is off otherwise).

use std::path::{Path, PathBuf};

use tessera_golden::config::EngineConfig;
use tessera_golden::cycle::{CycleInputs, CycleModel, CycleState, Driver, SCALAR_PATHS};
use tessera_golden::engine::Cmd;

use crate::ffi::{flag, Dut, Lib};

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

/// Converts the wrapper's state vector into a [`CycleState`].
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

/// Runs `stim` in lock step. `wave_dir`: where to write the waveform of a mismatch.
pub fn lockstep(
    lib: &Lib,
    cfg: &EngineConfig,
    stim: &Stimulus,
    reset_seed: u64,
    max_cycles: u64,
    wave_dir: Option<&Path>,
) -> Result<Result<Clean, Mismatch>, String> {
    let first = run(lib, cfg, stim, reset_seed, max_cycles, None)?;
    match first {
        Ok(c) => Ok(Ok(c)),
        Err(mut mm) => {
            if let Some(dir) = wave_dir {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let path = dir.join(format!("mismatch_cycle{}.vcd", mm.cycle));
                let from = mm.cycle.saturating_sub(WAVE_WINDOW);
                let again = run(lib, cfg, stim, reset_seed, max_cycles, Some((from, &path)))?;
                if let Err(m2) = again {
                    mm = m2;
                }
                mm.wave = Some(path);
            }
            Ok(Err(mm))
        }
    }
}

fn run(
    lib: &Lib,
    cfg: &EngineConfig,
    stim: &Stimulus,
    reset_seed: u64,
    max_cycles: u64,
    trace: Option<(u64, &Path)>,
) -> Result<Result<Clean, Mismatch>, String> {
    let mut model = CycleModel::new(cfg)?;
    let (rows, cols) = (model.params().rows, model.params().cols);
    let sbytes = (model.params().layout.stream_bits / 8) as usize;
    if lib.din_bytes != sbytes {
        return Err(format!(
            "the library's din is {} bytes, the config's {sbytes}: RTL and config disagree",
            lib.din_bytes
        ));
    }
    let mut dut = Dut::new(lib, reset_seed);
    let zero = vec![0u8; sbytes];
    for _ in 0..RESET_CYCLES {
        dut.cycle(0, 0, &zero);
    }
    let mut drv = Driver::new(
        stim.cmds.clone(),
        stim.din.clone(),
        sbytes,
        stim.stall,
        stim.stall_seed,
    );
    let mut inp = CycleInputs::default();
    let (mut want, mut got) = (CycleState::default(), CycleState::default());
    let mut raw = vec![0i64; lib.state_len];
    let mut tracing = false;
    let mut cycle = 0u64;
    while !drv.done() {
        if cycle >= max_cycles {
            return Err(format!(
                "program did not finish in {max_cycles} cycles (command {} of {})",
                drv.cmd_index(),
                stim.cmds.len()
            ));
        }
        if let Some((from, path)) = trace {
            if !tracing && cycle >= from {
                dut.trace_on(path)?;
                tracing = true;
            }
        }
        model.state_into(&mut want);
        dut.state(&mut raw);
        decode_state(&raw, rows, cols, sbytes, &mut got);
        if want != got {
            if let Some((signal, expected, actual)) = want.first_diff(&got, cols) {
                // One more edge so the waveform shows the cycle itself.
                drv.inputs(&mut inp);
                dut.cycle(flags(&inp), inp.cmd, &inp.din);
                if tracing {
                    dut.trace_off();
                }
                let ci = drv.cmd_index().checked_sub(1);
                return Ok(Err(Mismatch {
                    cycle,
                    signal,
                    expected,
                    actual,
                    cmd_index: ci,
                    cmd: cmd_text(&stim.cmds, ci),
                    wave: None,
                }));
            }
        }
        drv.inputs(&mut inp);
        dut.cycle(flags(&inp), inp.cmd, &inp.din);
        model.step(&inp);
        drv.advance(&want, &inp);
        cycle += 1;
    }
    if tracing {
        dut.trace_off();
    }
    Ok(Ok(Clean {
        cycles: cycle,
        err: model.err(),
        din_consumed: drv.din_consumed(),
        out: drv.out,
    }))
}

/// Runs the verilated engine alone (no model, no compare) for speed measurements: returns
/// cycles run.
pub fn raw_run(lib: &Lib, stim: &Stimulus, stream_bytes: usize, max_cycles: u64) -> u64 {
    let mut dut = Dut::new(lib, 1);
    let zero = vec![0u8; stream_bytes];
    for _ in 0..RESET_CYCLES {
        dut.cycle(0, 0, &zero);
    }
    let mut drv = Driver::new(
        stim.cmds.clone(),
        stim.din.clone(),
        stream_bytes,
        stim.stall,
        stim.stall_seed,
    );
    let mut inp = CycleInputs::default();
    let mut st = CycleState::default();
    let mut raw = vec![0i64; lib.state_len];
    let mut cycle = 0;
    // the driver needs the ports; read them through the same state call
    let (rows_cols, n) = (lib.state_len, SCALAR_PATHS.len());
    let _ = rows_cols;
    while !drv.done() && cycle < max_cycles {
        dut.state(&mut raw);
        st.cmd_ready = raw[0] != 0;
        st.din_ready = raw[1] != 0;
        st.dout_valid = raw[2] != 0;
        st.busy = raw[3] != 0;
        st.dout_data.clear();
        if st.dout_valid {
            st.dout_data
                .extend_from_slice(&(raw[n] as u64).to_le_bytes()[..stream_bytes.min(8)]);
        }
        drv.inputs(&mut inp);
        dut.cycle(flags(&inp), inp.cmd, &inp.din);
        drv.advance(&st, &inp);
        cycle += 1;
    }
    cycle
}
