//! Sequential semantics: the printed registers, resets and RAMs behave like
//! the IR interpreter (checked with yosys `sat -seq`), and the example MAC
//! behaves like a plain Rust model of a saturating accumulator.

mod common;

use std::collections::BTreeMap;
use tessera_hdl_gen::examples::{counter, mac, ram_sdp, single};
use tessera_hdl_gen::RamStyle;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u128 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        u128::from(self.0 >> 33)
    }
}

fn vec_of(pairs: &[(&str, u128)]) -> BTreeMap<String, u128> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn counter_matches_interp() {
    let m = counter(4).expect("counter");
    let (_dir, w) = common::write(&single(m.clone()).expect("design"));
    let mut r = Rng(7);
    let stim: Vec<_> = (0..24)
        .map(|t| {
            let rst = u128::from(!(t < 2 || t == 13));
            vec_of(&[
                ("clk_i", 0),
                ("rst_ni", rst),
                ("en_i", u128::from(!r.next().is_multiple_of(4))),
            ])
        })
        .collect();
    let trace = common::check_seq(&m, &w, &stim);
    // Wraps at 16 within 24 cycles only if enabled often enough; at least it counted.
    assert!(trace.iter().any(|v| v["count_o"] > 3));
}

#[test]
fn mac_matches_interp_and_saturating_model() {
    let (in_bits, acc_bits) = (8, 18);
    let m = mac(in_bits, acc_bits).expect("mac");
    let (_dir, w) = common::write(&single(m.clone()).expect("design"));
    let mut r = Rng(11);
    let mut stim = Vec::new();
    for t in 0..50 {
        // Large same-sign products drive the 18-bit accumulator into
        // saturation both ways; a clear in the middle restarts it.
        let sign = if t < 22 { 0x80 } else { 0x7f };
        let a = if r.next().is_multiple_of(5) {
            r.next() & 0xff
        } else {
            sign
        };
        let b = 0x7f;
        stim.push(vec_of(&[
            ("clk_i", 0),
            ("rst_ni", u128::from(t >= 1)),
            ("a_i", a),
            ("b_i", b),
            ("valid_i", u128::from(!r.next().is_multiple_of(8))),
            ("clear_i", u128::from(t == 21)),
            ("shift_i", r.next() % 19),
        ]));
    }
    let trace = common::check_seq(&m, &w, &stim);

    // Plain model: prod/pvalid/pclear register stage, then acc and sat.
    let sx = |v: u128, bits: u32| -> i64 { ((v as i64) << (64 - bits)) >> (64 - bits) };
    let (max, min) = ((1i64 << (acc_bits - 1)) - 1, -(1i64 << (acc_bits - 1)));
    let (mut prod, mut pvalid, mut pclear, mut acc, mut sat) = (0i64, false, false, 0i64, false);
    let mut saw_sat = (false, false);
    for (t, v) in stim.iter().enumerate() {
        let out = &trace[t];
        assert_eq!(sx(out["acc_o"], acc_bits), acc, "acc at step {t}");
        assert_eq!(out["sat_o"] == 1, sat, "sat at step {t}");
        let shift = v["shift_i"] as u32;
        assert_eq!(
            sx(out["scaled_o"], acc_bits),
            acc >> shift.min(63),
            "scaled at {t}"
        );
        saw_sat.0 |= acc == max;
        saw_sat.1 |= acc == min;
        if v["rst_ni"] == 0 {
            (pvalid, pclear, acc, sat) = (false, false, 0, false);
        } else {
            let sum = acc + prod;
            let clipped = sum.clamp(min, max);
            let (nacc, nsat) = if pclear {
                (0, false)
            } else if pvalid {
                (clipped, sat || clipped != sum)
            } else {
                (acc, sat)
            };
            (pvalid, pclear, acc, sat) = (v["valid_i"] == 1, v["clear_i"] == 1, nacc, nsat);
        }
        prod = sx(v["a_i"], in_bits) * sx(v["b_i"], in_bits);
    }
    assert!(
        saw_sat.0 && saw_sat.1,
        "stimulus must saturate both ways: {saw_sat:?}"
    );
}

#[test]
fn ram_matches_interp() {
    let m = ram_sdp(6, 5, RamStyle::Distributed).expect("ram");
    let (_dir, w) = common::write(&single(m.clone()).expect("design"));
    let mut r = Rng(3);
    let stim: Vec<_> = (0..30)
        .map(|_| {
            vec_of(&[
                ("clk_i", 0),
                ("we_i", r.next() & 1),
                ("waddr_i", r.next() % 6),
                ("wdata_i", r.next() & 0x1f),
                ("raddr_i", r.next() % 6),
            ])
        })
        .collect();
    let trace = common::check_seq(&m, &w, &stim);
    assert!(trace.iter().filter(|v| v["rdata_o"] != 0).count() > 5);
}
