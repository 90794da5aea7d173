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
import html.parser
import pathlib
import re
import sys

from fineweb_schema import fineweb_row, write_shards

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
            rows.append(fineweb_row(text, url, f"rust-docs-{args.version}",
                                    f"share/doc/rust/html/{rel}", tok))
    write_shards(rows, args.out_dir, args.files, args.rows_per_group)

if __name__ == "__main__":
    main()
