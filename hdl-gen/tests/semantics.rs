//! The printed Verilog means what the IR means: yosys evaluates the `ops`
//! module (every operator, printer temporaries, the signed/unsigned traps)
//! on many input vectors and every output must equal `Expr::eval`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
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

    let mut script = format!("read_verilog {}.v\nproc\nflatten\n", m.name());
    for v in &vectors {
        let mut line = String::from("eval");
        for (n, val) in v {
            line.push_str(&format!(" -set {n} {val}"));
        }
        for (target, _) in m.assigns() {
            line.push_str(&format!(" -show {}", target.name()));
        }
        script.push_str(&line);
        script.push('\n');
    }
    std::fs::write(w.dir.join("eval.ys"), script).expect("write script");
    let out = match Command::new("yosys")
        .args(["-q", "-l", "eval.log", "-s", "eval.ys"])
        .current_dir(&w.dir)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("yosys not found on PATH: install it with apt-get install yosys")
        }
        Err(e) => panic!("running yosys: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(w.dir.join("eval.log")).expect("log");
    let results: Vec<(String, u128)> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Eval result: \\"))
        .map(|r| {
            let (name, val) = r.split_once(" = ").expect("name = value");
            let bits = val
                .trim_end_matches('.')
                .split_once('\'')
                .expect("width'bits")
                .1;
            (
                name.to_string(),
                u128::from_str_radix(bits, 2).expect("binary"),
            )
        })
        .collect();
    let per_vec = m.assigns().len();
    assert_eq!(results.len(), vectors.len() * per_vec);
    let mut checked = 0;
    for (vi, v) in vectors.iter().enumerate() {
        let env = |n: &str| v.get(n).copied();
        for (k, (target, e)) in m.assigns().iter().enumerate() {
            let (name, got) = &results[vi * per_vec + k];
            assert_eq!(name, target.name());
            let want = e.eval(&env).expect("eval");
            assert_eq!(
                *got, want,
                "{name} for inputs {v:?}: verilog {got:#x}, IR {want:#x}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 60 * 17);
}
