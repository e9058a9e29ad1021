//! Helpers shared by the integration tests.
#![allow(dead_code)]

use tessera_hdl_gen::{verilator_lint, Design, WrittenDesign};

/// Write `design` to a fresh temporary directory.
pub fn write(design: &Design) -> (tempfile::TempDir, WrittenDesign) {
    let dir = tempfile::tempdir().expect("create temp dir");
    let written = design.write(dir.path()).expect("write design");
    (dir, written)
}

/// Write and lint `design`; panic with every message unless it is clean.
/// A missing verilator fails the test with the runner's one-line message.
pub fn assert_lint_clean(design: &Design) {
    let (_dir, written) = write(design);
    let report = verilator_lint(&written).unwrap_or_else(|e| panic!("{e}"));
    if !report.is_clean() {
        let texts: Vec<String> = written
            .files
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("read back"))
            .collect();
        panic!(
            "verilator -Wall is not clean for {}:\n{}\n\n{}",
            design.top(),
            report.raw,
            texts.join("\n")
        );
    }
}

/// Evaluate every assigned signal of `m` (the top of `w`) with yosys `eval`
/// for each input vector and compare with `Expr::eval`. Returns the number
/// of values checked.
pub fn check_eval(
    m: &tessera_hdl_gen::Module,
    w: &WrittenDesign,
    vectors: &[std::collections::BTreeMap<String, u128>],
) -> usize {
    let mut script = format!("read_verilog {}.v\nproc\nflatten\n", m.name());
    for v in vectors {
        let mut line = String::from("eval");
        for (n, val) in v {
            // Binary literal with the port's width: yosys parses plain
            // decimals as 32-bit integers.
            let width = m
                .ports()
                .iter()
                .find(|p| &p.name == n)
                .expect("input port")
                .ty
                .width as usize;
            line.push_str(&format!(" -set {n} {width}'b{val:0width$b}"));
        }
        for (target, _) in m.assigns() {
            line.push_str(&format!(" -show {}", target.name()));
        }
        script.push_str(&line);
        script.push('\n');
    }
    std::fs::write(w.dir.join("eval.ys"), script).expect("write script");
    let out = match std::process::Command::new("yosys")
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
            let val = val.trim_end_matches('.');
            // yosys prints `W'bits`, or a plain decimal for 32-bit values.
            let value = match val.split_once('\'') {
                Some((_, bits)) => u128::from_str_radix(bits, 2),
                None => val.parse::<u128>(),
            }
            .unwrap_or_else(|e| panic!("unexpected eval result {r:?}: {e}"));
            (name.to_string(), value)
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
                "{name} = {e:?}\nfor inputs {v:?}: verilog {got:#x}, IR {want:#x}"
            );
            checked += 1;
        }
    }
    checked
}

/// Run `m` (the top of `w`, flat) for `stimulus.len()` cycles in yosys
/// `sat -seq` (all flops and memory words start at zero, like `Interp`)
/// and in `Interp`, and compare every output port at every step.
/// Returns the interpreter's per-step values.
pub fn check_seq(
    m: &tessera_hdl_gen::Module,
    w: &WrittenDesign,
    stimulus: &[std::collections::BTreeMap<String, u128>],
) -> Vec<std::collections::BTreeMap<String, u128>> {
    use tessera_hdl_gen::ir::Dir;
    let outputs: Vec<&tessera_hdl_gen::Port> =
        m.ports().iter().filter(|p| p.dir == Dir::Output).collect();
    let mut cmd = format!("sat -seq {} -set-init-zero", stimulus.len());
    for (t, v) in stimulus.iter().enumerate() {
        for p in m.ports().iter().filter(|p| p.dir == Dir::Input) {
            if p.name == "clk_i" {
                continue;
            }
            let width = p.ty.width as usize;
            let val = v[&p.name];
            cmd.push_str(&format!(
                " -set-at {} {} {width}'b{val:0width$b}",
                t + 1,
                p.name
            ));
        }
    }
    let names: Vec<&str> = outputs.iter().map(|p| p.name.as_str()).collect();
    cmd.push_str(&format!(" -show {}", names.join(",")));
    let script = format!(
        "read_verilog {}.v\nproc\nmemory\nflatten\nopt_clean\n{cmd}\n",
        m.name()
    );
    std::fs::write(w.dir.join("seq.ys"), script).expect("write script");
    let out = match std::process::Command::new("yosys")
        .args(["-q", "-l", "seq.log", "-s", "seq.ys"])
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
    let log = std::fs::read_to_string(w.dir.join("seq.log")).expect("log");
    // Lines: "  <step> \<name>  <dec> <hex> <bin>".
    let mut got: std::collections::BTreeMap<(usize, String), u128> = Default::default();
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 5 && f[1].starts_with('\\') {
            if let (Ok(step), Ok(v)) = (f[0].parse::<usize>(), u128::from_str_radix(f[4], 2)) {
                got.insert((step, f[1][1..].to_string()), v);
            }
        }
    }
    assert_eq!(
        got.len(),
        stimulus.len() * outputs.len(),
        "could not parse the sat table:\n{log}"
    );
    let mut interp = tessera_hdl_gen::Interp::new(m).expect("interp");
    let mut trace = Vec::new();
    for (t, v) in stimulus.iter().enumerate() {
        let values = interp.step(v).expect("step");
        for p in &outputs {
            let want = values[&p.name];
            let have = got[&(t + 1, p.name.clone())];
            assert_eq!(
                have, want,
                "{} at step {}: verilog {have:#x}, IR {want:#x}; inputs {v:?}",
                p.name, t
            );
        }
        trace.push(values);
    }
    trace
}
