//! The step loop shared by a single-process run and a worker of a
//! distributed job: next batch, one step, a metrics row, periodic
//! validation and checkpoints, stop on request. Where metrics and
//! checkpoints go, and what asks to stop, is the [`RunSink`]'s business.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::ckpt::{Checkpoint, TrainingState};

use super::batches::Batches;
use super::config::{Config, NonFinitePolicy};
use super::mfu::flops_per_token;
use super::trainer::{StepMetrics, Trainer};

/// One row of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct MetricsRow {
    pub step: i64,
    pub loss: f64,
    pub aux: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: i64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The divergence guard kept the state: this step changed nothing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// Where a run's results go and what may stop it.
pub trait RunSink {
    /// After every step.
    fn metrics(&mut self, row: &MetricsRow) -> Result<()>;
    /// A checkpoint of the trainer after `trainer.step_count()` steps;
    /// returns where it went.
    fn checkpoint(&mut self, trainer: &Trainer, batches: &Batches) -> Result<String>;
    /// After every step: stop (with a checkpoint) now?
    fn stop_requested(&self) -> bool;
    /// After every step: give up at once (the job was aborted)?
    fn abort(&self) -> Option<String>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopEnd {
    /// `end` steps done; the last checkpoint holds them.
    Reached,
    /// Stopped on request, after a checkpoint.
    Stopped,
}

pub struct LoopOptions {
    /// Train until this many steps are done.
    pub end: i64,
    /// FLOP/s of all the job's devices (for MFU).
    pub peak_flops: Option<f64>,
    pub progress: bool,
    /// The checkpoint the run started from, if any (named when the run
    /// diverges before writing one of its own).
    pub started_from: Option<String>,
}

/// The progress line of a run of `steps` steps (hidden when `visible` is
/// false): the same for a single run and for the coordinator.
pub fn step_bar(steps: i64, visible: bool) -> indicatif::ProgressBar {
    let bar = if visible {
        indicatif::ProgressBar::new(steps.max(0) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// The trainer's state plus where the data stands.
pub fn snapshot(trainer: &Trainer, batches: &Batches) -> Result<Checkpoint> {
    let pos = batches.position();
    let mut c = trainer.checkpoint(pos.next_batch)?;
    c.state = snapshot_state(trainer, batches);
    Ok(c)
}

/// The training state of a checkpoint taken now, without the tensors.
pub fn snapshot_state(trainer: &Trainer, batches: &Batches) -> TrainingState {
    let pos = batches.position();
    let mut state = trainer.training_state(pos.next_batch);
    state.data_cursors = pos.streams;
    state.data_shards = trainer.cfg.data.shards;
    state.tokenizer_sha256 = batches.tokenizer_sha256.clone();
    state
}

/// Mean validation CE over the fixed validation micro-batches.
pub fn evaluate(trainer: &mut Trainer, val: &[Vec<Vec<i32>>]) -> Result<f64> {
    let mut total = 0.0;
    for rows in val {
        total += trainer.eval(rows)?.0;
    }
    Ok(total / val.len() as f64)
}

pub fn run_steps(
    cfg: &Config,
    trainer: &mut Trainer,
    batches: &mut Batches,
    sink: &mut dyn RunSink,
    opts: &LoopOptions,
) -> Result<LoopEnd> {
    let t = &cfg.train;
    let tokens_per_step = t.global_batch * t.seq_len;
    let fpt = flops_per_token(cfg);
    let bar = step_bar(t.steps, opts.progress);
    bar.set_position(trainer.step_count() as u64);
    let mut last_ckpt = opts.started_from.clone();
    while trainer.step_count() < opts.end {
        let step = trainer.step_count();
        let began = Instant::now();
        let rows = batches.next(cfg)?;
        let m = trainer.train_step(&rows)?;
        let dt = began.elapsed().as_secs_f64();
        let tps = tokens_per_step as f64 / dt;
        let val_loss = if t.eval_every > 0
            && (step + 1) % t.eval_every == 0
            && !batches.validation().is_empty()
        {
            Some(evaluate(trainer, batches.validation())?)
        } else {
            None
        };
        let row = MetricsRow {
            step,
            loss: m.ce,
            aux: m.aux,
            lr: m.lr,
            grad_norm: m.grad_norm,
            tokens: (step + 1) * tokens_per_step,
            step_time_s: dt,
            tokens_per_s: tps,
            mfu: opts.peak_flops.map(|p| tps * fpt / p),
            val_loss,
            skipped: !m.applied,
        };
        sink.metrics(&row)?;
        if !m.applied {
            if let Err(e) = nonfinite_step(cfg, trainer, step, &m, last_ckpt.as_deref()) {
                bar.abandon();
                return Err(e);
            }
        }
        bar.set_message(format!(
            "loss {:.4} aux {:.3} {:.0} tok/s",
            m.ce, m.aux, tps
        ));
        bar.inc(1);
        if let Some(why) = sink.abort() {
            bar.abandon();
            bail!("aborted after step {}: {why}", step + 1);
        }
        let done = trainer.step_count();
        let stop = m.stop || sink.stop_requested();
        if stop || done == opts.end || (t.checkpoint_every > 0 && done % t.checkpoint_every == 0) {
            let at = sink.checkpoint(trainer, batches)?;
            if !at.is_empty() {
                tracing::info!("checkpoint {at}");
                last_ckpt = Some(at);
            }
        }
        if stop {
            bar.abandon_with_message("stopped: checkpoint written");
            return Ok(LoopEnd::Stopped);
        }
    }
    bar.finish();
    Ok(LoopEnd::Reached)
}

/// The error a run ends with when it diverged (see [`nonfinite_step`]):
/// restarting from the last checkpoint would repeat it, so a job ends.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// A step the divergence guard did not apply: an error for
/// `train.on_nonfinite = "stop"` (or once too many were skipped), a
/// warning for `"skip"`.
fn nonfinite_step(
    cfg: &Config,
    trainer: &Trainer,
    step: i64,
    m: &StepMetrics,
    last_ckpt: Option<&str>,
) -> Result<()> {
    let what = format!(
        "step {step}: the loss ({}), aux loss ({}) or gradient norm ({}) is not finite, or the \
         update would have made a parameter non-finite",
        m.ce, m.aux, m.grad_norm
    );
    let last = last_ckpt.map_or_else(|| "none was written yet".to_string(), |c| c.to_string());
    let t = &cfg.train;
    match t.on_nonfinite {
        NonFinitePolicy::Stop => Err(Diverged(format!(
            "{what}: the run diverged. The update was not applied and no checkpoint was written \
             from it; the last good checkpoint is {last}. Lower train.lr (now {}) or \
             train.grad_clip, or set train.on_nonfinite = \"skip\" to skip such batches",
            t.lr
        ))
        .into()),
        NonFinitePolicy::Skip if trainer.nonfinite_steps() > t.max_nonfinite_steps => {
            Err(Diverged(format!(
                "{what}: {} steps were skipped, more than train.max_nonfinite_steps = {}; \
                 the run is diverging. The last good checkpoint is {last}",
                trainer.nonfinite_steps(),
                t.max_nonfinite_steps
            ))
            .into())
        }
        NonFinitePolicy::Skip => {
            tracing::warn!(
                "{what}: update skipped ({} of at most {} skipped steps)",
                trainer.nonfinite_steps(),
                t.max_nonfinite_steps
            );
            Ok(())
        }
    }
}
