//! The f32 forward pass: a tiny random Llama written as a GGUF in memory must match a naive
//! (f64, no KV cache) implementation written here; and, when the real SmolLM2 GGUF is in the
//! cache (scripts/fetch-model.sh), its logits must match the numpy reference
//! (scripts/ref_forward.py -> tests/data/runtime_ref_logits.json) and its greedy continuation
//! must be sensible English.

mod runtime_support;

use std::path::PathBuf;
use std::sync::OnceLock;

use runtime_support::{quant_q8_0, write_gguf, Rng, T, V};
use tessera::runtime::cli;
use tessera::runtime::gguf::Gguf;
use tessera::runtime::model::Model;
use tessera::runtime::sampler::{argmax, Sampler};
use tessera::runtime::tokenizer::Tokenizer;

struct Tiny {
    n_layer: usize,
    d: usize,
    ff: usize,
    n_head: usize,
    n_kv: usize,
    vocab: usize,
    ctx: usize,
}

const TINY: Tiny = Tiny {
    n_layer: 2,
    d: 64,
    ff: 96,
    n_head: 4,
    n_kv: 2,
    vocab: 40,
    ctx: 16,
};

const BASE: f32 = 10_000.0;
const EPS: f32 = 1e-5;

/// A random tiny Llama GGUF; `tied` leaves out output.weight. The embedding is Q8_0.
fn tiny_gguf(t: &Tiny, tied: bool, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let hd = t.d / t.n_head;
    let kvd = t.n_kv * hd;
    let (d, ff) = (t.d as u64, t.ff as u64);
    let kv = vec![
        ("general.architecture", V::str("llama")),
        ("llama.block_count", V::U32(t.n_layer as u32)),
        ("llama.context_length", V::U32(t.ctx as u32)),
        ("llama.embedding_length", V::U32(t.d as u32)),
        ("llama.feed_forward_length", V::U32(t.ff as u32)),
        ("llama.attention.head_count", V::U32(t.n_head as u32)),
        ("llama.attention.head_count_kv", V::U32(t.n_kv as u32)),
        ("llama.rope.freq_base", V::F32(BASE)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(EPS)),
        ("llama.rope.dimension_count", V::U32(hd as u32)),
    ];
    let mut ts = vec![T {
        name: "token_embd.weight".into(),
        dims: vec![d, t.vocab as u64],
        ty: 8,
        data: quant_q8_0(&rng.vec(t.d * t.vocab, 1.0)),
    }];
    let norm = |rng: &mut Rng| {
        (0..t.d)
            .map(|_| 1.0 + 0.2 * rng.next_f32())
            .collect::<Vec<_>>()
    };
    ts.push(T::f32("output_norm.weight", &[d], &norm(&mut rng)));
    if !tied {
        let w = rng.vec(t.d * t.vocab, 0.5);
        ts.push(T::f32("output.weight", &[d, t.vocab as u64], &w));
    }
    let s = 1.0 / (t.d as f32).sqrt();
    for i in 0..t.n_layer {
        let lin = |name: &str, n_in: u64, n_out: u64, rng: &mut Rng| {
            let w = rng.vec((n_in * n_out) as usize, 2.0 * s);
            T::f32(&format!("blk.{i}.{name}.weight"), &[n_in, n_out], &w)
        };
        let layer = vec![
            T::f32(&format!("blk.{i}.attn_norm.weight"), &[d], &norm(&mut rng)),
            lin("attn_q", d, d, &mut rng),
            lin("attn_k", d, kvd as u64, &mut rng),
            lin("attn_v", d, kvd as u64, &mut rng),
            lin("attn_output", d, d, &mut rng),
            T::f32(&format!("blk.{i}.ffn_norm.weight"), &[d], &norm(&mut rng)),
            lin("ffn_gate", d, ff, &mut rng),
            lin("ffn_up", d, ff, &mut rng),
            lin("ffn_down", ff, d, &mut rng),
        ];
        ts.extend(layer);
    }
    write_gguf(&kv, &ts, None)
}

/// Naive f64 forward pass over the whole sequence (no cache); last token's logits.
fn naive_logits(g: &Gguf, t: &Tiny, tokens: &[u32], tied: bool) -> Vec<f64> {
    let w = |name: &str| -> Vec<f64> {
        let ti = g.tensor(name).expect("tensor");
        let x = g.tensor_f32(name, &ti.dims.clone()).expect("dequant");
        x.into_iter().map(f64::from).collect()
    };
    // y = W x with W stored as n_out rows of n_in.
    let mv = |wm: &[f64], x: &[f64]| -> Vec<f64> {
        wm.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rms = |x: &[f64], wn: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + f64::from(EPS)).sqrt();
        x.iter().zip(wn).map(|(v, w)| v * s * w).collect()
    };
    let hd = t.d / t.n_head;
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let th = pos as f64 / f64::from(BASE).powf(2.0 * i as f64 / hd as f64);
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * th.cos() - b * th.sin();
                head[2 * i + 1] = a * th.sin() + b * th.cos();
            }
        }
    };
    let emb = w("token_embd.weight");
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| emb[id as usize * t.d..(id as usize + 1) * t.d].to_vec())
        .collect();
    for l in 0..t.n_layer {
        let p = |n: &str| w(&format!("blk.{l}.{n}.weight"));
        let (wq, wk, wv, wo) = (p("attn_q"), p("attn_k"), p("attn_v"), p("attn_output"));
        let (an, fnm) = (p("attn_norm"), p("ffn_norm"));
        let (wg, wu, wd) = (p("ffn_gate"), p("ffn_up"), p("ffn_down"));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, &an);
            let mut q = mv(&wq, &h);
            let mut k = mv(&wk, &h);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(mv(&wv, &h));
        }
        for pos in 0..xs.len() {
            let mut att = vec![0f64; t.d];
            for head in 0..t.n_head {
                let kvh = head * t.n_kv / t.n_head;
                let q = &qs[pos][head * hd..(head + 1) * hd];
                let sc: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for i in 0..hd {
                        att[head * hd + i] += ej / z * vs[j][kvh * hd + i];
                    }
                }
            }
            let o = mv(&wo, &att);
            for (a, b) in xs[pos].iter_mut().zip(o) {
                *a += b;
            }
            let h = rms(&xs[pos], &fnm);
            let gt = mv(&wg, &h);
            let up = mv(&wu, &h);
            let act: Vec<f64> = gt
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = mv(&wd, &act);
            for (a, b) in xs[pos].iter_mut().zip(dn) {
                *a += b;
            }
        }
    }
    let h = rms(xs.last().expect("tokens"), &w("output_norm.weight"));
    let out = if tied { emb } else { w("output.weight") };
    mv(&out, &h)
}

fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
    assert!(
        err <= rel * scale,
        "{what}: max |diff| {err:e} > {rel:e} * max |logit| {scale}"
    );
}

#[test]
fn tiny_model_matches_naive_forward() {
    let tokens = [3u32, 17, 0, 39, 22, 5, 5, 11];
    for tied in [true, false] {
        let g = Gguf::from_bytes(tiny_gguf(&TINY, tied, 7)).expect("tiny gguf");
        let mut calls = 0;
        let m = Model::from_gguf(&g, |_, _| calls += 1).expect("load");
        assert_eq!(
            calls,
            2 + usize::from(!tied) + 9 * TINY.n_layer,
            "progress per tensor"
        );
        assert_eq!(m.cfg.head_dim, 16);
        assert_eq!(m.cfg.vocab, TINY.vocab);
        let want = naive_logits(&g, &TINY, &tokens, tied);

        // Whole prompt at once.
        let mut s = m.session();
        let got = m.forward(&mut s, &tokens, false).expect("prefill");
        assert_close(&got, &want, 1e-5, "prefill");

        // All logits: the last row equals the single-logits call; earlier rows match naive too.
        let mut s = m.session();
        let all = m.forward(&mut s, &tokens, true).expect("all logits");
        assert_eq!(all.len(), tokens.len() * TINY.vocab);
        assert_close(
            &all[(tokens.len() - 1) * TINY.vocab..],
            &want,
            1e-5,
            "all last",
        );
        let want3 = naive_logits(&g, &TINY, &tokens[..3], tied);
        assert_close(
            &all[2 * TINY.vocab..3 * TINY.vocab],
            &want3,
            1e-5,
            "all row 2",
        );

        // Prompt in pieces through the KV cache, then one token at a time.
        let mut s = m.session();
        m.forward(&mut s, &tokens[..3], false).expect("part 1");
        let mut last = Vec::new();
        for &tk in &tokens[3..] {
            last = m.forward(&mut s, &[tk], false).expect("decode");
        }
        assert_eq!(s.pos, tokens.len());
        assert_close(&last, &want, 1e-5, "incremental");
    }
}

#[test]
fn tiny_model_errors_are_clean() {
    let g = Gguf::from_bytes(tiny_gguf(&TINY, true, 3)).expect("tiny gguf");
    let m = Model::from_gguf(&g, |_, _| {}).expect("load");
    let mut s = m.session();
    let e = m.forward(&mut s, &[40], false).expect_err("oov");
    assert!(e.to_string().contains("out of the vocabulary"), "{e}");
    assert!(m.forward(&mut s, &[], false).is_err());
    let long = vec![1u32; TINY.ctx + 1];
    let e = m.forward(&mut s, &long, false).expect_err("ctx");
    assert!(e.to_string().contains("context"), "{e}");

    // A missing tensor, and wrong metadata, are one-line errors.
    let mut bytes = tiny_gguf(&TINY, true, 3);
    let at = bytes
        .windows(b"blk.1.ffn_up".len())
        .position(|w| w == b"blk.1.ffn_up")
        .expect("name");
    bytes[at + 4] = b'9';
    let g = Gguf::from_bytes(bytes).expect("still a gguf");
    let e = Model::from_gguf(&g, |_, _| {}).expect_err("missing");
    assert!(e.to_string().contains("blk.1.ffn_up.weight"), "{e}");

    let bad = Tiny { n_kv: 3, ..TINY };
    let g = Gguf::from_bytes(tiny_gguf(&bad, true, 3)).expect("gguf");
    let e = Model::from_gguf(&g, |_, _| {}).expect_err("gqa");
    assert!(e.to_string().contains("head_count_kv"), "{e}");
}

#[test]
fn sampler_is_greedy_at_zero_and_seeded_otherwise() {
    let logits = [0.1f32, 2.0, -1.0, 2.0, 1.9];
    assert_eq!(argmax(&logits), 1);
    assert_eq!(Sampler::new(0.0, 0.9, 1).sample(&logits), 1);
    let draw = |seed| {
        let mut s = Sampler::new(1.0, 1.0, seed);
        (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
    };
    assert_eq!(draw(5), draw(5), "same seed, same tokens");
    assert_ne!(draw(5), draw(6));
    assert!(
        draw(5).contains(&4) && draw(5).contains(&0),
        "temperature 1 explores"
    );
    // A tiny top-p keeps only the best tokens (ties: 1 and 3).
    let mut s = Sampler::new(1.0, 0.01, 9);
    for _ in 0..32 {
        assert_eq!(s.sample(&logits), 1);
    }
}

// ---- the real model (skipped when it has not been fetched) ----

fn real_model() -> Option<&'static (Model, Tokenizer)> {
    static M: OnceLock<Option<(Model, Tokenizer)>> = OnceLock::new();
    M.get_or_init(|| {
        let path = std::env::var_os("TESSERA_TEST_MODEL")
            .map(PathBuf::from)
            .or_else(cli::default_model_path)
            .filter(|p| p.is_file());
        let Some(path) = path else {
            println!("SKIPPED: SmolLM2 GGUF not in the cache; run scripts/fetch-model.sh");
            return None;
        };
        Some(cli::load(&path).expect("load the real model"))
    })
    .as_ref()
}

#[test]
fn real_model_logits_match_numpy_reference() {
    let Some((m, tok)) = real_model() else { return };
    let refj: serde_json::Value =
        serde_json::from_str(include_str!("data/runtime_ref_logits.json")).expect("reference json");
    let ids = |k: &str| -> Vec<u32> {
        refj[k]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    let floats = |k: &str| -> Vec<f64> {
        refj[k]
            .as_array()
            .expect("array")
            .iter()
            .map(|v| v.as_f64().expect("float"))
            .collect()
    };
    let tokens = ids("tokens");
    assert_eq!(
        tok.encode("The capital of France is").expect("encode"),
        tokens
    );
    let mut s = m.session();
    let logits = m.forward(&mut s, &tokens, false).expect("forward");
    let max_abs = refj["max_abs"].as_f64().expect("max_abs");
    let tol = 1e-3 * max_abs;
    let top = ids("top_ids");
    assert_eq!(argmax(&logits) as u32, top[0], "top token");
    assert_eq!(tok.decode(&top[..1]), " Paris");
    for (&id, want) in top.iter().zip(floats("top_logits")) {
        let got = f64::from(logits[id as usize]);
        assert!((got - want).abs() <= tol, "logit[{id}] {got} vs {want}");
    }
    let stride = refj["stride"].as_u64().expect("stride") as usize;
    for (i, want) in floats("strided_logits").into_iter().enumerate() {
        let got = f64::from(logits[i * stride]);
        assert!(
            (got - want).abs() <= tol,
            "logit[{}] {got} vs {want}",
            i * stride
        );
    }
}

#[test]
fn real_model_greedy_continuation_is_english() {
    let Some((m, tok)) = real_model() else { return };
    let prompt = cli::prompt_tokens(tok, "What is the capital of France?", true).expect("prompt");
    let mut s = m.session();
    let mut logits = m.forward(&mut s, &prompt, false).expect("prefill");
    let mut out = Vec::new();
    for _ in 0..12 {
        let next = argmax(&logits) as u32;
        if tok.is_end(next) {
            break;
        }
        out.push(next);
        logits = m.forward(&mut s, &[next], false).expect("decode");
    }
    let text = tok.decode(&out);
    println!("greedy: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");
    assert!(
        text.chars()
            .all(|c| c.is_ascii() && (c == '\n' || !c.is_ascii_control())),
        "{text:?}"
    );
}
