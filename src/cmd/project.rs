//! `tessera project --board NAME --model M`: SIMULATED decode and prefill tokens/s of a model on
//! a board, with a per-layer roofline table and an SVG plot (tessera-boards::project).

use std::path::PathBuf;

use tessera_boards::project::{model_by_name, project, Analytical, Assumptions};
use tessera_boards::Board;
use tessera_golden::config::WeightMode;

use super::{ConfigSource, Failure};

#[derive(Debug, clap::Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Board: u280, u55c, zcu102, kv260 or pynq-z2.
    #[arg(long, value_name = "NAME")]
    pub board: String,
    /// Model shape: smollm2-135m or llama2-7b.
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// Fraction of the board's peak memory bandwidth achieved.
    #[arg(long, default_value_t = 0.8)]
    pub bw_eff: f64,
    /// Tokens in the KV cache for the decode step.
    #[arg(long, default_value_t = 512)]
    pub context: u64,
    /// Prompt tokens for prefill.
    #[arg(long, default_value_t = 512)]
    pub prompt: u64,
    /// Write the roofline plot here (SVG).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

pub fn run(args: ProjectArgs) -> Result<(), Failure> {
    if !(args.bw_eff > 0.0 && args.bw_eff <= 1.0) {
        return Err(Failure::one(format!(
            "--bw-eff {}: must be in (0, 1], e.g. 0.8",
            args.bw_eff
        )));
    }
    if args.context == 0 || args.prompt == 0 {
        return Err(Failure::one("--context and --prompt must be at least 1"));
    }
    let cfg = args.source.load_valid()?;
    let board = Board::by_name(&args.board).map_err(Failure::one)?;
    let model = model_by_name(&args.model).map_err(Failure::one)?;
    let head_mode = if cfg.modes().contains(&WeightMode::W8) {
        WeightMode::W8
    } else {
        WeightMode::W4
    };
    let a = Assumptions {
        clock_mhz: cfg.clock.target_mhz,
        bw_efficiency: args.bw_eff,
        context: args.context,
        prompt: args.prompt,
        linear_mode: WeightMode::W2,
        head_mode,
    };
    let p = project(&model, &board, &cfg, &a, &Analytical::new(&cfg));
    println!("config: {} ({})", cfg.name, cfg.derive().build_dir_name);
    print!("{}", p.report());
    if let Some(path) = &args.svg {
        std::fs::write(path, p.svg())
            .map_err(|e| Failure::one(format!("{}: {e}", path.display())))?;
        println!("roofline plot: {}", path.display());
    }
    Ok(())
}
