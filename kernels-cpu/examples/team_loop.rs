//! Cost of one decode-team loop (8 tiny tasks) on 2 threads: `cargo run --release -p
//! tessera-kernels-cpu --example team_loop`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tessera_kernels_cpu::Team;

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let team = Team::new();
    let sink = AtomicU64::new(0);
    for &(tasks, work) in &[
        (8usize, 3000u64),
        (2, 12000),
        (8, 3000),
        (16, 1500),
        (2, 12000),
    ] {
        let before = team.task_counts();
        let t1 = Instant::now();
        let mut x = 0u64;
        for _ in 0..(tasks as u64 * work) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let serial = t1.elapsed().as_secs_f64();
        sink.fetch_add(x & 1, Ordering::Relaxed);
        let mut best = f64::MAX;
        for _ in 0..20 {
            let dt = pool.install(|| {
                team.lead(2, || {
                    let t0 = Instant::now();
                    for _ in 0..1000 {
                        team.for_each(tasks, |i, _| {
                            let mut x = i as u64;
                            for _ in 0..work {
                                x = std::hint::black_box(
                                    x.wrapping_mul(6364136223846793005).wrapping_add(1),
                                );
                            }
                            sink.fetch_add(x & 1, Ordering::Relaxed);
                        });
                    }
                    t0.elapsed().as_secs_f64() / 1000.0
                })
            });
            best = best.min(dt);
        }
        let after = team.task_counts();
        println!(
            "{tasks} tasks x {work} mul-adds: {:.2} us per loop, one thread alone {:.2} us; tasks (leader, helpers) {:?}",
            best * 1e6,
            serial * 1e6,
            (after.0 - before.0, after.1 - before.1)
        );
    }
}
