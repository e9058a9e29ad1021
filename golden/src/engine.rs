//! The engine's host interface (docs/engine.md, "Controller and streams"): the 64-bit command
//! word and the bit layouts of the data-in (`din`) and data-out (`dout`) stream words.
//!
//! The generated hardware (`hdl-gen`), the co-simulation driver and the cycle model all use
//! these definitions, so the encoding is written down once. The command layout is fixed (it does
//! not depend on the config); the stream layouts depend on the array size, `w_scale_bits` and
//! `stream_bits`, given by [`StreamLayout::new`].

use std::fmt;

use crate::config::{EngineConfig, WeightMode};
use crate::ops::OutputStage;

/// A bit field `[lo, lo + width)` of the command word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub lo: u32,
    pub width: u32,
}

impl Field {
    const fn new(lo: u32, width: u32) -> Field {
        Field { lo, width }
    }
    /// Highest bit index.
    #[must_use]
    pub const fn hi(self) -> u32 {
        self.lo + self.width - 1
    }
    fn max(self) -> u64 {
        (1u64 << self.width) - 1
    }
    fn get(self, w: u64) -> u64 {
        (w >> self.lo) & self.max()
    }
    fn put(self, v: u64) -> u64 {
        debug_assert!(v <= self.max());
        (v & self.max()) << self.lo
    }
}

/// Field positions of the command word (LSB = bit 0).
pub mod field {
    use super::Field;
    /// Opcode, every command.
    pub const OPCODE: Field = Field::new(0, 4);
    /// `LOAD_*` / `DRAIN`: first buffer entry.
    pub const ADDR: Field = Field::new(4, 20);
    /// `LOAD_*` / `DRAIN`: number of entries (0 = nothing).
    pub const COUNT: Field = Field::new(24, 21);
    /// `RUN`: weight mode code (see [`super::mode_code`]).
    pub const MODE: Field = Field::new(4, 2);
    /// `RUN`: 0 = GEMM (output stationary), 1 = GEMV (broadcast).
    pub const DATAFLOW: Field = Field::new(6, 1);
    /// `RUN`: 1 = keep the accumulators (k-split; no store, no clear).
    pub const KEEP: Field = Field::new(7, 1);
    /// `RUN`: reduction length `k` in elements (1..=act_depth).
    pub const K: Field = Field::new(8, 21);
    /// `RUN`: output buffer entry of PE row 0.
    pub const OUT_ADDR: Field = Field::new(29, 20);
    /// `RUN`: 1 = fold the activations (N17) with the fold buffer and subtract `Z` (GEMV only).
    pub const FOLD: Field = Field::new(49, 1);
    /// `SET_BASE`: activation buffer entry of k position 0 (a multiple of 4).
    pub const ACT_BASE: Field = Field::new(4, 20);
    /// `SET_BASE`: weight buffer entry of beat 0 (GEMM).
    pub const WGT_BASE: Field = Field::new(24, 20);
    /// `SET_BASE`: metadata buffer entry of group 0 (GEMM).
    pub const META_BASE: Field = Field::new(44, 20);
    /// `SET_OUT`: N14 `out_mult`.
    pub const OUT_MULT: Field = Field::new(4, 16);
    /// `SET_OUT`: N14 `out_shift` (0..=62).
    pub const OUT_SHIFT: Field = Field::new(20, 6);
    /// `SET_OUT`: N14 `out_bits` code: 0 = 8, 1 = 16, 2 = 32.
    pub const OUT_BITS: Field = Field::new(26, 2);
}

/// Opcodes.
pub mod opcode {
    pub const NOP: u64 = 0;
    pub const LOAD_ACT: u64 = 1;
    pub const LOAD_WGT: u64 = 2;
    pub const LOAD_META: u64 = 3;
    pub const RUN: u64 = 4;
    pub const DRAIN: u64 = 5;
    pub const SET_BASE: u64 = 6;
    pub const SET_OUT: u64 = 7;
    pub const LOAD_FOLD: u64 = 8;
}

/// The run-time mode code of the PE's `mode` input (2 bits).
#[must_use]
pub fn mode_code(mode: WeightMode) -> u64 {
    match mode {
        WeightMode::W2 => 0,
        WeightMode::W4 => 1,
        WeightMode::W8 => 2,
        WeightMode::Ternary => 3,
    }
}

fn mode_from_code(code: u64) -> WeightMode {
    match code {
        0 => WeightMode::W2,
        1 => WeightMode::W4,
        2 => WeightMode::W8,
        _ => WeightMode::Ternary,
    }
}

/// The two dataflows of docs/engine.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataflow {
    /// Output stationary: PE (r, c) owns output (token r, channel c).
    Gemm,
    /// Broadcast: PE (r, c) owns channel `r * cols + c` of the single token.
    Gemv,
}

/// One engine command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Nop,
    /// `count` activation entries from `din` (one word each) into entries `addr..`.
    LoadAct {
        addr: u32,
        count: u32,
    },
    /// `count` weight entries (`wgt_words` words each) into entries `addr..`.
    LoadWgt {
        addr: u32,
        count: u32,
    },
    /// `count` metadata entries (`meta_words` words each) into entries `addr..`.
    LoadMeta {
        addr: u32,
        count: u32,
    },
    /// `count` fold entries (one word each: N17 `zero_u8` low, `fscale` high) into entries
    /// `addr..` of the fold buffer (addressed like the activation buffer).
    LoadFold {
        addr: u32,
        count: u32,
    },
    /// Base entries of the next runs.
    SetBase {
        act: u32,
        wgt: u32,
        meta: u32,
    },
    /// Output stage (N14) of the next stores.
    SetOut(OutputStage),
    /// Run one tile; unless `keep`, store the `rows` result rows at `out_addr..` through the
    /// output stage and clear the accumulators.
    Run {
        mode: WeightMode,
        dataflow: Dataflow,
        keep: bool,
        k: u32,
        out_addr: u32,
        /// N17 fold at the activation input and `Z` subtraction (GEMV).
        fold: bool,
    },
    /// Stream `count` output entries from `addr..` to `dout`.
    Drain {
        addr: u32,
        count: u32,
    },
}

/// A command that cannot be encoded, or a word that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError(pub String);

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CmdError {}

fn fit(what: &str, v: u64, f: Field) -> Result<u64, CmdError> {
    if v > f.max() {
        return Err(CmdError(format!(
            "{what} = {v} does not fit its {}-bit field",
            f.width
        )));
    }
    Ok(f.put(v))
}

fn out_bits_code(bits: u32) -> Result<u64, CmdError> {
    match bits {
        8 => Ok(0),
        16 => Ok(1),
        32 => Ok(2),
        b => Err(CmdError(format!("out_bits {b} is not 8, 16 or 32"))),
    }
}

impl Cmd {
    /// The 64-bit command word.
    pub fn encode(&self) -> Result<u64, CmdError> {
        use field::*;
        let op = |o: u64| OPCODE.put(o);
        let addr_count =
            |o: u64, addr: u32, count: u32| -> Result<u64, CmdError> {
                Ok(op(o)
                    | fit("addr", u64::from(addr), ADDR)?
                    | fit("count", u64::from(count), COUNT)?)
            };
        match *self {
            Cmd::Nop => Ok(op(opcode::NOP)),
            Cmd::LoadAct { addr, count } => addr_count(opcode::LOAD_ACT, addr, count),
            Cmd::LoadWgt { addr, count } => addr_count(opcode::LOAD_WGT, addr, count),
            Cmd::LoadMeta { addr, count } => addr_count(opcode::LOAD_META, addr, count),
            Cmd::LoadFold { addr, count } => addr_count(opcode::LOAD_FOLD, addr, count),
            Cmd::Drain { addr, count } => addr_count(opcode::DRAIN, addr, count),
            Cmd::SetBase { act, wgt, meta } => Ok(op(opcode::SET_BASE)
                | fit("act base", u64::from(act), ACT_BASE)?
                | fit("wgt base", u64::from(wgt), WGT_BASE)?
                | fit("meta base", u64::from(meta), META_BASE)?),
            Cmd::SetOut(stage) => {
                stage.check().map_err(|e| CmdError(e.to_string()))?;
                Ok(op(opcode::SET_OUT)
                    | fit("out_mult", u64::from(stage.out_mult), OUT_MULT)?
                    | fit("out_shift", u64::from(stage.out_shift), OUT_SHIFT)?
                    | OUT_BITS.put(out_bits_code(stage.out_bits)?))
            }
            Cmd::Run {
                mode,
                dataflow,
                keep,
                k,
                out_addr,
                fold,
            } => Ok(op(opcode::RUN)
                | FOLD.put(u64::from(fold))
                | MODE.put(mode_code(mode))
                | DATAFLOW.put(u64::from(dataflow == Dataflow::Gemv))
                | KEEP.put(u64::from(keep))
                | fit("k", u64::from(k), K)?
                | fit("out addr", u64::from(out_addr), OUT_ADDR)?),
        }
    }

    /// Decodes a command word (unused bits are ignored, as the hardware does).
    pub fn decode(w: u64) -> Result<Cmd, CmdError> {
        use field::*;
        let g = |f: Field| u32::try_from(f.get(w)).expect("fields are at most 21 bits");
        let (addr, count) = (g(ADDR), g(COUNT));
        Ok(match OPCODE.get(w) {
            opcode::NOP => Cmd::Nop,
            opcode::LOAD_ACT => Cmd::LoadAct { addr, count },
            opcode::LOAD_WGT => Cmd::LoadWgt { addr, count },
            opcode::LOAD_META => Cmd::LoadMeta { addr, count },
            opcode::LOAD_FOLD => Cmd::LoadFold { addr, count },
            opcode::DRAIN => Cmd::Drain { addr, count },
            opcode::SET_BASE => Cmd::SetBase {
                act: g(ACT_BASE),
                wgt: g(WGT_BASE),
                meta: g(META_BASE),
            },
            opcode::SET_OUT => Cmd::SetOut(OutputStage {
                out_mult: u16::try_from(OUT_MULT.get(w)).expect("16-bit field"),
                out_shift: g(OUT_SHIFT),
                out_bits: match OUT_BITS.get(w) {
                    0 => 8,
                    1 => 16,
                    2 => 32,
                    _ => return Err(CmdError("out_bits code 3 is reserved".into())),
                },
            }),
            opcode::RUN => Cmd::Run {
                mode: mode_from_code(MODE.get(w)),
                dataflow: if DATAFLOW.get(w) == 1 {
                    Dataflow::Gemv
                } else {
                    Dataflow::Gemm
                },
                keep: KEEP.get(w) == 1,
                k: g(K),
                out_addr: g(OUT_ADDR),
                fold: FOLD.get(w) == 1,
            },
            o => return Err(CmdError(format!("opcode {o} is reserved"))),
        })
    }
}

/// Bit layouts of the stream words for one config. Every multi-word entry is sent low word
/// first; a stream word is `stream_bits` wide, little-endian (bit 0 of the word is bit 0 of the
/// entry's first word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    pub rows: u32,
    pub cols: u32,
    pub w_scale_bits: u32,
    pub stream_bits: u32,
    /// Bits of one metadata field: `8 + w_scale_bits` (zero point low, `gscale` high).
    pub meta_field_bits: u32,
    /// `din` words per weight entry: `ceil(cols * 8 / stream_bits)`.
    pub wgt_words: u32,
    /// `din` words per metadata entry: `ceil(cols * meta_field_bits / stream_bits)`.
    pub meta_words: u32,
    /// `din` words per GEMV beat (one byte per PE): `ceil(rows * cols * 8 / stream_bits)`.
    pub gemv_beat_words: u32,
    /// `din` words per GEMV group header (one field per PE).
    pub gemv_meta_words: u32,
    /// `dout` words per output entry (`cols` 32-bit values): `ceil(cols * 32 / stream_bits)`.
    pub out_words: u32,
}

impl StreamLayout {
    /// The layout of a validated config.
    #[must_use]
    pub fn new(cfg: &EngineConfig) -> StreamLayout {
        let (r, c) = (cfg.array.rows, cfg.array.cols);
        let ws = cfg.quant.w_scale_bits;
        let sb = cfg.interface.stream_bits;
        let mf = 8 + ws;
        StreamLayout {
            rows: r,
            cols: c,
            w_scale_bits: ws,
            stream_bits: sb,
            meta_field_bits: mf,
            wgt_words: (c * 8).div_ceil(sb),
            meta_words: (c * mf).div_ceil(sb),
            gemv_beat_words: (r * c * 8).div_ceil(sb),
            gemv_meta_words: (r * c * mf).div_ceil(sb),
            out_words: (c * 32).div_ceil(sb),
        }
    }

    /// Words of the slot register that assembles multi-word entries.
    #[must_use]
    pub fn slot_words(&self) -> u32 {
        self.wgt_words
            .max(self.meta_words)
            .max(self.gemv_beat_words)
            .max(self.gemv_meta_words)
    }

    /// One activation entry: `rows` int8 codes (row `r` at bits `8r..`), one word.
    #[must_use]
    pub fn act_entry(&self, x_i8: &[i8]) -> Vec<Word> {
        assert_eq!(
            x_i8.len(),
            self.rows as usize,
            "act_entry: one code per row"
        );
        let mut b = BitPacker::default();
        for &x in x_i8 {
            b.push(u64::from(x.to_le_bytes()[0]), 8);
        }
        b.words(self.stream_bits, 1)
    }

    /// One weight entry (`cols` bytes) or GEMV beat (`rows * cols` bytes, PE `r * cols + c`).
    #[must_use]
    pub fn byte_entry(&self, bytes: &[u8]) -> Vec<Word> {
        let mut b = BitPacker::default();
        for &x in bytes {
            b.push(u64::from(x), 8);
        }
        let words = if bytes.len() == self.cols as usize {
            self.wgt_words
        } else {
            assert_eq!(bytes.len(), (self.rows * self.cols) as usize, "byte_entry");
            self.gemv_beat_words
        };
        b.words(self.stream_bits, words)
    }

    /// One metadata entry (`cols` fields) or GEMV group header (`rows * cols` fields):
    /// `(gscale, zero_u8)` per column / PE.
    #[must_use]
    pub fn meta_entry(&self, fields: &[(u16, u8)]) -> Vec<Word> {
        let mut b = BitPacker::default();
        for &(gscale, zero) in fields {
            b.push(u64::from(zero), 8);
            b.push(u64::from(gscale), self.w_scale_bits);
        }
        let words = if fields.len() == self.cols as usize {
            self.meta_words
        } else {
            assert_eq!(fields.len(), (self.rows * self.cols) as usize, "meta_entry");
            self.gemv_meta_words
        };
        b.words(self.stream_bits, words)
    }

    /// One fold entry (`LOAD_FOLD`): `zero_u8` in the low 8 bits, `fscale` above, one word.
    #[must_use]
    pub fn fold_entry(&self, fscale: u16, zero: u8) -> Vec<Word> {
        let mut b = BitPacker::default();
        b.push(u64::from(zero), 8);
        b.push(u64::from(fscale), self.w_scale_bits);
        b.words(self.stream_bits, 1)
    }

    /// Decodes one output entry (`out_words` words) into `cols` values (sign-extended 32-bit).
    #[must_use]
    pub fn out_entry(&self, words: &[Word]) -> Vec<i32> {
        assert_eq!(
            words.len(),
            self.out_words as usize,
            "out_entry: word count"
        );
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.0.iter().copied()).collect();
        (0..self.cols as usize)
            .map(|c| {
                let b = &bytes[4 * c..4 * c + 4];
                i32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })
            .collect()
    }
}

/// One stream word, little-endian bytes (`stream_bits / 8` of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(pub Vec<u8>);

impl Word {
    /// Hex digits, most significant first (the `$readmemh` format).
    #[must_use]
    pub fn to_hex(&self) -> String {
        self.0.iter().rev().map(|b| format!("{b:02x}")).collect()
    }
    /// Parses `to_hex` output of `bytes` bytes.
    pub fn from_hex(s: &str, bytes: usize) -> Result<Word, CmdError> {
        let s = s.trim();
        if s.len() != 2 * bytes {
            return Err(CmdError(format!(
                "word {s:?}: expected {} hex digits",
                2 * bytes
            )));
        }
        let mut v = Vec::with_capacity(bytes);
        for i in (0..bytes).rev() {
            let d = &s[2 * i..2 * i + 2];
            v.push(u8::from_str_radix(d, 16).map_err(|e| CmdError(format!("{d:?}: {e}")))?);
        }
        Ok(Word(v))
    }
}

/// Packs fields LSB first into a bit string.
#[derive(Debug, Default)]
struct BitPacker {
    bits: Vec<bool>,
}

impl BitPacker {
    fn push(&mut self, v: u64, width: u32) {
        for i in 0..width {
            self.bits.push((v >> i) & 1 == 1);
        }
    }
    fn words(mut self, stream_bits: u32, n: u32) -> Vec<Word> {
        let total = (stream_bits * n) as usize;
        assert!(self.bits.len() <= total, "entry wider than its words");
        self.bits.resize(total, false);
        self.bits
            .chunks(stream_bits as usize)
            .map(|w| {
                Word(
                    w.chunks(8)
                        .map(|b| {
                            b.iter()
                                .enumerate()
                                .fold(0u8, |acc, (i, &x)| acc | (u8::from(x) << i))
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_roundtrip() {
        let cmds = [
            Cmd::Nop,
            Cmd::LoadAct {
                addr: 12,
                count: 256,
            },
            Cmd::LoadWgt {
                addr: (1 << 20) - 1,
                count: 1 << 20,
            },
            Cmd::LoadMeta { addr: 3, count: 9 },
            Cmd::Drain { addr: 7, count: 4 },
            Cmd::SetBase {
                act: 4,
                wgt: 100,
                meta: (1 << 20) - 1,
            },
            Cmd::SetOut(OutputStage {
                out_mult: 65535,
                out_shift: 62,
                out_bits: 16,
            }),
            Cmd::Run {
                mode: WeightMode::Ternary,
                dataflow: Dataflow::Gemv,
                keep: true,
                k: 1 << 20,
                out_addr: 5,
                fold: true,
            },
            Cmd::LoadFold { addr: 8, count: 3 },
        ];
        for c in cmds {
            let w = c.encode().expect("encode");
            assert_eq!(Cmd::decode(w), Ok(c), "{w:#x}");
        }
        assert!(Cmd::LoadAct {
            addr: 1 << 20,
            count: 0
        }
        .encode()
        .is_err());
        assert!(Cmd::decode(15).is_err());
        assert!(Cmd::decode(9).is_err());
    }

    #[test]
    fn fields_do_not_overlap_within_a_command() {
        use field::*;
        for group in [
            &[OPCODE, ADDR, COUNT][..],
            &[OPCODE, MODE, DATAFLOW, KEEP, K, OUT_ADDR, FOLD][..],
            &[OPCODE, ACT_BASE, WGT_BASE, META_BASE][..],
            &[OPCODE, OUT_MULT, OUT_SHIFT, OUT_BITS][..],
        ] {
            let mut used = 0u128;
            for f in group {
                let m = ((1u128 << f.width) - 1) << f.lo;
                assert_eq!(used & m, 0, "{f:?} overlaps");
                assert!(f.hi() < 64);
                used |= m;
            }
        }
    }

    #[test]
    fn stream_words_are_little_endian() {
        let cfg = EngineConfig::preset("tiny").expect("tiny");
        let l = StreamLayout::new(&cfg);
        assert_eq!((l.wgt_words, l.meta_words, l.out_words), (1, 2, 2));
        let w = l.act_entry(&[1, -1, 2, -128]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].to_hex(), "000000008002ff01");
        let m = l.meta_entry(&[(0x8000, 0x40), (1, 2), (3, 4), (5, 6)]);
        assert_eq!(m[0].0[..3], [0x40, 0x00, 0x80]);
        assert_eq!(Word::from_hex(&m[1].to_hex(), 8), Ok(m[1].clone()));
    }
}
