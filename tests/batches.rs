//! The training loop's data source over several processes: a parquet
//! source read as `data.shards` streams gives every replica the same rows
//! however the replicas are spread over processes (and K = 1 exactly the
//! plain stream), positions merge and resume exactly, a `.bin` source
//! hands each process its slice of the global batch, and ranges that do
//! not cover whole shards are refused. No PJRT: only `Batches`.

mod common;
mod fineweb;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fineweb::{scratch, write_fineweb};
use sharedmoe::data::parquet::{all_row_groups, expand_inputs, BadFilePolicy};
use sharedmoe::data::stream::{Cursor, Split, StreamOptions, TokenStream};
use sharedmoe::data::tokenizer::load;
use sharedmoe::data::{TokenFile, TokenWidth};
use sharedmoe::train::batches::{Batches, DataPosition};
use sharedmoe::train::Config;

const WORDS: usize = 300;

/// A word-level tokenizer.json: `<|endoftext|>` = 0, `w<i>` = i + 1,
/// `[UNK]` last.
fn word_tokenizer(dir: &Path) -> PathBuf {
    let words: Vec<String> = (0..WORDS).map(|i| format!("w{i}")).collect();
    common::word_level_tokenizer(dir, &words)
}

fn parquet_corpus(dir: &Path) {
    let mut next = 0;
    for (f, per_group, n) in [(0, 4, 50), (1, 6, 60)] {
        let docs: Vec<(String, String)> = (next..next + n)
            .map(|i| {
                let text: Vec<String> = (0..1 + i % 5)
                    .map(|j| format!("w{}", (i * 7 + j) % WORDS))
                    .collect();
                (format!("<urn:uuid:{i}>"), text.join(" "))
            })
            .collect();
        next += n;
        let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        write_fineweb(&dir.join(format!("{f:03}.parquet")), &refs, per_group, true);
    }
}

/// R = 4 replicas, B = 8 (2 rows per replica and step), S + 1 = 4, two
/// eval batches of one row per replica.
fn config(data: &str, extra: &[&str]) -> Config {
    let text = format!(
        r#"
[model]
preset = "tiny-sharedmoe"
vocab_size = 512
[train]
seq_len = 3
global_batch = 8
micro_batch = 1
replicas = 4
steps = 100
warmup_steps = 2
lr = 1e-3
min_lr = 1e-4
seed = 7
eval_every = 10
eval_batches = 2
[data]
{data}
"#
    );
    Config::parse(
        &text,
        &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap()
}

/// A parquet config over a fresh corpus in `dir` with `data.shards = k`.
fn parquet_config(dir: &Path, k: i64) -> Config {
    config(
        &format!(
            "parquet = [\"{}\"]\ntokenizer = \"{}\"\nshuffle_rows = 5\nval_fraction = 0.2\nshards = {k}",
            dir.join("*.parquet").display(),
            dir.join("tokenizer.json").display()
        ),
        &[],
    )
}

fn parquet_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    word_tokenizer(&dir);
    parquet_corpus(&dir);
    dir
}

fn open(cfg: &Config, at: &DataPosition, local: Range<i64>) -> Batches {
    Batches::open(cfg, at, local).unwrap()
}

fn steps(b: &mut Batches, cfg: &Config, n: usize) -> Vec<Vec<Vec<i32>>> {
    (0..n).map(|_| b.next(cfg).unwrap()).collect()
}

/// Per step, the processes' rows one after the other.
fn concat(parts: &[Vec<Vec<Vec<i32>>>]) -> Vec<Vec<Vec<i32>>> {
    (0..parts[0].len())
        .map(|s| parts.iter().flat_map(|p| p[s].clone()).collect())
        .collect()
}

/// The training stream of shard `rank` of `workers` as the config makes it.
fn raw_stream(cfg: &Config, rank: usize, workers: usize) -> TokenStream {
    let d = &cfg.data;
    let files = expand_inputs(&d.parquet).unwrap();
    let groups = all_row_groups(&files, BadFilePolicy::Fail).unwrap().0;
    let tk = Arc::new(load(&d.tokenizer).unwrap());
    let opts = StreamOptions {
        row_len: (cfg.train.seq_len + 1) as usize,
        seed: cfg.train.seed,
        shuffle_groups: true,
        shuffle_rows: d.shuffle_rows,
        val_fraction: d.val_fraction,
        split: Split::Train,
        rank,
        workers,
        epochs: None,
    };
    TokenStream::open(groups, tk, opts, None).unwrap()
}

/// `n` rows of a stream flattened as i32, as one replica gets them.
fn take(s: &mut TokenStream, n: usize) -> Vec<i32> {
    (0..n)
        .flat_map(|_| s.next_row().unwrap().unwrap())
        .map(|t| t as i32)
        .collect()
}

#[test]
fn two_shards_give_the_same_rows_in_one_process_or_two() {
    let dir = parquet_dir("batches-k2");
    let cfg = parquet_config(&dir, 2);
    let start = DataPosition::default();
    let mut all = open(&cfg, &start, 0..4);
    let mut p0 = open(&cfg, &start, 0..2);
    let mut p1 = open(&cfg, &start, 2..4);
    assert_eq!((p0.local(), p1.local()), (0..2, 2..4));
    let whole = steps(&mut all, &cfg, 20);
    let split = concat(&[steps(&mut p0, &cfg, 20), steps(&mut p1, &cfg, 20)]);
    assert_eq!(whole, split);
    for step in &whole {
        assert_eq!(step.len(), 4);
        assert!(step.iter().all(|r| r.len() == 2 * 4));
    }
    // Shard k is worker k of 2: replicas 2k and 2k+1 take its rows in turn.
    let mut shard = [raw_stream(&cfg, 0, 2), raw_stream(&cfg, 1, 2)];
    for step in &whole {
        for (r, rows) in step.iter().enumerate() {
            assert_eq!(rows, &take(&mut shard[r / 2], 2), "replica {r}");
        }
    }
    // One validation set for every process and every K: the processes'
    // replicas' slices of K = 1's.
    let mut one = open(&parquet_config(&dir, 1), &start, 0..4);
    assert_ne!(
        steps(&mut one, &cfg, 20),
        whole,
        "two shards deal other rows than one"
    );
    assert_eq!(one.validation().len(), 2);
    assert_eq!(all.validation(), one.validation());
    let val: Vec<Vec<Vec<i32>>> = (0..2)
        .map(|b| {
            let mut v = p0.validation()[b].clone();
            v.extend(p1.validation()[b].clone());
            v
        })
        .collect();
    assert_eq!(val, one.validation());
    assert_eq!(p0.validation()[0].len(), 2);
    // The shards' positions are those of their processes.
    let merged = DataPosition::merge([p0.position(), p1.position()]).unwrap();
    assert_eq!(merged, all.position());
    assert_eq!(merged.next_batch, 20);
    assert_eq!(merged.streams.keys().copied().collect::<Vec<_>>(), [0, 1]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn one_shard_is_the_plain_stream() {
    let dir = parquet_dir("batches-k1");
    let cfg = parquet_config(&dir, 1);
    let mut b = open(&cfg, &DataPosition::default(), 0..4);
    let mut s = raw_stream(&cfg, 0, 1);
    for step in steps(&mut b, &cfg, 20) {
        let want: Vec<Vec<i32>> = (0..4).map(|_| take(&mut s, 2)).collect();
        assert_eq!(step, want);
    }
    let pos = b.position();
    assert_eq!(pos.streams, BTreeMap::from([(0, s.cursor())]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn merged_positions_resume_in_one_process_or_two() {
    let dir = parquet_dir("batches-resume");
    let cfg = parquet_config(&dir, 2);
    let start = DataPosition::default();
    let whole = steps(&mut open(&cfg, &start, 0..4), &cfg, 20);
    let (mut p0, mut p1) = (open(&cfg, &start, 0..2), open(&cfg, &start, 2..4));
    let first = concat(&[steps(&mut p0, &cfg, 7), steps(&mut p1, &cfg, 7)]);
    assert_eq!(first, whole[..7]);
    let at = DataPosition::merge([p0.position(), p1.position()]).unwrap();
    assert_eq!(at.next_batch, 7);
    // As one process.
    let mut one = open(&cfg, &at, 0..4);
    assert_eq!(steps(&mut one, &cfg, 13), whole[7..]);
    // As two, each given the whole job's position (or only its own).
    let mut q0 = open(&cfg, &at, 0..2);
    let own = DataPosition {
        next_batch: 7,
        streams: BTreeMap::from([(1, at.streams[&1])]),
    };
    let mut q1 = open(&cfg, &own, 2..4);
    let rest = concat(&[steps(&mut q0, &cfg, 13), steps(&mut q1, &cfg, 13)]);
    assert_eq!(rest, whole[7..]);
    assert_eq!(
        DataPosition::merge([q0.position(), q1.position()]).unwrap(),
        one.position()
    );
    // Positions of different steps or of one shard twice do not merge.
    let e = DataPosition::merge([p0.position(), q0.position()]).unwrap_err();
    assert!(e.to_string().contains("different batches"), "{e}");
    let e = DataPosition::merge([q0.position(), one.position()]).unwrap_err();
    assert!(e.to_string().contains("shard 0"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bin_processes_get_their_slices_of_the_global_batch() {
    let dir = scratch("batches-bin");
    let write = |name: &str, n: usize, mul: usize| -> PathBuf {
        let p = dir.join(name);
        let tokens: Vec<u8> = (0..n)
            .flat_map(|i| (((i * mul) % 500) as u16).to_le_bytes())
            .collect();
        std::fs::write(&p, tokens).unwrap();
        p
    };
    let (train, val) = (write("train.bin", 1000, 1), write("val.bin", 200, 3));
    let cfg = config(
        &format!(
            "train_bin = \"{}\"\nval_bin = \"{}\"",
            train.display(),
            val.display()
        ),
        // shards mean nothing to a .bin source: ranges need not align.
        &["data.shards=2"],
    );
    let at = DataPosition {
        next_batch: 3,
        streams: BTreeMap::new(),
    };
    let whole = steps(&mut open(&cfg, &at, 0..4), &cfg, 10);
    let mut parts: Vec<Batches> = [0..1, 1..3, 3..4]
        .into_iter()
        .map(|l| open(&cfg, &at, l))
        .collect();
    let split = concat(
        &parts
            .iter_mut()
            .map(|b| steps(b, &cfg, 10))
            .collect::<Vec<_>>(),
    );
    assert_eq!(whole, split);
    let f = TokenFile::open(&train, TokenWidth::U16).unwrap();
    for (i, step) in whole.iter().enumerate() {
        for (r, rows) in step.iter().enumerate() {
            let want = f.batch_rows(3 + i as i64, 8, 3, r as i64 * 2, 2);
            assert_eq!(rows, &want, "step {i}, replica {r}");
        }
    }
    let one = open(&cfg, &at, 0..4);
    let v = TokenFile::open(&val, TokenWidth::U16).unwrap();
    assert_eq!(one.validation().len(), 2);
    for (b, batch) in one.validation().iter().enumerate() {
        for (r, rows) in batch.iter().enumerate() {
            assert_eq!(rows, &v.batch_rows(b as i64, 4, 3, r as i64, 1));
        }
        let sliced: Vec<Vec<i32>> = parts
            .iter()
            .flat_map(|p| p.validation()[b].clone())
            .collect();
        assert_eq!(&sliced, batch);
    }
    assert!(parts[1].position().streams.is_empty());
    assert_eq!(parts[1].position().next_batch, 13);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ranges_and_positions_that_do_not_fit_are_refused() {
    let dir = parquet_dir("batches-errors");
    let cfg = parquet_config(&dir, 2);
    let start = DataPosition::default();
    let err = |at: &DataPosition, local: Range<i64>| -> String {
        format!("{:#}", Batches::open(&cfg, at, local).err().unwrap())
    };
    let e = err(&start, 1..3);
    assert!(
        e.contains("1..3 do not cover whole data shards") && e.contains("multiples of 2"),
        "{e}"
    );
    let e = err(&start, 0..1);
    assert!(e.contains("do not cover whole data shards"), "{e}");
    let e = err(&start, 2..6);
    assert!(e.contains("within 0..4"), "{e}");
    let e = err(&start, 2..2);
    assert!(e.contains("non-empty"), "{e}");
    // Cursors for some of the process's shards but not all.
    let c = Cursor::default();
    let some = DataPosition {
        next_batch: 5,
        streams: BTreeMap::from([(0, c)]),
    };
    let e = err(&some, 0..4);
    assert!(e.contains("none for shard(s) [1]"), "{e}");
    let e = err(&some, 2..4);
    assert!(e.contains("none for shard(s) [1]"), "{e}");
    // A cursor of a shard the config does not have.
    let other = DataPosition {
        next_batch: 5,
        streams: BTreeMap::from([(0, c), (1, c), (2, c)]),
    };
    let e = err(&other, 0..4);
    assert!(e.contains("cursor for shard 2, but data.shards = 2"), "{e}");
    // data.shards must divide train.replicas.
    let text = cfg.to_toml();
    let e = Config::parse(&text, &["data.shards=3".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.shards = 3 does not divide train.replicas = 4"),
        "{e}"
    );
    let e = Config::parse(&text, &["data.shards=0".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.shards = 0"), "{e}");
    // More shards than row groups.
    let many = Config::parse(
        &text,
        &[
            "data.shards=32".into(),
            "train.replicas=32".into(),
            "train.global_batch=32".into(),
        ],
    )
    .unwrap();
    let e = format!("{:#}", Batches::open(&many, &start, 0..32).err().unwrap());
    assert!(
        e.contains("data shard 0 of 32") && e.contains("row groups"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
