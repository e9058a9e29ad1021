//! Emission: deterministic output, headers, file list, invalid configs, and a snapshot of the
//! tiny preset's Verilog (update with `UPDATE_EXPECT=1`).

use expect_test::expect_file;
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::engine::{generate, GenError};

#[test]
fn generation_is_deterministic_and_one_module_per_file() {
    for name in ["tiny", "small"] {
        let cfg = EngineConfig::preset(name).expect("preset");
        let a = generate(&cfg).expect("gen").render().expect("render");
        let b = generate(&cfg).expect("gen").render().expect("render");
        assert_eq!(a, b, "{name}: two generations differ");
        let d = cfg.derive();
        for (file, text) in &a {
            let module = file.trim_end_matches(".v");
            assert!(text.contains(&format!("\nmodule {module} (")), "{file}");
            assert_eq!(text.matches("\nmodule ").count(), 1, "{file}");
            assert!(text.contains(&format!("// config: {name}\n")));
            assert!(text.contains(&d.config_string));
            assert!(text.contains(&d.config_hash));
            assert!(text.contains("do not edit"));
        }
        let names: Vec<&str> = a.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "tessera_pe.v",
                "tessera_array.v",
                "tessera_outstage.v",
                "tessera_engine.v"
            ]
        );
    }
}

#[test]
fn written_files_are_byte_identical() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let (d1, d2) = (
        tempfile::tempdir().expect("t"),
        tempfile::tempdir().expect("t"),
    );
    let w1 = generate(&cfg)
        .expect("gen")
        .write(d1.path())
        .expect("write");
    let w2 = generate(&cfg)
        .expect("gen")
        .write(d2.path())
        .expect("write");
    let read = |p: &std::path::Path| std::fs::read(p).expect("read");
    for (a, b) in w1.files.iter().zip(&w2.files) {
        assert_eq!(read(a), read(b), "{}", a.display());
    }
    assert_eq!(read(&w1.filelist), read(&w2.filelist));
    assert_eq!(
        String::from_utf8(read(&w1.filelist)).expect("utf8"),
        "tessera_pe.v\ntessera_array.v\ntessera_outstage.v\ntessera_engine.v\n"
    );
}

#[test]
fn invalid_config_gives_the_rule_errors() {
    let mut cfg = EngineConfig::preset("tiny").expect("tiny");
    cfg.array.rows = 0;
    cfg.quant.w_group_len = 12;
    match generate(&cfg) {
        Err(GenError::Config(lines)) => {
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert!(lines.iter().all(|l| !l.contains('\n')));
            assert!(lines[0].starts_with("array.rows = 0"));
        }
        other => panic!("expected config errors, got {other:?}"),
    }
}

#[test]
fn tiny_verilog_snapshot() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let files = generate(&cfg).expect("gen").render().expect("render");
    let mut all = String::new();
    for (name, text) in files {
        all.push_str(&format!("//// file: {name}\n{text}"));
    }
    expect_file!["snapshots/tiny_engine.v.txt"].assert_eq(&all);
}
