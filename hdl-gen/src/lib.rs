//! Tessera's HDL generator: a small typed netlist IR and a Verilog-2001
//! printer whose output is width-clean by construction, plus runners for
//! Verilator lint and yosys synthesis.
//!
//! Sizes are run-time values (from the engine config), never const generics.
//! Every expression builder checks widths and signedness and returns
//! [`HdlError`] on a mismatch, so the printed Verilog passes
//! `verilator --lint-only -Wall` without waivers.
//!
//! ```
//! use tessera_hdl_gen::{Design, Expr, Module, Reset, Ty};
//!
//! # fn main() -> Result<(), tessera_hdl_gen::HdlError> {
//! let width = 12; // from the engine config, at run time
//! let mut m = Module::new("acc")?;
//! m.clock()?;
//! m.reset()?;
//! let x = m.input("x_i", Ty::s(8))?;
//! let y = m.output("y_o", Ty::s(width))?;
//! let acc = m.reg("acc", Ty::s(width), Reset::Value(0))?;
//! // x.e().add(&acc.q.e()) would be rejected: s8 vs s12.
//! assert!(x.e().add(&acc.q.e()).is_err());
//! m.assign(&acc.d, acc.q.e().add(&x.e().sext(width)?)?)?;
//! m.assign(&y, acc.q.e())?;
//! let mut d = Design::new("acc");
//! d.header_line("config: example");
//! d.add(m)?;
//! let files = d.render()?; // or d.write(dir) for acc.v + acc.f
//! assert!(files[0].1.contains("acc_q <= acc_d;"));
//! # Ok(())
//! # }
//! ```

pub mod engine;
pub mod error;
pub mod examples;
pub mod expr;
pub mod interp;
pub mod ir;
pub mod lint;
pub mod print;
pub mod testprog;

pub use error::HdlError;
pub use expr::{Expr, Ty};
pub use interp::Interp;
pub use ir::{Design, Module, Param, Port, RamStyle, Reg, Reset, Signal};
pub use lint::{
    verilator_lint, yosys_synth, Family, LintReport, SynthOptions, SynthStats, ToolError,
};
pub use print::{print_module, WrittenDesign};
