"""A quiet console: our INFO lines (progress, checkpoints, evaluation), no third-party start-up
noise (TensorFlow's C++ lines, absl, orbax, gin INFO) unless `--verbosity=1`.

Import this before anything imports TensorFlow (seqio does): TensorFlow reads
TF_CPP_MIN_LOG_LEVEL once, when it loads.
"""
import contextlib
import logging
import os
import re
import sys
import tempfile

import gin

# `--verbosity=1` undoes it where the user did not set it (`setup_console`).
_TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# Third-party loggers kept at WARNING by default.
NOISY_LOGGERS = ("absl", "tensorflow", "orbax", "jax", "etils", "seqio", "h5py", "urllib3",
                 "huggingface_hub", "filelock", "fsspec")
# TensorFlow/XLA C++ log lines (absl, before its initialisation the time is seconds since the
# epoch: "I0000 00:00:1796161757.764268   23322 port.cc:153] ...";
# older TF: "2025-09-17 14:44:05.157831: I external/.../cudart_stub.cc:32] ...").
_CPP_LOG_LINE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|"
    r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |"
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] )")
_GIN_DIR = os.path.dirname(os.path.abspath(gin.__file__))


class _DropGinProbeErrors(logging.Filter):
  """gin's package-resource reader logs an ERROR for every search path it probes."""

  def filter(self, record):
    return not str(record.msg).startswith("Path not found")


class _DropLibraryInfo(logging.Filter):
  """gin logs every file it opens (`system_path_file_exists:...`) at INFO, on the root logger."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not record.pathname.startswith(_GIN_DIR)


logging.getLogger().addFilter(_DropGinProbeErrors())


def setup_console(verbosity: int = 0) -> None:
  """Our INFO lines (progress, checkpoints, evaluation) on stderr, without third-party INFO
  unless `verbosity` >= 1."""
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  handler = logging.getLogger().handlers[0]
  handler.addFilter(_DropGinProbeErrors())
  if verbosity >= 1:
    if not _TF_LOG_LEVEL_GIVEN and "tensorflow" not in sys.modules:
      os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    return
  for noisy in NOISY_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)
  handler.addFilter(_DropLibraryInfo())


@contextlib.contextmanager
def quiet_startup(verbosity: int = 0):
  """Drop the C++ log lines that TensorFlow writes while it loads.

  TensorFlow >= 2.19 writes them before absl's logging is initialised, whatever
  TF_CPP_MIN_LOG_LEVEL says, straight to file descriptor 2. So fd 2 goes to a temporary file
  while the libraries load, and every other line (Python warnings, our logging) is written
  back afterwards, in order. With `verbosity` >= 1 nothing is dropped.
  """
  if verbosity >= 1:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", errors="replace")
      sys.stderr.write("".join(line for line in text.splitlines(keepends=True)
                               if not _CPP_LOG_LINE.match(line)))
      sys.stderr.flush()
