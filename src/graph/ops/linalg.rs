//! `dot_general` (batched, multi-axis contraction) and the matmul shapes
//! built from it.

use crate::graph::core::Tensor;
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, i64_list, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

/// Which dimensions of each operand are contracted and which are batch
/// dimensions. Result dimensions: batch, then lhs free, then rhs free.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DotDims {
    pub lhs_contract: Vec<i64>,
    pub rhs_contract: Vec<i64>,
    pub lhs_batch: Vec<i64>,
    pub rhs_batch: Vec<i64>,
}

/// Dimensions of an operand of rank `rank` that are neither contracted nor
/// batch, in order.
fn free_dims(rank: usize, contract: &[i64], batch: &[i64]) -> Vec<i64> {
    (0..rank as i64)
        .filter(|d| !contract.contains(d) && !batch.contains(d))
        .collect()
}

fn argsort(v: &[i64]) -> Vec<i64> {
    let mut idx: Vec<i64> = (0..v.len() as i64).collect();
    idx.sort_by_key(|&i| v[i as usize]);
    idx
}

#[derive(Debug)]
struct DotGeneral {
    dims: DotDims,
    out_dtype: DType,
}

fn check_axes(which: &str, axes: &[i64], t: &TensorType) -> Result<()> {
    for (i, &a) in axes.iter().enumerate() {
        if a < 0 || a as usize >= t.rank() || axes[..i].contains(&a) {
            return op_err(
                "dot_general",
                format!("{which} dimensions {axes:?} are invalid for {t}"),
            );
        }
    }
    Ok(())
}

impl Primitive for DotGeneral {
    fn name(&self) -> &'static str {
        "dot_general"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (l, r, d) = (ins[0], ins[1], &self.dims);
        if l.dtype != r.dtype || !l.dtype.is_float() && !l.dtype.is_integer() {
            return op_err(
                "dot_general",
                format!("operand dtypes must match and be numeric: {l} vs {r}"),
            );
        }
        check_axes("lhs contracting", &d.lhs_contract, l)?;
        check_axes("rhs contracting", &d.rhs_contract, r)?;
        check_axes("lhs batch", &d.lhs_batch, l)?;
        check_axes("rhs batch", &d.rhs_batch, r)?;
        if d.lhs_contract.iter().any(|a| d.lhs_batch.contains(a))
            || d.rhs_contract.iter().any(|a| d.rhs_batch.contains(a))
        {
            return op_err(
                "dot_general",
                "a dimension cannot be both batch and contracting",
            );
        }
        if d.lhs_contract.len() != d.rhs_contract.len() || d.lhs_batch.len() != d.rhs_batch.len() {
            return op_err("dot_general", format!("unpaired dimensions in {d:?}"));
        }
        for (&a, &b) in d.lhs_contract.iter().zip(&d.rhs_contract) {
            if l.dims[a as usize] != r.dims[b as usize] {
                return op_err(
                    "dot_general",
                    format!(
                        "contracting lhs {l} dim {a} ({}) with rhs {r} dim {b} ({})",
                        l.dims[a as usize], r.dims[b as usize]
                    ),
                );
            }
        }
        for (&a, &b) in d.lhs_batch.iter().zip(&d.rhs_batch) {
            if l.dims[a as usize] != r.dims[b as usize] {
                return op_err(
                    "dot_general",
                    format!("batch dims differ: lhs {l} dim {a} vs rhs {r} dim {b}"),
                );
            }
        }
        let mut dims: Vec<i64> = d.lhs_batch.iter().map(|&a| l.dims[a as usize]).collect();
        dims.extend(
            free_dims(l.rank(), &d.lhs_contract, &d.lhs_batch)
                .iter()
                .map(|&a| l.dims[a as usize]),
        );
        dims.extend(
            free_dims(r.rank(), &d.rhs_contract, &d.rhs_batch)
                .iter()
                .map(|&a| r.dims[a as usize]),
        );
        Ok(vec![TensorType::new(self.out_dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, y, g) = (&ins[0], &ins[1], ct0(cts)?);
        let d = &self.dims;
        let dx = transpose_lhs(g, x, y, d, false)?;
        let swapped = DotDims {
            lhs_contract: d.rhs_contract.clone(),
            rhs_contract: d.lhs_contract.clone(),
            lhs_batch: d.rhs_batch.clone(),
            rhs_batch: d.lhs_batch.clone(),
        };
        let dy = transpose_lhs(g, y, x, &swapped, true)?;
        Ok(vec![Some(dx), Some(dy)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let d = &self.dims;
        let mut fields = vec![];
        if !d.lhs_batch.is_empty() {
            fields.push(format!(
                "lhs_batching_dimensions = {}",
                i64_list(&d.lhs_batch)
            ));
            fields.push(format!(
                "rhs_batching_dimensions = {}",
                i64_list(&d.rhs_batch)
            ));
        }
        fields.push(format!(
            "lhs_contracting_dimensions = {}",
            i64_list(&d.lhs_contract)
        ));
        fields.push(format!(
            "rhs_contracting_dimensions = {}",
            i64_list(&d.rhs_contract)
        ));
        let attrs = format!(
            "dot_dimension_numbers = #stablehlo.dot<{}>",
            fields.join(", ")
        );
        Ok(generic("stablehlo.dot_general", ins, outs, &attrs))
    }
}

/// Cotangent of the lhs `x` of `dot_general(x, y)` given the result's
/// cotangent `g` (JAX's `_dot_general_transpose_lhs`). With `swap_ans` the
/// roles are swapped: `x` was the rhs, so its free dimensions come last in
/// the result.
fn transpose_lhs(
    g: &Tensor,
    x: &Tensor,
    y: &Tensor,
    d: &DotDims,
    swap_ans: bool,
) -> Result<Tensor> {
    let (x_kept, y_kept) = (
        free_dims(x.rank(), &d.lhs_contract, &d.lhs_batch),
        free_dims(y.rank(), &d.rhs_contract, &d.rhs_batch),
    );
    let nb = d.lhs_batch.len() as i64;
    let ans_batch: Vec<i64> = (0..nb).collect();
    let y_start = if swap_ans {
        nb
    } else {
        nb + x_kept.len() as i64
    };
    let ans_y: Vec<i64> = (y_start..y_start + y_kept.len() as i64).collect();
    let dims = DotDims {
        lhs_contract: ans_y,
        rhs_contract: y_kept,
        lhs_batch: ans_batch,
        rhs_batch: d.rhs_batch.clone(),
    };
    let dtype = x.dtype();
    let prod = g
        .convert(dtype)?
        .dot_general_as(&y.convert(dtype)?, &dims, dtype)?;
    // `prod` is laid out as [x batch, x free, x contracting sorted by y's].
    let order = argsort(&d.rhs_contract);
    let mut layout = d.lhs_batch.clone();
    layout.extend(&x_kept);
    layout.extend(order.iter().map(|&i| d.lhs_contract[i as usize]));
    prod.transpose(&argsort(&layout))
}

impl Tensor {
    /// General contraction; the result has the operands' dtype.
    pub fn dot_general(&self, rhs: &Tensor, dims: &DotDims) -> Result<Tensor> {
        self.dot_general_as(rhs, dims, self.dtype())
    }

    /// General contraction accumulating into `out_dtype` (e.g. bf16
    /// operands with an f32 result).
    pub fn dot_general_as(&self, rhs: &Tensor, dims: &DotDims, out_dtype: DType) -> Result<Tensor> {
        self.g.apply1(
            DotGeneral {
                dims: dims.clone(),
                out_dtype,
            },
            &[self, rhs],
        )
    }

    /// Matrix product. `rhs` of rank 2 multiplies the last axis of `self`
    /// (any leading axes); operands of equal rank > 2 are batched over their
    /// leading axes: [..., m, k] x [..., k, n] -> [..., m, n].
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (lr, rr) = (self.rank() as i64, rhs.rank() as i64);
        if lr < 1 || rr < 2 {
            return op_err(
                "matmul",
                format!(
                    "operands {} and {} need ranks >= 1 and >= 2",
                    self.ty(),
                    rhs.ty()
                ),
            );
        }
        let dims = if rr == 2 {
            DotDims {
                lhs_contract: vec![lr - 1],
                rhs_contract: vec![0],
                ..Default::default()
            }
        } else if lr == rr {
            let batch: Vec<i64> = (0..lr - 2).collect();
            DotDims {
                lhs_contract: vec![lr - 1],
                rhs_contract: vec![rr - 2],
                lhs_batch: batch.clone(),
                rhs_batch: batch,
            }
        } else {
            return op_err(
                "matmul",
                format!("cannot multiply {} by {}", self.ty(), rhs.ty()),
            );
        };
        self.dot_general(rhs, &dims)
    }

    /// `self @ weight^T` for a PyTorch-layout weight [out, in]:
    /// [..., in] -> [..., out].
    pub fn linear(&self, weight: &Tensor) -> Result<Tensor> {
        let lr = self.rank() as i64;
        if lr < 1 || weight.rank() != 2 {
            return op_err(
                "linear",
                format!(
                    "input {} and weight {} (want [.., in] and [out, in])",
                    self.ty(),
                    weight.ty()
                ),
            );
        }
        let dims = DotDims {
            lhs_contract: vec![lr - 1],
            rhs_contract: vec![1],
            ..Default::default()
        };
        self.dot_general(weight, &dims)
    }
}
