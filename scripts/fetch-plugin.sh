#!/usr/bin/env bash
# Fetches an accelerator's PJRT plugin wheels for the Python 3.12 ABI and
# unpacks them (wheels are zip files) into a site-packages-style directory,
# without installing them into any Python: the sharedmoe binary needs only
# their shared libraries. So it works whatever Python the machine has
# (libtpu 0.0.52 has no wheel for Python 3.10, the Python of Ubuntu 22.04
# and the TPU VM images; pip would also resolve the CUDA plugins to old
# versions there). Used by scripts/setup.sh (SHAREDMOE_ACCEL),
# deploy/tpu-pod.sh, deploy/gpu-node.sh and deploy/Dockerfile.
#
#   scripts/fetch-plugin.sh ACCEL [DIR] [--plugin-only]
#
#   ACCEL          tpu: libtpu. cuda12, cuda13: jax-cudaNN-pjrt and the NVIDIA
#                  libraries that jax-cudaNN-plugin[with-cuda] names, pinned below
#                  (unpacked so that DIR/nvidia/*/lib exist; sharedmoe preloads
#                  them before it loads the plugin)
#   DIR            default .venv/lib/python3.12/site-packages: plugin discovery
#                  searches every .venv/lib/python3*/site-packages, whatever the
#                  venv's own Python (or none at all)
#   --plugin-only  the plugin wheel alone (CUDA: the NVIDIA libraries come from
#                  elsewhere, e.g. a system CUDA on LD_LIBRARY_PATH)
#
# Needs python3 with pip (PIP="python3 -m pip" by default) and PyPI.
# Idempotent: DIR/.sharedmoe-ACCEL lists what was unpacked; the same list
# again does nothing. Older versions of the same packages are removed first.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

ACCEL="" DIR="" PLUGIN_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --plugin-only) PLUGIN_ONLY=1 ;;
    -h | --help) usage 0 ;;
    -*) echo "fetch-plugin.sh: unknown option '$1'" >&2; exit 2 ;;
    *)
      if [[ -z $ACCEL ]]; then ACCEL=$1
      elif [[ -z $DIR ]]; then DIR=$1
      else echo "fetch-plugin.sh: unexpected argument '$1' (see --help)" >&2; exit 2
      fi ;;
  esac
  shift
done
DIR=${DIR:-.venv/lib/python3.12/site-packages}

# The pins: the plugin, then what its [with-cuda] extra names (jax-cudaNN-plugin
# 0.12.0.1's METADATA, Requires-Dist), each at its newest release as of
# December 2026. Their header-only dependencies (nvidia-cuda-cccl,
# nvidia-cuda-crt) are left out.
case $ACCEL in
  tpu) WHEELS=(libtpu==0.0.52) ;;
  cuda12) WHEELS=(
    jax-cuda12-pjrt==0.12.0.1
    nvidia-cublas-cu12==12.9.3.13
    nvidia-cuda-cupti-cu12==12.9.79
    nvidia-cuda-nvcc-cu12==12.9.86
    nvidia-cuda-runtime-cu12==12.9.79
    nvidia-cudnn-cu12==9.28.0.42
    nvidia-cufft-cu12==11.4.1.4
    nvidia-cusolver-cu12==11.7.5.82
    nvidia-cusparse-cu12==12.5.10.65
    nvidia-nccl-cu12==2.32.3
    nvidia-nvjitlink-cu12==12.9.86
    nvidia-cuda-nvrtc-cu12==12.9.86
    nvidia-nvshmem-cu12==3.8.0
  ) ;;
  cuda13) WHEELS=(
    jax-cuda13-pjrt==0.12.0.1
    nvidia-cublas==13.10.0.20
    nvidia-cuda-cupti==13.5.25
    nvidia-cuda-nvcc==13.5.37
    nvidia-cuda-runtime==13.5.37
    nvidia-cudnn-cu13==9.28.1.4
    nvidia-cufft==12.5.0.14
    nvidia-cusolver==12.4.1.2
    nvidia-cusparse==12.9.4.2
    nvidia-nccl-cu13==2.32.3
    nvidia-nvjitlink==13.5.37
    nvidia-cuda-nvrtc==13.5.37
    nvidia-nvshmem-cu13==3.8.0
    nvidia-nvvm==13.5.37
  ) ;;
  "") echo "fetch-plugin.sh: which accelerator? tpu, cuda12 or cuda13 (see --help)" >&2; exit 2 ;;
  *) echo "fetch-plugin.sh: ACCEL '$ACCEL': expected tpu, cuda12 or cuda13" >&2; exit 2 ;;
esac
[[ $PLUGIN_ONLY == 1 ]] && WHEELS=("${WHEELS[0]}")

MARKER=$DIR/.sharedmoe-$ACCEL
if [[ -f $MARKER ]] && [[ $(cat "$MARKER") == "$(printf '%s\n' "${WHEELS[@]}")" ]]; then
  echo "==> $ACCEL plugin present in $DIR"
  exit 0
fi

read -r -a PIP <<<"${PIP:-python3 -m pip}"
"${PIP[@]}" --version >/dev/null 2>&1 \
  || { echo "fetch-plugin.sh: '${PIP[*]}' does not run: install pip (apt-get install python3-pip) or set PIP" >&2; exit 1; }
PYTHON=${PYTHON:-python3}

# Every manylinux tag up to glibc 2.35 (Ubuntu 22.04, the TPU VM images):
# older pips do not expand a --platform to the tags it implies.
PLATFORMS=()
for t in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_25 \
  manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  PLATFORMS+=(--platform "${t}_x86_64")
done

mkdir -p "$DIR"
DOWNLOADS=$(mktemp -d)
trap 'rm -rf "$DOWNLOADS"' EXIT
echo "==> $ACCEL: ${#WHEELS[@]} wheel(s) for Python 3.12 into $DIR"
rm -f "$MARKER"
for w in "${WHEELS[@]}"; do
  # One at a time: at most one wheel (up to 0.7 GB) on disk besides DIR.
  "${PIP[@]}" download --quiet --disable-pip-version-check --no-cache-dir --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" --dest "$DOWNLOADS" "$w"
  # Unpack with the files' modes (ptxas must stay executable), after removing
  # any other version of the same package (the files its RECORD lists).
  "$PYTHON" - "$DIR" "$DOWNLOADS"/*.whl <<'EOF'
import os, shutil, sys, zipfile
site, wheel = sys.argv[1], sys.argv[2]
dist = os.path.basename(wheel).split("-")[0].lower()
for d in os.listdir(site):
    if d.endswith(".dist-info") and d.split("-")[0].lower().replace(".", "_") == dist:
        record = os.path.join(site, d, "RECORD")
        if os.path.exists(record):
            for line in open(record):
                rel = line.rsplit(",", 2)[0]
                p = os.path.join(site, rel)
                if ".." not in rel.split("/") and (os.path.isfile(p) or os.path.islink(p)):
                    os.remove(p)
        shutil.rmtree(os.path.join(site, d), ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        path = z.extract(info, site)
        mode = info.external_attr >> 16
        if mode and not info.is_dir():
            os.chmod(path, mode & 0o777)
EOF
  echo "    $(basename "$DOWNLOADS"/*.whl)"
  rm -f "$DOWNLOADS"/*.whl
done
printf '%s\n' "${WHEELS[@]}" >"$MARKER"
echo "==> $ACCEL plugin unpacked into $DIR"
