//! The AXI4-Lite register map of the board top (`tessera_axi_top`), generated from the config.
//!
//! One table ([`RegMap::new`]) drives the Verilog read/write decode ([`crate::wrapper`]), the
//! JSON ([`RegMap::to_json`]) and the C header `tessera_regs.h` ([`RegMap::to_c_header`]), so
//! the three cannot disagree. 32-bit registers at word-aligned byte offsets; `wstrb` is ignored
//! (write whole words).

use serde::Serialize;
use tessera_golden::config::{EngineConfig, WeightMode};

/// `ID` register value: ASCII "TSRA" (Tessera AXI).
pub const ID_VALUE: u32 = 0x5453_5241;
/// Version of this register map layout (bump when offsets or fields change).
pub const MAP_VERSION: u32 = 1;
/// Depth of the command FIFO between `CMD_HI` writes and the engine (a power of two).
pub const CMD_FIFO_DEPTH: u32 = 4;

/// Register access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read-only.
    Ro,
    /// Read-write.
    Rw,
    /// Write-only (reads return 0).
    Wo,
}

/// A bit field of a register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitField {
    pub name: &'static str,
    pub lsb: u32,
    pub width: u32,
    pub desc: &'static str,
}

/// One 32-bit register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Register {
    pub name: &'static str,
    /// Byte offset from the base address.
    pub offset: u32,
    pub access: Access,
    /// The constant a read returns, for identification registers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u32>,
    pub desc: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<BitField>,
}

/// The register map of one config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegMap {
    pub config_name: String,
    pub config_string: String,
    pub config_hash: String,
    pub map_version: u32,
    /// AXI4-Lite address width (`interface.axil_addr_bits`).
    pub addr_bits: u32,
    pub data_bits: u32,
    pub cmd_fifo_depth: u32,
    /// AXI4-Stream width of `s_axis` / `m_axis`.
    pub stream_bits: u32,
    pub registers: Vec<Register>,
}

fn modes_mask(cfg: &EngineConfig) -> u32 {
    cfg.modes()
        .iter()
        .map(|m| match m {
            WeightMode::W2 => 1,
            WeightMode::W4 => 2,
            WeightMode::W8 => 4,
            WeightMode::Ternary => 8,
        })
        .sum()
}

/// The 48-bit config hash (12 hex digits) as a number.
fn hash_value(hash: &str) -> u64 {
    u64::from_str_radix(hash, 16).unwrap_or(0)
}

const fn f(name: &'static str, lsb: u32, width: u32, desc: &'static str) -> BitField {
    BitField {
        name,
        lsb,
        width,
        desc,
    }
}

impl RegMap {
    /// The map for a validated config.
    #[must_use]
    pub fn new(cfg: &EngineConfig) -> RegMap {
        let d = cfg.derive();
        let h = hash_value(&d.config_hash);
        let ro_const = |name, offset, value, desc: String, fields| Register {
            name,
            offset,
            access: Access::Ro,
            value: Some(value),
            desc,
            fields,
        };
        let reg = |name, offset, access, desc: &str, fields| Register {
            name,
            offset,
            access,
            value: None,
            desc: desc.to_string(),
            fields,
        };
        #[allow(clippy::cast_possible_truncation)] // 48-bit hash split in two words
        let (hash_lo, hash_hi) = (h as u32, (h >> 32) as u32);
        let registers =
            vec![
            ro_const("ID", 0x00, ID_VALUE, "Identification: ASCII \"TSRA\".".into(), vec![]),
            ro_const(
                "VERSION",
                0x04,
                MAP_VERSION,
                "Register map layout version.".into(),
                vec![],
            ),
            ro_const(
                "HASH_LO",
                0x08,
                hash_lo,
                format!("Config hash {} bits 31:0 (derive().config_hash).", d.config_hash),
                vec![],
            ),
            ro_const(
                "HASH_HI",
                0x0C,
                hash_hi,
                format!("Config hash {} bits 47:32.", d.config_hash),
                vec![],
            ),
            ro_const(
                "ARRAY",
                0x10,
                cfg.array.rows
                    | (cfg.array.cols << 8)
                    | ((cfg.quant.w_group_len & 0xff) << 16)
                    | (cfg.datapath.acc_bits << 24),
                "Array shape and datapath.".into(),
                vec![
                    f("ROWS", 0, 8, "PE rows"),
                    f("COLS", 8, 8, "PE columns"),
                    f("W_GROUP_LEN", 16, 8, "weight group length L"),
                    f("ACC_BITS", 24, 8, "accumulator bits"),
                ],
            ),
            ro_const(
                "INTERFACE",
                0x14,
                cfg.interface.stream_bits | (modes_mask(cfg) << 16),
                "Stream width and supported weight modes.".into(),
                vec![
                    f("STREAM_BITS", 0, 16, "AXI4-Stream data width"),
                    f("MODES", 16, 4, "bit 0 W2, 1 W4, 2 W8, 3 ternary"),
                ],
            ),
            ro_const(
                "CLOCK_MHZ",
                0x18,
                cfg.clock.target_mhz,
                "Target clock in MHz the design was generated for.".into(),
                vec![],
            ),
            reg(
                "CMD_LO",
                0x20,
                Access::Rw,
                "Command word bits 31:0, staged until CMD_HI is written.",
                vec![],
            ),
            reg(
                "CMD_HI",
                0x24,
                Access::Wo,
                "Command word bits 63:32; the write pushes {CMD_HI, CMD_LO} into the command \
                 FIFO (dropped and STATUS.OVERFLOW set when full).",
                vec![],
            ),
            reg(
                "STATUS",
                0x28,
                Access::Ro,
                "Engine and command FIFO status.",
                vec![
                    f("BUSY", 0, 1, "engine busy or commands pending"),
                    f("ERR", 1, 1, "engine error (sticky in the engine)"),
                    f("FIFO_FULL", 2, 1, "command FIFO full"),
                    f("FIFO_EMPTY", 3, 1, "command FIFO empty"),
                    f("OVERFLOW", 4, 1, "a CMD_HI write found the FIFO full (sticky)"),
                    f("FIFO_LEVEL", 8, 8, "commands in the FIFO"),
                ],
            ),
            reg(
                "CONTROL",
                0x2C,
                Access::Wo,
                "Write 1 to a bit to act.",
                vec![
                    f("CLEAR_COUNTERS", 0, 1, "zero every counter"),
                    f("CLEAR_OVERFLOW", 1, 1, "clear STATUS.OVERFLOW"),
                ],
            ),
            reg(
                "DOUT_BURST",
                0x30,
                Access::Rw,
                "m_axis beats per packet: m_axis_tlast marks every DOUT_BURST-th beat (0 or 1: \
                 every beat).",
                vec![],
            ),
            reg(
                "CMD_COUNT",
                0x40,
                Access::Ro,
                "Commands accepted by the engine (wraps).",
                vec![],
            ),
            reg(
                "BUSY_CYCLES",
                0x44,
                Access::Ro,
                "Cycles the engine reported busy (wraps).",
                vec![],
            ),
            reg(
                "CYCLES",
                0x48,
                Access::Ro,
                "Cycles since reset or CLEAR_COUNTERS (wraps).",
                vec![],
            ),
            reg(
                "DIN_BEATS",
                0x4C,
                Access::Ro,
                "s_axis beats accepted (wraps).",
                vec![],
            ),
            reg(
                "DOUT_BEATS",
                0x50,
                Access::Ro,
                "m_axis beats sent (wraps).",
                vec![],
            ),
        ];
        RegMap {
            config_name: cfg.name.clone(),
            config_string: d.config_string,
            config_hash: d.config_hash,
            map_version: MAP_VERSION,
            addr_bits: cfg.interface.axil_addr_bits,
            data_bits: 32,
            cmd_fifo_depth: CMD_FIFO_DEPTH,
            stream_bits: cfg.interface.stream_bits,
            registers,
        }
    }

    /// The register called `name` (a bug if absent).
    #[must_use]
    pub fn get(&self, name: &str) -> &Register {
        self.registers
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("register {name} is not in the map"))
    }

    /// Pretty JSON with a trailing newline.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("register map serializes");
        s.push('\n');
        s
    }

    /// The text of `tessera_regs.h`.
    #[must_use]
    pub fn to_c_header(&self) -> String {
        let mut s = String::new();
        s.push_str("/* tessera_regs.h: AXI4-Lite register map of tessera_axi_top.\n");
        s.push_str(" * Generated by tessera-boards from the engine config; do not edit.\n");
        s.push_str(&format!(
            " * config: {} ({}, hash {})\n */\n",
            self.config_name, self.config_string, self.config_hash
        ));
        s.push_str("#ifndef TESSERA_REGS_H\n#define TESSERA_REGS_H\n\n");
        s.push_str(&format!(
            "#define TESSERA_REGS_MAP_VERSION {}u\n#define TESSERA_REGS_ADDR_BITS {}u\n\
             #define TESSERA_REGS_CMD_FIFO_DEPTH {}u\n#define TESSERA_REGS_STREAM_BITS {}u\n\
             #define TESSERA_REGS_CONFIG_HASH \"{}\"\n\n",
            self.map_version,
            self.addr_bits,
            self.cmd_fifo_depth,
            self.stream_bits,
            self.config_hash
        ));
        for r in &self.registers {
            s.push_str(&format!(
                "/* {} ({:?}): {} */\n",
                r.name,
                r.access,
                r.desc.replace("*/", "* /")
            ));
            s.push_str(&format!(
                "#define TESSERA_REG_{} 0x{:03X}u\n",
                r.name, r.offset
            ));
            if let Some(v) = r.value {
                s.push_str(&format!(
                    "#define TESSERA_REG_{}_VALUE 0x{v:08X}u\n",
                    r.name
                ));
            }
            for fl in &r.fields {
                let mask = if fl.width == 32 {
                    u32::MAX
                } else {
                    ((1u32 << fl.width) - 1) << fl.lsb
                };
                s.push_str(&format!(
                    "#define TESSERA_REG_{}_{}_SHIFT {}u /* {} */\n#define TESSERA_REG_{}_{}_MASK 0x{mask:08X}u\n",
                    r.name, fl.name, fl.lsb, fl.desc, r.name, fl.name
                ));
            }
            s.push('\n');
        }
        s.push_str("#endif /* TESSERA_REGS_H */\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_word_aligned_unique_and_fits_the_address_space() {
        for name in EngineConfig::preset_names() {
            let cfg = EngineConfig::preset(name).expect("preset");
            let m = RegMap::new(&cfg);
            let mut offs: Vec<u32> = m.registers.iter().map(|r| r.offset).collect();
            assert!(offs.iter().all(|o| o % 4 == 0));
            assert!(offs.iter().all(|o| *o < (1 << m.addr_bits)));
            offs.sort_unstable();
            offs.dedup();
            assert_eq!(offs.len(), m.registers.len());
            let h = u64::from(m.get("HASH_LO").value.expect("v"))
                | (u64::from(m.get("HASH_HI").value.expect("v")) << 32);
            assert_eq!(format!("{h:012x}"), cfg.derive().config_hash);
        }
    }
}
