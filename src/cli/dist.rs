//! `sharedmoe coordinator`, `sharedmoe worker`, `sharedmoe launch`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::train::ConfigArgs;
use crate::dist::auth::load_secret;
use crate::dist::coordinator::{serve, CoordinatorOptions};
use crate::dist::launch::{launch_local, LaunchOptions};
use crate::dist::worker::{run_worker, WorkerExit, WorkerOptions, EXIT_RESTART};
use crate::runtime::Backend;

/// Job-level settings of the coordinator (also taken by `launch`).
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// Seconds between a worker's heartbeats.
    #[arg(long, default_value_t = 0.5)]
    pub heartbeat_interval_s: f64,
    /// A worker silent for this long is lost and the job restarts.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_timeout_s: f64,
    /// Restarts (lost or failed workers) before the job fails.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Checkpoints kept in the run directory.
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
}

impl JobArgs {
    fn to_flags(&self) -> Vec<String> {
        vec![
            format!("--heartbeat-interval-s={}", self.heartbeat_interval_s),
            format!("--heartbeat-timeout-s={}", self.heartbeat_timeout_s),
            format!("--max-restarts={}", self.max_restarts),
            format!("--keep-checkpoints={}", self.keep_checkpoints),
        ]
    }
}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Workers (hosts) in the job.
    #[arg(long, value_parser = at_least_one)]
    pub workers: u32,
    /// Address to listen on; anything but loopback needs a shared secret.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Run directory (default: the config's run.dir).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// File holding the shared secret (else $SHAREDMOE_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Write the bound address here once listening.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    #[command(flatten)]
    pub job: JobArgs,
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address (host:port). On TPU it defaults to worker
    /// 0 of this slice (from TPU_WORKER_HOSTNAMES or the TPU VM's
    /// metadata) at --coordinator-port.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The port of the default TPU coordinator address.
    #[arg(long, default_value_t = 50051)]
    pub coordinator_port: u16,
    /// This host's backend: cpu, cuda (or gpu) or tpu.
    #[arg(long, default_value = "cpu")]
    pub backend: Backend,
    /// The rank this worker must have; default any, and on TPU the slice's
    /// worker number (TPU_WORKER_ID on GKE, the TPU VM's metadata).
    #[arg(long)]
    pub rank: Option<u32>,
    /// File holding the shared secret (else $SHAREDMOE_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Seconds to keep trying to reach the coordinator.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout_s: f64,
}

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start a coordinator and this many workers on this machine.
    #[arg(long, value_parser = at_least_one)]
    pub local: u32,
    /// Run directory (default: the config's run.dir).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// PJRT plugin path for the workers.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Times a dead worker is started again.
    #[arg(long, default_value_t = 3)]
    pub max_worker_restarts: u32,
    #[command(flatten)]
    pub job: JobArgs,
}

/// A worker count: clap names the flag in the error.
fn at_least_one(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        bail!("{what} must be a positive number of seconds, got {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

fn run_dir_of(given: &Option<PathBuf>, cfg: &crate::train::Config) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None if !cfg.run.dir.as_os_str().is_empty() => Ok(cfg.run.dir.clone()),
        None => bail!("no run directory: pass --run-dir or set run.dir in the config"),
    }
}

pub fn run_coordinator(a: &CoordinatorArgs) -> Result<()> {
    let mut cfg = a.config.load()?;
    let run_dir = run_dir_of(&a.run_dir, &cfg)?;
    cfg.run.dir = run_dir.clone();
    fit_data_shards(&mut cfg, a.workers);
    let mut opts = CoordinatorOptions::new(a.workers, run_dir);
    opts.listen = a.listen;
    opts.secret = load_secret(a.secret_file.as_deref())?;
    opts.addr_file = a.addr_file.clone();
    opts.heartbeat_interval = seconds(a.job.heartbeat_interval_s, "--heartbeat-interval-s")?;
    opts.heartbeat_timeout = seconds(a.job.heartbeat_timeout_s, "--heartbeat-timeout-s")?;
    if opts.heartbeat_timeout < 2 * opts.heartbeat_interval {
        bail!("--heartbeat-timeout-s must be at least twice --heartbeat-interval-s");
    }
    opts.max_restarts = a.job.max_restarts;
    opts.keep_checkpoints = a.job.keep_checkpoints.max(1);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let end = rt.block_on(serve(cfg, opts, None))?;
    if end.ok {
        tracing::info!("job over: {}", end.message);
        Ok(())
    } else {
        bail!("job failed: {}", end.message)
    }
}

/// A parquet source is read as `data.shards` streams, and every worker must
/// own whole shards: raise a count that does not divide among the workers
/// to the worker count (runs with the same data.shards see the same
/// batches, so a single-process run can reproduce this one).
fn fit_data_shards(cfg: &mut crate::train::Config, workers: u32) {
    let w = workers as i64;
    if !cfg.data.parquet.is_empty() && cfg.data.shards % w != 0 {
        tracing::warn!(
            "data.shards = {} cannot be split over {w} workers: using data.shards = {w} \
             (a single-process run with --set data.shards={w} sees the same batches)",
            cfg.data.shards
        );
        cfg.data.shards = w;
    }
}

pub fn run_worker_cmd(a: &WorkerArgs) -> Result<()> {
    // On a TPU slice the worker's rank is the slice's worker number and
    // the coordinator runs on worker 0, unless told otherwise.
    let slice = if a.backend == Backend::Tpu && (a.rank.is_none() || a.coordinator.is_none()) {
        let host = crate::dist::tpu::discover()?;
        tracing::info!(
            "TPU slice worker {} of {} hosts",
            host.worker_id,
            host.hostnames.len()
        );
        Some(host)
    } else {
        None
    };
    let rank = a.rank.or(slice.as_ref().map(|h| h.worker_id));
    let coordinator = match (&a.coordinator, &slice) {
        (Some(c), _) => c.clone(),
        (None, Some(h)) => match h.hostnames.first() {
            Some(w0) => format!("{w0}:{}", a.coordinator_port),
            None => {
                bail!("the TPU slice's worker hostnames are unknown: pass --coordinator HOST:PORT")
            }
        },
        (None, None) => {
            bail!("--coordinator HOST:PORT is required (it has a default on TPU slices only)")
        }
    };
    let opts = WorkerOptions {
        coordinator,
        secret: load_secret(a.secret_file.as_deref())?,
        plugin: a.plugin.clone(),
        backend: a.backend,
        want_rank: rank.map_or(-1, |r| r as i32),
        connect_timeout: seconds(a.connect_timeout_s, "--connect-timeout-s")?,
        progress: false,
    };
    match run_worker(&opts)? {
        WorkerExit::Finished => tracing::info!("training finished"),
        WorkerExit::Preempted => tracing::info!("stopped on signal after a checkpoint"),
        WorkerExit::Stopped { ok: true, reason } => tracing::info!("the job ended: {reason}"),
        WorkerExit::Stopped { ok: false, reason } => bail!("the job failed: {reason}"),
        WorkerExit::Restart { reason } => {
            tracing::warn!(
                "{reason}: exiting with status {EXIT_RESTART} for the supervisor to start a fresh \
                 worker (a second multi-host client in one process is not supported)"
            );
            std::process::exit(EXIT_RESTART);
        }
    }
    Ok(())
}

pub fn run_launch(a: &LaunchArgs) -> Result<()> {
    let cfg = a.config.load()?;
    let run_dir = run_dir_of(&a.run_dir, &cfg)?;
    let mut config_args = vec![
        "--config".to_string(),
        a.config.config.display().to_string(),
    ];
    for o in &a.config.overrides {
        config_args.extend(["--set".to_string(), o.clone()]);
    }
    let mut worker_args = vec!["--backend".to_string(), cfg.run.backend.to_string()];
    if let Some(b) = a.config.backend {
        config_args.extend(["--backend".to_string(), b.to_string()]);
    }
    if let Some(p) = &a.plugin {
        worker_args.extend(["--plugin".to_string(), p.display().to_string()]);
    }
    let status = launch_local(&LaunchOptions {
        workers: a.local,
        config_args,
        run_dir,
        coordinator_args: a.job.to_flags(),
        worker_args,
        max_worker_restarts: a.max_worker_restarts,
    })?;
    if !status.success() {
        bail!("the coordinator exited with {status}");
    }
    Ok(())
}
