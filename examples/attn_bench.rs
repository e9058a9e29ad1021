//! Attention-only timing of one model's worth of layers (30 layers, 9 / 3 heads, hd 64, KV4,
//! SmolLM2-135M's shapes, random keys and values) on the CPU backend: the batched prefill of 128
//! positions, then 64 decode steps (lengths 129..192), on a rayon pool of 2 threads.
//!
//! `cargo run --release --example attn_bench -- [serial|noteam|team] [reps]`: decode as
//! `push` then `scores` / softmax / `weighted_sum` per head (`serial`), or `push_decode` +
//! `attend_decode` with (`team`) or without (`noteam`) a thread team. Each time is the minimum
//! over every layer and rep of one layer's call (times 30): robust to a busy machine.
//! The kernel path is `TESSERA_FORCE_ISA` (default: the best available).
use std::time::Instant;
use tessera::runtime::model::softmax;
use tessera::runtime::ops::{Backend, Isa, KvCache, KvKind, Team};
use tessera_golden::numerics::Datapath;

const L: usize = 30;
const NH: usize = 9;
const NKV: usize = 3;
const HD: usize = 64;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 64,
    };
    let mut s = 1u64;
    let mut r = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let n = 128;
    let k: Vec<f32> = (0..n * NKV * HD).map(|_| r() * 2.0).collect();
    let v: Vec<f32> = (0..n * NKV * HD).map(|_| r()).collect();
    let q: Vec<f32> = (0..n * NH * HD).map(|_| r() * 3.0).collect();
    let fresh = || {
        (0..L)
            .map(|_| {
                KvCache::with_backend(
                    KvKind::Engine { dp, bits: 4 },
                    NKV,
                    HD,
                    Backend::Cpu,
                    Isa::from_env().expect("TESSERA_FORCE_ISA"),
                )
                .expect("bench setup")
            })
            .collect::<Vec<_>>()
    };
    let scale = 0.125f32;
    let mut att = vec![0f32; n * NH * HD];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("bench setup");
    let reps: usize = std::env::args()
        .nth(2)
        .map_or(15, |a| a.parse().expect("reps: a number"));
    pool.install(|| {
        let mut best_pf = f64::MAX;
        let mut best_dec = vec![f64::MAX; 64];
        let mut sum = 0f64;
        for _ in 0..reps {
            let mut caches = fresh();
            for c in caches.iter_mut() {
                let t0 = Instant::now();
                assert!(c.attend_prefill(&Team::new(), &k, &v, &q, n, NH, scale, &mut att));
                best_pf = best_pf.min(t0.elapsed().as_secs_f64() * L as f64);
            }
            sum += att.iter().map(|&x| x as f64).sum::<f64>();
            // 64 decode steps, each over the 30 layers.
            let team = Team::new();
            let mut sc = vec![0f32; 256];
            for step in 0..64 {
                let kk = &k[(step % n) * NKV * HD..][..NKV * HD];
                let vv = &v[(step % n) * NKV * HD..][..NKV * HD];
                let qq = &q[(step % n) * NH * HD..][..NH * HD];
                let a = &mut att[..NH * HD];
                let mut lay = f64::MAX;
                if mode == "serial" {
                    for c in caches.iter_mut() {
                        let t0 = Instant::now();
                        c.push(kk, vv);
                        let len = c.len();
                        for h in 0..NH {
                            let s = &mut sc[..len];
                            c.scores(h / 3, &qq[h * HD..][..HD], scale, s);
                            softmax(s);
                            c.weighted_sum(h / 3, s, &mut a[h * HD..][..HD]);
                        }
                        lay = lay.min(t0.elapsed().as_secs_f64());
                    }
                } else {
                    let th = if mode == "noteam" { 1 } else { 2 };
                    team.lead(th, || {
                        for c in caches.iter_mut() {
                            let t0 = Instant::now();
                            c.push_decode(&team, kk, vv);
                            c.attend_decode(&team, qq, NH, scale, a, None);
                            lay = lay.min(t0.elapsed().as_secs_f64());
                        }
                    });
                }
                best_dec[step] = best_dec[step].min(lay * L as f64);
                sum += a.iter().map(|&x| x as f64).sum::<f64>();
            }
        }
        println!("{mode}: prefill attention {:.3} ms/token, decode attention {:.3} ms/token (checksum {sum:.3})", best_pf / n as f64 * 1e3, best_dec.iter().sum::<f64>() / 64.0 * 1e3);
    });
}
