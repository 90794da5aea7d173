//! Checkpoints: a directory with `config.json` (HF-style keys),
//! `model.safetensors`, `optimizer.safetensors` (`adam_m.` / `adam_v.`
//! prefixes) and `state.json` (step, data cursor, config and its hash).
//!
//! Written atomically: everything goes into a temporary sibling directory,
//! each file is fsynced, the directory is renamed into place and the
//! parent fsynced, so a crash leaves either the old checkpoint or the new
//! one, never a torn one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{FfnKind, ParamSpec};
use crate::train::config::Config;

/// Named f32 tensors in checkpoint order.
pub type Tensors = Vec<(String, Vec<i64>, Vec<f32>)>;

/// `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format: u32,
    /// Optimizer steps done; training resumes at this step.
    pub step: i64,
    pub tokens_seen: i64,
    /// The next global-batch index into the token stream (the `.bin`
    /// source's data cursor).
    pub next_batch: i64,
    /// The parquet stream's cursor (parquet sources only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_cursor: Option<crate::data::stream::Cursor>,
    /// sha256 of the tokenizer.json the run reads parquet through: resuming
    /// with another tokenizer would change what the cursor means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    pub seed: u64,
    pub config_toml: String,
    pub config_sha256: String,
}

pub struct Checkpoint {
    pub params: Tensors,
    pub adam_m: Tensors,
    pub adam_v: Tensors,
    pub state: TrainingState,
}

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// HF-style `config.json` (LLaMA keys; the shared-MoE fields alongside).
pub fn hf_config(cfg: &Config) -> serde_json::Value {
    let m = &cfg.model;
    let mut v = serde_json::json!({
        "architectures": [if m.ffn == FfnKind::Dense { "LlamaForCausalLM" } else { "SharedMoeForCausalLM" }],
        "model_type": if m.ffn == FfnKind::Dense { "llama" } else { "sharedmoe" },
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.train.seq_len,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if m.ffn == FfnKind::SharedMoe {
        let o = v.as_object_mut().expect("object");
        o.insert("embedding_dim".into(), m.embedding_dim.into());
        o.insert("num_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.experts_per_token.into());
        o.insert(
            "moe_intermediate_size".into(),
            m.expert_intermediate_size.into(),
        );
        o.insert("router_aux_loss_coef".into(), m.aux_loss_coef.into());
    }
    v
}

fn safetensors_bytes(tensors: &Tensors, prefix: &str) -> Result<Vec<u8>> {
    // (`prefix` is prepended to every name.)
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dims, data)| {
            // SAFETY-free view: f32 slice as little-endian bytes.
            let bytes: &[u8] = bytemuck_f32(data);
            let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
            TensorView::new(Dtype::F32, shape, bytes)
                .map(|v| (format!("{prefix}{name}"), v))
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    Ok(safetensors::serialize(views, &Some(meta))?)
}

/// Both moments in one file, under `adam_m.` / `adam_v.`.
fn optimizer_bytes(ckpt: &Checkpoint) -> Result<Vec<u8>> {
    let prefixed = |t: &Tensors, p: &str| -> Tensors {
        t.iter()
            .map(|(n, d, v)| (format!("{p}{n}"), d.clone(), v.clone()))
            .collect()
    };
    let mut both = prefixed(&ckpt.adam_m, "adam_m.");
    both.extend(prefixed(&ckpt.adam_v, "adam_v."));
    safetensors_bytes(&both, "")
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the
    // target is little-endian (x86_64/aarch64), as safetensors requires.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes `ckpt` to `dir` atomically (replacing an older one there).
pub fn save(dir: &Path, cfg: &Config, ckpt: &Checkpoint) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    write_synced(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&hf_config(cfg))?.as_bytes(),
    )?;
    write_synced(
        &tmp.join("model.safetensors"),
        &safetensors_bytes(&ckpt.params, "")?,
    )?;
    write_synced(&tmp.join("optimizer.safetensors"), &optimizer_bytes(ckpt)?)?;
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&ckpt.state)?.as_bytes(),
    )?;
    sync_dir(&tmp)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(dir, &old)?;
    }
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Reads tensors named `prefix + spec.name` for every spec, refusing a
/// missing tensor or a shape that differs from the config's.
fn read_tensors(path: &Path, specs: &[ParamSpec], prefix: &str) -> Result<Tensors> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut out = vec![];
    for s in specs {
        let name = format!("{prefix}{}", s.name);
        let view = st
            .tensor(&name)
            .map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != s.dims {
            bail!(
                "{}: tensor `{name}` has shape {shape:?} but the config expects {:?}",
                path.display(),
                s.dims
            );
        }
        if view.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor `{name}` is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((s.name.clone(), shape, data));
    }
    Ok(out)
}

/// Loads a checkpoint, checking every tensor against `specs`.
pub fn load(dir: &Path, specs: &[ParamSpec]) -> Result<Checkpoint> {
    let state_path = dir.join("state.json");
    let state: TrainingState = serde_json::from_slice(
        &fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a valid state.json", state_path.display()))?;
    let params = read_tensors(&dir.join("model.safetensors"), specs, "")?;
    let opt = dir.join("optimizer.safetensors");
    let (adam_m, adam_v) = if opt.exists() {
        (
            read_tensors(&opt, specs, "adam_m.")?,
            read_tensors(&opt, specs, "adam_v.")?,
        )
    } else {
        // An init-only checkpoint may omit the optimizer: moments start at 0.
        let zeros: Tensors = params
            .iter()
            .map(|(n, d, v)| (n.clone(), d.clone(), vec![0.0; v.len()]))
            .collect();
        (zeros.clone(), zeros)
    };
    Ok(Checkpoint {
        params,
        adam_m,
        adam_v,
        state,
    })
}

/// `checkpoints/step_00001234` under a run directory.
pub fn step_dir(run_dir: &Path, step: i64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step_{step:08}"))
}

/// The newest complete checkpoint under a run directory, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
                && p.join("state.json").exists()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}
