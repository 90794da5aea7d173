//! A worker: one per host. Registers with the coordinator, builds its PJRT
//! client and the compiled step for its local devices, reads its data
//! shard and trains; rank 0 streams metrics, and every rank sends its
//! shards of each checkpoint, which the coordinator assembles. When another
//! worker is lost the attempt is aborted and the worker registers again for
//! the restart; SIGTERM (preemption) finishes the step, lets the ranks
//! write a checkpoint and exits 0.
//!
//! Only the CPU (and single-node CUDA) path restarts in the same process.
//! On TPU and multi-node GPU a worker whose attempt aborts or fails exits
//! with [`EXIT_RESTART`] instead ([`restarts_in_process`]): the survivors
//! of a lost host are stuck inside a collective that will never complete,
//! and neither libtpu nor the CUDA plugin (nor JAX) supports a second
//! multi-host client in one process. Its supervisor starts a fresh process,
//! which registers for the next attempt: `launch --local` restarts dead
//! workers, the JobSet (deploy/gke) restarts the pods; on TPU VMs started
//! by deploy/tpu-pod.sh the worker must run under a loop or a systemd unit
//! that starts it again on exit status 75.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;
use tokio::runtime::Runtime;
use tokio_stream::StreamExt;
use tonic::Code;

use super::client::{connect, Client, Session};
use super::host_sum::HostSum;
use super::kv::CoordinatorKv;
use super::proto::*;
use super::shard_transfer::{self, ShardUpload};
use super::transfer::{self, CheckpointFiles, Receiver};
use crate::ckpt::shards::Shard;
use crate::ckpt::{self, Checkpoint, TrainingState};
use crate::data::stream::Cursor;
use crate::model::param_specs;
use crate::runtime::{Backend, Client as PjrtClient};
use crate::train::batches::{Batches, DataPosition};
use crate::train::client::{open_job_client, JobMember};
use crate::train::memory::{check_device_memory, check_host_memory};
use crate::train::mfu::device_peak_flops;
use crate::train::placement::Placement;
use crate::train::run::{check_data_shards, check_tokenizer};
use crate::train::step_loop::{
    run_steps, snapshot_state, Diverged, LoopEnd, LoopOptions, MetricsRow, RunSink,
};
use crate::train::trainer::fresh_checkpoint;
use crate::train::{Config, Trainer};

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub secret: Option<String>,
    pub plugin: Option<PathBuf>,
    /// This host's backend: must be the job's.
    pub backend: Backend,
    /// -1: any rank.
    pub want_rank: i32,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    pub progress: bool,
}

/// How a worker process ends.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkerExit {
    Finished,
    Preempted,
    /// The coordinator ended the job (see its log for why).
    Stopped {
        ok: bool,
        reason: String,
    },
    /// The attempt aborted or failed on a backend that cannot start another
    /// in this process: exit with [`EXIT_RESTART`] for the supervisor to
    /// start a fresh worker.
    Restart {
        reason: String,
    },
}

/// The exit status of a worker that wants a fresh process
/// ([`WorkerExit::Restart`]; EX_TEMPFAIL).
pub const EXIT_RESTART: i32 = 75;

/// How long a worker told to abort (on a backend that exits instead of
/// restarting in process) waits for its training thread to come back
/// before it ends the process itself: a thread stuck in a collective whose
/// peer is gone never does.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Whether a worker may start the next attempt in this process (with a new
/// PJRT client) after an attempt aborted or failed. The CPU plugin's
/// clients are per process and its multi-process path sums through the
/// coordinator: yes. libtpu, and the CUDA plugin across nodes, join one
/// multi-host client whose collectives may be stuck: no, the process exits
/// and is started again.
pub fn restarts_in_process(backend: Backend, num_nodes: i64) -> bool {
    match backend {
        Backend::Cpu => true,
        Backend::Cuda => num_nodes <= 1,
        Backend::Tpu => false,
    }
}

/// What the heartbeat task tells the training thread.
#[derive(Default)]
struct Signals {
    abort: AtomicBool,
    stop: AtomicBool,
    stop_ok: AtomicBool,
    reason: Mutex<String>,
    step: AtomicI64,
}

/// How the job ended, when `e` refuses a request because it is over (the
/// coordinator's typed [`Refusal`] detail; the message is only for logs).
pub fn job_over(e: &tonic::Status) -> Option<JobOver> {
    if e.code() != Code::FailedPrecondition || e.details().is_empty() {
        return None;
    }
    match Refusal::decode(e.details()).ok()?.reason? {
        refusal::Reason::JobOver(over) => Some(over),
    }
}

pub fn run_worker(opts: &WorkerOptions) -> Result<WorkerExit> {
    let backend = opts.backend;
    let rt = Runtime::new().context("starting the async runtime")?;
    let client = {
        let _guard = rt.enter();
        connect(&opts.coordinator, opts.secret.as_deref())?
    };
    let sigterm = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, sigterm.clone()).context("installing signal handlers")?;
    }
    loop {
        let reg = match rt.block_on(register(client.clone(), opts, &sigterm))? {
            Some(r) => r,
            None => return Ok(WorkerExit::Preempted), // signalled while waiting
        };
        let session = Session {
            job_id: reg.job_id.clone(),
            worker_id: reg.worker_id,
            attempt: reg.attempt,
            rank: reg.rank,
            world: reg.world,
        };
        tracing::info!(
            "rank {} of {} (attempt {}), starting at step {}",
            reg.rank,
            reg.world,
            reg.attempt,
            reg.start_step
        );
        let signals = Arc::new(Signals::default());
        let in_process = restarts_in_process(backend, reg.world as i64);
        let beat = rt.spawn(heartbeats(
            client.clone(),
            session.clone(),
            signals.clone(),
            Duration::from_millis(reg.heartbeat_interval_ms.max(50) as u64),
            (!in_process).then_some(ABORT_GRACE),
        ));
        let result = run_attempt(&rt, &client, &session, &reg, &signals, &sigterm, opts);
        beat.abort();
        let ended = AttemptEnd {
            rt: &rt,
            client: &client,
            session: &session,
            signals: &signals,
            in_process,
        };
        if let Some(exit) = ended.conclude(result)? {
            return Ok(exit);
        }
        if sigterm.load(Ordering::Relaxed) {
            return Ok(WorkerExit::Preempted);
        }
    }
}

/// An attempt that has ended, to report to the coordinator and to turn
/// into the worker's exit (or another attempt).
struct AttemptEnd<'a> {
    rt: &'a Runtime,
    client: &'a Client,
    session: &'a Session,
    signals: &'a Signals,
    /// Whether the next attempt may start in this process
    /// ([`restarts_in_process`]).
    in_process: bool,
}

impl AttemptEnd<'_> {
    /// Reports how the attempt ended; the worker's exit, or `None` to
    /// register for the next attempt.
    fn conclude(&self, result: Result<LoopEnd>) -> Result<Option<WorkerExit>> {
        let (signals, attempt) = (self.signals, self.session.attempt);
        let step = signals.step.load(Ordering::Relaxed);
        let reason = || signals.reason.lock().map(|r| r.clone()).unwrap_or_default();
        match result {
            Ok(LoopEnd::Reached) => {
                self.finish(Outcome::Finished, step, String::new())
                    .context("reporting the finish")?;
                Ok(Some(WorkerExit::Finished))
            }
            Ok(LoopEnd::Stopped) => {
                self.finish(Outcome::Preempted, step, String::new())
                    .context("reporting the stop")?;
                Ok(Some(WorkerExit::Preempted))
            }
            Err(e) if signals.stop.load(Ordering::Relaxed) => {
                tracing::info!("the coordinator ended the job ({e:#})");
                Ok(Some(WorkerExit::Stopped {
                    ok: signals.stop_ok.load(Ordering::Relaxed),
                    reason: reason(),
                }))
            }
            Err(e) if signals.abort.load(Ordering::Relaxed) => {
                let why = reason();
                tracing::debug!("the attempt ended with: {e:#}");
                if !self.in_process {
                    return Ok(Some(WorkerExit::Restart {
                        reason: format!("attempt {attempt} aborted ({why})"),
                    }));
                }
                tracing::warn!("attempt {attempt} aborted ({why}); registering again");
                Ok(None)
            }
            Err(e) if e.downcast_ref::<Diverged>().is_some() => {
                // Ends the job: every restart would diverge the same way.
                if let Err(s) = self.finish(Outcome::Diverged, step, format!("{e:#}")) {
                    tracing::debug!("could not report the divergence: {s}");
                }
                Err(e)
            }
            Err(e) => {
                tracing::error!("attempt {attempt} failed at step {step}: {e:#}");
                // Tell the coordinator (it restarts or ends the job); if it
                // is unreachable, registering again finds out.
                if let Err(s) = self.finish(Outcome::Failed, step, format!("{e:#}")) {
                    tracing::debug!("could not report the failure: {s}");
                }
                if !self.in_process {
                    return Ok(Some(WorkerExit::Restart {
                        reason: format!("attempt {attempt} failed at step {step}"),
                    }));
                }
                Ok(None)
            }
        }
    }

    /// Tells the coordinator this worker is done with the attempt.
    fn finish(&self, outcome: Outcome, step: i64, message: String) -> Result<(), tonic::Status> {
        let s = self.session;
        let req = FinishRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
            outcome: outcome as i32,
            step,
            message,
        };
        self.rt.block_on(self.client.clone().finish(req))?;
        Ok(())
    }
}

/// Registers (retrying while the coordinator is unreachable); `None` when
/// a signal arrived while waiting.
async fn register(
    mut client: Client,
    opts: &WorkerOptions,
    sigterm: &AtomicBool,
) -> Result<Option<RegisterReply>> {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let began = Instant::now();
    let mut warned = false;
    loop {
        if sigterm.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let req = RegisterRequest {
            host: host.clone(),
            backend: opts.backend.to_string(),
            local_devices: 0,
            pid: std::process::id(),
            want_rank: opts.want_rank,
        };
        let call = client.register(req);
        let outcome = tokio::select! {
            r = call => r,
            _ = wait_for_flag(sigterm) => return Ok(None),
        };
        match outcome {
            Ok(r) => return Ok(Some(r.into_inner())),
            Err(e) if job_over(&e).is_some() => bail!("{}", e.message()),
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled
                ) =>
            {
                if began.elapsed() > opts.connect_timeout {
                    bail!(
                        "could not join the job at {} within {:?}: {}",
                        opts.coordinator,
                        opts.connect_timeout,
                        e.message()
                    );
                }
                if !warned && e.code() == Code::Unavailable {
                    tracing::info!(
                        "waiting for the coordinator at {} ({})",
                        opts.coordinator,
                        e.message()
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("registering with {}: {}", opts.coordinator, e.message()),
        }
    }
}

async fn wait_for_flag(flag: &AtomicBool) {
    while !flag.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises `abort` with `reason`. With `exit_after`, also ends the process
/// with [`EXIT_RESTART`] once that grace has passed, in case the training
/// thread never comes back to see the flag (stuck in a collective).
fn raise_abort(signals: &Signals, reason: String, exit_after: Option<Duration>) {
    *signals.reason.lock().expect("not poisoned") = reason.clone();
    signals.abort.store(true, Ordering::Relaxed);
    if let Some(grace) = exit_after {
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            tracing::error!(
                "the attempt was aborted ({reason}) and training has not stopped within {grace:?} \
                 (stuck in a collective): exiting with status {EXIT_RESTART} for a fresh process"
            );
            // _exit: the plugin's threads may be blocked; running its static
            // destructors (exit) could hang.
            // SAFETY: ends the process; nothing runs after it.
            unsafe { libc::_exit(EXIT_RESTART) };
        });
    }
}

/// Sends heartbeats; raises `abort` when told to or when the coordinator
/// has not answered for a few intervals (see [`raise_abort`] for
/// `exit_after`).
async fn heartbeats(
    mut client: Client,
    s: Session,
    signals: Arc<Signals>,
    every: Duration,
    exit_after: Option<Duration>,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let req = HeartbeatRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
            step: signals.step.load(Ordering::Relaxed),
        };
        match client.heartbeat(req).await {
            Ok(r) => {
                last_ok = Instant::now();
                let r = r.into_inner();
                match Command::try_from(r.command).unwrap_or(Command::Continue) {
                    Command::Abort => {
                        raise_abort(&signals, r.reason, exit_after);
                        return;
                    }
                    Command::Stop => {
                        signals.stop_ok.store(r.job_ok, Ordering::Relaxed);
                        *signals.reason.lock().expect("not poisoned") = r.reason;
                        signals.stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    _ => {}
                }
            }
            Err(e) => {
                tracing::debug!("heartbeat: {e}");
                if e.code() != Code::Unavailable && e.code() != Code::Unknown {
                    raise_abort(&signals, e.message().to_string(), exit_after);
                    return;
                }
                if last_ok.elapsed() > every * 10 {
                    let reason = format!(
                        "coordinator unreachable for {:.1}s",
                        last_ok.elapsed().as_secs_f64()
                    );
                    raise_abort(&signals, reason, exit_after);
                    return;
                }
            }
        }
    }
}

/// Downloads the checkpoint the attempt starts from.
async fn fetch_checkpoint(mut client: Client, s: &Session) -> Result<CheckpointFiles> {
    let mut stream = client
        .fetch_checkpoint(FetchCheckpointRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
        })
        .await
        .context("fetching the start checkpoint")?
        .into_inner();
    let mut rx = Receiver::new(u64::MAX);
    while let Some(c) = stream.next().await {
        rx.push(c.context("fetching the start checkpoint")?)?;
    }
    Ok(rx.finish()?)
}

/// One attempt: from registration to the end of training (or an error).
fn run_attempt(
    rt: &Runtime,
    client: &Client,
    s: &Session,
    reg: &RegisterReply,
    signals: &Arc<Signals>,
    sigterm: &Arc<AtomicBool>,
    opts: &WorkerOptions,
) -> Result<LoopEnd> {
    let attempt = Attempt {
        rt,
        client,
        session: s,
        reg,
        signals,
        sigterm,
        opts,
    };
    attempt.run()
}

/// What the stages of one attempt share: the coordinator and this
/// worker's place in the attempt.
struct Attempt<'a> {
    rt: &'a Runtime,
    client: &'a Client,
    session: &'a Session,
    reg: &'a RegisterReply,
    /// From the heartbeat task: abort or stop.
    signals: &'a Arc<Signals>,
    /// This worker's SIGTERM/SIGINT: its vote to stop the job.
    sigterm: &'a Arc<AtomicBool>,
    opts: &'a WorkerOptions,
}

impl Attempt<'_> {
    fn run(&self) -> Result<LoopEnd> {
        let cfg = Config::parse(&self.reg.config_toml, &[]).context("the job's config")?;
        let world = self.session.world as i64;
        let local = cfg.train.replicas / world;
        check_host_memory(&cfg, local)?;
        let start = self.start_checkpoint(&cfg)?;
        self.signals.step.store(start.state.step, Ordering::Relaxed);
        check_data_shards(&cfg, &start.state)?;
        let devices = self.open_devices(&cfg, local)?;
        // The CPU plugin's processes cannot join one XLA program: each runs
        // its share of the replicas and gradients are summed through the
        // coordinator. Accelerator clients are multi-host (libtpu's topology
        // discovery, the CUDA plugin through the key-value store): one
        // program spans every chip of the job and XLA's collectives sum.
        let host_sum = world > 1 && cfg.run.backend == Backend::Cpu;
        let mut batches = self.open_batches(&cfg, &devices, &start, local, host_sum)?;
        let began = Instant::now();
        let (mut trainer, agreed) = self.build_trainer(&cfg, &devices, &start, host_sum)?;
        // The state lives on the devices now; the host copy (12 bytes per
        // parameter) would only sit in memory beside it.
        drop(start);
        tracing::info!("compiled in {:.1}s", began.elapsed().as_secs_f64());
        // Everyone compiled: the first step's time is the step's.
        self.barrier("compiled").context("the start barrier")?;
        self.train(&cfg, &devices, &mut trainer, &mut batches, agreed)
    }

    /// The checkpoint the attempt starts from: the job's (downloaded), or
    /// a fresh one when it has none yet.
    fn start_checkpoint(&self, cfg: &Config) -> Result<Checkpoint> {
        if !self.reg.has_checkpoint {
            return Ok(fresh_checkpoint(cfg, cfg.train.seed));
        }
        let files = self
            .rt
            .block_on(fetch_checkpoint(self.client.clone(), self.session))?;
        ckpt::from_files(
            &files.files,
            &param_specs(&cfg.model),
            ckpt::Purpose::Resume,
        )
        .context("the start checkpoint")
    }

    /// This host's PJRT client, as member of the job (multi-host
    /// initialisation goes through the coordinator's key-value store), with
    /// `local` devices.
    fn open_devices(&self, cfg: &Config, local: i64) -> Result<PjrtClient> {
        let s = self.session;
        let member = JobMember {
            node_id: s.rank as i64,
            num_nodes: s.world as i64,
            kv: Arc::new(CoordinatorKv {
                rt: self.rt.handle().clone(),
                client: self.client.clone(),
                session: s.clone(),
            }),
        };
        let devices = open_job_client(cfg, self.opts.plugin.as_deref(), local, Some(member))?;
        check_device_memory(cfg, &devices)?;
        Ok(devices)
    }

    /// This worker's data: the shards of its replicas, from where `start`
    /// left off. With `host_sum` the replicas are this rank's `local` in
    /// rank order; otherwise the job's placement says which are on this
    /// host's devices.
    fn open_batches(
        &self,
        cfg: &Config,
        devices: &PjrtClient,
        start: &Checkpoint,
        local: i64,
        host_sum: bool,
    ) -> Result<Batches> {
        let rank = self.session.rank as i64;
        let replicas = if host_sum {
            rank * local..(rank + 1) * local
        } else {
            let r = Placement::job(devices, cfg.train.replicas as usize)?.local;
            r.start as i64..r.end as i64
        };
        let batches = Batches::open(cfg, &DataPosition::from_state(&start.state), replicas)?;
        check_tokenizer(cfg, &start.state, &batches)?;
        Ok(batches)
    }

    /// The compiled trainer, and the flag raised when the job agreed to
    /// stop (some worker's SIGTERM).
    fn build_trainer(
        &self,
        cfg: &Config,
        devices: &PjrtClient,
        start: &Checkpoint,
        host_sum: bool,
    ) -> Result<(Trainer, Arc<AtomicBool>)> {
        if host_sum {
            // The stop vote travels in the host all-reduce.
            let sum = HostSum::new(
                self.rt.handle().clone(),
                self.client.clone(),
                self.session.clone(),
                self.sigterm.clone(),
            );
            let agreed = sum.agreed.clone();
            let trainer =
                Trainer::across_processes(cfg.clone(), devices.clone(), start, Box::new(sum))?;
            return Ok((trainer, agreed));
        }
        // One program over every chip of the job: a SIGTERM here is a vote
        // summed inside the step, so all hosts stop after the same step.
        let mut trainer = Trainer::new(cfg.clone(), devices.clone(), start)?;
        trainer.set_stop_vote(self.sigterm.clone());
        Ok((trainer, Arc::new(AtomicBool::new(false))))
    }

    /// Waits until every worker of the attempt has reached barrier `name`.
    fn barrier(&self, name: &str) -> Result<()> {
        let s = self.session;
        self.rt
            .block_on(self.client.clone().barrier(BarrierRequest {
                job_id: s.job_id.clone(),
                worker_id: s.worker_id,
                attempt: s.attempt,
                name: name.into(),
                timeout_ms: 0,
            }))?;
        Ok(())
    }

    /// Trains to the job's last step, or until stopped or aborted; rank 0
    /// streams the metrics rows to the coordinator meanwhile.
    fn train(
        &self,
        cfg: &Config,
        devices: &PjrtClient,
        trainer: &mut Trainer,
        batches: &mut Batches,
        agreed: Arc<AtomicBool>,
    ) -> Result<LoopEnd> {
        let (s, rank0) = (self.session, self.session.rank == 0);
        let mut sink = WorkerSink {
            rt: self.rt,
            client: self.client.clone(),
            session: s.clone(),
            signals: self.signals.clone(),
            agreed,
            metrics: rank0.then(|| MetricsStream::open(self.rt, self.client.clone(), s.clone())),
        };
        // Only rank 0 reports metrics, so only it measures the peak for MFU.
        let peak = if rank0 {
            device_peak_flops(devices).map(|p| p * cfg.train.replicas as f64)
        } else {
            None
        };
        let reg = self.reg;
        let end = run_steps(
            cfg,
            trainer,
            batches,
            &mut sink,
            &LoopOptions {
                end: cfg.train.steps,
                peak_flops: peak,
                progress: self.opts.progress && rank0,
                started_from: reg
                    .has_checkpoint
                    .then(|| format!("the job's checkpoint of step {}", reg.start_step)),
            },
        );
        if let Some(m) = sink.metrics.take() {
            if let Err(e) = m.close(self.rt) {
                tracing::warn!("metrics stream: {e:#}");
            }
        }
        end
    }
}

/// Rank 0's metrics rows, streamed to the coordinator in the background.
struct MetricsStream {
    tx: tokio::sync::mpsc::UnboundedSender<MetricsRow>,
    task: tokio::task::JoinHandle<Result<(), tonic::Status>>,
}

impl MetricsStream {
    fn open(rt: &Runtime, mut client: Client, s: Session) -> MetricsStream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<MetricsRow>();
        let rows = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |row| {
            super::proto::MetricsRow {
                job_id: s.job_id.clone(),
                worker_id: s.worker_id,
                attempt: s.attempt,
                step: row.step,
                json: serde_json::to_string(&row).expect("metrics rows serialise"),
            }
        });
        let task = rt.spawn(async move { client.report_metrics(rows).await.map(|_| ()) });
        MetricsStream { tx, task }
    }

    fn close(self, rt: &Runtime) -> Result<()> {
        drop(self.tx);
        rt.block_on(self.task)??;
        Ok(())
    }
}

struct WorkerSink<'a> {
    rt: &'a Runtime,
    client: Client,
    session: Session,
    signals: Arc<Signals>,
    /// Some worker asked to stop (SIGTERM), agreed through the all-reduce.
    agreed: Arc<AtomicBool>,
    metrics: Option<MetricsStream>,
}

impl WorkerSink<'_> {
    /// Sends this rank's `shards` of the checkpoint of `step` (rank 0 with
    /// the training state); returns once the coordinator has assembled and
    /// written the checkpoint from every rank's shards: its directory.
    fn upload_shards(
        &self,
        step: i64,
        state: Option<TrainingState>,
        shards: Vec<Shard>,
    ) -> Result<String> {
        let s = &self.session;
        let from = transfer::Sender {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
        };
        let up = ShardUpload {
            step,
            rank: s.rank,
            state,
            shards,
        };
        let chunks = shard_transfer::chunks(&from, &up)?;
        drop(up);
        let reply = self
            .rt
            .block_on(
                self.client
                    .clone()
                    .upload_shards(tokio_stream::iter(chunks)),
            )
            .with_context(|| format!("uploading rank {}'s shards of step {step}", s.rank))?
            .into_inner();
        Ok(reply.path)
    }

    fn kv_put(&self, key: String, value: Vec<u8>) -> Result<()> {
        let s = &self.session;
        self.rt.block_on(self.client.clone().kv_put(KvPutRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
            key,
            value,
        }))?;
        Ok(())
    }

    fn kv_get(&self, key: String) -> Result<Vec<u8>> {
        let s = &self.session;
        Ok(self
            .rt
            .block_on(self.client.clone().kv_get(KvGetRequest {
                job_id: s.job_id.clone(),
                worker_id: s.worker_id,
                attempt: s.attempt,
                key: key.clone(),
                timeout_ms: 600_000,
            }))
            .with_context(|| format!("waiting for `{key}`"))?
            .into_inner()
            .value)
    }
}

impl RunSink for WorkerSink<'_> {
    fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        self.signals.step.store(row.step + 1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.tx.send(row.clone())
                .map_err(|_| anyhow!("the metrics stream closed"))?;
        }
        Ok(())
    }

    fn checkpoint(&mut self, trainer: &Trainer, batches: &Batches) -> Result<String> {
        let step = trainer.step_count();
        let s = &self.session;
        // Every worker's data cursors (its shards') go to rank 0 through the
        // key-value store; rank 0 sends the training state with all of them.
        let mine = batches.position().streams;
        self.kv_put(
            format!("cursors/{step}/{}", s.rank),
            serde_json::to_vec(&mine)?,
        )?;
        let state = if s.rank == 0 {
            let mut state = snapshot_state(trainer, batches);
            for r in 1..s.world {
                let theirs: BTreeMap<u32, Cursor> =
                    serde_json::from_slice(&self.kv_get(format!("cursors/{step}/{r}"))?)
                        .with_context(|| format!("rank {r}'s data cursors"))?;
                state.data_cursors.extend(theirs);
            }
            Some(state)
        } else {
            None
        };
        // Each rank reads and sends only its share of the state's blocks.
        let shards = trainer.owned_shards(s.rank as usize, s.world as usize)?;
        let path = self.upload_shards(step, state, shards)?;
        // Only rank 0 reports where the checkpoint is, as before.
        Ok(if s.rank == 0 { path } else { String::new() })
    }

    fn stop_requested(&self) -> bool {
        self.agreed.load(Ordering::Relaxed)
    }

    fn abort(&self) -> Option<String> {
        if self.signals.abort.load(Ordering::Relaxed) || self.signals.stop.load(Ordering::Relaxed) {
            return Some(
                self.signals
                    .reason
                    .lock()
                    .map(|r| r.clone())
                    .unwrap_or_default(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cpu_and_single_node_cuda_restart_in_process() {
        for nodes in [1, 2, 4] {
            assert!(restarts_in_process(Backend::Cpu, nodes), "cpu x{nodes}");
            assert!(!restarts_in_process(Backend::Tpu, nodes), "tpu x{nodes}");
        }
        assert!(restarts_in_process(Backend::Cuda, 1));
        assert!(!restarts_in_process(Backend::Cuda, 2));
        assert!(!restarts_in_process(Backend::Cuda, 8));
    }

    #[test]
    fn the_job_is_over_by_its_typed_detail_not_its_message() {
        use crate::dist::coordinator::state::{Phase, State};
        let mut st = State::new(None);
        assert!(st.phase.refuse_if_over().is_ok());
        for ok in [true, false] {
            st.phase = Phase::Over {
                ok,
                message: "why".into(),
            };
            let e = st.phase.refuse_if_over().unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition);
            let message = "why".to_string();
            assert_eq!(job_over(&e), Some(JobOver { ok, message }));
        }
        // The same code and words without the detail are not the end.
        let e = tonic::Status::failed_precondition("the job is over: why");
        assert_eq!(job_over(&e), None);
    }
}
