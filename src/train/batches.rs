//! The training loop's two token sources behind one interface: `.bin`
//! files (DESIGN.md layout, batches indexed by step) or parquet shards
//! tokenised on the fly through the resumable [`TokenStream`]. Both hand
//! out each local replica's rows of S+1 tokens as i32, and say where they
//! stand so a checkpoint can resume them exactly.
//!
//! A data-parallel job of R replicas (`train.replicas`) may be spread
//! over several processes, each feeding a contiguous range of the global
//! replica indices; the rows a replica gets do not depend on that split.
//! A `.bin` source indexes the global batch directly. A parquet source is
//! read as K = `data.shards` independent streams (stream k is worker k of
//! K of [`TokenStream`]); replica r reads from shard r / (R/K), the R/K
//! replicas of a shard taking B/R rows each from its stream in increasing
//! r order. A process covers whole shards and opens only their streams.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

use crate::data::parquet::{all_row_groups, expand_inputs, RowGroupRef};
use crate::data::stream::{Cursor, Split, StreamOptions, TokenStream};
use crate::data::{tokenizer, TokenFile};
use crate::digest::sha256_file;

use super::config::Config;

/// Where the training data stands, as checkpoints store it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataPosition {
    /// The next global batch (the `.bin` source's cursor; kept for both).
    pub next_batch: i64,
    /// The parquet streams' cursors by shard index: those of the shards a
    /// process owns ([`Batches::position`]), or of all shards of the job
    /// (a checkpoint, [`DataPosition::merge`]); empty for `.bin` sources
    /// and fresh starts.
    pub streams: BTreeMap<u32, Cursor>,
}

impl DataPosition {
    /// Where a checkpoint's data stands.
    pub fn from_state(state: &crate::ckpt::TrainingState) -> DataPosition {
        DataPosition {
            next_batch: state.next_batch,
            streams: state.data_cursors.clone(),
        }
    }

    /// The job's position from the positions of its processes: they must
    /// agree on `next_batch` and hold the cursors of disjoint shards.
    pub fn merge(parts: impl IntoIterator<Item = DataPosition>) -> Result<DataPosition> {
        let mut parts = parts.into_iter();
        let Some(mut all) = parts.next() else {
            return Ok(DataPosition::default());
        };
        for p in parts {
            if p.next_batch != all.next_batch {
                bail!(
                    "cannot merge data positions at different batches ({} and {})",
                    all.next_batch,
                    p.next_batch
                );
            }
            for (k, c) in p.streams {
                if all.streams.insert(k, c).is_some() {
                    bail!("two data positions hold a cursor for shard {k}");
                }
            }
        }
        Ok(all)
    }
}

enum Source {
    Bin(TokenFile),
    /// The training streams of this process's shards `first..`, in order;
    /// each feeds `replicas_per_shard` consecutive global replicas.
    Stream {
        first: u32,
        replicas_per_shard: i64,
        streams: Vec<TokenStream>,
    },
}

pub struct Batches {
    source: Source,
    next_batch: i64,
    /// The global replica indices this process feeds.
    local: Range<i64>,
    /// Validation micro-batches, [eval batch][local replica] -> rows,
    /// fixed for the whole run so every evaluation scores the same tokens.
    val: Vec<Vec<Vec<i32>>>,
    /// sha256 of the tokenizer.json of a parquet source.
    pub tokenizer_sha256: Option<String>,
}

fn to_i32(rows: &[Vec<u32>]) -> Vec<i32> {
    rows.iter().flatten().map(|&t| t as i32).collect()
}

/// Refuses a replica range that is empty or outside the job's replicas.
fn check_local(cfg: &Config, local: &Range<i64>) -> Result<()> {
    let r = cfg.train.replicas;
    if local.start < 0 || local.end > r || local.start >= local.end {
        bail!(
            "local replicas {}..{}: expected a non-empty range within 0..{r} (train.replicas = {r})",
            local.start,
            local.end
        );
    }
    Ok(())
}

/// The cursor each of `shards` resumes from: none on a fresh start (an
/// empty position), else the position's cursor of every one of them. A
/// position written with another `data.shards`, or lacking some of these
/// shards, is refused rather than silently restarting those streams.
fn resume_cursors(
    at: &DataPosition,
    shards: &Range<u32>,
    num_shards: i64,
) -> Result<Vec<Option<Cursor>>> {
    if at.streams.is_empty() {
        return Ok(vec![None; shards.len()]);
    }
    if let Some(k) = at.streams.keys().find(|&&k| k as i64 >= num_shards) {
        bail!(
            "the data position has a cursor for shard {k}, but data.shards = {num_shards} \
             (the cursors were written with another data.shards?)"
        );
    }
    let missing: Vec<u32> = shards
        .clone()
        .filter(|k| !at.streams.contains_key(k))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the data position holds cursors for shards {:?} but none for shard(s) {missing:?} \
             of the shards {}..{} these replicas read: resume with the cursors of every shard \
             (or of none, to start the data from its beginning)",
            at.streams.keys().collect::<Vec<_>>(),
            shards.start,
            shards.end
        );
    }
    Ok(shards.clone().map(|k| Some(at.streams[&k])).collect())
}

/// `data.tokenizer`, refused when it has ids the model has no embedding
/// for.
fn load_tokenizer(cfg: &Config) -> Result<Arc<Tokenizer>> {
    let tk = tokenizer::load_for_model(&cfg.data.tokenizer, cfg.model.vocab_size)?;
    Ok(Arc::new(tk))
}

/// The row groups of `data.parquet`'s files, unreadable files failing or
/// skipped (with a warning) as `data.on_bad_file` says.
fn readable_row_groups(cfg: &Config) -> Result<Vec<RowGroupRef>> {
    let d = &cfg.data;
    let files = expand_inputs(&d.parquet)?;
    let (groups, skipped) = all_row_groups(&files, d.on_bad_file)?;
    if !skipped.is_empty() {
        tracing::warn!(
            "{} of {} parquet files skipped as unreadable",
            skipped.len(),
            files.len()
        );
    }
    Ok(groups)
}

/// How a stream of this run cuts its rows: S + 1 tokens and the run's seed
/// and hold-out share, whatever the split.
fn stream_options(
    cfg: &Config,
    split: Split,
    shuffle_rows: usize,
    epochs: Option<u64>,
    rank: usize,
    workers: usize,
) -> StreamOptions {
    StreamOptions {
        row_len: (cfg.train.seq_len + 1) as usize,
        seed: cfg.train.seed,
        shuffle_groups: split == Split::Train,
        shuffle_rows,
        val_fraction: cfg.data.val_fraction,
        split,
        rank,
        workers,
        epochs,
    }
}

/// The endless training stream of each of `shards` (stream k is worker k
/// of `data.shards`), resumed at its cursor.
fn training_streams(
    cfg: &Config,
    groups: &[RowGroupRef],
    tk: &Arc<Tokenizer>,
    shards: Range<u32>,
    cursors: Vec<Option<Cursor>>,
) -> Result<Vec<TokenStream>> {
    let d = &cfg.data;
    shards
        .zip(cursors)
        .map(|(k, cursor)| {
            let options = stream_options(
                cfg,
                Split::Train,
                d.shuffle_rows,
                None,
                k as usize,
                d.shards as usize,
            );
            TokenStream::open(groups.to_vec(), tk.clone(), options, cursor).with_context(|| {
                format!(
                    "opening the training stream of data shard {k} of {}",
                    d.shards
                )
            })
        })
        .collect()
}

/// The fixed validation micro-batches of the `local` replicas,
/// [eval batch][local replica] -> rows: one pass over the held-out
/// documents, in file order, as one stream whatever data.shards and the
/// process, so every process and every resume scores the same tokens.
/// They are the first eval_batches batches of replicas * micro_batch rows
/// it fills; eval batch b, replica r gets rows [r*M, (r+1)*M) of batch b.
fn validation_rows(
    cfg: &Config,
    groups: Vec<RowGroupRef>,
    tk: Arc<Tokenizer>,
    local: &Range<i64>,
) -> Result<Vec<Vec<Vec<i32>>>> {
    let t = &cfg.train;
    let options = stream_options(cfg, Split::Validation, 1, Some(1), 0, 1);
    let mut vs =
        TokenStream::open(groups, tk, options, None).context("opening the validation stream")?;
    let m = t.micro_batch as usize;
    let per_eval = t.replicas as usize * m;
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
            cfg.data.val_fraction,
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
    Ok(rows
        .chunks_exact(per_eval)
        .map(|batch| {
            batch
                .chunks_exact(m)
                .skip(local.start as usize)
                .take((local.end - local.start) as usize)
                .map(to_i32)
                .collect()
        })
        .collect())
}

impl Batches {
    /// The parquet shards whose replicas are exactly `local` (global
    /// replica indices): an error unless `local` covers whole shards.
    pub fn shards_of(cfg: &Config, local: &Range<i64>) -> Result<Range<u32>> {
        check_local(cfg, local)?;
        let (r, k) = (cfg.train.replicas, cfg.data.shards);
        if k < 1 || r % k != 0 {
            bail!("data.shards = {k} does not divide train.replicas = {r}");
        }
        let per = r / k;
        if local.start % per != 0 || local.end % per != 0 {
            bail!(
                "local replicas {}..{} do not cover whole data shards: with train.replicas = {r} and \
                 data.shards = {k} each shard feeds {per} replicas, so a process's replicas must start \
                 and end at multiples of {per}",
                local.start,
                local.end
            );
        }
        Ok((local.start / per) as u32..(local.end / per) as u32)
    }

    /// Opens the source `cfg.data` names, positioned at `at`, for the
    /// global replicas `local` (`0..train.replicas` in a single-process
    /// run).
    pub fn open(cfg: &Config, at: &DataPosition, local: Range<i64>) -> Result<Batches> {
        let d = &cfg.data;
        check_local(cfg, &local)?;
        if !d.parquet.is_empty() {
            return Self::open_parquet(cfg, at, local);
        }
        if d.train_bin.as_os_str().is_empty() {
            bail!("no training data: set data.train_bin (a .bin file) or data.parquet + data.tokenizer");
        }
        let t = &cfg.train;
        let train = TokenFile::open(&d.train_bin, d.token_dtype)?;
        train.check(t.seq_len, t.global_batch, cfg.model.vocab_size)?;
        let mut val = vec![];
        if t.eval_every > 0 && !d.val_bin.as_os_str().is_empty() {
            let f = TokenFile::open(&d.val_bin, d.token_dtype)?;
            let per_eval = t.micro_batch * t.replicas;
            f.check(t.seq_len, per_eval, cfg.model.vocab_size)?;
            val = (0..t.eval_batches)
                .map(|b| {
                    local
                        .clone()
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
            local,
            val,
            tokenizer_sha256: None,
        })
    }

    fn open_parquet(cfg: &Config, at: &DataPosition, local: Range<i64>) -> Result<Batches> {
        let (d, t) = (&cfg.data, &cfg.train);
        let shards = Self::shards_of(cfg, &local)?;
        let cursors = resume_cursors(at, &shards, d.shards)?;
        let tk = load_tokenizer(cfg)?;
        let groups = readable_row_groups(cfg)?;
        let streams = training_streams(cfg, &groups, &tk, shards.clone(), cursors)?;
        let val = if t.eval_every > 0 && d.val_fraction > 0.0 {
            validation_rows(cfg, groups, tk, &local)?
        } else {
            vec![]
        };
        Ok(Batches {
            source: Source::Stream {
                first: shards.start,
                replicas_per_shard: t.replicas / d.shards,
                streams,
            },
            next_batch: at.next_batch,
            local,
            val,
            tokenizer_sha256: Some(sha256_file(&d.tokenizer)?),
        })
    }

    /// The next global batch's rows for the local replicas: entry i is
    /// global replica `local.start + i`'s rows, [global_batch / replicas,
    /// S+1] flattened.
    pub fn next(&mut self, cfg: &Config) -> Result<Vec<Vec<i32>>> {
        let t = &cfg.train;
        let per = t.global_batch / t.replicas;
        let rows = match &mut self.source {
            Source::Bin(f) => self
                .local
                .clone()
                .map(|r| f.batch_rows(self.next_batch, t.global_batch, t.seq_len, r * per, per))
                .collect(),
            Source::Stream {
                first,
                replicas_per_shard,
                streams,
            } => {
                let mut rows = Vec::with_capacity((self.local.end - self.local.start) as usize);
                for r in self.local.clone() {
                    let s = &mut streams[(r / *replicas_per_shard - *first as i64) as usize];
                    let mut replica = Vec::with_capacity(per as usize);
                    for _ in 0..per {
                        // The training stream has no epoch limit.
                        replica.push(s.next_row()?.expect("an endless stream"));
                    }
                    rows.push(to_i32(&replica));
                }
                rows
            }
        };
        self.next_batch += 1;
        Ok(rows)
    }

    /// Where this process's data stands: the next batch and the cursors
    /// of its shards (merge those of all processes for a checkpoint).
    pub fn position(&self) -> DataPosition {
        DataPosition {
            next_batch: self.next_batch,
            streams: match &self.source {
                Source::Bin(_) => BTreeMap::new(),
                Source::Stream { first, streams, .. } => (*first..)
                    .zip(streams)
                    .map(|(k, s)| (k, s.cursor()))
                    .collect(),
            },
        }
    }

    /// The global replica indices this process feeds.
    pub fn local(&self) -> Range<i64> {
        self.local.clone()
    }

    /// The fixed validation micro-batches (empty when there are none):
    /// [eval batch][local replica] -> rows.
    pub fn validation(&self) -> &[Vec<Vec<i32>>] {
        &self.val
    }

    pub fn describe(&self, cfg: &Config) -> String {
        match &self.source {
            Source::Bin(f) => format!("{} ({} tokens)", f.path().display(), f.num_tokens()),
            Source::Stream { first, streams, .. } => {
                let mut s = format!(
                    "parquet {:?} through {}",
                    cfg.data.parquet,
                    Path::new(&cfg.data.tokenizer).display()
                );
                if cfg.data.shards > 1 {
                    s += &format!(
                        ", data shards {}..{} of {}",
                        first,
                        *first as usize + streams.len(),
                        cfg.data.shards
                    );
                }
                s
            }
        }
    }
}
