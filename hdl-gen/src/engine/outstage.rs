//! `tessera_outstage`: the N14 output stage of one array column, two pipeline stages:
//! `prod = acc * out_mult` (exact), then `y = sat(round_shift(prod, out_shift), out_bits)` with
//! N2's rounding (`+ 2^(s-1) - [prod < 0]`, then an arithmetic shift), sign-extended to 32 bits.

use super::pe::sat_to;
use super::{EngineParams, Res};
use crate::expr::{Expr, Ty};
use crate::ir::{Module, Reset};

/// Name of the generated module.
pub const NAME: &str = "tessera_outstage";

/// Builds the output-stage module.
pub fn outstage(p: &EngineParams) -> Res<Module> {
    let mut m = Module::new(NAME)?;
    m.comment("Output stage (N14): y = sat(round_shift(acc * out_mult, out_shift), out_bits).");
    m.comment("Latency 2 cycles; out_bits code 0 = 8, 1 = 16, 2 (and 3) = 32.");
    m.clock()?;
    m.reset()?;
    let aw = p.acc_bits;
    let acc = m.input("acc_i", Ty::s(aw))?;
    let valid = m.input("valid_i", Ty::bit())?;
    let mult = m.input("mult_i", Ty::u(16))?;
    let shift = m.input("shift_i", Ty::u(6))?;
    let bits = m.input("bits_i", Ty::u(2))?;
    let y_o = m.output("y_o", Ty::s(32))?;
    let valid_o = m.output("valid_o", Ty::bit())?;

    let pw = aw + 17;
    let v1 = m.reg_in("ctl", "v1", Ty::bit(), Reset::Value(0))?;
    let v2 = m.reg_in("ctl", "v2", Ty::bit(), Reset::Value(0))?;
    m.assign(&v1.d, valid.e())?;
    m.assign(&v2.d, v1.q.e())?;
    let prod = m.reg_in("st1", "prod", Ty::s(pw), Reset::None)?;
    let sh1 = m.reg_in("st1", "sh1", Ty::u(6), Reset::None)?;
    let bits1 = m.reg_in("st1", "bits1", Ty::u(2), Reset::None)?;
    m.assign(&prod.d, acc.e().mul(&mult.e().zext(17)?.as_signed())?)?;
    m.assign(&sh1.d, shift.e())?;
    m.assign(&bits1.d, bits.e())?;

    // N2: bias = 2^(s-1) - [x < 0] for s >= 1, 0 for s = 0.
    // Wide enough for the product plus the bias 2^61 (out_shift <= 62).
    let w = (pw + 1).max(64);
    let x = prod.q.e().sext(w)?;
    let one = Expr::uconst(w, 1)?;
    let half = m.wire_of("half", one.shl_by(&sh1.q.e())?.shr(1)?)?;
    let nz = sh1.q.e().ne(&Expr::zero(Ty::u(6))?)?;
    let neg = m.wire_of("neg", prod.q.e().msb().and(&nz)?)?;
    let biased = x
        .add(&half.e().as_signed())?
        .sub(&neg.e().zext(w)?.as_signed())?;
    let biased = m.wire_of("biased", biased)?;
    let shifted = m.wire_of("shifted", biased.e().sra_by(&sh1.q.e())?)?;
    let y8 = sat_to(&shifted.e(), 8)?.sext(32)?;
    let y16 = sat_to(&shifted.e(), 16)?.sext(32)?;
    let y32 = sat_to(&shifted.e(), 32)?;
    let b0 = bits1.q.e().eq(&Expr::uconst(2, 0)?)?;
    let b1 = bits1.q.e().eq(&Expr::uconst(2, 1)?)?;
    let y = b0.mux(&y8, &b1.mux(&y16, &y32)?)?;
    let yr = m.reg_in("st2", "y", Ty::s(32), Reset::None)?;
    m.assign(&yr.d, y)?;
    m.assign(&y_o, yr.q.e())?;
    m.assign(&valid_o, v2.q.e())?;
    Ok(m)
}
