//! Functional check of the generated engine: Verilator (`--binary`) runs a small Verilog
//! testbench that feeds command and data words from `$readmemh` files (with random stalls on
//! every stream) and writes every `dout` word; each output integer is compared with
//! `golden::ops::weight_op` on the same inputs. One Verilator build per config per test run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use tessera_golden::config::{EngineConfig, WeightMode};
use tessera_golden::engine::{Cmd, Dataflow, StreamLayout, Word};
use tessera_golden::ops::{weight_op, OutputStage};
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{QuantWeights, TERNARY_ZERO_U8};
use tessera_hdl_gen::engine::generate;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TB: &str = r#"`timescale 1ns/1ps
module tb;
  localparam integer SB = @SB@;
  localparam integer MAXC = 4096;
  localparam integer MAXD = 65536;
  reg clk = 1'b0;
  reg rst_n = 1'b0;
  reg [63:0] cmds [0:MAXC-1];
  reg [SB-1:0] dins [0:MAXD-1];
  integer ncmd, ndin, stall, ci, di, cyc, idle, fo, fs, seed;
  reg [31:0] lfsr;
  wire cmd_ready, din_ready, dout_valid, busy, err;
  wire [SB-1:0] dout;
  wire go_c = (stall == 0) || lfsr[0];
  wire go_d = (stall == 0) || lfsr[1] || lfsr[5];
  wire dout_ready = (stall == 0) || lfsr[2] || lfsr[3];
  wire cmd_valid = rst_n && (ci < ncmd) && go_c;
  wire din_valid = rst_n && (di < ndin) && go_d;
  tessera_engine dut (
    .clk_i(clk), .rst_ni(rst_n),
    .cmd_valid_i(cmd_valid), .cmd_data_i(cmds[ci[11:0]]), .cmd_ready_o(cmd_ready),
    .din_valid_i(din_valid), .din_data_i(dins[di[15:0]]), .din_ready_o(din_ready),
    .dout_valid_o(dout_valid), .dout_data_o(dout), .dout_ready_i(dout_ready),
    .busy_o(busy), .err_o(err));
  always #5 clk = ~clk;
  initial begin
    if (!$value$plusargs("ncmd=%d", ncmd)) ncmd = 0;
    if (!$value$plusargs("ndin=%d", ndin)) ndin = 0;
    if (!$value$plusargs("stall=%d", stall)) stall = 0;
    if (!$value$plusargs("seed=%d", seed)) seed = 1;
    $readmemh("cmd.hex", cmds);
    $readmemh("din.hex", dins);
    fo = $fopen("out.hex", "w");
    ci = 0; di = 0; cyc = 0; idle = 0;
    lfsr = seed;
    repeat (3) @(posedge clk);
    rst_n = 1'b1;
  end
  always @(posedge clk) begin
    if (rst_n) begin
      lfsr <= {lfsr[30:0], lfsr[31] ^ lfsr[21] ^ lfsr[1] ^ lfsr[0]};
      if (cmd_valid && cmd_ready) ci <= ci + 1;
      if (din_valid && din_ready) di <= di + 1;
      if (dout_valid && dout_ready) $fwrite(fo, "%h\n", dout);
      cyc <= cyc + 1;
      if (ci == ncmd && !busy && !cmd_valid) idle <= idle + 1; else idle <= 0;
      if (idle == 16 || cyc > 2000000) begin
        fs = $fopen("status.txt", "w");
        $fwrite(fs, "%0d %0d %0d %0d\n", err, ci, di, cyc);
        $fclose(fs);
        $fclose(fo);
        $finish;
      end
    end
  end
endmodule
"#;

/// A generated engine built with Verilator (kept for the whole test run).
struct Sim {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    layout: StreamLayout,
    cfg: EngineConfig,
}

fn build(cfg: &EngineConfig) -> Sim {
    let dir = tempfile::tempdir().expect("tempdir");
    let design = generate(cfg).expect("generate");
    let written = design.write(dir.path()).expect("write");
    let layout = StreamLayout::new(cfg);
    let tb = TB.replace("@SB@", &layout.stream_bits.to_string());
    std::fs::write(dir.path().join("tb.v"), tb).expect("tb");
    let mut args: Vec<String> = [
        "--binary",
        "-O1",
        "-j",
        "2",
        "-Wno-fatal",
        "-Wno-lint",
        "-Wno-style",
        "--top-module",
        "tb",
        "-Mdir",
        "obj",
        "-o",
        "vtb",
        "tb.v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for f in &written.files {
        args.push(f.file_name().expect("name").to_string_lossy().into_owned());
    }
    let out = match Command::new("verilator")
        .args(&args)
        .current_dir(dir.path())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("verilator not found on PATH: install it with apt-get install verilator")
        }
        Err(e) => panic!("running verilator: {e}"),
    };
    assert!(
        out.status.success(),
        "verilator --binary failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Sim {
        exe: dir.path().join("obj").join("vtb"),
        _dir: dir,
        layout,
        cfg: cfg.clone(),
    }
}

/// One program: commands, din words, and the expected dout values per drained entry.
#[derive(Default)]
struct Program {
    cmds: Vec<u64>,
    din: Vec<Word>,
    /// Expected output entries in drain order (`cols` values each).
    expect: Vec<Vec<i64>>,
    /// A label per expected entry, for failure messages.
    labels: Vec<String>,
}

impl Program {
    fn cmd(&mut self, c: Cmd) {
        self.cmds.push(c.encode().expect("encode"));
    }
}

/// One weight operation to run.
struct Op {
    label: String,
    mode: WeightMode,
    dataflow: Dataflow,
    m_tokens: usize,
    n_rows: usize,
    k: usize,
    stage: OutputStage,
    /// 0: random operands; 1: extreme (-128, max codes, max gscale, zero 0/255 alternating);
    /// 2: extreme with zero 0 everywhere (drives the accumulator into N13 saturation).
    extreme: u8,
}

fn format_of(mode: WeightMode) -> WeightFormat {
    match mode {
        WeightMode::W2 => WeightFormat::W2,
        WeightMode::W4 => WeightFormat::W4,
        WeightMode::W8 => WeightFormat::W8,
        WeightMode::Ternary => WeightFormat::Ternary,
    }
}

/// Appends `op` to the program (loads, run, drain) and its golden outputs.
fn add_op(p: &mut Program, sim: &Sim, rng: &mut Rng, op: &Op, out_addr: u32) {
    let cfg = &sim.cfg;
    let lay = &sim.layout;
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
    let run = Cmd::Run {
        mode: op.mode,
        dataflow: op.dataflow,
        keep: false,
        k: k as u32,
        out_addr,
        fold: false,
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
            p.cmd(run);
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
            p.cmd(run);
            let bpg = beats / groups;
            for g in 0..groups {
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
fn add_fold_op(
    p: &mut Program,
    sim: &Sim,
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
    let cfg = &sim.cfg;
    let lay = &sim.layout;
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

/// Runs `prog` on `sim` and checks every output value and the error flag.
fn run(sim: &Sim, prog: &Program, stall: bool, seed: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let hex = |words: Vec<String>| {
        if words.is_empty() {
            "0\n".to_string()
        } else {
            words.join("\n") + "\n"
        }
    };
    std::fs::write(
        dir.path().join("cmd.hex"),
        hex(prog.cmds.iter().map(|c| format!("{c:016x}")).collect()),
    )
    .expect("cmd.hex");
    std::fs::write(
        dir.path().join("din.hex"),
        hex(prog.din.iter().map(Word::to_hex).collect()),
    )
    .expect("din.hex");
    let out = Command::new(&sim.exe)
        .args([
            format!("+ncmd={}", prog.cmds.len()),
            format!("+ndin={}", prog.din.len()),
            format!("+stall={}", u32::from(stall)),
            format!("+seed={seed}"),
        ])
        .current_dir(dir.path())
        .output()
        .expect("run simulation");
    assert!(
        out.status.success(),
        "simulation failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = std::fs::read_to_string(dir.path().join("status.txt")).expect("status");
    let f: Vec<u64> = status
        .split_whitespace()
        .map(|s| s.parse().expect("status field"))
        .collect();
    assert_eq!(f[0], 0, "engine raised err_o");
    assert_eq!(f[1] as usize, prog.cmds.len(), "commands consumed");
    assert_eq!(f[2] as usize, prog.din.len(), "din words consumed");
    let text = std::fs::read_to_string(dir.path().join("out.hex")).expect("out.hex");
    let bytes = (sim.layout.stream_bits / 8) as usize;
    let words: Vec<Word> = text
        .lines()
        .map(|l| Word::from_hex(l, bytes).expect("hex word"))
        .collect();
    let ow = sim.layout.out_words as usize;
    assert_eq!(
        words.len(),
        prog.expect.len() * ow,
        "dout words (cycles {})",
        f[3]
    );
    let mut bad = Vec::new();
    for (i, (want, label)) in prog.expect.iter().zip(&prog.labels).enumerate() {
        let got = sim.layout.out_entry(&words[i * ow..(i + 1) * ow]);
        let got: Vec<i64> = got.into_iter().map(i64::from).collect();
        if &got != want {
            bad.push(format!("{label}: engine {got:?}, golden {want:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

fn tiny() -> &'static Sim {
    static SIM: OnceLock<Sim> = OnceLock::new();
    SIM.get_or_init(|| build(&EngineConfig::preset("tiny").expect("tiny")))
}

/// An odd-sized config: 3 x 5 PEs, groups of 8, 8-bit scales, a 32-bit accumulator (so N13
/// saturation is reachable at k = 600), no W8, no ternary, 32-bit streams.
fn odd_config() -> EngineConfig {
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

fn odd() -> &'static Sim {
    static SIM: OnceLock<Sim> = OnceLock::new();
    SIM.get_or_init(|| build(&odd_config()))
}

fn lattice(sim: &Sim) -> OutputStage {
    OutputStage::weight_lattice_i32(sim.cfg.quant.w_scale_bits - 1)
}

fn stage(out_mult: u16, out_shift: u32, out_bits: u32) -> OutputStage {
    OutputStage {
        out_mult,
        out_shift,
        out_bits,
    }
}

#[allow(clippy::too_many_arguments)]
fn op(
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
    }
}

/// Builds one program of `ops` (each drained to its own output rows) and runs it twice: at full
/// rate, and with random stalls on cmd, din and dout.
fn check(sim: &Sim, ops: &[Op], seed: u64) -> Vec<i64> {
    let mut rng = Rng(seed);
    let rows = sim.cfg.array.rows;
    let mut prog = Program::default();
    for (i, o) in ops.iter().enumerate() {
        let out_addr = (rows * i as u32) % (sim.cfg.buffers.out_depth - rows + 1);
        add_op(&mut prog, sim, &mut rng, o, out_addr);
    }
    run(sim, &prog, false, 1);
    run(sim, &prog, true, 12345);
    prog.expect.iter().flatten().copied().collect()
}

#[test]
fn tiny_engine_matches_golden_weight_ops() {
    use Dataflow::{Gemm, Gemv};
    use WeightMode::{Ternary, W2, W4, W8};
    let sim = tiny();
    let lat = lattice(sim);
    let id = OutputStage::IDENTITY_I32;
    let ops = [
        op("w2 gemv k=75", W2, Gemv, 1, 16, 75, lat, 0),
        op("w2 gemm k=77", W2, Gemm, 4, 4, 77, lat, 0),
        op("w4 gemm k=45", W4, Gemm, 3, 4, 45, lat, 0),
        op("w8 gemm k=33", W8, Gemm, 4, 3, 33, lat, 0),
        op("w8 gemm sat8", W8, Gemm, 4, 4, 63, stage(3, 20, 8), 0),
        op("w4 gemv sat16", W4, Gemv, 1, 13, 97, stage(1000, 21, 16), 0),
        op("ternary gemv", Ternary, Gemv, 1, 16, 64, lat, 0),
        op("ternary gemm", Ternary, Gemm, 4, 4, 31, lat, 0),
        op("w2 gemm extreme", W2, Gemm, 4, 4, 255, id, 1),
        op(
            "w8 gemv extreme",
            W8,
            Gemv,
            1,
            16,
            129,
            stage(65535, 0, 32),
            1,
        ),
        op("w4 gemm k=1", W4, Gemm, 2, 2, 1, stage(7, 3, 32), 0),
    ];
    let all = check(sim, &ops, 0x5eed_0000_0000_0003);
    // Non-vacuity: most outputs are non-zero and the 8/16/32-bit stages saturate somewhere.
    assert!(all.iter().filter(|&&v| v != 0).count() > all.len() / 2);
    assert!(
        all.contains(&127) || all.contains(&-128),
        "no 8-bit saturation"
    );
    assert!(
        all.contains(&32767) || all.contains(&-32768),
        "no 16-bit saturation"
    );
    assert!(all.contains(&i64::from(i32::MIN)) || all.contains(&i64::from(i32::MAX)));
}

#[test]
fn odd_engine_matches_golden_including_accumulator_saturation() {
    use Dataflow::{Gemm, Gemv};
    use WeightMode::{W2, W4};
    let sim = odd();
    let lat = lattice(sim);
    let id = OutputStage::IDENTITY_I32;
    let ops = [
        op("w2 gemm 3x5 k=61", W2, Gemm, 3, 5, 61, lat, 0),
        op("w4 gemv 15 k=23", W4, Gemv, 1, 15, 23, lat, 0),
        op("w2 gemv 11 k=9", W2, Gemv, 1, 11, 9, id, 0),
        op("w4 gemm sat acc k=600", W4, Gemm, 3, 5, 600, id, 2),
        op("w2 gemv sat acc k=1000", W2, Gemv, 1, 15, 1000, id, 2),
        op("w4 gemm k=1000", W4, Gemm, 2, 4, 1000, stage(5, 30, 16), 0),
    ];
    let all = check(sim, &ops, 0x0dd5_0000_0000_0007);
    // N13: the 32-bit accumulator saturated (and the stage passed it through).
    assert!(
        all.contains(&i64::from(i32::MIN)),
        "no accumulator saturation"
    );
}

#[test]
fn tiny_engine_matches_golden_attention_products() {
    let sim = tiny();
    let mut rng = Rng(0xa77e_0000_0000_0011);
    let id = OutputStage::IDENTITY_I32;
    let mut prog = Program::default();
    add_fold_op(
        &mut prog,
        sim,
        &mut rng,
        "q.k kv4 e=45",
        false,
        16,
        45,
        id,
        0,
    );
    add_fold_op(
        &mut prog,
        sim,
        &mut rng,
        "q.k kv4 e=64 n=13",
        false,
        13,
        64,
        id,
        4,
    );
    add_fold_op(
        &mut prog,
        sim,
        &mut rng,
        "p.v window e=37",
        true,
        16,
        37,
        id,
        8,
    );
    add_fold_op(
        &mut prog,
        sim,
        &mut rng,
        "q.k kv4 sat8",
        false,
        16,
        33,
        stage(1, 6, 8),
        12,
    );
    // And a plain weight op afterwards: the fold state (Z) must not leak into it.
    let after = op(
        "w2 gemv after fold",
        WeightMode::W2,
        Dataflow::Gemv,
        1,
        16,
        40,
        lattice(sim),
        0,
    );
    add_op(&mut prog, sim, &mut rng, &after, 16);
    let all: Vec<i64> = prog.expect.iter().flatten().copied().collect();
    assert!(all.iter().filter(|&&v| v != 0).count() > all.len() / 2);
    run(sim, &prog, false, 1);
    run(sim, &prog, true, 777);
}
