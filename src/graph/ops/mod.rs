//! The op set. Each file groups a family of primitives; each primitive's
//! shape rule, gradient rule and lowering sit together, and the public
//! constructors are methods on [`Tensor`](super::Tensor) (or
//! [`Graph`](super::Graph) for ops without tensor operands).

pub(crate) mod collective;
pub(crate) mod constant;
pub(crate) mod control;
pub(crate) mod elementwise;
pub(crate) mod grouped;
pub(crate) mod indexing;
pub(crate) mod linalg;
pub(crate) mod reduce;
pub(crate) mod shape;
pub(crate) mod sort;
