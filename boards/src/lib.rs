//! `tessera-boards`: Xilinx board targets. Board descriptions as data ([`board`]), the AXI
//! wrapper around the engine and its register map ([`regs`], [`wrapper`]), the XDC, Vivado Tcl
//! and README emitters ([`vivado`]), the yosys resource fit ([`fit`]) and the performance
//! projection ([`project`]). Depends on `golden` and `hdl-gen` only (ARCHITECTURE.md).

pub mod board;

pub use board::{Board, BoardError};
pub mod fit;
pub mod project;
pub mod regs;
pub mod vivado;
pub mod wrapper;
