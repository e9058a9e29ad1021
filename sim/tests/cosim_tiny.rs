//! The tiny preset's suites through Verilator, checked every cycle against golden::cycle, and a
//! deliberately broken copy of the RTL that the checker must catch at the right cycle.

use std::sync::OnceLock;

use tessera_golden::config::EngineConfig;
use tessera_golden::cycle::{CycleInputs, CycleModel, CycleState, Driver};
use tessera_sim::check::{lockstep, Stimulus};
use tessera_sim::suites::{cases, run_suite, SUITES};
use tessera_sim::verilate::{Engine, Rtl};

fn tiny() -> &'static Engine {
    static L: OnceLock<Engine> = OnceLock::new();
    L.get_or_init(|| {
        let cfg = EngineConfig::preset("tiny").expect("tiny");
        Engine::build(&cfg, Rtl::Generated).expect("verilate tiny")
    })
}

#[test]
fn tiny_every_suite_passes_in_lock_step() {
    let eng = tiny();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut total_ops = 0;
    for s in SUITES {
        let r = run_suite(eng, s, 1, 48, Some(dir.path())).expect("suite runs");
        println!("{}", r.line());
        assert!(r.failure.is_none(), "{}", r.line());
        assert!(r.cycles > 0 && r.ops > 0, "{s} ran nothing");
        total_ops += r.ops;
    }
    assert!(total_ops >= 100);
}

/// Longer random run: `cargo test -p tessera-sim -- --ignored`.
/// The CI's long random run: 100,000 constrained-random short ops (the `short` suite: every
/// mode, dataflow, shape and output stage with `k <= 2 L`, every other program with stalls),
/// 0 mismatches.
#[test]
fn tiny_100000_random_ops_pass_in_lock_step() {
    let eng = tiny();
    let r = run_suite(eng, "short", 5, 100_000, None).expect("suite runs");
    println!("{}", r.line());
    assert!(r.failure.is_none(), "{}", r.line());
    assert!(r.ops >= 100_000, "only {} ops ran", r.ops);
}

/// Longer random run with the full range of k: `cargo test -p tessera-sim -- --ignored`.
#[test]
#[ignore = "long: 2000 random ops"]
fn tiny_random_long() {
    let r = run_suite(tiny(), "random", 7, 2000, None).expect("suite runs");
    println!("{}", r.line());
    assert!(r.failure.is_none(), "{}", r.line());
}

#[test]
fn broken_rtl_is_caught_at_the_first_wrong_cycle() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let rtl = tempfile::tempdir().expect("tempdir");
    let design = tessera_hdl_gen::engine::generate(&cfg).expect("generate");
    design.write(rtl.path()).expect("write");
    // Flip the accumulator's adder into a subtractor (N13's acc + gscale * G).
    let pe = rtl.path().join("tessera_pe.v");
    let text = std::fs::read_to_string(&pe).expect("pe");
    let broken = text.replacen("acc_q} + {{", "acc_q} - {{", 1);
    assert_ne!(text, broken, "the PE's accumulate was not found");
    std::fs::write(&pe, broken).expect("write broken");
    // The traced build only: the waveform is certain to be wanted (one verilation, not two).
    let eng = Engine::build_traced(&cfg, Rtl::Dir(rtl.path().to_path_buf()))
        .expect("verilate broken copy");

    let case = cases(&cfg, "modes", 1, 0).expect("cases").remove(0);
    let stim = Stimulus {
        cmds: case.prog.cmds.clone(),
        din: case.prog.din.iter().map(|w| w.0.clone()).collect(),
        stall: case.stall,
        stall_seed: case.stall_seed,
    };
    // The right cycle: the first at which the model has a non-zero accumulator (from 0, the
    // broken PE computes 0 - x instead of 0 + x there).
    let mut m = CycleModel::new(&cfg).expect("model");
    let mut d = Driver::new(
        stim.cmds.clone(),
        stim.din.clone(),
        8,
        stim.stall,
        stim.stall_seed,
    );
    let (mut inp, mut st) = (CycleInputs::default(), CycleState::default());
    let first = loop {
        m.state_into(&mut st);
        if st.acc.iter().any(|&a| a != 0) {
            break m.cycle();
        }
        assert!(!d.done(), "the program never accumulates");
        d.inputs(&mut inp);
        m.step(&inp);
        d.advance(&st, &inp);
    };
    let pe_idx = st.acc.iter().position(|&a| a != 0).expect("non-zero acc");
    let want = st.acc[pe_idx];

    let waves = tempfile::tempdir().expect("tempdir");
    let res = lockstep(&eng, &stim, 1, 1_000_000, Some(waves.path())).expect("runs");
    let mm = res.expect_err("the broken RTL must be reported");
    println!("{mm}");
    assert_eq!(mm.cycle, first, "{mm}");
    assert_eq!(
        mm.signal,
        format!("u_array.u_pe_r{}_c{}.acc_q", pe_idx / 4, pe_idx % 4),
        "{mm}"
    );
    assert_eq!(mm.expected, want.to_string());
    assert_eq!(mm.actual, (-want).to_string());
    assert!(mm.cmd.contains("Run"), "executing {}", mm.cmd);
    let wave = mm.wave.expect("waveform written");
    let vcd = std::fs::read_to_string(&wave).expect("vcd");
    assert!(
        vcd.contains("$enddefinitions") && vcd.contains("acc_q"),
        "not a VCD of the engine"
    );
    assert!(
        vcd.lines().filter(|l| l.starts_with('#')).count() > 10,
        "VCD has too few steps"
    );
}

/// Every suite on two odd configs (3 x 5 without W8 / ternary, 32-bit streams; and 5 x 3 with
/// groups of 16): `cargo test -p tessera-sim -- --ignored` (two more verilations).
#[test]
#[ignore = "long: two more verilations"]
fn odd_configs_every_suite_passes() {
    let odd = tessera_hdl_gen::testprog::odd_config();
    let mut odd2 = EngineConfig::preset("tiny").expect("tiny");
    odd2.name = "odd5x3".into();
    odd2.array.rows = 5;
    odd2.array.cols = 3;
    odd2.quant.w_group_len = 16;
    odd2.validate().expect("valid");
    for cfg in [odd, odd2] {
        let eng = Engine::build(&cfg, Rtl::Generated).expect("verilate");
        for s in SUITES {
            let r = run_suite(&eng, s, 3, 200, None).expect("suite runs");
            println!("{} {}", cfg.name, r.line());
            assert!(r.failure.is_none(), "{}: {}", cfg.name, r.line());
        }
    }
}
