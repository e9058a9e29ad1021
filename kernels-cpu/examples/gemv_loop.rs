//! Runs one GEMV in a loop (for profilers): `cargo run --release -p tessera-kernels-cpu
//! --example gemv_loop -- [w2|w4|w8|ternary] [n] [k] [seconds] [isa]`.

use std::time::{Duration, Instant};

use tessera_golden::numerics::Datapath;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{QuantWeights, TERNARY_ZERO_U8};
use tessera_kernels_cpu::{Isa, PreparedWeights, Scratch};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let format = match args.get(1).map(String::as_str) {
        Some("w4") => WeightFormat::W4,
        Some("w8") => WeightFormat::W8,
        Some("ternary") => WeightFormat::Ternary,
        _ => WeightFormat::W2,
    };
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let k: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(576);
    let secs: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let isa = args
        .get(5)
        .and_then(|s| Isa::parse(s))
        .unwrap_or_else(Isa::best);
    let l = 32;
    let groups = k.div_ceil(l);
    let max = u32::from(format.max_code()) + 1;
    let codes: Vec<u8> = (0..n * k)
        .map(|i| ((i * 7 + i / 3) as u32 % max) as u8)
        .collect();
    let zero = if format == WeightFormat::Ternary {
        vec![TERNARY_ZERO_U8; n * groups]
    } else {
        (0..n * groups).map(|i| (i * 13) as u8).collect()
    };
    let gscale: Vec<u16> = (0..n * groups).map(|i| (i * 977 % 32768) as u16).collect();
    let w = QuantWeights::from_codes(format, n, k, l, 16, &codes, gscale, zero, vec![1.0; n])
        .expect("tensor");
    let p = PreparedWeights::from(&w);
    let d = Datapath {
        w_group_len: l,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 32,
    };
    let x: Vec<i8> = (0..k).map(|i| (i * 37) as i8).collect();
    let mut s = Scratch::for_weights(&p, 1);
    let mut acc = vec![0i64; n];
    let t0 = Instant::now();
    let mut calls = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        p.gemm_acc(isa, &d, &x, 1, &mut s, &mut acc).expect("gemv");
        calls += 1;
    }
    let dt = t0.elapsed().as_secs_f64() / calls as f64;
    println!(
        "{format} {n}x{k} {isa}: {:.1} us/call, {:.1} GOP/s (wall, {} threads)",
        dt * 1e6,
        2.0 * (n * k) as f64 / dt / 1e9,
        rayon::current_num_threads()
    );
}
