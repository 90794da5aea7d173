//! Tokenizers through the `tokenizers` crate: load any `tokenizer.json`,
//! or train a byte-level BPE with an end-of-text special token.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// The end-of-text token joining documents.
pub const EOT: &str = "<|endoftext|>";

pub fn load(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: not a loadable tokenizer.json ({e})", path.display()))
}

/// The id of the end-of-text token, which a tokenizer used for training
/// must have.
pub fn eot_id(t: &Tokenizer) -> Result<u32> {
    t.token_to_id(EOT)
        .ok_or_else(|| anyhow!("the tokenizer has no `{EOT}` token"))
}

/// Trains a byte-level BPE of `vocab_size` tokens (including the 256 byte
/// symbols and the end-of-text token) on `texts`, multi-threaded, with a
/// progress bar when `progress` is set. Pairs seen fewer than
/// `min_frequency` times are not merged, so a small corpus can end with a
/// smaller vocabulary (callers report it).
pub fn train_bpe<I, S>(
    texts: I,
    vocab_size: usize,
    min_frequency: u64,
    progress: bool,
) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(progress)
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut builder: TokenizerBuilder<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    > = TokenizerBuilder::new();
    builder = builder
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()));
    let mut tk = builder
        .build()
        .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    tk.train(&mut trainer, texts)
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    Ok(Tokenizer::from(tk))
}

pub fn save(t: &Tokenizer, path: &Path) -> Result<()> {
    t.save(path, false)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Token ids of `text` (no special tokens added).
pub fn encode(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(t.encode(text, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

/// Token ids of many texts, tokenised in parallel (no special tokens
/// added, no offsets tracked).
pub fn encode_many(t: &Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    Ok(t.encode_batch_fast(texts.to_vec(), false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .into_iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}
