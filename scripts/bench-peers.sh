#!/usr/bin/env bash
# Installs the Python peers the benchmarks compare against (JAX on CPU) into
# target/bench-venv, kept apart from the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x target/bench-venv/bin/python ]; then
  echo "==> creating target/bench-venv"
  mkdir -p target
  python3 -m venv target/bench-venv
fi
echo "==> installing jax[cpu] and numpy"
target/bench-venv/bin/pip install --quiet jax numpy
target/bench-venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices())'
