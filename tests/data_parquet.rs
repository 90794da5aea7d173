//! Reading FineWeb-Edu-schema parquet files written here with the arrow
//! writer: row-group streaming, multi-file inputs, globs, and the bad-file
//! errors and skip policy.

mod fineweb;

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;

use fineweb::{scratch, write_fineweb};
use sharedmoe::data::parquet::{
    all_row_groups, expand_inputs, read_row_group, row_groups, BadFilePolicy, Document,
};

fn texts(docs: &[Document]) -> Vec<&str> {
    docs.iter().map(|d| d.text.as_str()).collect()
}

#[test]
fn row_groups_stream_every_document_in_order() {
    let dir = scratch("groups");
    let docs: Vec<(String, String)> = (0..10)
        .map(|i| (format!("<urn:{i}>"), format!("document number {i}")))
        .collect();
    let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_fineweb(&dir.join("000.parquet"), &refs[..7], 3, true);
    write_fineweb(&dir.join("001.parquet"), &refs[7..], 2, true);
    let files = expand_inputs(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(files.len(), 2);
    let (groups, skipped) = all_row_groups(&files, BadFilePolicy::Fail).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(
        groups.iter().map(|g| g.rows).collect::<Vec<_>>(),
        vec![3, 3, 1, 2, 1]
    );
    let read: Vec<Document> = groups
        .iter()
        .flat_map(|g| read_row_group(g).unwrap())
        .collect();
    assert_eq!(
        texts(&read),
        docs.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(read[8].id.as_deref(), Some("<urn:8>"));
    // A glob over the same files; a file without `id` reads with id None.
    write_fineweb(&dir.join("002.parquet"), &[("x", "no id here")], 10, false);
    let globbed = expand_inputs(&[dir.join("00?.parquet")]).unwrap();
    assert_eq!(globbed.len(), 3);
    let last = row_groups(&globbed[2]).unwrap();
    assert_eq!(
        read_row_group(&last[0]).unwrap(),
        vec![Document {
            id: None,
            text: "no id here".into()
        }]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_files_are_named_and_can_be_skipped() {
    let dir = scratch("bad");
    write_fineweb(&dir.join("good.parquet"), &[("a", "fine text")], 10, true);
    // Not parquet at all.
    std::fs::write(dir.join("notes.parquet"), b"this is not a parquet file").unwrap();
    // A real parquet file cut in half.
    write_fineweb(
        &dir.join("whole.parquet"),
        &[("b", "some text that will be cut"); 50],
        10,
        true,
    );
    let bytes = std::fs::read(dir.join("whole.parquet")).unwrap();
    std::fs::write(dir.join("truncated.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(dir.join("whole.parquet")).unwrap();
    // A parquet file without a `text` column.
    let batch =
        RecordBatch::try_from_iter([("body", Arc::new(StringArray::from(vec!["x"])) as ArrayRef)])
            .unwrap();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(dir.join("notext.parquet")).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let files = expand_inputs(std::slice::from_ref(&dir)).unwrap();
    for (name, want) in [
        ("notes.parquet", "not a readable parquet file"),
        ("truncated.parquet", "not a readable parquet file"),
        ("notext.parquet", "no `text` column (columns: body)"),
    ] {
        let err = format!("{:#}", row_groups(&dir.join(name)).unwrap_err());
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    let err = format!(
        "{:#}",
        all_row_groups(&files, BadFilePolicy::Fail).unwrap_err()
    );
    assert!(err.contains(".parquet"), "{err}");
    let (groups, skipped) = all_row_groups(&files, BadFilePolicy::Skip).unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert_eq!(
        texts(&read_row_group(&groups[0]).unwrap()),
        vec!["fine text"]
    );
    let err = format!(
        "{:#}",
        expand_inputs(&[dir.join("nothing-*.parquet")]).unwrap_err()
    );
    assert!(err.contains("matches no file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
