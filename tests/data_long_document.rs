//! Very long documents are tokenised in bounded memory, in pieces whose
//! tokens concatenate to the whole document's: a 50 MB document through a
//! real `sharedmoe data prepare` process (peak RSS measured), the shipped
//! byte-level BPE on a 3 MiB document, and exact resume of the token
//! stream from cursors inside a long document.

mod common;
mod fineweb;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use fineweb::{scratch, write_fineweb};
use sharedmoe::data::parquet::{all_row_groups, expand_inputs, BadFilePolicy};
use sharedmoe::data::stream::{Cursor, Split, StreamOptions, TokenStream};
use sharedmoe::data::tokenizer::{self, MAX_PIECE_BYTES};

/// One unit of a long document: it tokenises the same wherever it stands
/// (it starts with a word and ends with a newline), so a document of
/// repeated units has the unit's tokens, repeated.
const UNIT: &str = "The quick brown fox jumps over the lazy dog, and students of \
    the Rust programming language read about ownership and borrowing.\n";

fn shipped_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer.json")
}

/// The words (and punctuation) of UNIT, for a word-level tokenizer.
fn unit_words() -> Vec<String> {
    let mut w: Vec<String> = UNIT
        .replace([',', '.'], " ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    w.extend([",".to_string(), ".".to_string()]);
    w.sort();
    w.dedup();
    w
}

/// `docs` as a parquet file with only `id` and `text`, one row group,
/// without statistics or dictionary (as pyarrow writes a huge value: no
/// copy of it in the footer).
fn write_plain(path: &Path, docs: &[(&str, &str)]) {
    let col = |f: &dyn Fn(&(&str, &str)) -> String| -> ArrayRef {
        Arc::new(StringArray::from(docs.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter([
        ("id", col(&|d| d.0.to_string())),
        ("text", col(&|d| d.1.to_string())),
    ])
    .unwrap();
    let props = WriterProperties::builder()
        .set_statistics_enabled(EnabledStatistics::None)
        .set_dictionary_enabled(false)
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Runs the binary with stderr in a file of `dir`, waits for it with
/// wait4 and returns (success, peak RSS in bytes, stderr).
fn run_measured(args: &[&str], dir: &Path) -> (bool, u64, String) {
    let err_path = dir.join("stderr.txt");
    // Reaped by the wait4 below (which std's wait cannot replace: it
    // gives no rusage).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_sharedmoe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value; wait4 fills it for our
    // own child, which std has not waited for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    (ok, usage.ru_maxrss as u64 * 1024, stderr)
}

fn tokens_u16(path: &Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
        .collect()
}

#[test]
fn a_50_mb_document_is_prepared_in_bounded_memory_with_every_token() {
    let dir = scratch("long-document");
    let repeats = 50_000_000 / UNIT.len() + 1;
    let text = UNIT.repeat(repeats);
    let input = dir.join("long.parquet");
    write_plain(
        &input,
        &[("<urn:long>", text.as_str()), ("<urn:short>", UNIT)],
    );
    drop(text);
    let tk_path = common::word_level_tokenizer(&dir, &unit_words());
    let out = dir.join("out");
    let started = std::time::Instant::now();
    let (ok, peak, stderr) = run_measured(
        &[
            "data",
            "prepare",
            input.to_str().unwrap(),
            "--tokenizer",
            tk_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--val-fraction",
            "0",
        ],
        &dir,
    );
    let secs = started.elapsed().as_secs_f64();
    assert!(ok, "data prepare failed:\n{stderr}");
    eprintln!(
        "data prepare of a {} MB document: peak RSS {:.0} MB, {secs:.1} s",
        repeats * UNIT.len() / 1_000_000,
        peak as f64 / 1e6
    );
    assert!(
        peak < 1_500_000_000,
        "peak RSS {:.0} MB for a 50 MB document (bounded memory expected)",
        peak as f64 / 1e6
    );
    assert!(
        stderr.contains("row group 0: 1 document(s) longer than 1 MiB (the longest 47.7 MiB)"),
        "the split is logged:\n{stderr}"
    );
    // Every token: the unit's `repeats` times, the end-of-text token, then
    // the short document.
    let tk = tokenizer::load(&tk_path).unwrap();
    let unit = tokenizer::encode(&tk, UNIT).unwrap();
    assert!(!unit.contains(&(unit_words().len() as u32 + 1)), "no [UNK]");
    let eot = tokenizer::eot_id(&tk).unwrap();
    let got = tokens_u16(&out.join("train.bin"));
    assert_eq!(got.len(), unit.len() * (repeats + 1) + 2, "token count");
    let (long, short) = got.split_at(unit.len() * repeats + 1);
    assert!(
        long.chunks(unit.len()).take(repeats).all(|c| c == unit),
        "the long document's tokens are the unit's, repeated"
    );
    assert_eq!(
        (long[long.len() - 1], &short[..unit.len()]),
        (eot, &unit[..])
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["train_tokens"], got.len() as u64);
    assert_eq!(meta["split_documents"], 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_bpe_tokenises_a_long_document_as_its_units() {
    let tk = tokenizer::load(&shipped_tokenizer()).unwrap();
    let unit = tokenizer::encode(&tk, UNIT).unwrap();
    let repeats = 3 * MAX_PIECE_BYTES / UNIT.len() + 7;
    let text = UNIT.repeat(repeats);
    assert!(tokenizer::pieces(&text, MAX_PIECE_BYTES).len() == 4);
    let want: Vec<u32> = unit
        .iter()
        .copied()
        .cycle()
        .take(unit.len() * repeats)
        .collect();
    let many = tokenizer::encode_many(&tk, &[UNIT, &text, "short"]).unwrap();
    assert_eq!(many[0], unit);
    assert!(many[1] == want, "the pieces' tokens are the whole text's");
    assert_eq!(many[2], tokenizer::encode(&tk, "short").unwrap());
    assert!(tokenizer::encode(&tk, &text).unwrap() == want);
}

#[test]
fn resuming_inside_a_long_document_gives_the_uninterrupted_stream() {
    let dir = scratch("long-resume");
    let words = unit_words();
    let tk = Arc::new(tokenizer::load(&common::word_level_tokenizer(&dir, &words)).unwrap());
    // 2.5 MiB (three pieces) between short documents, in two files.
    let long = UNIT.repeat(5 * MAX_PIECE_BYTES / 2 / UNIT.len());
    let docs = [
        ("<urn:a>", "The lazy dog"),
        ("<urn:long>", long.as_str()),
        ("<urn:b>", "read about Rust"),
    ];
    write_fineweb(&dir.join("0.parquet"), &docs, 2, true);
    write_fineweb(&dir.join("1.parquet"), &[("<urn:c>", UNIT)], 1, true);
    let files = expand_inputs(&[dir.join("*.parquet")]).unwrap();
    let groups = all_row_groups(&files, BadFilePolicy::Fail).unwrap().0;
    let opts = StreamOptions {
        row_len: 4097,
        seed: 7,
        shuffle_groups: true,
        shuffle_rows: 8,
        val_fraction: 0.0,
        split: Split::Train,
        rank: 0,
        workers: 1,
        epochs: Some(1),
    };
    let all = |s: &mut TokenStream| -> Vec<Vec<u32>> {
        std::iter::from_fn(|| s.next_row().unwrap()).collect()
    };
    let mut s = TokenStream::open(groups.clone(), tk.clone(), opts.clone(), None).unwrap();
    let full = all(&mut s);
    let unit = tokenizer::encode(&tk, UNIT).unwrap();
    let n_tokens: usize = full.iter().map(Vec::len).sum();
    let expected = unit.len() * (long.len() / UNIT.len()) + 1 + 3 + 1 + 3 + 1 + unit.len() + 1;
    assert_eq!(
        n_tokens,
        expected / 4097 * 4097,
        "every token of the long document is streamed (the partial last row is dropped)"
    );
    assert!(full.len() > 40, "{} rows", full.len());
    for cut in [1, 9, 17, full.len() / 2, full.len() - 3] {
        let mut a = TokenStream::open(groups.clone(), tk.clone(), opts.clone(), None).unwrap();
        let mut got: Vec<Vec<u32>> = (0..cut).map(|_| a.next_row().unwrap().unwrap()).collect();
        let cursor: Cursor =
            serde_json::from_str(&serde_json::to_string(&a.cursor()).unwrap()).unwrap();
        if cut == 17 {
            // The third window starts some 65,000 tokens into the stream:
            // inside the long document, whatever the row-group order.
            assert!(cursor.window_start.token > 0, "{cursor:?}");
        }
        drop(a);
        let mut b =
            TokenStream::open(groups.clone(), tk.clone(), opts.clone(), Some(cursor)).unwrap();
        got.extend(all(&mut b));
        assert!(got == full, "resumed after {cut} rows (cursor {cursor:?})");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
