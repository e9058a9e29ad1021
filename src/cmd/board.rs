//! `tessera gen --board NAME`: the board top (engine + AXI wrapper), XDC, Vivado Tcl, register
//! map and README in one folder (tessera-boards). Called from `gen.rs` when `--board` is given.

use std::path::Path;
use std::time::Instant;

use tessera_boards::vivado::write_board_output;
use tessera_boards::Board;
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::{yosys_synth, SynthOptions};

use super::Failure;

/// Writes everything for `board` into `out`; `report` also runs yosys for the board's family.
pub fn gen(cfg: &EngineConfig, board: &str, out: &Path, report: bool) -> Result<(), Failure> {
    let b = Board::by_name(board).map_err(Failure::one)?;
    let d = cfg.derive();
    let t0 = Instant::now();
    let o = write_board_output(&b, cfg, out).map_err(Failure::one)?;
    println!(
        "{} {} ({}) for {} ({}): {} Verilog files + {} board files in {} ms -> {}",
        cfg.name,
        d.config_string,
        d.config_hash,
        b.name,
        b.part,
        o.design.files.len(),
        o.extra.len(),
        t0.elapsed().as_millis(),
        out.display()
    );
    println!(
        "  build: cd {} && vivado -mode batch -source build.tcl",
        out.display()
    );
    if report {
        let opts = SynthOptions::hierarchical(b.yosys_family());
        let t1 = Instant::now();
        let s = yosys_synth(&o.design, &opts)
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
