//! Projection consistency: bytes, bandwidth roofline, cycle bounds, both model shapes.

use tessera_boards::project::{
    kv_bytes, model_by_name, models, project, weight_bytes, Analytical, Assumptions, CycleEstimate,
    Op,
};
use tessera_boards::Board;
use tessera_golden::config::{EngineConfig, WeightMode};

fn assumptions(cfg: &EngineConfig) -> Assumptions {
    Assumptions {
        clock_mhz: cfg.clock.target_mhz,
        bw_efficiency: 0.8,
        context: 512,
        prompt: 512,
        linear_mode: WeightMode::W2,
        head_mode: WeightMode::W8,
    }
}

#[test]
fn llama2_7b_on_u280_is_consistent() {
    let cfg = EngineConfig::preset("u280").expect("u280");
    let board = Board::by_name("u280").expect("board");
    let m = model_by_name("llama2-7b").expect("model");
    let a = assumptions(&cfg);
    let p = project(&m, &board, &cfg, &a, &Analytical::new(&cfg));
    // Bandwidth: 460 GB/s x 0.8.
    assert!((p.bandwidth_gbs - 368.0).abs() < 1e-9);
    // Decode memory roofline = bandwidth / bytes per token.
    let bound = p.bandwidth_gbs * 1e9 / p.decode_bytes_per_token;
    assert!((p.decode_bandwidth_bound_tokens_s - bound).abs() < 1e-9);
    assert!(p.decode_tokens_s <= p.decode_bandwidth_bound_tokens_s + 1e-9);
    // Bytes per token: 32 layers of W2 weights with 24-bit metadata per group of 32
    // (2.75 bits per weight), the W8 head, and the KV4 cache: keys once, values twice (N22's
    // two probability planes run P x V twice).
    let per_layer_w = 4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0;
    let weights = 32.0 * per_layer_w * 2.75 / 8.0;
    let head = 4096.0 * 32000.0 * (8.0 + 24.0 / 32.0) / 8.0;
    let kv = 32.0 * 3.0 * 32.0 * kv_bytes(&cfg, 512, 128);
    let expect = weights + head + kv;
    assert!(
        (p.decode_bytes_per_token - expect).abs() / expect < 1e-12,
        "{} vs {expect}",
        p.decode_bytes_per_token
    );
    // About 6.7 G MACs per token.
    let macs: u64 = p.decode[..p.decode.len() - 1]
        .iter()
        .map(|r| r.op.macs())
        .sum::<u64>()
        * 32
        + p.decode.last().expect("head").op.macs();
    assert!((6.4e9..7.0e9).contains(&(macs as f64)), "{macs}");
    // Per op: time is the larger of engine and memory time; the total is their sum.
    let t: f64 = p.decode[..p.decode.len() - 1]
        .iter()
        .map(|r| r.time_s())
        .sum::<f64>()
        * 32.0
        + p.decode.last().expect("head").time_s();
    assert!((1.0 / t - p.decode_tokens_s).abs() < 1e-9);
    let text = p.report();
    assert!(text.starts_with("SIMULATED"));
    assert!(text.contains("assumptions:"));
    assert!(p.svg().contains("SIMULATED"));
}

#[test]
fn gemv_cycles_respect_the_stream_bound() {
    for name in EngineConfig::preset_names() {
        let cfg = EngineConfig::preset(name).expect("preset");
        let d = cfg.derive();
        let cm = Analytical::new(&cfg);
        for (mode, md) in cfg.modes().into_iter().zip(&d.modes) {
            let op = Op {
                name: "x".into(),
                mode,
                tokens: 1,
                k: 4096,
                n: 4096,
                count: 1,
                bytes: weight_bytes(&cfg, mode, 4096, 4096),
            };
            let bound = op.macs().div_ceil(md.gemv_macs_per_cycle);
            assert!(cm.cycles(&op) >= bound, "{name} {mode:?}");
            let gemm = Op { tokens: 512, ..op };
            let peak = gemm.macs().div_ceil(md.peak_macs_per_cycle);
            assert!(cm.cycles(&gemm) >= peak, "{name} {mode:?} GEMM");
        }
    }
}

#[test]
fn every_model_projects_on_every_board() {
    let cfg = EngineConfig::preset("small").expect("small");
    for b in Board::all().expect("boards") {
        for m in models() {
            let p = project(&m, &b, &cfg, &assumptions(&cfg), &Analytical::new(&cfg));
            assert!(p.decode_tokens_s > 0.0 && p.decode_tokens_s.is_finite());
            assert!(p.prefill_tokens_s > 0.0 && p.prefill_tokens_s.is_finite());
            // Llama-2-7B (2.5 GB at W2) does not fit in the PYNQ-Z2's 512 MB: the report says so.
            let warns = p.report().contains("WARNING: the model needs");
            assert_eq!(
                warns,
                b.name == "pynq-z2" && m.name == "llama2-7b",
                "{}",
                b.name
            );
        }
    }
    assert!(model_by_name("gpt5").is_err());
}

/// The analytical cycle counts that `tessera project` uses, checked against the cycle-accurate
/// model (`golden::cycle`, the model the co-simulation checks the RTL against cycle by cycle)
/// on small shapes: one GEMV pass and one GEMM tile per mode on tiny, the program built by
/// hdl-gen's `testprog` (SET_BASE, SET_OUT, LOAD_ACT of `k` entries, the loads, RUN, DRAIN).
/// For GEMV the analytical count leaves out the activation load (`k` din words: in decode the
/// activation vector is loaded once per layer, not per weight pass); GEMM counts it. Neither
/// counts the command hand-offs (SET_BASE, SET_OUT, the LOAD commands) and the driver's idle
/// tail, so `measured = analytical (+ k for GEMV) + overhead` with a small constant overhead.
#[test]
fn analytical_cycles_match_the_cycle_accurate_model_on_small_shapes() {
    use tessera_golden::cycle::run_program;
    use tessera_golden::engine::Dataflow;
    use tessera_hdl_gen::testprog::{add_op, lattice, op, Program, Rng};

    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let est = Analytical::new(&cfg);
    let (rows, cols) = (cfg.array.rows as usize, cfg.array.cols as usize);
    let l = cfg.quant.w_group_len as usize;
    let mut report = Vec::new();
    let mut overheads = Vec::new();
    for mode in [WeightMode::W2, WeightMode::W4, WeightMode::W8] {
        for (df, m, n, k) in [
            (Dataflow::Gemv, 1, rows * cols, l),
            (Dataflow::Gemv, 1, rows * cols, 4 * l),
            (Dataflow::Gemv, 1, rows * cols - 3, 3 * l),
            (Dataflow::Gemm, rows, cols, l),
            (Dataflow::Gemm, rows, cols, 4 * l),
            (Dataflow::Gemm, rows - 1, cols, 2 * l),
        ] {
            let mut p = Program::default();
            let o = op("x", mode, df, m, n, k, lattice(&cfg), 0);
            add_op(&mut p, &cfg, &mut Rng(7), &o, 0);
            let din: Vec<Vec<u8>> = p.din.iter().map(|w| w.0.clone()).collect();
            let r = run_program(&cfg, &p.cmds, &din, false, 1, 1_000_000).expect("runs");
            assert!(!r.err);
            let a = est.cycles(&Op {
                name: "x".into(),
                mode,
                tokens: m as u64,
                k: k as u64,
                n: n as u64,
                count: 1,
                bytes: 0.0,
            });
            let act = if df == Dataflow::Gemv { k as u64 } else { 0 };
            let overhead = r.cycles as i64 - (a + act) as i64;
            report.push(format!(
                "{mode:?} {df:?} m{m} n{n} k{k}: measured {} analytical {a} overhead {overhead}",
                r.cycles
            ));
            overheads.push(overhead);
        }
    }
    let text = report.join("\n");
    eprintln!("{text}");
    // Command hand-offs and the driver's 4 idle cycles at the end: a small constant.
    assert!(overheads.iter().all(|o| (0..=24).contains(o)), "{text}");
    let lo = overheads.iter().min().copied().unwrap_or(0);
    let hi = overheads.iter().max().copied().unwrap_or(0);
    assert!(hi - lo <= 4, "{text}");
}
