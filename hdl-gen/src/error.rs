//! The crate's error type.

use std::fmt;

/// A generation-time error: a width/sign mismatch, a naming rule, an
/// undriven or doubly driven signal, a bad instance connection, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HdlError {
    message: String,
}

impl HdlError {
    /// New error with a human-readable message.
    pub fn new(message: impl Into<String>) -> HdlError {
        HdlError {
            message: message.into(),
        }
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Prefix the message with context (e.g. the module name).
    pub fn context(self, ctx: impl fmt::Display) -> HdlError {
        HdlError {
            message: format!("{ctx}: {}", self.message),
        }
    }
}

impl fmt::Display for HdlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HdlError {}
