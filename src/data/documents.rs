//! A lazy iterator over the texts of one split of many row groups, one
//! row group in memory at a time: what tokenizer training consumes.

use std::sync::{Arc, Mutex};

use super::parquet::{read_row_group, RowGroupRef};
use super::stream::Split;
use super::tokenizer::{is_long, pieces, MAX_PIECE_BYTES};

/// Texts of the documents of `split`, row group by row group. The
/// `tokenizers` trainer takes a plain iterator, so a read error ends the
/// iteration and is kept in [`Texts::error`] for the caller to check.
pub struct Texts {
    groups: std::vec::IntoIter<RowGroupRef>,
    current: std::vec::IntoIter<String>,
    split: Split,
    val_fraction: f64,
    upper_bound: usize,
    error: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Texts {
    pub fn new(groups: Vec<RowGroupRef>, split: Split, val_fraction: f64) -> Texts {
        let upper_bound = groups.iter().map(|g| g.rows as usize).sum();
        Texts {
            groups: groups.into_iter(),
            current: Vec::new().into_iter(),
            split,
            val_fraction,
            upper_bound,
            error: Arc::default(),
        }
    }

    /// Documents longer than [`MAX_PIECE_BYTES`] as their [`pieces`]
    /// (cut before whitespace, so the trainer's word counts are those of
    /// the whole document), which bounds the trainer's memory per text.
    fn cut_long(&mut self, texts: Vec<String>, rg: &RowGroupRef) -> Vec<String> {
        if !texts.iter().any(|t| is_long(t)) {
            return texts;
        }
        let mut out = Vec::with_capacity(texts.len());
        let mut split = 0;
        for t in texts {
            if is_long(&t) {
                let parts = pieces(&t, MAX_PIECE_BYTES);
                self.upper_bound += parts.len() - 1;
                out.extend(parts.into_iter().map(str::to_string));
                split += 1;
            } else {
                out.push(t);
            }
        }
        tracing::info!(
            "{}: row group {}: {split} document(s) longer than {} MiB fed to the trainer in pieces",
            rg.file.display(),
            rg.index,
            MAX_PIECE_BYTES >> 20
        );
        out
    }

    /// Where a read error is left.
    pub fn error_slot(&self) -> Arc<Mutex<Option<anyhow::Error>>> {
        self.error.clone()
    }
}

impl Iterator for Texts {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(t) = self.current.next() {
                self.upper_bound = self.upper_bound.saturating_sub(1);
                return Some(t);
            }
            let rg = self.groups.next()?;
            match read_row_group(&rg) {
                Ok(docs) => {
                    let (split, frac) = (self.split, self.val_fraction);
                    let kept: Vec<String> = docs
                        .into_iter()
                        .filter(|d| split.keeps(d.id.as_deref(), &d.text, frac))
                        .map(|d| d.text)
                        .collect();
                    self.upper_bound = self
                        .upper_bound
                        .saturating_sub((rg.rows as usize).saturating_sub(kept.len()));
                    self.current = self.cut_long(kept, &rg).into_iter();
                }
                Err(e) => {
                    *self.error.lock().expect("not poisoned") = Some(e);
                    return None;
                }
            }
        }
    }

    /// The rows left (an upper bound: the other split's documents are
    /// counted out when their row group is read) drive the trainer's
    /// progress bar.
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.upper_bound))
    }
}
