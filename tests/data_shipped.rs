//! The shipped data (`data/README.md`): every parquet directory under
//! `data/` (`fineweb-sample/`, `python-docs/`), read through the project's
//! own reader and token stream, has FineWeb-Edu's ten columns, unique ids
//! across directories, page-sized texts, `token_count` as counted by
//! `data/tokenizer.json`, and a validation split; `tokenizer-8k.json`
//! loads with 8,192 tokens and round-trips. The checks run on copies of the
//! shipped files with planted faults too, so each of them can fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tokenizers::Tokenizer;

mod fineweb;

use fineweb::scratch;
use sharedmoe::data::parquet::{all_row_groups, expand_inputs, read_row_group, BadFilePolicy};
use sharedmoe::data::stream::{Split, StreamOptions, TokenStream};
use sharedmoe::data::tokenizer::{encode, eot_id, load};
use sharedmoe::train::config::Config;

/// The hold-out of the tiny configs and of the 8k tokenizer's training.
const VAL_FRACTION: f64 = 0.02;
/// Shortest document kept (both conversion scripts' `--min-chars`).
const MIN_CHARS: usize = 500;
/// Rows per row group (both conversion scripts' `--rows-per-group`).
const ROWS_PER_GROUP: usize = 64;
/// Every row group's first row and every SAMPLE_EVERY-th row get their
/// `token_count` checked.
const SAMPLE_EVERY: usize = 25;

/// FineWeb-Edu's columns, in order, with their types.
const SCHEMA: [(&str, DataType); 10] = [
    ("text", DataType::Utf8),
    ("id", DataType::Utf8),
    ("dump", DataType::Utf8),
    ("url", DataType::Utf8),
    ("file_path", DataType::Utf8),
    ("language", DataType::Utf8),
    ("language_score", DataType::Float64),
    ("token_count", DataType::Int64),
    ("score", DataType::Float64),
    ("int_score", DataType::Int64),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every directory under `data/` that holds parquet files.
fn shipped_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("data"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && std::fs::read_dir(p)
                    .unwrap()
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        })
        .collect();
    dirs.sort();
    dirs
}

fn batches(file: &Path) -> (Arc<Schema>, Vec<RecordBatch>, Vec<usize>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let schema = builder.schema().clone();
    let groups = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows() as usize)
        .collect();
    let batches = builder
        .build()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (schema, batches, groups)
}

/// What the checks found, and a few counts.
#[derive(Default, Debug)]
struct Report {
    problems: Vec<String>,
    documents: usize,
    val_documents: usize,
    sampled: usize,
}

/// Checks the parquet directories `dirs` together: the problems found
/// (an empty list when all is well).
fn check(dirs: &[PathBuf], tk32: &Tokenizer, tk8: &Arc<Tokenizer>) -> Report {
    let mut r = Report::default();
    let mut seen: HashMap<String, String> = HashMap::new();
    for dir in dirs {
        let d = dir.display();
        // The project's reader: files, row groups, documents (text and id).
        let files = expand_inputs(std::slice::from_ref(dir)).unwrap();
        let (groups, skipped) = match all_row_groups(&files, BadFilePolicy::Fail) {
            Ok(g) => g,
            Err(e) => {
                r.problems.push(format!("{d}: {e:#}"));
                continue;
            }
        };
        assert!(skipped.is_empty());
        let (mut train, mut val) = (0, 0);
        for g in &groups {
            for doc in read_row_group(g).unwrap() {
                r.documents += 1;
                let Some(id) = doc.id.clone() else {
                    r.problems.push(format!(
                        "{d}: a document without an id in {}",
                        g.file.display()
                    ));
                    continue;
                };
                let chars = doc.text.chars().count();
                if chars < MIN_CHARS {
                    r.problems.push(format!(
                        "{d}: {id}: text of {chars} characters, shorter than {MIN_CHARS}"
                    ));
                }
                if !(id.starts_with("<urn:uuid:") && id.ends_with('>') && id.len() == 47) {
                    r.problems
                        .push(format!("{d}: id {id:?} is not <urn:uuid:UUID>"));
                }
                if let Some(first) = seen.insert(id.clone(), g.file.display().to_string()) {
                    r.problems.push(format!(
                        "duplicate id {id}: in {first} and {}",
                        g.file.display()
                    ));
                }
                if Split::Validation.keeps(Some(&id), &doc.text, VAL_FRACTION) {
                    val += 1;
                } else {
                    train += 1;
                }
            }
        }
        r.val_documents += val;
        if train == 0 || val == 0 {
            r.problems.push(format!(
                "{d}: {train} training and {val} validation documents at val_fraction {VAL_FRACTION}"
            ));
            continue;
        }
        // The validation split through the token stream (8k tokenizer), one epoch.
        let opts = StreamOptions {
            row_len: 129,
            seed: 0,
            shuffle_groups: false,
            shuffle_rows: 1,
            val_fraction: VAL_FRACTION,
            split: Split::Validation,
            rank: 0,
            workers: 1,
            epochs: Some(1),
        };
        let mut stream = TokenStream::open(groups.clone(), tk8.clone(), opts, None).unwrap();
        let mut rows = 0;
        while let Some(row) = stream.next_row().unwrap() {
            assert_eq!(row.len(), 129);
            rows += 1;
        }
        if rows == 0 {
            r.problems.push(format!(
                "{d}: the validation stream gives no row of 129 tokens"
            ));
        }
        // Schema, row groups and token counts, per file.
        for f in &files {
            let name = f.display();
            let (schema, batches, group_rows) = batches(f);
            let got: Vec<(&str, &DataType)> = schema
                .fields()
                .iter()
                .map(|f| (f.name().as_str(), f.data_type()))
                .collect();
            let want: Vec<(&str, &DataType)> = SCHEMA.iter().map(|(n, t)| (*n, t)).collect();
            if got != want {
                r.problems.push(format!(
                    "{name}: schema {got:?}, want FineWeb-Edu's {want:?}"
                ));
                continue;
            }
            let last = group_rows.len() - 1;
            if group_rows
                .iter()
                .enumerate()
                .any(|(i, &n)| n > ROWS_PER_GROUP || (i < last && n != ROWS_PER_GROUP))
            {
                r.problems.push(format!(
                    "{name}: row groups of {group_rows:?} rows, want {ROWS_PER_GROUP}"
                ));
            }
            let starts: Vec<usize> = group_rows
                .iter()
                .scan(0, |acc, &n| {
                    let s = *acc;
                    *acc += n;
                    Some(s)
                })
                .collect();
            let mut row = 0;
            for b in &batches {
                let text = b.column_by_name("text").unwrap();
                let text = text.as_any().downcast_ref::<StringArray>().unwrap();
                let count = b.column_by_name("token_count").unwrap();
                let count = count.as_any().downcast_ref::<Int64Array>().unwrap();
                for i in 0..b.num_rows() {
                    if starts.contains(&row) || row % SAMPLE_EVERY == 0 {
                        let n = encode(tk32, text.value(i)).unwrap().len() as i64;
                        r.sampled += 1;
                        if count.value(i) != n {
                            r.problems.push(format!(
                                "{name}: row {row}: token_count {}, but data/tokenizer.json gives {n}",
                                count.value(i)
                            ));
                        }
                    }
                    row += 1;
                }
            }
        }
    }
    r
}

fn tokenizers() -> (Tokenizer, Arc<Tokenizer>) {
    let tk32 = load(&root().join("data/tokenizer.json")).unwrap();
    let tk8 = Arc::new(load(&root().join("data/tokenizer-8k.json")).unwrap());
    (tk32, tk8)
}

#[test]
fn shipped_parquet_directories_pass_every_check() {
    let dirs = shipped_dirs();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in ["fineweb-sample", "python-docs"] {
        assert!(
            names.iter().any(|n| n == want),
            "data/{want} missing: {names:?}"
        );
    }
    let (tk32, tk8) = tokenizers();
    let r = check(&dirs, &tk32, &tk8);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert!(r.documents >= 2700, "{r:?}");
    assert!(r.val_documents > 0 && r.sampled >= 100, "{r:?}");
    // The budget: at most 20 MB of parquet across data/.
    let bytes: u64 = expand_inputs(&dirs)
        .unwrap()
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(bytes <= 20_000_000, "{bytes} bytes of parquet in data/");
    // Each directory carries its licence.
    for d in &dirs {
        let licences = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("LICENSE"))
            .count();
        assert!(licences > 0, "{}: no LICENSE* file", d.display());
    }
}

#[test]
fn the_8k_tokenizer_loads_and_round_trips() {
    let (tk32, tk8) = tokenizers();
    assert_eq!(tk32.get_vocab_size(true), 32_000);
    assert_eq!(tk8.get_vocab_size(true), 8192);
    assert_eq!(eot_id(&tk8).unwrap(), 0);
    assert_eq!(encode(&tk8, "<|endoftext|>").unwrap(), vec![0]);
    let files = expand_inputs(&shipped_dirs()).unwrap();
    let (groups, _) = all_row_groups(&files, BadFilePolicy::Fail).unwrap();
    let mut samples: Vec<String> = groups
        .iter()
        .step_by(7)
        .map(|g| read_row_group(g).unwrap().swap_remove(0).text)
        .collect();
    samples.push("Ownership is Rust’s most unique feature — naïve café ✓ 日本語 \t\n x".into());
    for s in &samples {
        let ids = encode(&tk8, s).unwrap();
        assert!(ids.iter().all(|&i| i < 8192));
        assert_eq!(tk8.decode(&ids, false).unwrap(), *s);
        if s.len() > 1000 {
            // A trained BPE, not bytes: English prose is a few bytes per token.
            assert!(
                ids.len() * 3 < s.len(),
                "{} tokens for {} bytes",
                ids.len(),
                s.len()
            );
        }
    }
}

/// Every config under configs/ that trains on shipped parquet: its
/// tokenizer is shipped and has the model's vocabulary, and its
/// validation split (its own data.val_fraction) is not empty.
#[test]
fn configs_on_shipped_data_have_their_tokenizer_and_a_validation_split() {
    let mut checked = 0;
    for e in std::fs::read_dir(root().join("configs")).unwrap().flatten() {
        let path = e.path();
        if !path.extension().is_some_and(|x| x == "toml") {
            continue;
        }
        let c = Config::load(&path, &[]).unwrap();
        let shipped = |p: &Path| p.starts_with("data");
        if c.data.parquet.is_empty() || !c.data.parquet.iter().all(|p| shipped(p)) {
            continue;
        }
        let p = path.display();
        assert!(
            shipped(&c.data.tokenizer),
            "{p}: {}",
            c.data.tokenizer.display()
        );
        let tk = load(&root().join(&c.data.tokenizer)).unwrap();
        assert_eq!(
            tk.get_vocab_size(true) as i64,
            c.model.vocab_size,
            "{p}: {} and model.vocab_size",
            c.data.tokenizer.display()
        );
        let inputs: Vec<PathBuf> = c.data.parquet.iter().map(|d| root().join(d)).collect();
        let (groups, _) =
            all_row_groups(&expand_inputs(&inputs).unwrap(), BadFilePolicy::Fail).unwrap();
        let val = groups
            .iter()
            .flat_map(|g| read_row_group(g).unwrap())
            .filter(|d| Split::Validation.keeps(d.id.as_deref(), &d.text, c.data.val_fraction))
            .count();
        assert!(
            val > 0,
            "{p}: no validation document at val_fraction {}",
            c.data.val_fraction
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the tiny configs train on data/fineweb-sample"
    );
}

/// `src` written to `dst` (64 rows per row group) with `change` applied
/// to each batch the reader gives (the first one holds rows 0..1024).
fn planted(src: &Path, dst: &Path, change: &dyn Fn(RecordBatch) -> RecordBatch) {
    let (_, batches, _) = batches(src);
    let props = WriterProperties::builder()
        .set_max_row_group_size(ROWS_PER_GROUP)
        .build();
    let changed: Vec<RecordBatch> = batches.into_iter().map(change).collect();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(dst).unwrap(),
        changed[0].schema(),
        Some(props),
    )
    .unwrap();
    for b in &changed {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

/// `batch` with column `name` replaced.
fn with_column(batch: &RecordBatch, name: &str, values: ArrayRef) -> RecordBatch {
    let schema = batch.schema();
    let i = schema.index_of(name).unwrap();
    let mut cols = batch.columns().to_vec();
    cols[i] = values;
    RecordBatch::try_new(schema, cols).unwrap()
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let c = batch.column_by_name(name).unwrap();
    let a = c.as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

#[test]
fn planted_faults_are_found() {
    let (tk32, tk8) = tokenizers();
    let fineweb = root().join("data/fineweb-sample");
    let src = root().join("data/python-docs/000_00000.parquet");
    let a_fineweb_id = {
        let files = expand_inputs(std::slice::from_ref(&fineweb)).unwrap();
        let (groups, _) = all_row_groups(&files, BadFilePolicy::Fail).unwrap();
        read_row_group(&groups[0]).unwrap()[0].id.clone().unwrap()
    };
    let dir = scratch("faults");
    let case = |name: &str, change: &dyn Fn(RecordBatch) -> RecordBatch| -> Vec<String> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        planted(&src, &d.join("000_00000.parquet"), change);
        check(&[fineweb.clone(), d], &tk32, &tk8).problems
    };
    let has = |problems: &[String], want: &str| {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "want {want:?} in {problems:#?}"
        );
    };

    // Untouched, the copy passes.
    let clean = case("clean", &|b| b);
    assert!(clean.is_empty(), "{clean:#?}");

    // An id that is also in fineweb-sample.
    let p = case("duplicate-id", &|b| {
        let mut ids = strings(&b, "id");
        ids[5] = a_fineweb_id.clone();
        with_column(&b, "id", Arc::new(StringArray::from(ids)))
    });
    has(&p, &format!("duplicate id {a_fineweb_id}"));

    // A renamed column.
    let p = case("renamed-column", &|b| {
        let fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| {
                let f = f.as_ref().clone();
                if f.name() == "int_score" {
                    f.with_name("int_scores")
                } else {
                    f
                }
            })
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), b.columns().to_vec()).unwrap()
    });
    has(&p, "want FineWeb-Edu's");

    // A text too short to be a page.
    let p = case("short-text", &|b| {
        let mut texts = strings(&b, "text");
        texts[7] = "Too short to be a page.".into();
        with_column(&b, "text", Arc::new(StringArray::from(texts)))
    });
    has(&p, "shorter than 500");

    // A token count off by one (row 0: always sampled).
    let p = case("token-count", &|b| {
        let c = b.column_by_name("token_count").unwrap();
        let c = c.as_any().downcast_ref::<Int64Array>().unwrap();
        let mut v: Vec<i64> = c.values().to_vec();
        v[0] += 1;
        with_column(&b, "token_count", Arc::new(Int64Array::from(v)))
    });
    has(&p, "row 0: token_count");

    // Only training documents: no validation split.
    let p = case("no-validation", &|b| {
        let ids = strings(&b, "id");
        let texts = strings(&b, "text");
        let keep: Vec<usize> = (0..b.num_rows())
            .filter(|&i| Split::Train.keeps(Some(&ids[i]), &texts[i], VAL_FRACTION))
            .collect();
        let cols = b.columns().iter().map(|c| take(c, &keep)).collect();
        RecordBatch::try_new(b.schema(), cols).unwrap()
    });
    has(&p, "0 validation documents");

    std::fs::remove_dir_all(&dir).unwrap();
}

/// `values` at `rows` (arrow's `take`, for the column types here).
fn take(values: &ArrayRef, rows: &[usize]) -> ArrayRef {
    let at = rows.iter().copied();
    if let Some(a) = values.as_any().downcast_ref::<StringArray>() {
        Arc::new(StringArray::from(
            at.map(|i| a.value(i)).collect::<Vec<_>>(),
        ))
    } else if let Some(a) = values.as_any().downcast_ref::<Int64Array>() {
        Arc::new(Int64Array::from(at.map(|i| a.value(i)).collect::<Vec<_>>()))
    } else if let Some(a) = values.as_any().downcast_ref::<Float64Array>() {
        Arc::new(Float64Array::from(
            at.map(|i| a.value(i)).collect::<Vec<_>>(),
        ))
    } else {
        panic!("column type {}", values.data_type())
    }
}
