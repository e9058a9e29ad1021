#![allow(clippy::unwrap_used)]

use super::*;

fn tiny() -> EngineConfig {
    EngineConfig::preset("tiny").unwrap()
}

/// Applies `edit` to the tiny preset and returns the rules it breaks.
fn broken(edit: impl FnOnce(&mut EngineConfig)) -> Vec<(Rule, &'static str)> {
    let mut c = tiny();
    edit(&mut c);
    match c.validate() {
        Ok(()) => Vec::new(),
        Err(errs) => errs.iter().map(|e| (e.rule, e.field)).collect(),
    }
}

/// Each case breaks exactly one rule and must yield exactly that one error.
#[test]
fn each_rule_alone_gives_exactly_its_error() {
    type Edit = fn(&mut EngineConfig);
    let cases: Vec<(Edit, Rule, &str)> = vec![
        (|c| c.name = String::new(), Rule::Name, "name"),
        (|c| c.name = "has space".into(), Rule::Name, "name"),
        (|c| c.name = "x".repeat(65), Rule::Name, "name"),
        (|c| c.array.rows = 0, Rule::ArrayRows, "array.rows"),
        (|c| c.array.rows = 65, Rule::ArrayRows, "array.rows"),
        (|c| c.array.cols = 0, Rule::ArrayCols, "array.cols"),
        (|c| c.array.cols = 65, Rule::ArrayCols, "array.cols"),
        (
            |c| c.precision.weight_bits = vec![2, 8],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.weight_bits = vec![4, 8],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.weight_bits = vec![2, 4, 16],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.weight_bits = vec![4, 2],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.weight_bits = vec![2, 2, 4],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.weight_bits = vec![],
            Rule::WeightBits,
            "precision.weight_bits",
        ),
        (
            |c| c.precision.act_bits = 16,
            Rule::ActBits,
            "precision.act_bits",
        ),
        (
            |c| c.precision.kv_bits = 2,
            Rule::KvBits,
            "precision.kv_bits",
        ),
        (
            |c| c.precision.kv_window_bits = 4,
            Rule::KvWindowBits,
            "precision.kv_window_bits",
        ),
        (
            |c| c.quant.w_group_len = 24,
            Rule::WGroupLen,
            "quant.w_group_len",
        ),
        (
            |c| c.quant.w_group_len = 4,
            Rule::WGroupLen,
            "quant.w_group_len",
        ),
        (
            |c| c.quant.w_group_len = 256,
            Rule::WGroupLen,
            "quant.w_group_len",
        ),
        (
            |c| c.quant.w_scale_bits = 7,
            Rule::WScaleBits,
            "quant.w_scale_bits",
        ),
        (
            |c| c.quant.w_scale_bits = 17,
            Rule::WScaleBits,
            "quant.w_scale_bits",
        ),
        (
            |c| c.quant.kv_group_len = 48,
            Rule::KvGroupLen,
            "quant.kv_group_len",
        ),
        (
            |c| c.quant.kv_group_len = 256,
            Rule::KvGroupLen,
            "quant.kv_group_len",
        ),
        (
            |c| c.quant.kv_recent_window = 48,
            Rule::KvRecentWindow,
            "quant.kv_recent_window",
        ),
        (
            |c| c.quant.kv_recent_window = 65568,
            Rule::KvRecentWindow,
            "quant.kv_recent_window",
        ),
        (
            |c| c.datapath.acc_bits = 31,
            Rule::AccBits,
            "datapath.acc_bits",
        ),
        (
            |c| c.datapath.acc_bits = 49,
            Rule::AccBits,
            "datapath.acc_bits",
        ),
        // L = 32, w_scale_bits = 16: one group product needs 21 + 16 = 37 bits.
        (
            |c| c.datapath.acc_bits = 36,
            Rule::AccHoldsGroupProduct,
            "datapath.acc_bits",
        ),
        (
            |c| c.buffers.act_depth = 0,
            Rule::DepthRange,
            "buffers.act_depth",
        ),
        (
            |c| c.buffers.wgt_depth = DEPTH_MAX + 32,
            Rule::DepthRange,
            "buffers.wgt_depth",
        ),
        (
            |c| c.buffers.out_depth = 0,
            Rule::DepthRange,
            "buffers.out_depth",
        ),
        (
            |c| c.buffers.act_depth = 100,
            Rule::DepthGroupMultiple,
            "buffers.act_depth",
        ),
        (
            |c| c.buffers.wgt_depth = 520,
            Rule::DepthGroupMultiple,
            "buffers.wgt_depth",
        ),
        (
            |c| c.buffers.out_depth = 3,
            Rule::OutDepthHoldsTile,
            "buffers.out_depth",
        ),
        (
            |c| c.interface.stream_bits = 48,
            Rule::StreamBits,
            "interface.stream_bits",
        ),
        (
            |c| c.interface.stream_bits = 1024,
            Rule::StreamBits,
            "interface.stream_bits",
        ),
        (
            |c| c.array.rows = 16,
            Rule::StreamHoldsActRow,
            "interface.stream_bits",
        ),
        (
            |c| c.interface.axil_addr_bits = 11,
            Rule::AxilAddrBits,
            "interface.axil_addr_bits",
        ),
        (
            |c| c.interface.axil_addr_bits = 17,
            Rule::AxilAddrBits,
            "interface.axil_addr_bits",
        ),
        (
            |c| c.clock.target_mhz = 0,
            Rule::TargetMhz,
            "clock.target_mhz",
        ),
        (
            |c| c.clock.target_mhz = 1001,
            Rule::TargetMhz,
            "clock.target_mhz",
        ),
    ];
    for (i, (edit, rule, field)) in cases.into_iter().enumerate() {
        assert_eq!(
            broken(edit),
            vec![(rule, field)],
            "case {i}: expected only {rule:?}"
        );
    }
}

#[test]
fn boundary_values_are_accepted() {
    let ok: Vec<fn(&mut EngineConfig)> = vec![
        |c| c.array.rows = 1,
        |c| c.array.cols = 64,
        |c| {
            c.array.rows = 64;
            c.interface.stream_bits = 512;
        },
        |c| c.precision.weight_bits = vec![2, 4],
        |c| c.precision.ternary = false,
        |c| {
            c.quant.w_group_len = 8;
            c.buffers.act_depth = 8;
            c.buffers.wgt_depth = 8;
        },
        |c| c.quant.w_group_len = 128,
        |c| c.quant.w_scale_bits = 8,
        |c| c.quant.kv_recent_window = 0,
        |c| {
            c.quant.kv_group_len = 128;
            c.quant.kv_recent_window = 128;
        },
        |c| c.datapath.acc_bits = 37, // exactly gpsum_bits (21) + w_scale_bits (16)
        |c| {
            c.datapath.acc_bits = 32;
            c.quant.w_scale_bits = 11;
        },
        |c| c.buffers.out_depth = 4,
        |c| c.interface.axil_addr_bits = 16,
        |c| c.clock.target_mhz = 1,
        |c| c.clock.target_mhz = 1000,
    ];
    for (i, edit) in ok.into_iter().enumerate() {
        assert_eq!(broken(edit), vec![], "case {i} should be valid");
    }
}

#[test]
fn independent_mistakes_give_one_error_each() {
    let errs = broken(|c| {
        c.array.rows = 0;
        c.quant.w_scale_bits = 20;
        c.clock.target_mhz = 5000;
    });
    assert_eq!(
        errs,
        vec![
            (Rule::ArrayRows, "array.rows"),
            (Rule::WScaleBits, "quant.w_scale_bits"),
            (Rule::TargetMhz, "clock.target_mhz"),
        ]
    );
}

#[test]
fn rule_errors_are_one_line_and_name_field_value_and_fix() {
    let mut c = tiny();
    c.buffers.act_depth = 100;
    let e = &c.validate().unwrap_err()[0];
    assert_eq!(
        e.to_string(),
        "buffers.act_depth = 100: must be a multiple of quant.w_group_len (32) so it holds whole \
         groups, e.g. 96 or 128"
    );
    let mut c = tiny();
    c.array.rows = 16;
    assert_eq!(
        c.validate().unwrap_err()[0].to_string(),
        "interface.stream_bits = 64: must be at least array.rows (16) x 8 bits = 128 to load one \
         activation entry per beat; use 128"
    );
}

#[test]
fn default_and_every_preset_are_valid() {
    EngineConfig::default().validate().unwrap();
    for name in EngineConfig::preset_names() {
        let c = EngineConfig::preset(name).unwrap();
        assert_eq!(c.name, name);
        c.validate()
            .unwrap_or_else(|e| panic!("preset {name}: {e:?}"));
    }
}

#[test]
fn preset_is_a_delta_from_default() {
    let t = tiny();
    let d = EngineConfig::default();
    assert_eq!(t.array, d.array);
    assert_eq!(t.precision, d.precision);
    assert_eq!(t.quant, d.quant);
    assert_ne!(t.buffers, d.buffers);
    let u = EngineConfig::preset("u280").unwrap();
    assert_eq!(
        (u.array.rows, u.array.cols, u.clock.target_mhz),
        (32, 64, 225)
    );
    // A partial section keeps the default for the fields it omits.
    let c = EngineConfig::from_toml_str("[array]\nrows = 8\n").unwrap();
    assert_eq!((c.array.rows, c.array.cols), (8, d.array.cols));
    assert_eq!(EngineConfig::from_toml_str("").unwrap(), d);
}

#[test]
fn unknown_preset_is_an_error_listing_the_presets() {
    let e = EngineConfig::preset("huge").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown preset \"huge\"; built-in presets are tiny, small, u280"
    );
}

#[test]
fn tiny_derived_values_are_pinned() {
    let d = tiny().derive();
    assert_eq!(d.config_string, "4x4_w2a8kv4_g32_a48");
    assert_eq!(d.config_hash.len(), 12);
    assert_eq!(
        d.build_dir_name,
        format!("4x4_w2a8kv4_g32_a48-{}", d.config_hash)
    );
    assert_eq!(d.pe_count, 16);
    assert_eq!(d.gpsum_bits, 21); // 32 * 128 * 255 = 1_044_480 < 2^20
    assert_eq!(d.scale_frac_bits, 15);
    assert_eq!(d.group_product_bits, 37);
    assert_eq!(d.k_max_exact, (1u64 << 32) / 32640); // (2^47 - 1) / (32640 * 2^15)
    assert_eq!(d.k_max_exact, 131_586);
    let m: Vec<_> = d
        .modes
        .iter()
        .map(|m| {
            (
                m.mode.as_str(),
                m.products_per_pe_cycle,
                m.peak_macs_per_cycle,
                m.peak_mmac_per_s,
            )
        })
        .collect();
    assert_eq!(
        m,
        vec![
            ("w2", 4, 64, 14_400),
            ("w4", 2, 32, 7_200),
            ("w8", 1, 16, 3_600),
            ("ternary", 4, 64, 14_400)
        ]
    );
    assert!((d.modes[0].peak_gmac_per_s - 14.4).abs() < 1e-9);
    let words: Vec<u32> = d.modes.iter().map(|m| m.stream_words_per_group).collect();
    assert_eq!(words, vec![1, 2, 4, 1]);
    let groups: Vec<u32> = d
        .modes
        .iter()
        .map(|m| m.wgt_buffer_groups_per_col)
        .collect();
    assert_eq!(groups, vec![64, 32, 16, 64]);
    let gemv: Vec<u64> = d.modes.iter().map(|m| m.gemv_macs_per_cycle).collect();
    assert_eq!(gemv, vec![32, 16, 8, 32]);
    let b = |x: &BufferDerived| (x.entries, x.entry_bits, x.banks, x.bits, x.bram36);
    assert_eq!(b(&d.act_buffer), (256, 32, 4, 8192, 4));
    assert_eq!(b(&d.wgt_buffer), (512, 32, 1, 16384, 1));
    assert_eq!(b(&d.meta_buffer), (64, 96, 1, 6144, 2));
    assert_eq!(b(&d.out_buffer), (64, 128, 1, 8192, 2));
    assert_eq!(d.total_bram36, 9);
    assert_eq!(d.total_buffer_bits, 8192 + 16384 + 6144 + 8192);
}

#[test]
fn gpsum_bits_matches_n12_formula() {
    // 1 + ceil(log2(L * 128 * 255 + 1)); N12 says 23 for L = 128.
    assert_eq!(gpsum_bits_for(128), 23);
    assert_eq!(gpsum_bits_for(8), 19);
    for l in [8u32, 16, 32, 64, 128] {
        let max = u64::from(l) * 128 * 255;
        let bits = gpsum_bits_for(l);
        // max and -max fit `bits` signed bits; `bits - 1` would not hold max.
        assert!(max < 1 << (bits - 1) && max >= 1 << (bits - 2), "L = {l}");
    }
}

#[test]
fn k_max_exact_is_tight() {
    let c = tiny();
    let d = c.derive();
    let per_elem = 128u64 * 255 * (1 << d.scale_frac_bits);
    let acc_max = (1u64 << (c.datapath.acc_bits - 1)) - 1;
    assert!(d.k_max_exact * per_elem <= acc_max);
    assert!((d.k_max_exact + 1) * per_elem > acc_max);
}

#[test]
fn datapath_carries_the_config_sizes() {
    let dp = tiny().datapath();
    assert_eq!(
        dp,
        Datapath {
            w_group_len: 32,
            w_scale_bits: 16,
            acc_bits: 48,
            kv_group_len: 32,
            kv_recent_window: 64
        }
    );
    assert_eq!(dp.scale_frac_bits(), tiny().derive().scale_frac_bits);
}

#[test]
fn hash_covers_knobs_not_name() {
    let a = tiny();
    let mut b = a.clone();
    b.name = "renamed".into();
    assert_eq!(a.derive().config_hash, b.derive().config_hash);
    b.buffers.out_depth = 128;
    assert_ne!(a.derive().config_hash, b.derive().config_hash);
    assert!(!a.canonical_json().contains("tiny"));
    assert!(a
        .canonical_json()
        .starts_with("{\"array\":{\"cols\":4,\"rows\":4},\"buffers\":"));
}

#[test]
fn presets_have_distinct_strings_and_hashes() {
    let ds: Vec<Derived> = EngineConfig::preset_names()
        .iter()
        .map(|n| EngineConfig::preset(n).unwrap().derive())
        .collect();
    for i in 0..ds.len() {
        for j in i + 1..ds.len() {
            assert_ne!(ds[i].config_hash, ds[j].config_hash);
        }
    }
    assert_eq!(ds[2].config_string, "32x64_w2a8kv4_g32_a48");
}

#[test]
#[should_panic(expected = "call validate first")]
fn derive_refuses_an_invalid_config() {
    let mut c = tiny();
    c.array.rows = 0;
    let _ = c.derive();
}

#[test]
fn modes_follow_weight_bits_and_ternary() {
    let mut c = tiny();
    c.precision.weight_bits = vec![2, 4];
    c.precision.ternary = false;
    assert_eq!(c.modes(), vec![WeightMode::W2, WeightMode::W4]);
    let h = c.to_c_header();
    assert!(h.contains("#define TESSERA_HAS_W8") && !h.contains("TESSERA_W8_PEAK"));
}

#[test]
fn json_and_header_are_deterministic_and_complete() {
    let c = tiny();
    assert_eq!(c.to_json(), c.to_json());
    let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
    assert_eq!(v["config"]["array"]["rows"], 4);
    assert_eq!(v["derived"]["pe_count"], 16);
    let h = c.to_c_header();
    assert!(h.starts_with("/* tessera_params.h: GENERATED"));
    assert!(
        h.contains("#ifndef TESSERA_PARAMS_H")
            && h.trim_end().ends_with("#endif /* TESSERA_PARAMS_H */")
    );
    assert!(h.contains(&c.derive().config_hash));
    for line in h
        .lines()
        .filter(|l| l.starts_with("#define TESSERA_") && !l.ends_with("_H"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts.len() >= 3 && parts[1].starts_with("TESSERA_"),
            "bad define: {line}"
        );
    }
}

fn parse_err(text: &str) -> String {
    EngineConfig::from_toml_str_named(text, "x.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn parse_errors_are_one_line_with_field_problem_and_fix() {
    let cases = [
        (
            "[array]\nrows = \"four\"\n",
            "x.toml:2: array.rows: expected an integer, found a string (\"four\"); set it to a \
             whole number such as 4",
        ),
        (
            "[array]\nrwos = 4\n",
            "x.toml:2: array.rwos: unknown field \"rwos\"; did you mean rows? remove it; [array] \
             has rows, cols",
        ),
        (
            "arrays = 3\n",
            "x.toml:1: arrays: unknown field \"arrays\"; did you mean array? remove it; the top \
             level has name, array, precision, quant, datapath, buffers, interface, clock",
        ),
        (
            "[array]\nrows = -3\n",
            "x.toml:2: array.rows: an integer (-3) is out of range for an unsigned 32-bit \
             integer; set it to a whole number such as 4",
        ),
        (
            "[precision]\nternary = 1\n",
            "x.toml:2: precision.ternary: expected a boolean, found an integer (1); set it to \
             true or false, e.g. true",
        ),
        (
            "[precision]\nweight_bits = [2, \"x\"]\n",
            "x.toml:2: precision.weight_bits.1: expected an integer, found a string (\"x\"); set \
             it to a whole number such as 4",
        ),
        (
            "[precision]\nweight_bits = 2\n",
            "x.toml:2: precision.weight_bits: expected an array, found an integer (2); set it to \
             an array such as [2, 4, 8]",
        ),
        (
            "clock = 5\n",
            "x.toml:1: clock: expected a table, found an integer (5); write it as a section: \
             [clock] with its fields below",
        ),
        (
            "[array\nrows = 4\n",
            "x.toml:1:7: TOML syntax error: invalid table header expected `.`, `]`; fix the TOML \
             at that position",
        ),
    ];
    for (text, want) in cases {
        let got = parse_err(text);
        assert_eq!(got, want, "for {text:?}");
        assert!(!got.contains('\n'));
    }
}

#[test]
fn load_reports_a_missing_file() {
    let e = EngineConfig::load("/nonexistent/tessera.toml").unwrap_err();
    let s = e.to_string();
    assert!(
        s.starts_with("/nonexistent/tessera.toml: cannot read the file ("),
        "{s}"
    );
    assert!(!s.contains('\n'));
}
