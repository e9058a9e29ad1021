//! Tessera's HDL generator: a small typed netlist IR and a Verilog-2001
//! printer whose output is width-clean by construction, plus runners for
//! Verilator lint and yosys synthesis.
//!
//! Sizes are run-time values (from the engine config), never const generics.
//! Every expression builder checks widths and signedness and returns
//! [`HdlError`] on a mismatch, so the printed Verilog passes
//! `verilator --lint-only -Wall` without waivers.

pub mod error;
pub mod examples;
pub mod expr;
pub mod interp;
pub mod ir;
pub mod lint;
pub mod print;

pub use error::HdlError;
pub use expr::{Expr, Ty};
pub use interp::Interp;
pub use ir::{Design, Module, Param, Port, RamStyle, Reg, Reset, Signal};
pub use lint::{
    verilator_lint, yosys_synth, Family, LintReport, SynthOptions, SynthStats, ToolError,
};
pub use print::{print_module, WrittenDesign};
