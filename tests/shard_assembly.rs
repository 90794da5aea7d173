//! The coordinator's shard assembly (issue 17): in a multi-process job
//! every rank sends its shards of a checkpoint (UploadShards) and the
//! coordinator assembles, verifies and writes them. Raw gRPC clients
//! against a real coordinator process on 127.0.0.1:
//! - two ranks' shards (halves of the tensors that split, whole tensors
//!   round robin otherwise) make one checkpoint that loads equal to the
//!   original;
//! - a missing shard and a duplicated shard are refused, to both ranks,
//!   naming the tensor, and nothing is written;
//! - the training state comes from rank 0 only, and a rank is who it
//!   registered as;
//! - a rank whose shards never come does not hang the others: the lost
//!   worker aborts the attempt.

mod grpc;

use std::time::{Duration, Instant};

use sharedmoe::ckpt::shards::{round_robin, Group, Shard, ShardIndex};
use sharedmoe::ckpt::{self, Checkpoint};
use sharedmoe::dist::proto::{RegisterReply, UploadCheckpointReply};
use sharedmoe::dist::shard_transfer::ShardUpload;
use tonic::{Code, Status};

use grpc::{connect, register, report_steps, rt, snapshot_dir, upload_shards, Client};

/// A two-worker coordinator of the tiny config whose run directory starts
/// with a step-0 checkpoint.
use grpc::CoordinatorJob as Job;

impl Job {
    fn new(name: &str, heartbeat_timeout_s: u32) -> Job {
        let dir =
            std::env::temp_dir().join(format!("sharedmoe-shards-{}-{name}", std::process::id()));
        Job::start(dir, 2, heartbeat_timeout_s)
    }

    fn specs(&self) -> Vec<sharedmoe::model::ParamSpec> {
        sharedmoe::model::param_specs(&self.cfg.model)
    }

    /// The step-0 checkpoint renumbered to `step`, with moments that are
    /// not all zero (so that a misplaced moment shows).
    fn checkpoint(&self, step: i64) -> Checkpoint {
        let dir = ckpt::step_dir(&self.run, 0);
        let mut c = ckpt::load(&dir, &self.specs(), ckpt::Purpose::Resume).unwrap();
        c.state.step = step;
        c.state.files.clear();
        for ((_, _, p), ((_, _, m), (_, _, v))) in c
            .params
            .iter()
            .zip(c.adam_m.iter_mut().zip(c.adam_v.iter_mut()))
        {
            for (i, x) in p.iter().enumerate() {
                m[i] = 0.1 * x + i as f32 * 1e-6;
                v[i] = x * x + 1e-3;
            }
        }
        c
    }
}

async fn register_both(client: &Client) -> (RegisterReply, RegisterReply) {
    let (a, b) = tokio::join!(register(client), register(client));
    if a.rank == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

/// Rank `rank`'s shards of `c` as an FSDP-style trainer would hold them:
/// tensors whose first dim is even are split in two along it, each rank
/// sending its half; the others go whole to one rank, round robin.
fn halves(c: &Checkpoint, rank: usize) -> Vec<Shard> {
    let mut out = vec![];
    let mut whole = 0;
    for (group, tensors) in [
        (Group::Params, &c.params),
        (Group::AdamM, &c.adam_m),
        (Group::AdamV, &c.adam_v),
    ] {
        for (name, dims, values) in tensors {
            let index = if dims.first().is_some_and(|d| d % 2 == 0) {
                ShardIndex {
                    dim: 0,
                    index: rank,
                    parts: 2,
                }
            } else {
                whole += 1;
                if whole % 2 != rank {
                    continue;
                }
                ShardIndex::whole()
            };
            out.push(Shard {
                group,
                name: name.clone(),
                index,
                values: index.slice(dims, values).unwrap(),
            });
        }
    }
    out
}

fn upload(step: i64, rank: u32, c: Option<&Checkpoint>, shards: Vec<Shard>) -> ShardUpload {
    ShardUpload {
        step,
        rank,
        state: c.map(|c| c.state.clone()),
        shards,
    }
}

/// Both ranks' uploads at once (each waits for the other's).
async fn upload_both(
    client: &Client,
    (r0, r1): (&RegisterReply, &RegisterReply),
    (u0, u1): (ShardUpload, ShardUpload),
) -> (
    Result<UploadCheckpointReply, Status>,
    Result<UploadCheckpointReply, Status>,
) {
    tokio::join!(
        upload_shards(client, r0, &u0),
        upload_shards(client, r1, &u1)
    )
}

/// Asserts that `e` has `code` and a message naming every one of `words`.
fn refused(e: Result<UploadCheckpointReply, Status>, code: Code, words: &[&str]) {
    let e = e.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(e.message().contains(w), "`{w}` not in {e:?}");
    }
}

#[test]
fn two_ranks_shards_make_one_verified_checkpoint_and_a_missing_or_duplicated_one_is_refused_by_name(
) {
    let job = Job::new("assemble", 120);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let (r0, r1) = register_both(&client).await;
        assert_eq!(r1.rank, 1);
        report_steps(&client, &r0, 0..3).await.unwrap();
        let c = job.checkpoint(3);
        let before = snapshot_dir(&job.run);

        // Who may send what, checked before any shard is taken.
        let e = upload_shards(&client, &r1, &upload(3, 1, Some(&c), halves(&c, 1))).await;
        refused(e, Code::PermissionDenied, &["rank 1", "training state"]);
        let e = upload_shards(&client, &r1, &upload(3, 0, Some(&c), halves(&c, 1))).await;
        refused(e, Code::InvalidArgument, &["say rank 0", "is rank 1"]);
        let e = upload_shards(&client, &r0, &upload(3, 0, None, halves(&c, 0))).await;
        refused(
            e,
            Code::InvalidArgument,
            &["rank 0", "without the training state"],
        );

        // Missing: rank 0 leaves out its half of one tensor.
        let mut mine = halves(&c, 0);
        let gone = mine
            .iter()
            .position(|s| s.group == Group::AdamM && s.index.parts == 2)
            .unwrap();
        let name = mine.remove(gone).name;
        let (a, b) = upload_both(
            &client,
            (&r0, &r1),
            (
                upload(3, 0, Some(&c), mine),
                upload(3, 1, None, halves(&c, 1)),
            ),
        )
        .await;
        for e in [a, b] {
            let words = [
                "step 3",
                &format!("adam_m tensor `{name}`"),
                "part 0 of 2 along dim 0 missing",
            ];
            refused(e, Code::InvalidArgument, &words);
        }
        assert!(
            snapshot_dir(&job.run) == before,
            "a refused checkpoint was written"
        );

        // Duplicated: rank 1 also sends rank 0's first shard.
        let theirs = halves(&c, 0);
        let copy = theirs[0].clone();
        let mut mine = halves(&c, 1);
        mine.push(copy.clone());
        let (a, b) = upload_both(
            &client,
            (&r0, &r1),
            (upload(3, 0, Some(&c), theirs), upload(3, 1, None, mine)),
        )
        .await;
        for e in [a, b] {
            let tensor = format!("{} tensor `{}`", copy.group, copy.name);
            let part = format!("{} duplicated", copy.index);
            refused(e, Code::InvalidArgument, &[&tensor, &part]);
        }
        assert!(
            snapshot_dir(&job.run) == before,
            "a refused checkpoint was written"
        );

        // Both halves: one checkpoint, equal to the original.
        let (a, b) = upload_both(
            &client,
            (&r0, &r1),
            (
                upload(3, 0, Some(&c), halves(&c, 0)),
                upload(3, 1, None, halves(&c, 1)),
            ),
        )
        .await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.path.ends_with("step_00000003"), "{}", a.path);
        assert_eq!(a.path, b.path);
        let loaded = ckpt::load(
            &ckpt::step_dir(&job.run, 3),
            &job.specs(),
            ckpt::Purpose::Resume,
        )
        .unwrap();
        assert!(loaded.params == c.params, "params differ");
        assert!(loaded.adam_m == c.adam_m, "adam_m differs");
        assert!(loaded.adam_v == c.adam_v, "adam_v differs");
        let mut state = loaded.state.clone();
        state.files.clear();
        assert_eq!(state, c.state);

        // Round robin, as the workers send it, at the next step.
        report_steps(&client, &r0, 3..5).await.unwrap();
        let c = job.checkpoint(5);
        let (a, b) = upload_both(
            &client,
            (&r0, &r1),
            (
                upload(5, 0, Some(&c), round_robin(&c, 0, 2)),
                upload(5, 1, None, round_robin(&c, 1, 2)),
            ),
        )
        .await;
        assert!(a.unwrap().path.ends_with("step_00000005"));
        b.unwrap();
        let loaded = ckpt::load(
            &ckpt::step_dir(&job.run, 5),
            &job.specs(),
            ckpt::Purpose::Resume,
        )
        .unwrap();
        assert!(loaded.params == c.params && loaded.adam_v == c.adam_v);
    });
}

#[test]
fn a_rank_whose_shards_never_come_aborts_the_attempt_instead_of_hanging() {
    // The raw clients send no heartbeats: both are lost after 3 s.
    let job = Job::new("lost", 3);
    rt().block_on(async {
        let client = connect(&job.addr).await;
        let (r0, r1) = register_both(&client).await;
        report_steps(&client, &r0, 0..1).await.unwrap();
        let c = job.checkpoint(1);
        let began = Instant::now();
        let e = upload_shards(&client, &r1, &upload(1, 1, None, round_robin(&c, 1, 2))).await;
        refused(e, Code::Aborted, &["lost"]);
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(ckpt::list(&job.run).len(), 1, "only step 0's checkpoint");
    });
}
