//! `tessera demo` is the README's main job: it must pass on embedded defaults and fail loudly
//! on a bad preset.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn demo_runs_every_preset_gemm_mode_and_kv4_attention() {
    let out = tessera(&["demo", "--skip-llm", "--skip-hw"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "ok tiny",
        "ok small",
        "ok u280",
        "W2 ",
        "Ternary",
        "W4 ",
        "W8 ",
        "KV4 attention",
        "demo: all checks passed",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
}

#[test]
fn demo_with_an_unknown_preset_is_a_one_line_error() {
    let out = tessera(&["demo", "--preset", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}
