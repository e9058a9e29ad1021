//! The netlist IR: modules with ports, wires, registers, assigns, instances
//! and inferred RAMs, and a [`Design`] that groups modules under a top.
//!
//! Naming rules (checked): inputs end in `_i` (active-low: `_ni`), outputs in
//! `_o` (`_no`), the clock is `clk_i`, the synchronous active-low reset is
//! `rst_ni`, a register `x` is the pair `x_q` (flop) / `x_d` (next state).
//! Wires must not use the port or register suffixes. Names starting with
//! `hg_` are reserved for printer temporaries.

use crate::error::HdlError;
use crate::expr::{Expr, ExprKind, Ty};
use std::collections::{BTreeMap, BTreeSet};

type Res<T> = Result<T, HdlError>;

/// Name of the clock port.
pub const CLOCK: &str = "clk_i";
/// Name of the synchronous active-low reset port.
pub const RESET: &str = "rst_ni";

const KEYWORDS: &[&str] = &[
    "always",
    "and",
    "assign",
    "begin",
    "buf",
    "case",
    "casex",
    "casez",
    "default",
    "defparam",
    "disable",
    "edge",
    "else",
    "end",
    "endcase",
    "endfunction",
    "endgenerate",
    "endmodule",
    "endtask",
    "for",
    "force",
    "forever",
    "function",
    "generate",
    "genvar",
    "if",
    "initial",
    "inout",
    "input",
    "integer",
    "localparam",
    "module",
    "nand",
    "negedge",
    "nor",
    "not",
    "or",
    "output",
    "parameter",
    "posedge",
    "reg",
    "repeat",
    "signed",
    "task",
    "time",
    "wait",
    "while",
    "wire",
    "xnor",
    "xor",
    // SystemVerilog and other Verilog keywords, so names stay portable.
    "alias",
    "always_comb",
    "always_ff",
    "always_latch",
    "assert",
    "assume",
    "automatic",
    "before",
    "bind",
    "bins",
    "binsof",
    "bit",
    "break",
    "bufif0",
    "bufif1",
    "byte",
    "cell",
    "chandle",
    "class",
    "clocking",
    "cmos",
    "config",
    "const",
    "constraint",
    "context",
    "continue",
    "cover",
    "covergroup",
    "coverpoint",
    "cross",
    "deassign",
    "design",
    "dist",
    "do",
    "endconfig",
    "endprimitive",
    "endspecify",
    "endtable",
    "enum",
    "event",
    "export",
    "extends",
    "extern",
    "final",
    "first_match",
    "foreach",
    "fork",
    "forkjoin",
    "global",
    "highz0",
    "highz1",
    "iff",
    "ignore_bins",
    "illegal_bins",
    "import",
    "inside",
    "instance",
    "int",
    "interface",
    "intersect",
    "join",
    "join_any",
    "join_none",
    "large",
    "liblist",
    "library",
    "local",
    "logic",
    "longint",
    "matches",
    "medium",
    "modport",
    "new",
    "nmos",
    "notif0",
    "notif1",
    "null",
    "package",
    "packed",
    "pmos",
    "primitive",
    "priority",
    "program",
    "property",
    "protected",
    "pull0",
    "pull1",
    "pulldown",
    "pullup",
    "pure",
    "rand",
    "randc",
    "randcase",
    "randsequence",
    "rcmos",
    "real",
    "realtime",
    "ref",
    "release",
    "return",
    "rnmos",
    "rpmos",
    "rtran",
    "rtranif0",
    "rtranif1",
    "scalared",
    "sequence",
    "shortint",
    "shortreal",
    "small",
    "solve",
    "specify",
    "specparam",
    "static",
    "string",
    "strong0",
    "strong1",
    "struct",
    "super",
    "supply0",
    "supply1",
    "table",
    "tagged",
    "this",
    "throughout",
    "timeprecision",
    "timeunit",
    "tran",
    "tranif0",
    "tranif1",
    "tri",
    "trireg",
    "type",
    "typedef",
    "union",
    "unique",
    "use",
    "var",
    "vectored",
    "virtual",
    "void",
    "wait_order",
    "wand",
    "weak0",
    "weak1",
    "wildcard",
    "with",
    "within",
    "wor",
];

/// Checks that `name` is a plain lower-case Verilog identifier.
pub fn check_identifier(name: &str) -> Res<()> {
    let mut chars = name.chars();
    let ok_first = matches!(chars.next(), Some('a'..='z'));
    let ok_rest = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if !ok_first || !ok_rest {
        return Err(HdlError::new(format!(
            "bad identifier {name:?}: use lower case letters, digits and '_', starting with a letter"
        )));
    }
    if KEYWORDS.contains(&name) {
        return Err(HdlError::new(format!(
            "bad identifier {name:?}: Verilog keyword"
        )));
    }
    if name.starts_with("hg_") {
        return Err(HdlError::new(format!(
            "bad identifier {name:?}: prefix hg_ is reserved for generated temporaries"
        )));
    }
    Ok(())
}

/// Port direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// `input wire`
    Input,
    /// `output wire`
    Output,
}

/// A module port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port name (`*_i` or `*_o`).
    pub name: String,
    /// Direction.
    pub dir: Dir,
    /// Type.
    pub ty: Ty,
}

/// A handle to a named signal of one module (port, wire, `_q` or `_d`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signal {
    name: String,
    ty: Ty,
}

impl Signal {
    /// Signal name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Signal type.
    pub fn ty(&self) -> Ty {
        self.ty
    }
    /// Expression reading the signal.
    pub fn e(&self) -> Expr {
        Expr::new(ExprKind::Sig(self.name.clone()), self.ty)
    }
}

impl From<&Signal> for Expr {
    fn from(s: &Signal) -> Expr {
        s.e()
    }
}

/// A module-local constant, printed as `localparam integer NAME = value;`.
/// A parameter is only printed where it is used: as the width of a wire or
/// register declaration (an unused one is an error, as Verilator's
/// UNUSEDPARAM would flag it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    name: String,
    value: i64,
}

impl Param {
    /// Parameter name (upper case).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Parameter value.
    pub fn value(&self) -> i64 {
        self.value
    }
    /// Unsigned declaration type whose width is this parameter.
    pub fn u(&self) -> DeclTy {
        self.decl(false)
    }
    /// Signed declaration type whose width is this parameter.
    pub fn s(&self) -> DeclTy {
        self.decl(true)
    }
    fn decl(&self, signed: bool) -> DeclTy {
        DeclTy {
            ty: Ty {
                width: u32::try_from(self.value).unwrap_or(0),
                signed,
            },
            width_param: Some(self.name.clone()),
        }
    }
}

/// Type of a declaration, optionally printed with a parameter as its width
/// (`wire [WIDTH-1:0] x;`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclTy {
    /// The type.
    pub ty: Ty,
    /// Parameter naming the width.
    pub width_param: Option<String>,
}

impl From<Ty> for DeclTy {
    fn from(ty: Ty) -> DeclTy {
        DeclTy {
            ty,
            width_param: None,
        }
    }
}

/// Register reset behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// No reset (datapath registers; lets DSP/BRAM registers absorb them).
    None,
    /// Synchronous reset to this value when `rst_ni` is low.
    Value(i128),
}

/// A register: the flop `x_q` and its next-state wire `x_d`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reg {
    /// The flop output `x_q`.
    pub q: Signal,
    /// The next-state wire `x_d` (assign it exactly once).
    pub d: Signal,
}

/// A declared wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireDecl {
    /// The wire.
    pub signal: Signal,
    /// Width parameter, if any.
    pub width_param: Option<String>,
}

/// A declared register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegDecl {
    /// The register.
    pub reg: Reg,
    /// Reset constant (`None` for no reset).
    pub reset: Option<Expr>,
    /// Registers of one group print as one `always` block.
    pub group: String,
    /// Width parameter, if any.
    pub width_param: Option<String>,
}

/// Vivado `ram_style` attribute for an inferred RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamStyle {
    /// No attribute: let the tool choose.
    Auto,
    /// `(* ram_style = "block" *)` (BRAM).
    Block,
    /// `(* ram_style = "ultra" *)` (URAM).
    Ultra,
    /// `(* ram_style = "distributed" *)` (LUTRAM).
    Distributed,
}

/// An inferred simple dual-port RAM: one write port, one synchronous read
/// port, both on `clk_i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ram {
    /// Base name; the array is `<name>_mem`.
    pub name: String,
    /// Number of words (>= 2).
    pub depth: u32,
    /// Word width.
    pub width: u32,
    /// Attribute.
    pub style: RamStyle,
    /// Write enable wire `<name>_we` (u1).
    pub we: Signal,
    /// Write address wire `<name>_waddr`.
    pub waddr: Signal,
    /// Write data wire `<name>_wdata`.
    pub wdata: Signal,
    /// Read address wire `<name>_raddr`.
    pub raddr: Signal,
    /// Registered read data `<name>_rdata_q` (one cycle after `raddr`).
    pub rdata: Signal,
}

/// Bits needed to address `depth` words (at least 1).
pub fn addr_width(depth: u32) -> u32 {
    let mut w = 1;
    while (1u64 << w) < depth as u64 {
        w += 1;
    }
    w
}

/// An instance of another module with named port connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Instantiated module name.
    pub module: String,
    /// Instance name (`u_*`).
    pub name: String,
    /// Snapshot of the instantiated module's ports (checked again by [`Design`]).
    pub ports: Vec<Port>,
    /// One expression per port, in port order. Output ports connect to wires.
    pub conns: Vec<Expr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Input,
    Output,
    Wire,
    RegQ,
    RegD,
    Other,
}

/// A hardware module.
#[derive(Clone, Debug)]
pub struct Module {
    name: String,
    comments: Vec<String>,
    params: Vec<Param>,
    ports: Vec<Port>,
    wires: Vec<WireDecl>,
    regs: Vec<RegDecl>,
    assigns: Vec<(Signal, Expr)>,
    instances: Vec<Instance>,
    rams: Vec<Ram>,
    kinds: BTreeMap<String, (Kind, Ty)>,
    driven: BTreeSet<String>,
    used_params: BTreeSet<String>,
}

impl Module {
    /// New empty module; `name` must be a valid identifier.
    pub fn new(name: &str) -> Res<Module> {
        check_identifier(name)?;
        Ok(Module {
            name: name.to_string(),
            comments: Vec::new(),
            params: Vec::new(),
            ports: Vec::new(),
            wires: Vec::new(),
            regs: Vec::new(),
            assigns: Vec::new(),
            instances: Vec::new(),
            rams: Vec::new(),
            kinds: BTreeMap::new(),
            driven: BTreeSet::new(),
            used_params: BTreeSet::new(),
        })
    }

    fn err(&self, msg: impl Into<String>) -> HdlError {
        HdlError::new(msg).context(format!("module {}", self.name))
    }

    fn declare(&mut self, name: &str, kind: Kind, ty: Ty) -> Res<()> {
        if ty.width == 0 {
            return Err(self.err(format!("{name}: width must be at least 1")));
        }
        if self.kinds.contains_key(name) {
            return Err(self.err(format!("{name}: name already declared")));
        }
        self.kinds.insert(name.to_string(), (kind, ty));
        Ok(())
    }

    fn use_param(&mut self, decl: &DeclTy) -> Res<()> {
        if let Some(p) = &decl.width_param {
            let param = self
                .params
                .iter()
                .find(|q| &q.name == p)
                .ok_or_else(|| self.err(format!("parameter {p} is not declared")))?;
            if param.value < 1 || param.value > i64::from(u32::MAX) {
                return Err(self.err(format!("parameter {p} = {} cannot be a width", param.value)));
            }
            self.used_params.insert(p.clone());
        }
        Ok(())
    }

    /// Module name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Ports in declaration order.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }
    /// Parameters in declaration order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    /// Comment lines printed above the module.
    pub fn comments(&self) -> &[String] {
        &self.comments
    }
    /// Wires in declaration order.
    pub fn wires(&self) -> &[WireDecl] {
        &self.wires
    }
    /// Registers in declaration order.
    pub fn regs(&self) -> &[RegDecl] {
        &self.regs
    }
    /// Continuous assigns in order.
    pub fn assigns(&self) -> &[(Signal, Expr)] {
        &self.assigns
    }
    /// Instances in order.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }
    /// RAMs in order.
    pub fn rams(&self) -> &[Ram] {
        &self.rams
    }

    /// Add a comment line printed above the module.
    pub fn comment(&mut self, line: &str) {
        self.comments.push(line.to_string());
    }

    /// Declare a `localparam integer`; `name` is upper case.
    pub fn param(&mut self, name: &str, value: i64) -> Res<Param> {
        let ok = name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(self.err(format!("parameter {name:?}: use UPPER_CASE")));
        }
        if self.params.iter().any(|p| p.name == name) {
            return Err(self.err(format!("parameter {name} already declared")));
        }
        let p = Param {
            name: name.to_string(),
            value,
        };
        self.params.push(p.clone());
        Ok(p)
    }

    fn port(&mut self, name: &str, dir: Dir, ty: Ty) -> Res<Signal> {
        check_identifier(name)?;
        let ok = match dir {
            Dir::Input => name.ends_with("_i"),
            Dir::Output => name.ends_with("_o"),
        } || name.ends_with(if dir == Dir::Input { "_ni" } else { "_no" });
        if !ok {
            let suffix = if dir == Dir::Input {
                "_i (or _ni)"
            } else {
                "_o (or _no)"
            };
            return Err(self.err(format!("port {name}: name must end in {suffix}")));
        }
        let kind = if dir == Dir::Input {
            Kind::Input
        } else {
            Kind::Output
        };
        self.declare(name, kind, ty)?;
        self.ports.push(Port {
            name: name.to_string(),
            dir,
            ty,
        });
        if dir == Dir::Input {
            self.driven.insert(name.to_string());
        }
        Ok(Signal {
            name: name.to_string(),
            ty,
        })
    }

    /// Declare an input port (`*_i`).
    pub fn input(&mut self, name: &str, ty: Ty) -> Res<Signal> {
        if name == CLOCK || name == RESET {
            return Err(self.err(format!("{name}: use clock() / reset()")));
        }
        self.port(name, Dir::Input, ty)
    }
    /// Declare an output port (`*_o`).
    pub fn output(&mut self, name: &str, ty: Ty) -> Res<Signal> {
        self.port(name, Dir::Output, ty)
    }
    /// Declare the clock input `clk_i`.
    pub fn clock(&mut self) -> Res<Signal> {
        self.port(CLOCK, Dir::Input, Ty::bit())
    }
    /// Declare the synchronous active-low reset input `rst_ni`.
    pub fn reset(&mut self) -> Res<Signal> {
        self.port(RESET, Dir::Input, Ty::bit())
    }
    fn has(&self, name: &str) -> bool {
        self.kinds.contains_key(name)
    }

    /// Declare a wire. Names must not end in `_i`, `_o`, `_q` or `_d`.
    pub fn wire(&mut self, name: &str, ty: impl Into<DeclTy>) -> Res<Signal> {
        let decl = ty.into();
        check_identifier(name)?;
        for suffix in ["_i", "_o", "_q", "_d"] {
            if name.ends_with(suffix) {
                return Err(self.err(format!(
                    "wire {name}: suffix {suffix} is reserved for ports and registers"
                )));
            }
        }
        self.use_param(&decl)?;
        self.declare(name, Kind::Wire, decl.ty)?;
        let signal = Signal {
            name: name.to_string(),
            ty: decl.ty,
        };
        self.wires.push(WireDecl {
            signal: signal.clone(),
            width_param: decl.width_param,
        });
        Ok(signal)
    }

    /// Declare a wire and assign `e` to it.
    pub fn wire_of(&mut self, name: &str, e: Expr) -> Res<Signal> {
        let w = self.wire(name, e.ty())?;
        self.assign(&w, e)?;
        Ok(w)
    }

    /// Declare register `base` (`base_q` / `base_d`) in its own always block.
    pub fn reg(&mut self, base: &str, ty: impl Into<DeclTy>, reset: Reset) -> Res<Reg> {
        self.reg_in(base, base, ty, reset)
    }

    /// Declare register `base` in register group `group`: all registers of a
    /// group print as one `always` block and must agree on having a reset.
    pub fn reg_in(
        &mut self,
        group: &str,
        base: &str,
        ty: impl Into<DeclTy>,
        reset: Reset,
    ) -> Res<Reg> {
        let decl = ty.into();
        check_identifier(base)?;
        if !self.has(CLOCK) {
            return Err(self.err(format!(
                "register {base}: module has no {CLOCK} port; call clock() first"
            )));
        }
        let reset = match reset {
            Reset::None => None,
            Reset::Value(v) => {
                if !self.has(RESET) {
                    return Err(self.err(format!(
                        "register {base}: module has no {RESET} port; call reset() first"
                    )));
                }
                Some(Expr::constant(decl.ty, v).map_err(|e| self.err(format!("{base}: {e}")))?)
            }
        };
        if let Some(other) = self.regs.iter().find(|r| r.group == group) {
            if other.reset.is_some() != reset.is_some() {
                return Err(self.err(format!(
                    "register {base}: group {group} mixes registers with and without reset"
                )));
            }
        }
        self.use_param(&decl)?;
        let q = format!("{base}_q");
        let d = format!("{base}_d");
        check_identifier(&q)?;
        if self.has(&q) || self.has(&d) {
            return Err(self.err(format!("register {base}: {q} or {d} already declared")));
        }
        self.declare(&q, Kind::RegQ, decl.ty)?;
        self.declare(&d, Kind::RegD, decl.ty)?;
        self.driven.insert(q.clone());
        let reg = Reg {
            q: Signal {
                name: q,
                ty: decl.ty,
            },
            d: Signal {
                name: d,
                ty: decl.ty,
            },
        };
        self.regs.push(RegDecl {
            reg: reg.clone(),
            reset,
            group: group.to_string(),
            width_param: decl.width_param,
        });
        Ok(reg)
    }

    fn check_reads(&self, what: &str, e: &Expr) -> Res<()> {
        let mut refs = Vec::new();
        e.signal_refs(&mut refs);
        for (n, ty) in refs {
            match self.kinds.get(&n) {
                None => {
                    return Err(self.err(format!("{what}: reads unknown signal {n}")));
                }
                Some((Kind::Other, _)) => {
                    return Err(self.err(format!("{what}: {n} is not a signal")));
                }
                Some((_, declared)) if *declared != ty => {
                    return Err(self.err(format!(
                        "{what}: {n} is declared {declared}, the handle says {ty} (handle from another module?)"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn drive(&mut self, target: &Signal, what: &str) -> Res<()> {
        match self.kinds.get(&target.name) {
            None => Err(self.err(format!("{what}: unknown signal {}", target.name))),
            Some((kind, ty)) => {
                if *ty != target.ty {
                    return Err(self.err(format!(
                        "{what}: signal {} has type {ty}, handle says {}",
                        target.name, target.ty
                    )));
                }
                match kind {
                    Kind::Output | Kind::Wire | Kind::RegD => {}
                    Kind::Input => {
                        return Err(self.err(format!("{what}: cannot drive input {}", target.name)))
                    }
                    Kind::RegQ => {
                        return Err(self.err(format!(
                            "{what}: cannot drive register output {}; assign its _d",
                            target.name
                        )))
                    }
                    Kind::Other => {
                        return Err(self.err(format!("{what}: {} is not a signal", target.name)))
                    }
                }
                if !self.driven.insert(target.name.clone()) {
                    return Err(self.err(format!("{what}: {} is already driven", target.name)));
                }
                Ok(())
            }
        }
    }

    /// `assign target = e;` — types must match exactly; each wire, output and
    /// `_d` is driven exactly once.
    pub fn assign(&mut self, target: &Signal, e: Expr) -> Res<()> {
        let what = format!("assign {}", target.name);
        if e.ty() != target.ty {
            return Err(self.err(format!(
                "{what}: type mismatch: target is {}, value is {}",
                target.ty,
                e.ty()
            )));
        }
        self.check_reads(&what, &e)?;
        self.drive(target, &what)?;
        self.assigns.push((target.clone(), e));
        Ok(())
    }

    /// Instantiate `module` as `inst` with named connections `(port, expr)`.
    /// Every port must be connected exactly once, with the port's exact
    /// type; outputs must connect to plain wires of this module.
    pub fn instance(&mut self, inst: &str, module: &Module, conns: &[(&str, Expr)]) -> Res<()> {
        check_identifier(inst)?;
        let what = format!("instance {inst} of {}", module.name);
        let mut by_name: BTreeMap<&str, &Expr> = BTreeMap::new();
        for (port, e) in conns {
            if by_name.insert(port, e).is_some() {
                return Err(self.err(format!("{what}: port {port} connected twice")));
            }
            if !module.ports.iter().any(|p| p.name == *port) {
                return Err(self.err(format!("{what}: module has no port {port}")));
            }
        }
        let mut ordered = Vec::new();
        for p in &module.ports {
            let e = by_name
                .get(p.name.as_str())
                .ok_or_else(|| self.err(format!("{what}: port {} is not connected", p.name)))?;
            if e.ty() != p.ty {
                return Err(self.err(format!(
                    "{what}: port {} is {}, connection is {}",
                    p.name,
                    p.ty,
                    e.ty()
                )));
            }
            self.check_reads(&what, e)?;
            if p.dir == Dir::Output {
                let name = e.as_signal_name().ok_or_else(|| {
                    self.err(format!(
                        "{what}: output port {} must connect to a wire",
                        p.name
                    ))
                })?;
                if self.kinds.get(name).map(|k| k.0) != Some(Kind::Wire) {
                    return Err(self.err(format!(
                        "{what}: output port {} must connect to a wire, {name} is not one",
                        p.name
                    )));
                }
            }
            ordered.push((*e).clone());
        }
        for (p, e) in module.ports.iter().zip(&ordered) {
            if p.dir == Dir::Output {
                let sig = Signal {
                    name: e.as_signal_name().unwrap_or_default().to_string(),
                    ty: p.ty,
                };
                self.drive(&sig, &what)?;
            }
        }
        self.declare(inst, Kind::Other, Ty::bit())?;
        self.instances.push(Instance {
            module: module.name.clone(),
            name: inst.to_string(),
            ports: module.ports.clone(),
            conns: ordered,
        });
        Ok(())
    }

    /// Add an inferred RAM `name` with `depth` words of `width` bits.
    /// Declares the wires `<name>_we`, `<name>_waddr`, `<name>_wdata`,
    /// `<name>_raddr` (assign them) and the read register `<name>_rdata_q`.
    pub fn ram(&mut self, name: &str, depth: u32, width: u32, style: RamStyle) -> Res<Ram> {
        check_identifier(name)?;
        if !self.has(CLOCK) {
            return Err(self.err(format!(
                "ram {name}: module has no {CLOCK} port; call clock() first"
            )));
        }
        if depth < 2 || width == 0 {
            return Err(self.err(format!("ram {name}: depth must be >= 2 and width >= 1")));
        }
        let aw = addr_width(depth);
        let we = self.wire(&format!("{name}_we"), Ty::bit())?;
        let waddr = self.wire(&format!("{name}_waddr"), Ty::u(aw))?;
        let wdata = self.wire(&format!("{name}_wdata"), Ty::u(width))?;
        let raddr = self.wire(&format!("{name}_raddr"), Ty::u(aw))?;
        let rname = format!("{name}_rdata_q");
        self.declare(&rname, Kind::RegQ, Ty::u(width))?;
        self.driven.insert(rname.clone());
        self.declare(&format!("{name}_mem"), Kind::Other, Ty::u(width))?;
        let ram = Ram {
            name: name.to_string(),
            depth,
            width,
            style,
            we,
            waddr,
            wdata,
            raddr,
            rdata: Signal {
                name: rname,
                ty: Ty::u(width),
            },
        };
        self.rams.push(ram.clone());
        Ok(ram)
    }

    /// Check the module is complete: every output, wire and `_d` driven,
    /// every parameter used.
    pub fn check(&self) -> Res<()> {
        for (name, (kind, _)) in &self.kinds {
            if matches!(kind, Kind::Output | Kind::Wire | Kind::RegD) && !self.driven.contains(name)
            {
                return Err(self.err(format!("{name} is never driven")));
            }
        }
        for p in &self.params {
            if !self.used_params.contains(&p.name) {
                return Err(self.err(format!(
                    "parameter {} is not used as a declaration width",
                    p.name
                )));
            }
        }
        Ok(())
    }
}

/// A set of modules with a top.
#[derive(Clone, Debug)]
pub struct Design {
    top: String,
    modules: BTreeMap<String, Module>,
    header: Vec<String>,
}

impl Design {
    /// New design whose top module will be `top`.
    pub fn new(top: &str) -> Design {
        Design {
            top: top.to_string(),
            modules: BTreeMap::new(),
            header: Vec::new(),
        }
    }
    /// Top module name.
    pub fn top(&self) -> &str {
        &self.top
    }
    /// Extra header comment lines (config name, hash, ...).
    pub fn header(&self) -> &[String] {
        &self.header
    }
    /// Add a header comment line printed in every file.
    pub fn header_line(&mut self, line: &str) {
        self.header.push(line.to_string());
    }
    /// Add a checked module; names must be unique.
    pub fn add(&mut self, module: Module) -> Res<()> {
        module.check()?;
        if self.modules.contains_key(&module.name) {
            return Err(HdlError::new(format!(
                "design: module {} added twice",
                module.name
            )));
        }
        self.modules.insert(module.name.clone(), module);
        Ok(())
    }
    /// Module by name.
    pub fn module(&self, name: &str) -> Option<&Module> {
        self.modules.get(name)
    }

    /// Modules reachable from the top, dependencies first, top last.
    /// Checks that every instantiated module exists with the ports the
    /// instance was built against, and that there is no recursion.
    pub fn ordered(&self) -> Res<Vec<&Module>> {
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        let mut stack = Vec::new();
        self.visit(&self.top, &mut done, &mut stack, &mut out)?;
        Ok(out)
    }

    fn visit<'a>(
        &'a self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<&'a Module>,
    ) -> Res<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(HdlError::new(format!(
                "design: module {name} instantiates itself (via {})",
                stack.join(" -> ")
            )));
        }
        let m = self
            .modules
            .get(name)
            .ok_or_else(|| HdlError::new(format!("design: module {name} not in design")))?;
        stack.push(name.to_string());
        for inst in &m.instances {
            let sub = self.modules.get(&inst.module).ok_or_else(|| {
                HdlError::new(format!(
                    "design: {name}.{} instantiates {}, which is not in the design",
                    inst.name, inst.module
                ))
            })?;
            if sub.ports != inst.ports {
                return Err(HdlError::new(format!(
                    "design: {name}.{} was built against other ports of {}",
                    inst.name, inst.module
                )));
            }
            self.visit(&inst.module, done, stack, out)?;
        }
        stack.pop();
        done.insert(name.to_string());
        out.push(m);
        Ok(())
    }
}
