# shellcheck shell=bash
# Shared helpers of the deploy scripts (sourced, not run).
#
# `run CMD ARGS...` prints the command, shell-quoted so that it can be
# pasted, then runs it unless DRY_RUN=1. `die MSG` stops with a message.

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

# One argument, quoted only if the shell would need it (`--opt=value`
# keeps the option bare: --command='...').
quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

show() {
  local out="" a
  for a in "$@"; do
    out+="$(quote "$a") "
  done
  echo "${out% }"
}

run() {
  show "$@"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# Says what a step does (a comment in --dry-run output).
step() {
  echo "# $*"
}

# The script's header comment (from line 2 up to `set -euo`) as its help.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

# The value of option $1, or a clear error when it is missing.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}
