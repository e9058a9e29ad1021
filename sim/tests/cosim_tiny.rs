//! The tiny preset's suites through Verilator, checked every cycle against golden::cycle.

use std::sync::OnceLock;

use tessera_golden::config::EngineConfig;
use tessera_sim::ffi::Lib;
use tessera_sim::suites::run_suite;
use tessera_sim::verilate::{build, Rtl};

fn tiny() -> &'static (EngineConfig, Lib) {
    static L: OnceLock<(EngineConfig, Lib)> = OnceLock::new();
    L.get_or_init(|| {
        let cfg = EngineConfig::preset("tiny").expect("tiny");
        let b = build(&cfg, &Rtl::Generated).expect("verilate tiny");
        let lib = Lib::load(&b.lib).expect("load");
        (cfg, lib)
    })
}

fn suite(name: &str, ops: usize) {
    let (cfg, lib) = tiny();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = run_suite(lib, cfg, name, 1, ops, Some(dir.path())).expect("suite runs");
    println!("{}", r.line());
    assert!(r.failure.is_none(), "{}", r.line());
    assert!(r.cycles > 0);
}

#[test]
fn tiny_modes() {
    suite("modes", 0);
}
