//! The step loop shared by a single-process run and a worker of a
//! distributed job: next batch, one step, a metrics row, periodic
//! validation and checkpoints, stop on request. Where metrics and
//! checkpoints go, and what asks to stop, is the [`RunSink`]'s business.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::ckpt::Checkpoint;

use super::batches::Batches;
use super::config::Config;
use super::run::flops_per_token;
use super::trainer::Trainer;

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
    c.state.data_cursors = pos.streams;
    c.state.data_shards = trainer.cfg.data.shards;
    c.state.tokenizer_sha256 = batches.tokenizer_sha256.clone();
    Ok(c)
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
    let mut last_ckpt: Option<String> = None;
    while trainer.step_count() < opts.end {
        let step = trainer.step_count();
        let began = Instant::now();
        let rows = batches.next(cfg)?;
        let m = trainer.train_step(&rows)?;
        let dt = began.elapsed().as_secs_f64();
        if !m.ce.is_finite() {
            bail!(
                "step {step}: loss is {} (diverged); last checkpoint: {last_ckpt:?}",
                m.ce
            );
        }
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
        };
        sink.metrics(&row)?;
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
