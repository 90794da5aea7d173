//! Reading a Hugging Face checkpoint directory: `config.json` mapped onto
//! a [`ModelConfig`] (`model_type` `llama` and `qwen3_moe`), and the
//! tensors of `model.safetensors` or of the shards a
//! `model.safetensors.index.json` lists, read one at a time.
//!
//! Only the safetensors headers are parsed up front; a tensor's bytes are
//! read (not mapped) when asked for and converted to f32, so reading a
//! checkpoint tensor by tensor holds one tensor at a time however large
//! the files are (a mapped file's touched pages would count in the
//! process's resident memory until the kernel dropped them).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::model::{FfnKind, ModelConfig};

/// The element types a HF checkpoint may store weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    F16,
    BF16,
}

impl HfDtype {
    fn parse(s: &str) -> Option<HfDtype> {
        Some(match s {
            "F32" => HfDtype::F32,
            "F16" => HfDtype::F16,
            "BF16" => HfDtype::BF16,
            _ => return None,
        })
    }

    fn size(self) -> u64 {
        match self {
            HfDtype::F32 => 4,
            HfDtype::F16 | HfDtype::BF16 => 2,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug)]
pub struct HfTensor {
    pub file: PathBuf,
    pub dtype: HfDtype,
    pub shape: Vec<i64>,
    /// Byte range in the file (absolute).
    start: u64,
    len: u64,
}

/// A HF checkpoint directory, its headers read.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: Value,
    pub tensors: BTreeMap<String, HfTensor>,
}

impl HfCheckpoint {
    /// Reads `dir/config.json` and the headers of its safetensors files
    /// (`model.safetensors`, or the shards of `model.safetensors.index.json`).
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let config_path = dir.join("config.json");
        let config: Value = serde_json::from_slice(
            &std::fs::read(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v: Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .map(|f| f.as_str().map(|f| dir.join(f)))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    anyhow!(
                        "{}: a `weight_map` value is not a file name",
                        index.display()
                    )
                })?;
            files.sort();
            files.dedup();
            files
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                bail!(
                    "{}: neither model.safetensors nor model.safetensors.index.json",
                    dir.display()
                );
            }
            vec![single]
        };
        let mut tensors = BTreeMap::new();
        for file in files {
            for (name, t) in read_header(&file)? {
                if let Some(other) = tensors.insert(name.clone(), t) {
                    bail!(
                        "`{name}` is in both {} and {}",
                        other.file.display(),
                        file.display()
                    );
                }
            }
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            config,
            tensors,
        })
    }

    /// The tensor `name`, refused by name when it is absent or its shape
    /// is not `shape` (what the config implies).
    pub fn tensor(&self, name: &str, shape: &[i64]) -> Result<&HfTensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "{}: no tensor `{name}`, which the config's model needs",
                self.dir.display()
            )
        })?;
        if t.shape != shape {
            bail!(
                "`{name}` in {}: shape {:?}, the config implies {shape:?}",
                t.file.display(),
                t.shape
            );
        }
        Ok(t)
    }

    /// The tensor `name`, checked as [`tensor`](Self::tensor) does, as f32
    /// (row-major).
    pub fn read_f32(&self, name: &str, shape: &[i64]) -> Result<Vec<f32>> {
        let t = self.tensor(name, shape)?;
        let mut f = File::open(&t.file).with_context(|| format!("opening {}", t.file.display()))?;
        f.seek(SeekFrom::Start(t.start))?;
        // Converted in 4 MiB pieces: memory holds the f32 result, not
        // also the file's bytes.
        let mut out = Vec::with_capacity((t.len / t.dtype.size()) as usize);
        let mut chunk = vec![0u8; 1 << 22];
        let mut left = t.len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            f.read_exact(&mut chunk[..n])
                .with_context(|| format!("reading `{name}` from {}", t.file.display()))?;
            append_f32(t.dtype, &chunk[..n], &mut out);
            left -= n;
        }
        Ok(out)
    }
}

/// Appends `bytes` (whole elements of `dtype`, little-endian) as f32.
fn append_f32(dtype: HfDtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        HfDtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        HfDtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        HfDtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
}

/// A safetensors file's header: 8 bytes of little-endian length, then that
/// many bytes of JSON `{name: {dtype, shape, data_offsets}}` (offsets from
/// the end of the header).
fn read_header(path: &Path) -> Result<Vec<(String, HfTensor)>> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: too short for a safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > file_len {
        bail!(
            "{}: header length {n} does not fit the {file_len}-byte file (not a safetensors file?)",
            path.display()
        );
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text)?;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&text)
        .with_context(|| format!("{}: the header is not a JSON object", path.display()))?;
    let base = 8 + n;
    let mut out = vec![];
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let what = |m: &str| anyhow!("{}: tensor `{name}`: {m}", path.display());
        let dtype_name = v["dtype"].as_str().ok_or_else(|| what("no dtype"))?;
        let dtype = HfDtype::parse(dtype_name).ok_or_else(|| {
            what(&format!(
                "dtype {dtype_name}; expected F32, F16 or BF16 (a quantised checkpoint cannot be imported)"
            ))
        })?;
        let shape: Vec<i64> = v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_i64()).collect())
            .ok_or_else(|| what("no shape"))?;
        let offsets: Vec<u64> = v["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| what("no valid data_offsets"))?;
        let elements: u64 = shape.iter().map(|&d| d.max(0) as u64).product();
        let len = offsets[1] - offsets[0];
        if len != elements * dtype.size() || base + offsets[1] > file_len {
            return Err(what(&format!(
                "data_offsets {offsets:?} do not hold {elements} {dtype_name} values within the file"
            )));
        }
        out.push((
            name,
            HfTensor {
                file: path.to_path_buf(),
                dtype,
                shape,
                start: base + offsets[0],
                len,
            },
        ));
    }
    Ok(out)
}

/// Our model for a HF `config.json` of `model_type` `llama` or
/// `qwen3_moe`; anything this framework would compute differently is
/// refused, naming the key.
pub fn model_config(config: &Value, path: &Path) -> Result<ModelConfig> {
    let at = path.display();
    let model_type = config["model_type"].as_str().unwrap_or("");
    let ffn = match model_type {
        "llama" => FfnKind::Dense,
        "qwen3_moe" => FfnKind::Moe,
        other => bail!(
            "{at}: model_type {other:?}: import-hf reads \"llama\" and \"qwen3_moe\" checkpoints"
        ),
    };
    let int = |key: &str| -> Result<i64> {
        config[key]
            .as_i64()
            .ok_or_else(|| anyhow!("{at}: `{key}` missing or not an integer"))
    };
    let at_s = at.to_string();
    let int_or = |key, d| optional(config, &at_s, key, d, Value::as_i64, "an integer");
    let float_or = |key, d| optional(config, &at_s, key, d, Value::as_f64, "a number");
    let bool_or = |key, d| optional(config, &at_s, key, d, Value::as_bool, "true or false");
    // What we do not compute: refuse rather than import a different model.
    if let Some(act) = config["hidden_act"].as_str() {
        if act != "silu" {
            bail!("{at}: hidden_act {act:?}; only \"silu\" (SwiGLU) is supported");
        }
    }
    for key in ["attention_bias", "mlp_bias", "use_sliding_window"] {
        if bool_or(key, false)? {
            bail!("{at}: `{key}` = true is not supported");
        }
    }
    // RoPE: plain only. transformers 4 writes `rope_scaling` (null, or an
    // object with `rope_type` / `type`), 5 `rope_parameters.rope_type`.
    let rope = &config["rope_parameters"];
    let rope_type = match &config["rope_scaling"] {
        Value::Null => rope.get("rope_type").cloned(),
        v => Some(
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .cloned()
                .unwrap_or(v.clone()),
        ),
    };
    if let Some(t) = rope_type {
        if t.as_str() != Some("default") {
            bail!("{at}: RoPE scaling {t} is not supported (plain RoPE only)");
        }
    }
    let rope_theta = match rope.get("rope_theta") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| anyhow!("{at}: `rope_parameters.rope_theta` = {v} is not a number"))?,
        None => float_or("rope_theta", 10_000.0)?,
    };
    let hidden = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    let experts = match (&config["num_experts"], &config["num_local_experts"]) {
        (Value::Null, Value::Null) => 0,
        (Value::Null, _) => int("num_local_experts")?,
        _ => int("num_experts")?,
    };
    let moe = ffn == FfnKind::Moe;
    let mlp_only_layers: Vec<i64> = match &config["mlp_only_layers"] {
        Value::Null => vec![],
        v => v
            .as_array()
            .and_then(|a| a.iter().map(|l| l.as_i64()).collect())
            .ok_or_else(|| anyhow!("{at}: `mlp_only_layers` = {v} is not a list of layers"))?,
    };
    let model = ModelConfig {
        ffn,
        vocab_size: int("vocab_size")?,
        hidden_size: hidden,
        num_layers: int("num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: int_or("num_key_value_heads", heads)?,
        intermediate_size: int_or("intermediate_size", 0)?,
        embedding_dim: 0,
        num_experts: if moe { experts } else { 0 },
        experts_per_token: if moe { int("num_experts_per_tok")? } else { 0 },
        expert_intermediate_size: if moe {
            int("moe_intermediate_size")?
        } else {
            0
        },
        aux_loss_coef: if moe {
            float_or("router_aux_loss_coef", 0.001)?
        } else {
            0.0
        },
        moe_block_size: 0,
        rope_theta,
        rms_norm_eps: float_or("rms_norm_eps", 1e-6)?,
        head_dim: int_or("head_dim", 0)?,
        qk_norm: moe,
        // transformers' default for both classes is untied.
        tie_word_embeddings: bool_or("tie_word_embeddings", false)?,
        // Qwen3MoeConfig's default.
        norm_topk_prob: bool_or("norm_topk_prob", false)?,
        decoder_sparse_step: int_or("decoder_sparse_step", 1)?,
        mlp_only_layers: if moe { mlp_only_layers } else { vec![] },
        ..ModelConfig::dense125m()
    };
    model
        .validate()
        .with_context(|| format!("{at}: the model it describes"))?;
    Ok(model)
}

/// `config[key]` as `read` takes it (`what` it expects, for the error), or
/// `default` when the key is absent or null.
fn optional<T>(
    config: &Value,
    at: &str,
    key: &str,
    default: T,
    read: fn(&Value) -> Option<T>,
    what: &str,
) -> Result<T> {
    match &config[key] {
        Value::Null => Ok(default),
        v => read(v).ok_or_else(|| anyhow!("{at}: `{key}` = {v} is not {what}")),
    }
}
