//! `tessera_pe`: one processing element (docs/engine.md, "Processing element").
//!
//! Eight binary bit-plane units: plane `b` ANDs bit `b` of the weight byte with one 8-bit
//! activation lane and shifts the result to the bit's lattice weight (N10): in a `B`-bit mode,
//! plane `b` belongs to code `b / B` (activation lane `b / B`) and weighs `2^(b mod B + 8 - B)`.
//! So W2/ternary do 4 products per cycle, W4 2, W8 1. The planes' sum goes into the exact group
//! partial sum `gpsum` (N12's `P`). At the last beat of a group, `P`, the group's activation
//! sum `S`, `zero_u8` and `gscale` are latched; one multiplier, time-shared over two cycles,
//! computes `G = P - zero_u8 * S` (phase A) and then `acc = sat(acc + gscale * G, acc_bits)`
//! (phase B, N13). Groups last at least two cycles (`w_group_len / 4 >= 2`), so the phases of
//! consecutive groups never collide.

use super::{EngineParams, Res};
use crate::expr::{Expr, Ty};
use crate::ir::{Module, Reset};
use tessera_golden::config::WeightMode;

/// Name of the generated module.
pub const NAME: &str = "tessera_pe";

/// Plane `b`'s activation lane and left shift in `mode`.
pub fn plane_map(mode: WeightMode, b: u32) -> (u32, u32) {
    let bits = mode.bits();
    (b / bits, b % bits + 8 - bits)
}

/// Saturate a signed `x` to `bits` (narrower than `x`), as a `bits`-wide signed value.
pub(crate) fn sat_to(x: &Expr, bits: u32) -> Res<Expr> {
    let w = x.width();
    let max = (1i128 << (bits - 1)) - 1;
    let over = x.gt(&Expr::sconst(w, max)?)?;
    let under = x.lt(&Expr::sconst(w, -max - 1)?)?;
    over.mux(
        &Expr::sconst(bits, max)?,
        &under.mux(&Expr::sconst(bits, -max - 1)?, &x.trunc(bits)?)?,
    )
}

/// Builds the PE module.
pub fn pe(p: &EngineParams) -> Res<Module> {
    let mut m = Module::new(NAME)?;
    m.comment("Processing element: 8 bit-plane units, exact group sum (N12), group scale and");
    m.comment(
        "saturating accumulate (N13) on one time-shared multiplier, drain by shifting south.",
    );
    m.comment(&format!(
        "Modes: {}. gpsum {} bits, acc {} bits.",
        p.mode_names(),
        p.gpsum_bits,
        p.acc_bits
    ));
    m.clock()?;
    m.reset()?;
    let ws = p.w_scale_bits;
    let gw = p.gpsum_bits;
    let aw = p.acc_bits;
    let mode = m.input("mode_i", Ty::u(2))?;
    let shift = m.input("shift_i", Ty::bit())?;
    let acc_n = m.input("acc_n_i", Ty::s(aw))?;
    let act = m.input("act_i", Ty::u(32))?;
    let valid = m.input("valid_i", Ty::bit())?;
    let last = m.input("last_i", Ty::bit())?;
    let gsum = m.input("gsum_i", Ty::s(p.s_bits))?;
    let wgt = m.input("wgt_i", Ty::u(8))?;
    let zero = m.input("zero_i", Ty::u(8))?;
    let gscale = m.input("gscale_i", Ty::u(ws))?;
    let act_o = m.output("act_o", Ty::u(32))?;
    let valid_o = m.output("valid_o", Ty::bit())?;
    let last_o = m.output("last_o", Ty::bit())?;
    let gsum_o = m.output("gsum_o", Ty::s(p.s_bits))?;
    let wgt_o = m.output("wgt_o", Ty::u(8))?;
    let zero_o = m.output("zero_o", Ty::u(8))?;
    let gscale_o = m.output("gscale_o", Ty::u(ws))?;
    let acc_o = m.output("acc_o", Ty::s(aw))?;

    // Systolic forwarding: control with reset, data without.
    let fv = m.reg_in("fwd_ctl", "fwd_valid", Ty::bit(), Reset::Value(0))?;
    let fl = m.reg_in("fwd_ctl", "fwd_last", Ty::bit(), Reset::Value(0))?;
    m.assign(&fv.d, valid.e())?;
    m.assign(&fl.d, last.e())?;
    for (base, input, out) in [
        ("fwd_act", &act, &act_o),
        ("fwd_gsum", &gsum, &gsum_o),
        ("fwd_wgt", &wgt, &wgt_o),
        ("fwd_zero", &zero, &zero_o),
        ("fwd_gscale", &gscale, &gscale_o),
    ] {
        let r = m.reg_in("fwd_data", base, input.ty(), Reset::None)?;
        m.assign(&r.d, input.e())?;
        m.assign(out, r.q.e())?;
    }
    m.assign(&valid_o, fv.q.e())?;
    m.assign(&last_o, fl.q.e())?;

    // Mode decode: only the configured modes get datapath legs; W2 and ternary share one.
    let modes = p.modes();
    let is_w4 = if modes.contains(&WeightMode::W4) {
        Some(m.wire_of("is_w4", mode.e().eq(&Expr::uconst(2, 1)?)?)?)
    } else {
        None
    };
    let is_w8 = if modes.contains(&WeightMode::W8) {
        Some(m.wire_of("is_w8", mode.e().eq(&Expr::uconst(2, 2)?)?)?)
    } else {
        None
    };

    // Bit-plane units.
    let lanes: Vec<Expr> = (0..4)
        .map(|j| Ok(act.e().slice(8 * j + 7, 8 * j)?.as_signed()))
        .collect::<Res<_>>()?;
    let mut terms = Vec::new();
    for b in 0..8u32 {
        let leg = |md: WeightMode| -> Res<Expr> {
            let (lane, sh) = plane_map(md, b);
            lanes[lane as usize].sext(16)?.shl(sh)
        };
        let mut t = leg(WeightMode::W2)?;
        if let Some(w4) = &is_w4 {
            t = w4.e().mux(&leg(WeightMode::W4)?, &t)?;
        }
        if let Some(w8) = &is_w8 {
            t = w8.e().mux(&leg(WeightMode::W8)?, &t)?;
        }
        let sel = m.wire_of(&format!("plane{b}_x"), t)?;
        let zero16 = Expr::zero(Ty::s(16))?;
        let term = wgt.e().bit(b)?.mux(&sel.e(), &zero16)?;
        terms.push(m.wire_of(&format!("plane{b}_p"), term)?.e().sext(gw)?);
    }
    let mut psum = terms[0].clone();
    for t in &terms[1..] {
        psum = psum.add(t)?;
    }
    let psum = m.wire_of("psum", psum)?;

    // Group partial sum P (exact: |P| <= L * 128 * 255 fits gpsum_bits).
    let gpsum = m.reg_in("gpsum", "gpsum", Ty::s(gw), Reset::Value(0))?;
    let p_next = m.wire_of("p_next", gpsum.q.e().add(&psum.e())?)?;
    let end = m.wire_of("group_end", valid.e().and(&last.e())?)?;
    let zero_gw = Expr::zero(Ty::s(gw))?;
    m.assign(
        &gpsum.d,
        valid
            .e()
            .mux(&last.e().mux(&zero_gw, &p_next.e())?, &gpsum.q.e())?,
    )?;

    // Phase registers (reset) and the group stage (no reset).
    let pa = m.reg_in("phase", "pha", Ty::bit(), Reset::Value(0))?;
    let pb = m.reg_in("phase", "phb", Ty::bit(), Reset::Value(0))?;
    m.assign(&pa.d, end.e())?;
    m.assign(&pb.d, pa.q.e())?;
    let p_r = m.reg_in("grp", "p", Ty::s(gw), Reset::None)?;
    let s_r = m.reg_in("grp", "s", Ty::s(p.s_bits), Reset::None)?;
    let z_r = m.reg_in("grp", "zero", Ty::u(8), Reset::None)?;
    let gs_r = m.reg_in("grp", "gscale", Ty::u(ws), Reset::None)?;
    let g_r = m.reg_in("grp", "g", Ty::s(gw), Reset::None)?;
    let gs2_r = m.reg_in("grp", "gscale2", Ty::u(ws), Reset::None)?;
    m.assign(&p_r.d, end.e().mux(&p_next.e(), &p_r.q.e())?)?;
    m.assign(&s_r.d, end.e().mux(&gsum.e(), &s_r.q.e())?)?;
    m.assign(&z_r.d, end.e().mux(&zero.e(), &z_r.q.e())?)?;
    m.assign(&gs_r.d, end.e().mux(&gscale.e(), &gs_r.q.e())?)?;

    // The one multiplier: phase A zero_u8 * S, phase B gscale * G.
    let mul_a =
        pb.q.e()
            .mux(&gs2_r.q.e(), &z_r.q.e().zext(ws)?)?
            .zext(ws + 1)?
            .as_signed();
    let mul_b = pb.q.e().mux(&g_r.q.e(), &s_r.q.e().sext(gw)?)?;
    let ma = m.wire_of("mul_a", mul_a)?;
    let mb = m.wire_of("mul_b", mul_b)?;
    // |gscale * G| < 2^(SF + gpsum_bits - 1) and |zero * S| <= L * 128 * 255: the low
    // gpsum_bits + w_scale_bits bits are exact.
    let prod = m.wire_of("prod", ma.e().mul(&mb.e())?.trunc(gw + ws)?)?;
    m.assign(
        &g_r.d,
        pa.q.e()
            .mux(&p_r.q.e().sub(&prod.e().trunc(gw)?)?, &g_r.q.e())?,
    )?;
    m.assign(&gs2_r.d, pa.q.e().mux(&gs_r.q.e(), &gs2_r.q.e())?)?;

    // Saturating accumulate (N13) and drain shift.
    let acc = m.reg("acc", Ty::s(aw), Reset::Value(0))?;
    let sum = m.wire_of(
        "acc_sum",
        acc.q.e().sext(aw + 1)?.add(&prod.e().sext(aw + 1)?)?,
    )?;
    let sat = m.wire_of("acc_sat", sat_to(&sum.e(), aw)?)?;
    m.assign(
        &acc.d,
        shift
            .e()
            .mux(&acc_n.e(), &pb.q.e().mux(&sat.e(), &acc.q.e())?)?,
    )?;
    m.assign(&acc_o, acc.q.e())?;
    Ok(m)
}
