#!/usr/bin/env bash
# One-GPU performance check: hypertune's train step (bench/t5_step.py), decoding
# (bench/generation.py) and amortisation (bench/amortisation.py) at t5-base and t5-large shapes
# in bfloat16, each printing its model FLOPs utilisation (MFU = achieved model FLOP/s / the
# device's peak). Under 8 minutes on one H100 / H200. `bench/gpu_check.sh --help` explains it.
set -euo pipefail

PROG=bench/gpu_check.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# H100 / H200 SXM: 989.4 TFLOP/s dense bfloat16 (NVIDIA's datasheets give 1979 with sparsity).
DEFAULT_PEAK_FLOPS=989e12
SIZES=(base large)
BENCHES=(t5_step generation amortisation)

usage() {
  cat <<EOF
usage: $PROG [--dry-run]

Runs, from the repository root, for each of ${SIZES[*]} (in that order):
  bench/t5_step.py       a full train step (forward, backward, AdamW), hypertune only
  bench/generation.py    greedy and 4-beam decoding, hypertune only
  bench/amortisation.py  n = 100, 1000 queries: concatenation against HyperT5-Prefix
all with --dtype bfloat16 --peak_flops \$PEAK_FLOPS, then prints every MFU line again.
Each command gets what is left of BUDGET_S (timeout); one that fails or runs out of time is
reported and the rest still run; the exit status is 1 if any did.

options:
  --dry-run     print the commands ('+ ' and the command) and run nothing
  -h, --help    this text

environment (default):
  PEAK_FLOPS         the device's peak dense bfloat16 FLOP/s ($DEFAULT_PEAK_FLOPS: H100 / H200 SXM)
  HYPERTUNE_PYTHON   the python that has hypertune and a GPU jax installed
                     (.venv/bin/python if it exists, else python3)
  BUDGET_S           wall-clock seconds for all of it (470)
  LOG_DIR            where each command's output is kept (a new directory under /tmp)
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# bench_args BENCH SIZE: the flags of one benchmark at one size (shapes sized for one GPU).
bench_args() {
  local common=(--size "$2" --dtype bfloat16 --peak_flops "$PEAK_FLOPS")
  case $1 in
    t5_step)
      echo "${common[*]} --skip_torch --batch 32 --inputs_len 512 --targets_len 128 --steps 10" \
        "--warmup 2 --repeats 2" ;;
    generation)
      echo "${common[*]} --skip_torch --batch 32 --inputs_len 512 --new_tokens 64" \
        "--num_beams 4 --repeats 1" ;;
    amortisation)
      # One batch shape (n = 100 and 10 x 100): three compiles; n = 100 is the issue's target.
      echo "${common[*]} --n 100,1000 --batch 100 --repeats 2" ;;
    *) die "unknown benchmark $1" ;;
  esac
}

main() {
  local dry_run=0
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dry-run) dry_run=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown argument '$1' (expected --dry-run or --help)" ;;
    esac
    shift
  done

  PEAK_FLOPS="${PEAK_FLOPS:-$DEFAULT_PEAK_FLOPS}"
  [[ $PEAK_FLOPS =~ ^[0-9]+([.][0-9]*)?([eE][+]?[0-9]+)?$ && ! $PEAK_FLOPS =~ ^[0.]+([eE]|$) ]] ||
    die "PEAK_FLOPS must be a positive number of FLOP/s such as 989e12, got '$PEAK_FLOPS'"
  local budget="${BUDGET_S:-470}"
  [[ $budget =~ ^[0-9]+$ ]] || die "BUDGET_S must be a whole number of seconds, got '$budget'"
  local python="${HYPERTUNE_PYTHON:-}"
  if [[ -z $python ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
  fi
  cd "$REPO"

  echo "assumed peak: $PEAK_FLOPS FLOP/s dense bfloat16 (PEAK_FLOPS; default" \
    "$DEFAULT_PEAK_FLOPS = H100 / H200 SXM); MFU = model FLOPs (hypertune.flops) / s / peak"
  local size bench args
  local -a cmds=()
  for size in "${SIZES[@]}"; do
    for bench in "${BENCHES[@]}"; do
      args=$(bench_args "$bench" "$size")
      cmds+=("$bench-$size|bench/$bench.py $args")
    done
  done

  if ((dry_run)); then
    local entry
    for entry in "${cmds[@]}"; do
      echo "+ $python ${entry#*|}"
    done
    return 0
  fi

  local logs="${LOG_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
  mkdir -p "$logs"
  "$python" -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind} ({d.platform}),",
    jax.device_count(), "device(s), jax", jax.__version__)
if d.platform != "gpu": raise SystemExit("bench/gpu_check.sh: jax sees no GPU")' ||
    die "no GPU for $python (HYPERTUNE_PYTHON)"
  echo "logs: $logs"

  local entry name left rc
  local -a failed=() argv
  for entry in "${cmds[@]}"; do
    name=${entry%%|*}
    read -r -a argv <<<"${entry#*|}"
    left=$((budget - SECONDS))
    if ((left < 30)); then
      echo "== $name: skipped, ${left}s of BUDGET_S=${budget}s left"
      failed+=("$name (skipped)")
      continue
    fi
    echo "== $name (${left}s left): $python ${argv[*]}"
    rc=0
    timeout "$left" "$python" "${argv[@]}" 2>&1 | tee "$logs/$name.log" || rc=$?
    if ((rc == 124)); then
      failed+=("$name (timed out)")
    elif ((rc != 0)); then
      failed+=("$name (exit $rc)")
    fi
  done

  echo
  echo "== MFU (peak $PEAK_FLOPS FLOP/s), ${SECONDS}s in all"
  for entry in "${cmds[@]}"; do
    name=${entry%%|*}
    if [[ -f $logs/$name.log ]]; then
      grep -E "MFU" "$logs/$name.log" | sed "s/^/$name: /" || echo "$name: no MFU line"
    fi
  done
  if ((${#failed[@]})); then
    echo "not completed: ${failed[*]}"
    return 1
  fi
}

main "$@"
