//! Bit-exactness of the A8 x KV4 products: `KvHeadCpu::{qk, pv}` on every available dispatch
//! path against `golden::kv::KvCache::{qk, pv}` (docs/numerics.md N16-N19).

use proptest::prelude::*;
use tessera_golden::kv::fold_i8;
use tessera_golden::kv::KvCache;
use tessera_golden::numerics::Datapath;
use tessera_golden::ops::OutputStage;
use tessera_kernels_cpu::kv::fold_into;
use tessera_kernels_cpu::{Isa, KvHeadCpu, KvScratch, Pv2Out, ValueFolds};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn i8(&mut self) -> i8 {
        match self.next() % 6 {
            0 => -128,
            1 => 127,
            _ => self.next() as i8,
        }
    }
}

fn compare(cache: &KvCache, mirror: &KvHeadCpu, q: &[i8], p: &[i8], stage: &OutputStage) {
    compare_at(cache, mirror, cache.len(), q, p, stage);
}

/// The mirror's products at length `n` against golden's `cache` (which holds `n` tokens).
fn compare_at(
    cache: &KvCache,
    mirror: &KvHeadCpu,
    n: usize,
    q: &[i8],
    p: &[i8],
    stage: &OutputStage,
) {
    let hd = cache.head_dim();
    assert_eq!(cache.len(), n);
    let want_qk = cache.qk(q, stage).expect("golden qk");
    let want_acc: Vec<i64> = want_qk
        .groups4
        .iter()
        .flat_map(|g| g.acc_i64.iter().copied())
        .chain(want_qk.window_acc_i64.iter().copied())
        .collect();
    let want_y: Vec<i32> = want_qk
        .groups4
        .iter()
        .flat_map(|g| g.y_i64.iter().copied())
        .chain(want_qk.window_y_i64.iter().copied())
        .map(|v| v as i32)
        .collect();
    let want_pv = cache.pv(p, stage).expect("golden pv");
    let mut scratch = KvScratch::default();
    for isa in Isa::available() {
        let mut acc = vec![0i64; n];
        let mut y = vec![0i32; n];
        mirror
            .qk_at(isa, n, q, stage, &mut scratch, &mut acc, &mut y)
            .expect("qk");
        assert_eq!(acc, want_acc, "qk acc, isa {isa}, n {n}, hd {hd}");
        assert_eq!(y, want_y, "qk y, isa {isa}");
        let (mut a4, mut aw) = (vec![0i64; hd], vec![0i64; hd]);
        let (mut y4, mut yw) = (vec![0i32; hd], vec![0i32; hd]);
        let (s4, sw) = mirror
            .pv_at(
                isa,
                n,
                p,
                stage,
                &mut scratch,
                &mut a4,
                &mut aw,
                &mut y4,
                &mut yw,
            )
            .expect("pv");
        assert_eq!(s4.to_bits(), want_pv.kv4.s_ref.to_bits(), "pv kv4 s_ref");
        assert_eq!(
            sw.to_bits(),
            want_pv.window.s_ref.to_bits(),
            "pv window s_ref"
        );
        // Both planes in one pass: a second plane derived from the first.
        let p2: Vec<i8> = p.iter().rev().map(|&x| x.wrapping_mul(3)).collect();
        let want2 = cache.pv(&p2, stage).expect("golden pv");
        let mut o2 = Pv2Out::default();
        let r = mirror
            .pv2_at(isa, n, None, p, &p2, stage, &mut scratch, &mut o2)
            .expect("pv2");
        assert_eq!(r, (s4, sw));
        let y = |v: &[i64]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        assert_eq!(
            o2.y4_hi,
            y(&want_pv.kv4.y_i64),
            "pv2 hi kv4, isa {isa}, n {n}"
        );
        assert_eq!(
            o2.yw_hi,
            y(&want_pv.window.y_i64),
            "pv2 hi window, isa {isa}"
        );
        assert_eq!(
            o2.y4_lo,
            y(&want2.kv4.y_i64),
            "pv2 lo kv4, isa {isa}, n {n}"
        );
        assert_eq!(o2.yw_lo, y(&want2.window.y_i64), "pv2 lo window, isa {isa}");
        let want_ws: Vec<f32> = want_qk.window_scale_k.clone();
        assert_eq!(
            mirror.window_key_scales_at(n),
            &want_ws[..],
            "window key scales"
        );
        for (j, g) in want_qk.groups4.iter().enumerate() {
            assert_eq!(mirror.key_group_s_ref(j).to_bits(), g.s_ref.to_bits());
        }
        assert_eq!(
            a4, want_pv.kv4.acc_i64,
            "pv kv4 acc, isa {isa}, n {n}, hd {hd}"
        );
        assert_eq!(aw, want_pv.window.acc_i64, "pv window acc, isa {isa}");
        let w4: Vec<i32> = want_pv.kv4.y_i64.iter().map(|&v| v as i32).collect();
        let ww: Vec<i32> = want_pv.window.y_i64.iter().map(|&v| v as i32).collect();
        assert_eq!(y4, w4, "pv kv4 y, isa {isa}");
        assert_eq!(yw, ww, "pv window y, isa {isa}");
    }
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    hd: usize,
    group: usize,
    window: usize,
    tokens: usize,
    w_scale_bits: u32,
    acc_bits: u32,
    stage: OutputStage,
    seed: u64,
    check_every: usize,
) {
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits,
        acc_bits,
        kv_group_len: group,
        kv_recent_window: window,
    };
    let mut rng = Rng(seed);
    let mut cache = KvCache::new(&dp, hd).expect("cache");
    let mut mirror = KvHeadCpu::new(&dp, hd);
    for step in 0..tokens {
        // Channel-dependent magnitudes (outlier channels), some all-zero tokens.
        let zero_tok = rng.next().is_multiple_of(17);
        let k: Vec<f32> = (0..hd)
            .map(|c| {
                if zero_tok {
                    0.0
                } else {
                    rng.f32() * (1.0 + (c % 5) as f32 * 3.0)
                }
            })
            .collect();
        let v: Vec<f32> = (0..hd)
            .map(|_| if zero_tok { 0.0 } else { rng.f32() * 2.0 })
            .collect();
        cache.push(&k, &v).expect("push");
        if step % check_every == check_every - 1 || step + 1 == tokens {
            mirror.sync(&cache).expect("sync");
            assert_eq!(mirror.len(), cache.len());
            let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
            let p: Vec<i8> = (0..cache.len()).map(|_| rng.i8()).collect();
            compare(&cache, &mirror, &q, &p, &stage);
            let q_min = vec![-128i8; hd];
            let p_max = vec![127i8; cache.len()];
            compare(&cache, &mirror, &q_min, &p_max, &stage);
        }
    }
}

#[test]
fn kv_products_match_golden_shapes() {
    let id = OutputStage::IDENTITY_I32;
    for &hd in &[1usize, 3, 17, 32, 64, 65] {
        for &(group, window) in &[
            (1usize, 0usize),
            (4, 4),
            (16, 0),
            (16, 32),
            (32, 32),
            (5, 10),
        ] {
            run_case(
                hd,
                group,
                window,
                90,
                16,
                48,
                id,
                hd as u64 * 31 + group as u64,
                7,
            );
        }
    }
}

#[test]
fn kv_products_saturate_and_requantize() {
    // acc_bits 32 cannot saturate here (|acc| < 2^31 by N19), so use narrow output stages.
    for stage in [
        OutputStage {
            out_mult: 3,
            out_shift: 2,
            out_bits: 8,
        },
        OutputStage {
            out_mult: 65535,
            out_shift: 0,
            out_bits: 16,
        },
        OutputStage {
            out_mult: 1,
            out_shift: 62,
            out_bits: 32,
        },
    ] {
        run_case(64, 16, 16, 80, 8, 32, stage, 99, 13);
    }
}

#[test]
fn kv_long_context_value_capacity_growth() {
    run_case(64, 32, 32, 700, 16, 40, OutputStage::IDENTITY_I32, 5, 233);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn prop_kv_products_match_golden(
        hd in 1usize..80,
        group in 1usize..20,
        windows in 0usize..3,
        tokens in 0usize..120,
        w_scale_bits in 8u32..=16,
        acc_bits in 32u32..=48,
        seed in any::<u64>(),
    ) {
        run_case(hd, group, group * windows, tokens.max(1), w_scale_bits, acc_bits,
                 OutputStage::IDENTITY_I32, seed, 11);
    }
}

#[test]
fn fold_matches_golden_exhaustive_in_x() {
    let xs: Vec<i8> = (-128i16..=127).map(|v| v as i8).collect();
    for sf in 7u32..=15 {
        let one = 1u32 << sf;
        let mut ms: Vec<u32> = vec![0, 1, 2, one / 2, one / 2 + 1, one - 1, one];
        ms.extend((0..64u32).map(|i| i.wrapping_mul(2_654_435_761u32) % (one + 1)));
        for m in ms {
            let f = vec![m as u16; xs.len()];
            let mut out = vec![0i8; xs.len()];
            fold_into(&xs, &f, sf, &mut out);
            assert_eq!(out, fold_i8(&xs, &f, sf), "sf {sf} m {m}");
        }
    }
}

/// One token's key and value: outlier channels, and some special tokens (all zero, constant
/// over the channels, one -huge channel so that codes reach -127 and groups have zero range).
fn token(rng: &mut Rng, hd: usize, step: usize) -> (Vec<f32>, Vec<f32>) {
    match rng.next() % 9 {
        0 => (vec![0.0; hd], vec![0.0; hd]),
        1 => (vec![0.75; hd], vec![-2.0; hd]),
        2 => {
            let mut k = vec![0.0; hd];
            k[step % hd] = -1.0e3;
            (k.clone(), k)
        }
        _ => (
            (0..hd)
                .map(|c| rng.f32() * (1.0 + (c % 5) as f32 * 3.0))
                .collect(),
            (0..hd).map(|_| rng.f32() * 2.0).collect(),
        ),
    }
}

/// Incremental sync after every push equals golden (and a mirror built by one full sync) at
/// every length, across group boundaries and window evictions; with the history retained, the
/// products at every earlier length equal golden's cache as it was at that length.
fn run_history_case(hd: usize, group: usize, window: usize, tokens: usize, bits: u32, seed: u64) {
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: group,
        kv_recent_window: window,
    };
    let stage = OutputStage::IDENTITY_I32;
    let mut rng = Rng(seed);
    let mut cache = KvCache::with_bits(&dp, hd, bits).expect("cache");
    let mut inc = KvHeadCpu::new(&dp, hd);
    let mut hist = KvHeadCpu::new(&dp, hd);
    let mut snapshots = Vec::new();
    // A prefix before the retained part (as a decode before a prompt).
    let prefix = tokens / 3;
    for step in 0..tokens {
        let (k, v) = token(&mut rng, hd, step);
        cache.push(&k, &v).expect("push");
        inc.sync(&cache).expect("sync");
        hist.sync_retaining(&cache, step >= prefix).expect("sync");
        assert_eq!(inc.len(), cache.len());
        assert_eq!(inc.history_start(), cache.n4_tokens());
        let mut full = KvHeadCpu::new(&dp, hd);
        full.sync(&cache).expect("full sync");
        let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        let p: Vec<i8> = (0..cache.len()).map(|_| rng.i8()).collect();
        compare(&cache, &inc, &q, &p, &stage);
        compare(&cache, &full, &q, &p, &stage);
        compare(
            &cache,
            &inc,
            &vec![-128; hd],
            &vec![127; cache.len()],
            &stage,
        );
        if step >= prefix {
            snapshots.push(cache.clone());
        }
    }
    let mut folds = ValueFolds::default();
    for snap in &snapshots {
        let n = snap.len();
        let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        let p: Vec<i8> = (0..n).map(|_| rng.i8()).collect();
        compare_at(snap, &hist, n, &q, &p, &stage);
        // Folds computed once per length (4-bit part reused while n4 is unchanged).
        hist.value_folds_at(n, &mut folds).expect("folds");
        let want = snap.pv(&p, &stage).expect("golden pv");
        for isa in Isa::available() {
            let (mut a4, mut aw) = (vec![0i64; hd], vec![0i64; hd]);
            let (mut y4, mut yw) = (vec![0i32; hd], vec![0i32; hd]);
            let mut sc = KvScratch::default();
            let (s4, sw) = hist
                .pv_with(
                    isa, &folds, &p, &stage, &mut sc, &mut a4, &mut aw, &mut y4, &mut yw,
                )
                .expect("pv_with");
            assert_eq!(a4, want.kv4.acc_i64, "pv_with kv4, n {n}");
            assert_eq!(aw, want.window.acc_i64, "pv_with window, n {n}");
            assert_eq!(s4.to_bits(), want.kv4.s_ref.to_bits());
            assert_eq!(sw.to_bits(), want.window.s_ref.to_bits());
            let mut o2 = Pv2Out::default();
            let p_lo: Vec<i8> = p.iter().map(|&x| x.wrapping_add(1)).collect();
            let want_lo = snap.pv(&p_lo, &stage).expect("golden pv");
            hist.pv2_at(isa, n, Some(&folds), &p, &p_lo, &stage, &mut sc, &mut o2)
                .expect("pv2 with folds");
            let y = |v: &[i64]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
            assert_eq!(o2.y4_hi, y(&want.kv4.y_i64));
            assert_eq!(o2.yw_hi, y(&want.window.y_i64));
            assert_eq!(o2.y4_lo, y(&want_lo.kv4.y_i64));
            assert_eq!(o2.yw_lo, y(&want_lo.window.y_i64));
        }
        compare_at(snap, &hist, n, &vec![-128; hd], &vec![-128; n], &stage);
    }
    // Trimmed: the current length still works, lengths whose window was quantized do not.
    hist.trim_history();
    assert_eq!(hist.history_start(), cache.n4_tokens());
    let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
    let p: Vec<i8> = (0..cache.len()).map(|_| rng.i8()).collect();
    compare(&cache, &hist, &q, &p, &stage);
    if let Some(old) = snapshots
        .iter()
        .find(|s| hist.n4_at(s.len()) < cache.n4_tokens())
    {
        let n = old.len();
        let (mut acc, mut y) = (vec![0i64; n], vec![0i32; n]);
        let r = hist.qk_at(
            Isa::Scalar,
            n,
            &q,
            &stage,
            &mut KvScratch::default(),
            &mut acc,
            &mut y,
        );
        assert!(r.is_err(), "qk_at before the held history must fail");
    }
}

#[test]
fn kv_incremental_sync_and_history_match_golden() {
    for &hd in &[1usize, 7, 64, 65] {
        for &(group, window) in &[(1usize, 0usize), (4, 8), (8, 0), (5, 10), (32, 64)] {
            let tokens = 2 * (group + window) + 3 * group + 5;
            run_history_case(hd, group, window, tokens, 4, hd as u64 * 7 + group as u64);
        }
    }
    run_history_case(64, 32, 64, 70, 8, 3);
}

/// The fast N22 probability quantizer equals golden's on softmax-like rows, exact ties (codes
/// and half codes times the scale), values next to them, zeros, denormals and a single token.
#[test]
fn quantize_probs_matches_golden() {
    use tessera_golden::kv::quantize_probs;
    use tessera_kernels_cpu::kv::quantize_probs_into;
    let mut rng = Rng(77);
    let mut rows: Vec<Vec<f32>> = vec![
        vec![0.0; 5],
        vec![1.0],
        vec![1e-40, 3e-41, 0.0],
        vec![f32::MIN_POSITIVE, 0.0, 1e-45],
    ];
    // Ties: p = (k + 0.5) * scale and k * scale for max = 1 (scale = 1 / 16383), and neighbours.
    let scale = 1.0f32 / 16383.0;
    let mut ties = vec![1.0f32];
    for k in (0..16383).step_by(7) {
        for v in [(k as f32 + 0.5) * scale, k as f32 * scale] {
            ties.extend([
                v,
                f32::from_bits(v.to_bits().saturating_sub(1)),
                f32::from_bits(v.to_bits() + 1),
            ]);
        }
    }
    rows.push(ties);
    for len in [2usize, 17, 64, 300, 1000] {
        for _ in 0..20 {
            let s: Vec<f32> = (0..len).map(|_| rng.f32() * 12.0).collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|&v| (v - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            rows.push(e.iter().map(|&v| v / sum).collect());
        }
    }
    for row in &rows {
        let want = quantize_probs(row).expect("golden");
        let (mut hi, mut lo) = (vec![0i8; row.len()], vec![0i8; row.len()]);
        let got = quantize_probs_into(row, &mut hi, &mut lo).expect("valid row");
        assert_eq!(got.to_bits(), want.scale_p.to_bits());
        assert_eq!(hi, want.hi_i8);
        assert_eq!(lo, want.lo_i8);
    }
    let (mut hi, mut lo) = (vec![0i8; 2], vec![0i8; 2]);
    assert!(quantize_probs_into(&[0.5, -0.0001], &mut hi, &mut lo).is_none());
    assert!(quantize_probs_into(&[0.5, f32::NAN], &mut hi, &mut lo).is_none());
    assert!(quantize_probs_into(&[f32::INFINITY, 0.1], &mut hi, &mut lo).is_none());
}

/// The fast N5 query quantizer equals golden's `quantize_token`: random and outlier rows, exact
/// ties (`(k + 0.5) * scale`) and their neighbours of both signs, zeros, denormals.
#[test]
fn quantize_query_matches_golden() {
    use tessera_golden::quant::quantize_token;
    use tessera_kernels_cpu::kv::quantize_query_into;
    let mut rng = Rng(91);
    let mut rows: Vec<Vec<f32>> = vec![vec![0.0; 4], vec![-3.0], vec![1e-44, -3e-45, 0.0]];
    let scale = 1.0f32 / 127.0;
    let mut ties = vec![1.0f32];
    for k in 0..127 {
        for v in [(k as f32 + 0.5) * scale, k as f32 * scale] {
            for w in [
                v,
                f32::from_bits(v.to_bits().saturating_sub(1)),
                f32::from_bits(v.to_bits() + 1),
            ] {
                ties.extend([w, -w]);
            }
        }
    }
    rows.push(ties);
    for len in [1usize, 7, 64, 65] {
        for i in 0..50 {
            rows.push(
                (0..len)
                    .map(|c| rng.f32() * if c == i % len { 40.0 } else { 1.5 })
                    .collect(),
            );
        }
    }
    for row in &rows {
        let want = quantize_token(row).expect("golden");
        let mut got = vec![0i8; row.len()];
        let s = quantize_query_into(row, &mut got).expect("finite");
        assert_eq!(s.to_bits(), want.scale_x.to_bits());
        assert_eq!(got, want.codes_i8, "row {row:?}");
    }
    let mut out = vec![0i8; 2];
    assert!(quantize_query_into(&[1.0, f32::NAN], &mut out).is_none());
    assert!(quantize_query_into(&[f32::NEG_INFINITY, 1.0], &mut out).is_none());
}

/// `round_clamp` equals golden's `round_clamp_f32` on the code ranges the kernels use, at every
/// half-integer tie and its neighbours, at the range edges, infinities, and a float sweep.
#[test]
fn round_clamp_matches_golden() {
    use tessera_golden::numerics::round_clamp_f32;
    use tessera_kernels_cpu::kv::round_clamp;
    let mut ys = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        0.499_999_97,
        -0.499_999_97,
        1e30,
        -3e9,
    ];
    for n in -300..300 {
        let tie = n as f32 + 0.5;
        ys.extend([tie, tie.next_up(), tie.next_down(), n as f32]);
    }
    // Up to the fold multipliers' range [0, 2^SF] (SF <= 15), ties included.
    for n in (300..33_000).step_by(7).chain(32_760..32_776) {
        let tie = n as f32 + 0.5;
        ys.extend([tie, tie.next_up(), tie.next_down(), n as f32]);
    }
    let top = 512.0f32.to_bits();
    for bits in (0..top).step_by(97) {
        ys.extend([f32::from_bits(bits), -f32::from_bits(bits)]);
    }
    for (lo, hi) in [
        (0, 15),
        (-127, 127),
        (0, 255),
        (-1, 1),
        (0, 16383),
        (0, 2),
        (0, 256),
        (0, 1 << 15),
    ] {
        for &y in &ys {
            assert_eq!(
                i64::from(round_clamp(y, lo, hi)),
                round_clamp_f32(y, i64::from(lo), i64::from(hi)),
                "y = {y:e} in [{lo}, {hi}]"
            );
        }
    }
}

/// golden's `quantize_group_asym(w, 4)` and the kernels' allocation-free `quantize_kv4_into`:
/// the same codes, scale bits and zero point, and an error exactly where golden has one.
fn assert_kv4_group_matches(w: &[f32]) {
    use tessera_golden::quant::quantize_group_asym;
    use tessera_kernels_cpu::kv::quantize_kv4_into;
    let want = quantize_group_asym(w, 4);
    let mut codes = vec![0xAAu8; w.len()];
    let got = quantize_kv4_into(w, &mut codes);
    match (want, got) {
        (Ok(g), Some((scale, zero))) => {
            assert_eq!(scale.to_bits(), g.scale_g.to_bits(), "scale of {w:?}");
            assert_eq!(zero, g.zero_u8, "zero of {w:?}");
            assert_eq!(codes, g.codes, "codes of {w:?}");
        }
        (Err(_), None) => {}
        (want, got) => panic!("{w:?}: golden {want:?}, kernels {got:?}"),
    }
}

#[test]
fn quantize_kv4_matches_golden() {
    let mut rng = Rng(2024);
    let mut groups: Vec<Vec<f32>> = vec![
        vec![0.0],
        vec![0.0; 7],
        vec![1.5; 5],
        vec![-2.0; 4],
        vec![3e38, -3e38],
        vec![f32::MAX, 0.0],
        vec![f32::MAX, f32::MIN],
        vec![1.0, f32::NAN],
        vec![f32::INFINITY, 1.0],
        vec![1e-45, 0.0, -1e-45],
        vec![1e-44, 3e-45],
        vec![-1e-40; 3],
        vec![1e-38, -1e-38, 5e-39],
    ];
    // Ties: values whose quotient by the step lands on k + 0.5 (range 15, step 1).
    for k in 0..15 {
        groups.push(vec![0.0, 15.0, k as f32 + 0.5, -(k as f32) - 0.5]);
        groups.push(vec![-7.5, 7.5, k as f32 - 7.0]);
    }
    for len in [1usize, 2, 3, 16, 31, 32, 64, 65] {
        for i in 0..200 {
            let mag = [1e-30f32, 1e-3, 1.0, 1e3, 1e30][i % 5];
            let mut g: Vec<f32> = (0..len).map(|_| rng.f32() * mag).collect();
            if i % 7 == 0 {
                g[i % len] = -50.0 * mag;
            }
            if i % 11 == 0 {
                // 8-bit lattice values, as the cache's eviction sees them.
                let s = mag / 127.0;
                g = (0..len)
                    .map(|_| f32::from(rng.i8().max(-127)) * s)
                    .collect();
            }
            groups.push(g);
        }
    }
    // Non-finite values and signed zeros at every position of lengths that cut the
    // eight-lane min / max at different points (body lanes and the tail).
    for len in [3usize, 8, 9, 17, 33, 40] {
        for at in 0..len {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0] {
                let mut g: Vec<f32> = (0..len).map(|_| rng.f32()).collect();
                g[at] = bad;
                groups.push(g);
            }
        }
        groups.push(vec![-0.0; len]);
        groups.push(
            (0..len)
                .map(|i| if i % 2 == 0 { -0.0 } else { 0.0 })
                .collect(),
        );
    }
    for g in &groups {
        assert_kv4_group_matches(g);
    }
}

/// A token of the native-push sequences: zeros, equal values, huge and tiny magnitudes, one
/// outlier channel, mixed magnitudes, ordinary values.
fn push_token(rng: &mut Rng, hd: usize, huge_ok: bool) -> (Vec<f32>, Vec<f32>) {
    let one = |rng: &mut Rng| -> Vec<f32> {
        match rng.next() % 10 {
            0 => vec![0.0; hd],
            1 => vec![rng.f32() * 4.0; hd],
            2 if huge_ok => (0..hd).map(|_| rng.f32() * 3e38).collect(),
            2 => (0..hd).map(|_| rng.f32().abs() * 1e30).collect(),
            3 => (0..hd).map(|_| rng.f32() * 1e-39).collect(),
            4 => (0..hd).map(|_| rng.f32() * 1e-20).collect(),
            5 => {
                let mut v = vec![0.0; hd];
                v[(rng.next() as usize) % hd] = -1.0e3;
                v
            }
            6 => (0..hd)
                .map(|c| rng.f32() * if c % 3 == 0 { 1e20 } else { 1e-20 })
                .collect(),
            _ => (0..hd)
                .map(|c| rng.f32() * (1.0 + (c % 5) as f32 * 3.0))
                .collect(),
        }
    };
    (one(rng), one(rng))
}

/// The native push (`KvHeadCpu::push` / `push_retaining`) against golden's `KvCache::push`
/// followed by `sync` / `sync_retaining`: the same mirror state after every push (every code,
/// scale, fold and held 8-bit code), golden's memory accounting, and the products of golden's
/// cache at every length (and, retained, at every earlier length at the end). A push golden
/// rejects (a 4-bit group whose range overflows `f32`) is rejected too, changing nothing; the
/// sequence ends there (golden's cache has lost that group).
fn run_native_push_case(
    hd: usize,
    group: usize,
    window: usize,
    tokens: usize,
    bits: u32,
    huge_ok: bool,
    seed: u64,
) {
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: group,
        kv_recent_window: window,
    };
    let stage = OutputStage::IDENTITY_I32;
    let mut rng = Rng(seed);
    let mut cache = KvCache::with_bits(&dp, hd, bits).expect("cache");
    let mut synced = KvHeadCpu::new(&dp, hd);
    let mut synced_hist = KvHeadCpu::new(&dp, hd);
    let mut native = KvHeadCpu::with_bits(&dp, hd, bits).expect("mirror");
    let mut native_hist = KvHeadCpu::with_bits(&dp, hd, bits).expect("mirror");
    // Half the cases reserve (no growth), half grow from empty.
    if seed.is_multiple_of(2) {
        native.reserve(tokens);
        native_hist.reserve(tokens);
    }
    let mut snapshots = Vec::new();
    for step in 0..tokens {
        let what = format!("hd {hd} group {group} window {window} bits {bits} step {step}");
        let (k, v) = push_token(&mut rng, hd, huge_ok);
        let before = native.clone();
        let before_hist = native_hist.clone();
        let r = native.push(&k, &v);
        let r_hist = native_hist.push_retaining(&k, &v, true);
        if cache.push(&k, &v).is_err() {
            assert!(
                r.is_err() && r_hist.is_err(),
                "{what}: golden failed, native pushed"
            );
            assert_eq!(
                native.first_difference(&before),
                None,
                "{what}: failed push"
            );
            assert_eq!(native_hist.first_difference(&before_hist), None, "{what}");
            return;
        }
        r.expect("native push");
        r_hist.expect("native push (retained)");
        synced.sync(&cache).expect("sync");
        synced_hist.sync_retaining(&cache, true).expect("sync");
        assert_eq!(native.first_difference(&synced), None, "{what}");
        assert_eq!(native_hist.first_difference(&synced_hist), None, "{what}");
        assert_eq!(native.memory(), cache.memory(), "{what}: memory");
        assert_eq!(native.len(), cache.len());
        let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        let p: Vec<i8> = (0..cache.len()).map(|_| rng.i8()).collect();
        compare(&cache, &native, &q, &p, &stage);
        compare(&cache, &native_hist, &q, &p, &stage);
        if step % 3 == 0 {
            snapshots.push(cache.clone());
        }
    }
    for snap in &snapshots {
        let n = snap.len();
        let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        let p: Vec<i8> = (0..n).map(|_| rng.i8()).collect();
        compare_at(snap, &native_hist, n, &q, &p, &stage);
    }
    native_hist.trim_history();
    synced_hist.trim_history();
    assert_eq!(native_hist.first_difference(&synced_hist), None, "trimmed");
    // Bad shapes and non-finite inputs change nothing.
    let before = native.clone();
    assert!(native.push(&vec![0.0; hd + 1], &vec![0.0; hd]).is_err());
    let mut nan = vec![1.0; hd];
    nan[hd / 2] = f32::NAN;
    assert!(native.push(&nan, &vec![0.0; hd]).is_err());
    assert!(native
        .push(&vec![0.0; hd], &vec![f32::INFINITY; hd])
        .is_err());
    assert_eq!(native.first_difference(&before), None);
}

#[test]
fn kv_native_push_matches_golden_shapes() {
    for &hd in &[1usize, 2, 7, 16, 64, 65] {
        for &(group, window) in &[(1usize, 0usize), (3, 0), (3, 6), (5, 5), (32, 64), (32, 0)] {
            let tokens = 3 * (group + window) + 2 * group + 3;
            for bits in [4, 8] {
                let seed = hd as u64 * 131 + group as u64 * 7 + window as u64;
                run_native_push_case(hd, group, window, tokens, bits, false, seed);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn prop_kv_native_push_matches_golden(
        hd in 1usize..=80,
        group in 1usize..=32,
        windows in 0usize..=2,
        extra in 0usize..40,
        kv8 in proptest::bool::weighted(0.15),
        huge_ok in proptest::bool::weighted(0.2),
        seed in any::<u64>(),
    ) {
        let window = (group * windows).min(64 / group * group);
        // Long enough to cross several group evictions.
        let tokens = window + 3 * group + extra;
        let bits = if kv8 { 8 } else { 4 };
        run_native_push_case(hd, group, window, tokens, bits, huge_ok, seed);
    }
}

/// A 4-bit group whose key range overflows `f32` (a channel at +3e38 in one token and -3e38 in
/// the next): golden's push fails at the eviction, and so does the native push, which leaves
/// the mirror as it was (golden's cache loses the group's tokens).
#[test]
fn kv_native_push_rejects_range_overflow_as_golden() {
    let dp = Datapath {
        w_group_len: 32,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 2,
        kv_recent_window: 2,
    };
    let hd = 5;
    let mut cache = KvCache::new(&dp, hd).expect("cache");
    let mut native = KvHeadCpu::with_bits(&dp, hd, 4).expect("mirror");
    let toks = [3e38f32, -3e38, 1.0, 2.0];
    for (i, &x) in toks.iter().enumerate() {
        let k = vec![x; hd];
        let v = vec![1.0; hd];
        let before = native.clone();
        let (g, n) = (cache.push(&k, &v), native.push(&k, &v));
        if i < 3 {
            g.expect("golden");
            n.expect("native");
        } else {
            // The fourth token evicts tokens 0 and 1.
            assert!(g.is_err() && n.is_err(), "token {i}: {g:?} vs {n:?}");
            assert_eq!(native.first_difference(&before), None);
        }
    }
}
