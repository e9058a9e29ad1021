//! A8 x KV4 attention products (N16-N19). Work in progress.
