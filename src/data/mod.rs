//! Token sources for training. Today: pre-tokenised `.bin` files
//! (DESIGN.md format); parquet and tokenizers arrive with the data
//! pipeline.

pub mod bin;
pub mod bytes;

pub use bin::{TokenFile, TokenWidth};
