//! Stable sort of rank-1 tensors by an integer key (routing tokens to
//! experts). Not differentiable: only indices and keys are sorted.

use crate::graph::core::Tensor;
use crate::graph::dtype::TensorType;
use crate::graph::emit::{generic, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{Operand, Primitive};

#[derive(Debug)]
struct SortByKey;

impl Primitive for SortByKey {
    fn name(&self) -> &'static str {
        "sort"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let key = ins[0];
        if key.rank() != 1 || !key.dtype.is_integer() {
            return op_err(
                "sort",
                format!("key must be a rank-1 integer tensor, got {key}"),
            );
        }
        for t in &ins[1..] {
            if t.dims != key.dims {
                return op_err("sort", format!("operand {t} does not match key {key}"));
            }
        }
        Ok(ins.iter().map(|t| (*t).clone()).collect())
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        // Comparator region: one pair of scalar arguments per operand;
        // only the key pair decides the order.
        let mut args = vec![];
        let mut key_args = vec![];
        for (i, op) in ins.iter().enumerate() {
            let s = TensorType::scalar(op.ty.dtype).mlir();
            let (a, b) = (cx.fresh(), cx.fresh());
            if i == 0 {
                key_args = vec![a.clone(), b.clone()];
            }
            args.push(format!("{a}: {s}, {b}: {s}"));
        }
        let key_scalar = TensorType::scalar(ins[0].ty.dtype).mlir();
        let kind = if ins[0].ty.dtype.is_signed_integer() {
            "SIGNED"
        } else {
            "UNSIGNED"
        };
        let lt = cx.fresh();
        let region = format!(
            "({{\n^bb0({}):\n  {lt} = \"stablehlo.compare\"({}, {}) {{comparison_direction = #stablehlo<comparison_direction LT>, compare_type = #stablehlo<comparison_type {kind}>}} : ({key_scalar}, {key_scalar}) -> tensor<i1>\n  \"stablehlo.return\"({lt}) : (tensor<i1>) -> ()\n}})",
            args.join(", "),
            key_args[0],
            key_args[1]
        );
        let head = generic("stablehlo.sort", ins, outs, "");
        let (lhs, rhs) = head.split_once(" : ").expect("generic op text has a type");
        Ok(format!(
            "{lhs} {region} {{dimension = 0 : i64, is_stable = true}} : {rhs}"
        ))
    }
}

impl Tensor {
    /// Sorts the rank-1 integer `self` ascending (stable) and permutes
    /// `values` the same way. Returns (sorted keys, sorted values).
    pub fn sort_by_key(&self, values: &[&Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let mut ins = vec![self];
        ins.extend_from_slice(values);
        let mut outs = self.g.apply(SortByKey, &ins)?;
        let keys = outs.remove(0);
        Ok((keys, outs))
    }
}
