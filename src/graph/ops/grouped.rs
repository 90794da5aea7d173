//! Grouped matmuls for routed experts: the rows of `x` come in blocks of a
//! fixed size, every block belongs to one group (an expert), and each block
//! is multiplied by its own group's weight matrix.
//!
//! Both primitives lower to one XLA while loop over the blocks that hold
//! rows, which reads the block's rows and its group's weights in place with
//! `dynamic_slice` and writes the block's result with
//! `dynamic_update_slice`. Nothing of size blocks x weights is ever built:
//! the batched alternative (gather each block's weights, one batched dot)
//! materialises a [blocks, N, K] copy of the weights per projection in the
//! forward pass, keeps it for the backward pass, and scatter-adds weight
//! gradients of the same size back. Here the memory is the rows' own
//! ([R, K] in, [R, N] out) plus one block's temporaries, whatever the
//! number of groups; and blocks past `used` (all padding) cost nothing.
//!
//! `grouped_outer` is the weight gradient of `grouped_matmul` and vice
//! versa, so both differentiate to any order with the same two loops.

use crate::graph::core::Tensor;
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, i64_array, i64_list, names, types, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

/// How a group's weight matrix is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// w [G, N, K]: y = x w[g]^T, as a linear layer's [out, in] weight.
    OutIn,
    /// w [G, K, N]: y = x w[g].
    InOut,
}

impl WeightLayout {
    /// The weight axis contracted with x's last axis.
    fn contracted_axis(self) -> usize {
        match self {
            WeightLayout::OutIn => 2,
            WeightLayout::InOut => 1,
        }
    }

    fn other(self) -> WeightLayout {
        match self {
            WeightLayout::OutIn => WeightLayout::InOut,
            WeightLayout::InOut => WeightLayout::OutIn,
        }
    }
}

/// Checks groups [NB] and used [] (i32) against R rows; returns the block size.
fn check_blocks(
    op: &'static str,
    rows: i64,
    groups: &TensorType,
    used: &TensorType,
) -> Result<i64> {
    if groups.dtype != DType::I32 || groups.rank() != 1 || used != &TensorType::scalar(DType::I32) {
        return op_err(
            op,
            format!("want groups [blocks] i32 and used [] i32, got {groups} and {used}"),
        );
    }
    let nb = groups.dims[0];
    if nb == 0 || rows % nb != 0 {
        return op_err(
            op,
            format!("{rows} rows do not split into {nb} blocks of equal size"),
        );
    }
    Ok(rows / nb)
}

/// x [R, K], w [G, N, K] (OutIn) or [G, K, N] (InOut), groups [NB] i32,
/// used [] i32 -> y [R, N]: block b (rows b*R/NB ..) times w[groups[b]] for
/// b < used, zeros for the rest.
#[derive(Debug)]
struct GroupedMatmul(WeightLayout);

impl Primitive for GroupedMatmul {
    fn name(&self) -> &'static str {
        "grouped_matmul"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (x, w) = (ins[0], ins[1]);
        let c = self.0.contracted_axis();
        if x.rank() != 2 || w.rank() != 3 || x.dtype != w.dtype || x.dims[1] != w.dims[c] {
            return op_err(
                "grouped_matmul",
                format!("want x [R, K] and weights with K at axis {c} of [G, _, _], one dtype; got {x} and {w}"),
            );
        }
        check_blocks("grouped_matmul", x.dims[0], ins[2], ins[3])?;
        Ok(vec![TensorType::new(x.dtype, &[x.dims[0], w.dims[3 - c]])])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w, groups, used) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        let dy = ct0(cts)?;
        let dx = dy.grouped_matmul(w, groups, used, self.0.other())?;
        let dw = match self.0 {
            WeightLayout::OutIn => dy.grouped_outer(x, groups, used, w.dim(0)?)?,
            WeightLayout::InOut => x.grouped_outer(dy, groups, used, w.dim(0)?)?,
        };
        Ok(vec![Some(dx), Some(dw), None, None])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let (x, w) = (&ins[0], &ins[1]);
        let (k, n) = (x.ty.dims[1], outs[0].ty.dims[1]);
        let block = x.ty.dims[0] / ins[2].ty.dims[0];
        let c = self.0.contracted_axis();
        let mut wdims = w.ty.dims.clone();
        wdims[0] = 1;
        block_loop(cx, ins, &outs[0], |b, lp| {
            let xb = b.op(
                "stablehlo.dynamic_slice",
                &[&lp.ins[0], &lp.row, &lp.zero],
                TensorType::new(x.ty.dtype, &[block, k]),
                &format!("slice_sizes = {}", i64_array(&[block, k])),
            );
            let wg = b.op(
                "stablehlo.dynamic_slice",
                &[&lp.ins[1], &lp.group, &lp.zero, &lp.zero],
                TensorType::new(w.ty.dtype, &wdims),
                &format!("slice_sizes = {}", i64_array(&wdims)),
            );
            let wg = b.op(
                "stablehlo.reshape",
                &[&wg],
                TensorType::new(w.ty.dtype, &wdims[1..]),
                "",
            );
            let yb = b.op(
                "stablehlo.dot_general",
                &[&xb, &wg],
                TensorType::new(x.ty.dtype, &[block, n]),
                &dot_attrs(1, c as i64 - 1),
            );
            b.op(
                "stablehlo.dynamic_update_slice",
                &[&lp.acc, &yb, &lp.row, &lp.zero],
                lp.acc.ty.clone(),
                "",
            )
        })
    }
}

/// a [R, P], b [R, Q], groups [NB] i32, used [] i32 -> [G, P, Q]: out[g] =
/// the sum over blocks i < used with groups[i] = g of a_i^T b_i.
#[derive(Debug)]
struct GroupedOuter {
    groups: i64,
}

impl Primitive for GroupedOuter {
    fn name(&self) -> &'static str {
        "grouped_outer"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (a, b) = (ins[0], ins[1]);
        if a.rank() != 2 || b.rank() != 2 || a.dtype != b.dtype || a.dims[0] != b.dims[0] {
            return op_err(
                "grouped_outer",
                format!("want a [R, P] and b [R, Q] of one dtype, got {a} and {b}"),
            );
        }
        if self.groups < 1 {
            return op_err("grouped_outer", format!("{} groups", self.groups));
        }
        check_blocks("grouped_outer", a.dims[0], ins[2], ins[3])?;
        Ok(vec![TensorType::new(
            a.dtype,
            &[self.groups, a.dims[1], b.dims[1]],
        )])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, b, groups, used) = (&ins[0], &ins[1], &ins[2], &ins[3]);
        let d = ct0(cts)?; // [G, P, Q]
        let da = b.grouped_matmul(d, groups, used, WeightLayout::OutIn)?;
        let db = a.grouped_matmul(d, groups, used, WeightLayout::InOut)?;
        Ok(vec![Some(da), Some(db), None, None])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let (a, b) = (&ins[0], &ins[1]);
        let (p, q) = (a.ty.dims[1], b.ty.dims[1]);
        let block = a.ty.dims[0] / ins[2].ty.dims[0];
        let dt = a.ty.dtype;
        block_loop(cx, ins, &outs[0], |bd, lp| {
            let ab = bd.op(
                "stablehlo.dynamic_slice",
                &[&lp.ins[0], &lp.row, &lp.zero],
                TensorType::new(dt, &[block, p]),
                &format!("slice_sizes = {}", i64_array(&[block, p])),
            );
            let bb = bd.op(
                "stablehlo.dynamic_slice",
                &[&lp.ins[1], &lp.row, &lp.zero],
                TensorType::new(dt, &[block, q]),
                &format!("slice_sizes = {}", i64_array(&[block, q])),
            );
            let o = bd.op(
                "stablehlo.dot_general",
                &[&ab, &bb],
                TensorType::new(dt, &[p, q]),
                &dot_attrs(0, 0),
            );
            let o = bd.op(
                "stablehlo.reshape",
                &[&o],
                TensorType::new(dt, &[1, p, q]),
                "",
            );
            let cur = bd.op(
                "stablehlo.dynamic_slice",
                &[&lp.acc, &lp.group, &lp.zero, &lp.zero],
                TensorType::new(dt, &[1, p, q]),
                &format!("slice_sizes = {}", i64_array(&[1, p, q])),
            );
            let sum = bd.op("stablehlo.add", &[&cur, &o], cur.ty.clone(), "");
            bd.op(
                "stablehlo.dynamic_update_slice",
                &[&lp.acc, &sum, &lp.group, &lp.zero, &lp.zero],
                lp.acc.ty.clone(),
                "",
            )
        })
    }
}

/// `#stablehlo.dot` contracting one axis of each side, no batch axes.
fn dot_attrs(lhs: i64, rhs: i64) -> String {
    format!(
        "dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = {}, rhs_contracting_dimensions = {}>",
        i64_list(&[lhs]),
        i64_list(&[rhs])
    )
}

/// Lines of a region under construction, with fresh names.
struct Lines<'c, 'a> {
    cx: &'c mut EmitCx<'a>,
    text: Vec<String>,
}

impl Lines<'_, '_> {
    fn op(&mut self, op: &str, ins: &[&Operand], ty: TensorType, attrs: &str) -> Operand {
        let out = Operand {
            name: self.cx.fresh(),
            ty,
        };
        let ins: Vec<Operand> = ins.iter().map(|o| (*o).clone()).collect();
        self.text
            .push(generic(op, &ins, std::slice::from_ref(&out), attrs));
        out
    }

    fn constant(&mut self, ty: TensorType, value: f64) -> Operand {
        let (lines, c) = self.cx.constant(&ty, value);
        self.text.extend(lines.lines().map(str::to_owned));
        c
    }

    fn fresh_like(&mut self, o: &Operand) -> Operand {
        Operand {
            name: self.cx.fresh(),
            ty: o.ty.clone(),
        }
    }
}

/// What a loop body sees: its copies of the primitive's operands, the
/// accumulator, the block's first row, its group, and a zero index.
struct LoopVars {
    ins: Vec<Operand>,
    acc: Operand,
    row: Operand,
    group: Operand,
    zero: Operand,
}

/// `for i in 0..used { acc = body(i) }` with acc starting at zeros of
/// `out`'s type; `out` is the final acc. The operands (x-like, weights,
/// groups, used) are threaded through the loop unchanged, as StableHLO
/// regions take their values as block arguments.
fn block_loop(
    cx: &mut EmitCx,
    ins: &[Operand],
    out: &Operand,
    body: impl FnOnce(&mut Lines, &LoopVars) -> Operand,
) -> Result<String> {
    let i32s = TensorType::scalar(DType::I32);
    let block = ins[0].ty.dims[0] / ins[2].ty.dims[0];
    let mut top = Lines { cx, text: vec![] };
    let start = top.constant(i32s.clone(), 0.0);
    let zero = top.constant(TensorType::scalar(out.ty.dtype), 0.0);
    let init = top.op(
        "stablehlo.broadcast_in_dim",
        &[&zero],
        out.ty.clone(),
        &format!("broadcast_dimensions = {}", i64_array(&[])),
    );
    let mut carried = vec![start.clone(), init];
    carried.extend(ins.iter().cloned());
    let args =
        |l: &mut Lines| -> Vec<Operand> { carried.iter().map(|o| l.fresh_like(o)).collect() };
    let sig = |a: &[Operand]| -> String {
        a.iter()
            .map(|o| format!("{}: {}", o.name, o.ty.mlir()))
            .collect::<Vec<_>>()
            .join(", ")
    };

    // cond: i < used
    let cargs = args(&mut top);
    let mut cond = Lines {
        cx: &mut *top.cx,
        text: vec![],
    };
    let lt = cond.op(
        "stablehlo.compare",
        &[&cargs[0], &cargs[5]],
        TensorType::scalar(DType::Bool),
        "comparison_direction = #stablehlo<comparison_direction LT>",
    );
    let cond_text = format!(
        "^bb0({}):\n  {}\n  \"stablehlo.return\"({}) : ({}) -> ()\n",
        sig(&cargs),
        cond.text.join("\n  "),
        lt.name,
        lt.ty.mlir()
    );

    // body: acc = body(i); i += 1
    let bargs = args(&mut top);
    let mut b = Lines {
        cx: &mut *top.cx,
        text: vec![],
    };
    let i = &bargs[0];
    let g1 = b.op(
        "stablehlo.dynamic_slice",
        &[&bargs[4], i],
        TensorType::new(DType::I32, &[1]),
        &format!("slice_sizes = {}", i64_array(&[1])),
    );
    let group = b.op("stablehlo.reshape", &[&g1], i32s.clone(), "");
    let size = b.constant(i32s.clone(), block as f64);
    let row = b.op("stablehlo.multiply", &[i, &size], i32s.clone(), "");
    let zero_i = b.constant(i32s.clone(), 0.0);
    let one = b.constant(i32s.clone(), 1.0);
    let vars = LoopVars {
        ins: bargs[2..].to_vec(),
        acc: bargs[1].clone(),
        row,
        group,
        zero: zero_i,
    };
    let acc = body(&mut b, &vars);
    let next = b.op("stablehlo.add", &[i, &one], i32s, "");
    let mut returned = vec![next, acc];
    returned.extend(bargs[2..].iter().cloned());
    let body_text = format!(
        "^bb0({}):\n  {}\n  \"stablehlo.return\"({}) : ({}) -> ()\n",
        sig(&bargs),
        b.text.join("\n  "),
        names(&returned),
        types(&returned)
    );

    let results: Vec<Operand> = carried.iter().map(|o| top.fresh_like(o)).collect();
    let base = top.cx.fresh();
    top.text.push(format!(
        "{base}:{} = \"stablehlo.while\"({}) ({{\n{cond_text}}}, {{\n{body_text}}}) : ({}) -> ({})",
        results.len(),
        names(&carried),
        types(&carried),
        types(&results)
    ));
    // The loop's accumulator under the primitive's result name.
    top.text.push(generic(
        "stablehlo.reshape",
        &[Operand {
            name: format!("{base}#1"),
            ty: out.ty.clone(),
        }],
        std::slice::from_ref(out),
        "",
    ));
    Ok(top.text.join("\n"))
}

impl Tensor {
    /// Rows of `self` [R, K] in `groups.len()` equal blocks, block b
    /// multiplied by `weights[groups[b]]` (see [`WeightLayout`]) for b <
    /// `used`, zero rows after: [R, N]. `groups` [NB] and `used` [] are
    /// i32; group ids are clamped into range.
    pub fn grouped_matmul(
        &self,
        weights: &Tensor,
        groups: &Tensor,
        used: &Tensor,
        layout: WeightLayout,
    ) -> Result<Tensor> {
        self.g
            .apply1(GroupedMatmul(layout), &[self, weights, groups, used])
    }

    /// Per group g of `num_groups`: the sum over blocks b < `used` with
    /// `groups[b]` = g of self_b^T other_b, for `self` [R, P] and `other`
    /// [R, Q] in `groups.len()` equal row blocks: [G, P, Q].
    pub fn grouped_outer(
        &self,
        other: &Tensor,
        groups: &Tensor,
        used: &Tensor,
        num_groups: i64,
    ) -> Result<Tensor> {
        self.g.apply1(
            GroupedOuter { groups: num_groups },
            &[self, other, groups, used],
        )
    }
}
