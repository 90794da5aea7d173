//! Tracing computations in Rust and compiling them: our small JAX.
//!
//! `trace -> grad -> emit -> compile`: build a [`Graph`] by applying ops to
//! [`Tensor`]s (shapes and dtypes are checked as each op is recorded), take
//! gradients with [`grad`]/[`vjp`], close it into a [`Function`], emit one
//! StableHLO module and compile it through [`crate::runtime`].
//!
//! This module owns the op set, differentiation and emission. It never
//! touches PJRT directly except through `runtime`'s safe API in `compile`.

mod autodiff;
mod compile;
mod core;
mod dtype;
mod emit;
mod error;
mod ops;
mod primitive;
mod sharding;

pub use self::autodiff::{grad, vjp};
pub use self::compile::{Compiled, HostTensor};
pub use self::core::{Graph, Tensor};
pub use self::dtype::{DType, TensorType};
pub use self::emit::Function;
pub use self::error::{GraphError, Result};
pub use self::ops::grouped::WeightLayout;
pub use self::ops::linalg::DotDims;
pub use self::ops::shape::concatenate;
pub use self::sharding::{copy_block, place_block, place_shard, shard_of, Mesh, Sharding};
