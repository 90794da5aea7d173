//! The training loop's two token sources behind one interface: `.bin`
//! files (DESIGN.md layout, batches indexed by step) or parquet shards
//! tokenised on the fly through the resumable [`TokenStream`]. Both hand
//! out each replica's rows of S+1 tokens as i32, and say where they stand
//! so a checkpoint can resume them exactly.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::data::parquet::{all_row_groups, expand_inputs, BadFilePolicy};
use crate::data::prepare::sha256_file;
use crate::data::stream::{Cursor, Split, StreamOptions, TokenStream};
use crate::data::{tokenizer, TokenFile, TokenWidth};

use super::config::Config;

/// Where the training data stands, as checkpoints store it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataPosition {
    /// The next global batch (the `.bin` source's cursor; kept for both).
    pub next_batch: i64,
    /// The parquet stream's cursor.
    pub stream: Option<Cursor>,
}

enum Source {
    Bin(TokenFile),
    Stream(Box<TokenStream>),
}

pub struct Batches {
    source: Source,
    next_batch: i64,
    /// Validation micro-batches, [eval batch][replica] -> rows, fixed for
    /// the whole run so every evaluation scores the same tokens.
    val: Vec<Vec<Vec<i32>>>,
    /// sha256 of the tokenizer.json of a parquet source.
    pub tokenizer_sha256: Option<String>,
}

fn to_i32(rows: impl IntoIterator<Item = Vec<u32>>) -> Vec<i32> {
    rows.into_iter().flatten().map(|t| t as i32).collect()
}

impl Batches {
    /// Opens the source `cfg.data` names, positioned at `at`.
    pub fn open(cfg: &Config, at: &DataPosition) -> Result<Batches> {
        let d = &cfg.data;
        if !d.parquet.is_empty() {
            return Self::open_parquet(cfg, at);
        }
        if d.train_bin.as_os_str().is_empty() {
            bail!("no training data: set data.train_bin (a .bin file) or data.parquet + data.tokenizer");
        }
        let t = &cfg.train;
        let width = TokenWidth::parse(&d.token_dtype).map_err(anyhow::Error::msg)?;
        let train = TokenFile::open(&d.train_bin, width).map_err(anyhow::Error::msg)?;
        train
            .check(t.seq_len, t.global_batch, cfg.model.vocab_size)
            .map_err(anyhow::Error::msg)?;
        let mut val = vec![];
        if t.eval_every > 0 && !d.val_bin.as_os_str().is_empty() {
            let f = TokenFile::open(&d.val_bin, width).map_err(anyhow::Error::msg)?;
            let per_eval = t.micro_batch * t.replicas;
            f.check(t.seq_len, per_eval, cfg.model.vocab_size)
                .map_err(anyhow::Error::msg)?;
            val = (0..t.eval_batches)
                .map(|b| {
                    (0..t.replicas)
                        .map(|r| {
                            f.batch_rows(b, per_eval, t.seq_len, r * t.micro_batch, t.micro_batch)
                        })
                        .collect()
                })
                .collect();
        }
        Ok(Batches {
            source: Source::Bin(train),
            next_batch: at.next_batch,
            val,
            tokenizer_sha256: None,
        })
    }

    fn open_parquet(cfg: &Config, at: &DataPosition) -> Result<Batches> {
        let (d, t) = (&cfg.data, &cfg.train);
        let tk = Arc::new(tokenizer::load(&d.tokenizer)?);
        let vocab = tk.get_vocab_size(true) as i64;
        if vocab > cfg.model.vocab_size {
            bail!(
                "{}: {vocab} tokens, more than model.vocab_size = {}",
                d.tokenizer.display(),
                cfg.model.vocab_size
            );
        }
        let policy: BadFilePolicy = d.on_bad_file.parse().map_err(anyhow::Error::msg)?;
        let files = expand_inputs(&d.parquet)?;
        let (groups, skipped) = all_row_groups(&files, policy)?;
        if !skipped.is_empty() {
            tracing::warn!(
                "{} of {} parquet files skipped as unreadable",
                skipped.len(),
                files.len()
            );
        }
        let options = |split, shuffle_rows, epochs| StreamOptions {
            row_len: (t.seq_len + 1) as usize,
            seed: t.seed,
            shuffle_groups: split == Split::Train,
            shuffle_rows,
            val_fraction: d.val_fraction,
            split,
            // One process feeds all its replicas from one stream.
            rank: 0,
            workers: 1,
            epochs,
        };
        let stream = TokenStream::open(
            groups.clone(),
            tk.clone(),
            options(Split::Train, d.shuffle_rows, None),
            at.stream,
        )
        .context("opening the training stream")?;
        let mut val = vec![];
        if t.eval_every > 0 && d.val_fraction > 0.0 {
            // One pass over the held-out documents, in file order: the
            // first eval_batches micro-batches per replica it fills.
            let mut vs =
                TokenStream::open(groups, tk, options(Split::Validation, 1, Some(1)), None)
                    .context("opening the validation stream")?;
            let per_eval = (t.replicas * t.micro_batch) as usize;
            let mut rows = vec![];
            while rows.len() < per_eval * t.eval_batches as usize {
                match vs.next_row()? {
                    Some(r) => rows.push(r),
                    None => break,
                }
            }
            if rows.len() < per_eval {
                bail!(
                    "the validation split (data.val_fraction = {}) holds {} rows of {} tokens; one \
                     evaluation needs train.replicas * train.micro_batch = {per_eval} (raise data.val_fraction)",
                    d.val_fraction,
                    rows.len(),
                    t.seq_len + 1
                );
            }
            let batches = rows.len() / per_eval;
            if (batches as i64) < t.eval_batches {
                tracing::warn!(
                    "the validation split fills {batches} of the {} eval_batches asked for; evaluating on those",
                    t.eval_batches
                );
            }
            let mut rows = rows.into_iter();
            val = (0..batches)
                .map(|_| {
                    (0..t.replicas)
                        .map(|_| to_i32(rows.by_ref().take(t.micro_batch as usize)))
                        .collect()
                })
                .collect();
        }
        Ok(Batches {
            source: Source::Stream(Box::new(stream)),
            next_batch: at.next_batch,
            val,
            tokenizer_sha256: Some(sha256_file(&d.tokenizer)?),
        })
    }

    /// The next global batch, split by replica: replica r's rows,
    /// [global_batch / replicas, S+1] flattened.
    pub fn next(&mut self, cfg: &Config) -> Result<Vec<Vec<i32>>> {
        let t = &cfg.train;
        let per = t.global_batch / t.replicas;
        let rows = match &mut self.source {
            Source::Bin(f) => (0..t.replicas)
                .map(|r| f.batch_rows(self.next_batch, t.global_batch, t.seq_len, r * per, per))
                .collect(),
            Source::Stream(s) => {
                let mut rows = Vec::with_capacity(t.replicas as usize);
                for _ in 0..t.replicas {
                    let mut replica = Vec::with_capacity(per as usize);
                    for _ in 0..per {
                        // The training stream has no epoch limit.
                        replica.push(s.next_row()?.expect("an endless stream"));
                    }
                    rows.push(to_i32(replica));
                }
                rows
            }
        };
        self.next_batch += 1;
        Ok(rows)
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            next_batch: self.next_batch,
            stream: match &self.source {
                Source::Bin(_) => None,
                Source::Stream(s) => Some(s.cursor()),
            },
        }
    }

    /// The fixed validation micro-batches (empty when there are none).
    pub fn validation(&self) -> &[Vec<Vec<i32>>] {
        &self.val
    }

    pub fn describe(&self, cfg: &Config) -> String {
        match &self.source {
            Source::Bin(f) => format!("{} ({} tokens)", f.path().display(), f.num_tokens()),
            Source::Stream(_) => format!(
                "parquet {:?} through {}",
                cfg.data.parquet,
                Path::new(&cfg.data.tokenizer).display()
            ),
        }
    }
}
