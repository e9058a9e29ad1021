//! Wiring of `tessera quantize` (in `tessera::runtime::quantize`) into the CLI: every runtime
//! error becomes one `error:` line with exit code 2.

use super::Failure;

pub use tessera::runtime::quantize::QuantizeArgs;

/// Runs `tessera quantize`.
pub fn run(args: QuantizeArgs) -> Result<(), Failure> {
    tessera::runtime::quantize::run_quantize(&args).map_err(Failure::one)
}
