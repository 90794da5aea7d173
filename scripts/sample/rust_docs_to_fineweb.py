#!/usr/bin/env python3
"""Turns the mdBook books of the Rust documentation (the `rust-docs`
rustup component: MIT OR Apache-2.0) into parquet shards in FineWeb-Edu's
ten-column schema. One document per book page: the text of the page's
<main> element, code blocks (<pre>) dropped, paragraphs kept.

Usage: rust_docs_to_fineweb.py HTML_ROOT OUT_DIR [--token-counts TOKENIZER_JSON]

With --token-counts, `token_count` is the page's token count under that
tokenizer (needs the `tokenizers` package); otherwise 0.
"""
import argparse
import hashlib
import html.parser
import pathlib
import re
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

BOOKS = ["book", "rust-by-example", "reference", "nomicon", "edition-guide",
         "embedded-book", "cargo", "rustc", "rustdoc", "style-guide"]
BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "div", "br", "tr",
         "blockquote", "dt", "dd", "table", "ul", "ol", "section", "hr"}
SKIP = {"pre", "script", "style", "nav", "button"}


class MainText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_main = 0
        self.skip = 0
        self.blocks = []
        self.cur = []

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
        if text:
            self.blocks.append(text)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main += 1
        elif self.in_main:
            if tag in SKIP:
                self.skip += 1
            elif tag in BLOCK:
                self.flush()

    def handle_endtag(self, tag):
        if tag == "main":
            self.flush()
            self.in_main -= 1
        elif self.in_main:
            if tag in SKIP:
                self.skip = max(0, self.skip - 1)
            elif tag in BLOCK:
                self.flush()

    def handle_data(self, data):
        if self.in_main and not self.skip:
            self.cur.append(data)


def page_text(path):
    p = MainText()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    p.close()
    return "\n\n".join(p.blocks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("html_root", type=pathlib.Path)
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--token-counts", type=pathlib.Path)
    ap.add_argument("--version", default="1.95.0")
    ap.add_argument("--rows-per-group", type=int, default=64)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--min-chars", type=int, default=500)
    args = ap.parse_args()
    tok = None
    if args.token_counts:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(args.token_counts))
    rows = []
    for book in BOOKS:
        root = args.html_root / book
        if not root.is_dir():
            print(f"skipping {root}: not there", file=sys.stderr)
            continue
        for page in sorted(root.rglob("*.html")):
            rel = page.relative_to(args.html_root).as_posix()
            if rel.endswith(("print.html", "404.html", "toc.html")) or "/searchindex" in rel:
                continue
            text = page_text(page)
            if len(text) < args.min_chars:
                continue
            url = f"https://doc.rust-lang.org/{args.version}/{rel}"
            rows.append({
                "text": text,
                "id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>",
                "dump": f"rust-docs-{args.version}",
                "url": url,
                "file_path": f"share/doc/rust/html/{rel}",
                "language": "en",
                "language_score": 1.0,
                "token_count": len(tok.encode(text).ids) if tok else 0,
                "score": 3.0,
                "int_score": 3,
            })
    # Deterministic spread of books over files: order by a hash of the id.
    rows.sort(key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    schema = pa.schema([
        ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()),
        ("url", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
        ("language_score", pa.float64()), ("token_count", pa.int64()),
        ("score", pa.float64()), ("int_score", pa.int64()),
    ])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    per_file = (len(rows) + args.files - 1) // args.files
    for f in range(args.files):
        part = rows[f * per_file:(f + 1) * per_file]
        table = pa.Table.from_pylist(part, schema=schema)
        out = args.out_dir / f"000_{f:05d}.parquet"
        pq.write_table(table, out, row_group_size=args.rows_per_group, compression="zstd")
        print(f"{out}: {len(part)} documents, {sum(len(r['text']) for r in part)} characters",
              file=sys.stderr)


if __name__ == "__main__":
    main()
