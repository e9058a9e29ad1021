//! `tessera gen` end to end: runs the built binary.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the tessera binary runs")
}

#[test]
fn gen_twice_writes_byte_identical_files() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&a, &b] {
        let out = tessera(&[
            "gen",
            "--preset",
            "tiny",
            "--out",
            dir.path().to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("tiny 4x4_w2a8kv4_g32_a48 ("), "{text}");
    }
    let list = std::fs::read_to_string(a.path().join("tessera_engine.f")).unwrap();
    let mut names: Vec<&str> = list.lines().collect();
    assert_eq!(names.len(), 4);
    names.push("tessera_engine.f");
    for n in names {
        let x = std::fs::read(a.path().join(n)).unwrap();
        let y = std::fs::read(b.path().join(n)).unwrap();
        assert_eq!(x, y, "{n} differs between two runs");
    }
}

#[test]
fn gen_from_a_config_file() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "gen",
        "--config",
        "configs/tiny.toml",
        "--out",
        out_dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(out_dir.path().join("tessera_pe.v").exists());
}

#[test]
fn gen_invalid_config_is_one_line_per_error_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\n[array]\nrows = 0\ncols = 65\n").unwrap();
    let out = tessera(&[
        "gen",
        "--config",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines.iter().all(|l| l.starts_with("error: ")), "{err}");
    assert!(!err.contains("panicked"));
    assert!(!dir.path().join("out").exists());
}

#[test]
fn gen_unknown_preset_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "gen",
        "--preset",
        "huge",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .starts_with("error: unknown preset"));
}

/// `--report` synthesises hierarchically (the method that finishes for every preset) and says
/// so; tiny takes about 30 s of yosys CPU.
#[test]
fn gen_report_names_the_hierarchical_method_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "gen",
        "--preset",
        "tiny",
        "--report",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(
            "yosys synth_xilinx -family xcup (hierarchical: each module synthesised once"
        ),
        "{text}"
    );
    let line = text.lines().find(|l| l.contains(": LUT ")).unwrap();
    // One DSP48E2 per PE plus the output stages' and the feeder's multipliers.
    let dsp: u64 = line
        .split_whitespace()
        .skip_while(|w| *w != "DSP")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(dsp >= 16, "{line}");
}
