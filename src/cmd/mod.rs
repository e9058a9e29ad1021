//! Subcommands of the `tessera` binary, one module each, and the shared error type.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tessera_golden::config::EngineConfig;

pub mod bench;
pub mod board;
pub mod config;
pub mod cosim;
pub mod demo;
pub mod fit;
pub mod gen;
pub mod ppl;
pub mod project;
pub mod quantize;
pub mod run;

/// Exit code of every error: bad input, impossible config, missing file.
pub const EXIT_ERROR: u8 = 2;

/// A failed command: one or more one-line messages, each printed as `error: <line>`.
#[derive(Debug)]
pub struct Failure {
    pub lines: Vec<String>,
}

impl Failure {
    pub fn one(msg: impl Display) -> Self {
        Self {
            lines: vec![msg.to_string()],
        }
    }

    /// Prints every line to stderr and returns exit code 2.
    pub fn report(&self) -> ExitCode {
        for line in &self.lines {
            // Keep the one-line promise even if a message carried a newline.
            eprintln!("error: {}", line.replace('\n', " "));
        }
        ExitCode::from(EXIT_ERROR)
    }
}

/// Help and version go to stdout with code 0; a usage error becomes one `error:` line, code 2.
pub fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            print!("{}", e.render());
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            ExitCode::from(EXIT_ERROR)
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            let first = first.trim().trim_start_matches("error: ");
            Failure::one(format!("{first}; run with --help for usage")).report()
        }
    }
}

/// Where a config comes from: `--config FILE` or `--preset NAME` (tiny if neither).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigSource {
    /// A TOML config file (a delta from the defaults).
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A built-in preset: tiny, small or u280 (default: tiny).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
}

impl ConfigSource {
    /// Loads and validates the config; every broken rule is one line naming the origin.
    pub fn load_valid(&self) -> Result<EngineConfig, Failure> {
        match &self.config {
            Some(path) => load_valid(path),
            None => {
                let name = self.preset.as_deref().unwrap_or("tiny");
                let cfg = EngineConfig::preset(name).map_err(Failure::one)?;
                validated(cfg, &format!("<preset {name}>"))
            }
        }
    }
}

/// Loads a TOML file and validates it.
pub fn load_valid(path: &Path) -> Result<EngineConfig, Failure> {
    let cfg = EngineConfig::load(path).map_err(Failure::one)?;
    validated(cfg, &path.display().to_string())
}

fn validated(cfg: EngineConfig, origin: &str) -> Result<EngineConfig, Failure> {
    match cfg.validate() {
        Ok(()) => Ok(cfg),
        Err(errs) => Err(Failure {
            lines: errs.iter().map(|e| format!("{origin}: {e}")).collect(),
        }),
    }
}
