//! `tessera_engine`: the top. Command decoder and controller FSM, the four buffers as inferred
//! RAMs, the beat feeder (buffer reads, lane select, `k` masking, group sums `S`), the GEMV
//! stream stager, `cols` output stages and the drain to `dout` (docs/engine.md).

use super::{EngineParams, Res};
use crate::expr::{Expr, Ty};
use crate::ir::{addr_width, Module, RamStyle, Reset, Signal};
use tessera_golden::config::WeightMode;
use tessera_golden::engine::{field, mode_code, opcode, Field};

/// Name of the generated module.
pub const NAME: &str = "tessera_engine";

/// Controller states (`state_q`).
pub mod state {
    pub const IDLE: u128 = 0;
    pub const LOAD: u128 = 1;
    pub const RUN: u128 = 2;
    pub const FLUSH: u128 = 3;
    pub const STORE: u128 = 4;
    pub const DRAIN: u128 = 5;
}

fn c(w: u32, v: u128) -> Res<Expr> {
    Expr::uconst(w, v)
}

fn eqc(e: &Expr, v: u128) -> Res<Expr> {
    e.eq(&c(e.width(), v)?)
}

/// Priority mux: the first true condition wins, else `default`.
fn pmux(default: Expr, arms: &[(Expr, Expr)]) -> Res<Expr> {
    let mut e = default;
    for (cond, v) in arms.iter().rev() {
        e = cond.mux(v, &e)?;
    }
    Ok(e)
}

fn and(a: &Expr, b: &Expr) -> Res<Expr> {
    a.and(b)
}

/// Resize an unsigned value to `w` bits (truncate or zero-extend).
fn fit(e: &Expr, w: u32) -> Res<Expr> {
    if e.width() >= w {
        e.trunc(w)
    } else {
        e.zext(w)
    }
}

fn fld(cmd: &Signal, f: Field) -> Res<Expr> {
    cmd.e().slice(f.hi(), f.lo)
}

/// Builds the top module (needs the array and output-stage modules to instantiate).
pub fn top(p: &EngineParams, array_mod: &Module, os_mod: &Module) -> Res<Module> {
    let (rows, cols) = (p.rows, p.cols);
    let lay = &p.layout;
    let sbits = lay.stream_bits;
    let mf = lay.meta_field_bits;
    let l = p.group_len;
    let lg_l = l.trailing_zeros();
    let mut m = Module::new(NAME)?;
    m.comment("Engine top: command stream -> controller; din -> buffers / GEMV stager;");
    m.comment("array -> output stages -> output buffer -> dout. See docs/engine.md.");
    let clk = m.clock()?;
    let rst = m.reset()?;
    let cmd_valid = m.input("cmd_valid_i", Ty::bit())?;
    let cmd = m.input("cmd_data_i", Ty::u(64))?;
    let cmd_ready = m.output("cmd_ready_o", Ty::bit())?;
    let din_valid = m.input("din_valid_i", Ty::bit())?;
    let din = m.input("din_data_i", Ty::u(sbits))?;
    let din_ready = m.output("din_ready_o", Ty::bit())?;
    let dout_valid = m.output("dout_valid_o", Ty::bit())?;
    let dout = m.output("dout_data_o", Ty::u(sbits))?;
    let dout_ready = m.input("dout_ready_i", Ty::bit())?;
    let busy_o = m.output("busy_o", Ty::bit())?;
    let err_o = m.output("err_o", Ty::bit())?;

    // ---- controller registers ----
    let st = m.reg_in("ctl", "state", Ty::u(3), Reset::Value(0))?;
    let err = m.reg_in("ctl", "err", Ty::bit(), Reset::Value(0))?;
    let op = m.reg_in("ctl", "op", Ty::u(2), Reset::Value(0))?;
    let ptr = m.reg_in("ctl", "ptr", Ty::u(21), Reset::Value(0))?;
    let cnt = m.reg_in("ctl", "cnt", Ty::u(21), Reset::Value(0))?;
    let ww = addr_width(lay.slot_words() + 1);
    let wcnt = m.reg_in("ctl", "wcnt", Ty::u(ww), Reset::Value(0))?;
    let gph = m.reg_in("ctl", "gph", Ty::bit(), Reset::Value(0))?;
    let bi = m.reg_in("ctl", "beat", Ty::u(22), Reset::Value(0))?;
    let bgw = addr_width(l + 1);
    let bg = m.reg_in("ctl", "bg", Ty::u(bgw), Reset::Value(0))?;
    let grp = m.reg_in("ctl", "grp", Ty::u(21), Reset::Value(0))?;
    let groups = m.reg_in("ctl", "groups", Ty::u(21), Reset::Value(0))?;
    let kq = m.reg_in("ctl", "k", Ty::u(21), Reset::Value(0))?;
    let mode = m.reg_in("ctl", "mode", Ty::u(2), Reset::Value(0))?;
    let gemv = m.reg_in("ctl", "gemv", Ty::bit(), Reset::Value(0))?;
    let keep = m.reg_in("ctl", "keep", Ty::bit(), Reset::Value(0))?;
    let oaddr = m.reg_in("ctl", "out_addr", Ty::u(20), Reset::Value(0))?;
    let tmr = m.reg_in("ctl", "tmr", Ty::u(8), Reset::Value(0))?;
    let abase = m.reg_in("ctl", "act_base", Ty::u(20), Reset::Value(0))?;
    let wbase = m.reg_in("ctl", "wgt_base", Ty::u(20), Reset::Value(0))?;
    let mbase = m.reg_in("ctl", "meta_base", Ty::u(20), Reset::Value(0))?;
    let omult = m.reg_in("ctl", "out_mult", Ty::u(16), Reset::Value(1))?;
    let oshift = m.reg_in("ctl", "out_shift", Ty::u(6), Reset::Value(0))?;
    let obits = m.reg_in("ctl", "out_bits", Ty::u(2), Reset::Value(2))?;

    let s = st.q.e();
    let in_idle = m.wire_of("in_idle", eqc(&s, state::IDLE)?)?.e();
    let in_load = m.wire_of("in_load", eqc(&s, state::LOAD)?)?.e();
    let in_run = m.wire_of("in_run", eqc(&s, state::RUN)?)?.e();
    let in_flush = m.wire_of("in_flush", eqc(&s, state::FLUSH)?)?.e();
    let in_store = m.wire_of("in_store", eqc(&s, state::STORE)?)?.e();
    let in_drain = m.wire_of("in_drain", eqc(&s, state::DRAIN)?)?.e();

    // ---- command decode ----
    m.assign(&cmd_ready, in_idle.clone())?;
    let accept = m.wire_of("accept", cmd_valid.e().and(&in_idle)?)?.e();
    let opc = m.wire_of("opc", fld(&cmd, field::OPCODE)?)?.e();
    let is_op = |o: u64| eqc(&opc, u128::from(o));
    let f_addr = fld(&cmd, field::ADDR)?;
    let f_count = fld(&cmd, field::COUNT)?;
    let f_mode = fld(&cmd, field::MODE)?;
    let f_k = fld(&cmd, field::K)?;
    let count_nz = f_count.ne(&Expr::zero(Ty::u(21))?)?;
    let is_load = is_op(opcode::LOAD_ACT)?
        .or(&is_op(opcode::LOAD_WGT)?)?
        .or(&is_op(opcode::LOAD_META)?)?
        .or(&is_op(opcode::LOAD_FOLD)?)?;
    let acc_load = m
        .wire_of("acc_load", and(&accept, &and(&is_load, &count_nz)?)?)?
        .e();
    let acc_drain = m
        .wire_of(
            "acc_drain",
            and(&accept, &and(&is_op(opcode::DRAIN)?, &count_nz)?)?,
        )?
        .e();
    // Supported modes: W2 and W4 always (validated), W8 and ternary per config.
    let mut mode_ok = eqc(&f_mode, u128::from(mode_code(WeightMode::W2)))?
        .or(&eqc(&f_mode, u128::from(mode_code(WeightMode::W4)))?)?;
    for md in [WeightMode::W8, WeightMode::Ternary] {
        if p.modes().contains(&md) {
            mode_ok = mode_ok.or(&eqc(&f_mode, u128::from(mode_code(md)))?)?;
        }
    }
    let k_nz = f_k.ne(&Expr::zero(Ty::u(21))?)?;
    // The fold (N17) is a GEMV feature: one folded token, one Z for every output.
    let fold_gemm = and(&fld(&cmd, field::FOLD)?, &fld(&cmd, field::DATAFLOW)?.not())?;
    let run_ok = m
        .wire_of("run_ok", and(&and(&mode_ok, &k_nz)?, &fold_gemm.not())?)?
        .e();
    let is_run = is_op(opcode::RUN)?;
    let acc_run = m
        .wire_of("acc_run", and(&accept, &and(&is_run, &run_ok)?)?)?
        .e();
    let bad = is_run
        .and(&run_ok.not())?
        .or(&opc.gt(&c(4, u128::from(opcode::LOAD_FOLD))?)?)?;
    m.assign(&err.d, err.q.e().or(&and(&accept, &bad)?)?)?;
    m.assign(&err_o, err.q.e())?;
    m.assign(&busy_o, in_idle.not())?;

    let set_base = and(&accept, &is_op(opcode::SET_BASE)?)?;
    let set_out = and(&accept, &is_op(opcode::SET_OUT)?)?;
    for (r, f) in [
        (&abase, field::ACT_BASE),
        (&wbase, field::WGT_BASE),
        (&mbase, field::META_BASE),
    ] {
        m.assign(&r.d, set_base.mux(&fld(&cmd, f)?, &r.q.e())?)?;
    }
    for (r, f) in [
        (&omult, field::OUT_MULT),
        (&oshift, field::OUT_SHIFT),
        (&obits, field::OUT_BITS),
    ] {
        m.assign(&r.d, set_out.mux(&fld(&cmd, f)?, &r.q.e())?)?;
    }
    m.assign(&mode.d, acc_run.mux(&f_mode, &mode.q.e())?)?;
    m.assign(
        &gemv.d,
        acc_run.mux(&fld(&cmd, field::DATAFLOW)?, &gemv.q.e())?,
    )?;
    m.assign(&keep.d, acc_run.mux(&fld(&cmd, field::KEEP)?, &keep.q.e())?)?;
    let foldq = m.reg_in("ctl", "fold", Ty::bit(), Reset::Value(0))?;
    m.assign(
        &foldq.d,
        acc_run.mux(&fld(&cmd, field::FOLD)?, &foldq.q.e())?,
    )?;
    m.assign(&kq.d, acc_run.mux(&f_k, &kq.q.e())?)?;
    m.assign(
        &oaddr.d,
        acc_run.mux(&fld(&cmd, field::OUT_ADDR)?, &oaddr.q.e())?,
    )?;
    // groups = ceil(k / L)
    let k_up = f_k.zext(22)?.add(&c(22, u128::from(l - 1))?)?;
    let ngroups = fit(&k_up.shr(lg_l)?, 21)?;
    m.assign(&groups.d, acc_run.mux(&ngroups, &groups.q.e())?)?;

    // ---- mode decode of the running tile ----
    let md = mode.q.e();
    let r_w4 = m
        .wire_of("run_w4", eqc(&md, u128::from(mode_code(WeightMode::W4)))?)?
        .e();
    let r_w8 = if p.modes().contains(&WeightMode::W8) {
        m.wire_of("run_w8", eqc(&md, u128::from(mode_code(WeightMode::W8)))?)?
            .e()
    } else {
        c(1, 0)?
    };
    // beats per group - 1, per mode
    let bpg_m1 = |bits: u32| c(bgw, u128::from(l * bits / 8 - 1));
    let bpg_last = r_w8.mux(&bpg_m1(8)?, &r_w4.mux(&bpg_m1(4)?, &bpg_m1(2)?)?)?;
    let last_in_group = m.wire_of("last_in_group", bg.q.e().eq(&bpg_last)?)?.e();
    let last_group = grp.q.e().eq(&groups.q.e().sub(&c(21, 1)?)?)?;
    let last_beat = m
        .wire_of("last_beat", and(&last_in_group, &last_group)?)?
        .e();

    // ---- din, slots ----
    let run_gemv = and(&in_run, &gemv.q.e())?;
    m.assign(&din_ready, in_load.or(&run_gemv)?)?;
    let hs = m
        .wire_of("din_hs", din_valid.e().and(&in_load.or(&run_gemv)?)?)?
        .e();
    let ns = lay.slot_words();
    let mut view_parts = Vec::new();
    for w in 0..ns {
        let slot = m.reg_in("slots", &format!("slot{w}"), Ty::u(sbits), Reset::None)?;
        let here = eqc(&wcnt.q.e(), u128::from(w))?;
        m.assign(&slot.d, and(&hs, &here)?.mux(&din.e(), &slot.q.e())?)?;
        view_parts.push(here.mux(&din.e(), &slot.q.e())?);
    }
    view_parts.reverse();
    let view = m.wire_of("view", Expr::concat(&view_parts)?)?;
    let view_used = (mf * rows * cols).max(8 * rows * cols);
    if ns * sbits > view_used {
        m.wire_of("view_unused", view.e().slice(ns * sbits - 1, view_used)?)?;
    }
    let wpe_last = |n: u32| eqc(&wcnt.q.e(), u128::from(n - 1));
    let load_last = pmux(
        wpe_last(1)?,
        &[
            (eqc(&op.q.e(), 2)?, wpe_last(lay.wgt_words)?),
            (eqc(&op.q.e(), 3)?, wpe_last(lay.meta_words)?),
        ],
    )?;
    let ent = m
        .wire_of("ent", and(&and(&hs, &in_load)?, &load_last)?)?
        .e();
    let gemv_meta_done = m
        .wire_of(
            "gemv_meta_done",
            and(
                &and(&hs, &in_run)?,
                &and(&gph.q.e().not(), &wpe_last(lay.gemv_meta_words)?)?,
            )?,
        )?
        .e();
    let gemv_issue = m
        .wire_of(
            "gemv_issue",
            and(
                &and(&hs, &in_run)?,
                &and(&gph.q.e(), &wpe_last(lay.gemv_beat_words)?)?,
            )?,
        )?
        .e();
    let word_done = ent.or(&gemv_meta_done)?.or(&gemv_issue)?;
    let zw = Expr::zero(Ty::u(ww))?;
    m.assign(
        &wcnt.d,
        pmux(
            wcnt.q.e(),
            &[
                (accept.clone(), zw.clone()),
                (word_done, zw),
                (hs.clone(), wcnt.q.e().add(&c(ww, 1)?)?),
            ],
        )?,
    )?;
    let gmeta = m.reg("gmeta", Ty::u(mf * rows * cols), Reset::None)?;
    m.assign(
        &gmeta.d,
        gemv_meta_done.mux(&view.e().slice(mf * rows * cols - 1, 0)?, &gmeta.q.e())?,
    )?;
    let gbeat = m.reg("gbeat", Ty::u(8 * rows * cols), Reset::None)?;
    m.assign(
        &gbeat.d,
        gemv_issue.mux(&view.e().slice(8 * rows * cols - 1, 0)?, &gbeat.q.e())?,
    )?;

    // ---- beat issue and counters ----
    let gemm_issue = and(&in_run, &gemv.q.e().not())?;
    let issue = m.wire_of("issue", gemm_issue.or(&gemv_issue)?)?.e();
    let run_done = m.wire_of("run_done", and(&issue, &last_beat)?)?.e();
    let z22 = Expr::zero(Ty::u(22))?;
    m.assign(
        &bi.d,
        pmux(
            bi.q.e(),
            &[
                (acc_run.clone(), z22),
                (issue.clone(), bi.q.e().add(&c(22, 1)?)?),
            ],
        )?,
    )?;
    let zbg = Expr::zero(Ty::u(bgw))?;
    m.assign(
        &bg.d,
        pmux(
            bg.q.e(),
            &[
                (acc_run.clone(), zbg.clone()),
                (and(&issue, &last_in_group)?, zbg),
                (issue.clone(), bg.q.e().add(&c(bgw, 1)?)?),
            ],
        )?,
    )?;
    m.assign(
        &grp.d,
        pmux(
            grp.q.e(),
            &[
                (acc_run.clone(), Expr::zero(Ty::u(21))?),
                (and(&issue, &last_in_group)?, grp.q.e().add(&c(21, 1)?)?),
            ],
        )?,
    )?;
    m.assign(
        &gph.d,
        pmux(
            gph.q.e(),
            &[
                (acc_run.clone(), c(1, 0)?),
                (gemv_meta_done.clone(), c(1, 1)?),
                (and(&gemv_issue, &last_in_group)?, c(1, 0)?),
            ],
        )?,
    )?;

    // ---- buffers ----
    let abank_depth = (p.act_depth / 4).max(2);
    let aaw = addr_width(abank_depth);
    let act_banks: Vec<_> = (0..4)
        .map(|j| m.ram(&format!("act_b{j}"), abank_depth, 8 * rows, RamStyle::Auto))
        .collect::<Res<_>>()?;
    let fold_banks: Vec<_> = (0..4)
        .map(|j| m.ram(&format!("fold_b{j}"), abank_depth, mf, RamStyle::Auto))
        .collect::<Res<_>>()?;
    let wgt = m.ram("wgt", p.wgt_depth.max(2), 8 * cols, RamStyle::Auto)?;
    let meta = m.ram("meta", p.meta_depth.max(2), mf * cols, RamStyle::Auto)?;
    let outb = m.ram("outb", p.out_depth.max(2), 32 * cols, RamStyle::Auto)?;
    let is_act = eqc(&op.q.e(), 1)?;
    let ent_act = m.wire_of("ent_act", and(&ent, &is_act)?)?.e();
    let ptr_lo = ptr.q.e().slice(1, 0)?;
    let ptr_hi = ptr.q.e().shr(2)?;
    // act read address (all banks): act_base / 4 + beat >> log2(ppc / 1) ... per mode
    let ab4 = abase.q.e().shr(2)?.zext(22)?;
    let beat_sh = r_w8.mux(&bi.q.e().shr(2)?, &r_w4.mux(&bi.q.e().shr(1)?, &bi.q.e())?)?;
    let araddr = m.wire_of("act_raddr", fit(&ab4.add(&beat_sh)?, aaw)?)?;
    for (j, b) in act_banks.iter().enumerate() {
        m.assign(&b.we, and(&ent_act, &eqc(&ptr_lo, j as u128)?)?)?;
        m.assign(&b.waddr, fit(&ptr_hi, aaw)?)?;
        m.assign(&b.wdata, din.e().slice(8 * rows - 1, 0)?)?;
        m.assign(&b.raddr, araddr.e())?;
    }
    let ent_fold = m.wire_of("ent_fold", and(&ent, &eqc(&op.q.e(), 0)?)?)?.e();
    for (j, b) in fold_banks.iter().enumerate() {
        m.assign(&b.we, and(&ent_fold, &eqc(&ptr_lo, j as u128)?)?)?;
        m.assign(&b.waddr, fit(&ptr_hi, aaw)?)?;
        m.assign(&b.wdata, din.e().slice(mf - 1, 0)?)?;
        m.assign(&b.raddr, araddr.e())?;
    }
    let wgt_aw = addr_width(p.wgt_depth.max(2));
    m.assign(&wgt.we, and(&ent, &eqc(&op.q.e(), 2)?)?)?;
    m.assign(&wgt.waddr, fit(&ptr.q.e(), wgt_aw)?)?;
    m.assign(&wgt.wdata, view.e().slice(8 * cols - 1, 0)?)?;
    m.assign(
        &wgt.raddr,
        fit(&wbase.q.e().zext(22)?.add(&bi.q.e())?, wgt_aw)?,
    )?;
    let meta_aw = addr_width(p.meta_depth.max(2));
    m.assign(&meta.we, and(&ent, &eqc(&op.q.e(), 3)?)?)?;
    m.assign(&meta.waddr, fit(&ptr.q.e(), meta_aw)?)?;
    m.assign(&meta.wdata, view.e().slice(mf * cols - 1, 0)?)?;
    m.assign(
        &meta.raddr,
        fit(&mbase.q.e().zext(21)?.add(&grp.q.e())?, meta_aw)?,
    )?;

    // ---- feeder stage 1 (buffer read latency) ----
    let v1 = m.reg_in("feed_ctl", "v1", Ty::bit(), Reset::Value(0))?;
    let l1 = m.reg_in("feed_ctl", "l1", Ty::bit(), Reset::Value(0))?;
    m.assign(&v1.d, issue.clone())?;
    m.assign(&l1.d, and(&issue, &last_in_group)?)?;
    let isel = m.reg_in("feed_dat", "isel1", Ty::u(2), Reset::None)?;
    let lmask = m.reg_in("feed_dat", "lmask1", Ty::u(4), Reset::None)?;
    m.assign(&isel.d, bi.q.e().slice(1, 0)?)?;
    // lane j valid: j < 8/B and beat * (8/B) + j < k
    let pos0 = r_w8.mux(
        &bi.q.e().zext(24)?,
        &r_w4.mux(&bi.q.e().zext(24)?.shl(1)?, &bi.q.e().zext(24)?.shl(2)?)?,
    )?;
    let pos0 = m.wire_of("pos0", pos0)?;
    let k24 = kq.q.e().zext(24)?;
    let mut mask_bits = Vec::new();
    for j in 0..4u32 {
        let in_k = pos0.e().add(&c(24, u128::from(j))?)?.lt(&k24)?;
        let lane_ok = match j {
            0 => c(1, 1)?,
            1 => r_w8.not(),
            _ => r_w8.or(&r_w4)?.not(),
        };
        mask_bits.push(and(&in_k, &lane_ok)?);
    }
    mask_bits.reverse();
    m.assign(&lmask.d, Expr::concat(&mask_bits)?)?;

    if !p.modes().contains(&WeightMode::W8) {
        // Only W8 selects a lane by the beat's bank index bit 1.
        m.wire_of("isel_unused", isel.q.e().bit(1)?)?;
    }
    let bank: Vec<Expr> = act_banks.iter().map(|b| b.rdata.e()).collect();
    let odd = and(&r_w4, &isel.q.e().bit(0)?)?;
    let w8_bank = pmux(
        bank[3].clone(),
        &[
            (eqc(&isel.q.e(), 0)?, bank[0].clone()),
            (eqc(&isel.q.e(), 1)?, bank[1].clone()),
            (eqc(&isel.q.e(), 2)?, bank[2].clone()),
        ],
    )?;
    let lane_src = [
        r_w8.mux(&w8_bank, &odd.mux(&bank[2], &bank[0])?)?,
        odd.mux(&bank[3], &bank[1])?,
        bank[2].clone(),
        bank[3].clone(),
    ];
    let fbank: Vec<Expr> = fold_banks.iter().map(|b| b.rdata.e()).collect();
    let fw8 = pmux(
        fbank[3].clone(),
        &[
            (eqc(&isel.q.e(), 0)?, fbank[0].clone()),
            (eqc(&isel.q.e(), 1)?, fbank[1].clone()),
            (eqc(&isel.q.e(), 2)?, fbank[2].clone()),
        ],
    )?;
    let fold_src = [
        r_w8.mux(&fw8, &odd.mux(&fbank[2], &fbank[0])?)?,
        odd.mux(&fbank[3], &fbank[1])?,
        fbank[2].clone(),
        fbank[3].clone(),
    ];
    let mut lanes = Vec::new();
    for (j, src) in lane_src.iter().enumerate() {
        let mk = lmask.q.e().bit(j as u32)?.repeat(8 * rows)?;
        lanes.push(m.wire_of(&format!("lane{j}"), src.and(&mk)?)?.e());
    }
    // N17 fold of row 0 (the GEMV token): xf = sat(round_shift(x * fscale, SF), 8), and
    // Z += xf * zero_u8 per lane. SF = w_scale_bits - 1 >= 7.
    let sf = p.w_scale_bits - 1;
    let pw = 9 + p.w_scale_bits;
    let mut folded = Vec::new();
    let mut zterms = Vec::new();
    for (j, ln) in lanes.iter().enumerate() {
        let x0 = ln.slice(7, 0)?.as_signed();
        let fs = fold_src[j]
            .slice(mf - 1, 8)?
            .zext(p.w_scale_bits + 1)?
            .as_signed();
        let zp = fold_src[j].slice(7, 0)?;
        let prod = m.wire_of(&format!("fold_p{j}"), x0.mul(&fs)?)?;
        let bias = Expr::sconst(pw, (1i128 << (sf - 1)) - 1)?
            .add(&prod.e().msb().not().zext(pw)?.as_signed())?;
        let sh = prod.e().add(&bias)?.sra(sf)?;
        let xf = m.wire_of(&format!("fold_x{j}"), super::pe::sat_to(&sh, 8)?)?;
        zterms.push(xf.e().mul(&zp.zext(9)?.as_signed())?.sext(p.acc_bits)?);
        folded.push(foldq.q.e().mux(&xf.e().as_unsigned(), &x0.as_unsigned())?);
    }
    let zq = m.reg_in("zacc", "z", Ty::s(p.acc_bits), Reset::Value(0))?;
    let mut zsum = zq.q.e();
    for t in &zterms {
        zsum = zsum.add(t)?;
    }
    let zero_acc = Expr::zero(Ty::s(p.acc_bits))?;
    let z_clear = m.wire("z_clear", Ty::bit())?;
    m.assign(
        &zq.d,
        pmux(
            zq.q.e(),
            &[
                (z_clear.e(), zero_acc.clone()),
                (and(&v1.q.e(), &foldq.q.e())?, zsum),
            ],
        )?,
    )?;
    let sbw = p.s_bits;
    let mut act_rows = Vec::new();
    let mut gsum_rows = Vec::new();
    for r in 0..rows {
        let x: Vec<Expr> = if r == 0 {
            folded.clone()
        } else {
            lanes
                .iter()
                .map(|ln| ln.slice(8 * r + 7, 8 * r))
                .collect::<Res<_>>()?
        };
        act_rows.push(Expr::concat(&[
            x[3].clone(),
            x[2].clone(),
            x[1].clone(),
            x[0].clone(),
        ])?);
        let mut bsum = x[0].as_signed().sext(sbw)?;
        for xj in &x[1..] {
            bsum = bsum.add(&xj.as_signed().sext(sbw)?)?;
        }
        let sacc = m.reg_in("sacc", &format!("sacc_r{r}"), Ty::s(sbw), Reset::Value(0))?;
        let snext = m.wire_of(&format!("s_next_r{r}"), sacc.q.e().add(&bsum)?)?;
        m.assign(
            &sacc.d,
            v1.q.e().mux(
                &l1.q.e().mux(&Expr::zero(Ty::s(sbw))?, &snext.e())?,
                &sacc.q.e(),
            )?,
        )?;
        gsum_rows.push(snext.e().as_unsigned());
    }
    act_rows.reverse();
    gsum_rows.reverse();

    // ---- array ----
    let acc_s = m.wire("acc_south", Ty::u(p.acc_bits * cols))?;
    let store_shift = m.wire("store_shift", Ty::bit())?;
    m.instance(
        "u_array",
        array_mod,
        &[
            ("clk_i", clk.e()),
            ("rst_ni", rst.e()),
            ("mode_i", mode.q.e()),
            ("gemv_i", gemv.q.e()),
            ("shift_i", store_shift.e()),
            ("valid_i", v1.q.e()),
            ("last_i", l1.q.e()),
            ("act_w_i", Expr::concat(&act_rows)?),
            ("gsum_w_i", Expr::concat(&gsum_rows)?),
            ("wgt_n_i", wgt.rdata.e()),
            ("meta_n_i", meta.rdata.e()),
            ("wgt_d_i", gbeat.q.e()),
            ("meta_d_i", gmeta.q.e()),
            ("acc_o", acc_s.e()),
        ],
    )?;

    // ---- flush, store ----
    let flush_cycles = u128::from(rows + cols + 6);
    let tmr_z = eqc(&tmr.q.e(), 0)?;
    let store_len = u128::from(rows + 2);
    let in_store_shift = and(&in_store, &tmr.q.e().lt(&c(8, u128::from(rows))?)?)?;
    m.assign(&store_shift, in_store_shift.clone())?;
    let flush_end = m.wire_of("flush_end", and(&in_flush, &tmr_z)?)?.e();
    let store_end = m
        .wire_of("store_end", and(&in_store, &eqc(&tmr.q.e(), store_len)?)?)?
        .e();
    m.assign(
        &tmr.d,
        pmux(
            tmr.q.e(),
            &[
                (run_done.clone(), c(8, flush_cycles)?),
                (and(&flush_end, &keep.q.e().not())?, c(8, 0)?),
                (in_flush.clone(), tmr.q.e().sub(&c(8, 1)?)?),
                (in_store.clone(), tmr.q.e().add(&c(8, 1)?)?),
            ],
        )?,
    )?;
    let mut ys = Vec::new();
    let mut os_unused = Vec::new();
    let mut os_valid0 = None;
    for col in 0..cols {
        let y = m.wire(&format!("y_c{col}"), Ty::s(32))?;
        // N17/N19: acc - Z, saturated to acc_bits, for a folded run.
        let a = acc_s
            .e()
            .slice(p.acc_bits * (col + 1) - 1, p.acc_bits * col)?
            .as_signed();
        let w1 = p.acc_bits + 1;
        let amz = a.sext(w1)?.sub(&zq.q.e().sext(w1)?)?;
        let os_in = m.wire_of(
            &format!("os_in_c{col}"),
            foldq.q.e().mux(&super::pe::sat_to(&amz, p.acc_bits)?, &a)?,
        )?;
        let v = m.wire(&format!("y_valid_c{col}"), Ty::bit())?;
        m.instance(
            &format!("u_os_c{col}"),
            os_mod,
            &[
                ("clk_i", clk.e()),
                ("rst_ni", rst.e()),
                ("acc_i", os_in.e()),
                ("valid_i", in_store_shift.clone()),
                ("mult_i", omult.q.e()),
                ("shift_i", oshift.q.e()),
                ("bits_i", obits.q.e()),
                ("y_o", y.e()),
                ("valid_o", v.e()),
            ],
        )?;
        ys.push(y.e().as_unsigned());
        if col == 0 {
            os_valid0 = Some(v);
        } else {
            os_unused.push(v.e());
        }
    }
    if !os_unused.is_empty() {
        m.wire_of("os_valid_unused", Expr::concat(&os_unused)?)?;
    }
    let os_valid0 = os_valid0.expect("cols >= 1").e();
    ys.reverse();
    let out_aw = addr_width(p.out_depth.max(2));
    let wa = m.reg_in("ctl", "out_waddr", Ty::u(out_aw), Reset::Value(0))?;
    let wa_init = fit(
        &oaddr.q.e().zext(21)?.add(&c(21, u128::from(rows - 1))?)?,
        out_aw,
    )?;
    m.assign(
        &wa.d,
        pmux(
            wa.q.e(),
            &[
                (flush_end.clone(), wa_init),
                (os_valid0.clone(), wa.q.e().sub(&c(out_aw, 1)?)?),
            ],
        )?,
    )?;
    m.assign(&outb.we, os_valid0)?;
    m.assign(&z_clear, store_end.clone())?;
    m.assign(&outb.waddr, wa.q.e())?;
    m.assign(&outb.wdata, Expr::concat(&ys)?)?;

    // ---- drain ----
    let ow_n = lay.out_words;
    let pend = m.reg_in("ctl", "pend", Ty::bit(), Reset::Value(0))?;
    let obv = m.reg_in("ctl", "obv", Ty::bit(), Reset::Value(0))?;
    let owc = m.reg_in("ctl", "ow", Ty::u(addr_width(ow_n + 1)), Reset::Value(0))?;
    let ob = m.reg("ob", Ty::u(ow_n * sbits), Reset::None)?;
    let cnt_nz = cnt.q.e().ne(&Expr::zero(Ty::u(21))?)?;
    let rd = m
        .wire_of(
            "drain_rd",
            and(&and(&in_drain, &cnt_nz)?, &pend.q.e().or(&obv.q.e())?.not())?,
        )?
        .e();
    m.assign(&outb.raddr, fit(&ptr.q.e(), out_aw)?)?;
    let dhs = m.wire_of("dout_hs", and(&obv.q.e(), &dout_ready.e())?)?.e();
    let ow_last = eqc(&owc.q.e(), u128::from(ow_n - 1))?;
    m.assign(&pend.d, rd.clone())?;
    m.assign(
        &obv.d,
        pmux(
            obv.q.e(),
            &[(pend.q.e(), c(1, 1)?), (and(&dhs, &ow_last)?, c(1, 0)?)],
        )?,
    )?;
    let oww = owc.q.e().width();
    m.assign(
        &owc.d,
        pmux(
            owc.q.e(),
            &[
                (pend.q.e(), Expr::zero(Ty::u(oww))?),
                (dhs.clone(), owc.q.e().add(&c(oww, 1)?)?),
            ],
        )?,
    )?;
    let ob_load = fit(&outb.rdata.e(), ow_n * sbits)?;
    let ob_shift = if ow_n > 1 {
        ob.q.e().shr(sbits)?
    } else {
        ob.q.e()
    };
    m.assign(
        &ob.d,
        pmux(ob.q.e(), &[(pend.q.e(), ob_load), (dhs.clone(), ob_shift)])?,
    )?;
    m.assign(&dout_valid, obv.q.e())?;
    m.assign(&dout, ob.q.e().slice(sbits - 1, 0)?)?;
    let drain_end = m
        .wire_of(
            "drain_end",
            and(
                &and(&in_drain, &cnt_nz.not())?,
                &pend.q.e().or(&obv.q.e())?.not(),
            )?,
        )?
        .e();

    // ---- ptr / cnt / op / state ----
    m.assign(
        &op.d,
        acc_load.mux(&fld(&cmd, field::OPCODE)?.slice(1, 0)?, &op.q.e())?,
    )?;
    let step = ent.or(&rd)?;
    m.assign(
        &ptr.d,
        pmux(
            ptr.q.e(),
            &[
                (acc_load.or(&acc_drain)?, f_addr.zext(21)?),
                (step.clone(), ptr.q.e().add(&c(21, 1)?)?),
            ],
        )?,
    )?;
    m.assign(
        &cnt.d,
        pmux(
            cnt.q.e(),
            &[
                (acc_load.or(&acc_drain)?, f_count.clone()),
                (step, cnt.q.e().sub(&c(21, 1)?)?),
            ],
        )?,
    )?;
    let load_end = and(&ent, &eqc(&cnt.q.e(), 1)?)?;
    let st3 = |v: u128| c(3, v);
    m.assign(
        &st.d,
        pmux(
            s.clone(),
            &[
                (acc_load, st3(state::LOAD)?),
                (acc_run, st3(state::RUN)?),
                (acc_drain, st3(state::DRAIN)?),
                (load_end, st3(state::IDLE)?),
                (run_done, st3(state::FLUSH)?),
                (
                    flush_end.clone(),
                    keep.q.e().mux(&st3(state::IDLE)?, &st3(state::STORE)?)?,
                ),
                (store_end, st3(state::IDLE)?),
                (drain_end, st3(state::IDLE)?),
            ],
        )?,
    )?;
    Ok(m)
}
