//! Test helper: FineWeb-Edu-schema parquet files written with the arrow
//! writer, in per-test scratch directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes documents in FineWeb-Edu's ten-column schema, `per_group` rows
/// per row group.
pub fn write_fineweb(path: &Path, docs: &[(&str, &str)], per_group: usize, with_id: bool) {
    let n = docs.len();
    let s = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from((0..n).map(f).collect::<Vec<_>>()))
    };
    let mut cols: Vec<(&str, ArrayRef)> = vec![("text", s(&|i| docs[i].1.to_string()))];
    if with_id {
        cols.push(("id", s(&|i| docs[i].0.to_string())));
    }
    cols.extend([
        ("dump", s(&|_| "CC-MAIN-2024-10".to_string())),
        ("url", s(&|i| format!("https://example.org/{i}"))),
        ("file_path", s(&|_| "s3://x/y.warc.gz".to_string())),
        ("language", s(&|_| "en".to_string())),
        (
            "language_score",
            Arc::new(Float64Array::from(vec![0.97; n])) as ArrayRef,
        ),
        (
            "token_count",
            Arc::new(Int64Array::from(vec![100i64; n])) as ArrayRef,
        ),
        (
            "score",
            Arc::new(Float64Array::from(vec![3.2; n])) as ArrayRef,
        ),
        (
            "int_score",
            Arc::new(Int64Array::from(vec![3i64; n])) as ArrayRef,
        ),
    ]);
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_size(per_group)
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
