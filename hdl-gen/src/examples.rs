//! Small example modules built with the IR. They document how the IR is
//! meant to be used and are linted and synthesized by the crate's tests.

use crate::error::HdlError;
use crate::expr::{Expr, Ty};
use crate::ir::{addr_width, Design, Module, RamStyle, Reset};

type Res<T> = Result<T, HdlError>;

/// `counter`: a `width`-bit counter with enable and synchronous reset.
pub fn counter(width: u32) -> Res<Module> {
    let mut m = Module::new("counter")?;
    m.comment(&format!("{width}-bit up counter with enable"));
    let w = m.param("WIDTH", i64::from(width))?;
    m.clock()?;
    m.reset()?;
    let en = m.input("en_i", Ty::bit())?;
    let count_o = m.output("count_o", Ty::u(width))?;
    let count = m.reg("count", w.u(), Reset::Value(0))?;
    let one = Expr::uconst(width, 1)?;
    let next = en.e().mux(&count.q.e().add(&one)?, &count.q.e())?;
    m.assign(&count.d, next)?;
    m.assign(&count_o, count.q.e())?;
    Ok(m)
}

/// `mac`: signed `in_bits` x `in_bits` multiply-accumulate with a
/// saturating `acc_bits` accumulator (one product register stage), a sticky
/// saturation flag and an arithmetic-right-shifted output.
pub fn mac(in_bits: u32, acc_bits: u32) -> Res<Module> {
    if acc_bits <= 2 * in_bits {
        return Err(HdlError::new("mac: acc_bits must exceed the product width"));
    }
    let mut m = Module::new("mac")?;
    m.clock()?;
    m.reset()?;
    let a = m.input("a_i", Ty::s(in_bits))?;
    let b = m.input("b_i", Ty::s(in_bits))?;
    let valid = m.input("valid_i", Ty::bit())?;
    let clear = m.input("clear_i", Ty::bit())?;
    let shift_w = addr_width(acc_bits);
    let shift = m.input("shift_i", Ty::u(shift_w))?;
    let acc_o = m.output("acc_o", Ty::s(acc_bits))?;
    let scaled_o = m.output("scaled_o", Ty::s(acc_bits))?;
    let sat_o = m.output("sat_o", Ty::bit())?;

    // Product stage: no reset, so it can live in the DSP's M register.
    let prod = m.reg_in("pipe", "prod", Ty::s(2 * in_bits), Reset::None)?;
    m.assign(&prod.d, a.e().mul(&b.e())?)?;
    // Control pipeline with reset.
    let pvalid = m.reg_in("ctrl", "pvalid", Ty::bit(), Reset::Value(0))?;
    let pclear = m.reg_in("ctrl", "pclear", Ty::bit(), Reset::Value(0))?;
    m.assign(&pvalid.d, valid.e())?;
    m.assign(&pclear.d, clear.e())?;

    let acc = m.reg_in("acc", "acc", Ty::s(acc_bits), Reset::Value(0))?;
    let sat = m.reg_in("acc", "sat", Ty::bit(), Reset::Value(0))?;
    let wide = acc_bits + 1;
    let sum = m.wire_of("sum", acc.q.e().sext(wide)?.add(&prod.q.e().sext(wide)?)?)?;
    let max = (1i128 << (acc_bits - 1)) - 1;
    let min = -(1i128 << (acc_bits - 1));
    let over = m.wire_of("over", sum.e().gt(&Expr::sconst(wide, max)?)?)?;
    let under = m.wire_of("under", sum.e().lt(&Expr::sconst(wide, min)?)?)?;
    let clipped = over.e().mux(
        &Expr::sconst(acc_bits, max)?,
        &under
            .e()
            .mux(&Expr::sconst(acc_bits, min)?, &sum.e().trunc(acc_bits)?)?,
    )?;
    let zero = Expr::zero(Ty::s(acc_bits))?;
    let acc_next = pclear
        .q
        .e()
        .mux(&zero, &pvalid.q.e().mux(&clipped, &acc.q.e())?)?;
    m.assign(&acc.d, acc_next)?;
    let hit = pvalid.q.e().and(&over.e().or(&under.e())?)?;
    let sat_next = pclear
        .q
        .e()
        .mux(&Expr::zero(Ty::bit())?, &sat.q.e().or(&hit)?)?;
    m.assign(&sat.d, sat_next)?;

    m.assign(&acc_o, acc.q.e())?;
    m.assign(&scaled_o, acc.q.e().sra_by(&shift.e())?)?;
    m.assign(&sat_o, sat.q.e())?;
    Ok(m)
}

/// `pe`: systolic cell that forwards `a` east and `b` south through
/// registers and accumulates `a*b` (wrapping) into `acc_bits` bits.
pub fn pe(in_bits: u32, acc_bits: u32) -> Res<Module> {
    let mut m = Module::new("pe")?;
    m.clock()?;
    m.reset()?;
    let a = m.input("a_i", Ty::s(in_bits))?;
    let b = m.input("b_i", Ty::s(in_bits))?;
    let a_o = m.output("a_o", Ty::s(in_bits))?;
    let b_o = m.output("b_o", Ty::s(in_bits))?;
    let acc_o = m.output("acc_o", Ty::s(acc_bits))?;
    let a_r = m.reg_in("fwd", "a", Ty::s(in_bits), Reset::Value(0))?;
    let b_r = m.reg_in("fwd", "b", Ty::s(in_bits), Reset::Value(0))?;
    let acc = m.reg("acc", Ty::s(acc_bits), Reset::Value(0))?;
    m.assign(&a_r.d, a.e())?;
    m.assign(&b_r.d, b.e())?;
    let p = a.e().mul(&b.e())?.sext(acc_bits)?;
    m.assign(&acc.d, acc.q.e().add(&p)?)?;
    m.assign(&a_o, a_r.q.e())?;
    m.assign(&b_o, b_r.q.e())?;
    m.assign(&acc_o, acc.q.e())?;
    Ok(m)
}

/// `mesh`: `rows` x `cols` array of [`pe`] instances `u_pe_r<r>_c<c>`;
/// `a` enters on the west edge (one port per row), `b` on the north edge,
/// all accumulators are concatenated on `acc_o` (row-major, PE (0,0) in the
/// low bits). Returns the design (mesh + pe) with `mesh` as top.
pub fn mesh(rows: u32, cols: u32, in_bits: u32, acc_bits: u32) -> Res<Design> {
    let cell = pe(in_bits, acc_bits)?;
    let mut m = Module::new("mesh")?;
    m.comment(&format!("{rows}x{cols} mesh of pe"));
    let clk = m.clock()?;
    let rst = m.reset()?;
    let s = Ty::s(in_bits);
    // a[r][c] is the value entering PE (r,c) from the west; c == cols is the east edge.
    let mut a = Vec::new();
    for r in 0..rows {
        let mut row = vec![m.input(&format!("a_r{r}_i"), s)?];
        for c in 1..=cols {
            row.push(m.wire(&format!("a_r{r}_c{c}"), s)?);
        }
        a.push(row);
    }
    let mut b = Vec::new();
    for c in 0..cols {
        let mut col = vec![m.input(&format!("b_c{c}_i"), s)?];
        for r in 1..=rows {
            col.push(m.wire(&format!("b_r{r}_c{c}"), s)?);
        }
        b.push(col);
    }
    let mut accs = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            let acc = m.wire(&format!("acc_r{r}_c{c}"), Ty::s(acc_bits))?;
            m.instance(
                &format!("u_pe_r{r}_c{c}"),
                &cell,
                &[
                    ("clk_i", clk.e()),
                    ("rst_ni", rst.e()),
                    ("a_i", a[r as usize][c as usize].e()),
                    ("b_i", b[c as usize][r as usize].e()),
                    ("a_o", a[r as usize][c as usize + 1].e()),
                    ("b_o", b[c as usize][r as usize + 1].e()),
                    ("acc_o", acc.e()),
                ],
            )?;
            accs.push(acc.e());
        }
    }
    let east = m.output("a_east_o", Ty::u(in_bits * rows))?;
    let south = m.output("b_south_o", Ty::u(in_bits * cols))?;
    let acc_o = m.output("acc_o", Ty::u(acc_bits * rows * cols))?;
    let east_parts: Vec<Expr> = a.iter().rev().map(|row| row[cols as usize].e()).collect();
    let south_parts: Vec<Expr> = b.iter().rev().map(|col| col[rows as usize].e()).collect();
    accs.reverse();
    m.assign(&east, Expr::concat(&east_parts)?)?;
    m.assign(&south, Expr::concat(&south_parts)?)?;
    m.assign(&acc_o, Expr::concat(&accs)?)?;
    let mut d = Design::new("mesh");
    d.add(cell)?;
    d.add(m)?;
    Ok(d)
}

/// `ram_sdp`: simple dual-port RAM wrapper (one write, one registered read).
pub fn ram_sdp(depth: u32, width: u32, style: RamStyle) -> Res<Module> {
    let mut m = Module::new("ram_sdp")?;
    m.clock()?;
    let aw = addr_width(depth);
    let we = m.input("we_i", Ty::bit())?;
    let waddr = m.input("waddr_i", Ty::u(aw))?;
    let wdata = m.input("wdata_i", Ty::u(width))?;
    let raddr = m.input("raddr_i", Ty::u(aw))?;
    let rdata = m.output("rdata_o", Ty::u(width))?;
    let ram = m.ram("store", depth, width, style)?;
    m.assign(&ram.we, we.e())?;
    m.assign(&ram.waddr, waddr.e())?;
    m.assign(&ram.wdata, wdata.e())?;
    m.assign(&ram.raddr, raddr.e())?;
    m.assign(&rdata, ram.rdata.e())?;
    Ok(m)
}

/// `ops`: one module that uses every expression form, including part-selects
/// of expressions (printer temporaries), to prove the printer lint-clean.
pub fn ops() -> Res<Module> {
    let mut m = Module::new("ops")?;
    let a = m.input("a_i", Ty::u(8))?;
    let b = m.input("b_i", Ty::u(8))?;
    let x = m.input("x_i", Ty::s(8))?;
    let y = m.input("y_i", Ty::s(8))?;
    let sh = m.input("sh_i", Ty::u(3))?;
    let (a, b, x, y, sh) = (a.e(), b.e(), x.e(), y.e(), sh.e());

    let mut outs: Vec<(&str, Expr)> = vec![
        ("add_o", a.add(&b)?),
        ("sub_o", x.sub(&y)?),
        ("addw_o", a.add_wide(&b)?),
        ("subw_o", x.sub_wide(&y)?),
        ("umul_o", a.mul(&b)?),
        ("smul_o", x.mul(&y)?),
        ("bits_o", a.and(&b)?.or(&a.xor(&b)?)?.not()),
        (
            "cmp_o",
            Expr::concat(&[
                a.eq(&b)?,
                a.ne(&b)?,
                a.lt(&b)?,
                a.le(&b)?,
                x.gt(&y)?,
                x.ge(&y)?,
                x.lt(&y)?,
                a.as_signed().lt(&b.as_signed())?,
            ])?,
        ),
        (
            "red_o",
            Expr::concat(&[a.reduce_and(), a.reduce_or(), b.reduce_xor()])?,
        ),
        ("mux_o", a.lt(&b)?.mux(&x, &y)?),
        (
            "shc_o",
            Expr::concat(&[a.shl(3)?, a.shr(2)?, x.sra(5)?.as_unsigned()])?,
        ),
        (
            "shv_o",
            Expr::concat(&[a.shl_by(&sh)?, b.shr_by(&sh)?, y.sra_by(&sh)?.as_unsigned()])?,
        ),
        (
            "ext_o",
            Expr::concat(&[
                a.zext(12)?,
                x.sext(12)?.as_unsigned(),
                x.bit(7)?.sext(4)?.as_unsigned(),
            ])?,
        ),
        ("rep_o", a.slice(3, 0)?.repeat(3)?),
        // Part-selects of expressions: upper bits of a sum and of a product,
        // a bit of a shifted value, and sign extension of an expression.
        (
            "hi_o",
            Expr::concat(&[
                a.add_wide(&b)?.slice(8, 1)?,
                x.mul(&y)?.slice(15, 8)?,
                a.shr_by(&sh)?.bit(0)?,
                x.add(&y)?.sext(10)?.as_unsigned(),
            ])?,
        ),
        (
            "const_o",
            Expr::concat(&[
                Expr::uconst(4, 0xa)?,
                Expr::sconst(6, -3)?,
                Expr::uconst(1, 1)?,
            ])?,
        ),
    ];
    // Mixed-sign trap: an arithmetic shift inside an unsigned addition must
    // stay arithmetic.
    outs.push(("trap_o", x.sra_by(&sh)?.as_unsigned().add(&a)?));
    for (name, e) in outs {
        let o = m.output(name, e.ty())?;
        m.assign(&o, e)?;
    }
    Ok(m)
}

/// Wrap one module as a design with itself as top.
pub fn single(m: Module) -> Res<Design> {
    let mut d = Design::new(m.name());
    d.add(m)?;
    Ok(d)
}
