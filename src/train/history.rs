//! A run's step-by-step records (`metrics.jsonl`, TensorBoard events) kept
//! consistent with its checkpoints: a run that continues from the
//! checkpoint of step S trains steps S, S+1, ... again, so the rows an
//! interrupted attempt wrote from S on are dropped first. Then every step
//! appears exactly once, whether the run was killed, resumed or restarted.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::tensorboard;

/// The metrics file of a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The TensorBoard event directory of a run directory.
pub const EVENTS_DIR: &str = "tensorboard";

/// Rewinds the run directory's records to `step`: rows and events of
/// steps `>= step` go.
pub fn rewind(run_dir: &Path, step: i64) -> Result<()> {
    rewind_metrics(&run_dir.join(METRICS_FILE), step)?;
    tensorboard::rewind(&run_dir.join(EVENTS_DIR), step)
        .with_context(|| format!("rewinding the TensorBoard events to step {step}"))
}

/// Drops rows at or after `step` from a metrics.jsonl (and a torn last
/// line), atomically.
pub fn rewind_metrics(path: &Path, step: i64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_i64()))
                .is_some_and(|s| s < step)
        })
        .collect();
    if kept.len() == text.lines().count() && (text.is_empty() || text.ends_with('\n')) {
        return Ok(());
    }
    let dropped = text.lines().count() - kept.len();
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if dropped > 0 {
        tracing::info!(
            "{}: dropped {dropped} row(s) of steps >= {step}, which are trained again",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewind_keeps_earlier_rows_and_drops_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("sharedmoe-history-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join(METRICS_FILE);
        fs::write(
            &p,
            "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"lo",
        )
        .unwrap();
        rewind_metrics(&p, 2).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\"step\":0}\n{\"step\":1}\n"
        );
        rewind_metrics(&p, 5).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\"step\":0}\n{\"step\":1}\n"
        );
        rewind_metrics(&p, 0).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "");
        let _ = fs::remove_dir_all(&dir);
    }
}
