//! `EngineConfig::derive`: every size computed from the raw knobs.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{
    emit, gpsum_bits_for, EngineConfig, WeightMode, ACT_BITS, BIT_PLANES_PER_PE, OUT_BITS_MAX,
};

/// Everything computed from an `EngineConfig` (field order is the JSON and header order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Derived {
    /// VTA-style name: `{rows}x{cols}_w2a8kv4_g{w_group_len}_a{acc_bits}`.
    pub config_string: String,
    /// First 12 hex digits of the sha256 of `EngineConfig::canonical_json()`.
    pub config_hash: String,
    /// `{config_string}-{config_hash}`: the build and cache folder name.
    pub build_dir_name: String,
    /// `rows * cols`.
    pub pe_count: u32,
    /// Binary bit-plane units per PE (fixed: 8).
    pub bit_plane_units_per_pe: u32,
    /// One DSP48E2 per PE (the group-scale multiply and the accumulator).
    pub dsp48_estimate: u32,
    /// Per supported mode, in order W2, W4, W8, ternary.
    pub modes: Vec<ModeDerived>,
    /// Bits of an exact group partial sum `G` (N12): `1 + ceil(log2(L * 128 * 255 + 1))`.
    pub gpsum_bits: u32,
    /// Fractional bits of a group scale (N9): `w_scale_bits - 1`.
    pub scale_frac_bits: u32,
    /// Bits of one `gscale * G` product: `gpsum_bits + w_scale_bits` (<= `acc_bits`).
    pub group_product_bits: u32,
    /// Largest reduction length `k` for which the accumulator cannot saturate (N13):
    /// `floor((2^(acc_bits-1) - 1) / (128 * 255 * 2^SF))` (each element adds at most that).
    pub k_max_exact: u64,
    /// Longest reduction held in the activation buffer (`act_depth`).
    pub act_buffer_max_k: u32,
    /// Activation buffer: `act_depth` entries of `rows` int8, 4 banks (W2 reads 4 per cycle).
    pub act_buffer: BufferDerived,
    /// Weight buffer: `wgt_depth` entries of `cols` bytes of packed codes.
    pub wgt_buffer: BufferDerived,
    /// Group metadata: per group and column a `w_scale_bits` scale and an 8-bit zero point,
    /// as many groups as the weight buffer holds in W2 (the worst case).
    pub meta_buffer: BufferDerived,
    /// Output buffer: `out_depth` entries of `cols` 32-bit outputs.
    pub out_buffer: BufferDerived,
    /// Sum of the four buffers' `bits`.
    pub total_buffer_bits: u64,
    /// Sum of the four buffers' `bram36` estimates.
    pub total_bram36: u32,
}

/// Numbers of one weight mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModeDerived {
    /// `w2`, `w4`, `w8` or `ternary`.
    pub mode: String,
    pub weight_bits: u32,
    /// `8 / weight_bits`.
    pub products_per_pe_cycle: u32,
    /// `pe_count * products_per_pe_cycle` (GEMM, every PE busy).
    pub peak_macs_per_cycle: u64,
    /// `peak_macs_per_cycle * target_mhz` (exact, in millions of MACs per second).
    pub peak_mmac_per_s: u64,
    /// `peak_mmac_per_s / 1000`.
    pub peak_gmac_per_s: f64,
    /// GEMV (decode) MACs per cycle when weight codes arrive at one stream word per cycle:
    /// `min(peak, stream_bits / weight_bits)`.
    pub gemv_macs_per_cycle: u64,
    /// `gemv_macs_per_cycle / peak_macs_per_cycle`.
    pub gemv_utilization: f64,
    /// Stream words for the codes of one weight group: `ceil(w_group_len * bits / stream_bits)`.
    pub stream_words_per_group: u32,
    /// Weight groups one column of the weight buffer holds: `wgt_depth * (8 / bits) / L`.
    pub wgt_buffer_groups_per_col: u32,
}

/// Size of one on-chip buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BufferDerived {
    /// Logical entries.
    pub entries: u32,
    /// Bits per logical entry.
    pub entry_bits: u32,
    /// Independent banks (entries interleaved across them).
    pub banks: u32,
    /// `entries * entry_bits`.
    pub bits: u64,
    /// `ceil(bits / 8)`.
    pub bytes: u64,
    /// 36 Kb block RAMs: per bank, the best of the 7 simple-dual-port aspect ratios
    /// (512x72 .. 32Kx1). An upper estimate: Vivado may map small buffers to LUT RAM.
    pub bram36: u32,
}

/// 36 Kb BRAM count for a `depth x width` simple-dual-port memory.
fn bram36(depth: u64, width: u64) -> u32 {
    if depth == 0 || width == 0 {
        return 0;
    }
    const SHAPES: [(u64, u64); 7] = [
        (512, 72),
        (1024, 36),
        (2048, 18),
        (4096, 9),
        (8192, 4),
        (16384, 2),
        (32768, 1),
    ];
    let best = SHAPES
        .iter()
        .map(|&(d, w)| depth.div_ceil(d) * width.div_ceil(w))
        .min()
        .unwrap_or(0);
    u32::try_from(best).expect("BRAM count of a validated config fits u32")
}

fn buffer(entries: u32, entry_bits: u32, banks: u32) -> BufferDerived {
    let bits = u64::from(entries) * u64::from(entry_bits);
    let per_bank = u64::from(entries).div_ceil(u64::from(banks));
    BufferDerived {
        entries,
        entry_bits,
        banks,
        bits,
        bytes: bits.div_ceil(8),
        bram36: banks * bram36(per_bank, u64::from(entry_bits)),
    }
}

fn mode_derived(cfg: &EngineConfig, mode: WeightMode, pe_count: u32) -> ModeDerived {
    let bits = mode.bits();
    let ppc = mode.products_per_pe_cycle();
    let peak = u64::from(pe_count) * u64::from(ppc);
    let mmac = peak * u64::from(cfg.clock.target_mhz);
    let gemv = peak.min(u64::from(cfg.interface.stream_bits / bits));
    let l = cfg.quant.w_group_len;
    #[allow(clippy::cast_precision_loss)] // values are far below 2^52
    let (gmac, util) = (mmac as f64 / 1000.0, gemv as f64 / peak as f64);
    ModeDerived {
        mode: mode.name().to_string(),
        weight_bits: bits,
        products_per_pe_cycle: ppc,
        peak_macs_per_cycle: peak,
        peak_mmac_per_s: mmac,
        peak_gmac_per_s: gmac,
        gemv_macs_per_cycle: gemv,
        gemv_utilization: util,
        stream_words_per_group: (l * bits).div_ceil(cfg.interface.stream_bits),
        wgt_buffer_groups_per_col: cfg.buffers.wgt_depth * ppc / l,
    }
}

/// The config hash: sha256 of the canonical JSON, first 12 hex digits.
pub(super) fn config_hash(cfg: &EngineConfig) -> String {
    let digest = Sha256::digest(emit::canonical_json(cfg).as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

pub(super) fn derive(cfg: &EngineConfig) -> Derived {
    if let Err(errs) = cfg.validate() {
        let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
        panic!(
            "EngineConfig::derive on an invalid config (call validate first): {}",
            list.join("; ")
        );
    }
    let (a, q, b) = (&cfg.array, &cfg.quant, &cfg.buffers);
    let pe_count = a.rows * a.cols;
    let gpsum_bits = gpsum_bits_for(q.w_group_len);
    let sf = q.w_scale_bits - 1;
    let config_string = format!(
        "{}x{}_w2a8kv4_g{}_a{}",
        a.rows, a.cols, q.w_group_len, cfg.datapath.acc_bits
    );
    let config_hash = config_hash(cfg);
    // Largest |x * (wl - zero)| is 128 * 255 (N12); times the largest gscale 2^SF (N9).
    let per_elem = 128u64 * 255 * (1u64 << sf);
    let acc_max = (1u64 << (cfg.datapath.acc_bits - 1)) - 1;

    // W2 (mandatory) reads 4 activations per row per cycle: 4 banks by k mod 4.
    let w2_ppc = WeightMode::W2.products_per_pe_cycle();
    let act_buffer = buffer(b.act_depth, a.rows * ACT_BITS, w2_ppc);
    let wgt_buffer = buffer(b.wgt_depth, a.cols * 8, 1);
    let meta_groups = b.wgt_depth * w2_ppc / q.w_group_len;
    let meta_buffer = buffer(meta_groups, a.cols * (q.w_scale_bits + 8), 1);
    let out_buffer = buffer(b.out_depth, a.cols * OUT_BITS_MAX, 1);
    let bufs = [&act_buffer, &wgt_buffer, &meta_buffer, &out_buffer];

    Derived {
        build_dir_name: format!("{config_string}-{config_hash}"),
        config_string,
        config_hash,
        pe_count,
        bit_plane_units_per_pe: BIT_PLANES_PER_PE,
        dsp48_estimate: pe_count,
        modes: cfg
            .modes()
            .into_iter()
            .map(|m| mode_derived(cfg, m, pe_count))
            .collect(),
        gpsum_bits,
        scale_frac_bits: sf,
        group_product_bits: gpsum_bits + q.w_scale_bits,
        k_max_exact: acc_max / per_elem,
        act_buffer_max_k: b.act_depth,
        total_buffer_bits: bufs.iter().map(|x| x.bits).sum(),
        total_bram36: bufs.iter().map(|x| x.bram36).sum(),
        act_buffer,
        wgt_buffer,
        meta_buffer,
        out_buffer,
    }
}
