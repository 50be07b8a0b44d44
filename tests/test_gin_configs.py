"""Every shipped gin file parses (no dangling reference), and bad configs fail clearly."""
import glob
import os
import subprocess
import sys

import gin
import pytest

from hypertune import command_line, gin_utils

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin")
FILES = sorted(os.path.relpath(p, GIN_DIR) for p in glob.glob(f"{GIN_DIR}/**/*.gin",
                                                              recursive=True))


@pytest.mark.parametrize("path", FILES)
def test_gin_file_parses_and_resolves(path):
  gin.clear_config()
  try:
    # Size/method fragments need a size; run fragments need a model: add the defaults.
    extra = []
    if path.startswith("models/") and not path.startswith("models/t5_"):
      extra = ["models/t5_tiny.gin"]
    if path.startswith("runs/") and path != "runs/train.gin":
      extra = ["models/t5_tiny.gin", "models/t5_mtf.gin", "runs/train.gin"]
    gin_utils.parse(extra + [path], ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'x'"])
    # Resolve every reference: this instantiates configured objects, catching dangling names.
    gin.config_str()
    for selector in ("train.model", "train.optimizer"):
      try:
        gin.query_parameter(selector)
      except ValueError:
        pass  # not bound by this file
  finally:
    gin.clear_config()


def test_shipped_files_found():
  assert "quickstart.gin" in FILES and "models/hypert5_prefix.gin" in FILES


def _run_train(*flags):
  return subprocess.run([sys.executable, "-m", "hypertune.train", *flags],
                        capture_output=True, text=True, timeout=300)


def test_unknown_binding_is_named():
  out = _run_train("--gin_file=models/t5_tiny.gin", "--gin.train.no_such_arg=3")
  assert out.returncode != 0
  assert "no_such_arg" in out.stderr and "Traceback" not in out.stderr


def test_missing_required_macro_is_named():
  out = _run_train("--gin_file=quickstart/1_downstream.gin")
  assert out.returncode != 0
  assert "MODEL_DIR" in out.stderr and "Traceback" not in out.stderr


def test_unknown_flag_is_rejected():
  with pytest.raises(gin_utils.GinConfigError, match="--bogus"):
    command_line.parse_flags(["--bogus=1"])
  assert command_line.parse_flags(["--gin_file=a.gin", "--gin.MODEL_DIR='/x'",
                                "--gin_search_paths=p,q"]) == (
                                    ["a.gin"], ["MODEL_DIR = '/x'"], ["p", "q"])
