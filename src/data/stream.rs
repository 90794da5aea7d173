//! The resumable token stream: parquet row groups -> documents of one
//! split -> tokens joined by the end-of-text token -> rows of S+1 tokens
//! -> a bounded row shuffle, with a small cursor that says exactly where
//! the stream stands.
//!
//! Order, for a given seed: each epoch the row groups of all files are
//! shuffled (seed, epoch) and dealt round robin to the W workers, so every
//! row group goes to exactly one worker per epoch. A worker reads its row
//! groups in that order as one continuous token stream (nothing is dropped
//! at the end of an epoch: the tokens of an unfinished row carry into the
//! next epoch). Rows are then shuffled within windows of `shuffle_rows`
//! rows (a bounded shuffle buffer, the same idea as a shuffle buffer of
//! that size but with a cursor that stays small: the window's start
//! position plus how many of its rows were handed out).
//!
//! Resuming re-reads and re-tokenises at most one row group and one
//! window; it yields exactly the rows the uninterrupted stream would have.
//!
//! Row groups are read and tokenised ahead of the packer on a background
//! thread, a few at once (rayon), so a training step never waits for a
//! whole row group and uneven documents do not leave cores idle.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::packing::{is_validation, shard, shuffle};
use super::parquet::{read_row_group, RowGroupRef};
use super::tokenizer::{encode_many, eot_id, log_long};

/// Which documents a stream reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    /// True when a document (by its id, or its text) belongs to this split.
    pub fn keeps(self, id: Option<&str>, text: &str, val_fraction: f64) -> bool {
        is_validation(id, text, val_fraction) == (self == Split::Validation)
    }
}

/// How a stream is cut and ordered.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamOptions {
    /// Tokens per row: S + 1 (inputs and the shifted targets).
    pub row_len: usize,
    pub seed: u64,
    /// Shuffle the row groups each epoch (training); off, they are read
    /// in file order (validation, benchmarks).
    pub shuffle_groups: bool,
    /// Rows per shuffle window; 0 or 1 keeps the packed order.
    pub shuffle_rows: usize,
    /// Share of documents held out for validation (by id hash).
    pub val_fraction: f64,
    pub split: Split,
    /// This worker's rank among `workers`.
    pub rank: usize,
    pub workers: usize,
    /// Stop after this many epochs (the partial row at the end is dropped
    /// and reported); `None` streams forever, as training does.
    pub epochs: Option<u64>,
}

impl StreamOptions {
    /// Every document once, in file order and unshuffled, as one worker
    /// (evaluation on a whole dataset, benchmarks).
    pub fn single_pass(row_len: usize, seed: u64) -> StreamOptions {
        StreamOptions {
            row_len,
            seed,
            shuffle_groups: false,
            shuffle_rows: 1,
            // Every document: the "training" split of a zero hold-out.
            val_fraction: 0.0,
            split: Split::Train,
            rank: 0,
            workers: 1,
            epochs: Some(1),
        }
    }
}

/// Where the packer stands: the next token is token `token` of document
/// `doc` (its row index in the row group) of row group `group` (position
/// in this worker's order for `epoch`). A document's tokens are followed
/// by the end-of-text token, which counts as its last token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub group: usize,
    pub doc: usize,
    pub token: usize,
}

/// The serialisable state of a stream: the position at which the current
/// shuffle window started, that window's number (it seeds the window's
/// permutation) and how many of its rows were handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub window_start: Position,
    pub window: u64,
    pub emitted: usize,
}

/// The tokenised documents of one row group; `None` for documents of the
/// other split.
struct LoadedGroup {
    epoch: u64,
    group: usize,
    docs: Vec<Option<Vec<u32>>>,
}

pub struct TokenStream {
    all_groups: Vec<RowGroupRef>,
    eot: u32,
    opts: StreamOptions,
    /// This worker's row groups for `order_epoch`.
    order: Vec<RowGroupRef>,
    order_epoch: u64,
    pos: Position,
    loaded: Option<LoadedGroup>,
    /// Row groups from the window start on, loaded in order ahead of use.
    ahead: Receiver<Result<LoadedGroup>>,
    /// Row groups read in a row that gave this split no token (an epoch's
    /// worth means the split is empty: an error, not a hang).
    barren_groups: usize,
    window: Vec<Vec<u32>>,
    cursor: Cursor,
}

/// A 64-bit mix of several words (splitmix64 finaliser), for seeds.
fn mix(words: &[u64]) -> u64 {
    words.iter().fold(0x243f6a8885a308d3u64, |h, &w| {
        let mut z = (h ^ w).wrapping_add(0x9e3779b97f4a7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    })
}

/// Worker `rank`'s row groups for `epoch`: all row groups shuffled by
/// (seed, epoch) unless `shuffle_groups` is off, dealt round robin.
pub fn epoch_order(all: &[RowGroupRef], opts: &StreamOptions, epoch: u64) -> Vec<RowGroupRef> {
    let mut groups = all.to_vec();
    if opts.shuffle_groups {
        shuffle(&mut groups, mix(&[opts.seed, epoch]));
    }
    shard(&groups, opts.rank, opts.workers)
}

impl TokenStream {
    /// A stream over `groups` (every row group of the inputs, in file
    /// order), starting at `cursor` (the beginning when `None`).
    pub fn open(
        groups: Vec<RowGroupRef>,
        tokenizer: Arc<Tokenizer>,
        opts: StreamOptions,
        cursor: Option<Cursor>,
    ) -> Result<TokenStream> {
        if opts.row_len < 2 {
            bail!("rows need at least 2 tokens, got {}", opts.row_len);
        }
        if opts.workers == 0 || opts.rank >= opts.workers {
            bail!(
                "worker rank {} of {} is out of range",
                opts.rank,
                opts.workers
            );
        }
        if !(0.0..1.0).contains(&opts.val_fraction) {
            bail!("val_fraction {} is outside [0, 1)", opts.val_fraction);
        }
        if groups.len() < opts.workers {
            bail!(
                "{} row groups cannot feed {} workers: each worker needs at least one \
                 (split the parquet files into smaller row groups, or use fewer workers)",
                groups.len(),
                opts.workers
            );
        }
        let eot = eot_id(&tokenizer)?;
        let cursor = cursor.unwrap_or_default();
        let order = epoch_order(&groups, &opts, cursor.window_start.epoch);
        if cursor.window_start.group >= order.len() {
            bail!(
                "data cursor points at row group {} of epoch {}, but this worker has {} row groups \
                 (the inputs changed since the checkpoint?)",
                cursor.window_start.group,
                cursor.window_start.epoch,
                order.len()
            );
        }
        let ahead = prefetch(
            groups.clone(),
            tokenizer.clone(),
            opts.clone(),
            cursor.window_start,
        );
        let mut stream = TokenStream {
            order_epoch: cursor.window_start.epoch,
            order,
            ahead,
            all_groups: groups,
            eot,
            opts,
            pos: cursor.window_start,
            loaded: None,
            barren_groups: 0,
            window: vec![],
            cursor,
        };
        stream.fill_window()?;
        if cursor.emitted > stream.window.len() {
            bail!(
                "data cursor says {} rows of window {} were used, but windows hold {}",
                cursor.emitted,
                cursor.window,
                stream.window.len()
            );
        }
        Ok(stream)
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// The next row of `row_len` tokens; `None` once `epochs` are done.
    pub fn next_row(&mut self) -> Result<Option<Vec<u32>>> {
        if self.cursor.emitted == self.window.len() {
            if self.window.len() < self.opts.shuffle_rows.max(1) {
                return Ok(None); // the last, short window is used up
            }
            self.cursor = Cursor {
                window_start: self.pos,
                window: self.cursor.window + 1,
                emitted: 0,
            };
            self.fill_window()?;
            if self.window.is_empty() {
                return Ok(None);
            }
        }
        let row = std::mem::take(&mut self.window[self.cursor.emitted]);
        self.cursor.emitted += 1;
        Ok(Some(row))
    }

    /// Packs the window that starts at the current position and permutes
    /// it by (seed, rank, window number). Only the last window of a
    /// stream with an epoch limit is short.
    fn fill_window(&mut self) -> Result<()> {
        let n = self.opts.shuffle_rows.max(1);
        let mut rows = Vec::with_capacity(n);
        while rows.len() < n {
            match self.pack_row()? {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        if rows.len() > 1 {
            shuffle(
                &mut rows,
                mix(&[self.opts.seed, self.opts.rank as u64, self.cursor.window]),
            );
        }
        self.window = rows;
        Ok(())
    }

    fn pack_row(&mut self) -> Result<Option<Vec<u32>>> {
        let row_len = self.opts.row_len;
        let mut row = Vec::with_capacity(row_len);
        while row.len() < row_len {
            if self.opts.epochs.is_some_and(|e| self.pos.epoch >= e) {
                if !row.is_empty() {
                    tracing::info!(
                        split = ?self.opts.split,
                        rank = self.opts.rank,
                        "end of data after {} epochs: the last {} tokens (less than a row) are not used",
                        self.pos.epoch,
                        row.len()
                    );
                }
                return Ok(None);
            }
            self.ensure_loaded()?;
            let docs = &self.loaded.as_ref().expect("loaded above").docs;
            let Some(doc) = docs.get(self.pos.doc) else {
                self.next_group()?;
                continue;
            };
            let Some(tokens) = doc else {
                self.pos.doc += 1;
                continue;
            };
            let total = tokens.len() + 1;
            let take = (row_len - row.len()).min(total - self.pos.token);
            let end = self.pos.token + take;
            row.extend_from_slice(&tokens[self.pos.token..end.min(tokens.len())]);
            if end == total {
                row.push(self.eot);
                self.pos.doc += 1;
                self.pos.token = 0;
            } else {
                self.pos.token = end;
            }
            self.barren_groups = 0;
        }
        Ok(Some(row))
    }

    fn next_group(&mut self) -> Result<()> {
        self.barren_groups += 1;
        if self.barren_groups > self.order.len() {
            bail!(
                "the {:?} split of worker {} of {} has no documents: a whole epoch of {} row groups \
                 gave no token (val_fraction {})",
                self.opts.split,
                self.opts.rank,
                self.opts.workers,
                self.order.len(),
                self.opts.val_fraction
            );
        }
        self.pos.group += 1;
        self.pos.doc = 0;
        self.pos.token = 0;
        if self.pos.group == self.order.len() {
            tracing::info!(
                split = ?self.opts.split,
                rank = self.opts.rank,
                "epoch {} done ({} row groups); an unfinished row carries into the next epoch",
                self.pos.epoch,
                self.order.len()
            );
            self.pos.epoch += 1;
            self.pos.group = 0;
        }
        Ok(())
    }

    /// Takes the row group at the current position from the prefetcher
    /// unless it is the one already loaded.
    fn ensure_loaded(&mut self) -> Result<()> {
        let (epoch, group) = (self.pos.epoch, self.pos.group);
        if self
            .loaded
            .as_ref()
            .is_some_and(|g| g.epoch == epoch && g.group == group)
        {
            return Ok(());
        }
        if self.order_epoch != epoch {
            self.order = epoch_order(&self.all_groups, &self.opts, epoch);
            self.order_epoch = epoch;
        }
        let next = self
            .ahead
            .recv()
            .map_err(|_| anyhow!("the row-group reader thread stopped"))??;
        if (next.epoch, next.group) != (epoch, group) {
            bail!(
                "internal: the reader delivered row group {} of epoch {}, the packer wanted {group} of {epoch}",
                next.group,
                next.epoch
            );
        }
        self.loaded = Some(next);
        Ok(())
    }
}

/// Starts the background reader: from `from`, every row group of this
/// worker in stream order, `rayon::current_num_threads()` at a time,
/// delivered in order through a channel of that depth. It stops at the
/// first error (delivered), at the epoch limit, or when the stream is
/// dropped.
fn prefetch(
    all: Vec<RowGroupRef>,
    tokenizer: Arc<Tokenizer>,
    opts: StreamOptions,
    from: Position,
) -> Receiver<Result<LoadedGroup>> {
    let width = rayon::current_num_threads().max(1);
    let (tx, rx) = sync_channel(width);
    std::thread::spawn(move || {
        let (mut epoch, mut group) = (from.epoch, from.group);
        let mut order = epoch_order(&all, &opts, epoch);
        loop {
            let mut batch = Vec::with_capacity(width);
            while batch.len() < width && opts.epochs.map_or(true, |e| epoch < e) {
                batch.push((epoch, group, order[group].clone()));
                group += 1;
                if group == order.len() {
                    epoch += 1;
                    group = 0;
                    order = epoch_order(&all, &opts, epoch);
                }
            }
            let loaded: Vec<Result<LoadedGroup>> = batch
                .into_par_iter()
                .map(|(epoch, group, rg)| {
                    let docs = load_split(&rg, &tokenizer, opts.split, opts.val_fraction)?;
                    Ok(LoadedGroup { epoch, group, docs })
                })
                .collect();
            if loaded.is_empty() {
                return; // past the epoch limit
            }
            for l in loaded {
                let failed = l.is_err();
                if tx.send(l).is_err() || failed {
                    return;
                }
            }
        }
    });
    rx
}

/// The documents of one row group tokenised, `None` where a document
/// belongs to the other split.
pub fn load_split(
    rg: &RowGroupRef,
    tokenizer: &Tokenizer,
    split: Split,
    val_fraction: f64,
) -> Result<Vec<Option<Vec<u32>>>> {
    let docs = read_row_group(rg)?;
    let keep: Vec<bool> = docs
        .iter()
        .map(|d| split.keeps(d.id.as_deref(), &d.text, val_fraction))
        .collect();
    let texts: Vec<&str> = docs
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(d, _)| d.text.as_str())
        .collect();
    log_long(texts.iter().copied(), &rg.file, rg.index);
    let mut encoded = encode_many(tokenizer, &texts)
        .with_context(|| format!("{}: row group {}", rg.file.display(), rg.index))?
        .into_iter();
    Ok(keep
        .into_iter()
        .map(|k| if k { encoded.next() } else { None })
        .collect())
}
