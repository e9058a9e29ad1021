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
