//! The CPU backend's cross-process gradient sum: each worker streams its
//! vector to the coordinator's AllReduce and streams back the sum. One
//! extra element carries this worker's stop vote (SIGTERM), so that every
//! worker learns in the same step that the job is to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::runtime::Handle;
use tokio_stream::StreamExt;

use super::client::{Client, Session};
use super::coordinator::REDUCE_CHUNK;
use super::proto::ReduceChunk;
use crate::f32_bytes;
use crate::train::CrossProcessSum;

pub struct HostSum {
    rt: Handle,
    client: Client,
    session: Session,
    /// All-reduces done so far in this attempt: the next one's
    /// `ReduceChunk.reduce_seq` (they are numbered so a worker out of step
    /// is refused, not summed with the wrong vector).
    reduce_seq: i64,
    /// Set by the signal handler: this worker wants to stop.
    pub vote: Arc<AtomicBool>,
    /// Set when any worker's vote was in the last sum.
    pub agreed: Arc<AtomicBool>,
}

impl HostSum {
    pub fn new(rt: Handle, client: Client, session: Session, vote: Arc<AtomicBool>) -> HostSum {
        HostSum {
            rt,
            client,
            session,
            reduce_seq: 0,
            vote,
            agreed: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn reduce(&mut self, values: Vec<f32>) -> Result<Vec<f32>> {
        let s = &self.session;
        let total = values.len() as u64;
        let chunks: Vec<ReduceChunk> = values
            .chunks(REDUCE_CHUNK)
            .enumerate()
            .map(|(i, c)| ReduceChunk {
                job_id: s.job_id.clone(),
                worker_id: s.worker_id,
                attempt: s.attempt,
                reduce_seq: self.reduce_seq,
                seq: i as u32,
                total_len: total,
                values: f32_bytes::as_le_bytes(c).to_vec(),
            })
            .collect();
        let mut replies = self
            .client
            .all_reduce(tokio_stream::iter(chunks))
            .await
            .with_context(|| format!("all-reduce {}", self.reduce_seq))?
            .into_inner();
        let mut sum = Vec::with_capacity(values.len());
        while let Some(c) = replies.next().await {
            let c = c.with_context(|| format!("all-reduce {}", self.reduce_seq))?;
            f32_bytes::extend_from_le_bytes(&mut sum, &c.values)
                .with_context(|| format!("all-reduce {}: a ragged chunk", self.reduce_seq))?;
        }
        if sum.len() != values.len() {
            bail!(
                "all-reduce {}: {} values back for {} sent",
                self.reduce_seq,
                sum.len(),
                values.len()
            );
        }
        Ok(sum)
    }
}

impl CrossProcessSum for HostSum {
    fn processes(&self) -> usize {
        self.session.world as usize
    }

    fn sum(&mut self, values: &mut [f32]) -> Result<()> {
        let mut v = values.to_vec();
        v.push(if self.vote.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        });
        let rt = self.rt.clone();
        let sum = rt.block_on(self.reduce(v))?;
        self.reduce_seq += 1;
        let (head, vote) = sum.split_at(values.len());
        values.copy_from_slice(head);
        if vote[0] > 0.0 {
            self.agreed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}
