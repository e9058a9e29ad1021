//! docs/numerics.md N11b, N16-N19: the KV4 cache, the fold, the window and attention products.
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

use common::{exact_round_div_pow2, kv_dp, Rng};
use proptest::prelude::*;
use tessera_golden::kv::{
    attention_ref_f64, fold_i8, folded_products, quantize_probs, quantize_probs_into, softmax_f64,
    KvCache, KvError,
};
use tessera_golden::ops::{dequant_factor, OutputStage};
use tessera_golden::pack::{
    pack_kv4_keys, pack_kv4_values, unpack_kv4_keys, unpack_kv4_values, PackError,
};
use tessera_golden::quant::{quantize_group_asym, quantize_token, scale_multipliers};

const ID: OutputStage = OutputStage::IDENTITY_I32;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The host's f32 value of an 8-bit token (what N16 re-quantizes to 4 bits).
fn host8(x: &[f32]) -> (Vec<f32>, f32) {
    let t = quantize_token(x).unwrap();
    (
        t.codes_i8
            .iter()
            .map(|&c| f32::from(c) * t.scale_x)
            .collect(),
        t.scale_x,
    )
}

#[test]
fn n11b_kv4_pack_roundtrip() {
    // Layout: keys channel-major, values token-major, low nibble first.
    // Keys [t][c] = [[1, 2], [3, 4]] -> channel 0 = (1, 3), channel 1 = (2, 4).
    assert_eq!(
        pack_kv4_keys(&[1, 2, 3, 4], 2, 2).unwrap(),
        vec![0x31, 0x42]
    );
    assert_eq!(
        pack_kv4_values(&[1, 2, 3, 4], 2, 2).unwrap(),
        vec![0x21, 0x43]
    );
    // Odd counts: each channel / token starts on a byte boundary, high nibble 0.
    assert_eq!(
        pack_kv4_keys(&[1, 2, 3, 4, 5, 6], 3, 2).unwrap(),
        vec![0x31, 0x05, 0x42, 0x06]
    );
    assert_eq!(pack_kv4_values(&[7, 8, 9], 1, 3).unwrap(), vec![0x87, 0x09]);
    let mut rng = Rng(11);
    for group_tokens in [1usize, 2, 3, 4, 32] {
        for head_dim in [1usize, 3, 8, 17] {
            let codes: Vec<u8> = (0..group_tokens * head_dim)
                .map(|_| rng.below(16) as u8)
                .collect();
            let k = pack_kv4_keys(&codes, group_tokens, head_dim).unwrap();
            assert_eq!(k.len(), head_dim * group_tokens.div_ceil(2));
            assert_eq!(unpack_kv4_keys(&k, group_tokens, head_dim).unwrap(), codes);
            // One channel's group is contiguous: channel c's codes are in its own bytes.
            let per = group_tokens.div_ceil(2);
            for c in 0..head_dim {
                for t in 0..group_tokens {
                    let byte = k[c * per + t / 2];
                    let nib = if t % 2 == 0 { byte & 0xf } else { byte >> 4 };
                    assert_eq!(nib, codes[t * head_dim + c]);
                }
            }
            let v = pack_kv4_values(&codes, group_tokens, head_dim).unwrap();
            assert_eq!(v.len(), group_tokens * head_dim.div_ceil(2));
            assert_eq!(
                unpack_kv4_values(&v, group_tokens, head_dim).unwrap(),
                codes
            );
            // Out-of-range codes and bad lengths are errors.
            let mut bad = codes.clone();
            bad[0] = 16;
            assert_eq!(
                pack_kv4_keys(&bad, group_tokens, head_dim).unwrap_err(),
                PackError::Kv4CodeOutOfRange { index: 0, code: 16 }
            );
            assert!(pack_kv4_values(&bad, group_tokens, head_dim).is_err());
            assert!(unpack_kv4_keys(&k[1..], group_tokens, head_dim).is_err());
            // A non-zero padding nibble is rejected.
            if group_tokens % 2 == 1 {
                let mut p = k.clone();
                p[per - 1] |= 0xf0;
                assert!(unpack_kv4_keys(&p, group_tokens, head_dim).is_err());
            }
        }
    }
}

#[test]
fn n16_kv_window_and_group_boundaries() {
    let head_dim = 5;
    for (g, w) in [(4usize, 8usize), (4, 0), (1, 0), (3, 6), (2, 2), (1, 3)] {
        let mut cache = KvCache::new(&kv_dp(g, w, 16), head_dim).unwrap();
        let mut rng = Rng((g * 100 + w) as u64);
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for n in 1..=40usize {
            let mut k = rng.floats(head_dim, 2.0);
            let v = rng.floats(head_dim, 1.0);
            if n % 7 == 0 {
                k = vec![0.0; head_dim]; // an all-zero token
            }
            cache.push(&k, &v).unwrap();
            keys.push(k);
            values.push(v);
            let n4 = g * (n.saturating_sub(w) / g);
            assert_eq!(
                (cache.len(), cache.n4_tokens()),
                (n, n4),
                "g {g} w {w} n {n}"
            );
            assert_eq!(cache.window_tokens(), n - n4);
            let groups = n4 / g;
            let mem = cache.memory();
            assert_eq!(mem.codes4_bytes, groups * head_dim * g.div_ceil(2) + n4 * 3);
            assert_eq!(mem.codes8_bytes, 2 * (n - n4) * head_dim);
            assert_eq!(mem.zero_bytes, groups * head_dim + n4);
            assert_eq!(mem.scale_bytes, 4 * (groups * head_dim + n4 + 2 * (n - n4)));
            assert_eq!(cache.memory_bytes(), mem.total());
        }
        // 4-bit groups: keys per channel over the group's tokens, values per token, both from
        // the host's f32 value of the 8-bit codes (N16).
        let n4 = cache.n4_tokens();
        for j in 0..n4 / g {
            let (codes, kscale, kzero) = cache.key_group4(j);
            for c in 0..head_dim {
                let chan: Vec<f32> = (0..g).map(|i| host8(&keys[j * g + i]).0[c]).collect();
                let gq = quantize_group_asym(&chan, 4).unwrap();
                assert_eq!((gq.scale_g, gq.zero_u8), (kscale[c], kzero[c]));
                for i in 0..g {
                    assert_eq!(gq.codes[i], codes[i * head_dim + c]);
                }
            }
        }
        let (vcodes, vscale, vzero) = cache.values4();
        for t in 0..n4 {
            let gq = quantize_group_asym(&host8(&values[t]).0, 4).unwrap();
            assert_eq!((gq.scale_g, gq.zero_u8), (vscale[t], vzero[t]));
            assert_eq!(&gq.codes[..], &vcodes[t * head_dim..(t + 1) * head_dim]);
        }
        // The window holds the most recent tokens as N5 codes.
        let (wk, wv) = cache.window();
        for (i, (kt, vt)) in wk.iter().zip(wv).enumerate() {
            assert_eq!(kt, &quantize_token(&keys[n4 + i]).unwrap());
            assert_eq!(vt, &quantize_token(&values[n4 + i]).unwrap());
        }
        // What the cache represents is within N5 + N7 of the original floats.
        let kh = cache.dequantized_keys();
        for t in 0..40 {
            let (_, sk) = host8(&keys[t]);
            for c in 0..head_dim {
                let four_bit = if t < n4 {
                    let (_, kscale, _) = cache.key_group4(t / g);
                    kscale[c] * (0.5 + 1.0 / 32.0)
                } else {
                    0.0
                };
                let err = (keys[t][c] - kh[t][c]).abs();
                assert!(
                    err <= (sk / 2.0 + four_bit) * 1.0001 + 1e-7,
                    "t {t} c {c} err {err}"
                );
            }
        }
    }
    // Bad datapaths and shapes are errors.
    assert!(matches!(
        KvCache::new(&kv_dp(4, 6, 16), 8),
        Err(KvError::BadDatapath { .. })
    ));
    assert!(KvCache::new(&kv_dp(0, 0, 16), 8).is_err());
    assert!(KvCache::new(&kv_dp(4, 8, 16), 0).is_err());
    let mut c = KvCache::new(&kv_dp(4, 8, 16), 8).unwrap();
    assert!(matches!(
        c.push(&[0.0; 7], &[0.0; 8]),
        Err(KvError::Shape { .. })
    ));
    assert!(matches!(
        c.push(&[f32::NAN; 8], &[0.0; 8]),
        Err(KvError::Quant(_))
    ));
    assert!(c.is_empty());
}

#[test]
fn n17_fold_matches_formula_exhaustive_small() {
    let sf = 7;
    for x in -128i8..=127 {
        for f in 0..=(1u16 << sf) {
            let xf = fold_i8(&[x], &[f], sf)[0];
            let exact = exact_round_div_pow2(i128::from(x) * i128::from(f), sf);
            assert_eq!(i128::from(xf), exact, "x {x} f {f}");
            for code in 0..16i64 {
                for zero in [0i64, 1, 100, 240, 255] {
                    let (z, acc) = folded_products(&[xf], &[code << 4], &[zero]);
                    assert_eq!(z, i64::from(xf) * zero);
                    assert_eq!(acc, vec![i64::from(xf) * (code * 16 - zero)]);
                }
            }
        }
    }
    // The cache wires the fold as N17 says: one 4-bit key group, every query code.
    let (g, hd) = (2usize, 3usize);
    let dp = kv_dp(g, 0, 9);
    let mut cache = KvCache::new(&dp, hd).unwrap();
    cache.push(&[0.5, -1.0, 0.01], &[1.0, 2.0, -3.0]).unwrap();
    cache.push(&[-0.25, 3.0, 0.02], &[0.0, -0.5, 0.25]).unwrap();
    assert_eq!(cache.n4_tokens(), 2);
    let (codes, kscale, kzero) = cache.key_group4(0);
    let (s_ref, fscale) = scale_multipliers(kscale, 8);
    for q0 in -128i8..=127 {
        let q = [q0, q0.wrapping_mul(3), -128];
        let out = cache.qk(&q, &ID).unwrap();
        let grp = &out.groups4[0];
        assert_eq!((grp.s_ref, &grp.fscale_q), (s_ref, &fscale));
        let xf: Vec<i64> = (0..hd)
            .map(|c| exact_round_div_pow2(i128::from(q[c]) * i128::from(fscale[c]), 8) as i64)
            .collect();
        let z: i64 = (0..hd).map(|c| xf[c] * i64::from(kzero[c])).sum();
        for t in 0..g {
            let dot: i64 = (0..hd)
                .map(|c| xf[c] * (i64::from(codes[t * hd + c]) << 4))
                .sum();
            assert_eq!(grp.acc_i64[t], dot - z, "q0 {q0} t {t}");
        }
    }
    // ... and for values: one fold group over all 4-bit tokens, Z shared by every channel.
    let (vcodes, vscale, vzero) = cache.values4();
    let (_, vf) = scale_multipliers(vscale, 8);
    let p = [-128i8, 77];
    let out = cache.pv(&p, &ID).unwrap();
    let xf: Vec<i64> = (0..g)
        .map(|t| exact_round_div_pow2(i128::from(p[t]) * i128::from(vf[t]), 8) as i64)
        .collect();
    let z: i64 = (0..g).map(|t| xf[t] * i64::from(vzero[t])).sum();
    assert_eq!(out.kv4.z_i64, z);
    for c in 0..hd {
        let dot: i64 = (0..g)
            .map(|t| xf[t] * (i64::from(vcodes[t * hd + c]) << 4))
            .sum();
        assert_eq!(out.kv4.acc_i64[c], dot - z);
    }
}

/// The section 7 bound in lattice units: `sum_e (0.5 + |x_e| 2^-(SF+1)) |w_e|` and the
/// magnitude `sum_e |x_e| |w_e|` for the float slack.
fn fold_bound(x: &[i8], w: &[i64], sf: u32) -> (f64, f64) {
    let half_ulp = 1.0 / f64::from(1u32 << (sf + 1));
    let b = x
        .iter()
        .zip(w)
        .map(|(&x, &w)| (0.5 + f64::from(x).abs() * half_ulp) * w.abs() as f64);
    let m = x
        .iter()
        .zip(w)
        .map(|(&x, &w)| f64::from(x).abs() * w.abs() as f64);
    (b.sum(), m.sum())
}

proptest! {
    #![proptest_config(cases(128))]
    #[test]
    fn n17_fold_error_bound(seed in any::<u64>(), e_len in 1usize..48, sf in 7u32..=15) {
        let mut rng = Rng(seed);
        let x: Vec<i8> = (0..e_len).map(|i| if i == 0 { -128 } else { rng.i8() }).collect();
        let scales: Vec<f32> = (0..e_len)
            .map(|_| if rng.below(6) == 0 { 0.0 } else { rng.unit() * 2f32.powi(rng.below(12) as i32 - 6) })
            .collect();
        let n_out = 3;
        let codes: Vec<i64> = (0..n_out * e_len).map(|_| rng.below(16) as i64).collect();
        let zeros: Vec<i64> = (0..e_len).map(|_| rng.below(241) as i64).collect();
        let (s_ref, fscale) = scale_multipliers(&scales, sf);
        let xf = fold_i8(&x, &fscale, sf);
        let wl: Vec<i64> = codes.iter().map(|c| c << 4).collect();
        let (_, acc) = folded_products(&xf, &wl, &zeros);
        let factor = f64::from(dequant_factor(&ID, 1.0, s_ref, 4));
        for o in 0..n_out {
            let eff: Vec<i64> = (0..e_len).map(|e| wl[o * e_len + e] - zeros[e]).collect();
            let reference: f64 = (0..e_len)
                .map(|e| f64::from(x[e]) * f64::from(scales[e]) * eff[e] as f64 / 16.0)
                .sum();
            let (lattice, mag) = fold_bound(&x, &eff, sf);
            let unit = f64::from(s_ref) / 16.0;
            let got = acc[o] as f64 * factor;
            prop_assert!((got - reference).abs() <= unit * (lattice + 1e-5 * mag) + 1e-30,
                "got {} ref {} bound {}", got, reference, unit * lattice);
        }
    }
}

#[test]
fn n18_recent_window_products() {
    let hd = 6;
    let dp = kv_dp(4, 8, 16);
    let mut cache = KvCache::new(&dp, hd).unwrap();
    let mut rng = Rng(18);
    for n in 1..=14usize {
        cache
            .push(&rng.floats(hd, 2.0), &rng.floats(hd, 1.0))
            .unwrap();
        let mut q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        q[0] = -128;
        let out = cache.qk(&q, &ID).unwrap();
        let (wk, wv) = cache.window();
        let n4 = cache.n4_tokens();
        assert_eq!(out.groups4.len(), n4 / 4);
        // Keys: a plain integer dot product, no zero point, no fold; dequantized per token.
        for (i, k) in wk.iter().enumerate() {
            let dot: i64 = q
                .iter()
                .zip(&k.codes_i8)
                .map(|(&a, &b)| i64::from(a) * i64::from(b))
                .sum();
            assert_eq!(out.window_acc_i64[i], dot);
            assert_eq!(out.window_scale_k[i], k.scale_x);
        }
        let scores = out.scores_f32(&ID, 0.01);
        assert_eq!(scores.len(), n);
        for (i, k) in wk.iter().enumerate() {
            let expect = out.window_y_i64[i] as f32 * dequant_factor(&ID, 0.01, k.scale_x, 0);
            assert_eq!(scores[n4 + i], expect);
        }
        // Values: the fold with zero 0 and lattice shift 0 over the window tokens.
        let mut p: Vec<i8> = (0..n).map(|_| rng.below(128) as i8).collect();
        p[n - 1] = -128; // the engine accepts any i8
        let pv = cache.pv(&p, &ID).unwrap();
        let scales: Vec<f32> = wv.iter().map(|t| t.scale_x).collect();
        let (s_ref, fscale) = scale_multipliers(&scales, 15);
        let xf = fold_i8(&p[n4..], &fscale, 15);
        assert_eq!(
            (pv.window.s_ref, pv.window.z_i64, pv.window.frac_bits),
            (s_ref, 0, 0)
        );
        assert_eq!(pv.window.xf_i8, xf);
        for c in 0..hd {
            let dot: i64 = wv
                .iter()
                .zip(&xf)
                .map(|(t, &x)| i64::from(x) * i64::from(t.codes_i8[c]))
                .sum();
            assert_eq!(pv.window.acc_i64[c], dot);
            // Against the float of the dequantized operands, within the fold bound.
            let v: Vec<i64> = wv.iter().map(|t| i64::from(t.codes_i8[c])).collect();
            let (lattice, mag) = fold_bound(&p[n4..], &v, 15);
            let reference: f64 = wv
                .iter()
                .zip(&p[n4..])
                .map(|(t, &pp)| f64::from(pp) * f64::from(t.codes_i8[c]) * f64::from(t.scale_x))
                .sum();
            let got = f64::from(pv.window.dequantize(&ID, 1.0)[c]);
            let unit = f64::from(s_ref);
            assert!(
                (got - reference).abs() <= unit * (lattice + 1e-5 * mag) + 1e-30,
                "n {n} c {c}"
            );
        }
        if n4 == 0 {
            assert_eq!(pv.kv4.acc_i64, vec![0; hd]);
        }
    }
    // Shapes are checked.
    assert!(cache.qk(&[0; 5], &ID).is_err());
    assert!(cache.pv(&[0; 3], &ID).is_err());
}

proptest! {
    #![proptest_config(cases(40))]
    #[test]
    fn n19_attention_matches_float_reference_within_bound(
        seed in any::<u64>(),
        g in prop::sample::select(vec![1usize, 2, 4]),
        w_groups in 0usize..3,
        n in 1usize..30,
        hd in prop::sample::select(vec![1usize, 3, 8, 16]),
        w_scale_bits in 8u32..=16,
    ) {
        let sf = w_scale_bits - 1;
        let mut cache = KvCache::new(&kv_dp(g, g * w_groups, w_scale_bits), hd).unwrap();
        let mut rng = Rng(seed);
        let keys: Vec<Vec<f32>> = (0..n).map(|_| rng.floats(hd, 2.0)).collect();
        let values: Vec<Vec<f32>> = (0..n).map(|_| rng.floats(hd, 1.0)).collect();
        for (k, v) in keys.iter().zip(&values) {
            cache.push(k, v).unwrap();
        }
        let q = rng.floats(hd, 1.5);
        let qq = quantize_token(&q).unwrap();
        let sq = f64::from(qq.scale_x);
        let n4 = cache.n4_tokens();
        let kh = cache.dequantized_keys();
        let vh = cache.dequantized_values();

        // Q x K^T.
        let out = cache.qk(&qq.codes_i8, &ID).unwrap();
        let scores = out.scores_f32(&ID, qq.scale_x);
        prop_assert_eq!(scores.len(), n);
        let mut delta_max = 0.0f64;
        for t in 0..n {
            let (tight, mag, kerr_c): (f64, f64, Vec<f64>) = if t < n4 {
                let (codes, kscale, kzero) = cache.key_group4(t / g);
                let i = t % g;
                let eff: Vec<i64> = (0..hd).map(|c| (i64::from(codes[i * hd + c]) << 4) - i64::from(kzero[c])).collect();
                let (lattice, mag) = fold_bound(&qq.codes_i8, &eff, sf);
                let unit = sq * f64::from(out.groups4[t / g].s_ref) / 16.0;
                let kerr = kscale.iter().map(|&s| f64::from(s) * (0.5 + 1.0 / 32.0)).collect();
                (unit * lattice, unit * mag, kerr)
            } else {
                let sk = f64::from(out.window_scale_k[t - n4]);
                let mag: f64 = (0..hd).map(|c| sq * sk * f64::from(qq.codes_i8[c]).abs() * 127.0).sum();
                (0.0, mag, vec![0.0; hd])
            };
            let qhat: Vec<f64> = qq.codes_i8.iter().map(|&c| f64::from(c) * sq).collect();
            let reference: f64 = (0..hd).map(|c| qhat[c] * f64::from(kh[t][c])).sum();
            let got = f64::from(scores[t]);
            prop_assert!((got - reference).abs() <= tight + 1e-5 * mag + 1e-30,
                "score t {} got {} ref {} bound {}", t, got, reference, tight);
            // End to end against the original floats: add N5 (q, k) and N7 (4-bit k) errors.
            let (_, sk8) = host8(&keys[t]);
            let e2e: f64 = (0..hd)
                .map(|c| sq / 2.0 * f64::from(keys[t][c]).abs() + qhat[c].abs() * (f64::from(sk8) / 2.0 + kerr_c[c]))
                .sum();
            let orig: f64 = (0..hd).map(|c| f64::from(q[c]) * f64::from(keys[t][c])).sum();
            let diff = (got - orig).abs();
            prop_assert!(diff <= tight + e2e * 1.0001 + 1e-5 * mag + 1e-6, "e2e score t {}", t);
            delta_max = delta_max.max(diff / (hd as f64).sqrt());
        }

        // Host softmax, probability codes, P x V.
        let inv_sqrt_d = 1.0 / (hd as f64).sqrt();
        let p64 = softmax_f64(&scores.iter().map(|&s| f64::from(s) * inv_sqrt_d).collect::<Vec<_>>());
        let p: Vec<f32> = p64.iter().map(|&v| v as f32).collect();
        let probs = quantize_probs(&p).unwrap();
        let codes: Vec<f64> = (0..n).map(|t| probs.code(t) as f64).collect();
        let pvp = cache.pv_probs(&probs, &ID).unwrap();
        let o = pvp.output_f32(&ID, probs.scale_p);
        let (vcodes, vscale, vzero) = cache.values4();
        let (wk, wv) = cache.window();
        prop_assert_eq!(wk.len(), n - n4);
        let (_, attn_ref) = attention_ref_f64(&q, &keys, &values);
        let p_scale = f64::from(probs.scale_p);
        for c in 0..hd {
            let eff4: Vec<i64> = (0..n4).map(|t| (i64::from(vcodes[t * hd + c]) << 4) - i64::from(vzero[t])).collect();
            // N22: each plane is folded on its own; the high plane's error counts 128 times.
            let eff8: Vec<i64> = wv.iter().map(|t| i64::from(t.codes_i8[c])).collect();
            let planes = |x: &[i8], eff: &[i64]| {
                let (l, m) = fold_bound(x, eff, sf);
                (l, m)
            };
            let (h4, hm4) = planes(&probs.hi_i8[..n4], &eff4);
            let (o4, om4) = planes(&probs.lo_i8[..n4], &eff4);
            let (h8, hm8) = planes(&probs.hi_i8[n4..], &eff8);
            let (o8, om8) = planes(&probs.lo_i8[n4..], &eff8);
            let (l4, m4) = (128.0 * h4 + o4, 128.0 * hm4 + om4);
            let (l8, m8) = (128.0 * h8 + o8, 128.0 * hm8 + om8);
            let u4 = p_scale * f64::from(pvp.hi.kv4.s_ref) / 16.0;
            let u8_ = p_scale * f64::from(pvp.hi.window.s_ref);
            let tight = u4 * l4 + u8_ * l8;
            let slack = 1e-5 * (u4 * m4 + u8_ * m8) + 1e-6;
            let reference: f64 = (0..n).map(|t| codes[t] * p_scale * f64::from(vh[t][c])).sum();
            let got = f64::from(o[c]);
            prop_assert!((got - reference).abs() <= tight + slack,
                "pv c {} got {} ref {} bound {}", c, got, reference, tight);
            // End to end: code * scale_p vs p (N22: half a step), 8-bit and 4-bit value errors, and
            // the engine's score errors through the softmax (|dp_t| <= p_t (e^{2 delta} - 1)).
            let mut e2e = 0.0f64;
            let mut vmax = 0.0f64;
            for t in 0..n {
                let (_, sv8) = host8(&values[t]);
                let four = if t < n4 { f64::from(vscale[t]) * (0.5 + 1.0 / 32.0) } else { 0.0 };
                let v = f64::from(values[t][c]).abs();
                vmax = vmax.max(v);
                e2e += (p_scale / 2.0 + 1e-6) * v + codes[t] * p_scale * (f64::from(sv8) / 2.0 + four);
            }
            let soft = ((2.0 * delta_max).exp() - 1.0) * vmax;
            let diff = (got - attn_ref[c]).abs();
            prop_assert!(diff <= tight + e2e * 1.0001 + soft * 1.0001 + slack,
                "e2e pv c {} got {} ref {} (tight {} e2e {} soft {})", c, got, attn_ref[c], tight, e2e, soft);
        }
    }
}

#[test]
fn n19_probabilities_use_a_per_query_scale() {
    // A flat distribution over 300 tokens: every p = 1/300 < 1/254, which a constant 1/127
    // scale would round to 0. With a per-query scale every code is the largest, 16383.
    let p = vec![1.0f32 / 300.0; 300];
    let probs = quantize_probs(&p).unwrap();
    assert!(
        (0..300).all(|t| probs.code(t) == 16383),
        "{:?}",
        &probs.hi_i8[..4]
    );
    assert!((probs.scale_p - (1.0 / 300.0) / 16383.0).abs() < 1e-12);
    // All zero: scale 0, codes 0. Negative or NaN: an error naming the index.
    let probs = quantize_probs(&[0.0, 0.0]).unwrap();
    assert_eq!(
        (probs.hi_i8.clone(), probs.lo_i8.clone(), probs.scale_p),
        (vec![0, 0], vec![0, 0], 0.0)
    );
    assert!(matches!(
        quantize_probs(&[0.5, -0.1]),
        Err(KvError::Probability { index: 1, .. })
    ));
    assert!(matches!(
        quantize_probs(&[f32::NAN]),
        Err(KvError::Probability { index: 0, .. })
    ));
}

#[test]
fn n22_probabilities_are_two_seven_bit_planes() {
    // The largest probability is code 16383 = 128 * 127 + 127; the rest in proportion, ties
    // away from zero (N1), both planes in [0, 127].
    let unit = 0.5f32 / 16383.0;
    let p = [0.5f32, 0.25, 0.0, unit * 0.5, unit * 0.49, unit * 200.0];
    let probs = quantize_probs(&p).unwrap();
    let codes: Vec<i64> = (0..p.len()).map(|t| probs.code(t)).collect();
    assert_eq!(codes, vec![16383, 8192, 0, 1, 0, 200]);
    assert_eq!(probs.hi_i8, vec![127, 64, 0, 0, 0, 1]);
    assert_eq!(probs.lo_i8, vec![127, 0, 0, 1, 0, 72]);
    assert!((probs.scale_p - unit).abs() < 1e-12);
    // Allocation-free variant: the same codes and scale.
    let (mut hi, mut lo) = (vec![9i8; p.len()], vec![9i8; p.len()]);
    let scale = quantize_probs_into(&p, &mut hi, &mut lo).unwrap();
    assert_eq!(
        (hi, lo, scale),
        (probs.hi_i8.clone(), probs.lo_i8.clone(), probs.scale_p)
    );
    let mut rng = Rng(22);
    for n in [1usize, 7, 300] {
        let p: Vec<f32> = (0..n).map(|_| rng.unit() * rng.unit()).collect();
        let probs = quantize_probs(&p).unwrap();
        let max = p.iter().fold(0f32, |m, &v| m.max(v));
        for (t, &v) in p.iter().enumerate() {
            assert!((0..=127).contains(&probs.hi_i8[t]) && (0..=127).contains(&probs.lo_i8[t]));
            let err = (probs.code(t) as f64 * f64::from(probs.scale_p) - f64::from(v)).abs();
            assert!(
                err <= f64::from(max) / 16383.0 * 0.5001 + 1e-12,
                "t {t}: {err}"
            );
        }
    }
    // P x V of the planes: 128 * y_hi + y_lo per part, exactly; and an attention sink (one
    // large probability, 300 small ones below max / 254) keeps the small ones' mass, which one
    // 8-bit plane (max / 127) would round to zero.
    let hd = 4;
    let mut cache = KvCache::with_bits(&kv_dp(4, 8, 16), hd, 8).unwrap();
    let n = 301;
    let values: Vec<Vec<f32>> = (0..n)
        .map(|t| {
            if t == 0 {
                vec![0.01; hd]
            } else {
                vec![1.0, -1.0, 0.5, 0.25]
            }
        })
        .collect();
    for v in &values {
        cache.push(&[0.0; 4], v).unwrap();
    }
    let mut p = vec![0.4f32 / 300.0; n];
    p[0] = 0.6;
    let probs = quantize_probs(&p).unwrap();
    let planes = cache.pv_probs(&probs, &ID).unwrap();
    assert_eq!(planes.hi, cache.pv(&probs.hi_i8, &ID).unwrap());
    assert_eq!(planes.lo, cache.pv(&probs.lo_i8, &ID).unwrap());
    let out = planes.output_f32(&ID, probs.scale_p);
    let f = dequant_factor(&ID, probs.scale_p, planes.hi.window.s_ref, 0);
    for c in 0..hd {
        let y = (planes.hi.window.y_i64[c] << 7) + planes.lo.window.y_i64[c];
        assert_eq!(out[c].to_bits(), (y as f32 * f + 0.0).to_bits(), "c {c}");
        let exact: f64 = (0..n)
            .map(|t| f64::from(p[t]) * f64::from(values[t][c]))
            .sum();
        assert!(
            (f64::from(out[c]) - exact).abs() < 0.05 * exact.abs(),
            "c {c}: {} vs {exact}",
            out[c]
        );
    }
    let one = quantize_token(&p).unwrap();
    assert!(
        one.codes_i8[1..].iter().all(|&c| c == 0),
        "one 8-bit plane loses the small mass"
    );
}

#[test]
fn n16b_kv8_keeps_every_token_at_8_bits() {
    let hd = 6;
    let g = 4;
    let mut kv8 = KvCache::with_bits(&kv_dp(g, 8, 16), hd, 8).unwrap();
    // The definition: a KV4 cache whose window holds every token.
    let mut wide = KvCache::new(&kv_dp(g, 64, 16), hd).unwrap();
    assert_eq!((kv8.kv_bits(), wide.kv_bits()), (8, 4));
    let mut rng = Rng(16);
    for n in 1..=40usize {
        let (k, v) = (rng.floats(hd, 2.0), rng.floats(hd, 1.0));
        kv8.push(&k, &v).unwrap();
        wide.push(&k, &v).unwrap();
        assert_eq!((kv8.len(), kv8.n4_tokens(), kv8.window_tokens()), (n, 0, n));
        assert_eq!(kv8.memory(), wide.memory());
        let q: Vec<i8> = (0..hd).map(|_| rng.i8()).collect();
        let qk = kv8.qk(&q, &ID).unwrap();
        assert!(qk.groups4.is_empty());
        assert_eq!(qk, wide.qk(&q, &ID).unwrap());
        let p: Vec<f32> = (0..n).map(|_| rng.floats(1, 1.0)[0].abs()).collect();
        let pq = quantize_probs(&p).unwrap();
        assert_eq!(
            kv8.pv_probs(&pq, &ID).unwrap(),
            wide.pv_probs(&pq, &ID).unwrap()
        );
    }
    assert!(matches!(
        KvCache::with_bits(&kv_dp(g, 8, 16), hd, 2),
        Err(KvError::BadDatapath { .. })
    ));
}
