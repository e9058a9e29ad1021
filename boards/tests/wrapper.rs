//! The AXI top: verilator -Wall clean for the tiny and small presets (yosys synthesis per
//! family: tests/boards_cli.rs at the workspace root).

use tessera_boards::wrapper::{board_design, TOP};
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::verilator_lint;

fn lint_preset(name: &str) {
    let cfg = EngineConfig::preset(name).expect("preset");
    let d = board_design(&cfg).expect("generate");
    assert_eq!(d.top(), TOP);
    let dir = tempfile::tempdir().expect("tmp");
    let w = d.write(dir.path()).expect("write");
    let r = verilator_lint(&w).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.is_clean(), "{name}: {}", r.raw);
}

#[test]
fn axi_top_lint_clean_tiny() {
    lint_preset("tiny");
}

#[test]
fn axi_top_lint_clean_small() {
    lint_preset("small");
}
