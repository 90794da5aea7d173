//! `sharedmoe tokenizer train`: a byte-level BPE from parquet shards.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::data::documents::Texts;
use crate::data::parquet::{all_row_groups, expand_inputs, BadFilePolicy};
use crate::data::stream::Split;
use crate::data::tokenizer::{eot_id, save, train_bpe};

#[derive(clap::Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE (with an `<|endoftext|>` token) on the
    /// training split of parquet files, directories or globs.
    Train {
        /// Parquet files, directories or globs (FineWeb-Edu schema: a `text` column).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Vocabulary size, including the 256 byte symbols and `<|endoftext|>`.
        #[arg(long, default_value_t = 32000)]
        vocab: usize,
        /// Merge only pairs seen at least this often (2 is the usual
        /// choice; a small corpus may need 1 to reach the vocabulary size).
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        /// Where to write tokenizer.json.
        #[arg(long)]
        out: PathBuf,
        /// Documents held out for validation (by id hash) are not trained on.
        #[arg(long, default_value_t = 0.005)]
        val_fraction: f64,
        #[arg(long, default_value = "fail")]
        on_bad_file: BadFilePolicy,
    },
}

pub fn run(cmd: &TokenizerCommand) -> Result<()> {
    let TokenizerCommand::Train {
        inputs,
        vocab,
        min_frequency,
        out,
        val_fraction,
        on_bad_file,
    } = cmd;
    if *vocab < 258 {
        bail!("--vocab {vocab}: a byte-level BPE needs at least 258 (256 bytes, end of text, one merge)");
    }
    let began = Instant::now();
    let files = expand_inputs(inputs)?;
    let (groups, skipped) = all_row_groups(&files, *on_bad_file)?;
    if groups.is_empty() {
        bail!("no row groups to read in {inputs:?}");
    }
    tracing::info!(
        files = files.len() - skipped.len(),
        skipped = skipped.len(),
        row_groups = groups.len(),
        "training a {vocab}-token byte-level BPE"
    );
    let texts = Texts::new(groups, Split::Train, *val_fraction);
    let error = texts.error_slot();
    let tk = train_bpe(texts, *vocab, *min_frequency, true)?;
    if let Some(e) = error.lock().expect("not poisoned").take() {
        return Err(e.context("reading the training documents"));
    }
    let got = tk.get_vocab_size(true);
    if got < *vocab {
        tracing::warn!(
            "the corpus supports only {got} of the {vocab} tokens asked for at --min-frequency \
             {min_frequency} (more text, or a lower --min-frequency, gives more merges)"
        );
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    save(&tk, out)?;
    println!(
        "{}: {} tokens (end of text = {}) in {:.1}s; {} files skipped",
        out.display(),
        tk.get_vocab_size(true),
        eot_id(&tk)?,
        began.elapsed().as_secs_f64(),
        skipped.len()
    );
    Ok(())
}
