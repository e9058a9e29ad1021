//! `tessera bench`: `run` (the CPU runtime's prefill and decode tokens/s, the machine, the
//! decode roofline and profile; `tessera::runtime::bench`), `mem` (streaming-read memory
//! bandwidth) and `cosim` (in `cmd::cosim`).

use clap::{Args, Subcommand};

use super::cosim::{BenchCosimArgs, BenchWhat as CosimWhat};
use super::Failure;
use tessera::runtime::bench::{BenchMemArgs, BenchRunArgs};

/// Arguments of `tessera bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Prefill and decode tokens/s of a model on the CPU runtime (`--mode`, `--threads`).
    Run(BenchRunArgs),
    /// Streaming-read memory bandwidth (GB/s), the ceiling of decode.
    Mem(BenchMemArgs),
    /// Raw Verilator, golden cycle model and lock-step checked cycles/s on one program.
    Cosim(BenchCosimArgs),
}

/// Runs `tessera bench`.
pub fn run(args: BenchArgs) -> Result<(), Failure> {
    match args.what {
        BenchWhat::Run(a) => tessera::runtime::bench::run_bench(&a).map_err(Failure::one),
        BenchWhat::Mem(a) => tessera::runtime::bench::run_mem(&a).map_err(Failure::one),
        BenchWhat::Cosim(a) => super::cosim::run_bench(super::cosim::BenchArgs {
            what: CosimWhat::Cosim(a),
        }),
    }
}
