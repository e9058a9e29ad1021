//! A cycle-level interpreter for one flat module (no instances): settles the
//! continuous assigns with [`Expr::eval`](crate::expr::Expr::eval), then
//! applies a `clk_i` rising edge to registers and RAMs. It gives the IR's
//! meaning for sequential logic, so printed Verilog can be checked against
//! it and generated blocks can be unit-tested without a Verilog simulator.
//! Values are bit patterns of at most 128 bits.

use crate::error::HdlError;
use crate::expr::{Expr, MAX_CONST_WIDTH};
use crate::ir::{Module, RESET};
use std::collections::BTreeMap;

type Res<T> = Result<T, HdlError>;

/// Values of named signals (bit patterns).
pub type Values = BTreeMap<String, u128>;

/// Interpreter state for one module.
#[derive(Debug, Clone)]
pub struct Interp<'a> {
    module: &'a Module,
    order: Vec<usize>,
    state: Values,
    mems: BTreeMap<String, Vec<u128>>,
}

fn mask(width: u32) -> u128 {
    if width >= 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    }
}

impl<'a> Interp<'a> {
    /// Prepare `module`: orders its assigns, all registers and RAM words
    /// start at zero. Errors on instances, widths above 128 bits and
    /// combinational loops.
    pub fn new(module: &'a Module) -> Res<Interp<'a>> {
        module.check()?;
        let err = |m: String| HdlError::new(m).context(format!("interp {}", module.name()));
        if !module.instances().is_empty() {
            return Err(err("modules with instances are not supported".into()));
        }
        let too_wide = module.ports().iter().any(|p| p.ty.width > MAX_CONST_WIDTH)
            || module
                .assigns()
                .iter()
                .any(|(t, _)| t.ty().width > MAX_CONST_WIDTH)
            || module
                .regs()
                .iter()
                .any(|r| r.reg.q.ty().width > MAX_CONST_WIDTH)
            || module.rams().iter().any(|r| r.width > MAX_CONST_WIDTH);
        if too_wide {
            return Err(err(format!(
                "widths above {MAX_CONST_WIDTH} bits are not supported"
            )));
        }
        // Topological order of assigns (depth-first on the signals they read).
        let by_target: BTreeMap<&str, usize> = module
            .assigns()
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.name(), i))
            .collect();
        let mut order = Vec::new();
        let mut mark = vec![0u8; module.assigns().len()]; // 0 new, 1 open, 2 done
        fn visit(
            i: usize,
            m: &Module,
            by_target: &BTreeMap<&str, usize>,
            mark: &mut [u8],
            order: &mut Vec<usize>,
        ) -> Result<(), String> {
            match mark[i] {
                2 => return Ok(()),
                1 => {
                    return Err(format!(
                        "combinational loop through {}",
                        m.assigns()[i].0.name()
                    ))
                }
                _ => {}
            }
            mark[i] = 1;
            let mut reads = Vec::new();
            m.assigns()[i].1.signals(&mut reads);
            for r in reads {
                if let Some(&j) = by_target.get(r.as_str()) {
                    visit(j, m, by_target, mark, order)?;
                }
            }
            mark[i] = 2;
            order.push(i);
            Ok(())
        }
        for i in 0..module.assigns().len() {
            visit(i, module, &by_target, &mut mark, &mut order).map_err(err)?;
        }
        let mut state = Values::new();
        for r in module.regs() {
            state.insert(r.reg.q.name().to_string(), 0);
        }
        let mut mems = BTreeMap::new();
        for ram in module.rams() {
            state.insert(ram.rdata.name().to_string(), 0);
            mems.insert(ram.name.clone(), vec![0u128; ram.depth as usize]);
        }
        Ok(Interp {
            module,
            order,
            state,
            mems,
        })
    }

    /// Current register and RAM-read values.
    pub fn state(&self) -> &Values {
        &self.state
    }

    /// Set a register (`x_q`) or RAM read register directly.
    pub fn set_state(&mut self, name: &str, value: u128) -> Res<()> {
        match self.state.get_mut(name) {
            Some(v) => {
                *v = value;
                Ok(())
            }
            None => Err(HdlError::new(format!("interp: no register {name}"))),
        }
    }

    /// Settle the combinational logic for `inputs` (every input port must be
    /// given) and return the value of every signal.
    pub fn settle(&self, inputs: &Values) -> Res<Values> {
        let mut v = self.state.clone();
        for p in self.module.ports() {
            if p.dir == crate::ir::Dir::Input {
                let x = inputs.get(&p.name).ok_or_else(|| {
                    HdlError::new(format!("interp: no value for input {}", p.name))
                })?;
                v.insert(p.name.clone(), x & mask(p.ty.width));
            }
        }
        for &i in &self.order {
            let (target, e): &(crate::ir::Signal, Expr) = &self.module.assigns()[i];
            let x = e.eval(&|n| v.get(n).copied())?;
            v.insert(target.name().to_string(), x);
        }
        Ok(v)
    }

    /// One clock cycle: settle with `inputs`, return the settled values
    /// (what is visible before the edge), then apply the rising edge.
    pub fn step(&mut self, inputs: &Values) -> Res<Values> {
        let v = self.settle(inputs)?;
        let get = |n: &str| {
            v.get(n)
                .copied()
                .ok_or_else(|| HdlError::new(format!("interp: {n} has no value")))
        };
        let in_reset = v.get(RESET).is_some_and(|r| r & 1 == 0);
        let mut next = self.state.clone();
        for r in self.module.regs() {
            let value = match (&r.reset, in_reset) {
                (Some(c), true) => c.eval(&|_| None)?,
                _ => get(r.reg.d.name())?,
            };
            next.insert(r.reg.q.name().to_string(), value);
        }
        for ram in self.module.rams() {
            let mem = self
                .mems
                .get_mut(&ram.name)
                .ok_or_else(|| HdlError::new("interp: ram state missing"))?;
            let raddr = get(ram.raddr.name())? as usize;
            // Verilog leaves out-of-range reads undefined; we read zero.
            next.insert(
                ram.rdata.name().to_string(),
                mem.get(raddr).copied().unwrap_or(0),
            );
            if get(ram.we.name())? & 1 == 1 {
                let waddr = get(ram.waddr.name())? as usize;
                if let Some(w) = mem.get_mut(waddr) {
                    *w = get(ram.wdata.name())?;
                }
            }
        }
        self.state = next;
        Ok(v)
    }
}
