//! `sharedmoe checkpoint convert-pool SRC OUT [--seed N] [--score
//! sigmoid|softmax]`: Experiment 2's step 1 and 2 (`ckpt::pool`): a
//! per-layer MoE checkpoint's experts merged into one pool with a new,
//! randomly initialised global router. OUT holds the weights at step 0
//! with SRC's run config but the pooled model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::ckpt::{self, pool, Checkpoint, TrainingState};
use crate::model::{count_params, param_specs, RouterScore};
use crate::train::Config;

use super::eval::checkpoint_config;

#[derive(clap::Args, Debug)]
pub struct ConvertPoolArgs {
    /// A per-layer MoE checkpoint (`ffn = "moe"`: trained here or imported
    /// with `import-hf`).
    pub src: PathBuf,
    /// The pooled checkpoint to write (must not exist).
    pub out: PathBuf,
    /// Seed of the global router's initialisation (normal, std 0.02).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The global router's scores: sigmoid (the experiment, as in
    /// DeepSeek-V3) or softmax.
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub score: ScoreArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScoreArg {
    Sigmoid,
    Softmax,
}

pub fn run(a: &ConvertPoolArgs) -> Result<()> {
    if a.out.exists() {
        bail!(
            "{}: already exists; convert-pool writes a new checkpoint",
            a.out.display()
        );
    }
    let src_cfg = checkpoint_config(&a.src)?;
    let score = match a.score {
        ScoreArg::Sigmoid => RouterScore::Sigmoid,
        ScoreArg::Softmax => RouterScore::Softmax,
    };
    let pooled = pool::pooled_model(&src_cfg.model, score)
        .with_context(|| format!("{}", a.src.display()))?;
    let src = ckpt::load(&a.src, &param_specs(&src_cfg.model), ckpt::Purpose::Weights)?;
    let params = pool::pooled_params(&src_cfg.model, &pooled, &src.params, a.seed)?;
    let cfg = Config {
        model: pooled.clone(),
        ..src_cfg
    };
    let state = TrainingState::fresh(cfg.to_toml(), cfg.data.shards, a.seed);
    let checkpoint = Checkpoint {
        params,
        adam_m: vec![],
        adam_v: vec![],
        state,
    };
    ckpt::save(&a.out, &pooled, cfg.train.seq_len, &checkpoint)?;
    println!(
        "convert-pool: {} MoE layers x {} experts -> one pool of {} with a {:?} global router; \
         {} parameters -> {}",
        src_cfg.model.expert_layers().len(),
        src_cfg.model.num_experts,
        pooled.num_experts,
        score,
        count_params(&pooled),
        a.out.display()
    );
    Ok(())
}
