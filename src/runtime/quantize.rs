//! `tessera quantize`: a GGUF model to a .tsr file in the engine layout (module [`super::tsr`]).
//!
//! Methods: `rtn` (golden's N7 min-max round to nearest per group) and `gptq` (module
//! [`super::gptq`]: second-order, column by column with error feedback, on a Hessian from
//! calibration activations). Chosen tensors can be kept at 4 or 8 bits (`--keep PATTERN=BITS`).

use std::path::PathBuf;
use std::sync::Arc;

use tessera_golden::numerics::Datapath;
use tessera_golden::quant::QuantWeights;

use super::cli::{load, progress_bar};
use super::engine::{format_of_bits, linear_f32, linears_mut, quantize_linear, EngineArgs, Mode};
use super::gguf::Gguf;
use super::tsr;
use super::{Error, Result};

/// Quantization method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest (N7 min-max groups).
    Rtn,
    /// GPTQ: Hessian from calibration activations, column-wise error feedback.
    Gptq,
}

/// Arguments of `tessera quantize`.
#[derive(Debug, Clone, clap::Args)]
pub struct QuantizeArgs {
    /// Source GGUF model
    #[arg(value_name = "MODEL.gguf")]
    pub model: PathBuf,
    /// Scheme: w2a8kv4 or w8a8kv8
    #[arg(long, value_enum, default_value = "w2a8kv4")]
    pub scheme: Mode,
    /// Weight group length (overrides the preset's w_group_len)
    #[arg(long)]
    pub group: Option<usize>,
    /// Quantization method
    #[arg(long, value_enum, default_value = "rtn")]
    pub method: Method,
    /// Output .tsr file
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Keep matching linear layers at other bits: `SUBSTRING=BITS` (e.g. `ffn_down=4`,
    /// `blk.0.=4`), repeatable; the last match wins
    #[arg(long, value_name = "PATTERN=BITS")]
    pub keep: Vec<String>,
    /// Calibration text for gptq [default: data/calibration.txt]
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration tokens for gptq
    #[arg(long, default_value_t = 2048)]
    pub calib_tokens: usize,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal (act-order)
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: dampening, as a fraction of the mean Hessian diagonal
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Parses `--keep` rules.
pub fn keep_rules(keep: &[String]) -> Result<Vec<(String, u32)>> {
    keep.iter()
        .map(|k| {
            let (pat, bits) = k
                .rsplit_once('=')
                .ok_or_else(|| Error::new(format!("--keep {k:?}: expected PATTERN=BITS")))?;
            let bits: u32 = bits
                .parse()
                .map_err(|_| Error::new(format!("--keep {k:?}: BITS must be 2, 4 or 8")))?;
            format_of_bits(bits)?;
            Ok((pat.to_string(), bits))
        })
        .collect()
}

/// Bits of linear layer `name` under `rules` (default `base`; the head at `head_bits`).
pub fn bits_for(name: &str, base: u32, head_bits: u32, rules: &[(String, u32)]) -> u32 {
    let mut bits = if name == "output" { head_bits } else { base };
    for (pat, b) in rules {
        if name.contains(pat.as_str()) {
            bits = *b;
        }
    }
    bits
}

/// Runs `tessera quantize`.
pub fn run_quantize(args: &QuantizeArgs) -> Result<()> {
    let Some(base_format) = args.scheme.weight_format() else {
        return Err(Error::new("--scheme f32 is not a quantization scheme"));
    };
    let mut dp: Datapath = args.engine.datapath()?;
    if let Some(g) = args.group {
        if !(g.is_power_of_two() && (8..=128).contains(&g)) {
            return Err(Error::new(format!(
                "--group {g}: a power of two in 8..=128"
            )));
        }
        dp.w_group_len = g;
    }
    let rules = keep_rules(&args.keep)?;
    format_of_bits(args.engine.head_bits)?;
    let g = Gguf::open(&args.model)?;
    let (mut model, tok) = load(&args.model)?;
    let t0 = std::time::Instant::now();
    let quantized: Vec<(String, Arc<QuantWeights>)> = match args.method {
        Method::Rtn => {
            let mut todo: Vec<(String, Arc<Vec<f32>>, usize, usize)> = linears_mut(&mut model)
                .into_iter()
                .map(|(name, l)| (name, linear_f32(l), l.n_in(), l.n_out()))
                .collect();
            let bar = progress_bar("quantizing (rtn) [{bar:30}] {pos}/{len} tensors");
            bar.set_length(todo.len() as u64);
            use rayon::prelude::*;
            let out = todo
                .par_iter_mut()
                .map(|(name, w, n_in, n_out)| {
                    let bits = bits_for(name, base_format.bits(), args.engine.head_bits, &rules);
                    let q = quantize_linear(w, *n_in, *n_out, format_of_bits(bits)?, &dp)
                        .map_err(|e| Error::new(format!("{name}: {e}")))?;
                    bar.inc(1);
                    Ok((name.clone(), Arc::new(q)))
                })
                .collect::<Result<Vec<_>>>()?;
            bar.finish_and_clear();
            out
        }
        Method::Gptq => {
            let calib_path = args
                .calib
                .clone()
                .unwrap_or_else(|| PathBuf::from("data/calibration.txt"));
            let text = std::fs::read_to_string(&calib_path).map_err(|e| {
                Error::new(format!(
                    "cannot read calibration text {}: {e}",
                    calib_path.display()
                ))
            })?;
            let opts = super::gptq::GptqOptions {
                damp: args.damp,
                act_order: args.act_order,
                calib_tokens: args.calib_tokens,
            };
            super::gptq::quantize_model(&mut model, &tok, &text, &dp, &opts, &|name| {
                bits_for(name, base_format.bits(), args.engine.head_bits, &rules)
            })?
        }
    };
    let host = tsr::host_gguf(&g, |name| {
        name == "token_embd.weight" || name.ends_with("_norm.weight")
    });
    let method = match args.method {
        Method::Rtn => "rtn".to_string(),
        Method::Gptq => format!(
            "gptq (calibration {} tokens, damp {}, act-order {})",
            args.calib_tokens, args.damp, args.act_order
        ),
    };
    let header = tsr::write(&args.out, args.scheme, &method, &dp, &host, &quantized)?;
    let n4 = header
        .tensors
        .iter()
        .filter(|t| t.bits == 4 && t.name != "output")
        .count();
    let n8 = header
        .tensors
        .iter()
        .filter(|t| t.bits == 8 && t.name != "output")
        .count();
    println!(
        "wrote {} ({} {}, group {}, {} linear tensors: {} at 4 bits, {} at 8 bits; head {} bits) in {:.1} s",
        args.out.display(),
        args.scheme.name(),
        header.method,
        dp.w_group_len,
        header.tensors.len() - 1,
        n4,
        n8,
        header
            .tensors
            .iter()
            .find(|t| t.name == "output")
            .map_or(0, |t| t.bits),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "bits per weight: {:.4} (linear layers, scales and zero points counted), {:.4} with the output head",
        header.bits_per_weight, header.bits_per_weight_with_head
    );
    Ok(())
}
