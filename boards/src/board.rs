//! Board descriptions as data: `boards/data/*.toml`, embedded with `include_str!`.
//!
//! Each file names the documents its figures come from (vendor documents and AMD's public board
//! files, with the section, table or file), one per figure; a figure no retrieved source
//! confirms carries an `UNSURE` comment saying what is missing. Unknown fields are errors.

use serde::{Deserialize, Serialize};
use std::fmt;
use tessera_hdl_gen::Family;

/// The built-in boards: (name, TOML text).
const BOARDS: [(&str, &str); 5] = [
    ("u280", include_str!("../data/u280.toml")),
    ("u55c", include_str!("../data/u55c.toml")),
    ("zcu102", include_str!("../data/zcu102.toml")),
    ("kv260", include_str!("../data/kv260.toml")),
    ("pynq-z2", include_str!("../data/pynq_z2.toml")),
];

/// One board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// Short name used on the command line (`--board NAME`).
    pub name: String,
    /// Human-readable title.
    pub title: String,
    /// Documents the figures come from (e.g. `UG1393 HBM Configuration and Use`).
    pub sources: Vec<String>,
    /// Vivado part string.
    pub part: String,
    /// Speed grade as printed in the part (`-2L`).
    pub speed_grade: String,
    /// yosys `synth_xilinx -family` name: `xcup` or `xc7`.
    pub family: String,
    /// `alveo`, `zynq-mpsoc` or `zynq-7000`.
    pub kind: String,
    /// Package pins the kernel needs (empty when every port is an AXI interface).
    pub pins: Vec<Pin>,
    /// Programmable-logic resources of the part.
    pub resources: Resources,
    /// Off-chip memory interfaces.
    pub memory: Vec<Memory>,
    /// Where the kernel clock comes from.
    pub clocking: Clocking,
}

/// Available resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub lut: u64,
    pub ff: u64,
    pub dsp: u64,
    /// 36 Kb block RAMs.
    pub bram36: u64,
    /// 288 Kb UltraRAMs.
    pub uram: u64,
}

/// One off-chip memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// `hbm2`, `ddr4` or `ddr3`.
    pub kind: String,
    pub size_gib: f64,
    /// Channels (HBM: pseudo channels).
    pub channels: u32,
    /// Data width per channel in bits (HBM: AXI port width).
    pub width_bits: u32,
    /// Peak bandwidth of the whole interface, GB/s (10^9 bytes per second).
    pub bandwidth_gbs: f64,
}

/// Kernel clocking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clocking {
    /// `shell` (Alveo: the platform drives ap_clk), `ps` (Zynq: pl_clk0) or `pin`.
    pub source: String,
    /// One paragraph, copied into the XDC and README.
    pub note: String,
    /// Board reference clocks (documentation; used only when `source = "pin"`).
    #[serde(default)]
    pub ref_clocks: Vec<RefClock>,
}

/// A board reference clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefClock {
    pub name: String,
    /// Package pins (P then N for a differential clock).
    pub pins: Vec<String>,
    pub io_standard: String,
    pub mhz: f64,
}

/// A package pin the kernel needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Top-level port (`name` or `name[i]`).
    pub port: String,
    pub pin: String,
    pub io_standard: String,
}

/// A board name that is not built in, or a malformed board file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardError(pub String);

impl fmt::Display for BoardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BoardError {}

impl Board {
    /// Parses one board file; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Board, BoardError> {
        let b: Board =
            toml::from_str(text).map_err(|e| BoardError(format!("{origin}: {}", one_line(&e))))?;
        b.check()
            .map_err(|m| BoardError(format!("{origin}: {m}")))?;
        Ok(b)
    }

    fn check(&self) -> Result<(), String> {
        if !["xcup", "xc7"].contains(&self.family.as_str()) {
            return Err(format!(
                "family = {:?}: use \"xcup\" (UltraScale+) or \"xc7\" (7 series)",
                self.family
            ));
        }
        if !["shell", "ps", "pin"].contains(&self.clocking.source.as_str()) {
            return Err(format!(
                "clocking.source = {:?}: use \"shell\", \"ps\" or \"pin\"",
                self.clocking.source
            ));
        }
        if self.clocking.source == "pin" && self.clocking.ref_clocks.is_empty() {
            return Err("clocking.source = \"pin\" needs a [[clocking.ref_clocks]]".into());
        }
        if self.memory.is_empty() {
            return Err("at least one [[memory]] is needed".into());
        }
        if self.sources.is_empty() {
            return Err("sources: name the vendor documents the figures come from".into());
        }
        Ok(())
    }

    /// Names of the built-in boards, in a fixed order.
    #[must_use]
    pub fn names() -> Vec<&'static str> {
        BOARDS.iter().map(|(n, _)| *n).collect()
    }

    /// A built-in board by name.
    pub fn by_name(name: &str) -> Result<Board, BoardError> {
        let (_, text) = BOARDS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            BoardError(format!(
                "unknown board {name:?}; built-in boards are {}",
                Board::names().join(", ")
            ))
        })?;
        Board::from_toml_str(text, &format!("<board {name}>"))
    }

    /// Every built-in board.
    pub fn all() -> Result<Vec<Board>, BoardError> {
        Board::names().into_iter().map(Board::by_name).collect()
    }

    /// The yosys family.
    #[must_use]
    pub fn yosys_family(&self) -> Family {
        if self.family == "xc7" {
            Family::Series7
        } else {
            Family::UltraScalePlus
        }
    }

    /// The memory with the highest bandwidth (weights and the KV cache stream from it).
    #[must_use]
    pub fn main_memory(&self) -> &Memory {
        self.memory
            .iter()
            .max_by(|a, b| a.bandwidth_gbs.total_cmp(&b.bandwidth_gbs))
            .expect("check() guarantees one memory")
    }
}

fn one_line(e: &toml::de::Error) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_board_parses_and_names_its_sources() {
        let all = Board::all().expect("boards parse");
        assert_eq!(all.len(), 5);
        for b in &all {
            assert!(!b.sources.is_empty(), "{}", b.name);
            assert!(b.resources.dsp > 0 && b.resources.lut > 0, "{}", b.name);
            assert!(b.main_memory().bandwidth_gbs > 0.0);
        }
        let u280 = Board::by_name("u280").expect("u280");
        assert_eq!(u280.part, "xcu280-fsvh2892-2L-e");
        assert_eq!(u280.main_memory().kind, "hbm2");
    }

    #[test]
    fn unknown_board_and_field_are_one_line_errors() {
        let e = Board::by_name("nope").expect_err("unknown");
        assert!(e.to_string().contains("built-in boards are u280"));
        let text = include_str!("../data/u280.toml")
            .replace("kind = \"alveo\"", "kind = \"alveo\"\nbogus = 1");
        let e = Board::from_toml_str(&text, "x.toml").expect_err("unknown field");
        assert!(e.to_string().starts_with("x.toml: "));
        assert!(e.to_string().contains("bogus"));
        assert!(!e.to_string().contains('\n'));
    }
}
