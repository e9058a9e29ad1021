//! CPU inference runtime for a real LLM: GGUF loading ([`gguf`]), the byte-level BPE tokenizer
//! and chat template ([`tokenizer`]), the forward pass ([`model`]) whose linear layers and
//! attention products go through the dispatch points in [`ops`], sampling ([`sampler`]), the
//! `tessera run` command ([`cli`]) and `tessera bench run|mem` ([`bench`]).

pub mod bench;
pub mod cli;
pub mod engine;
pub mod gguf;
pub mod gptq;
pub mod model;
pub mod ops;
pub mod ppl;
pub mod quantize;
pub mod sampler;
pub mod smooth;
pub mod tokenizer;
pub mod tsr;

use std::fmt;

/// A runtime error: one line, naming the problem (and the fix, where there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
