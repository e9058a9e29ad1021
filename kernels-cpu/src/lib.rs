//! `tessera-kernels-cpu`: fast, bit-exact CPU kernels for the engine operations that
//! `tessera-golden` specifies (docs/numerics.md N12-N19).
//!
//! - [`PreparedWeights`]: a weight tensor ([`tessera_golden::quant::QuantWeights`]) re-packed at
//!   load time into a CPU layout (32-element chunks, each group padded to whole chunks), with
//!   [`PreparedWeights::gemm_acc`] / [`PreparedWeights::gemm`] (GEMV is `m_tokens = 1`) computing
//!   exactly `golden::ops::weight_acc` / `golden::ops::weight_op`.
//! - [`kv`]: the A8 x KV4 attention products (`Q x K^T` per key group, `P x V`) on N11b-packed
//!   codes, equal to `golden::kv::KvCache::{qk, pv}`.
//! - [`Isa`]: run-time dispatch (AVX2, portable scalar; `TESSERA_FORCE_ISA` pins a path).
//!
//! The contract is bit-exactness: every kernel, on every path available on the machine, is
//! tested integer for integer against golden (`tests/`).

mod avx2;
pub mod isa;
pub mod kv;
pub mod weights;

pub use isa::{Isa, IsaError};
pub use kv::{KvHeadCpu, KvKernelError, KvScratch};
pub use weights::{apply_stage, PreparedWeights, Scratch};
