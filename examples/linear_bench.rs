//! Prefill weight-product timing on SmolLM2-135M's shapes (W2, group 32, 16-bit scales, acc 48,
//! 128 tokens): the kernel alone (`PreparedWeights::gemm_acc`) against the whole CPU-backend
//! product (`Linear::forward_ws`: N5, the kernel, N14, N20) and N5 alone, each the minimum over
//! interleaved samples on a rayon pool of `threads` threads. `kernel` is the AVX2 quad GEMM,
//! `vnni` the AVX-512 VNNI one (where the CPU has it), `folded` the folded AVX2 GEMM;
//! `product` runs on `Isa::best()`.
//!
//! `cargo run --release --example linear_bench -- [threads] [samples]` (env `M`: tokens, default
//! 128)
use std::time::Instant;

use tessera::runtime::ops::{Backend, Isa, Linear, LinearScratch};
use tessera_golden::numerics::Datapath;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::QuantWeights;
use tessera_kernels_cpu::Scratch;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let samples: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 64,
    };
    let mut s = 7u64;
    let mut r = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 33
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let m: usize = std::env::var("M")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    println!("threads {threads}, m {m}, min of {samples} interleaved samples (ms per call)");
    println!(
        "{:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "n x k",
        "kernel",
        "vnni",
        "folded",
        "product",
        "N5",
        "N5 simd",
        "ratio",
        "fold/k",
        "k/vnni"
    );
    let vnni = Isa::Avx512Vnni.is_available();
    for (n, k) in [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)] {
        let codes: Vec<u8> = (0..n * k).map(|_| (r() % 4) as u8).collect();
        let groups = k / 32;
        let gs: Vec<u16> = (0..n * groups).map(|_| (r() % 32768) as u16).collect();
        let zero: Vec<u8> = (0..n * groups).map(|_| (r() % 256) as u8).collect();
        let rs: Vec<f32> = (0..n).map(|_| 1e-3 * (1 + r() % 100) as f32).collect();
        let qw = QuantWeights::from_codes(WeightFormat::W2, n, k, 32, 16, &codes, gs, zero, rs)
            .expect("weights");
        let mut lin = Linear::Engine(
            tessera::runtime::ops::EngineLinear::new(std::sync::Arc::new(qw), dp).expect("w"),
        );
        lin.set_backend(Backend::Cpu, Isa::best());
        let pw = lin.engine().expect("engine").prepared().clone();
        let x: Vec<f32> = (0..m * k)
            .map(|_| (r() % 20001) as f32 / 1000.0 - 10.0)
            .collect();
        let xi: Vec<i8> = (0..m * k).map(|_| (r() % 255) as i8).collect();
        let mut y = vec![0f32; m * n];
        let mut ws = LinearScratch::default();
        let mut ks = Scratch::for_weights(&pw, m);
        let mut acc = vec![0i64; m * n];
        let mut codes8 = vec![0i8; k];
        let (mut tk, mut tv, mut tp, mut tq, mut tq2, mut tf) = (
            f64::INFINITY,
            f64::INFINITY,
            f64::INFINITY,
            f64::INFINITY,
            f64::INFINITY,
            f64::INFINITY,
        );
        pool.install(|| {
            for _ in 0..samples {
                let t0 = Instant::now();
                pw.gemm_acc(Isa::Avx2, &dp, &xi, m, &mut ks, &mut acc)
                    .expect("gemm");
                tk = tk.min(t0.elapsed().as_secs_f64());
                if vnni {
                    let t0 = Instant::now();
                    pw.gemm_acc(Isa::Avx512Vnni, &dp, &xi, m, &mut ks, &mut acc)
                        .expect("gemm");
                    tv = tv.min(t0.elapsed().as_secs_f64());
                }
                tessera_kernels_cpu::set_gemm_quad(false);
                let t0 = Instant::now();
                pw.gemm_acc(Isa::Avx2, &dp, &xi, m, &mut ks, &mut acc)
                    .expect("gemm");
                tf = tf.min(t0.elapsed().as_secs_f64());
                tessera_kernels_cpu::set_gemm_quad(true);
                let t0 = Instant::now();
                lin.forward_ws(&x, m, &mut y, &mut ws);
                tp = tp.min(t0.elapsed().as_secs_f64());
                let t0 = Instant::now();
                for t in 0..m {
                    tessera::runtime::ops::quantize_token_into(&x[t * k..(t + 1) * k], &mut codes8);
                }
                tq = tq.min(t0.elapsed().as_secs_f64());
                let t0 = Instant::now();
                for t in 0..m {
                    let _ = tessera_kernels_cpu::quantize_token_isa(
                        Isa::Avx2,
                        &x[t * k..(t + 1) * k],
                        &mut codes8,
                    );
                }
                tq2 = tq2.min(t0.elapsed().as_secs_f64());
            }
        });
        println!(
            "{:>12} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7.2} {:>7.2} {:>7.2}",
            format!("{n}x{k}"),
            tk * 1e3,
            tv * 1e3,
            tf * 1e3,
            tp * 1e3,
            tq * 1e3,
            tq2 * 1e3,
            tp / tk,
            tf / tk,
            tk / tv
        );
    }
}
