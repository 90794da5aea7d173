#!/usr/bin/env python3
"""Peer for `sharedmoe bench data`: what a user would write in Python to
turn FineWeb-Edu parquet into packed training rows: pyarrow reads each row
group's `text`, HF `tokenizers` (Rust inside, multi-threaded) tokenises the
batch, numpy appends the end-of-text token and cuts rows of S+1 tokens.

Prints one JSON line: tokens, rows, seconds per repeat, versions. With
--dump, writes the rows of the last repeat as raw little-endian uint32.
"""
import argparse
import json
import time

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import tokenizers
from tokenizers import Tokenizer


def packed_rows(files, tok, eot, row_len):
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pending = np.zeros(0, dtype=np.uint32)
    rows = []
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            texts = [t for t in pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
                     if t is not None]
            encs = encode(texts, add_special_tokens=False)
            parts = [pending]
            for e in encs:
                parts.append(np.asarray(e.ids, dtype=np.uint32))
                parts.append(np.array([eot], dtype=np.uint32))
            stream = np.concatenate(parts)
            n = len(stream) // row_len
            rows.append(stream[: n * row_len].reshape(n, row_len))
            pending = stream[n * row_len:]
    return np.concatenate(rows) if rows else np.zeros((0, row_len), dtype=np.uint32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--row-len", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dump")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    tok = Tokenizer.from_file(a.tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    secs = []
    rows = None
    for _ in range(a.repeats):
        t = time.perf_counter()
        rows = packed_rows(a.files, tok, eot, a.row_len)
        secs.append(time.perf_counter() - t)
    if a.dump:
        rows.astype("<u4").tofile(a.dump)
    print(json.dumps({
        "rows": int(rows.shape[0]),
        "tokens": int(rows.size),
        "seconds": secs,
        "encode": "encode_batch_fast" if hasattr(tok, "encode_batch_fast") else "encode_batch",
        "tokenizers": tokenizers.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
