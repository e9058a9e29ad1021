//! yosys `synth_xilinx -family xcup` on example modules: the signed MAC maps
//! its multiplier to one DSP48E2, the RAM wrappers map to BRAM/URAM.

mod common;

use tessera_hdl_gen::examples::{mac, ram_sdp, single};
use tessera_hdl_gen::{yosys_synth, RamStyle, SynthOptions};

#[test]
fn mac_maps_to_one_dsp48e2() {
    let (_dir, w) = common::write(&single(mac(8, 24).expect("mac")).expect("design"));
    let stats = yosys_synth(&w, &SynthOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.dsps(), 1, "{stats:?}");
    assert_eq!(stats.cells.get("DSP48E2"), Some(&1), "{stats:?}");
    assert!(stats.ffs() >= 24 + 1 + 2, "{stats:?}");
    assert!(stats.luts() > 0, "{stats:?}");
    assert_eq!(stats.brams(), 0);
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
fn block_ram_maps_to_ramb36e2() {
    let (_dir, w) =
        common::write(&single(ram_sdp(1024, 32, RamStyle::Block).expect("ram")).expect("design"));
    let stats = yosys_synth(&w, &SynthOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.cells.get("RAMB36E2"), Some(&1), "{stats:?}");
    assert_eq!(stats.brams(), 1);
    assert_eq!(stats.luts(), 0, "{stats:?}");
}

#[test]
fn ultra_ram_maps_to_uram288() {
    let (_dir, w) =
        common::write(&single(ram_sdp(4096, 72, RamStyle::Ultra).expect("ram")).expect("design"));
    let stats = yosys_synth(&w, &SynthOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.urams(), 1, "{stats:?}");
}
