#!/usr/bin/env bash
# Train on every GPU of this machine: one process drives all of them (one
# replica per GPU, XLA's NCCL all-reduce between them), bf16 compute with
# f32 master weights. Interrupt with Ctrl-C or SIGTERM: the step finishes
# and a checkpoint is written; run the same command again to resume.
#
#   deploy/gpu-node.sh [options]
#
# Options:
#   --config FILE      run config, default configs/sharedmoe50m.toml
#   --set KEY=VALUE    config override (repeatable)
#   --run-dir DIR      run directory, default runs/<config name>-gpu
#   --gpus N           GPUs to use, default all that nvidia-smi lists
#                      (CUDA_VISIBLE_DEVICES picks which)
#   --cuda 12|13       the CUDA plugin to install if none is, default 12
#   --binary PATH      default target/release/sharedmoe
#   --dry-run          print the commands, run nothing
#
# Several GPU machines: start `sharedmoe coordinator --backend cuda
# --workers N ...` on one and `sharedmoe worker --backend cuda --coordinator
# HOST:PORT` on each (see README.md, "Multi-process jobs").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=deploy/common.sh
source "$ROOT/deploy/common.sh"

CONFIG="configs/sharedmoe50m.toml" RUN_DIR="" GPUS="" CUDA=12
BINARY="target/release/sharedmoe"
SETS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --set) need_value "$@"; SETS+=("$2"); shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --cuda) need_value "$@"; CUDA=$2; shift 2 ;;
    --binary) need_value "$@"; BINARY=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

cd "$ROOT"
[[ -f $CONFIG ]] || die "--config $CONFIG: no such file"
[[ $CUDA == 12 || $CUDA == 13 ]] || die "--cuda '$CUDA': expected 12 or 13"
for s in "${SETS[@]}"; do
  [[ $s == *=* ]] || die "--set '$s': expected KEY=VALUE"
done
if [[ -z $GPUS ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: is this a GPU machine with the NVIDIA driver? (or pass --gpus N)"
  GPUS=$(nvidia-smi -L | grep -c '^GPU ' || true)
  [[ -n ${CUDA_VISIBLE_DEVICES:-} ]] && GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus '$GPUS': expected a positive number (nvidia-smi lists no GPU?)"
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .toml)-gpu}

if [[ ! -x $BINARY ]]; then
  step "build sharedmoe with the CUDA $CUDA plugin in .venv"
  run env "SHAREDMOE_ACCEL=cuda$CUDA" scripts/setup.sh
elif ! compgen -G ".venv/lib/python3*/site-packages/jax_plugins/xla_cuda*/xla_cuda_plugin.so" >/dev/null; then
  step "fetch the CUDA $CUDA PJRT plugin and NVIDIA libraries (Python 3.12 wheels, unpacked) into .venv"
  run scripts/fetch-plugin.sh "cuda$CUDA"
fi
step "check the GPUs: plugin, devices and memory, a compiled program"
run "$BINARY" doctor --backend cuda
step "train on $GPUS GPUs (global batch split over them; resumes from $RUN_DIR's newest checkpoint)"
cmd=("$BINARY" train --config "$CONFIG" --backend cuda --set "train.replicas=$GPUS" --set "run.dir=$RUN_DIR")
for s in "${SETS[@]}"; do
  cmd+=(--set "$s")
done
run "${cmd[@]}"
