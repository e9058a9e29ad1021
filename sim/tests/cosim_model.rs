//! The cycle model alone agrees with the functional model (golden::ops / golden::kv) on every
//! final result of random programs, with and without stalls, on tiny and an odd config.

use tessera_golden::config::EngineConfig;
use tessera_golden::cycle::run_program;
use tessera_golden::engine::{StreamLayout, Word};
use tessera_hdl_gen::testprog::odd_config;
use tessera_sim::suites::{cases, SUITES};

fn check(cfg: &EngineConfig, seed: u64) -> usize {
    let lay = StreamLayout::new(cfg);
    let ow = lay.out_words as usize;
    let mut n = 0;
    for s in SUITES {
        for c in cases(cfg, s, seed, 40).expect("cases") {
            let din: Vec<Vec<u8>> = c.prog.din.iter().map(|w| w.0.clone()).collect();
            let r = run_program(cfg, &c.prog.cmds, &din, c.stall, c.stall_seed, 10_000_000)
                .expect("finishes");
            assert!(!r.err, "{}: err", c.name);
            assert_eq!(r.din_consumed, din.len(), "{}", c.name);
            assert_eq!(r.out.len(), c.prog.expect.len() * ow, "{}", c.name);
            for (i, (want, label)) in c.prog.expect.iter().zip(&c.prog.labels).enumerate() {
                let words: Vec<Word> = r.out[i * ow..(i + 1) * ow]
                    .iter()
                    .map(|b| Word(b.clone()))
                    .collect();
                let got: Vec<i64> = lay.out_entry(&words).into_iter().map(i64::from).collect();
                assert_eq!(&got, want, "{} / {label}", c.name);
            }
            n += c.ops;
        }
    }
    n
}

#[test]
fn cycle_model_matches_functional_model_tiny() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    assert!(check(&cfg, 11) > 100);
}

#[test]
fn cycle_model_matches_functional_model_odd() {
    assert!(check(&odd_config(), 12) > 100);
}
