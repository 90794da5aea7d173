//! `sharedmoe bench dist`: what the coordinator costs.
//!
//! - Per-step overhead of a job run through the coordinator (one worker
//!   process streaming metrics and heartbeats) against the same config run
//!   by `sharedmoe train` in one process, median step times from their
//!   metrics; and the round trip of one heartbeat.
//! - Checkpoint throughput over gRPC for the 50M model's state (parameters
//!   and both Adam moments): upload (chunked, checksummed, verified, written
//!   atomically) and download, against `ckpt::save` of the same state to
//!   the same disk.
//! - The CPU backend's host all-reduce for 2 and 4 worker processes on a
//!   gradient of the 50M model, against the same bytes moved through plain
//!   loopback TCP sockets in the same star pattern (the wire's bound).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ckpt;
use crate::dist::client::{connect, Client, Session};
use crate::dist::coordinator::{serve, CoordinatorOptions};
use crate::dist::host_sum::HostSum;
use crate::dist::proto::{FetchCheckpointRequest, HeartbeatRequest, RegisterRequest};
use crate::dist::transfer::{self, CheckpointFiles, Receiver};
use crate::model::count_params;
use crate::train::trainer::fresh_checkpoint;
use crate::train::{Config, CrossProcessSum};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn scratch(name: &str) -> Result<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-dist")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// An in-process coordinator for `world` workers; its address.
fn start_coordinator(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    world: u32,
    dir: &Path,
) -> Result<String> {
    let mut opts = CoordinatorOptions::new(world, dir.to_path_buf());
    opts.progress = false;
    opts.heartbeat_timeout = Duration::from_secs(3600);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cfg = cfg.clone();
    rt.spawn(async move {
        if let Err(e) = serve(cfg, opts, Some(tx)).await {
            eprintln!("coordinator: {e:#}");
        }
    });
    Ok(rt
        .block_on(rx)
        .context("the coordinator did not start")?
        .to_string())
}

async fn register(client: &mut Client) -> Result<Session> {
    let r = client
        .register(RegisterRequest {
            host: "bench".into(),
            backend: "cpu".into(),
            local_devices: 1,
            pid: std::process::id(),
            want_rank: -1,
        })
        .await?
        .into_inner();
    Ok(Session {
        job_id: r.job_id,
        worker_id: r.worker_id,
        attempt: r.attempt,
        rank: r.rank,
        world: r.world,
    })
}

pub fn dist(config: &Path, processes: &[u32], repeats: usize) -> Result<()> {
    let cfg = Config::load(config, &[])?;
    println!(
        "model: {} ({} parameters)",
        config.display(),
        count_params(&cfg.model)
    );
    step_overhead()?;
    checkpoints(&cfg, repeats)?;
    for &n in processes {
        all_reduce(&cfg, n, repeats)?;
    }
    Ok(())
}

fn metrics_step_times(run: &Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))
        .with_context(|| format!("reading {}", run.join("metrics.jsonl").display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step_time_s"].as_f64())
        .skip(5) // warm-up
        .collect())
}

/// The tiny config run by `train` and by `launch --local 1`.
fn step_overhead() -> Result<()> {
    let exe = std::env::current_exe()?;
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sharedmoe.toml");
    let sets = [
        "train.steps=60",
        "train.warmup_steps=5",
        "train.checkpoint_every=0",
        "train.eval_every=0",
    ];
    let mut medians = vec![];
    for how in ["train", "launch"] {
        let dir = scratch(&format!("overhead-{how}"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg(how).arg("--config").arg(&config);
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.args(["--set", &format!("run.dir={}", dir.display())]);
        if how == "launch" {
            cmd.args(["--local", "1"]);
        }
        let out = cmd.output().with_context(|| format!("running {how}"))?;
        if !out.status.success() {
            bail!("{how} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        medians.push(median(metrics_step_times(&dir)?));
    }
    println!(
        "step overhead (tiny-sharedmoe, 55 steps after warm-up): train {:.2} ms/step, through the coordinator \
         (1 worker, metrics + heartbeats) {:.2} ms/step: {:+.2} ms/step, ratio {:.3}",
        medians[0] * 1e3,
        medians[1] * 1e3,
        (medians[1] - medians[0]) * 1e3,
        medians[1] / medians[0]
    );
    Ok(())
}

fn checkpoints(cfg: &Config, repeats: usize) -> Result<()> {
    let dir = scratch("checkpoints")?;
    let run = dir.join("run");
    let state = fresh_checkpoint(cfg, 0);
    let bytes: u64 = ckpt::to_files(&cfg.model, cfg.train.seq_len, &state)?
        .iter()
        .map(|(_, b)| b.len() as u64)
        .sum();
    // The job starts from this one: downloads fetch it.
    ckpt::save(
        &ckpt::step_dir(&run, 0),
        &cfg.model,
        cfg.train.seq_len,
        &state,
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let addr = start_coordinator(&rt, cfg, 1, &run)?;
    let mb = bytes as f64 / 1e6;
    rt.block_on(async {
        let mut client = {
            let _g = rt.enter();
            connect(&addr, None)?
        };
        let s = register(&mut client).await?;
        // Heartbeat round trip.
        let mut beats = vec![];
        for _ in 0..500 {
            let t = Instant::now();
            client
                .heartbeat(HeartbeatRequest {
                    job_id: s.job_id.clone(),
                    worker_id: s.worker_id,
                    attempt: s.attempt,
                    step: 0,
                })
                .await?;
            beats.push(t.elapsed().as_secs_f64());
        }
        println!(
            "heartbeat round trip: {:.0} us (median of 500; one every 0.5 s by default)",
            median(beats) * 1e6
        );
        let from = transfer::Sender {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
        };
        let mut up = vec![];
        for k in 0..repeats {
            let mut state_k = fresh_checkpoint(cfg, 0);
            state_k.state.step = k as i64 + 1;
            let f = CheckpointFiles {
                step: k as i64 + 1,
                files: ckpt::to_files(&cfg.model, cfg.train.seq_len, &state_k)?,
            };
            let t = Instant::now();
            // Chunking (and hashing) is part of what an upload costs.
            let chunks = transfer::chunks(&from, &f);
            client.upload_checkpoint(tokio_stream::iter(chunks)).await?;
            up.push(t.elapsed().as_secs_f64());
        }
        let mut down = vec![];
        for _ in 0..repeats {
            let t = Instant::now();
            let mut stream = client
                .fetch_checkpoint(FetchCheckpointRequest {
                    job_id: s.job_id.clone(),
                    worker_id: s.worker_id,
                    attempt: s.attempt,
                })
                .await?
                .into_inner();
            let mut rx = Receiver::new(u64::MAX);
            while let Some(c) = tokio_stream::StreamExt::next(&mut stream).await {
                rx.push(c?)?;
            }
            rx.finish()?;
            down.push(t.elapsed().as_secs_f64());
        }
        let mut local = vec![];
        for k in 0..repeats {
            let t = Instant::now();
            ckpt::save(&dir.join(format!("local-{k}")), &cfg.model, cfg.train.seq_len, &state)?;
            local.push(t.elapsed().as_secs_f64());
        }
        let (up, local) = (median(up), median(local));
        println!(
            "checkpoint of {mb:.0} MB over gRPC (median of {repeats}): upload {:.0} MB/s (chunk, sha256, verify, \
             atomic write); local ckpt::save {:.0} MB/s; ratio {:.2}",
            mb / up,
            mb / local,
            local / up
        );
        println!(
            "checkpoint download over gRPC (median of {repeats}): {:.0} MB/s",
            mb / median(down)
        );
        anyhow::Ok(())
    })?;
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `bench allreduce-worker`: one worker process of [`all_reduce`].
pub fn all_reduce_worker(addr: &str, len: usize, repeats: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut client = {
        let _g = rt.enter();
        connect(addr, None)?
    };
    let s = rt.block_on(register(&mut client))?;
    let mut sum = HostSum::new(
        rt.handle().clone(),
        client,
        s.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    let mut v: Vec<f32> = (0..len).map(|i| (i % 7) as f32 + s.rank as f32).collect();
    let mut secs = vec![];
    for _ in 0..repeats + 1 {
        v.iter_mut().for_each(|x| *x = 1.0);
        let t = Instant::now();
        sum.sum(&mut v)?;
        secs.push(t.elapsed().as_secs_f64());
        if v[len / 2] != s.world as f32 {
            bail!("all-reduce sum {} != {}", v[len / 2], s.world);
        }
    }
    secs.remove(0);
    println!(
        "{}",
        serde_json::json!({"rank": s.rank, "median_s": median(secs)})
    );
    Ok(())
}

fn all_reduce(cfg: &Config, n: u32, repeats: usize) -> Result<()> {
    let len = count_params(&cfg.model) as usize + 2; // gradients, ce, aux
    let mb = (len * 4) as f64 / 1e6;
    let dir = scratch(&format!("allreduce-{n}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    // One replica per worker process.
    let mut job = cfg.clone();
    job.train.replicas = n as i64;
    let addr = start_coordinator(&rt, &job, n, &dir)?;
    let exe = std::env::current_exe()?;
    let children = (0..n)
        .map(|_| {
            Command::new(&exe)
                .args(["bench", "allreduce-worker", "--coordinator", &addr])
                .args(["--len", &len.to_string(), "--repeats", &repeats.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("starting an all-reduce worker")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut slowest: f64 = 0.0;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("an all-reduce worker failed ({})", out.status);
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("all-reduce worker output `{line}`"))?;
        slowest = slowest.max(v["median_s"].as_f64().context("median_s")?);
    }
    drop(rt);
    let wire = wire(n, len * 4, repeats)?;
    println!(
        "host all-reduce, {n} processes, {mb:.0} MB per process (median of {repeats}): {:.0} MB/s \
         ({:.2} s); loopback TCP, same traffic: {:.0} MB/s; ratio {:.2}",
        mb / slowest,
        slowest,
        mb / wire,
        wire / slowest
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The wire's bound: `n` clients each send `bytes` to a hub thread and
/// read `bytes` back over loopback TCP (the all-reduce's traffic without
/// gRPC, protobuf or summing).
fn wire(n: u32, bytes: usize, repeats: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let hub = std::thread::spawn(move || -> Result<()> {
        let mut conns: Vec<TcpStream> = (0..n)
            .map(|_| Ok(listener.accept()?.0))
            .collect::<Result<_>>()?;
        let mut buf = vec![0u8; bytes];
        for _ in 0..repeats + 1 {
            for c in &mut conns {
                c.read_exact(&mut buf)?;
            }
            for c in &mut conns {
                c.write_all(&buf)?;
            }
        }
        Ok(())
    });
    let clients: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let mut s = TcpStream::connect(addr)?;
                let out = vec![1u8; bytes];
                let mut back = vec![0u8; bytes];
                let mut secs = vec![];
                for _ in 0..repeats + 1 {
                    let t = Instant::now();
                    s.write_all(&out)?;
                    s.read_exact(&mut back)?;
                    secs.push(t.elapsed().as_secs_f64());
                }
                secs.remove(0);
                Ok(secs)
            })
        })
        .collect();
    let mut all = vec![];
    for c in clients {
        all.push(median(c.join().expect("client thread")?));
    }
    hub.join().expect("hub thread")?;
    Ok(all.into_iter().fold(0.0, f64::max))
}
