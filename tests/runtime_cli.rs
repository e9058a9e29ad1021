//! `tessera run` end to end: missing or malformed models are one `error:` line with exit code 2;
//! with the real model (when fetched) it streams a sensible answer and reports speeds on stderr.

use std::process::Command;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn one_error_line(out: &std::process::Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    lines[0].to_string()
}

#[test]
fn missing_default_model_names_the_fetch_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tessera()
        .args(["run", "--prompt", "hi"])
        .env("TESSERA_CACHE", dir.path())
        .output()
        .expect("run");
    let e = one_error_line(&out);
    assert!(e.contains("scripts/fetch-model.sh"), "{e}");
}

#[test]
fn malformed_models_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], &str); 3] = [
        ("empty.gguf", b"", "empty file"),
        ("text.gguf", b"hello, not a model at all", "not a GGUF file"),
        ("short.gguf", b"GGUF\x03\x00\x00\x00\x05", "truncated"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        let out = tessera()
            .args(["run", "--prompt", "hi", "--model"])
            .arg(&p)
            .output()
            .expect("run");
        let e = one_error_line(&out);
        assert!(e.contains(want), "{name}: {e}");
    }
    let out = tessera()
        .args([
            "run",
            "--prompt",
            "hi",
            "--temp",
            "-1",
            "--model",
            "/nonexistent.gguf",
        ])
        .output()
        .expect("run");
    one_error_line(&out);
}

#[test]
fn real_model_answers_in_chat_mode() {
    let Some(path) = tessera::runtime::cli::default_model_path().filter(|p| p.is_file()) else {
        println!("SKIPPED: SmolLM2 GGUF not in the cache; run scripts/fetch-model.sh");
        return;
    };
    let out = tessera()
        .args([
            "run",
            "--chat",
            "-n",
            "8",
            "--prompt",
            "What is the capital of France?",
            "--model",
        ])
        .arg(&path)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stdout.contains("Paris"), "{stdout:?}");
    assert!(
        stderr.contains("prefill:") && stderr.contains("tok/s"),
        "{stderr:?}"
    );
}

#[test]
fn bench_run_prints_one_line_each_and_token_times_per_rep() {
    let Some(path) = tessera::runtime::cli::default_model_path().filter(|p| p.is_file()) else {
        println!("SKIPPED: SmolLM2 GGUF not in the cache; run scripts/fetch-model.sh");
        return;
    };
    let out = tessera()
        .args([
            "bench",
            "run",
            "--mode",
            "w2a8kv4",
            "--threads",
            "2",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--reps",
            "2",
            "--token-times",
            "--model",
        ])
        .arg(&path)
        .output()
        .expect("bench run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("prefill: ")).count(),
        1,
        "{stdout}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("decode: ")).count(),
        1,
        "{stdout}"
    );
    for rep in 1..=2 {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("decode rep {rep}: 4 tokens, ms/token min ")))
            .unwrap_or_else(|| panic!("no token-times line for rep {rep}: {stdout}"));
        assert!(line.contains("median") && line.contains("max"), "{line}");
    }
}
