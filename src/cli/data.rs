//! `sharedmoe data bytes`: text files -> byte-level `.bin` token files.

use std::path::PathBuf;

use anyhow::Result;

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
    }
}
