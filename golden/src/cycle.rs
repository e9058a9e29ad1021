//! Cycle-accurate model of the generated engine (docs/engine.md, issue 4).
//!
//! [`CycleModel`] holds every register of `tessera_engine` that matters (controller, slots,
//! feeder, the `rows x cols` PEs and their skew chains, the output stages, the buffers) and
//! [`CycleModel::step`] computes one rising clock edge from the current registers and the input
//! ports, exactly as the RTL does. Every output port is a function of the registers only (the
//! engine is a Moore machine at its ports), so [`CycleModel::state`] before an edge is what the
//! hardware shows in that cycle.
//!
//! The arithmetic reuses `crate::numerics` (`sat`, `round_shift`) and `crate::engine` (command
//! fields, opcodes, stream layout); nothing here restates a rounding or saturation rule. The only
//! other integer operation is two's-complement truncation to a register width ([`wrap`]).
//!
//! Registers the RTL does not reset (datapath) start at 0 here; [`CycleState`] only holds
//! signals that are deterministic after reset for a well-formed program (reset control
//! registers, the accumulators, the ports; `dout_data` only while `dout_valid`).
//!
//! [`Driver`] is the stimulus both sides share: a command list, `din` words and a seeded
//! stall pattern on `cmd`, `din` and `dout`; [`run_program`] runs the model alone to the end.

use crate::config::{EngineConfig, WeightMode};
use crate::engine::{field, mode_code, opcode, Field, StreamLayout};
use crate::numerics::{round_shift, sat};

/// Controller state codes (`state_q`), as in docs/engine.md.
pub mod state {
    pub const IDLE: u8 = 0;
    pub const LOAD: u8 = 1;
    pub const RUN: u8 = 2;
    pub const FLUSH: u8 = 3;
    pub const STORE: u8 = 4;
    pub const DRAIN: u8 = 5;
    /// Names, indexed by code.
    pub const NAMES: [&str; 6] = ["IDLE", "LOAD", "RUN", "FLUSH", "STORE", "DRAIN"];
}

/// Two's-complement truncation of `x` to `bits` (1..=64) bits, sign-extended back.
#[must_use]
pub fn wrap(x: i64, bits: u32) -> i64 {
    if bits >= 64 {
        x
    } else {
        let sh = 64 - bits;
        (x << sh) >> sh
    }
}

fn mask(x: u64, bits: u32) -> u64 {
    if bits >= 64 {
        x
    } else {
        x & ((1u64 << bits) - 1)
    }
}

fn addr_width(depth: u32) -> u32 {
    let mut w = 1;
    while (1u64 << w) < u64::from(depth) {
        w += 1;
    }
    w
}

/// Bits `[lo, lo + width)` (width <= 64) of a little-endian byte string (missing bytes are 0).
#[must_use]
pub fn get_bits(bytes: &[u8], lo: u32, width: u32) -> u64 {
    debug_assert!(width <= 64);
    let first = (lo / 8) as usize;
    let mut v = 0u128;
    for i in 0..9 {
        if let Some(&b) = bytes.get(first + i) {
            v |= u128::from(b) << (8 * i);
        }
    }
    mask((v >> (lo % 8)) as u64, width)
}

fn fld(w: u64, f: Field) -> u64 {
    (w >> f.lo) & ((1u64 << f.width) - 1)
}

/// The values one cycle shows: the ports and the architectural state compared in lock step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CycleState {
    /// `cmd_ready_o`.
    pub cmd_ready: bool,
    /// `din_ready_o`.
    pub din_ready: bool,
    /// `dout_valid_o`.
    pub dout_valid: bool,
    /// `dout_data_o` bytes (little-endian) while `dout_valid`, else empty.
    pub dout_data: Vec<u8>,
    /// `busy_o`.
    pub busy: bool,
    /// `err_o`.
    pub err: bool,
    /// `state_q` (see [`state`]).
    pub state: u8,
    /// `mode_q` (weight mode code of the running tile).
    pub mode: u8,
    /// `gemv_q`.
    pub gemv: bool,
    /// `keep_q`.
    pub keep: bool,
    /// `fold_q`.
    pub fold: bool,
    /// `beat_q` (beat counter of the run).
    pub beat: u32,
    /// `grp_q` (group counter of the run).
    pub grp: u32,
    /// `tmr_q` (flush / store timer).
    pub tmr: u32,
    /// `ptr_q` (load / drain entry pointer).
    pub ptr: u32,
    /// `cnt_q` (entries left to load / drain).
    pub cnt: u32,
    /// `wcnt_q` (word within a multi-word entry).
    pub wcnt: u32,
    /// `z_q` (N17's `Z`).
    pub z: i64,
    /// `acc_q` of PE (r, c) at `r * cols + c`.
    pub acc: Vec<i64>,
}

/// Names of the scalar fields of [`CycleState`] in the order of [`CycleState::scalars`], with
/// their RTL paths (the accumulators follow: `u_array.u_pe_r{r}_c{c}.acc_q`).
pub const SCALAR_PATHS: [&str; 17] = [
    "cmd_ready_o",
    "din_ready_o",
    "dout_valid_o",
    "busy_o",
    "err_o",
    "state_q",
    "mode_q",
    "gemv_q",
    "keep_q",
    "fold_q",
    "beat_q",
    "grp_q",
    "tmr_q",
    "ptr_q",
    "cnt_q",
    "wcnt_q",
    "z_q",
];

impl CycleState {
    /// The scalar fields as integers, in [`SCALAR_PATHS`] order.
    #[must_use]
    pub fn scalars(&self) -> [i64; 17] {
        let b = |x: bool| i64::from(x);
        let u = |x: u32| i64::from(x);
        [
            b(self.cmd_ready),
            b(self.din_ready),
            b(self.dout_valid),
            b(self.busy),
            b(self.err),
            i64::from(self.state),
            i64::from(self.mode),
            b(self.gemv),
            b(self.keep),
            b(self.fold),
            u(self.beat),
            u(self.grp),
            u(self.tmr),
            u(self.ptr),
            u(self.cnt),
            u(self.wcnt),
            self.z,
        ]
    }

    /// The first difference from `other` (`self` expected, `other` actual): signal path,
    /// expected and actual value as text. `cols` names the accumulators.
    #[must_use]
    pub fn first_diff(&self, other: &CycleState, cols: usize) -> Option<(String, String, String)> {
        let (a, b) = (self.scalars(), other.scalars());
        for i in 0..a.len() {
            if a[i] != b[i] {
                return Some((
                    SCALAR_PATHS[i].to_string(),
                    a[i].to_string(),
                    b[i].to_string(),
                ));
            }
        }
        if self.dout_data != other.dout_data {
            let hex = |v: &[u8]| {
                v.iter()
                    .rev()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            };
            return Some((
                "dout_data_o".into(),
                format!("0x{}", hex(&self.dout_data)),
                format!("0x{}", hex(&other.dout_data)),
            ));
        }
        for (i, (x, y)) in self.acc.iter().zip(&other.acc).enumerate() {
            if x != y {
                return Some((
                    format!("u_array.u_pe_r{}_c{}.acc_q", i / cols, i % cols),
                    x.to_string(),
                    y.to_string(),
                ));
            }
        }
        None
    }
}

/// The input ports of one cycle.
#[derive(Debug, Clone, Default)]
pub struct CycleInputs {
    pub cmd_valid: bool,
    pub cmd: u64,
    pub din_valid: bool,
    /// `din_data_i`, `stream_bits / 8` bytes little-endian.
    pub din: Vec<u8>,
    pub dout_ready: bool,
}

#[derive(Debug, Clone, Default)]
struct Pe {
    // forwarding registers (east / south)
    f_act: u32,
    f_valid: bool,
    f_last: bool,
    f_gsum: i64,
    f_wgt: u8,
    f_zero: u8,
    f_gscale: u64,
    gpsum: i64,
    pha: bool,
    phb: bool,
    p: i64,
    s: i64,
    zero: u8,
    gscale: u64,
    g: i64,
    gscale2: u64,
    acc: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct WestIn {
    act: u32,
    valid: bool,
    last: bool,
    gsum: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct NorthIn {
    wgt: u8,
    zero: u8,
    gscale: u64,
}

#[derive(Debug, Clone, Default)]
struct OutStage {
    v1: bool,
    v2: bool,
    prod: i64,
    sh1: u32,
    bits1: u32,
    y: i64,
}

/// A simple-dual-port RAM with a registered read (`rdata_q <= mem[raddr]`).
#[derive(Debug, Clone)]
struct Ram {
    mem: Vec<Vec<u8>>,
    rdata: Vec<u8>,
    aw: u32,
}

impl Ram {
    fn new(depth: u32, bits: u32) -> Ram {
        let bytes = bits.div_ceil(8) as usize;
        Ram {
            mem: vec![vec![0; bytes]; depth as usize],
            rdata: vec![0; bytes],
            aw: addr_width(depth),
        }
    }
    fn clock(&mut self, raddr: u64, we: bool, waddr: u64, wdata: &[u8], wbits: u32) {
        let ra = mask(raddr, self.aw) as usize;
        match self.mem.get(ra) {
            Some(v) => self.rdata.clone_from(v),
            None => self.rdata.iter_mut().for_each(|b| *b = 0),
        }
        if we {
            let wa = mask(waddr, self.aw) as usize;
            if let Some(e) = self.mem.get_mut(wa) {
                for (i, b) in e.iter_mut().enumerate() {
                    *b = get_bits(
                        wdata,
                        8 * i as u32,
                        8.min(wbits.saturating_sub(8 * i as u32)),
                    ) as u8;
                }
            }
        }
    }
}

/// Sizes the model needs, all from `EngineConfig::derive()` and [`StreamLayout`].
#[derive(Debug, Clone)]
pub struct ModelParams {
    pub rows: usize,
    pub cols: usize,
    pub l: u32,
    pub ws: u32,
    pub gw: u32,
    pub aw: u32,
    pub s_bits: u32,
    pub act_depth: u32,
    pub wgt_depth: u32,
    pub meta_depth: u32,
    pub out_depth: u32,
    pub has_w8: bool,
    pub has_ternary: bool,
    pub layout: StreamLayout,
}

impl ModelParams {
    /// From a config; the error is its rule violations joined on one line.
    pub fn new(cfg: &EngineConfig) -> Result<ModelParams, String> {
        let d = cfg.checked_derive().map_err(|errs| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let l = cfg.quant.w_group_len;
        Ok(ModelParams {
            rows: cfg.array.rows as usize,
            cols: cfg.array.cols as usize,
            l,
            ws: cfg.quant.w_scale_bits,
            gw: d.gpsum_bits,
            aw: cfg.datapath.acc_bits,
            s_bits: 8 + l.trailing_zeros(),
            act_depth: d.act_buffer.entries,
            wgt_depth: d.wgt_buffer.entries,
            meta_depth: d.meta_buffer.entries,
            out_depth: d.out_buffer.entries,
            has_w8: cfg.modes().contains(&WeightMode::W8),
            has_ternary: cfg.modes().contains(&WeightMode::Ternary),
            layout: StreamLayout::new(cfg),
        })
    }
}

/// The cycle-accurate engine model (one instance per simulated engine).
#[derive(Debug, Clone)]
pub struct CycleModel {
    p: ModelParams,
    // controller
    st: u8,
    err: bool,
    op: u8,
    ptr: u64,
    cnt: u64,
    wcnt: u32,
    gph: bool,
    bi: u64,
    bg: u32,
    grp: u64,
    groups: u64,
    k: u64,
    mode: u8,
    gemv: bool,
    keep: bool,
    fold: bool,
    oaddr: u64,
    tmr: u32,
    abase: u64,
    wbase: u64,
    mbase: u64,
    omult: u64,
    oshift: u32,
    obits: u32,
    slots: Vec<Vec<u8>>,
    gmeta: Vec<u8>,
    gbeat: Vec<u8>,
    // feeder
    v1: bool,
    l1: bool,
    isel: u32,
    lmask: u32,
    z: i64,
    sacc: Vec<i64>,
    // buffers
    act: Vec<Ram>,
    foldb: Vec<Ram>,
    wgt: Ram,
    meta: Ram,
    outb: Ram,
    // array
    west: Vec<Vec<WestIn>>,
    north: Vec<Vec<NorthIn>>,
    pes: Vec<Pe>,
    os: Vec<OutStage>,
    // store / drain
    wa: u64,
    pend: bool,
    obv: bool,
    owc: u32,
    ob: Vec<u8>,
    cycle: u64,
    // per-step scratch (no allocation per cycle)
    sc_x: Vec<[i64; 4]>,
    sc_west: Vec<WestIn>,
    sc_north: Vec<NorthIn>,
    sc_pe_in: Vec<(WestIn, NorthIn)>,
    sc_acc: Vec<i64>,
    sc_ys: Vec<u8>,
}

impl CycleModel {
    /// A model of `cfg`'s engine, just after reset.
    pub fn new(cfg: &EngineConfig) -> Result<CycleModel, String> {
        let p = ModelParams::new(cfg)?;
        let lay = &p.layout;
        let mf = lay.meta_field_bits;
        let (r, c) = (p.rows, p.cols);
        let abank = (p.act_depth / 4).max(2);
        let sbytes = (lay.stream_bits / 8) as usize;
        Ok(CycleModel {
            st: state::IDLE,
            err: false,
            op: 0,
            ptr: 0,
            cnt: 0,
            wcnt: 0,
            gph: false,
            bi: 0,
            bg: 0,
            grp: 0,
            groups: 0,
            k: 0,
            mode: 0,
            gemv: false,
            keep: false,
            fold: false,
            oaddr: 0,
            tmr: 0,
            abase: 0,
            wbase: 0,
            mbase: 0,
            omult: 1,
            oshift: 0,
            obits: 2,
            slots: vec![vec![0; sbytes]; lay.slot_words() as usize],
            gmeta: vec![0; (mf as usize * r * c).div_ceil(8)],
            gbeat: vec![0; r * c],
            v1: false,
            l1: false,
            isel: 0,
            lmask: 0,
            z: 0,
            sacc: vec![0; r],
            act: (0..4).map(|_| Ram::new(abank, 8 * r as u32)).collect(),
            foldb: (0..4).map(|_| Ram::new(abank, mf)).collect(),
            wgt: Ram::new(p.wgt_depth.max(2), 8 * c as u32),
            meta: Ram::new(p.meta_depth.max(2), mf * c as u32),
            outb: Ram::new(p.out_depth.max(2), 32 * c as u32),
            west: (0..r).map(|i| vec![WestIn::default(); i]).collect(),
            north: (0..c).map(|i| vec![NorthIn::default(); i]).collect(),
            pes: vec![Pe::default(); r * c],
            os: vec![OutStage::default(); c],
            wa: 0,
            pend: false,
            obv: false,
            owc: 0,
            ob: vec![0; (lay.out_words * lay.stream_bits / 8) as usize],
            cycle: 0,
            sc_x: vec![[0; 4]; r],
            sc_west: Vec::with_capacity(r),
            sc_north: Vec::with_capacity(c),
            sc_pe_in: Vec::with_capacity(r * c),
            sc_acc: Vec::with_capacity(r * c),
            sc_ys: vec![0; 4 * c],
            p,
        })
    }

    /// The model's sizes.
    #[must_use]
    pub fn params(&self) -> &ModelParams {
        &self.p
    }

    /// Clock edges since reset.
    #[must_use]
    pub fn cycle(&self) -> u64 {
        self.cycle
    }

    /// `cmd_ready_o`.
    #[must_use]
    pub fn cmd_ready(&self) -> bool {
        self.st == state::IDLE
    }
    /// `din_ready_o`.
    #[must_use]
    pub fn din_ready(&self) -> bool {
        self.st == state::LOAD || (self.st == state::RUN && self.gemv)
    }
    /// `dout_valid_o`.
    #[must_use]
    pub fn dout_valid(&self) -> bool {
        self.obv
    }
    /// `busy_o`.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.st != state::IDLE
    }
    /// `err_o`.
    #[must_use]
    pub fn err(&self) -> bool {
        self.err
    }
    /// `dout_data_o` (little-endian bytes; meaningful while `dout_valid`).
    #[must_use]
    pub fn dout_data(&self) -> &[u8] {
        &self.ob[..(self.p.layout.stream_bits / 8) as usize]
    }

    /// What this cycle shows (before the next edge).
    #[must_use]
    pub fn state(&self) -> CycleState {
        let mut s = CycleState::default();
        self.state_into(&mut s);
        s
    }

    /// [`Self::state`] into an existing value (no allocation after the first call).
    pub fn state_into(&self, s: &mut CycleState) {
        s.cmd_ready = self.cmd_ready();
        s.din_ready = self.din_ready();
        s.dout_valid = self.obv;
        s.dout_data.clear();
        if self.obv {
            s.dout_data.extend_from_slice(self.dout_data());
        }
        s.busy = self.busy();
        s.err = self.err;
        s.state = self.st;
        s.mode = self.mode;
        s.gemv = self.gemv;
        s.keep = self.keep;
        s.fold = self.fold;
        s.beat = self.bi as u32;
        s.grp = self.grp as u32;
        s.tmr = self.tmr;
        s.ptr = self.ptr as u32;
        s.cnt = self.cnt as u32;
        s.wcnt = self.wcnt;
        s.z = self.z;
        s.acc.clear();
        s.acc.extend(self.pes.iter().map(|pe| pe.acc));
    }

    /// Length of the packed state vector ([`Self::state_words`]): the [`SCALAR_PATHS`] values,
    /// `ceil(stream_bits / 64)` `dout` words, `rows * cols` accumulators.
    #[must_use]
    pub fn state_len(&self) -> usize {
        state_len(&self.p)
    }

    /// [`Self::state`] packed into integers, the layout the co-simulation wrapper fills each
    /// cycle: [`CycleState::scalars`] order, then `dout_data` as little-endian 64-bit words (all
    /// zero unless `dout_valid`), then `acc`. Two states are equal iff their words are.
    pub fn state_words(&self, o: &mut [i64]) {
        let n = SCALAR_PATHS.len();
        o[0] = i64::from(self.cmd_ready());
        o[1] = i64::from(self.din_ready());
        o[2] = i64::from(self.obv);
        o[3] = i64::from(self.busy());
        o[4] = i64::from(self.err);
        o[5] = i64::from(self.st);
        o[6] = i64::from(self.mode);
        o[7] = i64::from(self.gemv);
        o[8] = i64::from(self.keep);
        o[9] = i64::from(self.fold);
        o[10] = i64::from(self.bi as u32);
        o[11] = i64::from(self.grp as u32);
        o[12] = i64::from(self.tmr);
        o[13] = i64::from(self.ptr as u32);
        o[14] = i64::from(self.cnt as u32);
        o[15] = i64::from(self.wcnt);
        o[16] = self.z;
        let sbytes = (self.p.layout.stream_bits / 8) as usize;
        let dw = sbytes.div_ceil(8);
        for (w, x) in o[n..n + dw].iter_mut().enumerate() {
            *x = if self.obv {
                let mut b = [0u8; 8];
                let lo = 8 * w;
                let hi = (lo + 8).min(sbytes);
                b[..hi - lo].copy_from_slice(&self.ob[lo..hi]);
                i64::from_le_bytes(b)
            } else {
                0
            };
        }
        for (x, pe) in o[n + dw..n + dw + self.pes.len()].iter_mut().zip(&self.pes) {
            *x = pe.acc;
        }
    }

    /// One rising clock edge with `inp` on the input ports (reset released).
    #[allow(
        clippy::too_many_lines,
        clippy::cognitive_complexity,
        clippy::needless_range_loop
    )]
    pub fn step(&mut self, inp: &CycleInputs) {
        let p = self.p.clone();
        let lay = &p.layout;
        let (rows, cols) = (p.rows, p.cols);
        let mf = lay.meta_field_bits;
        let l = u64::from(p.l);
        let sbits = lay.stream_bits;
        let in_idle = self.st == state::IDLE;
        let in_load = self.st == state::LOAD;
        let in_run = self.st == state::RUN;
        let in_flush = self.st == state::FLUSH;
        let in_store = self.st == state::STORE;
        let in_drain = self.st == state::DRAIN;

        // ---- command decode ----
        let cmd = inp.cmd;
        let accept = inp.cmd_valid && in_idle;
        let opc = fld(cmd, field::OPCODE);
        let f_addr = fld(cmd, field::ADDR);
        let f_count = fld(cmd, field::COUNT);
        let f_mode = fld(cmd, field::MODE);
        let f_k = fld(cmd, field::K);
        let is_load = matches!(
            opc,
            opcode::LOAD_ACT | opcode::LOAD_WGT | opcode::LOAD_META | opcode::LOAD_FOLD
        );
        let acc_load = accept && is_load && f_count != 0;
        let acc_drain = accept && opc == opcode::DRAIN && f_count != 0;
        let mode_ok = f_mode == mode_code(WeightMode::W2)
            || f_mode == mode_code(WeightMode::W4)
            || (p.has_w8 && f_mode == mode_code(WeightMode::W8))
            || (p.has_ternary && f_mode == mode_code(WeightMode::Ternary));
        let fold_gemm = fld(cmd, field::FOLD) == 1 && fld(cmd, field::DATAFLOW) == 0;
        let run_ok = mode_ok && f_k != 0 && !fold_gemm;
        let is_run = opc == opcode::RUN;
        let acc_run = accept && is_run && run_ok;
        let bad = (is_run && !run_ok) || opc > opcode::LOAD_FOLD;
        let n_err = self.err || (accept && bad);
        let set_base = accept && opc == opcode::SET_BASE;
        let set_out = accept && opc == opcode::SET_OUT;

        // ---- run mode decode ----
        let r_w4 = u64::from(self.mode) == mode_code(WeightMode::W4);
        let r_w8 = p.has_w8 && u64::from(self.mode) == mode_code(WeightMode::W8);
        let bpg_last = if r_w8 {
            l - 1
        } else if r_w4 {
            l / 2 - 1
        } else {
            l / 4 - 1
        };
        let lig = u64::from(self.bg) == bpg_last;
        let last_group = self.grp == mask(self.groups.wrapping_sub(1), 21);
        let last_beat = lig && last_group;

        // ---- din, slots ----
        let run_gemv = in_run && self.gemv;
        let hs = inp.din_valid && (in_load || run_gemv);
        let wpe_last = |n: u32| self.wcnt == n - 1;
        let load_last = match self.op {
            2 => wpe_last(lay.wgt_words),
            3 => wpe_last(lay.meta_words),
            _ => wpe_last(1),
        };
        let ent = hs && in_load && load_last;
        let gemv_meta_done = hs && in_run && !self.gph && wpe_last(lay.gemv_meta_words);
        let gemv_issue = hs && in_run && self.gph && wpe_last(lay.gemv_beat_words);
        let word_done = ent || gemv_meta_done || gemv_issue;
        // view: the slots with the word in flight in place of slot wcnt
        let sbytes = (sbits / 8) as usize;
        let need_view = ent || gemv_meta_done || gemv_issue;
        let mut view: Vec<u8> = Vec::new();
        if need_view {
            for (w, s) in self.slots.iter().enumerate() {
                if w as u32 == self.wcnt {
                    view.extend_from_slice(&inp.din[..sbytes]);
                } else {
                    view.extend_from_slice(s);
                }
            }
        }

        // ---- beat issue and counters ----
        let gemm_issue = in_run && !self.gemv;
        let issue = gemm_issue || gemv_issue;
        let run_done = issue && last_beat;

        // ---- buffers: addresses ----
        let is_act = self.op == 1;
        let ptr_lo = self.ptr & 3;
        let ptr_hi = self.ptr >> 2;
        let beat_sh = if r_w8 {
            self.bi >> 2
        } else if r_w4 {
            self.bi >> 1
        } else {
            self.bi
        };
        let araddr = (self.abase >> 2) + beat_sh;

        // ---- feeder stage 1 outputs (from registers) ----
        let fbank: [u64; 4] = std::array::from_fn(|i| get_bits(&self.foldb[i].rdata, 0, mf));
        let odd = r_w4 && (self.isel & 1) == 1;
        let sel4 = |v: &[usize; 4]| -> [usize; 4] { *v };
        let src_idx: [usize; 4] = sel4(&[
            if r_w8 {
                self.isel as usize
            } else if odd {
                2
            } else {
                0
            },
            if odd { 3 } else { 1 },
            2,
            3,
        ]);
        let sf = p.ws - 1;
        let mut zsum = self.z;
        // lanes[row][j]
        let mut x_rows = std::mem::take(&mut self.sc_x);
        for j in 0..4 {
            let m = (self.lmask >> j) & 1 == 1;
            for (r, xr) in x_rows.iter_mut().enumerate() {
                let v = if m {
                    i64::from(self.act[src_idx[j]].rdata[r] as i8)
                } else {
                    0
                };
                xr[j] = v;
            }
            // fold of row 0
            let fsrc = fbank[src_idx[j]];
            let fs = (fsrc >> 8) as i64;
            let zp = (fsrc & 0xff) as i64;
            let x0 = x_rows[0][j];
            let xf = sat(round_shift(x0 * fs, sf), 8);
            zsum = wrap(zsum + xf * zp, p.aw);
            if self.fold {
                x_rows[0][j] = xf;
            }
        }
        let mut west_in = std::mem::take(&mut self.sc_west);
        west_in.clear();
        for r in 0..rows {
            let bsum: i64 = x_rows[r].iter().sum();
            let snext = wrap(self.sacc[r] + bsum, p.s_bits);
            if self.v1 {
                self.sacc[r] = if self.l1 { 0 } else { snext };
            }
            let act = x_rows[r]
                .iter()
                .enumerate()
                .fold(0u32, |a, (j, &x)| a | (u32::from(x as u8) << (8 * j)));
            west_in.push(WestIn {
                act,
                valid: self.v1,
                last: self.l1,
                gsum: snext,
            });
        }
        let n_z = if in_store && self.tmr == rows as u32 + 2 {
            0
        } else if self.v1 && self.fold {
            zsum
        } else {
            self.z
        };

        // ---- array ----
        let store_shift = in_store && self.tmr < rows as u32;
        let mut north_in = std::mem::take(&mut self.sc_north);
        north_in.clear();
        north_in.extend((0..cols).map(|c| {
            let f = get_bits(&self.meta.rdata, mf * c as u32, mf);
            NorthIn {
                wgt: self.wgt.rdata[c],
                zero: (f & 0xff) as u8,
                gscale: f >> 8,
            }
        }));
        // Inputs of every PE (from the current registers).
        let mut pe_in = std::mem::take(&mut self.sc_pe_in);
        pe_in.clear();
        for r in 0..rows {
            for c in 0..cols {
                let idx = r * cols + c;
                if self.gemv {
                    let f = get_bits(&self.gmeta, mf * idx as u32, mf);
                    pe_in.push((
                        west_in[0],
                        NorthIn {
                            wgt: self.gbeat[idx],
                            zero: (f & 0xff) as u8,
                            gscale: f >> 8,
                        },
                    ));
                } else {
                    let w = if c == 0 {
                        self.west[r].last().copied().unwrap_or(west_in[r])
                    } else {
                        let e = &self.pes[idx - 1];
                        WestIn {
                            act: e.f_act,
                            valid: e.f_valid,
                            last: e.f_last,
                            gsum: e.f_gsum,
                        }
                    };
                    let n = if r == 0 {
                        self.north[c].last().copied().unwrap_or(north_in[c])
                    } else {
                        let s = &self.pes[idx - cols];
                        NorthIn {
                            wgt: s.f_wgt,
                            zero: s.f_zero,
                            gscale: s.f_gscale,
                        }
                    };
                    pe_in.push((w, n));
                }
            }
        }
        let pe_mode = if r_w8 {
            WeightMode::W8
        } else if r_w4 {
            WeightMode::W4
        } else {
            WeightMode::W2
        };
        let bits = pe_mode.bits();
        let gw = p.gw;
        let pw = gw + p.ws;
        let mut old_acc = std::mem::take(&mut self.sc_acc);
        old_acc.clear();
        old_acc.extend(self.pes.iter().map(|pe| pe.acc));
        for (idx, pe) in self.pes.iter_mut().enumerate() {
            let (w, n) = pe_in[idx];
            // bit planes: lane b / B, weight 2^(b mod B + 8 - B) (N10)
            let mut psum = 0i64;
            for b in 0..8u32 {
                if (n.wgt >> b) & 1 == 1 {
                    let lane = b / bits;
                    let x = i64::from(((w.act >> (8 * lane)) & 0xff) as u8 as i8);
                    psum += x << (b % bits + 8 - bits);
                }
            }
            let p_next = wrap(pe.gpsum + psum, gw);
            let end = w.valid && w.last;
            let (ma, mb) = if pe.phb {
                (pe.gscale2 as i64, pe.g)
            } else {
                (i64::from(pe.zero), pe.s)
            };
            let prod = wrap(ma * mb, pw);
            let n_g = if pe.pha {
                wrap(pe.p - wrap(prod, gw), gw)
            } else {
                pe.g
            };
            let n_gs2 = if pe.pha { pe.gscale } else { pe.gscale2 };
            let r = idx / cols;
            let n_acc = if store_shift {
                if r == 0 {
                    0
                } else {
                    old_acc[idx - cols]
                }
            } else if pe.phb {
                sat(pe.acc + prod, p.aw)
            } else {
                pe.acc
            };
            if w.valid {
                pe.gpsum = if w.last { 0 } else { p_next };
            }
            pe.phb = pe.pha;
            pe.pha = end;
            if end {
                pe.p = p_next;
                pe.s = w.gsum;
                pe.zero = n.zero;
                pe.gscale = n.gscale;
            }
            pe.g = n_g;
            pe.gscale2 = n_gs2;
            pe.acc = n_acc;
            pe.f_act = w.act;
            pe.f_valid = w.valid;
            pe.f_last = w.last;
            pe.f_gsum = w.gsum;
            pe.f_wgt = n.wgt;
            pe.f_zero = n.zero;
            pe.f_gscale = n.gscale;
        }
        // skew chains shift
        for (r, chain) in self.west.iter_mut().enumerate() {
            if !chain.is_empty() {
                chain.pop();
                chain.insert(0, west_in[r]);
            }
        }
        for (c, chain) in self.north.iter_mut().enumerate() {
            if !chain.is_empty() {
                chain.pop();
                chain.insert(0, north_in[c]);
            }
        }

        // ---- output stages (from the bottom row's accumulators before this edge) ----
        let os_valid0 = self.os[0].v2;
        let mut ys = std::mem::take(&mut self.sc_ys);
        for c in 0..cols {
            let o = &self.os[c];
            let ybits = self.os[c].y;
            ys[4 * c..4 * c + 4].copy_from_slice(&(ybits as i32).to_le_bytes());
            let a = old_acc[(rows - 1) * cols + c];
            let os_in = if self.fold { sat(a - self.z, p.aw) } else { a };
            let out_bits = match o.bits1 {
                0 => 8,
                1 => 16,
                _ => 32,
            };
            let y = sat(round_shift(o.prod, o.sh1.min(62)), out_bits);
            let o = &mut self.os[c];
            o.v2 = o.v1;
            o.v1 = store_shift;
            o.y = y;
            o.prod = os_in * self.omult as i64;
            o.sh1 = self.oshift;
            o.bits1 = self.obits;
        }

        // ---- flush / store ----
        let flush_end = in_flush && self.tmr == 0;
        let store_end = in_store && self.tmr == rows as u32 + 2;
        let n_tmr = if run_done {
            (rows + cols + 6) as u32
        } else if flush_end && !self.keep {
            0
        } else if in_flush {
            self.tmr.wrapping_sub(1) & 0xff
        } else if in_store {
            (self.tmr + 1) & 0xff
        } else {
            self.tmr
        };
        let out_aw = addr_width(p.out_depth.max(2));
        let n_wa = if flush_end {
            mask(self.oaddr + rows as u64 - 1, out_aw)
        } else if os_valid0 {
            mask(self.wa.wrapping_sub(1), out_aw)
        } else {
            self.wa
        };

        // ---- drain ----
        let ow_n = lay.out_words;
        let cnt_nz = self.cnt != 0;
        let rd = in_drain && cnt_nz && !(self.pend || self.obv);
        let dhs = self.obv && inp.dout_ready;
        let ow_last = self.owc == ow_n - 1;
        let n_obv = if self.pend {
            true
        } else if dhs && ow_last {
            false
        } else {
            self.obv
        };
        let n_owc = if self.pend {
            0
        } else if dhs {
            self.owc + 1
        } else {
            self.owc
        };
        if self.pend {
            let n = self.ob.len();
            self.ob.iter_mut().for_each(|b| *b = 0);
            let m = n.min(self.outb.rdata.len());
            self.ob[..m].copy_from_slice(&self.outb.rdata[..m]);
        } else if dhs {
            self.ob.drain(..sbytes);
            self.ob.extend(std::iter::repeat_n(0, sbytes));
        }
        let drain_end = in_drain && !cnt_nz && !(self.pend || self.obv);

        // ---- RAMs ----
        let din = &inp.din;
        for (j, b) in self.act.iter_mut().enumerate() {
            let we = ent && is_act && ptr_lo == j as u64;
            b.clock(araddr, we, ptr_hi, din, 8 * rows as u32);
        }
        for (j, b) in self.foldb.iter_mut().enumerate() {
            let we = ent && self.op == 0 && ptr_lo == j as u64;
            b.clock(araddr, we, ptr_hi, din, mf);
        }
        self.wgt.clock(
            self.wbase + self.bi,
            ent && self.op == 2,
            self.ptr,
            &view,
            8 * cols as u32,
        );
        self.meta.clock(
            self.mbase + self.grp,
            ent && self.op == 3,
            self.ptr,
            &view,
            mf * cols as u32,
        );
        self.outb
            .clock(self.ptr, os_valid0, self.wa, &ys, 32 * cols as u32);

        // ---- feeder stage 1 registers ----
        let pos0 = if r_w8 {
            self.bi
        } else if r_w4 {
            self.bi << 1
        } else {
            self.bi << 2
        };
        let mut lm = 0u32;
        for j in 0..4u64 {
            let in_k = pos0 + j < self.k;
            let lane_ok = match j {
                0 => true,
                1 => !r_w8,
                _ => !(r_w8 || r_w4),
            };
            if in_k && lane_ok {
                lm |= 1 << j;
            }
        }
        self.lmask = lm;
        self.isel = (self.bi & 3) as u32;
        self.l1 = issue && lig;
        self.v1 = issue;
        self.z = n_z;

        // ---- slots, GEMV stager ----
        if hs {
            if let Some(s) = self.slots.get_mut(self.wcnt as usize) {
                s.copy_from_slice(&din[..sbytes]);
            }
        }
        if gemv_meta_done {
            let nb = self.gmeta.len();
            for (i, b) in self.gmeta.iter_mut().enumerate() {
                let w = (mf * (rows * cols) as u32)
                    .saturating_sub(8 * i as u32)
                    .min(8);
                *b = get_bits(&view, 8 * i as u32, w) as u8;
            }
            debug_assert_eq!(nb, self.gmeta.len());
        }
        if gemv_issue {
            self.gbeat.copy_from_slice(&view[..rows * cols]);
        }

        // ---- counters ----
        self.wcnt = if accept || word_done {
            0
        } else if hs {
            self.wcnt + 1
        } else {
            self.wcnt
        };
        let n_bi = if acc_run {
            0
        } else if issue {
            mask(self.bi + 1, 22)
        } else {
            self.bi
        };
        let n_bg = if acc_run || (issue && lig) {
            0
        } else if issue {
            self.bg + 1
        } else {
            self.bg
        };
        let n_grp = if acc_run {
            0
        } else if issue && lig {
            mask(self.grp + 1, 21)
        } else {
            self.grp
        };
        let n_gph = if acc_run {
            false
        } else if gemv_meta_done {
            true
        } else if gemv_issue && lig {
            false
        } else {
            self.gph
        };
        self.bi = n_bi;
        self.bg = n_bg;
        self.grp = n_grp;
        self.gph = n_gph;

        // ---- registers set by commands ----
        self.err = n_err;
        if set_base {
            self.abase = fld(cmd, field::ACT_BASE);
            self.wbase = fld(cmd, field::WGT_BASE);
            self.mbase = fld(cmd, field::META_BASE);
        }
        if set_out {
            self.omult = fld(cmd, field::OUT_MULT);
            self.oshift = fld(cmd, field::OUT_SHIFT) as u32;
            self.obits = fld(cmd, field::OUT_BITS) as u32;
        }
        if acc_run {
            self.mode = f_mode as u8;
            self.gemv = fld(cmd, field::DATAFLOW) == 1;
            self.keep = fld(cmd, field::KEEP) == 1;
            self.fold = fld(cmd, field::FOLD) == 1;
            self.k = f_k;
            self.oaddr = fld(cmd, field::OUT_ADDR);
            self.groups = mask((f_k + l - 1) >> p.l.trailing_zeros(), 21);
        }
        self.tmr = n_tmr;
        self.wa = n_wa;
        self.pend = rd;
        self.obv = n_obv;
        self.owc = n_owc;

        // ---- ptr / cnt / op / state ----
        if acc_load {
            self.op = (opc & 3) as u8;
        }
        let step = ent || rd;
        let load_end = ent && self.cnt == 1;
        if acc_load || acc_drain {
            self.ptr = f_addr;
            self.cnt = f_count;
        } else if step {
            self.ptr = mask(self.ptr + 1, 21);
            self.cnt = mask(self.cnt.wrapping_sub(1), 21);
        }
        self.st = if acc_load {
            state::LOAD
        } else if acc_run {
            state::RUN
        } else if acc_drain {
            state::DRAIN
        } else if load_end {
            state::IDLE
        } else if run_done {
            state::FLUSH
        } else if flush_end {
            if self.keep {
                state::IDLE
            } else {
                state::STORE
            }
        } else if store_end || drain_end {
            state::IDLE
        } else {
            self.st
        };
        self.cycle += 1;
        self.sc_x = x_rows;
        self.sc_west = west_in;
        self.sc_north = north_in;
        self.sc_pe_in = pe_in;
        self.sc_acc = old_acc;
        self.sc_ys = ys;
    }
}

/// Length of the packed state vector of an engine with sizes `p` ([`CycleModel::state_words`]).
#[must_use]
pub fn state_len(p: &ModelParams) -> usize {
    SCALAR_PATHS.len() + p.layout.stream_bits.div_ceil(64) as usize + p.rows * p.cols
}

/// Stimulus shared by the model and the hardware: commands and `din` words in order, offered
/// with a seeded stall pattern (`stall = false`: every cycle), and the `dout` back-pressure.
#[derive(Debug, Clone)]
pub struct Driver {
    cmds: Vec<u64>,
    din: Vec<Vec<u8>>,
    stall: bool,
    lfsr: u64,
    ci: usize,
    di: usize,
    bits: u64,
    zero_word: Vec<u8>,
    /// `dout` words received, in order.
    pub out: Vec<Vec<u8>>,
    idle: u32,
}

impl Driver {
    /// A driver of `cmds` and `din` words (`stream_bits / 8` bytes each).
    #[must_use]
    pub fn new(
        cmds: Vec<u64>,
        din: Vec<Vec<u8>>,
        stream_bytes: usize,
        stall: bool,
        seed: u64,
    ) -> Driver {
        Driver {
            cmds,
            din,
            stall,
            lfsr: seed | 1,
            ci: 0,
            di: 0,
            bits: 0,
            zero_word: vec![0; stream_bytes],
            out: Vec::new(),
            idle: 0,
        }
    }

    /// Index of the next command to offer (the one being executed is `ci - 1`).
    #[must_use]
    pub fn cmd_index(&self) -> usize {
        self.ci
    }

    /// The inputs of this cycle (depends only on the driver's own state).
    pub fn inputs(&mut self, inp: &mut CycleInputs) {
        // xorshift64 for the stall pattern, one draw per cycle
        self.lfsr ^= self.lfsr << 13;
        self.lfsr ^= self.lfsr >> 7;
        self.lfsr ^= self.lfsr << 17;
        self.bits = if self.stall { self.lfsr } else { u64::MAX };
        let go_c = self.bits & 1 == 1 || self.bits & 0x10 == 0x10;
        let go_d = self.bits & 2 == 2 || self.bits & 0x20 == 0x20;
        let rdy = self.bits & 4 == 4 || self.bits & 8 == 8;
        inp.cmd_valid = self.ci < self.cmds.len() && go_c;
        inp.cmd = self.cmds.get(self.ci).copied().unwrap_or(0);
        inp.din_valid = self.di < self.din.len() && go_d;
        inp.din.clear();
        inp.din
            .extend_from_slice(self.din.get(self.di).unwrap_or(&self.zero_word));
        inp.dout_ready = rdy;
    }

    /// Advances after the edge, given the ports shown in the cycle (`st`) and the inputs.
    pub fn advance(&mut self, st: &CycleState, inp: &CycleInputs) {
        let dout = st.dout_valid.then_some(&st.dout_data[..]);
        self.advance_ports(st.cmd_ready, st.din_ready, st.busy, dout, inp);
    }

    /// [`Self::advance`] from the port values alone (`dout` is `dout_data` while `dout_valid`,
    /// else `None`); may be called before the model's edge, as only the inputs and the ports
    /// shown in the cycle matter.
    pub fn advance_ports(
        &mut self,
        cmd_ready: bool,
        din_ready: bool,
        busy: bool,
        dout: Option<&[u8]>,
        inp: &CycleInputs,
    ) {
        if inp.cmd_valid && cmd_ready {
            self.ci += 1;
        }
        if inp.din_valid && din_ready {
            self.di += 1;
        }
        if let Some(d) = dout {
            if inp.dout_ready {
                self.out.push(d.to_vec());
            }
        }
        if self.ci == self.cmds.len() && !busy && !inp.cmd_valid {
            self.idle += 1;
        } else {
            self.idle = 0;
        }
    }

    /// Every command issued and the engine idle for 4 cycles.
    #[must_use]
    pub fn done(&self) -> bool {
        self.idle >= 4
    }

    /// `din` words consumed.
    #[must_use]
    pub fn din_consumed(&self) -> usize {
        self.di
    }
}

/// The result of [`run_program`].
#[derive(Debug, Clone)]
pub struct RunResult {
    /// `dout` words in order.
    pub out: Vec<Vec<u8>>,
    /// Cycles until the engine went idle.
    pub cycles: u64,
    /// `err_o` at the end.
    pub err: bool,
    /// `din` words consumed.
    pub din_consumed: usize,
}

/// Runs a program on the model alone (at most `max_cycles`).
pub fn run_program(
    cfg: &EngineConfig,
    cmds: &[u64],
    din: &[Vec<u8>],
    stall: bool,
    seed: u64,
    max_cycles: u64,
) -> Result<RunResult, String> {
    let mut m = CycleModel::new(cfg)?;
    let sb = (m.params().layout.stream_bits / 8) as usize;
    let mut d = Driver::new(cmds.to_vec(), din.to_vec(), sb, stall, seed);
    let mut inp = CycleInputs::default();
    let mut st = CycleState::default();
    while !d.done() {
        if m.cycle() >= max_cycles {
            return Err(format!("program did not finish in {max_cycles} cycles"));
        }
        m.state_into(&mut st);
        d.inputs(&mut inp);
        m.step(&inp);
        d.advance(&st, &inp);
    }
    Ok(RunResult {
        cycles: m.cycle(),
        err: m.err(),
        din_consumed: d.din_consumed(),
        out: d.out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Cmd;

    #[test]
    fn wrap_truncates() {
        assert_eq!(wrap(255, 8), -1);
        assert_eq!(wrap(128, 8), -128);
        assert_eq!(wrap(-129, 8), 127);
        assert_eq!(wrap(5, 64), 5);
    }

    #[test]
    fn reserved_opcode_sets_err_and_nop_takes_one_cycle() {
        let cfg = EngineConfig::preset("tiny").expect("tiny");
        let cmds = vec![Cmd::Nop.encode().expect("nop"), 9];
        let r = run_program(&cfg, &cmds, &[], false, 1, 100).expect("runs");
        assert!(r.err);
        assert!(r.cycles < 10);
    }
}
