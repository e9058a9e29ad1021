//! Typed expressions: every expression carries an explicit width and
//! signedness, and every builder rejects width/sign mismatches, so the
//! printed Verilog never relies on Verilog's implicit extension rules.

use crate::error::HdlError;
use std::fmt;

/// Widest value that constant folding and [`Expr::eval`] handle
/// (constants are stored as `u128`; wider constants are zero-extended).
pub const MAX_CONST_WIDTH: u32 = 128;

/// Width and signedness of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ty {
    /// Number of bits, at least 1.
    pub width: u32,
    /// Two's-complement signed when true.
    pub signed: bool,
}

impl Ty {
    /// Unsigned type of `width` bits.
    pub const fn u(width: u32) -> Ty {
        Ty {
            width,
            signed: false,
        }
    }
    /// Signed type of `width` bits.
    pub const fn s(width: u32) -> Ty {
        Ty {
            width,
            signed: true,
        }
    }
    /// A single unsigned bit.
    pub const fn bit() -> Ty {
        Ty::u(1)
    }
    /// Same signedness, other width.
    pub const fn with_width(self, width: u32) -> Ty {
        Ty {
            width,
            signed: self.signed,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", if self.signed { 's' } else { 'u' }, self.width)
    }
}

/// Two-operand operators whose operands and result share one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// Wrapping addition.
    Add,
    /// Wrapping subtraction.
    Sub,
    /// Bitwise and.
    And,
    /// Bitwise or.
    Or,
    /// Bitwise xor.
    Xor,
}

/// Comparisons; the result is one unsigned bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<` (signed when the operands are signed)
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// Reductions to one bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    /// `&x`
    And,
    /// `|x`
    Or,
    /// `^x`
    Xor,
}

/// Shift kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShiftOp {
    /// Logical left shift (any signedness).
    Shl,
    /// Logical right shift (unsigned operands only).
    Shr,
    /// Arithmetic right shift (signed operands only).
    Sra,
}

/// Shift amount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShiftAmount {
    /// Constant, less than the operand width.
    Const(u32),
    /// Unsigned signal-valued amount.
    Expr(Expr),
}

/// Expression node (see [`Expr`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExprKind {
    /// Constant bit pattern (already masked to the width).
    Const(u128),
    /// Reference to a named signal.
    Sig(String),
    /// `x[hi:lo]`, unsigned.
    Slice(Expr, u32, u32),
    /// `{a, b, ...}`, most significant first, unsigned.
    Concat(Vec<Expr>),
    /// `{n{x}}`, unsigned.
    Repeat(u32, Expr),
    /// Zero extension to the node width.
    Zext(Expr),
    /// Sign extension to the node width.
    Sext(Expr),
    /// Reinterpretation with another signedness (no logic).
    Cast(Expr),
    /// Same-type binary operator.
    Bin(BinOp, Expr, Expr),
    /// Full-width product: width is the sum of the operand widths.
    Mul(Expr, Expr),
    /// Comparison.
    Cmp(CmpOp, Expr, Expr),
    /// Bitwise not.
    Not(Expr),
    /// Reduction.
    Reduce(RedOp, Expr),
    /// `sel ? a : b`.
    Mux(Expr, Expr, Expr),
    /// Shift.
    Shift(ShiftOp, Expr, ShiftAmount),
}

/// A typed expression. Cheap to clone for small trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expr {
    kind: Box<ExprKind>,
    ty: Ty,
}

type R = Result<Expr, HdlError>;

fn check_width(what: &str, width: u32) -> Result<(), HdlError> {
    if width == 0 {
        return Err(HdlError::new(format!("{what}: width must be at least 1")));
    }
    Ok(())
}

fn same_ty(op: &str, a: &Expr, b: &Expr) -> Result<(), HdlError> {
    if a.ty != b.ty {
        return Err(HdlError::new(format!(
            "{op}: operand type mismatch: left is {}, right is {} (extend or cast explicitly)",
            a.ty, b.ty
        )));
    }
    Ok(())
}

fn mask(width: u32) -> u128 {
    if width >= 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    }
}

impl Expr {
    /// Build a node, folding it to a constant when all its operands are
    /// constants (and a mux with a constant select to the chosen arm), so
    /// the printed Verilog has no constant logic for lint to flag.
    pub(crate) fn new(kind: ExprKind, ty: Ty) -> Expr {
        let e = Expr {
            kind: Box::new(kind),
            ty,
        };
        if let ExprKind::Mux(s, a, b) = &*e.kind {
            if let ExprKind::Const(v) = &*s.kind {
                return if v & 1 == 1 { a.clone() } else { b.clone() };
            }
        }
        // Absorbing constants: x & 0, x | ~0, x * 0.
        let absorbed = match &*e.kind {
            ExprKind::Bin(BinOp::And, a, b) => {
                [a, b].iter().any(|o| o.as_const() == Some(0)).then_some(0)
            }
            ExprKind::Bin(BinOp::Or, a, b) => [a, b]
                .iter()
                .any(|o| o.as_const() == Some(mask(ty.width)))
                .then_some(mask(ty.width)),
            ExprKind::Mul(a, b) => [a, b].iter().any(|o| o.as_const() == Some(0)).then_some(0),
            _ => None,
        };
        if let Some(v) = absorbed {
            if ty.width <= MAX_CONST_WIDTH {
                return Expr {
                    kind: Box::new(ExprKind::Const(v)),
                    ty,
                };
            }
        }
        let foldable = !matches!(&*e.kind, ExprKind::Const(_) | ExprKind::Sig(_))
            && ty.width <= MAX_CONST_WIDTH
            && e.operands()
                .iter()
                .all(|o| matches!(&*o.kind, ExprKind::Const(_)));
        if foldable {
            if let Ok(v) = e.eval(&|_| None) {
                return Expr {
                    kind: Box::new(ExprKind::Const(v)),
                    ty,
                };
            }
        }
        e
    }

    /// Direct operands of this node (including a signal shift amount).
    pub fn operands(&self) -> Vec<&Expr> {
        match &*self.kind {
            ExprKind::Const(_) | ExprKind::Sig(_) => Vec::new(),
            ExprKind::Slice(e, _, _)
            | ExprKind::Repeat(_, e)
            | ExprKind::Zext(e)
            | ExprKind::Sext(e)
            | ExprKind::Cast(e)
            | ExprKind::Not(e)
            | ExprKind::Reduce(_, e) => vec![e],
            ExprKind::Concat(parts) => parts.iter().collect(),
            ExprKind::Bin(_, a, b) | ExprKind::Mul(a, b) | ExprKind::Cmp(_, a, b) => vec![a, b],
            ExprKind::Mux(s, a, b) => vec![s, a, b],
            ExprKind::Shift(_, e, ShiftAmount::Expr(a)) => vec![e, a],
            ExprKind::Shift(_, e, ShiftAmount::Const(_)) => vec![e],
        }
    }

    /// The constant value, if this is a constant.
    pub fn as_const(&self) -> Option<u128> {
        match &*self.kind {
            ExprKind::Const(v) => Some(*v),
            _ => None,
        }
    }

    /// The type of this expression.
    pub fn ty(&self) -> Ty {
        self.ty
    }
    /// The width of this expression.
    pub fn width(&self) -> u32 {
        self.ty.width
    }
    /// The node.
    pub fn kind(&self) -> &ExprKind {
        &self.kind
    }
    /// Name of the signal when this is a plain signal reference.
    pub fn as_signal_name(&self) -> Option<&str> {
        match &*self.kind {
            ExprKind::Sig(n) => Some(n),
            _ => None,
        }
    }

    /// Unsigned constant; errors when `value` does not fit in `width` bits.
    /// Any width is allowed; the value itself is at most 128 bits.
    pub fn uconst(width: u32, value: u128) -> R {
        check_width("constant", width)?;
        if value & !mask(width) != 0 {
            return Err(HdlError::new(format!(
                "constant: value {value} does not fit in u{width}"
            )));
        }
        Ok(Expr::new(ExprKind::Const(value), Ty::u(width)))
    }

    /// Signed constant; errors when `value` is outside the `width`-bit
    /// two's-complement range.
    /// Above 128 bits only non-negative values are representable.
    pub fn sconst(width: u32, value: i128) -> R {
        check_width("constant", width)?;
        if width > MAX_CONST_WIDTH && value < 0 {
            return Err(HdlError::new(format!(
                "constant: negative value in s{width}: above {MAX_CONST_WIDTH} bits build it with sext"
            )));
        }
        if width < 128 {
            let min = -(1i128 << (width - 1));
            let max = (1i128 << (width - 1)) - 1;
            if value < min || value > max {
                return Err(HdlError::new(format!(
                    "constant: value {value} does not fit in s{width} ([{min}, {max}])"
                )));
            }
        }
        Ok(Expr::new(
            ExprKind::Const((value as u128) & mask(width)),
            Ty::s(width),
        ))
    }

    /// Constant of type `ty` from a signed value (range-checked for `ty`).
    pub fn constant(ty: Ty, value: i128) -> R {
        if ty.signed {
            Expr::sconst(ty.width, value)
        } else if value < 0 {
            Err(HdlError::new(format!(
                "constant: negative value {value} for unsigned type {ty}"
            )))
        } else {
            Expr::uconst(ty.width, value as u128)
        }
    }

    /// All-zero constant of type `ty`.
    pub fn zero(ty: Ty) -> R {
        Expr::constant(ty, 0)
    }

    /// `x[hi:lo]`; the result is unsigned.
    pub fn slice(&self, hi: u32, lo: u32) -> R {
        if hi < lo || hi >= self.ty.width {
            return Err(HdlError::new(format!(
                "slice [{hi}:{lo}] out of range for {}",
                self.ty
            )));
        }
        if lo == 0 && hi + 1 == self.ty.width && !self.ty.signed {
            return Ok(self.clone());
        }
        Ok(Expr::new(
            ExprKind::Slice(self.clone(), hi, lo),
            Ty::u(hi - lo + 1),
        ))
    }

    /// `x[i]`, one unsigned bit.
    pub fn bit(&self, i: u32) -> R {
        self.slice(i, i)
    }

    /// Most significant bit (the sign bit of a signed value).
    pub fn msb(&self) -> Expr {
        self.bit(self.ty.width - 1)
            .expect("msb index is always in range")
    }

    /// Keep the low `width` bits, keeping the signedness.
    pub fn trunc(&self, width: u32) -> R {
        check_width("trunc", width)?;
        if width > self.ty.width {
            return Err(HdlError::new(format!(
                "trunc to {width} bits: operand {} is narrower",
                self.ty
            )));
        }
        if width == self.ty.width {
            return Ok(self.clone());
        }
        let s = self.slice(width - 1, 0)?;
        Ok(if self.ty.signed { s.as_signed() } else { s })
    }

    /// `{parts[0], parts[1], ...}`, most significant first; unsigned.
    pub fn concat(parts: &[Expr]) -> R {
        if parts.is_empty() {
            return Err(HdlError::new("concat: no operands"));
        }
        if parts.len() == 1 {
            return Ok(parts[0].as_unsigned());
        }
        let width = parts.iter().map(|p| p.ty.width).sum();
        Ok(Expr::new(ExprKind::Concat(parts.to_vec()), Ty::u(width)))
    }

    /// `{n{x}}`; unsigned.
    pub fn repeat(&self, n: u32) -> R {
        if n == 0 {
            return Err(HdlError::new("repeat: count must be at least 1"));
        }
        if n == 1 {
            return Ok(self.as_unsigned());
        }
        Ok(Expr::new(
            ExprKind::Repeat(n, self.clone()),
            Ty::u(self.ty.width * n),
        ))
    }

    /// Zero-extend to `width` (>= current width); the result is unsigned.
    pub fn zext(&self, width: u32) -> R {
        if width < self.ty.width {
            return Err(HdlError::new(format!(
                "zext to {width} bits: operand {} is wider (use trunc)",
                self.ty
            )));
        }
        if width == self.ty.width {
            return Ok(self.as_unsigned());
        }
        Ok(Expr::new(ExprKind::Zext(self.clone()), Ty::u(width)))
    }

    /// Sign-extend to `width` (>= current width); the result is signed.
    pub fn sext(&self, width: u32) -> R {
        if width < self.ty.width {
            return Err(HdlError::new(format!(
                "sext to {width} bits: operand {} is wider (use trunc)",
                self.ty
            )));
        }
        if width == self.ty.width {
            return Ok(self.as_signed());
        }
        Ok(Expr::new(ExprKind::Sext(self.clone()), Ty::s(width)))
    }

    /// Extend to `width` according to the operand's signedness.
    pub fn ext(&self, width: u32) -> R {
        if self.ty.signed {
            self.sext(width)
        } else {
            self.zext(width)
        }
    }

    /// Reinterpret as signed (same bits).
    pub fn as_signed(&self) -> Expr {
        self.cast(true)
    }
    /// Reinterpret as unsigned (same bits).
    pub fn as_unsigned(&self) -> Expr {
        self.cast(false)
    }
    fn cast(&self, signed: bool) -> Expr {
        if self.ty.signed == signed {
            return self.clone();
        }
        let ty = Ty {
            width: self.ty.width,
            signed,
        };
        // Peel a previous cast instead of nesting.
        if let ExprKind::Cast(inner) = &*self.kind {
            if inner.ty == ty {
                return inner.clone();
            }
        }
        Expr::new(ExprKind::Cast(self.clone()), ty)
    }

    fn bin(&self, op: BinOp, name: &str, rhs: &Expr) -> R {
        same_ty(name, self, rhs)?;
        Ok(Expr::new(
            ExprKind::Bin(op, self.clone(), rhs.clone()),
            self.ty,
        ))
    }

    /// Wrapping add: both operands of one type, result of that type.
    pub fn add(&self, rhs: &Expr) -> R {
        self.bin(BinOp::Add, "add", rhs)
    }
    /// Wrapping subtract: both operands of one type, result of that type.
    pub fn sub(&self, rhs: &Expr) -> R {
        self.bin(BinOp::Sub, "sub", rhs)
    }
    /// Full add: operands of one type `T` of width `w`; result width `w + 1`
    /// (operands extended by their signedness first), never overflows.
    pub fn add_wide(&self, rhs: &Expr) -> R {
        same_ty("add_wide", self, rhs)?;
        let w = self.ty.width + 1;
        self.ext(w)?.add(&rhs.ext(w)?)
    }
    /// Full subtract, result width `w + 1` and signed for signed operands.
    /// For unsigned operands the result is unsigned modulo `2^(w+1)`; its MSB
    /// is the borrow.
    pub fn sub_wide(&self, rhs: &Expr) -> R {
        same_ty("sub_wide", self, rhs)?;
        let w = self.ty.width + 1;
        self.ext(w)?.sub(&rhs.ext(w)?)
    }
    /// Full product: both operands of one signedness (widths may differ);
    /// result width is the sum of the widths, never overflows.
    pub fn mul(&self, rhs: &Expr) -> R {
        if self.ty.signed != rhs.ty.signed {
            return Err(HdlError::new(format!(
                "mul: signedness mismatch: left is {}, right is {} (cast explicitly)",
                self.ty, rhs.ty
            )));
        }
        let width = self.ty.width + rhs.ty.width;
        Ok(Expr::new(
            ExprKind::Mul(self.clone(), rhs.clone()),
            Ty {
                width,
                signed: self.ty.signed,
            },
        ))
    }
    /// Bitwise and (same types).
    pub fn and(&self, rhs: &Expr) -> R {
        self.bin(BinOp::And, "and", rhs)
    }
    /// Bitwise or (same types).
    pub fn or(&self, rhs: &Expr) -> R {
        self.bin(BinOp::Or, "or", rhs)
    }
    /// Bitwise xor (same types).
    pub fn xor(&self, rhs: &Expr) -> R {
        self.bin(BinOp::Xor, "xor", rhs)
    }
    /// Bitwise not.
    pub fn not(&self) -> Expr {
        Expr::new(ExprKind::Not(self.clone()), self.ty)
    }

    fn cmp(&self, op: CmpOp, name: &str, rhs: &Expr) -> R {
        same_ty(name, self, rhs)?;
        if let Some(v) = self.constant_compare(op, rhs) {
            return Ok(Expr::new(ExprKind::Const(u128::from(v)), Ty::bit()));
        }
        Ok(Expr::new(
            ExprKind::Cmp(op, self.clone(), rhs.clone()),
            Ty::bit(),
        ))
    }
    /// `a == b`.
    pub fn eq(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Eq, "eq", rhs)
    }
    /// `a != b`.
    pub fn ne(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Ne, "ne", rhs)
    }
    /// `a < b`, signed for signed operands.
    pub fn lt(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Lt, "lt", rhs)
    }
    /// `a <= b`.
    pub fn le(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Le, "le", rhs)
    }
    /// `a > b`.
    pub fn gt(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Gt, "gt", rhs)
    }
    /// `a >= b`.
    pub fn ge(&self, rhs: &Expr) -> R {
        self.cmp(CmpOp::Ge, "ge", rhs)
    }

    /// Result of a comparison that is constant because one side is a
    /// constant at the end of the type's range (`x >= 0` for unsigned, ...).
    fn constant_compare(&self, op: CmpOp, rhs: &Expr) -> Option<bool> {
        let w = self.ty.width;
        if w > MAX_CONST_WIDTH {
            return None;
        }
        let (min, max) = if self.ty.signed {
            (1u128 << (w - 1), mask(w - 1))
        } else {
            (0, mask(w))
        };
        // Normalise to `x op c`.
        let (op, c) = match (self.as_const(), rhs.as_const()) {
            (_, Some(c)) => (op, c),
            (Some(c), None) => (
                match op {
                    CmpOp::Lt => CmpOp::Gt,
                    CmpOp::Le => CmpOp::Ge,
                    CmpOp::Gt => CmpOp::Lt,
                    CmpOp::Ge => CmpOp::Le,
                    o => o,
                },
                c,
            ),
            (None, None) => return None,
        };
        match op {
            CmpOp::Lt if c == min => Some(false),
            CmpOp::Ge if c == min => Some(true),
            CmpOp::Gt if c == max => Some(false),
            CmpOp::Le if c == max => Some(true),
            _ => None,
        }
    }

    fn reduce(&self, op: RedOp) -> Expr {
        Expr::new(ExprKind::Reduce(op, self.clone()), Ty::bit())
    }
    /// `&x`.
    pub fn reduce_and(&self) -> Expr {
        self.reduce(RedOp::And)
    }
    /// `|x`.
    pub fn reduce_or(&self) -> Expr {
        self.reduce(RedOp::Or)
    }
    /// `^x`.
    pub fn reduce_xor(&self) -> Expr {
        self.reduce(RedOp::Xor)
    }

    /// `self ? a : b`; `self` must be one unsigned bit, `a` and `b` of one type.
    pub fn mux(&self, a: &Expr, b: &Expr) -> R {
        if self.ty != Ty::bit() {
            return Err(HdlError::new(format!(
                "mux: select must be u1, got {}",
                self.ty
            )));
        }
        same_ty("mux", a, b)?;
        Ok(Expr::new(
            ExprKind::Mux(self.clone(), a.clone(), b.clone()),
            a.ty,
        ))
    }

    fn shift(&self, op: ShiftOp, amount: ShiftAmount) -> R {
        match (op, self.ty.signed) {
            (ShiftOp::Shr, true) => {
                return Err(HdlError::new(format!(
                    "shr: logical right shift of signed {} (use sra, or as_unsigned)",
                    self.ty
                )))
            }
            (ShiftOp::Sra, false) => {
                return Err(HdlError::new(format!(
                    "sra: arithmetic right shift of unsigned {} (use shr, or as_signed)",
                    self.ty
                )))
            }
            _ => {}
        }
        // A constant-valued amount becomes a constant shift (an amount of at
        // least the width shifts everything out, or fills with the sign).
        let amount = match amount {
            ShiftAmount::Expr(e) if e.as_const().is_some() && !e.ty.signed => {
                let n = e.as_const().unwrap_or(0);
                if n < u128::from(self.ty.width) {
                    ShiftAmount::Const(n as u32)
                } else if op == ShiftOp::Sra {
                    ShiftAmount::Const(self.ty.width - 1)
                } else {
                    return Expr::zero(self.ty);
                }
            }
            a => a,
        };
        match &amount {
            ShiftAmount::Const(n) if *n >= self.ty.width => {
                return Err(HdlError::new(format!(
                    "shift by {n}: amount must be less than the width of {}",
                    self.ty
                )))
            }
            ShiftAmount::Expr(e) if e.ty.signed => {
                return Err(HdlError::new(format!(
                    "shift amount must be unsigned, got {}",
                    e.ty
                )))
            }
            _ => {}
        }
        if let ShiftAmount::Const(0) = amount {
            return Ok(self.clone());
        }
        Ok(Expr::new(
            ExprKind::Shift(op, self.clone(), amount),
            self.ty,
        ))
    }
    /// Left shift by a constant (same width; bits shifted out are lost).
    pub fn shl(&self, n: u32) -> R {
        self.shift(ShiftOp::Shl, ShiftAmount::Const(n))
    }
    /// Logical right shift by a constant (unsigned operands).
    pub fn shr(&self, n: u32) -> R {
        self.shift(ShiftOp::Shr, ShiftAmount::Const(n))
    }
    /// Arithmetic right shift by a constant (signed operands).
    pub fn sra(&self, n: u32) -> R {
        self.shift(ShiftOp::Sra, ShiftAmount::Const(n))
    }
    /// Left shift by an unsigned signal amount.
    pub fn shl_by(&self, amount: &Expr) -> R {
        self.shift(ShiftOp::Shl, ShiftAmount::Expr(amount.clone()))
    }
    /// Logical right shift by an unsigned signal amount.
    pub fn shr_by(&self, amount: &Expr) -> R {
        self.shift(ShiftOp::Shr, ShiftAmount::Expr(amount.clone()))
    }
    /// Arithmetic right shift by an unsigned signal amount.
    pub fn sra_by(&self, amount: &Expr) -> R {
        self.shift(ShiftOp::Sra, ShiftAmount::Expr(amount.clone()))
    }

    /// Evaluate with signal values from `env` (bit patterns; extra high bits
    /// are ignored). Returns the result's bit pattern. This is the IR's
    /// reference semantics; the printer tests check Verilog against it.
    /// Widths above 128 bits are not supported.
    pub fn eval(&self, env: &dyn Fn(&str) -> Option<u128>) -> Result<u128, HdlError> {
        let w = self.ty.width;
        if w > 128 {
            return Err(HdlError::new(format!("eval: width {w} above 128")));
        }
        let m = mask(w);
        let sx = |v: u128, width: u32| -> i128 {
            if width < 128 && (v >> (width - 1)) & 1 == 1 {
                (v | !mask(width)) as i128
            } else {
                v as i128
            }
        };
        let v = match &*self.kind {
            ExprKind::Const(v) => *v,
            ExprKind::Sig(n) => {
                env(n).ok_or_else(|| HdlError::new(format!("eval: no value for {n}")))?
            }
            ExprKind::Slice(x, _, lo) => x.eval(env)? >> lo,
            ExprKind::Concat(parts) => {
                let mut acc = 0u128;
                for p in parts {
                    let pw = p.ty.width;
                    acc = acc.checked_shl(pw).unwrap_or(0) | (p.eval(env)? & mask(pw));
                }
                acc
            }
            ExprKind::Repeat(n, x) => {
                let xv = x.eval(env)? & mask(x.ty.width);
                let mut acc = 0u128;
                for _ in 0..*n {
                    acc = acc.checked_shl(x.ty.width).unwrap_or(0) | xv;
                }
                acc
            }
            ExprKind::Zext(x) => x.eval(env)? & mask(x.ty.width),
            ExprKind::Sext(x) => sx(x.eval(env)? & mask(x.ty.width), x.ty.width) as u128,
            ExprKind::Cast(x) => x.eval(env)?,
            ExprKind::Bin(op, a, b) => {
                let (a, b) = (a.eval(env)?, b.eval(env)?);
                match op {
                    BinOp::Add => a.wrapping_add(b),
                    BinOp::Sub => a.wrapping_sub(b),
                    BinOp::And => a & b,
                    BinOp::Or => a | b,
                    BinOp::Xor => a ^ b,
                }
            }
            ExprKind::Mul(a, b) => {
                let (av, bv) = (
                    a.eval(env)? & mask(a.ty.width),
                    b.eval(env)? & mask(b.ty.width),
                );
                if self.ty.signed {
                    sx(av, a.ty.width).wrapping_mul(sx(bv, b.ty.width)) as u128
                } else {
                    av.wrapping_mul(bv)
                }
            }
            ExprKind::Cmp(op, a, b) => {
                let aw = a.ty.width;
                let (av, bv) = (a.eval(env)? & mask(aw), b.eval(env)? & mask(aw));
                let ord = if a.ty.signed {
                    sx(av, aw).cmp(&sx(bv, aw))
                } else {
                    av.cmp(&bv)
                };
                use std::cmp::Ordering::*;
                let r = match op {
                    CmpOp::Eq => ord == Equal,
                    CmpOp::Ne => ord != Equal,
                    CmpOp::Lt => ord == Less,
                    CmpOp::Le => ord != Greater,
                    CmpOp::Gt => ord == Greater,
                    CmpOp::Ge => ord != Less,
                };
                u128::from(r)
            }
            ExprKind::Not(x) => !x.eval(env)?,
            ExprKind::Reduce(op, x) => {
                let xw = x.ty.width;
                let xv = x.eval(env)? & mask(xw);
                u128::from(match op {
                    RedOp::And => xv == mask(xw),
                    RedOp::Or => xv != 0,
                    RedOp::Xor => xv.count_ones() % 2 == 1,
                })
            }
            ExprKind::Mux(s, a, b) => {
                if s.eval(env)? & 1 == 1 {
                    a.eval(env)?
                } else {
                    b.eval(env)?
                }
            }
            ExprKind::Shift(op, x, amt) => {
                let xv = x.eval(env)? & m;
                let n = match amt {
                    ShiftAmount::Const(n) => u128::from(*n),
                    ShiftAmount::Expr(a) => a.eval(env)? & mask(a.ty.width),
                };
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                match op {
                    ShiftOp::Shl => xv.checked_shl(n).unwrap_or(0),
                    ShiftOp::Shr => xv.checked_shr(n).unwrap_or(0),
                    ShiftOp::Sra => (sx(xv, w) >> n.min(127)) as u128,
                }
            }
        };
        Ok(v & m)
    }

    /// Names of all signals this expression reads, in order of appearance.
    pub fn signals(&self, out: &mut Vec<String>) {
        let mut refs = Vec::new();
        self.signal_refs(&mut refs);
        out.extend(refs.into_iter().map(|(n, _)| n));
    }

    /// Names and types of all signal references, in order of appearance.
    pub fn signal_refs(&self, out: &mut Vec<(String, Ty)>) {
        if let ExprKind::Sig(n) = &*self.kind {
            out.push((n.clone(), self.ty));
        }
        for o in self.operands() {
            o.signal_refs(out);
        }
    }
}
