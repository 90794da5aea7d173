#!/usr/bin/env bash
# One-command set-up for a fresh machine: system packages (libclang for
# bindgen, protoc for gRPC code generation), the CPU PJRT plugin in .venv,
# then a release build. Idempotent; extra arguments go to `cargo build`.
# SHAREDMOE_ACCEL=tpu|cuda12|cuda13 also installs that accelerator's PJRT
# plugin (libtpu; the CUDA plugin with its NVIDIA libraries): its Python 3.12
# wheels, fetched and unpacked into .venv/lib/python3.12/site-packages by
# scripts/fetch-plugin.sh, so it works with any Python (3.10 included).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${SHAREDMOE_ACCEL:-}" in
  "" | tpu | cuda12 | cuda13) ;;
  *) echo "SHAREDMOE_ACCEL=${SHAREDMOE_ACCEL}: expected tpu, cuda12 or cuda13" >&2; exit 2 ;;
esac

say() { echo "==> $*"; }
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
# libclang.so itself: libclang-cpp.so (present on some images) is not what bindgen loads.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null || compgen -G '/usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so*' >/dev/null \
  || missing+=(libclang-dev)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  say "libclang and protoc present"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
if ! ls .venv/lib/python3*/site-packages/xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so >/dev/null 2>&1; then
  say "installing xla-cpu-pjrt (the OpenXLA CPU PJRT plugin) into .venv"
  .venv/bin/pip install --quiet xla-cpu-pjrt
else
  say "xla-cpu-pjrt present in .venv"
fi

if [ -n "${SHAREDMOE_ACCEL:-}" ]; then
  say "the ${SHAREDMOE_ACCEL} PJRT plugin (Python 3.12 wheels, unpacked) in .venv/lib/python3.12/site-packages"
  PIP=".venv/bin/python -m pip" PYTHON=.venv/bin/python scripts/fetch-plugin.sh "$SHAREDMOE_ACCEL"
fi

say "building (release)"
cargo build --release "$@"
say "ready: target/release/sharedmoe"
