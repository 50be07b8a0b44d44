#!/usr/bin/env bash
# Several GPU hosts, one process each: runs `python -m hypertune.BINARY` with t5x's multi-host
# flags, either this host's process (given its index) or, with a host list, every host's over
# ssh. `launch/multihost_gpu.sh --help` explains it; `--dry-run` prints the commands.
set -euo pipefail

PROG=multihost_gpu.sh
DRY_RUN=0
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

read -r -a PYTHON <<<"${HYPERTUNE_PYTHON:-python}"
read -r -a SSH_COMMAND <<<"${SSH:-ssh}"
REMOTE_DIR=${HYPERTUNE_REMOTE_DIR:-$REPO}
PORT=${HYPERTUNE_COORDINATOR_PORT:-8476}
COORDINATOR=${HYPERTUNE_COORDINATOR_ADDRESS:-}
COUNT=${HYPERTUNE_PROCESS_COUNT:-}
INDEX=${HYPERTUNE_PROCESS_INDEX:-}
HOST_LIST=${HOSTS:-}

usage() {
  cat <<EOF
usage: launch/multihost_gpu.sh [--dry-run] --coordinator_address=HOST:PORT --process_count=N
                               --process_index=I BINARY [--] ARGS
       launch/multihost_gpu.sh [--dry-run] --hosts=H1,H2,... BINARY [--] ARGS

One process per GPU host, each driving its local GPUs (BINARY: $BINARIES). Every process
runs 'python -m hypertune.BINARY --multiprocess_gpu --coordinator_address=HOST:PORT
--process_count=N --process_index=I ARGS' (the binaries' t5x flags); process 0 listens on
HOST:PORT.

  first form   run this host's process, in the foreground, in the current directory;
               run it on every host with its own --process_index
  --hosts      from one machine: for host number I of the list (from 0), run
               'ssh HOST "cd DIR && python -m hypertune.BINARY ... --process_index=I ARGS"',
               all at once; each line of output is prefixed with [HOST]; exits non-zero
               if any host's process fails. The coordinator is the first host, port
               \$HYPERTUNE_COORDINATOR_PORT, unless --coordinator_address is given.
               Ctrl-C ends the ssh sessions, not necessarily the remote processes.

options (each also as '--flag VALUE'):
  --coordinator_address=HOST:PORT   process 0's address   (\$HYPERTUNE_COORDINATOR_ADDRESS)
  --process_count=N                 number of processes   (\$HYPERTUNE_PROCESS_COUNT)
  --process_index=I                 this process, 0..N-1  (\$HYPERTUNE_PROCESS_INDEX)
  --hosts=H1,H2,...                 ssh to every host     (\$HOSTS)
  --dry-run                         print the commands ('+ ' and the command, one a line)
                                    and run none
  -h, --help                        this text

environment (default):
  HYPERTUNE_PYTHON             the python command, may start with env VAR=... (python)
  HYPERTUNE_REMOTE_DIR         --hosts: the checkout on every host (this one: $REPO)
  HYPERTUNE_COORDINATOR_PORT   --hosts: the coordinator's port (8476)
  SSH                          --hosts: the ssh command (ssh)

examples (2 hosts of 8 GPUs; MODEL_DIR on a filesystem both hosts see):
  # on gpu1 and on gpu2 (--process_index=1 there):
  launch/multihost_gpu.sh --coordinator_address=gpu1:8476 --process_count=2 \\
    --process_index=0 train -- --gin_file=experiments/hypert5/sni_hypert5_prefix.gin ...
  # or both from one machine:
  HYPERTUNE_PYTHON=.venv/bin/python launch/multihost_gpu.sh --hosts=gpu1,gpu2 train -- \\
    --gin_file=experiments/hypert5/sni_hypert5_prefix.gin ...
EOF
}

# check_int NAME VALUE: VALUE is a non-negative integer.
check_int() {
  if [[ ! $2 =~ ^[0-9]+$ ]]; then
    die "--$1 needs a non-negative integer, got '$2'"
  fi
}

# prefix HOST: copies stdin to stdout, each line as `[HOST] line`.
prefix() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

# run_local BINARY ARGS...: this host's process.
run_local() {
  local binary=$1
  shift
  if [[ -z $COORDINATOR || -z $COUNT || -z $INDEX ]]; then
    die "missing --coordinator_address=HOST:PORT, --process_count=N or --process_index=I (or --hosts=H1,H2,...; see --help)"
  fi
  check_int process_count "$COUNT"
  check_int process_index "$INDEX"
  if ((COUNT < 1 || INDEX >= COUNT)); then
    die "--process_index=$INDEX must be below --process_count=$COUNT"
  fi
  local command=("${PYTHON[@]}" -m "hypertune.$binary" --multiprocess_gpu
    --coordinator_address="$COORDINATOR" --process_count="$COUNT" --process_index="$INDEX" "$@")
  show "${command[@]}"
  if ((!DRY_RUN)); then
    exec "${command[@]}"
  fi
}

# run_hosts BINARY ARGS...: every host's process over ssh, all at once.
run_hosts() {
  local binary=$1 hosts=() host i=0 remote
  shift
  IFS=, read -r -a hosts <<<"$HOST_LIST"
  for host in "${hosts[@]}"; do
    if [[ -z $host || $host == *[[:space:]]* ]]; then
      die "--hosts needs host names separated by commas, got '$HOST_LIST'"
    fi
  done
  if [[ -n $INDEX ]]; then
    die "--process_index is not for --hosts: host number I of the list is process I"
  fi
  if [[ -n $COUNT && $COUNT != "${#hosts[@]}" ]]; then
    die "--process_count=$COUNT but --hosts lists ${#hosts[@]} hosts"
  fi
  COORDINATOR=${COORDINATOR:-${hosts[0]#*@}:$PORT}
  local pids=()
  for host in "${hosts[@]}"; do
    remote="cd $(quote "$REMOTE_DIR") && $(quote_words "${PYTHON[@]}" -m "hypertune.$binary" \
      --multiprocess_gpu --coordinator_address="$COORDINATOR" --process_count="${#hosts[@]}" \
      --process_index="$i" "$@")"
    show "${SSH_COMMAND[@]}" "$host" "$remote"
    if ((!DRY_RUN)); then
      "${SSH_COMMAND[@]}" "$host" "$remote" </dev/null > >(prefix "$host") 2>&1 &
      pids+=("$!")
    fi
    i=$((i + 1))
  done
  local failed=0 status
  for i in "${!pids[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    if ((status != 0)); then
      note "process $i on ${hosts[$i]} failed (exit status $status)"
      failed=1
    fi
  done
  wait
  return "$failed"
}

main() {
  local name value
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --coordinator_address* | --process_count* | --process_index* | --hosts*)
        name=${1%%=*}
        if [[ $1 == *=* ]]; then
          value=${1#*=}
        elif [[ $# -gt 1 ]]; then
          value=$2
          shift
        else
          die "$name needs a value ($name=VALUE)"
        fi
        case $name in
          --coordinator_address) COORDINATOR=$value ;;
          --process_count) COUNT=$value ;;
          --process_index) INDEX=$value ;;
          --hosts) HOST_LIST=$value ;;
          *) die "unknown option '$1' (see --help)" ;;
        esac
        ;;
      -*) die "unknown option '$1' (see --help)" ;;
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
  if [[ -n $COORDINATOR && ! $COORDINATOR =~ ^.+:[0-9]+$ ]]; then
    die "--coordinator_address needs HOST:PORT, got '$COORDINATOR'"
  fi
  if [[ -n $COUNT ]]; then
    check_int process_count "$COUNT"
  fi
  if [[ -n $HOST_LIST ]]; then
    run_hosts "$binary" "$@"
  else
    run_local "$binary" "$@"
  fi
}

main "$@"
