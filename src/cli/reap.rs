//! `sharedmoe reap --ckpt D [--data P... --tokenizer T] [--batches N]
//! [--out FILE]`: REAP saliency and frequency of every expert
//! (`model::reap`) over calibration rows (the run's validation batches, or
//! every document of `--data`). For a pool (pooled or shared MoE) an
//! expert's tokens at every layer count together; for a per-layer MoE
//! each layer's experts are separate units (the REAP paper's baseline).
//! Writes JSON (default: the run directory's `reap.json`) that
//! `checkpoint prune` reads.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::model::reap::{reap_program, ReapStats, UnitStats};
use crate::model::FfnKind;

use super::eval::{run_over_rows, CheckpointRows};

#[derive(clap::Args, Debug)]
pub struct ReapArgs {
    /// The checkpoint (of an MoE model) and the calibration rows.
    #[command(flatten)]
    pub rows: CheckpointRows,
    /// Output JSON (default: the run directory's `reap.json`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What `reap` writes: the sums, and every unit's saliency and frequency.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReapFile {
    pub checkpoint: String,
    pub stats: ReapStats,
    pub units: Vec<UnitStats>,
}

pub fn run(a: &ReapArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.rows.ckpt));
    let stats = collect(&a.rows)?;
    let units = stats.units();
    let dead = units.iter().filter(|u| u.frequency == 0).count();
    let mut ranked: Vec<&UnitStats> = units.iter().collect();
    ranked.sort_by(|x, y| y.reap.total_cmp(&x.reap));
    let name = |u: &UnitStats| match u.layer {
        Some(l) => format!("L{l}.e{}", u.expert),
        None => format!("e{}", u.expert),
    };
    let show = |us: &[&UnitStats]| -> String {
        us.iter()
            .map(|u| format!("{} {:.4} ({}x)", name(u), u.reap, u.frequency))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{} tokens through {} layer(s); {} experts, {dead} never chosen\nhighest REAP: {}\nlowest REAP: {}",
        stats.tokens,
        stats.layer_ids.len(),
        units.len(),
        show(&ranked[..ranked.len().min(5)]),
        show(&ranked[ranked.len().saturating_sub(5)..]),
    );
    let file = ReapFile {
        checkpoint: a.rows.ckpt.display().to_string(),
        stats,
        units,
    };
    std::fs::write(&out, serde_json::to_string_pretty(&file)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

/// `RUN/reap.json` for a checkpoint `RUN/checkpoints/step_N`, else
/// `D/reap.json`.
fn default_out(ckpt: &Path) -> PathBuf {
    match ckpt.parent() {
        Some(p) if p.file_name().is_some_and(|n| n == "checkpoints") => {
            p.parent().unwrap_or(Path::new(".")).join("reap.json")
        }
        _ => ckpt.join("reap.json"),
    }
}

/// Runs the REAP program over the rows (one micro-batch per call, one
/// device) and sums its results.
pub fn collect(rows: &CheckpointRows) -> Result<ReapStats> {
    let mut cfg = rows.config()?;
    if cfg.model.ffn == FfnKind::Dense {
        bail!(
            "{}: model.ffn = \"dense\"; `reap` scores the experts of an MoE checkpoint",
            rows.ckpt.display()
        );
    }
    let (checkpoint, batches) = rows.load(&mut cfg)?;
    let (m, t) = (&cfg.model, &cfg.train);
    let program = reap_program(m, cfg.compute_dtype(), t.micro_batch, t.seq_len)?;
    let mut stats = ReapStats::new(m);
    run_over_rows(
        &cfg,
        &checkpoint,
        &batches,
        rows.plugin.as_deref(),
        program,
        |outs| {
            stats
                .add(&outs)
                .map_err(|e| anyhow!("REAP program results: {e}"))
        },
    )?;
    Ok(stats)
}
