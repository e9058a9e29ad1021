//! The fit model and search without yosys (a synthetic calibration), so it runs in
//! milliseconds: presets against boards, binding resource, monotone search.

use tessera_boards::fit::{
    all_shapes, binding, model, shapes, shares, with_array, Calibration, Usage,
};
use tessera_boards::Board;
use tessera_golden::config::EngineConfig;

fn cal() -> Calibration {
    // Shaped like the tiny board top's yosys result (xcup): ~17k LUT, ~6.4k FF, 36 DSP.
    Calibration {
        tiny_top: Usage {
            lut: 17000.0,
            ff: 6400.0,
            dsp: 36.0,
            bram36: 1.0,
            uram: 0.0,
        },
        tiny_pe: Usage {
            lut: 700.0,
            ff: 250.0,
            dsp: 1.0,
            bram36: 0.0,
            uram: 0.0,
        },
        tiny_pes: 16.0,
        tiny_edge: 8.0,
    }
}

#[test]
fn presets_against_boards() {
    let c = cal();
    let u280 = EngineConfig::preset("u280").expect("u280");
    let u = model(&u280, &c.tiny_pe, &c);
    let pynq = Board::by_name("pynq-z2").expect("pynq");
    let sh = shares(&u, &pynq.resources);
    assert!(
        sh.iter().any(|s| s.fraction > 1.0),
        "u280 preset must not fit a PYNQ-Z2"
    );
    let tiny = EngineConfig::preset("tiny").expect("tiny");
    let t = model(&tiny, &c.tiny_pe, &c);
    assert!(
        (t.lut - 17000.0).abs() < 1e-6,
        "the model reproduces its calibration point"
    );
    let alveo = Board::by_name("u280").expect("u280");
    let sh = shares(&t, &alveo.resources);
    assert!(sh.iter().all(|s| s.fraction < 0.7));
    assert_eq!(binding(&sh).resource, "LUT");
}

#[test]
fn shapes_are_largest_first_and_valid() {
    let s = shapes();
    assert_eq!(s[0], (64, 64));
    assert!(s.windows(2).all(|w| w[0].0 * w[0].1 >= w[1].0 * w[1].1));
    let base = EngineConfig::preset("tiny").expect("tiny");
    for (r, c) in s {
        with_array(&base, r, c)
            .validate()
            .expect("candidate validates");
    }
}

#[test]
fn all_shapes_include_non_powers_of_two_and_validate() {
    let s = all_shapes();
    assert_eq!(s[0], (64, 64));
    assert!(s.contains(&(12, 24)) && s.contains(&(5, 7)));
    assert!(s
        .iter()
        .all(|&(r, c)| (4..=64).contains(&r) && r <= c && c <= 64));
    assert!(s.windows(2).all(|w| w[0].0 * w[0].1 >= w[1].0 * w[1].1));
    let base = EngineConfig::preset("tiny").expect("tiny");
    for (r, c) in s {
        with_array(&base, r, c)
            .validate()
            .unwrap_or_else(|e| panic!("{r} x {c}: {e:?}"));
    }
}
