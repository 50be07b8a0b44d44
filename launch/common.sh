# shellcheck shell=bash
# Sourced by the launchers in launch/: one-line errors, shell quoting, printed commands and
# --dry-run. The sourcing script sets PROG (its name, for messages) and DRY_RUN (0 or 1).

BINARIES="train, eval or infer"

# die MESSAGE: one `PROG: error: MESSAGE` line on stderr, exit status 2.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# note MESSAGE: one `PROG: MESSAGE` line on stderr.
note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# quote WORD: WORD as a POSIX shell reads it back: bare when it is made of safe characters,
# else in single quotes, else (it holds a ' but nothing a double quote expands) in double
# quotes, else in single quotes with each ' written '\''. A flag `--name=VALUE` keeps its
# `--name=` bare and quotes VALUE alone, as one types it (--gin.MODEL_DIR="'/runs/a'").
quote() {
  local word=$1 safe='^[A-Za-z0-9_./=:,@%+-]+$' flag='^(--?[A-Za-z0-9_.-]+=)(.*)$' escaped
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ $word =~ $flag ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  elif [[ $word != *"'"* ]]; then
    printf "'%s'" "$word"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    escaped=${word//\'/\'\\\'\'}
    printf "'%s'" "$escaped"
  fi
}

# quote_words WORD...: the words quoted and joined by spaces (one shell command line).
quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# show COMMAND...: prints `+ COMMAND` (quoted: the exact command, ready to paste), on stdout
# under --dry-run, else on stderr.
show() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
  fi
}

# run COMMAND...: shows COMMAND and runs it, unless --dry-run.
run() {
  show "$@"
  if ((!DRY_RUN)); then
    "$@"
  fi
}

# check_binary NAME: NAME is one of the binaries (`python -m hypertune.NAME`).
check_binary() {
  case $1 in
    train | eval | infer) ;;
    "") die "missing the binary: expected $BINARIES (see --help)" ;;
    *) die "unknown binary '$1': expected $BINARIES (see --help)" ;;
  esac
}
