//! Cross-device ops: `all_reduce` (sum over every replica of the module),
//! `replica_id`, and the SPMD partitioner's sharding constraint.

use crate::graph::core::{Graph, Tensor};
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, scalar_region, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};
use crate::graph::sharding::Sharding;

/// Sum across all replicas of the module.
#[derive(Debug)]
struct AllReduceSum;

impl Primitive for AllReduceSum {
    fn name(&self) -> &'static str {
        "all_reduce"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        if ins[0].dtype == DType::Bool {
            return op_err("all_reduce", format!("cannot sum bool tensor {}", ins[0]));
        }
        Ok(vec![ins[0].clone()])
    }

    /// Each replica's result feeds every replica's output, so the
    /// cotangent is itself summed across replicas (as JAX's psum).
    fn vjp(
        &self,
        _: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ct0(cts)?.all_reduce_sum()?)])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        // Emitted even for one replica (group [[0]]) so the same text runs
        // everywhere.
        let n = cx.num_replicas;
        let region = scalar_region(cx, "stablehlo.add", ins[0].ty.dtype);
        let group: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let attrs = format!(
            "replica_groups = dense<[[{}]]> : tensor<1x{n}xi64>, channel_handle = #stablehlo.channel_handle<handle = {}, type = 0>",
            group.join(", "),
            cx.next_channel()
        );
        let head = generic("stablehlo.all_reduce", ins, outs, "");
        let (lhs, rhs) = head.split_once(" : ").expect("generic op text has a type");
        Ok(format!("{lhs} {region} {{{attrs}}} : {rhs}"))
    }
}

impl Tensor {
    /// Sum of this value over all replicas (data-parallel gradient
    /// exchange). The module's replica count is set on the
    /// [`Function`](crate::graph::Function).
    pub fn all_reduce_sum(&self) -> Result<Tensor> {
        self.g.apply1(AllReduceSum, &[self])
    }
}

#[derive(Debug)]
struct ReplicaId;

impl Primitive for ReplicaId {
    fn name(&self) -> &'static str {
        "replica_id"
    }

    fn out_types(&self, _: &[&TensorType]) -> Result<Vec<TensorType>> {
        Ok(vec![TensorType::scalar(DType::U32)])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.replica_id", ins, outs, ""))
    }
}

impl Graph {
    /// This replica's index (u32 scalar).
    pub fn replica_id(&self) -> Result<Tensor> {
        self.apply1(ReplicaId, &[])
    }
}

/// Tells the SPMD partitioner how a value lies on the mesh (JAX's
/// `with_sharding_constraint`): the identity on values.
#[derive(Debug)]
struct ShardingConstraint(Sharding);

impl Primitive for ShardingConstraint {
    fn name(&self) -> &'static str {
        "sharding_constraint"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        if let Err(e) = self.0.shard_dims(&ins[0].dims) {
            return op_err("sharding_constraint", format!("{}: {e}", ins[0]));
        }
        Ok(vec![ins[0].clone()])
    }

    /// The cotangent lies as the value does (as JAX transposes it).
    fn vjp(
        &self,
        _: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ct0(cts)?.with_sharding(&self.0)?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let attrs = format!("call_target_name = \"Sharding\", {}", self.0.attribute());
        Ok(generic("stablehlo.custom_call", ins, outs, &attrs))
    }
}

impl Tensor {
    /// This value, laid out on the mesh as `sharding` says (a constraint
    /// for the SPMD partitioner where propagation alone would choose
    /// worse, e.g. a replicated gradient where a reduce-scatter to the
    /// parameter's shards is wanted).
    pub fn with_sharding(&self, sharding: &Sharding) -> Result<Tensor> {
        if sharding.rank() != self.rank() {
            return op_err(
                "sharding_constraint",
                format!("a rank-{} sharding for {}", sharding.rank(), self.ty()),
            );
        }
        self.g.apply1(ShardingConstraint(sharding.clone()), &[self])
    }
}
