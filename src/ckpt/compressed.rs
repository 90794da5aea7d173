//! Compressed checkpoints, as `sharedmoe compress` writes them: the same
//! directory as any checkpoint (`config.json`, `model.safetensors`,
//! `state.json` recording the files' digests, written atomically), with
//! each parameter stored as f32, bf16 or NF4. NF4 weights use
//! bitsandbytes' serialized layout under their Hugging Face names
//! (`W`, `W.absmax`, `W.quant_map`, `W.nested_absmax`,
//! `W.nested_quant_map`, `W.quant_state.bitsandbytes__nf4`), and
//! `config.json` carries transformers' `quantization_config`, so the
//! directory is also what transformers loads with bitsandbytes.
//! `config.json` also records how the weights were compressed
//! (`compression`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::integrity::{check_digests, non_finite, non_finite_error, non_finite_le_f32};
use super::{hf_config, install, with_state, TrainingState};
use crate::compress::nf4::Nf4Tensor;
use crate::model::stored::{Storage, StoredTensor};
use crate::model::{ModelConfig, ParamSpec};

/// A compressed checkpoint's parameters (in `param_specs` order) and state.
pub struct Compressed {
    pub params: Vec<(ParamSpec, StoredTensor)>,
    pub state: TrainingState,
    /// `config.json`'s `compression`: how the weights were made.
    pub recipe: serde_json::Value,
}

impl Compressed {
    /// One [`Storage`] per parameter: the programs' input layout.
    pub fn layout(&self) -> Vec<Storage> {
        self.params.iter().map(|(_, t)| t.storage()).collect()
    }

    /// Bytes of the weights on the device (every program input).
    pub fn device_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|(s, t)| t.device_bytes(&s.dims))
            .sum()
    }
}

/// transformers' `quantization_config` for NF4 weights (bitsandbytes),
/// None when no parameter is NF4. `double_quant` as the weights have it.
pub fn quantization_config(params: &[(ParamSpec, StoredTensor)]) -> Option<serde_json::Value> {
    let double_quant = params.iter().find_map(|(_, t)| match t.storage() {
        Storage::Nf4 { double_quant } => Some(double_quant),
        _ => None,
    })?;
    Some(serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
    }))
}

/// Is `dir`'s model.safetensors stored in anything but f32 (read from its
/// header alone)?
pub fn is_compressed(dir: &Path) -> Result<bool> {
    use std::io::Read as _;
    let path = dir.join("model.safetensors");
    let bad = || format!("{}: not a valid safetensors file", path.display());
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // The format: an 8-byte little-endian length, then that much JSON
    // header naming every tensor's dtype.
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(bad)?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        bail!("{}: a header of {len} bytes", bad());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(bad)?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).with_context(bad)?;
    Ok(header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .any(|(_, t)| t["dtype"] != "F32"))
}

/// The safetensors tensors of one stored parameter named `name`.
pub fn serialized(
    name: &str,
    t: &StoredTensor,
    dims: &[i64],
) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    match t {
        StoredTensor::F32(v) => vec![(
            name.to_string(),
            Dtype::F32,
            shape,
            crate::f32_bytes::as_le_bytes(v).to_vec(),
        )],
        StoredTensor::BF16(v) => vec![(
            name.to_string(),
            Dtype::BF16,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )],
        // transformers' bitsandbytes quantizer records the dtype the
        // weights compute in; ours is f32.
        StoredTensor::Nf4(q) => q.to_bnb_tensors(name, "float32"),
    }
}

/// Writes a compressed checkpoint of `model` (trained on `max_positions`
/// tokens) to `dir`, atomically. `state` is the source checkpoint's
/// (step, config); `recipe` goes into config.json as `compression`.
pub fn save(
    dir: &Path,
    model: &ModelConfig,
    max_positions: i64,
    params: &[(ParamSpec, StoredTensor)],
    state: &TrainingState,
    recipe: &serde_json::Value,
) -> Result<()> {
    let mut tensors = vec![];
    for (spec, t) in params {
        if let StoredTensor::F32(v) = t {
            if let Some(nf) = non_finite(v) {
                return Err(non_finite_error(
                    "model.safetensors",
                    &spec.name,
                    v.len(),
                    nf,
                ));
            }
        }
        tensors.extend(serialized(&spec.name, t, &spec.dims));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut config = hf_config(model, max_positions);
    if let Some(q) = quantization_config(params) {
        config["quantization_config"] = q;
        config["torch_dtype"] = "float32".into();
    }
    config["compression"] = recipe.clone();
    let files = vec![
        (
            "config.json".to_string(),
            serde_json::to_string_pretty(&config)?.into_bytes(),
        ),
        (
            "model.safetensors".to_string(),
            safetensors::serialize(views, &Some(meta))?,
        ),
    ];
    install(dir, &with_state(files, state)?)
}

/// Loads the compressed (or plain f32) checkpoint in `dir` of the model
/// `specs` describe, verifying every file against state.json's digests.
pub fn load(dir: &Path, specs: &[ParamSpec]) -> Result<Compressed> {
    // The weights' files only: an optimizer file (a training checkpoint
    // given to eval or generate) is twice the model and not needed.
    let mut files = vec![];
    for name in ["config.json", "model.safetensors", "state.json"] {
        let path = dir.join(name);
        if path.exists() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push((name.to_string(), bytes));
        }
    }
    from_files(dir, &files, specs)
}

/// [`load`] from the directory's files already read (name, bytes); `dir`
/// names them in errors.
pub fn from_files(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    specs: &[ParamSpec],
) -> Result<Compressed> {
    let at = |name: &str| dir.join(name).display().to_string();
    let file = |name: &str| files.iter().find(|(n, _)| n == name).map(|(_, b)| b);
    let state: TrainingState = serde_json::from_slice(
        file("state.json")
            .with_context(|| format!("{}: missing (not a checkpoint)", at("state.json")))?,
    )
    .with_context(|| format!("{}: not a valid state.json", at("state.json")))?;
    let mut digests = state.files.clone();
    digests.remove("optimizer.safetensors"); // weights are all we read
    check_digests(&format!("{}/", dir.display()), &digests, files)?;
    let config: serde_json::Value = match file("config.json") {
        Some(b) => serde_json::from_slice(b)
            .with_context(|| format!("{}: not valid JSON", at("config.json")))?,
        None => serde_json::Value::Null,
    };
    let model_path = at("model.safetensors");
    let bytes = file("model.safetensors").with_context(|| format!("{model_path}: missing"))?;
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{model_path}: not a valid safetensors file"))?;
    let get = |key: &str| {
        st.tensor(key)
            .ok()
            .map(|v| (v.dtype(), v.shape().to_vec(), v.data().to_vec()))
    };
    let params = specs
        .iter()
        .map(|spec| {
            let tensor = read_param(&st, spec, &get)
                .with_context(|| format!("{model_path}: tensor `{}`", spec.name))?;
            Ok((spec.clone(), tensor))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Compressed {
        params,
        state,
        recipe: config.get("compression").cloned().unwrap_or_default(),
    })
}

/// A safetensors tensor by key: (dtype, shape, bytes).
type TensorLookup<'a> = dyn Fn(&str) -> Option<(Dtype, Vec<usize>, Vec<u8>)> + 'a;

/// One parameter as stored: f32 or bf16 under its name with the config's
/// shape, or NF4 in bitsandbytes' layout.
fn read_param(st: &SafeTensors, spec: &ParamSpec, get: &TensorLookup) -> Result<StoredTensor> {
    let view = st
        .tensor(&spec.name)
        .map_err(|_| anyhow::anyhow!("missing"))?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let dense_shape = |what: &str| -> Result<()> {
        if shape != spec.dims {
            bail!(
                "{what} {shape:?}, expected the config's shape {:?}",
                spec.dims
            );
        }
        Ok(())
    };
    Ok(match view.dtype() {
        Dtype::F32 => {
            dense_shape("F32")?;
            if let Some(nf) = non_finite_le_f32(view.data()) {
                return Err(non_finite_error(
                    "model.safetensors",
                    &spec.name,
                    view.data().len() / 4,
                    nf,
                ));
            }
            StoredTensor::F32(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        Dtype::BF16 => {
            dense_shape("BF16")?;
            StoredTensor::BF16(
                view.data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )
        }
        Dtype::U8 => {
            let q = Nf4Tensor::from_bnb_tensors(&spec.name, get)?;
            if q.shape != spec.dims {
                bail!(
                    "NF4 weights of shape {:?} (quant_state), expected the config's shape {:?}",
                    q.shape,
                    spec.dims
                );
            }
            StoredTensor::Nf4(q)
        }
        other => bail!(
            "stored as {other:?}; expected F32, BF16 or NF4 (U8 with a bitsandbytes quant_state)"
        ),
    })
}
