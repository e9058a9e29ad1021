//! `tessera ppl` (perplexity as llama.cpp's `llama-perplexity` computes it) and `tessera compare`
//! (greedy-token agreement and mean KL divergence of a mode against f32).
//!
//! Chunking, as `llama-perplexity`: the whole text is tokenized once (BOS first when the model's
//! metadata asks for it), cut into `n = floor(tokens / ctx)` non-overlapping chunks of `ctx`
//! tokens, the first token of each chunk replaced by BOS (when the model wants one), and each
//! chunk run from an empty cache; only positions `ctx/2 .. ctx-2` are scored (each predicting the
//! next token), unless `--all-positions` (then `0 .. ctx-2`).

use std::path::PathBuf;
use std::time::Instant;

use super::cli::{load_with_mode, progress_bar, resolve_model};
use super::engine::{EngineArgs, Mode};
use super::model::Model;
use super::tokenizer::Tokenizer;
use super::{Error, Result};

/// Arguments of `tessera ppl`.
#[derive(Debug, Clone, clap::Args)]
pub struct PplArgs {
    /// Model: a GGUF, or a .tsr written by `tessera quantize` [default: the fetched SmolLM2]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Text file to evaluate (UTF-8)
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per chunk
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N chunks
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Score every position of a chunk, not only the second half
    #[arg(long)]
    pub all_positions: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The chunks of a text, as `llama-perplexity` cuts them.
pub fn chunks(
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
    max_chunks: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    if ctx < 4 {
        return Err(Error::new(format!("--ctx {ctx} must be at least 4")));
    }
    let mut tokens = Vec::new();
    if tok.add_bos {
        tokens.extend(tok.bos_id);
    }
    tokens.extend(tok.encode(text)?);
    let n_max = tokens.len() / ctx;
    if tokens.len() < 2 * ctx {
        return Err(Error::new(format!(
            "the text has {} tokens: at least 2 * ctx = {} are needed (as llama-perplexity)",
            tokens.len(),
            2 * ctx
        )));
    }
    let n = max_chunks.map_or(n_max, |c| c.min(n_max));
    if n == 0 {
        return Err(Error::new("--chunks must be at least 1"));
    }
    Ok((0..n)
        .map(|i| {
            let mut c = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if tok.add_bos {
                if let Some(b) = tok.bos_id {
                    c[0] = b;
                }
            }
            c
        })
        .collect())
}

/// `log softmax(logits)[target]` in f64.
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - m).exp()).sum();
    f64::from(logits[target as usize] - m) - sum.ln()
}

/// First scored position of a chunk.
pub fn first_scored(ctx: usize, all_positions: bool) -> usize {
    if all_positions {
        0
    } else {
        ctx / 2
    }
}

/// Logits of positions `first..ctx` of one chunk (`(ctx - first) * vocab` values).
pub fn chunk_logits(model: &Model, chunk: &[u32], first: usize) -> Result<Vec<f32>> {
    let mut s = model.session();
    model.forward_rows(&mut s, chunk, chunk.len() - first)
}

/// Runs `tessera ppl`.
pub fn run_ppl(args: &PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .map_err(|e| Error::new(format!("cannot read {}: {e}", args.text.display())))?;
    let path = resolve_model(args.model.as_ref())?;
    let (model, tok, mode) = load_with_mode(&path, &args.engine)?;
    let chunks = chunks(&tok, &text, args.ctx, args.chunks)?;
    if args.ctx > model.cfg.ctx_len {
        return Err(Error::new(format!(
            "--ctx {} exceeds the model's context length {}",
            args.ctx, model.cfg.ctx_len
        )));
    }
    let first = first_scored(args.ctx, args.all_positions);
    let vocab = model.cfg.vocab;
    let bar = progress_bar("ppl {msg} [{bar:30}] {pos}/{len} chunks, eta {eta}");
    bar.set_length(chunks.len() as u64);
    let t0 = Instant::now();
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::new();
    for chunk in &chunks {
        let logits = chunk_logits(&model, chunk, first)?;
        for j in first..args.ctx - 1 {
            let row = &logits[(j - first) * vocab..(j - first + 1) * vocab];
            let lp = -log_prob(row, chunk[j + 1]);
            nll += lp;
            nll2 += lp * lp;
            count += 1;
        }
        let ppl = (nll / count as f64).exp();
        running.push(format!("[{}]{ppl:.4}", running.len() + 1));
        bar.set_message(format!("{ppl:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let err = ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt();
    eprintln!("{}", running.join(","));
    println!(
        "perplexity: {ppl:.4} +/- {err:.4} (mode {}, ctx {}, {} chunks, {count} scored tokens{}; {:.1} s, {:.1} tok/s)",
        mode.name(),
        args.ctx,
        chunks.len(),
        if args.all_positions { ", all positions" } else { ", second half" },
        secs,
        (chunks.len() * args.ctx) as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Arguments of `tessera compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Model in the compared mode: a GGUF or a .tsr [default: the fetched SmolLM2]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// f32 reference GGUF [default: --model if it is a GGUF, else the fetched SmolLM2]
    #[arg(long, value_name = "PATH")]
    pub reference: Option<PathBuf>,
    /// Text file (UTF-8)
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per chunk
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N chunks
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub chunks: usize,
    /// Score every position of a chunk, not only the second half
    #[arg(long)]
    pub all_positions: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `KL(p || q)` of two logit rows (p the reference), in f64.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lse = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        f64::from(m) + l.iter().map(|&x| f64::from(x - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p_logits), lse(q_logits));
    p_logits
        .iter()
        .zip(q_logits)
        .map(|(&a, &b)| {
            let la = f64::from(a) - lp;
            la.exp() * (la - (f64::from(b) - lq))
        })
        .sum()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Runs `tessera compare`.
pub fn run_compare(args: &CompareArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .map_err(|e| Error::new(format!("cannot read {}: {e}", args.text.display())))?;
    let path = resolve_model(args.model.as_ref())?;
    let (model, tok, mode) = load_with_mode(&path, &args.engine)?;
    let ref_path = match &args.reference {
        Some(p) => p.clone(),
        None if !super::tsr::is_tsr(&path) => path.clone(),
        None => resolve_model(None)?,
    };
    let f32_args = EngineArgs {
        mode: Some(Mode::F32),
        ..args.engine.clone()
    };
    let (reference, _, _) = load_with_mode(&ref_path, &f32_args)?;
    if reference.cfg != model.cfg {
        return Err(Error::new(
            "the reference model's configuration differs from the compared model's",
        ));
    }
    let chunks = chunks(&tok, &text, args.ctx, Some(args.chunks))?;
    let first = first_scored(args.ctx, args.all_positions);
    let vocab = model.cfg.vocab;
    let bar = progress_bar("compare [{bar:30}] {pos}/{len} chunks, eta {eta}");
    bar.set_length(chunks.len() as u64);
    let (mut kl, mut agree, mut count) = (0f64, 0usize, 0usize);
    let (mut nll_ref, mut nll_mode) = (0f64, 0f64);
    for chunk in &chunks {
        let lr = chunk_logits(&reference, chunk, first)?;
        let lm = chunk_logits(&model, chunk, first)?;
        for j in first..args.ctx - 1 {
            let r = (j - first) * vocab..(j - first + 1) * vocab;
            kl += kl_divergence(&lr[r.clone()], &lm[r.clone()]);
            agree += usize::from(argmax(&lr[r.clone()]) == argmax(&lm[r.clone()]));
            nll_ref -= log_prob(&lr[r.clone()], chunk[j + 1]);
            nll_mode -= log_prob(&lm[r], chunk[j + 1]);
            count += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let n = count as f64;
    println!(
        "mode {} vs f32 over {count} positions ({} chunks of {}): greedy-token agreement {:.2}%, mean KL divergence {:.5} nats, perplexity {:.4} (f32 {:.4})",
        mode.name(),
        chunks.len(),
        args.ctx,
        100.0 * agree as f64 / n,
        kl / n,
        (nll_mode / n).exp(),
        (nll_ref / n).exp(),
    );
    Ok(())
}
