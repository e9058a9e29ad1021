//! `tessera config check|show|emit`: the command-line face of `EngineConfig`.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;
use tessera_golden::config::{BufferDerived, Derived, EngineConfig, ModeDerived};

/// A row of the per-mode table: label and how to print one mode's value.
type ModeRow = (&'static str, fn(&ModeDerived) -> String);

use super::{load_valid, ConfigSource, Failure};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigAction {
    /// Validate config files: `ok <file> <config-string> <hash>` each, or one line per error
    /// on stderr and exit code 2.
    Check {
        /// TOML config files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the raw knobs and every derived value.
    Show {
        #[command(flatten)]
        source: ConfigSource,
        /// Print `tessera_params.json` instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write `tessera_params.h` and `tessera_params.json` into DIR.
    Emit {
        #[command(flatten)]
        source: ConfigSource,
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

pub fn run(args: ConfigArgs) -> Result<(), Failure> {
    match args.action {
        ConfigAction::Check { files } => check(&files),
        ConfigAction::Show { source, json } => {
            let cfg = source.load_valid()?;
            if json {
                print!("{}", cfg.to_json());
            } else {
                print!("{}", table(&cfg, &cfg.derive()));
            }
            Ok(())
        }
        ConfigAction::Emit { source, out } => emit(&source.load_valid()?, &out),
    }
}

/// Checks every file (all of them, even after a failure) and fails if any failed.
fn check(files: &[PathBuf]) -> Result<(), Failure> {
    let mut lines = Vec::new();
    for file in files {
        match load_valid(file) {
            Ok(cfg) => {
                let d = cfg.derive();
                println!(
                    "ok {} {} {}",
                    file.display(),
                    d.config_string,
                    d.config_hash
                );
            }
            Err(f) => lines.extend(f.lines),
        }
    }
    if lines.is_empty() {
        Ok(())
    } else {
        Err(Failure { lines })
    }
}

fn emit(cfg: &EngineConfig, out: &std::path::Path) -> Result<(), Failure> {
    let io = |what: &str, p: &std::path::Path, e: std::io::Error| {
        Failure::one(format!(
            "cannot {what} {} ({e}); check the path and permissions",
            p.display()
        ))
    };
    std::fs::create_dir_all(out).map_err(|e| io("create", out, e))?;
    for (name, text) in [
        ("tessera_params.h", cfg.to_c_header()),
        ("tessera_params.json", cfg.to_json()),
    ] {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| io("write", &path, e))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string().replace(',', ", "),
    }
}

/// The human-readable listing of `config show`.
fn table(cfg: &EngineConfig, d: &Derived) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "config {} ({}, hash {})",
        cfg.name, d.config_string, d.config_hash
    );
    let _ = writeln!(s, "build dir name: {}", d.build_dir_name);

    let _ = writeln!(s, "\nraw knobs");
    if let Ok(Value::Object(sections)) = serde_json::to_value(cfg) {
        for (section, fields) in &sections {
            if let Value::Object(fields) = fields {
                for (k, v) in fields {
                    let _ = writeln!(s, "  {:<34} {}", format!("{section}.{k}"), scalar(v));
                }
            }
        }
    }

    let _ = writeln!(s, "\nderived");
    let rows: [(&str, String); 9] = [
        ("pe_count", d.pe_count.to_string()),
        (
            "bit_plane_units_per_pe",
            d.bit_plane_units_per_pe.to_string(),
        ),
        ("dsp48_estimate", d.dsp48_estimate.to_string()),
        ("gpsum_bits", d.gpsum_bits.to_string()),
        ("scale_frac_bits", d.scale_frac_bits.to_string()),
        ("group_product_bits", d.group_product_bits.to_string()),
        ("k_max_exact", d.k_max_exact.to_string()),
        ("act_buffer_max_k", d.act_buffer_max_k.to_string()),
        (
            "total_bram36",
            format!("{} ({} bits)", d.total_bram36, d.total_buffer_bits),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "  {k:<34} {v}");
    }

    let _ = write!(s, "\n  {:<24}", "mode");
    for m in &d.modes {
        let _ = write!(s, "{:>12}", m.mode);
    }
    s.push('\n');
    let mode_rows: [ModeRow; 7] = [
        ("products/PE/cycle", |m| m.products_per_pe_cycle.to_string()),
        ("peak MAC/cycle", |m| m.peak_macs_per_cycle.to_string()),
        ("peak GMAC/s", |m| format!("{:.1}", m.peak_gmac_per_s)),
        ("GEMV MAC/cycle", |m| m.gemv_macs_per_cycle.to_string()),
        ("GEMV utilization", |m| format!("{:.3}", m.gemv_utilization)),
        ("stream words/group", |m| {
            m.stream_words_per_group.to_string()
        }),
        ("wgt buffer groups/col", |m| {
            m.wgt_buffer_groups_per_col.to_string()
        }),
    ];
    for (label, f) in mode_rows {
        let _ = write!(s, "  {label:<24}");
        for m in &d.modes {
            let _ = write!(s, "{:>12}", f(m));
        }
        s.push('\n');
    }

    let _ = writeln!(
        s,
        "\n  {:<12}{:>10}{:>12}{:>7}{:>12}{:>10}{:>8}",
        "buffer", "entries", "entry_bits", "banks", "bits", "bytes", "bram36"
    );
    let bufs: [(&str, &BufferDerived); 4] = [
        ("act", &d.act_buffer),
        ("wgt", &d.wgt_buffer),
        ("meta", &d.meta_buffer),
        ("out", &d.out_buffer),
    ];
    for (name, b) in bufs {
        let _ = writeln!(
            s,
            "  {name:<12}{:>10}{:>12}{:>7}{:>12}{:>10}{:>8}",
            b.entries, b.entry_bits, b.banks, b.bits, b.bytes, b.bram36
        );
    }
    s
}
