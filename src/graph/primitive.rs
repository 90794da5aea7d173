//! The `Primitive` trait: one op's whole story in one place.
//!
//! As in JAX's `lax.py`, every primitive states its shape rule
//! (`out_types`), its reverse-mode rule (`vjp`, written with ordinary tensor
//! ops so the backward pass is traced like the forward) and its lowering to
//! StableHLO generic syntax (`emit`), side by side in the op's own file.

use std::fmt;

use super::core::Tensor;
use super::dtype::TensorType;
use super::emit::EmitCx;
use super::error::{GraphError, Result};

/// An operand or result as the emitter sees it: SSA name and type.
#[derive(Clone, Debug)]
pub(crate) struct Operand {
    pub name: String,
    pub ty: TensorType,
}

pub(crate) trait Primitive: fmt::Debug + 'static {
    /// Short name used in error messages (`dot_general`, `exp`, ...).
    fn name(&self) -> &'static str;

    /// Shape and dtype rule: validates the operands and returns the result
    /// types. Every mistake a user can make must be caught here.
    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>>;

    /// Vector-Jacobian product: given the operands, the results and the
    /// cotangents of the results (`None` = zero), returns one cotangent per
    /// operand (`None` = zero or not differentiable).
    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let _ = (ins, outs, cts);
        Err(GraphError::Op {
            op: self.name(),
            msg: "has no gradient rule".into(),
        })
    }

    /// StableHLO text defining `outs` from `ins` (one or more lines).
    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String>;

    /// Some(i) when the op is the identity on operand i and emits nothing
    /// (e.g. `stop_gradient`): its result reuses the operand's SSA name.
    fn alias_of(&self) -> Option<usize> {
        None
    }

    /// Some when the op is a boundary of a manually partitioned region
    /// (JAX's shard_map): the emitter treats everything computed from an
    /// entered value, up to where it leaves, as per-device code.
    fn manual_edge(&self) -> Option<ManualEdge> {
        None
    }
}

/// Which boundary of a manually partitioned region an op is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ManualEdge {
    /// From a value on the mesh to each device's block.
    Enters,
    /// From each device's block back to a value on the mesh.
    Leaves,
}

/// The first cotangent, for single-output primitives.
pub(crate) fn ct0(cts: &[Option<Tensor>]) -> Result<&Tensor> {
    cts.first()
        .and_then(|c| c.as_ref())
        .ok_or_else(|| GraphError::Usage("internal: vjp called without a cotangent".into()))
}
