//! `EngineConfig`: the single source of truth for every size of a Tessera engine.
//!
//! A config is a handful of raw knobs in TOML sections (`[array]`, `[precision]`, `[quant]`,
//! `[datapath]`, `[buffers]`, `[interface]`, `[clock]`). Every section and field has a default,
//! so a preset file is a **delta** from [`EngineConfig::default()`]: it lists only what differs
//! (like Gemmini's `defaultConfig.copy(...)`). Unknown fields are errors.
//!
//! The life of a config: [`EngineConfig::load`] / [`EngineConfig::from_toml_str`] (syntax and
//! types; one one-line [`ConfigError`]), then [`EngineConfig::validate`] (one [`RuleError`] per
//! broken rule), then [`EngineConfig::derive`] (every computed size, in [`Derived`]), and the
//! emitters [`EngineConfig::to_json`] and [`EngineConfig::to_c_header`]. Nothing else in the
//! project restates a number that is derived here.
//!
//! # The hardware these knobs describe (docs/engine.md)
//!
//! - An `rows x cols` systolic array of processing elements (PEs). Each PE has **8 binary
//!   bit-plane units** (Marsellus RBE style): a B-bit weight code uses B planes, so a B-bit mode
//!   performs `8 / B` products per PE per cycle (W2 and ternary: 4, W4: 2, W8: 1). The activation
//!   operand is always 8-bit signed (A8).
//! - Each PE keeps an exact group partial sum (`gpsum_bits`, N12) and an `acc_bits` accumulator
//!   (N13); at a group boundary it computes `gscale * G` in one DSP48E2 (27x18 multiplier,
//!   48-bit accumulator), hence `acc_bits <= 48` and one DSP per PE.
//! - GEMM (prefill) is output stationary: each PE row owns a token, each column an output
//!   channel; per cycle a row consumes `8/B` activations and a column `8/B` codes (one byte).
//!   GEMV (decode) broadcasts one token's activations and streams `rows * cols` bytes of weight
//!   codes per cycle, so it is bounded by `stream_bits`.
//! - Buffers (entries; see [`BufferConfig`]): activations `act_depth` entries of `rows` int8
//!   values (one k position for every array row; 4 banks so W2 can read 4 per cycle); weights
//!   `wgt_depth` entries of `cols` bytes (one byte of packed codes per column: one GEMM cycle in
//!   any mode); group metadata (a `w_scale_bits` scale + an 8-bit zero point per group and
//!   column) sized for the W2 worst case; outputs `out_depth` entries of `cols` 32-bit values.
//! - Streams are AXI4-Stream of `stream_bits`; control is AXI4-Lite with `axil_addr_bits`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

use crate::numerics::Datapath;

mod derive;
mod emit;
mod parse;
#[cfg(test)]
mod tests;

pub use derive::{BufferDerived, Derived, ModeDerived};

/// Binary bit-plane units per PE (Marsellus RBE style): fixed by the PE design.
pub const BIT_PLANES_PER_PE: u32 = 8;
/// Activation width (A8): fixed.
pub const ACT_BITS: u32 = 8;
/// KV-cache code width (KV4): fixed.
pub const KV_BITS: u32 = 4;
/// Width of the recent (8-bit) KV window codes (N16, N18): fixed.
pub const KV_WINDOW_BITS: u32 = 8;
/// Widest output value of the output stage (N14: `out_bits` in {8, 16, 32}).
pub const OUT_BITS_MAX: u32 = 32;
/// Widest accumulator: the DSP48E2's 48-bit accumulator (N13).
pub const ACC_BITS_MAX: u32 = 48;
/// Narrowest accumulator (N13).
pub const ACC_BITS_MIN: u32 = 32;
/// Largest buffer depth in entries (a 20-bit buffer address).
pub const DEPTH_MAX: u32 = 1 << 20;

/// The built-in presets, embedded in the binary (the files in `configs/`).
const PRESETS: [(&str, &str); 3] = [
    ("tiny", include_str!("../../configs/tiny.toml")),
    ("small", include_str!("../../configs/small.toml")),
    ("u280", include_str!("../../configs/u280.toml")),
];

/// All the raw knobs of one engine. Every size the project uses is derived from these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// A short name (`[A-Za-z0-9_-]`, 1..=64 chars) printed in generated files. Not part of the
    /// hash: two files describing the same hardware share one build folder.
    pub name: String,
    pub array: ArrayConfig,
    pub precision: PrecisionConfig,
    pub quant: QuantConfig,
    pub datapath: DatapathConfig,
    pub buffers: BufferConfig,
    pub interface: InterfaceConfig,
    pub clock: ClockConfig,
}

/// `[array]`: the PE grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArrayConfig {
    /// PE rows (GEMM: tokens in flight), 1..=64.
    pub rows: u32,
    /// PE columns (GEMM: output channels in flight), 1..=64.
    pub cols: u32,
}

/// `[precision]`: the modes the PE supports. `act_bits`, `kv_bits` and `kv_window_bits` are
/// fixed by W2A8KV4 but present so a file that states them is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionConfig {
    /// Weight code widths the PE supports: a subset of {2, 4, 8} containing 2 (W2) and 4 (the
    /// KV4 attention path runs as W4), ascending, no repeats.
    pub weight_bits: Vec<u32>,
    /// BitNet b1.58 ternary weights (N8), run on the 2-bit datapath.
    pub ternary: bool,
    /// Activation bits: must be 8.
    pub act_bits: u32,
    /// KV-cache code bits: must be 4.
    pub kv_bits: u32,
    /// Recent-window KV code bits: must be 8.
    pub kv_window_bits: u32,
}

/// `[quant]`: group sizes of the quantizers (N7, N9, N16).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantConfig {
    /// Weight group length along k, in elements: a power of two in 8..=128.
    pub w_group_len: u32,
    /// Group-scale multiplier width (N9): 8..=16.
    pub w_scale_bits: u32,
    /// Tokens per key group of the KV4 cache (N16): a power of two in 8..=128.
    pub kv_group_len: u32,
    /// Most recent tokens kept at 8 bits (N16), in tokens: a multiple of `kv_group_len`.
    pub kv_recent_window: u32,
}

/// `[datapath]`: accumulator width.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Accumulator bits (N13): 32..=48 and at least the width of one `gscale * G` product.
    pub acc_bits: u32,
}

/// `[buffers]`: on-chip buffer depths, in entries (widths follow from the array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// Activation entries, each one int8 per array row: the longest reduction `k` held on chip.
    /// A multiple of `w_group_len`.
    pub act_depth: u32,
    /// Weight entries, each one byte of packed codes per array column (4 W2 codes, 2 W4, 1 W8).
    /// A multiple of `w_group_len`, so every mode holds whole groups.
    pub wgt_depth: u32,
    /// Output entries, each `cols` 32-bit outputs; holds at least one `rows x cols` tile.
    pub out_depth: u32,
}

/// `[interface]`: the AXI ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterfaceConfig {
    /// AXI4-Stream data width in bits: 32, 64, 128, 256 or 512, and at least `rows * 8` (one
    /// activation buffer entry per beat).
    pub stream_bits: u32,
    /// AXI4-Lite control address width: 12..=16 (Vivado assigns at least a 4 KiB segment).
    pub axil_addr_bits: u32,
}

/// `[clock]`: the target clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// Target clock in MHz: 1..=1000.
    pub target_mhz: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            name: "default".to_string(),
            array: ArrayConfig::default(),
            precision: PrecisionConfig::default(),
            quant: QuantConfig::default(),
            datapath: DatapathConfig::default(),
            buffers: BufferConfig::default(),
            interface: InterfaceConfig::default(),
            clock: ClockConfig::default(),
        }
    }
}

impl Default for ArrayConfig {
    fn default() -> Self {
        Self { rows: 4, cols: 4 }
    }
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            weight_bits: vec![2, 4, 8],
            ternary: true,
            act_bits: ACT_BITS,
            kv_bits: KV_BITS,
            kv_window_bits: KV_WINDOW_BITS,
        }
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            w_group_len: 32,
            w_scale_bits: 16,
            kv_group_len: 32,
            kv_recent_window: 64,
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            acc_bits: ACC_BITS_MAX,
        }
    }
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            act_depth: 1024,
            wgt_depth: 2048,
            out_depth: 256,
        }
    }
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        Self {
            stream_bits: 64,
            axil_addr_bits: 12,
        }
    }
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self { target_mhz: 225 }
    }
}

/// One weight mode of the PE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WeightMode {
    W2,
    W4,
    W8,
    /// BitNet b1.58 codes on the 2-bit datapath (N8).
    Ternary,
}

impl WeightMode {
    /// Bits per stored code.
    #[must_use]
    pub fn bits(self) -> u32 {
        match self {
            Self::W2 | Self::Ternary => 2,
            Self::W4 => 4,
            Self::W8 => 8,
        }
    }

    /// Lower-case name used in JSON keys, C macros (upper-cased) and tables.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::W2 => "w2",
            Self::W4 => "w4",
            Self::W8 => "w8",
            Self::Ternary => "ternary",
        }
    }

    /// Products per PE per cycle: `8 / bits` bit-plane units grouped per product.
    #[must_use]
    pub fn products_per_pe_cycle(self) -> u32 {
        BIT_PLANES_PER_PE / self.bits()
    }
}

/// A config could not be read: missing file, TOML syntax, wrong type or unknown field.
/// `Display` is one line naming the file, the field, what was wrong and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    Io { origin: String, message: String },
    /// TOML syntax error (no field path is known).
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A field has the wrong type or value, or is unknown.
    Field {
        origin: String,
        line: usize,
        path: String,
        problem: String,
        fix: String,
    },
    /// `EngineConfig::preset` was given a name that is not built in.
    UnknownPreset { name: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { origin, message } => {
                write!(
                    f,
                    "{origin}: cannot read the file ({message}); check the path"
                )
            }
            Self::Syntax {
                origin,
                line,
                column,
                message,
            } => write!(
                f,
                "{origin}:{line}:{column}: TOML syntax error: {message}; fix the TOML at that \
                 position"
            ),
            Self::Field {
                origin,
                line,
                path,
                problem,
                fix,
            } => {
                write!(f, "{origin}:{line}: {path}: {problem}; {fix}")
            }
            Self::UnknownPreset { name } => write!(
                f,
                "unknown preset {name:?}; built-in presets are {}",
                EngineConfig::preset_names().join(", ")
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Which validation rule was broken (one variant per rule; see [`EngineConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// `name`: 1..=64 chars of `[A-Za-z0-9_-]`.
    Name,
    /// `array.rows` in 1..=64.
    ArrayRows,
    /// `array.cols` in 1..=64.
    ArrayCols,
    /// `precision.weight_bits`: ascending subset of {2, 4, 8} containing 2 and 4.
    WeightBits,
    /// `precision.act_bits == 8`.
    ActBits,
    /// `precision.kv_bits == 4`.
    KvBits,
    /// `precision.kv_window_bits == 8`.
    KvWindowBits,
    /// `quant.w_group_len` a power of two in 8..=128.
    WGroupLen,
    /// `quant.w_scale_bits` in 8..=16.
    WScaleBits,
    /// `quant.kv_group_len` a power of two in 8..=128.
    KvGroupLen,
    /// `quant.kv_recent_window` a multiple of `kv_group_len`, at most 65536.
    KvRecentWindow,
    /// `datapath.acc_bits` in 32..=48.
    AccBits,
    /// `datapath.acc_bits >= gpsum_bits + w_scale_bits` (one group product never saturates).
    AccHoldsGroupProduct,
    /// A buffer depth in 1..=2^20.
    DepthRange,
    /// `buffers.act_depth` / `buffers.wgt_depth` a multiple of `w_group_len`.
    DepthGroupMultiple,
    /// `buffers.out_depth >= array.rows` (one output tile).
    OutDepthHoldsTile,
    /// `interface.stream_bits` in {32, 64, 128, 256, 512}.
    StreamBits,
    /// `interface.stream_bits >= rows * act_bits` (one activation entry per beat).
    StreamHoldsActRow,
    /// `interface.axil_addr_bits` in 12..=16.
    AxilAddrBits,
    /// `clock.target_mhz` in 1..=1000.
    TargetMhz,
}

/// One broken validation rule: the field, its value, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub rule: Rule,
    /// Dotted field path, e.g. `array.rows`.
    pub field: &'static str,
    /// The offending value as written in TOML.
    pub value: String,
    /// What is allowed, phrased as the fix.
    pub allowed: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.allowed)
    }
}

impl std::error::Error for RuleError {}

fn is_pow2_in(v: u32, lo: u32, hi: u32) -> bool {
    v.is_power_of_two() && (lo..=hi).contains(&v)
}

/// `gpsum_bits` of N12 for group length `l` (a `u32` front for [`crate::ops::gpsum_bits`]).
#[must_use]
pub fn gpsum_bits_for(l: u32) -> u32 {
    crate::ops::gpsum_bits(usize::try_from(l).expect("u32 group length fits usize"))
}

impl EngineConfig {
    /// Parses a TOML config (a delta from `EngineConfig::default()`). Errors name `<toml>` as
    /// the origin; use [`Self::from_toml_str_named`] to name a file.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_str_named(text, "<toml>")
    }

    /// Parses a TOML config; `origin` (a file name) starts every error message.
    pub fn from_toml_str_named(text: &str, origin: &str) -> Result<Self, ConfigError> {
        parse::from_toml(text, origin)
    }

    /// Reads and parses a TOML file (does not validate: call [`Self::validate`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        Self::from_toml_str_named(&text, &origin)
    }

    /// Names of the built-in presets (the files in `configs/`).
    #[must_use]
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _)| *n).collect()
    }

    /// The TOML text of a built-in preset.
    #[must_use]
    pub fn preset_toml(name: &str) -> Option<&'static str> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// A built-in preset, parsed (embedded at compile time, so it works with no files).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let text = Self::preset_toml(name)
            .ok_or_else(|| ConfigError::UnknownPreset { name: name.into() })?;
        Self::from_toml_str_named(text, &format!("<preset {name}>"))
    }

    /// Checks every rule and returns one error per broken rule. A rule that depends on another
    /// field is checked only when that field is itself valid, so one mistake gives one error.
    pub fn validate(&self) -> Result<(), Vec<RuleError>> {
        let mut errs = Vec::new();
        let mut err = |rule: Rule, field: &'static str, value: String, allowed: String| {
            errs.push(RuleError {
                rule,
                field,
                value,
                allowed,
            });
        };
        let (a, p, q, d, b, i, c) = (
            &self.array,
            &self.precision,
            &self.quant,
            &self.datapath,
            &self.buffers,
            &self.interface,
            &self.clock,
        );

        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
        if !name_ok {
            err(
                Rule::Name,
                "name",
                format!("{:?}", self.name),
                "use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'".into(),
            );
        }

        let rows_ok = (1..=64).contains(&a.rows);
        if !rows_ok {
            err(
                Rule::ArrayRows,
                "array.rows",
                a.rows.to_string(),
                "PE rows must be in 1..=64".into(),
            );
        }
        if !(1..=64).contains(&a.cols) {
            err(
                Rule::ArrayCols,
                "array.cols",
                a.cols.to_string(),
                "PE columns must be in 1..=64".into(),
            );
        }

        let wb = &p.weight_bits;
        let wb_ok = wb.iter().all(|x| [2, 4, 8].contains(x))
            && wb.windows(2).all(|w| w[0] < w[1])
            && wb.contains(&2)
            && wb.contains(&4);
        if !wb_ok {
            err(
                Rule::WeightBits,
                "precision.weight_bits",
                format!("{wb:?}"),
                "list weight widths ascending without repeats from {2, 4, 8}, including 2 (W2) \
                 and 4 (the KV4 path), e.g. [2, 4] or [2, 4, 8]"
                    .into(),
            );
        }
        let act_ok = p.act_bits == ACT_BITS;
        if !act_ok {
            err(
                Rule::ActBits,
                "precision.act_bits",
                p.act_bits.to_string(),
                format!("activations are A8: set it to {ACT_BITS} or leave it out"),
            );
        }
        if p.kv_bits != KV_BITS {
            err(
                Rule::KvBits,
                "precision.kv_bits",
                p.kv_bits.to_string(),
                format!("the KV cache is KV4: set it to {KV_BITS} or leave it out"),
            );
        }
        if p.kv_window_bits != KV_WINDOW_BITS {
            err(
                Rule::KvWindowBits,
                "precision.kv_window_bits",
                p.kv_window_bits.to_string(),
                format!(
                    "the recent KV window is 8-bit: set it to {KV_WINDOW_BITS} or leave it out"
                ),
            );
        }

        let wg_ok = is_pow2_in(q.w_group_len, 8, 128);
        if !wg_ok {
            err(
                Rule::WGroupLen,
                "quant.w_group_len",
                q.w_group_len.to_string(),
                "must be a power of two in 8..=128 (32, 64, 128 in production; 8, 16 for fast \
                 tests)"
                    .into(),
            );
        }
        let ws_ok = (8..=16).contains(&q.w_scale_bits);
        if !ws_ok {
            err(
                Rule::WScaleBits,
                "quant.w_scale_bits",
                q.w_scale_bits.to_string(),
                "group-scale multipliers must be 8..=16 bits (N9; a u16, one DSP operand)".into(),
            );
        }
        let kvg_ok = is_pow2_in(q.kv_group_len, 8, 128);
        if !kvg_ok {
            err(
                Rule::KvGroupLen,
                "quant.kv_group_len",
                q.kv_group_len.to_string(),
                "must be a power of two in 8..=128 tokens".into(),
            );
        }
        let win_bad =
            q.kv_recent_window > 65536 || (kvg_ok && q.kv_recent_window % q.kv_group_len != 0);
        if win_bad {
            err(
                Rule::KvRecentWindow,
                "quant.kv_recent_window",
                q.kv_recent_window.to_string(),
                format!(
                    "must be a multiple of quant.kv_group_len ({}) in 0..=65536 (N16)",
                    q.kv_group_len
                ),
            );
        }

        let acc_ok = (ACC_BITS_MIN..=ACC_BITS_MAX).contains(&d.acc_bits);
        if !acc_ok {
            err(
                Rule::AccBits,
                "datapath.acc_bits",
                d.acc_bits.to_string(),
                format!(
                    "must be in {ACC_BITS_MIN}..={ACC_BITS_MAX} (N13; the DSP48E2 accumulator is \
                     48 bits)"
                ),
            );
        }
        if acc_ok && wg_ok && ws_ok {
            let need = gpsum_bits_for(q.w_group_len) + q.w_scale_bits;
            if d.acc_bits < need {
                err(
                    Rule::AccHoldsGroupProduct,
                    "datapath.acc_bits",
                    d.acc_bits.to_string(),
                    format!(
                        "must be at least gpsum_bits ({}) + w_scale_bits ({}) = {need} so one \
                         group product fits; raise it or lower quant.w_group_len / \
                         quant.w_scale_bits",
                        gpsum_bits_for(q.w_group_len),
                        q.w_scale_bits
                    ),
                );
            }
        }

        for (field, v, grouped) in [
            ("buffers.act_depth", b.act_depth, true),
            ("buffers.wgt_depth", b.wgt_depth, true),
            ("buffers.out_depth", b.out_depth, false),
        ] {
            if !(1..=DEPTH_MAX).contains(&v) {
                err(
                    Rule::DepthRange,
                    field,
                    v.to_string(),
                    format!("buffer depths must be in 1..={DEPTH_MAX} entries"),
                );
            } else if grouped && wg_ok && v % q.w_group_len != 0 {
                let lo = v / q.w_group_len * q.w_group_len;
                let hi = lo + q.w_group_len;
                let hint = if lo == 0 {
                    format!("{hi}")
                } else {
                    format!("{lo} or {hi}")
                };
                err(
                    Rule::DepthGroupMultiple,
                    field,
                    v.to_string(),
                    format!(
                        "must be a multiple of quant.w_group_len ({}) so it holds whole groups, \
                         e.g. {hint}",
                        q.w_group_len
                    ),
                );
            }
        }
        if rows_ok && (1..=DEPTH_MAX).contains(&b.out_depth) && b.out_depth < a.rows {
            err(
                Rule::OutDepthHoldsTile,
                "buffers.out_depth",
                b.out_depth.to_string(),
                format!(
                    "must be at least array.rows ({}) to hold one rows x cols output tile",
                    a.rows
                ),
            );
        }

        let sb_ok = [32, 64, 128, 256, 512].contains(&i.stream_bits);
        if !sb_ok {
            err(
                Rule::StreamBits,
                "interface.stream_bits",
                i.stream_bits.to_string(),
                "AXI4-Stream width must be 32, 64, 128, 256 or 512".into(),
            );
        }
        if sb_ok && rows_ok && act_ok && i.stream_bits < a.rows * p.act_bits {
            let need = (a.rows * p.act_bits).next_power_of_two();
            err(
                Rule::StreamHoldsActRow,
                "interface.stream_bits",
                i.stream_bits.to_string(),
                format!(
                    "must be at least array.rows ({}) x {} bits = {} to load one activation \
                     entry per beat; use {need}",
                    a.rows,
                    p.act_bits,
                    a.rows * p.act_bits
                ),
            );
        }
        if !(12..=16).contains(&i.axil_addr_bits) {
            err(
                Rule::AxilAddrBits,
                "interface.axil_addr_bits",
                i.axil_addr_bits.to_string(),
                "AXI4-Lite address width must be in 12..=16 (a 4 KiB to 64 KiB register \
                 segment)"
                    .into(),
            );
        }
        if !(1..=1000).contains(&c.target_mhz) {
            err(
                Rule::TargetMhz,
                "clock.target_mhz",
                c.target_mhz.to_string(),
                "target clock must be in 1..=1000 MHz".into(),
            );
        }

        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    /// The weight modes this config supports, in order W2, W4, W8, ternary.
    #[must_use]
    pub fn modes(&self) -> Vec<WeightMode> {
        let mut m = Vec::new();
        for (bits, mode) in [
            (2, WeightMode::W2),
            (4, WeightMode::W4),
            (8, WeightMode::W8),
        ] {
            if self.precision.weight_bits.contains(&bits) {
                m.push(mode);
            }
        }
        if self.precision.ternary {
            m.push(WeightMode::Ternary);
        }
        m
    }

    /// The datapath sizes the golden ops take (docs/numerics.md). Call after `validate`.
    #[must_use]
    pub fn datapath(&self) -> Datapath {
        Datapath {
            w_group_len: self.quant.w_group_len as usize,
            w_scale_bits: self.quant.w_scale_bits,
            acc_bits: self.datapath.acc_bits,
            kv_group_len: self.quant.kv_group_len as usize,
            kv_recent_window: self.quant.kv_recent_window as usize,
        }
    }

    /// Every computed size. Call only after [`Self::validate`] passed (it asserts that).
    #[must_use]
    pub fn derive(&self) -> Derived {
        derive::derive(self)
    }

    /// Validates, then derives: the one call most users want.
    pub fn checked_derive(&self) -> Result<Derived, Vec<RuleError>> {
        self.validate()?;
        Ok(self.derive())
    }

    /// The canonical JSON of the hardware knobs (every field except `name`, keys sorted, no
    /// whitespace): the input of the config hash.
    #[must_use]
    pub fn canonical_json(&self) -> String {
        emit::canonical_json(self)
    }

    /// `{"config": ..., "derived": ...}`, pretty-printed, keys in a stable order, newline at
    /// the end. Call after `validate`.
    #[must_use]
    pub fn to_json(&self) -> String {
        emit::to_json(self, &self.derive())
    }

    /// The text of `tessera_params.h`. Call after `validate`.
    #[must_use]
    pub fn to_c_header(&self) -> String {
        emit::to_c_header(self, &self.derive())
    }
}
