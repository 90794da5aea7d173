//! FineWeb-Edu parquet shards: the `text` column (and `id` when present),
//! streamed one row group at a time, never a whole file in memory.
//!
//! Inputs are files, directories (every `*.parquet` below, sorted) or
//! globs. Extra or missing columns other than `text` are fine. A file
//! that cannot be read (not parquet, truncated, no `text` column) is an
//! error naming the file and what was found, or, with
//! [`BadFilePolicy::Skip`], is skipped and counted.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

/// What to do with a file that cannot be read: `data.on_bad_file` in a
/// run config and `--on-bad-file` on the command line, spelt by the serde
/// names `fail` and `skip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadFilePolicy {
    Fail,
    Skip,
}

impl std::str::FromStr for BadFilePolicy {
    type Err = serde::de::value::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        use serde::de::IntoDeserializer;
        serde::Deserialize::deserialize(s.into_deserializer())
    }
}

/// One document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub id: Option<String>,
    pub text: String,
}

/// A row group: the unit of streaming and of sharding across workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroupRef {
    pub file: PathBuf,
    pub index: usize,
    pub rows: i64,
}

/// Expands files, directories and globs into a sorted list of parquet
/// files. A pattern that matches nothing is an error.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for input in inputs {
        let s = input.to_string_lossy();
        if s.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob_paths(&s)?;
            if matched.is_empty() {
                bail!("{s}: the pattern matches no file");
            }
            matched.sort();
            files.extend(matched);
        } else if input.is_dir() {
            let mut found = vec![];
            collect_parquet(input, &mut found)?;
            if found.is_empty() {
                bail!("{}: no *.parquet files in this directory", input.display());
            }
            found.sort();
            files.extend(found);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("{}: no such file or directory", input.display());
        }
    }
    Ok(files)
}

fn collect_parquet(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_parquet(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// A small glob: `*`, `?` within one path component; the directory part
/// must not contain wildcards.
fn glob_paths(pattern: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(pattern);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if dir.to_string_lossy().contains(['*', '?', '[']) {
        bail!("{pattern}: wildcards are supported in the file name only");
    }
    let mut out = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_file()
            && wildcard_match(&name, &p.file_name().unwrap_or_default().to_string_lossy())
        {
            out.push(p);
        }
    }
    Ok(out)
}

fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(&p, &n)
}

fn open_builder(file: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let f = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| anyhow::anyhow!("{}: not a readable parquet file ({e})", file.display()))
}

/// The row groups of `file`, checking that it has a `text` column.
pub fn row_groups(file: &Path) -> Result<Vec<RowGroupRef>> {
    let builder = open_builder(file)?;
    let schema = builder.schema();
    if schema.field_with_name("text").is_err() {
        let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        bail!(
            "{}: no `text` column (columns: {})",
            file.display(),
            found.join(", ")
        );
    }
    Ok(builder
        .metadata()
        .row_groups()
        .iter()
        .enumerate()
        .map(|(index, rg)| RowGroupRef {
            file: file.to_path_buf(),
            index,
            rows: rg.num_rows(),
        })
        .collect())
}

/// Files skipped under [`BadFilePolicy::Skip`], with why.
pub type Skipped = Vec<(PathBuf, String)>;

/// Row groups of every file, applying the bad-file policy. Returns the
/// row groups and the files skipped.
pub fn all_row_groups(
    files: &[PathBuf],
    policy: BadFilePolicy,
) -> Result<(Vec<RowGroupRef>, Skipped)> {
    let mut groups = vec![];
    let mut skipped = vec![];
    for f in files {
        match row_groups(f) {
            Ok(g) => groups.extend(g),
            Err(e) if policy == BadFilePolicy::Skip => {
                tracing::warn!("skipping {e:#}");
                skipped.push((f.clone(), format!("{e:#}")));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((groups, skipped))
}

fn strings(batch: &RecordBatch, column: &str, file: &Path) -> Result<Option<Vec<Option<String>>>> {
    let Some(col) = batch.column_by_name(column) else {
        return Ok(None);
    };
    let values: Vec<Option<String>> = if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else if let Some(a) = col.as_any().downcast_ref::<StringViewArray>() {
        a.iter().map(|v| v.map(str::to_string)).collect()
    } else {
        bail!(
            "{}: column `{column}` is {}, expected a string column",
            file.display(),
            col.data_type()
        );
    };
    Ok(Some(values))
}

/// The documents of one row group (rows with a null `text` are skipped).
pub fn read_row_group(rg: &RowGroupRef) -> Result<Vec<Document>> {
    let builder = open_builder(&rg.file)?;
    let schema = builder.parquet_schema();
    let wanted: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| matches!(schema.column(i).name(), "text" | "id"))
        .collect();
    let mask = ProjectionMask::leaves(schema, wanted);
    let reader = builder
        .with_row_groups(vec![rg.index])
        .with_projection(mask)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: row group {}: {e}", rg.file.display(), rg.index))?;
    let mut docs = vec![];
    for batch in reader {
        let batch = batch
            .map_err(|e| anyhow::anyhow!("{}: row group {}: {e}", rg.file.display(), rg.index))?;
        let texts = strings(&batch, "text", &rg.file)?
            .ok_or_else(|| anyhow::anyhow!("{}: no `text` column", rg.file.display()))?;
        let ids = strings(&batch, "id", &rg.file)?;
        for (i, text) in texts.into_iter().enumerate() {
            if let Some(text) = text {
                docs.push(Document {
                    id: ids.as_ref().and_then(|v| v[i].clone()),
                    text,
                });
            }
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.parquet", "000_00000.parquet"));
        assert!(wildcard_match("shard-??.parquet", "shard-07.parquet"));
        assert!(!wildcard_match("*.parquet", "x.parquet.tmp"));
    }
}
