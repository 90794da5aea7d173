//! sharedmoe: train LLaMA-style and shared-MoE language models on XLA
//! accelerators through PJRT.
//!
//! Layers, bottom up (see `shared/DESIGN.md`):
//! - [`runtime`]: the PJRT C API, safely wrapped (plugins, clients, buffers,
//!   compile, execute). The only place with raw pointers.
//! - [`graph`]: tracing computations in Rust, reverse-mode autodiff, and
//!   emission of one StableHLO module per compiled function.
//! - [`model`]: the dense LLaMA baseline and the shared-MoE model.
//! - [`train`]: the compiled optimizer step, the trainer and the loop.
//! - [`data`]: token sources; [`ckpt`]: checkpoints.
//! - [`generate`]: text generation from a checkpoint (the decoding
//!   programs run with device-resident key/value caches).
//! - [`dist`]: the coordinator and workers of a multi-process job (gRPC).
//! - [`cli`]: the `sharedmoe` command-line interface.
//! - [`compress`]: SparseGPT / magnitude pruning and the NF4 codec, on
//!   the host (a leaf: pure numerics).
//! - [`digest`]: SHA-256 as hex; [`f32_bytes`]: f32 values as
//!   little-endian bytes. Leaves that every layer may use.

pub mod ckpt;
pub mod cli;
pub mod compress;
pub mod data;
pub mod digest;
pub mod dist;
pub mod f32_bytes;
pub mod generate;
pub mod graph;
pub mod model;
pub mod runtime;
pub mod train;
