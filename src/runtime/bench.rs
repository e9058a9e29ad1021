//! `tessera bench run` and `tessera bench mem`: end-to-end prefill and decode tokens/s of the
//! CPU runtime, the machine they ran on, and the memory-bandwidth roofline of decode.
//!
//! Method (as llama-bench's `pp`/`tg` tests, so the figures compare): prefill runs
//! `--prompt-tokens` pseudo-random token ids as one batch in a fresh session; decode runs
//! `--gen-tokens` single-token steps from an empty session (greedy: each step feeds the argmax
//! of the previous logits). One warm-up pass, then `--reps` repetitions; the mean is printed.
//! The roofline is the measured streaming-read bandwidth divided by the bytes of weights one
//! decode step reads (every linear layer's re-packed codes and group metadata).

use std::time::Instant;

use rayon::prelude::*;

use super::cli::{load_with_mode, progress_bar, resolve_model, set_threads};
use super::engine::{EngineArgs, Mode};
use super::model::{on_pool_worker, Model, Profile};
use super::ops::Backend;
use super::sampler::argmax;
use super::{Error, Result};

/// Arguments of `tessera bench run`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchRunArgs {
    /// GGUF model (or .tsr) [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long, value_name = "PATH")]
    pub model: Option<std::path::PathBuf>,
    /// Prompt tokens of the prefill test (one batch)
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Generated tokens of the decode test (one token per step, from an empty context)
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions of each test (after one warm-up); the mean is reported
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also print where decode time goes (per part of the forward pass)
    #[arg(long)]
    pub profile: bool,
    /// Also measure the memory bandwidth and print the decode roofline
    #[arg(long)]
    pub roofline: bool,
    /// Also print, per decode repetition, the spread of the per-token step times and the
    /// helpers' share of the decode team's tasks (host slowdowns show as phases of slow
    /// tokens with an unchanged share; a missing helper as a share near 0)
    #[arg(long)]
    pub token_times: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Arguments of `tessera bench mem`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchMemArgs {
    /// Buffer size in MiB (well above the last-level cache)
    #[arg(long, default_value_t = 512)]
    pub mib: usize,
    /// Threads [default: every core]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// CPU model, logical cores and the SIMD flags that matter to the kernels (from
/// `/proc/cpuinfo` where there is one).
pub fn machine_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let flags = field("flags").unwrap_or_default();
    let mut simd: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| *f == "avx2" || *f == "fma" || f.starts_with("avx512") || f.contains("vnni"))
        .collect();
    simd.sort_unstable();
    simd.dedup();
    format!(
        "machine: {model}, {cores} logical cores, flags: {}",
        if simd.is_empty() {
            "none of avx2/avx512*/vnni".to_string()
        } else {
            simd.join(" ")
        }
    )
}

/// Streaming-read bandwidth in GB/s (10^9 bytes/s): the best of several passes summing a
/// `mib` MiB buffer of `u64` on the current rayon pool.
pub fn mem_bandwidth_gbs(mib: usize) -> f64 {
    let n = (mib.max(1) << 20) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    let mut sink = 0u64;
    for _ in 0..6 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                // Eight independent lanes: the loop vectorizes and is bound by memory.
                let mut acc = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] = acc[i].wrapping_add(w[i]);
                    }
                }
                acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        sink = sink.wrapping_add(s);
        best = best.max((n * 8) as f64 / secs / 1e9);
    }
    std::hint::black_box(sink);
    best
}

/// Pseudo-random token ids in `[0, vocab)` (fixed seed), as llama-bench feeds.
fn bench_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Seconds of one prefill of `tokens` in a fresh session.
fn time_prefill(model: &Model, tokens: &[u32]) -> Result<f64> {
    Ok(time_prefill_profiled(model, tokens, false)?.0)
}

/// [`time_prefill`], with the profile of its forward pass if asked.
fn time_prefill_profiled(
    model: &Model,
    tokens: &[u32],
    profile: bool,
) -> Result<(f64, Option<Profile>)> {
    let mut s = model.session();
    if profile {
        s.enable_profile();
    }
    let t = Instant::now();
    model.forward_into(&mut s, tokens, 1)?;
    Ok((t.elapsed().as_secs_f64(), s.ws.profile.take()))
}

/// Per-token figures of one decode run (`--token-times`): each step's milliseconds and the
/// helpers' share of the team tasks it ran (`None` when the step ran no team task).
#[derive(Debug, Default)]
struct TokenTimes {
    ms: Vec<f64>,
    helper_share: Vec<Option<f64>>,
}

impl TokenTimes {
    /// One line: token ms min / p10 / median / p90 / max (nearest rank: the sorted index
    /// `(len - 1) * q` rounded) and the median helper share.
    fn line(&self, rep: usize) -> String {
        let mut ms = self.ms.clone();
        ms.sort_by(f64::total_cmp);
        let mut share: Vec<f64> = self.helper_share.iter().flatten().copied().collect();
        share.sort_by(f64::total_cmp);
        let pick = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        let without = self.helper_share.len() - share.len();
        let share = if share.is_empty() {
            "no team tasks (one thread, or the team backed off)".to_string()
        } else if without == 0 {
            format!(
                "helpers ran {:.0}% of the team tasks (median; min {:.0}%)",
                100.0 * pick(&share, 0.5),
                100.0 * share[0]
            )
        } else {
            // Steps with no team task: the team backed off (`Team::lead`), rayon forked.
            let mut off: Vec<f64> = (self.ms.iter().zip(&self.helper_share))
                .filter_map(|(&t, s)| s.is_none().then_some(t))
                .collect();
            off.sort_by(f64::total_cmp);
            format!(
                "helpers ran {:.0}% of the team tasks (median; min {:.0}%); {without} tokens \
                 without the team (backed off), median {:.2} ms",
                100.0 * pick(&share, 0.5),
                100.0 * share[0],
                pick(&off, 0.5)
            )
        };
        format!(
            "decode rep {rep}: {} tokens, ms/token min {:.2} p10 {:.2} median {:.2} p90 {:.2} max {:.2}; {share}",
            ms.len(),
            ms[0],
            pick(&ms, 0.1),
            pick(&ms, 0.5),
            pick(&ms, 0.9),
            ms[ms.len() - 1]
        )
    }
}

/// Seconds of `n` greedy decode steps from an empty session, and the profile if asked (with
/// the decode team's task counts, leader and helpers, in `Profile::team_tasks`); with `times`,
/// each step's time and helper share too.
fn time_decode(
    model: &Model,
    n: usize,
    profile: bool,
    mut times: Option<&mut TokenTimes>,
) -> Result<(f64, Option<Profile>)> {
    let mut s = model.session();
    if profile {
        s.enable_profile();
    }
    if let Some(tt) = times.as_deref_mut() {
        tt.ms.reserve(n);
        tt.helper_share.reserve(n);
    }
    // On one pool worker, as `tessera run` generates (see `on_pool_worker`).
    let secs = on_pool_worker(|| -> Result<f64> {
        let mut next = 1u32;
        let t = Instant::now();
        for _ in 0..n {
            // Only with `times`: a plain run times the loop as a whole, nothing per step.
            let before = times
                .is_some()
                .then(|| (Instant::now(), s.team().task_counts()));
            next = argmax(model.forward_into(&mut s, &[next], 1)?) as u32;
            if let (Some(tt), Some((t1, c0))) = (times.as_deref_mut(), before) {
                let c1 = s.team().task_counts();
                let (lead, help) = (c1.0 - c0.0, c1.1 - c0.1);
                tt.ms.push(t1.elapsed().as_secs_f64() * 1e3);
                tt.helper_share
                    .push((lead + help > 0).then(|| help as f64 / (lead + help) as f64));
            }
        }
        Ok(t.elapsed().as_secs_f64())
    })?;
    let mut p = s.ws.profile.take();
    if let Some(p) = p.as_mut() {
        p.team_tasks = s.team().task_counts();
    }
    Ok((secs, p))
}

/// Runs `tessera bench run`, printing the header, `prefill:` and `decode:` lines (and the
/// roofline and profile when asked) on stdout.
pub fn run_bench(args: &BenchRunArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.reps == 0 {
        return Err(Error::new(
            "--prompt-tokens, --gen-tokens and --reps must be at least 1",
        ));
    }
    let path = resolve_model(args.model.as_ref())?;
    let (model, _tok, mode) = load_with_mode(&path, &args.engine)?;
    if args.prompt_tokens.max(args.gen_tokens + 1) > model.cfg.ctx_len {
        return Err(Error::new(format!(
            "--prompt-tokens / --gen-tokens exceed the context length {}",
            model.cfg.ctx_len
        )));
    }
    let threads = rayon::current_num_threads();
    let (backend, isa) = model.backend();
    let path_used = match (mode, backend) {
        (Mode::F32, _) => "f32 (auto-vectorized dot products)".to_string(),
        (_, Backend::Golden) => "golden reference ops (scalar)".to_string(),
        (_, Backend::Cpu) => format!("kernels-cpu {isa}"),
    };
    println!("{}", machine_line());
    println!(
        "model: {} | mode {} | {} | threads {threads} | pp{} tg{} x{} reps",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        mode.name(),
        path_used,
        args.prompt_tokens,
        args.gen_tokens,
        args.reps
    );
    let prompt = bench_tokens(args.prompt_tokens, model.cfg.vocab);
    let bar = progress_bar("{msg} [{bar:30}] {pos}/{len}");
    bar.set_length((2 * (args.reps + 1)) as u64);
    bar.set_message("warm-up");
    time_prefill(&model, &prompt[..prompt.len().min(16)])?;
    time_decode(&model, args.gen_tokens.min(8), false, None)?;
    bar.inc(2);
    bar.set_message("prefill");
    let mut pp = 0.0;
    for _ in 0..args.reps {
        pp += time_prefill(&model, &prompt)?;
        bar.inc(1);
    }
    bar.set_message("decode");
    let mut tg = 0.0;
    let mut token_times = Vec::new();
    for _ in 0..args.reps {
        let mut tt = TokenTimes::default();
        let times = args.token_times.then_some(&mut tt);
        tg += time_decode(&model, args.gen_tokens, false, times)?.0;
        token_times.push(tt);
        bar.inc(1);
    }
    let profile = if args.profile {
        bar.set_message("profile");
        Some((
            time_prefill_profiled(&model, &prompt, true)?,
            time_decode(&model, args.gen_tokens, true, None)?,
        ))
    } else {
        None
    };
    bar.finish_and_clear();
    let pp_tok_s = (args.reps * args.prompt_tokens) as f64 / pp;
    let tg_tok_s = (args.reps * args.gen_tokens) as f64 / tg;
    println!("prefill: {pp_tok_s:.1} tok/s");
    println!("decode: {tg_tok_s:.1} tok/s");
    if args.token_times {
        for (rep, tt) in token_times.iter().enumerate() {
            println!("{}", tt.line(rep + 1));
        }
    }
    if args.roofline {
        let bytes = model.weight_bytes_per_token() + 4 * model.cfg.d_model;
        let gbs = mem_bandwidth_gbs(512);
        let roof = gbs * 1e9 / bytes as f64;
        println!(
            "roofline: {:.1} MB of weights per decode token, {gbs:.1} GB/s streaming read ({threads} threads) -> {roof:.1} tok/s; decode at {:.0}% of it",
            bytes as f64 / 1e6,
            100.0 * tg_tok_s / roof
        );
    }
    if let Some(((pre_secs, pre), (secs, dec))) = profile {
        if let Some(p) = pre {
            print_profile("prefill", p.steps.max(1) * args.prompt_tokens, &p, pre_secs);
        }
        if let Some(p) = dec {
            print_profile("decode", p.steps, &p, secs);
        }
    }
    Ok(())
}

/// The time per part of `what` (`tokens` tokens), per token and as a share of the whole
/// (prefill: the batched attention is timed as "q.K scores").
fn print_profile(what: &str, tokens: usize, p: &Profile, wall: f64) {
    let steps = tokens.max(1) as f64;
    let total: f64 = p.secs.iter().sum();
    println!(
        "{what} profile ({tokens} tokens, {:.3} ms/token wall, {:.3} ms/token in timed parts):",
        1e3 * wall / steps,
        1e3 * total / steps
    );
    for (name, s) in p.parts() {
        println!(
            "  {name:<20} {:>8.3} ms/token {:>5.1}%",
            1e3 * s / steps,
            100.0 * s / total.max(1e-12)
        );
    }
    println!(
        "  {:<20} {:>8.3} ms/token (sampling, session, timer overhead)",
        "outside the parts",
        1e3 * (wall - total) / steps
    );
    let (lead, help) = p.team_tasks;
    if lead + help > 0 {
        println!(
            "  decode team: {lead} loop tasks on the leader, {help} on helpers ({:.0}%)",
            100.0 * help as f64 / (lead + help) as f64
        );
    }
}

/// Runs `tessera bench mem`: one line, the streaming-read bandwidth.
pub fn run_mem(args: &BenchMemArgs) -> Result<()> {
    set_threads(args.threads)?;
    println!("{}", machine_line());
    let bar = progress_bar("{spinner} reading {msg}");
    bar.set_message(format!("{} MiB", args.mib));
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let gbs = mem_bandwidth_gbs(args.mib);
    bar.finish_and_clear();
    println!(
        "memory: {gbs:.1} GB/s streaming read ({} MiB, {} threads, best of 6)",
        args.mib,
        rayon::current_num_threads()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TokenTimes;

    #[test]
    fn token_times_line_gives_the_spread_and_the_median_helper_share() {
        let tt = TokenTimes {
            ms: vec![5.0, 4.0, 9.0, 6.0, 4.5],
            helper_share: vec![Some(0.5), Some(0.1), Some(0.4), Some(0.7), Some(0.6)],
        };
        assert_eq!(
            tt.line(2),
            "decode rep 2: 5 tokens, ms/token min 4.00 p10 4.00 median 5.00 p90 9.00 max 9.00; \
             helpers ran 50% of the team tasks (median; min 10%)"
        );
        let backed_off = TokenTimes {
            ms: vec![5.0, 4.0, 9.0, 6.0, 4.5],
            helper_share: vec![Some(0.5), Some(0.1), None, None, Some(0.6)],
        };
        assert_eq!(
            backed_off.line(3),
            "decode rep 3: 5 tokens, ms/token min 4.00 p10 4.00 median 5.00 p90 9.00 max 9.00; \
             helpers ran 50% of the team tasks (median; min 10%); 2 tokens without the team \
             (backed off), median 9.00 ms"
        );
        let one = TokenTimes {
            ms: vec![7.25],
            helper_share: vec![None],
        };
        assert_eq!(
            one.line(1),
            "decode rep 1: 1 tokens, ms/token min 7.25 p10 7.25 median 7.25 p90 7.25 max 7.25; \
             no team tasks (one thread, or the team backed off)"
        );
    }
}
