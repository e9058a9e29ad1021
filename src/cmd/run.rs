//! Wiring of `tessera run` (the CPU runtime in `tessera::runtime`) into the CLI's conventions:
//! every runtime error becomes one `error:` line with exit code 2.

use super::Failure;

use tessera::runtime::engine::EngineArgs;

/// Arguments of `tessera run`: the runtime's, plus the execution mode and engine datapath.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "run_command")]
pub struct RunArgs {
    #[command(flatten)]
    pub run: tessera::runtime::cli::RunArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Runs `tessera run`.
pub fn run(args: RunArgs) -> Result<(), Failure> {
    tessera::runtime::cli::run_with(&args.run, &args.engine).map_err(Failure::one)
}
