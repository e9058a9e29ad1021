//! The builders reject width and sign mismatches and naming-rule violations
//! with clear errors, at generation time.

use tessera_hdl_gen::examples::pe;
use tessera_hdl_gen::{Design, Expr, Module, RamStyle, Reset, Ty};

fn err<T: std::fmt::Debug>(r: Result<T, tessera_hdl_gen::HdlError>) -> String {
    r.expect_err("expected an error").to_string()
}

fn sigs() -> (Module, Expr, Expr, Expr) {
    let mut m = Module::new("t").expect("module");
    let a = m.input("a_i", Ty::u(8)).expect("a").e();
    let b = m.input("b_i", Ty::u(9)).expect("b").e();
    let s = m.input("s_i", Ty::s(8)).expect("s").e();
    (m, a, b, s)
}

#[test]
fn width_mismatch_is_rejected() {
    let (_m, a, b, _s) = sigs();
    let e = err(a.add(&b));
    assert!(
        e.contains("add: operand type mismatch: left is u8, right is u9"),
        "{e}"
    );
    assert!(err(a.sub(&b)).contains("u8"));
    assert!(err(a.and(&b)).contains("mismatch"));
    assert!(err(a.eq(&b)).contains("mismatch"));
    assert!(err(a.lt(&b)).contains("mismatch"));
    assert!(err(Expr::uconst(1, 1).expect("c").mux(&a, &b)).contains("mismatch"));
    // Explicit extension fixes it.
    assert_eq!(
        a.zext(9).expect("zext").add(&b).expect("add").ty(),
        Ty::u(9)
    );
}

#[test]
fn sign_mismatch_is_rejected() {
    let (_m, a, _b, s) = sigs();
    let e = err(a.add(&s));
    assert!(e.contains("left is u8, right is s8"), "{e}");
    assert!(err(a.mul(&s)).contains("mul: signedness mismatch"));
    assert!(err(a.lt(&s)).contains("mismatch"));
    assert!(err(s.shr(1)).contains("use sra"));
    assert!(err(a.sra(1)).contains("use shr"));
    assert!(err(a.shl_by(&s)).contains("shift amount must be unsigned"));
    // Explicit casts fix it.
    assert_eq!(a.as_signed().add(&s).expect("add").ty(), Ty::s(8));
}

#[test]
fn result_width_rules() {
    let (_m, a, b, s) = sigs();
    assert_eq!(a.add(&a).expect("add").ty(), Ty::u(8));
    assert_eq!(a.add_wide(&a).expect("add").ty(), Ty::u(9));
    assert_eq!(s.sub_wide(&s).expect("sub").ty(), Ty::s(9));
    assert_eq!(a.mul(&b).expect("mul").ty(), Ty::u(17));
    assert_eq!(s.mul(&s).expect("mul").ty(), Ty::s(16));
    assert_eq!(a.eq(&a).expect("eq").ty(), Ty::bit());
    assert_eq!(s.slice(6, 2).expect("slice").ty(), Ty::u(5));
    assert_eq!(s.trunc(4).expect("trunc").ty(), Ty::s(4));
    assert_eq!(
        Expr::concat(&[a.clone(), s.clone()]).expect("cat").ty(),
        Ty::u(16)
    );
    assert_eq!(a.repeat(3).expect("rep").ty(), Ty::u(24));
    assert_eq!(s.sext(12).expect("sext").ty(), Ty::s(12));
    assert_eq!(s.zext(12).expect("zext").ty(), Ty::u(12));
    assert_eq!(a.reduce_xor().ty(), Ty::bit());
    assert!(err(a.zext(4)).contains("use trunc"));
    assert!(err(a.sext(7)).contains("use trunc"));
    assert!(err(a.slice(8, 0)).contains("out of range"));
    assert!(err(a.slice(2, 3)).contains("out of range"));
    assert!(err(a.shl(8)).contains("less than the width"));
    assert!(err(a.mux(&a, &a)).contains("select must be u1"));
}

#[test]
fn constants_are_range_checked() {
    assert!(err(Expr::uconst(4, 16)).contains("does not fit in u4"));
    assert!(err(Expr::sconst(4, 8)).contains("does not fit in s4"));
    assert!(err(Expr::sconst(4, -9)).contains("does not fit in s4"));
    assert!(err(Expr::constant(Ty::u(4), -1)).contains("negative"));
    assert!(err(Expr::uconst(0, 0)).contains("at least 1"));
    assert!(Expr::sconst(4, -8).is_ok());
    assert!(Expr::uconst(128, u128::MAX).is_ok());
}

#[test]
fn assign_checks_type_and_drivers() {
    let (mut m, a, b, _s) = sigs();
    let y = m.output("y_o", Ty::u(9)).expect("y");
    let e = err(m.assign(&y, a.clone()));
    assert!(
        e.contains("module t: assign y_o: type mismatch: target is u9, value is u8"),
        "{e}"
    );
    m.assign(&y, b.clone()).expect("assign");
    assert!(err(m.assign(&y, b.clone())).contains("already driven"));
    let ain = tessera_hdl_gen::Signal::clone(&m.input("c_i", Ty::u(8)).expect("c"));
    assert!(err(m.assign(&ain, a.clone())).contains("cannot drive input"));
    let w = m.wire("w", Ty::u(8)).expect("w");
    assert!(err(m.check()).contains("w is never driven"));
    m.assign(&w, a).expect("assign w");
    m.check().expect("complete");
    // Signals of another module are rejected.
    let mut other = Module::new("other").expect("m");
    let o = other.output("o_o", Ty::u(9)).expect("o");
    assert!(err(other.assign(&o, b)).contains("reads unknown signal b_i"));
    // Same name, other type: rejected too.
    other.input("b_i", Ty::u(3)).expect("b");
    let mut third = Module::new("third").expect("m");
    let b9 = third.input("b_i", Ty::u(9)).expect("b").e();
    let e = err(other.assign(&o, b9));
    assert!(e.contains("b_i is declared u3, the handle says u9"), "{e}");
}

#[test]
fn naming_rules() {
    let mut m = Module::new("t").expect("m");
    assert!(err(m.input("a", Ty::u(1))).contains("must end in _i"));
    assert!(err(m.output("a_i", Ty::u(1))).contains("must end in _o"));
    assert!(err(m.wire("x_q", Ty::u(1))).contains("reserved"));
    assert!(err(m.wire("Bad", Ty::u(1))).contains("bad identifier"));
    assert!(err(m.wire("wire", Ty::u(1))).contains("keyword"));
    assert!(err(m.wire("hg_t0", Ty::u(1))).contains("reserved"));
    assert!(err(m.input("clk_i", Ty::bit())).contains("clock()"));
    assert!(err(m.reg("r", Ty::u(4), Reset::None)).contains("call clock() first"));
    m.clock().expect("clk");
    assert!(err(m.reg("r", Ty::u(4), Reset::Value(0))).contains("call reset() first"));
    m.reset().expect("rst");
    assert!(err(m.reg("r", Ty::u(4), Reset::Value(16))).contains("does not fit"));
    let r = m.reg("r", Ty::u(4), Reset::Value(3)).expect("reg");
    assert_eq!((r.q.name(), r.d.name()), ("r_q", "r_d"));
    assert!(err(m.assign(&r.q, r.d.e())).contains("assign its _d"));
    m.reg_in("g", "p", Ty::u(4), Reset::None).expect("p");
    assert!(err(m.reg_in("g", "z", Ty::u(4), Reset::Value(0))).contains("mixes"));
    assert!(err(m.param("lower", 3)).contains("UPPER_CASE"));
    assert!(err(m.ram("mem", 1, 8, RamStyle::Block)).contains("depth"));
}

#[test]
fn unused_param_is_rejected() {
    let mut m = Module::new("t").expect("m");
    m.param("N", 4).expect("p");
    assert!(err(m.check()).contains("parameter N is not used"));
}

#[test]
fn instance_connections_are_checked() {
    let cell = pe(8, 20).expect("pe");
    let mut m = Module::new("top").expect("m");
    let clk = m.clock().expect("clk").e();
    let rst = m.reset().expect("rst").e();
    let a = m.input("a_i", Ty::s(8)).expect("a").e();
    let b = m.input("b_i", Ty::u(8)).expect("b").e();
    let ao = m.wire("ao", Ty::s(8)).expect("ao").e();
    let bo = m.wire("bo", Ty::s(8)).expect("bo").e();
    let acc = m.wire("acc", Ty::s(20)).expect("acc").e();
    let full = |b_conn: Expr, acc_conn: Expr| {
        vec![
            ("clk_i", clk.clone()),
            ("rst_ni", rst.clone()),
            ("a_i", a.clone()),
            ("b_i", b_conn),
            ("a_o", ao.clone()),
            ("b_o", bo.clone()),
            ("acc_o", acc_conn),
        ]
    };
    // Sign mismatch on an input.
    let e = err(m.instance("u_pe", &cell, &full(b.clone(), acc.clone())));
    assert!(e.contains("port b_i is s8, connection is u8"), "{e}");
    // Missing port.
    let mut conns = full(b.as_signed(), acc.clone());
    conns.retain(|(p, _)| *p != "acc_o");
    assert!(err(m.instance("u_pe", &cell, &conns)).contains("port acc_o is not connected"));
    // Unknown port.
    let mut conns = full(b.as_signed(), acc.clone());
    conns.push(("zz_i", a.clone()));
    assert!(err(m.instance("u_pe", &cell, &conns)).contains("no port zz_i"));
    // Output to a non-wire expression.
    let e = err(m.instance(
        "u_pe",
        &cell,
        &full(b.as_signed(), acc.add(&acc).expect("add")),
    ));
    assert!(e.contains("must connect to a wire"), "{e}");
    // Good.
    m.instance("u_pe", &cell, &full(b.as_signed(), acc.clone()))
        .expect("instance");
    // Output wire now driven: a second instance cannot drive it again.
    assert!(
        err(m.instance("u_pe2", &cell, &full(b.as_signed(), acc.clone())))
            .contains("already driven")
    );
    // The design must contain the instantiated module.
    let mut d = Design::new("top");
    let y = m.output("y_o", Ty::u(36)).expect("y");
    m.assign(&y, Expr::concat(&[ao, bo, acc]).expect("cat"))
        .expect("assign");
    d.add(m).expect("add top");
    assert!(err(d.render()).contains("pe, which is not in the design"));
    d.add(cell).expect("add pe");
    assert_eq!(d.render().expect("render").len(), 2);
}

#[test]
fn constants_fold() {
    let (_m, a, _b, s) = sigs();
    let c = |w, v| Expr::uconst(w, v).expect("const");
    assert_eq!(c(8, 200).add(&c(8, 100)).expect("add").as_const(), Some(44));
    assert_eq!(
        Expr::sconst(8, -3)
            .expect("c")
            .mul(&Expr::sconst(8, 5).expect("c"))
            .expect("mul")
            .as_const(),
        Some(0xfff1)
    );
    // Absorbing constants and range-end comparisons fold too: Verilator
    // would flag them as constant logic.
    assert_eq!(a.and(&c(8, 0)).expect("and").as_const(), Some(0));
    assert_eq!(a.or(&c(8, 0xff)).expect("or").as_const(), Some(0xff));
    assert_eq!(a.ge(&c(8, 0)).expect("ge").as_const(), Some(1));
    assert_eq!(a.lt(&c(8, 0)).expect("lt").as_const(), Some(0));
    assert_eq!(c(8, 255).ge(&a).expect("ge").as_const(), Some(1));
    let smax = Expr::sconst(8, 127).expect("c");
    assert_eq!(s.gt(&smax).expect("gt").as_const(), Some(0));
    assert_eq!(
        s.gt(&Expr::sconst(8, 126).expect("c"))
            .expect("gt")
            .as_const(),
        None
    );
    // A constant select picks its arm; a constant shift amount is a constant shift.
    assert_eq!(c(1, 1).mux(&a, &c(8, 3)).expect("mux"), a);
    assert_eq!(a.shr_by(&c(4, 9)).expect("shr").as_const(), Some(0));
    assert_eq!(a.shr_by(&c(4, 3)).expect("shr"), a.shr(3).expect("shr"));
    assert_eq!(s.sra_by(&c(4, 12)).expect("sra"), s.sra(7).expect("sra"));
}

#[test]
fn eval_is_twos_complement() {
    let (_m, a, _b, s) = sigs();
    let env = |n: &str| match n {
        "a_i" => Some(0xf0),
        "s_i" => Some(0x80), // -128
        _ => None,
    };
    assert_eq!(s.sext(12).expect("sext").eval(&env), Ok(0xf80));
    assert_eq!(s.sra(3).expect("sra").eval(&env), Ok(0xf0));
    assert_eq!(s.mul(&s).expect("mul").eval(&env), Ok(0x4000)); // 16384
    assert_eq!(s.sub_wide(&s.not()).expect("sub").eval(&env), Ok(0x101)); // -128 - 127 = -255
    assert_eq!(a.add_wide(&a).expect("add").eval(&env), Ok(0x1e0));
    assert_eq!(
        s.lt(&Expr::sconst(8, 0).expect("c"))
            .expect("lt")
            .eval(&env),
        Ok(1)
    );
    assert!(a.eval(&|_| None).is_err());
}
