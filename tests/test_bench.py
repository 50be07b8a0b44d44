"""The train-step benchmark runs at tiny size, through the model contract, and its hypertune
and PyTorch steps compute the same first loss (the check every benchmark run prints)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_t5_step_benchmark_at_tiny_size():
  pytest.importorskip("transformers")
  out = subprocess.run(
      [sys.executable, "bench/t5_step.py", "--size", "tiny", "--batch", "2", "--inputs_len",
       "16", "--targets_len", "8", "--vocab", "384", "--steps", "2", "--warmup", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  diff = float(re.search(r"\|diff\| ([0-9.e+-]+)", out.stdout).group(1))
  assert diff < 1e-4 and "ratio hypertune/pytorch" in out.stdout
