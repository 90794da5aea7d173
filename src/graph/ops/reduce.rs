//! Reductions (sum, max, min over axes), top-k along the last axis, argmax,
//! and the composites built on them (mean, softmax, log-softmax,
//! logsumexp).

use crate::graph::core::{normalize_axis, Tensor};
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, i64_array, scalar_region, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReduceKind {
    Sum,
    Max,
    Min,
}

/// Reduction over `axes` (sorted, removed from the result).
#[derive(Debug)]
struct Reduce {
    kind: ReduceKind,
    axes: Vec<i64>,
}

impl ReduceKind {
    fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "reduce_sum",
            ReduceKind::Max => "reduce_max",
            ReduceKind::Min => "reduce_min",
        }
    }

    /// Identity element, as f64 (casts saturate for integer types).
    fn init(self) -> f64 {
        match self {
            ReduceKind::Sum => 0.0,
            ReduceKind::Max => f64::NEG_INFINITY,
            ReduceKind::Min => f64::INFINITY,
        }
    }

    fn combiner(self) -> &'static str {
        match self {
            ReduceKind::Sum => "stablehlo.add",
            ReduceKind::Max => "stablehlo.maximum",
            ReduceKind::Min => "stablehlo.minimum",
        }
    }
}

impl Primitive for Reduce {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        if x.dtype == DType::Bool {
            return op_err(self.name(), format!("cannot reduce bool tensor {x}"));
        }
        for (i, &a) in self.axes.iter().enumerate() {
            if a < 0 || a as usize >= x.rank() || (i > 0 && a <= self.axes[i - 1]) {
                return op_err(self.name(), format!("axes {:?} invalid for {x}", self.axes));
            }
        }
        let dims: Vec<i64> = (0..x.rank())
            .filter(|d| !self.axes.contains(&(*d as i64)))
            .map(|d| x.dims[d])
            .collect();
        Ok(vec![TensorType::new(x.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, ans, g) = (&ins[0], &outs[0], ct0(cts)?);
        let xd = x.dims();
        let kept: Vec<i64> = (0..xd.len() as i64)
            .filter(|d| !self.axes.contains(d))
            .collect();
        let g_b = g.broadcast_in_dim(&xd, &kept)?;
        let dx = match self.kind {
            ReduceKind::Sum => g_b,
            // The gradient goes to the arg-max positions, split evenly
            // among ties.
            ReduceKind::Max | ReduceKind::Min => {
                let at = x
                    .eq(&ans.broadcast_in_dim(&xd, &kept)?)?
                    .convert(x.dtype())?;
                let count = at.reduce_sum(&self.axes)?.broadcast_in_dim(&xd, &kept)?;
                g_b.mul(&at)?.div(&count)?
            }
        };
        Ok(vec![Some(dx)])
    }

    fn emit(&self, cx: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let dtype = ins[0].ty.dtype;
        let (init_line, init) = cx.constant(&TensorType::scalar(dtype), self.kind.init());
        let region = scalar_region(cx, self.kind.combiner(), dtype);
        let all = [ins[0].clone(), init];
        let head = generic("stablehlo.reduce", &all, outs, "");
        // Insert the region between the operands and the attributes.
        let (lhs, rhs) = head.split_once(" : ").expect("generic op text has a type");
        Ok(format!(
            "{init_line}\n{lhs} {region} {{dimensions = {}}} : {rhs}",
            i64_array(&self.axes)
        ))
    }
}

fn sorted_axes(axes: &[i64], rank: usize, op: &'static str) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        out.push(normalize_axis(a, rank, op)? as i64);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Tensor {
    fn reduce(&self, kind: ReduceKind, axes: &[i64]) -> Result<Tensor> {
        let axes = sorted_axes(axes, self.rank(), kind.name())?;
        if axes.is_empty() {
            return Ok(self.clone());
        }
        self.g.apply1(Reduce { kind, axes }, &[self])
    }

    /// Sum over `axes` (removed from the result; negative axes allowed).
    pub fn reduce_sum(&self, axes: &[i64]) -> Result<Tensor> {
        self.reduce(ReduceKind::Sum, axes)
    }

    pub fn reduce_max(&self, axes: &[i64]) -> Result<Tensor> {
        self.reduce(ReduceKind::Max, axes)
    }

    pub fn reduce_min(&self, axes: &[i64]) -> Result<Tensor> {
        self.reduce(ReduceKind::Min, axes)
    }

    /// Sum of all elements (a scalar).
    pub fn sum_all(&self) -> Result<Tensor> {
        let all: Vec<i64> = (0..self.rank() as i64).collect();
        self.reduce_sum(&all)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[i64]) -> Result<Tensor> {
        let dims = self.dims();
        let axes = sorted_axes(axes, dims.len(), "mean")?;
        let n: i64 = axes.iter().map(|&a| dims[a as usize]).product();
        self.reduce_sum(&axes)?.mul_scalar(1.0 / n as f64)
    }

    /// Mean of all elements (a scalar).
    pub fn mean_all(&self) -> Result<Tensor> {
        let all: Vec<i64> = (0..self.rank() as i64).collect();
        self.mean(&all)
    }

    /// Keeps a reduced axis as size 1 (for broadcasting back).
    fn keep_axis(&self, reduced: &Tensor, axis: usize) -> Result<Tensor> {
        let mut dims = self.dims();
        dims[axis] = 1;
        reduced.reshape(&dims)
    }

    /// log(sum(exp(x))) along `axis`, computed stably (max subtracted).
    /// The axis is kept with size 1.
    pub fn logsumexp(&self, axis: i64) -> Result<Tensor> {
        let a = normalize_axis(axis, self.rank(), "logsumexp")?;
        let m = self
            .keep_axis(&self.reduce_max(&[a as i64])?, a)?
            .stop_gradient()?;
        let s = self.sub(&m)?.exp()?.reduce_sum(&[a as i64])?;
        self.keep_axis(&s, a)?.log()?.add(&m)
    }

    /// log(softmax(x)) along `axis`.
    pub fn log_softmax(&self, axis: i64) -> Result<Tensor> {
        self.sub(&self.logsumexp(axis)?)
    }

    /// exp(x) / sum(exp(x)) along `axis`, computed stably. Its gradient
    /// is written in terms of the output alone, as JAX's `softmax` does:
    /// the backward pass keeps y and nothing else (autodiff through the
    /// ops below would keep exp(x - max) beside y, a second buffer the
    /// size of the attention scores per layer).
    pub fn softmax(&self, axis: i64) -> Result<Tensor> {
        let a = normalize_axis(axis, self.rank(), "softmax")?;
        let x = self.stop_gradient()?;
        let m = x.keep_axis(&x.reduce_max(&[a as i64])?, a)?;
        let e = x.sub(&m)?.exp()?;
        let s = x.keep_axis(&e.reduce_sum(&[a as i64])?, a)?;
        let y = e.div(&s)?;
        self.g.apply1(SoftmaxOutput { axis: a }, &[self, &y])
    }
}

/// Ties softmax's output y (operand 1, computed without gradients) to its
/// input x (operand 0): the value is y, and the gradient is
/// dx = y * (g - sum(g * y, axis)).
#[derive(Debug)]
struct SoftmaxOutput {
    axis: usize,
}

impl Primitive for SoftmaxOutput {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        if ins[0] != ins[1] {
            return op_err("softmax", format!("input {} but output {}", ins[0], ins[1]));
        }
        Ok(vec![ins[1].clone()])
    }

    fn vjp(
        &self,
        _: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (y, g) = (&outs[0], ct0(cts)?);
        let dot = y.keep_axis(&g.mul(y)?.reduce_sum(&[self.axis as i64])?, self.axis)?;
        Ok(vec![Some(y.mul(&g.sub(&dot)?)?), None])
    }

    fn emit(&self, _: &mut EmitCx, _: &[Operand], _: &[Operand]) -> Result<String> {
        Ok(String::new())
    }

    fn alias_of(&self) -> Option<usize> {
        Some(1)
    }
}

// ---------------------------------------------------------------- top_k

/// The `k` largest entries along the last axis, in descending order, and
/// their indices (i32). Ties go to the lower index.
#[derive(Debug)]
struct TopK(i64);

impl Primitive for TopK {
    fn name(&self) -> &'static str {
        "top_k"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        let last = x.dims.last().copied().unwrap_or(0);
        if x.rank() == 0
            || self.0 < 1
            || self.0 > last
            || !x.dtype.is_float() && !x.dtype.is_integer()
        {
            return op_err(
                "top_k",
                format!(
                    "k = {} is invalid for {x} (last axis must have >= k entries)",
                    self.0
                ),
            );
        }
        let mut dims = x.dims.clone();
        *dims.last_mut().expect("rank >= 1") = self.0;
        Ok(vec![
            TensorType::new(x.dtype, &dims),
            TensorType::new(DType::I32, &dims),
        ])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = cts[0].as_ref() else {
            return Ok(vec![None]);
        };
        // dx[..., j] = sum_i g[..., i] * (idx[..., i] == j)
        let x = &ins[0];
        let xd = x.dims();
        let r = xd.len() as i64;
        let n = xd[xd.len() - 1];
        let mut sel_dims = outs[1].dims();
        sel_dims.push(n);
        let j =
            x.g.iota(TensorType::new(DType::I32, &sel_dims), sel_dims.len() - 1)?;
        let idx = outs[1].reshape(&[outs[1].dims(), vec![1]].concat())?;
        let hit = j.eq(&idx)?.convert(x.dtype())?;
        let g = g.reshape(&[g.dims(), vec![1]].concat())?;
        Ok(vec![Some(g.mul(&hit)?.reduce_sum(&[r - 1])?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(
            "chlo.top_k",
            ins,
            outs,
            &format!("k = {} : i64", self.0),
        ))
    }
}

impl Tensor {
    /// (values, indices) of the `k` largest entries along the last axis.
    pub fn top_k(&self, k: i64) -> Result<(Tensor, Tensor)> {
        let mut outs = self.g.apply(TopK(k), &[self])?;
        let idx = outs.pop().expect("two outputs");
        let val = outs.pop().expect("two outputs");
        Ok((val, idx))
    }

    /// Index (i32) of the largest entry along `axis` (first on ties); the
    /// axis is removed.
    pub fn argmax(&self, axis: i64) -> Result<Tensor> {
        let r = self.rank();
        let a = normalize_axis(axis, r, "argmax")?;
        // Move `axis` last; the other axes keep their order.
        let mut perm: Vec<i64> = (0..r as i64).filter(|&d| d != a as i64).collect();
        perm.push(a as i64);
        let moved = self.transpose(&perm)?;
        let (_, idx) = moved.top_k(1)?;
        let mut dims = moved.dims();
        dims.pop();
        idx.reshape(&dims)
    }
}
