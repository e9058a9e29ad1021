//! Shared helpers for the contract tests: a tiny deterministic PRNG and datapath builders.
#![allow(dead_code)]

use tessera_golden::numerics::Datapath;

/// SplitMix64: deterministic data from a proptest-chosen seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn i8(&mut self) -> i8 {
        self.next_u64() as i8
    }

    /// Floats in [-mag, mag] with occasional exact zeros, ties of the grid and outliers.
    pub fn floats(&mut self, len: usize, mag: f32) -> Vec<f32> {
        (0..len)
            .map(|_| match self.below(16) {
                0 => 0.0,
                1 => mag * 8.0 * (self.unit() - 0.5), // outlier
                _ => mag * (2.0 * self.unit() - 1.0),
            })
            .collect()
    }
}

pub fn dp(w_group_len: usize, w_scale_bits: u32, acc_bits: u32) -> Datapath {
    Datapath {
        w_group_len,
        w_scale_bits,
        acc_bits,
        kv_group_len: 4,
        kv_recent_window: 8,
    }
}

pub fn kv_dp(kv_group_len: usize, kv_recent_window: usize, w_scale_bits: u32) -> Datapath {
    Datapath {
        w_group_len: 32,
        w_scale_bits,
        acc_bits: 48,
        kv_group_len,
        kv_recent_window,
    }
}

/// N1 applied to the rational `num / 2^s`, computed from integers only (i128).
pub fn exact_round_div_pow2(num: i128, s: u32) -> i128 {
    if s == 0 {
        return num;
    }
    let d = 1i128 << s;
    let mag = (2 * num.abs() + d) / (2 * d); // floor(|num| / d + 1/2)
    if num < 0 {
        -mag
    } else {
        mag
    }
}
