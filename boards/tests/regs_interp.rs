//! The AXI4-Lite register block run cycle by cycle with hdl-gen's IR interpreter: ID and hash
//! reads, command FIFO push through CMD_LO/CMD_HI, FIFO full/overflow, counters, tlast.

use std::collections::BTreeMap;

use tessera_boards::regs::{RegMap, CMD_FIFO_DEPTH, ID_VALUE};
use tessera_boards::wrapper::regs_module;
use tessera_golden::config::EngineConfig;
use tessera_hdl_gen::{Interp, Module};

struct Bus<'a> {
    sim: Interp<'a>,
    inputs: BTreeMap<String, u128>,
    map: RegMap,
}

impl<'a> Bus<'a> {
    fn new(m: &'a Module, map: RegMap) -> Bus<'a> {
        let mut inputs = BTreeMap::new();
        for p in m.ports() {
            if p.name.ends_with("_i") || p.name.ends_with("_ni") {
                inputs.insert(p.name.clone(), 0);
            }
        }
        let mut b = Bus {
            sim: Interp::new(m).expect("interp"),
            inputs,
            map,
        };
        b.step(); // reset (rst_ni = 0)
        b.set("rst_ni", 1);
        b
    }
    fn set(&mut self, n: &str, v: u128) {
        *self
            .inputs
            .get_mut(n)
            .unwrap_or_else(|| panic!("no input {n}")) = v;
    }
    fn step(&mut self) -> BTreeMap<String, u128> {
        self.sim.step(&self.inputs).expect("step")
    }
    fn peek(&self) -> BTreeMap<String, u128> {
        self.sim.settle(&self.inputs).expect("settle")
    }
    fn write(&mut self, reg: &str, v: u32) {
        let a = u128::from(self.map.get(reg).offset);
        self.set("s_axil_awaddr_i", a);
        self.set("s_axil_wdata_i", u128::from(v));
        self.set("s_axil_awvalid_i", 1);
        self.set("s_axil_wvalid_i", 1);
        self.set("s_axil_bready_i", 1);
        let v = self.step();
        assert_eq!(v["s_axil_awready_o"], 1);
        assert_eq!(v["s_axil_wready_o"], 1);
        self.set("s_axil_awvalid_i", 0);
        self.set("s_axil_wvalid_i", 0);
        let v = self.step();
        assert_eq!(v["s_axil_bvalid_o"], 1);
        assert_eq!(v["s_axil_bresp_o"], 0);
    }
    fn read(&mut self, reg: &str) -> u32 {
        let a = u128::from(self.map.get(reg).offset);
        self.set("s_axil_araddr_i", a);
        self.set("s_axil_arvalid_i", 1);
        self.set("s_axil_rready_i", 1);
        let v = self.step();
        assert_eq!(v["s_axil_arready_o"], 1);
        self.set("s_axil_arvalid_i", 0);
        let v = self.step();
        assert_eq!(v["s_axil_rvalid_o"], 1);
        u32::try_from(v["s_axil_rdata_o"]).expect("32 bits")
    }
}

#[test]
fn register_block_behaves() {
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let map = RegMap::new(&cfg);
    let m = regs_module(&cfg, &map).expect("module");
    let mut b = Bus::new(&m, map.clone());
    assert_eq!(b.read("ID"), ID_VALUE);
    assert_eq!(b.read("VERSION"), 1);
    let h = u64::from(b.read("HASH_LO")) | (u64::from(b.read("HASH_HI")) << 32);
    assert_eq!(format!("{h:012x}"), cfg.derive().config_hash);
    assert_eq!(b.read("ARRAY") & 0xffff, 4 | (4 << 8));
    assert_eq!(b.read("CLOCK_MHZ"), cfg.clock.target_mhz);
    // Empty FIFO, idle engine.
    let st = b.read("STATUS");
    assert_eq!(st & 0b1_1111, 0b0_1000, "empty, not busy: {st:#x}");

    // Push one command: the engine side sees it; it stays until cmd_ready.
    b.write("CMD_LO", 0x89ab_cdef);
    b.write("CMD_HI", 0x0123_4567);
    let v = b.peek();
    assert_eq!(v["cmd_valid_o"], 1);
    assert_eq!(v["cmd_data_o"], 0x0123_4567_89ab_cdef);
    assert_eq!(b.read("STATUS") & 1, 1, "commands pending count as busy");
    b.set("cmd_ready_i", 1);
    b.step();
    b.set("cmd_ready_i", 0);
    assert_eq!(b.peek()["cmd_valid_o"], 0);
    assert_eq!(b.read("CMD_COUNT"), 1);

    // Fill the FIFO, then overflow it; commands come out in order.
    for i in 0..=CMD_FIFO_DEPTH {
        b.write("CMD_LO", i);
        b.write("CMD_HI", 0);
    }
    let st = b.read("STATUS");
    assert_eq!((st >> 8) & 0xff, CMD_FIFO_DEPTH, "level: {st:#x}");
    assert_eq!(st & 0b1_0100, 0b1_0100, "full and overflow: {st:#x}");
    for i in 0..CMD_FIFO_DEPTH {
        assert_eq!(b.peek()["cmd_data_o"], u128::from(i));
        b.set("cmd_ready_i", 1);
        b.step();
        b.set("cmd_ready_i", 0);
    }
    b.write("CONTROL", 0b10);
    assert_eq!(
        b.read("STATUS") & 0b1_1100,
        0b0_1000,
        "empty, overflow cleared"
    );

    // tlast every DOUT_BURST beats; beats counted.
    b.write("DOUT_BURST", 3);
    b.set("dout_valid_i", 1);
    b.set("dout_ready_i", 1);
    let lasts: Vec<u128> = (0..6).map(|_| b.step()["dout_last_o"]).collect();
    b.set("dout_valid_i", 0);
    assert_eq!(lasts, vec![0, 0, 1, 0, 0, 1]);
    assert_eq!(b.read("DOUT_BEATS"), 6);
    // Busy and error from the engine.
    b.set("busy_i", 1);
    b.set("err_i", 1);
    assert_eq!(b.read("STATUS") & 0b11, 0b11);
    b.set("busy_i", 0);
    assert!(b.read("BUSY_CYCLES") >= 2);
    b.write("CONTROL", 1);
    assert!(b.read("CYCLES") <= 3, "counters cleared");
}
