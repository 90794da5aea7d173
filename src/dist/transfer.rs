//! Checkpoints over gRPC: a checkpoint directory's files cut into chunks
//! (header with the step and each file's size, the bytes in order, a
//! trailer with their sha256), and the receiving side that accepts only a
//! stream that is in sequence, within its size limit, complete and
//! matching its checksum. Uploads and downloads use the same framing.

use sha2::{Digest, Sha256};
use tonic::Status;

use super::proto::{
    checkpoint_chunk::Part, CheckpointChunk, CheckpointFile, CheckpointHeader, CheckpointTrailer,
};
use crate::ckpt::FILE_NAMES;
use crate::digest::hex;

/// Bytes per data chunk (well under the gRPC message limit).
pub const CHUNK_BYTES: usize = 4 << 20;

/// A checkpoint's files in memory, named as in its directory.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointFiles {
    pub step: i64,
    pub files: Vec<(String, Vec<u8>)>,
}

impl CheckpointFiles {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// Who sends: copied into the header.
#[derive(Clone, Debug, Default)]
pub struct Sender {
    pub job_id: String,
    pub worker_id: u64,
    pub attempt: u32,
}

/// The chunks of `ckpt`: header, data, trailer, numbered from 0.
pub fn chunks(from: &Sender, ckpt: &CheckpointFiles) -> Vec<CheckpointChunk> {
    let header = CheckpointHeader {
        job_id: from.job_id.clone(),
        worker_id: from.worker_id,
        attempt: from.attempt,
        step: ckpt.step,
        files: ckpt
            .files
            .iter()
            .map(|(name, bytes)| CheckpointFile {
                name: name.clone(),
                size: bytes.len() as u64,
            })
            .collect(),
    };
    let mut out = vec![Part::Header(header)];
    let mut hasher = Sha256::new();
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
    for (_, bytes) in &ckpt.files {
        hasher.update(bytes);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let take = (CHUNK_BYTES - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.len() == CHUNK_BYTES {
                out.push(Part::Data(std::mem::take(&mut pending)));
            }
        }
    }
    if !pending.is_empty() {
        out.push(Part::Data(pending));
    }
    out.push(Part::Trailer(CheckpointTrailer {
        sha256: hex(&hasher.finalize()),
    }));
    out.into_iter()
        .enumerate()
        .map(|(seq, part)| CheckpointChunk {
            seq: seq as u64,
            part: Some(part),
        })
        .collect()
}

/// Reassembles a chunk stream, refusing anything out of order.
pub struct Receiver {
    max_bytes: u64,
    next_seq: u64,
    header: Option<CheckpointHeader>,
    /// Index of the file being filled and the bytes so far.
    file: usize,
    files: Vec<(String, Vec<u8>)>,
    hasher: Sha256,
    done: bool,
}

impl Receiver {
    /// Accepts checkpoints of at most `max_bytes` in all.
    pub fn new(max_bytes: u64) -> Receiver {
        Receiver {
            max_bytes,
            next_seq: 0,
            header: None,
            file: 0,
            files: vec![],
            hasher: Sha256::new(),
            done: false,
        }
    }

    /// The header, once received.
    pub fn header(&self) -> Option<&CheckpointHeader> {
        self.header.as_ref()
    }

    pub fn push(&mut self, chunk: CheckpointChunk) -> Result<(), Status> {
        if self.done {
            return Err(Status::invalid_argument(format!(
                "checkpoint chunk {} after the trailer",
                chunk.seq
            )));
        }
        if chunk.seq != self.next_seq {
            return Err(Status::invalid_argument(format!(
                "checkpoint chunk {} out of sequence (expected {})",
                chunk.seq, self.next_seq
            )));
        }
        self.next_seq += 1;
        match (chunk.part, &self.header) {
            (Some(Part::Header(h)), None) => self.accept_header(h),
            (Some(Part::Header(_)), Some(_)) => Err(Status::invalid_argument(format!(
                "checkpoint chunk {}: a second header",
                chunk.seq
            ))),
            (Some(_), None) | (None, _) => Err(Status::invalid_argument(format!(
                "checkpoint chunk {}: expected the header first",
                chunk.seq
            ))),
            (Some(Part::Data(d)), Some(_)) => self.accept_data(&d),
            (Some(Part::Trailer(t)), Some(_)) => self.accept_trailer(&t),
        }
    }

    fn accept_header(&mut self, h: CheckpointHeader) -> Result<(), Status> {
        let mut total = 0u64;
        for (i, f) in h.files.iter().enumerate() {
            if !FILE_NAMES.contains(&f.name.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "checkpoint file `{}` is not one of {FILE_NAMES:?}",
                    f.name
                )));
            }
            if h.files[..i].iter().any(|g| g.name == f.name) {
                return Err(Status::invalid_argument(format!(
                    "checkpoint file `{}` listed twice",
                    f.name
                )));
            }
            total = total.saturating_add(f.size);
        }
        for required in ["model.safetensors", "state.json"] {
            if !h.files.iter().any(|f| f.name == required) {
                return Err(Status::invalid_argument(format!(
                    "checkpoint without `{required}`"
                )));
            }
        }
        if total > self.max_bytes {
            return Err(Status::resource_exhausted(format!(
                "checkpoint of {total} bytes, more than the {} this model's checkpoints can hold",
                self.max_bytes
            )));
        }
        self.files = h
            .files
            .iter()
            .map(|f| (f.name.clone(), Vec::with_capacity(f.size as usize)))
            .collect();
        self.header = Some(h);
        self.skip_full_files();
        Ok(())
    }

    fn size_of(&self, i: usize) -> usize {
        self.header.as_ref().map_or(0, |h| h.files[i].size as usize)
    }

    /// Moves past files that are complete (including empty ones).
    fn skip_full_files(&mut self) {
        while self.file < self.files.len()
            && self.files[self.file].1.len() == self.size_of(self.file)
        {
            self.file += 1;
        }
    }

    fn accept_data(&mut self, mut d: &[u8]) -> Result<(), Status> {
        self.hasher.update(d);
        while !d.is_empty() {
            if self.file >= self.files.len() {
                return Err(Status::invalid_argument(
                    "checkpoint data longer than the sizes its header declares",
                ));
            }
            let room = self.size_of(self.file) - self.files[self.file].1.len();
            let take = room.min(d.len());
            self.files[self.file].1.extend_from_slice(&d[..take]);
            d = &d[take..];
            self.skip_full_files();
        }
        Ok(())
    }

    fn accept_trailer(&mut self, t: &CheckpointTrailer) -> Result<(), Status> {
        if self.file < self.files.len() {
            let got: u64 = self.files.iter().map(|(_, b)| b.len() as u64).sum();
            let want: u64 = self
                .header
                .as_ref()
                .map_or(0, |h| h.files.iter().map(|f| f.size).sum());
            return Err(Status::invalid_argument(format!(
                "truncated checkpoint: {got} of {want} bytes before the trailer"
            )));
        }
        let sum = hex(&std::mem::take(&mut self.hasher).finalize());
        if sum != t.sha256 {
            return Err(Status::data_loss(format!(
                "checkpoint checksum mismatch: received data hashes to {sum}, the trailer says {}",
                t.sha256
            )));
        }
        self.done = true;
        Ok(())
    }

    /// The files, if the stream ended with a valid trailer.
    pub fn finish(self) -> Result<CheckpointFiles, Status> {
        match (self.done, self.header) {
            (true, Some(h)) => Ok(CheckpointFiles {
                step: h.step,
                files: self.files,
            }),
            _ => Err(Status::invalid_argument(
                "truncated checkpoint: the stream ended before its trailer",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointFiles {
        CheckpointFiles {
            step: 7,
            files: vec![
                ("state.json".into(), b"{}".to_vec()),
                ("config.json".into(), vec![]),
                (
                    "model.safetensors".into(),
                    (0..CHUNK_BYTES * 2 + 5).map(|i| i as u8).collect(),
                ),
            ],
        }
    }

    fn receive(chunks: Vec<CheckpointChunk>) -> Result<CheckpointFiles, Status> {
        let mut r = Receiver::new(1 << 30);
        for c in chunks {
            r.push(c)?;
        }
        r.finish()
    }

    #[test]
    fn round_trip_across_chunk_and_file_boundaries() {
        let c = chunks(&Sender::default(), &sample());
        assert_eq!(c.len(), 1 + 3 + 1);
        assert_eq!(receive(c).unwrap(), sample());
    }

    #[test]
    fn out_of_sequence_truncated_and_corrupted_streams_are_refused() {
        let good = chunks(&Sender::default(), &sample());
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        let e = receive(swapped).unwrap_err();
        assert!(e.message().contains("out of sequence"), "{e:?}");

        let mut truncated = good.clone();
        truncated.remove(truncated.len() - 2); // last data chunk
        let n = truncated.len();
        truncated[n - 1].seq -= 1;
        let e = receive(truncated).unwrap_err();
        assert!(e.message().contains("truncated"), "{e:?}");

        let e = receive(good[..good.len() - 1].to_vec()).unwrap_err();
        assert!(e.message().contains("ended before its trailer"), "{e:?}");

        let mut corrupted = good.clone();
        if let Some(Part::Data(d)) = &mut corrupted[2].part {
            d[100] ^= 1;
        }
        let e = receive(corrupted).unwrap_err();
        assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");

        let mut r = Receiver::new(100);
        let e = r.push(good[0].clone()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    }

    #[test]
    fn unknown_file_names_are_refused() {
        let mut bad = sample();
        bad.files[1].0 = "../../etc/passwd".into();
        let e = receive(chunks(&Sender::default(), &bad)).unwrap_err();
        assert!(e.message().contains("is not one of"), "{e:?}");
    }
}
