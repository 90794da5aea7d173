#!/usr/bin/env bash
# Rebuilds the whole shipped data/ directory: the FineWeb-Edu-schema sample
# (data/fineweb-sample/) and its 32,000-token tokenizer (data/tokenizer.json)
# from the Rust documentation books of the installed toolchain (rustup's
# `rust-docs` component; Apache-2.0 OR MIT), then, through
# scripts/make-python-docs-data.sh, data/python-docs/ (Debian's
# python3.11-doc; PSF License Agreement) and the 8,192-token
# data/tokenizer-8k.json trained on both. See data/README.md.
#
# Needs: scripts/setup.sh done (target/release/sharedmoe), pip access
# for pyarrow + tokenizers (installed into target/py-data-venv), and
# apt-get + dpkg-deb for the Python documentation package.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/py-data-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "pyarrow==26.0.1" "tokenizers==0.23.3"
fi
sysroot=$(rustc --print sysroot)
html="$sysroot/share/doc/rust/html"
if [ ! -d "$html/book" ]; then
  rustup component add rust-docs
fi
version=$(rustc --version | awk '{print $2}')
out=data/fineweb-sample
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. Pages -> parquet (token_count 0 until the tokenizer exists).
"$venv/bin/python" scripts/sample/rust_docs_to_fineweb.py "$html" "$tmp/pages" \
  --version "$version"
# 2. The tokenizer, trained by us on the training split of those pages.
target/release/sharedmoe tokenizer train "$tmp/pages" --vocab 32000 --out "$tmp/tokenizer.json" --min-frequency 1 --val-fraction 0.02
# 3. The same pages again, with token_count under that tokenizer.
"$venv/bin/python" scripts/sample/rust_docs_to_fineweb.py "$html" "$tmp/final" \
  --version "$version" --token-counts "$tmp/tokenizer.json"

rm -rf "$out"
mkdir -p "$out"
cp "$tmp"/final/*.parquet "$out/"
cp "$tmp/tokenizer.json" data/tokenizer.json
cp "$sysroot/share/doc/rust/licenses/MIT.txt" "$out/LICENSE-MIT.txt"
cp "$sysroot/share/doc/rust/licenses/Apache-2.0.txt" "$out/LICENSE-APACHE.txt"
ls -l "$out" data/tokenizer.json

# 4. The Python documentation and the 8,192-token tokenizer.
scripts/make-python-docs-data.sh
