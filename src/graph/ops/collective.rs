//! Cross-device ops: `all_reduce` (sum over every replica of the module),
//! `replica_id`, and the SPMD partitioner's sharding constraint.

use crate::graph::core::{Graph, Tensor};
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, manual_pair, scalar_region, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, ManualEdge, Operand, Primitive};
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

/// Where a manual region's value comes from or goes to: one block per
/// device (split over every mesh axis) or the same whole value on each.
fn check_manual(op: &'static str, s: &Sharding) -> Result<()> {
    let all = s.mesh().devices();
    let blocks: usize = s.tiles().iter().product();
    if blocks != all && blocks != 1 {
        return op_err(
            op,
            format!(
                "{}: a manual region takes a value split over every device or none",
                s.to_hlo()
            ),
        );
    }
    Ok(())
}

/// Enters a manually partitioned region: from a value on the mesh (`full`)
/// to each device's block, on which the region's ops run as written, with
/// no partitioner between them (JAX's `shard_map`).
#[derive(Debug)]
struct ToManual(Sharding);

impl Primitive for ToManual {
    fn name(&self) -> &'static str {
        "to_manual"
    }

    fn manual_edge(&self) -> Option<ManualEdge> {
        Some(ManualEdge::Enters)
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        match self.0.shard_dims(&ins[0].dims) {
            Ok(local) => Ok(vec![TensorType::new(ins[0].dtype, &local)]),
            Err(e) => op_err("to_manual", format!("{}: {e}", ins[0])),
        }
    }

    /// A split value's cotangent leaves the region as it came in. A whole
    /// value used on every device collects every device's cotangent: they
    /// leave stacked along a new leading axis, one block per device, and
    /// are summed outside, where the partitioner all-reduces (shard_map's
    /// transpose of an unmapped input).
    fn vjp(
        &self,
        _: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let ct = ct0(cts)?;
        if !self.0.is_replicated() {
            return Ok(vec![Some(ct.from_manual(&self.0)?)]);
        }
        let mesh = self.0.mesh();
        let axes: Vec<&str> = mesh.axis_names().collect();
        let stacked = Sharding::split(mesh, ct.rank() + 1, 0, &axes)?;
        let mut one = vec![1];
        one.extend(ct.dims());
        let per_device = ct.reshape(&one)?.from_manual(&stacked)?;
        Ok(vec![Some(per_device.reduce_sum(&[0])?)])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let full = self.0.to_hlo();
        Ok(manual_pair(
            cx,
            ins,
            outs,
            (&full, "SPMDFullToShardShape", "{manual}"),
        ))
    }
}

/// Leaves a manual region: each device's block becomes its part of a
/// value on the mesh laid out as `full`.
#[derive(Debug)]
struct FromManual(Sharding);

impl Primitive for FromManual {
    fn name(&self) -> &'static str {
        "from_manual"
    }

    fn manual_edge(&self) -> Option<ManualEdge> {
        Some(ManualEdge::Leaves)
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let t = ins[0];
        if t.dims.len() != self.0.rank() {
            return op_err(
                "from_manual",
                format!("a rank-{} sharding for {t}", self.0.rank()),
            );
        }
        let full: Vec<i64> = t
            .dims
            .iter()
            .zip(self.0.tiles())
            .map(|(&d, n)| d * n as i64)
            .collect();
        Ok(vec![TensorType::new(t.dtype, &full)])
    }

    fn vjp(
        &self,
        _: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ct0(cts)?.to_manual(&self.0)?)])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let full = self.0.to_hlo();
        Ok(manual_pair(
            cx,
            ins,
            outs,
            ("{manual}", "SPMDShardToFullShape", &full),
        ))
    }
}

impl Tensor {
    /// Each device's block of this value under `full` (split over every
    /// mesh axis, or whole on each device), inside a manually partitioned
    /// region: what follows runs per device on the block's shape until
    /// [`from_manual`](Self::from_manual).
    pub fn to_manual(&self, full: &Sharding) -> Result<Tensor> {
        check_manual("to_manual", full)?;
        self.g.apply1(ToManual(full.clone()), &[self])
    }

    /// Leaves a manual region: this per-device block is device d's block of
    /// the result, laid out as `full` (split over every mesh axis).
    pub fn from_manual(&self, full: &Sharding) -> Result<Tensor> {
        check_manual("from_manual", full)?;
        self.g.apply1(FromManual(full.clone()), &[self])
    }
}
