//! `tessera-golden`: the numerics contract of the Tessera W2A8KV4 engine, in code.
//!
//! It owns `EngineConfig` (the single source of truth for every size), the rounding and
//! saturation helpers, the quantizers and packers, and the bit-exact reference implementation of
//! every engine operation (docs/numerics.md). It depends on no other Tessera crate.

pub mod config;
pub mod cycle;
pub mod engine;
pub mod kv;
pub mod numerics;
pub mod ops;
pub mod pack;
pub mod quant;
