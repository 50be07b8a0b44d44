"""End-to-end training through gin on the built-in suite: resume, mesh, HyperT5, evaluation."""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from hypertune import gin_utils

TINY = ["config.t5_config.size = 'tiny'", "BATCH_SIZE = 8", "train.log_every_steps = 2",
        "optimizers.linear_warmup_decay.warmup_steps = 0", "EVAL_PERIOD = 0",
        "TASK_FEATURE_LENGTHS = {'hyper_inputs': 96, 'inputs': 24, 'targets': 12}"]


def run(stage_file, model_dir, *bindings):
  from hypertune import trainer
  gin.clear_config()
  gin_utils.parse([stage_file], TINY + [f"MODEL_DIR = '{model_dir}'", *bindings])
  try:
    return trainer.train()
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def downstream_run(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("downstream"))
  return d, run("quickstart/1_downstream.gin", d, "TRAIN_STEPS = 6", "train.checkpoint_period = 3")


def test_training_reduces_loss_and_checkpoints(downstream_run):
  d, out = downstream_run
  assert len(out["losses"]) == 6 and out["losses"][-1] < out["losses"][0]
  assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == ["3", "6"]
  assert os.path.exists(os.path.join(d, "config.gin"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(d, "train")))


def test_resume_continues_with_the_same_losses(downstream_run, tmp_path):
  _, full = downstream_run
  d = str(tmp_path)
  first = run("quickstart/1_downstream.gin", d, "TRAIN_STEPS = 6", "train.checkpoint_period = 3",
              "train.stop_after_steps = 3")
  second = run("quickstart/1_downstream.gin", d, "TRAIN_STEPS = 6", "train.checkpoint_period = 3")
  assert len(first["losses"]) == 3 and len(second["losses"]) == 3
  np.testing.assert_allclose(first["losses"] + second["losses"], full["losses"], rtol=1e-5)


def test_hypert5_trains_over_frozen_downstream_and_evaluates(downstream_run, tmp_path):
  d, _ = downstream_run
  out = run("quickstart/2_hypert5.gin", str(tmp_path), "TRAIN_STEPS = 3",
            f"INITIAL_CHECKPOINT_PATH = '{d}'", "PREFIX_LEN = 2",
            "hypert5.HyperT5.num_hyper_decoder_layers = 1", "EVAL_PERIOD = 3",
            "EVAL_MIXTURE_OR_TASK_NAME = 'builtin.task112_starts_vowel'")
  assert len(out["losses"]) == 3 and np.all(np.isfinite(out["losses"]))
  acc = out["eval"]["builtin.task112_starts_vowel"]["accuracy"]
  assert 0.0 <= acc <= 100.0
  with open(os.path.join(tmp_path, "eval", "results_step3.json")) as f:
    assert json.load(f)["average"]["accuracy"] == acc
  # Frozen downstream parameters are not re-saved: only the hypernetwork is in the checkpoint.
  state_dir = os.path.join(tmp_path, "checkpoints", "3", "state")
  assert os.path.isdir(state_dir)


MESH_SCRIPT = r"""
import json, sys, gin
from hypertune import gin_utils, trainer
gin_utils.parse(["quickstart/1_downstream.gin"], json.loads(sys.argv[1]))
print("LOSSES", json.dumps(trainer.train()["losses"]))
"""


def test_mesh_2x4_matches_one_device(downstream_run, tmp_path):
  _, full = downstream_run
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  bindings = TINY + [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 6",
                     "partitioning.make_mesh.num_partitions = 4"]
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(bindings)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES")][0]
  np.testing.assert_allclose(json.loads(line[len("LOSSES "):]), full["losses"], rtol=2e-4)
