//! `sharedmoe checkpoint import-hf HF_DIR OUT`: a Hugging Face
//! `LlamaForCausalLM` or `Qwen3MoeForCausalLM` directory (`config.json`
//! with `model.safetensors` or a sharded `model.safetensors.index.json`,
//! bf16/f16/f32) as our checkpoint at step 0, one tensor at a time
//! (`ckpt::hf_import`). `eval`, `generate` and `train --init` read it as
//! any other checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::ckpt::hf::{model_config, HfCheckpoint};
use crate::ckpt::hf_import;
use crate::model::{count_params, ModelConfig};
use crate::train::Config;

#[derive(clap::Args, Debug)]
pub struct ImportHfArgs {
    /// The Hugging Face model directory.
    pub hf_dir: PathBuf,
    /// Our checkpoint directory to write (must not exist).
    pub out: PathBuf,
    /// train.seq_len recorded in the checkpoint's config (default: the
    /// model's max_position_embeddings, at most 2048).
    #[arg(long)]
    pub seq_len: Option<i64>,
}

/// The run config recorded with an imported model: the model as its
/// config.json says, and a placeholder recipe (a run that starts from the
/// checkpoint with `train --init` brings its own).
fn recorded_config(model: &ModelConfig, seq_len: i64, source: &str) -> Result<Config> {
    let text = format!(
        "# Imported from {source} by `sharedmoe checkpoint import-hf`; [train] is a placeholder.\n\
         [model]\n{}\n\
         [train]\nseq_len = {seq_len}\nglobal_batch = 8\nmicro_batch = 1\nsteps = 1000\n\
         warmup_steps = 100\nlr = 1e-4\nmin_lr = 1e-5\n",
        toml::to_string(model).context("the model config as TOML")?
    );
    Config::parse(&text, &[]).context("the imported model's run config")
}

pub fn run(a: &ImportHfArgs) -> Result<()> {
    let hf = HfCheckpoint::open(&a.hf_dir)?;
    let model = model_config(&hf.config, &a.hf_dir.join("config.json"))?;
    let max_positions = hf.config["max_position_embeddings"]
        .as_i64()
        .unwrap_or(2048);
    let seq_len = a.seq_len.unwrap_or(max_positions.min(2048));
    let cfg = recorded_config(&model, seq_len, &a.hf_dir.display().to_string())?;
    println!(
        "import-hf: {} ({:?}, {} layers, {} parameters) from {} tensor(s)",
        a.hf_dir.display(),
        model.ffn,
        model.num_layers,
        count_params(&model),
        hf.tensors.len()
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} tensors [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let imported = hf_import::import(
        &hf,
        &model,
        max_positions,
        &cfg.to_toml(),
        &a.out,
        &mut |done, total, name| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(name.to_string());
        },
    )?;
    bar.finish_and_clear();
    println!(
        "wrote {}: {} tensors, {} values (largest {}), step 0, no optimizer state; \
         peak RSS {} bytes",
        a.out.display(),
        imported.tensors,
        imported.values,
        imported.largest,
        peak_rss_bytes()
    );
    Ok(())
}

/// This process's peak resident memory so far: `VmHWM` of
/// /proc/self/status, the high-water mark of this program's own address
/// space. (getrusage's ru_maxrss is no good here: Linux carries the
/// spawning process's high-water mark across the vfork + exec that
/// started us, so a large parent would be reported as ours.)
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
