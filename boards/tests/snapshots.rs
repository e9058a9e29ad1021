//! Snapshots of the XDC and the Vivado Tcl for every board (tiny config). Update with
//! `UPDATE_EXPECT=1 cargo test -p tessera-boards --test snapshots`.

use expect_test::expect_file;
use tessera_boards::vivado::{tcl, xdc};
use tessera_boards::wrapper::board_design;
use tessera_boards::Board;
use tessera_golden::config::EngineConfig;

fn check(board: &str) {
    let b = Board::by_name(board).expect("board");
    let cfg = EngineConfig::preset("tiny").expect("tiny");
    let names: Vec<String> = board_design(&cfg)
        .expect("design")
        .render()
        .expect("render")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let x = xdc(&b, &cfg);
    let t = tcl(&b, &cfg, &names);
    assert_eq!(x, xdc(&b, &cfg), "deterministic");
    let dir = format!("snapshots/{board}");
    expect_file![format!("{dir}/tessera_axi_top.xdc")].assert_eq(&x);
    expect_file![format!("{dir}/build.tcl")].assert_eq(&t);
}

#[test]
fn u280() {
    check("u280");
}
#[test]
fn u55c() {
    check("u55c");
}
#[test]
fn zcu102() {
    check("zcu102");
}
#[test]
fn kv260() {
    check("kv260");
}
#[test]
fn pynq_z2() {
    check("pynq-z2");
}
