//! The job as the coordinator sees it: which workers belong to which
//! attempt, where the attempt starts, and the small shared stores
//! (key-value, barriers, host all-reduce). Bookkeeping behind one mutex:
//! no I/O and no waiting (the gRPC handlers wait on `tick` for changes).
//! It is not transport-free, though: its checks refuse with the
//! `tonic::Status` the handlers return as is, so the status codes the
//! workers (and the tests) see are chosen here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use tonic::{Code, Status};

use crate::dist::proto::{refusal, JobOver, Refusal};
use crate::dist::shard_transfer::ShardUpload;
use crate::dist::transfer::CheckpointFiles;

#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Waiting for all workers to register for `attempt`.
    Gathering,
    Running,
    /// The job is over; `ok` says whether it succeeded.
    Over {
        ok: bool,
        message: String,
    },
}

impl Phase {
    /// Once the job is over, the refusal of any request:
    /// FAILED_PRECONDITION with a typed [`Refusal`] detail that workers act
    /// on (the message is for logs).
    pub fn refuse_if_over(&self) -> Result<(), Status> {
        match self {
            Phase::Over { ok, message } => Err(job_over(*ok, message)),
            _ => Ok(()),
        }
    }
}

fn job_over(ok: bool, message: &str) -> Status {
    let detail = Refusal {
        reason: Some(refusal::Reason::JobOver(JobOver {
            ok,
            message: message.to_string(),
        })),
    };
    Status::with_details(
        Code::FailedPrecondition,
        format!("the job is over: {message}"),
        detail.encode_to_vec().into(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    Done,
    Preempted,
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub rank: u32,
    pub attempt: u32,
    pub host: String,
    pub pid: u32,
    pub last_seen: Instant,
    pub step: i64,
    pub finished: Option<Finished>,
}

/// The key-value store's total size (keys and values). It holds data
/// cursors and PJRT topology, kilobytes per worker; the cap keeps workers
/// from growing the coordinator's memory without bound.
pub const KV_MAX_BYTES: usize = 64 << 20;

/// An attempt's key-value store and its size in bytes.
#[derive(Default)]
pub struct Kv {
    entries: HashMap<String, Vec<u8>>,
    bytes: usize,
}

impl Kv {
    /// Sets `key` (replacing its value and that value's bytes), unless the
    /// store would outgrow [`KV_MAX_BYTES`].
    pub fn put(&mut self, key: String, value: Vec<u8>) -> Result<(), Status> {
        let replaced = self.entries.get(&key).map_or(0, |v| key.len() + v.len());
        let bytes = self.bytes - replaced + key.len() + value.len();
        if bytes > KV_MAX_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the key-value store is capped at {} MiB (keys and values): setting `{key}` ({} bytes) would make it {bytes} bytes",
                KV_MAX_BYTES >> 20,
                value.len()
            )));
        }
        self.bytes = bytes;
        self.entries.insert(key, value);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Vec<u8>> {
        self.entries.get(key)
    }

    /// Keys and values, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// One all-reduce: each rank's part, then the sum.
#[derive(Default)]
pub struct Reduction {
    pub len: usize,
    pub parts: BTreeMap<u32, Vec<f32>>,
    pub result: Option<Arc<Vec<f32>>>,
    pub fetched: HashSet<u32>,
}

/// One checkpoint's shards, gathered from every rank (UploadShards); then
/// the outcome of storing it, which every rank is told.
pub struct Gathering {
    pub step: i64,
    /// Each rank's upload, by rank.
    pub parts: BTreeMap<u32, ShardUpload>,
    /// Values in all parts (the job's checkpoint size limit).
    pub values: u64,
    /// The stored checkpoint's directory, or the refusal (code and
    /// message: a Status is not Clone).
    pub result: Option<Result<PathBuf, (Code, String)>>,
    pub fetched: HashSet<u32>,
}

pub struct State {
    pub attempt: u32,
    pub phase: Phase,
    pub restarts: u32,
    pub next_worker_id: u64,
    pub workers: HashMap<u64, Worker>,
    /// The newest valid checkpoint (what an attempt starts from).
    pub latest: Option<Arc<CheckpointFiles>>,
    /// What the running attempt started from.
    pub start: Option<Arc<CheckpointFiles>>,
    /// Steps the running attempt has done, from rank 0's metrics rows: the
    /// rows of steps `start..reached` are in. The step a checkpoint must be
    /// of.
    pub reached: i64,
    pub kv: Kv,
    pub barriers: HashMap<String, HashSet<u64>>,
    pub reductions: BTreeMap<i64, Reduction>,
    /// The checkpoint whose shards are coming in, or whose outcome not
    /// every rank has fetched yet.
    pub gathering: Option<Gathering>,
    /// Why the previous attempt ended (told to its workers).
    pub abort_reason: String,
    /// When the job ended (to let workers hear STOP before exiting).
    pub over_since: Option<Instant>,
}

impl State {
    pub fn new(latest: Option<Arc<CheckpointFiles>>) -> State {
        State {
            attempt: 0,
            phase: Phase::Gathering,
            restarts: 0,
            next_worker_id: 1,
            workers: HashMap::new(),
            latest,
            start: None,
            reached: 0,
            kv: Kv::default(),
            barriers: HashMap::new(),
            reductions: BTreeMap::new(),
            gathering: None,
            abort_reason: String::new(),
            over_since: None,
        }
    }

    /// Workers of the current attempt.
    pub fn members(&self) -> impl Iterator<Item = (&u64, &Worker)> {
        let a = self.attempt;
        self.workers.iter().filter(move |(_, w)| w.attempt == a)
    }

    pub fn member_count(&self) -> usize {
        self.members().count()
    }

    /// The worker `id` of the current attempt, or the status to refuse
    /// its request with.
    pub fn member(
        &self,
        job_id: &str,
        my_job: &str,
        id: u64,
        attempt: u32,
    ) -> Result<&Worker, Status> {
        if job_id != my_job {
            return Err(Status::failed_precondition(format!(
                "job `{job_id}` is not this coordinator's job (`{my_job}`): register again"
            )));
        }
        let w = self
            .workers
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("unknown worker {id}")))?;
        if w.attempt != self.attempt || attempt != self.attempt {
            return Err(Status::aborted(format!(
                "attempt {attempt} is over ({}); register again",
                self.abort_reason
            )));
        }
        self.phase.refuse_if_over()?;
        Ok(w)
    }

    /// Refuses a checkpoint of `step` from `rank` that no metrics row still
    /// in flight can make due: only rank 0 uploads whole checkpoints
    /// (UploadCheckpoint; workers send shards, see
    /// [`check_step`](Self::check_step)); never a step beyond the job's end, behind
    /// the step reached, or not after the newest checkpoint (so a worker
    /// cannot make keep-K pruning delete good checkpoints). A step ahead of
    /// the one reached waits for [`check_due`](Self::check_due).
    pub fn check_upload(&self, rank: u32, step: i64, total_steps: i64) -> Result<(), Status> {
        if rank != 0 {
            return Err(Status::permission_denied(format!(
                "rank {rank} may not upload checkpoints: rank 0 does"
            )));
        }
        self.check_step(step, total_steps)
    }

    /// [`check_upload`](Self::check_upload)'s checks of the step, for
    /// uploads any rank makes (UploadShards).
    pub fn check_step(&self, step: i64, total_steps: i64) -> Result<(), Status> {
        if step > total_steps {
            return Err(Status::invalid_argument(format!(
                "checkpoint for step {step}: the job has {total_steps} steps"
            )));
        }
        let newest = self.latest.as_ref().map(|c| c.step);
        if step < self.reached || newest.is_some_and(|n| step <= n) {
            return Err(Status::failed_precondition(format!(
                "checkpoint for step {step} is in the past: {}",
                self.progress()
            )));
        }
        Ok(())
    }

    /// A checkpoint is of the step reached: rank 0 uploads it after its
    /// metrics row of the step before (`run_steps`).
    pub fn check_due(&self, step: i64) -> Result<(), Status> {
        if step != self.reached {
            return Err(Status::failed_precondition(format!(
                "checkpoint for step {step} is ahead of the job: {}",
                self.progress()
            )));
        }
        Ok(())
    }

    /// Refuses a metrics row other than rank 0's of the next step: the rows
    /// are what the step reached is counted from.
    pub fn check_row(&self, rank: u32, step: i64, total_steps: i64) -> Result<(), Status> {
        if rank != 0 {
            return Err(Status::permission_denied(format!(
                "rank {rank} may not report metrics: rank 0 does"
            )));
        }
        if step != self.reached {
            return Err(Status::invalid_argument(format!(
                "metrics row for step {step} out of sequence: expected step {}",
                self.reached
            )));
        }
        if step >= total_steps {
            return Err(Status::invalid_argument(format!(
                "metrics row for step {step}: the job has {total_steps} steps"
            )));
        }
        Ok(())
    }

    fn progress(&self) -> String {
        match &self.latest {
            Some(c) => format!(
                "the job has reached step {}, its newest checkpoint is step {}",
                self.reached, c.step
            ),
            None => format!(
                "the job has reached step {}, with no checkpoint yet",
                self.reached
            ),
        }
    }

    /// Adds `rank`'s shards of checkpoint `up.step`. Refuses a second
    /// upload from one rank, shards of another step while one is being
    /// gathered, and more than `max_values` values in all. Returns every
    /// rank's upload once all `world` are in (the caller stores the
    /// checkpoint and reports with [`shards_stored`](Self::shards_stored)).
    pub fn add_shards(
        &mut self,
        up: ShardUpload,
        world: u32,
        max_values: u64,
    ) -> Result<Option<BTreeMap<u32, ShardUpload>>, Status> {
        let (rank, step) = (up.rank, up.step);
        if let Some(g) = &self.gathering {
            if g.step != step && g.result.is_none() {
                return Err(Status::failed_precondition(format!(
                    "rank {rank} sent shards of step {step} while the checkpoint of step {} is being gathered",
                    g.step
                )));
            }
            if g.step == step && (g.result.is_some() || g.parts.contains_key(&rank)) {
                return Err(Status::already_exists(format!(
                    "rank {rank} sent its shards of step {step} twice"
                )));
            }
        }
        if self.gathering.as_ref().map_or(true, |g| g.step != step) {
            self.gathering = Some(Gathering {
                step,
                parts: BTreeMap::new(),
                values: 0,
                result: None,
                fetched: HashSet::new(),
            });
        }
        let g = self.gathering.as_mut().expect("set above");
        let values = g.values + up.shards.iter().map(|s| s.values.len() as u64).sum::<u64>();
        if values > max_values {
            return Err(Status::resource_exhausted(format!(
                "the ranks' shards of step {step} hold {values} values, more than the {max_values} this model's checkpoints hold"
            )));
        }
        g.values = values;
        g.parts.insert(rank, up);
        if g.parts.len() < world as usize {
            return Ok(None);
        }
        g.values = 0;
        Ok(Some(std::mem::take(&mut g.parts)))
    }

    /// Records how storing the gathered checkpoint of `step` ended (unless
    /// the attempt has moved on meanwhile).
    pub fn shards_stored(&mut self, step: i64, result: &Result<PathBuf, Status>) {
        if let Some(g) = self.gathering.as_mut().filter(|g| g.step == step) {
            g.result = Some(match result {
                Ok(p) => Ok(p.clone()),
                Err(e) => Err((e.code(), e.message().to_string())),
            });
        }
    }

    /// The outcome for `rank` of the checkpoint of `step`, once stored;
    /// forgets it after every rank has fetched it.
    pub fn take_stored(
        &mut self,
        step: i64,
        rank: u32,
        world: u32,
    ) -> Option<Result<PathBuf, Status>> {
        let g = self.gathering.as_mut().filter(|g| g.step == step)?;
        let result = g.result.clone()?;
        g.fetched.insert(rank);
        if g.fetched.len() == world as usize {
            self.gathering = None;
        }
        Some(result.map_err(|(code, message)| Status::new(code, message)))
    }

    /// Lowest free rank, or `want` when it is free.
    pub fn assign_rank(&self, want: i32, world: u32) -> Result<u32, Status> {
        let taken: HashSet<u32> = self.members().map(|(_, w)| w.rank).collect();
        if want >= 0 {
            let want = want as u32;
            if want >= world {
                return Err(Status::invalid_argument(format!(
                    "rank {want} asked for, but the job has {world} workers (ranks 0..{})",
                    world - 1
                )));
            }
            if taken.contains(&want) {
                return Err(Status::already_exists(format!("rank {want} is taken")));
            }
            return Ok(want);
        }
        Ok((0..world)
            .find(|r| !taken.contains(r))
            .expect("a free rank below world"))
    }

    /// Ends the current attempt; the next one gathers its workers again,
    /// or the job fails when restarts are used up.
    pub fn restart(&mut self, reason: String, max_restarts: u32) {
        self.restarts += 1;
        self.kv.clear();
        self.barriers.clear();
        self.reductions.clear();
        self.gathering = None;
        self.start = None;
        if self.restarts > max_restarts {
            tracing::error!("{reason}; giving up after {max_restarts} restarts");
            self.end(
                false,
                format!("{reason}; gave up after {max_restarts} restarts"),
            );
            return;
        }
        tracing::warn!(
            "{reason}: aborting attempt {} and restarting from the last checkpoint (restart {} of {max_restarts})",
            self.attempt,
            self.restarts
        );
        self.abort_reason = reason;
        self.attempt += 1;
        self.phase = Phase::Gathering;
    }

    pub fn end(&mut self, ok: bool, message: String) {
        if !matches!(self.phase, Phase::Over { .. }) {
            self.phase = Phase::Over { ok, message };
            self.over_since = Some(Instant::now());
        }
    }

    /// Adds `rank`'s part to reduction `seq`; computes the sum (in rank
    /// order, so it is the same bits whatever the arrival order) once all
    /// `world` parts are in.
    pub fn add_part(
        &mut self,
        seq: i64,
        rank: u32,
        part: Vec<f32>,
        world: u32,
    ) -> Result<(), Status> {
        if let Some((other, _)) = self
            .reductions
            .iter()
            .find(|(s, r)| **s != seq && r.result.is_none())
        {
            return Err(Status::failed_precondition(format!(
                "rank {rank} sent all-reduce {seq} while all-reduce {other} is incomplete"
            )));
        }
        let r = self.reductions.entry(seq).or_default();
        if r.parts.is_empty() && r.result.is_none() {
            r.len = part.len();
        } else if part.len() != r.len {
            return Err(Status::invalid_argument(format!(
                "rank {rank} sent {} values to all-reduce {seq}, the others {}",
                part.len(),
                r.len
            )));
        }
        if r.result.is_some() || r.parts.contains_key(&rank) {
            return Err(Status::already_exists(format!(
                "rank {rank} sent all-reduce {seq} twice"
            )));
        }
        r.parts.insert(rank, part);
        if r.parts.len() == world as usize {
            let mut parts = std::mem::take(&mut r.parts).into_values();
            let mut sum = parts.next().expect("world >= 1 parts");
            for p in parts {
                sum.iter_mut().zip(&p).for_each(|(s, x)| *s += x);
            }
            r.result = Some(Arc::new(sum));
        }
        Ok(())
    }

    /// The sum of reduction `seq` once complete; forgets it after every
    /// rank has fetched it.
    pub fn take_result(&mut self, seq: i64, rank: u32, world: u32) -> Option<Arc<Vec<f32>>> {
        let r = self.reductions.get_mut(&seq)?;
        let result = r.result.clone()?;
        r.fetched.insert(rank);
        if r.fetched.len() == world as usize {
            self.reductions.remove(&seq);
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_rank_order_whatever_the_arrival_order() {
        // 1e8 + 1 - 1e8 in f32 depends on the order of addition.
        let parts = [vec![1e8f32], vec![1.0], vec![-1e8]];
        let mut results = vec![];
        for order in [[0u32, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut st = State::new(None);
            for &r in &order {
                st.add_part(5, r, parts[r as usize].clone(), 3).unwrap();
            }
            let got = st.take_result(5, 0, 3).unwrap();
            results.push(got[0]);
        }
        assert_eq!(results, vec![(1e8f32 + 1.0) - 1e8; 3]);
    }

    #[test]
    fn reductions_refuse_mismatches_and_are_forgotten_once_fetched() {
        let mut st = State::new(None);
        st.add_part(0, 0, vec![1.0, 2.0], 2).unwrap();
        assert!(st.add_part(0, 1, vec![1.0], 2).is_err());
        assert!(st.add_part(0, 0, vec![1.0, 2.0], 2).is_err());
        assert!(st.add_part(1, 1, vec![1.0, 2.0], 2).is_err());
        assert!(st.take_result(0, 0, 2).is_none());
        st.add_part(0, 1, vec![3.0, 4.0], 2).unwrap();
        assert_eq!(*st.take_result(0, 0, 2).unwrap(), vec![4.0, 6.0]);
        assert!(st.reductions.contains_key(&0));
        st.take_result(0, 1, 2).unwrap();
        assert!(st.reductions.is_empty());
    }
    #[test]
    fn the_key_value_store_counts_keys_and_values_and_replaces_on_overwrite() {
        let mut kv = Kv::default();
        kv.put("a".into(), vec![0; 10]).unwrap();
        kv.put("a".into(), vec![0; 4]).unwrap();
        assert_eq!(kv.bytes(), 5);
        kv.put("big".into(), vec![0; KV_MAX_BYTES - 8]).unwrap();
        assert_eq!(kv.bytes(), KV_MAX_BYTES);
        let e = kv.put("b".into(), vec![]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(kv.bytes(), KV_MAX_BYTES);
        // Shrinking a value makes room.
        kv.put("a".into(), vec![]).unwrap();
        kv.put("b".into(), vec![]).unwrap();
        assert_eq!(kv.bytes(), KV_MAX_BYTES - 3);
        kv.clear();
        assert_eq!((kv.bytes(), kv.get("a")), (0, None));
    }

    #[test]
    fn only_rank_0_uploads_and_only_the_step_reached_after_the_newest_checkpoint() {
        let mut st = State::new(Some(Arc::new(CheckpointFiles {
            step: 10,
            files: vec![],
        })));
        st.reached = 12;
        let code = |r: Result<(), Status>| r.map_err(|e| e.code());
        assert_eq!(code(st.check_upload(0, 12, 100)), Ok(()));
        assert_eq!(code(st.check_due(12)), Ok(()));
        assert_eq!(
            code(st.check_upload(1, 12, 100)),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            code(st.check_upload(0, 11, 100)),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            code(st.check_upload(0, i64::MIN, 100)),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            code(st.check_upload(0, i64::MAX, 100)),
            Err(Code::InvalidArgument)
        );
        // Ahead: may become due when the rows in flight arrive.
        assert_eq!(code(st.check_upload(0, 14, 100)), Ok(()));
        assert_eq!(code(st.check_due(14)), Err(Code::FailedPrecondition));
        // The step of the newest checkpoint is in the past.
        st.reached = 10;
        assert_eq!(
            code(st.check_upload(0, 10, 100)),
            Err(Code::FailedPrecondition)
        );
    }

    #[test]
    fn shards_are_gathered_once_per_rank_and_the_outcome_told_to_every_rank() {
        use crate::ckpt::shards::{Group, Shard, ShardIndex};
        let up = |rank: u32, step: i64, n: usize| ShardUpload {
            step,
            rank,
            state: None,
            shards: vec![Shard {
                group: Group::Params,
                name: format!("t{rank}"),
                index: ShardIndex::whole(),
                values: vec![0.0; n],
            }],
        };
        let code = |r: Result<Option<BTreeMap<u32, ShardUpload>>, Status>| {
            r.map(|_| ()).map_err(|e| e.code())
        };
        let mut st = State::new(None);
        assert!(st.add_shards(up(1, 4, 2), 2, 10).unwrap().is_none());
        assert_eq!(
            code(st.add_shards(up(1, 4, 2), 2, 10)),
            Err(Code::AlreadyExists)
        );
        assert_eq!(
            code(st.add_shards(up(0, 5, 2), 2, 10)),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            code(st.add_shards(up(0, 4, 9), 2, 10)),
            Err(Code::ResourceExhausted)
        );
        let parts = st.add_shards(up(0, 4, 2), 2, 10).unwrap().unwrap();
        assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert!(st.take_stored(4, 0, 2).is_none(), "not stored yet");
        st.shards_stored(4, &Err(Status::invalid_argument("tensor `t1` missing")));
        // Late shards of the step are not gathered again.
        assert_eq!(
            code(st.add_shards(up(1, 4, 2), 2, 10)),
            Err(Code::AlreadyExists)
        );
        for rank in [1, 0] {
            let e = st.take_stored(4, rank, 2).unwrap().unwrap_err();
            assert_eq!(
                (e.code(), e.message()),
                (Code::InvalidArgument, "tensor `t1` missing")
            );
        }
        assert!(st.gathering.is_none());
        // A restart forgets a gathering in progress.
        st.add_shards(up(0, 4, 2), 2, 10).unwrap();
        st.restart("lost".into(), 3);
        assert!(st.gathering.is_none());
    }

    #[test]
    fn metrics_rows_come_from_rank_0_in_step_order_within_the_job() {
        let mut st = State::new(None);
        st.reached = 3;
        let code = |r: Result<(), Status>| r.map_err(|e| e.code());
        assert_eq!(code(st.check_row(0, 3, 4)), Ok(()));
        assert_eq!(code(st.check_row(1, 3, 4)), Err(Code::PermissionDenied));
        assert_eq!(code(st.check_row(0, 2, 4)), Err(Code::InvalidArgument));
        assert_eq!(code(st.check_row(0, 4, 4)), Err(Code::InvalidArgument));
        st.reached = 4;
        assert_eq!(code(st.check_row(0, 4, 4)), Err(Code::InvalidArgument));
    }
}
