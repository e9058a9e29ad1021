//! Write the example designs to a directory: `cargo run -p tessera-hdl-gen
//! --example write_examples -- OUT_DIR`.

use std::path::PathBuf;
use tessera_hdl_gen::examples::{counter, mac, mesh, ops, ram_sdp, single};
use tessera_hdl_gen::{Design, HdlError, RamStyle};

fn main() -> Result<(), HdlError> {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("hdl-examples"));
    let designs: Vec<Design> = vec![
        single(counter(8)?)?,
        single(mac(8, 24)?)?,
        mesh(3, 5, 8, 20)?,
        single(ram_sdp(1024, 32, RamStyle::Block)?)?,
        single(ops()?)?,
    ];
    for d in designs {
        let w = d.write(&out.join(d.top()))?;
        println!("{}", w.filelist.display());
    }
    Ok(())
}
