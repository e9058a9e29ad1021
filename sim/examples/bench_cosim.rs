//! `cargo run --release -p tessera-sim --example bench_cosim [OPS] [all|raw|record]`: the numbers
//! of `tessera bench cosim` on the 8 x 8 config without building the whole CLI. `raw` records
//! the inputs and replays them into Verilator only, `record` only records them: under
//! `perf stat -e instructions:u`, the difference of the two is Verilator's work alone, a
//! load-independent figure for comparing flag sets on a busy machine.

fn main() -> std::process::ExitCode {
    let ops = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mode = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    let run = || -> Result<String, String> {
        let cfg = tessera_sim::bench::bench_config()?;
        let b = tessera_sim::verilate::build(&cfg, &tessera_sim::verilate::Rtl::Generated)?;
        let lib = tessera_sim::ffi::Lib::load(&b.lib)?;
        if mode == "all" {
            let r = tessera_sim::bench::bench(&lib, &cfg, ops, 1)?;
            return Ok(r.table(&cfg.name));
        }
        let stim = tessera_sim::bench::bench_stimulus(&cfg, ops, 1)?;
        let rec = tessera_sim::check::record(&cfg, &stim, 1 << 40)?;
        if mode == "record" {
            return Ok(format!("recorded {} cycles\n", rec.cycles));
        }
        let t = tessera_sim::bench::timed(|| Ok(rec.replay(&lib, 1)))?;
        Ok(format!(
            "raw Verilator: {} cycles, {:.3} s, {:.0} cycles/s, {:.2} CPU s\n",
            t.0,
            t.1,
            t.0 as f64 / t.1,
            t.2
        ))
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
