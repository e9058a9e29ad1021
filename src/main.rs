//! `tessera`: generate, co-simulate and run a W2A8KV4 LLM engine for Xilinx FPGAs.
//!
//! One module per subcommand under `src/cmd/`. To add one: write `src/cmd/NAME.rs` with an
//! `Args` struct (clap derive) and `pub fn run(args) -> Result<(), cmd::Failure>`, add a
//! variant to [`Command`] and a match arm in [`main`]. Every error reaches the user as
//! `error: ...` lines on stderr with exit code 2, never a panic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, show and emit engine configs (EngineConfig, the single source of truth).
    Config(cmd::config::ConfigArgs),
    /// The main job on embedded defaults: presets, golden GEMM and KV4 attention, a CPU chat answer.
    Demo(cmd::demo::DemoArgs),
    /// Generate the engine's Verilog from a config (`--report`: yosys resource counts).
    Gen(cmd::gen::GenArgs),
    /// Resource fit on a board: yosys-calibrated estimate, largest array under a limit.
    Fit(cmd::fit::FitArgs),
    /// SIMULATED tokens/s of a model on a board: roofline table and SVG plot.
    Project(cmd::project::ProjectArgs),
    /// Co-simulate the engine's Verilog in Verilator, checked every cycle against golden.
    Cosim(cmd::cosim::CosimArgs),
    /// Benchmarks: `bench run` (CPU runtime prefill/decode tok/s), `bench mem` (memory
    /// bandwidth), `bench cosim` (Verilator, cycle model and lock-step cycles/s).
    Bench(cmd::bench::BenchArgs),
    /// Run a GGUF LLM on the CPU (f32, w8a8kv8 or w2a8kv4) and stream the generated text.
    Run(cmd::run::RunArgs),
    /// Perplexity of a model over a text, as llama.cpp's llama-perplexity computes it.
    Ppl(cmd::ppl::PplArgs),
    /// Greedy-token agreement and mean KL divergence of a mode against f32 over a text.
    Compare(cmd::ppl::CompareArgs),
    /// Quantize a GGUF model for the engine into a .tsr file (rtn or gptq).
    Quantize(cmd::quantize::QuantizeArgs),
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`tessera gen ... | head`) would make
/// `println!` panic. Restore the default action: the process ends quietly, as Unix tools do.
#[cfg(unix)]
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called once at the start of main, before any thread is spawned; setting the
    // SIGPIPE disposition to SIG_DFL has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cmd::clap_error(&e),
    };
    let result = match cli.command {
        Command::Config(args) => cmd::config::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Gen(args) => cmd::gen::run(args),
        Command::Fit(args) => cmd::fit::run(args),
        Command::Project(args) => cmd::project::run(args),
        Command::Cosim(args) => cmd::cosim::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Ppl(args) => cmd::ppl::run(args),
        Command::Compare(args) => cmd::ppl::run_compare(args),
        Command::Quantize(args) => cmd::quantize::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
