//! The multi-process job with real processes on 127.0.0.1: a coordinator
//! and CPU workers started from the `sharedmoe` binary.
//!
//! (a) 2 workers x 2 devices equal one process of 4 devices, step by step;
//! (b) `kill -9` of a worker: restart from the last checkpoint, same final
//!     parameters as the uninterrupted run;
//! (c) the coordinator killed and started again: the job resumes from its
//!     newest checkpoint, same final parameters;
//! (d) truncated, corrupted and out-of-order checkpoint uploads refused, the
//!     previous checkpoint intact;
//! (e) a wrong or missing shared secret refused;
//! (f) SIGTERM to a worker: a checkpoint, then every process exits 0.
//!
//! The tests share the machine's cores and heartbeat deadlines, so they
//! run one at a time.

mod grpc;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use sharedmoe::dist::proto::checkpoint_chunk::Part;
use sharedmoe::dist::proto::{PingRequest, RegisterRequest};
use sharedmoe::dist::transfer::{chunks, CheckpointFiles, Sender};
use sharedmoe::train::Config;

use grpc::{connect, free_port, register, report_steps, rt, sender, snapshot_dir, spawn};

const STEPS: i64 = 24;
const DEADLINE: Duration = Duration::from_secs(300);

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny shared-MoE job on the shipped parquet sample: 4 replicas, the
/// data in 2 shards, a checkpoint and a validation every 8 steps.
fn write_config(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
[model]
preset = "tiny-sharedmoe"
vocab_size = 32000
[train]
seq_len = 32
global_batch = 8
micro_batch = 2
replicas = 4
steps = {STEPS}
warmup_steps = 2
lr = 3e-3
min_lr = 3e-4
checkpoint_every = 8
eval_every = 8
eval_batches = 1
[data]
parquet = ["{}"]
tokenizer = "{}"
val_fraction = 0.02
shuffle_rows = 64
shards = 2
[run]
dir = "{}"
backend = "cpu"
"#,
        root.join("data/fineweb-sample").display(),
        root.join("data/tokenizer.json").display(),
        dir.join("run").display()
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("\n--- {} (last lines) ---\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
    }
    out
}

fn wait_exit(child: &mut Child, dir: &Path, what: &str) -> ExitStatus {
    let began = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if began.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("{what} did not exit within {DEADLINE:?}{}", logs(dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(dir: &Path, what: &str, mut ok: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ok() {
        if began.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}{}", logs(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (step, loss, val_loss) rows of a run's metrics.jsonl.
fn metrics(run: &Path) -> Vec<(i64, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_i64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["val_loss"].as_f64(),
            )
        })
        .collect()
}

fn last_step(run: &Path) -> i64 {
    metrics(run).last().map_or(-1, |r| r.0)
}

/// The model and optimizer files of the run's final checkpoint.
fn final_state(run: &Path) -> (Vec<u8>, Vec<u8>) {
    let dir = sharedmoe::ckpt::step_dir(run, STEPS);
    (
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(dir.join("optimizer.safetensors")).unwrap(),
    )
}

const JOB_FLAGS: [&str; 4] = [
    "--heartbeat-interval-s=0.2",
    "--heartbeat-timeout-s=3",
    "--max-restarts=3",
    "--keep-checkpoints=2",
];

fn launch_args<'a>(config: &'a str, run: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "launch",
        "--local",
        "2",
        "--config",
        config,
        "--run-dir",
        run,
    ];
    a.extend(JOB_FLAGS);
    a
}

/// The uninterrupted 2 x 2 job, run once for the tests that compare with it.
fn uninterrupted() -> &'static PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("uninterrupted");
        let config = write_config(&dir);
        let run = dir.join("run");
        let mut launch = spawn(
            &launch_args(config.to_str().unwrap(), run.to_str().unwrap()),
            &dir.join("launch.log"),
            &[],
        );
        let status = wait_exit(&mut launch, &dir, "launch");
        assert!(status.success(), "launch: {status}{}", logs(&dir));
        run
    })
}

#[test]
fn a_two_workers_of_two_devices_equal_one_process_of_four() {
    let _serial = one_at_a_time();
    let run = uninterrupted();
    let dir = scratch("single");
    let config = write_config(&dir);
    let mut single = spawn(
        &["train", "--config", config.to_str().unwrap()],
        &dir.join("train.log"),
        &[],
    );
    let status = wait_exit(&mut single, &dir, "train");
    assert!(status.success(), "train: {status}{}", logs(&dir));
    let (two, one) = (metrics(run), metrics(&dir.join("run")));
    assert_eq!(two.len(), STEPS as usize, "{two:?}");
    assert_eq!(one.len(), STEPS as usize);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs();
    for ((s2, l2, v2), (s1, l1, v1)) in two.iter().zip(&one) {
        assert_eq!(s2, s1);
        assert!(
            close(*l2, *l1),
            "step {s1}: loss {l2} (2 workers) vs {l1} (1 process)"
        );
        match (v2, v1) {
            (Some(a), Some(b)) => assert!(close(*a, *b), "step {s1}: val_loss {a} vs {b}"),
            (None, None) => {}
            _ => panic!("step {s1}: validation in one run only"),
        }
    }
    assert_eq!(one.iter().filter(|r| r.2.is_some()).count(), 3);
    // The losses moved: the comparison is not between two constants.
    assert!(one[0].1 - one[STEPS as usize - 1].1 > 0.5, "{one:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pids of `parent`'s children whose command line contains `word`.
fn children(parent: u32, word: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && cmd.split('\0').any(|a| a == word) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn b_a_killed_worker_costs_only_the_steps_since_the_last_checkpoint() {
    let _serial = one_at_a_time();
    let reference = final_state(uninterrupted());
    let dir = scratch("kill-worker");
    let config = write_config(&dir);
    let run = dir.join("run");
    let mut launch = spawn(
        &launch_args(config.to_str().unwrap(), run.to_str().unwrap()),
        &dir.join("launch.log"),
        &[],
    );
    // Past the checkpoint of step 8, before the end.
    wait_until(&dir, "step 10", || last_step(&run) >= 10);
    let workers = children(launch.id(), "worker");
    assert_eq!(workers.len(), 2, "{workers:?}");
    unsafe { libc::kill(workers[1] as i32, libc::SIGKILL) };
    let status = wait_exit(&mut launch, &dir, "launch");
    assert!(status.success(), "launch: {status}{}", logs(&dir));
    let log = std::fs::read_to_string(dir.join("launch.log")).unwrap();
    assert!(log.contains("lost: no heartbeat"), "{}", logs(&dir));
    assert!(log.contains("starting at step 8"), "{}", logs(&dir));
    // Every step logged once, in order, after the rewind.
    let steps: Vec<i64> = metrics(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, (0..STEPS).collect::<Vec<_>>());
    assert!(
        final_state(&run) == reference,
        "final parameters differ from the uninterrupted run's"
    );
    // --keep-checkpoints=2
    let kept: Vec<PathBuf> = sharedmoe::ckpt::list(&run);
    assert_eq!(kept.len(), 2, "{kept:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A coordinator (logging to `dir/coordinator_log`) and its 2 workers.
fn start_job(
    dir: &Path,
    config: &str,
    run: &str,
    listen: &str,
    coordinator_log: &str,
) -> (Child, Vec<Child>) {
    let coord = spawn(
        &coordinator_args(config, run, listen),
        &dir.join(coordinator_log),
        &[],
    );
    let workers = (0..2)
        .map(|i| {
            spawn(
                &["worker", "--coordinator", listen],
                &dir.join(format!("worker-{i}.log")),
                &[],
            )
        })
        .collect();
    (coord, workers)
}

fn coordinator_args<'a>(config: &'a str, run: &'a str, listen: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "coordinator",
        "--config",
        config,
        "--workers",
        "2",
        "--listen",
        listen,
        "--run-dir",
        run,
    ];
    a.extend(JOB_FLAGS);
    a
}

#[test]
fn c_a_restarted_coordinator_resumes_from_its_newest_checkpoint() {
    let _serial = one_at_a_time();
    let reference = final_state(uninterrupted());
    let dir = scratch("kill-coordinator");
    let config = write_config(&dir);
    let run = dir.join("run");
    let listen = format!("127.0.0.1:{}", free_port());
    let (c, r) = (config.to_str().unwrap(), run.to_str().unwrap());
    let (mut coord, mut workers) = start_job(&dir, c, r, &listen, "coordinator-1.log");
    wait_until(&dir, "step 10", || last_step(&run) >= 10);
    coord.kill().unwrap(); // SIGKILL
    coord.wait().unwrap();
    let newest = sharedmoe::ckpt::latest(&run).expect("a checkpoint before the kill");
    let mut coord = spawn(
        &coordinator_args(c, r, &listen),
        &dir.join("coordinator-2.log"),
        &[],
    );
    let status = wait_exit(&mut coord, &dir, "the second coordinator");
    assert!(status.success(), "coordinator: {status}{}", logs(&dir));
    for (i, w) in workers.iter_mut().enumerate() {
        let s = wait_exit(w, &dir, "worker");
        assert!(s.success(), "worker {i}: {s}{}", logs(&dir));
    }
    let log = std::fs::read_to_string(dir.join("coordinator-2.log")).unwrap();
    let resumed_at = newest.file_name().unwrap().to_string_lossy()["step_".len()..]
        .parse::<i64>()
        .unwrap();
    assert!(resumed_at >= 8);
    assert!(
        log.contains(&format!(
            "resuming from the checkpoint of step {resumed_at}"
        )),
        "{}",
        logs(&dir)
    );
    let steps: Vec<i64> = metrics(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, (0..STEPS).collect::<Vec<_>>());
    assert!(
        final_state(&run) == reference,
        "final parameters differ from the uninterrupted run's"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn d_bad_checkpoint_uploads_are_refused_and_the_previous_one_stays_intact() {
    let _serial = one_at_a_time();
    let dir = scratch("bad-upload");
    let config_path = write_config(&dir);
    let cfg = Config::load(&config_path, &[]).unwrap();
    let run = dir.join("run");
    let step0 = sharedmoe::ckpt::step_dir(&run, 0);
    sharedmoe::train::write_init(&cfg, &step0, 7).unwrap();
    let checkpoints = run.join("checkpoints");
    let before = snapshot_dir(&checkpoints);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut coord = spawn(
        &[
            "coordinator",
            "--config",
            config_path.to_str().unwrap(),
            "--workers",
            "1",
            "--listen",
            &listen,
            "--run-dir",
            run.to_str().unwrap(),
            "--heartbeat-timeout-s=60",
        ],
        &dir.join("coordinator.log"),
        &[],
    );
    rt().block_on(async {
        let client = connect(&listen).await;
        let reg = register(&client).await;
        assert!(
            reg.has_checkpoint,
            "the coordinator found the step-0 checkpoint"
        );
        // The job has reached step 5: a checkpoint of step 5 is due.
        report_steps(&client, &reg, 0..5).await.unwrap();
        // A well-formed checkpoint of step 5 (the step-0 one, renumbered).
        let mut files = sharedmoe::ckpt::read_files(&step0).unwrap();
        let state = files.iter_mut().find(|(n, _)| n == "state.json").unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&state.1).unwrap();
        v["step"] = 5.into();
        state.1 = serde_json::to_vec(&v).unwrap();
        let good = CheckpointFiles { step: 5, files };
        let me = sender(&reg);
        let upload = |c: Vec<sharedmoe::dist::proto::CheckpointChunk>| {
            let mut client = client.clone();
            async move { client.upload_checkpoint(tokio_stream::iter(c)).await }
        };
        let all = chunks(&me, &good);
        assert!(all.len() > 3, "several data chunks");

        // Truncated: the last data chunk missing.
        let mut truncated = all.clone();
        truncated.remove(all.len() - 2);
        let n = truncated.len();
        truncated[n - 1].seq -= 1;
        let e = upload(truncated).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("truncated"), "{e:?}");
        // Cut off before the trailer.
        let e = upload(all[..all.len() - 1].to_vec()).await.unwrap_err();
        assert!(e.message().contains("truncated"), "{e:?}");
        // A flipped bit.
        let mut corrupted = all.clone();
        if let Some(Part::Data(d)) = &mut corrupted[1].part {
            d[1000] ^= 0x10;
        }
        let e = upload(corrupted).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
        // Out of sequence.
        let mut swapped = all.clone();
        swapped.swap(1, 2);
        let e = upload(swapped).await.unwrap_err();
        assert!(e.message().contains("out of sequence"), "{e:?}");
        // Consistent bytes that are not a checkpoint of this model.
        let mut garbage = good.clone();
        for (name, bytes) in &mut garbage.files {
            if name == "model.safetensors" {
                bytes.truncate(bytes.len() / 2);
            }
        }
        let e = upload(chunks(&me, &garbage)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // From a worker that does not exist, and for another job.
        let stranger = Sender {
            worker_id: 999,
            ..me.clone()
        };
        let e = upload(chunks(&stranger, &good)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        let other_job = Sender {
            job_id: "another".into(),
            ..me.clone()
        };
        let e = upload(chunks(&other_job, &good)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

        // Nothing of it reached the run directory.
        assert_eq!(
            snapshot_dir(&checkpoints),
            before,
            "the checkpoints changed"
        );
        // The coordinator is still serving, and takes a good upload.
        client.clone().ping(PingRequest { nonce: 3 }).await.unwrap();
        let reply = upload(all).await.unwrap().into_inner();
        assert!(reply.path.ends_with("step_00000005"), "{}", reply.path);
        let loaded = sharedmoe::ckpt::load(
            &sharedmoe::ckpt::step_dir(&run, 5),
            &sharedmoe::model::param_specs(&cfg.model),
            sharedmoe::ckpt::Purpose::Resume,
        )
        .unwrap();
        assert_eq!(loaded.state.step, 5);
    });
    coord.kill().unwrap();
    coord.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn e_a_wrong_or_missing_secret_is_refused() {
    let _serial = one_at_a_time();
    let dir = scratch("secret");
    let config = write_config(&dir);
    let run = dir.join("run");
    let (c, r) = (config.to_str().unwrap(), run.to_str().unwrap());
    // Beyond loopback without a secret: refused before binding anything.
    let mut open = spawn(
        &[
            "coordinator",
            "--config",
            c,
            "--workers",
            "1",
            "--listen",
            "0.0.0.0:0",
            "--run-dir",
            r,
        ],
        &dir.join("open.log"),
        &[],
    );
    let status = wait_exit(&mut open, &dir, "coordinator without a secret");
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.join("open.log")).unwrap();
    assert!(log.contains("needs a shared secret"), "{log}");

    let secret = "correct horse battery staple";
    let listen = format!("127.0.0.1:{}", free_port());
    let mut coord = spawn(
        &[
            "coordinator",
            "--config",
            c,
            "--workers",
            "1",
            "--listen",
            &listen,
            "--run-dir",
            r,
        ],
        &dir.join("coordinator.log"),
        &[("SHAREDMOE_SECRET", secret)],
    );
    rt().block_on(async {
        let client = connect(&listen).await;
        let ping = |with: Option<&'static str>| {
            let mut client = client.clone();
            async move {
                let mut req = tonic::Request::new(PingRequest { nonce: 11 });
                if let Some(s) = with {
                    req.metadata_mut()
                        .insert("x-sharedmoe-secret", s.parse().unwrap());
                }
                client.ping(req).await
            }
        };
        // Wait until it serves (an answer of any kind).
        let e = ping(None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = ping(Some("correct horse battery stapler"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("wrong shared secret"), "{e:?}");
        let ok = ping(Some("correct horse battery staple"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.nonce, 11);
        // Registration too.
        let e = client
            .clone()
            .register(RegisterRequest {
                host: "x".into(),
                backend: "cpu".into(),
                local_devices: 1,
                pid: 1,
                want_rank: -1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    });
    coord.kill().unwrap();
    coord.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn f_sigterm_to_a_worker_checkpoints_and_stops_the_job_cleanly() {
    let _serial = one_at_a_time();
    let dir = scratch("sigterm");
    let config = write_config(&dir);
    let run = dir.join("run");
    let listen = format!("127.0.0.1:{}", free_port());
    let (c, r) = (config.to_str().unwrap(), run.to_str().unwrap());
    let (mut coord, mut workers) = start_job(&dir, c, r, &listen, "coordinator.log");
    wait_until(&dir, "step 3", || last_step(&run) >= 3);
    unsafe { libc::kill(workers[1].id() as i32, libc::SIGTERM) };
    for (i, w) in workers.iter_mut().enumerate() {
        let s = wait_exit(w, &dir, "worker");
        assert!(s.success(), "worker {i}: {s}{}", logs(&dir));
    }
    let s = wait_exit(&mut coord, &dir, "coordinator");
    assert!(s.success(), "coordinator: {s}{}", logs(&dir));
    let done = metrics(&run).len() as i64;
    assert!(done < STEPS, "stopped early: {done} steps");
    let newest = sharedmoe::ckpt::latest(&run).expect("a checkpoint after SIGTERM");
    assert_eq!(
        newest,
        sharedmoe::ckpt::step_dir(&run, done),
        "{}",
        logs(&dir)
    );
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(log.contains("preempted"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
