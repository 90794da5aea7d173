//! The coordinator's gRPC handlers over the shared [`Job`].

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::state::{Finished, Phase, State, Worker};
use super::Job;
use crate::dist::proto::coordinator_server::Coordinator;
use crate::dist::proto::*;
use crate::dist::shard_transfer::{ShardReceiver, ShardUpload};
use crate::dist::transfer::{self, Receiver};
use crate::f32_bytes;
use crate::runtime::Backend;

/// Floats per all-reduce message (4 MiB).
pub const REDUCE_CHUNK: usize = 1 << 20;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct Service {
    pub job: Arc<Job>,
}

/// Unregisters a worker whose Register call was dropped (the worker went
/// away) before its attempt started.
struct PendingRegistration {
    job: Arc<Job>,
    id: u64,
    armed: bool,
}

impl Drop for PendingRegistration {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.job.lock();
            if st.phase == Phase::Gathering
                && st
                    .workers
                    .get(&self.id)
                    .is_some_and(|w| w.attempt == st.attempt)
            {
                st.workers.remove(&self.id);
                tracing::info!("worker {} left before the start", self.id);
            }
            drop(st);
            self.job.bump();
        }
    }
}

/// Register's steps.
impl Service {
    /// Refuses a worker whose backend is unknown or not the job's.
    fn check_backend(&self, backend: &str) -> Result<(), Status> {
        let backend: Backend = backend
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if backend != self.job.backend {
            return Err(Status::invalid_argument(format!(
                "worker backend `{backend}` but the job runs on `{}`",
                self.job.backend
            )));
        }
        Ok(())
    }

    /// Waits for an attempt that is gathering and has a free rank, and
    /// joins it as a new worker: `(worker id, attempt)`. The last worker to
    /// join starts the attempt.
    async fn join_gathering_attempt(&self, r: &RegisterRequest) -> Result<(u64, u32), Status> {
        let world = self.job.world;
        self.job
            .wait_for(None, |st| {
                if let Err(over) = st.phase.refuse_if_over() {
                    return Some(Err(over));
                }
                if st.phase != Phase::Gathering || st.member_count() >= world as usize {
                    return None;
                }
                Some(self.add_worker(st, r))
            })
            .await
            .expect("no timeout")
    }

    /// Adds the registering worker to the gathering attempt (starting it
    /// when the worker is the last one missing).
    fn add_worker(&self, st: &mut State, r: &RegisterRequest) -> Result<(u64, u32), Status> {
        let world = self.job.world;
        let rank = st.assign_rank(r.want_rank, world)?;
        let id = st.next_worker_id;
        st.next_worker_id += 1;
        st.workers.insert(
            id,
            Worker {
                rank,
                attempt: st.attempt,
                host: r.host.clone(),
                pid: r.pid,
                last_seen: Instant::now(),
                step: 0,
                finished: None,
            },
        );
        tracing::info!(
            "worker {id} registered: rank {rank} of {world}, host {} pid {}, {} {} device(s), attempt {}",
            r.host, r.pid, r.local_devices, r.backend, st.attempt
        );
        if st.member_count() == world as usize {
            self.job.start_attempt(st);
        }
        Ok((id, st.attempt))
    }

    /// The start barrier: waits until every worker of `attempt` is in and
    /// the attempt runs, then tells worker `id` its rank and where training
    /// starts.
    async fn start_barrier(&self, id: u64, attempt: u32) -> Result<RegisterReply, Status> {
        let job = &self.job;
        job.wait_for(None, |st| {
            if st.attempt != attempt {
                return Some(Err(Status::aborted(format!(
                    "attempt {attempt} was aborted before it started ({})",
                    st.abort_reason
                ))));
            }
            if let Err(over) = st.phase.refuse_if_over() {
                return Some(Err(over));
            }
            if st.phase != Phase::Running {
                return None;
            }
            let w = st.workers.get(&id)?;
            Some(Ok(RegisterReply {
                job_id: job.job_id.clone(),
                worker_id: id,
                attempt,
                rank: w.rank,
                world: job.world,
                config_toml: job.config_toml.clone(),
                start_step: st.start.as_ref().map_or(0, |c| c.step),
                has_checkpoint: st.start.is_some(),
                heartbeat_interval_ms: job.opts.heartbeat_interval.as_millis() as u32,
            }))
        })
        .await
        .expect("no timeout")
    }
}

/// One worker's vector for one all-reduce, as its stream delivered it.
struct ReducePart {
    /// The first chunk, without its values: who sent the vector, for which
    /// reduction, and how long it is.
    head: ReduceChunk,
    /// The sender's rank (the sum adds the parts in rank order).
    rank: u32,
    values: Vec<f32>,
}

/// AllReduce's steps.
impl Service {
    /// Reads one worker's all-reduce stream, checking every chunk against
    /// the first; the whole vector, or the status that refuses it.
    async fn receive_part(&self, mut stream: Streaming<ReduceChunk>) -> Result<ReducePart, Status> {
        let mut values: Vec<f32> = vec![];
        let mut first: Option<(ReduceChunk, u32)> = None;
        while let Some(c) = stream.next().await {
            let c = c?;
            let rank = match &first {
                None => {
                    let rank = self.check_first_chunk(&c)?;
                    values.reserve(c.total_len as usize);
                    rank
                }
                Some((head, rank)) => {
                    check_next_chunk(head, &c, values.len())?;
                    *rank
                }
            };
            check_chunk_size(&c, values.len())?;
            f32_bytes::extend_from_le_bytes(&mut values, &c.values).expect("length checked");
            if first.is_none() {
                let head = ReduceChunk {
                    values: Vec::new(),
                    ..c
                };
                first = Some((head, rank));
            }
        }
        let (head, rank) =
            first.ok_or_else(|| Status::invalid_argument("empty all-reduce stream"))?;
        if values.len() != head.total_len as usize {
            return Err(Status::invalid_argument(format!(
                "truncated all-reduce: {} of {} values",
                values.len(),
                head.total_len
            )));
        }
        Ok(ReducePart { head, rank, values })
    }

    /// The first chunk of a stream: from a worker of the running attempt,
    /// within the job's size limit, numbered 0. Returns the sender's rank.
    fn check_first_chunk(&self, c: &ReduceChunk) -> Result<u32, Status> {
        let job = &self.job;
        let rank = job
            .lock()
            .member(&c.job_id, &job.job_id, c.worker_id, c.attempt)?
            .rank;
        if c.total_len > job.max_reduce_len {
            return Err(Status::resource_exhausted(format!(
                "all-reduce of {} values; this job's limit is {}",
                c.total_len, job.max_reduce_len
            )));
        }
        if c.seq != 0 {
            return Err(Status::invalid_argument(format!(
                "all-reduce chunk {} out of sequence (expected 0)",
                c.seq
            )));
        }
        Ok(rank)
    }

    /// Adds `values`, `rank`'s part of reduction `head.reduce_seq`, and
    /// waits until every rank's part is in: the sum.
    async fn sum_with_the_others(
        &self,
        head: &ReduceChunk,
        rank: u32,
        values: Vec<f32>,
    ) -> Result<Arc<Vec<f32>>, Status> {
        let job = &self.job;
        let (seq, world) = (head.reduce_seq, job.world);
        {
            let mut st = job.lock();
            st.member(&head.job_id, &job.job_id, head.worker_id, head.attempt)?;
            st.add_part(seq, rank, values, world)?;
        }
        job.bump();
        job.wait_for(None, |st| {
            if let Err(e) = st.member(&head.job_id, &job.job_id, head.worker_id, head.attempt) {
                return Some(Err(e));
            }
            st.take_result(seq, rank, world).map(Ok)
        })
        .await
        .expect("no timeout")
    }
}

/// Devices a shard upload may be cut for: a shard per tensor, group and
/// device, at most.
const MAX_SHARDS_PER_TENSOR: u32 = 3 * 1024;

/// UploadShards's steps.
impl Service {
    /// Reads one rank's shard stream, refusing its header before any data
    /// arrives when the sender may not send it.
    async fn receive_shards(
        &self,
        mut stream: Streaming<ShardChunk>,
    ) -> Result<(ShardHeader, ShardUpload), Status> {
        let job = &self.job;
        let max_shards = MAX_SHARDS_PER_TENSOR.saturating_mul(job.tensor_count() as u32);
        let mut rx = ShardReceiver::new(job.max_checkpoint_bytes / 4, max_shards);
        let mut header = None;
        while let Some(chunk) = stream.next().await {
            rx.push(chunk?)?;
            if header.is_none() {
                let h = rx.header().expect("header accepted");
                job.check_shard_sender(&job.lock(), h)?;
                // Without the state: it is parsed into the upload.
                header = Some(ShardHeader {
                    state_json: vec![],
                    ..h.clone()
                });
            }
        }
        let up = rx.finish()?;
        let h = header.ok_or_else(|| Status::invalid_argument("empty shard upload"))?;
        Ok((h, up))
    }

    /// Adds `up` to the checkpoint being gathered; the upload that
    /// completes it stores it. Waits until it is stored or refused (every
    /// rank gets the same answer), or the attempt is over (a rank lost
    /// meanwhile: ABORTED, as in AllReduce).
    async fn gather_and_store(
        &self,
        from: ShardHeader,
        up: ShardUpload,
    ) -> Result<PathBuf, Status> {
        let job = &self.job;
        let (step, rank, world) = (from.step, from.rank, job.world);
        let complete = {
            let mut st = job.lock();
            st.member(&from.job_id, &job.job_id, from.worker_id, from.attempt)?;
            st.add_shards(up, world, job.max_checkpoint_bytes / 4)?
        };
        job.bump();
        if let Some(parts) = complete {
            let (store, header) = (job.clone(), from.clone());
            let result = tokio::task::spawn_blocking(move || store.store_shards(&header, parts))
                .await
                .unwrap_or_else(|e| Err(Status::internal(format!("checkpoint writer: {e}"))));
            job.lock().shards_stored(step, &result);
            job.bump();
        }
        job.wait_for(None, |st| {
            if let Err(e) = st.member(&from.job_id, &job.job_id, from.worker_id, from.attempt) {
                return Some(Err(e));
            }
            st.take_stored(step, rank, world)
        })
        .await
        .expect("no timeout")
    }
}

/// A chunk after the first (`received` values in): the same sender,
/// reduction and length as `head`, and the next chunk number.
fn check_next_chunk(head: &ReduceChunk, c: &ReduceChunk, received: usize) -> Result<(), Status> {
    fn identity(c: &ReduceChunk) -> (&str, u64, u32, i64, u64) {
        (&c.job_id, c.worker_id, c.attempt, c.reduce_seq, c.total_len)
    }
    if identity(c) != identity(head) {
        return Err(Status::invalid_argument(
            "all-reduce chunks of one call must agree on job, worker, attempt, reduction and length",
        ));
    }
    let expected = (received / REDUCE_CHUNK) as u32;
    if c.seq != expected {
        return Err(Status::invalid_argument(format!(
            "all-reduce chunk {} out of sequence (expected {expected})",
            c.seq
        )));
    }
    Ok(())
}

/// Every chunk holds [`REDUCE_CHUNK`] whole f32 values, but the last,
/// which ends the vector at `total_len` (`received` values in before it).
fn check_chunk_size(c: &ReduceChunk, received: usize) -> Result<(), Status> {
    let n = c.values.len() / 4;
    if c.values.len() % 4 != 0
        || received + n > c.total_len as usize
        || (n != REDUCE_CHUNK && received + n != c.total_len as usize)
    {
        return Err(Status::invalid_argument(format!(
            "all-reduce chunk {} has {} bytes: chunks hold {REDUCE_CHUNK} f32 values but the last",
            c.seq,
            c.values.len()
        )));
    }
    Ok(())
}

/// The sum of reduction `reduce_seq`, cut into chunks as the workers cut
/// their parts.
fn sum_chunks(sum: &[f32], attempt: u32, reduce_seq: i64) -> Vec<Result<ReduceChunk, Status>> {
    let total = sum.len() as u64;
    sum.chunks(REDUCE_CHUNK)
        .enumerate()
        .map(|(i, c)| {
            Ok(ReduceChunk {
                job_id: String::new(),
                worker_id: 0,
                attempt,
                reduce_seq,
                seq: i as u32,
                total_len: total,
                values: f32_bytes::as_le_bytes(c).to_vec(),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            nonce: req.into_inner().nonce,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let r = req.into_inner();
        self.check_backend(&r.backend)?;
        let (id, attempt) = self.join_gathering_attempt(&r).await?;
        // Joining changed the state (and may have started the attempt).
        self.job.bump();
        let mut guard = PendingRegistration {
            job: self.job.clone(),
            id,
            armed: true,
        };
        let reply = self.start_barrier(id, attempt).await?;
        guard.armed = false;
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let job = &self.job;
        let mut st = job.lock();
        if r.job_id != job.job_id {
            return Err(Status::failed_precondition(format!(
                "job `{}` is not this coordinator's job (`{}`): register again",
                r.job_id, job.job_id
            )));
        }
        let current = st.attempt;
        let over = match &st.phase {
            Phase::Over { ok, message } => Some((*ok, message.clone())),
            _ => None,
        };
        let reason = st.abort_reason.clone();
        let w = st
            .workers
            .get_mut(&r.worker_id)
            .ok_or_else(|| Status::not_found(format!("unknown worker {}", r.worker_id)))?;
        let (command, reason, job_ok) = if let Some((ok, message)) = over {
            (Command::Stop, message, ok)
        } else if w.attempt != current || r.attempt != current {
            (Command::Abort, reason, false)
        } else {
            w.last_seen = Instant::now();
            w.step = r.step;
            (Command::Continue, String::new(), false)
        };
        Ok(Response::new(HeartbeatReply {
            command: command as i32,
            reason,
            job_ok,
        }))
    }

    async fn kv_put(&self, req: Request<KvPutRequest>) -> Result<Response<KvPutReply>, Status> {
        let r = req.into_inner();
        if r.key.len() > 1024 || r.value.len() > 4 << 20 {
            return Err(Status::invalid_argument(
                "key-value entries are limited to 1 KiB keys and 4 MiB values",
            ));
        }
        {
            let mut st = self.job.lock();
            st.member(&r.job_id, &self.job.job_id, r.worker_id, r.attempt)?;
            st.kv.put(r.key, r.value)?;
        }
        self.job.bump();
        Ok(Response::new(KvPutReply {}))
    }

    async fn kv_get(&self, req: Request<KvGetRequest>) -> Result<Response<KvGetReply>, Status> {
        let r = req.into_inner();
        let timeout = Duration::from_millis(r.timeout_ms as u64);
        let value = self
            .job
            .wait_for(Some(timeout), |st| {
                if let Err(e) = st.member(&r.job_id, &self.job.job_id, r.worker_id, r.attempt) {
                    return Some(Err(e));
                }
                st.kv.get(&r.key).map(|v| Ok(v.clone()))
            })
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!("key `{}` not set within {timeout:?}", r.key))
            })??;
        Ok(Response::new(KvGetReply { value }))
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> Result<Response<BarrierReply>, Status> {
        let r = req.into_inner();
        let world = self.job.world as usize;
        {
            let mut st = self.job.lock();
            st.member(&r.job_id, &self.job.job_id, r.worker_id, r.attempt)?;
            st.barriers
                .entry(r.name.clone())
                .or_default()
                .insert(r.worker_id);
        }
        self.job.bump();
        let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms as u64));
        self.job
            .wait_for(timeout, |st| {
                if let Err(e) = st.member(&r.job_id, &self.job.job_id, r.worker_id, r.attempt) {
                    return Some(Err(e));
                }
                (st.barriers.get(&r.name).map_or(0, |b| b.len()) >= world).then_some(Ok(()))
            })
            .await
            .map_err(|_| Status::deadline_exceeded(format!("barrier `{}` timed out", r.name)))??;
        Ok(Response::new(BarrierReply {}))
    }

    type FetchCheckpointStream = BoxStream<CheckpointChunk>;

    async fn fetch_checkpoint(
        &self,
        req: Request<FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let r = req.into_inner();
        let files = {
            let st = self.job.lock();
            st.member(&r.job_id, &self.job.job_id, r.worker_id, r.attempt)?;
            st.start.clone().ok_or_else(|| {
                Status::not_found("this attempt starts from scratch: no checkpoint")
            })?
        };
        let from = transfer::Sender {
            job_id: self.job.job_id.clone(),
            worker_id: 0,
            attempt: r.attempt,
        };
        let chunks = transfer::chunks(&from, &files);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<CheckpointChunk>>,
    ) -> Result<Response<UploadCheckpointReply>, Status> {
        let mut stream = req.into_inner();
        let job = &self.job;
        let mut rx = Receiver::new(job.max_checkpoint_bytes);
        let mut header = None;
        let began = Instant::now();
        while let Some(chunk) = stream.next().await {
            rx.push(chunk?)?;
            if header.is_none() {
                let h = rx.header().expect("header accepted").clone();
                // Refused before its data arrives.
                job.check_uploader(&job.lock(), &h)?;
                header = Some(h);
            }
        }
        let files = rx.finish()?;
        let from = header.expect("a finished upload has a header");
        job.wait_for_rows_before(&from.job_id, from.worker_id, from.attempt, from.step)
            .await;
        let bytes = files.total_bytes();
        let job = job.clone();
        let path = tokio::task::spawn_blocking(move || job.store_checkpoint(&from, files))
            .await
            .map_err(|e| Status::internal(format!("checkpoint writer: {e}")))??;
        let secs = began.elapsed().as_secs_f64();
        tracing::info!(
            "checkpoint {} ({:.1} MB in {secs:.2}s, {:.0} MB/s)",
            path.display(),
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / secs.max(1e-9)
        );
        Ok(Response::new(UploadCheckpointReply {
            path: path.display().to_string(),
            bytes,
        }))
    }

    async fn upload_shards(
        &self,
        req: Request<Streaming<ShardChunk>>,
    ) -> Result<Response<UploadCheckpointReply>, Status> {
        let began = Instant::now();
        let (from, up) = self.receive_shards(req.into_inner()).await?;
        let job = &self.job;
        let values: u64 = up.shards.iter().map(|s| s.values.len() as u64).sum();
        job.wait_for_rows_before(&from.job_id, from.worker_id, from.attempt, from.step)
            .await;
        let path = self.gather_and_store(from.clone(), up).await?;
        if from.rank == 0 {
            tracing::info!(
                "checkpoint {} from every rank's shards ({:.1} MB from rank 0 in {:.2}s)",
                path.display(),
                values as f64 * 4.0 / 1e6,
                began.elapsed().as_secs_f64()
            );
        }
        Ok(Response::new(UploadCheckpointReply {
            path: path.display().to_string(),
            bytes: values * 4,
        }))
    }

    async fn report_metrics(
        &self,
        req: Request<Streaming<MetricsRow>>,
    ) -> Result<Response<MetricsAck>, Status> {
        let mut stream = req.into_inner();
        while let Some(row) = stream.next().await {
            self.job.record_metrics(&row?)?;
            // Uploads wait for the step reached.
            self.job.bump();
        }
        Ok(Response::new(MetricsAck {}))
    }

    type AllReduceStream = BoxStream<ReduceChunk>;

    async fn all_reduce(
        &self,
        req: Request<Streaming<ReduceChunk>>,
    ) -> Result<Response<Self::AllReduceStream>, Status> {
        let ReducePart { head, rank, values } = self.receive_part(req.into_inner()).await?;
        let sum = self.sum_with_the_others(&head, rank, values).await?;
        let chunks = sum_chunks(&sum, head.attempt, head.reduce_seq);
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let r = req.into_inner();
        let job = &self.job;
        {
            let mut st = job.lock();
            let rank = st
                .member(&r.job_id, &job.job_id, r.worker_id, r.attempt)?
                .rank;
            let outcome = Outcome::try_from(r.outcome).unwrap_or(Outcome::Unspecified);
            match outcome {
                Outcome::Finished | Outcome::Preempted => {
                    let f = if outcome == Outcome::Finished {
                        Finished::Done
                    } else {
                        Finished::Preempted
                    };
                    if let Some(w) = st.workers.get_mut(&r.worker_id) {
                        w.finished = Some(f);
                        w.step = r.step;
                    }
                    tracing::info!(
                        "rank {rank} {} at step {}",
                        if f == Finished::Done {
                            "finished"
                        } else {
                            "stopped (preempted)"
                        },
                        r.step
                    );
                    job.end_if_all_finished(&mut st);
                }
                Outcome::Diverged => {
                    let reason = format!("rank {rank} at step {}: {}", r.step, r.message);
                    tracing::error!("{reason}");
                    st.end(false, reason);
                }
                Outcome::Failed | Outcome::Unspecified => {
                    let reason = format!("rank {rank} failed at step {}: {}", r.step, r.message);
                    st.restart(reason, job.opts.max_restarts);
                }
            }
        }
        job.bump();
        Ok(Response::new(FinishReply {}))
    }
}
