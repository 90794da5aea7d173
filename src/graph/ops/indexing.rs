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
        Ok(gather_rows_text(&ins[0], &ins[1], &outs[0]))
    }
}

/// `stablehlo.gather` of rows of `table` at `idx` (all of idx's dims are
/// batch dims; the row's trailing dims are kept).
fn gather_rows_text(table: &Operand, idx: &Operand, out: &Operand) -> String {
    let ir = idx.ty.rank() as i64;
    let offset: Vec<i64> = (ir..ir + table.ty.rank() as i64 - 1).collect();
    let mut sizes = table.ty.dims.clone();
    sizes[0] = 1;
    let attrs = format!(
        "dimension_numbers = #stablehlo.gather<offset_dims = {}, collapsed_slice_dims = [0], start_index_map = [0], index_vector_dim = {ir}>, slice_sizes = {}, indices_are_sorted = false",
        i64_list(&offset),
        i64_array(&sizes)
    );
    generic(
        "stablehlo.gather",
        &[table.clone(), idx.clone()],
        std::slice::from_ref(out),
        &attrs,
    )
}

/// Rows of x [M, D...] at idx [P], where idx = M selects a zero row, given
/// the inverse map `inverse` [M, F] listing, for every row m, the F
/// positions p with idx[p] = m (P where fewer). The gradient is then a
/// gather too (sum over F of the cotangent rows at `inverse`), not a
/// scatter-add: routing permutations use it, since scatters are slow on
/// some backends (XLA CPU runs them element by element).
#[derive(Debug)]
struct PermuteRows;

impl Primitive for PermuteRows {
    fn name(&self) -> &'static str {
        "permute_rows"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (x, idx, inv) = (ins[0], ins[1], ins[2]);
        check_indices("permute_rows", idx)?;
        check_indices("permute_rows", inv)?;
        if x.rank() == 0 || idx.rank() != 1 || inv.rank() != 2 || inv.dims[0] != x.dims[0] {
            return op_err(
                "permute_rows",
                format!("want x [M, ..], idx [P], inverse [M, F]; got {x}, {idx}, {inv}"),
            );
        }
        let dims = [vec![idx.dims[0]], x.dims[1..].to_vec()].concat();
        Ok(vec![TensorType::new(x.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, inv) = (&ins[0], &ins[2]);
        let g = ct0(cts)?;
        let r = g.rank();
        let mut high = vec![0; r];
        high[0] = 1;
        let g_ext = g.pad(&g.scalar_like(0.0)?, &vec![0; r], &high, &vec![0; r])?; // [P + 1, ..]
                                                                                   // The same gather in the other direction (zero row for padding).
        let back = g_ext.take(inv)?.reduce_sum(&[1])?; // [M, ..]
        debug_assert_eq!(back.dims(), x.dims());
        Ok(vec![Some(back), None, None])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let x = &ins[0];
        let r = x.ty.rank();
        let mut ext_dims = x.ty.dims.clone();
        ext_dims[0] += 1;
        let (zero_line, zero) = cx.constant(&TensorType::scalar(x.ty.dtype), 0.0);
        let ext = Operand {
            name: cx.fresh(),
            ty: TensorType::new(x.ty.dtype, &ext_dims),
        };
        let mut high = vec![0; r];
        high[0] = 1;
        let lines = [
            zero_line,
            generic(
                "stablehlo.pad",
                &[x.clone(), zero.clone()],
                std::slice::from_ref(&ext),
                &format!(
                    "edge_padding_low = {}, edge_padding_high = {}, interior_padding = {}",
                    i64_array(&vec![0; r]),
                    i64_array(&high),
                    i64_array(&vec![0; r])
                ),
            ),
            gather_rows_text(&ext, &ins[1], &outs[0]),
        ];
        Ok(lines.join("\n"))
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
    /// Rows of `self` [M, D...] at `idx` [P] (idx = M gives zeros), with
    /// the inverse map [M, F] that makes the gradient a gather (see
    /// `PermuteRows`). The caller guarantees the two maps agree.
    pub fn permute_rows(&self, idx: &Tensor, inverse: &Tensor) -> Result<Tensor> {
        self.g.apply1(PermuteRows, &[self, idx, inverse])
    }

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
