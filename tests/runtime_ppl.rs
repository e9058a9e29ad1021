//! `tessera ppl` against the independent numpy computation (scripts/ref_ppl.py): the f32
//! perplexity of the first chunks of data/gpl-3.txt at ctx 512. Needs the real model (skips
//! with a message when it has not been fetched) and is slow in the test profile, so it is
//! ignored by default:
//!
//!     cargo test --release --test runtime_ppl -- --ignored
//!
//! Reference numbers: `python3 scripts/ref_ppl.py MODEL data/gpl-3.txt --ctx 512 --chunks 2`
//! prints `[1]16.2659` and `[2]17.6866` (7639 tokens, add_bos false).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use tessera::runtime::cli;
use tessera::runtime::ppl::{chunk_logits, chunks, first_scored, log_prob};

#[test]
#[ignore = "slow (two 512-token chunks of the real model): cargo test --release --test runtime_ppl -- --ignored"]
fn f32_perplexity_matches_numpy_reference() {
    let path = std::env::var_os("TESSERA_TEST_MODEL")
        .map(PathBuf::from)
        .or_else(cli::default_model_path)
        .filter(|p| p.is_file());
    let Some(path) = path else {
        println!("SKIPPED: SmolLM2 GGUF not in the cache; run scripts/fetch-model.sh");
        return;
    };
    let (model, tok) = cli::load(&path).unwrap();
    let text = include_str!("../data/gpl-3.txt");
    let cs = chunks(&tok, text, 512, Some(2)).unwrap();
    let first = first_scored(512, false);
    let vocab = model.cfg.vocab;
    let (mut nll, mut n) = (0f64, 0usize);
    let mut running = Vec::new();
    for c in &cs {
        let logits = chunk_logits(&model, c, first).unwrap();
        for j in first..511 {
            nll -= log_prob(
                &logits[(j - first) * vocab..(j - first + 1) * vocab],
                c[j + 1],
            );
            n += 1;
        }
        running.push((nll / n as f64).exp());
    }
    for (got, want) in running.iter().zip([16.2659f64, 17.6866]) {
        assert!(
            (got / want - 1.0).abs() < 1e-3,
            "perplexity {got} vs numpy {want}"
        );
    }
}
