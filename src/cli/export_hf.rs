//! `sharedmoe checkpoint export-hf DIR OUT`: a dense checkpoint as a
//! Hugging Face `LlamaForCausalLM` directory that
//! `AutoModelForCausalLM.from_pretrained(OUT)` and
//! `AutoTokenizer.from_pretrained(OUT)` load as they are.
//!
//! What OUT holds:
//! - `config.json`: LLaMA keys (`model_type: llama`), tied embeddings, the
//!   run's RoPE theta and RMSNorm eps, `max_position_embeddings` = the
//!   trained sequence length, bos/eos = the tokenizer's `<|endoftext|>`.
//! - `model.safetensors` (metadata `{"format": "pt"}`): our tensor names
//!   already are HF LLaMA's (SPEC.md), so every tensor keeps its name,
//!   shape ([out, in] Linear weights) and f32 values. `lm_head.weight` is
//!   left out, as transformers' own `save_pretrained` does for tied
//!   embeddings: on load `tie_word_embeddings` points it at
//!   `model.embed_tokens.weight`. q/k need no permutation: our RoPE is HF's
//!   rotate-half over the concatenated frequencies [f, f], with heads laid
//!   out contiguously in the projection rows as HF reshapes them.
//! - `generation_config.json`, the run's `tokenizer.json` (byte for byte)
//!   and `tokenizer_config.json` / `special_tokens_map.json` for a
//!   `PreTrainedTokenizerFast` that adds no special tokens, as training did.
//!
//! A shared-MoE checkpoint is refused: no transformers architecture has
//! one MoE block shared by every layer. OUT is written like a checkpoint
//! (temporary sibling, files and directory fsynced, renamed into place).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::json;

use crate::ckpt::{self, TrainingState};
use crate::data::tokenizer::{self, EOT};
use crate::digest::sha256_file;
use crate::model::{param_specs, FfnKind};
use crate::train::Config;

#[derive(clap::Args, Debug)]
pub struct ExportHfArgs {
    /// The dense checkpoint directory (runs/NAME/checkpoints/step_NNNNNNNN).
    pub dir: PathBuf,
    /// The Hugging Face directory to write (an earlier export there is
    /// replaced).
    pub out: PathBuf,
    /// tokenizer.json to ship (default: the run's data.tokenizer, which
    /// must still be the file the run trained with).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Every file an export writes, in the order it writes them.
pub const FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub fn run(a: &ExportHfArgs) -> Result<()> {
    let n = export(&a.dir, &a.out, a.tokenizer.as_deref())?;
    println!(
        "{}: LlamaForCausalLM, {n} tensors, written to {}",
        a.dir.display(),
        a.out.display()
    );
    Ok(())
}

/// The HF name of one of our tensors (ours are HF LLaMA's already).
pub fn hf_name(ours: &str) -> String {
    ours.to_string()
}

/// Writes the HF directory `out` for the dense checkpoint `dir`; returns
/// how many tensors `model.safetensors` holds.
pub fn export(dir: &Path, out: &Path, tokenizer_path: Option<&Path>) -> Result<usize> {
    let (state, cfg) = read_dense_checkpoint(dir)?;
    let (weights, tensors) = hf_weights(dir, &cfg)?;
    let (tokenizer_json, eot) = shipped_tokenizer(dir, &state, &cfg, tokenizer_path)?;
    let [config, generation, tokenizer_config, special] = hf_json_files(&cfg, eot)?;
    let files: Vec<(&str, Vec<u8>)> = vec![
        (FILES[0], config),
        (FILES[1], generation),
        (FILES[2], weights),
        (FILES[3], tokenizer_json),
        (FILES[4], tokenizer_config),
        (FILES[5], special),
    ];
    install(out, &files)?;
    Ok(tensors)
}

/// The checkpoint's state and run config, refused (before anything is
/// read or written) unless LlamaForCausalLM can hold the model: dense, with
/// plain tied embeddings.
fn read_dense_checkpoint(dir: &Path) -> Result<(TrainingState, Config)> {
    let state_path = dir.join("state.json");
    let state: TrainingState = serde_json::from_slice(
        &fs::read(&state_path)
            .with_context(|| format!("{}: not a checkpoint (no state.json)", dir.display()))?,
    )
    .with_context(|| format!("{}: not a valid state.json", state_path.display()))?;
    let cfg = Config::parse(&state.config_toml, &[])
        .map_err(|e| anyhow!("{}: the checkpoint's config: {e}", state_path.display()))?;
    let m = &cfg.model;
    if m.ffn != FfnKind::Dense {
        bail!(
            "{}: a shared-MoE checkpoint (model.ffn = \"sharedmoe\"): it has no Hugging Face \
             architecture (one MoE block shared by every layer, factorised embeddings), so \
             export-hf writes dense LlamaForCausalLM checkpoints only",
            dir.display()
        );
    }
    if m.embedding_dim > 0 {
        bail!(
            "{}: factorised embeddings (model.embedding_dim = {}) have no LlamaForCausalLM \
             equivalent; export-hf writes plain tied-embedding dense checkpoints only",
            dir.display(),
            m.embedding_dim
        );
    }
    Ok((state, cfg))
}

/// `model.safetensors` for HF, and how many tensors it holds: every
/// tensor of the config checked for its shape and f32 dtype, renamed, and
/// `lm_head` left out (tied).
fn hf_weights(dir: &Path, cfg: &Config) -> Result<(Vec<u8>, usize)> {
    let specs = param_specs(&cfg.model);
    let model_path = dir.join("model.safetensors");
    let model_bytes =
        fs::read(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let st = SafeTensors::deserialize(&model_bytes)
        .with_context(|| format!("{}: not a valid safetensors file", model_path.display()))?;
    let mut views = Vec::with_capacity(specs.len());
    for s in &specs {
        let v = st
            .tensor(&s.name)
            .map_err(|_| anyhow!("{}: tensor `{}` is missing", model_path.display(), s.name))?;
        let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
        if shape != s.dims || v.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor `{}` is {:?} {shape:?}, the config expects F32 {:?}",
                model_path.display(),
                s.name,
                v.dtype(),
                s.dims
            );
        }
        views.push((
            hf_name(&s.name),
            TensorView::new(Dtype::F32, v.shape().to_vec(), v.data())?,
        ));
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    Ok((safetensors::serialize(views, &metadata)?, specs.len()))
}

/// The bytes of the tokenizer.json to ship and its end-of-text id: the
/// `--tokenizer` given, else the run's own data.tokenizer, which must
/// still be the file the run trained with (its sha256 in the state, when
/// recorded), since the ids mean nothing through another one.
fn shipped_tokenizer(
    dir: &Path,
    state: &TrainingState,
    cfg: &Config,
    tokenizer_path: Option<&Path>,
) -> Result<(Vec<u8>, u32)> {
    let tk_path = match tokenizer_path {
        Some(p) => p.to_path_buf(),
        None if cfg.data.tokenizer.as_os_str().is_empty() => bail!(
            "{}: the run has no data.tokenizer (it read pre-tokenised .bin files): pass \
             --tokenizer with the tokenizer.json they were made with",
            dir.display()
        ),
        None => {
            let p = cfg.data.tokenizer.clone();
            if !p.exists() {
                bail!(
                    "{}: the run's tokenizer {} does not exist (a path relative to where the \
                     run started?): pass --tokenizer",
                    dir.display(),
                    p.display()
                );
            }
            if state.tokenizer_sha256.is_some() {
                state.check_tokenizer(&p, &sha256_file(&p)?, "pass --tokenizer")?;
            }
            p
        }
    };
    let tk = tokenizer::load_for_model(&tk_path, cfg.model.vocab_size)?;
    let eot = tokenizer::eot_id(&tk)
        .with_context(|| format!("{}: no end-of-text token", tk_path.display()))?;
    let tokenizer_json =
        fs::read(&tk_path).with_context(|| format!("reading {}", tk_path.display()))?;
    Ok((tokenizer_json, eot))
}

/// `config.json`, `generation_config.json`, `tokenizer_config.json` and
/// `special_tokens_map.json`, pretty-printed: `<|endoftext|>` (`eot`) is
/// both bos and eos, and the tokenizer adds no special tokens, as
/// training did.
fn hf_json_files(cfg: &Config, eot: u32) -> Result<[Vec<u8>; 4]> {
    let mut config = ckpt::hf_config(&cfg.model, cfg.train.seq_len);
    let o = config.as_object_mut().expect("an object");
    for (k, v) in [
        ("bos_token_id", json!(eot)),
        ("eos_token_id", json!(eot)),
        ("initializer_range", json!(0.02)),
        ("attention_dropout", json!(0.0)),
        ("pretraining_tp", json!(1)),
        ("rope_scaling", json!(null)),
        ("use_cache", json!(true)),
    ] {
        o.insert(k.into(), v);
    }
    let generation = json!({
        "bos_token_id": eot,
        "eos_token_id": eot,
    });
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.train.seq_len,
        "added_tokens_decoder": {
            eot.to_string(): {
                "content": EOT,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }
        },
    });
    let special = json!({ "bos_token": EOT, "eos_token": EOT });
    let pretty = |v: &serde_json::Value| -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec_pretty(v)?;
        b.push(b'\n');
        Ok(b)
    };
    Ok([
        pretty(&config)?,
        pretty(&generation)?,
        pretty(&tokenizer_config)?,
        pretty(&special)?,
    ])
}

/// Writes `files` as the directory `out` atomically: a temporary sibling,
/// every file and the directory fsynced, renamed into place, the parent
/// fsynced. An existing `out` is replaced only when it holds nothing but
/// an export's files (never a checkpoint or anything else).
fn install(out: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    if out.exists() {
        let entries = fs::read_dir(out)
            .with_context(|| format!("{}: exists and is not a directory", out.display()))?;
        for e in entries {
            let name = e?.file_name().to_string_lossy().to_string();
            if !FILES.contains(&name.as_str()) {
                bail!(
                    "{}: exists and holds `{name}`, which an export does not write: \
                     refusing to replace it (choose another OUT or remove it)",
                    out.display()
                );
            }
        }
    }
    ckpt::atomic::install_dir(out, files)
}
