//! Tokenizers through the `tokenizers` crate: load any `tokenizer.json`,
//! or train a byte-level BPE with an end-of-text special token.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;
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

/// [`load`], refused when the tokenizer has ids a model of `vocab_size`
/// embeddings has no row for.
pub fn load_for_model(path: &Path, vocab_size: i64) -> Result<Tokenizer> {
    let tk = load(path)?;
    let tokens = tk.get_vocab_size(true) as i64;
    if tokens > vocab_size {
        anyhow::bail!(
            "{}: {tokens} tokens, more than model.vocab_size = {vocab_size}",
            path.display()
        );
    }
    Ok(tk)
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

/// The longest text tokenised in one piece, in bytes. The tokenizer's
/// working memory grows with the text it is given (hundreds of bytes per
/// input byte: normalisation alignments, pre-token splits, per-token
/// strings and offsets), so a longer document is cut into pieces of at
/// most this size, tokenised one after another and concatenated: memory
/// stays bounded whatever the document's length.
pub const MAX_PIECE_BYTES: usize = 1 << 20;

/// `text` cut into consecutive pieces of at most `max` bytes (one piece
/// when it fits). Each cut is at a char boundary, just before the last
/// whitespace character of the piece where there is one, so that the
/// whitespace starts the next piece as it would start the next
/// pre-token ("word" | " next"): for whitespace-splitting pre-tokenizers
/// (GPT-2-style byte-level, `Whitespace`) the tokens are those of the
/// whole text. Without whitespace the cut falls at the last char
/// boundary. The pieces concatenate to `text`.
pub fn pieces(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(4); // room for any char
    let mut out = vec![];
    let mut rest = text;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let cut = rest[..end]
            .char_indices()
            .rev()
            .find(|&(i, c)| i > 0 && c.is_whitespace())
            .map_or(end, |(i, _)| i);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// True when `text` is tokenised in pieces (see [`MAX_PIECE_BYTES`]).
pub fn is_long(text: &str) -> bool {
    text.len() > MAX_PIECE_BYTES
}

/// Logs how many of a row group's texts are tokenised in pieces (none:
/// no line).
pub fn log_long<'a>(texts: impl IntoIterator<Item = &'a str>, file: &Path, row_group: usize) {
    let (mut long, mut longest) = (0usize, 0usize);
    for t in texts {
        if is_long(t) {
            long += 1;
            longest = longest.max(t.len());
        }
    }
    if long > 0 {
        tracing::info!(
            split_documents = long,
            "{}: row group {row_group}: {long} document(s) longer than {} MiB (the longest {:.1} MiB) \
             tokenised in pieces of at most {} MiB",
            file.display(),
            MAX_PIECE_BYTES >> 20,
            longest as f64 / (1u64 << 20) as f64,
            MAX_PIECE_BYTES >> 20
        );
    }
}

fn ids(e: tokenizers::Result<tokenizers::Encoding>) -> Result<Vec<u32>> {
    Ok(e.map_err(|e| anyhow!("tokenizing: {e}"))?
        .get_ids()
        .to_vec())
}

/// Pieces of one long text tokenised at once, at most.
const PARALLEL_PIECES: usize = 4;

/// A long text's ids: its pieces tokenised a few at a time (at most
/// [`PARALLEL_PIECES`], fewer with fewer rayon threads, so memory is
/// bounded by a few pieces' worth whatever the core count), each reduced
/// to its ids before the next few start.
fn encode_long(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let parts = pieces(text, MAX_PIECE_BYTES);
    let width = rayon::current_num_threads().clamp(1, PARALLEL_PIECES);
    let mut out = Vec::new();
    for chunk in parts.chunks(width) {
        let encoded: Vec<Result<Vec<u32>>> = chunk
            .par_iter()
            .map(|p| ids(t.encode_fast(*p, false)))
            .collect();
        for e in encoded {
            out.extend_from_slice(&e?);
        }
    }
    Ok(out)
}

/// Token ids of `text` (no special tokens added); a text longer than
/// [`MAX_PIECE_BYTES`] is tokenised in [`pieces`].
pub fn encode(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    if is_long(text) {
        return encode_long(t, text);
    }
    ids(t.encode(text, false))
}

/// Token ids of many texts, tokenised in parallel (no special tokens
/// added, no offsets tracked). Texts longer than [`MAX_PIECE_BYTES`] are
/// tokenised in [`pieces`] (callers log how many: [`log_long`]); the
/// others exactly as one batch.
pub fn encode_many(t: &Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    let long = texts.iter().filter(|s| is_long(s)).count();
    if long == 0 {
        return Ok(t
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect());
    }
    let short: Vec<&str> = texts.iter().copied().filter(|s| !is_long(s)).collect();
    let mut short = t
        .encode_batch_fast(short, false)
        .map_err(|e| anyhow!("tokenizing: {e}"))?
        .into_iter()
        .map(|e| e.get_ids().to_vec());
    texts
        .iter()
        .map(|s| {
            if is_long(s) {
                encode_long(t, s)
            } else {
                Ok(short.next().expect("one encoding per short text"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, max: usize) -> Vec<&str> {
        let p = pieces(text, max);
        assert_eq!(p.concat(), text);
        assert!(p.iter().all(|s| s.len() <= max.max(4)), "{p:?}");
        assert!(p.iter().all(|s| !s.is_empty()) || text.is_empty(), "{p:?}");
        p
    }

    #[test]
    fn pieces_cut_before_whitespace_at_char_boundaries() {
        assert_eq!(check("short", 10), vec!["short"]);
        assert_eq!(check("", 10), vec![""]);
        assert_eq!(
            check("one two three four", 10),
            vec!["one two", " three", " four"]
        );
        // A run of whitespace: the cut leaves its last char to the next word.
        assert_eq!(check("ab\n\n cd ef", 6), vec!["ab\n\n", " cd ef"]);
        // No whitespace: cut at the last char boundary (é is 2 bytes).
        assert_eq!(check("ééééé", 5), vec!["éé", "éé", "é"]);
        assert_eq!(check("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        // Leading whitespace only: no empty piece.
        assert_eq!(check(" abcdefgh", 4), vec![" abc", "defg", "h"]);
    }
}
