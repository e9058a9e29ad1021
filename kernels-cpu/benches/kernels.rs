//! Criterion benches of the CPU kernels on SmolLM2-135M shapes, plus one side-by-side summary
//! table (GOP/s, GB/s of weights streamed, ratio to a STREAM-like read bandwidth measured in
//! the same run). Run: `cargo bench -p tessera-kernels-cpu` (the table is printed at the end;
//! `-- --quick-table` prints only the table, `-- --decode-only` only the decode-step estimate).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use tessera_golden::kv::KvCache;
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::OutputStage;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{QuantWeights, TERNARY_ZERO_U8};
use tessera_kernels_cpu::{Isa, KvHeadCpu, KvScratch, PreparedWeights, Scratch};

const GROUP: usize = 32;
const SCALE_BITS: u32 = 16;

fn dp() -> Datapath {
    Datapath {
        w_group_len: GROUP,
        w_scale_bits: SCALE_BITS,
        acc_bits: 48,
        kv_group_len: 32,
        kv_recent_window: 32,
    }
}

fn rng_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 33) as u8
        })
        .collect()
}

fn weights(format: WeightFormat, n: usize, k: usize) -> PreparedWeights {
    weights_g(format, n, k, GROUP)
}

fn weights_g(format: WeightFormat, n: usize, k: usize, group: usize) -> PreparedWeights {
    let max = u16::from(format.max_code()) + 1;
    let codes: Vec<u8> = rng_bytes(n * k, 1)
        .into_iter()
        .map(|b| (u16::from(b) % max) as u8)
        .collect();
    let groups = k.div_ceil(group);
    let gscale: Vec<u16> = rng_bytes(n * groups, 2)
        .into_iter()
        .map(|b| u16::from(b) << 7)
        .collect();
    let zero = if format == WeightFormat::Ternary {
        vec![TERNARY_ZERO_U8; n * groups]
    } else {
        rng_bytes(n * groups, 3)
    };
    let w = QuantWeights::from_codes(
        format,
        n,
        k,
        group,
        SCALE_BITS,
        &codes,
        gscale,
        zero,
        vec![1.0; n],
    )
    .expect("bench tensor");
    PreparedWeights::from(&w)
}

struct Case {
    name: &'static str,
    format: WeightFormat,
    n: usize,
    k: usize,
}

const CASES: [Case; 8] = [
    Case {
        name: "attn_576x576",
        format: WeightFormat::W2,
        n: 576,
        k: 576,
    },
    Case {
        name: "up_1536x576",
        format: WeightFormat::W2,
        n: 1536,
        k: 576,
    },
    Case {
        name: "down_576x1536",
        format: WeightFormat::W2,
        n: 576,
        k: 1536,
    },
    Case {
        name: "up_1536x576",
        format: WeightFormat::W4,
        n: 1536,
        k: 576,
    },
    Case {
        name: "up_1536x576",
        format: WeightFormat::W8,
        n: 1536,
        k: 576,
    },
    Case {
        name: "up_1536x576",
        format: WeightFormat::Ternary,
        n: 1536,
        k: 576,
    },
    Case {
        name: "head_49152x576",
        format: WeightFormat::W8,
        n: 49152,
        k: 576,
    },
    Case {
        name: "head_49152x576",
        format: WeightFormat::W2,
        n: 49152,
        k: 576,
    },
];

/// Median seconds per call of `f` over batches of about 20 ms (after a warm-up).
fn time_it(mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    let mut reps = 0u32;
    while t0.elapsed() < Duration::from_millis(20) {
        f();
        reps += 1;
    }
    let reps = reps.max(1);
    let mut samples: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(reps)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Nanoseconds this thread has run on a CPU (Linux `/proc/thread-self/schedstat`), so a
/// measurement is not inflated by other processes sharing the cores; `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Median CPU seconds per call of `f` on this thread (falls back to wall time).
fn cpu_time_it(mut f: impl FnMut()) -> f64 {
    if thread_cpu_ns().is_none() {
        return time_it(f);
    }
    f();
    let mut reps = 1u32;
    loop {
        let t0 = thread_cpu_ns().unwrap_or(0);
        for _ in 0..reps {
            f();
        }
        if thread_cpu_ns().unwrap_or(0) - t0 > 20_000_000 {
            break;
        }
        reps *= 2;
    }
    let mut samples: Vec<f64> = (0..7)
        .map(|_| {
            let t0 = thread_cpu_ns().unwrap_or(0);
            for _ in 0..reps {
                f();
            }
            (thread_cpu_ns().unwrap_or(0) - t0) as f64 * 1e-9 / f64::from(reps)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// STREAM-like read bandwidth (bytes/s) over `bytes` bytes, summed by every rayon thread.
fn read_bandwidth(bytes: usize) -> f64 {
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let chunk = (buf.len() / rayon::current_num_threads()).max(1024);
    let secs = time_it(|| {
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .sum();
        black_box(s);
    });
    bytes as f64 / secs
}

/// One KV head (`head_dim` 64, groups of 32, window 32) holding `tokens` tokens, mirrored.
fn kv_head(tokens: usize) -> KvHeadCpu {
    let d = dp();
    let hd = 64;
    let mut cache = KvCache::new(&d, hd).expect("cache");
    let bytes = rng_bytes(2 * tokens * hd, 4);
    for t in 0..tokens {
        let f = |b: u8| f32::from(b) / 64.0 - 2.0;
        let k: Vec<f32> = bytes[2 * t * hd..(2 * t + 1) * hd]
            .iter()
            .map(|&b| f(b))
            .collect();
        let v: Vec<f32> = bytes[(2 * t + 1) * hd..(2 * t + 2) * hd]
            .iter()
            .map(|&b| f(b))
            .collect();
        cache.push(&k, &v).expect("push");
    }
    let mut mirror = KvHeadCpu::new(&d, hd);
    mirror.sync(&cache).expect("sync");
    mirror
}

/// Seconds per `Q x K^T` and per `P x V` call on `isa` (wall or 1-thread CPU time).
fn kv_times(kv: &KvHeadCpu, isa: Isa, cpu: bool) -> (f64, f64) {
    let n = kv.len();
    let hd = 64;
    let q: Vec<i8> = rng_bytes(hd, 5).into_iter().map(|b| b as i8).collect();
    let p: Vec<i8> = rng_bytes(n, 6).into_iter().map(|b| (b / 2) as i8).collect();
    let st = OutputStage::IDENTITY_I32;
    let mut sc = KvScratch::default();
    let (mut acc, mut y) = (vec![0i64; n], vec![0i32; n]);
    let (mut a4, mut aw, mut y4, mut yw) = (
        vec![0i64; hd],
        vec![0i64; hd],
        vec![0i32; hd],
        vec![0i32; hd],
    );
    let mut qk = || kv.qk(isa, &q, &st, &mut sc, &mut acc, &mut y).expect("qk");
    let t_qk = if cpu {
        cpu_time_it(&mut qk)
    } else {
        time_it(&mut qk)
    };
    let mut sc = KvScratch::default();
    let mut pv = || {
        kv.pv(isa, &p, &st, &mut sc, &mut a4, &mut aw, &mut y4, &mut yw)
            .expect("pv");
    };
    let t_pv = if cpu {
        cpu_time_it(&mut pv)
    } else {
        time_it(&mut pv)
    };
    (t_qk, t_pv)
}

fn criterion_benches(c: &mut Criterion) {
    let kv = kv_head(1024);
    let n = kv.len();
    let hd = 64;
    let q: Vec<i8> = rng_bytes(hd, 5).into_iter().map(|b| b as i8).collect();
    let p: Vec<i8> = rng_bytes(n, 6).into_iter().map(|b| (b / 2) as i8).collect();
    let st = OutputStage::IDENTITY_I32;
    let mut group = c.benchmark_group("kv_qk_1024x64");
    group.throughput(Throughput::Elements((2 * n * hd) as u64));
    for isa in Isa::available() {
        let mut sc = KvScratch::default();
        let (mut acc, mut y) = (vec![0i64; n], vec![0i32; n]);
        group.bench_function(BenchmarkId::from_parameter(isa), |b| {
            b.iter(|| {
                kv.qk(isa, black_box(&q), &st, &mut sc, &mut acc, &mut y)
                    .expect("qk")
            });
        });
    }
    group.finish();
    let mut group = c.benchmark_group("kv_pv_1024x64");
    group.throughput(Throughput::Elements((2 * n * hd) as u64));
    for isa in Isa::available() {
        let mut sc = KvScratch::default();
        let (mut a4, mut aw) = (vec![0i64; hd], vec![0i64; hd]);
        let (mut y4, mut yw) = (vec![0i32; hd], vec![0i32; hd]);
        group.bench_function(BenchmarkId::from_parameter(isa), |b| {
            b.iter(|| {
                kv.pv(
                    isa,
                    black_box(&p),
                    &st,
                    &mut sc,
                    &mut a4,
                    &mut aw,
                    &mut y4,
                    &mut yw,
                )
                .expect("pv")
            });
        });
    }
    group.finish();
    kv_step_benches(c);
    weight_benches(c);
}

fn weight_benches(c: &mut Criterion) {
    let d = dp();
    for case in &CASES {
        let w = weights(case.format, case.n, case.k);
        let mut group = c.benchmark_group(format!("gemv_{}_{}", case.name, case.format));
        group.throughput(Throughput::Bytes(w.weight_bytes() as u64));
        let x: Vec<i8> = rng_bytes(case.k, 9).into_iter().map(|b| b as i8).collect();
        let mut scratch = Scratch::for_weights(&w, 1);
        let mut acc = vec![0i64; case.n];
        for isa in Isa::available() {
            if isa == Isa::Scalar && case.n > 4096 {
                continue;
            }
            group.bench_function(BenchmarkId::from_parameter(isa), |b| {
                b.iter(|| {
                    w.gemm_acc(isa, &d, black_box(&x), 1, &mut scratch, &mut acc)
                        .expect("gemv");
                });
            });
        }
        group.finish();
    }
    // Prefill: M = 128 tokens.
    let m = 128;
    for case in CASES.iter().take(3) {
        let w = weights(case.format, case.n, case.k);
        let mut group = c.benchmark_group(format!("gemm128_{}_{}", case.name, case.format));
        group.throughput(Throughput::Elements((2 * case.n * case.k * m) as u64));
        let x: Vec<i8> = rng_bytes(m * case.k, 9)
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let mut scratch = Scratch::for_weights(&w, m);
        let mut acc = vec![0i64; m * case.n];
        for isa in Isa::available() {
            group.bench_function(BenchmarkId::from_parameter(isa), |b| {
                b.iter(|| {
                    w.gemm_acc(isa, &d, black_box(&x), m, &mut scratch, &mut acc)
                        .expect("gemm");
                });
            });
        }
        group.finish();
    }
}

/// One run, every kernel and path side by side: CPU time on one thread (robust to other
/// processes sharing the machine), wall time on every rayon thread with the weights in cache
/// (hot), and wall time cycling through copies totalling > 256 MiB (cold: streamed from DRAM),
/// next to a STREAM-like read roofline measured in the same run.
fn summary_table() {
    let d = dp();
    let threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("1-thread pool");
    let bw_dram = read_bandwidth(512 << 20);
    let bw_cache = read_bandwidth(4 << 20);
    let bw_dram_1t = one.install(|| read_bandwidth(512 << 20));
    println!("\n== tessera-kernels-cpu summary ==");
    println!("cpu: {}", Isa::cpu_features());
    println!(
        "read roofline ({threads} threads, wall): DRAM {:.1} GB/s (512 MiB), cache {:.1} GB/s (4 MiB); 1 thread DRAM {:.1} GB/s",
        bw_dram / 1e9,
        bw_cache / 1e9,
        bw_dram_1t / 1e9
    );
    println!(
        "{:<22} {:>4} {:>7} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} {:>6}",
        "kernel", "m", "path", "GOP/s", "GB/s", "GOP/s", "GB/s", "GOP/s", "GB/s", "/DRAM"
    );
    println!(
        "{:<22} {:>4} {:>7} | {:>15} | {:>15} | {:>22}",
        "",
        "",
        "",
        "1T cpu-time hot",
        format!("{threads}T wall hot"),
        format!("{threads}T wall cold")
    );
    for case in &CASES {
        let w = weights(case.format, case.n, case.k);
        let copies = ((256usize << 20) / w.weight_bytes()).max(2);
        let cold: Vec<PreparedWeights> = (0..copies).map(|_| w.clone()).collect();
        for &m in &[1usize, 128] {
            if m > 1 && case.n > 4096 {
                continue;
            }
            let x: Vec<i8> = rng_bytes(m * case.k, 9)
                .into_iter()
                .map(|b| b as i8)
                .collect();
            let mut scratch = Scratch::for_weights(&w, m);
            let mut acc = vec![0i64; m * case.n];
            for isa in Isa::available() {
                if isa == Isa::Scalar && (case.n > 4096 || m > 1) {
                    continue;
                }
                let cpu1 = one.install(|| {
                    cpu_time_it(|| {
                        w.gemm_acc(isa, &d, &x, m, &mut scratch, &mut acc)
                            .expect("k");
                    })
                });
                let hot = time_it(|| {
                    w.gemm_acc(isa, &d, &x, m, &mut scratch, &mut acc)
                        .expect("k");
                });
                let mut i = 0;
                let cold_t = if m == 1 {
                    time_it(|| {
                        cold[i % copies]
                            .gemm_acc(isa, &d, &x, m, &mut scratch, &mut acc)
                            .expect("k");
                        i += 1;
                    })
                } else {
                    f64::NAN
                };
                let ops = (2 * case.n * case.k * m) as f64;
                let bytes = w.weight_bytes() as f64;
                println!(
                    "{:<22} {:>4} {:>7} | {:>7.1} {:>7.2} | {:>7.1} {:>7.2} | {:>7.1} {:>7.2} {:>6.2}",
                    format!("{} {}", case.name, case.format),
                    m,
                    isa.name(),
                    ops / cpu1 / 1e9,
                    bytes / cpu1 / 1e9,
                    ops / hot / 1e9,
                    bytes / hot / 1e9,
                    ops / cold_t / 1e9,
                    bytes / cold_t / 1e9,
                    bytes / cold_t / bw_dram,
                );
            }
        }
    }
    decode_estimate(&one);
    let kv = kv_head(1024);
    let ops = (2 * kv.len() * 64) as f64;
    for isa in Isa::available() {
        let (c_qk, c_pv) = one.install(|| kv_times(&kv, isa, true));
        let (w_qk, w_pv) = kv_times(&kv, isa, false);
        for (name, c1, w1) in [
            ("kv qk 1024 tok hd64", c_qk, w_qk),
            ("kv pv 1024 tok hd64", c_pv, w_pv),
        ] {
            println!(
                "{:<22} {:>4} {:>7} | {:>7.1} {:>7} | {:>7.1} {:>7} | (1 head, {:.1} us/call 1T)",
                name,
                1,
                isa.name(),
                ops / c1 / 1e9,
                "",
                ops / w1 / 1e9,
                "",
                c1 * 1e6
            );
        }
    }
}

/// The weight GEMVs of one SmolLM2-135M decode step: 30 distinct W2 layers (q, k, v, o, gate,
/// up, down) and the W8 head, each weight read once per token as in the real model. Matrix
/// kernels only (no norms, RoPE, attention, sampling): an upper bound on decode tokens/s.
fn decode_estimate(one: &rayon::ThreadPool) {
    let d = dp();
    let shapes = [
        (576usize, 576usize),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let layers: Vec<Vec<PreparedWeights>> = (0..30)
        .map(|_| {
            shapes
                .iter()
                .map(|&(n, k)| weights(WeightFormat::W2, n, k))
                .collect()
        })
        .collect();
    let head = weights(WeightFormat::W8, 49152, 576);
    let mut scratch = Scratch::new();
    for w in layers.iter().flatten().chain(std::iter::once(&head)) {
        scratch.reserve(w, 1);
    }
    let x: Vec<i8> = rng_bytes(1536, 9).into_iter().map(|b| b as i8).collect();
    let mut acc = vec![0i64; 49152];
    let bytes: usize = layers
        .iter()
        .flatten()
        .map(PreparedWeights::weight_bytes)
        .sum::<usize>()
        + head.weight_bytes();
    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
        let mut step = || {
            for w in layers.iter().flatten().chain(std::iter::once(&head)) {
                w.gemm_acc(
                    isa,
                    &d,
                    &x[..w.k()],
                    1,
                    &mut scratch,
                    &mut acc[..w.n_rows()],
                )
                .expect("gemv");
            }
        };
        let wall = time_it(&mut step);
        let cpu1 = one.install(|| cpu_time_it(&mut step));
        println!(
            "decode step, weight GEMVs only ({isa}, {:.1} MB of weights): {:.2} ms wall ({} threads) = {:.0} tok/s; {:.2} ms CPU on 1 thread = {:.0} tok/s",
            bytes as f64 / 1e6,
            wall * 1e3,
            rayon::current_num_threads(),
            1.0 / wall,
            cpu1 * 1e3,
            1.0 / cpu1
        );
    }
}

/// Minimum wall seconds per call of `f` over 41 samples of about 2 ms each: on a shared
/// machine the minimum is the least disturbed figure.
fn time_min(mut f: impl FnMut()) -> f64 {
    f();
    let mut reps = 1u32;
    loop {
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        if t0.elapsed() > Duration::from_millis(2) {
            break;
        }
        reps *= 2;
    }
    (0..41)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..reps {
                f();
            }
            t0.elapsed().as_secs_f64() / f64::from(reps)
        })
        .fold(f64::INFINITY, f64::min)
}

/// `--min-table`: GOP/s of the AVX2 weight kernels on 1 thread, minimum wall time (hot weights),
/// for group 32 and 64, GEMV and 128-token GEMM.
fn min_table() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("1-thread pool");
    let cases = [
        (WeightFormat::W2, 576usize, 576usize, 32usize),
        (WeightFormat::W2, 1536, 576, 32),
        (WeightFormat::W2, 576, 1536, 32),
        (WeightFormat::W2, 1536, 576, 64),
        (WeightFormat::W2, 576, 1536, 64),
        (WeightFormat::W4, 1536, 576, 32),
        (WeightFormat::W4, 1536, 576, 64),
        (WeightFormat::Ternary, 1536, 576, 32),
        (WeightFormat::W8, 1536, 576, 32),
        (WeightFormat::W8, 49152, 576, 32),
        (WeightFormat::W8, 49152, 576, 64),
    ];
    println!("min-table: 1 thread, min wall time, GOP/s (2 n k m per call)");
    for (format, n, k, group) in cases {
        let w = weights_g(format, n, k, group);
        let d = Datapath {
            w_group_len: group,
            ..dp()
        };
        for m in [1usize, 128] {
            if m > 1 && n > 4096 {
                continue;
            }
            let x: Vec<i8> = rng_bytes(m * k, 9).into_iter().map(|b| b as i8).collect();
            let mut scratch = Scratch::for_weights(&w, m);
            let mut acc = vec![0i64; m * n];
            let t = one.install(|| {
                time_min(|| {
                    w.gemm_acc(Isa::Avx2, &d, &x, m, &mut scratch, &mut acc)
                        .expect("k");
                })
            });
            println!(
                "{:<8} {:>5}x{:<5} g{:<3} m {:>3}: {:>7.1} GOP/s {:>9.1} us",
                format.to_string(),
                n,
                k,
                group,
                m,
                (2 * n * k * m) as f64 / t / 1e9,
                t * 1e6
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench");
    let quick_table = args.iter().any(|a| a == "--quick-table");
    println!("cpu: {}", Isa::cpu_features());
    if args.iter().any(|a| a == "--min-table") {
        min_table();
        return;
    }
    if args.iter().any(|a| a == "--decode-only") {
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("1-thread pool");
        decode_estimate(&one);
        return;
    }
    if !quick_table {
        let mut c = Criterion::default()
            .configure_from_args()
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(10);
        criterion_benches(&mut c);
        c.final_summary();
    }
    if bench_mode || quick_table {
        summary_table();
    }
}

/// One decode step's KV work on one head (`head_dim` 64, groups of 32, window 32, 1024 tokens):
/// both N22 planes' `P x V` as two `pv` calls and as one `pv2_at`, and push + incremental sync.
fn kv_step_benches(c: &mut Criterion) {
    use tessera_kernels_cpu::Pv2Out;
    let kv = kv_head(1024);
    let (n, hd) = (kv.len(), 64);
    let st = OutputStage::IDENTITY_I32;
    let p_hi: Vec<i8> = rng_bytes(n, 6).into_iter().map(|b| (b / 2) as i8).collect();
    let p_lo: Vec<i8> = rng_bytes(n, 7).into_iter().map(|b| (b / 2) as i8).collect();
    let mut group = c.benchmark_group("kv_pv_two_planes_1024x64");
    for isa in Isa::available() {
        let mut sc = KvScratch::default();
        let (mut a4, mut aw) = (vec![0i64; hd], vec![0i64; hd]);
        let (mut y4, mut yw) = (vec![0i32; hd], vec![0i32; hd]);
        group.bench_function(BenchmarkId::new("two_pv", isa), |b| {
            b.iter(|| {
                for p in [&p_hi, &p_lo] {
                    kv.pv(
                        isa,
                        black_box(p),
                        &st,
                        &mut sc,
                        &mut a4,
                        &mut aw,
                        &mut y4,
                        &mut yw,
                    )
                    .expect("pv");
                }
            });
        });
        let mut out = Pv2Out::default();
        group.bench_function(BenchmarkId::new("pv2", isa), |b| {
            b.iter(|| {
                kv.pv2_at(
                    isa,
                    n,
                    None,
                    black_box(&p_hi),
                    &p_lo,
                    &st,
                    &mut sc,
                    &mut out,
                )
                .expect("pv2");
            });
        });
    }
    group.finish();
    // Push + sync of 96 tokens (3 groups leave the window) into a fresh head, per token.
    let d = dp();
    let toks: Vec<(Vec<f32>, Vec<f32>)> = (0..96)
        .map(|t| {
            let b = rng_bytes(2 * hd, 100 + t);
            let f = |x: &u8| f32::from(*x) / 64.0 - 2.0;
            (
                b[..hd].iter().map(f).collect(),
                b[hd..].iter().map(f).collect(),
            )
        })
        .collect();
    let mut group = c.benchmark_group("kv_push_sync_96x64");
    group.throughput(Throughput::Elements(96));
    group.bench_function("golden_push_plus_sync", |b| {
        b.iter(|| {
            let mut cache = KvCache::new(&d, hd).expect("cache");
            let mut m = KvHeadCpu::new(&d, hd);
            for (k, v) in &toks {
                cache.push(k, v).expect("push");
                m.sync(&cache).expect("sync");
            }
            black_box(m.len())
        });
    });
    group.bench_function("golden_push_only", |b| {
        b.iter(|| {
            let mut cache = KvCache::new(&d, hd).expect("cache");
            for (k, v) in &toks {
                cache.push(k, v).expect("push");
            }
            black_box(cache.len())
        });
    });
    group.finish();
}
