//! The .tsr file: written and read back bit for bit (header, host GGUF, every tensor); truncated
//! or corrupted files are one-line errors (a checksum mismatch names the tensor); the CLI turns
//! them into one `error:` line with exit code 2.
#![allow(clippy::unwrap_used)]

mod runtime_support;

use std::process::Command;
use std::sync::Arc;

use runtime_support::{write_gguf, Rng, T, V};
use tessera::runtime::engine::Mode;
use tessera::runtime::gguf::Gguf;
use tessera::runtime::tsr;
use tessera_golden::numerics::Datapath;
use tessera_golden::quant::{quantize_weights, QuantWeights, WeightFormat};

const DP: Datapath = Datapath {
    w_group_len: 32,
    w_scale_bits: 16,
    acc_bits: 48,
    kv_group_len: 32,
    kv_recent_window: 64,
};

fn host() -> (Gguf, Vec<u8>) {
    let kv = vec![
        ("general.architecture", V::str("llama")),
        ("llama.block_count", V::U32(1)),
        ("some.array", V::Arr(4, vec![V::U32(1), V::U32(2)])),
        ("some.f64", V::F64(0.5)),
    ];
    let mut rng = Rng(1);
    let ts = vec![
        T::f32("token_embd.weight", &[8, 4], &rng.vec(32, 1.0)),
        T::f32("output_norm.weight", &[8], &rng.vec(8, 1.0)),
        T::f32("blk.0.attn_q.weight", &[8, 8], &rng.vec(64, 1.0)),
    ];
    let bytes = write_gguf(&kv, &ts, None);
    let g = Gguf::from_bytes(bytes).unwrap();
    let keep = |n: &str| n != "blk.0.attn_q.weight";
    let h = tsr::host_gguf(&g, keep);
    (g, h)
}

fn tensors() -> Vec<(String, Arc<QuantWeights>)> {
    let mut rng = Rng(2);
    let (n, k) = (24, 80);
    let w = rng.vec(n * k, 0.5);
    [
        ("blk.0.attn_q", WeightFormat::W2),
        ("blk.0.ffn_down", WeightFormat::W4),
        ("output", WeightFormat::W8),
    ]
    .into_iter()
    .map(|(name, f)| {
        (
            name.to_string(),
            Arc::new(quantize_weights(&w, n, k, f, &DP).unwrap()),
        )
    })
    .collect()
}

fn written() -> (tempfile::TempDir, std::path::PathBuf, tsr::Header) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.tsr");
    let (_, host) = host();
    let header = tsr::write(&path, Mode::W2a8kv4, "rtn", &DP, &host, &tensors()).unwrap();
    (dir, path, header)
}

#[test]
fn tsr_round_trips() {
    let (g, _) = host();
    let (_dir, path, header) = written();
    assert!(tsr::is_tsr(&path));
    let (h2, host2, ts) = tsr::read(&path).unwrap();
    assert_eq!(h2, header);
    // The host GGUF keeps every metadata value and the kept tensors' bytes.
    assert_eq!(host2.metadata, g.metadata);
    let names: Vec<&str> = host2.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["token_embd.weight", "output_norm.weight"]);
    for t in &host2.tensors {
        let src = g.tensor(&t.name).unwrap();
        assert_eq!((&t.dims, t.ty), (&src.dims, src.ty));
        assert_eq!(host2.tensor_bytes(t), g.tensor_bytes(src));
    }
    for ((name, w), (name2, w2)) in tensors().iter().zip(&ts) {
        assert_eq!(name, name2);
        assert_eq!(w.format(), w2.format());
        assert_eq!(w.packed(), w2.packed());
        assert_eq!(w.gscale_q(), w2.gscale_q());
        assert_eq!(w.zero_u8(), w2.zero_u8());
        assert_eq!(w.row_scale(), w2.row_scale());
        assert_eq!(w.dequantize(), w2.dequantize());
    }
    // Bits per weight: codes with padding (80 -> 96 per row), 24 bits per group, 32 per row.
    let per_row = |bits: f64| (96.0 * bits + 3.0 * 24.0 + 32.0) / 80.0;
    let want = (per_row(2.0) + per_row(4.0)) / 2.0;
    assert!(
        (header.bits_per_weight - want).abs() < 1e-12,
        "{}",
        header.bits_per_weight
    );
    let all = (per_row(2.0) + per_row(4.0) + per_row(8.0)) / 3.0;
    assert!((header.bits_per_weight_with_head - all).abs() < 1e-12);
}

#[test]
fn truncated_and_corrupted_tsr_are_one_line_errors() {
    let (_dir, path, header) = written();
    let bytes = std::fs::read(&path).unwrap();
    let data0 = bytes.len()
        - header
            .tensors
            .last()
            .map_or(0, |t| (t.blob.offset + t.blob.len) as usize);
    for cut in [0, 5, 15, 16, 40, data0 - 1, data0 + 10, bytes.len() - 1] {
        let e = tsr::parse(&bytes[..cut]).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("truncated") || e.contains("not a .tsr") || e.contains("header"),
            "cut {cut}: {e}"
        );
    }
    let q = &header.tensors[0];
    assert_eq!(q.name, "blk.0.attn_q");
    let mut bad = bytes.clone();
    bad[data0 + q.blob.offset as usize + 3] ^= 0x10;
    let e = tsr::parse(&bad).unwrap_err().to_string();
    assert_eq!(
        e,
        "checksum mismatch in tensor blk.0.attn_q: the .tsr file is corrupted"
    );
    let mut bad = bytes.clone();
    bad[data0 + header.host.offset as usize + 1] ^= 1;
    assert!(tsr::parse(&bad)
        .unwrap_err()
        .to_string()
        .contains("tensor host"));

    // Through the CLI: one `error:` line, exit code 2.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.tsr");
    let mut bad = bytes.clone();
    bad[data0 + header.tensors[1].blob.offset as usize] ^= 0xff;
    std::fs::write(&p, &bad).unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello").unwrap();
    for args in [
        vec![
            "ppl",
            "--model",
            p.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
        ],
        vec!["run", "--model", p.to_str().unwrap(), "-p", "hi"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains("checksum mismatch in tensor blk.0.ffn_down"),
            "{err}"
        );
    }
}
