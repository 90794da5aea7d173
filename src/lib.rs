//! sharedmoe: train LLaMA-style and shared-MoE language models on XLA
//! accelerators through PJRT.
//!
//! Layers, bottom up (see `shared/DESIGN.md`):
//! - [`runtime`]: the PJRT C API, safely wrapped (plugins, clients, buffers,
//!   compile, execute). The only place with raw pointers.
//! - [`graph`]: tracing computations in Rust, reverse-mode autodiff, and
//!   emission of one StableHLO module per compiled function.
//! - [`cli`]: the `sharedmoe` command-line interface.

pub mod cli;
pub mod graph;
pub mod model;
pub mod runtime;
