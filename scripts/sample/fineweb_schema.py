"""FineWeb-Edu's ten-column parquet schema, shared by the converters of
the shipped sample (`rust_docs_to_fineweb.py`, `python_docs_to_fineweb.py`):
one row per document, and the shards the rows are written to.

The column meanings are in data/README.md.
"""
import hashlib
import sys
import uuid


def fineweb_row(text, url, dump, file_path, tokenizer=None):
    """One document: `id` is a UUID5 of its url (stable across rebuilds);
    `token_count` is its length under `tokenizer` (a `tokenizers`
    Tokenizer), 0 without one."""
    return {
        "text": text,
        "id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>",
        "dump": dump,
        "url": url,
        "file_path": file_path,
        "language": "en",
        "language_score": 1.0,
        "token_count": len(tokenizer.encode(text).ids) if tokenizer else 0,
        "score": 3.0,
        "int_score": 3,
    }


def write_shards(rows, out_dir, files, rows_per_group):
    """Writes `rows` as `files` zstd parquet files `000_NNNNN.parquet` in
    `out_dir`, row groups of `rows_per_group`. Rows are spread over the
    files by a hash of their id, so the split does not depend on the
    order they were read in."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    schema = pa.schema([
        ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
        ("url", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
        ("language_score", pa.float64()), ("token_count", pa.int64()),
        ("score", pa.float64()), ("int_score", pa.int64()),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = (len(rows) + files - 1) // files
    for f in range(files):
        part = rows[f * per_file:(f + 1) * per_file]
        table = pa.Table.from_pylist(part, schema=schema)
        out = out_dir / f"000_{f:05d}.parquet"
        pq.write_table(table, out, row_group_size=rows_per_group, compression="zstd")
        print(f"{out}: {len(part)} documents, {sum(len(r['text']) for r in part)} characters, "
              f"{sum(r['token_count'] for r in part)} tokens", file=sys.stderr)
