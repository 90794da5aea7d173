//! Compiling a [`Function`] through PJRT and running it with type-checked
//! arguments; [`HostTensor`] for moving values between host and device.

use crate::runtime::{Arg, Buffer, Client, CompileOptions, Device, ElementType, Executable};

use super::dtype::{DType, TensorType};
use super::emit::Function;
use super::error::{usage, Result};

impl DType {
    /// The PJRT element type of this dtype.
    pub fn element_type(self) -> ElementType {
        match self {
            DType::F32 => ElementType::F32,
            DType::BF16 => ElementType::BF16,
            DType::F16 => ElementType::F16,
            DType::F64 => ElementType::F64,
            DType::I32 => ElementType::S32,
            DType::I64 => ElementType::S64,
            DType::U32 => ElementType::U32,
            DType::U16 => ElementType::U16,
            DType::U8 => ElementType::U8,
            DType::Bool => ElementType::Pred,
        }
    }

    pub fn from_element_type(t: ElementType) -> Option<DType> {
        Some(match t {
            ElementType::F32 => DType::F32,
            ElementType::BF16 => DType::BF16,
            ElementType::F16 => DType::F16,
            ElementType::F64 => DType::F64,
            ElementType::S32 => DType::I32,
            ElementType::S64 => DType::I64,
            ElementType::U32 => DType::U32,
            ElementType::U16 => DType::U16,
            ElementType::U8 => DType::U8,
            ElementType::Pred => DType::Bool,
            _ => return None,
        })
    }
}

/// A value on the host: type and little-endian element bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub ty: TensorType,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    /// From f64 values converted to `ty`'s dtype (one value broadcasts).
    pub fn from_f64(values: &[f64], ty: TensorType) -> Result<HostTensor> {
        let n = ty.num_elements() as usize;
        let bytes: Vec<u8> = match values.len() {
            1 => ty.dtype.encode(values[0]).repeat(n),
            len if len == n => values.iter().flat_map(|&v| ty.dtype.encode(v)).collect(),
            len => return usage(format!("HostTensor: {len} values for {ty} ({n} elements)")),
        };
        Ok(HostTensor { ty, bytes })
    }

    pub fn scalar(v: f64, dtype: DType) -> HostTensor {
        HostTensor {
            ty: TensorType::scalar(dtype),
            bytes: dtype.encode(v),
        }
    }

    /// Every element as f64 (exact for all supported dtypes but i64/u64
    /// beyond 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        let size = self.ty.dtype.size_in_bytes();
        self.bytes
            .chunks_exact(size)
            .map(|c| match self.ty.dtype {
                DType::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")),
                DType::BF16 => half::bf16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
                DType::F16 => half::f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
                DType::I32 => i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::I64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                DType::U32 => u32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::U16 => u16::from_le_bytes(c.try_into().expect("2 bytes")) as f64,
                DType::U8 => c[0] as f64,
                DType::Bool => f64::from(c[0] != 0),
            })
            .collect()
    }

    pub fn to_device(&self, client: &Client, device: usize) -> Result<Buffer> {
        let devices = client.devices();
        let Some(dev) = devices.get(device) else {
            return usage(format!(
                "device {device} does not exist (client has {})",
                devices.len()
            ));
        };
        Ok(client.buffer_from_bytes(
            &self.bytes,
            self.ty.dtype.element_type(),
            &self.ty.dims,
            dev,
        )?)
    }

    /// Copies the tensor to `device` (e.g. one of an executable's devices).
    pub fn to(&self, client: &Client, device: &Device) -> Result<Buffer> {
        Ok(client.buffer_from_bytes(
            &self.bytes,
            self.ty.dtype.element_type(),
            &self.ty.dims,
            device,
        )?)
    }

    pub fn from_buffer(buffer: &Buffer) -> Result<HostTensor> {
        let et = buffer.element_type();
        let Some(dtype) = DType::from_element_type(et) else {
            return usage(format!("buffer has unsupported element type {et:?}"));
        };
        Ok(HostTensor {
            ty: TensorType::new(dtype, &buffer.dims()),
            bytes: buffer.to_bytes()?,
        })
    }
}

/// A compiled [`Function`] that checks its arguments against the traced
/// parameter types (each device's block, for an SPMD program) before
/// anything reaches the device.
pub struct Compiled {
    exe: Executable,
    /// Name and per-device type of each parameter.
    params: Vec<(String, TensorType)>,
    outputs: Vec<TensorType>,
    donated: Vec<usize>,
    /// Devices of one execution in the whole job (replicas x partitions).
    num_devices: usize,
}

impl Function {
    /// Emits the module and compiles it for its devices (the client's
    /// first ones).
    pub fn compile(&self, client: &Client) -> Result<Compiled> {
        self.compile_on(client, None)
    }

    /// Compiles with replica (or partition) r on device `assignment[r]`.
    /// In a multi-host job the assignment names every host's devices and
    /// each process executes only its own.
    pub fn compile_on(&self, client: &Client, assignment: Option<&[i64]>) -> Result<Compiled> {
        let num_devices = self.num_devices();
        if let Some(a) = assignment {
            if a.len() != num_devices {
                return usage(format!(
                    "a device assignment of {} devices for a program of {num_devices}",
                    a.len(),
                ));
            }
        }
        let mlir = self.to_mlir()?;
        let options = match &self.partitioning {
            None => CompileOptions {
                num_replicas: self.num_replicas,
                ..Default::default()
            },
            Some(_) => CompileOptions::spmd(num_devices),
        };
        let options = CompileOptions {
            device_assignment: assignment.map(<[i64]>::to_vec),
            ..options
        };
        let exe = client.compile(&mlir, &options)?;
        let params = self
            .param_names()
            .into_iter()
            .zip(self.param_shard_types())
            .collect();
        Ok(Compiled {
            exe,
            params,
            outputs: self.output_shard_types(),
            donated: self.donated_params(),
            num_devices,
        })
    }
}

impl Compiled {
    /// Each device's block of each result.
    pub fn output_types(&self) -> &[TensorType] {
        &self.outputs
    }

    /// Devices of one execution in the whole job.
    pub fn num_devices(&self) -> usize {
        self.num_devices
    }

    /// The devices this process runs the program on, one per argument list
    /// of [`execute`](Self::execute): arguments go to these.
    pub fn devices(&self) -> &[Device] {
        self.exe.devices()
    }

    /// The underlying executable (launch ids, ...).
    pub fn executable(&self) -> &Executable {
        &self.exe
    }

    /// Runs with one argument list per device this process runs (every
    /// device unless the program spans hosts); an SPMD program takes each
    /// device's block of each argument. Donated parameters must be passed
    /// as [`Arg::Donated`]; they are consumed.
    pub fn execute(&self, args: Vec<Vec<Arg<'_>>>) -> Result<Vec<Vec<Buffer>>> {
        let local = self.exe.num_replicas();
        if args.len() != local {
            return usage(format!(
                "{} argument lists for the {local} devices this process runs (of {})",
                args.len(),
                self.num_devices
            ));
        }
        for (r, list) in args.iter().enumerate() {
            if list.len() != self.params.len() {
                return usage(format!(
                    "device {r}: {} arguments for {} parameters",
                    list.len(),
                    self.params.len()
                ));
            }
            for (i, (arg, (name, ty))) in list.iter().zip(&self.params).enumerate() {
                let buf = match arg {
                    Arg::Borrowed(b) => *b,
                    Arg::Donated(b) => b,
                };
                let got = (DType::from_element_type(buf.element_type()), buf.dims());
                if got != (Some(ty.dtype), ty.dims.clone()) {
                    return usage(format!(
                        "device {r}: argument {i} (`{name}`) is {:?}{:?}, expected {ty}",
                        buf.element_type(),
                        buf.dims()
                    ));
                }
                if self.donated.contains(&i) && !matches!(arg, Arg::Donated(_)) {
                    return usage(format!(
                        "argument {i} (`{name}`) is donated: pass it as Arg::Donated"
                    ));
                }
            }
        }
        Ok(self.exe.execute_args(args)?)
    }

    /// Uploads `inputs` to device 0, runs one replica, downloads results.
    pub fn run(&self, client: &Client, inputs: &[HostTensor]) -> Result<Vec<HostTensor>> {
        let mut outs = self.run_replicated(client, &[inputs.to_vec()])?;
        Ok(outs.remove(0))
    }

    /// Replica r gets `inputs[r]` on the executable's device r.
    pub fn run_replicated(
        &self,
        client: &Client,
        inputs: &[Vec<HostTensor>],
    ) -> Result<Vec<Vec<HostTensor>>> {
        let devices = self.exe.devices();
        if inputs.len() != devices.len() {
            return usage(format!(
                "{} input lists for the {} replicas this process runs",
                inputs.len(),
                devices.len()
            ));
        }
        let mut args = Vec::with_capacity(inputs.len());
        for (list, dev) in inputs.iter().zip(devices) {
            let bufs: Vec<Buffer> = list
                .iter()
                .map(|h| h.to(client, dev))
                .collect::<Result<_>>()?;
            args.push(bufs.into_iter().map(Arg::Donated).collect());
        }
        // Borrowed would do for non-donated parameters, but these buffers
        // are ours alone, so letting XLA reuse any of them is free.
        let outs = self.execute(args)?;
        outs.iter()
            .map(|list| list.iter().map(HostTensor::from_buffer).collect())
            .collect()
    }
}
