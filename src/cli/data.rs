//! `sharedmoe data bytes`: text files -> byte-level `.bin` token files.
//! `sharedmoe data prepare`: parquet shards -> tokenised `.bin` files.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::parquet::BadFilePolicy;

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Byte-level tokens (vocabulary 256) of text files: OUT/train.bin and OUT/val.bin.
    Bytes {
        /// Text files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Share of the bytes (at the end) held out for validation.
        #[arg(long, default_value_t = 0.05)]
        val_fraction: f64,
    },
    /// Tokenise parquet shards: OUT/train.bin, OUT/val.bin (held-out
    /// documents, by id hash) and OUT/meta.json.
    Prepare {
        /// Parquet files, directories or globs (FineWeb-Edu schema: a `text` column).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// tokenizer.json (with an `<|endoftext|>` token).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Share of documents held out for validation.
        #[arg(long, default_value_t = 0.005)]
        val_fraction: f64,
        #[arg(long, default_value = "fail")]
        on_bad_file: BadFilePolicy,
    },
}

pub fn run(cmd: &DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Bytes {
            inputs,
            out,
            val_fraction,
        } => {
            let w = crate::data::bytes::text_to_byte_tokens(inputs, out, *val_fraction)?;
            println!(
                "{}: {} tokens; {}: {} tokens",
                w.train.display(),
                w.train_tokens,
                w.val.display(),
                w.val_tokens
            );
            Ok(())
        }
        DataCommand::Prepare {
            inputs,
            tokenizer,
            out,
            val_fraction,
            on_bad_file,
        } => {
            let s =
                crate::data::prepare::prepare(inputs, tokenizer, out, *val_fraction, *on_bad_file)?;
            println!(
                "{}: {} documents, {} tokens; {}: {} documents, {} tokens; {} files ({} skipped), \
                 {} row groups, {} in {:.1}s ({:.0} tokens/s)",
                out.join("train.bin").display(),
                s.train_documents,
                s.train_tokens,
                out.join("val.bin").display(),
                s.val_documents,
                s.val_tokens,
                s.files,
                s.skipped_files.len(),
                s.row_groups,
                s.token_dtype,
                s.seconds,
                s.tokens_per_second()
            );
            Ok(())
        }
    }
}
