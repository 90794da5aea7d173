//! Token sources for training: FineWeb-Edu parquet shards read by row
//! group, tokenizers (load and train), the resumable packed, sharded and
//! shuffled token stream, `data prepare` into pre-tokenised `.bin` files
//! (DESIGN.md format), and byte-level tokenisation of plain text.

pub mod bin;
pub mod bytes;
pub mod documents;
pub mod packing;
pub mod parquet;
pub mod prepare;
pub mod stream;
pub mod tokenizer;

pub use bin::{TokenFile, TokenWidth};
