//! Checkpoints: a directory with `config.json` (HF-style keys),
//! `model.safetensors`, `optimizer.safetensors` (`adam_m.` / `adam_v.`
//! prefixes) and `state.json` (step, data cursor, config and its hash).
//!
//! Written atomically: everything goes into a temporary sibling directory,
//! each file is fsynced, the directory is renamed into place and the
//! parent fsynced, so a crash leaves either the old checkpoint or the new
//! one, never a torn one. `state.json` records the sha256 and size of the
//! other files, and nothing with a non-finite value is ever written or
//! loaded ([`integrity`]). [`rundir`] finds, prunes and protects the
//! checkpoints of a run directory; [`lock`] keeps it to one writer.

pub mod atomic;
pub mod compressed;
pub mod hf;
pub mod hf_import;
pub mod integrity;
pub mod lock;
pub mod pool;
pub mod rundir;
pub mod shards;
pub mod streamed;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Deserializer, Serialize};

use crate::data::stream::Cursor;
use crate::model::{FfnKind, ModelConfig, ParamSpec};
use integrity::{check_digests, non_finite, non_finite_error, non_finite_le_f32, FileDigest};
pub use lock::RunLock;
pub use rundir::{
    abandon_newer, clean_temporaries, latest, list, newest_verified, prune, resume_point, step_dir,
    step_of,
};

/// Named f32 tensors in checkpoint order.
pub type Tensors = Vec<(String, Vec<i64>, Vec<f32>)>;

/// `state.json`'s format: 2 added the file digests.
pub const FORMAT: u32 = 2;

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
    /// The parquet streams' cursors by data shard (parquet sources only).
    /// A state.json from before data shards has one `data_cursor`: it
    /// reads as shard 0's.
    #[serde(
        default,
        alias = "data_cursor",
        deserialize_with = "data_cursors",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub data_cursors: BTreeMap<u32, Cursor>,
    /// `data.shards` of the run: the cursors mean nothing under another.
    #[serde(default = "one_shard")]
    pub data_shards: i64,
    /// sha256 of the tokenizer.json the run reads parquet through: resuming
    /// with another tokenizer would change what the cursor means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_sha256: Option<String>,
    pub seed: u64,
    pub config_toml: String,
    pub config_sha256: String,
    /// Steps whose update was skipped because the loss or a gradient was
    /// not finite (`train.on_nonfinite = "skip"`), over the whole run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nonfinite_steps: i64,
    /// sha256 and size of every other file of the checkpoint, checked on
    /// every load (format 2 on; older checkpoints have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileDigest>,
}

impl TrainingState {
    /// Step 0 of a run recorded as `config_toml` reading `data_shards`
    /// shards from `seed`: nothing trained or read yet (the loop fills in
    /// the data position and tokenizer digest, `to_files` the file
    /// digests).
    pub fn fresh(config_toml: String, data_shards: i64, seed: u64) -> TrainingState {
        TrainingState {
            format: FORMAT,
            step: 0,
            tokens_seen: 0,
            next_batch: 0,
            data_cursors: Default::default(),
            data_shards,
            tokenizer_sha256: None,
            seed,
            config_sha256: sha256_hex(&config_toml),
            config_toml,
            nonfinite_steps: 0,
            files: Default::default(),
        }
    }

    /// Records `config_toml` as the run's config (a checkpoint rewritten
    /// for another model: pruned, or its routing restricted).
    pub fn record_config(&mut self, config_toml: String) {
        self.config_sha256 = sha256_hex(&config_toml);
        self.config_toml = config_toml;
    }

    /// Refuses the tokenizer at `path` (SHA-256 `sha256`) when the run was
    /// trained with another one; a state that recorded none accepts any.
    /// `hint` says what to do instead.
    pub fn check_tokenizer(&self, path: &Path, sha256: &str, hint: &str) -> Result<()> {
        match &self.tokenizer_sha256 {
            Some(was) if was != sha256 => bail!(
                "{}: not the tokenizer this run was trained with (sha256 {sha256}, the \
                 checkpoint's is {was}); {hint}",
                path.display()
            ),
            _ => Ok(()),
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn one_shard() -> i64 {
    1
}

/// `data_cursors` (shard -> cursor), or the single `data_cursor` of older
/// checkpoints (shard 0's).
fn data_cursors<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, Cursor>, D::Error> {
    // Keys as strings: a buffered (untagged) map does not parse them as
    // numbers the way serde_json's own map keys do.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Shards(BTreeMap<String, Cursor>),
        Single(Cursor),
    }
    match Option::<Stored>::deserialize(d)? {
        None => Ok(BTreeMap::new()),
        Some(Stored::Single(c)) => Ok(BTreeMap::from([(0, c)])),
        Some(Stored::Shards(m)) => m
            .into_iter()
            .map(|(k, c)| {
                k.parse::<u32>().map(|k| (k, c)).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "data_cursors: shard {k:?} is not a shard index"
                    ))
                })
            })
            .collect(),
    }
}

/// What a loaded checkpoint is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Continuing the run exactly: the optimizer state must be there.
    Resume,
    /// The weights only (`--init`, `eval`, `generate`, export): a missing
    /// optimizer file means moments of zero.
    Weights,
}

pub struct Checkpoint {
    pub params: Tensors,
    pub adam_m: Tensors,
    pub adam_v: Tensors,
    pub state: TrainingState,
}

pub fn sha256_hex(text: &str) -> String {
    crate::digest::sha256_hex(text.as_bytes())
}

/// HF-style `config.json` of model `m` trained on sequences of
/// `max_positions` tokens (LLaMA keys; the shared-MoE fields alongside).
pub fn hf_config(m: &ModelConfig, max_positions: i64) -> serde_json::Value {
    let (architecture, model_type) = match m.ffn {
        FfnKind::Dense => ("LlamaForCausalLM", "llama"),
        FfnKind::SharedMoe => ("SharedMoeForCausalLM", "sharedmoe"),
        FfnKind::Moe => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        FfnKind::PooledMoe => ("PooledMoeForCausalLM", "sharedmoe_pooled"),
    };
    let mut v = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if m.is_moe() {
        let o = v.as_object_mut().expect("object");
        o.insert("num_experts".into(), m.num_experts.into());
        o.insert("num_experts_per_tok".into(), m.experts_per_token.into());
        o.insert(
            "moe_intermediate_size".into(),
            m.expert_intermediate_size.into(),
        );
        o.insert("router_aux_loss_coef".into(), m.aux_loss_coef.into());
        if m.ffn == FfnKind::SharedMoe {
            o.insert("embedding_dim".into(), m.embedding_dim.into());
        } else {
            o.insert("norm_topk_prob".into(), m.norm_topk_prob.into());
            o.insert("decoder_sparse_step".into(), m.decoder_sparse_step.into());
            o.insert("mlp_only_layers".into(), m.mlp_only_layers.clone().into());
        }
    }
    v
}

fn safetensors_bytes(tensors: &Tensors, prefix: &str) -> Result<Vec<u8>> {
    // (`prefix` is prepended to every name.)
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dims, data)| {
            let bytes = crate::f32_bytes::as_le_bytes(data);
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

/// The files of a checkpoint directory, in the order they are written.
pub const FILE_NAMES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "state.json",
];

/// A checkpoint as its directory's files (name, bytes).
pub type Files = Vec<(String, Vec<u8>)>;

/// The bytes of every file of `ckpt`'s directory, `state.json` (last)
/// recording the others' digests; `config.json` describes `model` trained
/// on `max_positions` tokens. Refuses a state with a non-finite value:
/// such a checkpoint could only resume a diverged run.
pub fn to_files(model: &ModelConfig, max_positions: i64, ckpt: &Checkpoint) -> Result<Files> {
    for (file, tensors) in [
        ("model.safetensors", &ckpt.params),
        ("optimizer.safetensors (adam_m)", &ckpt.adam_m),
        ("optimizer.safetensors (adam_v)", &ckpt.adam_v),
    ] {
        for (name, _, values) in tensors {
            if let Some(nf) = non_finite(values) {
                return Err(non_finite_error(file, name, values.len(), nf).context(
                    "refusing to write a checkpoint of step ".to_string()
                        + &ckpt.state.step.to_string(),
                ));
            }
        }
    }
    let mut files: Files = vec![
        (
            "config.json".into(),
            serde_json::to_string_pretty(&hf_config(model, max_positions))?.into_bytes(),
        ),
        (
            "model.safetensors".into(),
            safetensors_bytes(&ckpt.params, "")?,
        ),
    ];
    // Weights only (an import, a conversion): no optimizer file, which
    // `Purpose::Weights` accepts and a run starts with zero moments.
    if !(ckpt.adam_m.is_empty() && ckpt.adam_v.is_empty()) {
        files.push(("optimizer.safetensors".into(), optimizer_bytes(ckpt)?));
    }
    with_state(files, &ckpt.state)
}

/// `files` and, last, `state.json`: `state` in the current format,
/// recording the sha256 and size of every other file.
pub fn with_state(mut files: Files, state: &TrainingState) -> Result<Files> {
    let mut state = state.clone();
    state.format = FORMAT;
    state.files = files
        .iter()
        .map(|(name, bytes)| (name.clone(), FileDigest::of(bytes)))
        .collect();
    files.push((
        "state.json".into(),
        serde_json::to_string_pretty(&state)?.into_bytes(),
    ));
    Ok(files)
}

/// Writes `ckpt` to `dir` atomically (replacing an older one there); see
/// [`to_files`].
pub fn save(dir: &Path, model: &ModelConfig, max_positions: i64, ckpt: &Checkpoint) -> Result<()> {
    install(dir, &to_files(model, max_positions, ckpt)?)
}

/// Writes a checkpoint directory's files atomically: a temporary sibling,
/// every file and the directory fsynced, renamed into place (an older
/// checkpoint there is replaced), the parent fsynced.
pub fn install(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (name, _) in files {
        if !FILE_NAMES.contains(&name.as_str()) {
            bail!("`{name}` is not a checkpoint file (expected one of {FILE_NAMES:?})");
        }
    }
    atomic::install_dir(dir, files)
}

/// The files of the checkpoint directory `dir`.
pub fn read_files(dir: &Path) -> Result<Files> {
    let mut files = vec![];
    for name in FILE_NAMES {
        let path = dir.join(name);
        if path.exists() {
            files.push((
                name.to_string(),
                fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            ));
        }
    }
    Ok(files)
}

/// The checkpoint's tensors of one file, checked against `specs`: each
/// present under `prefix + name`, F32, the config's shape, every value
/// finite. `file` names the file in errors.
fn check_tensors<'a>(
    file: &str,
    bytes: &'a [u8],
    specs: &[ParamSpec],
    prefix: &str,
) -> Result<Vec<TensorView<'a>>> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{file}: not a valid safetensors file"))?;
    let mut views = Vec::with_capacity(specs.len());
    for s in specs {
        let name = format!("{prefix}{}", s.name);
        let view = st
            .tensor(&name)
            .map_err(|_| anyhow::anyhow!("{file}: tensor `{name}` is missing"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if matches!(view.dtype(), Dtype::U8 | Dtype::BF16) {
            bail!(
                "{file}: tensor `{name}` is {:?}: a compressed checkpoint (`sharedmoe \
                 compress`), which eval, generate, checkpoint inspect and export-hf read; \
                 training and these tools need the f32 checkpoint it was made from",
                view.dtype()
            );
        }
        if shape != s.dims || view.dtype() != Dtype::F32 {
            bail!(
                "{file}: tensor `{name}` is {:?} {shape:?}, expected F32 {:?} (the config's shape)",
                view.dtype(),
                s.dims
            );
        }
        if let Some(nf) = non_finite_le_f32(view.data()) {
            return Err(non_finite_error(file, &name, view.data().len() / 4, nf));
        }
        views.push(view);
    }
    Ok(views)
}

/// The moments of an optimizer file: those of the parameters its run
/// trained (`train.trainable`), in parameter order. Each must name a
/// parameter, with its shape; all-frozen parameters have none.
fn check_moments<'a>(
    file: &str,
    bytes: &'a [u8],
    specs: &[ParamSpec],
    prefix: &str,
) -> Result<Moments<'a>> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{file}: not a valid safetensors file"))?;
    for name in st.names() {
        if let Some(p) = name.strip_prefix(prefix) {
            if !specs.iter().any(|s| s.name == p) {
                bail!("{file}: tensor `{name}` is the moment of no parameter of this model");
            }
        }
    }
    let present: Vec<usize> = (0..specs.len())
        .filter(|&k| st.tensor(&format!("{prefix}{}", specs[k].name)).is_ok())
        .collect();
    let owned: Vec<ParamSpec> = present.iter().map(|&k| specs[k].clone()).collect();
    let views = check_tensors(file, bytes, &owned, prefix)?;
    Ok(present.into_iter().zip(views).collect())
}

fn moment_tensors(specs: &[ParamSpec], moments: &Moments) -> Tensors {
    let views: Vec<TensorView> = moments.iter().map(|(_, v)| v.clone()).collect();
    to_tensors(moments.iter().map(|&(k, _)| &specs[k]), &views)
}

fn to_tensors<'s>(specs: impl Iterator<Item = &'s ParamSpec>, views: &[TensorView]) -> Tensors {
    specs
        .zip(views)
        .map(|(s, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (s.name.clone(), s.dims.clone(), data)
        })
        .collect()
}

/// Loads the checkpoint in `dir` for `purpose`, verifying it (see
/// [`verify_files`]).
pub fn load(dir: &Path, specs: &[ParamSpec], purpose: Purpose) -> Result<Checkpoint> {
    if !dir.join("state.json").exists() {
        bail!("{}: not a checkpoint (no state.json)", dir.display());
    }
    parse(dir, &read_files(dir)?, specs, purpose)
}

/// A checkpoint from its files' bytes (as [`to_files`] makes them),
/// verified (see [`verify_files`]).
pub fn from_files(
    files: &[(String, Vec<u8>)],
    specs: &[ParamSpec],
    purpose: Purpose,
) -> Result<Checkpoint> {
    parse(Path::new(""), files, specs, purpose)
}

/// Checks that `files` hold a sound checkpoint of the model `specs`
/// describe, without converting the tensors (what a receiver checks before
/// writing): state.json parses; every file matches the sha256 and size
/// state.json records; every tensor is there, F32, with the config's shape
/// and finite values; for [`Purpose::Resume`], the optimizer file is
/// there. Returns the state.
pub fn verify_files(
    files: &[(String, Vec<u8>)],
    specs: &[ParamSpec],
    purpose: Purpose,
) -> Result<TrainingState> {
    Ok(verify_in(Path::new(""), files, specs, purpose)?.state)
}

/// Moments in an optimizer file, with their parameters' positions in the
/// specs.
type Moments<'a> = Vec<(usize, TensorView<'a>)>;

/// A checkpoint's files, verified, with views of its tensors.
struct Verified<'a> {
    state: TrainingState,
    params: Vec<TensorView<'a>>,
    /// adam_m and adam_v of the trained parameters, when the optimizer
    /// file is there.
    moments: Option<(Moments<'a>, Moments<'a>)>,
}

/// [`verify_files`], naming the files under `dir` in errors.
fn verify_in<'a>(
    dir: &Path,
    files: &'a [(String, Vec<u8>)],
    specs: &[ParamSpec],
    purpose: Purpose,
) -> Result<Verified<'a>> {
    let at = |name: &str| dir.join(name).display().to_string();
    let file = |name: &str| files.iter().find(|(n, _)| n == name).map(|(_, b)| b);
    let state: TrainingState = serde_json::from_slice(
        file("state.json").with_context(|| format!("{}: missing", at("state.json")))?,
    )
    .with_context(|| format!("{}: not a valid state.json", at("state.json")))?;
    if state.files.is_empty() && state.format >= FORMAT {
        bail!(
            "{}: format {} but no file digests: the file was changed",
            at("state.json"),
            state.format
        );
    }
    let prefix = if dir.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{}/", dir.display())
    };
    // Weights alone may come without their optimizer file (its digest
    // then has nothing to check); continuing a run may not.
    let mut digests = state.files.clone();
    if file("optimizer.safetensors").is_none() {
        if purpose == Purpose::Resume {
            bail!(
                "{}: missing, so this checkpoint holds weights only: it cannot continue a run \
                 exactly (Adam's moments would restart from zero); start a new run from it with \
                 --init, or evaluate it",
                at("optimizer.safetensors")
            );
        }
        digests.remove("optimizer.safetensors");
    }
    check_digests(&prefix, &digests, files)?;
    let model = file("model.safetensors")
        .with_context(|| format!("{}: missing", at("model.safetensors")))?;
    let params = check_tensors(&at("model.safetensors"), model, specs, "")?;
    let moments = match file("optimizer.safetensors") {
        Some(opt) => {
            let opt_at = at("optimizer.safetensors");
            Some((
                check_moments(&opt_at, opt, specs, "adam_m.")?,
                check_moments(&opt_at, opt, specs, "adam_v.")?,
            ))
        }
        None => None,
    };
    Ok(Verified {
        state,
        params,
        moments,
    })
}

/// `dir` only names the files in errors.
fn parse(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    specs: &[ParamSpec],
    purpose: Purpose,
) -> Result<Checkpoint> {
    let v = verify_in(dir, files, specs, purpose)?;
    if v.state.files.is_empty() {
        tracing::warn!(
            "{}: written before checkpoints recorded file digests (format {}): its files cannot be verified",
            dir.display(),
            v.state.format
        );
    }
    let params = to_tensors(specs.iter(), &v.params);
    // Weights only: no moments (a run starts them at zero).
    let (adam_m, adam_v) = match &v.moments {
        Some((m, v)) => (moment_tensors(specs, m), moment_tensors(specs, v)),
        None => (vec![], vec![]),
    };
    Ok(Checkpoint {
        params,
        adam_m,
        adam_v,
        state: v.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURSOR: &str = r#"{"window_start": {"epoch": 1, "group": 2, "doc": 3, "token": 4}, "window": 5, "emitted": 6}"#;

    fn state(extra: &str) -> Result<TrainingState, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"format": 1, "step": 3, "tokens_seen": 96, "next_batch": 3, {extra}
                "seed": 0, "config_toml": "", "config_sha256": ""}}"#
        ))
    }

    #[test]
    fn data_cursors_read_old_and_new_state_json() {
        let c: Cursor = serde_json::from_str(CURSOR).unwrap();
        // Before data shards: one cursor, no data_shards.
        let old = state(&format!(r#""data_cursor": {CURSOR},"#)).unwrap();
        assert_eq!(old.data_cursors, BTreeMap::from([(0, c)]));
        assert_eq!(old.data_shards, 1);
        // A .bin run: neither.
        let bin = state("").unwrap();
        assert!(bin.data_cursors.is_empty());
        let json = serde_json::to_value(&bin).unwrap();
        assert!(json.get("data_cursors").is_none(), "{json}");
        // Several shards round-trip.
        let mut two = old.clone();
        two.data_cursors.insert(1, Cursor::default());
        two.data_shards = 2;
        let text = serde_json::to_string(&two).unwrap();
        assert!(text.contains(r#""data_cursors":{"0":"#), "{text}");
        assert_eq!(serde_json::from_str::<TrainingState>(&text).unwrap(), two);
        let e = state(&format!(r#""data_cursors": {{"x": {CURSOR}}},"#)).unwrap_err();
        assert!(e.to_string().contains("not a shard index"), "{e}");
    }
}
