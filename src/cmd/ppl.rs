//! Wiring of `tessera ppl` and `tessera compare` (in `tessera::runtime::ppl`) into the CLI:
//! every runtime error becomes one `error:` line with exit code 2.

use super::Failure;

pub use tessera::runtime::ppl::{CompareArgs, PplArgs};

/// Runs `tessera ppl`.
pub fn run(args: PplArgs) -> Result<(), Failure> {
    tessera::runtime::ppl::run_ppl(&args).map_err(Failure::one)
}

/// Runs `tessera compare`.
pub fn run_compare(args: CompareArgs) -> Result<(), Failure> {
    tessera::runtime::ppl::run_compare(&args).map_err(Failure::one)
}
