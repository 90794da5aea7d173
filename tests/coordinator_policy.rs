//! What the coordinator refuses from registered workers (issue 12, cases
//! 3, 8 and 11), with raw gRPC clients against a real coordinator process
//! on 127.0.0.1:
//! - checkpoint uploads: from rank 0 only, of exactly the step the job has
//!   reached (known from rank 0's metrics rows), with finite tensors; every
//!   refusal leaves the run directory byte for byte as it was;
//! - metrics rows: from rank 0 only, one JSON object per line, in step
//!   order;
//! - the key-value store's total size is capped;
//! - after the end of the job, heartbeats and a late Register say how it
//!   ended in typed fields (issue 16);
//! - `coordinator --workers 0` and `launch --local 0` are refused with a
//!   message, not a panic.

mod grpc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sharedmoe::ckpt::{self, Checkpoint};
use sharedmoe::dist::proto::{
    Command as Beat, FinishRequest, HeartbeatRequest, KvGetRequest, KvPutRequest, Outcome,
    PingRequest, RegisterReply, RegisterRequest,
};
use sharedmoe::dist::transfer::CheckpointFiles;
use sharedmoe::dist::worker::job_over;
use tonic::Code;

use grpc::{connect, register, report_steps, rt, send_rows, snapshot_dir, upload, Client, BIN};

const CONFIG: &str = "configs/tiny-sharedmoe.toml";
/// The tiny config's train.steps.
const STEPS: i64 = 300;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-policy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

use grpc::CoordinatorJob as Job;

impl Job {
    /// Longer than an upload's wait for metrics rows: the raw clients
    /// send no heartbeats.
    fn new(name: &str, workers: u32) -> Job {
        Job::start(scratch(name), workers, 120)
    }

    /// The step-0 checkpoint renumbered to `step`, then `edit`ed.
    fn checkpoint(&self, step: i64, edit: impl FnOnce(&mut Checkpoint)) -> CheckpointFiles {
        let specs = sharedmoe::model::param_specs(&self.cfg.model);
        let mut c =
            ckpt::load(&ckpt::step_dir(&self.run, 0), &specs, ckpt::Purpose::Resume).unwrap();
        c.state.step = step;
        edit(&mut c);
        CheckpointFiles {
            step,
            files: ckpt::to_files(&self.cfg.model, self.cfg.train.seq_len, &c).unwrap(),
        }
    }

    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        snapshot_dir(&self.run)
    }

    /// The steps of the checkpoints in the run directory.
    fn checkpoint_steps(&self) -> Vec<i64> {
        ckpt::list(&self.run)
            .iter()
            .map(|d| {
                d.file_name().unwrap().to_string_lossy()["step_".len()..]
                    .parse()
                    .unwrap()
            })
            .collect()
    }
}

/// Asserts that `e` has `code` and a message naming every one of `words`.
fn refused(e: tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(e.message().contains(w), "`{w}` not in {e:?}");
    }
}

#[test]
fn only_rank_0_uploads_checkpoints_and_reports_metrics() {
    let job = Job::new("rank", 2);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        // Registration returns once both workers are in.
        let (a, b) = tokio::join!(register(&client), register(&client));
        let (r0, r1) = if a.rank == 0 { (a, b) } else { (b, a) };
        assert_eq!(r1.rank, 1);
        let before = job.snapshot();
        let e = report_steps(&client, &r1, 0..3).await.unwrap_err();
        refused(e, Code::PermissionDenied, &["rank 1"]);
        assert!(job.snapshot() == before, "rank 1's rows were written");

        report_steps(&client, &r0, 0..3).await.unwrap();
        let good = job.checkpoint(3, |_| {});
        let before = job.snapshot();
        let e = upload(&client, &r1, &good).await.unwrap_err();
        refused(e, Code::PermissionDenied, &["rank 1"]);
        assert!(job.snapshot() == before, "the run directory changed");

        let reply = upload(&client, &r0, &good).await.unwrap();
        assert!(reply.path.ends_with("step_00000003"), "{}", reply.path);
        assert_eq!(job.checkpoint_steps(), [0, 3]);
    });
}

#[test]
fn only_the_step_the_job_reached_may_be_uploaded() {
    let job = Job::new("steps", 1);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let reg = register(&client).await;
        report_steps(&client, &reg, 0..5).await.unwrap();
        let before = job.snapshot();
        let refuse = |step: i64, code: Code, words: &'static [&'static str]| {
            let (client, reg, files) = (client.clone(), reg.clone(), job.checkpoint(step, |_| {}));
            let before = &before;
            let job = &job;
            async move {
                let e = upload(&client, &reg, &files).await.unwrap_err();
                refused(e, code, words);
                assert!(
                    job.snapshot() == *before,
                    "the upload of step {step} changed the run directory"
                );
            }
        };
        // The past: an older step, and the step of the newest checkpoint.
        refuse(3, Code::FailedPrecondition, &["step 3", "reached step 5"]).await;
        refuse(0, Code::FailedPrecondition, &["step 0", "reached step 5"]).await;
        refuse(-1, Code::FailedPrecondition, &["step -1"]).await;
        // Beyond the job's steps: refused at once.
        let began = Instant::now();
        refuse(
            i64::MAX,
            Code::InvalidArgument,
            &["9223372036854775807", "300 steps"],
        )
        .await;
        refuse(STEPS + 1, Code::InvalidArgument, &["step 301", "300 steps"]).await;
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        // A future step: refused once the rows it needs are not in by the
        // deadline.
        refuse(7, Code::FailedPrecondition, &["step 7", "reached step 5"]).await;
        assert_eq!(job.checkpoint_steps(), [0]);

        // The upload that waits for the rows still in flight is taken.
        let due = job.checkpoint(7, |_| {});
        let (uploaded, rows) = tokio::join!(upload(&client, &reg, &due), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            report_steps(&client, &reg, 5..7).await
        });
        rows.unwrap();
        let reply = uploaded.unwrap();
        assert!(reply.path.ends_with("step_00000007"), "{}", reply.path);
        let loaded = ckpt::load(
            &ckpt::step_dir(&job.run, 7),
            &sharedmoe::model::param_specs(&job.cfg.model),
            ckpt::Purpose::Resume,
        )
        .unwrap();
        assert_eq!(loaded.state.step, 7);
        assert_eq!(job.checkpoint_steps(), [0, 7]);
        // Once written, the step is in the past.
        let before = job.snapshot();
        let e = upload(&client, &reg, &due).await.unwrap_err();
        refused(e, Code::FailedPrecondition, &["step 7"]);
        assert!(
            job.snapshot() == before,
            "the second upload changed the run"
        );
    });
}

/// `files` with `value` written over the first `count` values of every
/// tensor of `file` (all of them for `usize::MAX`), and state.json's digest
/// of it updated: what a hostile worker can send, since `ckpt::to_files`
/// refuses to write non-finite values.
fn poisoned(mut files: CheckpointFiles, file: &str, count: usize, value: f32) -> CheckpointFiles {
    let bytes = &files.files.iter().find(|(n, _)| n == file).unwrap().1;
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut data = v.data().to_vec();
            for c in data.chunks_exact_mut(4).take(count) {
                c.copy_from_slice(&value.to_le_bytes());
            }
            (n, v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d);
            (n.clone(), v.unwrap())
        })
        .collect();
    let new = safetensors::serialize(views, &None).unwrap();
    let digest = sharedmoe::ckpt::integrity::FileDigest::of(&new);
    for (name, b) in files.files.iter_mut() {
        if name == file {
            *b = new.clone();
        } else if name == "state.json" {
            let mut state: serde_json::Value = serde_json::from_slice(b).unwrap();
            state["files"][file] = serde_json::to_value(&digest).unwrap();
            *b = serde_json::to_vec(&state).unwrap();
        }
    }
    files
}

#[test]
fn non_finite_checkpoints_are_refused() {
    let job = Job::new("nan", 1);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let reg = register(&client).await;
        report_steps(&client, &reg, 0..2).await.unwrap();
        let before = job.snapshot();
        let good = job.checkpoint(2, |_| {});
        let nan_weights = poisoned(good.clone(), "model.safetensors", usize::MAX, f32::NAN);
        let inf_moment = poisoned(good.clone(), "optimizer.safetensors", 1, f32::INFINITY);
        for bad in [nan_weights, inf_moment] {
            let e = upload(&client, &reg, &bad).await.unwrap_err();
            refused(e, Code::InvalidArgument, &["non-finite"]);
            assert!(job.snapshot() == before, "the run directory changed");
        }
        upload(&client, &reg, &good).await.unwrap();
        assert_eq!(job.checkpoint_steps(), [0, 2]);
    });
}

fn metrics_lines(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn metrics_rows_are_single_line_json_objects_in_step_order() {
    let job = Job::new("rows", 1);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let reg = register(&client).await;
        let send = |step: i64, json: &str| send_rows(&client, &reg, vec![(step, json.to_string())]);
        // Valid JSON, but the raw line breaks would split the row.
        for raw in ["{\"step\":0,\n\"loss\":2.5}", "{\"step\":0,\r\"loss\":2.5}"] {
            let e = send(0, raw).await.unwrap_err();
            refused(e, Code::InvalidArgument, &["newline"]);
        }
        let e = send(0, r#"{"step":0}{"step":1}"#).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = send(0, r#"{"step":4}"#).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(metrics_lines(&job.run).is_empty());

        report_steps(&client, &reg, 0..2).await.unwrap();
        // A jump and a repeat.
        let e = report_steps(&client, &reg, 3..4).await.unwrap_err();
        refused(e, Code::InvalidArgument, &["step 3", "expected step 2"]);
        let e = report_steps(&client, &reg, 1..2).await.unwrap_err();
        refused(e, Code::InvalidArgument, &["step 1", "expected step 2"]);
        report_steps(&client, &reg, 2..3).await.unwrap();

        let steps: Vec<i64> = metrics_lines(&job.run)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v.is_object(), "{l}");
                v["step"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(steps, [0, 1, 2]);
    });
}

async fn kv_put(
    client: &Client,
    reg: &RegisterReply,
    key: &str,
    value: Vec<u8>,
) -> Result<(), tonic::Status> {
    let req = KvPutRequest {
        job_id: reg.job_id.clone(),
        worker_id: reg.worker_id,
        attempt: reg.attempt,
        key: key.into(),
        value,
    };
    client.clone().kv_put(req).await.map(|_| ())
}

#[test]
fn the_key_value_store_is_capped_and_the_coordinator_keeps_serving() {
    let job = Job::new("kv", 1);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let reg = register(&client).await;
        let big = vec![7u8; 4 << 20];
        let mut stored = 0;
        let e = loop {
            match kv_put(&client, &reg, &format!("k{stored}"), big.clone()).await {
                Ok(()) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored <= 20, "{} MiB stored without a cap", stored * 4);
        };
        refused(e, Code::ResourceExhausted, &["64 MiB"]);
        // 15 values of 4 MiB and their keys fit in 64 MiB; a 16th does not.
        assert_eq!(stored, 15);
        // Overwriting a key replaces its bytes in the count.
        kv_put(&client, &reg, "k0", big.clone()).await.unwrap();
        kv_put(&client, &reg, "small", b"cursor".to_vec())
            .await
            .unwrap();
        let got = client
            .clone()
            .kv_get(KvGetRequest {
                job_id: reg.job_id.clone(),
                worker_id: reg.worker_id,
                attempt: reg.attempt,
                key: "small".into(),
                timeout_ms: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, b"cursor");
        client.clone().ping(PingRequest { nonce: 5 }).await.unwrap();
        assert!(!job.log().contains("panicked"), "{}", job.log());
    });
}

/// Once the job is over, heartbeats say STOP and whether it succeeded, and
/// a late Register is refused with a typed detail saying how it ended:
/// workers act on these fields, never on the messages.
#[test]
fn after_the_end_workers_are_told_how_the_job_ended_in_typed_fields() {
    let job = Job::new("over", 1);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let reg = register(&client).await;
        // A diverged step ends the job as failed.
        client
            .clone()
            .finish(FinishRequest {
                job_id: reg.job_id.clone(),
                worker_id: reg.worker_id,
                attempt: reg.attempt,
                outcome: Outcome::Diverged as i32,
                step: 0,
                message: "the loss is NaN".into(),
            })
            .await
            .unwrap();
        let beat = client
            .clone()
            .heartbeat(HeartbeatRequest {
                job_id: reg.job_id.clone(),
                worker_id: reg.worker_id,
                attempt: reg.attempt,
                step: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(beat.command, Beat::Stop as i32, "{beat:?}");
        assert!(!beat.job_ok, "{beat:?}");
        let e = client
            .clone()
            .register(RegisterRequest {
                host: "late".into(),
                backend: "cpu".into(),
                local_devices: 1,
                pid: std::process::id(),
                want_rank: -1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let over = job_over(&e).expect("a JobOver detail");
        assert!(!over.ok, "{over:?}");
        assert!(over.message.contains("the loss is NaN"), "{over:?}");
    });
}

#[test]
fn zero_workers_is_refused_with_a_message_not_a_panic() {
    let dir = scratch("zero");
    let run = dir.join("run");
    let run = run.to_str().unwrap();
    for (flag, args) in [
        ("--workers", vec!["coordinator", "--workers", "0"]),
        ("--local", vec!["launch", "--local", "0"]),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .args(["--config", CONFIG, "--run-dir", run])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The coordinator holds its run directory's lock: neither a second
/// coordinator nor a `train` may write there while it serves.
#[test]
fn the_coordinators_run_directory_is_locked() {
    let job = Job::new("lock", 1);
    rt().block_on(async {
        // Serving: the lock is taken before the coordinator listens.
        connect(&job.addr)
            .await
            .ping(PingRequest { nonce: 1 })
            .await
            .unwrap();
    });
    let before = job.snapshot();
    let run = job.run.to_str().unwrap();
    let pid = format!("coordinator pid {}", job.coord.id());
    for args in [
        vec![
            "coordinator",
            "--config",
            CONFIG,
            "--set",
            "train.replicas=2",
            "--workers",
            "1",
        ],
        vec![
            "train",
            "--config",
            CONFIG,
            "--set",
            "train.steps=2",
            "--set",
            "train.warmup_steps=1",
        ],
    ] {
        let mut args = args;
        let dir_flag = format!("run.dir={run}");
        if args[0] == "coordinator" {
            args.extend(["--run-dir", run]);
        } else {
            args.extend(["--set", &dir_flag]);
        }
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {err}", args[0]);
        assert!(
            err.contains(&format!("is in use by {pid}")),
            "{}: {err}",
            args[0]
        );
    }
    assert!(job.snapshot() == before, "the run directory changed");
}
