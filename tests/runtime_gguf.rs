//! GGUF reader: every value type, tensor infos and alignment, dequantization, and malformed files
//! (truncated at every offset, absurd counts, bad magic/version, data past the end) giving a
//! one-line error rather than a panic or a huge allocation.

mod runtime_support;

use runtime_support::{quant_q4_1, quant_q8_0, write_gguf, Rng, T, V};
use tessera::runtime::gguf::{dequantize, f16_to_f32, f32_to_f16, GgmlType, Gguf, Value};

fn sample_kv() -> Vec<(&'static str, V)> {
    vec![
        ("general.architecture", V::str("llama")),
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-5)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-30000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.f32", V::F32(1.5)),
        ("t.bool", V::Bool(true)),
        ("t.str", V::str("héllo")),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(-2.25)),
        ("t.arr", V::strs(&["a", "bc", ""])),
        ("t.arr_i32", V::Arr(5, vec![V::I32(1), V::I32(-2)])),
        (
            "t.nested",
            V::Arr(9, vec![V::Arr(4, vec![V::U32(7)]), V::Arr(4, vec![])]),
        ),
    ]
}

fn sample_tensors() -> Vec<T> {
    let mut rng = Rng(1);
    let x = rng.vec(64, 2.0);
    vec![
        T::f32("a", &[4, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -8.0]),
        T {
            name: "q8".into(),
            dims: vec![32, 2],
            ty: 8,
            data: quant_q8_0(&x),
        },
        T {
            name: "q41".into(),
            dims: vec![64],
            ty: 3,
            data: quant_q4_1(&x),
        },
    ]
}

fn sample_file() -> Vec<u8> {
    write_gguf(&sample_kv(), &sample_tensors(), None)
}

fn err(bytes: Vec<u8>) -> String {
    match Gguf::from_bytes(bytes) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n'), "error is not one line: {m}");
            m
        }
    }
}

#[test]
fn reads_every_value_type() {
    let g = Gguf::from_bytes(sample_file()).expect("parse");
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    let m = &g.metadata;
    assert_eq!(m["t.u8"], Value::U8(200));
    assert_eq!(m["t.i8"], Value::I8(-5));
    assert_eq!(m["t.u16"], Value::U16(60000));
    assert_eq!(m["t.i16"], Value::I16(-30000));
    assert_eq!(m["t.u32"], Value::U32(4_000_000_000));
    assert_eq!(m["t.i32"], Value::I32(-2_000_000_000));
    assert_eq!(m["t.f32"], Value::F32(1.5));
    assert_eq!(m["t.bool"], Value::Bool(true));
    assert_eq!(m["t.str"].as_str(), Some("héllo"));
    assert_eq!(m["t.u64"], Value::U64(u64::MAX));
    assert_eq!(m["t.i64"], Value::I64(i64::MIN));
    assert_eq!(m["t.f64"], Value::F64(-2.25));
    assert_eq!(g.get_str_array("t.arr").expect("arr"), vec!["a", "bc", ""]);
    assert_eq!(m["t.arr_i32"].as_array().map(<[Value]>::len), Some(2));
    assert_eq!(m["t.nested"].as_array().map(<[Value]>::len), Some(2));
    assert_eq!(g.get_u64("t.u32").expect("u32"), 4_000_000_000);
    assert!(g.get_u64("t.str").is_err());
    assert!(g.get_u64("missing").is_err());
}

#[test]
fn tensor_infos_offsets_and_dequantization() {
    let g = Gguf::from_bytes(sample_file()).expect("parse");
    assert_eq!(g.tensors.len(), 3);
    for t in &g.tensors {
        assert_eq!(t.offset % 32, 0, "{} aligned", t.name);
        assert_eq!((t.offset - g.data_offset) % 32, 0);
    }
    let a = g.tensor_f32("a", &[4, 2]).expect("a");
    assert_eq!(a, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -8.0]);
    assert!(g.tensor_f32("a", &[2, 4]).is_err(), "dims are checked");
    assert!(g.tensor_f32("nope", &[1]).is_err());

    let mut rng = Rng(1);
    let x = rng.vec(64, 2.0);
    let q8 = g.tensor_f32("q8", &[32, 2]).expect("q8");
    let q41 = g.tensor_f32("q41", &[64]).expect("q41");
    for i in 0..64 {
        assert!(
            (q8[i] - x[i]).abs() <= 2.0 / 127.0,
            "q8 {i}: {} vs {}",
            q8[i],
            x[i]
        );
        assert!(
            (q41[i] - x[i]).abs() <= 4.0 / 15.0,
            "q4_1 {i}: {} vs {}",
            q41[i],
            x[i]
        );
    }
}

#[test]
fn block_formats_decode_exactly() {
    // Q8_0: d = 0.5, q = -3 .. 28.
    let mut b = f32_to_f16(0.5).to_le_bytes().to_vec();
    b.extend((0..32).map(|i| (i as i8 - 3) as u8));
    let y = dequantize(GgmlType::Q8_0, &b, 32).expect("q8_0");
    assert_eq!(y[0], -1.5);
    assert_eq!(y[31], 14.0);
    // Q4_1: d = 2, m = -1; low nibbles are elements 0..16, high nibbles 16..32.
    let mut b = f32_to_f16(2.0).to_le_bytes().to_vec();
    b.extend(f32_to_f16(-1.0).to_le_bytes());
    b.extend((0..16).map(|j| (j as u8) | ((15 - j as u8) << 4)));
    let y = dequantize(GgmlType::Q4_1, &b, 32).expect("q4_1");
    assert_eq!(y[0], -1.0);
    assert_eq!(y[15], 29.0);
    assert_eq!(y[16], 29.0);
    assert_eq!(y[31], -1.0);
    // Q4_0: d = 1, q - 8.
    let mut b = f32_to_f16(1.0).to_le_bytes().to_vec();
    b.extend((0..16).map(|j| (j as u8) | (3 << 4)));
    let y = dequantize(GgmlType::Q4_0, &b, 32).expect("q4_0");
    assert_eq!(y[0], -8.0);
    assert_eq!(y[15], 7.0);
    assert_eq!(y[16], -5.0);
    // F16 and BF16.
    let h: Vec<u8> = [1.0f32, -0.5, 65504.0, 5.960_464_5e-8]
        .iter()
        .flat_map(|&v| f32_to_f16(v).to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::F16, &h, 4).expect("f16"),
        vec![1.0, -0.5, 65504.0, 5.960_464_5e-8]
    );
    let bf: Vec<u8> = [0x3f80u16, 0xc000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::BF16, &bf, 2).expect("bf16"),
        vec![1.0, -2.0]
    );
    // Size mismatches are errors.
    assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
    assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_err());
}

#[test]
fn f16_round_trips_every_finite_value() {
    for h in 0..=u16::MAX {
        let x = f16_to_f32(h);
        if x.is_nan() {
            continue;
        }
        assert_eq!(f32_to_f16(x), h, "{h:#06x} -> {x}");
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let g = Gguf::from_bytes(write_gguf(&sample_kv(), &sample_tensors(), Some(64))).expect("parse");
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert_eq!(g.tensor_f32("a", &[4, 2]).expect("a")[7], -8.0);
    let e = err(write_gguf(&[], &sample_tensors(), Some(48)));
    assert!(e.contains("alignment"), "{e}");
}

#[test]
fn truncation_at_every_offset_is_a_clean_error() {
    let full = sample_file();
    Gguf::from_bytes(full.clone()).expect("full file parses");
    for len in 0..full.len() {
        let e = err(full[..len].to_vec());
        assert!(
            e.contains("truncated") || e.contains("cannot fit") || e.contains("magic"),
            "len {len}: {e}"
        );
    }
}

#[test]
fn bad_magic_and_version() {
    let mut f = sample_file();
    f[0] = b'X';
    assert!(err(f).contains("not a GGUF file"));
    for v in [0u32, 1, 4, u32::MAX] {
        let mut f = sample_file();
        f[4..8].copy_from_slice(&v.to_le_bytes());
        let e = err(f);
        assert!(e.contains(&format!("unsupported GGUF version {v}")), "{e}");
    }
    // Version 2 has the same layout.
    let mut f = sample_file();
    f[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(Gguf::from_bytes(f).expect("v2").version, 2);
}

#[test]
fn absurd_counts_and_lengths_do_not_allocate() {
    let header = |n_t: u64, n_kv: u64| {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(n_t.to_le_bytes());
        f.extend(n_kv.to_le_bytes());
        f
    };
    assert!(err(header(u64::MAX, 0)).contains("tensor count"));
    assert!(err(header(0, u64::MAX)).contains("metadata count"));
    assert!(err(header(1 << 40, 1 << 40)).contains("cannot fit"));
    // A string length of 2^63.
    let mut f = header(0, 1);
    f.extend((1u64 << 63).to_le_bytes());
    f.extend([0u8; 16]);
    assert!(err(f).contains("truncated"));
    // An array of u64::MAX strings.
    let mut f = header(0, 1);
    runtime_support::put_str(&mut f, "k");
    f.extend(9u32.to_le_bytes());
    f.extend(8u32.to_le_bytes());
    f.extend(u64::MAX.to_le_bytes());
    f.extend([0u8; 64]);
    assert!(err(f).contains("cannot fit"));
    // An array of an unknown type, and a value of an unknown type.
    let mut f = header(0, 1);
    runtime_support::put_str(&mut f, "k");
    f.extend(9u32.to_le_bytes());
    f.extend(99u32.to_le_bytes());
    f.extend(1u64.to_le_bytes());
    f.extend([0u8; 8]);
    assert!(err(f).contains("unknown array type 99"));
    let mut f = header(0, 1);
    runtime_support::put_str(&mut f, "k");
    f.extend(13u32.to_le_bytes());
    f.extend([0u8; 8]);
    assert!(err(f).contains("unknown type 13"));
    // Arrays nested too deep.
    let mut f = header(0, 1);
    runtime_support::put_str(&mut f, "k");
    f.extend(9u32.to_le_bytes());
    for _ in 0..8 {
        f.extend(9u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
    }
    f.extend([0u8; 32]);
    assert!(err(f).contains("deeper"));
    // Tensor dims whose product overflows, or that are huge for the file.
    let t = |dims: Vec<u64>, ty: u32| T {
        name: "t".into(),
        dims,
        ty,
        data: vec![0; 32],
    };
    let e = err(write_gguf(
        &[],
        &[t(vec![1 << 32, 1 << 32, 1 << 32], 0)],
        None,
    ));
    assert!(e.contains("overflow"), "{e}");
    let e = err(write_gguf(&[], &[t(vec![1 << 30, 1 << 20], 0)], None));
    assert!(e.contains("past the end"), "{e}");
    let e = err(write_gguf(&[], &[t(vec![4; 5], 0)], None));
    assert!(e.contains("dimensions"), "{e}");
    let e = err(write_gguf(&[], &[t(vec![8], 77)], None));
    assert!(e.contains("unknown ggml type 77"), "{e}");
    let e = err(write_gguf(&[], &[t(vec![33], 8)], None));
    assert!(e.contains("block size"), "{e}");
}

#[test]
fn tensor_data_past_end_and_misaligned_offsets() {
    // Chop the last tensor's data.
    let mut f = sample_file();
    f.truncate(f.len() - 1);
    let e = err(f);
    assert!(e.contains("q41") && e.contains("past the end"), "{e}");
    // Point a tensor's offset far away / off-alignment.
    let full = sample_file();
    // The info of tensor "q41" (last) ends with its u64 offset right before the padding.
    let name_pos = full
        .windows(3)
        .rposition(|w| w == b"q41")
        .expect("tensor name in file");
    let off_pos = name_pos + 3 + 4 + 8 + 4; // name, n_dims, one dim, type
    for (bad, want) in [(1u64 << 62, "past the end"), (3, "alignment")] {
        let mut f = full.clone();
        f[off_pos..off_pos + 8].copy_from_slice(&bad.to_le_bytes());
        let e = err(f);
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn duplicates_and_bad_bools() {
    let kv = vec![("k", V::U8(1)), ("k", V::U8(2))];
    assert!(err(write_gguf(&kv, &[], None)).contains("twice"));
    let kv = vec![("k", V::U8(2))];
    let mut f = write_gguf(&kv, &[], None);
    // Turn the u8 into a bool of value 2.
    let n = f.len();
    f[n - 5..n - 1].copy_from_slice(&7u32.to_le_bytes());
    assert!(err(f).contains("bool"));
    let t = T::f32("x", &[1], &[1.0]);
    assert!(err(write_gguf(&[], &[t.clone(), t], None)).contains("twice"));
}

#[test]
fn opens_files_and_reports_missing_or_empty_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, sample_file()).expect("write");
    let g = Gguf::open(&p).expect("open");
    assert_eq!(g.tensor_f32("a", &[4, 2]).expect("a")[0], 1.0);
    let e = Gguf::open(&dir.path().join("none.gguf")).expect_err("missing");
    assert!(e.to_string().contains("cannot open"), "{e}");
    std::fs::write(&p, b"").expect("write");
    let e = Gguf::open(&p).expect_err("empty");
    assert!(e.to_string().contains("empty file"), "{e}");
}
