//! Execution modes of the forward pass (`--mode`): `f32` (the reference), `w8a8kv8` and
//! `w2a8kv4` (the engine's integer arithmetic through `tessera-golden`), and the engine datapath
//! they use (`--preset` / `--config`).
//!
//! In the quantized modes every linear layer is an [`EngineLinear`] (N5 per-token A8
//! activations, N7-N11 weights quantized from the dequantized GGUF f32 with golden's
//! `quantize_weights`, N12-N14 integer products, N20 dequantization), and both attention products
//! run against a golden KV cache (KV4, N16-N19, or KV8, N16b). Norms, RoPE, softmax, SiLU and
//! residuals stay f32 on the host (N21). The token embedding is a table lookup and stays f32
//! (dequantized from the GGUF); the output head is a weight operation kept at 8 bits (W8) by
//! default (`--head-bits`).

use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;
use tessera_golden::config::EngineConfig;
use tessera_golden::numerics::Datapath;
use tessera_golden::quant::{quantize_weights, QuantWeights, WeightFormat};

use super::model::Model;
use super::ops::{Backend, EngineLinear, KvKind, Linear};
use super::{Error, Result};

/// An execution mode of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Dequantized weights, float everything (the accuracy yardstick).
    F32,
    /// The engine at 8 bits: W8 weights, A8 activations, KV8 cache (N16b).
    W8a8kv8,
    /// The mission's: W2 weights, A8 activations, KV4 cache (N16).
    W2a8kv4,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::F32 => "f32",
            Mode::W8a8kv8 => "w8a8kv8",
            Mode::W2a8kv4 => "w2a8kv4",
        }
    }

    /// Weight format of the linear layers (None for f32).
    pub fn weight_format(self) -> Option<WeightFormat> {
        match self {
            Mode::F32 => None,
            Mode::W8a8kv8 => Some(WeightFormat::W8),
            Mode::W2a8kv4 => Some(WeightFormat::W2),
        }
    }

    /// KV cache bits (None for f32).
    pub fn kv_bits(self) -> Option<u32> {
        match self {
            Mode::F32 => None,
            Mode::W8a8kv8 => Some(8),
            Mode::W2a8kv4 => Some(4),
        }
    }

    /// The default `--smooth` of the mode (docs/accuracy.md): 0.8 (chosen on the calibration
    /// text) for w8a8kv8; none for f32, and for w2a8kv4, whose 2-bit weights it makes worse.
    pub fn default_smooth(self) -> f32 {
        match self {
            Mode::W8a8kv8 => super::smooth::DEFAULT_ALPHA,
            Mode::F32 | Mode::W2a8kv4 => 0.0,
        }
    }

    pub fn from_name(name: &str) -> Option<Mode> {
        [Mode::F32, Mode::W8a8kv8, Mode::W2a8kv4]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// Weight format of `bits` (2, 4 or 8).
pub fn format_of_bits(bits: u32) -> Result<WeightFormat> {
    match bits {
        2 => Ok(WeightFormat::W2),
        4 => Ok(WeightFormat::W4),
        8 => Ok(WeightFormat::W8),
        b => Err(Error::new(format!("{b} weight bits: use 2, 4 or 8"))),
    }
}

/// Engine options shared by `run`, `ppl`, `compare` and `quantize`.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Execution mode [default: f32 for a GGUF, the file's scheme for a .tsr]
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Engine preset whose datapath (group length, scale bits, KV groups) the quantized modes use
    #[arg(long, default_value = "tiny", conflicts_with = "config")]
    pub preset: String,
    /// Engine config TOML file (instead of --preset)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Bits of the output head in the quantized modes (2, 4 or 8)
    #[arg(long, default_value_t = 8)]
    pub head_bits: u32,
    /// Implementation of the engine's integer ops: `cpu` (tessera-kernels-cpu, fast) or `golden`
    /// (the readable reference); both give the same integers
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// SmoothQuant migration strength (GGUF input only; 0 = off): activation outliers are moved
    /// into the weights, with statistics measured on the calibration text (docs/accuracy.md;
    /// computed once, then cached in the cache directory's `smooth/`)
    /// [default: 0.8 for w8a8kv8, 0 for w2a8kv4 (it hurts 2-bit round-to-nearest)]
    #[arg(long, value_name = "ALPHA")]
    pub smooth: Option<f32>,
    /// Worker threads of the forward pass [default: every core]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl EngineArgs {
    /// The datapath of the chosen preset or config file.
    pub fn datapath(&self) -> Result<Datapath> {
        let cfg = match &self.config {
            Some(p) => EngineConfig::load(p).map_err(|e| Error::new(e.to_string()))?,
            None => EngineConfig::preset(&self.preset).map_err(|e| Error::new(e.to_string()))?,
        };
        Ok(cfg.datapath())
    }
}

/// Quantizes a row-major `[n_out][n_in]` f32 matrix for the engine (N7-N11, round to nearest).
pub fn quantize_linear(
    w: &[f32],
    n_in: usize,
    n_out: usize,
    format: WeightFormat,
    dp: &Datapath,
) -> Result<QuantWeights> {
    quantize_weights(w, n_out, n_in, format, dp).map_err(|e| Error::new(format!("quantize: {e}")))
}

/// The f32 weights of a linear layer (dequantized if it is already an engine layer).
pub fn linear_f32(l: &Linear) -> Arc<Vec<f32>> {
    match l {
        Linear::F32(d) => d.w.clone(),
        Linear::Engine(e) => Arc::new(e.w.dequantize()),
        Linear::Capture(c) => linear_f32(&c.inner),
    }
}

/// Every linear layer of a model by name (`blk.{i}.{attn_q,...}` and `output`).
pub fn linears_mut(model: &mut Model) -> Vec<(String, &mut Linear)> {
    let mut out = Vec::new();
    for (i, l) in model.layers.iter_mut().enumerate() {
        out.push((format!("blk.{i}.attn_q"), &mut l.wq));
        out.push((format!("blk.{i}.attn_k"), &mut l.wk));
        out.push((format!("blk.{i}.attn_v"), &mut l.wv));
        out.push((format!("blk.{i}.attn_output"), &mut l.wo));
        out.push((format!("blk.{i}.ffn_gate"), &mut l.w_gate));
        out.push((format!("blk.{i}.ffn_up"), &mut l.w_up));
        out.push((format!("blk.{i}.ffn_down"), &mut l.w_down));
    }
    out.push(("output".to_string(), &mut model.output));
    out
}

/// Puts `model` in `mode`: round-to-nearest quantization of every f32 linear layer (the output
/// head at `head_bits`) and the mode's KV cache. Layers that are already engine layers (loaded
/// from a .tsr) are kept. `f32` turns engine layers back into dequantized f32 layers.
pub fn apply_mode(
    model: &mut Model,
    mode: Mode,
    dp: &Datapath,
    head_bits: u32,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<()> {
    let head_format = format_of_bits(head_bits)?;
    let Some(format) = mode.weight_format() else {
        for (_, l) in linears_mut(model) {
            if let Linear::Engine(e) = l {
                let (n_in, n_out) = (e.w.k(), e.w.n_rows());
                *l = Linear::f32(Arc::new(e.w.dequantize()), n_in, n_out);
            }
        }
        return model.set_kv(KvKind::F32);
    };
    let mut todo = linears_mut(model);
    let total = todo.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    todo.par_iter_mut()
        .try_for_each(|(name, l)| -> Result<()> {
            if let Linear::F32(d) = &**l {
                let f = if name == "output" {
                    head_format
                } else {
                    format
                };
                let qw = quantize_linear(&d.w, d.n_in, d.n_out, f, dp)
                    .map_err(|e| Error::new(format!("{name}: {e}")))?;
                **l = Linear::Engine(EngineLinear::new(Arc::new(qw), *dp)?);
            }
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n, total);
            Ok(())
        })?;
    let bits = mode.kv_bits().unwrap_or(8);
    model.set_kv(KvKind::Engine { dp: *dp, bits })
}
