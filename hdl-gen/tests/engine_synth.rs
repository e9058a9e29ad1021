//! yosys `synth_xilinx -family xcup` completes on the generated engine: tiny and an odd 3 x 5
//! config flat (each about 1-1.5 minutes on 2 cores; they run in parallel). The big presets are
//! synthesised hierarchically (each module once, totals by instance count; the flat run of
//! small did not finish in 50 minutes) and `#[ignore]`d: run them with
//! `cargo test --release -p tessera-hdl-gen --test engine_synth -- --ignored`.

mod common;

use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::engine::generate;
use tessera_hdl_gen::{yosys_synth, Family, SynthOptions, SynthStats};

fn synth_with(cfg: &EngineConfig, opts: &SynthOptions) -> SynthStats {
    let d = generate(cfg).expect("generate");
    let (_dir, w) = common::write(&d);
    let s = yosys_synth(&w, opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{} ({}): LUT {} FF {} DSP {} BRAM {} URAM {} LUTRAM {}",
        cfg.name,
        opts.describe(),
        s.luts(),
        s.ffs(),
        s.dsps(),
        s.brams(),
        s.urams(),
        s.lutrams()
    );
    s
}

fn synth(cfg: &EngineConfig) -> SynthStats {
    synth_with(cfg, &SynthOptions::default())
}

fn synth_hier(cfg: &EngineConfig) -> SynthStats {
    synth_with(cfg, &SynthOptions::hierarchical(Family::UltraScalePlus))
}

fn odd_config() -> EngineConfig {
    let mut cfg = EngineConfig {
        name: "odd3x5".into(),
        ..EngineConfig::default()
    };
    cfg.array.rows = 3;
    cfg.array.cols = 5;
    cfg.precision.weight_bits = vec![2, 4];
    cfg.quant.w_group_len = 8;
    cfg.quant.w_scale_bits = 8;
    cfg.datapath.acc_bits = 32;
    cfg.buffers.act_depth = 64;
    cfg.buffers.wgt_depth = 64;
    cfg.buffers.out_depth = 6;
    cfg.interface.stream_bits = 32;
    cfg.validate().expect("valid");
    cfg
}

#[test]
fn tiny_synthesizes_with_one_dsp_per_pe() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let s = synth(&cfg);
    let pes = u64::from(cfg.array.rows * cfg.array.cols);
    // One DSP48E2 per PE (the time-shared group multiplier) plus the output stages' multipliers.
    assert!(s.dsps() >= pes, "{s:?}");
    assert!(s.luts() > 0 && s.ffs() > 0);
}

#[test]
fn odd_config_synthesizes() {
    let s = synth(&odd_config());
    assert!(s.dsps() >= 15, "{s:?}");
}

#[test]
#[ignore = "minutes of yosys; run with --ignored"]
fn small_synthesizes() {
    let cfg = EngineConfig::preset("small").expect("small");
    let s = synth_hier(&cfg);
    assert!(
        s.dsps() >= u64::from(cfg.array.rows * cfg.array.cols),
        "{s:?}"
    );
}

#[test]
#[ignore = "many minutes of yosys; run with --ignored"]
fn u280_synthesizes() {
    let cfg = EngineConfig::preset("u280").expect("u280");
    let s = synth_hier(&cfg);
    assert!(
        s.dsps() >= u64::from(cfg.array.rows * cfg.array.cols),
        "{s:?}"
    );
}
