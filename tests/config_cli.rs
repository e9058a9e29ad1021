//! `tessera config ...` end to end: runs the built binary.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use expect_test::expect_file;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the tessera binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn preset_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn check_passes_every_file_in_configs() {
    let files = preset_files();
    assert!(files.len() >= 3);
    let args: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let mut argv = vec!["config", "check"];
    argv.extend(args.iter().map(String::as_str));
    let o = tessera(&argv);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), files.len());
    for (line, file) in out.lines().zip(&files) {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts.len(), 4, "{line}");
        assert_eq!(parts[0], "ok");
        assert_eq!(parts[1], file.display().to_string());
        assert!(parts[2].contains("_w2a8kv4_g"), "{line}");
        assert!(
            parts[3].len() == 12 && parts[3].chars().all(|c| c.is_ascii_hexdigit()),
            "{line}"
        );
    }
    let tiny = out.lines().find(|l| l.contains("tiny.toml")).unwrap();
    assert!(tiny.contains(" 4x4_w2a8kv4_g32_a48 "), "{tiny}");
}

/// Writes `text` to a temp file, runs `config check` on it, and returns the one error line.
fn check_error(text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    let file = path.display().to_string();
    let o = tessera(&["config", "check", &file]);
    assert_eq!(o.status.code(), Some(2), "for {text:?}");
    assert_eq!(stdout(&o), "");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line expected, got: {err}");
    let line = err.trim_end().to_string();
    assert!(line.starts_with(&format!("error: {file}")), "{line}");
    (file, line)
}

#[test]
fn wrong_type_is_one_line_with_field_and_fix() {
    let (file, line) = check_error("name = \"x\"\n[array]\nrows = \"four\"\n");
    assert_eq!(
        line,
        format!(
            "error: {file}:3: array.rows: expected an integer, found a string (\"four\"); set it \
             to a whole number such as 4"
        )
    );
}

#[test]
fn unknown_field_is_one_line_with_suggestion() {
    let (file, line) = check_error("[buffers]\nact_dpeth = 256\n");
    assert_eq!(
        line,
        format!(
            "error: {file}:2: buffers.act_dpeth: unknown field \"act_dpeth\"; did you mean \
             act_depth? remove it; [buffers] has act_depth, wgt_depth, out_depth"
        )
    );
}

#[test]
fn rows_zero_is_a_rule_error() {
    let (file, line) = check_error("[array]\nrows = 0\n");
    assert_eq!(
        line,
        format!("error: {file}: array.rows = 0: PE rows must be in 1..=64")
    );
}

#[test]
fn group_length_not_dividing_a_buffer_is_a_rule_error() {
    let (file, line) = check_error("[quant]\nw_group_len = 64\n[buffers]\nact_depth = 96\n");
    assert_eq!(
        line,
        format!(
            "error: {file}: buffers.act_depth = 96: must be a multiple of quant.w_group_len (64) \
             so it holds whole groups, e.g. 64 or 128"
        )
    );
}

#[test]
fn syntax_error_is_one_line_with_position() {
    let (file, line) = check_error("[array\nrows = 4\n");
    assert!(
        line.starts_with(&format!("error: {file}:1:7: TOML syntax error: ")),
        "{line}"
    );
}

#[test]
fn missing_file_is_one_line() {
    let o = tessera(&["config", "check", "configs/does-not-exist.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: configs/does-not-exist.toml: cannot read the file ("),
        "{err}"
    );
}

#[test]
fn several_broken_rules_give_one_line_each_and_good_files_still_pass() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[array]\nrows = 0\n[clock]\ntarget_mhz = 5000\n").unwrap();
    let o = tessera(&[
        "config",
        "check",
        "configs/tiny.toml",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).starts_with("ok configs/tiny.toml 4x4_w2a8kv4_g32_a48 "));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("array.rows = 0"));
    assert!(lines[1].contains("clock.target_mhz = 5000"));
}

#[test]
fn emit_tiny_matches_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let o = tessera(&[
        "config",
        "emit",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let header = std::fs::read_to_string(out.join("tessera_params.h")).unwrap();
    let json = std::fs::read_to_string(out.join("tessera_params.json")).unwrap();
    expect_file!["snapshots/tiny/tessera_params.h"].assert_eq(&header);
    expect_file!["snapshots/tiny/tessera_params.json"].assert_eq(&json);

    // The file and the embedded preset are the same config, and `show --json` is the same text.
    let from_file = dir.path().join("from_file");
    let o = tessera(&[
        "config",
        "emit",
        "--config",
        "configs/tiny.toml",
        "--out",
        from_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(from_file.join("tessera_params.h")).unwrap(),
        header
    );
    let o = tessera(&["config", "show", "--preset", "tiny", "--json"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), json);
}

#[test]
fn show_prints_raw_and_derived_values() {
    let o = tessera(&["config", "show", "--preset", "u280"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("config u280 (32x64_w2a8kv4_g32_a48, hash "),
        "{out}"
    );
    for needle in [
        "array.rows",
        "clock.target_mhz",
        "k_max_exact",
        "peak GMAC/s",
        "1843.2",
        "bram36",
    ] {
        assert!(out.contains(needle), "missing {needle}: {out}");
    }
    // The default source is the tiny preset.
    let o = tessera(&["config", "show"]);
    assert!(stdout(&o).starts_with("config tiny (4x4_w2a8kv4_g32_a48"));
}

#[test]
fn cli_errors_are_one_line_exit_2() {
    for args in [
        vec!["config", "show", "--preset", "huge"],
        vec![
            "config",
            "show",
            "--preset",
            "tiny",
            "--config",
            "configs/tiny.toml",
        ],
        vec!["config", "frobnicate"],
        vec!["config", "check"],
        vec![
            "config",
            "emit",
            "--preset",
            "tiny",
            "--out",
            "Cargo.toml/sub",
        ],
    ] {
        let o = tessera(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
}
