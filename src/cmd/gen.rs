//! `tessera gen`: generate the engine's Verilog from a config (hdl-gen), optionally with a
//! yosys `synth_xilinx` resource report.

use std::path::PathBuf;
use std::time::Instant;

use tessera_hdl_gen::engine::{generate, GenError};
use tessera_hdl_gen::{yosys_synth, Family, SynthOptions};

use super::{ConfigSource, Failure};

#[derive(Debug, clap::Args)]
pub struct GenArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Output directory for `<module>.v` files and `tessera_engine.f` (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Also run yosys `synth_xilinx -family xcup` (hierarchical: each module once, totals by
    /// instance count) and print LUT/FF/DSP/BRAM/URAM counts.
    #[arg(long)]
    pub report: bool,
    /// Board target (u280, u55c, zcu102, kv260, pynq-z2): also write the AXI top, XDC,
    /// Vivado Tcl, register map and README (see `tessera-boards`).
    #[arg(long, value_name = "NAME")]
    pub board: Option<String>,
}

pub fn run(args: GenArgs) -> Result<(), Failure> {
    let cfg = args.source.load_valid()?;
    if let Some(board) = &args.board {
        return super::board::gen(&cfg, board, &args.out, args.report);
    }
    let d = cfg.derive();
    let t0 = Instant::now();
    let design = generate(&cfg).map_err(|e| match e {
        GenError::Config(lines) => Failure { lines },
        GenError::Hdl(e) => Failure::one(format!("hdl-gen: {e}")),
    })?;
    let written = design
        .write(&args.out)
        .map_err(|e| Failure::one(format!("{e}")))?;
    let elapsed = t0.elapsed();
    let mut lines = 0usize;
    for f in &written.files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure::one(format!("{}: {e}", f.display())))?;
        lines += text.lines().count();
    }
    println!(
        "{} {} ({}): {} files, {lines} lines of Verilog in {} ms -> {}",
        cfg.name,
        d.config_string,
        d.config_hash,
        written.files.len(),
        elapsed.as_millis(),
        written.filelist.display()
    );
    for m in &d.modes {
        println!(
            "  {:<8} peak {} MAC/cycle (GEMM), {} MAC/cycle (GEMV, stream-bound)",
            m.mode, m.peak_macs_per_cycle, m.gemv_macs_per_cycle
        );
    }
    if args.report {
        let opts = SynthOptions::hierarchical(Family::UltraScalePlus);
        let t1 = Instant::now();
        let s = yosys_synth(&written, &opts)
            .map_err(|e| Failure::one(format!("synthesis report: {e}")))?;
        println!(
            "  {} in {} s: LUT {} FF {} DSP {} BRAM {} URAM {} LUTRAM {} CARRY {}",
            opts.describe(),
            t1.elapsed().as_secs(),
            s.luts(),
            s.ffs(),
            s.dsps(),
            s.brams(),
            s.urams(),
            s.lutrams(),
            s.carries()
        );
    }
    Ok(())
}
