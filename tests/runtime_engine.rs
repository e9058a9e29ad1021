//! The quantized execution modes against golden: a random one-layer Llama run by the runtime in
//! w8a8kv8 / w2a8kv4 must give exactly (bit for bit) the logits of the same computation written
//! here with direct calls to `tessera-golden` (`quantize_tokens`, `weight_op`,
//! `dequantize_weight_op`, `KvCache::{push, qk, pv}`, `quantize_probs`) and the host's f32 ops;
//! the engine linear layer equals `golden::ops::weight_op`; the runtime's KV4 cache equals golden
//! attention and stays near the float reference.
#![allow(clippy::unwrap_used)]

mod runtime_support;

use std::sync::Arc;

use runtime_support::{Rng, DP_SMALL_KV as DP};
use tessera_golden::numerics::Datapath;

use tessera::runtime::engine::{apply_mode, Mode};
use tessera::runtime::model::{rms_norm, silu, softmax, Layer, LlamaConfig, Model};
use tessera::runtime::ops::{EngineLinear, KvCache, KvKind, Linear};
use tessera_golden::kv::{attention_ref_f64, quantize_probs, KvCache as GoldenKv};
use tessera_golden::ops::{dequantize_weight_op, weight_op, OutputStage};
use tessera_golden::quant::{quantize_token, quantize_tokens, quantize_weights, WeightFormat};

fn tiny_model(seed: u64) -> Model {
    let cfg = LlamaConfig {
        n_layer: 1,
        d_model: 64,
        n_ff: 96,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        vocab: 40,
        ctx_len: 64,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
    };
    let mut r = Rng(seed);
    let (d, ff, kvd) = (64, 96, 32);
    let lin = |r: &mut Rng, n_in: usize, n_out: usize| {
        Linear::f32(Arc::new(r.vec(n_in * n_out, 0.25)), n_in, n_out)
    };
    let norm = |r: &mut Rng| {
        (0..d)
            .map(|_| 1.0 + 0.2 * r.next_f32())
            .collect::<Vec<f32>>()
    };
    let embed = Arc::new(r.vec(40 * d, 1.0));
    let layer = Layer {
        attn_norm: norm(&mut r),
        wq: lin(&mut r, d, d),
        wk: lin(&mut r, d, kvd),
        wv: lin(&mut r, d, kvd),
        wo: lin(&mut r, d, d),
        ffn_norm: norm(&mut r),
        w_gate: lin(&mut r, d, ff),
        w_up: lin(&mut r, d, ff),
        w_down: lin(&mut r, ff, d),
    };
    Model {
        cfg,
        embed: embed.clone(),
        layers: vec![layer],
        out_norm: norm(&mut r),
        output: Linear::f32(embed, d, 40),
        kv: KvKind::F32,
    }
}

fn f32_weights(l: &Linear) -> Vec<f32> {
    match l {
        Linear::F32(d) => d.w.to_vec(),
        _ => panic!("expected an f32 layer"),
    }
}

/// `y = W x` of `n` tokens by direct golden calls (N5, N12-N14, N20).
fn golden_linear(
    w: &[f32],
    n_in: usize,
    n_out: usize,
    x: &[f32],
    n: usize,
    f: WeightFormat,
) -> Vec<f32> {
    let qw = quantize_weights(w, n_out, n_in, f, &DP).unwrap();
    let acts = quantize_tokens(x, n, n_in).unwrap();
    let stage = OutputStage::weight_lattice_i32(DP.scale_frac_bits());
    let y = weight_op(&DP, &acts.codes_i8, n, &qw, &stage).unwrap();
    dequantize_weight_op(&y, &stage, &acts.scale_x, &qw).concat()
}

fn rope(x: &mut [f32], pos: usize, hd: usize, base: f32) {
    for head in x.chunks_exact_mut(hd) {
        for i in 0..hd / 2 {
            let theta = pos as f64 * f64::from(base).powf(-2.0 * i as f64 / hd as f64);
            let (c, s) = (theta.cos() as f32, theta.sin() as f32);
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
}

/// The whole one-layer forward pass of `m` (f32 weights) written with golden calls.
fn golden_forward(m: &Model, tokens: &[u32], f: WeightFormat, kv_bits: u32) -> Vec<f32> {
    let c = &m.cfg;
    let (d, hd, n) = (c.d_model, c.head_dim, tokens.len());
    let (qd, kvd) = (c.n_head * hd, c.n_head_kv * hd);
    let l = &m.layers[0];
    let mut x: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| m.embed[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let mut h = vec![0f32; n * d];
    rms_norm(&x, &l.attn_norm, c.rms_eps, &mut h);
    let mut q = golden_linear(&f32_weights(&l.wq), d, qd, &h, n, f);
    let mut k = golden_linear(&f32_weights(&l.wk), d, kvd, &h, n, f);
    let v = golden_linear(&f32_weights(&l.wv), d, kvd, &h, n, f);
    let mut caches: Vec<GoldenKv> = (0..c.n_head_kv)
        .map(|_| GoldenKv::with_bits(&DP, hd, kv_bits).unwrap())
        .collect();
    let id = OutputStage::IDENTITY_I32;
    let mut att = vec![0f32; n * qd];
    for t in 0..n {
        rope(&mut q[t * qd..(t + 1) * qd], t, hd, c.rope_base);
        rope(&mut k[t * kvd..(t + 1) * kvd], t, hd, c.rope_base);
        for (kh, cache) in caches.iter_mut().enumerate() {
            let o = t * kvd + kh * hd;
            cache.push(&k[o..o + hd], &v[o..o + hd]).unwrap();
        }
        for head in 0..c.n_head {
            let cache = &caches[head / (c.n_head / c.n_head_kv)];
            let qc = quantize_token(&q[t * qd + head * hd..t * qd + (head + 1) * hd]).unwrap();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut sc: Vec<f32> = cache
                .qk(&qc.codes_i8, &id)
                .unwrap()
                .scores_f32(&id, qc.scale_x)
                .iter()
                .map(|s| s * scale)
                .collect();
            softmax(&mut sc);
            let pc = quantize_probs(&sc).unwrap();
            let out = cache
                .pv_probs(&pc, &id)
                .unwrap()
                .output_f32(&id, pc.scale_p);
            att[t * qd + head * hd..t * qd + (head + 1) * hd].copy_from_slice(&out);
        }
    }
    let o = golden_linear(&f32_weights(&l.wo), qd, d, &att, n, f);
    x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
    let mut g = golden_linear(&f32_weights(&l.w_gate), d, c.n_ff, &h, n, f);
    let u = golden_linear(&f32_weights(&l.w_up), d, c.n_ff, &h, n, f);
    for (gi, ui) in g.iter_mut().zip(&u) {
        *gi = silu(*gi) * ui;
    }
    let o = golden_linear(&f32_weights(&l.w_down), c.n_ff, d, &g, n, f);
    x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    let mut hn = vec![0f32; n * d];
    rms_norm(&x, &m.out_norm, c.rms_eps, &mut hn);
    golden_linear(&m.embed, d, c.vocab, &hn, n, WeightFormat::W8)
}

#[test]
fn one_layer_forward_equals_direct_golden_calls() {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 40).collect();
    for (mode, f, kv_bits) in [
        (Mode::W8a8kv8, WeightFormat::W8, 8),
        (Mode::W2a8kv4, WeightFormat::W2, 4),
    ] {
        let reference = tiny_model(5);
        let want = golden_forward(&reference, &tokens, f, kv_bits);
        let mut m = tiny_model(5);
        apply_mode(&mut m, mode, &DP, 8, &|_, _| {}).unwrap();
        // Prefill all at once...
        let mut s = m.session();
        let got = m.forward(&mut s, &tokens, true).unwrap();
        assert_eq!(
            got, want,
            "{mode:?}: prefill logits differ from direct golden calls"
        );
        assert!(
            s.caches[0].memory_bytes() > 0,
            "the session's cache is the engine's"
        );
        // ...and token by token (decode) give the same integers, hence the same logits.
        let mut s = m.session();
        for (t, &tok) in tokens.iter().enumerate() {
            let row = m.forward(&mut s, &[tok], false).unwrap();
            assert_eq!(row, want[t * 40..(t + 1) * 40], "{mode:?}: decode step {t}");
        }
    }
}

#[test]
fn engine_linear_equals_golden_weight_op() {
    let mut r = Rng(11);
    let (n, k, m) = (37, 80, 3); // k not a multiple of the group: a short last group
    let w = r.vec(n * k, 0.3);
    let mut x = r.vec(m * k, 2.0);
    x[k..2 * k].fill(0.0); // an all-zero token
    for f in [WeightFormat::W2, WeightFormat::W4, WeightFormat::W8] {
        let qw = Arc::new(quantize_weights(&w, n, k, f, &DP).unwrap());
        let e = EngineLinear::new(qw.clone(), DP).unwrap();
        let acts = quantize_tokens(&x, m, k).unwrap();
        let stage = OutputStage::weight_lattice_i32(DP.scale_frac_bits());
        let want = weight_op(&DP, &acts.codes_i8, m, &qw, &stage).unwrap();
        assert_eq!(e.forward_int(&acts.codes_i8, m), want.concat());
        let mut y = vec![0f32; m * n];
        Linear::Engine(e).forward(&x, m, &mut y);
        assert_eq!(
            y,
            dequantize_weight_op(&want, &stage, &acts.scale_x, &qw).concat()
        );
    }
    // A datapath the tensor was not quantized for is refused.
    let qw = Arc::new(quantize_weights(&w, n, k, WeightFormat::W2, &DP).unwrap());
    let other = Datapath {
        w_group_len: 64,
        ..DP
    };
    assert!(EngineLinear::new(qw, other).is_err());
}

#[test]
fn kv4_cache_path_equals_golden_attention() {
    let (n_kv, hd) = (2, 16);
    let mut r = Rng(3);
    let mut cache = KvCache::new(KvKind::Engine { dp: DP, bits: 4 }, n_kv, hd).unwrap();
    let mut golden: Vec<GoldenKv> = (0..n_kv).map(|_| GoldenKv::new(&DP, hd).unwrap()).collect();
    let (mut keys, mut values) = (vec![Vec::new(); n_kv], vec![Vec::new(); n_kv]);
    let id = OutputStage::IDENTITY_I32;
    for t in 0..30 {
        let (k, v) = (r.vec(n_kv * hd, 2.0), r.vec(n_kv * hd, 1.0));
        cache.push(&k, &v);
        for h in 0..n_kv {
            golden[h]
                .push(&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd])
                .unwrap();
            keys[h].push(k[h * hd..(h + 1) * hd].to_vec());
            values[h].push(v[h * hd..(h + 1) * hd].to_vec());
        }
        assert_eq!(cache.len(), t + 1);
        for h in 0..n_kv {
            let q = r.vec(hd, 1.5);
            let mut scores = vec![0f32; t + 1];
            cache.scores(h, &q, 0.25, &mut scores);
            let qc = quantize_token(&q).unwrap();
            let want: Vec<f32> = golden[h]
                .qk(&qc.codes_i8, &id)
                .unwrap()
                .scores_f32(&id, qc.scale_x)
                .iter()
                .map(|s| s * 0.25)
                .collect();
            assert_eq!(scores, want);
            softmax(&mut scores);
            let mut out = vec![0f32; hd];
            cache.weighted_sum(h, &scores, &mut out);
            let pc = quantize_probs(&scores).unwrap();
            let want = golden[h]
                .pv_probs(&pc, &id)
                .unwrap()
                .output_f32(&id, pc.scale_p);
            assert_eq!(out, want);
            // Near the float attention of the original keys and values (4-bit tokens: loose).
            let (_, reference) = attention_ref_f64(&q, &keys[h], &values[h]);
            let err = out
                .iter()
                .zip(&reference)
                .map(|(a, b)| (f64::from(*a) - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 0.25, "t {t} head {h}: attention error {err}");
        }
    }
    let golden_bytes: usize = golden.iter().map(GoldenKv::memory_bytes).sum();
    assert_eq!(cache.memory_bytes(), golden_bytes);
    assert!(golden[0].n4_tokens() > 0, "4-bit groups were exercised");
}
