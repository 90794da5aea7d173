//! The coordinator: one per job. Owns the run directory (metrics and
//! checkpoints), hands out ranks and the config, runs the start barrier,
//! watches heartbeats and restarts the job from the last checkpoint when a
//! worker is lost.

mod service;
pub mod state;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tonic::Status;

use crate::ckpt::{self, shards};
use crate::model::{count_params, param_specs, ModelConfig, ParamSpec};
use crate::runtime::Backend;
use crate::train::history;
use crate::train::program::StepLayout;
use crate::train::tensorboard::EventWriter;
use crate::train::Config;

use super::auth;
use super::proto::coordinator_server::CoordinatorServer;
use super::proto::{CheckpointHeader, MetricsRow, ShardHeader};
use super::shard_transfer::ShardUpload;
use super::transfer::CheckpointFiles;
pub use service::REDUCE_CHUNK;
use state::{Finished, Phase, State};

/// gRPC messages larger than this are refused (chunks are 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// HTTP/2 flow-control windows, both ends.
pub const WINDOW_BYTES: u32 = 32 << 20;

/// How long an upload waits for rank 0's metrics rows of the steps before
/// it, which travel on another stream.
pub const UPLOAD_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub workers: u32,
    pub listen: SocketAddr,
    pub run_dir: PathBuf,
    pub secret: Option<String>,
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is lost.
    pub heartbeat_timeout: Duration,
    /// Restarts after lost or failed workers before the job fails.
    pub max_restarts: u32,
    /// Checkpoints kept in the run directory (the newest ones).
    pub keep_checkpoints: usize,
    /// Where to write the bound address (for `launch` and scripts).
    pub addr_file: Option<PathBuf>,
    /// Show a progress bar (off in tests).
    pub progress: bool,
}

impl CoordinatorOptions {
    pub fn new(workers: u32, run_dir: PathBuf) -> CoordinatorOptions {
        CoordinatorOptions {
            workers,
            listen: "127.0.0.1:0".parse().expect("valid address"),
            run_dir,
            secret: None,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(5),
            max_restarts: 3,
            keep_checkpoints: 3,
            addr_file: None,
            progress: true,
        }
    }
}

pub struct Job {
    pub job_id: String,
    pub world: u32,
    pub backend: Backend,
    pub config_toml: String,
    pub opts: CoordinatorOptions,
    specs: Vec<ParamSpec>,
    /// The trained parameters' specs (the moments' shapes).
    trained: Vec<ParamSpec>,
    /// What shards are assembled into, and the config.json of the files.
    model: ModelConfig,
    max_positions: i64,
    pub max_checkpoint_bytes: u64,
    pub max_reduce_len: u64,
    total_steps: i64,
    /// metrics.jsonl's rows as TensorBoard scalars.
    events: Mutex<EventWriter>,
    state: Mutex<State>,
    /// Held while a checkpoint is checked and written: one at a time, so
    /// the upload policy still holds when it is installed.
    storing: Mutex<()>,
    tick: watch::Sender<u64>,
    bar: indicatif::ProgressBar,
}

impl Job {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes everything waiting in [`wait_for`](Self::wait_for).
    pub fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    /// Waits until `f` returns a value (re-checked after every change), or
    /// the timeout passes (`Err(())`).
    /// Waits (at most [`UPLOAD_WAIT`]) until rank 0's metrics rows of the
    /// steps before `step` arrived: they travel on their own stream, and a
    /// checkpoint upload may overtake them. The store checks whether they
    /// did. Returns early when the uploader is no longer a member.
    pub async fn wait_for_rows_before(
        &self,
        job_id: &str,
        worker_id: u64,
        attempt: u32,
        step: i64,
    ) {
        let _ = self
            .wait_for(Some(UPLOAD_WAIT), |st| {
                let gone = st.member(job_id, &self.job_id, worker_id, attempt).is_err();
                (gone || st.reached >= step).then_some(())
            })
            .await;
    }

    pub async fn wait_for<T>(
        &self,
        timeout: Option<Duration>,
        mut f: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<T, ()> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut rx = self.tick.subscribe();
        loop {
            if let Some(v) = f(&mut self.lock()) {
                return Ok(v);
            }
            match deadline {
                Some(d) => match tokio::time::timeout_at(d, rx.changed()).await {
                    Ok(r) => r.map_err(|_| ())?,
                    Err(_) => return Err(()),
                },
                None => rx.changed().await.map_err(|_| ())?,
            }
        }
    }

    /// All workers are in: the attempt starts from the newest checkpoint.
    fn start_attempt(&self, st: &mut State) {
        st.phase = Phase::Running;
        st.start = st.latest.clone();
        let step = st.start.as_ref().map_or(0, |c| c.step);
        st.reached = step;
        let now = std::time::Instant::now();
        let a = st.attempt;
        for w in st.workers.values_mut().filter(|w| w.attempt == a) {
            w.last_seen = now;
        }
        // The aborted attempt's steps from `step` on are trained again: drop
        // their rows and events, and write this attempt's events to a new
        // file (the rewind may have replaced the one being appended to).
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let rewound = history::rewind(&self.opts.run_dir, step).and_then(|()| {
            *events = EventWriter::create(&self.opts.run_dir.join(history::EVENTS_DIR))?;
            Ok(())
        });
        if let Err(e) = rewound {
            tracing::warn!("could not rewind the metrics to step {step}: {e:#}");
        }
        drop(events);
        self.bar.set_position(step as u64);
        tracing::info!(
            "attempt {a}: all {} workers in; starting at step {step}{}",
            self.world,
            if step > 0 {
                " from the newest checkpoint"
            } else {
                ""
            }
        );
    }

    fn end_if_all_finished(&self, st: &mut State) {
        let members: Vec<Finished> = st.members().filter_map(|(_, w)| w.finished).collect();
        if members.len() < self.world as usize {
            return;
        }
        let step = st.members().map(|(_, w)| w.step).max().unwrap_or(0);
        if members.contains(&Finished::Preempted) {
            st.end(
                true,
                format!("stopped at step {step} by a preempted worker, checkpoint written; launch again to resume"),
            );
        } else {
            st.end(
                true,
                format!("finished: {step} of {} steps", self.total_steps),
            );
        }
    }

    /// Refuses an upload (by its header) from anyone but rank 0 of the
    /// running attempt, or of a step that cannot become due.
    fn check_uploader(&self, st: &State, h: &CheckpointHeader) -> Result<(), Status> {
        let rank = st
            .member(&h.job_id, &self.job_id, h.worker_id, h.attempt)?
            .rank;
        st.check_upload(rank, h.step, self.total_steps)
    }

    /// The state's tensors: params, and adam_m and adam_v of the trained
    /// ones.
    fn tensor_count(&self) -> usize {
        self.specs.len() + 2 * self.trained.len()
    }

    /// Refuses shards (by their header) from a worker that is not of the
    /// running attempt, or not of the rank it says, or of a step that
    /// cannot become due; and the training state from any rank but 0, or
    /// rank 0's shards without it.
    fn check_shard_sender(&self, st: &State, h: &ShardHeader) -> Result<(), Status> {
        let rank = st
            .member(&h.job_id, &self.job_id, h.worker_id, h.attempt)?
            .rank;
        if rank != h.rank {
            return Err(Status::invalid_argument(format!(
                "shards of step {} say rank {}, but worker {} is rank {rank}",
                h.step, h.rank, h.worker_id
            )));
        }
        match (rank, h.state_json.is_empty()) {
            (0, true) => {
                return Err(Status::invalid_argument(format!(
                    "rank 0's shards of step {} come without the training state (state.json)",
                    h.step
                )))
            }
            (r, false) if r != 0 => {
                return Err(Status::permission_denied(format!(
                    "rank {r} may not send the training state: rank 0 does"
                )))
            }
            _ => {}
        }
        st.check_step(h.step, self.total_steps)
    }

    /// Writes rank 0's checkpoint of the step the job reached, if
    /// `ckpt::verify_files` accepts it for this model, atomically; keeps
    /// the newest K. A refusal leaves the run directory untouched.
    fn store_checkpoint(
        &self,
        from: &CheckpointHeader,
        files: CheckpointFiles,
    ) -> Result<PathBuf, Status> {
        let _one = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        {
            let st = self.lock();
            self.check_uploader(&st, from)?;
            st.check_due(files.step)?;
        }
        self.install_verified(files)
    }

    /// Assembles every rank's shards of the step the job reached (`from`:
    /// the header of the upload that completed them) into one checkpoint,
    /// builds its files and stores them as [`store_checkpoint`] does: the
    /// same verification, the same atomic install. A refusal (a missing,
    /// duplicated or malformed shard, named) leaves the run directory
    /// untouched.
    ///
    /// [`store_checkpoint`]: Self::store_checkpoint
    fn store_shards(
        &self,
        from: &ShardHeader,
        mut parts: BTreeMap<u32, ShardUpload>,
    ) -> Result<PathBuf, Status> {
        let _one = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        let step = from.step;
        {
            let st = self.lock();
            st.member(&from.job_id, &self.job_id, from.worker_id, from.attempt)?;
            st.check_step(step, self.total_steps)?;
            st.check_due(step)?;
        }
        // The header checks made rank 0 send it.
        let state = parts
            .get_mut(&0)
            .and_then(|p| p.state.take())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "checkpoint for step {step}: no training state from rank 0"
                ))
            })?;
        let shards = parts.into_values().flat_map(|p| p.shards).collect();
        let dims = |specs: &[ParamSpec]| -> Vec<(String, Vec<i64>)> {
            specs
                .iter()
                .map(|s| (s.name.clone(), s.dims.clone()))
                .collect()
        };
        let refuse = |e: anyhow::Error| {
            Status::invalid_argument(format!("checkpoint for step {step}: {e:#}"))
        };
        let c =
            shards::assemble_checkpoint(&dims(&self.specs), &dims(&self.trained), state, shards)
                .map_err(refuse)?;
        let files = ckpt::to_files(&self.model, self.max_positions, &c).map_err(refuse)?;
        drop(c);
        self.install_verified(CheckpointFiles { step, files })
    }

    /// The end of every store: `files` verified with `ckpt::verify_files`
    /// for this model and of their header's step, installed atomically,
    /// the newest K kept. The caller holds `storing` and has checked the
    /// sender and the step.
    fn install_verified(&self, files: CheckpointFiles) -> Result<PathBuf, Status> {
        let state =
            ckpt::verify_files(&files.files, &self.specs, ckpt::Purpose::Resume).map_err(|e| {
                Status::invalid_argument(format!("checkpoint for step {}: {e:#}", files.step))
            })?;
        if state.step != files.step {
            return Err(Status::invalid_argument(format!(
                "checkpoint header says step {} but its state.json says {}",
                files.step, state.step
            )));
        }
        let dir = ckpt::step_dir(&self.opts.run_dir, files.step);
        ckpt::install(&dir, &files.files)
            .map_err(|e| Status::internal(format!("writing {}: {e:#}", dir.display())))?;
        match ckpt::prune(&self.opts.run_dir, self.opts.keep_checkpoints, &dir) {
            Ok(removed) => {
                for r in removed {
                    tracing::debug!("removed old checkpoint {}", r.display());
                }
            }
            Err(e) => tracing::warn!("pruning old checkpoints: {e:#}"),
        }
        let mut st = self.lock();
        if st.latest.as_ref().map_or(true, |c| c.step <= files.step) {
            st.latest = Some(Arc::new(files));
        }
        Ok(dir)
    }

    /// Takes rank 0's row of the next step: one JSON object on one line
    /// whose "step" is the message's. Appends it to metrics.jsonl as the
    /// worker wrote it and advances the step reached.
    fn record_metrics(&self, row: &MetricsRow) -> Result<(), Status> {
        if row.json.contains(['\n', '\r']) {
            return Err(Status::invalid_argument(format!(
                "metrics row for step {}: a raw newline or carriage return would split it across lines of metrics.jsonl",
                row.step
            )));
        }
        let value: serde_json::Value = serde_json::from_str(&row.json)
            .map_err(|e| Status::invalid_argument(format!("metrics row is not JSON: {e}")))?;
        if !value.is_object() || value.get("step").and_then(|s| s.as_i64()) != Some(row.step) {
            return Err(Status::invalid_argument(format!(
                "metrics row must be a JSON object with \"step\": {}",
                row.step
            )));
        }
        // The check, the write and the step reached move together.
        let mut st = self.lock();
        let rank = st
            .member(&row.job_id, &self.job_id, row.worker_id, row.attempt)?
            .rank;
        st.check_row(rank, row.step, self.total_steps)?;
        self.log_metrics(row.step, &row.json, &value)
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        st.reached += 1;
        Ok(())
    }

    /// Appends `line` (the row as the worker wrote it, keys in its order)
    /// to metrics.jsonl; `row` is the same parsed.
    fn log_metrics(&self, step: i64, line: &str, row: &serde_json::Value) -> Result<()> {
        let path = self.opts.run_dir.join(history::METRICS_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", line.trim())?;
        {
            let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
            ev.write_row(row)?;
            ev.flush()?;
        }
        self.bar.set_position(step as u64 + 1);
        let get = |k: &str| row.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        self.bar.set_message(format!(
            "loss {:.4} {:.0} tok/s",
            get("loss"),
            get("tokens_per_s")
        ));
        Ok(())
    }
}

/// The newest checkpoint under `run_dir` that verifies, as files (see
/// [`ckpt::resume_point`]).
fn newest_valid(run_dir: &Path, specs: &[ParamSpec]) -> Result<Option<CheckpointFiles>> {
    let found = ckpt::resume_point(run_dir, |dir| {
        let files = ckpt::read_files(dir)?;
        let state = ckpt::verify_files(&files, specs, ckpt::Purpose::Resume)?;
        Ok(CheckpointFiles {
            step: state.step,
            files,
        })
    })?;
    Ok(found.map(|(_, c)| c))
}

/// How the job ended.
#[derive(Debug, Clone)]
pub struct JobEnd {
    pub ok: bool,
    pub message: String,
}

/// Runs the coordinator until the job is over. `bound` receives the
/// address once listening.
pub async fn serve(
    cfg: Config,
    opts: CoordinatorOptions,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<JobEnd> {
    if opts.workers == 0 {
        bail!("--workers must be at least 1");
    }
    auth::check_listen(&opts.listen, &opts.secret)?;
    let replicas = cfg.train.replicas;
    if replicas % opts.workers as i64 != 0 {
        bail!(
            "train.replicas = {replicas} is not divisible by --workers {}: every worker drives train.replicas / workers devices",
            opts.workers
        );
    }
    // The coordinator is the run directory's one writer while it serves.
    let _lock = ckpt::RunLock::acquire(&opts.run_dir, "coordinator")?;
    ckpt::clean_temporaries(&opts.run_dir)?;
    let specs = param_specs(&cfg.model);
    let latest = newest_valid(&opts.run_dir, &specs)?;
    match &latest {
        Some(c) => tracing::info!("resuming from the checkpoint of step {}", c.step),
        None => tracing::info!(
            "no checkpoint in {}: starting from scratch",
            opts.run_dir.display()
        ),
    }
    // Checkpoints newer than the start (ones that failed to verify) are
    // kept aside rather than overwritten when the job reaches their step.
    ckpt::abandon_newer(&opts.run_dir, latest.as_ref().map_or(0, |c| c.step))?;
    let params = count_params(&cfg.model) as u64;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let job_id = format!("{:016x}", rand::random::<u64>());
    tracing::info!(
        "coordinator for job {job_id} listening on {addr}: {} workers, run directory {}",
        opts.workers,
        opts.run_dir.display()
    );
    if let Some(f) = &opts.addr_file {
        let tmp = f.with_extension("tmp");
        fs::write(&tmp, addr.to_string())?;
        fs::rename(&tmp, f)?;
    }
    let bar = crate::train::step_loop::step_bar(cfg.train.steps, opts.progress);
    let (tick, _) = watch::channel(0u64);
    let job = Arc::new(Job {
        job_id,
        world: opts.workers,
        backend: cfg.run.backend,
        config_toml: cfg.to_toml(),
        specs,
        trained: StepLayout::new(&cfg).trainable_specs(),
        model: cfg.model.clone(),
        max_positions: cfg.train.seq_len,
        // params, two moments, headers and JSON.
        max_checkpoint_bytes: 12 * params + (64 << 20),
        // gradients plus a few scalars.
        max_reduce_len: params + 1024,
        total_steps: cfg.train.steps,
        events: Mutex::new(EventWriter::create(
            &opts.run_dir.join(history::EVENTS_DIR),
        )?),
        opts: opts.clone(),
        state: Mutex::new(State::new(latest.map(Arc::new))),
        storing: Mutex::new(()),
        tick,
        bar,
    });
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let server = CoordinatorServer::new(service::Service { job: job.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let svc = tonic::service::interceptor::InterceptedService::new(
        server,
        auth::Check(opts.secret.clone()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            // HTTP/2's default 64 KiB windows cap a stream near 100 MB/s on
            // loopback; checkpoints and all-reduces move hundreds of MB.
            .initial_stream_window_size(Some(WINDOW_BYTES))
            .initial_connection_window_size(Some(WINDOW_BYTES))
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let end = monitor(&job).await;
    let _ = stop_tx.send(());
    // In-flight calls of the finished job may hang on; do not wait for them.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    job.bar.finish_and_clear();
    Ok(end)
}

/// Watches heartbeats until the job is over; then gives the workers a few
/// heartbeats to hear STOP.
async fn monitor(job: &Job) -> JobEnd {
    let period = job.opts.heartbeat_interval / 2;
    loop {
        tokio::time::sleep(period).await;
        let mut st = job.lock();
        if st.phase == Phase::Running {
            let a = st.attempt;
            let lost = st
                .workers
                .iter()
                .filter(|(_, w)| w.attempt == a && w.finished.is_none())
                .find(|(_, w)| w.last_seen.elapsed() > job.opts.heartbeat_timeout)
                .map(|(id, w)| {
                    format!(
                        "worker {id} (rank {}, host {}, pid {}) lost: no heartbeat for {:.1}s",
                        w.rank,
                        w.host,
                        w.pid,
                        w.last_seen.elapsed().as_secs_f64()
                    )
                });
            if let Some(reason) = lost {
                st.restart(reason, job.opts.max_restarts);
                drop(st);
                job.bump();
                continue;
            }
        }
        if let (Phase::Over { ok, message }, Some(since)) = (&st.phase, st.over_since) {
            let everyone_done = st.members().all(|(_, w)| w.finished.is_some());
            if everyone_done
                || since.elapsed() > 2 * job.opts.heartbeat_interval + Duration::from_secs(1)
            {
                return JobEnd {
                    ok: *ok,
                    message: message.clone(),
                };
            }
        }
    }
}
