//! Selection of the w8a8kv8 smoothing statistic on held-out calibration text (docs/accuracy.md).
//!
//! A measurement tool, not part of the CLI. `data/calibration.txt` is split into a statistics
//! part (everything but the last 30,000 bytes) and a held-out part (the last 30,000 bytes, never
//! seen by the statistics; `smooth::statistics_text`, `smooth::held_out_text`). Per-chunk activation maxima are measured once by the f32 model on the
//! statistics part's 512-token chunks (cached in `$TMPDIR`), then each candidate is built exactly
//! as `tessera ppl --mode w8a8kv8` builds the model (smoothing, then `apply_mode`, cpu backend)
//! and scored on the held-out chunks (llama-perplexity chunks, second half): perplexity, and
//! the mean KL divergence from the f32 model on the same positions (the selection metric: it
//! measures the distortion itself, which perplexity mixes with chance gains).
//!
//! ```text
//! cargo run --release --example smooth_select -- --chunks 4 f32 max:0-1 mean:0-8 median:0-8:s1
//! ```
//!
//! A candidate is `STAT:FROM-TO[:sSKIP][:aALPHA][:iALPHA]`: the statistic (`max`, `mean` or
//! `median` of the per-chunk maxima) over statistics chunks `FROM..TO`, optionally without the
//! first SKIP positions of each chunk (0 or 1: the BOS position), with migration strength ALPHA
//! (default 0.8) at the norm sites and `i` at O/down (default: the same). `f32` is the reference.

use tessera::runtime::cli::load;
use tessera::runtime::engine::{apply_mode, Mode};
use tessera::runtime::model::Model;
use tessera::runtime::ops::{Backend, Isa};
use tessera::runtime::ppl::{chunk_logits, chunks, kl_divergence, log_prob};
use tessera::runtime::smooth::{
    collect_chunk_stats, held_out_text, reduce_stats, smooth_model, statistics_text, ActStats,
    LayerStats, Reduce, SmoothOptions,
};
use tessera_golden::config::EngineConfig;

fn save(path: &std::path::Path, all: &[ActStats]) {
    let mut b: Vec<u8> = Vec::new();
    b.extend((all.len() as u64).to_le_bytes());
    for s in all {
        b.extend((s.tokens as u64).to_le_bytes());
        b.extend((s.layers.len() as u64).to_le_bytes());
        for l in &s.layers {
            for v in [&l.attn_in, &l.o_in, &l.ffn_in, &l.down_in] {
                b.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend(x.to_le_bytes());
                }
            }
        }
    }
    std::fs::write(path, b).expect("write cache");
}

fn load_cache(path: &std::path::Path) -> Option<Vec<ActStats>> {
    let b = std::fs::read(path).ok()?;
    let mut p = 0usize;
    fn u(b: &[u8], p: &mut usize) -> usize {
        let v = u64::from_le_bytes(b[*p..*p + 8].try_into().expect("8"));
        *p += 8;
        v as usize
    }
    let n = u(&b, &mut p);
    let mut out = Vec::new();
    for _ in 0..n {
        let tokens = u(&b, &mut p);
        let nl = u(&b, &mut p);
        let mut layers = Vec::new();
        for _ in 0..nl {
            let mut vs: Vec<Vec<f32>> = Vec::new();
            for _ in 0..4 {
                let k = u(&b, &mut p);
                let v: Vec<f32> = (0..k)
                    .map(|i| {
                        let o = p + 4 * i;
                        f32::from_le_bytes(b[o..o + 4].try_into().expect("4"))
                    })
                    .collect();
                p += 4 * k;
                vs.push(v);
            }
            let down_in = vs.pop()?;
            let ffn_in = vs.pop()?;
            let o_in = vs.pop()?;
            let attn_in = vs.pop()?;
            layers.push(LayerStats {
                attn_in,
                o_in,
                ffn_in,
                down_in,
            });
        }
        out.push(ActStats { layers, tokens });
    }
    Some(out)
}

fn max_stats(a: &ActStats, b: &ActStats) -> ActStats {
    reduce_stats(&[a.clone(), b.clone()], Reduce::Max)
}

/// Perplexity, cumulative per-chunk perplexities, and the mean KL divergence from `reference`
/// (the f32 logits of the same rows; 0 when empty).
fn eval(
    m: &Model,
    eval: &[Vec<u32>],
    first: usize,
    reference: &[Vec<f32>],
) -> (f64, Vec<String>, f64, Vec<Vec<f32>>) {
    let (mut nll, mut cnt, mut kl) = (0f64, 0usize, 0f64);
    let mut per = Vec::new();
    let mut all = Vec::new();
    let v = m.cfg.vocab;
    for (c, ch) in eval.iter().enumerate() {
        let logits = chunk_logits(m, ch, first).expect("forward");
        for j in first..ch.len() - 1 {
            let r = (j - first) * v..(j - first + 1) * v;
            nll -= log_prob(&logits[r.clone()], ch[j + 1]);
            if let Some(rf) = reference.get(c) {
                kl += kl_divergence(&rf[r.clone()], &logits[r]);
            }
            cnt += 1;
        }
        per.push(format!("{:.4}", (nll / cnt as f64).exp()));
        all.push(logits);
    }
    ((nll / cnt as f64).exp(), per, kl / cnt as f64, all)
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
    let n_chunks: usize = take("--chunks", "4").parse().expect("--chunks N");
    let model_path = tessera::runtime::cli::resolve_model(None).expect("model");
    let (base, tok) = load(&model_path).expect("load");
    let dp = EngineConfig::preset("tiny").expect("preset").datapath();
    let isa = Isa::from_env().expect("isa");
    let ctx = 512;
    let (stat_text, held_out) = (statistics_text(), held_out_text());
    let held: Vec<Vec<u32>> = chunks(&tok, held_out, ctx, Some(n_chunks)).expect("held-out");
    let stat_chunks = chunks(&tok, stat_text, ctx, None).expect("stat chunks");
    eprintln!(
        "statistics part: {} bytes, {} chunks; held-out: {} bytes, {} chunks",
        stat_text.len(),
        stat_chunks.len(),
        held_out.len(),
        held.len()
    );
    let cache = std::env::temp_dir().join("tessera-smooth-select-stats.bin");
    // Per chunk: the maxima over positions 1.. and over position 0 alone (causal, so running
    // the first token alone gives its exact activations).
    let (rest, pos0) = match load_cache(&cache) {
        Some(mut v) if v.len() == 2 * stat_chunks.len() => {
            let p0 = v.split_off(stat_chunks.len());
            (v, p0)
        }
        _ => {
            let t0 = std::time::Instant::now();
            let rest = collect_chunk_stats(&base, &stat_chunks, 1).expect("stats");
            let firsts: Vec<Vec<u32>> = stat_chunks.iter().map(|c| c[..1].to_vec()).collect();
            let p0 = collect_chunk_stats(&base, &firsts, 0).expect("stats");
            let mut all = rest.clone();
            all.extend(p0.iter().cloned());
            save(&cache, &all);
            eprintln!("statistics in {:.0} s", t0.elapsed().as_secs_f64());
            (rest, p0)
        }
    };
    let first = ctx / 2;
    // f32 logits of the held-out rows, for the KL divergence (cached).
    let ref_path = std::env::temp_dir().join(format!("tessera-smooth-select-f32-{n_chunks}.bin"));
    let reference: Vec<Vec<f32>> = match std::fs::read(&ref_path) {
        Ok(b) if b.len() == n_chunks * (ctx - first) * base.cfg.vocab * 4 => b
            .chunks_exact((ctx - first) * base.cfg.vocab * 4)
            .map(|c| {
                c.chunks_exact(4)
                    .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                    .collect()
            })
            .collect(),
        _ => {
            let (p, per, _, all) = eval(&base, &held, first, &[]);
            println!("{:<28} ppl {p:.4}  cumulative [{}]", "f32", per.join(" "));
            let bytes: Vec<u8> = all.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&ref_path, bytes).expect("write f32 logits");
            all
        }
    };
    for spec in &args {
        let t0 = std::time::Instant::now();
        let mut m = base.clone();
        if spec != "f32" {
            let parts: Vec<&str> = spec.split(':').collect();
            let how = match parts[0] {
                "max" => Reduce::Max,
                "mean" => Reduce::Mean,
                "median" => Reduce::Median,
                s => panic!("statistic {s}"),
            };
            let (a, b) = parts[1].split_once('-').expect("FROM-TO");
            let (a, b): (usize, usize) = (a.parse().expect("FROM"), b.parse().expect("TO"));
            let (mut skip, mut an, mut ai) = (0usize, 0.8f32, None);
            for p in &parts[2..] {
                if let Some(v) = p.strip_prefix('s') {
                    skip = v.parse().expect("sSKIP");
                } else if let Some(v) = p.strip_prefix('a') {
                    an = v.parse().expect("aALPHA");
                } else if let Some(v) = p.strip_prefix('i') {
                    ai = Some(v.parse().expect("iALPHA"));
                } else {
                    panic!("{p}");
                }
            }
            let per: Vec<ActStats> = (a..b)
                .map(|i| {
                    if skip == 0 {
                        max_stats(&rest[i], &pos0[i])
                    } else {
                        rest[i].clone()
                    }
                })
                .collect();
            let st = reduce_stats(&per, how);
            smooth_model(
                &mut m,
                &st,
                SmoothOptions {
                    alpha_norm: an,
                    alpha_inner: ai.unwrap_or(an),
                },
            )
            .expect("smooth");
            apply_mode(&mut m, Mode::W8a8kv8, &dp, 8, &|_, _| {}).expect("quantize");
            m.set_backend(Backend::Cpu, isa);
        }
        let (ppl, per, kl, _) = eval(&m, &held, first, &reference);
        println!(
            "{:<28} ppl {:.4}  KL {:.5}  cumulative [{}]  {:.0} s",
            spec,
            ppl,
            kl,
            per.join(" "),
            t0.elapsed().as_secs_f64()
        );
    }
}
