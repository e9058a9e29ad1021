//! `tessera run`: load a GGUF model, tokenize a prompt (optionally through the chat template),
//! prefill, then stream generated tokens to stdout; speeds go to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::engine::{apply_mode, EngineArgs, Mode};
use super::gguf::Gguf;
use super::model::{on_pool_worker, Model};
use super::ops::{Backend, Isa};
use super::sampler::Sampler;
use super::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use super::{Error, Result};

/// File name of the default model inside the cache's `models/` folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Arguments of `tessera run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// GGUF model file [default: the SmolLM2-135M-Instruct fetched by scripts/fetch-model.sh]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Prompt text
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    pub n_predict: usize,
    /// Sampling seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature (0 = greedy)
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus (top-p) sampling threshold, used when --temp > 0
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
}

/// `${TESSERA_CACHE:-$HOME/.cache/tessera}` (as scripts/fetch-model.sh).
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("TESSERA_CACHE") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache").join("tessera")),
    }
}

/// Where scripts/fetch-model.sh puts SmolLM2-135M-Instruct.
pub fn default_model_path() -> Option<PathBuf> {
    cache_dir().map(|d| d.join("models").join(DEFAULT_MODEL_FILE))
}

/// Resolves `--model`, with a clear error when the default model was never fetched.
pub fn resolve_model(model: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(p) = model {
        return Ok(p.clone());
    }
    match default_model_path() {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(Error::new(format!(
            "no model at {}: run scripts/fetch-model.sh, or pass --model PATH",
            p.display()
        ))),
        None => Err(Error::new(
            "no default model path (HOME and TESSERA_CACHE unset): pass --model PATH",
        )),
    }
}

/// Loads a model and its tokenizer, with a progress bar on stderr while weights dequantize.
pub fn load(path: &std::path::Path) -> Result<(Model, Tokenizer)> {
    let g = Gguf::open(path)?;
    let tok =
        Tokenizer::from_gguf(&g).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let model = Model::from_gguf(&g, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
    bar.finish_and_clear();
    if model.cfg.vocab < tok.vocab_size() {
        return Err(Error::new(format!(
            "{}: tokenizer has {} tokens but the embedding only {}",
            path.display(),
            tok.vocab_size(),
            model.cfg.vocab
        )));
    }
    Ok((model, tok))
}

/// A progress bar on stderr with `template` (`{msg}`, `{bar}`, `{pos}`, `{len}`...).
pub fn progress_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// FNV-1a of a file's bytes (the key of caches derived from a model file), read in 1 MiB
/// pieces. About 0.1 s for the 100 MB SmolLM2 GGUF.
fn file_fingerprint(path: &std::path::Path) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::new(format!("{}: cannot read the model: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::new(format!("{}: cannot read the model: {e}", path.display())))?;
        if n == 0 {
            return Ok(h);
        }
        for &b in &buf[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Loads a model (GGUF or .tsr) and puts it in the mode `engine` asks for (default: f32 for a
/// GGUF, the file's scheme for a .tsr). Returns the mode used.
pub fn load_with_mode(
    path: &std::path::Path,
    engine: &EngineArgs,
) -> Result<(Model, Tokenizer, Mode)> {
    set_threads(engine.threads)?;
    let (mut model, tok, file_mode) = if super::tsr::is_tsr(path) {
        let (m, t, mode) = super::tsr::load(path)?;
        (m, t, mode)
    } else {
        let (m, t) = load(path)?;
        (m, t, Mode::F32)
    };
    let mode = engine.mode.unwrap_or(file_mode);
    let dp = match &model.layers.first().map(|l| &l.wq) {
        // A .tsr fixes the datapath it was quantized for.
        Some(super::ops::Linear::Engine(e)) => e.dp,
        _ => engine.datapath()?,
    };
    let smooth = engine.smooth.unwrap_or(mode.default_smooth());
    if mode != Mode::F32 && file_mode == Mode::F32 && smooth != 0.0 {
        let bar = progress_bar("smoothing: calibrating [{bar:30}] {pos}/{len} chunks");
        // The statistics depend on the model file's contents only: cache them under its hash.
        let hash = file_fingerprint(path)?;
        let key = format!("model {} (content fnv1a {hash:016x})", path.display());
        let cache_file = cache_dir().map(|d| {
            d.join("smooth").join(format!(
                "{}-{hash:016x}.stats",
                path.file_stem()
                    .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
            ))
        });
        let cache = cache_file.as_deref().map(|f| (f, key.as_str()));
        super::smooth::smooth_for_engine(&mut model, &tok, smooth, cache, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        bar.finish_and_clear();
    }
    if mode != Mode::F32 || file_mode != Mode::F32 {
        let bar = progress_bar("quantizing [{bar:30}] {pos}/{len} tensors");
        apply_mode(&mut model, mode, &dp, engine.head_bits, &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        bar.finish_and_clear();
    }
    let isa = Isa::from_env().map_err(|e| Error::new(e.to_string()))?;
    if mode != Mode::F32 {
        model.set_backend(engine.backend, isa);
    }
    if mode != Mode::F32 {
        eprintln!(
            "mode {} on the {} backend{}: engine datapath w_group_len {}, w_scale_bits {}, acc_bits {}, kv_group_len {}, kv_recent_window {}",
            mode.name(),
            engine.backend.name(),
            if engine.backend == Backend::Cpu {
                format!(" ({} kernels)", isa.name())
            } else {
                String::new()
            },
            dp.w_group_len,
            dp.w_scale_bits,
            dp.acc_bits,
            dp.kv_group_len,
            dp.kv_recent_window
        );
    }
    Ok((model, tok, mode))
}

/// Sizes rayon's global pool to `threads` (every core when `None`). The pool can be built
/// once per process: a later call with another count is an error, with the same count a no-op.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    static SET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let Some(n) = threads else {
        return Ok(());
    };
    if n == 0 {
        return Err(Error::new("--threads must be at least 1"));
    }
    if let Some(&have) = SET.get() {
        return if have == n {
            Ok(())
        } else {
            Err(Error::new(format!(
                "the thread pool already has {have} threads (asked for {n})"
            )))
        };
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::new(format!("--threads {n}: {e}")))?;
    let _ = SET.set(n);
    Ok(())
}

/// The prompt's token ids: chat-templated when `chat`, BOS first when the model asks for it.
pub fn prompt_tokens(tok: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let text = if chat {
        tok.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?
    } else {
        prompt.to_string()
    };
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos_id);
    }
    ids.extend(tok.encode(&text)?);
    if ids.is_empty() {
        return Err(Error::new("the prompt is empty"));
    }
    Ok(ids)
}

/// Runs `tessera run` in f32 (the reference).
pub fn run(args: &RunArgs) -> Result<()> {
    let engine = EngineArgs {
        mode: None,
        preset: "tiny".to_string(),
        config: None,
        head_bits: 8,
        backend: Backend::Cpu,
        smooth: None,
        threads: None,
    };
    run_with(args, &engine)
}

/// Runs `tessera run` in the mode and on the datapath `engine` asks for.
pub fn run_with(args: &RunArgs, engine: &EngineArgs) -> Result<()> {
    if !(args.temp.is_finite() && args.temp >= 0.0) {
        return Err(Error::new(format!("--temp {} must be >= 0", args.temp)));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(Error::new(format!(
            "--top-p {} must be in (0, 1]",
            args.top_p
        )));
    }
    let path = resolve_model(args.model.as_ref())?;
    let (model, tok, _mode) = load_with_mode(&path, engine)?;
    let ids = prompt_tokens(&tok, &args.prompt, args.chat)?;
    if ids.len() + args.n_predict > model.cfg.ctx_len {
        return Err(Error::new(format!(
            "prompt ({} tokens) + -n {} exceed the context length {}",
            ids.len(),
            args.n_predict,
            model.cfg.ctx_len
        )));
    }
    let mut sampler = Sampler::new(args.temp, args.top_p, args.seed);
    let mut session = model.session();
    // The whole generation runs on one worker of the rayon pool (one job), so that each step's
    // forward pass starts in place instead of being injected into the pool from this thread
    // (a wake-up per step, and the pool's injector queue allocates as it goes).
    let (prefill_s, n_decoded, decode_s) = on_pool_worker(|| -> Result<(f64, usize, f64)> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let write_err = |e: std::io::Error| Error::new(format!("cannot write to stdout: {e}"));

        let t0 = Instant::now();
        let mut next = sampler.sample(model.forward_into(&mut session, &ids, 1)?);
        let prefill_s = t0.elapsed().as_secs_f64();

        let mut dec = StreamDecoder::default();
        let t1 = Instant::now();
        let mut n_gen = 0usize;
        let mut n_decoded = 0usize;
        while n_gen < args.n_predict {
            n_gen += 1;
            if tok.is_end(next) {
                break;
            }
            let text = if tok.is_special(next) {
                String::new()
            } else {
                dec.push(&tok.token_bytes(next))
            };
            out.write_all(text.as_bytes()).map_err(write_err)?;
            out.flush().map_err(write_err)?;
            if n_gen == args.n_predict {
                break;
            }
            next = sampler.sample(model.forward_into(&mut session, &[next], 1)?);
            n_decoded += 1;
        }
        let rest = dec.finish();
        writeln!(out, "{rest}").map_err(write_err)?;
        Ok((prefill_s, n_decoded, t1.elapsed().as_secs_f64()))
    })?;
    eprintln!(
        "prefill: {} tokens in {:.2} s ({:.1} tok/s); decode: {} tokens in {:.2} s ({:.1} tok/s); KV cache {} bytes",
        ids.len(),
        prefill_s,
        ids.len() as f64 / prefill_s.max(1e-9),
        n_decoded,
        decode_s,
        n_decoded as f64 / decode_s.max(1e-9),
        session.caches.iter().map(super::ops::KvCache::memory_bytes).sum::<usize>(),
    );
    Ok(())
}
