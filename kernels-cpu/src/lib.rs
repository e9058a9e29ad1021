//! `tessera-kernels-cpu`: fast, bit-exact CPU kernels for the engine operations that
//! `tessera-golden` specifies (docs/numerics.md N12-N19).
//!
//! - [`PreparedWeights`]: a weight tensor ([`tessera_golden::quant::QuantWeights`]) re-packed at
//!   load time into a CPU layout (32-element chunks, each group padded to whole chunks), with
//!   [`PreparedWeights::gemm_acc`] / [`PreparedWeights::gemm`] (GEMV is `m_tokens = 1`) computing
//!   exactly `golden::ops::weight_acc` / `golden::ops::weight_op`.
//! - [`kv`]: the A8 x KV4 attention products (`Q x K^T` per key group, `P x V`) on N11b-packed
//!   codes, equal to `golden::kv::KvCache::{qk, pv}`.
//! - [`Isa`]: run-time dispatch (AVX-512 VNNI, AVX2, portable scalar; `TESSERA_FORCE_ISA` pins a
//!   path).
//! - [`Team`]: a thread team whose helpers spin between loops, for the short products of a
//!   decode step ([`PreparedWeights::gemm_acc_in`]); rayon forks everything else.
//!
//! # Using it from the runtime
//! - Start-up: `let isa = Isa::from_env()?;` (reports a bad `TESSERA_FORCE_ISA` as an error;
//!   print [`Isa::cpu_features`] in logs). Thread count: run the forward pass inside
//!   `rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(..)`.
//! - Load: `PreparedWeights::from(&quant_weights)` per linear layer (the file format stays
//!   golden's N11 layout; this is an in-memory re-packing) and one [`Scratch`] reserved for the
//!   largest layer and the largest `M` ([`Scratch::reserve`]): then no call allocates.
//! - Each weight op: `w.gemm_acc(isa, &dp, &x_i8, m, &mut scratch, &mut acc)` (GEMV is `m = 1`)
//!   then [`apply_stage`] with `OutputStage::weight_lattice_i32(SF)` (or [`PreparedWeights::gemm`]
//!   for both), and the host's N20 dequantization with [`PreparedWeights::row_scale`] as
//!   golden's `dequant_factor` does. A prompt: [`PreparedWeights::gemm_epilogue`] runs the
//!   stage per GEMM sub-block and hands each token's outputs to the host's N20 closure in the
//!   GEMM's tasks. N5 of the activations: [`quantize_token_isa`].
//! - KV: one [`KvHeadCpu`] per (layer, KV head), made with [`KvHeadCpu::with_bits`] and
//!   [`KvHeadCpu::reserve`]d for the context; [`KvHeadCpu::push`] each token (golden's
//!   `KvCache::push` bit for bit, allocation-free; or keep golden's `KvCache` beside a
//!   [`KvHeadCpu::new`] mirror and call [`KvHeadCpu::sync`] after each of its pushes), then
//!   [`KvHeadCpu::qk`] / [`KvHeadCpu::pv`] (or [`KvHeadCpu::pv2_at`] for both N22 planes) per
//!   query head. A prompt: [`KvHeadCpu::push_retaining`] (or `sync_retaining`) for each token,
//!   then [`KvHeadCpu::qk_at`] / [`KvHeadCpu::pv2_at`] at each query's own length (with
//!   [`KvHeadCpu::value_folds_at`] shared by the query heads of a KV head), then
//!   [`KvHeadCpu::trim_history`]. [`kv::quantize_query_into`] and [`kv::quantize_probs_into`]
//!   are golden's N5 / N22 without allocation. Dequantize with
//!   [`KvHeadCpu::key_group_s_ref`] (`frac_bits` 4), [`KvHeadCpu::window_key_scales`]
//!   (`frac_bits` 0) and [`KvHeadCpu::value_s_ref`] (4-bit part 4, window 0).
//!
//! The contract is bit-exactness: every kernel, on every path available on the machine, is
//! tested integer for integer against golden (`tests/`).

pub mod act;
mod avx2;
pub mod isa;
pub mod kv;
pub mod mem;
pub mod team;
pub mod weights;

pub use act::{dequant_run, expf, expf_in_place, quantize_token_isa, sum_squares_rows};
pub use isa::{Isa, IsaError};
pub use kv::{KvHeadCpu, KvKernelError, KvScratch, Pv2Out, ValueFolds};
pub use team::Team;
pub use weights::{apply_stage, set_gemm_quad, PreparedWeights, Scratch};
