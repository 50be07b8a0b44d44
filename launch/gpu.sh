#!/usr/bin/env bash
# One GPU host, all its GPUs: runs `python -m hypertune.BINARY ARGS` once; JAX sees every local
# GPU and the mesh spans them. `launch/gpu.sh --help` explains it; `--dry-run` prints the command.
set -euo pipefail

PROG=gpu.sh
DRY_RUN=0
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

read -r -a PYTHON <<<"${HYPERTUNE_PYTHON:-python}"

usage() {
  cat <<EOF
usage: launch/gpu.sh [--dry-run] BINARY [--] ARGS

Runs 'python -m hypertune.BINARY ARGS' once on this host (BINARY: $BINARIES), in the
current directory, in the foreground; one process drives all local GPUs.

options:
  --dry-run     print the command ('+ ' and the command) and run nothing
  -h, --help    this text

environment (default):
  HYPERTUNE_PYTHON   the python that has hypertune installed, may start with env VAR=...
                     (python)
  CUDA_VISIBLE_DEVICES, XLA_FLAGS, ... reach the binary unchanged

example (8 GPUs; SIGTERM saves a checkpoint, the same command resumes from MODEL_DIR):
  HYPERTUNE_PYTHON=.venv/bin/python launch/gpu.sh train -- \\
    --gin_file=experiments/hypert5/sni_hypert5_prefix.gin --gin.MODEL_DIR="'/runs/sni'" ...
EOF
}

main() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*) die "unknown option '$1' (expected --dry-run or --help before the binary)" ;;
      *) break ;;
    esac
    shift
  done
  local binary=${1:-}
  check_binary "$binary"
  shift
  if [[ ${1:-} == -- ]]; then
    shift
  fi
  show "${PYTHON[@]}" -m "hypertune.$binary" "$@"
  if ((!DRY_RUN)); then
    exec "${PYTHON[@]}" -m "hypertune.$binary" "$@"
  fi
}

main "$@"
