"""Per-task PEFT tuning (hypertune.peft_tune): each init starts where the papers say (hyper:
what HyperT5 generates from the task's 16 sampled training examples; shared: the multi-task
baseline's parameters; random: neither), tuning changes the PEFT parameters only, and the run
file runs end to end (JSON and PNG), over tiny runs of the quickstart's files trained here."""
import json
import os

import gin
import gin_training
import jax
import numpy as np
import pytest
from flax.core import meta

from hypertune import optimizers, partitioning, peft_tune, train_lib

# The run file this file runs (tests/test_gin_runs.py skips it).
RUNS = ["experiments/hypert5/builtin_peft_tune.gin"]
LENGTHS = {"hyper_inputs": 48, "inputs": 16, "targets": 8}
TINY = ["BATCH_SIZE = 2", "TRAIN_STEPS = 1", "EVAL_PERIOD = 0", "train.checkpoint_period = 1",
        "train.log_every_steps = 1", "optimizers.linear_warmup_decay.warmup_steps = 0",
        "config.t5_config.size = 'tiny'", "PREFIX_LEN = 2", "LORA_RANK = 2",
        "hypert5.HyperT5.num_hyper_decoder_layers = 1", "builtin.register_builtin_suite.k = 2",
        "builtin.register_builtin_suite.hyper_modes = ['hyper']",
        f"TASK_FEATURE_LENGTHS = {LENGTHS}", "INITIAL_CHECKPOINT_PATH = None"]
# The four runs the inits come from: one step each over the same random downstream T5 (SEED 0).
SOURCES = {
    "hyper_prefix": ["quickstart/2_hypert5.gin"],
    "hyper_lora": ["quickstart/2_hypert5.gin", "models/hypert5_lora.gin"],
    "shared_prefix": ["quickstart/2_hypert5.gin", "models/shared_prefix.gin",
                      "shared_peft.SharedPeft.prefix_len = 2"],
    "shared_lora": ["quickstart/2_hypert5.gin", "models/shared_lora.gin",
                    "shared_peft.SharedPeft.lora_rank = 2"],
}
KIND = peft_tune.SOURCE_KIND


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{name: run directory} of the four tiny runs, trained once for all pytest-xdist workers
  (the runs are only read afterwards)."""
  filelock = pytest.importorskip("filelock")
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders share this session's parent
    base = base.parent
  root = base / "peft_tune_sources"
  out = {name: str(root / name) for name in SOURCES}
  with filelock.FileLock(str(root) + ".lock"):
    if not (root / "done").exists():
      for name, spec in SOURCES.items():
        files = [s for s in spec if s.endswith(".gin")]
        extra = [s for s in spec if not s.endswith(".gin")]
        gin_training.train(files, TINY + extra + [f"MODEL_DIR = '{out[name]}'"])
      (root / "done").write_text("")
  return out


@pytest.fixture(scope="module")
def loaded(sources):
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  # The registration the runs trained with (another worker may have trained them).
  builtin.register_builtin_suite(k=2, hyper_modes=("hyper",), task_feature_lengths=LENGTHS)
  runs = {name: peft_tune.load_run(d) for name, d in sources.items()}
  task = common.mixture_tasks("builtin_heldout_label_words")[0]  # a classification task
  name, examples = peft_tune.register_tuning_task(task, "test", dict(LENGTHS, hyper_inputs=1))
  return runs, task, name, examples


def _fresh(model, seed=0):
  shapes = model.batch_shapes(2, dict(LENGTHS, hyper_inputs=1))
  return meta.unbox(jax.jit(lambda: model.init_variables(jax.random.key(seed), shapes))())[
      "params"]


def _generated(model, params):
  return model.task_parameters(params, {}, np.ones((1, 1), np.int32))


def _leaves(tree):
  """{path: numpy leaf} of any pytree (dicts, PeftParams)."""
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees(a, b, exact=True):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    if exact:
      np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    else:
      np.testing.assert_allclose(la[k], lb[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _differs(a, b):
  la, lb = _leaves(a), _leaves(b)
  return any(not np.array_equal(la[k], lb[k]) for k in la)


def test_hyper_tokens_are_16_of_the_tasks_training_examples(loaded):
  runs, task, _, examples = loaded
  tokens, used = peft_tune.hyper_tokens(task, examples, 16, seed=0)
  assert tokens.shape == (1, LENGTHS["hyper_inputs"]) and 1 <= used <= 16
  from hypertune.data import fewshot  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  # A held-out task is tuned on its demonstration pool: the 16 instances never evaluated.
  task_data = common.get_builder(task).task
  assert [e.demonstration() for e in examples] == fewshot.eval_pool(task_data)
  evaluated_ids = {e.id for e in task_data.splits["test"]}
  assert len(examples) == 16 and len(evaluated_ids) == 16
  text = bytes(int(t) - 3 for t in tokens[0] if t > 2).decode()  # ByteVocabulary: id - 3
  shown = [tuple(p.strip() for p in part.split("\x1f")) for part in text.split("\x1e")[1:]]
  assert len(shown) == used and set(shown) <= {e.demonstration() for e in examples}
  again, _ = peft_tune.hyper_tokens(task, examples, 16, seed=1)
  assert not np.array_equal(tokens, again)  # sampled per seed


@pytest.mark.parametrize("peft_type", list(peft_tune.PEFT_TYPES))
def test_each_init_starts_from_its_source(loaded, peft_type):
  runs, task, _, examples = loaded
  hyper, shared = runs[f"hyper_{KIND[peft_type]}"], runs[f"shared_{KIND[peft_type]}"]
  model = peft_tune.task_model(hyper.model.module.config, peft_type, 2, 2)
  fresh = _fresh(model)["hypernet"]
  tokens, _ = peft_tune.hyper_tokens(task, examples, 16, seed=0)
  init = {i: peft_tune.initial_hypernet(i, peft_type, fresh, {"hyper": hyper, "shared": shared,
                                                              "random": None}[i], tokens)
          for i in peft_tune.INITS}
  ours = {i: _generated(model, {"downstream": hyper.params["downstream"], "hypernet": p})
          for i, p in init.items()}
  # hyper: the per-task module generates what HyperT5 generates from the 16 examples.
  expected = hyper.model.task_parameters(hyper.params, {}, tokens)
  _assert_trees(ours["hyper"], expected, exact=peft_type != "prefix_mlp")
  if peft_type == "prefix_mlp":  # the same heads, the hyper decoder's states as embeddings
    _assert_trees({k: v for k, v in init["hyper"].items() if k.endswith("_head")},
                  {k: v for k, v in hyper.params["hypernet"].items() if k.endswith("_head")})
  # shared: the baseline's parameters themselves (Prefix-Flat: the prefixes they compute).
  if peft_type == "prefix_flat":
    _assert_trees(ours["shared"], _generated(shared.model, shared.params))
  else:
    _assert_trees(init["shared"], shared.params["hypernet"])
  # random: the module's own initialisation, neither of the others.
  _assert_trees(init["random"], fresh)
  assert _differs(init["random"], init["shared"]) and _differs(init["random"], init["hyper"])
  assert _differs(init["shared"], init["hyper"])


def test_a_run_with_another_prefix_length_is_refused(loaded):
  runs, task, _, examples = loaded
  hyper = runs["hyper_prefix"]
  model = peft_tune.task_model(hyper.model.module.config, "prefix_flat", 3, 2)
  tokens, _ = peft_tune.hyper_tokens(task, examples, 16, seed=0)
  with pytest.raises(ValueError, match="prefix_key.*prefix_len"):
    peft_tune.initial_hypernet("hyper", "prefix_flat", _fresh(model)["hypernet"], hyper, tokens)


# Prefix-MLP's tuning runs in test_run_file_runs_end_to_end.
@pytest.mark.parametrize("peft_type", ["prefix_flat", "lora"])
def test_tuning_changes_only_the_peft_parameters(loaded, peft_type):
  runs, task, name, examples = loaded
  hyper = runs[f"hyper_{KIND[peft_type]}"]
  model = peft_tune.task_model(hyper.model.module.config, peft_type, 2, 2)
  lengths = dict(LENGTHS, hyper_inputs=1)
  tx = optimizers.make_optimizer(optimizers.adamw(1e-2), ["hypernet/.*"], ["downstream/.*"])
  trainer = train_lib.PartitionedTrainer(
      model, tx, partitioning.make_mesh(), partitioning.standard_logical_axis_rules(),
      model.batch_shapes(2, lengths), trainable_patterns=["hypernet/.*"],
      frozen_patterns=["downstream/.*"])
  from hypertune.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  tokens, _ = peft_tune.hyper_tokens(task, examples, 16, seed=0)
  start = peft_tune.initial_hypernet("hyper", peft_type, _fresh(model)["hypernet"], hyper,
                                     tokens)
  params = {"downstream": peft_tune.jax_free_copy(hyper.params["downstream"]),
            "hypernet": peft_tune.jax_free_copy(start)}
  scores, final = peft_tune.tune(trainer, Evaluator(model, lengths, 4), params, name, "test",
                                 steps=2, eval_every=2, batch_size=2,
                                 task_feature_lengths=lengths, seed=0)
  final = partitioning.to_host(final)
  assert [s["step"] for s in scores] == [0, 2] and scores[0]["train_loss"] is None
  assert np.isfinite(scores[1]["train_loss"]) and 0 <= scores[1]["accuracy"] <= 100
  _assert_trees(final["downstream"], hyper.params["downstream"])  # bit for bit
  flat_start, flat_final = _leaves(start), _leaves(final["hypernet"])
  assert all(not np.array_equal(flat_start[k], flat_final[k]) for k in flat_start), [
      k for k in flat_start if np.array_equal(flat_start[k], flat_final[k])]


def test_run_file_runs_end_to_end(sources, tmp_path):
  out_dir = tmp_path / "tune"
  flags = [f"--gin_file={RUNS[0]}", f"--gin.MODEL_DIR='{out_dir}'"] + [
      f"--gin.{name.upper()}_DIR='{d}'" for name, d in sources.items()] + [
      f"--gin_bindings={b}" for b in [
          "builtin.register_builtin_suite.k = 2", f"TASK_FEATURE_LENGTHS = {LENGTHS}",
          "builtin.register_builtin_suite.hyper_modes = ['hyper']",
          "TRAIN_STEPS = 2", "EVAL_PERIOD = 2", "BATCH_SIZE = 2",
          "peft_tune.peft_tune.max_tasks = 1", "peft_tune.peft_tune.eval_batch_size = 4",
          # One PEFT type keeps it short: test_tuning_changes_only_the_peft_parameters tunes all.
          "peft_tune.peft_tune.peft_types = ['prefix_mlp']"]]
  try:
    result = peft_tune.main(flags)
  finally:
    gin.clear_config()
  data = json.loads((out_dir / peft_tune.RESULTS_FILE).read_text())
  assert data["summary"] == json.loads(json.dumps(result["summary"]))
  assert len(data["runs"]) == 3 and data["config"]["prefix_len"] == 2
  for peft_type in ["prefix_mlp"]:
    for init in peft_tune.INITS:
      curve = data["summary"][peft_type][init]
      assert curve["steps"] == [0, 2] and curve["runs"] == 1
      assert all(0 <= v <= 100 for v in curve["exact_match"])
  assert all((r["hyper_demonstrations"] or 0) >= 1 for r in data["runs"] if r["init"] == "hyper")
  png = (out_dir / peft_tune.PLOT_FILE).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_missing_run_directory_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"hyper_runs\['lora'\]"):
    peft_tune.peft_tune(model_dir=str(tmp_path), tasks="x", task_feature_lengths=LENGTHS,
                        peft_types=["lora"], inits=["hyper"], hyper_runs={"lora": None})
  with pytest.raises(FileNotFoundError, match="not a hypertune run directory"):
    peft_tune.peft_tune(model_dir=str(tmp_path), tasks="x", task_feature_lengths=LENGTHS,
                        peft_types=["lora"], inits=["shared"],
                        shared_runs={"lora": str(tmp_path)})
