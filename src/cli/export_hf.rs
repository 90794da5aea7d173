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
use crate::model::{param_specs, FfnKind, Role};
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
    /// Write the model only (config.json, generation_config.json,
    /// model.safetensors), no tokenizer: for a model with none, such as
    /// one brought in by import-hf.
    #[arg(long, conflicts_with = "tokenizer")]
    pub no_tokenizer: bool,
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

/// Which tokenizer an export ships.
#[derive(Clone, Copy, Debug)]
pub enum ShippedTokenizer<'a> {
    /// The run's own data.tokenizer.
    Run,
    /// This tokenizer.json.
    File(&'a Path),
    /// None: the model's files only.
    Without,
}

pub fn run(a: &ExportHfArgs) -> Result<()> {
    let tokenizer = match (&a.tokenizer, a.no_tokenizer) {
        (_, true) => ShippedTokenizer::Without,
        (Some(p), false) => ShippedTokenizer::File(p),
        (None, false) => ShippedTokenizer::Run,
    };
    let (architecture, n) = export(&a.dir, &a.out, tokenizer)?;
    println!(
        "{}: {architecture}, {n} tensors, written to {}",
        a.dir.display(),
        a.out.display()
    );
    Ok(())
}

/// Writes the HF directory `out` for the dense or per-layer MoE
/// checkpoint `dir`; returns its architecture and how many tensors
/// `model.safetensors` holds.
pub fn export(
    dir: &Path,
    out: &Path,
    tokenizer: ShippedTokenizer,
) -> Result<(&'static str, usize)> {
    let (state, cfg) = read_exportable_checkpoint(dir)?;
    let (weights, tensors, quantization) = if ckpt::compressed::is_compressed(dir)? {
        compressed_hf_weights(dir, &cfg)?
    } else {
        let (weights, tensors) = hf_weights(dir, &cfg)?;
        (weights, tensors, None)
    };
    let shipped = match tokenizer {
        ShippedTokenizer::Without => None,
        ShippedTokenizer::Run => Some(shipped_tokenizer(dir, &state, &cfg, None)?),
        ShippedTokenizer::File(p) => Some(shipped_tokenizer(dir, &state, &cfg, Some(p))?),
    };
    let eot = shipped.as_ref().map(|(_, eot)| *eot);
    let [mut config, generation, tokenizer_config, special] = hf_json_files(&cfg, eot)?;
    if let Some(q) = quantization {
        // transformers' bitsandbytes quantizer reads the pre-quantised
        // weights by this (load_in_4bit, nf4, double quant, compute dtype).
        let mut c: serde_json::Value = serde_json::from_slice(&config)?;
        c["quantization_config"] = q;
        config = serde_json::to_vec_pretty(&c)?;
    }
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        (FILES[0], config),
        (FILES[1], generation),
        (FILES[2], weights),
    ];
    if let Some((tokenizer_json, _)) = shipped {
        files.push((FILES[3], tokenizer_json));
        files.push((FILES[4], tokenizer_config));
        files.push((FILES[5], special));
    }
    install(out, &files)?;
    let architecture = match cfg.model.ffn {
        FfnKind::Moe => "Qwen3MoeForCausalLM",
        _ => "LlamaForCausalLM",
    };
    Ok((architecture, tensors))
}

/// The checkpoint's state and run config, refused (before anything is
/// read or written) unless a transformers class holds the model: dense
/// (LlamaForCausalLM) without factorised embeddings, or per-layer MoE
/// (Qwen3MoeForCausalLM).
fn read_exportable_checkpoint(dir: &Path) -> Result<(TrainingState, Config)> {
    let state_path = dir.join("state.json");
    let state: TrainingState = serde_json::from_slice(
        &fs::read(&state_path)
            .with_context(|| format!("{}: not a checkpoint (no state.json)", dir.display()))?,
    )
    .with_context(|| format!("{}: not a valid state.json", state_path.display()))?;
    let cfg = Config::parse(&state.config_toml, &[])
        .map_err(|e| anyhow!("{}: the checkpoint's config: {e}", state_path.display()))?;
    let m = &cfg.model;
    if m.ffn == FfnKind::SharedMoe {
        bail!(
            "{}: a shared-MoE checkpoint (model.ffn = \"sharedmoe\"): it has no Hugging Face \
             architecture (one MoE block shared by every layer, factorised embeddings), so \
             export-hf writes dense (LlamaForCausalLM) and per-layer MoE \
             (Qwen3MoeForCausalLM) checkpoints only",
            dir.display()
        );
    }
    if m.ffn == FfnKind::Dense
        && (m.qk_norm || m.head_dim > 0 && m.head_dim * m.num_heads != m.hidden_size)
    {
        bail!(
            "{}: a dense model with qk-norm or its own head_dim has no LlamaForCausalLM equivalent",
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
/// tensor of the config checked for its shape and f32 dtype, under its HF
/// name (ours are HF's, SPEC.md), stacked experts [E, ..] split into
/// transformers' per-expert `mlp.experts.{i}.{proj}.weight`; a tied model
/// has no `lm_head` (transformers ties it on load).
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
        if s.role == Role::Experts {
            let (prefix, proj) = s
                .name
                .rsplit_once(".experts.")
                .expect("stacked expert names are {prefix}.experts.{proj}");
            let per = v.data().len() / s.dims[0] as usize;
            for (i, bytes) in v.data().chunks_exact(per).enumerate() {
                views.push((
                    format!("{prefix}.experts.{i}.{proj}.weight"),
                    TensorView::new(Dtype::F32, v.shape()[1..].to_vec(), bytes)?,
                ));
            }
        } else {
            views.push((
                s.name.clone(),
                TensorView::new(Dtype::F32, v.shape().to_vec(), v.data())?,
            ));
        }
    }
    let tensors = views.len();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    Ok((safetensors::serialize(views, &metadata)?, tensors))
}

/// `model.safetensors` of a compressed checkpoint (bf16 or NF4 weights)
/// for HF, its tensor count and transformers' `quantization_config`: the
/// stored tensors as they are (NF4 already in bitsandbytes' serialized
/// layout under the HF names), no `lm_head` for a tied model.
fn compressed_hf_weights(
    dir: &Path,
    cfg: &Config,
) -> Result<(Vec<u8>, usize, Option<serde_json::Value>)> {
    if cfg.model.ffn != FfnKind::Dense {
        bail!(
            "{}: compressed checkpoints export as dense models only",
            dir.display()
        );
    }
    let weights = ckpt::compressed::load(dir, &param_specs(&cfg.model))?;
    let tensors: Vec<_> = weights
        .params
        .iter()
        .flat_map(|(spec, t)| ckpt::compressed::serialized(&spec.name, t, &spec.dims))
        .collect();
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let n = views.len();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    Ok((
        safetensors::serialize(views, &metadata)?,
        n,
        ckpt::compressed::quantization_config(&weights.params),
    ))
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
/// training did. Without a tokenizer (`eot` None) bos and eos are null.
fn hf_json_files(cfg: &Config, eot: Option<u32>) -> Result<[Vec<u8>; 4]> {
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
            // (Shipped only with a tokenizer, so with its eot.)
            eot.unwrap_or_default().to_string(): {
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
