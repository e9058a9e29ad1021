//! Runs the KV products in a loop (for profilers): `cargo run --release -p tessera-kernels-cpu
//! --example kv_loop -- [tokens] [seconds] [isa]`.

use std::time::{Duration, Instant};

use tessera_golden::kv::KvCache;
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::OutputStage;
use tessera_kernels_cpu::{Isa, KvHeadCpu, KvScratch};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tokens: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let isa = args
        .get(3)
        .and_then(|s| Isa::parse(s))
        .unwrap_or_else(Isa::best);
    let d = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 32,
    };
    let hd = 64;
    let mut cache = KvCache::new(&d, hd).expect("cache");
    for t in 0..tokens {
        let k: Vec<f32> = (0..hd)
            .map(|c| ((t * 31 + c * 7) % 97) as f32 / 50.0 - 1.0)
            .collect();
        let v: Vec<f32> = (0..hd)
            .map(|c| ((t * 17 + c * 5) % 89) as f32 / 40.0 - 1.0)
            .collect();
        cache.push(&k, &v).expect("push");
    }
    let mut kv = KvHeadCpu::new(&d, hd);
    kv.sync(&cache).expect("sync");
    let q: Vec<i8> = (0..hd).map(|c| (c * 37) as i8).collect();
    let p: Vec<i8> = (0..tokens).map(|t| (t % 100) as i8).collect();
    let st = OutputStage::IDENTITY_I32;
    let mut sc = KvScratch::default();
    let (mut acc, mut y) = (vec![0i64; tokens], vec![0i32; tokens]);
    let (mut a4, mut aw, mut y4, mut yw) = (
        vec![0i64; hd],
        vec![0i64; hd],
        vec![0i32; hd],
        vec![0i32; hd],
    );
    let t0 = Instant::now();
    let mut calls = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        kv.qk(isa, &q, &st, &mut sc, &mut acc, &mut y).expect("qk");
        kv.pv(isa, &p, &st, &mut sc, &mut a4, &mut aw, &mut y4, &mut yw)
            .expect("pv");
        calls += 1;
    }
    let dt = t0.elapsed().as_secs_f64() / calls as f64;
    println!(
        "{tokens} tokens, hd {hd}, {isa}: {:.1} us per qk + pv (wall)",
        dt * 1e6
    );
}
