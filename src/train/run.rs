//! The training loop as SPEC.md's recipe reads: for each step, the next
//! global batch from the token file, one compiled step, a metrics row,
//! periodic validation and checkpoints; SIGINT/SIGTERM finish the step,
//! checkpoint and stop cleanly.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::ckpt;
use crate::model::{active_params_per_token, param_specs};
use crate::runtime::{find_plugin, Backend, Client, ClientOption, Plugin};

use super::batches::{Batches, DataPosition};
use super::config::Config;
use super::trainer::{fresh_checkpoint, Trainer};

/// Where training starts from.
#[derive(Clone, Debug, Default)]
pub struct StartFrom {
    /// A step-0 checkpoint written by `sharedmoe init`.
    pub init: Option<PathBuf>,
    /// A checkpoint to continue exactly.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) once this many steps are done, before
    /// `train.steps`: runs in chunks on preemptible machines.
    pub until_step: Option<i64>,
}

/// One row of `metrics.jsonl`.
#[derive(Serialize)]
struct MetricsRow {
    step: i64,
    loss: f64,
    aux: f64,
    lr: f64,
    grad_norm: f64,
    tokens: i64,
    step_time_s: f64,
    tokens_per_s: f64,
    mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
}

/// Model FLOPs per token for one training step: 6 * active parameters
/// (forward + backward matmuls) + 12 * layers * seq * hidden (attention
/// scores and values), the nanoGPT/PaLM estimate, counting only the routed
/// experts for the MoE.
pub fn flops_per_token(cfg: &Config) -> f64 {
    let m = &cfg.model;
    6.0 * active_params_per_token(m) as f64
        + 12.0 * (m.num_layers * cfg.train.seq_len * m.hidden_size) as f64
}

/// Peak FLOP/s of one device: the documented dense bf16 peak for known
/// accelerators; for anything else (CPUs) the best of a few measured
/// 2048^3 f32 matmuls, so MFU there means "fraction of what this machine's
/// XLA matmul reaches".
pub fn device_peak_flops(client: &Client) -> Option<f64> {
    let kind = client
        .devices()
        .first()
        .map(|d| d.kind().to_lowercase())
        .unwrap_or_default();
    let documented = [
        ("tpu v4", 275e12),
        ("h100", 989e12),
        ("h200", 989e12),
        ("a100", 312e12),
    ];
    if let Some((_, peak)) = documented.iter().find(|(k, _)| kind.contains(k)) {
        return Some(*peak);
    }
    match measured_matmul_flops(client) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("could not measure a matmul peak for MFU: {e:#}");
            None
        }
    }
}

fn measured_matmul_flops(client: &Client) -> Result<f64> {
    use crate::graph::{DType, Graph, TensorType};
    let n = 2048i64;
    let g = Graph::new();
    let a = g.param("a", TensorType::new(DType::F32, &[n, n]))?;
    let b = g.param("b", TensorType::new(DType::F32, &[n, n]))?;
    let exe = g.build(&[&a.matmul(&b)?])?.compile(client)?;
    let dev = &client.devices()[0];
    let ones = vec![1f32; (n * n) as usize];
    let (x, y) = (
        client.buffer_from_host(&ones, &[n, n], dev)?,
        client.buffer_from_host(&ones, &[n, n], dev)?,
    );
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        let out = exe.execute(vec![vec![
            crate::runtime::Arg::Borrowed(&x),
            crate::runtime::Arg::Borrowed(&y),
        ]])?;
        out[0][0].to_bytes()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak = 2.0 * (n * n * n) as f64 / best;
    tracing::info!(
        "measured matmul peak {:.1} GFLOP/s per device (for MFU)",
        peak / 1e9
    );
    Ok(peak)
}

pub fn open_client(cfg: &Config, plugin: Option<&Path>) -> Result<Client> {
    let backend: Backend = cfg.run.backend.parse()?;
    let loc = find_plugin(backend, plugin)?;
    let plugin = Plugin::load(&loc.path)?;
    let options = match backend {
        Backend::Cpu => vec![("cpu_device_count", ClientOption::Int(cfg.train.replicas))],
        _ => vec![],
    };
    Ok(Client::new(plugin, &options, None)?)
}

/// Trains `cfg` and returns the final checkpoint directory.
pub fn train(cfg: &Config, start: &StartFrom, plugin: Option<&Path>) -> Result<PathBuf> {
    let run_dir = &cfg.run.dir;
    if run_dir.as_os_str().is_empty() {
        bail!("run.dir is not set (use --set run.dir=runs/NAME)");
    }
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let specs = param_specs(&cfg.model);
    // Without --resume/--init, a run directory that already holds a
    // checkpoint is continued from its newest one (re-running the same
    // command after an interruption picks up where it stopped).
    let resume = start.resume.clone().or_else(|| {
        if start.init.is_none() {
            ckpt::latest(run_dir)
        } else {
            None
        }
    });
    let checkpoint = match (&resume, &start.init) {
        (Some(dir), _) | (None, Some(dir)) => {
            tracing::info!("starting from checkpoint {}", dir.display());
            ckpt::load(dir, &specs).with_context(|| format!("loading {}", dir.display()))?
        }
        (None, None) => fresh_checkpoint(cfg, cfg.train.seed),
    };
    if resume.is_some() && checkpoint.state.config_sha256 != ckpt::sha256_hex(&cfg.to_toml()) {
        tracing::warn!(
            "the config differs from the one the checkpoint was written with; continuing with the new one \
             (the checkpoint's is in its state.json)"
        );
    }
    let at = DataPosition {
        next_batch: checkpoint.state.next_batch,
        stream: checkpoint.state.data_cursor,
    };
    if !cfg.data.parquet.is_empty() && at.stream.is_none() && at.next_batch > 0 {
        tracing::warn!(
            "the checkpoint has no parquet data cursor (it was trained on another source); \
             the parquet stream starts from its beginning"
        );
    }
    let mut batches = Batches::open(cfg, &at)?;
    if let (Some(was), Some(now)) = (
        &checkpoint.state.tokenizer_sha256,
        &batches.tokenizer_sha256,
    ) {
        if was != now {
            bail!(
                "{}: not the tokenizer this run was trained with (sha256 {now}, the checkpoint's is {was}); \
                 the data cursor would point at other tokens",
                cfg.data.tokenizer.display()
            );
        }
    }
    tracing::info!("training data: {}", batches.describe(cfg));
    if checkpoint.state.step >= cfg.train.steps {
        tracing::info!(
            "run already complete: {} of {} steps done",
            checkpoint.state.step,
            cfg.train.steps
        );
        return Ok(resume
            .or(start.init.clone())
            .expect("a loaded checkpoint has a path"));
    }
    let client = open_client(cfg, plugin)?;
    tracing::info!(
        params = crate::model::count_params(&cfg.model),
        replicas = cfg.train.replicas,
        accumulation = cfg.accumulation_steps(),
        "compiling the train step"
    );
    let compile_start = Instant::now();
    let mut trainer = Trainer::new(cfg.clone(), client.clone(), &checkpoint)?;
    tracing::info!(
        "compiled in {:.1}s; starting at step {}",
        compile_start.elapsed().as_secs_f64(),
        trainer.step_count()
    );

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .with_context(|| format!("opening {}", run_dir.join("metrics.jsonl").display()))?;
    let t = &cfg.train;
    let tokens_per_step = t.global_batch * t.seq_len;
    let fpt = flops_per_token(cfg);
    let peak = device_peak_flops(&client).map(|p| p * t.replicas as f64);
    let bar = indicatif::ProgressBar::new(t.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step_count() as u64);
    let mut last_ckpt = None;
    let end = start.until_step.map_or(t.steps, |u| u.min(t.steps));
    while trainer.step_count() < end {
        let step = trainer.step_count();
        let began = Instant::now();
        let rows = batches.next(cfg)?;
        let m = trainer.train_step(&rows)?;
        let dt = began.elapsed().as_secs_f64();
        if !m.ce.is_finite() {
            bail!(
                "step {step}: loss is {} (diverged); last checkpoint: {:?}",
                m.ce,
                last_ckpt
            );
        }
        let tps = tokens_per_step as f64 / dt;
        let val_loss = if t.eval_every > 0
            && (step + 1) % t.eval_every == 0
            && !batches.validation().is_empty()
        {
            Some(evaluate(&trainer, batches.validation())?)
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
            mfu: peak.map(|p| tps * fpt / p),
            val_loss,
        };
        writeln!(metrics, "{}", serde_json::to_string(&row)?)?;
        bar.set_message(format!(
            "loss {:.4} aux {:.3} {:.0} tok/s",
            m.ce, m.aux, tps
        ));
        bar.inc(1);
        let done = trainer.step_count();
        let interrupted = stop.load(Ordering::Relaxed);
        if interrupted || done == end || (t.checkpoint_every > 0 && done % t.checkpoint_every == 0)
        {
            let dir = ckpt::step_dir(run_dir, done);
            ckpt::save(&dir, cfg, &snapshot(&trainer, &batches)?)?;
            tracing::info!("checkpoint {}", dir.display());
            last_ckpt = Some(dir);
        }
        if interrupted {
            bar.abandon_with_message("interrupted: checkpoint written");
            break;
        }
    }
    metrics.flush()?;
    bar.finish();
    match last_ckpt.or_else(|| ckpt::latest(run_dir)) {
        Some(d) => Ok(d),
        None => {
            let dir = ckpt::step_dir(run_dir, trainer.step_count());
            ckpt::save(&dir, cfg, &snapshot(&trainer, &batches)?)?;
            Ok(dir)
        }
    }
}

/// The trainer's state plus where the data stands.
fn snapshot(trainer: &Trainer, batches: &Batches) -> Result<ckpt::Checkpoint> {
    let pos = batches.position();
    let mut c = trainer.checkpoint(pos.next_batch)?;
    c.state.data_cursor = pos.stream;
    c.state.tokenizer_sha256 = batches.tokenizer_sha256.clone();
    Ok(c)
}

/// Mean validation CE over the fixed validation micro-batches.
fn evaluate(trainer: &Trainer, val: &[Vec<Vec<i32>>]) -> Result<f64> {
    let mut total = 0.0;
    for rows in val {
        total += trainer.eval(rows)?.0;
    }
    Ok(total / val.len() as f64)
}

/// Writes the step-0 checkpoint `train --init` starts from.
pub fn write_init(cfg: &Config, out: &Path, seed: u64) -> Result<()> {
    ckpt::save(out, cfg, &fresh_checkpoint(cfg, seed))
}
