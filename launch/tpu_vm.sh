#!/usr/bin/env bash
# Cloud TPU VM launcher: create (or reuse) a slice, copy and install this checkout on every
# worker, run a binary on all hosts, stream worker 0's log, stop the run, delete the slice.
# `launch/tpu_vm.sh --help` explains it; `--dry-run` prints the commands and runs nothing.
set -euo pipefail

PROG=tpu_vm.sh
DRY_RUN=0
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

GCLOUD=${GCLOUD:-gcloud}
NAME=${HYPERTUNE_TPU_NAME:-hypertune}
PROJECT=${HYPERTUNE_TPU_PROJECT:-}
ZONE=${HYPERTUNE_TPU_ZONE:-us-central2-b}
TYPE=${HYPERTUNE_TPU_TYPE:-v4-8}
RUNTIME=${HYPERTUNE_TPU_RUNTIME:-tpu-ubuntu2204-base}
read -r -a CREATE_FLAGS <<<"${HYPERTUNE_TPU_CREATE_FLAGS:-}"
REMOTE_DIR=${HYPERTUNE_TPU_DIR:-hypertune}
REMOTE_PYTHON=${HYPERTUNE_TPU_PYTHON:-python3.11}
read -r -a PIP_ARGS <<<"${HYPERTUNE_TPU_PIP_ARGS:--e . jax[tpu]}"
TARBALL="${TMPDIR:-/tmp}/hypertune-$NAME.tar.gz"
LOCKFILE=/tmp/libtpu_lockfile

usage() {
  cat <<EOF
usage: launch/tpu_vm.sh [--dry-run] COMMAND [ARGS]

Runs hypertune on a Cloud TPU VM slice (every host of it) through gcloud.

commands:
  create                 reuse the slice if 'gcloud ... describe' finds it READY, else
                         create it (a slice in another state is an error: delete it first)
  setup                  pack this checkout (no .git, .venv, runs/), copy it to every worker,
                         unpack it into \$HYPERTUNE_TPU_DIR, make a venv there with
                         \$HYPERTUNE_TPU_PYTHON (apt-installed if missing) and pip install
                         \$HYPERTUNE_TPU_PIP_ARGS into it
  run BINARY [--] ARGS   on every worker: refuse if a run is still going, remove the TPU
                         lockfile ($LOCKFILE), start 'python -m hypertune.BINARY ARGS'
                         in the background (BINARY: $BINARIES; output in
                         \$HYPERTUNE_TPU_DIR/run.log); then stream worker 0's log
  logs                   stream worker 0's run.log until the run ends (Ctrl-C stops the
                         stream, not the run)
  stop                   on every worker: SIGTERM the run (the trainer saves a checkpoint),
                         wait for it to exit, remove the TPU lockfile
  delete                 delete the slice

options:
  --dry-run              print the commands ('+ ' and the command, one a line) and run none;
                         for create: the describe, then the create it runs if that fails
  -h, --help             this text

environment (default):
  GCLOUD                      the gcloud binary (gcloud)
  HYPERTUNE_TPU_NAME          the slice's name (hypertune)
  HYPERTUNE_TPU_PROJECT       Google Cloud project (unset: gcloud's configured project)
  HYPERTUNE_TPU_ZONE          zone (us-central2-b)
  HYPERTUNE_TPU_TYPE          accelerator type (v4-8; v4-32 is 4 hosts)
  HYPERTUNE_TPU_RUNTIME       TPU VM runtime version (tpu-ubuntu2204-base)
  HYPERTUNE_TPU_CREATE_FLAGS  more flags for 'create', e.g. '--spot' (none)
  HYPERTUNE_TPU_DIR           checkout on the workers, under the home directory (hypertune)
  HYPERTUNE_TPU_PYTHON        python command for the workers' venv (python3.11)
  HYPERTUNE_TPU_PIP_ARGS      what setup pip-installs (-e . jax[tpu])

Every host runs the same command; jax.distributed initializes itself on a multi-host slice.
MODEL_DIR must be one directory that every host sees at the same path.

example (v4-32, 4 hosts):
  export HYPERTUNE_TPU_PROJECT=my-project HYPERTUNE_TPU_TYPE=v4-32
  launch/tpu_vm.sh create && launch/tpu_vm.sh setup
  launch/tpu_vm.sh run train -- --gin_file=experiments/hypert5/sni_hypert5_prefix.gin \\
    --gin.MODEL_DIR="'/mnt/runs/sni_hypert5_prefix'" ...
  launch/tpu_vm.sh stop && launch/tpu_vm.sh delete
EOF
}

# tpu_command VERB ARGS...: sets TPU_COMMAND to
# `gcloud compute tpus tpu-vm VERB ARGS --zone=.. [--project=..]`.
tpu_command() {
  local verb=$1
  shift
  TPU_COMMAND=("$GCLOUD" compute tpus tpu-vm "$verb" "$@" --zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    TPU_COMMAND+=(--project="$PROJECT")
  fi
}

# gcloud_tpu VERB ARGS...: shows and runs `tpu_command VERB ARGS`.
gcloud_tpu() {
  tpu_command "$@"
  run "${TPU_COMMAND[@]}"
}

# on_workers WHICH COMMAND: COMMAND (one shell line) over ssh on worker WHICH (all, 0, ...).
on_workers() {
  gcloud_tpu ssh "$NAME" --worker="$1" --command="$2"
}

cmd_create() {
  local state
  tpu_command describe "$NAME" --format='value(state)'
  show "${TPU_COMMAND[@]}"
  if ((!DRY_RUN)) && state=$("${TPU_COMMAND[@]}" 2>/dev/null); then
    if [[ $state != READY ]]; then
      die "slice '$NAME' is $state, expected READY: delete it (launch/tpu_vm.sh delete) and create it again"
    fi
    note "reusing slice '$NAME' ($state)"
    return
  fi
  gcloud_tpu create "$NAME" --accelerator-type="$TYPE" --version="$RUNTIME" \
    ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
}

cmd_setup() {
  local dir py install
  dir=$(quote "$REMOTE_DIR")
  py=$(quote "$REMOTE_PYTHON")
  install="{ $py -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q"
  install+=" $(quote "$REMOTE_PYTHON") $(quote "$REMOTE_PYTHON-venv") && $py -m venv .venv; }; }"
  run tar -czf "$TARBALL" --exclude=.git --exclude=.venv --exclude=.pytest_cache \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=./runs --exclude=./tmp \
    --exclude=./build -C "$REPO" .
  gcloud_tpu scp "$TARBALL" "$NAME:hypertune.tar.gz" --worker=all
  on_workers all "mkdir -p $dir && tar -xzf hypertune.tar.gz -C $dir && rm hypertune.tar.gz && cd $dir && $install && .venv/bin/pip install -q $(quote_words "${PIP_ARGS[@]}")"
}

cmd_run() {
  local binary=${1:-} dir
  check_binary "$binary"
  shift
  if [[ ${1:-} == -- ]]; then
    shift
  fi
  dir=$(quote "$REMOTE_DIR")
  on_workers all "cd $dir && if [ -f run.pid ] && kill -0 \"\$(cat run.pid)\" 2>/dev/null; then echo \"a run is still going on \$(hostname) (pid \$(cat run.pid)): launch/tpu_vm.sh stop first\" >&2; exit 1; fi && sudo rm -f $LOCKFILE && { nohup .venv/bin/python -m hypertune.$binary${*:+ $(quote_words "$@")} > run.log 2>&1 < /dev/null & echo \$! > run.pid; }"
  cmd_logs
}

cmd_logs() {
  on_workers 0 "cd $(quote "$REMOTE_DIR") && tail -n +1 --pid=\"\$(cat run.pid)\" -f run.log"
}

cmd_stop() {
  on_workers all "cd $(quote "$REMOTE_DIR") && if [ -f run.pid ] && kill -TERM \"\$(cat run.pid)\" 2>/dev/null; then while kill -0 \"\$(cat run.pid)\" 2>/dev/null; do sleep 1; done; fi; sudo rm -f $LOCKFILE"
}

cmd_delete() {
  gcloud_tpu delete "$NAME" --quiet
}

main() {
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*) die "unknown option '$1' (expected --dry-run or --help before the command)" ;;
      *) break ;;
    esac
    shift
  done
  local command=${1:-}
  if [[ -z $command ]]; then
    die "missing the command: expected create, setup, run, logs, stop or delete (see --help)"
  fi
  shift
  case $command in
    run) cmd_run "$@" ;;
    create | setup | logs | stop | delete)
      if [[ $# -gt 0 ]]; then
        die "'$command' takes no arguments, got '$1' (see --help)"
      fi
      "cmd_$command"
      ;;
    *) die "unknown command '$command': expected create, setup, run, logs, stop or delete (see --help)" ;;
  esac
}

main "$@"
