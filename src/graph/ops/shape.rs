//! Ops that move data without arithmetic: broadcast, reshape, transpose,
//! slice, concatenate, pad, dynamic_slice and dynamic_update_slice.

use crate::graph::core::{normalize_axis, Tensor};
use crate::graph::dtype::TensorType;
use crate::graph::emit::{generic, i64_array, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{ct0, Operand, Primitive};

// ---------------------------------------------------------------- broadcast_in_dim

/// Operand dimension i becomes result dimension `mapping[i]` (strictly
/// increasing); operand dimensions of size 1 may stretch.
#[derive(Debug)]
struct BroadcastInDim {
    out_dims: Vec<i64>,
    mapping: Vec<i64>,
}

impl Primitive for BroadcastInDim {
    fn name(&self) -> &'static str {
        "broadcast_in_dim"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        if self.mapping.len() != x.rank() {
            return op_err(
                self.name(),
                format!("mapping {:?} does not cover operand {x}", self.mapping),
            );
        }
        for (i, &m) in self.mapping.iter().enumerate() {
            let ok_index =
                m >= 0 && (m as usize) < self.out_dims.len() && (i == 0 || m > self.mapping[i - 1]);
            if !ok_index {
                return op_err(
                    self.name(),
                    format!("mapping {:?} must be increasing result dims", self.mapping),
                );
            }
            let (from, to) = (x.dims[i], self.out_dims[m as usize]);
            if from != to && from != 1 {
                return op_err(
                    self.name(),
                    format!("cannot broadcast {x} to {:?}", self.out_dims),
                );
            }
        }
        Ok(vec![TensorType::new(x.dtype, &self.out_dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, g) = (&ins[0], ct0(cts)?);
        let xd = x.dims();
        let summed: Vec<i64> = (0..self.out_dims.len() as i64)
            .filter(|d| match self.mapping.iter().position(|m| m == d) {
                None => true,
                Some(i) => xd[i] == 1 && self.out_dims[*d as usize] != 1,
            })
            .collect();
        Ok(vec![Some(g.reduce_sum(&summed)?.reshape(&xd)?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let attrs = format!("broadcast_dimensions = {}", i64_array(&self.mapping));
        Ok(generic("stablehlo.broadcast_in_dim", ins, outs, &attrs))
    }
}

impl Tensor {
    /// Places operand dimension i at result dimension `mapping[i]`.
    pub fn broadcast_in_dim(&self, out_dims: &[i64], mapping: &[i64]) -> Result<Tensor> {
        if self.dims() == out_dims && mapping.iter().enumerate().all(|(i, &m)| m == i as i64) {
            return Ok(self.clone());
        }
        let prim = BroadcastInDim {
            out_dims: out_dims.to_vec(),
            mapping: mapping.to_vec(),
        };
        self.g.apply1(prim, &[self])
    }

    /// NumPy-style broadcast (dimensions aligned on the right).
    pub fn broadcast_to(&self, out_dims: &[i64]) -> Result<Tensor> {
        let r = self.rank();
        if r > out_dims.len() {
            return op_err(
                "broadcast_in_dim",
                format!("cannot broadcast {} to {out_dims:?}", self.ty()),
            );
        }
        let offset = (out_dims.len() - r) as i64;
        let mapping: Vec<i64> = (0..r as i64).map(|i| i + offset).collect();
        self.broadcast_in_dim(out_dims, &mapping)
    }
}

// ---------------------------------------------------------------- reshape

#[derive(Debug)]
struct Reshape(Vec<i64>);

impl Primitive for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let out = TensorType::new(ins[0].dtype, &self.0);
        if self.0.iter().any(|&d| d < 0) || out.num_elements() != ins[0].num_elements() {
            return op_err(
                "reshape",
                format!("cannot reshape {} to {:?}", ins[0], self.0),
            );
        }
        Ok(vec![out])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(ct0(cts)?.reshape(&ins[0].dims())?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.reshape", ins, outs, ""))
    }
}

impl Tensor {
    /// Same elements in row-major order, new dimensions. One entry may be
    /// -1 (inferred).
    pub fn reshape(&self, dims: &[i64]) -> Result<Tensor> {
        let mut dims = dims.to_vec();
        if let Some(pos) = dims.iter().position(|&d| d == -1) {
            let known: i64 = dims.iter().filter(|&&d| d != -1).product();
            let total = self.ty().num_elements();
            if known == 0 || total % known != 0 {
                return op_err(
                    "reshape",
                    format!("cannot reshape {} to {dims:?}", self.ty()),
                );
            }
            dims[pos] = total / known;
        }
        if dims == self.dims() {
            return Ok(self.clone());
        }
        self.g.apply1(Reshape(dims), &[self])
    }
}

// ---------------------------------------------------------------- transpose

#[derive(Debug)]
struct Transpose(Vec<i64>);

impl Primitive for Transpose {
    fn name(&self) -> &'static str {
        "transpose"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        let mut seen = vec![false; x.rank()];
        if self.0.len() != x.rank() {
            return op_err("transpose", format!("permutation {:?} for {x}", self.0));
        }
        for &p in &self.0 {
            if p < 0 || p as usize >= x.rank() || seen[p as usize] {
                return op_err(
                    "transpose",
                    format!("{:?} is not a permutation of 0..{}", self.0, x.rank()),
                );
            }
            seen[p as usize] = true;
        }
        let dims: Vec<i64> = self.0.iter().map(|&p| x.dims[p as usize]).collect();
        Ok(vec![TensorType::new(x.dtype, &dims)])
    }

    fn vjp(
        &self,
        _: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut inverse = vec![0i64; self.0.len()];
        for (i, &p) in self.0.iter().enumerate() {
            inverse[p as usize] = i as i64;
        }
        Ok(vec![Some(ct0(cts)?.transpose(&inverse)?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(
            "stablehlo.transpose",
            ins,
            outs,
            &format!("permutation = {}", i64_array(&self.0)),
        ))
    }
}

impl Tensor {
    /// Result dimension i is operand dimension `perm[i]`.
    pub fn transpose(&self, perm: &[i64]) -> Result<Tensor> {
        if perm.iter().enumerate().all(|(i, &p)| p == i as i64) && perm.len() == self.rank() {
            return Ok(self.clone());
        }
        self.g.apply1(Transpose(perm.to_vec()), &[self])
    }

    /// Swaps two axes (negative axes count from the end).
    pub fn swap_axes(&self, a: i64, b: i64) -> Result<Tensor> {
        let r = self.rank();
        let (a, b) = (
            normalize_axis(a, r, "transpose")?,
            normalize_axis(b, r, "transpose")?,
        );
        let mut perm: Vec<i64> = (0..r as i64).collect();
        perm.swap(a, b);
        self.transpose(&perm)
    }
}

// ---------------------------------------------------------------- slice

#[derive(Debug)]
struct Slice {
    start: Vec<i64>,
    limit: Vec<i64>,
    strides: Vec<i64>,
}

impl Primitive for Slice {
    fn name(&self) -> &'static str {
        "slice"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        let r = x.rank();
        if self.start.len() != r || self.limit.len() != r || self.strides.len() != r {
            return op_err(
                "slice",
                format!("start/limit/strides must have {r} entries for {x}"),
            );
        }
        let mut dims = Vec::with_capacity(r);
        for d in 0..r {
            let (s, l, st) = (self.start[d], self.limit[d], self.strides[d]);
            if s < 0 || l > x.dims[d] || s > l || st < 1 {
                return op_err(
                    "slice",
                    format!(
                        "dimension {d}: [{s}:{l}:{st}] is not a valid range of size {} in {x}",
                        x.dims[d]
                    ),
                );
            }
            dims.push((l - s + st - 1) / st);
        }
        Ok(vec![TensorType::new(x.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        // Scatter the cotangent back by padding with zeros.
        let (xd, od) = (ins[0].dims(), outs[0].dims());
        let mut high = vec![];
        let mut interior = vec![];
        for d in 0..xd.len() {
            let covered = if od[d] == 0 {
                self.start[d]
            } else {
                self.start[d] + (od[d] - 1) * self.strides[d] + 1
            };
            high.push(xd[d] - covered);
            interior.push(if od[d] == 0 { 0 } else { self.strides[d] - 1 });
        }
        let g = ct0(cts)?;
        Ok(vec![Some(g.pad(
            &g.scalar_like(0.0)?,
            &self.start,
            &high,
            &interior,
        )?)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let attrs = format!(
            "start_indices = {}, limit_indices = {}, strides = {}",
            i64_array(&self.start),
            i64_array(&self.limit),
            i64_array(&self.strides)
        );
        Ok(generic("stablehlo.slice", ins, outs, &attrs))
    }
}

impl Tensor {
    /// Static strided slice `[start, limit)` with `strides` per dimension.
    pub fn slice(&self, start: &[i64], limit: &[i64], strides: &[i64]) -> Result<Tensor> {
        let prim = Slice {
            start: start.to_vec(),
            limit: limit.to_vec(),
            strides: strides.to_vec(),
        };
        self.g.apply1(prim, &[self])
    }

    /// `[start, limit)` along one axis, everything along the others.
    pub fn slice_axis(&self, axis: i64, start: i64, limit: i64) -> Result<Tensor> {
        let dims = self.dims();
        let a = normalize_axis(axis, dims.len(), "slice")?;
        let mut lo = vec![0; dims.len()];
        let mut hi = dims.clone();
        lo[a] = start;
        hi[a] = limit;
        self.slice(&lo, &hi, &vec![1; dims.len()])
    }
}

// ---------------------------------------------------------------- concatenate

#[derive(Debug)]
struct Concatenate(usize);

impl Primitive for Concatenate {
    fn name(&self) -> &'static str {
        "concatenate"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let first = ins[0];
        if self.0 >= first.rank() {
            return op_err(
                "concatenate",
                format!("axis {} out of range for {first}", self.0),
            );
        }
        let mut total = 0;
        for t in ins {
            let same_elsewhere = t.rank() == first.rank()
                && t.dtype == first.dtype
                && (0..t.rank()).all(|d| d == self.0 || t.dims[d] == first.dims[d]);
            if !same_elsewhere {
                return op_err(
                    "concatenate",
                    format!("{t} does not match {first} outside axis {}", self.0),
                );
            }
            total += t.dims[self.0];
        }
        let mut dims = first.dims.clone();
        dims[self.0] = total;
        Ok(vec![TensorType::new(first.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let g = ct0(cts)?;
        let mut offset = 0;
        let mut out = vec![];
        for x in ins {
            let n = x.dims()[self.0];
            out.push(Some(g.slice_axis(self.0 as i64, offset, offset + n)?));
            offset += n;
        }
        Ok(out)
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(
            "stablehlo.concatenate",
            ins,
            outs,
            &format!("dimension = {} : i64", self.0),
        ))
    }
}

/// Joins tensors along `axis` (negative counts from the end).
pub fn concatenate(tensors: &[&Tensor], axis: i64) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return op_err("concatenate", "no operands");
    };
    let a = normalize_axis(axis, first.rank(), "concatenate")?;
    first.g.apply1(Concatenate(a), tensors)
}

// ---------------------------------------------------------------- pad

#[derive(Debug)]
struct Pad {
    low: Vec<i64>,
    high: Vec<i64>,
    interior: Vec<i64>,
}

impl Primitive for Pad {
    fn name(&self) -> &'static str {
        "pad"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (x, v) = (ins[0], ins[1]);
        let r = x.rank();
        if v.rank() != 0 || v.dtype != x.dtype {
            return op_err(
                "pad",
                format!("padding value must be a {} scalar, got {v}", x.dtype),
            );
        }
        if self.low.len() != r || self.high.len() != r || self.interior.len() != r {
            return op_err(
                "pad",
                format!("low/high/interior must have {r} entries for {x}"),
            );
        }
        if self
            .low
            .iter()
            .chain(&self.high)
            .chain(&self.interior)
            .any(|&p| p < 0)
        {
            return op_err("pad", "negative padding is not supported (use slice)");
        }
        let dims: Vec<i64> = (0..r)
            .map(|d| {
                let n = x.dims[d];
                self.low[d] + self.high[d] + n + (n - 1).max(0) * self.interior[d]
            })
            .collect();
        Ok(vec![TensorType::new(x.dtype, &dims)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (xd, g) = (ins[0].dims(), ct0(cts)?);
        let strides: Vec<i64> = self.interior.iter().map(|i| i + 1).collect();
        let limit: Vec<i64> = (0..xd.len())
            .map(|d| {
                if xd[d] == 0 {
                    self.low[d]
                } else {
                    self.low[d] + (xd[d] - 1) * strides[d] + 1
                }
            })
            .collect();
        let dx = g.slice(&self.low, &limit, &strides)?;
        let dv = g.sum_all()?.sub(&dx.sum_all()?)?;
        Ok(vec![Some(dx), Some(dv)])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let attrs = format!(
            "edge_padding_low = {}, edge_padding_high = {}, interior_padding = {}",
            i64_array(&self.low),
            i64_array(&self.high),
            i64_array(&self.interior)
        );
        Ok(generic("stablehlo.pad", ins, outs, &attrs))
    }
}

impl Tensor {
    /// Pads with `value` (a scalar): `low`/`high` at the edges of each
    /// dimension and `interior` between elements.
    pub fn pad(
        &self,
        value: &Tensor,
        low: &[i64],
        high: &[i64],
        interior: &[i64],
    ) -> Result<Tensor> {
        let prim = Pad {
            low: low.to_vec(),
            high: high.to_vec(),
            interior: interior.to_vec(),
        };
        self.g.apply1(prim, &[self, value])
    }
}

// ---------------------------------------------------------------- dynamic_slice

fn check_start_indices(op: &'static str, x: &TensorType, starts: &[&TensorType]) -> Result<()> {
    if starts.len() != x.rank() {
        return op_err(op, format!("{} start indices given for {x}", starts.len()));
    }
    for s in starts {
        if s.rank() != 0 || !s.dtype.is_integer() || s.dtype != starts[0].dtype {
            return op_err(
                op,
                format!("start indices must be integer scalars of one dtype, got {s}"),
            );
        }
    }
    Ok(())
}

/// Slice of static `sizes` at run-time start indices (clamped into range,
/// as StableHLO defines).
#[derive(Debug)]
struct DynamicSlice(Vec<i64>);

impl Primitive for DynamicSlice {
    fn name(&self) -> &'static str {
        "dynamic_slice"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let x = ins[0];
        check_start_indices("dynamic_slice", x, &ins[1..])?;
        if self.0.len() != x.rank() || self.0.iter().zip(&x.dims).any(|(&s, &d)| s < 0 || s > d) {
            return op_err(
                "dynamic_slice",
                format!("sizes {:?} do not fit in {x}", self.0),
            );
        }
        Ok(vec![TensorType::new(x.dtype, &self.0)])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let starts: Vec<&Tensor> = ins[1..].iter().collect();
        let dx = ins[0]
            .zeros_like()?
            .dynamic_update_slice(ct0(cts)?, &starts)?;
        let mut out = vec![Some(dx)];
        out.extend(starts.iter().map(|_| None));
        Ok(out)
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(
            "stablehlo.dynamic_slice",
            ins,
            outs,
            &format!("slice_sizes = {}", i64_array(&self.0)),
        ))
    }
}

#[derive(Debug)]
struct DynamicUpdateSlice;

impl Primitive for DynamicUpdateSlice {
    fn name(&self) -> &'static str {
        "dynamic_update_slice"
    }

    fn out_types(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>> {
        let (x, u) = (ins[0], ins[1]);
        check_start_indices("dynamic_update_slice", x, &ins[2..])?;
        if u.dtype != x.dtype
            || u.rank() != x.rank()
            || u.dims.iter().zip(&x.dims).any(|(a, b)| a > b)
        {
            return op_err(
                "dynamic_update_slice",
                format!("update {u} does not fit in {x}"),
            );
        }
        Ok(vec![x.clone()])
    }

    fn vjp(
        &self,
        ins: &[Tensor],
        _: &[Tensor],
        cts: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let (u, g) = (&ins[1], ct0(cts)?);
        let starts: Vec<&Tensor> = ins[2..].iter().collect();
        let dx = g.dynamic_update_slice(&u.zeros_like()?, &starts)?;
        let du = g.dynamic_slice(&starts, &u.dims())?;
        let mut out = vec![Some(dx), Some(du)];
        out.extend(starts.iter().map(|_| None));
        Ok(out)
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic("stablehlo.dynamic_update_slice", ins, outs, ""))
    }
}

impl Tensor {
    /// A `sizes`-shaped window starting at the run-time `starts` (one
    /// integer scalar per dimension; clamped so the window fits).
    pub fn dynamic_slice(&self, starts: &[&Tensor], sizes: &[i64]) -> Result<Tensor> {
        let mut ins = vec![self];
        ins.extend_from_slice(starts);
        self.g.apply1(DynamicSlice(sizes.to_vec()), &ins)
    }

    /// `self` with `update` written at the run-time `starts` (clamped).
    pub fn dynamic_update_slice(&self, update: &Tensor, starts: &[&Tensor]) -> Result<Tensor> {
        let mut ins = vec![self, update];
        ins.extend_from_slice(starts);
        self.g.apply1(DynamicUpdateSlice, &ins)
    }
}
