//! NF4 quantisation in bitsandbytes' layout, on the host: 4-bit NormalFloat
//! codes packed two to a byte, one absmax per block of 64 values, the
//! absmaxes optionally double-quantised to 8 bits ("compress_statistics"),
//! and the tensors bitsandbytes serializes for a `Linear4bit` weight.
//!
//! Every float operation transcribes what bitsandbytes 0.50.2 (with torch
//! 2.15) runs on an x86-64 CPU, so that the bytes (packed codes, scales, the quant-state JSON) and
//! the dequantised values are bit-identical to its own (tests/nf4.rs
//! compares them with `tests/python/bnb_nf4.py`). The sources, in
//! `bitsandbytes/` of that release:
//!
//! * 4-bit quantisation, `backends/default/ops.py` (`quantize_4bit`, the
//!   CPU takes the generic kernel): absmax = max |x| per block of 64 over
//!   the row-major flattened tensor; full blocks are scaled by
//!   `x * (1 / max(absmax, 1e-38))` and store the unclamped absmax (0 for
//!   an all-zero block), the last partial block by `x / max(absmax, 1e-38)`
//!   and stores the clamped one (1e-38 when all zero); scaled values are
//!   clamped to [-1, 1] and coded by `torch.bucketize` against the f32
//!   midpoints of the code table: the number of midpoints below the value,
//!   so an exact tie goes to the lower code. An odd count is padded with
//!   0.0 (code 7). The first value of each pair goes in the high nibble;
//!   the packed tensor has shape [ceil(n / 2), 1].
//! * Double quantisation, `functional.py` (`quantize_4bit`): offset =
//!   `absmax.mean()` (torch's CPU cascade sum, then a division by n), and
//!   `absmax - offset` goes through `quantize_blockwise` with blocks of 256
//!   and the signed dynamic map of `create_dynamic_map` (computed by torch's
//!   `linspace`, whose x86-64 build fuses its multiply-add). The CPU kernel
//!   of that step is C++ (`csrc/cpu_ops.cpp`, `quantize_cpu_impl`): it
//!   does not pick the nearest code but maps the scaled value to one of
//!   65536 grid points and reads a precomputed nearest-code table, with
//!   the index computed as `fma((v + 1) * 0.5, 65535, 0.5)` (as the
//!   disassembly of the x86-64 wheel shows); an all-zero block stores
//!   absmax 0 and codes 0.
//! * Dequantisation (`dequantize_4bit`, `dequantize_blockwise` and the
//!   kernels of `backends/cpu/ops.py`): `code[c] * absmax` per value, the
//!   absmaxes of double quantisation first decoded as
//!   `dynamic[code] * nested_absmax + offset` (two roundings).
//! * Serialization, `QuantState.as_dict(packed=True)`: the quant-state JSON
//!   is Python's `json.dumps` of the non-tensor fields, key order and
//!   number formatting included (`float.__repr__` for the offset).
//!
//! Where bitsandbytes itself is not reproducible the choice here is:
//! torch sums more than 32768 absmaxes (2M parameters) on several threads
//! with a thread-dependent rounding, here the one-thread sum; torch's
//! build for CPUs without AVX2 does not fuse `linspace` (42 of the 256
//! dynamic-map entries then differ in the last bit); the aarch64 wheel
//! computes the 8-bit grid index without the fused multiply-add.
//! And bitsandbytes 0.50.2's AVX-512 dequantisation kernel picks each row's
//! scales as if rows started blocks, wrong when the last dimension is a
//! multiple of 16 but not of 64 (e.g. [3, 80]); [`Nf4Tensor::dequantize`]
//! gives what its other kernels give: the scales of the flattened blocks.

use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;

/// Values per absmax block.
pub const BLOCKSIZE: usize = 64;

/// Absmax values per block of the double quantisation.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code values, index 0..15 (`get_4bit_type("nf4")`), sorted.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bnb clamps absmax to this before scaling (`absmax.clamp(min=1e-38)`),
/// so an all-zero block scales to zeros instead of NaN.
const MIN_ABSMAX: f32 = 1e-38;

/// The code of the padding value 0.0 that completes an odd count.
const PAD_CODE: u8 = 7;

/// Suffix of the quant-state JSON tensor.
const QUANT_STATE_KEY: &str = ".quant_state.bitsandbytes__nf4";

/// The signed 8-bit dynamic map of double quantisation.
pub fn dynamic_map() -> [f32; 256] {
    *cached_dynamic_map()
}

fn cached_dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(compute_dynamic_map)
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`:
/// for exponent i in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)`
/// (f32) times 10^(i - 6), with both signs; then 0 and 1, sorted.
fn compute_dynamic_map() -> [f32; 256] {
    // Python's `10 ** (i - 6)` (doubles) as torch multiplies by it: in f32.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let bounds = torch_linspace(0.1, 1.0, (1 << i) + 1);
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0 * scale as f32;
            data.extend([mean, -mean]);
        }
    }
    data.extend([0.0, 1.0]);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("2 * 127 + 2 values")
}

/// torch's CPU `linspace` in f32: the first half counted up from `start`,
/// the rest down from `end`, each value one multiply-add that the x86-64
/// (AVX2 and AVX-512) builds of torch fuse.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// Block scales: plain f32 per block, or double-quantised.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One absmax per block of [`BLOCKSIZE`] values.
    F32(Vec<f32>),
    /// absmax[i] = dynamic_map()[codes[i]] * nested_absmax[i / 256] + offset.
    Double {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    },
}

/// A tensor in NF4: `packed` holds ceil(n / 2) bytes, value 2k in the high
/// nibble of byte k and value 2k + 1 in its low nibble.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<i64>,
    pub packed: Vec<u8>,
    pub scales: Scales,
}

impl Nf4Tensor {
    /// `values` (row-major, `shape`) quantised as bnb's
    /// `quantize_4bit(blocksize=64, quant_type="nf4",
    /// compress_statistics=double_quant)`.
    pub fn quantize(values: &[f32], shape: &[i64], double_quant: bool) -> Nf4Tensor {
        assert_eq!(
            values.len() as i64,
            shape.iter().product::<i64>(),
            "NF4 quantisation of {} values as shape {shape:?}",
            values.len()
        );
        let (packed, absmax) = quantize_4bit(values);
        let scales = if double_quant {
            double_quantize(&absmax)
        } else {
            Scales::F32(absmax)
        };
        Nf4Tensor {
            shape: shape.to_vec(),
            packed,
            scales,
        }
    }

    pub fn num_elements(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    pub fn num_blocks(&self) -> usize {
        self.num_elements().div_ceil(BLOCKSIZE)
    }

    /// The per-block absmax dequantisation multiplies by (for double
    /// quantisation decoded as bnb's `dequantize_blockwise` + offset does).
    pub fn absmax(&self) -> Vec<f32> {
        match &self.scales {
            Scales::F32(absmax) => absmax.clone(),
            Scales::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                let map = cached_dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset)
                    .collect()
            }
        }
    }

    /// The values bnb's `dequantize_4bit` gives, row-major (bnb returns a
    /// vector's as a [1, n] matrix).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax();
        let mut out = vec![0.0; self.num_elements()];
        out.par_chunks_mut(BLOCKSIZE)
            .zip(self.packed.par_chunks(BLOCKSIZE / 2))
            .zip(absmax.par_iter())
            .with_min_len(64)
            .for_each(|((out, bytes), &scale)| {
                for (i, v) in out.iter_mut().enumerate() {
                    *v = NF4_CODE[nibble(bytes, i) as usize] * scale;
                }
            });
        out
    }

    /// Bytes stored on disk or device: the packed codes and the scales
    /// (codes, nested absmaxes and the f32 offset for double quantisation),
    /// not the 16- and 256-entry code tables.
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::F32(absmax) => 4 * absmax.len(),
            Scales::Double {
                codes,
                nested_absmax,
                ..
            } => codes.len() + 4 * nested_absmax.len() + 4,
        };
        self.packed.len() + scales
    }

    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.num_elements() as f64
    }

    /// The tensors bnb serializes for the weight `name` (the packed weight
    /// and `QuantState.as_dict(packed=True)` under `name.`), in its order:
    /// (key, dtype, shape, little-endian bytes). `dtype` is the torch dtype
    /// name of the original weight ("float32", "bfloat16", ...).
    pub fn to_bnb_tensors(
        &self,
        name: &str,
        dtype: &str,
    ) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let key = |suffix: &str| format!("{name}{suffix}");
        let mut out = vec![(
            name.to_string(),
            Dtype::U8,
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        let absmax = match &self.scales {
            Scales::F32(absmax) => (Dtype::F32, f32_bytes(absmax)),
            Scales::Double { codes, .. } => (Dtype::U8, codes.clone()),
        };
        out.push((key(".absmax"), absmax.0, vec![self.num_blocks()], absmax.1));
        out.push((
            key(".quant_map"),
            Dtype::F32,
            vec![16],
            f32_bytes(&NF4_CODE),
        ));
        if let Scales::Double { nested_absmax, .. } = &self.scales {
            out.push((
                key(".nested_absmax"),
                Dtype::F32,
                vec![nested_absmax.len()],
                f32_bytes(nested_absmax),
            ));
            out.push((
                key(".nested_quant_map"),
                Dtype::F32,
                vec![256],
                f32_bytes(cached_dynamic_map()),
            ));
        }
        let json = self.quant_state_json(dtype).into_bytes();
        out.push((key(QUANT_STATE_KEY), Dtype::U8, vec![json.len()], json));
        out
    }

    /// Reads the tensors [`Nf4Tensor::to_bnb_tensors`] writes (and bnb
    /// saves) for the weight `name`; `get` looks a key up.
    pub fn from_bnb_tensors(
        name: &str,
        get: impl Fn(&str) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Result<Nf4Tensor> {
        let lookup = |key: &str, expected: &str| {
            get(key).ok_or_else(|| anyhow!("{key}: missing (expected {expected})"))
        };
        let tensor = |suffix: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let key = format!("{name}{suffix}");
            check_tensor(
                &key,
                lookup(&key, &format!("{dtype:?} {shape:?}"))?,
                dtype,
                shape,
            )
        };
        // The JSON holds the shape every other tensor is checked against.
        let json_key = format!("{name}{QUANT_STATE_KEY}");
        let json = lookup(&json_key, "the quant-state JSON as U8 [length]")?;
        let length = json.1.iter().product();
        let state = QuantStateJson::parse(
            &json_key,
            &check_tensor(&json_key, json, Dtype::U8, &[length])?,
        )?;
        let n = state.shape.iter().product::<i64>() as usize;
        let blocks = n.div_ceil(BLOCKSIZE);

        let packed = tensor("", Dtype::U8, &[n.div_ceil(2), 1])?;
        check_code_table(
            &format!("{name}.quant_map"),
            &tensor(".quant_map", Dtype::F32, &[16])?,
            &NF4_CODE,
        )?;
        let scales = match state.nested_offset {
            None => Scales::F32(f32_values(&tensor(".absmax", Dtype::F32, &[blocks])?)),
            Some(offset) => {
                check_code_table(
                    &format!("{name}.nested_quant_map"),
                    &tensor(".nested_quant_map", Dtype::F32, &[256])?,
                    cached_dynamic_map(),
                )?;
                Scales::Double {
                    codes: tensor(".absmax", Dtype::U8, &[blocks])?,
                    nested_absmax: f32_values(&tensor(
                        ".nested_absmax",
                        Dtype::F32,
                        &[blocks.div_ceil(NESTED_BLOCKSIZE)],
                    )?),
                    offset,
                }
            }
        };
        Ok(Nf4Tensor {
            shape: state.shape,
            packed,
            scales,
        })
    }

    /// Python's `json.dumps` of `QuantState.as_dict(packed=True)`'s
    /// non-tensor fields: bnb's key order, ", " and ": " separators.
    fn quant_state_json(&self, dtype: &str) -> String {
        // Torch dtype names need no escaping; anything else would be a bug
        // of the caller, and bnb could not load it either.
        assert!(
            !dtype.is_empty() && dtype.chars().all(|c| c.is_ascii_alphanumeric()),
            "torch dtype name {dtype:?}"
        );
        let shape: Vec<String> = self.shape.iter().map(i64::to_string).collect();
        let mut json = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {BLOCKSIZE}, \"dtype\": \"{dtype}\", \"shape\": [{}]",
            shape.join(", ")
        );
        if let Scales::Double { offset, .. } = &self.scales {
            json += &format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(f64::from(*offset))
            );
        }
        json + "}"
    }
}

/// The 4-bit code of value `i` of a block whose packed bytes are `bytes`.
fn nibble(bytes: &[u8], i: usize) -> u8 {
    let byte = bytes[i / 2];
    if i % 2 == 0 {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// bnb's `quantize_4bit` NF4 kernel: (packed codes, absmax per block).
fn quantize_4bit(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bounds = nf4_bounds();
    let mut packed = vec![0u8; values.len().div_ceil(2)];
    let mut absmax = vec![0f32; values.len().div_ceil(BLOCKSIZE)];
    values
        .par_chunks(BLOCKSIZE)
        .zip(packed.par_chunks_mut(BLOCKSIZE / 2))
        .zip(absmax.par_iter_mut())
        .with_min_len(64)
        .for_each(|((block, bytes), absmax)| *absmax = quantize_block(block, &bounds, bytes));
    (packed, absmax)
}

/// Codes one block into `bytes` and returns the absmax bnb stores for it.
/// Only the last block can be partial, and only it can hold an odd count.
fn quantize_block(block: &[f32], bounds: &[f32; 15], bytes: &mut [u8]) -> f32 {
    let absmax = torch_absmax(block);
    let clamped = if absmax < MIN_ABSMAX {
        MIN_ABSMAX
    } else {
        absmax
    };
    let full = block.len() == BLOCKSIZE;
    // bnb scales the full blocks (one batched tensor) by the reciprocal and
    // the partial last block (a separate expression) by a division.
    let reciprocal = 1.0 / clamped;
    let code = |x: f32| {
        let scaled = if full { x * reciprocal } else { x / clamped };
        nf4_index(bounds, scaled.clamp(-1.0, 1.0))
    };
    for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
        let low = pair.get(1).map_or(PAD_CODE, |&x| code(x));
        *byte = code(pair[0]) << 4 | low;
    }
    if full {
        absmax
    } else {
        clamped
    }
}

/// `x.abs().max()` as torch computes it: exact, NaN propagates.
fn torch_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0, |m: f32, x| {
        let a = x.abs();
        if a > m || a.is_nan() {
            a
        } else {
            m
        }
    })
}

/// The f32 midpoints between consecutive NF4 codes, `(code[:-1] +
/// code[1:]) / 2` as bnb computes them.
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// `torch.bucketize(x, bounds)` (right=False): the number of bounds below
/// `x`, so a value exactly on a midpoint takes the lower code. Written as
/// torch's binary-search predicate `!(bound >= x)`, which sends NaN to 15.
#[allow(clippy::neg_cmp_op_on_partial_ord)] // the negation is the NaN rule
fn nf4_index(bounds: &[f32; 15], x: f32) -> u8 {
    bounds.iter().filter(|&&b| !(b >= x)).count() as u8
}

/// bnb's double quantisation of the block absmaxes.
fn double_quantize(absmax: &[f32]) -> Scales {
    let offset = torch_mean(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centered);
    Scales::Double {
        codes,
        nested_absmax,
        offset,
    }
}

/// bnb's CPU `quantize_blockwise` (C++ `quantize_cpu_impl`, f32 input)
/// with the dynamic map and blocks of [`NESTED_BLOCKSIZE`]: (codes, absmax
/// per block).
fn quantize_blockwise_8bit(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(NESTED_BLOCKSIZE)];
    for ((block, codes), absmax) in values
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(absmax.iter_mut())
    {
        // std::max(absmax, fabs(v)) from 0, as the C++ loop.
        *absmax = block
            .iter()
            .fold(0.0, |m: f32, v| if m < v.abs() { v.abs() } else { m });
        if *absmax == 0.0 {
            continue; // the kernel leaves codes 0 (the code of -0.99...)
        }
        let reciprocal = 1.0 / *absmax;
        for (code, &v) in codes.iter_mut().zip(block) {
            *code = lut[lut_index(v * reciprocal)];
        }
    }
    (codes, absmax)
}

/// The C++ `norm_to_lut_index`: the clamped value's position on 65536
/// points spread over [-1, 1]. The x86-64 wheel fuses `* 65535 + 0.5`
/// into one FMA; the conversion truncates (the value lies in [0.5,
/// 65535.5]).
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5).mul_add(65535.0, 0.5) as u16 as usize
}

/// The C++ `build_quantize_lut` of the dynamic map: for each of the 65536
/// grid points `-1 + 2i / 65535`, the first code whose upper midpoint
/// `0.5 * (code[j] + code[j + 1])` is not below it.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = cached_dynamic_map();
        let midpoints: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut code = 0;
        (0..1usize << 16)
            .map(|i| {
                let point = -1.0 + (2.0 * i as f32) / 65535.0;
                while code < 255 && midpoints[code] < point {
                    code += 1;
                }
                code as u8
            })
            .collect()
    })
}

/// torch's CPU `x.mean()` of f32: the cascade sum divided by n in f32.
fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

/// Lanes of torch's `Vectorized<float>` in its sum kernel (8 in the AVX2
/// and AVX-512 builds alike: checked against torch on an AVX-512 CPU).
const SUM_LANES: usize = 8;

/// torch's one-thread CPU `sum` of a contiguous f32 vector (`cascade_sum`
/// in aten/src/ATen/native/cpu/SumKernel.cpp): vectors of 8 summed by
/// [`row_sum`], the scalar tail summed first, then the 8 lanes added in
/// order; added to the 0 the output starts as.
fn torch_sum(x: &[f32]) -> f32 {
    let total = if x.len() >= SUM_LANES {
        let vectors = x.len() / SUM_LANES;
        let lanes = row_sum(
            |i| -> [f32; SUM_LANES] { x[i * SUM_LANES..][..SUM_LANES].try_into().unwrap() },
            vectors,
        );
        let tail = x[vectors * SUM_LANES..].iter().fold(0.0, |a, &b| a + b);
        lanes.iter().fold(tail, |a, &b| a + b)
    } else {
        row_sum(|i| x[i], x.len())
    };
    0.0 + total
}

/// An accumulator of torch's cascade sum: one f32 or a vector of lanes.
trait Accumulator: Copy {
    const ZERO: Self;
    fn add(self, other: Self) -> Self;
}

impl Accumulator for f32 {
    const ZERO: f32 = 0.0;
    fn add(self, other: f32) -> f32 {
        self + other
    }
}

impl Accumulator for [f32; SUM_LANES] {
    const ZERO: Self = [0.0; SUM_LANES];
    fn add(self, other: Self) -> Self {
        std::array::from_fn(|k| self[k] + other[k])
    }
}

/// torch's `row_sum`: the `size` items read as rows of 4 summed by
/// [`multi_row_sum`], the leftover items added to the first partial sum,
/// then the 4 partial sums in order.
fn row_sum<A: Accumulator>(load: impl Fn(usize) -> A, size: usize) -> A {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<A, ILP>(|i, k| load(i * ILP + k), rows);
    for i in rows * ILP..size {
        partial[0] = partial[0].add(load(i));
    }
    partial[1..].iter().fold(partial[0], |a, &b| a.add(b))
}

/// torch's `multi_row_sum`: R columns summed at once over `size` rows with
/// 4 levels of accumulators; level 0 takes 2^p rows (p = max(4,
/// ceil(log2 size) / 4)) before carrying upwards, so only partial sums of
/// similar size are added.
fn multi_row_sum<A: Accumulator, const R: usize>(
    load: impl Fn(usize, usize) -> A,
    size: usize,
) -> [A; R] {
    const LEVELS: usize = 4;
    let power = 4.max(ceil_log2(size) / LEVELS);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[A::ZERO; R]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = a.add(load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (high, low) in upper[0].iter_mut().zip(&mut lower[j - 1]) {
                *high = high.add(*low);
                *low = A::ZERO;
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = a.add(load(i, k));
        }
    }
    std::array::from_fn(|k| (1..LEVELS).fold(acc[0][k], |a, j| a.add(acc[j][k])))
}

/// c10's `CeilLog2` (1 for x <= 2).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// Python's `repr` of a float, which `json.dumps` writes: the shortest
/// digits that round-trip, positional for exponents -4..=15 (with ".0"
/// when integral), else `d.ddde+XX` with at least two exponent digits.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "-1.25e-7".
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponent");
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let digits = mantissa.replace('.', "");
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(-point as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{text}")
    } else {
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exponent_sign}{:02}", exponent.abs())
    }
}

/// The fields of the quant-state JSON that [`Nf4Tensor`] keeps, checked.
struct QuantStateJson {
    shape: Vec<i64>,
    /// Present with double quantisation.
    nested_offset: Option<f32>,
}

impl QuantStateJson {
    fn parse(key: &str, bytes: &[u8]) -> Result<QuantStateJson> {
        let json: serde_json::Value =
            serde_json::from_slice(bytes).with_context(|| format!("{key}: not JSON"))?;
        let field = |name: &str| {
            json.get(name)
                .ok_or_else(|| anyhow!("{key}: no \"{name}\" in {json}"))
        };
        let expect = |name: &str, want: serde_json::Value| -> Result<()> {
            let got = field(name)?;
            ensure!(*got == want, "{key}: \"{name}\" is {got}, expected {want}");
            Ok(())
        };
        expect("quant_type", "nf4".into())?;
        expect("blocksize", BLOCKSIZE.into())?;
        let shape = field("shape")?
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_i64().filter(|&d| d >= 0))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                anyhow!(
                    "{key}: \"shape\" is {}, expected a list of sizes",
                    json["shape"]
                )
            })?;
        let nested_offset = match json.get("nested_offset") {
            None => None,
            Some(offset) => {
                expect("nested_blocksize", NESTED_BLOCKSIZE.into())?;
                expect("nested_dtype", "float32".into())?;
                // bnb reads it back as torch.tensor(float(offset)): f32.
                // The text is an f32's repr, so the f32 rounding absorbs
                // any last-bit slip of serde_json's f64 parsing.
                let offset = offset.as_f64().ok_or_else(|| {
                    anyhow!("{key}: \"nested_offset\" is {offset}, expected a number")
                })?;
                Some(offset as f32)
            }
        };
        Ok(QuantStateJson {
            shape,
            nested_offset,
        })
    }
}

/// The bytes of a looked-up tensor if it has `want_dtype` and
/// `want_shape` and as many bytes as they say.
fn check_tensor(
    key: &str,
    (dtype, shape, bytes): (Dtype, Vec<usize>, Vec<u8>),
    want_dtype: Dtype,
    want_shape: &[usize],
) -> Result<Vec<u8>> {
    ensure!(
        dtype == want_dtype && shape == want_shape,
        "{key}: {dtype:?} {shape:?}, expected {want_dtype:?} {want_shape:?}"
    );
    let want_bytes = shape.iter().product::<usize>() * dtype.size();
    ensure!(
        bytes.len() == want_bytes,
        "{key}: {} bytes for {dtype:?} {shape:?}, expected {want_bytes}",
        bytes.len()
    );
    Ok(bytes)
}

/// A stored code table must be ours bit for bit: dequantisation here uses
/// ours, so any other would decode differently from bnb.
fn check_code_table(key: &str, bytes: &[u8], want: &[f32]) -> Result<()> {
    for (i, (got, want)) in f32_values(bytes).iter().zip(want).enumerate() {
        if got.to_bits() != want.to_bits() {
            bail!("{key}[{i}]: {got:e}, expected bitsandbytes' {want:e}");
        }
    }
    Ok(())
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
    }

    #[test]
    fn code_table_is_sorted_with_the_midpoints_between() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
        let bounds = nf4_bounds();
        for (i, b) in bounds.iter().enumerate() {
            assert!(NF4_CODE[i] < *b && *b < NF4_CODE[i + 1]);
        }
    }

    #[test]
    fn ties_take_the_lower_code() {
        let bounds = nf4_bounds();
        for (i, &b) in bounds.iter().enumerate() {
            assert_eq!(nf4_index(&bounds, b), i as u8, "midpoint {i}");
            assert_eq!(
                nf4_index(&bounds, f32::from_bits(b.to_bits() + 1)),
                i as u8 + if b > 0.0 { 1 } else { 0 }
            );
        }
        assert_eq!(nf4_index(&bounds, 0.0), PAD_CODE);
        assert_eq!(nf4_index(&bounds, -0.0), PAD_CODE);
    }

    /// Every code value times any absmax comes back exactly, in the order
    /// given, first value of a pair in the high nibble.
    #[test]
    fn codes_times_absmax_round_trip_exactly() {
        for absmax in [1.0f32, 3.7, 1e-20, 6.5e4] {
            let values: Vec<f32> = (0..BLOCKSIZE)
                .map(|i| NF4_CODE[(i * 7) % 16] * absmax)
                .collect();
            let q = Nf4Tensor::quantize(&values, &[BLOCKSIZE as i64], false);
            assert_eq!(q.dequantize(), values, "absmax {absmax}");
            assert_eq!(q.packed[0], 0x07, "codes 0 and 7 in byte 0");
            assert_eq!(q.packed[1], (14 << 4) | 5);
            assert_eq!(q.scales, Scales::F32(vec![absmax]));
        }
    }

    /// |x - dequantised| <= half the widest code gap times the block's
    /// absmax (plus, when the absmax is double-quantised, its own error).
    #[test]
    fn round_trip_error_is_bounded_by_half_the_largest_gap() {
        let half_gap = NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0;
        let mut values = random(70 * 33, 1);
        for (b, block) in values.chunks_mut(BLOCKSIZE).enumerate() {
            block
                .iter_mut()
                .for_each(|v| *v *= 10f32.powi(b as i32 % 9 - 4));
        }
        for double_quant in [false, true] {
            let q = Nf4Tensor::quantize(&values, &[70, 33], double_quant);
            let decoded_absmax = q.absmax();
            let got = q.dequantize();
            let absmax: Vec<f32> = values.chunks(BLOCKSIZE).map(torch_absmax).collect();
            for (i, (&x, &y)) in values.iter().zip(&got).enumerate() {
                let (exact, decoded) = (absmax[i / BLOCKSIZE], decoded_absmax[i / BLOCKSIZE]);
                let bound = half_gap * exact * (1.0 + 1e-6) + (decoded - exact).abs();
                assert!(
                    (x - y).abs() <= bound,
                    "dq {double_quant} value {i}: {x} -> {y}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn zero_blocks_odd_counts_and_shapes() {
        // A full zero block stores absmax 0, a partial one bnb's clamp.
        let mut values = vec![0.0f32; BLOCKSIZE + 5];
        values[BLOCKSIZE] = -2.0;
        let q = Nf4Tensor::quantize(&values, &[BLOCKSIZE as i64 + 5], false);
        assert_eq!(q.scales, Scales::F32(vec![0.0, 2.0]));
        assert!(q.packed[..BLOCKSIZE / 2].iter().all(|&b| b == 0x77));
        assert_eq!(q.packed.len(), 35);
        assert_eq!(q.packed[32], 0x07, "-1 then 0");
        assert_eq!(q.packed[34], 0x77, "the odd last value padded with code 7");
        assert_eq!(q.dequantize()[BLOCKSIZE], -2.0);

        let q = Nf4Tensor::quantize(&[0.0; 3], &[3], false);
        assert_eq!(q.scales, Scales::F32(vec![MIN_ABSMAX]));
        assert_eq!(q.dequantize(), vec![0.0; 3]);

        let tensors =
            Nf4Tensor::quantize(&random(3 * 70, 2), &[3, 70], true).to_bnb_tensors("w", "float32");
        assert_eq!((tensors[0].1, &tensors[0].2), (Dtype::U8, &vec![105, 1]));
    }

    #[test]
    fn double_quant_size_and_decoding() {
        let n = 4096 * 64;
        let values = random(n, 3);
        let q = Nf4Tensor::quantize(&values, &[4096, 64], true);
        let Scales::Double {
            codes,
            nested_absmax,
            offset,
        } = &q.scales
        else {
            panic!("double quantisation expected")
        };
        assert_eq!((codes.len(), nested_absmax.len()), (4096, 16));
        // 4 + 8/64 + 32/(64 * 256) bits per parameter, plus the offset.
        assert!(
            (q.bits_per_param() - (4.0 + 0.125 + 32.0 / 16384.0 + 32.0 / n as f64)).abs() < 1e-12
        );
        assert_eq!(
            Nf4Tensor::quantize(&values, &[4096, 64], false).bits_per_param(),
            4.5
        );
        let plain = quantize_4bit(&values).1;
        let mean = plain.iter().map(|&a| f64::from(a)).sum::<f64>() / plain.len() as f64;
        assert!((f64::from(*offset) - mean).abs() < 1e-6 * mean);
        for (got, want) in q.absmax().iter().zip(&plain) {
            assert!(
                (got - want).abs() < 0.02 * want,
                "absmax {want} decoded as {got}"
            );
        }
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        // Bit patterns of bnb 0.50.2's create_dynamic_map() (torch 2.15,
        // x86-64): the ends, around 0, and entries the unfused linspace
        // would get wrong.
        let bits = |i: usize| map[i].to_bits();
        for (i, want) in [
            (0, 0xbf7e3333u32),
            (1, 0xbf7a999a),
            (18, 0xbf3d6666),
            (128, 0x3513a3b7),
            (129, 0x365a1a94),
            (200, 0x3e6f3333),
            (236, 0x3f3d6666),
            (254, 0x3f7e3333),
        ] {
            assert_eq!(bits(i), want, "map[{i}] = {:e}", map[i]);
        }
        assert_eq!((map[127], map[255]), (0.0, 1.0));
    }

    #[test]
    fn mean_is_torch_cascade_sum() {
        // Fewer than 8 values: a plain running sum.
        assert_eq!(torch_mean(&[1.0, 2.0, 4.0]), 7.0 / 3.0);
        // Exactly representable sums come out exact in any order.
        let x: Vec<f32> = (0..1000).map(|i| (i % 17) as f32).collect();
        assert_eq!(torch_sum(&x), x.iter().sum::<f32>());
        // Rounding: the cascade sum of many equal values stays close.
        let x = vec![0.1f32; 100_000];
        assert!((f64::from(torch_sum(&x)) - 10_000.0).abs() < 0.01);
    }

    #[test]
    fn floats_formatted_as_python_repr() {
        for (x, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e100, "1.2345e+100"),
            (f64::from(0.854416f32), "0.854416012763977"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn bnb_tensors_round_trip_and_errors_name_the_key() {
        for double_quant in [false, true] {
            let q = Nf4Tensor::quantize(&random(5 * 13, 4), &[5, 13], double_quant);
            let tensors = q.to_bnb_tensors("layer.weight", "bfloat16");
            let get = |key: &str| {
                tensors
                    .iter()
                    .find(|t| t.0 == key)
                    .map(|t| (t.1, t.2.clone(), t.3.clone()))
            };
            assert_eq!(Nf4Tensor::from_bnb_tensors("layer.weight", get).unwrap(), q);
            let json =
                String::from_utf8(get("layer.weight.quant_state.bitsandbytes__nf4").unwrap().2)
                    .unwrap();
            assert!(json.starts_with(
                "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [5, 13]"
            ));

            let missing = Nf4Tensor::from_bnb_tensors("layer.weight", |k| {
                get(k).filter(|_| k != "layer.weight.absmax")
            });
            let err = format!("{:#}", missing.unwrap_err());
            assert!(err.contains("layer.weight.absmax: missing"), "{err}");
            let short = Nf4Tensor::from_bnb_tensors("layer.weight", |k| {
                get(k).map(|(d, s, b)| {
                    if k == "layer.weight" {
                        (d, vec![32], b[..32].to_vec())
                    } else {
                        (d, s, b)
                    }
                })
            });
            let err = format!("{:#}", short.unwrap_err());
            assert!(
                err.contains("layer.weight: U8 [32], expected U8 [33, 1]"),
                "{err}"
            );
        }
    }
}
