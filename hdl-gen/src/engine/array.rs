//! `tessera_array`: `rows x cols` PEs with both dataflows (docs/engine.md).
//!
//! GEMM (output stationary): the west-edge bundle of row `r` (4 activation lanes, `valid`,
//! `last`, the group sum `S`) is delayed `r` cycles and then moves east one PE per cycle; the
//! north-edge bundle of column `c` (weight byte, `zero_u8`, `gscale`) is delayed `c` cycles and
//! moves south. So PE (r, c) sees beat `i` at cycle `i + r + c`, with matching operands.
//! GEMV (broadcast): every PE takes row 0's west bundle directly (the single token) and its own
//! weight byte and metadata from the `*_d_i` buses (PE `r * cols + c`).
//! Drain: `shift_i` moves every accumulator one row south; row `rows - 1` is `acc_o`.

use super::{EngineParams, Res};
use crate::expr::{Expr, Ty};
use crate::ir::{Module, Reset, Signal};

/// Name of the generated module.
pub const NAME: &str = "tessera_array";

/// West bundle of one row / north bundle of one column, as signals.
struct West {
    act: Expr,
    valid: Expr,
    last: Expr,
    gsum: Expr,
}
struct North {
    wgt: Expr,
    zero: Expr,
    gscale: Expr,
}

/// Builds the array module (needs the PE module to instantiate).
pub fn array(p: &EngineParams, pe_mod: &Module) -> Res<Module> {
    let (rows, cols) = (p.rows, p.cols);
    let ws = p.w_scale_bits;
    let sb = p.s_bits;
    let mf = 8 + ws;
    let mut m = Module::new(NAME)?;
    m.comment(&format!(
        "{rows} x {cols} PE array: GEMM (skewed, output stationary) and GEMV (broadcast)."
    ));
    let clk = m.clock()?;
    let rst = m.reset()?;
    let mode = m.input("mode_i", Ty::u(2))?;
    let gemv = m.input("gemv_i", Ty::bit())?;
    let shift = m.input("shift_i", Ty::bit())?;
    let valid = m.input("valid_i", Ty::bit())?;
    let last = m.input("last_i", Ty::bit())?;
    let act_w = m.input("act_w_i", Ty::u(32 * rows))?;
    let gsum_w = m.input("gsum_w_i", Ty::u(sb * rows))?;
    let wgt_n = m.input("wgt_n_i", Ty::u(8 * cols))?;
    let meta_n = m.input("meta_n_i", Ty::u(mf * cols))?;
    let wgt_d = m.input("wgt_d_i", Ty::u(8 * rows * cols))?;
    let meta_d = m.input("meta_d_i", Ty::u(mf * rows * cols))?;
    let acc_o = m.output("acc_o", Ty::u(p.acc_bits * cols))?;

    // Skew chains: row r delayed r cycles, column c delayed c cycles.
    let mut west = Vec::new();
    for r in 0..rows {
        let mut cur = West {
            act: act_w.e().slice(32 * r + 31, 32 * r)?,
            valid: valid.e(),
            last: last.e(),
            gsum: gsum_w.e().slice(sb * r + sb - 1, sb * r)?.as_signed(),
        };
        for d in 0..r {
            let n = format!("skw_r{r}_{d}");
            let ctl = format!("skw_ctl_r{r}_{d}");
            let dat = format!("skw_dat_r{r}_{d}");
            let a = m.reg_in(&dat, &format!("{n}_act"), Ty::u(32), Reset::None)?;
            let g = m.reg_in(&dat, &format!("{n}_gsum"), Ty::s(sb), Reset::None)?;
            let v = m.reg_in(&ctl, &format!("{n}_valid"), Ty::bit(), Reset::Value(0))?;
            let l = m.reg_in(&ctl, &format!("{n}_last"), Ty::bit(), Reset::Value(0))?;
            m.assign(&a.d, cur.act)?;
            m.assign(&g.d, cur.gsum)?;
            m.assign(&v.d, cur.valid)?;
            m.assign(&l.d, cur.last)?;
            cur = West {
                act: a.q.e(),
                valid: v.q.e(),
                last: l.q.e(),
                gsum: g.q.e(),
            };
        }
        west.push(cur);
    }
    let mut north = Vec::new();
    for c in 0..cols {
        let f = meta_n.e().slice(mf * c + mf - 1, mf * c)?;
        let mut cur = North {
            wgt: wgt_n.e().slice(8 * c + 7, 8 * c)?,
            zero: f.slice(7, 0)?,
            gscale: f.slice(mf - 1, 8)?,
        };
        for d in 0..c {
            let n = format!("skw_c{c}_{d}");
            let grp = format!("skw_dat_c{c}_{d}");
            let w = m.reg_in(&grp, &format!("{n}_wgt"), Ty::u(8), Reset::None)?;
            let z = m.reg_in(&grp, &format!("{n}_zero"), Ty::u(8), Reset::None)?;
            let s = m.reg_in(&grp, &format!("{n}_gscale"), Ty::u(ws), Reset::None)?;
            m.assign(&w.d, cur.wgt)?;
            m.assign(&z.d, cur.zero)?;
            m.assign(&s.d, cur.gscale)?;
            cur = North {
                wgt: w.q.e(),
                zero: z.q.e(),
                gscale: s.q.e(),
            };
        }
        north.push(cur);
    }

    // PE grid. east[r][c] / south[r][c] are PE (r, c)'s forwarded outputs.
    let bcast = West {
        act: act_w.e().slice(31, 0)?,
        valid: valid.e(),
        last: last.e(),
        gsum: gsum_w.e().slice(sb - 1, 0)?.as_signed(),
    };
    let mut east: Vec<Vec<(Signal, Signal, Signal, Signal)>> = Vec::new();
    let mut south: Vec<Vec<(Signal, Signal, Signal)>> = Vec::new();
    let mut accs: Vec<Vec<Signal>> = Vec::new();
    let mut unused: Vec<Expr> = Vec::new();
    for r in 0..rows {
        let mut erow = Vec::new();
        let mut srow = Vec::new();
        let mut arow = Vec::new();
        for c in 0..cols {
            let t = format!("r{r}_c{c}");
            let g = gemv.e();
            let (wa, wv, wl, wg) = if c == 0 {
                let w = &west[r as usize];
                (
                    w.act.clone(),
                    w.valid.clone(),
                    w.last.clone(),
                    w.gsum.clone(),
                )
            } else {
                let e: &(Signal, Signal, Signal, Signal) = &erow[c as usize - 1];
                (e.0.e(), e.1.e(), e.2.e(), e.3.e())
            };
            let (nw, nz, ns) = if r == 0 {
                let n = &north[c as usize];
                (n.wgt.clone(), n.zero.clone(), n.gscale.clone())
            } else {
                let s = &south[r as usize - 1][c as usize];
                (s.0.e(), s.1.e(), s.2.e())
            };
            let idx = r * cols + c;
            let df = meta_d.e().slice(mf * idx + mf - 1, mf * idx)?;
            let in_act = m.wire_of(&format!("in_act_{t}"), g.mux(&bcast.act, &wa)?)?;
            let in_v = m.wire_of(&format!("in_valid_{t}"), g.mux(&bcast.valid, &wv)?)?;
            let in_l = m.wire_of(&format!("in_last_{t}"), g.mux(&bcast.last, &wl)?)?;
            let in_g = m.wire_of(&format!("in_gsum_{t}"), g.mux(&bcast.gsum, &wg)?)?;
            let dw = wgt_d.e().slice(8 * idx + 7, 8 * idx)?;
            let in_w = m.wire_of(&format!("in_wgt_{t}"), g.mux(&dw, &nw)?)?;
            let in_z = m.wire_of(&format!("in_zero_{t}"), g.mux(&df.slice(7, 0)?, &nz)?)?;
            let in_s = m.wire_of(
                &format!("in_gscale_{t}"),
                g.mux(&df.slice(mf - 1, 8)?, &ns)?,
            )?;
            let eo = (
                m.wire(&format!("act_{t}"), Ty::u(32))?,
                m.wire(&format!("valid_{t}"), Ty::bit())?,
                m.wire(&format!("last_{t}"), Ty::bit())?,
                m.wire(&format!("gsum_{t}"), Ty::s(sb))?,
            );
            let so = (
                m.wire(&format!("wgt_{t}"), Ty::u(8))?,
                m.wire(&format!("zero_{t}"), Ty::u(8))?,
                m.wire(&format!("gscale_{t}"), Ty::u(ws))?,
            );
            let acc = m.wire(&format!("acc_{t}"), Ty::s(p.acc_bits))?;
            let acc_n = if r == 0 {
                Expr::zero(Ty::s(p.acc_bits))?
            } else {
                accs[r as usize - 1][c as usize].e()
            };
            m.instance(
                &format!("u_pe_{t}"),
                pe_mod,
                &[
                    ("clk_i", clk.e()),
                    ("rst_ni", rst.e()),
                    ("mode_i", mode.e()),
                    ("shift_i", shift.e()),
                    ("acc_n_i", acc_n),
                    ("act_i", in_act.e()),
                    ("valid_i", in_v.e()),
                    ("last_i", in_l.e()),
                    ("gsum_i", in_g.e()),
                    ("wgt_i", in_w.e()),
                    ("zero_i", in_z.e()),
                    ("gscale_i", in_s.e()),
                    ("act_o", eo.0.e()),
                    ("valid_o", eo.1.e()),
                    ("last_o", eo.2.e()),
                    ("gsum_o", eo.3.e()),
                    ("wgt_o", so.0.e()),
                    ("zero_o", so.1.e()),
                    ("gscale_o", so.2.e()),
                    ("acc_o", acc.e()),
                ],
            )?;
            if c + 1 == cols {
                unused.extend([eo.0.e(), eo.1.e(), eo.2.e(), eo.3.e().as_unsigned()]);
            }
            if r + 1 == rows {
                unused.extend([so.0.e(), so.1.e(), so.2.e()]);
            }
            erow.push(eo);
            srow.push(so);
            arow.push(acc);
        }
        east.push(erow);
        south.push(srow);
        accs.push(arow);
    }
    // The east and south edges leave the array unused (Verilator's *unused* convention).
    m.wire_of("edge_unused", Expr::concat(&unused)?)?;
    let mut bottom: Vec<Expr> = accs[rows as usize - 1]
        .iter()
        .map(|a| a.e().as_unsigned())
        .collect();
    bottom.reverse();
    m.assign(&acc_o, Expr::concat(&bottom)?)?;
    Ok(m)
}
