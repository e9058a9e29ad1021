//! `tessera gen --board`, `tessera fit` and `tessera project` end to end (tessera-boards).
//!
//! Every board's output passes `verilator --lint-only -Wall` with zero warnings; the Verilog
//! is the same for every board (the board only changes XDC, Tcl and README), so one yosys
//! synthesis per family (xcup: U280, U55C, ZCU102, KV260; xc7: PYNQ-Z2) covers all of them.
//! Those two synthesis runs happen inside `tessera fit` (its calibration synthesises the whole
//! tiny board top), about 1.5-3 minutes each on 2 cores, in parallel. The ignored
//! `every_board_synthesizes_and_fit_reports` runs `gen --board --report` and `fit` per board.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use tessera_boards::Board;
use tessera_hdl_gen::{verilator_lint, WrittenDesign};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the tessera binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn written(dir: &Path) -> WrittenDesign {
    let filelist = dir.join("tessera_axi_top.f");
    let files = std::fs::read_to_string(&filelist)
        .unwrap()
        .lines()
        .map(|l| dir.join(l))
        .collect();
    WrittenDesign {
        dir: dir.to_path_buf(),
        top: "tessera_axi_top".into(),
        files,
        filelist,
    }
}

#[test]
fn gen_board_output_is_lint_clean_for_every_board() {
    let mut first: Option<Vec<(String, Vec<u8>)>> = None;
    for name in Board::names() {
        let dir = tempfile::tempdir().unwrap();
        let text = ok(&tessera(&[
            "gen",
            "--preset",
            "tiny",
            "--board",
            name,
            "--out",
            dir.path().to_str().unwrap(),
        ]));
        assert!(text.contains(&format!("for {name} (")), "{text}");
        for f in [
            "tessera_axi_top.xdc",
            "build.tcl",
            "README.md",
            "tessera_regs.json",
            "tessera_regs.h",
        ] {
            assert!(dir.path().join(f).is_file(), "{name}: {f} missing");
        }
        let w = written(dir.path());
        let report = verilator_lint(&w).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.is_clean(), "{name}: {}", report.raw);
        let verilog: Vec<(String, Vec<u8>)> = w
            .files
            .iter()
            .map(|f| {
                (
                    f.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(f).unwrap(),
                )
            })
            .collect();
        match &first {
            None => first = Some(verilog),
            Some(v) => assert_eq!(v, &verilog, "{name}: Verilog differs from the first board"),
        }
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tessera_regs.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["registers"][0]["name"], "ID");
    }
}

fn fit(board: &str, preset: &str, cache: &Path) -> String {
    ok(&tessera(&[
        "fit",
        "--board",
        board,
        "--preset",
        preset,
        "--cache",
        cache.to_str().unwrap(),
    ]))
}

#[test]
fn yosys_synthesis_and_fit_xcup() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boards-fit-xcup");
    let text = fit("u280", "tiny", &cache);
    assert!(
        text.contains("config tiny (") && text.contains("): FITS ("),
        "{text}"
    );
    assert!(text.contains("CARRY4"), "the report states yosys's limits");
    assert!(text.contains("largest fit (any rows x cols"), "{text}");
    assert!(text.contains("largest power-of-two fit: "), "{text}");
    // Cached: the second run does not synthesise again, and says the same.
    let again = fit("u280", "tiny", &cache);
    assert_eq!(text, again);
}

#[test]
fn yosys_synthesis_and_fit_xc7() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boards-fit-xc7");
    let text = fit("pynq-z2", "u280", &cache);
    assert!(
        text.contains("config u280 (") && text.contains("DOES NOT FIT"),
        "{text}"
    );
    assert!(text.contains("binding resource"), "{text}");
}

/// Issue 5's done-when for every board, end to end: `tessera gen --board NAME --report` (the
/// lint is `gen_board_output_is_lint_clean_for_every_board`; here the board top goes through
/// yosys for the board's family, hierarchical) and `tessera fit --board NAME` says whether
/// tiny fits. About 1-2 minutes of yosys per board on 2 cores plus one calibration per family:
/// `cargo test --test boards_cli -- --ignored every_board`. Results: boards/README.md.
#[test]
#[ignore = "one yosys run per board; run with --ignored"]
fn every_board_synthesizes_and_fit_reports() {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("boards-fit-every");
    for name in Board::names() {
        let dir = tempfile::tempdir().unwrap();
        let text = ok(&tessera(&[
            "gen",
            "--preset",
            "tiny",
            "--board",
            name,
            "--report",
            "--out",
            dir.path().to_str().unwrap(),
        ]));
        assert!(
            text.contains("(hierarchical") && text.contains(": LUT "),
            "{name}: {text}"
        );
        let f = fit(name, "tiny", &cache);
        assert!(
            f.contains("): FITS (") || f.contains("): DOES NOT FIT ("),
            "{name}: {f}"
        );
        eprintln!("{name}:\n{text}{f}");
    }
}

#[test]
fn project_llama2_7b_on_u280_is_labelled_simulated() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("roofline.svg");
    let text = ok(&tessera(&[
        "project",
        "--preset",
        "u280",
        "--board",
        "u280",
        "--model",
        "llama2-7b",
        "--svg",
        svg.to_str().unwrap(),
    ]));
    assert!(text.contains("SIMULATED projection"), "{text}");
    assert!(text.contains("clock 225 MHz"), "{text}");
    assert!(
        text.contains("decode  ") && text.contains("prefill "),
        "{text}"
    );
    assert!(std::fs::read_to_string(svg).unwrap().starts_with("<svg"));
}

#[test]
fn bad_board_model_and_limit_are_one_error_line() {
    for args in [
        &["gen", "--board", "nope", "--out", "/tmp/x"][..],
        &["fit", "--board", "u280", "--limit", "1.5"][..],
        &["project", "--board", "u280", "--model", "gpt5"][..],
        &["project", "--board", "zz", "--model", "llama2-7b"][..],
    ] {
        let out = tessera(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
}
