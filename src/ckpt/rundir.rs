//! The checkpoints of a run directory (`RUN_DIR/checkpoints/step_NNNNNNNN`):
//! finding the newest one that verifies, keeping history safe when a run
//! is continued from an older step, pruning, and clearing what killed
//! writers left behind. Everything here assumes the caller holds the run
//! directory's [`RunLock`](super::lock::RunLock).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Where checkpoints that a run continued past are moved, not deleted.
pub const ABANDONED_DIR: &str = "abandoned";

/// `checkpoints/step_00001234` under a run directory.
pub fn step_dir(run_dir: &Path, step: i64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step_{step:08}"))
}

/// The step a `step_NNNNNNNN` directory holds, from its name.
pub fn step_of(dir: &Path) -> Option<i64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step_")?
        .parse()
        .ok()
}

/// The complete checkpoints (those with a state.json) under a run
/// directory, oldest first.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(run_dir.join("checkpoints")) else {
        return vec![];
    };
    let mut dirs: Vec<(i64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("state.json").exists())
        .filter_map(|p| Some((step_of(&p)?, p)))
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, p)| p).collect()
}

/// The newest complete checkpoint under a run directory, unverified.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    list(run_dir).pop()
}

/// The newest checkpoint for which `verify` succeeds, with what it
/// returned. Each newer one that fails is reported (and left in place: a
/// person may want to look at it or repair it).
pub fn newest_verified<T>(
    run_dir: &Path,
    mut verify: impl FnMut(&Path) -> Result<T>,
) -> Option<(PathBuf, T)> {
    for dir in list(run_dir).into_iter().rev() {
        match verify(&dir) {
            Ok(v) => return Some((dir, v)),
            Err(e) => tracing::warn!(
                "skipping checkpoint {} (left in place): {e:#}",
                dir.display()
            ),
        }
    }
    None
}

/// Where a run directory's run continues: the newest checkpoint that
/// verifies (see [`newest_verified`]; a warning when newer ones did not),
/// or `None` when it has no checkpoint at all. When it has some but none
/// verifies, starting from scratch would write over them: an error.
pub fn resume_point<T>(
    run_dir: &Path,
    verify: impl FnMut(&Path) -> Result<T>,
) -> Result<Option<(PathBuf, T)>> {
    match newest_verified(run_dir, verify) {
        Some((dir, v)) => {
            if Some(&dir) != latest(run_dir).as_ref() {
                tracing::warn!(
                    "resuming from {}, the newest checkpoint that verifies",
                    dir.display()
                );
            }
            Ok(Some((dir, v)))
        }
        None if !list(run_dir).is_empty() => anyhow::bail!(
            "{}: no checkpoint there verifies (each was reported above), and starting from \
             scratch would write over them; repair or move them, or start elsewhere",
            run_dir.join("checkpoints").display()
        ),
        None => Ok(None),
    }
}

/// Moves every checkpoint newer than `step` to
/// `RUN_DIR/abandoned/<unix seconds>/`: a run continued from an older
/// checkpoint writes a new history from there, and the old one is kept
/// rather than overwritten step by step. Returns where they went.
pub fn abandon_newer(run_dir: &Path, step: i64) -> Result<Vec<PathBuf>> {
    let newer: Vec<PathBuf> = list(run_dir)
        .into_iter()
        .filter(|d| step_of(d).is_some_and(|s| s > step))
        .collect();
    if newer.is_empty() {
        return Ok(vec![]);
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut to = run_dir.join(ABANDONED_DIR).join(secs.to_string());
    let mut n = 1;
    while to.exists() {
        to = run_dir.join(ABANDONED_DIR).join(format!("{secs}-{n}"));
        n += 1;
    }
    fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    let mut moved = vec![];
    for d in newer {
        let dest = to.join(d.file_name().expect("a step directory has a name"));
        fs::rename(&d, &dest)
            .with_context(|| format!("moving {} to {}", d.display(), dest.display()))?;
        moved.push(dest);
    }
    tracing::warn!(
        "continuing from step {step}: the {} newer checkpoint(s) were moved to {} (kept, not deleted)",
        moved.len(),
        to.display()
    );
    Ok(moved)
}

/// Keeps the newest `keep` checkpoints, deleting only ones older than
/// `newest_good` (the newest verified checkpoint, normally the one just
/// written), which itself is never deleted. Returns what went.
pub fn prune(run_dir: &Path, keep: usize, newest_good: &Path) -> Result<Vec<PathBuf>> {
    let Some(good_step) = step_of(newest_good) else {
        return Ok(vec![]);
    };
    let all = list(run_dir);
    let drop_n = all.len().saturating_sub(keep.max(1));
    let gone: Vec<PathBuf> = all
        .into_iter()
        .take(drop_n)
        .filter(|d| step_of(d).is_some_and(|s| s < good_step))
        .collect();
    for d in &gone {
        fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(gone)
}

/// What [`install`](super::install) leaves behind when it is killed or
/// fails: `.NAME.tmp-PID` (a checkpoint being written: removed) and
/// `.NAME.old-PID` (the checkpoint it was replacing: put back if NAME is
/// missing, else removed). Call with the run directory locked.
pub fn clean_temporaries(run_dir: &Path) -> Result<()> {
    let dir = run_dir.join("checkpoints");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Some(hidden) = name.strip_prefix('.') else {
            continue;
        };
        if let Some((target, _pid)) = hidden.rsplit_once(".tmp-") {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(
                "removed {} (an unfinished write of {target}, from a killed or failed run)",
                path.display()
            );
        } else if let Some((target, _pid)) = hidden.rsplit_once(".old-") {
            let original = dir.join(target);
            if original.exists() {
                fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                tracing::info!("removed {} (replaced by {target})", path.display());
            } else {
                fs::rename(&path, &original)
                    .with_context(|| format!("restoring {}", original.display()))?;
                tracing::warn!(
                    "restored {} from {} (a replacement was interrupted)",
                    original.display(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}
