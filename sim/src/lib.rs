//! `tessera-sim`: Verilator co-simulation of the generated engine, checked every cycle against
//! `golden::cycle` (issue 4, docs/engine.md, decisions.md 6).
//!
//! - [`verilate`]: hdl-gen's Verilog (or a user's RTL directory) -> a cached shared library with
//!   a C ABI;
//! - [`ffi`]: the one `unsafe` module, loading that library with `libloading`;
//! - [`check`]: the lock-step checker and the mismatch report (with a VCD waveform);
//! - [`suites`]: directed and constrained-random suites, JSON / JUnit reports.

pub mod bench;
pub mod check;
pub mod ffi;
pub mod suites;
pub mod verilate;
