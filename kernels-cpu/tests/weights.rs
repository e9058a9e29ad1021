//! Bit-exactness of the weight kernels: every format, every available dispatch path, against
//! `golden::ops::{weight_acc, weight_op}` (docs/numerics.md N12-N15).

use proptest::prelude::*;
use tessera_golden::numerics::{round_shift, sat, Datapath};
use tessera_golden::ops::{weight_acc, weight_op, OutputStage};
use tessera_golden::pack::WeightFormat;
use tessera_golden::quant::{QuantWeights, TERNARY_ZERO_U8};
use tessera_kernels_cpu::{Isa, PreparedWeights, Scratch};

const FORMATS: [WeightFormat; 4] = [
    WeightFormat::W2,
    WeightFormat::W4,
    WeightFormat::W8,
    WeightFormat::Ternary,
];

fn dp(group_len: usize, w_scale_bits: u32, acc_bits: u32) -> Datapath {
    Datapath {
        w_group_len: group_len,
        w_scale_bits,
        acc_bits,
        kv_group_len: 16,
        kv_recent_window: 16,
    }
}

/// A tiny deterministic generator (splitmix64) so edge tests need no proptest machinery.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    Random,
    /// Codes at max, zero 0, gscale 2^SF: every G has the sign of S.
    Max,
    /// Like Max but zero points 255 and codes 0.
    MinCode,
}

#[allow(clippy::too_many_arguments)]
fn make_weights(
    format: WeightFormat,
    n_rows: usize,
    k: usize,
    group_len: usize,
    w_scale_bits: u32,
    fill: Fill,
    rng: &mut Rng,
) -> QuantWeights {
    let groups = k.div_ceil(group_len);
    let one = 1u64 << (w_scale_bits - 1);
    let max_code = u64::from(format.max_code());
    let codes: Vec<u8> = (0..n_rows * k)
        .map(|_| match fill {
            Fill::Random => rng.below(max_code + 1) as u8,
            Fill::Max => max_code as u8,
            Fill::MinCode => 0,
        })
        .collect();
    let gscale: Vec<u16> = (0..n_rows * groups)
        .map(|_| match (fill, rng.below(8)) {
            (Fill::Random, 0) => 0, // zero-range group
            (Fill::Random, 1) => one as u16,
            (Fill::Random, _) => rng.below(one + 1) as u16,
            _ => one as u16,
        })
        .collect();
    let zero: Vec<u8> = (0..n_rows * groups)
        .map(|_| {
            if format == WeightFormat::Ternary {
                TERNARY_ZERO_U8
            } else {
                match fill {
                    Fill::Random => rng.below(256) as u8,
                    Fill::Max => 0,
                    Fill::MinCode => 255,
                }
            }
        })
        .collect();
    QuantWeights::from_codes(
        format,
        n_rows,
        k,
        group_len,
        w_scale_bits,
        &codes,
        gscale,
        zero,
        vec![1.0; n_rows],
    )
    .expect("valid test tensor")
}

fn check_all_paths(w: &QuantWeights, d: &Datapath, x: &[i8], m: usize) {
    let want_acc = weight_acc(d, x, m, w).expect("golden acc");
    let stage = OutputStage::weight_lattice_i32(d.w_scale_bits - 1);
    let want_y = weight_op(d, x, m, w, &stage).expect("golden op");
    let p = PreparedWeights::from(w);
    let n = w.n_rows();
    let mut scratch = Scratch::new();
    for isa in Isa::available() {
        let mut acc = vec![0i64; m * n];
        let mut y = vec![0i32; m * n];
        p.gemm(isa, d, x, m, &stage, &mut scratch, &mut acc, &mut y)
            .expect("kernel");
        for t in 0..m {
            assert_eq!(
                &acc[t * n..(t + 1) * n],
                &want_acc[t][..],
                "acc, isa {isa}, format {}, n {n}, k {}, L {}, m {m}, token {t}, acc_bits {}",
                w.format(),
                w.k(),
                w.k_group_len(),
                d.acc_bits
            );
            let want: Vec<i32> = want_y[t].iter().map(|&v| v as i32).collect();
            assert_eq!(&y[t * n..(t + 1) * n], &want[..], "y, isa {isa}");
        }
        check_epilogue(&p, isa, d, x, m, &stage, &want_y, &mut scratch);
    }
}

/// `gemm_epilogue` hands every (token, row) golden's N14 output exactly once, with the right
/// indices, into the right part: outputs split into parts (one empty, boundaries inside a
/// GEMM sub-block) whose elements record `(t, row, y)`.
#[allow(clippy::too_many_arguments)]
fn check_epilogue(
    p: &PreparedWeights,
    isa: Isa,
    d: &Datapath,
    x: &[i8],
    m: usize,
    stage: &OutputStage,
    want_y: &[Vec<i64>],
    scratch: &mut Scratch,
) {
    let n = p.n_rows();
    for cuts in [
        vec![n],
        vec![0, n.min(5), n],
        vec![n / 3, n / 3, n - n / 3 - 1, n],
    ] {
        let mut bufs: Vec<Vec<(usize, usize, i32)>> = Vec::new();
        let mut prev = 0;
        for &c in &cuts {
            let c = c.clamp(prev, n);
            bufs.push(vec![(usize::MAX, 0, 0); m * (c - prev)]);
            prev = c;
        }
        let mut outs: Vec<&mut [(usize, usize, i32)]> =
            bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        p.gemm_epilogue(isa, d, x, m, stage, scratch, &mut outs, |t, row, y, out| {
            for (i, (o, &v)) in out.iter_mut().zip(y).enumerate() {
                assert_eq!(o.0, usize::MAX, "(t {t}, row {}) emitted twice", row + i);
                *o = (t, row + i, v);
            }
        })
        .expect("epilogue kernel");
        let mut row0 = 0;
        for b in &bufs {
            let np = b.len() / m;
            for t in 0..m {
                for j in 0..np {
                    let r = row0 + j;
                    assert_eq!(
                        b[t * np + j],
                        (t, r, want_y[t][r] as i32),
                        "epilogue, isa {isa}, n {n}, m {m}, parts {cuts:?}"
                    );
                }
            }
            row0 += np;
        }
    }
}

#[test]
fn dispatch_paths_present() {
    let avail = Isa::available();
    assert!(avail.contains(&Isa::Scalar));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(avail.contains(&Isa::Avx2), "AVX2 detected but not offered");
    }
    eprintln!("{}", Isa::cpu_features());
}

#[test]
fn odd_shapes_all_formats_random() {
    let mut rng = Rng(7);
    for format in FORMATS {
        for &k in &[1usize, 3, 31, 32, 33, 97, 130, 1000, 1031] {
            for &l in &[8usize, 16, 32, 64, 128, 5, 48, 200] {
                let l = l.min(k.max(1));
                let w = make_weights(format, 9, k, l, 16, Fill::Random, &mut rng);
                for &m in &[1usize, 2, 5] {
                    let x: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
                    check_all_paths(&w, &dp(l, 16, 48), &x, m);
                }
            }
        }
    }
}

#[test]
fn large_shapes_run_in_parallel() {
    // Above the sequential threshold (128 Ki MACs): the rayon split over rows is exercised.
    let mut rng = Rng(13);
    for format in FORMATS {
        for &(n, k, l) in &[(257usize, 640usize, 32usize), (130, 1100, 64)] {
            let w = make_weights(format, n, k, l, 16, Fill::Random, &mut rng);
            for &m in &[1usize, 3] {
                let x: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
                check_all_paths(&w, &dp(l, 16, 48), &x, m);
                check_all_paths(&w, &dp(l, 16, 32), &x, m);
            }
        }
    }
}

#[test]
fn extremes_minus_128_and_max_codes() {
    let mut rng = Rng(11);
    for format in FORMATS {
        for fill in [Fill::Max, Fill::MinCode] {
            for &(k, l) in &[(128usize, 128usize), (97, 32), (33, 8), (1000, 64)] {
                let w = make_weights(format, 5, k, l, 16, fill, &mut rng);
                for xv in [-128i8, 127, -1] {
                    let x = vec![xv; 3 * k];
                    check_all_paths(&w, &dp(l, 16, 48), &x, 3);
                    check_all_paths(&w, &dp(l, 16, 32), &x, 3);
                }
            }
        }
    }
}

#[test]
fn saturation_per_group_in_order_acc_bits_32() {
    // Large positive groups first (saturating at 2^31 - 1), then negative ones: the result
    // depends on saturating after every group, which the kernels must preserve.
    let mut rng = Rng(3);
    for (format, l) in FORMATS
        .into_iter()
        .flat_map(|f| [(f, 64usize), (f, 32), (f, 16)])
    {
        let k = 4096usize;
        let w = make_weights(format, 6, k, l, 16, Fill::Max, &mut rng);
        let mut x = vec![-128i8; k];
        for v in &mut x[..3 * k / 4] {
            *v = 127;
        }
        // Make some groups zero-range by hand is covered elsewhere; here every gscale is 2^15.
        for acc_bits in [32u32, 33, 40, 48] {
            check_all_paths(&w, &dp(l, 16, acc_bits), &x, 1);
            let x2: Vec<i8> = x.iter().chain(x.iter().rev()).copied().collect();
            check_all_paths(&w, &dp(l, 16, acc_bits), &x2, 2);
            // Signs alternating per group (and per pair of groups): every group addition
            // saturates on its own, so skipping one intermediate saturation changes the result.
            for period in [1usize, 2, 3] {
                let x3: Vec<i8> = (0..k)
                    .map(|j| if (j / l / period) % 2 == 0 { 127 } else { -128 })
                    .collect();
                check_all_paths(&w, &dp(l, 16, acc_bits), &x3, 1);
                let x4: Vec<i8> = x3
                    .iter()
                    .chain(&x3)
                    .chain(x3.iter().rev())
                    .copied()
                    .collect();
                check_all_paths(&w, &dp(l, 16, acc_bits), &x4, 3);
            }
        }
    }
}

#[test]
fn gemv_equals_gemm_rows_n15() {
    let mut rng = Rng(5);
    let (n, k, l) = (37usize, 200usize, 32usize);
    for format in FORMATS {
        let w = make_weights(format, n, k, l, 12, Fill::Random, &mut rng);
        let p = PreparedWeights::from(&w);
        let d = dp(l, 12, 40);
        let m = 9;
        let x: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
        let mut scratch = Scratch::for_weights(&p, m);
        for isa in Isa::available() {
            let mut acc = vec![0i64; m * n];
            p.gemm_acc(isa, &d, &x, m, &mut scratch, &mut acc)
                .expect("gemm");
            for t in 0..m {
                let mut one = vec![0i64; n];
                p.gemm_acc(isa, &d, &x[t * k..(t + 1) * k], 1, &mut scratch, &mut one)
                    .expect("gemv");
                assert_eq!(&acc[t * n..(t + 1) * n], &one[..], "isa {isa} token {t}");
            }
        }
    }
}

#[test]
fn errors_on_bad_shapes() {
    let mut rng = Rng(1);
    let w = make_weights(WeightFormat::W2, 4, 64, 32, 16, Fill::Random, &mut rng);
    let p = PreparedWeights::from(&w);
    let mut s = Scratch::new();
    let mut acc = vec![0i64; 4];
    let x = vec![0i8; 64];
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(32, 16, 49), &x, 1, &mut s, &mut acc)
        .is_err());
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(64, 16, 48), &x, 1, &mut s, &mut acc)
        .is_err());
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(32, 15, 48), &x, 1, &mut s, &mut acc)
        .is_err());
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(32, 16, 48), &x[..63], 1, &mut s, &mut acc)
        .is_err());
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(32, 16, 48), &x, 0, &mut s, &mut acc)
        .is_err());
    assert!(p
        .gemm_acc(Isa::Scalar, &dp(32, 16, 48), &x, 1, &mut s, &mut acc[..3])
        .is_err());
}

#[test]
fn force_isa_names_parse() {
    assert_eq!(Isa::parse("scalar"), Some(Isa::Scalar));
    assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
    assert_eq!(Isa::parse("avx512vnni"), Some(Isa::Avx512Vnni));
    assert_eq!(Isa::parse("sse"), None);
}

fn format_strategy() -> impl Strategy<Value = WeightFormat> {
    prop::sample::select(FORMATS.to_vec())
}

fn act_strategy() -> impl Strategy<Value = i8> {
    prop_oneof![
        3 => any::<i8>(),
        1 => Just(-128i8),
        1 => Just(127i8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn prop_weight_op_matches_golden(
        format in format_strategy(),
        n in 1usize..24,
        k in 1usize..400,
        l_pick in 0usize..8,
        m in 1usize..7,
        w_scale_bits in 8u32..=16,
        acc_bits in 32u32..=48,
        seed in any::<u64>(),
        xs in prop::collection::vec(act_strategy(), 2400),
    ) {
        let l = [8usize, 16, 32, 64, 128, 1, 3, 47][l_pick].min(k);
        let mut rng = Rng(seed);
        let w = make_weights(format, n, k, l, w_scale_bits, Fill::Random, &mut rng);
        check_all_paths(&w, &dp(l, w_scale_bits, acc_bits), &xs[..m * k], m);
    }
}

/// The folded path (rows whose bound proves no saturation) next to the ordered per-group path
/// in one call: row `r`'s group scales are `2^SF >> (r % 12)` (group 0 exactly `2^SF`, the
/// `-32768` case of the `i16` multiplier), so at small `acc_bits` the first rows may saturate
/// and the later ones cannot.
#[test]
fn folded_and_ordered_rows_in_one_call() {
    let mut rng = Rng(17);
    for format in FORMATS {
        for &(k, l) in &[
            (1100usize, 32usize),
            (1100, 64),
            (700, 96),
            (1031, 128),
            (600, 47),
        ] {
            let n = 24;
            let groups = k.div_ceil(l);
            let q = make_weights(format, n, k, l, 16, Fill::Random, &mut rng);
            let gscale: Vec<u16> = (0..n * groups)
                .map(|i| {
                    let (r, g) = (i / groups, i % groups);
                    let full = 1u16 << 15 >> (r % 12);
                    if g == 0 {
                        full
                    } else {
                        full - (rng.below(u64::from(full) / 2 + 1) as u16)
                    }
                })
                .collect();
            let w = QuantWeights::from_codes(
                format,
                n,
                k,
                l,
                16,
                &q.codes(),
                gscale.clone(),
                q.zero_u8().to_vec(),
                vec![1.0; n],
            )
            .expect("tensor");
            for acc_bits in [32u32, 36, 40, 48] {
                let hi = (1u64 << (acc_bits - 1)) - 1;
                let bound = |r: usize| -> u64 {
                    (0..groups)
                        .map(|g| {
                            let len = l.min(k - g * l) as u64;
                            u64::from(gscale[r * groups + g]) * len * 128 * 255
                        })
                        .sum()
                };
                let fast = (0..n).filter(|&r| bound(r) <= hi).count();
                if acc_bits == 36 {
                    assert!(
                        fast > 0 && fast < n,
                        "both paths in one call ({fast} of {n})"
                    );
                }
                for &m in &[1usize, 3, 17] {
                    let x: Vec<i8> = (0..m * k)
                        .map(|j| match j % 7 {
                            0 => -128,
                            1 => 127,
                            _ => rng.next() as i8,
                        })
                        .collect();
                    check_all_paths(&w, &dp(l, 16, acc_bits), &x, m);
                }
            }
        }
    }
}

/// The folded GEMM's token blocks (16 tokens) and chunk tails (`groups * cg % 4 != 0`), the
/// `i32` widening points (every 32 W2 / 8 W4 chunks) at the largest lanes: codes at max,
/// activations -128, every `gscale = 2^SF`.
#[test]
fn folded_token_blocks_tails_and_widening_extremes() {
    let mut rng = Rng(23);
    for format in FORMATS {
        for &(k, l) in &[
            (32 * 33usize, 32usize),
            (32 * 35, 64),
            (32 * 41, 128),
            (5 * 32 + 7, 32),
        ] {
            for fill in [Fill::Max, Fill::Random] {
                let w = make_weights(format, 5, k, l, 16, fill, &mut rng);
                for &m in &[16usize, 33] {
                    let x: Vec<i8> = (0..m * k)
                        .map(|j| if j % 5 == 0 { rng.next() as i8 } else { -128 })
                        .collect();
                    check_all_paths(&w, &dp(l, 16, 48), &x, m);
                    let x = vec![-128i8; m * k];
                    check_all_paths(&w, &dp(l, 16, 48), &x, m);
                }
            }
        }
    }
}

/// The tiled folded GEMM (`avx2.rs`: two rows by four tokens over k-blocks of 32 W2 / 8 W4
/// chunks): token tails (`m % 4` = 1, 2, 3), an odd folded row left alone, pairs of folded
/// rows that are not adjacent (a saturating row between them at `acc_bits = 36`), several
/// k-blocks with groups straddling a block boundary (`L = 96, 47, 200`), group scales `2^SF`
/// (the doubled-code case) next to small ones.
#[test]
fn tiled_fold_token_tails_row_pairs_and_kblocks() {
    let mut rng = Rng(29);
    for format in [WeightFormat::W2, WeightFormat::W4, WeightFormat::Ternary] {
        for &(k, l) in &[
            (32 * 70 + 5usize, 32usize),
            (32 * 70, 64),
            (32 * 67, 128),
            (32 * 66 + 3, 96),
            (1031, 47),
            (1100, 200),
        ] {
            let n = 11;
            let groups = k.div_ceil(l);
            let q = make_weights(format, n, k, l, 16, Fill::Random, &mut rng);
            // Rows 0, 3, 6, 9 at full scale (they saturate at acc_bits 36), the others small.
            let gscale: Vec<u16> = (0..n * groups)
                .map(|i| {
                    let (r, g) = (i / groups, i % groups);
                    let full = if r % 3 == 0 { 1u16 << 15 } else { 1 << 7 };
                    if g % 5 == 0 {
                        full
                    } else {
                        rng.below(u64::from(full) + 1) as u16
                    }
                })
                .collect();
            let w = QuantWeights::from_codes(
                format,
                n,
                k,
                l,
                16,
                &q.codes(),
                gscale,
                q.zero_u8().to_vec(),
                vec![1.0; n],
            )
            .expect("tensor");
            for &m in &[2usize, 4, 5, 6, 7, 9, 130] {
                let x: Vec<i8> = (0..m * k)
                    .map(|j| match j % 11 {
                        0 | 3 => -128,
                        1 => 127,
                        _ => rng.next() as i8,
                    })
                    .collect();
                for acc_bits in [36u32, 48] {
                    check_all_paths(&w, &dp(l, 16, acc_bits), &x, m);
                }
            }
        }
    }
}

/// `gemm_epilogue` with stages other than the weight lattice (a multiplier, the identity, a
/// narrow `out_bits` that saturates), so the sub-blocks take `apply_stage`'s general branches;
/// large enough to run in parallel.
#[test]
fn gemm_epilogue_other_stages() {
    let mut rng = Rng(29);
    for (n, k, m) in [(37usize, 300usize, 5usize), (200, 640, 19)] {
        let w = make_weights(WeightFormat::W4, n, k, 32, 16, Fill::Random, &mut rng);
        let p = PreparedWeights::from(&w);
        let d = dp(32, 16, 48);
        let x: Vec<i8> = (0..m * k).map(|_| rng.next() as i8).collect();
        let mut scratch = Scratch::new();
        for stage in [
            OutputStage {
                out_mult: 3,
                out_shift: 20,
                out_bits: 16,
            },
            OutputStage::IDENTITY_I32,
            OutputStage {
                out_mult: 1,
                out_shift: 9,
                out_bits: 8,
            },
        ] {
            let want_y = weight_op(&d, &x, m, &w, &stage).expect("golden op");
            for isa in Isa::available() {
                check_epilogue(&p, isa, &d, &x, m, &stage, &want_y, &mut scratch);
            }
        }
    }
}

#[test]
fn apply_stage_equals_golden_n14() {
    let mut rng = Rng(11);
    let mut acc: Vec<i64> = vec![
        0,
        1,
        -1,
        i64::MAX,
        i64::MIN,
        i64::MAX - 1,
        i64::MIN + 1,
        1 << 62,
        -(1 << 62),
        (1 << 62) - 1,
        -(1 << 62) + 1,
        1 << 47,
        -(1 << 47),
    ];
    for _ in 0..2000 {
        let bits = rng.next() % 64;
        let v = rng.next() as i64 >> (63 - bits);
        acc.push(v);
    }
    for shift in 0..=62u32 {
        for (mult, out_bits) in [(1u16, 32u32), (1, 16), (3, 32), (1, 8)] {
            let stage = OutputStage {
                out_mult: mult,
                out_shift: shift,
                out_bits,
            };
            // `apply_stage`'s products are exact for |acc| <= 2^47 only when out_mult > 1.
            let xs: Vec<i64> = if mult == 1 {
                acc.clone()
            } else {
                acc.iter().map(|&a| a.clamp(-(1 << 47), 1 << 47)).collect()
            };
            // Also a slice with every value below 2^62 (the stage's one-pass branch).
            let small: Vec<i64> = xs
                .iter()
                .copied()
                .filter(|a| a.unsigned_abs() < 1 << 62)
                .collect();
            for xs in [&xs, &small] {
                let mut y = vec![0i32; xs.len()];
                tessera_kernels_cpu::apply_stage(&stage, xs, &mut y).expect("stage");
                for (&a, &got) in xs.iter().zip(&y) {
                    // golden's N14 (`OutputStage::apply` without its |acc| <= 2^47 precondition).
                    let want = sat(round_shift(a * i64::from(mult), shift), out_bits);
                    assert_eq!(i64::from(got), want, "acc {a} stage {stage:?}");
                    if a.unsigned_abs() <= 1 << 47 {
                        assert_eq!(want, stage.apply(a));
                    }
                }
            }
        }
    }
}

/// The GEMV quad path (W2 / ternary with one chunk a group; `avx2.rs`): group counts with every
/// remainder mod 4 (the padded last quad), more than 8 quads (the `i32` widening) and more than
/// 64 groups (the zero term's widening), short groups (`L < 32`, padded chunks), scales of
/// exactly `2^15` and 0, codes at max with activations -128 (the largest lanes), and at small
/// `acc_bits` rows that may saturate (the ordered path) next to folded ones in one call.
#[test]
fn gemv_quads_tails_scales_and_saturating_rows() {
    let mut rng = Rng(29);
    for format in [WeightFormat::W2, WeightFormat::Ternary] {
        for &(k, l) in &[
            (32 * 4 * 9usize, 32usize),
            (32 * 4 * 9 + 32 * 3, 32),
            (4100, 32),
            (33, 32),
            (97, 32),
            (64 + 1, 32),
            (1000, 16),
            (515, 8),
            (301, 5),
            (200, 31),
            (7, 1),
        ] {
            let n = 21;
            let groups = k.div_ceil(l);
            for fill in [Fill::Random, Fill::Max, Fill::MinCode] {
                let q = make_weights(format, n, k, l, 16, fill, &mut rng);
                // Row r: scales 2^15 >> (r % 12) with some exactly 2^15 and some 0 (random
                // fill), or as generated.
                let gscale: Vec<u16> = (0..n * groups)
                    .map(|i| {
                        let (r, g) = (i / groups, i % groups);
                        let full = 1u16 << 15 >> (r % 12);
                        match (fill, g % 5, rng.below(3)) {
                            (Fill::Random, 0, _) => full,
                            (Fill::Random, 1, 0) => 0,
                            (Fill::Random, _, _) => rng.below(u64::from(full) + 1) as u16,
                            _ => q.gscale_q()[i],
                        }
                    })
                    .collect();
                let w = QuantWeights::from_codes(
                    format,
                    n,
                    k,
                    l,
                    16,
                    &q.codes(),
                    gscale,
                    q.zero_u8().to_vec(),
                    vec![1.0; n],
                )
                .expect("tensor");
                let xs: [Vec<i8>; 3] = [
                    (0..k)
                        .map(|j| if j % 3 == 0 { -128 } else { rng.next() as i8 })
                        .collect(),
                    vec![-128i8; k],
                    vec![127i8; k],
                ];
                for x in &xs {
                    for acc_bits in [48u32, 40, 36, 32] {
                        check_all_paths(&w, &dp(l, 16, acc_bits), x, 1);
                    }
                }
            }
        }
    }
}

/// Stacked tensors ([`PreparedWeights::concat_rows`], e.g. Q, K and V) keep every part's rows
/// on every GEMV path, the quad copy included.
#[test]
fn concat_rows_gemv_equals_parts() {
    let mut rng = Rng(31);
    for format in FORMATS {
        for &(k, l) in &[(576usize, 32usize), (1000, 16), (97, 32), (130, 64)] {
            let parts: Vec<QuantWeights> = [7usize, 3, 12]
                .iter()
                .map(|&n| make_weights(format, n, k, l, 16, Fill::Random, &mut rng))
                .collect();
            let prepared: Vec<PreparedWeights> = parts.iter().map(PreparedWeights::from).collect();
            let refs: Vec<&PreparedWeights> = prepared.iter().collect();
            let cat = PreparedWeights::concat_rows(&refs).expect("same shape");
            let d = dp(l, 16, 48);
            let x: Vec<i8> = (0..k).map(|_| rng.next() as i8).collect();
            let want: Vec<i64> = parts
                .iter()
                .flat_map(|p| weight_acc(&d, &x, 1, p).expect("golden")[0].clone())
                .collect();
            let mut scratch = Scratch::new();
            for isa in Isa::available() {
                let mut acc = vec![0i64; want.len()];
                cat.gemm_acc(isa, &d, &x, 1, &mut scratch, &mut acc)
                    .expect("gemv");
                assert_eq!(acc, want, "isa {isa}, format {format}, k {k}, L {l}");
            }
        }
    }
}

/// The tiled quad GEMM (`avx2.rs`, W2 / ternary with one chunk a group: one row by eight
/// tokens over k-blocks of 8 quads, or 7 and the tail chunks; on AVX-512 VNNI token-major,
/// 16 tokens a vector, rows in fours and tiles in blocks; rows longer than `TOK_MAX_K` (k =
/// `32 * 130`) on the AVX2 quad GEMM there), and the folded GEMM it replaced
/// for those tensors (switched by `set_gemm_quad`; the switch is process-wide, so other tests
/// running meanwhile may take either path: both are exact). Every token tail (`m % 8` = 0..7),
/// quads with 0-3 tail groups, one and several k-blocks (32 groups exactly one block, 33 and 35
/// with the tail joining a 7-quad block), extremes (codes at max with `gscale = 2^SF` and
/// activations -128: the doubled-code lanes and the largest `i32` lanes; zero points 255 with
/// full scales: the largest `gscale * zero`, `hi = 255`; random scales and zero points give
/// any `lo`), and saturating rows (ordered path) among folded ones at `acc_bits = 36`.
#[test]
fn quad_gemm_token_tails_kblocks_and_extremes() {
    let mut rng = Rng(31);
    for quad_on in [false, true] {
        tessera_kernels_cpu::set_gemm_quad(quad_on);
        for format in [WeightFormat::W2, WeightFormat::Ternary] {
            for &k in &[
                128usize,
                160,
                288,
                448,
                576,
                32 * 32,
                32 * 33,
                32 * 35,
                1536,
                32 * 71 - 5,
                32 * 130,
            ] {
                for fill in [Fill::Random, Fill::Max, Fill::MinCode] {
                    let w = make_weights(format, 9, k, 32, 16, fill, &mut rng);
                    for m in (2usize..=17).chain([29, 40]) {
                        if fill != Fill::Random && m % 3 != 0 {
                            continue;
                        }
                        let x: Vec<i8> = (0..m * k)
                            .map(|j| match j % 5 {
                                0 => rng.next() as i8,
                                1 => 127,
                                _ => -128,
                            })
                            .collect();
                        for acc_bits in [36u32, 48] {
                            check_all_paths(&w, &dp(32, 16, acc_bits), &x, m);
                        }
                    }
                }
            }
        }
    }
    tessera_kernels_cpu::set_gemm_quad(true);
}
