//! `tessera fit --board NAME [--limit 0.7]`: does the config fit the board, and what is the
//! largest array (and buffers) that fits under the utilisation limit (tessera-boards::fit).

use std::path::PathBuf;

use tessera_boards::fit::{self, Cache, Calibration};
use tessera_boards::Board;

use super::{ConfigSource, Failure};

#[derive(Debug, clap::Args)]
pub struct FitArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Board: u280, u55c, zcu102, kv260 or pynq-z2.
    #[arg(long, value_name = "NAME")]
    pub board: String,
    /// Largest utilisation of any resource, 0 < limit <= 1.
    #[arg(long, default_value_t = 0.7)]
    pub limit: f64,
    /// Also run yosys on the whole board top of the config and of the best fit
    /// (hierarchical: each module once, totals by instance count; minutes for big arrays)
    /// instead of trusting the calibrated model.
    #[arg(long)]
    pub synth: bool,
    /// Cache folder for synthesis results (one sub-folder per config build name).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

pub fn run(args: FitArgs) -> Result<(), Failure> {
    if !(args.limit > 0.0 && args.limit <= 1.0) {
        return Err(Failure::one(format!(
            "--limit {}: must be in (0, 1], e.g. 0.7",
            args.limit
        )));
    }
    let cfg = args.source.load_valid()?;
    let board = Board::by_name(&args.board).map_err(Failure::one)?;
    let cache = Cache::new(args.cache.unwrap_or_else(fit::default_cache_dir));
    let fam = board.yosys_family();
    let d = cfg.derive();
    println!(
        "fit on {} ({}), limit {:.0}% per resource; {}",
        board.title,
        board.part,
        args.limit * 100.0,
        fit::YOSYS_LIMITS
    );
    let cal = Calibration::load(&cache, fam).map_err(Failure::one)?;
    let pe = cache.synth_pe(&cfg, fam).map_err(Failure::one)?.0;
    let mut usage = fit::model(&cfg, &fit::Usage::from_stats(&pe), &cal);
    let mut how = "model calibrated by yosys (PE synthesised; rest scaled from tiny)";
    if args.synth {
        let (s, cached) = cache.synth_top_hier(&cfg, fam).map_err(Failure::one)?;
        usage = fit::Usage::from_stats(&s);
        usage.bram36 = usage.bram36.max(f64::from(d.total_bram36));
        how = if cached {
            "yosys on the whole top, hierarchical (cached)"
        } else {
            "yosys on the whole top, hierarchical"
        };
    }
    let sh = fit::shares(&usage, &board.resources);
    let b = fit::binding(&sh);
    let fits = sh.iter().all(|s| s.fraction <= args.limit);
    println!(
        "\nconfig {} ({}, {} PEs): {} ({how}); binding resource {} at {:.1}%",
        cfg.name,
        d.build_dir_name,
        d.pe_count,
        if fits { "FITS" } else { "DOES NOT FIT" },
        b.resource,
        b.fraction * 100.0
    );
    print!("{}", fit::share_table(&sh, args.limit));

    let res = fit::fit(&board, &cfg, args.limit, &cache).map_err(Failure::one)?;
    println!("\nsearch (rows x cols powers of two up to 64 x 64, largest first):");
    for c in &res.tried {
        let b = fit::binding(&c.shares);
        println!(
            "  {:>2} x {:<2} {:>5} PEs: {} ({} {:.1}%)",
            c.cfg.array.rows,
            c.cfg.array.cols,
            c.cfg.array.rows * c.cfg.array.cols,
            if c.fits { "fits" } else { "over" },
            b.resource,
            b.fraction * 100.0
        );
    }
    if let Some(p2) = &res.best_pow2 {
        let b = fit::binding(&p2.shares);
        println!(
            "\nlargest power-of-two fit: {} x {} ({} PEs), wgt_depth {}; binds on {} at {:.1}%",
            p2.cfg.array.rows,
            p2.cfg.array.cols,
            p2.cfg.array.rows * p2.cfg.array.cols,
            p2.cfg.buffers.wgt_depth,
            b.resource,
            b.fraction * 100.0
        );
    }
    match res.best {
        Some(best) => {
            let bd = best.cfg.derive();
            let b = fit::binding(&best.shares);
            println!(
                "\nlargest fit (any rows x cols from 4 to 64, rows <= cols): {} x {} ({} PEs), \
                 act_depth {}, wgt_depth {}, out_depth {}, stream_bits {} -> {}; binds on {} at \
                 {:.1}%",
                best.cfg.array.rows,
                best.cfg.array.cols,
                bd.pe_count,
                best.cfg.buffers.act_depth,
                best.cfg.buffers.wgt_depth,
                best.cfg.buffers.out_depth,
                best.cfg.interface.stream_bits,
                bd.build_dir_name,
                b.resource,
                b.fraction * 100.0
            );
            print!("{}", fit::share_table(&best.shares, args.limit));
            if args.synth {
                let (s, _) = cache.synth_top_hier(&best.cfg, fam).map_err(Failure::one)?;
                let u = fit::Usage::from_stats(&s);
                println!(
                    "  yosys on the whole top (hierarchical): LUT {:.0} FF {:.0} DSP {:.0} BRAM36 {:.1} URAM {:.0}",
                    u.lut, u.ff, u.dsp, u.bram36, u.uram
                );
            }
        }
        None => println!("\nno array of 4 x 4 or more fits under the limit"),
    }
    println!("cache: {}", cache.root.display());
    Ok(())
}
