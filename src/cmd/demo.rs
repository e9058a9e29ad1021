//! `tessera demo`: the main job on embedded defaults (README's first command).
//!
//! Today it (1) validates and derives every built-in preset, (2) runs W2/W4/W8/ternary x A8
//! GEMMs through the golden engine and checks them against float references, and (3) runs one
//! KV4 attention step (`Q x K^T`, host softmax, `P x V`) against float attention. Every check has
//! a bound from docs/numerics.md section 7; a violated bound fails the command (exit 2), so the
//! demo is also a smoke test. Later issues add generation, co-simulation and CPU inference.

use tessera_golden::config::EngineConfig;
use tessera_golden::kv::{attention_ref_f64, quantize_probs, softmax_f64, KvCache};
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::{
    dequantize_weight_op, matmul_ref_f64, weight_acc, weight_op, OutputStage,
};
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{quantize_tokens, quantize_weights};

use tessera::runtime::sampler::SplitMix64;

use super::Failure;

/// Arguments of `tessera demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The preset whose datapath runs the golden demos.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Seed of the demo's pseudo-random data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Skip the CPU inference step (the only step that needs the fetched model).
    #[arg(long)]
    pub skip_llm: bool,
    /// Skip generating and co-simulating the Verilog (the steps that need Verilator).
    #[arg(long)]
    pub skip_hw: bool,
    /// Where the generated Verilog goes (a folder named after the config string and hash).
    #[arg(long, value_name = "DIR", default_value = "build")]
    pub build_dir: std::path::PathBuf,
}

/// Demo data from the runtime's seeded SplitMix64 (one PRNG in the project).
#[derive(Debug)]
struct DemoRng(SplitMix64);

impl DemoRng {
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        #[allow(clippy::cast_possible_truncation)] // demo data only needs f32
        let v = (self.0.next_f64() * 2.0 - 1.0) as f32;
        v
    }

    fn vec(&mut self, len: usize, amp: f32) -> Vec<f32> {
        (0..len).map(|_| self.unit() * amp).collect()
    }
}

pub fn run(args: DemoArgs) -> Result<(), Failure> {
    println!("tessera demo: embedded defaults (built-in presets, no config file read)");
    println!("[1/6] built-in presets");
    for name in EngineConfig::preset_names() {
        let cfg = EngineConfig::preset(name).map_err(Failure::one)?;
        let derived = cfg.checked_derive().map_err(|errs| Failure {
            lines: errs
                .iter()
                .map(|e| format!("<preset {name}>: {e}"))
                .collect(),
        })?;
        let w2 = derived
            .modes
            .iter()
            .find(|m| m.mode == "w2")
            .map_or(0, |m| m.peak_macs_per_cycle);
        println!(
            "  ok {name:<6} {:<24} {}  {} PEs, W2 peak {w2} MAC/cycle at {} MHz",
            derived.config_string, derived.config_hash, derived.pe_count, cfg.clock.target_mhz
        );
    }

    let cfg = EngineConfig::preset(&args.preset).map_err(Failure::one)?;
    cfg.validate().map_err(|errs| Failure {
        lines: errs.iter().map(ToString::to_string).collect(),
    })?;
    let dp = cfg.datapath();
    hardware_demo(&args)?;
    let mut rng = DemoRng(SplitMix64::new(args.seed));
    gemm_demo(&dp, &cfg, &mut rng)?;
    attention_demo(&dp, &mut rng)?;
    inference_demo(args.skip_llm)?;
    println!("demo: all checks passed");
    Ok(())
}

fn gemm_demo(dp: &Datapath, cfg: &EngineConfig, rng: &mut DemoRng) -> Result<(), Failure> {
    // Odd sizes on purpose: k is not a multiple of the group length.
    let (m_tokens, k, n_rows) = (4usize, 3 * dp.w_group_len + 5, 24usize);
    println!(
        "[4/6] GEMM on the golden engine ({}: group {}, {}-bit scales, {}-bit acc): M={m_tokens} K={k} N={n_rows}",
        cfg.name, dp.w_group_len, dp.w_scale_bits, dp.acc_bits
    );
    println!("  mode     max|y - float(dequantized)|  (bound)     rel. error vs original floats");
    let x = rng.vec(m_tokens * k, 2.0);
    let w = rng.vec(n_rows * k, 0.05);
    let acts = quantize_tokens(&x, m_tokens, k).map_err(Failure::one)?;
    let exact = matmul_ref_f64(&x, m_tokens, &w, n_rows, k);
    let stage = OutputStage::weight_lattice_i32(dp.scale_frac_bits());
    for fmt in [
        WeightFormat::W2,
        WeightFormat::Ternary,
        WeightFormat::W4,
        WeightFormat::W8,
    ] {
        let qw = quantize_weights(&w, n_rows, k, fmt, dp).map_err(Failure::one)?;
        let y = weight_op(dp, &acts.codes_i8, m_tokens, &qw, &stage).map_err(Failure::one)?;
        let acc = weight_acc(dp, &acts.codes_i8, m_tokens, &qw).map_err(Failure::one)?;
        let unsaturated = acc
            .iter()
            .flatten()
            .zip(y.iter().flatten())
            .all(|(&a, &v)| tessera_golden::numerics::round_shift(a, dp.scale_frac_bits()) == v);
        if !unsaturated {
            return Err(Failure::one(format!(
                "demo {fmt:?}: the lattice output stage saturated (N14; k = {k})"
            )));
        }
        let y_f32 = dequantize_weight_op(&y, &stage, &acts.scale_x, &qw);
        // Float reference on the dequantized operands, with the group scales the engine rounds
        // (N9) kept exact: the bound of docs/numerics.md section 7.
        let x_deq: Vec<f32> = acts
            .codes_i8
            .iter()
            .enumerate()
            .map(|(i, &c)| f32::from(c) * acts.scale_x[i / k])
            .collect();
        let deq = matmul_ref_f64(
            &x_deq,
            m_tokens,
            &qw.dequantize_with_group_scales(),
            n_rows,
            k,
        );
        let (mut worst, mut worst_bound) = (0f64, 0f64);
        let (mut err2, mut ref2) = (0f64, 0f64);
        for t in 0..m_tokens {
            for n in 0..n_rows {
                let got = f64::from(y_f32[t][n]);
                let diff = (got - deq[t][n]).abs();
                let bound = bound_n13(
                    dp,
                    &qw,
                    &acts.codes_i8[t * k..(t + 1) * k],
                    acts.scale_x[t],
                    n,
                ) + 1e-5 * deq[t][n].abs().max(1.0);
                if diff > bound {
                    return Err(Failure::one(format!(
                        "demo {fmt:?}: y[{t}][{n}] = {got} differs from the float reference {} by {diff} > bound {bound} (docs/numerics.md section 7)",
                        deq[t][n]
                    )));
                }
                if diff > worst {
                    worst = diff;
                    worst_bound = bound;
                }
                err2 += (got - exact[t][n]).powi(2);
                ref2 += exact[t][n].powi(2);
            }
        }
        println!(
            "  {:<8} {worst:>12.3e}                ({worst_bound:.1e})   {:>6.2}%",
            format!("{fmt:?}"),
            100.0 * (err2 / ref2).sqrt()
        );
    }
    Ok(())
}

/// Section 7's bound for one output: `scale_x * row_scale * 2^-(SF+1) * sum_g |G_g| * 2^-(8-B)`,
/// plus the lattice output stage's rounding.
fn bound_n13(
    dp: &Datapath,
    qw: &tessera_golden::quant::QuantWeights,
    x_row: &[i8],
    scale_x: f32,
    n: usize,
) -> f64 {
    let sums = tessera_golden::ops::group_partial_sums(
        qw,
        n,
        &qw.codes()[n * qw.k()..(n + 1) * qw.k()],
        x_row,
    );
    #[allow(clippy::cast_precision_loss)]
    let g_abs: f64 = sums.iter().map(|s| s.g_i64.abs() as f64).sum();
    let sf = i32::try_from(dp.scale_frac_bits()).expect("SF is small");
    let lattice = i32::try_from(qw.format().lattice_shift()).expect("shift is small");
    // Plus the output stage's rounding of `acc >> SF`: half a lattice unit (N14).
    f64::from(scale_x)
        * f64::from(qw.row_scale()[n])
        * 2f64.powi(-lattice)
        * (2f64.powi(-(sf + 1)) * g_abs + 0.5)
}

fn attention_demo(dp: &Datapath, rng: &mut DemoRng) -> Result<(), Failure> {
    let head_dim = 64usize;
    let tokens = 2 * dp.kv_recent_window + dp.kv_group_len + 7;
    let mut cache = KvCache::new(dp, head_dim).map_err(Failure::one)?;
    let mut keys = Vec::with_capacity(tokens);
    let mut values = Vec::with_capacity(tokens);
    for t in 0..tokens {
        // Keys with a per-channel offset (the outlier channels KIVI quantizes per channel).
        #[allow(clippy::cast_precision_loss)]
        let k: Vec<f32> = (0..head_dim)
            .map(|c| rng.unit() + if c % 16 == 3 { 4.0 } else { 0.0 } + 0.001 * t as f32)
            .collect();
        let v = rng.vec(head_dim, 1.0);
        cache.push(&k, &v).map_err(Failure::one)?;
        keys.push(k);
        values.push(v);
    }
    let mem = cache.memory_bytes();
    println!(
        "[5/6] KV4 attention, one head: head_dim {head_dim}, {tokens} tokens ({} at 4 bits, {} in the 8-bit window), KV memory {mem} bytes (f16: {} bytes, {:.2}x smaller)",
        cache.n4_tokens(),
        cache.window_tokens(),
        tokens * head_dim * 2 * 2,
        (tokens * head_dim * 4) as f64 / mem as f64
    );
    let q = rng.vec(head_dim, 1.0);
    let q_codes = quantize_tokens(&q, 1, head_dim).map_err(Failure::one)?;
    let stage = OutputStage::IDENTITY_I32;
    let qk = cache.qk(&q_codes.codes_i8, &stage).map_err(Failure::one)?;
    #[allow(clippy::cast_precision_loss)]
    let inv_sqrt_d = 1.0 / (head_dim as f64).sqrt();
    let scores: Vec<f64> = qk
        .scores_f32(&stage, q_codes.scale_x[0])
        .iter()
        .map(|&s| f64::from(s) * inv_sqrt_d)
        .collect();
    #[allow(clippy::cast_possible_truncation)] // the host's probabilities are f32
    let p: Vec<f32> = softmax_f64(&scores).iter().map(|&v| v as f32).collect();
    let probs = quantize_probs(&p).map_err(Failure::one)?;
    let out = cache
        .pv_probs(&probs, &stage)
        .map_err(Failure::one)?
        .output_f32(&stage, probs.scale_p);
    let (_, reference) = attention_ref_f64(&q, &keys, &values);
    let (mut err2, mut ref2) = (0f64, 0f64);
    for (o, r) in out.iter().zip(&reference) {
        err2 += (f64::from(*o) - r).powi(2);
        ref2 += r.powi(2);
    }
    let rel = (err2 / ref2.max(1e-30)).sqrt();
    println!(
        "  attention output vs float attention on the original K/V: {:.2}% relative error",
        100.0 * rel
    );
    // A loose sanity bound: a broken cache gives errors of order 100%.
    if rel > 0.25 {
        return Err(Failure::one(format!(
            "demo attention: relative error {rel:.3} > 0.25 against float attention"
        )));
    }
    Ok(())
}

/// Step 4: SmolLM2-135M answers a chat prompt on the CPU (f32 reference path of the runtime).
fn inference_demo(skip: bool) -> Result<(), Failure> {
    if skip {
        println!("[6/6] CPU inference: skipped (--skip-llm)");
        return Ok(());
    }
    let model = tessera::runtime::cli::resolve_model(None).map_err(Failure::one)?;
    println!(
        "[6/6] CPU inference: {} (f32 reference), greedy chat answer",
        model.display()
    );
    let args = tessera::runtime::cli::RunArgs {
        model: Some(model),
        prompt: "What is the capital of France? Answer in one sentence.".to_string(),
        chat: true,
        n_predict: 24,
        seed: 0,
        temp: 0.0,
        top_p: 0.95,
    };
    tessera::runtime::cli::run(&args).map_err(Failure::one)?;
    println!();
    Ok(())
}

/// Steps 2 and 3: generate the preset's Verilog, then co-simulate it in Verilator against the
/// golden cycle model, every cycle, on every suite.
fn hardware_demo(args: &DemoArgs) -> Result<(), Failure> {
    if args.skip_hw {
        println!("[2/6] generate Verilog: skipped (--skip-hw)");
        println!("[3/6] co-simulate: skipped (--skip-hw)");
        return Ok(());
    }
    let source = super::ConfigSource {
        config: None,
        preset: Some(args.preset.clone()),
    };
    let cfg = source.load_valid()?;
    let out = args
        .build_dir
        .join(
            cfg.checked_derive()
                .map_err(|errs| Failure {
                    lines: errs.iter().map(ToString::to_string).collect(),
                })?
                .build_dir_name,
        )
        .join("rtl");
    println!(
        "[2/6] generate Verilog ({}) into {}",
        args.preset,
        out.display()
    );
    super::gen::run(super::gen::GenArgs {
        source: source.clone(),
        out,
        report: false,
        board: None,
    })?;
    println!("[3/6] co-simulate in Verilator against the golden cycle model, every cycle");
    super::cosim::run(super::cosim::CosimArgs {
        source,
        suite: "all".to_string(),
        seed: args.seed,
        ops: 200,
        junit: None,
        json: false,
        rtl: None,
        waves: None,
    })
}
