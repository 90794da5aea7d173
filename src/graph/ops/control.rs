//! Structured control flow: `while_loop` (used for micro-batch gradient
//! accumulation inside one compiled step).

use crate::graph::core::{BlockId, Graph, Tensor};
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{names, types, EmitCx};
use crate::graph::error::{op_err, usage, GraphError, Result};
use crate::graph::primitive::{Operand, Primitive};

/// A while loop over `n_carried` loop-carried values followed by the
/// values the condition and body capture from the enclosing block.
#[derive(Debug)]
struct While {
    cond: BlockId,
    body: BlockId,
    /// Values of the enclosing block captured by either region, in the
    /// order they are appended to the operands.
    captures: Vec<usize>,
    carried_types: Vec<TensorType>,
}

impl Primitive for While {
    fn name(&self) -> &'static str {
        "while"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let n = self.carried_types.len();
        for (i, (got, want)) in ins[..n].iter().zip(&self.carried_types).enumerate() {
            if *got != want {
                return op_err(
                    "while",
                    format!("loop value {i}: initial {got} but body returns {want}"),
                );
            }
        }
        Ok(ins.iter().map(|t| (*t).clone()).collect())
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Err(GraphError::Op {
            op: "while",
            msg:
                "is not differentiable; take gradients inside the loop body (e.g. per micro-batch)"
                    .into(),
        })
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let cond = cx.region(self.cond, &self.captures, false)?;
        let body = cx.region(self.body, &self.captures, true)?;
        let def = crate::graph::emit::results_def(outs);
        Ok(format!(
            "{def} = \"stablehlo.while\"({}) ({{\n{cond}}}, {{\n{body}}}) : ({}) -> ({})",
            names(ins),
            types(ins),
            types(outs)
        ))
    }
}

impl Graph {
    /// `while cond(state) { state = body(state) }`, returning the final
    /// state. `cond` returns a bool scalar; `body` returns new values of the
    /// same types as `init`. Both may use tensors from the enclosing scope
    /// (they are threaded through the loop automatically).
    pub fn while_loop<C, B>(&self, init: &[&Tensor], cond: C, body: B) -> Result<Vec<Tensor>>
    where
        C: FnOnce(&[Tensor]) -> Result<Tensor>,
        B: FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    {
        if init.is_empty() {
            return usage("while_loop needs at least one loop value");
        }
        let types: Vec<TensorType> = init.iter().map(|t| t.ty()).collect();
        let cond_block = self.in_child_block(&types, |args| {
            let c = cond(args)?;
            let ty = c.ty();
            if ty != TensorType::scalar(DType::Bool) {
                return op_err(
                    "while",
                    format!("condition must return a bool scalar, got {ty}"),
                );
            }
            Ok(vec![c])
        })?;
        let mut body_types = vec![];
        let body_block = self.in_child_block(&types, |args| {
            let out = body(args)?;
            if out.len() != args.len() {
                return op_err(
                    "while",
                    format!(
                        "body returns {} values for {} loop values",
                        out.len(),
                        args.len()
                    ),
                );
            }
            body_types = out.iter().map(|t| t.ty()).collect();
            Ok(out)
        })?;
        let captures: Vec<usize> = {
            let st = self.st.borrow();
            let mut all: Vec<usize> = vec![];
            for b in [cond_block, body_block] {
                for &(outer, _) in &st.blocks[b].captures {
                    if !all.contains(&outer) {
                        all.push(outer);
                    }
                }
            }
            all
        };
        let captured: Vec<Tensor> = captures.iter().map(|&v| self.tensor(v)).collect();
        let mut operands: Vec<&Tensor> = init.to_vec();
        operands.extend(captured.iter());
        let prim = While {
            cond: cond_block,
            body: body_block,
            captures,
            carried_types: body_types,
        };
        let mut outs = self.apply(prim, &operands)?;
        outs.truncate(init.len());
        Ok(outs)
    }
}
