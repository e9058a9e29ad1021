//! Wiring of `tessera run` (the CPU runtime in `tessera::runtime`) into the CLI's conventions:
//! every runtime error becomes one `error:` line with exit code 2.

use crate::cmd::Failure;

pub use tessera::runtime::cli::RunArgs;

/// Runs `tessera run`.
pub fn run(args: RunArgs) -> Result<(), Failure> {
    tessera::runtime::cli::run(&args).map_err(Failure::one)
}
