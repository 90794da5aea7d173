//! Row gather (`take`, for embedding lookups and routing tokens to
//! experts) and its transpose, row `scatter_add`.
//!
//! Both index the first axis of the table with an integer tensor of any
//! shape. Out-of-range indices follow StableHLO: gather clamps them into
//! range, scatter skips the update.

use crate::graph::core::Tensor;
use crate::graph::dtype::TensorType;
use crate::graph::emit::{generic, i64_array, i64_list, scalar_region, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

fn check_indices(op: &'static str, idx: &TensorType) -> Result<()> {
    if !idx.dtype.is_integer() {
        return op_err(op, format!("indices must be integers, got {idx}"));
    }
    Ok(())
}

/// table [V, D...] , indices [N...] -> [N..., D...]
#[derive(Debug)]
struct Take;

impl Primitive for Take {
    fn name(&self) -> &'static str {
        "take"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (table, idx) = (ins[0], ins[1]);
        check_indices("take", idx)?;
        if table.rank() == 0 {
            return op_err("take", format!("table must have rank >= 1, got {table}"));
        }
        let dims = [idx.dims.clone(), table.dims[1..].to_vec()].concat();
        Ok(vec![TensorType::new(table.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (table, idx) = (&ins[0], &ins[1]);
        Ok(vec![
            Some(table.zeros_like()?.scatter_add(idx, ct0(cts)?)?),
            None,
        ])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let (table, idx) = (&ins[0].ty, &ins[1].ty);
        let ir = idx.rank() as i64;
        let offset: Vec<i64> = (ir..ir + table.rank() as i64 - 1).collect();
        let mut sizes = table.dims.clone();
        sizes[0] = 1;
        let attrs = format!(
            "dimension_numbers = #stablehlo.gather<offset_dims = {}, collapsed_slice_dims = [0], start_index_map = [0], index_vector_dim = {ir}>, slice_sizes = {}, indices_are_sorted = false",
            i64_list(&offset),
            i64_array(&sizes)
        );
        Ok(generic("stablehlo.gather", ins, outs, &attrs))
    }
}

/// target [V, D...], indices [N...], updates [N..., D...] -> [V, D...]
#[derive(Debug)]
struct ScatterAdd;

impl Primitive for ScatterAdd {
    fn name(&self) -> &'static str {
        "scatter_add"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (target, idx, upd) = (ins[0], ins[1], ins[2]);
        check_indices("scatter_add", idx)?;
        if target.rank() == 0 {
            return op_err(
                "scatter_add",
                format!("target must have rank >= 1, got {target}"),
            );
        }
        let want = [idx.dims.clone(), target.dims[1..].to_vec()].concat();
        if upd.dtype != target.dtype || upd.dims != want {
            return op_err(
                "scatter_add",
                format!("updates {upd} do not match target {target} and indices {idx} (want {}{want:?})", target.dtype),
            );
        }
        Ok(vec![target.clone()])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (idx, g) = (&ins[1], ct0(cts)?);
        Ok(vec![Some(g.clone()), None, Some(g.take(idx)?)])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let (target, idx) = (&ins[0].ty, &ins[1].ty);
        let ir = idx.rank() as i64;
        let window: Vec<i64> = (ir..ir + target.rank() as i64 - 1).collect();
        let region = scalar_region(cx, "stablehlo.add", target.dtype);
        let attrs = format!(
            "scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = {}, inserted_window_dims = [0], scatter_dims_to_operand_dims = [0], index_vector_dim = {ir}>, indices_are_sorted = false, unique_indices = false",
            i64_list(&window)
        );
        let head = generic("stablehlo.scatter", ins, outs, "");
        let (lhs, rhs) = head.split_once(" : ").expect("generic op text has a type");
        Ok(format!("{lhs} {region} {{{attrs}}} : {rhs}"))
    }
}

impl Tensor {
    /// Rows of `self` ([V, D...]) at `indices` ([N...]): [N..., D...].
    pub fn take(&self, indices: &Tensor) -> Result<Tensor> {
        self.g.apply1(Take, &[self, indices])
    }

    /// `self` ([V, D...]) with `updates` ([N..., D...]) added to the rows
    /// named by `indices` ([N...]); repeated indices accumulate.
    pub fn scatter_add(&self, indices: &Tensor, updates: &Tensor) -> Result<Tensor> {
        self.g.apply1(ScatterAdd, &[self, indices, updates])
    }
}
