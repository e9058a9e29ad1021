//! `tessera cosim` bad input: one `error:` line, exit code 2, no Verilator run needed.

use std::process::Command;

fn tessera(args: &[&str], path: Option<&str>) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.args(args);
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let out = c.output().expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    lines[0]
}

#[test]
fn unknown_suite_is_one_line_exit_2() {
    let (code, err) = tessera(&["cosim", "--preset", "tiny", "--suite", "nope"], None);
    assert_eq!(code, 2);
    assert!(one_error_line(&err).contains("unknown suite \"nope\""));
}

#[test]
fn missing_rtl_dir_is_one_line_exit_2() {
    let (code, err) = tessera(&["cosim", "--rtl", "/nonexistent/rtl"], None);
    assert_eq!(code, 2);
    assert!(one_error_line(&err).contains("not a directory"));
}

#[test]
fn missing_verilator_names_the_fix() {
    let empty = tempfile::tempdir().expect("tempdir");
    let p = empty.path().to_string_lossy().into_owned();
    let (code, err) = tessera(&["cosim", "--preset", "tiny", "--suite", "modes"], Some(&p));
    assert_eq!(code, 2);
    let line = one_error_line(&err);
    assert!(line.contains("verilator not found") && line.contains("apt-get install verilator"));
}

#[test]
fn unknown_preset_is_one_line_exit_2() {
    let (code, err) = tessera(&["cosim", "--preset", "huge"], None);
    assert_eq!(code, 2);
    one_error_line(&err);
}
