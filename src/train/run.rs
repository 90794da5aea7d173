//! A single-process run: the run directory, where training starts
//! (fresh, `--init`, `--resume` or the run directory's newest checkpoint),
//! the PJRT client, then the shared step loop ([`super::steps`]) writing
//! `metrics.jsonl` and checkpoints locally; SIGINT/SIGTERM finish the step,
//! checkpoint and stop cleanly. Also the MFU arithmetic.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::ckpt::{self, Purpose};
use crate::model::{active_params_per_token, param_specs};
use crate::runtime::{find_plugin, Backend, Client, KeyValueStore, NamedValue, Plugin};

use super::batches::{Batches, DataPosition};
use super::config::Config;
use super::history;
use super::step_loop::{run_steps, snapshot, LoopOptions, MetricsRow, RunSink};
use super::tensorboard::EventWriter;
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

/// A client for every replica of a single-process run.
pub fn open_client(cfg: &Config, plugin: Option<&Path>) -> Result<Client> {
    open_client_with(cfg, plugin, cfg.train.replicas)
}

/// A client of the configured backend; on the CPU with `devices` devices.
pub fn open_client_with(cfg: &Config, plugin: Option<&Path>, devices: i64) -> Result<Client> {
    open_job_client(cfg, plugin, devices, None)
}

/// This process's place in a multi-host job, for client creation.
pub struct JobMember {
    pub node_id: i64,
    pub num_nodes: i64,
    /// The job's key-value store (the coordinator's).
    pub kv: Arc<dyn KeyValueStore>,
}

/// A client for one process of a job: on the CPU with `devices` devices;
/// in a multi-host job on accelerators with the job's key-value store (the
/// coordinator's), through which the plugin's processes exchange their
/// topology: the CUDA plugin with `node_id` / `num_nodes`, libtpu as
/// `xla_bridge.make_tpu_client` passes it JAX's distributed client (it
/// finds its slice by itself, and uses the store where it needs one).
pub fn open_job_client(
    cfg: &Config,
    plugin: Option<&Path>,
    devices: i64,
    member: Option<JobMember>,
) -> Result<Client> {
    let backend = cfg.run.backend;
    let loc = find_plugin(backend, plugin)?;
    let plugin = Plugin::load(&loc.path)?;
    let (options, kv) = job_client_options(backend, devices, member);
    Ok(Client::new(plugin, &options, kv)?)
}

/// A client's creation options and key-value store.
pub type ClientSetup = (
    Vec<(&'static str, NamedValue)>,
    Option<Arc<dyn KeyValueStore>>,
);

/// The creation options and key-value store of a job's client on `backend`.
pub fn job_client_options(
    backend: Backend,
    devices: i64,
    member: Option<JobMember>,
) -> ClientSetup {
    let mut options = backend.client_options(devices as usize);
    let mut kv = None;
    match (backend, member) {
        (Backend::Cuda, Some(m)) if m.num_nodes > 1 => {
            options.push(("node_id", NamedValue::Int(m.node_id)));
            options.push(("num_nodes", NamedValue::Int(m.num_nodes)));
            kv = Some(m.kv);
        }
        (Backend::Tpu, Some(m)) if m.num_nodes > 1 => kv = Some(m.kv),
        _ => {}
    }
    (options, kv)
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
    let specs = param_specs(&cfg.model);
    let (from, checkpoint) = starting_point(cfg, start, &specs)?;
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
    let mut batches = Batches::open(cfg, &at, 0..cfg.train.replicas)?;
    check_tokenizer(cfg, &checkpoint.state, &batches)?;
    tracing::info!("training data: {}", batches.describe(cfg));
    if checkpoint.state.step >= cfg.train.steps {
        tracing::info!(
            "run already complete: {} of {} steps done",
            checkpoint.state.step,
            cfg.train.steps
        );
        return Ok(from.expect("a loaded checkpoint has a path"));
    }
    let client = open_client(cfg, plugin)?;
    super::memory::check_device_memory(cfg, &client)?;
    tracing::info!(
        params = crate::model::count_params(&cfg.model),
        replicas = cfg.train.replicas,
        accumulation = cfg.accumulation_steps(),
        "compiling the train step"
    );
    let compile_start = Instant::now();
    let mut trainer = Trainer::new(cfg.clone(), client.clone(), &checkpoint)?;
    // The state lives on the devices now; the host copy (12 bytes per
    // parameter) would only sit in memory beside it.
    drop(checkpoint);
    tracing::info!(
        "compiled in {:.1}s; starting at step {}",
        compile_start.elapsed().as_secs_f64(),
        trainer.step_count()
    );

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
    let mut sink = LocalSink {
        cfg,
        run_dir,
        metrics,
        events: EventWriter::create(&run_dir.join(history::EVENTS_DIR))?,
        stop,
        last: None,
    };
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
            ckpt::save(
                &dir,
                &cfg.model,
                cfg.train.seq_len,
                &snapshot(&trainer, &batches)?,
            )?;
            Ok(dir)
        }
    }
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
        return Ok((Some(dir.clone()), load(dir, Purpose::Weights)?));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct NoStore;
    impl KeyValueStore for NoStore {
        fn put(&self, _: &str, _: &[u8]) -> crate::runtime::Result<()> {
            Ok(())
        }
        fn get(&self, key: &str, _: Duration) -> crate::runtime::Result<Vec<u8>> {
            Err(crate::runtime::Error::new("test", key))
        }
    }

    fn member(num_nodes: i64) -> Option<JobMember> {
        Some(JobMember {
            node_id: 1,
            num_nodes,
            kv: Arc::new(NoStore),
        })
    }

    #[test]
    fn multi_host_accelerator_clients_get_the_job_key_value_store() {
        fn names(o: &[(&'static str, NamedValue)]) -> Vec<&'static str> {
            o.iter().map(|(n, _)| *n).collect()
        }
        let (o, kv) = job_client_options(Backend::Tpu, 4, member(4));
        assert!(kv.is_some(), "libtpu gets the store");
        assert_eq!(names(&o), ["ml_framework_name", "ml_framework_version"]);
        let (o, kv) = job_client_options(Backend::Cuda, 8, member(2));
        assert!(kv.is_some());
        assert_eq!(
            names(&o),
            ["abort_collectives_on_failure", "node_id", "num_nodes"]
        );
        assert_eq!(o[1].1, NamedValue::Int(1));
        assert_eq!(o[2].1, NamedValue::Int(2));
        // One host, or no job: no store.
        for b in [Backend::Tpu, Backend::Cuda, Backend::Cpu] {
            assert!(job_client_options(b, 1, member(1)).1.is_none(), "{b}");
            assert!(job_client_options(b, 1, None).1.is_none(), "{b}");
        }
        // The CPU plugin's processes never join one client.
        let (o, kv) = job_client_options(Backend::Cpu, 2, member(4));
        assert!(kv.is_none());
        assert_eq!(o, vec![("cpu_device_count", NamedValue::Int(2))]);
    }
}
