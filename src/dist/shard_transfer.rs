//! Checkpoint shards over gRPC (UploadShards): one rank's shards of one
//! step cut into chunks (a header naming the sender, the step and the
//! counts; each shard's record followed by its values; a trailer with the
//! sha256 of all values), and the receiving side that accepts only a
//! stream that is in sequence, within its size limits, complete and
//! matching its checksum. Framing only: who may send what, and the
//! assembly, are the coordinator's.

use sha2::{Digest, Sha256};
use tonic::Status;

use super::proto::{
    shard_chunk::Part, CheckpointTrailer, ShardChunk, ShardHeader, ShardRecord, TensorGroup,
};
use super::transfer::{Sender, CHUNK_BYTES};
use crate::ckpt::shards::{Group, Shard, ShardIndex};
use crate::ckpt::TrainingState;
use crate::digest::hex;
use crate::f32_bytes;

/// One rank's part of the checkpoint of `step`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardUpload {
    pub step: i64,
    pub rank: u32,
    /// Rank 0's: the checkpoint's state.json (all ranks' data cursors).
    pub state: Option<TrainingState>,
    pub shards: Vec<Shard>,
}

fn to_proto(g: Group) -> TensorGroup {
    match g {
        Group::Params => TensorGroup::Params,
        Group::AdamM => TensorGroup::AdamM,
        Group::AdamV => TensorGroup::AdamV,
    }
}

fn from_proto(g: i32) -> Option<Group> {
    match TensorGroup::try_from(g).ok()? {
        TensorGroup::Params => Some(Group::Params),
        TensorGroup::AdamM => Some(Group::AdamM),
        TensorGroup::AdamV => Some(Group::AdamV),
        TensorGroup::Unspecified => None,
    }
}

/// The chunks of `up`: header, each shard's record and values, trailer,
/// numbered from 0.
pub fn chunks(from: &Sender, up: &ShardUpload) -> Result<Vec<ShardChunk>, serde_json::Error> {
    let state_json = match &up.state {
        Some(s) => serde_json::to_vec(s)?,
        None => vec![],
    };
    let mut out = vec![Part::Header(ShardHeader {
        job_id: from.job_id.clone(),
        worker_id: from.worker_id,
        attempt: from.attempt,
        step: up.step,
        rank: up.rank,
        shards: up.shards.len() as u32,
        values: up.shards.iter().map(|s| s.values.len() as u64).sum(),
        state_json,
    })];
    let mut hasher = Sha256::new();
    for s in &up.shards {
        out.push(Part::Shard(ShardRecord {
            group: to_proto(s.group) as i32,
            name: s.name.clone(),
            dim: s.index.dim as u32,
            index: s.index.index as u32,
            parts: s.index.parts as u32,
            len: s.values.len() as u64,
        }));
        for piece in s.values.chunks(CHUNK_BYTES / 4) {
            let bytes = f32_bytes::as_le_bytes(piece).to_vec();
            hasher.update(&bytes);
            out.push(Part::Values(bytes));
        }
    }
    out.push(Part::Trailer(CheckpointTrailer {
        sha256: hex(&hasher.finalize()),
    }));
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(seq, part)| ShardChunk {
            seq: seq as u64,
            part: Some(part),
        })
        .collect())
}

/// Reassembles a shard stream, refusing anything out of order or beyond
/// its limits.
pub struct ShardReceiver {
    max_values: u64,
    max_shards: u32,
    next_seq: u64,
    header: Option<ShardHeader>,
    shards: Vec<Shard>,
    /// Values the current (last) shard still expects.
    pending: usize,
    values: u64,
    hasher: Sha256,
    done: bool,
}

impl ShardReceiver {
    /// Accepts at most `max_values` f32 values in `max_shards` shards.
    pub fn new(max_values: u64, max_shards: u32) -> ShardReceiver {
        ShardReceiver {
            max_values,
            max_shards,
            next_seq: 0,
            header: None,
            shards: vec![],
            pending: 0,
            values: 0,
            hasher: Sha256::new(),
            done: false,
        }
    }

    /// The header, once received.
    pub fn header(&self) -> Option<&ShardHeader> {
        self.header.as_ref()
    }

    pub fn push(&mut self, chunk: ShardChunk) -> Result<(), Status> {
        let seq = chunk.seq;
        if self.done {
            return Err(bad(seq, "after the trailer".into()));
        }
        if seq != self.next_seq {
            return Err(bad(
                seq,
                format!("out of sequence (expected {})", self.next_seq),
            ));
        }
        self.next_seq += 1;
        match (chunk.part, &self.header) {
            (Some(Part::Header(h)), None) => self.accept_header(h),
            (Some(Part::Header(_)), Some(_)) => Err(bad(seq, "a second header".into())),
            (Some(_), None) | (None, _) => Err(bad(seq, "expected the header first".into())),
            (Some(Part::Shard(r)), Some(_)) => self.accept_record(seq, r),
            (Some(Part::Values(v)), Some(_)) => self.accept_values(seq, &v),
            (Some(Part::Trailer(t)), Some(_)) => self.accept_trailer(&t),
        }
    }

    fn accept_header(&mut self, h: ShardHeader) -> Result<(), Status> {
        if h.values > self.max_values {
            return Err(Status::resource_exhausted(format!(
                "shards of {} values, more than the {} this model's checkpoints hold",
                h.values, self.max_values
            )));
        }
        if h.shards > self.max_shards {
            return Err(Status::resource_exhausted(format!(
                "{} shards, more than the {} this model's checkpoints can be cut into",
                h.shards, self.max_shards
            )));
        }
        self.header = Some(h);
        Ok(())
    }

    fn declared(&self) -> (u32, u64) {
        self.header
            .as_ref()
            .map_or((0, 0), |h| (h.shards, h.values))
    }

    fn accept_record(&mut self, seq: u64, r: ShardRecord) -> Result<(), Status> {
        let (shards, values) = self.declared();
        if self.pending > 0 {
            let s = self.shards.last().map_or("", |s| s.name.as_str());
            return Err(bad(
                seq,
                format!("shard `{}` starts before `{s}` has its values", r.name),
            ));
        }
        if self.shards.len() as u32 >= shards {
            return Err(bad(
                seq,
                format!("more shards than the {shards} the header declares"),
            ));
        }
        let group = from_proto(r.group).ok_or_else(|| {
            bad(
                seq,
                format!("shard `{}`: unknown tensor group {}", r.name, r.group),
            )
        })?;
        if r.parts == 0 || r.index >= r.parts {
            return Err(bad(
                seq,
                format!(
                    "{group} shard `{}`: part {} of {} does not exist",
                    r.name, r.index, r.parts
                ),
            ));
        }
        if self.values + r.len > values {
            return Err(bad(
                seq,
                format!(
                    "{group} shard `{}` of {} values: more than the {values} the header declares",
                    r.name, r.len
                ),
            ));
        }
        self.values += r.len;
        self.pending = r.len as usize;
        self.shards.push(Shard {
            group,
            name: r.name,
            index: ShardIndex {
                dim: r.dim as usize,
                index: r.index as usize,
                parts: r.parts as usize,
            },
            values: Vec::with_capacity(r.len as usize),
        });
        Ok(())
    }

    fn accept_values(&mut self, seq: u64, v: &[u8]) -> Result<(), Status> {
        let Some(s) = self.shards.last_mut() else {
            return Err(bad(seq, "values before any shard record".into()));
        };
        if v.len() % 4 != 0 || v.len() / 4 > self.pending {
            return Err(bad(
                seq,
                format!(
                    "{} shard `{}`: {} bytes of values where {} f32 values remain",
                    s.group,
                    s.name,
                    v.len(),
                    self.pending
                ),
            ));
        }
        self.hasher.update(v);
        f32_bytes::extend_from_le_bytes(&mut s.values, v)
            .ok_or_else(|| bad(seq, "values not whole f32s".into()))?;
        self.pending -= v.len() / 4;
        Ok(())
    }

    fn accept_trailer(&mut self, t: &CheckpointTrailer) -> Result<(), Status> {
        let (shards, values) = self.declared();
        let got = self.values - self.pending as u64;
        if self.shards.len() as u32 != shards || got != values {
            return Err(Status::invalid_argument(format!(
                "truncated shard upload: {} of {shards} shards, {got} of {values} values before the trailer",
                self.shards.len()
            )));
        }
        let sum = hex(&std::mem::take(&mut self.hasher).finalize());
        if sum != t.sha256 {
            return Err(Status::data_loss(format!(
                "shard checksum mismatch: received values hash to {sum}, the trailer says {}",
                t.sha256
            )));
        }
        self.done = true;
        Ok(())
    }

    /// The upload, if the stream ended with a valid trailer.
    pub fn finish(self) -> Result<ShardUpload, Status> {
        let (true, Some(h)) = (self.done, self.header) else {
            return Err(Status::invalid_argument(
                "truncated shard upload: the stream ended before its trailer",
            ));
        };
        let state = match h.state_json.is_empty() {
            true => None,
            false => Some(serde_json::from_slice(&h.state_json).map_err(|e| {
                Status::invalid_argument(format!(
                    "rank {}'s shards of step {}: the training state is not a valid state.json: {e}",
                    h.rank, h.step
                ))
            })?),
        };
        Ok(ShardUpload {
            step: h.step,
            rank: h.rank,
            state,
            shards: self.shards,
        })
    }
}

fn bad(seq: u64, what: String) -> Status {
    Status::invalid_argument(format!("shard chunk {seq}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShardUpload {
        let big = CHUNK_BYTES / 4 * 2 + 3;
        ShardUpload {
            step: 4,
            rank: 0,
            state: Some(
                serde_json::from_str(
                    r#"{"format": 2, "step": 4, "tokens_seen": 96, "next_batch": 4,
                        "seed": 0, "config_toml": "", "config_sha256": ""}"#,
                )
                .unwrap(),
            ),
            shards: vec![
                Shard {
                    group: Group::AdamV,
                    name: "big".into(),
                    index: ShardIndex {
                        dim: 1,
                        index: 1,
                        parts: 2,
                    },
                    values: (0..big).map(|i| i as f32).collect(),
                },
                Shard {
                    group: Group::Params,
                    name: "empty".into(),
                    index: ShardIndex::whole(),
                    values: vec![],
                },
                Shard {
                    group: Group::AdamM,
                    name: "small".into(),
                    index: ShardIndex::whole(),
                    values: vec![1.5, -2.0],
                },
            ],
        }
    }

    fn receive(chunks: Vec<ShardChunk>) -> Result<ShardUpload, Status> {
        let mut r = ShardReceiver::new(1 << 30, 100);
        for c in chunks {
            r.push(c)?;
        }
        r.finish()
    }

    #[test]
    fn round_trip_across_chunks_and_empty_shards() {
        let c = chunks(&Sender::default(), &sample()).unwrap();
        // header, big (record + 3 chunks), empty (record), small (record +
        // 1), trailer.
        assert_eq!(c.len(), 1 + 4 + 1 + 2 + 1);
        assert_eq!(receive(c).unwrap(), sample());
        let mut no_state = sample();
        no_state.state = None;
        let c = chunks(&Sender::default(), &no_state).unwrap();
        assert_eq!(receive(c).unwrap(), no_state);
    }

    #[test]
    fn out_of_order_truncated_corrupted_and_oversized_streams_are_refused() {
        let good = chunks(&Sender::default(), &sample()).unwrap();
        let says = |r: Result<ShardUpload, Status>, words: &str| {
            let e = r.unwrap_err();
            assert!(e.message().contains(words), "`{words}` not in {e:?}");
            e
        };
        let mut swapped = good.clone();
        swapped.swap(2, 3);
        says(receive(swapped), "out of sequence");

        // The record of `empty` moved before `big`'s last values.
        let mut early = good.clone();
        early.swap(4, 5);
        for (i, c) in early.iter_mut().enumerate() {
            c.seq = i as u64;
        }
        says(receive(early), "starts before `big` has its values");

        // `small`'s values gone: the trailer comes early.
        let mut cut = good.clone();
        cut.remove(7);
        for (i, c) in cut.iter_mut().enumerate() {
            c.seq = i as u64;
        }
        says(receive(cut), "truncated");
        says(receive(good[..good.len() - 1].to_vec()), "ended before");

        let mut corrupted = good.clone();
        if let Some(Part::Values(v)) = &mut corrupted[2].part {
            v[100] ^= 1;
        }
        let e = receive(corrupted).unwrap_err();
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");

        let mut odd = good.clone();
        if let Some(Part::Values(v)) = &mut odd[7].part {
            v.pop();
        }
        says(receive(odd), "shard `small`: 7 bytes");

        let mut r = ShardReceiver::new(100, 100);
        let e = r.push(good[0].clone()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        let mut r = ShardReceiver::new(1 << 30, 2);
        let e = r.push(good[0].clone()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    }
}
