//! The decode thread team (`tessera_kernels_cpu::team`): every task exactly once, the same
//! integers as the rayon split for every thread count, panics propagate, no hang without
//! helpers. No test depends on timing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tessera_golden::numerics::Datapath;
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::QuantWeights;
use tessera_kernels_cpu::{Isa, PreparedWeights, Scratch, Team};

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("rayon pool")
}

/// A random `n x k` tensor of `format` with groups of `l` (scales up to `2^15`, any zero
/// point), prepared for the kernels.
fn random_tensor(
    format: WeightFormat,
    n: usize,
    k: usize,
    l: usize,
    rng: &mut Rng,
) -> PreparedWeights {
    let groups = k.div_ceil(l);
    let max = u64::from(format.max_code()) + 1;
    let codes: Vec<u8> = (0..n * k).map(|_| (rng.next() % max) as u8).collect();
    let gscale = (0..n * groups)
        .map(|_| (rng.next() % 32769) as u16)
        .collect();
    let zero = (0..n * groups).map(|_| rng.next() as u8).collect();
    let w = QuantWeights::from_codes(format, n, k, l, 16, &codes, gscale, zero, vec![1.0; n])
        .expect("tensor");
    PreparedWeights::from(&w)
}

/// Groups of 32, 16-bit scales, 48-bit accumulators.
const DP48: Datapath = Datapath {
    w_group_len: 32,
    w_scale_bits: 16,
    acc_bits: 48,
    kv_group_len: 16,
    kv_recent_window: 16,
};

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[test]
fn every_task_runs_once_for_any_count_and_threads() {
    for threads in 1..=4 {
        let team = Team::new();
        pool(threads).install(|| {
            team.lead(threads, || {
                // One thread: no team at all (the loops run on the caller).
                assert_eq!(team.is_leading(), threads > 1);
                assert_eq!(team.threads(), threads);
                // Many loops back to back, odd counts: helpers join late, park and wake.
                for n in [0usize, 1, 2, 3, 7, 64, 257, 1000].iter().cycle().take(200) {
                    let hits: Vec<AtomicUsize> = (0..*n).map(|_| AtomicUsize::new(0)).collect();
                    team.for_each(*n, |i, member| {
                        assert!(member < threads, "member {member} of {threads}");
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n {n}");
                }
            });
        });
        assert!(!team.is_leading());
    }
}

/// A `lead` from a thread outside the pool (as `tessera bench`'s prefill calls the forward
/// pass) runs `f` on a pool worker and leads from it: the loops reach the helpers, and the
/// calling thread is not left marked as a leader.
#[test]
fn lead_from_outside_the_pool_leads_from_a_worker() {
    let team = Team::new();
    let ran_on_worker = std::thread::scope(|s| {
        // A plain thread: not a worker of any pool (the lead takes the global pool's).
        s.spawn(|| {
            assert!(rayon::current_thread_index().is_none());
            let r = team.lead(2, || {
                // Helpers only where the global pool has two threads or more.
                let helpers = rayon::current_num_threads() >= 2;
                assert_eq!(team.is_leading(), helpers);
                assert_eq!(team.threads(), if helpers { 2 } else { 1 });
                let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
                team.for_each(64, |i, _| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                rayon::current_thread_index().is_some()
            });
            assert!(!team.is_leading(), "the caller is not left leading");
            r
        })
        .join()
        .expect("no panic")
    });
    assert!(ran_on_worker, "f ran on a pool worker");
}

#[test]
fn chunks_are_disjoint_and_cover_the_slice() {
    let team = Team::new();
    pool(3).install(|| {
        team.lead(3, || {
            for (len, chunk) in [(0usize, 8usize), (1, 8), (17, 8), (100, 7), (1001, 64)] {
                let mut v = vec![0u32; len];
                team.for_each_chunk_mut(&mut v, chunk, |i, c, _| {
                    for (j, x) in c.iter_mut().enumerate() {
                        *x += (i * chunk + j) as u32 + 1;
                    }
                });
                assert!(v.iter().enumerate().all(|(j, &x)| x == j as u32 + 1));
            }
        });
    });
}

#[test]
fn outside_lead_runs_in_order_on_the_caller() {
    let team = Team::new();
    assert_eq!(team.threads(), 1);
    let order = std::sync::Mutex::new(Vec::new());
    team.for_each(5, |i, member| {
        assert_eq!(member, 0);
        order.lock().expect("lock").push(i);
    });
    assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2, 3, 4]);
    // Nested loops and nested leads run on the calling thread instead of deadlocking.
    pool(2).install(|| {
        team.lead(2, || {
            let total = AtomicUsize::new(0);
            team.for_each(4, |_, _| {
                team.for_each(3, |_, m| {
                    assert!(m < 2);
                    total.fetch_add(1, Ordering::Relaxed);
                });
            });
            assert_eq!(total.load(Ordering::Relaxed), 12);
            assert_eq!(team.lead(2, || 7), 7);
        });
    });
}

#[test]
fn more_threads_than_the_pool_and_one_thread_do_not_hang() {
    let team = Team::new();
    pool(1).install(|| {
        let sum = team.lead(4, || {
            assert_eq!(team.threads(), 1);
            let s = AtomicUsize::new(0);
            team.for_each(100, |i, _| {
                s.fetch_add(i, Ordering::Relaxed);
            });
            s.load(Ordering::Relaxed)
        });
        assert_eq!(sum, 4950);
    });
    // Asked for more members than the pool has: as many as it has.
    pool(2).install(|| team.lead(4, || assert_eq!(team.threads(), 2)));
}

#[test]
fn a_helper_panic_propagates_to_the_leader() {
    let team = Team::new();
    let helper_ran = AtomicBool::new(false);
    let r = catch_unwind(AssertUnwindSafe(|| {
        pool(2).install(|| {
            team.lead(2, || {
                team.for_each(64, |_, member| {
                    if member != 0 {
                        helper_ran.store(true, Ordering::SeqCst);
                        panic!("boom in a helper");
                    }
                    // The leader's tasks wait (bounded) for the helper to claim one.
                    let t0 = Instant::now();
                    while !helper_ran.load(Ordering::SeqCst)
                        && t0.elapsed() < Duration::from_secs(20)
                    {
                        std::thread::yield_now();
                    }
                });
            });
        });
    }));
    assert!(
        helper_ran.load(Ordering::SeqCst),
        "the helper never claimed a task"
    );
    let msg = r.expect_err("the panic propagates");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom in a helper"));
    // The team is usable again.
    pool(2).install(|| {
        team.lead(2, || {
            let s = AtomicUsize::new(0);
            team.for_each(10, |_, _| {
                s.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(s.load(Ordering::Relaxed), 10);
        });
    });
}

#[test]
fn a_leader_panic_ends_the_helpers() {
    let team = Team::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        pool(3).install(|| {
            team.lead(3, || {
                team.for_each(8, |_, _| {});
                panic!("boom in the leader");
            })
        })
    }));
    let msg = r.expect_err("the panic propagates");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom in the leader"));
    let r = catch_unwind(AssertUnwindSafe(|| {
        pool(2).install(|| {
            team.lead(2, || team.for_each(8, |i, _| assert!(i != 5, "task 5")));
        })
    }));
    assert!(r.is_err());
}

#[test]
fn team_gemv_equals_the_rayon_split() {
    let mut rng = Rng(99);
    let d = |l: usize| Datapath {
        w_group_len: l,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 16,
        kv_recent_window: 16,
    };
    for format in [WeightFormat::W2, WeightFormat::W4, WeightFormat::W8] {
        // Odd row counts above the sequential threshold (128 Ki MACs).
        for &(n, k, l) in &[
            (257usize, 640usize, 32usize),
            (1001, 160, 32),
            (333, 576, 64),
        ] {
            let p = random_tensor(format, n, k, l, &mut rng);
            let x: Vec<i8> = (0..k).map(|_| rng.next() as i8).collect();
            for isa in Isa::available() {
                let mut want = vec![0i64; n];
                p.gemm_acc(isa, &d(l), &x, 1, &mut Scratch::new(), &mut want)
                    .expect("rayon");
                for threads in 1..=4 {
                    let team = Team::new();
                    let mut got = vec![0i64; n];
                    pool(threads).install(|| {
                        team.lead(threads, || {
                            for _ in 0..3 {
                                got.fill(-1);
                                p.gemm_acc_in(
                                    Some(&team),
                                    isa,
                                    &d(l),
                                    &x,
                                    1,
                                    &mut Scratch::new(),
                                    &mut got,
                                )
                                .expect("team");
                                assert_eq!(
                                    got, want,
                                    "{format:?} n {n} isa {isa} threads {threads}"
                                );
                            }
                        });
                    });
                }
            }
        }
    }
}

/// `gemv_epilogue_in` (N14 and the caller's epilogue inside each GEMV task) gives every part
/// exactly `gemm_acc` then `apply_stage`, on a team of 1-4 threads and without one, for tensors
/// below and above the sequential threshold, split into one to three output parts.
#[test]
fn team_gemv_epilogue_equals_acc_then_stage_in_every_part() {
    let mut rng = Rng(7);
    let d = DP48;
    let stage = tessera_golden::ops::OutputStage::weight_lattice_i32(15);
    for format in [WeightFormat::W2, WeightFormat::W8] {
        for &(n, k, cuts) in &[
            (1001usize, 576usize, &[1001usize][..]),
            (960, 576, &[576, 192, 192][..]),
            (37, 96, &[20, 17][..]),
        ] {
            let p = random_tensor(format, n, k, 32, &mut rng);
            let x: Vec<i8> = (0..k).map(|_| rng.next() as i8).collect();
            for isa in Isa::available() {
                let mut acc = vec![0i64; n];
                p.gemm_acc(isa, &d, &x, 1, &mut Scratch::new(), &mut acc)
                    .expect("acc");
                let mut want = vec![0i32; n];
                tessera_kernels_cpu::apply_stage(&stage, &acc, &mut want).expect("stage");
                for threads in 0..=4 {
                    let team = Team::new();
                    let mut got = vec![i64::MIN; n];
                    let mut run = || {
                        let mut parts: Vec<&mut [i64]> = Vec::new();
                        let mut rest = &mut got[..];
                        for &c in cuts {
                            let (a, b) = rest.split_at_mut(c);
                            parts.push(a);
                            rest = b;
                        }
                        p.gemv_epilogue_in(
                            (threads > 0).then_some(&team),
                            isa,
                            &d,
                            &x,
                            &stage,
                            &mut Scratch::new(),
                            &mut parts,
                            |t, row, y: &[i32], out: &mut [i64]| {
                                assert_eq!(t, 0);
                                for (i, (o, &v)) in out.iter_mut().zip(y).enumerate() {
                                    // The row index travels with the value.
                                    *o = i64::from(v) * 4096 + (row + i) as i64 % 4096;
                                }
                            },
                        )
                        .expect("epilogue");
                    };
                    pool(threads.max(1)).install(|| team.lead(threads, &mut run));
                    let want_rows: Vec<i64> = want
                        .iter()
                        .enumerate()
                        .map(|(r, &v)| i64::from(v) * 4096 + r as i64 % 4096)
                        .collect();
                    assert_eq!(
                        got, want_rows,
                        "{format:?} n {n} isa {isa} threads {threads}"
                    );
                }
            }
        }
    }
}

/// `gemm_epilogue_in` on a team the caller leads (a prompt's products, several tokens) gives
/// every (token, row) exactly once, the same N14 outputs as `gemm_epilogue` on rayon, in every
/// part: teams of 1-4 threads, token counts with and without a 16-token tail, tensors above the
/// sequential threshold split into one or three parts (the tasks are the rayon path's row
/// blocks, claimed dynamically).
#[test]
fn team_gemm_epilogue_equals_rayon_in_every_part() {
    let mut rng = Rng(19);
    let d = DP48;
    let stage = tessera_golden::ops::OutputStage::weight_lattice_i32(15);
    for format in [WeightFormat::W2, WeightFormat::W8] {
        for &(n, k, cuts) in &[
            (1001usize, 576usize, &[1001usize][..]),
            (960, 576, &[576, 192, 192][..]),
        ] {
            let p = random_tensor(format, n, k, 32, &mut rng);
            for m in [5usize, 33] {
                let x: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
                for isa in Isa::available() {
                    // `(t, row, y)` per element, from a run on rayon or on a team.
                    let run = |team: Option<&Team>| {
                        let mut got = vec![(usize::MAX, 0usize, 0i32); m * n];
                        let mut bufs: Vec<Vec<(usize, usize, i32)>> = cuts
                            .iter()
                            .map(|&c| vec![(usize::MAX, 0, 0); m * c])
                            .collect();
                        let mut parts: Vec<&mut [(usize, usize, i32)]> =
                            bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                        p.gemm_epilogue_in(
                            team,
                            isa,
                            &d,
                            &x,
                            m,
                            &stage,
                            &mut Scratch::new(),
                            &mut parts,
                            |t, row, y: &[i32], out: &mut [(usize, usize, i32)]| {
                                for (i, (o, &v)) in out.iter_mut().zip(y).enumerate() {
                                    assert_eq!(o.0, usize::MAX, "(t {t}, row {row}) twice");
                                    *o = (t, row + i, v);
                                }
                            },
                        )
                        .expect("epilogue");
                        let mut row0 = 0;
                        for (b, &c) in bufs.iter().zip(cuts) {
                            for t in 0..m {
                                for j in 0..c {
                                    got[t * n + row0 + j] = b[t * c + j];
                                }
                            }
                            row0 += c;
                        }
                        got
                    };
                    let want = pool(2).install(|| run(None));
                    assert!(
                        want.iter().all(|e| e.0 != usize::MAX),
                        "every element emitted"
                    );
                    for threads in 1..=4 {
                        let team = Team::new();
                        let got = pool(threads).install(|| team.lead(threads, || run(Some(&team))));
                        assert_eq!(
                            got, want,
                            "{format:?} n {n} m {m} isa {isa} threads {threads}"
                        );
                    }
                }
            }
        }
    }
}
