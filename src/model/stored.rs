//! Parameters as a compressed checkpoint stores them: f32, bf16, or NF4
//! (bitsandbytes' 4-bit NormalFloat, with plain or double-quantised block
//! scales). The programs take the stored form as their inputs and
//! dequantise inside the program, so the device holds 4-bit weights and
//! the f32 values exist only as the program's temporaries.

use half::bf16;

use crate::compress::nf4::{self, Nf4Tensor, Scales};
use crate::graph::{concatenate, DType, Graph, GraphError, Result, Tensor, TensorType};

use super::params::{param_specs, ParamSpec, Params};
use super::ModelConfig;

/// How one parameter is stored, on disk and on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    BF16,
    /// NF4 codes in blocks of 64 with an f32 scale per block, or with the
    /// scales themselves quantised to 8 bits in blocks of 256
    /// (`double_quant`, QLoRA's double quantisation).
    Nf4 {
        double_quant: bool,
    },
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Storage::F32 => "f32",
            Storage::BF16 => "bf16",
            Storage::Nf4 { double_quant: true } => "nf4 (double-quantised scales)",
            Storage::Nf4 {
                double_quant: false,
            } => "nf4",
        })
    }
}

/// One parameter's stored values.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredTensor {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    Nf4(Nf4Tensor),
}

/// One array a program input receives, borrowed from a [`StoredTensor`].
pub enum HostArray<'a> {
    F32(&'a [f32], Vec<i64>),
    BF16(&'a [bf16], Vec<i64>),
    U8(&'a [u8], Vec<i64>),
}

impl HostArray<'_> {
    pub fn num_bytes(&self) -> usize {
        match self {
            HostArray::F32(v, _) => 4 * v.len(),
            HostArray::BF16(v, _) => 2 * v.len(),
            HostArray::U8(v, _) => v.len(),
        }
    }
}

impl StoredTensor {
    /// `values` of a parameter stored as `storage`.
    pub fn encode(values: &[f32], dims: &[i64], storage: Storage) -> StoredTensor {
        match storage {
            Storage::F32 => StoredTensor::F32(values.to_vec()),
            Storage::BF16 => {
                StoredTensor::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
            Storage::Nf4 { double_quant } => {
                StoredTensor::Nf4(Nf4Tensor::quantize(values, dims, double_quant))
            }
        }
    }

    pub fn storage(&self) -> Storage {
        match self {
            StoredTensor::F32(_) => Storage::F32,
            StoredTensor::BF16(_) => Storage::BF16,
            StoredTensor::Nf4(t) => Storage::Nf4 {
                double_quant: matches!(t.scales, Scales::Double { .. }),
            },
        }
    }

    /// The values the model computes with (what the program's
    /// dequantisation yields).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            StoredTensor::F32(v) => v.clone(),
            StoredTensor::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            StoredTensor::Nf4(t) => t.dequantize(),
        }
    }

    /// The arrays of this parameter's program inputs, in the order
    /// [`declare_stored`] declares them.
    pub fn host_arrays(&self, dims: &[i64]) -> Vec<HostArray<'_>> {
        let len = |n: usize| vec![n as i64];
        match self {
            StoredTensor::F32(v) => vec![HostArray::F32(v, dims.to_vec())],
            StoredTensor::BF16(v) => vec![HostArray::BF16(v, dims.to_vec())],
            StoredTensor::Nf4(t) => {
                let mut arrays = vec![HostArray::U8(&t.packed, len(t.packed.len()))];
                match &t.scales {
                    Scales::F32(absmax) => arrays.push(HostArray::F32(absmax, len(absmax.len()))),
                    Scales::Double {
                        codes,
                        nested_absmax,
                        offset,
                    } => {
                        arrays.push(HostArray::U8(codes, len(codes.len())));
                        arrays.push(HostArray::F32(nested_absmax, len(nested_absmax.len())));
                        arrays.push(HostArray::F32(std::slice::from_ref(offset), vec![]));
                    }
                }
                arrays
            }
        }
    }

    /// Bytes this parameter occupies on the device (its program inputs).
    pub fn device_bytes(&self, dims: &[i64]) -> usize {
        self.host_arrays(dims)
            .iter()
            .map(HostArray::num_bytes)
            .sum()
    }
}

/// Declares `spec`'s program inputs for `storage` and returns the
/// parameter as f32 [spec.dims], dequantised inside the program.
pub fn declare_stored(g: &Graph, spec: &ParamSpec, storage: Storage) -> Result<Tensor> {
    let input = |suffix: &str, ty: TensorType| g.param(&format!("{}{suffix}", spec.name), ty);
    let n = spec.num_elements();
    let blocks = ceil_div(n, nf4::BLOCKSIZE as i64);
    match storage {
        Storage::F32 => input("", TensorType::new(DType::F32, &spec.dims)),
        Storage::BF16 => input("", TensorType::new(DType::BF16, &spec.dims))?.convert(DType::F32),
        Storage::Nf4 { double_quant } => {
            let packed = input("", TensorType::new(DType::U8, &[ceil_div(n, 2)]))?;
            let absmax = if double_quant {
                let nested = ceil_div(blocks, nf4::NESTED_BLOCKSIZE as i64);
                let codes = input(".absmax", TensorType::new(DType::U8, &[blocks]))?;
                let nested_absmax =
                    input(".nested_absmax", TensorType::new(DType::F32, &[nested]))?;
                let offset = input(".nested_offset", TensorType::scalar(DType::F32))?;
                let map = g.constant(
                    &nf4::dynamic_map().map(f64::from),
                    TensorType::new(DType::F32, &[256]),
                )?;
                let scales = scale_blocks(
                    &map.take(&codes.convert(DType::I32)?)?,
                    &nested_absmax,
                    nf4::NESTED_BLOCKSIZE as i64,
                )?;
                scales.add(&offset.broadcast_to(&[blocks])?)?
            } else {
                input(".absmax", TensorType::new(DType::F32, &[blocks]))?
            };
            dequantize_nf4(&packed, &absmax, &spec.dims)
        }
    }
}

/// NF4 weights: `packed` [ceil(n/2)] u8 (the first value of a pair in the
/// high nibble), `absmax` [ceil(n/64)] f32 -> f32 [dims].
fn dequantize_nf4(packed: &Tensor, absmax: &Tensor, dims: &[i64]) -> Result<Tensor> {
    let n: i64 = dims.iter().product();
    let pairs = packed.dim(0)?;
    let bytes = packed.convert(DType::I32)?;
    let sixteen = bytes.full_like(16.0)?;
    let high = bytes.div(&sixteen)?;
    let low = bytes.sub(&high.mul(&sixteen)?)?;
    let column = |t: &Tensor| t.reshape(&[pairs, 1]);
    let codes = concatenate(&[&column(&high)?, &column(&low)?], 1)?
        .reshape(&[2 * pairs])?
        .slice_axis(0, 0, n)?;
    let table = packed.graph().constant(
        &nf4::NF4_CODE.map(f64::from),
        TensorType::new(DType::F32, &[16]),
    )?;
    scale_blocks(&table.take(&codes)?, absmax, nf4::BLOCKSIZE as i64)?.reshape(dims)
}

/// `values` [n] times `scales` [ceil(n / block)]: scale j multiplies
/// values j*block .. (j+1)*block (the last block may be partial).
fn scale_blocks(values: &Tensor, scales: &Tensor, block: i64) -> Result<Tensor> {
    let n = values.dim(0)?;
    let blocks = scales.dim(0)?;
    if blocks != ceil_div(n, block) {
        return Err(GraphError::Usage(format!(
            "{blocks} scales for {n} values in blocks of {block} (expected {})",
            ceil_div(n, block)
        )));
    }
    let zero = values.graph().scalar(0.0, values.dtype())?;
    let padded = values
        .pad(&zero, &[0], &[blocks * block - n], &[0])?
        .reshape(&[blocks, block])?;
    let scales = scales
        .reshape(&[blocks, 1])?
        .broadcast_to(&[blocks, block])?;
    padded
        .mul(&scales)?
        .reshape(&[blocks * block])?
        .slice_axis(0, 0, n)
}

/// The model's parameter tree over program inputs in `layout` (one
/// [`Storage`] per parameter, in `param_specs` order), every leaf f32.
pub fn declare_stored_params(
    g: &Graph,
    cfg: &ModelConfig,
    layout: &[Storage],
) -> Result<Params<Tensor>> {
    let specs = param_specs(cfg);
    if layout.len() != specs.len() {
        return Err(GraphError::Usage(format!(
            "a storage layout of {} tensors for a model of {}",
            layout.len(),
            specs.len()
        )));
    }
    let leaves = specs
        .iter()
        .zip(layout)
        .map(|(s, &storage)| declare_stored(g, s, storage))
        .collect::<Result<Vec<_>>>()?;
    Params::spec(cfg).with_leaves(leaves)
}

/// How many program inputs `layout` declares.
pub fn input_count(layout: &[Storage]) -> usize {
    layout
        .iter()
        .map(|s| match s {
            Storage::F32 | Storage::BF16 => 1,
            Storage::Nf4 {
                double_quant: false,
            } => 2,
            Storage::Nf4 { double_quant: true } => 4,
        })
        .sum()
}

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The next-token loss over stored weights: params (as `layout` says),
/// windows [rows, seq + 1] (i32) -> the mean cross-entropy (f32 scalar).
/// `eval` of a compressed checkpoint.
pub fn loss_program(
    cfg: &ModelConfig,
    layout: &[Storage],
    rows: i64,
    seq: i64,
) -> Result<crate::graph::Function> {
    let g = Graph::new();
    let params = declare_stored_params(&g, cfg, layout)?;
    let windows = g.param("windows", TensorType::new(DType::I32, &[rows, seq + 1]))?;
    let model = super::Transformer::new(cfg, &params, DType::F32)?;
    let loss = model.loss(&windows)?;
    Ok(g.build(&[&loss.ce])?.with_name("stored_loss"))
}
