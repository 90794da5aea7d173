//! `sharedmoe generate --ckpt D --prompt "..."`: text from a checkpoint,
//! greedy or sampled, decoding with a key/value cache.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use crate::ckpt;
use crate::data::tokenizer;
use crate::generate::{Generator, Sampling};
use crate::model::param_specs;
use crate::train::client::open_client_with;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub ckpt: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json (default: the run's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Recompute the whole sequence for every token (the reference path).
    #[arg(long)]
    pub no_cache: bool,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let mut cfg = super::eval::checkpoint_config(&a.ckpt)?;
    if let Some(t) = &a.tokenizer {
        cfg.data.tokenizer = t.clone();
    }
    if cfg.data.tokenizer.as_os_str().is_empty() {
        bail!("the run has no tokenizer (it trained on .bin tokens): pass --tokenizer");
    }
    let tk = tokenizer::load(&cfg.data.tokenizer)?;
    let prompt: Vec<u32> = tk
        .encode(a.prompt.as_str(), false)
        .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    // Compressed checkpoints (bf16, NF4) stay as stored on the device and
    // are dequantised inside the decoding step.
    let weights = ckpt::compressed::load(&a.ckpt, &param_specs(&cfg.model))?;
    let client = open_client_with(&cfg, a.plugin.as_deref(), 1)?;
    let max_len = (prompt.len() + a.max_tokens) as i64;
    if max_len > cfg.train.seq_len {
        tracing::warn!(
            "{max_len} tokens is longer than the {} the model was trained on",
            cfg.train.seq_len
        );
    }
    let g = Generator::stored(&client, &cfg.model, &weights.params, max_len)?;
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let stop = tokenizer::eot_id(&tk).ok();
    let ids = g.generate(&prompt, a.max_tokens, &sampling, stop, !a.no_cache)?;
    let text = tk
        .decode(&ids, true)
        .map_err(|e| anyhow!("decoding: {e}"))?;
    println!("{}{}", a.prompt, text);
    Ok(())
}
