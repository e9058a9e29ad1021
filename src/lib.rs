//! Library half of the `tessera` package, shared by the CLI binary and the integration tests.

pub mod runtime;
