//! Token sources for training: pre-tokenised `.bin` files (DESIGN.md
//! format), byte-level tokenisation of text, and FineWeb-Edu parquet
//! shards read by row group (tokenizers, packing, sharding and the
//! resumable cursor come next).

pub mod bin;
pub mod bytes;
pub mod packing;
pub mod parquet;
pub mod stream;
pub mod tokenizer;

pub use bin::{TokenFile, TokenWidth};
