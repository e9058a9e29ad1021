//! `tessera cosim`: the engine's Verilog through Verilator, checked every cycle against the
//! golden cycle model (tessera-sim); and `tessera bench cosim`: raw Verilator, golden cycle
//! model and lock-step cycles/s side by side.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use tessera_golden::config::EngineConfig;
use tessera_sim::suites::{json, junit, run_suite, SUITES};
use tessera_sim::verilate::{Engine, Rtl};

use super::{ConfigSource, Failure};

/// Arguments of `tessera cosim`.
#[derive(Debug, Args)]
pub struct CosimArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Suite: modes, dataflows, edges, odd, saturation, stalls, switch, attention, ksplit,
    /// random, short, all.
    #[arg(long, default_value = "all")]
    pub suite: String,
    /// Seed of the programs, operands, stalls and Verilator's initial values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Operations of the random and short suites.
    #[arg(long, default_value_t = 200)]
    pub ops: usize,
    /// Write a JUnit XML report here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Print a JSON report on stdout instead of the summary lines.
    #[arg(long)]
    pub json: bool,
    /// Check this RTL directory (e.g. hand-edited `tessera gen` output) instead of generating.
    #[arg(long, value_name = "DIR")]
    pub rtl: Option<PathBuf>,
    /// Where mismatch waveforms go (default: the cosim cache's `waves/`).
    #[arg(long, value_name = "DIR")]
    pub waves: Option<PathBuf>,
}

fn source_flag(src: &ConfigSource) -> String {
    match (&src.config, &src.preset) {
        (Some(p), _) => format!("--config {}", p.display()),
        (None, Some(n)) => format!("--preset {n}"),
        (None, None) => "--preset tiny".into(),
    }
}

fn load(cfg: &EngineConfig, rtl: Option<&PathBuf>, quiet: bool) -> Result<Engine, Failure> {
    let r = match rtl {
        Some(d) if !d.is_dir() => {
            return Err(Failure::one(format!(
                "--rtl {}: not a directory",
                d.display()
            )))
        }
        Some(d) => Rtl::Dir(d.clone()),
        None => Rtl::Generated,
    };
    let t = Instant::now();
    let e = Engine::build(cfg, r).map_err(Failure::one)?;
    if e.built.compiled && !quiet {
        eprintln!(
            "verilated {} in {:.1} s",
            e.built.dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(e)
}

/// Runs `tessera cosim`.
pub fn run(args: CosimArgs) -> Result<(), Failure> {
    let cfg = args.source.load_valid()?;
    let suites: Vec<&str> = if args.suite == "all" {
        SUITES.to_vec()
    } else if SUITES.contains(&args.suite.as_str()) {
        vec![args.suite.as_str()]
    } else {
        return Err(Failure::one(format!(
            "unknown suite {:?}: one of {}, all",
            args.suite,
            SUITES.join(", ")
        )));
    };
    let eng = load(&cfg, args.rtl.as_ref(), args.json)?;
    let waves = args
        .waves
        .clone()
        .unwrap_or_else(|| tessera_sim::verilate::cache_root().join("waves"));
    let name = cfg
        .checked_derive()
        .map(|d| d.config_string)
        .unwrap_or_else(|_| cfg.name.clone());
    let mut reps = Vec::new();
    let mut failed = None;
    for s in &suites {
        let r = run_suite(&eng, s, args.seed, args.ops, Some(&waves)).map_err(Failure::one)?;
        if !args.json {
            println!("{}", r.line());
        }
        if r.failure.is_some() && failed.is_none() {
            failed = Some(r.suite.clone());
        }
        reps.push(r);
    }
    if args.json {
        println!("{}", json(&name, args.seed, &reps));
    }
    if let Some(f) = &args.junit {
        std::fs::write(f, junit(&name, &reps))
            .map_err(|e| Failure::one(format!("{}: {e}", f.display())))?;
    }
    if let Some(s) = failed {
        let rtl = args
            .rtl
            .as_ref()
            .map(|d| format!(" --rtl {}", d.display()))
            .unwrap_or_default();
        return Err(Failure::one(format!(
            "co-simulation mismatch in suite {s}; reproduce: tessera cosim {} --suite {s} --seed {} --ops {}{rtl}",
            source_flag(&args.source),
            args.seed,
            args.ops
        )));
    }
    Ok(())
}

/// Arguments of `tessera bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Raw Verilator, golden cycle model and lock-step checked cycles/s on one program.
    Cosim(BenchCosimArgs),
}

/// Arguments of `tessera bench cosim`.
#[derive(Debug, Args)]
pub struct BenchCosimArgs {
    /// A TOML config file.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A preset; default: an 8 x 8 engine (tiny with rows = cols = 8).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Random operations in the program.
    #[arg(long, default_value_t = 60)]
    pub ops: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `tessera bench`.
pub fn run_bench(args: BenchArgs) -> Result<(), Failure> {
    let BenchWhat::Cosim(a) = args.what;
    let cfg = if a.config.is_some() || a.preset.is_some() {
        ConfigSource {
            config: a.config.clone(),
            preset: a.preset.clone(),
        }
        .load_valid()?
    } else {
        tessera_sim::bench::bench_config().map_err(Failure::one)?
    };
    let eng = load(&cfg, None, false)?;
    let r = tessera_sim::bench::bench(&eng.lib, &cfg, a.ops, a.seed).map_err(Failure::one)?;
    let name = cfg
        .checked_derive()
        .map(|d| d.config_string)
        .unwrap_or_else(|_| cfg.name.clone());
    print!("{}", r.table(&name));
    Ok(())
}
