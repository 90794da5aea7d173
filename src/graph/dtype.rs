//! Element types of traced tensors and their StableHLO spellings.

use std::fmt;

/// Element type of a traced tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    F64,
    I32,
    I64,
    U32,
    U16,
    /// Packed 4-bit codes and 8-bit scale codes of quantised weights.
    U8,
    Bool,
}

impl DType {
    /// The MLIR element type name (`f32`, `bf16`, `ui32`, `i1`, ...).
    pub fn mlir(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U32 => "ui32",
            DType::U16 => "ui16",
            DType::U8 => "ui8",
            DType::Bool => "i1",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DType::I32 | DType::I64 | DType::U32 | DType::U16 | DType::U8
        )
    }

    pub fn is_signed_integer(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// Bytes per element on the host (bool is one byte, as PJRT's PRED).
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::BF16 | DType::F16 | DType::U16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// Little-endian bytes of `v` converted to this type (floats round to
    /// nearest, integers truncate toward zero, bool is `v != 0`).
    pub fn encode(self, v: f64) -> Vec<u8> {
        match self {
            DType::F32 => (v as f32).to_le_bytes().to_vec(),
            DType::F64 => v.to_le_bytes().to_vec(),
            DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
            DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
            DType::I32 => (v as i32).to_le_bytes().to_vec(),
            DType::I64 => (v as i64).to_le_bytes().to_vec(),
            DType::U32 => (v as u32).to_le_bytes().to_vec(),
            DType::U16 => (v as u16).to_le_bytes().to_vec(),
            DType::U8 => vec![v as u8],
            DType::Bool => vec![u8::from(v != 0.0)],
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::U32 => "u32",
            DType::U16 => "u16",
            DType::U8 => "u8",
            DType::Bool => "bool",
            other => other.mlir(),
        })
    }
}

/// Static type of a traced value: element type and dimensions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<i64>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: &[i64]) -> Self {
        TensorType {
            dtype,
            dims: dims.to_vec(),
        }
    }

    pub fn scalar(dtype: DType) -> Self {
        TensorType {
            dtype,
            dims: vec![],
        }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    pub fn num_elements(&self) -> i64 {
        self.dims.iter().product()
    }

    /// `tensor<4x8xf32>`, `tensor<f32>` for scalars.
    pub fn mlir(&self) -> String {
        let mut s = String::from("tensor<");
        for d in &self.dims {
            s.push_str(&d.to_string());
            s.push('x');
        }
        s.push_str(self.dtype.mlir());
        s.push('>');
        s
    }

    pub fn with_dtype(&self, dtype: DType) -> Self {
        TensorType {
            dtype,
            dims: self.dims.clone(),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlir_spellings() {
        assert_eq!(
            TensorType::new(DType::F32, &[4, 8]).mlir(),
            "tensor<4x8xf32>"
        );
        assert_eq!(TensorType::scalar(DType::Bool).mlir(), "tensor<i1>");
        assert_eq!(TensorType::new(DType::U32, &[3]).mlir(), "tensor<3xui32>");
        assert_eq!(
            TensorType::new(DType::BF16, &[2, 1]).to_string(),
            "bf16[2, 1]"
        );
    }

    #[test]
    fn encode_is_little_endian() {
        assert_eq!(DType::F32.encode(1.0), vec![0, 0, 0x80, 0x3f]);
        assert_eq!(DType::BF16.encode(1.0), vec![0x80, 0x3f]);
        assert_eq!(DType::I32.encode(-1.0), vec![0xff; 4]);
        assert_eq!(DType::Bool.encode(2.0), vec![1]);
    }
}
