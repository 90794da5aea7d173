//! Constants of any shape and dtype, and `iota`.

use crate::graph::core::{Graph, Tensor};
use crate::graph::dtype::{DType, TensorType};
use crate::graph::emit::{generic, EmitCx};
use crate::graph::error::{op_err, Result};
use crate::graph::primitive::{Operand, Primitive};

/// A literal: little-endian element bytes of `ty`, or of one element
/// that fills it (a splat is never expanded: `zeros_like` of a
/// [4096, 32000] f32 tensor is 4 bytes here, not 524 MB of host memory).
#[derive(Debug)]
struct Constant {
    ty: TensorType,
    bytes: Vec<u8>,
}

impl Primitive for Constant {
    fn name(&self) -> &'static str {
        "constant"
    }

    fn out_types(&self, _: &[&TensorType]) -> Result<Vec<TensorType>> {
        Ok(vec![self.ty.clone()])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        let attr = format!(
            "value = {} : {}",
            dense_literal(&self.ty, &self.bytes),
            self.ty.mlir()
        );
        Ok(generic("stablehlo.constant", ins, outs, &attr))
    }
}

/// `dense<...>` text for the literal. Floats are written as their bit
/// patterns (`0x3F800000`), which is exact and avoids MLIR's float lexing
/// rules; non-splat literals are a hex string of the raw bytes.
pub(crate) fn dense_literal(ty: &TensorType, bytes: &[u8]) -> String {
    let size = ty.dtype.size_in_bytes();
    let first = &bytes[..size.min(bytes.len())];
    // One element's bytes fill the whole tensor.
    let splat = bytes.len() == size || bytes.chunks(size).all(|c| c == first);
    if !splat && ty.dtype == DType::Bool {
        // i1 has no portable hex form; spell the nested list out.
        let flat: Vec<&str> = bytes
            .iter()
            .map(|&b| if b != 0 { "true" } else { "false" })
            .collect();
        return format!("dense<{}>", nested(&flat, &ty.dims));
    }
    if !splat || bytes.is_empty() {
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        return format!("dense<\"0x{hex}\">");
    }
    let mut le = [0u8; 8];
    le[..size].copy_from_slice(first);
    let bits = u64::from_le_bytes(le);
    let elem = match ty.dtype {
        DType::Bool => (if bits != 0 { "true" } else { "false" }).to_string(),
        d if d.is_float() => format!("0x{:0width$X}", bits, width = size * 2),
        DType::I32 => (bits as u32 as i32).to_string(),
        DType::I64 => (bits as i64).to_string(),
        _ => bits.to_string(),
    };
    format!("dense<{elem}>")
}

/// `[[a, b], [c, d]]` for row-major `flat` with dimensions `dims`.
fn nested(flat: &[&str], dims: &[i64]) -> String {
    match dims.split_first() {
        None => flat.first().copied().unwrap_or("").to_string(),
        Some((&n, rest)) => {
            let chunk = (flat.len() / n.max(1) as usize).max(1);
            let parts: Vec<String> = flat
                .chunks(chunk)
                .take(n as usize)
                .map(|c| nested(c, rest))
                .collect();
            format!("[{}]", parts.join(", "))
        }
    }
}

impl Graph {
    /// A constant of type `ty` from values given as f64 (converted to the
    /// dtype: floats round to nearest, integers truncate, bool is `!= 0`).
    /// `values` holds one value (broadcast) or one per element, row-major.
    pub fn constant(&self, values: &[f64], ty: TensorType) -> Result<Tensor> {
        let n = ty.num_elements();
        if ty.dims.iter().any(|&d| d < 0) {
            return op_err("constant", format!("negative dimension in {ty}"));
        }
        match values.len() {
            // A splat: one element's bytes, filled in by the emitter.
            1 if n > 0 => self.apply1(
                Constant {
                    bytes: ty.dtype.encode(values[0]),
                    ty,
                },
                &[],
            ),
            1 => self.constant_bytes(vec![], ty),
            len if len as i64 == n => self.constant_bytes(
                values.iter().flat_map(|&v| ty.dtype.encode(v)).collect(),
                ty,
            ),
            len => op_err(
                "constant",
                format!("{len} values given for {ty} ({n} elements)"),
            ),
        }
    }

    /// A constant from raw little-endian element bytes.
    pub fn constant_bytes(&self, bytes: Vec<u8>, ty: TensorType) -> Result<Tensor> {
        let expected = ty.num_elements() as usize * ty.dtype.size_in_bytes();
        if bytes.len() != expected {
            return op_err(
                "constant",
                format!("{} bytes given for {ty} ({expected} expected)", bytes.len()),
            );
        }
        self.apply1(Constant { ty, bytes }, &[])
    }

    /// A scalar constant.
    pub fn scalar(&self, v: f64, dtype: DType) -> Result<Tensor> {
        self.constant(&[v], TensorType::scalar(dtype))
    }

    /// A tensor of type `ty` filled with `v`.
    pub fn full(&self, v: f64, ty: TensorType) -> Result<Tensor> {
        self.constant(&[v], ty)
    }

    pub fn zeros(&self, ty: TensorType) -> Result<Tensor> {
        self.full(0.0, ty)
    }

    /// Counting along `dim`: element [i0, .., in] equals i_dim.
    pub fn iota(&self, ty: TensorType, dim: usize) -> Result<Tensor> {
        self.apply1(Iota { ty, dim }, &[])
    }
}

impl Tensor {
    /// Zeros of this tensor's type.
    pub fn zeros_like(&self) -> Result<Tensor> {
        self.g.zeros(self.ty())
    }

    /// A tensor of this tensor's type filled with `v`.
    pub fn full_like(&self, v: f64) -> Result<Tensor> {
        self.g.full(v, self.ty())
    }

    /// A scalar of this tensor's dtype.
    pub fn scalar_like(&self, v: f64) -> Result<Tensor> {
        self.g.scalar(v, self.dtype())
    }
}

#[derive(Debug)]
struct Iota {
    ty: TensorType,
    dim: usize,
}

impl Primitive for Iota {
    fn name(&self) -> &'static str {
        "iota"
    }

    fn out_types(&self, _: &[&TensorType]) -> Result<Vec<TensorType>> {
        if self.dim >= self.ty.rank() {
            return op_err(
                "iota",
                format!("dimension {} out of range for {}", self.dim, self.ty),
            );
        }
        if self.ty.dtype == DType::Bool {
            return op_err("iota", "bool iota is not supported");
        }
        Ok(vec![self.ty.clone()])
    }

    fn vjp(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![])
    }

    fn emit(&self, _: &mut EmitCx, ins: &[Operand], outs: &[Operand]) -> Result<String> {
        Ok(generic(
            "stablehlo.iota",
            ins,
            outs,
            &format!("iota_dimension = {} : i64", self.dim),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let f = TensorType::new(DType::F32, &[2]);
        assert_eq!(
            dense_literal(&f, &DType::F32.encode(1.0).repeat(2)),
            "dense<0x3F800000>"
        );
        let bytes: Vec<u8> = [1.0, 2.0]
            .iter()
            .flat_map(|&v| DType::F32.encode(v))
            .collect();
        assert_eq!(dense_literal(&f, &bytes), "dense<\"0x0000803F00000040\">");
        let i = TensorType::new(DType::I32, &[3]);
        assert_eq!(
            dense_literal(&i, &DType::I32.encode(-7.0).repeat(3)),
            "dense<-7>"
        );
        let b = TensorType::scalar(DType::Bool);
        assert_eq!(dense_literal(&b, &[1]), "dense<true>");
        let b = TensorType::new(DType::Bool, &[2, 2]);
        assert_eq!(
            dense_literal(&b, &[1, 0, 0, 1]),
            "dense<[[true, false], [false, true]]>"
        );
    }

    #[test]
    fn wrong_value_count_is_an_error() {
        let g = Graph::new();
        let err = g
            .constant(&[1.0, 2.0], TensorType::new(DType::F32, &[3]))
            .unwrap_err();
        assert!(
            err.to_string().contains("2 values given for f32[3]"),
            "{err}"
        );
    }
}
