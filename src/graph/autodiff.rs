//! Reverse-mode automatic differentiation over the traced graph.
//!
//! `vjp` walks the nodes of the current block backwards from the outputs,
//! calling each primitive's rule; the rules are written with ordinary
//! tensor ops, so the backward pass is recorded into the same graph and the
//! forward and backward of a step compile into one module. Values from an
//! enclosing block (e.g. parameters used inside a loop body) are
//! differentiated through their capture arguments.

use std::collections::{HashMap, HashSet};

use super::core::{Tensor, ValueId};
use super::error::{usage, GraphError, Result};

/// Cotangents of `wrt` given cotangents `seeds` of `outputs` (same types).
/// Unreachable inputs get zeros.
pub fn vjp(outputs: &[&Tensor], seeds: &[&Tensor], wrt: &[&Tensor]) -> Result<Vec<Tensor>> {
    let Some(first) = outputs.first() else {
        return usage("vjp: no outputs");
    };
    let g = first.g.clone();
    if outputs.len() != seeds.len() {
        return usage(format!(
            "vjp: {} outputs but {} cotangents",
            outputs.len(),
            seeds.len()
        ));
    }
    let (out_ids, wrt_ids, nodes) = {
        let mut st = g.st.borrow_mut();
        let block = st.current();
        let mut import_all = |ts: &[&Tensor]| -> Result<Vec<ValueId>> {
            ts.iter()
                .map(|t| {
                    if g.same(&t.g) {
                        st.import(t.id, block)
                    } else {
                        usage("vjp: tensor from another graph")
                    }
                })
                .collect()
        };
        let out_ids = import_all(outputs)?;
        let wrt_ids = import_all(wrt)?;
        let nodes = st.blocks[block].nodes.clone();
        (out_ids, wrt_ids, nodes)
    };
    for (o, s) in outputs.iter().zip(seeds) {
        if o.ty() != s.ty() {
            return usage(format!(
                "vjp: cotangent {} does not match output {}",
                s.ty(),
                o.ty()
            ));
        }
    }

    // Values that depend on `wrt` through float ops.
    let mut active: HashSet<ValueId> = wrt_ids.iter().copied().collect();
    for &n in &nodes {
        let st = g.st.borrow();
        let node = &st.nodes[n];
        if node.inputs.iter().any(|i| active.contains(i)) {
            for &o in &node.outputs {
                if st.values[o].ty.dtype.is_float() {
                    active.insert(o);
                }
            }
        }
    }

    let mut ct: HashMap<ValueId, Tensor> = HashMap::new();
    for (&o, s) in out_ids.iter().zip(seeds) {
        accumulate(&mut ct, o, (*s).clone())?;
    }
    for &n in nodes.iter().rev() {
        let (prim, inputs, outputs) = {
            let st = g.st.borrow();
            let node = &st.nodes[n];
            (node.prim.clone(), node.inputs.clone(), node.outputs.clone())
        };
        if !outputs.iter().any(|o| ct.contains_key(o)) || !inputs.iter().any(|i| active.contains(i))
        {
            continue;
        }
        let ins: Vec<Tensor> = inputs.iter().map(|&v| g.tensor(v)).collect();
        let outs: Vec<Tensor> = outputs.iter().map(|&v| g.tensor(v)).collect();
        let cts: Vec<Option<Tensor>> = outputs.iter().map(|o| ct.get(o).cloned()).collect();
        let grads = prim.vjp(&ins, &outs, &cts)?;
        for (i, (&v, grad)) in inputs.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            if !active.contains(&v) {
                continue;
            }
            if grad.ty() != ins[i].ty() {
                return Err(GraphError::Op {
                    op: prim.name(),
                    msg: format!(
                        "internal: gradient rule gave {} for operand {i} of type {}",
                        grad.ty(),
                        ins[i].ty()
                    ),
                });
            }
            accumulate(&mut ct, v, grad)?;
        }
    }
    wrt_ids
        .iter()
        .zip(wrt)
        .map(|(v, t)| match ct.get(v) {
            Some(c) => Ok(c.clone()),
            None => t.zeros_like(),
        })
        .collect()
}

fn accumulate(ct: &mut HashMap<ValueId, Tensor>, v: ValueId, grad: Tensor) -> Result<()> {
    let sum = match ct.remove(&v) {
        Some(prev) => prev.add(&grad)?,
        None => grad,
    };
    ct.insert(v, sum);
    Ok(())
}

/// Gradient of a float scalar `loss` with respect to each of `wrt`.
pub fn grad(loss: &Tensor, wrt: &[&Tensor]) -> Result<Vec<Tensor>> {
    let ty = loss.ty();
    if ty.rank() != 0 || !ty.dtype.is_float() {
        return usage(format!("grad: loss must be a float scalar, got {ty}"));
    }
    let one = loss.scalar_like(1.0)?;
    vjp(&[loss], &[&one], wrt)
}
