//! The generated engine passes `verilator --lint-only -Wall` with zero warnings (no waivers)
//! for every preset and for randomly drawn valid configs with odd sizes.

mod common;

use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::engine::generate;

fn lint(cfg: &EngineConfig) {
    let d = generate(cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.name));
    common::assert_lint_clean(&d);
}

#[test]
fn tiny_and_small_lint_clean() {
    for name in ["tiny", "small"] {
        lint(&EngineConfig::preset(name).expect("preset"));
    }
}

/// About a minute of Verilator (150k lines); runs in parallel with the other tests.
#[test]
fn u280_lint_clean() {
    lint(&EngineConfig::preset("u280").expect("u280"));
}

#[test]
fn every_preset_is_covered() {
    assert_eq!(EngineConfig::preset_names(), ["tiny", "small", "u280"]);
}

/// A tiny deterministic generator (xorshift) so the drawn configs are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Valid configs with odd array sizes, every group length 8..128, both W8 and no-W8,
/// ternary on and off, narrow and wide scales and accumulators.
pub fn random_configs() -> Vec<EngineConfig> {
    let mut rng = Rng(0x7e55_e7a5_eed5_0001);
    let mut out = Vec::new();
    for (i, l) in [8u32, 16, 32, 64, 128].into_iter().enumerate() {
        let mut cfg = EngineConfig {
            name: format!("rand{i}"),
            ..EngineConfig::default()
        };
        cfg.array.rows = rng.pick(&[1, 2, 3, 5]);
        cfg.array.cols = rng.pick(&[1, 3, 5, 7]);
        cfg.quant.w_group_len = l;
        cfg.quant.w_scale_bits = rng.pick(&[8, 12, 16]);
        cfg.precision.weight_bits = if rng.next().is_multiple_of(2) {
            vec![2, 4]
        } else {
            vec![2, 4, 8]
        };
        cfg.precision.ternary = rng.next().is_multiple_of(2);
        let need = tessera_golden::config::gpsum_bits_for(l) + cfg.quant.w_scale_bits;
        cfg.datapath.acc_bits = rng.pick(&[need.max(32), 40, 48]).max(need);
        cfg.buffers.act_depth = l * rng.pick(&[1, 3, 4]);
        cfg.buffers.wgt_depth = l * rng.pick(&[1, 2, 5]);
        cfg.buffers.out_depth = cfg.array.rows * rng.pick(&[1, 2, 3]);
        cfg.interface.stream_bits = rng.pick(&[32, 64, 128]).max(cfg.array.rows * 8);
        cfg.interface.stream_bits = cfg.interface.stream_bits.next_power_of_two();
        cfg.validate()
            .unwrap_or_else(|e| panic!("drawn config invalid: {e:?}"));
        out.push(cfg);
    }
    out
}

#[test]
fn random_odd_configs_lint_clean() {
    for cfg in random_configs() {
        lint(&cfg);
    }
}
