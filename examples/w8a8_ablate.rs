//! Accuracy ablation of the w8a8kv8 mode (docs/accuracy.md): perplexity with one quantization
//! factor at a time, as `tessera ppl` computes it (llama-perplexity chunks, second half scored).
//!
//! A debugging tool, not part of the CLI. Each factor is simulated by "fake quantization" in f32
//! with golden's quantizers (a quantized operand is replaced by `code * scale`); with every factor
//! on (`all`) this is the engine's w8a8kv8 arithmetic up to f32 summation order.
//!
//! ```text
//! cargo run --release --example w8a8_ablate -- --chunks 2 f32 a8qkv a8o all all,p=sum
//! ```
//!
//! Factors (comma-separated; `all` = every one of the w8a8kv8 mode, `-X` removes X):
//! `a8qkv a8o a8gu a8down a8head` per-token A8 (N5) of a linear type's input; `w8` W8 RTN
//! weights of every block linear; `w8head` the output head W8; `q8 k8 v8` per-token A8 query,
//! keys, values; `p=max|sum|wide` probability codes (N19 max/127, the same codes over their sum,
//! 15-bit codes); `fold` the N17 fold of P against the value scales; `sm=A` smoothing with
//! alpha A at every site (`smn=A` norm sites only, `smi=A` O/down only); `clip=R` A8 scale
//! `R * absmax / 127`.

use std::path::PathBuf;
use std::sync::Arc;

use tessera::runtime::cli::load;
use tessera::runtime::engine::quantize_linear;
use tessera::runtime::model::{rms_norm, silu, softmax, Model};
use tessera::runtime::ops::Linear;
use tessera::runtime::ppl::{chunks, log_prob};
use tessera::runtime::smooth::{collect_stats, smooth_model, ActStats, SmoothOptions};
use tessera_golden::config::EngineConfig;
use tessera_golden::kv::{fold_i8, quantize_probs, KvCache as GoldenKv};
use tessera_golden::quant::{quantize_token, scale_multipliers, WeightFormat};

#[derive(Debug, Clone, Default)]
struct Spec {
    name: String,
    a8: [bool; 5],
    w8: bool,
    w8head: bool,
    q8: bool,
    k8: bool,
    v8: bool,
    p: Option<String>,
    fold: bool,
    sm_norm: f32,
    sm_inner: f32,
    clip: f32,
    gkv: u8,
    eng: bool,
}

fn parse(s: &str) -> Spec {
    let mut sp = Spec {
        name: s.to_string(),
        clip: 1.0,
        ..Spec::default()
    };
    for tok in s.split(',') {
        let (neg, t) = tok.strip_prefix('-').map_or((false, tok), |t| (true, t));
        let on = !neg;
        match t {
            "f32" => {}
            "all" => {
                sp.a8 = [true; 5];
                sp.w8 = true;
                sp.w8head = true;
                sp.q8 = true;
                sp.k8 = true;
                sp.v8 = true;
                sp.p = Some("max".into());
                sp.fold = true;
            }
            "a8" => sp.a8 = [on; 5],
            "a8qkv" => sp.a8[0] = on,
            "a8o" => sp.a8[1] = on,
            "a8gu" => sp.a8[2] = on,
            "a8down" => sp.a8[3] = on,
            "a8head" => sp.a8[4] = on,
            "w8" => sp.w8 = on,
            "w8head" => sp.w8head = on,
            "q8" => sp.q8 = on,
            "k8" => sp.k8 = on,
            "v8" => sp.v8 = on,
            "fold" => sp.fold = on,
            "gkv" => sp.gkv = 1,
            "eng" => sp.eng = true,
            "gkv2" => sp.gkv = 2,
            "p" => sp.p = None,
            _ => {
                if let Some(v) = t.strip_prefix("p=") {
                    sp.p = Some(v.to_string());
                } else if let Some(v) = t.strip_prefix("sm=") {
                    sp.sm_norm = v.parse().expect("sm=ALPHA");
                    sp.sm_inner = sp.sm_norm;
                } else if let Some(v) = t.strip_prefix("smn=") {
                    sp.sm_norm = v.parse().expect("smn=ALPHA");
                } else if let Some(v) = t.strip_prefix("smi=") {
                    sp.sm_inner = v.parse().expect("smi=ALPHA");
                } else if let Some(v) = t.strip_prefix("clip=") {
                    sp.clip = v.parse().expect("clip=RATIO");
                } else {
                    panic!("unknown factor {t}");
                }
            }
        }
    }
    sp
}

/// Per-token fake A8 (N5, or a clipped scale).
fn fq_tokens(x: &[f32], k: usize, clip: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(k) {
        if clip == 1.0 {
            let t = quantize_token(row).expect("finite");
            out.extend(t.codes_i8.iter().map(|&c| f32::from(c) * t.scale_x));
        } else {
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = clip * absmax / 127.0;
            if s == 0.0 {
                out.extend(std::iter::repeat_n(0.0, k));
            } else {
                out.extend(
                    row.iter()
                        .map(|&v| (v / s).round().clamp(-127.0, 127.0) * s),
                );
            }
        }
    }
    out
}

fn lin(l: &Linear, x: &[f32], n: usize, a8: bool, clip: f32) -> Vec<f32> {
    let mut y = vec![0f32; n * l.n_out()];
    if a8 {
        let xq = fq_tokens(x, l.n_in(), clip);
        l.forward(&xq, n, &mut y);
    } else {
        l.forward(x, n, &mut y);
    }
    y
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    tessera::runtime::ops::dot(a, b)
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(n: usize, hd: usize, base: f32) -> Rope {
        let half = hd / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for t in 0..n {
            for i in 0..half {
                let th = t as f64 * f64::from(base).powf(-2.0 * i as f64 / hd as f64);
                cos.push(th.cos() as f32);
                sin.push(th.sin() as f32);
            }
        }
        Rope { cos, sin, half }
    }
    fn apply(&self, t: usize, x: &mut [f32]) {
        let h = self.half;
        let (c, s) = (&self.cos[t * h..(t + 1) * h], &self.sin[t * h..(t + 1) * h]);
        for head in x.chunks_exact_mut(2 * h) {
            for i in 0..h {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c[i] - b * s[i];
                head[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

/// Logits of positions `first..n`.
fn forward(m: &Model, sp: &Spec, toks: &[u32], first: usize, sf: u32) -> Vec<f32> {
    let c = &m.cfg;
    let n = toks.len();
    let (d, hd) = (c.d_model, c.head_dim);
    let (qd, kvd) = (c.n_head * hd, c.n_head_kv * hd);
    let group = c.n_head / c.n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let rope = Rope::new(n, hd, c.rope_base);
    let mut x: Vec<f32> = toks
        .iter()
        .flat_map(|&t| {
            m.embed[t as usize * d..(t as usize + 1) * d]
                .iter()
                .copied()
        })
        .collect();
    let mut h = vec![0f32; n * d];
    for l in &m.layers {
        rms_norm(&x, &l.attn_norm, c.rms_eps, &mut h);
        let hin = if sp.a8[0] {
            fq_tokens(&h, d, sp.clip)
        } else {
            h.clone()
        };
        let mut q = lin(&l.wq, &hin, n, false, 1.0);
        let mut k = lin(&l.wk, &hin, n, false, 1.0);
        let v = lin(&l.wv, &hin, n, false, 1.0);
        // Cache: keys as the engine holds them; values as codes + scale (or f32).
        let mut kc = vec![0f32; n * kvd];
        let mut vcodes = vec![0f32; n * kvd];
        let mut vscale = vec![1f32; n * c.n_head_kv];
        let mut att = vec![0f32; n * qd];
        if sp.gkv > 0 {
            // The engine's own KV8 cache and products (golden), one cache per KV head.
            let dp = EngineConfig::preset("tiny").expect("preset").datapath();
            let id = tessera_golden::ops::OutputStage::IDENTITY_I32;
            let mut caches: Vec<GoldenKv> = (0..c.n_head_kv)
                .map(|_| GoldenKv::with_bits(&dp, hd, 8).expect("kv"))
                .collect();
            for t in 0..n {
                rope.apply(t, &mut q[t * qd..(t + 1) * qd]);
                rope.apply(t, &mut k[t * kvd..(t + 1) * kvd]);
                for (kh, cache) in caches.iter_mut().enumerate() {
                    let r = t * kvd + kh * hd..t * kvd + (kh + 1) * hd;
                    cache.push(&k[r.clone()], &v[r]).expect("push");
                }
                for head in 0..c.n_head {
                    let cache = &caches[head / group];
                    let qc = quantize_token(&q[t * qd + head * hd..t * qd + (head + 1) * hd])
                        .expect("q");
                    let mut p: Vec<f32> = cache
                        .qk(&qc.codes_i8, &id)
                        .expect("qk")
                        .scores_f32(&id, qc.scale_x)
                        .iter()
                        .map(|s| s * scale)
                        .collect();
                    softmax(&mut p);
                    let out = if sp.gkv == 2 {
                        let pc = quantize_probs(&p).expect("p");
                        cache
                            .pv_probs(&pc, &id)
                            .expect("pv")
                            .output_f32(&id, pc.scale_p)
                    } else {
                        let pc = quantize_token(&p).expect("p");
                        cache
                            .pv(&pc.codes_i8, &id)
                            .expect("pv")
                            .output_f32(&id, pc.scale_x)
                    };
                    att[t * qd + head * hd..t * qd + (head + 1) * hd].copy_from_slice(&out);
                }
            }
        }
        for t in 0..if sp.gkv > 0 { 0 } else { n } {
            rope.apply(t, &mut q[t * qd..(t + 1) * qd]);
            rope.apply(t, &mut k[t * kvd..(t + 1) * kvd]);
            for kh in 0..c.n_head_kv {
                let r = t * kvd + kh * hd..t * kvd + (kh + 1) * hd;
                if sp.k8 {
                    let kq = quantize_token(&k[r.clone()]).expect("finite");
                    for (o, &cd) in kc[r.clone()].iter_mut().zip(&kq.codes_i8) {
                        *o = f32::from(cd) * kq.scale_x;
                    }
                } else {
                    kc[r.clone()].copy_from_slice(&k[r.clone()]);
                }
                if sp.v8 {
                    let vq = quantize_token(&v[r.clone()]).expect("finite");
                    for (o, &cd) in vcodes[r.clone()].iter_mut().zip(&vq.codes_i8) {
                        *o = f32::from(cd);
                    }
                    vscale[t * c.n_head_kv + kh] = vq.scale_x;
                } else {
                    vcodes[r.clone()].copy_from_slice(&v[r]);
                }
            }
            let nc = t + 1;
            let mut p = vec![0f32; nc];
            for head in 0..c.n_head {
                let kh = head / group;
                let qh = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                let qv: Vec<f32> = if sp.q8 {
                    fq_tokens(qh, hd, 1.0)
                } else {
                    qh.to_vec()
                };
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = dot(&qv, &kc[j * kvd + kh * hd..j * kvd + (kh + 1) * hd]) * scale;
                }
                softmax(&mut p);
                // Effective weight of token j on its value codes (vcodes * w_j).
                let sv: Vec<f32> = (0..nc).map(|j| vscale[j * c.n_head_kv + kh]).collect();
                let w: Vec<f32> = match sp.p.as_deref() {
                    None => p.iter().zip(&sv).map(|(a, b)| a * b).collect(),
                    Some(rule) => {
                        let (codes, sp_scale): (Vec<i64>, f32) = match rule {
                            "max" | "sum" => {
                                let pc = quantize_token(&p).expect("probs");
                                let codes: Vec<i64> =
                                    pc.codes_i8.iter().map(|&x| i64::from(x)).collect();
                                let s = if rule == "sum" {
                                    1.0 / codes.iter().sum::<i64>() as f32
                                } else {
                                    pc.scale_x
                                };
                                (codes, s)
                            }
                            "wide" => {
                                let mx = p.iter().fold(0f32, |a, &b| a.max(b));
                                let s = mx / 32767.0;
                                (p.iter().map(|&x| (x / s).round() as i64).collect(), s)
                            }
                            "two" => {
                                let mx = p.iter().fold(0f32, |a, &b| a.max(b));
                                let s = mx / 16383.0;
                                (
                                    p.iter()
                                        .map(|&x| (x / s).round().min(16383.0) as i64)
                                        .collect(),
                                    s,
                                )
                            }
                            r => panic!("p rule {r}"),
                        };
                        if rule == "two" {
                            // codes = 128 * hi + lo, each plane in [0, 127], folded separately.
                            let (s_ref, fs) = if sp.fold && sp.v8 {
                                scale_multipliers(&sv, sf)
                            } else {
                                (1.0, vec![1u16 << sf; nc])
                            };
                            let hi: Vec<i8> = codes.iter().map(|&x| (x >> 7) as i8).collect();
                            let lo: Vec<i8> = codes.iter().map(|&x| (x & 127) as i8).collect();
                            let (fh, fl) = (fold_i8(&hi, &fs, sf), fold_i8(&lo, &fs, sf));
                            let s_ref_eff: Vec<f32> = if sp.fold && sp.v8 {
                                vec![s_ref; nc]
                            } else {
                                sv.clone()
                            };
                            fh.iter()
                                .zip(&fl)
                                .zip(&s_ref_eff)
                                .map(|((&a, &b), &s)| {
                                    (128.0 * f32::from(a) + f32::from(b)) * s * sp_scale
                                })
                                .collect()
                        } else if sp.fold && sp.v8 && rule != "wide" {
                            let (s_ref, fs) = scale_multipliers(&sv, sf);
                            let c8: Vec<i8> = codes.iter().map(|&x| x as i8).collect();
                            let xf = fold_i8(&c8, &fs, sf);
                            xf.iter()
                                .map(|&x| f32::from(x) * s_ref * sp_scale)
                                .collect()
                        } else {
                            codes
                                .iter()
                                .zip(&sv)
                                .map(|(&cd, &s)| cd as f32 * sp_scale * s)
                                .collect()
                        }
                    }
                };
                let out = &mut att[t * qd + head * hd..t * qd + (head + 1) * hd];
                for (j, &wj) in w.iter().enumerate() {
                    let vr = &vcodes[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
                    for (o, &vv) in out.iter_mut().zip(vr) {
                        *o += wj * vv;
                    }
                }
            }
        }
        let o = lin(&l.wo, &att, n, sp.a8[1], sp.clip);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
        let hin = if sp.a8[2] {
            fq_tokens(&h, d, sp.clip)
        } else {
            h.clone()
        };
        let mut g = lin(&l.w_gate, &hin, n, false, 1.0);
        let u = lin(&l.w_up, &hin, n, false, 1.0);
        for (gi, ui) in g.iter_mut().zip(&u) {
            *gi = silu(*gi) * ui;
        }
        let o = lin(&l.w_down, &g, n, sp.a8[3], sp.clip);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
    }
    let rows = n - first;
    let mut hn = vec![0f32; rows * d];
    rms_norm(&x[first * d..], &m.out_norm, c.rms_eps, &mut hn);
    lin(&m.output, &hn, rows, sp.a8[4], sp.clip)
}

fn w8(l: &Linear, dp: &tessera_golden::numerics::Datapath) -> Linear {
    let Linear::F32(d) = l else {
        panic!("f32 model")
    };
    let qw = quantize_linear(&d.w, d.n_in, d.n_out, WeightFormat::W8, dp).expect("quantize");
    Linear::f32(Arc::new(qw.dequantize()), d.n_in, d.n_out)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |flag: &str, def: &str| -> String {
        match args.iter().position(|a| a == flag) {
            Some(i) => {
                let v = args[i + 1].clone();
                args.drain(i..i + 2);
                v
            }
            None => def.to_string(),
        }
    };
    let n_chunks: usize = take("--chunks", "2").parse().expect("--chunks N");
    let skip: usize = take("--skip", "0").parse().expect("--skip N");
    let text = PathBuf::from(take("--text", "data/gpl-3.txt"));
    let calib = PathBuf::from(take("--calib", "data/calibration.txt"));
    let calib_chunks: usize = take("--calib-chunks", "2").parse().expect("N");
    let model_path = tessera::runtime::cli::resolve_model(None).expect("model");
    let specs: Vec<Spec> = args.iter().map(|s| parse(s)).collect();
    let (base, tok) = load(&model_path).expect("load");
    let dp = EngineConfig::preset("tiny").expect("preset").datapath();
    let sf = dp.scale_frac_bits();
    let ctx = 512;
    let all = chunks(
        &tok,
        &std::fs::read_to_string(&text).expect("text"),
        ctx,
        None,
    )
    .expect("chunks");
    let eval: Vec<Vec<u32>> = all.into_iter().skip(skip).take(n_chunks).collect();
    let mut stats: Option<ActStats> = None;
    let first = ctx / 2;
    eprintln!(
        "{} chunks (skip {skip}), {} scored tokens each",
        eval.len(),
        ctx - 1 - first
    );
    if std::env::var_os("ABLATE_CHECK").is_some() {
        let d = base.cfg.d_model;
        let n = std::env::var("ABLATE_N").map_or(64, |v| v.parse().expect("n"));
        let mut x = vec![0f32; n * d];
        for (t, &tk) in eval[0].iter().cycle().take(n).enumerate() {
            tessera::runtime::model::rms_norm(
                &base.embed[tk as usize * d..(tk as usize + 1) * d],
                &base.layers[3].attn_norm,
                base.cfg.rms_eps,
                &mut x[t * d..(t + 1) * d],
            );
        }
        check_linear(&base, &x, n);
        return;
    }
    for sp in &specs {
        let t0 = std::time::Instant::now();
        let mut m = base.clone();
        if sp.sm_norm > 0.0 || sp.sm_inner > 0.0 {
            if stats.is_none() {
                let ct = chunks(
                    &tok,
                    &std::fs::read_to_string(&calib).expect("calib"),
                    ctx,
                    Some(calib_chunks),
                )
                .expect("calib chunks");
                stats = Some(collect_stats(&base, &ct).expect("stats"));
            }
            let opts = SmoothOptions {
                alpha_norm: sp.sm_norm,
                alpha_inner: sp.sm_inner,
            };
            smooth_model(&mut m, stats.as_ref().expect("stats"), opts).expect("smooth");
        }
        if sp.w8 {
            for l in &mut m.layers {
                for w in [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.w_gate,
                    &mut l.w_up,
                    &mut l.w_down,
                ] {
                    *w = w8(w, &dp);
                }
            }
        }
        if sp.w8head {
            m.output = w8(&m.output, &dp);
        }
        if sp.eng {
            // The engine's own linears (A8 inside, W8 RTN, kernels-cpu), as apply_mode builds them.
            let isa = tessera::runtime::ops::Isa::from_env().expect("isa");
            let mk = |l: &Linear| -> Linear {
                let Linear::F32(d) = l else {
                    panic!("f32 model")
                };
                let qw = quantize_linear(&d.w, d.n_in, d.n_out, WeightFormat::W8, &dp)
                    .expect("quantize");
                let mut e = Linear::Engine(
                    tessera::runtime::ops::EngineLinear::new(Arc::new(qw), dp).expect("engine"),
                );
                e.set_backend(tessera::runtime::ops::Backend::Cpu, isa);
                e
            };
            for l in &mut m.layers {
                for w in [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.w_gate,
                    &mut l.w_up,
                    &mut l.w_down,
                ] {
                    *w = mk(w);
                }
            }
            m.output = mk(&m.output);
        }
        let (mut nll, mut cnt) = (0f64, 0usize);
        let mut per = Vec::new();
        for ch in &eval {
            let logits = forward(&m, sp, ch, first, sf);
            let (mut cn, mut cc) = (0f64, 0usize);
            for j in first..ctx - 1 {
                let row = &logits[(j - first) * m.cfg.vocab..(j - first + 1) * m.cfg.vocab];
                cn -= log_prob(row, ch[j + 1]);
                cc += 1;
            }
            per.push(format!("{:.4}", (cn / cc as f64).exp()));
            nll += cn;
            cnt += cc;
        }
        println!(
            "{:<40} ppl {:.4}  chunks [{}]  {} tokens  {:.0} s",
            sp.name,
            (nll / cnt as f64).exp(),
            per.join(" "),
            cnt,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// Engine linear vs fake-quant linear on one layer's real input (debug).
#[allow(dead_code)]
pub fn check_linear(m: &Model, x: &[f32], n: usize) {
    let dp = EngineConfig::preset("tiny").expect("preset").datapath();
    let isa = tessera::runtime::ops::Isa::from_env().expect("isa");
    let xd: Vec<f32> = (0..n * 1536)
        .map(|i| x[i % x.len()] * (1.0 + (i % 7) as f32))
        .collect();
    let mut all: Vec<(String, &Linear)> = Vec::new();
    for (i, ly) in m.layers.iter().enumerate() {
        for (nm, l) in [
            ("q", &ly.wq),
            ("k", &ly.wk),
            ("v", &ly.wv),
            ("o", &ly.wo),
            ("g", &ly.w_gate),
            ("u", &ly.w_up),
            ("d", &ly.w_down),
        ] {
            all.push((format!("{i}.{nm}"), l));
        }
    }
    all.push(("head".into(), &m.output));
    for (name, l) in all {
        let x: &[f32] = if l.n_in() == 1536 { &xd } else { x };
        let Linear::F32(d) = l else { panic!() };
        let qw = quantize_linear(&d.w, d.n_in, d.n_out, WeightFormat::W8, &dp).expect("q");
        let fake = Linear::f32(Arc::new(qw.dequantize()), d.n_in, d.n_out);
        let mut e =
            Linear::Engine(tessera::runtime::ops::EngineLinear::new(Arc::new(qw), dp).expect("e"));
        e.set_backend(tessera::runtime::ops::Backend::Cpu, isa);
        let y_f = lin(&fake, x, n, true, 1.0);
        let y_e = lin(&e, x, n, false, 1.0);
        let y_0 = lin(l, x, n, false, 1.0);
        let err = |a: &[f32], b: &[f32]| -> f64 {
            let num: f64 = a.iter().zip(b).map(|(p, q)| f64::from(p - q).powi(2)).sum();
            let den: f64 = b.iter().map(|q| f64::from(*q).powi(2)).sum();
            (num / den).sqrt()
        };
        if err(&y_e, &y_f) > 1e-4 {
            println!(
                "{name}: rel err fake-vs-f32 {:.5}  engine-vs-f32 {:.5}  engine-vs-fake {:.6}",
                err(&y_f, &y_0),
                err(&y_e, &y_0),
                err(&y_e, &y_f)
            );
        }
    }
    println!("checked");
}
