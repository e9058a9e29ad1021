//! The AXI top: verilator -Wall clean for every preset, yosys synthesis of the tiny config.

use tessera_boards::wrapper::{board_design, TOP};
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::{verilator_lint, yosys_synth, Family, SynthOptions};

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

#[test]
fn axi_top_synthesizes_tiny_for_both_families() {
    let cfg = EngineConfig::preset("tiny").expect("preset");
    let d = board_design(&cfg).expect("generate");
    let dir = tempfile::tempdir().expect("tmp");
    let w = d.write(dir.path()).expect("write");
    for family in [Family::UltraScalePlus, Family::Series7] {
        let opts = SynthOptions {
            family,
            ..SynthOptions::default()
        };
        let s = yosys_synth(&w, &opts).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{family:?}: LUT {} FF {} DSP {} BRAM {} CARRY {}",
            s.luts(),
            s.ffs(),
            s.dsps(),
            s.brams(),
            s.carries()
        );
        assert!(s.dsps() >= 16, "{family:?}: at least one DSP per PE");
        assert!(s.luts() > 0 && s.ffs() > 0);
    }
}
