//! `data prepare`: parquet shards -> `train.bin` + `val.bin` token files
//! (DESIGN.md layout: each document's tokens then the end-of-text token,
//! little-endian u16 when the vocabulary fits, else u32) and a
//! `meta.json` saying what went in.
//!
//! Row groups are read and tokenised in parallel (rayon, a chunk of row
//! groups at a time, tokenisation itself parallel across documents) and
//! written in file order, so the output does not depend on the thread
//! count. Files are written to temporary names, fsynced, then renamed;
//! the temporary files of a failed run are removed, and those a killed
//! run left behind are removed (with a log line) when the next starts.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use tokenizers::Tokenizer;

use super::parquet::{
    all_row_groups, expand_inputs, read_row_group, BadFilePolicy, Document, RowGroupRef,
};
use super::stream::Split;
use super::tokenizer::{encode_many, eot_id, is_long, log_long};
use super::TokenWidth;
use crate::digest::sha256_file;

/// What `prepare` did; also written to `OUT/meta.json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub files: usize,
    pub skipped_files: Vec<(PathBuf, String)>,
    pub row_groups: usize,
    pub train_documents: u64,
    pub train_tokens: u64,
    pub val_documents: u64,
    pub val_tokens: u64,
    /// Documents longer than [`super::tokenizer::MAX_PIECE_BYTES`],
    /// tokenised in pieces.
    pub split_documents: u64,
    pub val_fraction: f64,
    pub token_dtype: String,
    pub vocab_size: usize,
    pub eot_id: u32,
    pub tokenizer_sha256: String,
    pub seconds: f64,
}

impl Summary {
    pub fn tokens_per_second(&self) -> f64 {
        (self.train_tokens + self.val_tokens) as f64 / self.seconds.max(1e-9)
    }
}

/// Removes a temporary file that an earlier run, killed or failed before
/// it could clean up, left at `tmp`, saying so.
pub fn remove_stale_temp(tmp: &Path) -> Result<()> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {
            tracing::warn!(
                "removed {}, left by an earlier run that did not finish",
                tmp.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the stale {}", tmp.display())),
    }
}

/// Removes `tmp` after a failed write (best effort: the write's error is
/// the one reported).
fn discard_temp(tmp: &Path) {
    match std::fs::remove_file(tmp) {
        Ok(()) => tracing::debug!("removed {} after the failure", tmp.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("could not remove {}: {e}", tmp.display()),
    }
}

/// A `.bin` being written under a temporary name, removed unless
/// [`BinWriter::finish`] renamed it into place.
struct BinWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<BufWriter<File>>,
    width: TokenWidth,
}

impl Drop for BinWriter {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            drop(out.into_parts()); // closed without flushing what is buffered
            discard_temp(&self.tmp);
        }
    }
}

impl BinWriter {
    fn create(path: PathBuf, width: TokenWidth) -> Result<BinWriter> {
        let tmp = path.with_extension("bin.tmp");
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(BinWriter {
            tmp,
            path,
            out: Some(BufWriter::with_capacity(1 << 20, f)),
            width,
        })
    }

    /// Appends a document's tokens and the end-of-text token.
    fn document(&mut self, tokens: &[u32], eot: u32) -> Result<()> {
        let mut bytes = Vec::with_capacity((tokens.len() + 1) * 4);
        for &t in tokens.iter().chain(std::iter::once(&eot)) {
            match self.width {
                TokenWidth::U16 => bytes.extend_from_slice(&(t as u16).to_le_bytes()),
                TokenWidth::U32 => bytes.extend_from_slice(&t.to_le_bytes()),
            }
        }
        self.out
            .as_mut()
            .expect("open until finished")
            .write_all(&bytes)
            .with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Flushes, syncs and renames the file into place (on an error, the
    /// drop removes the temporary file).
    fn finish(mut self) -> Result<()> {
        let out = self.out.as_mut().expect("open until finished");
        out.flush()
            .with_context(|| format!("flushing {}", self.tmp.display()))?;
        out.get_ref()
            .sync_all()
            .with_context(|| format!("syncing {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        self.out = None; // in place: nothing to remove
        Ok(())
    }
}

/// One row group's documents, tokenised, split into train and validation.
struct Tokenised {
    train: Vec<Vec<u32>>,
    val: Vec<Vec<u32>>,
    /// Documents tokenised in pieces.
    split: u64,
}

fn tokenise_group(rg: &RowGroupRef, tk: &Tokenizer, val_fraction: f64) -> Result<Tokenised> {
    let docs = read_row_group(rg)?;
    let (val, train): (Vec<&Document>, Vec<&Document>) = docs
        .iter()
        .partition(|d| Split::Validation.keeps(d.id.as_deref(), &d.text, val_fraction));
    let encode = |docs: Vec<&Document>| {
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        encode_many(tk, &texts)
            .with_context(|| format!("{}: row group {}", rg.file.display(), rg.index))
    };
    log_long(docs.iter().map(|d| d.text.as_str()), &rg.file, rg.index);
    let split = docs.iter().filter(|d| is_long(&d.text)).count() as u64;
    Ok(Tokenised {
        train: encode(train)?,
        val: encode(val)?,
        split,
    })
}

/// Tokenises every document of `inputs` into `out/train.bin` and
/// `out/val.bin` (the documents `val_fraction` holds out by id hash).
pub fn prepare(
    inputs: &[PathBuf],
    tokenizer_path: &Path,
    out: &Path,
    val_fraction: f64,
    policy: BadFilePolicy,
) -> Result<Summary> {
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction {val_fraction}: expected a value in [0, 1)");
    }
    let began = Instant::now();
    let tk = super::tokenizer::load(tokenizer_path)?;
    let eot = eot_id(&tk).with_context(|| tokenizer_path.display().to_string())?;
    let vocab = tk.get_vocab_size(true);
    let width = if vocab <= 1 << 16 {
        TokenWidth::U16
    } else {
        TokenWidth::U32
    };
    let files = expand_inputs(inputs)?;
    let (groups, skipped) = all_row_groups(&files, policy)?;
    if groups.is_empty() {
        bail!("no row groups to read in {inputs:?}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let meta = out.join("meta.json");
    let meta_tmp = out.join("meta.json.tmp");
    for tmp in [
        out.join("train.bin.tmp"),
        out.join("val.bin.tmp"),
        meta_tmp.clone(),
    ] {
        remove_stale_temp(&tmp)?;
    }
    let mut train = BinWriter::create(out.join("train.bin"), width)?;
    let mut val = BinWriter::create(out.join("val.bin"), width)?;
    let mut s = Summary {
        files: files.len() - skipped.len(),
        skipped_files: skipped,
        row_groups: groups.len(),
        val_fraction,
        token_dtype: format!("{width:?}").to_lowercase(),
        vocab_size: vocab,
        eot_id: eot,
        tokenizer_sha256: sha256_file(tokenizer_path)?,
        ..Summary::default()
    };
    let bar = indicatif::ProgressBar::new(groups.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} row groups [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let chunk = rayon::current_num_threads() * 2;
    for part in groups.chunks(chunk) {
        let done: Vec<Result<Tokenised>> = part
            .par_iter()
            .map(|rg| tokenise_group(rg, &tk, val_fraction))
            .collect();
        for t in done {
            let t = t?;
            s.split_documents += t.split;
            for (docs, w, n_docs, n_tokens) in [
                (
                    &t.train,
                    &mut train,
                    &mut s.train_documents,
                    &mut s.train_tokens,
                ),
                (&t.val, &mut val, &mut s.val_documents, &mut s.val_tokens),
            ] {
                for d in docs {
                    w.document(d, eot)?;
                    *n_docs += 1;
                    *n_tokens += d.len() as u64 + 1;
                }
            }
        }
        bar.inc(part.len() as u64);
        let secs = began.elapsed().as_secs_f64();
        bar.set_message(format!(
            "{} docs, {:.0}k tok/s",
            s.train_documents + s.val_documents,
            (s.train_tokens + s.val_tokens) as f64 / secs / 1e3
        ));
    }
    train.finish()?;
    val.finish()?;
    bar.finish_and_clear();
    s.seconds = began.elapsed().as_secs_f64();
    if s.split_documents > 0 {
        tracing::info!(
            "{} document(s) longer than {} MiB were tokenised in pieces",
            s.split_documents,
            super::tokenizer::MAX_PIECE_BYTES >> 20
        );
    }
    let written = std::fs::write(&meta_tmp, serde_json::to_string_pretty(&s)?)
        .with_context(|| format!("writing {}", meta_tmp.display()))
        .and_then(|()| {
            std::fs::rename(&meta_tmp, &meta)
                .with_context(|| format!("renaming {} to {}", meta_tmp.display(), meta.display()))
        });
    if written.is_err() {
        discard_temp(&meta_tmp);
    }
    written?;
    Ok(s)
}
