//! A single-process run: the run directory, where training starts
//! (fresh, `--init`, `--resume` or the run directory's newest checkpoint),
//! the PJRT client, then the shared step loop ([`super::step_loop`]) writing
//! `metrics.jsonl` and checkpoints locally; SIGINT/SIGTERM finish the step,
//! checkpoint and stop cleanly.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::ckpt::{self, Purpose};
use crate::model::param_specs;
use crate::runtime::Client;

use super::batches::{Batches, DataPosition};
use super::client::open_client;
use super::config::Config;
use super::history;
use super::mfu::device_peak_flops;
use super::step_loop::{run_steps, snapshot, LoopOptions, MetricsRow, RunSink};
use super::tensorboard::EventWriter;
use super::trainer::{fresh_checkpoint, initial_state, Trainer};

/// Where training starts from.
#[derive(Clone, Debug, Default)]
pub struct StartFrom {
    /// A checkpoint whose weights start a new run (`sharedmoe init`'s, an
    /// import, a conversion, or another run's): step 0, zero moments.
    pub init: Option<PathBuf>,
    /// A checkpoint to continue exactly.
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) once this many steps are done, before
    /// `train.steps`: runs in chunks on preemptible machines.
    pub until_step: Option<i64>,
}

/// Refuses to continue a checkpoint whose data cursors mean something else
/// under `cfg` (other data shards). Before opening the data.
pub fn check_data_shards(cfg: &Config, state: &ckpt::TrainingState) -> Result<()> {
    if cfg.data.parquet.is_empty() {
        return Ok(());
    }
    if !state.data_cursors.is_empty() && state.data_shards != cfg.data.shards {
        bail!(
            "the checkpoint was written with data.shards = {}; this run has data.shards = {}, and \
             the parquet cursors are per shard (resume with --set data.shards={})",
            state.data_shards,
            cfg.data.shards,
            state.data_shards
        );
    }
    if state.data_cursors.is_empty() && state.next_batch > 0 {
        tracing::warn!(
            "the checkpoint has no parquet data cursor (it was trained on another source); \
             the parquet stream starts from its beginning"
        );
    }
    Ok(())
}

/// Refuses a tokenizer other than the one the checkpoint's cursors count
/// tokens of. After opening the data.
pub fn check_tokenizer(cfg: &Config, state: &ckpt::TrainingState, batches: &Batches) -> Result<()> {
    match &batches.tokenizer_sha256 {
        Some(now) => state.check_tokenizer(
            &cfg.data.tokenizer,
            now,
            "the data cursor would point at other tokens",
        ),
        None => Ok(()),
    }
}

/// Trains `cfg` and returns the final checkpoint directory.
pub fn train(cfg: &Config, start: &StartFrom, plugin: Option<&Path>) -> Result<PathBuf> {
    super::memory::check_host_memory(cfg, cfg.train.replicas)?;
    let run_dir = &cfg.run.dir;
    if run_dir.as_os_str().is_empty() {
        bail!("run.dir is not set (use --set run.dir=runs/NAME)");
    }
    // One writer per run directory, held until this function returns.
    let _lock = ckpt::RunLock::acquire(run_dir, "train")?;
    ckpt::clean_temporaries(run_dir)?;
    let (from, checkpoint, mut batches) = prepare_start(cfg, start)?;
    if checkpoint.state.step >= cfg.train.steps {
        tracing::info!(
            "run already complete: {} of {} steps done",
            checkpoint.state.step,
            cfg.train.steps
        );
        return Ok(from.expect("a loaded checkpoint has a path"));
    }
    let client = open_client(cfg, plugin)?;
    let mut trainer = compile_trainer(cfg, &client, checkpoint)?;
    let mut sink = LocalSink::open(cfg)?;
    let opts = LoopOptions {
        end: start
            .until_step
            .map_or(cfg.train.steps, |u| u.min(cfg.train.steps)),
        peak_flops: device_peak_flops(&client).map(|p| p * cfg.train.replicas as f64),
        progress: true,
        started_from: from.as_ref().map(|d| d.display().to_string()),
    };
    run_steps(cfg, &mut trainer, &mut batches, &mut sink, &opts)?;
    sink.metrics.flush()?;
    sink.events.flush()?;
    match sink.last.or_else(|| ckpt::latest(run_dir)) {
        Some(d) => Ok(d),
        None => {
            let dir = ckpt::step_dir(run_dir, trainer.step_count());
            let state = snapshot(&trainer, &batches)?;
            ckpt::save(&dir, &cfg.model, cfg.train.seq_len, &state)?;
            Ok(dir)
        }
    }
}

/// Where the run starts (see [`starting_point`]) with the run directory's
/// history rewound to it, and the data opened at its position.
fn prepare_start(
    cfg: &Config,
    start: &StartFrom,
) -> Result<(Option<PathBuf>, ckpt::Checkpoint, Batches)> {
    let run_dir = &cfg.run.dir;
    let (from, checkpoint) = starting_point(cfg, start, &param_specs(&cfg.model))?;
    let resumed = start.init.is_none() && from.is_some();
    if resumed && checkpoint.state.config_sha256 != ckpt::sha256_hex(&cfg.to_toml()) {
        tracing::warn!(
            "the config differs from the one the checkpoint was written with; continuing with the new one \
             (the checkpoint's is in its state.json)"
        );
    }
    // From here on the run writes steps after the start: the history past
    // it is moved aside (checkpoints) or dropped (metrics, re-trained).
    let step = checkpoint.state.step;
    ckpt::abandon_newer(run_dir, step)?;
    history::rewind(run_dir, step)?;
    check_data_shards(cfg, &checkpoint.state)?;
    let at = DataPosition::from_state(&checkpoint.state);
    let batches = Batches::open(cfg, &at, 0..cfg.train.replicas)?;
    check_tokenizer(cfg, &checkpoint.state, &batches)?;
    tracing::info!("training data: {}", batches.describe(cfg));
    Ok((from, checkpoint, batches))
}

/// The trainer with `checkpoint` on the devices (consumed: the host copy,
/// 12 bytes per parameter, would only sit in memory beside it).
fn compile_trainer(cfg: &Config, client: &Client, checkpoint: ckpt::Checkpoint) -> Result<Trainer> {
    super::memory::check_device_memory(cfg, client)?;
    tracing::info!(
        params = crate::model::count_params(&cfg.model),
        replicas = cfg.train.replicas,
        accumulation = cfg.accumulation_steps(),
        "compiling the train step"
    );
    let compile_start = Instant::now();
    let trainer = Trainer::new(cfg.clone(), client.clone(), &checkpoint)?;
    tracing::info!(
        "compiled in {:.1}s; starting at step {}",
        compile_start.elapsed().as_secs_f64(),
        trainer.step_count()
    );
    Ok(trainer)
}

/// The checkpoint a run starts from and its directory: `--resume` (which
/// must verify, optimizer included), `--init` (weights), else the newest
/// checkpoint of the run directory that verifies (newer ones that do not
/// are reported and left in place), else a fresh state.
fn starting_point(
    cfg: &Config,
    start: &StartFrom,
    specs: &[crate::model::ParamSpec],
) -> Result<(Option<PathBuf>, ckpt::Checkpoint)> {
    let load = |dir: &Path, purpose| {
        tracing::info!("starting from checkpoint {}", dir.display());
        ckpt::load(dir, specs, purpose).with_context(|| format!("loading {}", dir.display()))
    };
    if let Some(dir) = &start.resume {
        return Ok((Some(dir.clone()), load(dir, Purpose::Resume)?));
    }
    if let Some(dir) = &start.init {
        // A new run from the checkpoint's weights: step 0, the data from
        // its start, moments of zero (whatever step and optimizer state the
        // checkpoint had; its seed is kept, as `init --seed` sets it).
        let c = load(dir, Purpose::Weights)?;
        let weights = ckpt::Checkpoint {
            params: c.params,
            adam_m: vec![],
            adam_v: vec![],
            state: initial_state(cfg, c.state.seed),
        };
        return Ok((Some(dir.clone()), weights));
    }
    let resume = ckpt::resume_point(&cfg.run.dir, |d| ckpt::load(d, specs, Purpose::Resume))?;
    if let Some((dir, c)) = resume {
        tracing::info!("starting from checkpoint {}", dir.display());
        return Ok((Some(dir), c));
    }
    Ok((None, fresh_checkpoint(cfg, cfg.train.seed)))
}

/// A single-process run's results: `metrics.jsonl` and checkpoints in the
/// run directory; signals ask it to stop.
struct LocalSink<'a> {
    cfg: &'a Config,
    run_dir: &'a Path,
    metrics: std::fs::File,
    /// The same rows as TensorBoard scalars.
    events: EventWriter,
    stop: Arc<AtomicBool>,
    last: Option<PathBuf>,
}

impl<'a> LocalSink<'a> {
    /// Appends to the run directory's metrics.jsonl and TensorBoard events;
    /// SIGINT/SIGTERM ask the loop to checkpoint and stop.
    fn open(cfg: &'a Config) -> Result<LocalSink<'a>> {
        let run_dir = &cfg.run.dir;
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
        }
        let metrics_path = run_dir.join(history::METRICS_FILE);
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        Ok(LocalSink {
            cfg,
            run_dir,
            metrics,
            events: EventWriter::create(&run_dir.join(history::EVENTS_DIR))?,
            stop,
            last: None,
        })
    }
}

impl RunSink for LocalSink<'_> {
    fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        writeln!(self.metrics, "{}", serde_json::to_string(row)?)?;
        self.events.write_row(&serde_json::to_value(row)?)?;
        // Through to the file every step, as metrics.jsonl is: a killed
        // run keeps the events of its steps up to the kill.
        self.events.flush()
    }

    fn checkpoint(&mut self, trainer: &Trainer, batches: &Batches) -> Result<String> {
        let dir = ckpt::step_dir(self.run_dir, trainer.step_count());
        ckpt::save(
            &dir,
            &self.cfg.model,
            self.cfg.train.seq_len,
            &snapshot(trainer, batches)?,
        )?;
        let shown = dir.display().to_string();
        self.last = Some(dir);
        Ok(shown)
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn abort(&self) -> Option<String> {
        None
    }
}

/// Writes the step-0 checkpoint `train --init` starts from.
pub fn write_init(cfg: &Config, out: &Path, seed: u64) -> Result<()> {
    ckpt::save(
        out,
        &cfg.model,
        cfg.train.seq_len,
        &fresh_checkpoint(cfg, seed),
    )
}
