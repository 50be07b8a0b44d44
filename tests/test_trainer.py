"""End-to-end training through gin on the built-in suite: resume, mesh, HyperT5, evaluation."""
import conftest
import json
import os
import shutil
import subprocess
import sys
import tempfile

import gin
import gin_training
import numpy as np
import pytest

TINY = ["config.t5_config.size = 'tiny'", "BATCH_SIZE = 8", "train.log_every_steps = 2",
        "optimizers.linear_warmup_decay.warmup_steps = 0", "EVAL_PERIOD = 0",
        "TASK_FEATURE_LENGTHS = {'hyper_inputs': 96, 'inputs': 24, 'targets': 12}"]


def run(stage_file, model_dir, *bindings):
  return gin_training.train([stage_file], TINY + [f"MODEL_DIR = '{model_dir}'", *bindings])


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


@pytest.fixture(scope="module")
def hyper_run(downstream_run, tmp_path_factory):
  """(run dir, train output, the classification task it evaluated)."""
  from tasks import common
  d, _ = downstream_run
  task = common.mixture_tasks("builtin_heldout_label_words")[0]  # registered by the first run
  h = str(tmp_path_factory.mktemp("hyper"))
  return h, run("quickstart/2_hypert5.gin", h, "TRAIN_STEPS = 3",
                f"INITIAL_CHECKPOINT_PATH = '{d}'", "PREFIX_LEN = 2",
                "hypert5.HyperT5.num_hyper_decoder_layers = 1", "EVAL_PERIOD = 3",
                f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'"), task


def test_hypert5_trains_over_frozen_downstream_and_evaluates(hyper_run):
  h, out, task = hyper_run
  assert len(out["losses"]) == 3 and np.all(np.isfinite(out["losses"]))
  acc = out["eval"][task]["accuracy"]
  assert 0.0 <= acc <= 100.0
  # quickstart.gin decodes classification tasks too (Evaluator.generate_classification).
  assert 0.0 <= out["eval"][task]["exact_match"] <= 100.0
  with open(os.path.join(h, "eval", "results_step3.json")) as f:
    assert json.load(f)["average"]["accuracy"] == acc
  # Every decoded query is written beside the metrics, and they score as reported.
  from hypertune import metrics  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  with open(os.path.join(h, "eval", "results_step3_predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert {r["task"] for r in rows} == {task}
  assert [r["inputs"] for r in rows] == [ex["inputs"] for ex in common.get_examples(task, "test")]
  assert metrics.exact_match([r["prediction"] for r in rows],
                             [r["references"] for r in rows]) == out["eval"][task]["exact_match"]


def test_evaluator_batches_of_several_tasks_equal_one_task_at_a_time(hyper_run):
  """Rows of several tasks share a batch, each with its own task's generated parameters:
  every metric equals evaluating the task alone (16 queries, batches of 12, 3 tasks)."""
  from hypertune import gin_utils, trainer  # pylint: disable=g-import-not-at-top
  from hypertune.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  h, _, _ = hyper_run
  tasks = common.mixture_tasks("builtin_heldout_families")[:3]

  def check(model, params, method_state, task_feature_lengths, **_):
    ev = Evaluator(model, task_feature_lengths, batch_size=12, generate_classification=True)
    together = ev.evaluate(params, tasks, "test", method_state)
    for task in tasks:
      assert ev.evaluate(params, [task], "test", method_state)[task] == together[task]
    return together

  gin.clear_config()
  try:
    gin_utils.parse([os.path.join(h, "config.gin")])
    together = trainer.train(restored_fn=check)
  finally:
    gin.clear_config()
  assert all(t in together for t in tasks)


def _binary(name, *flags):
  out = subprocess.run([sys.executable, "-m", f"hypertune.{name}", *flags], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_eval_binary_reproduces_the_in_training_evaluation(hyper_run):
  h, out, task = hyper_run
  _binary("eval", f"--gin.MODEL_DIR='{h}'")
  with open(os.path.join(h, "eval", f"{task}_test_step3.json")) as f:
    assert json.load(f)[task] == out["eval"][task]
  with open(os.path.join(h, "eval", "results_step3.json")) as f:  # the training-time file
    assert json.load(f)[task] == out["eval"][task]
  with open(os.path.join(h, "eval", f"{task}_test_step3_predictions.jsonl")) as f, \
       open(os.path.join(h, "eval", "results_step3_predictions.jsonl")) as g:
    assert f.read() == g.read()


def test_infer_writes_peft_files_and_applies_them(hyper_run, tmp_path):
  h, _, _ = hyper_run
  demos = tmp_path / "demos.json"
  demos.write_text(json.dumps({"demonstrations": [{"input": "apple", "target": "yes"},
                                                  {"input": "pear", "target": "no"}]}))
  peft_dir = tmp_path / "peft"
  _binary("infer", f"--gin.MODEL_DIR='{h}'", f"--gin.infer.demonstrations_file='{demos}'",
          f"--gin.infer.peft_dir='{peft_dir}'")
  meta = json.loads((peft_dir / "peft.json").read_text())
  assert meta["format"] == "hypertune-peft" and meta["demonstrations_used"] == 2
  assert meta["tensors"]["prefixes/encoder_self/key"] == [1, 2, 2, 4, 16]  # tiny T5, P=2
  queries = tmp_path / "queries.txt"
  queries.write_text("orange\nkiwi\nplum\n")
  out = _binary("infer", f"--gin.MODEL_DIR='{h}'", f"--gin.infer.peft_dir='{peft_dir}'",
                f"--gin.infer.inputs_file='{queries}'")
  lines = (peft_dir / "predictions.jsonl").read_text().splitlines()
  assert [json.loads(l)["input"] for l in lines] == ["orange", "kiwi", "plum"]
  assert "orange\t" in out.stdout


def test_infer_rejects_bad_demonstrations(hyper_run, tmp_path):
  h, _, _ = hyper_run
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"demonstrations": [{"input": "x"}]}))
  out = subprocess.run([sys.executable, "-m", "hypertune.infer", f"--gin.MODEL_DIR='{h}'",
                        f"--gin.infer.demonstrations_file='{bad}'",
                        f"--gin.infer.peft_dir='{tmp_path}'"], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode != 0 and "bad.json" in out.stderr and "'target'" in out.stderr
  assert "Traceback" not in out.stderr


MESH_SCRIPT = r"""
import json, sys, gin
from hypertune import gin_utils, trainer
gin_utils.parse(["quickstart/1_downstream.gin"], json.loads(sys.argv[1]))
print("LOSSES", json.dumps(trainer.train()["losses"]))
"""


def test_mesh_2x4_matches_one_device(downstream_run, tmp_path):
  _, full = downstream_run
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags_with_devices(8))
  bindings = TINY + [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 6",
                     "partitioning.make_mesh.num_partitions = 4"]
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(bindings)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES")][0]
  np.testing.assert_allclose(json.loads(line[len("LOSSES "):]), full["losses"], rtol=2e-4)


# -- multi-host data: each process reads its own shard ------------------------------------

def _register_sharding_mixture():
  import seqio
  from hypertune.data import fewshot
  from tasks import common
  rates = {}
  for t in ("p", "q"):
    train = [fewshot.TaskExample(f"{t}{i}", (f"{t}{i}", "o")) for i in range(8)]
    task = fewshot.TaskData(name=t, splits={"train": train}, instruction="Copy.",
                            eval_pool=[e.demonstration() for e in train])
    common.register_three_input_task(f"shardtest.{t}", task, fewshot.HyperConfig(k=1),
                                     seqio.ByteVocabulary())
    rates[f"shardtest.{t}"] = 8.0
  common.register_mixture("shardtest_mix", rates)
  return "shardtest_mix", {"hyper_inputs": 32, "inputs": 8, "targets": 8}


def _inputs(batches, n):
  import seqio
  v = seqio.ByteVocabulary()
  return [v.decode([t for t in row if t > 1]) for _ in range(n)
          for row in next(batches)["encoder_input_tokens"].tolist()]


def test_host_train_batches_one_process_is_the_unsharded_stream():
  from hypertune import partitioning, trainer
  from tasks import common
  name, lengths = _register_sharding_mixture()
  expected = list(common.get_batches(name, "train", 4, lengths, seed=3).take(5)
                  .as_numpy_iterator())
  got = trainer.host_train_batches(name, 4, lengths, data_seed=3,
                                   mesh=partitioning.make_mesh(), start_step=2)
  for want in expected[2:]:
    b = next(got)
    assert sorted(b) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(b[k], want[k])


def test_host_train_batches_give_each_data_shard_a_disjoint_part(monkeypatch):
  from hypertune import partitioning, trainer
  name, lengths = _register_sharding_mixture()
  mesh = partitioning.make_mesh()
  seen = []
  for index in (0, 1):
    monkeypatch.setattr(partitioning, "data_layout",
                        lambda _, index=index: partitioning.DataLayout(index, 2))
    batches = trainer.host_train_batches(name, 4, lengths, data_seed=0, mesh=mesh)
    assert next(batches)["encoder_input_tokens"].shape == (2, 8)  # batch_size // shards
    seen.append(set(_inputs(batches, 40)))
  # Every shard reads every other example of each task: disjoint, together all of them.
  assert seen[0] == {f"{t}{i}" for t in "pq" for i in range(0, 8, 2)}
  assert seen[1] == {f"{t}{i}" for t in "pq" for i in range(1, 8, 2)}
  with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 2 data shards"):
    trainer.host_train_batches(name, 5, lengths, data_seed=0, mesh=mesh)


def test_data_layout_groups_processes_by_their_data_positions():
  from hypertune import partitioning
  layout = partitioning._data_layout  # pylint: disable=protected-access
  # [data, model] grids of process indices, as make_mesh lays them out.
  two_by_two = np.array([[0, 0], [1, 1]])  # 2 processes x 2 devices, num_partitions=2
  assert [layout(two_by_two, 0, p) for p in (0, 1)] == [
      partitioning.DataLayout(0, 2), partitioning.DataLayout(1, 2)]
  one_by_four = np.array([[0, 0, 1, 1]])  # num_partitions=4: both need the same rows
  assert [layout(one_by_four, 0, p) for p in (0, 1)] == [partitioning.DataLayout(0, 1)] * 2
  # 4 processes x 2 devices, num_partitions=4: processes 0, 1 form shard 0; 2, 3 shard 1.
  pods = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
  assert [layout(pods, 0, p).shard_id for p in range(4)] == [0, 0, 1, 1]
  with pytest.raises(ValueError, match="contiguous block of the mesh's 'data' axis"):
    layout(np.array([[0], [1], [0], [1]]), 0, 0)
  with pytest.raises(ValueError, match="share part of a 'data' block"):
    layout(np.array([[0, 0], [0, 1], [1, 1]]), 0, 0)


def _run_two_processes(script, *args):
  """Runs tests/<script> as a 2-process jax.distributed CPU job (2 devices each); returns
  each process's last stdout line, parsed as JSON."""
  import socket
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  # A cold suite cache, so both processes write the built-in suite at once, as on a fresh
  # machine (a race there once crashed one process).
  cache = tempfile.mkdtemp(prefix="hypertune_cache_")
  procs = []
  for pid in range(2):
    env = dict(os.environ, HYPERTUNE_CACHE=cache, JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
               XLA_FLAGS=conftest.xla_flags_with_devices(2))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(repo, "tests", script), *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    # Both processes are waited for before any is judged: the second may still be finishing
    # when the first exits, and killing it then would fail a run that succeeded.
    outputs = [p.communicate(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    shutil.rmtree(cache, ignore_errors=True)
  # Every failed process's error is shown: the cause is often in the one that failed first,
  # while the other only reports waiting for it.
  failed = [f"process {i} (exit {p.returncode}):\n{stderr[-3000:]}"
            for i, (p, (_, stderr)) in enumerate(zip(procs, outputs)) if p.returncode != 0]
  assert not failed, "\n\n".join(failed)
  return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


def test_two_processes_train_evaluate_and_one_writes_the_files(tmp_path):
  """Training and evaluation on a (1, 4) mesh over two processes (parameters split across
  them; the (2, 2) case of per-process data shards is test_two_processes_assemble_...): both
  agree, process 0 writes the run files, and arrays split across processes are gathered
  (`to_host`)."""
  results = _run_two_processes("multihost_train_check.py", str(tmp_path), "4")
  assert [r["process_index"] for r in results] == [0, 1]
  assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 3
  assert np.all(np.isfinite(results[0]["losses"]))
  assert results[0]["eval"] == results[1]["eval"]
  task = results[0]["task"]
  with open(tmp_path / "eval" / "results_step3.json") as f:
    assert json.load(f)[task] == results[0]["eval"][task]
  assert (tmp_path / "config.gin").exists()
  assert results[0]["gathered"] == results[1]["gathered"] == list(range(8))


def test_two_processes_assemble_global_batches_from_their_shards():
  """2 processes x 2 devices: on a (4, 1) mesh each process loads its own half of every
  batch; on a (1, 4) mesh (num_partitions=4) both load the same, whole batch."""
  results = _run_two_processes("multihost_data_check.py")
  assert [r["process_index"] for r in results] == [0, 1]
  assert all(r["process_count"] == 2 for r in results)
  import seqio
  v = seqio.ByteVocabulary()
  split = [r["meshes"]["1"] for r in results]
  assert split[0]["mesh_data"] == 4
  seen = [set(), set()]
  for b0, b1 in zip(split[0]["batches"], split[1]["batches"]):
    assert len(b0["local"]) == len(b1["local"]) == 2  # global batch 4 over 2 data shards
    # The global array is every shard's rows in shard order, seen alike by both.
    assert b0["global_shape"] == [4, 8] and b0["global"] == b1["global"] == b0["local"] + b1["local"]
    assert b0["global_sum"] == b1["global_sum"] == int(np.sum(b0["global"]))
    for i, b in enumerate((b0, b1)):
      seen[i] |= {v.decode([t for t in row if t > 1]) for row in b["local"]}
  assert seen[0] and seen[1]
  assert seen[0] <= {f"tr{i}" for i in range(0, 12, 2)}
  assert seen[1] <= {f"tr{i}" for i in range(1, 12, 2)}
  same = [r["meshes"]["4"] for r in results]
  assert same[0]["mesh_data"] == 1
  for b0, b1 in zip(same[0]["batches"], same[1]["batches"]):
    assert len(b0["local"]) == 4 and b0["local"] == b1["local"]  # one shard: the same rows
    assert b0["global_shape"] == [4, 8] and b0["global"] == b1["global"] == b0["local"]
    assert b0["global_sum"] == b1["global_sum"] == int(np.sum(b0["global"]))
  # The unsharded stream: both the even and the odd examples.
  got = {v.decode([t for t in row if t > 1]) for b in same[0]["batches"] for row in b["local"]}
  assert any(int(x[2:]) % 2 == 0 for x in got) and any(int(x[2:]) % 2 for x in got)
