//! Test helper: `sharedmoe` processes with their output in a log file, a
//! coordinator of the tiny config to talk to, and raw gRPC clients of it
//! (tests/dist.rs, tests/coordinator_policy.rs, tests/shard_assembly.rs).
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sharedmoe::dist::proto::coordinator_client::CoordinatorClient;
use sharedmoe::dist::proto::{MetricsRow, RegisterReply, RegisterRequest, UploadCheckpointReply};
use sharedmoe::dist::shard_transfer::{self, ShardUpload};
use sharedmoe::dist::transfer::{chunks, CheckpointFiles, Sender};
use tonic::Status;

pub const BIN: &str = env!("CARGO_BIN_EXE_sharedmoe");

pub type Client = CoordinatorClient<tonic::transport::Channel>;

/// Starts the binary with stdout and stderr in `log`.
pub fn spawn(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Child {
    let f = File::create(log).unwrap();
    Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A client of the coordinator at `addr`, retried while it starts.
pub async fn connect(addr: &str) -> Client {
    let began = Instant::now();
    loop {
        match CoordinatorClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if began.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connecting to {addr}: {e}"),
        }
    }
}

/// Registers a CPU worker (any rank); blocks until the job has all its
/// workers.
pub async fn register(client: &Client) -> RegisterReply {
    client
        .clone()
        .register(RegisterRequest {
            host: "test".into(),
            backend: "cpu".into(),
            local_devices: 4,
            pid: std::process::id(),
            want_rank: -1,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Who `reg` is, as the header of its uploads names it.
pub fn sender(reg: &RegisterReply) -> Sender {
    Sender {
        job_id: reg.job_id.clone(),
        worker_id: reg.worker_id,
        attempt: reg.attempt,
    }
}

/// Uploads `files` as `reg`'s worker.
pub async fn upload(
    client: &Client,
    reg: &RegisterReply,
    files: &CheckpointFiles,
) -> Result<UploadCheckpointReply, Status> {
    let c = chunks(&sender(reg), files);
    Ok(client
        .clone()
        .upload_checkpoint(tokio_stream::iter(c))
        .await?
        .into_inner())
}

/// Uploads `reg`'s shards (UploadShards) as its worker; `up.rank` is sent
/// as given.
pub async fn upload_shards(
    client: &Client,
    reg: &RegisterReply,
    up: &ShardUpload,
) -> Result<UploadCheckpointReply, Status> {
    let c = shard_transfer::chunks(&sender(reg), up).unwrap();
    Ok(client
        .clone()
        .upload_shards(tokio_stream::iter(c))
        .await?
        .into_inner())
}

/// Streams `(step, json)` rows as `reg`'s worker, in one ReportMetrics call.
pub async fn send_rows(
    client: &Client,
    reg: &RegisterReply,
    rows: Vec<(i64, String)>,
) -> Result<(), Status> {
    let rows: Vec<MetricsRow> = rows
        .into_iter()
        .map(|(step, json)| MetricsRow {
            job_id: reg.job_id.clone(),
            worker_id: reg.worker_id,
            attempt: reg.attempt,
            step,
            json,
        })
        .collect();
    client
        .clone()
        .report_metrics(tokio_stream::iter(rows))
        .await
        .map(|_| ())
}

/// Well-formed rows for `steps`, as the trainer reports them.
pub async fn report_steps(
    client: &Client,
    reg: &RegisterReply,
    steps: std::ops::Range<i64>,
) -> Result<(), Status> {
    let rows = steps
        .map(|s| (s, format!(r#"{{"step":{s},"loss":2.5}}"#)))
        .collect();
    send_rows(client, reg, rows).await
}

/// Every file under `dir` with its bytes, sorted by path.
pub fn snapshot_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A coordinator of the tiny shared-MoE config (train.replicas = 2) for
/// `workers` workers, whose run directory starts with a step-0
/// checkpoint (the good checkpoint nothing may destroy). Killed, and its
/// directory removed, on drop; its log is printed when a test panics.
pub struct CoordinatorJob {
    pub dir: PathBuf,
    pub run: PathBuf,
    pub cfg: sharedmoe::train::Config,
    pub addr: String,
    pub coord: Child,
}

impl CoordinatorJob {
    pub const CONFIG: &'static str = "configs/tiny-sharedmoe.toml";

    /// In a fresh `dir`, with `--heartbeat-timeout-s` as given.
    pub fn start(dir: PathBuf, workers: u32, heartbeat_timeout_s: u32) -> CoordinatorJob {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run");
        // replicas divisible by 1 and 2 workers.
        let set = "train.replicas=2";
        let cfg =
            sharedmoe::train::Config::load(Path::new(Self::CONFIG), &[set.to_string()]).unwrap();
        sharedmoe::train::write_init(&cfg, &sharedmoe::ckpt::step_dir(&run, 0), 7).unwrap();
        // Port 0 and --addr-file: the coordinator binds a port no other
        // process can have taken in between (a port probed free and
        // released could be another test's coordinator by the time this
        // one binds it).
        let addr_file = dir.join("coordinator.addr");
        let workers = workers.to_string();
        let timeout = format!("--heartbeat-timeout-s={heartbeat_timeout_s}");
        let coord = spawn(
            &[
                "coordinator",
                "--config",
                Self::CONFIG,
                "--set",
                set,
                "--workers",
                &workers,
                "--listen",
                "127.0.0.1:0",
                "--addr-file",
                addr_file.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
                &timeout,
            ],
            &dir.join("coordinator.log"),
            &[],
        );
        let began = Instant::now();
        let addr = loop {
            // Written atomically (temporary file, then rename).
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a.trim().to_string();
            }
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "the coordinator wrote no address in 60 s:\n{}",
                std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        CoordinatorJob {
            dir,
            run,
            cfg,
            addr,
            coord,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for CoordinatorJob {
    fn drop(&mut self) {
        let _ = self.coord.kill();
        let _ = self.coord.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("coordinator log:\n{}", self.log());
        }
    }
}
