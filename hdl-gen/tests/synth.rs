//! yosys `synth_xilinx -family xcup` on example modules: the signed MAC maps
//! its multiplier to one DSP48E2, the RAM wrappers map to RAMB36E2 and
//! URAM288. Each yosys run (its start-up dominates) synthesizes a wrapper
//! that instantiates the modules under test.

mod common;

use tessera_hdl_gen::examples::{mac, ram_sdp};
use tessera_hdl_gen::ir::{Dir, CLOCK, RESET};
use tessera_hdl_gen::{yosys_synth, Design, Module, RamStyle, SynthOptions};

/// Top `wrap` instantiating each module as `u<k>`, sharing clock and reset
/// and forwarding every other port as `m<k>_<port>`.
fn wrap(mods: Vec<Module>) -> Design {
    let mut top = Module::new("wrap").expect("wrap");
    let clk = top.clock().expect("clk");
    let rst = top.reset().expect("rst");
    let mut d = Design::new("wrap");
    for (k, m) in mods.iter().enumerate() {
        let mut conns = Vec::new();
        for p in m.ports() {
            let e = match (p.name.as_str(), p.dir) {
                (CLOCK, _) => clk.e(),
                (RESET, _) => rst.e(),
                (_, Dir::Input) => top
                    .input(&format!("m{k}_{}", p.name), p.ty)
                    .expect("in")
                    .e(),
                (_, Dir::Output) => {
                    let w = top.wire(&format!("m{k}_{}", &p.name[..p.name.len() - 2]), p.ty);
                    let w = w.expect("wire");
                    let o = top.output(&format!("m{k}_{}", p.name), p.ty).expect("out");
                    top.assign(&o, w.e()).expect("assign");
                    w.e()
                }
            };
            conns.push((p.name.clone(), e));
        }
        let conns: Vec<(&str, _)> = conns.iter().map(|(n, e)| (n.as_str(), e.clone())).collect();
        top.instance(&format!("u{k}"), m, &conns).expect("instance");
    }
    for m in mods {
        d.add(m).expect("add");
    }
    d.add(top).expect("add top");
    d
}

#[test]
fn mac_and_rams_map_to_dsp_bram_uram() {
    let d = wrap(vec![
        mac(8, 24).expect("mac"),
        ram_sdp(1024, 32, RamStyle::Block).expect("bram"),
    ]);
    let (_dir, w) = common::write(&d);
    common::assert_lint_clean(&d);
    let stats = yosys_synth(&w, &SynthOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.cells.get("DSP48E2"), Some(&1), "{stats:?}");
    assert_eq!(stats.dsps(), 1);
    assert_eq!(stats.cells.get("RAMB36E2"), Some(&1), "{stats:?}");
    assert_eq!(stats.brams(), 1);
    assert!(stats.ffs() >= 24 + 1 + 2, "{stats:?}");
    assert!(stats.luts() > 0, "{stats:?}");
    assert!(
        !stats.cells.contains_key("IBUF"),
        "out of context: no I/O buffers"
    );
    assert!(
        !stats.cells.contains_key("BUFG"),
        "out of context: no clock buffer"
    );
}

#[test]
fn ultra_ram_maps_to_uram288() {
    let d = wrap(vec![ram_sdp(4096, 72, RamStyle::Ultra).expect("uram")]);
    let (_dir, w) = common::write(&d);
    let stats = yosys_synth(&w, &SynthOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.cells.get("URAM288"), Some(&1), "{stats:?}");
    assert_eq!(stats.brams(), 0);
}
