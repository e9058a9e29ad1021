//! Engine test programs shared by hdl-gen's Verilator test (`tests/engine_sim.rs`) and the
//! co-simulation suites (`tessera-sim`): command streams, `din` words and the golden outputs of
//! weight operations (`golden::ops::weight_op`) and folded attention products (`golden::kv`).

use tessera_golden::config::{EngineConfig, WeightMode};
use tessera_golden::engine::{Cmd, Dataflow, StreamLayout, Word};
use tessera_golden::ops::{weight_op, OutputStage};
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{QuantWeights, TERNARY_ZERO_U8};

/// xorshift64: the test programs' random source (seeded, reproducible).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);
#[allow(clippy::should_implement_trait)] // a plain generator, not an iterator
impl Rng {
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One program: commands, din words, and the expected dout values per drained entry.
#[derive(Debug, Default, Clone)]
pub struct Program {
    pub cmds: Vec<u64>,
    pub din: Vec<Word>,
    /// Expected output entries in drain order (`cols` values each).
    pub expect: Vec<Vec<i64>>,
    /// A label per expected entry, for failure messages.
    pub labels: Vec<String>,
}

impl Program {
    /// Appends an encoded command.
    pub fn cmd(&mut self, c: Cmd) {
        self.cmds.push(c.encode().expect("encode"));
    }
}

/// One weight operation to run.
#[derive(Debug, Clone)]
pub struct Op {
    pub label: String,
    pub mode: WeightMode,
    pub dataflow: Dataflow,
    pub m_tokens: usize,
    pub n_rows: usize,
    pub k: usize,
    pub stage: OutputStage,
    /// 0: random operands; 1: extreme (-128, max codes, max gscale, zero 0/255 alternating);
    /// 2: extreme with zero 0 everywhere (drives the accumulator into N13 saturation).
    pub extreme: u8,
    /// k-split: when non-zero (a multiple of `L` below `k`), the op runs as two `RUN`s, the first
    /// `split` positions with `keep = 1` and the rest after a `SET_BASE` that moves the bases on,
    /// so the accumulators carry over (same result as one `RUN`).
    pub split: usize,
}

/// The packing format of a weight mode.
pub fn format_of(mode: WeightMode) -> WeightFormat {
    match mode {
        WeightMode::W2 => WeightFormat::W2,
        WeightMode::W4 => WeightFormat::W4,
        WeightMode::W8 => WeightFormat::W8,
        WeightMode::Ternary => WeightFormat::Ternary,
    }
}

/// Appends `op` to the program (loads, run, drain) and its golden outputs.
pub fn add_op(p: &mut Program, cfg: &EngineConfig, rng: &mut Rng, op: &Op, out_addr: u32) {
    let lay = &StreamLayout::new(cfg);
    let (rows, cols) = (cfg.array.rows as usize, cfg.array.cols as usize);
    let l = cfg.quant.w_group_len as usize;
    let ws = cfg.quant.w_scale_bits;
    let sf = ws - 1;
    let fmt = format_of(op.mode);
    let k = op.k;
    let groups = k.div_ceil(l);
    let n = op.n_rows;
    let m = op.m_tokens;
    // Operands.
    let max_code = u64::from(fmt.max_code());
    let codes: Vec<u8> = (0..n * k)
        .map(|_| {
            if op.extreme > 0 {
                fmt.max_code()
            } else {
                rng.below(max_code + 1) as u8
            }
        })
        .collect();
    let gscale: Vec<u16> = (0..n * groups)
        .map(|_| {
            if op.extreme > 0 {
                1u16 << sf
            } else {
                rng.below((1u64 << sf) + 1) as u16
            }
        })
        .collect();
    let zero: Vec<u8> = (0..n * groups)
        .map(|i| match fmt {
            WeightFormat::Ternary => TERNARY_ZERO_U8,
            _ if op.extreme == 2 => 0,
            _ if op.extreme == 1 => (i % 2) as u8 * 255,
            _ => rng.below(256) as u8,
        })
        .collect();
    let w = QuantWeights::from_codes(
        fmt,
        n,
        k,
        l,
        ws,
        &codes,
        gscale.clone(),
        zero.clone(),
        vec![1.0; n],
    )
    .expect("weights");
    let x: Vec<i8> = (0..m * k)
        .map(|_| {
            if op.extreme > 0 {
                -128
            } else {
                rng.next() as u8 as i8
            }
        })
        .collect();
    let y = weight_op(&cfg.datapath(), &x, m, &w, &op.stage).expect("golden");
    let packed = w.packed();
    let row_bytes = packed.len() / n;
    let beats = row_bytes;

    // Bases: non-zero, activation base a multiple of 4.
    let act_base = 4 * rng.below(((cfg.buffers.act_depth as usize - k) / 4 + 1) as u64) as u32;
    let wgt_base = rng.below((cfg.buffers.wgt_depth as usize - beats + 1) as u64) as u32;
    let meta_entries = cfg.buffers.wgt_depth * 4 / cfg.quant.w_group_len;
    let meta_base = rng.below(u64::from(meta_entries) - groups as u64 + 1) as u32;
    p.cmd(Cmd::SetBase {
        act: act_base,
        wgt: wgt_base,
        meta: meta_base,
    });
    p.cmd(Cmd::SetOut(op.stage));
    // Activations: entry p holds position p of every token row (GEMV: row 0).
    p.cmd(Cmd::LoadAct {
        addr: act_base,
        count: k as u32,
    });
    for pos in 0..k {
        let col: Vec<i8> = (0..rows)
            .map(|t| if t < m { x[t * k + pos] } else { 0 })
            .collect();
        p.din.extend(lay.act_entry(&col));
    }
    let split = op.split;
    assert!(
        split == 0 || (split.is_multiple_of(l) && split < k),
        "k-split {split} of k = {k}"
    );
    let run = |keep: bool, kk: usize| Cmd::Run {
        mode: op.mode,
        dataflow: op.dataflow,
        keep,
        k: kk as u32,
        out_addr,
        fold: false,
    };
    let bpg = beats / groups;
    let g1 = split / l;
    let second_base = Cmd::SetBase {
        act: act_base + split as u32,
        wgt: wgt_base + (g1 * bpg) as u32,
        meta: meta_base + g1 as u32,
    };
    match op.dataflow {
        Dataflow::Gemm => {
            assert!(m <= rows && n <= cols);
            p.cmd(Cmd::LoadWgt {
                addr: wgt_base,
                count: beats as u32,
            });
            for i in 0..beats {
                let e: Vec<u8> = (0..cols)
                    .map(|c| if c < n { packed[c * row_bytes + i] } else { 0 })
                    .collect();
                p.din.extend(lay.byte_entry(&e));
            }
            p.cmd(Cmd::LoadMeta {
                addr: meta_base,
                count: groups as u32,
            });
            for g in 0..groups {
                let e: Vec<(u16, u8)> = (0..cols)
                    .map(|c| {
                        if c < n {
                            (gscale[c * groups + g], zero[c * groups + g])
                        } else {
                            (0, 0)
                        }
                    })
                    .collect();
                p.din.extend(lay.meta_entry(&e));
            }
            if split > 0 {
                p.cmd(run(true, split));
                p.cmd(second_base);
                p.cmd(run(false, k - split));
            } else {
                p.cmd(run(false, k));
            }
            #[allow(clippy::needless_range_loop)] // rows past m are zero rows
            for r in 0..rows {
                p.expect.push(
                    (0..cols)
                        .map(|c| if r < m && c < n { y[r][c] } else { 0 })
                        .collect(),
                );
                p.labels.push(format!("{} token {r}", op.label));
            }
        }
        Dataflow::Gemv => {
            assert!(m == 1 && n <= rows * cols);
            p.cmd(run(split > 0, if split > 0 { split } else { k }));
            for g in 0..groups {
                if split > 0 && g == g1 {
                    p.cmd(second_base);
                    p.cmd(run(false, k - split));
                }
                let e: Vec<(u16, u8)> = (0..rows * cols)
                    .map(|i| {
                        if i < n {
                            (gscale[i * groups + g], zero[i * groups + g])
                        } else {
                            (0, 0)
                        }
                    })
                    .collect();
                p.din.extend(lay.meta_entry(&e));
                for b in 0..bpg {
                    let i = g * bpg + b;
                    let e: Vec<u8> = (0..rows * cols)
                        .map(|r| if r < n { packed[r * row_bytes + i] } else { 0 })
                        .collect();
                    p.din.extend(lay.byte_entry(&e));
                }
            }
            for r in 0..rows {
                p.expect.push(
                    (0..cols)
                        .map(|c| {
                            let i = r * cols + c;
                            if i < n {
                                y[0][i]
                            } else {
                                0
                            }
                        })
                        .collect(),
                );
                p.labels.push(format!("{} PE row {r}", op.label));
            }
        }
    }
    p.cmd(Cmd::Drain {
        addr: out_addr,
        count: rows as u32,
    });
}

/// Appends one folded attention product (N17-N19) run as a GEMV with `fold = 1`: `x` (the query
/// for `Q x K^T`, or probabilities for `P x V`) is folded with per-element `fscale`, and
/// - `window = false`: KV4 codes (W4, lattice `<< 4`) with per-element zero points (`Z` path);
/// - `window = true`: signed 8-bit window codes (W8 with PE zero point 128, fold zeros 0, N18).
///
/// Golden: `kv::fold_i8` + `kv::folded_products`, then N19's `sat(acc, acc_bits)` and N14.
#[allow(clippy::too_many_arguments)]
pub fn add_fold_op(
    p: &mut Program,
    cfg: &EngineConfig,
    rng: &mut Rng,
    label: &str,
    window: bool,
    n: usize,
    e: usize,
    stage: OutputStage,
    out_addr: u32,
) {
    use tessera_golden::kv::{fold_i8, folded_products};
    use tessera_golden::numerics::sat;
    use tessera_golden::pack::pack_weights;
    let lay = &StreamLayout::new(cfg);
    let (rows, cols) = (cfg.array.rows as usize, cfg.array.cols as usize);
    let l = cfg.quant.w_group_len as usize;
    let sf = cfg.quant.w_scale_bits - 1;
    let x: Vec<i8> = (0..e)
        .map(|i| {
            if i % 7 == 0 {
                -128
            } else {
                rng.next() as u8 as i8
            }
        })
        .collect();
    let fscale: Vec<u16> = (0..e)
        .map(|i| {
            if i % 5 == 0 {
                1 << sf
            } else {
                rng.below((1 << sf) + 1) as u16
            }
        })
        .collect();
    let zero_e: Vec<u8> = (0..e)
        .map(|_| if window { 0 } else { rng.below(256) as u8 })
        .collect();
    // Engine codes [o][e] and the golden lattice weights.
    let (fmt, codes, wl): (WeightFormat, Vec<u8>, Vec<i64>) = if window {
        let v: Vec<i8> = (0..n * e).map(|_| rng.next() as u8 as i8).collect();
        let codes = v.iter().map(|&x| (i16::from(x) + 128) as u8).collect();
        (
            WeightFormat::W8,
            codes,
            v.iter().map(|&x| i64::from(x)).collect(),
        )
    } else {
        let c: Vec<u8> = (0..n * e).map(|_| rng.below(16) as u8).collect();
        let wl = c.iter().map(|&x| i64::from(x) << 4).collect();
        (WeightFormat::W4, c, wl)
    };
    let xf = fold_i8(&x, &fscale, sf);
    let zeros: Vec<i64> = zero_e.iter().map(|&z| i64::from(z)).collect();
    let (z, acc) = folded_products(&xf, &wl, &zeros);
    let y: Vec<i64> = acc
        .iter()
        .map(|&a| stage.apply(sat(a, cfg.datapath.acc_bits)))
        .collect();

    let act_base = 4 * rng.below(((cfg.buffers.act_depth as usize - e) / 4 + 1) as u64) as u32;
    p.cmd(Cmd::SetBase {
        act: act_base,
        wgt: 0,
        meta: 0,
    });
    p.cmd(Cmd::SetOut(stage));
    p.cmd(Cmd::LoadAct {
        addr: act_base,
        count: e as u32,
    });
    for &xi in &x {
        let mut col = vec![0i8; rows];
        col[0] = xi;
        p.din.extend(lay.act_entry(&col));
    }
    p.cmd(Cmd::LoadFold {
        addr: act_base,
        count: e as u32,
    });
    for i in 0..e {
        p.din.extend(lay.fold_entry(fscale[i], zero_e[i]));
    }
    let mode = if window {
        WeightMode::W8
    } else {
        WeightMode::W4
    };
    p.cmd(Cmd::Run {
        mode,
        dataflow: Dataflow::Gemv,
        keep: false,
        k: e as u32,
        out_addr,
        fold: true,
    });
    let packed = pack_weights(&codes, n, e, l, fmt).expect("pack");
    let row_bytes = packed.len() / n;
    let groups = e.div_ceil(l);
    let bpg = row_bytes / groups;
    let pe_zero = if window { 128 } else { 0 };
    for g in 0..groups {
        let hdr: Vec<(u16, u8)> = (0..rows * cols)
            .map(|i| if i < n { (1, pe_zero) } else { (0, 0) })
            .collect();
        p.din.extend(lay.meta_entry(&hdr));
        for b in 0..bpg {
            let i = g * bpg + b;
            let bytes: Vec<u8> = (0..rows * cols)
                .map(|r| if r < n { packed[r * row_bytes + i] } else { 0 })
                .collect();
            p.din.extend(lay.byte_entry(&bytes));
        }
    }
    // PEs past n accumulate 0, and 0 - Z for the KV4 product.
    let z_only = stage.apply(sat(-z, cfg.datapath.acc_bits));
    for r in 0..rows {
        p.expect.push(
            (0..cols)
                .map(|c| {
                    let i = r * cols + c;
                    if i < n {
                        y[i]
                    } else {
                        z_only
                    }
                })
                .collect(),
        );
        p.labels.push(format!("{label} PE row {r}"));
    }
    p.cmd(Cmd::Drain {
        addr: out_addr,
        count: rows as u32,
    });
}

/// An odd-sized config: 3 x 5 PEs, groups of 8, 8-bit scales, a 32-bit accumulator (so N13
/// saturation is reachable at k = 600), no W8, no ternary, 32-bit streams.
pub fn odd_config() -> EngineConfig {
    let mut cfg = EngineConfig {
        name: "odd3x5".into(),
        ..EngineConfig::default()
    };
    cfg.array.rows = 3;
    cfg.array.cols = 5;
    cfg.precision.weight_bits = vec![2, 4];
    cfg.precision.ternary = false;
    cfg.quant.w_group_len = 8;
    cfg.quant.w_scale_bits = 8;
    cfg.datapath.acc_bits = 32;
    cfg.buffers.act_depth = 1024;
    cfg.buffers.wgt_depth = 512;
    cfg.buffers.out_depth = 40;
    cfg.interface.stream_bits = 32;
    cfg.validate().expect("odd config is valid");
    cfg
}

/// An output stage.
pub fn stage(out_mult: u16, out_shift: u32, out_bits: u32) -> OutputStage {
    OutputStage {
        out_mult,
        out_shift,
        out_bits,
    }
}

#[allow(clippy::too_many_arguments)]
/// An [`Op`].
pub fn op(
    label: &str,
    mode: WeightMode,
    dataflow: Dataflow,
    m_tokens: usize,
    n_rows: usize,
    k: usize,
    stage: OutputStage,
    extreme: u8,
) -> Op {
    Op {
        label: label.to_string(),
        mode,
        dataflow,
        m_tokens,
        n_rows,
        k,
        stage,
        extreme,
        split: 0,
    }
}

/// The lattice output stage of `cfg` (N14 with `out_shift = SF`).
pub fn lattice(cfg: &EngineConfig) -> OutputStage {
    OutputStage::weight_lattice_i32(cfg.quant.w_scale_bits - 1)
}
