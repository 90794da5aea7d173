//! `sharedmoe checkpoint inspect DIR`: what a checkpoint holds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use safetensors::SafeTensors;

use crate::ckpt::{self, TrainingState};

#[derive(clap::Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Step, tensors and shapes, config, data cursors of a checkpoint.
    Inspect {
        /// The checkpoint directory (runs/NAME/checkpoints/step_NNNNNNNN).
        dir: PathBuf,
    },
    /// A dense checkpoint as a Hugging Face LlamaForCausalLM directory.
    ExportHf(crate::cli::export_hf::ExportHfArgs),
    /// A Hugging Face llama or qwen3_moe directory as our checkpoint
    /// (step 0, tensor by tensor).
    ImportHf(crate::cli::import_hf::ImportHfArgs),
    /// A per-layer MoE's experts merged into one pool with a new global
    /// router (Experiment 2).
    ConvertPool(crate::cli::convert_pool::ConvertPoolArgs),
    /// Removes the experts with the lowest REAP saliency or frequency.
    Prune(crate::cli::prune::PruneArgs),
}

pub fn run(c: &CheckpointCommand) -> Result<()> {
    match c {
        CheckpointCommand::Inspect { dir } => print!("{}", inspect(dir)?),
        CheckpointCommand::ExportHf(a) => crate::cli::export_hf::run(a)?,
        CheckpointCommand::ImportHf(a) => crate::cli::import_hf::run(a)?,
        CheckpointCommand::ConvertPool(a) => crate::cli::convert_pool::run(a)?,
        CheckpointCommand::Prune(a) => crate::cli::prune::run(a)?,
    }
    Ok(())
}

/// The report `inspect` prints.
pub fn inspect(dir: &std::path::Path) -> Result<String> {
    use std::fmt::Write as _;
    let files = ckpt::read_files(dir)?;
    let file = |name: &str| files.iter().find(|(n, _)| n == name).map(|(_, b)| b);
    let state_path = dir.join("state.json");
    let state: TrainingState = serde_json::from_slice(
        file("state.json")
            .with_context(|| format!("{}: no state.json (not a checkpoint)", dir.display()))?,
    )
    .with_context(|| format!("{}: not a valid state.json", state_path.display()))?;
    let mut s = String::new();
    writeln!(s, "checkpoint {}", dir.display())?;
    writeln!(
        s,
        "step {}  tokens seen {}  seed {}",
        state.step, state.tokens_seen, state.seed
    )?;
    writeln!(s, "files:")?;
    for (name, bytes) in &files {
        writeln!(s, "  {name:<24} {:>12} bytes", bytes.len())?;
    }
    for name in ["model.safetensors", "optimizer.safetensors"] {
        let Some(bytes) = file(name) else { continue };
        let st = SafeTensors::deserialize(bytes)
            .with_context(|| format!("{name}: not a valid safetensors file"))?;
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        let total: usize = names
            .iter()
            .map(|n| {
                st.tensor(n)
                    .map(|t| t.shape().iter().product::<usize>())
                    .unwrap_or(0)
            })
            .sum();
        writeln!(s, "{name}: {} tensors, {total} values", names.len())?;
        if name == "model.safetensors" {
            for n in &names {
                let t = st.tensor(n)?;
                writeln!(s, "  {n:<40} {:?} {:?}", t.dtype(), t.shape())?;
            }
        }
    }
    if let Ok(cfg) = crate::train::Config::parse(&state.config_toml, &[]) {
        match storage_report(dir, &files, &cfg.model) {
            Ok(report) => write!(s, "{report}")?,
            Err(e) => writeln!(s, "weights: unreadable: {e:#}")?,
        }
    }
    writeln!(
        s,
        "data: next batch {}, data.shards {}",
        state.next_batch, state.data_shards
    )?;
    for (shard, c) in &state.data_cursors {
        writeln!(s, "  shard {shard}: {}", serde_json::to_string(c)?)?;
    }
    if let Some(t) = &state.tokenizer_sha256 {
        writeln!(s, "tokenizer sha256 {t}")?;
    }
    writeln!(s, "config (sha256 {}):", state.config_sha256)?;
    for line in state.config_toml.lines() {
        writeln!(s, "  {line}")?;
    }
    Ok(s)
}

/// How the weights are stored: per storage kind the parameters, their
/// bytes and bits per parameter, and the share of exact zeros (pruning).
fn storage_report(
    dir: &std::path::Path,
    files: &[(String, Vec<u8>)],
    model: &crate::model::ModelConfig,
) -> Result<String> {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let weights = ckpt::compressed::from_files(dir, files, &crate::model::param_specs(model))?;
    // storage -> (tensors, parameters, bytes, zeros)
    let mut kinds: BTreeMap<String, (usize, usize, usize, usize)> = BTreeMap::new();
    for (spec, t) in &weights.params {
        let k = kinds.entry(t.storage().to_string()).or_default();
        let values = t.to_f32();
        k.0 += 1;
        k.1 += values.len();
        k.2 += t.device_bytes(&spec.dims);
        k.3 += values.iter().filter(|&&v| v == 0.0).count();
    }
    let mut s = String::new();
    let (params, bytes) = kinds.values().fold((0, 0), |(p, b), k| (p + k.1, b + k.2));
    writeln!(
        s,
        "weights: {params} parameters in {bytes} bytes, {:.3} bits per parameter",
        8.0 * bytes as f64 / params.max(1) as f64
    )?;
    for (kind, (tensors, p, b, zeros)) in &kinds {
        writeln!(
            s,
            "  {kind:<32} {tensors:>4} tensors {p:>12} parameters {:>7.3} bits/param, {:.1}% zeros",
            8.0 * *b as f64 / (*p).max(1) as f64,
            100.0 * *zeros as f64 / (*p).max(1) as f64
        )?;
    }
    Ok(s)
}
