//! Writing `model.safetensors` one tensor at a time: the header is known
//! from the names and shapes alone (every tensor f32, laid out in order),
//! so a checkpoint far larger than memory (an imported Qwen3-30B-A3B is
//! 122 GB in f32) is written holding one tensor, its sha256 computed on
//! the way for `state.json`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::integrity::{non_finite, non_finite_error, FileDigest};

/// A safetensors file being written tensor by tensor, in the order its
/// header lists them.
pub struct TensorFileWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
    /// (name, element count) still to come, in order.
    expected: Vec<(String, usize)>,
    next: usize,
}

impl TensorFileWriter {
    /// Creates `path` with the header for `tensors` (name, shape), all f32.
    pub fn create(path: &Path, tensors: &[(String, Vec<i64>)]) -> Result<TensorFileWriter> {
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        let mut expected = Vec::with_capacity(tensors.len());
        for (name, dims) in tensors {
            let n: usize = dims.iter().map(|&d| d as usize).product();
            let end = offset + 4 * n as u64;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": dims, "data_offsets": [offset, end]}),
            );
            expected.push((name.clone(), n));
            offset = end;
        }
        let mut text = serde_json::to_vec(&header)?;
        // Pad the header with spaces to 8 bytes, as the reference writer
        // does, so the data is aligned for readers that map it.
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = TensorFileWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 22, file),
            hasher: Sha256::new(),
            bytes: 0,
            expected,
            next: 0,
        };
        w.put(&(text.len() as u64).to_le_bytes())?;
        w.put(&text)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Writes the next tensor; it must be the one the header lists next,
    /// with its element count, every value finite.
    pub fn write(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let Some((want, n)) = self.expected.get(self.next).cloned() else {
            bail!(
                "{}: `{name}` is one tensor more than the header lists",
                self.path.display()
            );
        };
        if want != name || n != values.len() {
            bail!(
                "{}: wrote `{name}` ({} values) where the header has `{want}` ({n})",
                self.path.display(),
                values.len()
            );
        }
        if let Some(nf) = non_finite(values) {
            return Err(non_finite_error(
                &self.path.display().to_string(),
                name,
                values.len(),
                nf,
            ));
        }
        // In pieces, so that no second copy of a large tensor is made.
        for chunk in values.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.put(&bytes)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Flushes and fsyncs the file; its digest for `state.json`.
    pub fn finish(mut self) -> Result<FileDigest> {
        if self.next != self.expected.len() {
            bail!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.expected.len()
            );
        }
        self.out.flush()?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("flushing {}: {e}", self.path.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(FileDigest {
            sha256: crate::digest::hex(&self.hasher.finalize()),
            bytes: self.bytes,
        })
    }
}
