//! `tessera quantize`: a GGUF model to a .tsr file in the engine layout (module [`super::tsr`]).
//!
//! Methods: `rtn` (golden's N7 min-max round to nearest per group) and `gptq` (module
//! [`super::gptq`]: second-order, column by column with error feedback, on a Hessian from
//! calibration activations). Options: a per-group clipping search (`--clip`), mixed 2/4-bit
//! tensors under a bits-per-weight budget chosen by Hessian-weighted error (`--max-bpw`), and
//! chosen tensors kept at 4 or 8 bits (`--keep PATTERN=BITS`). The bits per weight are reported
//! broken down into codes, group scales, zero points and row scales.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_golden::numerics::Datapath;
use tessera_golden::quant::QuantWeights;

use super::cli::load;
use super::engine::{format_of_bits, EngineArgs, Mode};
use super::gguf::Gguf;
use super::tsr;
use super::{gptq, Error, Result};

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
    /// Calibration tokens (gptq, --max-bpw; chunks of 512; capped by the text's length)
    #[arg(long, default_value_t = 8192)]
    pub calib_tokens: usize,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal (act-order)
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: dampening, as a fraction of the mean Hessian diagonal
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// Per-group clipping search: the N7 grid of each group spans the shrunk range of least
    /// (Hessian-weighted, with a calibration) squared error instead of min..max
    #[arg(long)]
    pub clip: bool,
    /// Hessian cache: read the calibration Hessians from FILE if it holds them for the same
    /// model, calibration text and token count, else compute them and write FILE
    #[arg(long, value_name = "FILE")]
    pub hessian_cache: Option<PathBuf>,
    /// Mixed precision: upgrade whole tensors from 2 to 4 bits, best Hessian-weighted error
    /// reduction per stored bit first, while the linear layers stay within this many bits per
    /// weight (scales, zero points and row scales counted; the head excluded)
    #[arg(long, value_name = "BPW")]
    pub max_bpw: Option<f64>,
    /// Sequential (layer-by-layer) calibration, as the GPTQ reference: the Hessians of block l
    /// come from inputs computed through blocks 0..l already quantized (at their base bits,
    /// dequantized weights in f32). Hessians are not cached (they depend on the quantization)
    #[arg(long)]
    pub sequential: bool,
    /// With --sequential: the quantized blocks run the engine's integer linears (A8 inputs)
    #[arg(long, requires = "sequential")]
    pub sequential_a8: bool,
    /// Also write the model at these --max-bpw budgets (comma-separated) from the same
    /// quantization run, to OUT with `.bpwX` before the extension: a bits-per-weight curve
    #[arg(
        long,
        value_name = "BPW,...",
        value_delimiter = ',',
        requires = "max_bpw"
    )]
    pub sweep_bpw: Vec<f64>,
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
    if let Some(b) = args.max_bpw {
        if !(b.is_finite() && b > 0.0) {
            return Err(Error::new(format!(
                "--max-bpw {b}: a positive number of bits"
            )));
        }
    }
    if !(args.damp.is_finite() && args.damp > 0.0) {
        return Err(Error::new(format!(
            "--damp {}: a positive fraction",
            args.damp
        )));
    }
    let g = Gguf::open(&args.model)?;
    let (mut model, tok) = load(&args.model)?;
    let t0 = std::time::Instant::now();
    let needs_calib = args.method == Method::Gptq || args.max_bpw.is_some();
    if args.sequential && !needs_calib {
        return Err(Error::new(
            "--sequential: calibration is for --method gptq or --max-bpw",
        ));
    }
    let calib_path = args
        .calib
        .clone()
        .unwrap_or_else(|| PathBuf::from("data/calibration.txt"));
    let read_calib = || {
        std::fs::read_to_string(&calib_path).map_err(|e| {
            Error::new(format!(
                "cannot read calibration text {}: {e}",
                calib_path.display()
            ))
        })
    };
    let calib = if needs_calib && !args.sequential {
        let text = read_calib()?;
        let key = format!(
            "model {} ({} bytes), calibration {} ({} bytes, {:016x}), {} tokens",
            args.model.display(),
            std::fs::metadata(&args.model).map_or(0, |m| m.len()),
            calib_path.display(),
            text.len(),
            text.bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b))
                    .wrapping_mul(0x100_0000_01b3)),
            args.calib_tokens
        );
        let cached = match &args.hessian_cache {
            Some(p) if p.exists() => gptq::Calibration::load(p, &key)?,
            _ => None,
        };
        match cached {
            Some(c) => Some(c),
            None => {
                let c = gptq::calibrate(&mut model, &tok, &text, args.calib_tokens)?;
                if let Some(p) = &args.hessian_cache {
                    c.save(p, &key)?;
                }
                Some(c)
            }
        }
    } else {
        None
    };
    let base_bits = base_format.bits();
    let head_bits = args.engine.head_bits;
    let bits_of = |name: &str| bits_for(name, base_bits, head_bits, &rules);
    let plan = gptq::Plan {
        gptq: args.method == Method::Gptq,
        opts: gptq::GptqOptions {
            damp: args.damp,
            act_order: args.act_order,
            calib_tokens: args.calib_tokens,
            clip: args.clip,
        },
        max_bpw: args.max_bpw,
        base_bits,
        bits_of: &bits_of,
    };
    let mut seq_tokens = 0;
    let (quantized, report) = if args.sequential {
        let ctx = 512.min(model.cfg.ctx_len);
        let chunks = gptq::calibration_chunks(&tok, &read_calib()?, ctx, args.calib_tokens)?;
        seq_tokens = chunks.len() * ctx;
        gptq::quantize_model_sequential(&model, &chunks, &dp, &plan, args.sequential_a8)?
    } else {
        gptq::quantize_model(&mut model, calib.as_ref(), &dp, &plan)?
    };
    let host = tsr::host_gguf(&g, |name| {
        name == "token_embd.weight" || name.ends_with("_norm.weight")
    });
    let mut method = match args.method {
        Method::Rtn => "rtn".to_string(),
        Method::Gptq => format!("gptq (damp {}, act-order {})", args.damp, args.act_order),
    };
    if args.clip {
        method.push_str(", clip");
    }
    if let Some(b) = args.max_bpw {
        method.push_str(&format!(", mixed 2/4 bits <= {b} bpw"));
    }
    if let Some(c) = &calib {
        method.push_str(&format!(", calibration {} tokens", c.tokens));
    }
    if args.sequential {
        let a8 = if args.sequential_a8 { ", A8" } else { "" };
        method.push_str(&format!(", sequential calibration{a8} {seq_tokens} tokens"));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let write = |path: &std::path::Path,
                 method: &str,
                 quantized: &gptq::Tensors,
                 upgraded: &[String]|
     -> Result<()> {
        let header = tsr::write(path, args.scheme, method, &dp, &host, quantized)?;
        let count = |bits: u32| {
            header
                .tensors
                .iter()
                .filter(|t| t.bits == bits && t.name != "output")
                .count()
        };
        println!(
            "wrote {} ({} {}, group {}, {} linear tensors: {} at 4 bits, {} at 8 bits; head {} bits) in {:.1} s",
            path.display(),
            args.scheme.name(),
            header.method,
            dp.w_group_len,
            header.tensors.len() - 1,
            count(4),
            count(8),
            header
                .tensors
                .iter()
                .find(|t| t.name == "output")
                .map_or(0, |t| t.bits),
            elapsed
        );
        let bd = Breakdown::of(quantized);
        println!(
            "bits per linear-layer weight: {:.4} = codes {:.4} + group scales {:.4} + zero points {:.4} + row scales {:.4}; {:.1}% of the weights at 4 bits, {:.1}% at 8 (head excluded: {:.4} bpw with it)",
            bd.total(),
            bd.codes,
            bd.scales,
            bd.zeros,
            bd.rows,
            100.0 * bd.share4,
            100.0 * bd.share8,
            header.bits_per_weight_with_head
        );
        if !upgraded.is_empty() {
            println!("upgraded to 4 bits: {}", upgraded.join(" "));
        }
        Ok(())
    };
    write(&args.out, &method, &quantized, &report.upgraded)?;
    for &b in &args.sweep_bpw {
        if !(b.is_finite() && b > 0.0) {
            return Err(Error::new(format!(
                "--sweep-bpw {b}: a positive number of bits"
            )));
        }
        let (t, up) = report.at_budget(b);
        let stem = args.out.with_extension("");
        let ext = args
            .out
            .extension()
            .map_or("tsr".into(), |e| e.to_string_lossy());
        let path = PathBuf::from(format!("{}.bpw{b}.{ext}", stem.display()));
        let m = method.replace(
            &format!("<= {} bpw", args.max_bpw.unwrap_or(b)),
            &format!("<= {b} bpw"),
        );
        write(&path, &m, &t, &up)?;
    }
    Ok(())
}

/// Bits per linear-layer weight (output head excluded), by part of the storage.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Breakdown {
    /// Packed codes (row padding included).
    pub codes: f64,
    /// `gscale`, 16 bits per group.
    pub scales: f64,
    /// `zero_u8`, 8 bits per group.
    pub zeros: f64,
    /// `row_scale`, 32 bits per row.
    pub rows: f64,
    /// Shares of the weights at 4 and at 8 bits.
    pub share4: f64,
    pub share8: f64,
}

impl Breakdown {
    pub fn of(tensors: &[(String, Arc<QuantWeights>)]) -> Breakdown {
        let (mut codes, mut groups, mut rows, mut n, mut n4, mut n8) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for (name, q) in tensors {
            if name == "output" {
                continue;
            }
            let w = (q.n_rows() * q.k()) as u64;
            codes += 8 * q.packed().len() as u64;
            groups += (q.n_rows() * q.groups_per_row()) as u64;
            rows += q.n_rows() as u64;
            n += w;
            match q.format().bits() {
                4 => n4 += w,
                8 => n8 += w,
                _ => {}
            }
        }
        let n = n.max(1) as f64;
        Breakdown {
            codes: codes as f64 / n,
            scales: 16.0 * groups as f64 / n,
            zeros: 8.0 * groups as f64 / n,
            rows: 32.0 * rows as f64 / n,
            share4: n4 as f64 / n,
            share8: n8 as f64 / n,
        }
    }

    pub fn total(&self) -> f64 {
        self.codes + self.scales + self.zeros + self.rows
    }
}
