#!/usr/bin/env bash
# Rebuilds data/python-docs/ (the Python 3.11 documentation as FineWeb-Edu-
# schema parquet; PSF License Agreement) and the 8,192-token tokenizer
# data/tokenizer-8k.json (trained on data/fineweb-sample/ and
# data/python-docs/). See data/README.md. Called by
# scripts/make-sample-data.sh (the entry point, which first rebuilds
# data/fineweb-sample/ and data/tokenizer.json); run it alone to redo only
# these two. Token counts are under data/tokenizer.json, so that must exist.
#
# Needs: target/release/sharedmoe, apt-get (Debian bookworm's package lists:
# `apt-get update` if the package is not found), dpkg-deb, and pip access for
# pyarrow + tokenizers (installed into target/py-data-venv).
#
# PYDOC_VERSION pins the package version (default: the one the shipped data
# was made from). Debian's mirrors keep only the newest security update; if
# that version is gone, the current candidate is used and the version
# actually used is what `dump` and the log say (snapshot.debian.org keeps
# every old version).
set -euo pipefail
cd "$(dirname "$0")/.."

PYDOC_VERSION=${PYDOC_VERSION:-3.11.2-6+deb12u9}
venv=target/py-data-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "pyarrow==26.0.1" "tokenizers==0.23.3"
fi
[ -f data/tokenizer.json ] || { echo "data/tokenizer.json is missing: run scripts/make-sample-data.sh" >&2; exit 1; }
[ -d data/fineweb-sample ] || { echo "data/fineweb-sample/ is missing: run scripts/make-sample-data.sh" >&2; exit 1; }
out=data/python-docs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. The package (a .deb is an ar archive; dpkg-deb unpacks it, no root needed).
#    As root, apt warns that it downloads "unsandboxed" into this private
#    directory: harmless.
if ! (cd "$tmp" && apt-get download "python3.11-doc=$PYDOC_VERSION"); then
  echo "warning: python3.11-doc=$PYDOC_VERSION is not in the package lists; using the current candidate" >&2
  (cd "$tmp" && apt-get download python3.11-doc)
fi
deb=$(ls "$tmp"/python3.11-doc_*.deb)
version=$(dpkg-deb -f "$deb" Version)
echo "python3.11-doc $version, sha256 $(sha256sum "$deb" | cut -d' ' -f1)"
dpkg-deb -x "$deb" "$tmp/pkg"

# 2. reST sources -> parquet, token_count under data/tokenizer.json, licence files.
"$venv/bin/python" scripts/sample/python_docs_to_fineweb.py "$tmp/pkg" "$tmp/out" \
  --package-version "$version" --token-counts data/tokenizer.json --licences
rm -rf "$out"
mkdir -p "$out"
cp "$tmp"/out/* "$out/"

# 3. The 8,192-token tokenizer on the training split of both directories
#    (the held-out 2% by id, as the small configs' data.val_fraction).
target/release/sharedmoe tokenizer train data/fineweb-sample data/python-docs \
  --vocab 8192 --min-frequency 2 --val-fraction 0.02 --out data/tokenizer-8k.json
ls -l "$out" data/tokenizer-8k.json
