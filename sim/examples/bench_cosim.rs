//! `cargo run --release -p tessera-sim --example bench_cosim [OPS]`: the numbers of
//! `tessera bench cosim` on the 8 x 8 config without building the whole CLI.

fn main() -> std::process::ExitCode {
    let ops = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run = || -> Result<String, String> {
        let cfg = tessera_sim::bench::bench_config()?;
        let b = tessera_sim::verilate::build(&cfg, &tessera_sim::verilate::Rtl::Generated)?;
        let lib = tessera_sim::ffi::Lib::load(&b.lib)?;
        let r = tessera_sim::bench::bench(&lib, &cfg, ops, 1)?;
        Ok(r.table(&cfg.name))
    };
    match run() {
        Ok(t) => {
            print!("{t}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
