//! docs/numerics.md N1-N15, N20, N21: one test per rule, named as the contract names it.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]
#![allow(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_lossless
)]

mod common;

use common::{dp, exact_round_div_pow2, Rng};
use proptest::prelude::*;
use tessera_golden::numerics::{
    quantize_f32, round_half_away_f32, round_shift, sat, sat_u, Datapath,
};
use tessera_golden::ops::{
    accumulate_groups, dequant_factor, dequantize_weight_op, gpsum_bits, group_partial_sums,
    group_sum_bound, matmul_ref_f64, weight_acc, weight_frac_bits, weight_op, GroupSums, OpError,
    OutputStage,
};
use tessera_golden::pack::{pack_weights, unpack_weights, PackError};
use tessera_golden::quant::{
    quantize_group_asym, quantize_group_ternary, quantize_token, quantize_tokens, quantize_weights,
    scale_multipliers, QuantError, QuantWeights, WeightFormat,
};

const FORMATS: [WeightFormat; 4] = [
    WeightFormat::W2,
    WeightFormat::W4,
    WeightFormat::W8,
    WeightFormat::Ternary,
];
const ODD_K: [usize; 6] = [1, 3, 33, 97, 64, 5];

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- N1-N4: rounding, saturation

#[test]
fn n1_round_half_away_from_zero_on_ties() {
    for i in -1000i32..1000 {
        let tie = i as f32 + 0.5;
        let expected = if i >= 0 { i + 1 } else { i };
        assert_eq!(round_half_away_f32(tie), expected as f32, "tie {tie}");
        // Non-ties round to nearest.
        assert_eq!(round_half_away_f32(i as f32 + 0.25), i as f32);
        assert_eq!(round_half_away_f32(i as f32 + 0.75), (i + 1) as f32);
    }
    assert_eq!(round_half_away_f32(2.5), 3.0);
    assert_eq!(round_half_away_f32(-2.5), -3.0);
    // The float quantizer (N4) and the integer shift (N2) use the same mode on the same ties.
    for x in -64i64..64 {
        let via_float = quantize_f32(x as f32, 2.0, -1000, 1000).unwrap();
        assert_eq!(via_float, round_shift(x, 1), "x = {x}");
        let via_float4 = quantize_f32(x as f32, 8.0, -1000, 1000).unwrap();
        assert_eq!(via_float4, round_shift(x, 3), "x = {x}");
    }
}

#[test]
fn n2_round_shift_matches_exact_division_exhaustive() {
    for x in -2048i64..2048 {
        for s in 0..=12u32 {
            let expected = exact_round_div_pow2(i128::from(x), s);
            assert_eq!(i128::from(round_shift(x, s)), expected, "x = {x}, s = {s}");
            // The hardware form: one adder whose carry-in is the inverted sign bit.
            if s >= 1 {
                let carry_in = i64::from(x >= 0);
                let hw = (x + (1i64 << (s - 1)) - 1 + carry_in) >> s;
                assert_eq!(hw, round_shift(x, s), "hardware form, x = {x}, s = {s}");
            }
        }
    }
    // Extremes of i64 do not wrap.
    assert_eq!(round_shift(i64::MAX, 1), 1i64 << 62);
    assert_eq!(round_shift(i64::MIN, 62), -2);
    assert_eq!(round_shift(i64::MIN, 1), -(1i64 << 62));
    proptest!(cases(512), |(x in any::<i64>(), s in 0u32..=62)| {
        prop_assert_eq!(i128::from(round_shift(x, s)), exact_round_div_pow2(i128::from(x), s));
    });
}

#[test]
fn n3_saturation_edges() {
    for bits in 1..=12u32 {
        let lo = -(1i64 << (bits - 1));
        let hi = (1i64 << (bits - 1)) - 1;
        for x in (lo - 300)..=(hi + 300) {
            let expected = x.max(lo).min(hi);
            assert_eq!(sat(x, bits), expected, "sat({x}, {bits})");
        }
        for x in -300i64..=(1 << bits) + 300 {
            assert_eq!(
                sat_u(x, bits),
                x.max(0).min((1 << bits) - 1),
                "sat_u({x}, {bits})"
            );
        }
    }
    assert_eq!(sat(-128, 8), -128);
    assert_eq!(sat(-129, 8), -128);
    assert_eq!(sat(127, 8), 127);
    assert_eq!(sat(128, 8), 127);
    assert_eq!(sat(1 << 47, 48), (1 << 47) - 1);
    assert_eq!(sat(-(1 << 47) - 1, 48), -(1 << 47));
    assert_eq!(sat(i64::MIN, 64), i64::MIN);
    assert_eq!(sat(i64::MAX, 32), i64::from(i32::MAX));
    assert_eq!(sat_u(256, 8), 255);
    assert_eq!(sat_u(-1, 8), 0);
}

#[test]
fn n4_float_quantizer_rejects_non_finite() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(quantize_f32(bad, 1.0, -127, 127).is_err(), "value {bad}");
        assert!(quantize_f32(1.0, bad, -127, 127).is_err(), "scale {bad}");
        let e = quantize_token(&[1.0, bad, 2.0]).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { index: 1, .. }), "{e:?}");
        assert!(!e.to_string().contains('\n'));
        let e = quantize_weights(
            &[0.5, 1.0, bad, 0.0],
            2,
            2,
            WeightFormat::W4,
            &dp(2, 16, 48),
        )
        .unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { index: 2, .. }), "{e:?}");
        for f in FORMATS {
            assert!(quantize_weights(&[bad], 1, 1, f, &dp(4, 16, 48)).is_err());
        }
        assert!(quantize_group_ternary(&[bad]).is_err());
        let e = quantize_tokens(&[0.0, 1.0, 2.0, bad], 2, 2).unwrap_err();
        assert!(matches!(e, QuantError::NonFinite { index: 3, .. }), "{e:?}");
    }
    // A zero or negative scale is not a quantizer scale.
    assert!(quantize_f32(1.0, 0.0, -127, 127).is_err());
    assert!(quantize_f32(1.0, -1.0, -127, 127).is_err());
    // A finite tensor whose range overflows f32 is an error, not a code.
    let e = quantize_weights(
        &[f32::MAX, -f32::MAX],
        1,
        2,
        WeightFormat::W2,
        &dp(2, 16, 48),
    )
    .unwrap_err();
    assert!(matches!(e, QuantError::RangeOverflow { .. }), "{e:?}");
    assert!(quantize_group_ternary(&[f32::MAX, f32::MAX]).is_err());
    // A quotient that overflows f32 clamps, it is not an error: the inputs were finite.
    assert_eq!(
        quantize_f32(f32::MAX, f32::MIN_POSITIVE, -127, 127).unwrap(),
        127
    );
    assert_eq!(
        quantize_f32(-f32::MAX, f32::MIN_POSITIVE, -127, 127).unwrap(),
        -127
    );
}

// ---------------------------------------------------------------- N5-N6: activations

#[test]
fn n5_act_quant_symmetric_and_zero_token() {
    let zero = quantize_token(&[0.0; 7]).unwrap();
    assert_eq!(zero.scale_x, 0.0);
    assert_eq!(zero.codes_i8, vec![0; 7]);
    let neg_zero = quantize_token(&[-0.0, 0.0]).unwrap();
    assert_eq!(neg_zero.codes_i8, vec![0, 0]);
    // absmax / 127 underflows to 0: still an all-zero token, not an error.
    let tiny = quantize_token(&[f32::from_bits(1), -f32::from_bits(3)]).unwrap();
    assert_eq!((tiny.scale_x, tiny.codes_i8), (0.0, vec![0, 0]));
    let mut rng = Rng(5);
    for k in [1usize, 3, 33, 97] {
        for _ in 0..50 {
            let x = rng.floats(k, 3.0);
            let q = quantize_token(&x).unwrap();
            let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.scale_x, absmax / 127.0);
            let neg: Vec<f32> = x.iter().map(|v| -v).collect();
            let qn = quantize_token(&neg).unwrap();
            for (j, (&a, &b)) in q.codes_i8.iter().zip(&qn.codes_i8).enumerate() {
                assert_eq!(i16::from(a), -i16::from(b), "symmetric at {j}");
                assert_ne!(a, -128, "the quantizer never emits -128");
                let err = (x[j] - f32::from(a) * q.scale_x).abs();
                assert!(err <= q.scale_x * 0.5001, "|x - x_hat| = {err} > scale/2");
            }
            if absmax > 0.0 {
                let j = x.iter().position(|v| v.abs() == absmax).unwrap();
                assert_eq!(i32::from(q.codes_i8[j]).abs(), 127, "absmax maps to +-127");
            }
        }
    }
}

#[test]
fn n6_activation_scale_stays_on_host() {
    // Scaling a token by a power of two changes only its f32 scale, never its codes: the engine
    // sees the same integers and the host's dequantization carries the factor.
    let d = dp(16, 16, 48);
    let mut rng = Rng(6);
    let w = quantize_weights(&rng.floats(3 * 40, 1.0), 3, 40, WeightFormat::W4, &d).unwrap();
    let x = rng.floats(40, 2.0);
    let x4: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
    let (q, q4) = (quantize_token(&x).unwrap(), quantize_token(&x4).unwrap());
    assert_eq!(q.codes_i8, q4.codes_i8);
    assert_eq!(q4.scale_x, 4.0 * q.scale_x);
    let s = OutputStage::IDENTITY_I32;
    let y = weight_op(&d, &q.codes_i8, 1, &w, &s).unwrap();
    let y4 = weight_op(&d, &q4.codes_i8, 1, &w, &s).unwrap();
    assert_eq!(y, y4, "the engine never sees scale_x");
    let f = dequantize_weight_op(&y, &s, &[q.scale_x], &w);
    let f4 = dequantize_weight_op(&y4, &s, &[q4.scale_x], &w);
    for (a, b) in f[0].iter().zip(&f4[0]) {
        assert_eq!(4.0 * a, *b);
    }
}

// ---------------------------------------------------------------- N7-N11: weights

fn grid_bound(scale_g: f32, bits: u32) -> f32 {
    scale_g / 2.0 + scale_g * 2f32.powi(-(9 - bits as i32))
}

proptest! {
    #![proptest_config(cases(96))]
    #[test]
    fn n7_weight_quant_grid_error_bound(
        seed in any::<u64>(),
        k_idx in 0usize..ODD_K.len(),
        n in 1usize..4,
        f_idx in 0usize..3,
        group_len in prop::sample::select(vec![1usize, 3, 4, 16, 32]),
        mag_exp in -6i32..6,
    ) {
        let (k, format) = (ODD_K[k_idx], FORMATS[f_idx]);
        let bits = format.bits();
        let mut rng = Rng(seed);
        let w = rng.floats(n * k, 2f32.powi(mag_exp));
        let qw = quantize_weights(&w, n, k, format, &dp(group_len, 16, 48)).unwrap();
        let w_hat = qw.dequantize_with_group_scales();
        let codes = qw.codes();
        let groups = qw.groups_per_row();
        for row in 0..n {
            for j in 0..k {
                let g = j / group_len;
                let scale_g = qw.group_scale_f32()[row * groups + g];
                let i = row * k + j;
                prop_assert!(u32::from(codes[i]) < 1 << bits);
                let err = (w[i] - w_hat[i]).abs();
                let slack = 1e-5 * grid_bound(scale_g, bits) + 3.0 * f32::EPSILON * w[i].abs();
                prop_assert!(err <= grid_bound(scale_g, bits) + slack,
                    "w {} w_hat {} scale {} bits {}", w[i], w_hat[i], scale_g, bits);
            }
            // The zero point of each group follows N7's formula.
            for (g, chunk) in w[row * k..(row + 1) * k].chunks(group_len).enumerate() {
                let lo = chunk.iter().fold(0.0f32, |m, &v| m.min(v));
                let scale_g = qw.group_scale_f32()[row * groups + g];
                let zero = qw.zero_u8()[row * groups + g];
                if scale_g > 0.0 {
                    let z = (-lo / scale_g * 2f32.powi(8 - bits as i32)).round();
                    prop_assert_eq!(f32::from(zero), z.clamp(0.0, 255.0));
                } else {
                    prop_assert_eq!(zero, 0);
                }
            }
        }
    }
}

#[test]
fn n7_zero_range_and_all_equal_groups() {
    for bits in [2u32, 4, 8] {
        let max_code = (1u8 << (bits - 1)) - 1 + (1u8 << (bits - 1));
        let lattice = 1u32 << (8 - bits);
        let zero = quantize_group_asym(&[0.0; 5], bits).unwrap();
        assert_eq!(
            (zero.scale_g, zero.zero_u8, zero.codes),
            (0.0, 0, vec![0; 5])
        );
        // All equal and positive: lo = 0 (the grid holds 0.0), every code is the top one.
        let pos = quantize_group_asym(&[0.75; 3], bits).unwrap();
        assert_eq!(pos.zero_u8, 0);
        assert_eq!(pos.codes, vec![max_code; 3]);
        assert_eq!(pos.scale_g, 0.75 / f32::from(max_code));
        // All equal and negative: hi = 0, every code 0, the zero point at the top of the lattice.
        let neg = quantize_group_asym(&[-2.0; 4], bits).unwrap();
        assert_eq!(u32::from(neg.zero_u8), u32::from(max_code) * lattice);
        assert_eq!(neg.codes, vec![0; 4]);
        // Single element (k = 1) groups, via the tensor quantizer, dequantize exactly here.
        for f in [WeightFormat::W2, WeightFormat::W4, WeightFormat::W8] {
            if f.bits() != bits {
                continue;
            }
            let w = [0.0, 1.5, -3.0, 0.0, 0.0, 0.0];
            // k = 3 with group 2: groups {0, 1.5}, {-3} | {0, 0}, {0}: an all-zero row.
            let qw = quantize_weights(&w, 2, 3, f, &dp(2, 16, 48)).unwrap();
            assert_eq!(qw.row_scale()[1], 0.0);
            assert_eq!(&qw.gscale_q()[2..], &[0, 0]);
            for (got, want) in qw.dequantize().iter().zip(w) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs(),
                    "{f}: {got} vs {want}"
                );
            }
            assert_eq!(
                qw.gscale_q()[1],
                1 << 15,
                "the largest group has gscale 2^SF"
            );
        }
    }
}

#[test]
fn n8_ternary_is_w2_with_zero_64() {
    let d = dp(8, 16, 48);
    let mut rng = Rng(8);
    for k in [1usize, 3, 33, 97] {
        let n = 3;
        let mut w = rng.floats(n * k, 1.0);
        w[..k.min(8)].iter_mut().for_each(|v| *v = 0.0); // an all-zero group in row 0
        let qw = quantize_weights(&w, n, k, WeightFormat::Ternary, &d).unwrap();
        let codes = qw.codes();
        assert!(qw.zero_u8().iter().all(|&z| z == 64));
        let groups = qw.groups_per_row();
        for row in 0..n {
            for (g, chunk) in w[row * k..(row + 1) * k].chunks(8).enumerate() {
                let mean = chunk.iter().fold(0.0f32, |s, v| s + v.abs()) / chunk.len() as f32;
                assert_eq!(qw.group_scale_f32()[row * groups + g], mean);
                for (j, &v) in chunk.iter().enumerate() {
                    let c = codes[row * k + g * 8 + j];
                    let expected = if mean == 0.0 {
                        1
                    } else {
                        (v / mean).round().clamp(-1.0, 1.0) as i32 + 1
                    };
                    assert_eq!(i32::from(c), expected, "row {row} group {g} j {j}");
                }
            }
        }
        // The same codes and metadata as a plain W2 tensor give the same integers.
        let w2 = QuantWeights::from_codes(
            WeightFormat::W2,
            n,
            k,
            8,
            16,
            &codes,
            qw.gscale_q().to_vec(),
            qw.zero_u8().to_vec(),
            qw.row_scale().to_vec(),
        )
        .unwrap();
        let x: Vec<i8> = (0..2 * k).map(|_| rng.i8()).collect();
        let acc_t = weight_acc(&d, &x, 2, &qw).unwrap();
        assert_eq!(acc_t, weight_acc(&d, &x, 2, &w2).unwrap());
        // ... and equal sum_j x * (q - 1) * 64 * gscale, the ternary meaning.
        for t in 0..2 {
            for row in 0..n {
                let mut expected = 0i64;
                for j in 0..k {
                    let q = i64::from(codes[row * k + j]) - 1;
                    let m = i64::from(qw.gscale_q()[row * groups + j / 8]);
                    expected += i64::from(x[t * k + j]) * q * 64 * m;
                }
                assert_eq!(acc_t[t][row], expected);
            }
        }
    }
    // Code 3 is illegal in a ternary tensor, legal in W2; zero points other than 64 are illegal.
    let e = pack_weights(&[0, 1, 3, 2], 1, 4, 4, WeightFormat::Ternary).unwrap_err();
    assert_eq!(e, PackError::TernaryCode3 { index: 2 });
    assert!(pack_weights(&[0, 1, 3, 2], 1, 4, 4, WeightFormat::W2).is_ok());
    let w2_bytes = pack_weights(&[0, 1, 3, 2], 1, 4, 4, WeightFormat::W2).unwrap();
    assert!(unpack_weights(&w2_bytes, 1, 4, 4, WeightFormat::Ternary).is_err());
    assert!(QuantWeights::from_codes(
        WeightFormat::Ternary,
        1,
        4,
        4,
        16,
        &[0, 1, 3, 2],
        vec![1],
        vec![64],
        vec![1.0]
    )
    .is_err());
    assert!(QuantWeights::from_codes(
        WeightFormat::Ternary,
        1,
        4,
        4,
        16,
        &[0, 1, 1, 2],
        vec![1],
        vec![63],
        vec![1.0]
    )
    .is_err());
}

proptest! {
    #![proptest_config(cases(128))]
    #[test]
    fn n9_group_scale_multiplier_range(
        seed in any::<u64>(),
        len in 1usize..20,
        w_scale_bits in 8u32..=16,
    ) {
        let sf = w_scale_bits - 1;
        let mut rng = Rng(seed);
        let scales: Vec<f32> = (0..len)
            .map(|_| if rng.below(5) == 0 { 0.0 } else { rng.unit() * 2f32.powi(rng.below(20) as i32 - 10) })
            .collect();
        let (s_ref, m) = scale_multipliers(&scales, sf);
        let max = scales.iter().fold(0.0f32, |a, &b| a.max(b));
        prop_assert_eq!(s_ref, max);
        for (&s, &mq) in scales.iter().zip(&m) {
            prop_assert!(u32::from(mq) <= 1 << sf);
            if s == max && max > 0.0 {
                prop_assert_eq!(u32::from(mq), 1 << sf);
            }
            let represented = f64::from(mq) / f64::from(1u32 << sf) * f64::from(s_ref);
            let err = (represented - f64::from(s)).abs();
            prop_assert!(err <= f64::from(s_ref) * (0.5 + 1e-3) / f64::from(1u32 << sf),
                "scale {} represented {} err {}", s, represented, err);
        }
    }
}

#[test]
fn n9_group_scale_multiplier_range_edges() {
    assert_eq!(scale_multipliers(&[0.0, 0.0], 15), (0.0, vec![0, 0]));
    let e = quantize_weights(&[1.0], 1, 1, WeightFormat::W4, &dp(1, 7, 48)).unwrap_err();
    assert_eq!(e, QuantError::ScaleBits { w_scale_bits: 7 });
    assert!(quantize_weights(&[1.0], 1, 1, WeightFormat::W4, &dp(1, 17, 48)).is_err());
    // gscale above 2^SF is rejected when building a tensor by hand.
    assert!(QuantWeights::from_codes(
        WeightFormat::W8,
        1,
        1,
        1,
        8,
        &[3],
        vec![129],
        vec![0],
        vec![1.0]
    )
    .is_err());
    assert!(QuantWeights::from_codes(
        WeightFormat::W8,
        1,
        1,
        1,
        8,
        &[3],
        vec![128],
        vec![0],
        vec![1.0]
    )
    .is_ok());
}

#[test]
fn n10_lattice_is_precision_independent() {
    // Every code of every width lands in [0, 255] and every effective weight in [-255, 255].
    for f in [WeightFormat::W2, WeightFormat::W4, WeightFormat::W8] {
        for q in 0..=u32::from(f.max_code()) {
            let wl = q << f.lattice_shift();
            assert!(wl <= 255);
            for zero in 0..=255i64 {
                assert!((i64::from(wl) - zero).abs() <= 255);
            }
        }
    }
    // A W2 tensor re-expressed as W4 (q << 2) and W8 (q << 6), with the row scale divided by
    // 4 and 64, is the same tensor: same integers in the engine, same floats on the host.
    let d = dp(16, 16, 48);
    let mut rng = Rng(10);
    let (n, k) = (3, 37);
    let w2 = quantize_weights(&rng.floats(n * k, 1.0), n, k, WeightFormat::W2, &d).unwrap();
    let mut x: Vec<i8> = (0..2 * k).map(|_| rng.i8()).collect();
    x[0] = -128;
    x[k + 3] = -128;
    let y2 = weight_acc(&d, &x, 2, &w2).unwrap();
    for (f, up) in [(WeightFormat::W4, 2u32), (WeightFormat::W8, 6)] {
        let codes: Vec<u8> = w2.codes().iter().map(|&c| c << up).collect();
        let row_scale: Vec<f32> = w2
            .row_scale()
            .iter()
            .map(|s| s / (1u32 << up) as f32)
            .collect();
        let wf = QuantWeights::from_codes(
            f,
            n,
            k,
            16,
            16,
            &codes,
            w2.gscale_q().to_vec(),
            w2.zero_u8().to_vec(),
            row_scale,
        )
        .unwrap();
        assert_eq!(weight_acc(&d, &x, 2, &wf).unwrap(), y2, "{f}");
        assert_eq!(wf.dequantize(), w2.dequantize(), "{f}");
        let s = OutputStage::IDENTITY_I32;
        let y = weight_op(&d, &x, 2, &wf, &s).unwrap();
        assert_eq!(
            dequantize_weight_op(&y, &s, &[0.5, 0.25], &wf),
            dequantize_weight_op(&y, &s, &[0.5, 0.25], &w2),
            "{f}"
        );
    }
}

proptest! {
    #![proptest_config(cases(128))]
    #[test]
    fn n11_pack_unpack_roundtrip_all_widths(
        seed in any::<u64>(),
        f_idx in 0usize..4,
        k_idx in 0usize..ODD_K.len(),
        n in 1usize..4,
        group_len in prop::sample::select(vec![1usize, 3, 4, 16, 32]),
    ) {
        let (format, k) = (FORMATS[f_idx], ODD_K[k_idx]);
        let mut rng = Rng(seed);
        let codes: Vec<u8> = (0..n * k).map(|_| rng.below(u64::from(format.max_code()) + 1) as u8).collect();
        let packed = pack_weights(&codes, n, k, group_len, format).unwrap();
        let padded = k.div_ceil(group_len) * group_len;
        prop_assert_eq!(packed.len(), n * (padded * format.bits() as usize).div_ceil(8));
        prop_assert_eq!(unpack_weights(&packed, n, k, group_len, format).unwrap(), codes.clone());
        // An out-of-range code is rejected, never masked.
        let mut bad = codes.clone();
        let i = rng.below((n * k) as u64) as usize;
        if format != WeightFormat::W8 {
            bad[i] = format.max_code() + 1;
            prop_assert!(pack_weights(&bad, n, k, group_len, format).is_err());
        }
        // A non-zero padding code is rejected when unpacking (when the row has padding).
        let row_bits = padded * format.bits() as usize;
        if k * (format.bits() as usize) < row_bits.div_ceil(8) * 8 {
            let mut p = packed.clone();
            let last = p.len() - 1;
            p[last] |= 0x80;
            prop_assert!(unpack_weights(&p, n, k, group_len, format).is_err());
        }
        prop_assert!(unpack_weights(&packed[1..], n, k, group_len, format).is_err());
    }
}

#[test]
fn n11_pack_layout_is_little_endian() {
    assert_eq!(
        pack_weights(&[1, 2, 3, 0], 1, 4, 4, WeightFormat::W2).unwrap(),
        vec![0b00_11_10_01]
    );
    assert_eq!(
        pack_weights(&[0xA, 0x5], 1, 2, 2, WeightFormat::W4).unwrap(),
        vec![0x5A]
    );
    assert_eq!(
        pack_weights(&[0xAB], 1, 1, 1, WeightFormat::W8).unwrap(),
        vec![0xAB]
    );
    // Rows padded to whole groups with code 0, each row on a byte boundary.
    assert_eq!(
        pack_weights(&[1, 2, 3], 1, 3, 4, WeightFormat::W4).unwrap(),
        vec![0x21, 0x03]
    );
    assert_eq!(
        pack_weights(&[1, 2, 3, 3, 2, 1], 2, 3, 3, WeightFormat::W2).unwrap(),
        vec![0b11_10_01, 0b01_10_11]
    );
    // A 32-bit little-endian word holds 16 / 8 / 4 codes, code j at bits [B*j, B*j + B).
    for f in [WeightFormat::W2, WeightFormat::W4, WeightFormat::W8] {
        let per_word = 32 / f.bits() as usize;
        let codes: Vec<u8> = (0..per_word)
            .map(|j| (j as u8 * 7 + 1) & f.max_code())
            .collect();
        let bytes = pack_weights(&codes, 1, per_word, per_word, f).unwrap();
        let word = u32::from_le_bytes(bytes.try_into().unwrap());
        for (j, &c) in codes.iter().enumerate() {
            let got = (word >> (f.bits() as usize * j)) & u32::from(f.max_code());
            assert_eq!(got, u32::from(c), "{f} code {j}");
        }
    }
}

// ---------------------------------------------------------------- N12-N15: the weight op

fn w8_const(n: usize, k: usize, l: usize, code: u8, zero: u8, gscale: u16) -> QuantWeights {
    let groups = k.div_ceil(l);
    QuantWeights::from_codes(
        WeightFormat::W8,
        n,
        k,
        l,
        16,
        &vec![code; n * k],
        vec![gscale; n * groups],
        vec![zero; n * groups],
        vec![1.0; n],
    )
    .unwrap()
}

#[test]
fn n12_group_partial_sums_exact_at_extremes() {
    let l = 128;
    assert_eq!(group_sum_bound(l), 128 * 128 * 255);
    assert!(group_sum_bound(l) < 1 << 22);
    assert_eq!(gpsum_bits(l), 23);
    assert_eq!(gpsum_bits(1), 1 + 15); // 32640 < 2^15
    let k = 2 * l + 5; // last group of 5
    for (x_val, code, zero) in [
        (-128i8, 255u8, 0u8),
        (-128, 0, 255),
        (-128, 255, 255),
        (127, 255, 0),
        (127, 0, 255),
    ] {
        let w = w8_const(1, k, l, code, zero, 1);
        let x = vec![x_val; k];
        let codes = w.codes();
        let sums = group_partial_sums(&w, 0, &codes, &x);
        for (g, s) in sums.iter().enumerate() {
            let len = if g == 2 { 5 } else { l as i64 };
            let xv = i64::from(x_val);
            assert_eq!(s.s_i64, xv * len);
            assert_eq!(s.p_i64, xv * i64::from(code) * len);
            assert_eq!(s.g_i64, xv * (i64::from(code) - i64::from(zero)) * len);
            assert!(s.g_i64.abs() <= group_sum_bound(l));
        }
        if x_val == -128 && code != zero {
            assert_eq!(
                sums[0].g_i64.abs(),
                group_sum_bound(l),
                "the bound is reached"
            );
        }
    }
    // Padding (k = 3, group 4): the padding code meets a zero activation, so it adds nothing,
    // even with the largest zero point.
    let w = QuantWeights::from_codes(
        WeightFormat::W4,
        1,
        3,
        4,
        16,
        &[15, 15, 15],
        vec![1],
        vec![240],
        vec![1.0],
    )
    .unwrap();
    let acc = weight_acc(&dp(4, 16, 48), &[-128, -128, -128], 1, &w).unwrap();
    assert_eq!(acc[0][0], 0, "-128 * 3 * (240 - 240)");
    let w = QuantWeights::from_codes(
        WeightFormat::W4,
        1,
        3,
        4,
        16,
        &[15, 0, 7],
        vec![3],
        vec![100],
        vec![1.0],
    )
    .unwrap();
    let acc = weight_acc(&dp(4, 16, 48), &[-128, 5, 127], 1, &w).unwrap();
    assert_eq!(
        acc[0][0],
        3 * (-128 * (240 - 100) + 5 * (0 - 100) + 127 * (112 - 100))
    );
}

#[test]
fn n13_accumulator_saturates_per_group_in_order() {
    let l = 128;
    let g_pos = 128 * 255 * 128; // x = -128, wl = 0, zero = 255
    let g_neg = -(127 * 255 * 128); // x = 127
    let sums = |a: i64, b: i64| {
        [
            GroupSums {
                p_i64: 0,
                s_i64: 0,
                g_i64: a,
            },
            GroupSums {
                p_i64: 0,
                s_i64: 0,
                g_i64: b,
            },
        ]
    };
    // Through the full op: 2 groups, gscale 2^15 then 1, acc_bits 32.
    let w = QuantWeights::from_codes(
        WeightFormat::W8,
        1,
        2 * l,
        l,
        16,
        &vec![0; 2 * l],
        vec![1 << 15, 1],
        vec![255, 255],
        vec![1.0],
    )
    .unwrap();
    let mut x = vec![-128i8; l];
    x.extend(vec![127i8; l]);
    let acc32 = weight_acc(&dp(l, 16, 32), &x, 1, &w).unwrap()[0][0];
    let i32_max = i64::from(i32::MAX);
    // Group 0 saturates to 2^31 - 1, then group 1 pulls it down: not the saturated exact sum.
    assert_eq!(acc32, i32_max + g_neg);
    assert_ne!(acc32, sat((1 << 15) * g_pos + g_neg, 32));
    assert_eq!(
        acc32,
        accumulate_groups(&[1 << 15, 1], &sums(g_pos, g_neg), 15, 32)
    );
    // Reversed order saturates only at the end.
    assert_eq!(
        accumulate_groups(&[1, 1 << 15], &sums(g_neg, g_pos), 15, 32),
        i32_max
    );
    // Wide enough: exact.
    let acc48 = weight_acc(&dp(l, 16, 48), &x, 1, &w).unwrap()[0][0];
    assert_eq!(acc48, (1 << 15) * g_pos + g_neg);
    // Negative edge: saturates at -2^(acc_bits - 1) exactly.
    for acc_bits in [32u32, 33, 40] {
        let s = [GroupSums {
            p_i64: 0,
            s_i64: 0,
            g_i64: -g_pos,
        }; 40];
        let acc = accumulate_groups(&[1 << 15; 40], &s, 15, acc_bits);
        let exact = -(1i64 << 15) * g_pos * 40;
        assert_eq!(
            acc,
            exact.max(-(1i64 << (acc_bits - 1))),
            "acc_bits {acc_bits}"
        );
    }
    // acc_bits outside 32..=48 is an error.
    assert_eq!(
        weight_acc(&dp(l, 16, 31), &x, 1, &w).unwrap_err(),
        OpError::AccBits { acc_bits: 31 }
    );
    assert!(weight_acc(&dp(l, 16, 49), &x, 1, &w).is_err());
}

proptest! {
    #![proptest_config(cases(64))]
    #[test]
    fn n13_int_path_vs_float_of_dequantized_bound(
        seed in any::<u64>(),
        f_idx in 0usize..4,
        k_idx in 0usize..ODD_K.len(),
        n in 1usize..4,
        m in 1usize..3,
        group_len in prop::sample::select(vec![3usize, 4, 16, 32]),
        w_scale_bits in 8u32..=16,
    ) {
        let (format, k) = (FORMATS[f_idx], ODD_K[k_idx]);
        let d = dp(group_len, w_scale_bits, 48);
        let mut rng = Rng(seed);
        let qw = quantize_weights(&rng.floats(n * k, 0.5), n, k, format, &d).unwrap();
        let xq = quantize_tokens(&rng.floats(m * k, 3.0), m, k).unwrap();
        let acc = weight_acc(&d, &xq.codes_i8, m, &qw).unwrap();
        let x_hat: Vec<f32> = xq.codes_i8.iter().enumerate().map(|(i, &c)| f32::from(c) * xq.scale_x[i / k]).collect();
        let y_ref = matmul_ref_f64(&x_hat, m, &qw.dequantize_with_group_scales(), n, k);
        let (codes, groups, sf) = (qw.codes(), qw.groups_per_row(), qw.scale_frac_bits());
        let lattice = f64::from(1u32 << format.lattice_shift());
        for t in 0..m {
            for row in 0..n {
                let sx = f64::from(xq.scale_x[t]);
                let rs = f64::from(qw.row_scale()[row]);
                let sums = group_partial_sums(&qw, row, &codes[row * k..(row + 1) * k], &xq.codes_i8[t * k..(t + 1) * k]);
                let sum_g: f64 = sums.iter().map(|s| s.g_i64.abs() as f64).sum();
                let mut magnitude = 0.0f64;
                for j in 0..k {
                    let z = i64::from(qw.zero_u8()[row * groups + j / group_len]);
                    let wl = i64::from(codes[row * k + j]) << format.lattice_shift();
                    magnitude += (i64::from(xq.codes_i8[t * k + j]) * (wl - z)).abs() as f64;
                }
                let factor = dequant_factor(&OutputStage::IDENTITY_I32, xq.scale_x[t], qw.row_scale()[row], weight_frac_bits(&qw));
                let y = f64::from(acc[t][row] as f32 * factor);
                let bound = sx * rs * (sum_g / f64::from(1u32 << (sf + 1))) / lattice;
                let slack = 1e-5 * sx * rs * magnitude / lattice + 1e-30;
                prop_assert!((y - y_ref[t][row]).abs() <= bound + slack,
                    "y {} ref {} bound {} slack {}", y, y_ref[t][row], bound, slack);
            }
        }
    }
}

#[test]
fn n14_output_stage_rounds_and_saturates() {
    for out_bits in [8u32, 16, 32] {
        for out_mult in [1u16, 3, 255, 65535] {
            for out_shift in 0..=12u32 {
                let stage = OutputStage {
                    out_mult,
                    out_shift,
                    out_bits,
                };
                for acc in -3000i64..3000 {
                    let exact =
                        exact_round_div_pow2(i128::from(acc) * i128::from(out_mult), out_shift);
                    let lim = 1i128 << (out_bits - 1);
                    let expected = exact.clamp(-lim, lim - 1);
                    assert_eq!(
                        i128::from(stage.apply(acc)),
                        expected,
                        "{stage:?} acc {acc}"
                    );
                }
            }
        }
    }
    // Ties away from zero.
    let half = OutputStage {
        out_mult: 1,
        out_shift: 1,
        out_bits: 8,
    };
    assert_eq!(
        (half.apply(5), half.apply(-5), half.apply(3), half.apply(-3)),
        (3, -3, 2, -2)
    );
    // The extremes of a 48-bit accumulator times the largest multiplier are exact.
    for acc in [(1i64 << 47) - 1, -(1i64 << 47)] {
        let s = OutputStage {
            out_mult: 65535,
            out_shift: 62,
            out_bits: 32,
        };
        let exact = exact_round_div_pow2(i128::from(acc) * 65535, 62);
        assert_eq!(i128::from(s.apply(acc)), exact);
        let s0 = OutputStage {
            out_mult: 65535,
            out_shift: 0,
            out_bits: 32,
        };
        assert_eq!(
            s0.apply(acc),
            if acc > 0 {
                i64::from(i32::MAX)
            } else {
                i64::from(i32::MIN)
            }
        );
    }
    for bad in [
        OutputStage {
            out_mult: 0,
            out_shift: 0,
            out_bits: 32,
        },
        OutputStage {
            out_mult: 1,
            out_shift: 63,
            out_bits: 32,
        },
        OutputStage {
            out_mult: 1,
            out_shift: 0,
            out_bits: 12,
        },
    ] {
        assert!(bad.check().is_err(), "{bad:?}");
        let w = w8_const(1, 4, 4, 1, 0, 1);
        assert!(weight_op(&dp(4, 16, 48), &[1, 2, 3, 4], 1, &w, &bad).is_err());
    }
}

proptest! {
    #![proptest_config(cases(48))]
    #[test]
    fn n15_gemv_equals_gemm_row(
        seed in any::<u64>(),
        f_idx in 0usize..4,
        k_idx in 0usize..ODD_K.len(),
        m in 1usize..6,
        out_shift in 0u32..20,
    ) {
        let (format, k) = (FORMATS[f_idx], ODD_K[k_idx]);
        let d = dp(16, 16, 40);
        let mut rng = Rng(seed);
        let qw = quantize_weights(&rng.floats(3 * k, 1.0), 3, k, format, &d).unwrap();
        let mut x: Vec<i8> = (0..m * k).map(|_| rng.i8()).collect();
        x[0] = -128;
        let stage = OutputStage { out_mult: 77, out_shift, out_bits: 16 };
        let gemm = weight_op(&d, &x, m, &qw, &stage).unwrap();
        prop_assert_eq!(gemm.len(), m);
        for t in 0..m {
            let gemv = weight_op(&d, &x[t * k..(t + 1) * k], 1, &qw, &stage).unwrap();
            prop_assert_eq!(&gemv[0], &gemm[t]);
        }
    }
}

// ---------------------------------------------------------------- N20-N21: host boundary

#[test]
fn n20_dequant_factor_inverts_output_stage() {
    // y * factor recovers acc * scale_x * scale_w * 2^-frac within half an output step.
    let (sx, sw) = (0.037f32, 1.75f32);
    for (out_mult, out_shift) in [(1u16, 0u32), (1, 4), (3, 7), (1000, 20), (65535, 30)] {
        let stage = OutputStage {
            out_mult,
            out_shift,
            out_bits: 32,
        };
        for frac_bits in [0u32, 4, 15, 21] {
            let factor = f64::from(dequant_factor(&stage, sx, sw, frac_bits));
            for acc in [0i64, 1, -1, 12345, -987_654_321, 1 << 40] {
                let y = stage.apply(acc);
                if y.abs() >= i64::from(i32::MAX) {
                    continue; // saturated: nothing to invert
                }
                let real = acc as f64 * f64::from(sx) * f64::from(sw) / 2f64.powi(frac_bits as i32);
                let step = 2f64.powi(out_shift as i32) / f64::from(out_mult)
                    * f64::from(sx)
                    * f64::from(sw)
                    / 2f64.powi(frac_bits as i32);
                let got = y as f64 * factor;
                assert!(
                    (got - real).abs() <= 0.5 * step + 1e-6 * real.abs(),
                    "{stage:?} acc {acc}"
                );
            }
        }
    }
    // A weight op: frac_bits = SF + 8 - B.
    let w = w8_const(1, 4, 4, 1, 0, 1);
    assert_eq!(weight_frac_bits(&w), 15);
    let w2 = QuantWeights::from_codes(
        WeightFormat::W2,
        1,
        4,
        4,
        12,
        &[1; 4],
        vec![1],
        vec![0],
        vec![1.0],
    )
    .unwrap();
    assert_eq!(weight_frac_bits(&w2), 11 + 6);
}

#[test]
fn n21_engine_boundary_formats() {
    // In: i8 codes row-major [t][k] (any i8, including -128). Out: row-major [t][n], each value
    // within the signed range of out_bits (i8 / i16 / i32).
    let d = Datapath {
        w_group_len: 8,
        w_scale_bits: 16,
        acc_bits: 48,
        kv_group_len: 4,
        kv_recent_window: 8,
    };
    let mut rng = Rng(21);
    let (m, n, k) = (3, 5, 19);
    let qw = quantize_weights(&rng.floats(n * k, 1.0), n, k, WeightFormat::W4, &d).unwrap();
    let x: Vec<i8> = (0..m * k)
        .map(|i| if i % 5 == 0 { -128 } else { rng.i8() })
        .collect();
    for out_bits in [8u32, 16, 32] {
        let stage = OutputStage {
            out_mult: 1,
            out_shift: 6,
            out_bits,
        };
        let y = weight_op(&d, &x, m, &qw, &stage).unwrap();
        assert_eq!(y.len(), m);
        for row in &y {
            assert_eq!(row.len(), n);
            for &v in row {
                match out_bits {
                    8 => assert!(i8::try_from(v).is_ok()),
                    16 => assert!(i16::try_from(v).is_ok()),
                    _ => assert!(i32::try_from(v).is_ok()),
                }
            }
        }
    }
    // Row t of the output depends only on row t of the input.
    let y = weight_acc(&d, &x, m, &qw).unwrap();
    let mut x2 = x.clone();
    x2[..k].iter_mut().for_each(|v| *v = 0);
    let y2 = weight_acc(&d, &x2, m, &qw).unwrap();
    assert_eq!(y2[0], vec![0; n]);
    assert_eq!(&y2[1..], &y[1..]);
    // Wrong shapes are errors, not panics.
    assert!(matches!(
        weight_acc(&d, &x[1..], m, &qw),
        Err(OpError::Shape { .. })
    ));
    assert!(matches!(
        weight_acc(&dp(16, 16, 48), &x, m, &qw),
        Err(OpError::DatapathMismatch { .. })
    ));
}
