//! The run configuration (`configs/*.toml`): model, recipe, data and run
//! directory, with `--set section.key=value` overrides and validation that
//! names the offending field.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::parquet::BadFilePolicy;
use crate::data::TokenWidth;
use crate::graph::DType;
use crate::model::ModelConfig;
use crate::runtime::Backend;

/// The training recipe (SPEC.md "Training recipe").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seq_len: i64,
    /// Sequences per optimizer step, over all replicas and micro-batches.
    pub global_batch: i64,
    /// Sequences per device per accumulation step.
    pub micro_batch: i64,
    /// Devices of the job, each taking `micro_batch` sequences of every
    /// micro-step: `mesh.data * mesh.fsdp` once the config is loaded. Set
    /// without `mesh.data`, a shorthand for `mesh.data` (what it meant
    /// before the mesh: data-parallel replicas).
    #[serde(default = "one")]
    pub replicas: i64,
    pub steps: i64,
    pub warmup_steps: i64,
    pub lr: f64,
    pub min_lr: f64,
    /// Adam's first-moment decay, in [0, 1).
    #[serde(default = "beta1")]
    pub beta1: f64,
    /// Adam's second-moment decay, in [0, 1).
    #[serde(default = "beta2")]
    pub beta2: f64,
    /// Adam's denominator epsilon, > 0.
    #[serde(default = "adam_eps")]
    pub eps: f64,
    /// Decoupled weight decay (on tensors of rank >= 2), >= 0.
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// Largest global gradient norm: gradients are scaled down to it when
    /// their norm is larger. Must be positive, or 0 to turn clipping off.
    #[serde(default = "one_f")]
    pub grad_clip: f64,
    /// Dtype of matmul operands: `f32`, `bf16`, or `auto` (bf16 on TPU and
    /// GPU, f32 on the CPU). Parameters, optimizer state, norms, softmax
    /// and the loss stay f32 whatever this is.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every N steps (0 = only at the end); >= 0.
    #[serde(default)]
    pub checkpoint_every: i64,
    /// Validation loss every N steps (0 = never); >= 0.
    #[serde(default)]
    pub eval_every: i64,
    /// Validation micro-batches per evaluation; >= 1.
    #[serde(default = "one")]
    pub eval_batches: i64,
    /// A step whose loss, gradient norm or update is not finite never
    /// changes the state (the step program keeps it); then `stop` ends the
    /// run naming the last good checkpoint, `skip` goes on with the next
    /// batch.
    #[serde(default, skip_serializing_if = "NonFinitePolicy::is_default")]
    pub on_nonfinite: NonFinitePolicy,
    /// With `skip`: the run stops once more than this many steps were
    /// skipped.
    #[serde(
        default = "max_nonfinite_steps",
        skip_serializing_if = "is_default_max_nonfinite"
    )]
    pub max_nonfinite_steps: i64,
    /// The parameters this run trains, as globs over tensor names (`*`,
    /// `?`); empty = all. The rest are frozen (`train::trainable`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trainable: Vec<String>,
    /// What the step minimises.
    #[serde(default, skip_serializing_if = "Objective::is_default")]
    pub objective: Objective,
}

/// `train.objective`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Next-token cross-entropy (+ aux_loss_coef * the balance loss).
    #[default]
    Lm,
    /// Experiment 2, stage 1 (pooled MoE): the global router imitates the
    /// original routers (`model::distill`) on the original model's
    /// forward; `ce` is that forward's, `aux` the distillation loss.
    RouterDistill,
}

impl Objective {
    fn is_default(&self) -> bool {
        *self == Objective::default()
    }
}

/// `train.compute_dtype`: the spellings are the serde names, `auto`,
/// `f32` and `bf16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// bf16 on TPU and GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// `train.on_nonfinite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    #[default]
    Stop,
    Skip,
}

impl NonFinitePolicy {
    fn is_default(&self) -> bool {
        *self == NonFinitePolicy::default()
    }
}

fn max_nonfinite_steps() -> i64 {
    10
}
fn is_default_max_nonfinite(v: &i64) -> bool {
    *v == max_nonfinite_steps()
}

fn one() -> i64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn adam_eps() -> f64 {
    1e-8
}
fn weight_decay() -> f64 {
    0.1
}

/// Where the tokens come from: pre-tokenised `.bin` files, or parquet
/// shards tokenised on the fly (exactly one of `train_bin` / `parquet`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Pre-tokenised training tokens (`.bin`, DESIGN.md format).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub train_bin: PathBuf,
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub val_bin: PathBuf,
    /// `u16` (nanoGPT) or `u32`.
    #[serde(default = "token_dtype")]
    pub token_dtype: TokenWidth,
    /// FineWeb-Edu-schema parquet files, directories or globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parquet: Vec<PathBuf>,
    /// tokenizer.json for `parquet` (needs an `<|endoftext|>` token).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub tokenizer: PathBuf,
    /// Share of parquet documents held out for validation (by id hash).
    #[serde(default = "val_fraction")]
    pub val_fraction: f64,
    /// Rows per shuffle window of the parquet stream (1 = packed order).
    #[serde(default = "shuffle_rows")]
    pub shuffle_rows: usize,
    /// `fail` or `skip` unreadable parquet files.
    #[serde(default = "on_bad_file")]
    pub on_bad_file: BadFilePolicy,
    /// Independent streams the parquet training data is read as: stream k
    /// gets every shards-th row group of each epoch's order (from the k-th)
    /// and feeds the contiguous block of train.replicas / shards replicas
    /// from k * replicas / shards, so a data-parallel process opens only
    /// the streams of its replicas.
    /// The batches depend on it (not on how replicas are spread over
    /// processes): a run resumes only with the value it started with.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub shards: i64,
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}
fn token_dtype() -> TokenWidth {
    TokenWidth::U16
}
fn val_fraction() -> f64 {
    0.005
}
fn shuffle_rows() -> usize {
    1024
}
fn on_bad_file() -> BadFilePolicy {
    BadFilePolicy::Fail
}
fn is_one(v: &i64) -> bool {
    *v == 1
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train_bin: PathBuf::new(),
            val_bin: PathBuf::new(),
            token_dtype: token_dtype(),
            parquet: vec![],
            tokenizer: PathBuf::new(),
            val_fraction: val_fraction(),
            shuffle_rows: shuffle_rows(),
            on_bad_file: on_bad_file(),
            shards: 1,
        }
    }
}

impl DataConfig {
    fn validate(&self) -> Result<()> {
        match (is_empty_path(&self.train_bin), self.parquet.is_empty()) {
            (false, false) => {
                bail!("data.train_bin and data.parquet are both set: choose one source")
            }
            (true, false) if is_empty_path(&self.tokenizer) => {
                bail!("data.parquet needs data.tokenizer (a tokenizer.json)")
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            bail!(
                "data.val_fraction = {}: expected a value in [0, 1)",
                self.val_fraction
            );
        }
        if self.shards < 1 {
            bail!("data.shards = {}: must be at least 1", self.shards);
        }
        Ok(())
    }
}

/// Where and on what the run happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory: metrics.jsonl and checkpoints/ go here.
    #[serde(default)]
    pub dir: PathBuf,
    /// `cpu`, `cuda` (or `gpu`) or `tpu`.
    #[serde(default = "backend")]
    pub backend: Backend,
}

fn backend() -> Backend {
    Backend::Cpu
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            dir: PathBuf::new(),
            backend: backend(),
        }
    }
}

/// The job's devices as a mesh with named axes, as MaxText's and
/// Levanter's: the batch is split over data x fsdp; under fsdp every
/// parameter and both Adam moments are split too (`train::sharding` says
/// along which dimension), and XLA gathers them where they are used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Devices that hold the same shard of the state and different
    /// sequences. Unset: `train.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<i64>,
    /// Devices over which the state is split.
    #[serde(default = "one")]
    pub fsdp: i64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            data: None,
            fsdp: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub mesh: MeshConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub run: RunConfig,
}

impl Config {
    /// Reads a TOML file, applies `overrides` (`section.key=value`, the
    /// value in TOML syntax or a bare string), and validates. A
    /// `model.preset` key starts the model from a named preset.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        Config::parse(&text, overrides).with_context(|| path.display().to_string())
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut doc = Config::document(text, overrides)?;
        expand_preset(&mut doc)?;
        let mut cfg: Config = doc
            .try_into()
            .map_err(|e: toml::de::Error| anyhow!(field_first(&e)))?;
        cfg.resolve_mesh()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config's TOML with `overrides` applied, before presets and
    /// validation (for a tool that must read a key before the config is
    /// complete).
    pub fn document(text: &str, overrides: &[String]) -> Result<toml::Value> {
        let mut doc: toml::Value = toml::from_str(text)?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        Ok(doc)
    }

    /// Fills in `mesh.data` (from `train.replicas` when unset) and sets
    /// `train.replicas` to the job's devices, data x fsdp.
    pub fn resolve_mesh(&mut self) -> Result<()> {
        let (t, m) = (&mut self.train, &mut self.mesh);
        if m.fsdp < 1 {
            bail!("mesh.fsdp = {}: must be at least 1", m.fsdp);
        }
        let data = match m.data {
            None => t.replicas,
            Some(d) if d < 1 => bail!("mesh.data = {d}: must be at least 1"),
            // train.replicas is the default, the shorthand for mesh.data,
            // or already data x fsdp (a config written back by to_toml).
            Some(d) if [1, d, d * m.fsdp].contains(&t.replicas) => d,
            // Without fsdp both name the data axis; a config written back
            // by to_toml and then given `--set train.replicas=N` means N.
            Some(_) if m.fsdp == 1 => t.replicas,
            Some(d) => bail!(
                "train.replicas = {} and mesh.data = {d} (mesh.fsdp = {}) disagree: train.replicas \
                 alone is a shorthand for mesh.data; give one of them",
                t.replicas,
                m.fsdp
            ),
        };
        if data < 1 {
            bail!("train.replicas = {data}: must be positive");
        }
        m.data = Some(data);
        t.replicas = data
            .checked_mul(m.fsdp)
            .ok_or_else(|| anyhow!("mesh.data * mesh.fsdp = {data} * {} overflows", m.fsdp))?;
        Ok(())
    }

    /// The mesh's (data, fsdp) sizes.
    pub fn mesh_axes(&self) -> (usize, usize) {
        let fsdp = self.mesh.fsdp.max(1) as usize;
        let data = self
            .mesh
            .data
            .map_or(self.train.replicas as usize / fsdp, |d| d as usize);
        (data, fsdp)
    }

    pub fn compute_dtype(&self) -> DType {
        match (self.train.compute_dtype, self.run.backend) {
            (ComputeDtype::Bf16, _) => DType::BF16,
            (ComputeDtype::Auto, Backend::Cuda | Backend::Tpu) => DType::BF16,
            (ComputeDtype::Auto, Backend::Cpu) | (ComputeDtype::F32, _) => DType::F32,
        }
    }

    /// Accumulation steps per optimizer step.
    pub fn accumulation_steps(&self) -> i64 {
        self.train.global_batch / (self.train.replicas * self.train.micro_batch)
    }

    pub fn validate(&self) -> Result<()> {
        // ModelConfig::validate still says what is wrong as a String.
        self.model.validate()?;
        let t = &self.train;
        for (name, v) in [
            ("seq_len", t.seq_len),
            ("global_batch", t.global_batch),
            ("micro_batch", t.micro_batch),
            ("replicas", t.replicas),
            ("steps", t.steps),
        ] {
            if v <= 0 {
                bail!("train.{name} = {v}: must be positive");
            }
        }
        let m = &self.mesh;
        let devices = m.data.map(|d| d.saturating_mul(m.fsdp));
        if m.fsdp < 1 || devices.is_some_and(|n| n != t.replicas) {
            bail!(
                "mesh.data = {:?} x mesh.fsdp = {} is not train.replicas = {} (Config::resolve_mesh \
                 makes them agree)",
                m.data,
                m.fsdp,
                t.replicas
            );
        }
        let per_step = t.replicas.checked_mul(t.micro_batch).ok_or_else(|| {
            anyhow!(
                "train.replicas * train.micro_batch = {} * {} overflows a 64-bit count",
                t.replicas,
                t.micro_batch
            )
        })?;
        if t.global_batch % per_step != 0 {
            bail!(
                "train.global_batch = {} is not divisible by train.replicas * train.micro_batch = {} * {}",
                t.global_batch, t.replicas, t.micro_batch
            );
        }
        if t.warmup_steps < 0 || t.warmup_steps >= t.steps {
            bail!(
                "train.warmup_steps = {} must be in 0..train.steps ({})",
                t.warmup_steps,
                t.steps
            );
        }
        for (name, v) in [
            ("lr", t.lr),
            ("min_lr", t.min_lr),
            ("beta1", t.beta1),
            ("beta2", t.beta2),
            ("eps", t.eps),
            ("weight_decay", t.weight_decay),
            ("grad_clip", t.grad_clip),
        ] {
            if !v.is_finite() {
                bail!("train.{name} = {v}: must be a finite number");
            }
        }
        if !(t.lr > 0.0 && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            bail!(
                "train.lr = {} and train.min_lr = {}: need 0 <= min_lr <= lr, lr > 0",
                t.lr,
                t.min_lr
            );
        }
        super::trainable::trainable_indices(&crate::model::param_specs(&self.model), &t.trainable)?;
        if t.objective == Objective::RouterDistill
            && self.model.ffn != crate::model::FfnKind::PooledMoe
        {
            bail!(
                "train.objective = \"router_distill\" distils a pooled MoE's global router \
                 (model.ffn = \"pooled_moe\", from `checkpoint convert-pool`); this model is {:?}",
                self.model.ffn
            );
        }
        if t.max_nonfinite_steps < 0 {
            bail!(
                "train.max_nonfinite_steps = {}: must be >= 0",
                t.max_nonfinite_steps
            );
        }
        for (name, v) in [("beta1", t.beta1), ("beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("train.{name} = {v}: expected a value in [0, 1) (an Adam moment decay)");
            }
        }
        if t.eps <= 0.0 {
            bail!(
                "train.eps = {}: must be positive (Adam divides by sqrt(v) + eps)",
                t.eps
            );
        }
        if t.weight_decay < 0.0 {
            bail!("train.weight_decay = {}: must be >= 0", t.weight_decay);
        }
        if t.grad_clip < 0.0 {
            bail!(
                "train.grad_clip = {}: must be positive (the largest global gradient norm), \
                 or 0 to turn clipping off",
                t.grad_clip
            );
        }
        for (name, v, what) in [
            (
                "checkpoint_every",
                t.checkpoint_every,
                "0 = only at the end",
            ),
            ("eval_every", t.eval_every, "0 = never"),
        ] {
            if v < 0 {
                bail!("train.{name} = {v}: must be >= 0 ({what})");
            }
        }
        if t.eval_batches < 1 {
            bail!(
                "train.eval_batches = {}: must be at least 1",
                t.eval_batches
            );
        }
        self.data.validate()?;
        if t.replicas % self.data.shards != 0 {
            bail!(
                "data.shards = {} does not divide train.replicas = {}: each data shard feeds a whole block of replicas",
                self.data.shards, t.replicas
            );
        }
        Ok(())
    }

    /// The config as TOML (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }
}

/// A deserialisation error's text with the field it is about first, as in
/// the validation messages: toml names the field on a last line ("unknown
/// variant `rocm`, expected one of `cpu`, `cuda`, `gpu`, `tpu`\nin
/// `run.backend`"), which this makes "run.backend: unknown variant ...".
fn field_first(e: &toml::de::Error) -> String {
    let text = e.to_string();
    let text = text.trim();
    match text.rsplit_once("\nin `") {
        Some((message, field)) if field.ends_with('`') && !field.contains('\n') => {
            format!("{}: {message}", field.trim_end_matches('`'))
        }
        _ => text.to_string(),
    }
}

/// `a.b.c=value`: sets doc[a][b][c], creating tables as needed.
fn apply_override(doc: &mut toml::Value, o: &str) -> Result<()> {
    let Some((path, raw)) = o.split_once('=') else {
        bail!("--set {o:?}: expected section.key=value");
    };
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let keys: Vec<&str> = path.trim().split('.').collect();
    let mut cur = doc;
    for k in &keys[..keys.len() - 1] {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {path}: `{k}` is not a table"))?;
        cur = table
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = cur
        .as_table_mut()
        .ok_or_else(|| anyhow!("--set {path}: parent is not a table"))?;
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// Replaces `model.preset = "name"` by the preset's fields, keeping any
/// field the file sets explicitly.
fn expand_preset(doc: &mut toml::Value) -> Result<()> {
    let Some(model) = doc.get_mut("model").and_then(|m| m.as_table_mut()) else {
        return Ok(());
    };
    let Some(preset) = model.remove("preset") else {
        return Ok(());
    };
    let name = preset
        .as_str()
        .ok_or_else(|| anyhow!("model.preset must be a string"))?;
    let base = ModelConfig::preset(name).ok_or_else(|| {
        anyhow!(
            "model.preset = {name:?}: unknown ({})",
            crate::model::config::PRESET_NAMES.join(", ")
        )
    })?;
    let toml::Value::Table(mut merged) = toml::Value::try_from(&base)? else {
        unreachable!("a struct serialises to a table")
    };
    for (k, v) in model.iter() {
        merged.insert(k.clone(), v.clone());
    }
    *model = merged;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
preset = "tiny-sharedmoe"
[train]
seq_len = 16
global_batch = 8
micro_batch = 2
steps = 10
warmup_steps = 2
lr = 1e-3
min_lr = 1e-4
"#;

    #[test]
    fn presets_overrides_and_defaults() {
        let c = Config::parse(
            BASE,
            &["model.hidden_size=32".into(), "train.replicas=2".into()],
        )
        .unwrap();
        assert_eq!(c.model.hidden_size, 32);
        assert_eq!(c.model.num_experts, 4);
        assert_eq!((c.train.replicas, c.accumulation_steps()), (2, 2));
        assert_eq!(c.train.beta2, 0.95);
        let round = Config::parse(&c.to_toml(), &[]).unwrap();
        assert_eq!(round, c);
    }

    /// The error text of parsing BASE with `sets`.
    fn refused(sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::parse(BASE, &sets).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse(&format!("{BASE}\nbogus = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = refused(&["model.num_heads=3"]);
        assert!(e.contains("model.num_heads = 3 does not divide"), "{e}");
        let e = refused(&["model.num_kv_heads=3"]);
        assert!(e.contains("model.num_kv_heads = 3"), "{e}");
        let e = refused(&["train.micro_batch=3"]);
        assert!(e.contains("train.global_batch = 8 is not divisible"), "{e}");
        let e = refused(&["model.nonsense=3"]);
        assert!(e.contains("nonsense"), "{e}");
        let e = refused(&["data.shards=0"]);
        assert!(e.contains("data.shards = 0"), "{e}");
        let e = refused(&["train.replicas=2", "data.shards=4"]);
        assert!(
            e.contains("data.shards = 4 does not divide train.replicas = 2"),
            "{e}"
        );
        let e = refused(&["train.steps=\"ten\""]);
        assert!(e.starts_with("train.steps: invalid type"), "{e}");
    }

    #[test]
    fn compute_dtype_follows_the_backend_when_auto() {
        let dtype = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Config::parse(BASE, &sets).unwrap().compute_dtype()
        };
        assert_eq!(dtype(&[]), DType::F32);
        assert_eq!(dtype(&["run.backend=tpu"]), DType::BF16);
        assert_eq!(dtype(&["run.backend=cuda"]), DType::BF16);
        assert_eq!(dtype(&["run.backend=gpu"]), DType::BF16);
        assert_eq!(
            dtype(&["run.backend=cuda", "train.compute_dtype=f32"]),
            DType::F32
        );
        assert_eq!(dtype(&["train.compute_dtype=bf16"]), DType::BF16);
    }

    /// The named choices take the spellings the strings took, in the file
    /// and in `--set` (bare or quoted), and are written back as before.
    #[test]
    fn named_choices_keep_their_spellings() {
        let text = format!(
            "{BASE}compute_dtype = \"bf16\"\n[data]\ntoken_dtype = \"u32\"\n\
             on_bad_file = \"skip\"\n[run]\nbackend = \"gpu\"\n"
        );
        let c = Config::parse(&text, &[]).unwrap();
        assert_eq!(c.train.compute_dtype, ComputeDtype::Bf16);
        assert_eq!(c.data.token_dtype, TokenWidth::U32);
        assert_eq!(c.data.on_bad_file, BadFilePolicy::Skip);
        assert_eq!(c.run.backend, Backend::Cuda);
        let toml = c.to_toml();
        for line in [
            "compute_dtype = \"bf16\"",
            "token_dtype = \"u32\"",
            "on_bad_file = \"skip\"",
            "backend = \"cuda\"",
        ] {
            assert!(toml.contains(line), "{line} in\n{toml}");
        }
        assert_eq!(Config::parse(&toml, &[]).unwrap(), c);
        let d = Config::parse(BASE, &[]).unwrap();
        let toml = d.to_toml();
        for line in [
            "compute_dtype = \"auto\"",
            "token_dtype = \"u16\"",
            "on_bad_file = \"fail\"",
            "backend = \"cpu\"",
        ] {
            assert!(toml.contains(line), "{line} in\n{toml}");
        }
        let sets = [
            "train.compute_dtype=f32",
            "data.token_dtype=\"u32\"",
            "data.on_bad_file=skip",
            "run.backend=tpu",
        ];
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let c = Config::parse(BASE, &sets).unwrap();
        assert_eq!(
            (
                c.train.compute_dtype,
                c.data.token_dtype,
                c.data.on_bad_file,
                c.run.backend
            ),
            (
                ComputeDtype::F32,
                TokenWidth::U32,
                BadFilePolicy::Skip,
                Backend::Tpu
            )
        );
    }

    #[test]
    fn a_bad_choice_names_the_field_the_value_and_the_choices() {
        for (set, field, value, choices) in [
            (
                "run.backend=rocm",
                "run.backend",
                "rocm",
                "`cpu`, `cuda`, `gpu`, `tpu`",
            ),
            (
                "run.backend=CPU",
                "run.backend",
                "CPU",
                "`cpu`, `cuda`, `gpu`, `tpu`",
            ),
            (
                "train.compute_dtype=f16",
                "train.compute_dtype",
                "f16",
                "`auto`, `f32`, `bf16`",
            ),
            (
                "data.token_dtype=u8",
                "data.token_dtype",
                "u8",
                "`u16` or `u32`",
            ),
            (
                "data.on_bad_file=ignore",
                "data.on_bad_file",
                "ignore",
                "`fail` or `skip`",
            ),
        ] {
            let e = refused(&[set]);
            assert!(
                e.starts_with(&format!("{field}: unknown variant `{value}`"))
                    && e.contains(choices),
                "{set}: {e}"
            );
        }
    }
}
