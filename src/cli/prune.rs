//! `sharedmoe checkpoint prune --ckpt D --stats S (--keep-fraction f |
//! --remove-fraction f) --by reap|frequency --out O`: removes the experts
//! with the lowest REAP saliency (or frequency) from `sharedmoe reap`'s
//! statistics. A pool (pooled or shared MoE) is pruned as one set; a
//! per-layer MoE loses the same fraction in every layer (the REAP
//! paper's setting). Router rows go with their experts; top-k and the
//! weights' normalisation stay as they are.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::ckpt::{self, pool, Checkpoint};
use crate::model::param_specs;
use crate::train::Config;

use super::eval::checkpoint_config;
use super::reap::ReapFile;

#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// The checkpoint to prune.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// `sharedmoe reap`'s JSON for this checkpoint.
    #[arg(long)]
    pub stats: PathBuf,
    /// Fraction of the experts to keep (of the pool, or of each layer).
    #[arg(long, conflicts_with = "remove_fraction")]
    pub keep_fraction: Option<f64>,
    /// Fraction of the experts to remove.
    #[arg(long)]
    pub remove_fraction: Option<f64>,
    /// What ranks the experts.
    #[arg(long, value_enum, default_value = "reap")]
    pub by: Criterion,
    /// The pruned checkpoint to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Criterion {
    Reap,
    Frequency,
}

/// Experts to keep per group: the `keep` highest by `by` (ties: lower
/// index first), increasing.
pub fn select(file: &ReapFile, by: Criterion, keep: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<usize>, Vec<(usize, f64)>)> = vec![];
    for u in &file.units {
        let score = match by {
            Criterion::Reap => u.reap,
            Criterion::Frequency => u.frequency as f64,
        };
        match groups.last_mut() {
            Some((layer, members)) if *layer == u.layer => members.push((u.expert, score)),
            _ => groups.push((u.layer, vec![(u.expert, score)])),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut members)| {
            members.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept: Vec<usize> = members.iter().take(keep).map(|m| m.0).collect();
            kept.sort_unstable();
            kept
        })
        .collect()
}

pub fn run(a: &PruneArgs) -> Result<()> {
    if a.out.exists() {
        bail!(
            "{}: already exists; prune writes a new checkpoint",
            a.out.display()
        );
    }
    let keep_fraction = match (a.keep_fraction, a.remove_fraction) {
        (Some(k), None) => k,
        (None, Some(r)) => 1.0 - r,
        _ => bail!("give --keep-fraction or --remove-fraction"),
    };
    if !(0.0..=1.0).contains(&keep_fraction) {
        bail!("keep fraction {keep_fraction}: expected a value in [0, 1]");
    }
    let file: ReapFile = serde_json::from_slice(
        &std::fs::read(&a.stats).with_context(|| format!("reading {}", a.stats.display()))?,
    )
    .with_context(|| format!("{}: not `sharedmoe reap` statistics", a.stats.display()))?;
    let src_cfg = checkpoint_config(&a.ckpt)?;
    let m = &src_cfg.model;
    if file.stats.experts as i64 != m.num_experts {
        bail!(
            "{}: statistics of {} experts per group, the checkpoint has {}",
            a.stats.display(),
            file.stats.experts,
            m.num_experts
        );
    }
    let keep = (keep_fraction * m.num_experts as f64).round() as usize;
    let chosen = select(&file, a.by, keep);
    let src = ckpt::load(&a.ckpt, &param_specs(m), ckpt::Purpose::Weights)?;
    let (pruned, params) = pool::prune(m, &src.params, &chosen).with_context(|| {
        format!(
            "pruning {} to {keep} of {} experts",
            a.ckpt.display(),
            m.num_experts
        )
    })?;
    let cfg = Config {
        model: pruned.clone(),
        ..src_cfg
    };
    let mut state = src.state;
    state.record_config(cfg.to_toml());
    let checkpoint = Checkpoint {
        params,
        adam_m: vec![],
        adam_v: vec![],
        state,
    };
    ckpt::save(&a.out, &pruned, cfg.train.seq_len, &checkpoint)?;
    println!(
        "prune: kept {keep} of {} experts per group by {:?} ({} group(s)) -> {}",
        m.num_experts,
        a.by,
        chosen.len(),
        a.out.display()
    );
    Ok(())
}
