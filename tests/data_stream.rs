//! The token stream over real parquet files written here: exact token
//! sequences for a hand-checked input, shard coverage for W = 1..5, the
//! validation split, and resuming from a cursor at many cut points.

mod common;
mod fineweb;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use fineweb::{scratch, write_fineweb};
use sharedmoe::data::parquet::{
    all_row_groups, expand_inputs, read_row_group, BadFilePolicy, RowGroupRef,
};
use sharedmoe::data::stream::{epoch_order, Cursor, Split, StreamOptions, TokenStream};
use sharedmoe::data::tokenizer::load;
use tokenizers::Tokenizer;

/// The hand-checkable word-level tokenizer of `words`, loaded.
fn word_tokenizer(dir: &Path, words: &[String]) -> Arc<Tokenizer> {
    Arc::new(load(&common::word_level_tokenizer(dir, words)).unwrap())
}

fn opts(
    row_len: usize,
    shuffle_rows: usize,
    split: Split,
    rank: usize,
    workers: usize,
) -> StreamOptions {
    StreamOptions {
        row_len,
        seed: 1234,
        shuffle_groups: split == Split::Train,
        shuffle_rows,
        val_fraction: 0.2,
        split,
        rank,
        workers,
        epochs: None,
    }
}

fn rows(s: &mut TokenStream, n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|_| s.next_row().unwrap().unwrap()).collect()
}

#[test]
fn hand_checked_token_sequence() {
    let dir = scratch("stream-exact");
    let words: Vec<String> = ["the", "cat", "sat", "dog", "ran"]
        .map(String::from)
        .to_vec();
    let tk = word_tokenizer(&dir, &words);
    write_fineweb(
        &dir.join("a.parquet"),
        &[("1", "the cat sat"), ("2", "dog ran"), ("3", "the  dog\n")],
        10,
        true,
    );
    let groups = all_row_groups(&[dir.join("a.parquet")], BadFilePolicy::Fail)
        .unwrap()
        .0;
    let mut o = opts(4, 1, Split::Train, 0, 1);
    o.val_fraction = 0.0;
    // One epoch: the 10 tokens make two rows; the last 2 are dropped.
    let mut one = TokenStream::open(
        groups.clone(),
        tk.clone(),
        StreamOptions {
            epochs: Some(1),
            ..o.clone()
        },
        None,
    )
    .unwrap();
    assert_eq!(one.next_row().unwrap(), Some(vec![1, 2, 3, 0]));
    assert_eq!(one.next_row().unwrap(), Some(vec![4, 5, 0, 1]));
    assert_eq!(one.next_row().unwrap(), None);
    assert_eq!(one.next_row().unwrap(), None);
    let mut s = TokenStream::open(groups, tk, o, None).unwrap();
    // the=1 cat=2 sat=3 dog=4 ran=5, end of text 0; the stream
    // 1 2 3 0 | 4 5 0 1 | 4 0 then the next epoch 1 2 | 3 0 4 5 | 0 1 4 0.
    assert_eq!(
        rows(&mut s, 5),
        vec![
            vec![1, 2, 3, 0],
            vec![4, 5, 0, 1],
            vec![4, 0, 1, 2],
            vec![3, 0, 4, 5],
            vec![0, 1, 4, 0]
        ]
    );
}

/// Three files, uneven row groups (29 row groups, 1..7 documents each),
/// one word per document: `d<i>` is token i+1, so a row of 2 tokens is
/// exactly one document and its end of text.
fn corpus(
    name: &str,
) -> (
    std::path::PathBuf,
    Vec<RowGroupRef>,
    Arc<Tokenizer>,
    Vec<String>,
) {
    let dir = scratch(name);
    let words: Vec<String> = (0..400).map(|i| format!("d{i}")).collect();
    let tk = word_tokenizer(&dir, &words);
    let mut next = 0;
    for (f, per_group, n) in [(0, 5, 61), (1, 7, 70), (2, 3, 27)] {
        let docs: Vec<(String, String)> = (next..next + n)
            .map(|i| (format!("<urn:uuid:{i}>"), words[i].clone()))
            .collect();
        next += n;
        let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        write_fineweb(
            &dir.join(format!("{f:03}_00000.parquet")),
            &refs,
            per_group,
            true,
        );
    }
    let files = expand_inputs(&[dir.join("*.parquet")]).unwrap();
    let groups = all_row_groups(&files, BadFilePolicy::Fail).unwrap().0;
    let used = words[..next].to_vec();
    (dir, groups, tk, used)
}

/// The documents (as token ids) one epoch of a worker reads: as many
/// rows as its row groups hold documents of the split.
fn epoch_docs(groups: &[RowGroupRef], tk: &Arc<Tokenizer>, o: StreamOptions) -> Vec<u32> {
    let n: usize = epoch_order(groups, &o, 0)
        .iter()
        .flat_map(|g| read_row_group(g).unwrap())
        .filter(|d| o.split.keeps(d.id.as_deref(), &d.text, o.val_fraction))
        .count();
    let mut s = TokenStream::open(groups.to_vec(), tk.clone(), o.clone(), None).unwrap();
    (0..n)
        .map(|_| {
            let r = s.next_row().unwrap().unwrap();
            assert_eq!(r[1], 0, "a one-word document then its end of text");
            r[0]
        })
        .collect()
}

#[test]
fn shards_are_disjoint_and_complete_for_1_to_5_workers() {
    let (_dir, groups, tk, words) = corpus("stream-shards");
    assert_eq!(groups.len(), 13 + 10 + 9);
    let train: BTreeSet<u32> = {
        let o = opts(2, 1, Split::Train, 0, 1);
        epoch_docs(&groups, &tk, o).into_iter().collect()
    };
    let val: BTreeSet<u32> = {
        let o = opts(2, 1, Split::Validation, 0, 1);
        epoch_docs(&groups, &tk, o).into_iter().collect()
    };
    assert!(
        train.is_disjoint(&val),
        "validation documents leak into training"
    );
    assert_eq!(train.len() + val.len(), words.len());
    for w in 1..=5 {
        for epoch in 0..3 {
            let mut seen: Vec<RowGroupRef> = (0..w)
                .flat_map(|r| epoch_order(&groups, &opts(2, 1, Split::Train, r, w), epoch))
                .collect();
            seen.sort_by(|a, b| (&a.file, a.index).cmp(&(&b.file, b.index)));
            assert_eq!(seen, groups, "W = {w}, epoch {epoch}: row groups");
        }
        let mut union = BTreeSet::new();
        let mut total = 0;
        for r in 0..w {
            let mine = epoch_docs(&groups, &tk, opts(2, 1, Split::Train, r, w));
            total += mine.len();
            union.extend(mine);
        }
        assert_eq!(total, union.len(), "W = {w}: a document read twice");
        assert_eq!(union, train, "W = {w}: documents missing");
    }
}

#[test]
fn validation_split_is_stable_and_about_the_fraction() {
    let (_dir, groups, tk, words) = corpus("stream-val");
    let o = opts(2, 1, Split::Validation, 0, 1);
    let a = epoch_docs(&groups, &tk, o.clone());
    let b = epoch_docs(&groups, &tk, o);
    assert_eq!(a, b);
    let frac = a.len() as f64 / words.len() as f64;
    assert!(
        (0.1..0.3).contains(&frac),
        "{} of {} held out at 0.2",
        a.len(),
        words.len()
    );
}

#[test]
fn resuming_from_a_cursor_gives_the_uninterrupted_stream() {
    let dir = scratch("stream-resume");
    let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let tk = word_tokenizer(&dir, &words);
    // Documents of 0..12 words, several files and row groups.
    let mut k = 0usize;
    for f in 0..3 {
        let docs: Vec<(String, String)> = (0..23)
            .map(|i| {
                k += 1;
                let len = (k * 7) % 13;
                let text: Vec<&str> = (0..len)
                    .map(|j| words[(k * 3 + j * 11) % 50].as_str())
                    .collect();
                (format!("<urn:{f}:{i}>"), text.join(" "))
            })
            .collect();
        let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        write_fineweb(&dir.join(format!("{f}.parquet")), &refs, 4 + f, true);
    }
    let files = expand_inputs(std::slice::from_ref(&dir)).unwrap();
    let groups = all_row_groups(&files, BadFilePolicy::Fail).unwrap().0;
    let o = opts(7, 5, Split::Train, 1, 2);
    let total = 260; // over three epochs of this worker's share
    let mut s = TokenStream::open(groups.clone(), tk.clone(), o.clone(), None).unwrap();
    let full = rows(&mut s, total);
    assert!(
        s.cursor().window_start.epoch >= 2,
        "the test should cross epochs"
    );
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut cuts: Vec<usize> = (0..25)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % total as u64) as usize
        })
        .collect();
    cuts.extend([0, 1, 4, 5, 6, total - 1]);
    for cut in cuts {
        let mut a = TokenStream::open(groups.clone(), tk.clone(), o.clone(), None).unwrap();
        let mut got = rows(&mut a, cut);
        // Through JSON, as the checkpoint stores it.
        let saved = serde_json::to_string(&a.cursor()).unwrap();
        let cursor: Cursor = serde_json::from_str(&saved).unwrap();
        drop(a);
        let mut b = TokenStream::open(groups.clone(), tk.clone(), o.clone(), Some(cursor)).unwrap();
        got.extend(rows(&mut b, total - cut));
        assert_eq!(got, full, "resumed after {cut} rows (cursor {saved})");
    }
    // The shuffle changes the order but not the rows.
    let mut plain = TokenStream::open(
        groups,
        tk,
        StreamOptions {
            shuffle_rows: 1,
            ..o
        },
        None,
    )
    .unwrap();
    let unshuffled = rows(&mut plain, 5);
    assert_ne!(full[..5], unshuffled[..]);
    let mut a = full[..5].to_vec();
    let mut b = unshuffled;
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "a window of 5 rows is a permutation of the packed rows"
    );
}

#[test]
fn an_empty_split_or_too_many_workers_is_an_error_not_a_hang() {
    let (_dir, groups, tk, _) = corpus("stream-empty");
    let mut o = opts(2, 1, Split::Validation, 0, 1);
    o.val_fraction = 0.0;
    let err = match TokenStream::open(groups.clone(), tk.clone(), o, None) {
        Ok(_) => panic!("an empty validation split opened"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("has no documents"), "{err}");
    let err = match TokenStream::open(groups.clone(), tk, opts(2, 1, Split::Train, 0, 40), None) {
        Ok(_) => panic!("40 workers over 32 row groups"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("32 row groups cannot feed 40 workers"),
        "{err}"
    );
}
