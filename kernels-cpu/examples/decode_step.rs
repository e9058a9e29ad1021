//! The weight GEMVs of one SmolLM2-135M decode step, as the runtime runs them: 30 distinct W2
//! g32 layers (fused q+k+v 960x576, wo 576x576, fused gate+up 3072x576, down 576x1536) and the
//! W8 head (49152x576), every tensor read once per step (67.5 MB: more than the L3, so streamed
//! from DRAM), on a decode [`Team`] of 1 and 2 threads, alternating, min and median over steps.
//! Matrix kernels only (no N5, stage, norms, attention): where the memory side of decode stands.
//!
//! `cargo run --release -p tessera-kernels-cpu --example decode_step -- [steps]` (env: `LAYERS`,
//! `NOHEAD`, `HEAD_ROWS`, `SHAPES="n,k;n,k"`)
use std::time::Instant;

use tessera_golden::numerics::Datapath;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::QuantWeights;
use tessera_kernels_cpu::{Isa, PreparedWeights, Scratch, Team};

fn tensor(format: WeightFormat, n: usize, k: usize, seed: u64) -> PreparedWeights {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let l = 32;
    let groups = k.div_ceil(l);
    let max = u64::from(format.max_code()) + 1;
    let codes: Vec<u8> = (0..n * k).map(|_| (next() % max) as u8).collect();
    let zero: Vec<u8> = (0..n * groups).map(|_| (next() % max) as u8).collect();
    let gscale: Vec<u16> = (0..n * groups)
        .map(|_| (next() % (1 << 15)) as u16)
        .collect();
    let w = QuantWeights::from_codes(format, n, k, l, 16, &codes, gscale, zero, vec![1.0; n])
        .expect("tensor");
    PreparedWeights::from(&w)
}

fn main() {
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 64,
    };
    // SHAPES="n,k;n,k" replaces the layer's W2 shapes (e.g. to time one shape alone).
    let shapes: Vec<(usize, usize)> = std::env::var("SHAPES")
        .ok()
        .map(|v| {
            v.split(';')
                .map(|nk| {
                    let (n, k) = nk.split_once(',').expect("SHAPES: n,k;n,k");
                    (n.parse().expect("SHAPES: n"), k.parse().expect("SHAPES: k"))
                })
                .collect()
        })
        .unwrap_or_else(|| vec![(960, 576), (576, 576), (3072, 576), (576, 1536)]);
    let build = || {
        let mut ws: Vec<PreparedWeights> = Vec::new();
        let layers: u64 = std::env::var("LAYERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        for layer in 0..layers {
            for (i, &(n, k)) in shapes.iter().enumerate() {
                ws.push(tensor(WeightFormat::W2, n, k, layer * 8 + i as u64));
            }
        }
        let head_rows = if std::env::var("NOHEAD").is_ok() {
            64
        } else {
            std::env::var("HEAD_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(49152)
        };
        ws.push(tensor(WeightFormat::W8, head_rows, 576, 999));
        ws
    };
    // Two copies of the step's weights, alike but for the pages: huge (arena advised
    // MADV_HUGEPAGE) and 4 KiB (arena not advised).
    tessera_kernels_cpu::mem::set_huge_pages(true);
    let huge = build();
    tessera_kernels_cpu::mem::set_huge_pages(false);
    let small = build();
    let ws = &huge;
    let bytes: usize = ws.iter().map(PreparedWeights::weight_bytes).sum();
    let mut scratch = Scratch::new();
    for w in ws.iter().chain(small.iter()) {
        scratch.reserve(w, 1);
    }
    let x_len = shapes.iter().map(|s| s.1).max().unwrap_or(0).max(576);
    let x: Vec<i8> = (0..x_len)
        .map(|i| ((i * 37 + 11) % 256) as u8 as i8)
        .collect();
    let mut acc = vec![0i64; 49152];
    let isa = Isa::best();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let team = Team::new();
    // Per-class seconds of the last step: W2 products and the head.
    let mut step = |ws: &[PreparedWeights], threads: usize| -> (f64, f64) {
        let p = if threads == 1 { &pool1 } else { &pool };
        p.install(|| {
            team.lead(threads, || {
                let t0 = Instant::now();
                for w in &ws[..ws.len() - 1] {
                    w.gemm_acc_in(
                        Some(&team),
                        isa,
                        &dp,
                        &x[..w.k()],
                        1,
                        &mut scratch,
                        &mut acc[..w.n_rows()],
                    )
                    .expect("gemv");
                }
                let t1 = Instant::now();
                let head = &ws[ws.len() - 1];
                head.gemm_acc_in(
                    Some(&team),
                    isa,
                    &dp,
                    &x[..head.k()],
                    1,
                    &mut scratch,
                    &mut acc[..head.n_rows()],
                )
                .expect("gemv");
                ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64())
            })
        })
    };
    let mut times: [Vec<(f64, f64)>; 4] = Default::default();
    let sets = [&huge[..], &small[..]];
    for set in sets {
        step(set, 1);
        step(set, 2);
    }
    for _ in 0..steps {
        let only2 = std::env::var("ONLY2").is_ok();
        for t in [1usize, 2] {
            if only2 && t == 1 {
                continue;
            }
            for (i, set) in sets.iter().enumerate() {
                times[2 * (t - 1) + i].push(step(set, t));
            }
        }
    }
    println!(
        "decode step GEMVs ({isa}, {:.1} MB): W2 {:.1} MB + W8 head {:.1} MB",
        bytes as f64 / 1e6,
        (bytes - ws[ws.len() - 1].weight_bytes()) as f64 / 1e6,
        ws[ws.len() - 1].weight_bytes() as f64 / 1e6
    );
    println!("team tasks (leader, helpers): {:?}", team.task_counts());
    for (t, v) in times.iter_mut().enumerate() {
        if v.is_empty() {
            continue;
        }
        let mut w2: Vec<f64> = v.iter().map(|p| p.0).collect();
        let mut hd: Vec<f64> = v.iter().map(|p| p.1).collect();
        w2.sort_by(f64::total_cmp);
        hd.sort_by(f64::total_cmp);
        let w2b = (bytes - ws[ws.len() - 1].weight_bytes()) as f64;
        let hb = ws[ws.len() - 1].weight_bytes() as f64;
        println!(
            "{} thread(s), {} pages: W2 min {:.3} ms ({:.1} GB/s) median {:.3} | head min {:.3} ms ({:.1} GB/s) median {:.3} | step min {:.3} ms",
            t / 2 + 1,
            if t % 2 == 0 { "huge" } else { "4 KiB" },
            w2[0] * 1e3,
            w2b / w2[0] / 1e9,
            w2[w2.len() / 2] * 1e3,
            hd[0] * 1e3,
            hb / hd[0] / 1e9,
            hd[hd.len() / 2] * 1e3,
            (w2[0] + hd[0]) * 1e3
        );
    }
}
