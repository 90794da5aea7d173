//! `sharedmoe train`, `sharedmoe init`, `sharedmoe params`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::model::{count_breakdown, ModelConfig};
use crate::runtime::Backend;
use crate::train::{self, Config, StartFrom};

/// A config file plus `--set section.key=value` overrides.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// TOML config (see configs/), or a checkpoint directory: its recorded
    /// run config (e.g. the pooled model `checkpoint convert-pool` wrote).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// cpu, cuda or tpu: shorthand for --set run.backend=... (with
    /// train.compute_dtype = "auto", TPU and GPU compute in bf16).
    #[arg(long)]
    pub backend: Option<Backend>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config> {
        let mut overrides = self.overrides.clone();
        if let Some(b) = self.backend {
            overrides.push(format!("run.backend={b}"));
        }
        if self.config.join("state.json").is_file() {
            let recorded = super::eval::checkpoint_config(&self.config)?;
            return Config::parse(&recorded.to_toml(), &overrides)
                .with_context(|| format!("{}: the recorded config", self.config.display()));
        }
        Config::load(&self.config, &overrides)
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start a new run (step 0, zero moments) from a checkpoint's weights:
    /// `sharedmoe init`'s, an import, a conversion or another run's.
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Continue a run exactly from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop with a checkpoint after this many steps (resume later).
    #[arg(long)]
    pub until_step: Option<i64>,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
}

pub fn run_train(a: &TrainArgs) -> Result<()> {
    let cfg = a.config.load()?;
    let start = StartFrom {
        init: a.init.clone(),
        resume: a.resume.clone(),
        until_step: a.until_step,
    };
    let last = train::train(&cfg, &start, a.plugin.as_deref())?;
    println!("final checkpoint: {}", last.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Checkpoint directory to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run_init(a: &InitArgs) -> Result<()> {
    let cfg = a.config.load()?;
    train::write_init(&cfg, &a.out, a.seed)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote step-0 checkpoint {}", a.out.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ParamsArgs {
    /// A TOML config, or a preset name (dense125m, sharedmoe50m, small-dense,
    /// small-sharedmoe, tiny-dense, tiny-sharedmoe).
    #[arg(long)]
    pub config: String,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

pub fn run_params(a: &ParamsArgs) -> Result<()> {
    let model = match ModelConfig::preset(&a.config) {
        Some(m) if a.overrides.is_empty() => m,
        _ => {
            ConfigArgs {
                config: a.config.clone().into(),
                overrides: a.overrides.clone(),
                backend: None,
            }
            .load()?
            .model
        }
    };
    for (part, n) in count_breakdown(&model) {
        println!("{part:>10}  {n:>13}");
    }
    // Shared weights count once per use: the N of 6N FLOPs per token.
    println!(
        "{:>10}  {:>13}",
        "used/token",
        crate::model::active_params_per_token(&model)
    );
    if !model.tie_word_embeddings {
        // Published "active" figures (Qwen3-30B-A3B's 3.3B) also count the
        // input table, which a token only indexes.
        println!(
            "{:>10}  {:>13}  (+ the input embedding a token indexes, as published active counts)",
            "active",
            crate::model::active_params_per_token(&model) + model.vocab_size * model.hidden_size
        );
    }
    Ok(())
}
