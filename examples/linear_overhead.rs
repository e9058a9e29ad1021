//! What a decode-step weight product costs around its kernel: `EngineLinear::forward_ws` (N5,
//! the GEMV, N14, N20) against `PreparedWeights::gemm_acc_in` alone, for SmolLM2-135M's W2 g32
//! shapes, hot (one tensor again and again), on a decode team of 2 threads (minimum over
//! calls). `cargo run --release --example linear_overhead`.
use std::sync::Arc;
use std::time::Instant;

use tessera::runtime::ops::{Backend, EngineLinear, Isa, LinearScratch};
use tessera_golden::numerics::Datapath;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::QuantWeights;
use tessera_kernels_cpu::Scratch;

fn main() {
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 64,
    };
    let mut s = 7u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    for &(n, k) in &[
        (576usize, 576usize),
        (960, 576),
        (3072, 576),
        (576, 1536),
        (49152, 576),
    ] {
        let format = if n == 49152 {
            WeightFormat::W8
        } else {
            WeightFormat::W2
        };
        let groups = k / 32;
        let max = u64::from(format.max_code()) + 1;
        let codes: Vec<u8> = (0..n * k).map(|_| (next() % max) as u8).collect();
        let zero: Vec<u8> = (0..n * groups).map(|_| (next() % max) as u8).collect();
        let gscale: Vec<u16> = (0..n * groups).map(|_| (next() % 32768) as u16).collect();
        let w = QuantWeights::from_codes(format, n, k, 32, 16, &codes, gscale, zero, vec![0.01; n])
            .expect("tensor");
        let mut lin = EngineLinear::new(Arc::new(w), dp).expect("linear");
        lin.set_backend(Backend::Cpu, Isa::selected());
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let xi: Vec<i8> = (0..k).map(|i| (i * 37 % 255) as u8 as i8).collect();
        let mut y = vec![0f32; n];
        let mut acc = vec![0i64; n];
        let mut ws = LinearScratch::default();
        let mut sc = Scratch::new();
        let pw = lin.prepared().clone();
        let team = ws.team.clone();
        let (mut full, mut kern, mut kern1) = (f64::MAX, f64::MAX, f64::MAX);
        pool1.install(|| {
            for _ in 0..400 {
                let t0 = Instant::now();
                pw.gemm_acc_in(None, Isa::selected(), &dp, &xi, 1, &mut sc, &mut acc)
                    .expect("gemv");
                kern1 = kern1.min(t0.elapsed().as_secs_f64());
            }
        });
        pool.install(|| {
            team.lead(2, || {
                for _ in 0..std::env::var("ITERS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(400)
                {
                    let t0 = Instant::now();
                    lin.forward_ws(&x, 1, &mut y, &mut ws);
                    full = full.min(t0.elapsed().as_secs_f64());
                    let t0 = Instant::now();
                    pw.gemm_acc_in(Some(&team), Isa::selected(), &dp, &xi, 1, &mut sc, &mut acc)
                        .expect("gemv");
                    kern = kern.min(t0.elapsed().as_secs_f64());
                }
            })
        });
        println!(
            "{format} {n}x{k}: 1 thread gemm_acc_in {:.2} us | 2 threads: forward_ws {:.2} us, gemm_acc_in {:.2} us, around the kernel {:.2} us",
            kern1 * 1e6,
            full * 1e6,
            kern * 1e6,
            (full - kern) * 1e6
        );
    }
}
