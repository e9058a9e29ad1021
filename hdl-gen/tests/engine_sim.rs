//! Functional check of the generated engine: Verilator (`--binary`) runs a small Verilog
//! testbench that feeds command and data words from `$readmemh` files (with random stalls on
//! every stream) and writes every `dout` word; each output integer is compared with
//! `golden::ops::weight_op` on the same inputs. One Verilator build per config per test run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use tessera_golden::config::{EngineConfig, WeightMode};
use tessera_golden::engine::{Dataflow, StreamLayout, Word};
use tessera_golden::ops::OutputStage;
use tessera_hdl_gen::engine::generate;
use tessera_hdl_gen::testprog::{
    add_fold_op, add_op, lattice, odd_config, op, stage, Op, Program, Rng,
};

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

fn odd() -> &'static Sim {
    static SIM: OnceLock<Sim> = OnceLock::new();
    SIM.get_or_init(|| build(&odd_config()))
}

/// Builds one program of `ops` (each drained to its own output rows) and runs it twice: at full
/// rate, and with random stalls on cmd, din and dout.
fn check(sim: &Sim, ops: &[Op], seed: u64) -> Vec<i64> {
    let mut rng = Rng(seed);
    let rows = sim.cfg.array.rows;
    let mut prog = Program::default();
    for (i, o) in ops.iter().enumerate() {
        let out_addr = (rows * i as u32) % (sim.cfg.buffers.out_depth - rows + 1);
        add_op(&mut prog, &sim.cfg, &mut rng, o, out_addr);
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
    let lat = lattice(&sim.cfg);
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
    let lat = lattice(&sim.cfg);
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
        &sim.cfg,
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
        &sim.cfg,
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
        &sim.cfg,
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
        &sim.cfg,
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
        lattice(&sim.cfg),
        0,
    );
    add_op(&mut prog, &sim.cfg, &mut rng, &after, 16);
    let all: Vec<i64> = prog.expect.iter().flatten().copied().collect();
    assert!(all.iter().filter(|&&v| v != 0).count() > all.len() / 2);
    run(sim, &prog, false, 1);
    run(sim, &prog, true, 777);
}
