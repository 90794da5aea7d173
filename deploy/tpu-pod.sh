#!/usr/bin/env bash
# A sharedmoe job on a Cloud TPU pod slice (default v4-32: 4 hosts x 4 chips)
# through gcloud: create the slice, copy (or build) the binary on every host,
# start the coordinator on worker 0 and a worker on every host, stream logs,
# stop with a checkpoint, fetch the run, tear down. See deploy/README.md for
# costs and preemption.
#
#   deploy/tpu-pod.sh COMMAND --name NAME --project PROJECT [options]
#
# Commands:
#   up        compile here (offline, `sharedmoe compile`) + create + copy + start
#   compile   compile the train and eval steps for the slice on this machine,
#             offline: memory per chip; fails when they do not fit a chip
#   create    create the TPU VM slice
#   copy      copy the binary, configs and data to every host; fetch libtpu
#   start     start the coordinator (worker 0) and one worker per host
#   logs      stream the coordinator's log (--workers: every worker's)
#   status    the slice's state and the run's newest lines and checkpoints
#   stop      SIGTERM the workers (they checkpoint), then the coordinator
#   fetch     copy the run directory from worker 0 to ./runs/
#   teardown  delete the slice (needs --yes: its disks go with it)
#
# Options:
#   --name NAME            TPU VM name (required)
#   --project PROJECT      Google Cloud project (required)
#   --zone ZONE            default us-central2-b (where v4 is offered)
#   --type TYPE            accelerator type v4-N, default v4-32
#   --version VERSION      TPU VM image, default tpu-ubuntu2204-base
#   --spot                 Spot capacity (cheaper, can be preempted any time)
#   --config FILE          run config, default configs/sharedmoe50m.toml
#   --set KEY=VALUE        config override (repeatable)
#   --run-dir DIR          run directory on worker 0, default runs/NAME
#   --port PORT            coordinator port, default 50051
#   --binary PATH          the binary to copy, default target/release/sharedmoe
#   --build                build on every host from this checkout instead
#   --no-compile           (up) skip the local ahead-of-time compile
#   --workers              (logs) every worker's log, not the coordinator's
#   --yes                  (teardown) really delete
#   --dry-run              print the commands, run nothing
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=deploy/common.sh
source "$ROOT/deploy/common.sh"

[[ $# -ge 1 ]] || usage 2
COMMAND=$1
shift
case $COMMAND in
  up | compile | create | copy | start | logs | status | stop | fetch | teardown) ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown command '$COMMAND' (expected up, compile, create, copy, start, logs, status, stop, fetch or teardown)" ;;
esac

NAME="" PROJECT="" ZONE="us-central2-b" TYPE="v4-32" VERSION="tpu-ubuntu2204-base"
SPOT=0 CONFIG="configs/sharedmoe50m.toml" RUN_DIR="" PORT=50051
BINARY="target/release/sharedmoe" BUILD=0 WORKER_LOGS=0 YES=0 COMPILE=1
SETS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --set) need_value "$@"; SETS+=("$2"); shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --binary) need_value "$@"; BINARY=$2; shift 2 ;;
    --build) BUILD=1; shift ;;
    --no-compile) COMPILE=0; shift ;;
    --workers) WORKER_LOGS=1; shift ;;
    --yes) YES=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

# ---- checks
if [[ $COMMAND == compile ]]; then
  NAME=${NAME:-local} # compile needs no slice and no project
else
  [[ -n $NAME ]] || die "--name is required"
  [[ -n $PROJECT ]] || die "--project is required"
fi
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and dashes, starting with a letter"
[[ $PORT =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65535 ]] || die "--port '$PORT': expected 1..65535"
[[ $TYPE =~ ^v4-([0-9]+)$ ]] || die "--type '$TYPE': expected v4-N (v4-8, v4-16, v4-32, ...)"
CORES=${BASH_REMATCH[1]}
((CORES >= 8 && CORES % 8 == 0)) || die "--type $TYPE: N must be a multiple of 8 (a v4 host has 4 chips, 8 TensorCores)"
CHIPS=$((CORES / 2)) # one JAX/PJRT device per v4 chip (megacore)
HOSTS=$((CORES / 8))
RUN_DIR=${RUN_DIR:-runs/$NAME}
[[ -f $ROOT/$CONFIG || -f $CONFIG ]] || die "--config $CONFIG: no such file"
for s in "${SETS[@]}"; do
  [[ $s == *=* ]] || die "--set '$s': expected KEY=VALUE"
done

GC=(gcloud compute tpus tpu-vm)
WHERE=("--project=$PROJECT" "--zone=$ZONE")
REMOTE=sharedmoe # on every host, relative to the home directory
BUNDLE=${TMPDIR:-/tmp}/sharedmoe-$NAME.tgz
SECRET=${TMPDIR:-/tmp}/sharedmoe-$NAME.secret

ssh_on() { # WORKER COMMAND
  run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$1" "--command=$2"
}

# The config options every job command gets: the file, the backend, one
# replica per chip, the user's overrides (later ones win).
config_flags() {
  local f
  f="--config $(quote "$CONFIG") --backend tpu --set train.replicas=$CHIPS"
  for s in "${SETS[@]}"; do
    f+=" --set $(quote "$s")"
  done
  echo "$f"
}

# Before paying for a slice: the train and eval steps compiled for it here
# (libtpu, offline in a network namespace), with the memory each chip needs;
# a step that does not fit stops `up` with the largest micro-batch that does.
do_compile() {
  step "compile the train and eval steps for $TYPE on this machine, offline (memory per chip)"
  [[ -x $BINARY ]] || die "--binary $BINARY: not an executable (cargo build --release; it compiles for the slice here), or --no-compile"
  local args=(compile --topology "$TYPE" --config "$CONFIG") s
  for s in "${SETS[@]}"; do
    args+=(--set "$s")
  done
  run "$BINARY" "${args[@]}"
}

do_create() {
  step "create $TYPE ($HOSTS hosts, $CHIPS chips) '$NAME' in $ZONE"
  local extra=()
  [[ $SPOT == 1 ]] && extra+=(--spot)
  run "${GC[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" "--version=$VERSION" "${extra[@]}"
}

# Newest glibc symbol version a binary needs (empty if objdump is missing).
glibc_needed() {
  command -v objdump >/dev/null 2>&1 || return 0
  objdump -T "$1" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -n 1 | sed 's/GLIBC_//'
}

do_copy() {
  if [[ $BUILD == 1 ]]; then
    step "build on every host from this checkout (git archive HEAD)"
    run git -C "$ROOT" archive --format=tar.gz -o "$BUNDLE" HEAD
    run "${GC[@]}" scp "$BUNDLE" "$NAME:$REMOTE.tgz" "${WHERE[@]}" --worker=all
    ssh_on all "mkdir -p $REMOTE && tar -xzf $REMOTE.tgz -C $REMOTE && cd $REMOTE && (command -v cargo >/dev/null || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal) && . ~/.cargo/env && SHAREDMOE_ACCEL=tpu scripts/setup.sh && ln -sf target/release/sharedmoe sharedmoe"
  else
    [[ -x $BINARY ]] || die "--binary $BINARY: not an executable (cargo build --release, or use --build)"
    local need
    need=$(glibc_needed "$BINARY")
    if [[ -n $need ]] && [[ $(printf '%s\n' "$need" 2.35 | sort -V | tail -n 1) != 2.35 ]]; then
      die "$BINARY needs glibc $need; $VERSION has 2.35: build in deploy/Dockerfile (see deploy/README.md) or use --build"
    fi
    # libtpu's wheels need Python >= 3.11 and the image has 3.10: the
    # script downloads the Python 3.12 wheel and unpacks it into
    # $REMOTE/.venv/lib/python3.12/site-packages, where the binary finds it.
    step "copy the binary, configs and data to all $HOSTS hosts; fetch libtpu there"
    run tar -czf "$BUNDLE" -C "$ROOT" configs data scripts/fetch-plugin.sh -C "$(cd "$(dirname "$BINARY")" && pwd)" "$(basename "$BINARY")"
    run "${GC[@]}" scp "$BUNDLE" "$NAME:$REMOTE.tgz" "${WHERE[@]}" --worker=all
    ssh_on all "mkdir -p $REMOTE && tar -xzf $REMOTE.tgz -C $REMOTE && cd $REMOTE && scripts/fetch-plugin.sh tpu"
  fi
  step "check every host: plugin, chips, a compiled program"
  ssh_on all "cd $REMOTE && ./sharedmoe doctor --backend tpu"
}

do_start() {
  step "a fresh shared secret for the job (the coordinator listens beyond loopback)"
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > $(quote "$SECRET"))"
  else
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$SECRET")
  fi
  run "${GC[@]}" scp "$SECRET" "$NAME:$REMOTE/secret" "${WHERE[@]}" --worker=all
  step "the coordinator on worker 0 (resumes from $RUN_DIR's newest checkpoint if there is one)"
  ssh_on 0 "cd $REMOTE && chmod 600 secret && nohup ./sharedmoe coordinator $(config_flags) --workers $HOSTS --listen 0.0.0.0:$PORT --secret-file secret --run-dir $(quote "$RUN_DIR") > coordinator.log 2>&1 < /dev/null &"
  step "a worker on each of the $HOSTS hosts: rank = the slice's worker number, coordinator = worker 0 (TPU VM metadata)"
  # A worker whose attempt aborts exits 75 (a TPU process cannot create a
  # second multi-host client): the loop starts a fresh one; any other exit
  # status ends it.
  ssh_on all "cd $REMOTE && chmod 600 secret && nohup sh -c 'while ./sharedmoe worker --backend tpu --coordinator-port $PORT --secret-file secret; [ \$? -eq 75 ]; do echo restarting the worker after exit 75; done' > worker.log 2>&1 < /dev/null &"
}

do_logs() {
  if [[ $WORKER_LOGS == 1 ]]; then
    ssh_on all "tail -n 50 -F $REMOTE/worker.log"
  else
    ssh_on 0 "tail -n 50 -F $REMOTE/coordinator.log"
  fi
}

do_status() {
  run "${GC[@]}" describe "$NAME" "${WHERE[@]}" "--format=value(state,health,acceleratorType)"
  ssh_on 0 "tail -n 5 $REMOTE/coordinator.log; ls $REMOTE/$(quote "$RUN_DIR")/checkpoints"
}

do_stop() {
  step "SIGTERM the workers: they finish the step and rank 0 sends a checkpoint"
  # [s]: the pattern must not match the remote shell running pkill.
  ssh_on all 'pkill -TERM -f "[s]haredmoe worker" || true'
  step "then the coordinator, once worker 0's worker has exited"
  ssh_on 0 'while pgrep -f "[s]haredmoe worker" > /dev/null; do sleep 2; done; pkill -TERM -f "[s]haredmoe coordinator" || true'
}

do_fetch() {
  run mkdir -p runs
  run "${GC[@]}" scp --recurse "$NAME:$REMOTE/$RUN_DIR" runs/ "${WHERE[@]}" --worker=0
}

do_teardown() {
  if [[ $YES != 1 && $DRY_RUN != 1 ]]; then
    die "teardown deletes $NAME and its disks (the run directory too: fetch it first); pass --yes"
  fi
  run "${GC[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

if [[ $DRY_RUN != 1 && $COMMAND != compile ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
fi
case $COMMAND in
  up)
    [[ $COMPILE == 1 ]] && do_compile
    do_create; do_copy; do_start
    ;;
  compile) do_compile ;;
  create) do_create ;;
  copy) do_copy ;;
  start) do_start ;;
  logs) do_logs ;;
  status) do_status ;;
  stop) do_stop ;;
  fetch) do_fetch ;;
  teardown) do_teardown ;;
esac
