//! The printed Verilog means what the IR means: yosys evaluates the `ops`
//! module (every operator, printer temporaries, the signed/unsigned traps)
//! on many input vectors and every output must equal `Expr::eval`.

mod common;

use std::collections::BTreeMap;
use tessera_hdl_gen::examples::{ops, single};

#[test]
fn printed_ops_match_ir_eval() {
    let m = ops().expect("ops");
    let d = single(m.clone()).expect("design");
    let (_dir, w) = common::write(&d);

    let inputs: Vec<(String, u32)> = m
        .ports()
        .iter()
        .filter(|p| p.dir == tessera_hdl_gen::ir::Dir::Input)
        .map(|p| (p.name.clone(), p.ty.width))
        .collect();
    // Edge values plus a deterministic pseudo-random stream.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u128
    };
    let edges = [0u128, 1, 0x7f, 0x80, 0xff, 0x81, 0x7e];
    let mut vectors: Vec<BTreeMap<String, u128>> = Vec::new();
    for i in 0..60 {
        let mut v = BTreeMap::new();
        for (k, (name, width)) in inputs.iter().enumerate() {
            let raw = if i < 49 {
                edges[(i / 7 + k * (i % 7)) % edges.len()]
            } else {
                next()
            };
            v.insert(name.clone(), raw & ((1u128 << width) - 1));
        }
        vectors.push(v);
    }

    let checked = common::check_eval(&m, &w, &vectors);
    assert_eq!(checked, 60 * 17);
}
