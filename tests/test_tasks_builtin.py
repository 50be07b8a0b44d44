"""Tests of the built-in meta-learning suite (generator + seqio registry)."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest
import seqio

from hypertune.data import builtin_suite
from hypertune import metrics
from hypertune.data import eval_batches
from hypertune.data import sni
from tasks import builtin
from tasks import common

SMALL = builtin_suite.SuiteConfig(
    tasks_per_transform=2, tasks_per_composition=1, num_train_compositions=4,
    num_heldout_compositions=2, tasks_per_rule=2, heldout_tasks_per_family=1,
    heldout_label_word_tasks_per_rule=1, train_instances=30, transform_train_instances=40,
    heldout_instances=10, heldout_demo_pool=8)


@pytest.fixture(scope="module")
def suite():
  return builtin_suite.generate_suite(seed=0)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("builtin") / "suite")
  # inputs as long as a concatenation run's: its 4 demonstrations fit before the query.
  mixtures = builtin.register_builtin_suite(
      data_dir=d, seed=0, config=SMALL, k=4, num_validation=5,
      task_feature_lengths=builtin.SUGGESTED_CONCAT_TASK_FEATURE_LENGTHS | {"hyper_inputs": 256})
  return d, mixtures


def _family(task):
  return task["hypertune_params"]["family"]


def test_generation_is_deterministic():
  a = builtin_suite.generate_suite(seed=3, config=SMALL)
  assert a == builtin_suite.generate_suite(seed=3, config=SMALL)
  assert a != builtin_suite.generate_suite(seed=4, config=SMALL)


def test_heldout_never_in_training(suite):
  tasks, splits = suite["tasks"], suite["splits"]
  train_families = {_family(tasks[n]) for n in splits["train"]}
  for n in splits["heldout_families"]:
    assert _family(tasks[n]) not in train_families, n
  comp_train = {f for f in train_families if "+" in f}
  comp_heldout = {_family(tasks[n]) for n in splits["heldout_compositions"]}
  assert comp_heldout and not comp_heldout & comp_train
  # Compositions are made of training primitives only.
  prims = {t.name for t in builtin_suite.TRAIN_TRANSFORMS}
  assert all(set(f.split("+")) <= prims for f in comp_heldout)
  train_words = {w for n in splits["train"] for w in tasks[n].get("hypertune_answer_choices", [])}
  for n in splits["heldout_label_words"]:
    words = set(tasks[n]["hypertune_answer_choices"])
    assert words and not words & train_words
    assert _family(tasks[n]) in train_families  # seen rule, unseen words
  all_heldout = [n for s in builtin_suite.HELDOUT_SUBSETS for n in splits[s]]
  assert not set(all_heldout) & set(splits["train"])
  assert len(splits["train"]) >= 90 and len(all_heldout) >= 30


def test_composition_split_is_the_same_for_every_seed(suite):
  """A seed draws parameters, not the split: new tasks of the training families (seed 1)
  are tasks of the same compositions. (Drawn per seed, seed 1's "training" compositions
  included `double_then_uppercase`, held out at seed 0.)"""
  def compositions(s, split):
    return {_family(s["tasks"][n]) for n in s["splits"][split] if "+" in _family(s["tasks"][n])}
  other = builtin_suite.generate_suite(seed=1)
  for split, pairs in (("train", builtin_suite.TRAIN_COMPOSITIONS),
                       ("heldout_compositions", builtin_suite.HELDOUT_COMPOSITIONS)):
    assert compositions(suite, split) == compositions(other, split) == {
        f"{a}+{b}" for a, b in pairs}
  # Each part of a held-out composition is seen in the same position in a training one.
  for a, b in builtin_suite.HELDOUT_COMPOSITIONS:
    assert a in {x for x, _ in builtin_suite.TRAIN_COMPOSITIONS}, a
    assert b in {y for _, y in builtin_suite.TRAIN_COMPOSITIONS}, b


def test_tasks_need_demonstrations(suite):
  """Tasks of one family disagree on some input: only demos tell which task it is."""
  tasks = suite["tasks"]
  by_family = collections.defaultdict(list)
  for name in suite["splits"]["train"]:
    by_family[_family(tasks[name])].append(tasks[name])
  param_free = {"reverse", "double", "uppercase", "sort"}
  for family, ts in by_family.items():
    params = {json.dumps(t["hypertune_params"], sort_keys=True) for t in ts}
    if len(params) < min(len(ts), 2):
      # Identical tasks only for parameter-free transforms (and their compositions),
      # which the model must still recognise from the demos (no instruction is given).
      assert set(family.split("+")) <= param_free, family
  # Label words differ between tasks of a rule: majority-word guessing fails.
  rule_words = [tuple(t["hypertune_answer_choices"]) for ts in by_family.values() for t in ts
                if "hypertune_answer_choices" in t]
  assert len(set(rule_words)) > len(rule_words) // 2


def test_strings_are_short_and_classes_balanced(suite):
  for name, t in suite["tasks"].items():
    for inst in t["Instances"]:
      single = _family(t) in {r.name for r in builtin_suite.TRAIN_RULES if r.single_letter}
      assert (len(inst["input"]) == 1) if single else (3 <= len(inst["input"]) <= 5), name
      assert 1 <= len(inst["output"][0]) <= 12, (name, inst)  # fits targets=16
    if "hypertune_answer_choices" in t:
      counts = collections.Counter(i["output"][0] for i in t["Instances"])
      assert min(counts.values()) >= 0.3 * sum(counts.values()), (name, counts)


def test_transformation_tasks_get_many_training_strings():
  """Transformations and compositions have transform_train_instances training strings (all
  distinct, so copying cannot be replaced by memorising them), classification tasks
  train_instances; held-out tasks are sized by heldout_instances either way."""
  suite = builtin_suite.generate_suite(seed=0, config=SMALL)
  for name in suite["splits"]["train"]:
    t = suite["tasks"][name]
    inputs = [i["input"] for i in t["Instances"]]  # the two positive examples come on top
    is_rule = "hypertune_answer_choices" in t
    assert len(inputs) == (SMALL.train_instances if is_rule else
                           SMALL.transform_train_instances), name
    if not is_rule:
      assert len(set(inputs)) == len(inputs), name
  n_heldout = SMALL.heldout_instances + SMALL.heldout_demo_pool
  for name in suite["splits"]["heldout_compositions"]:
    assert len(suite["tasks"][name]["Instances"]) == n_heldout, name


def test_default_suite_has_many_tasks_per_transformation_family(suite):
  """Since suite version 7: 40 tasks per transformation family (1,600 strings), each with its own
  parameter where the family has enough of them. With 8 tasks a model remembered the 8
  endings of `append` (94% EM on new queries of seen tasks, 3% on new tasks)."""
  config = builtin_suite.SuiteConfig()  # the `suite` fixture's
  params = collections.defaultdict(list)
  for name in suite["splits"]["train"]:
    t = suite["tasks"][name]
    if "hypertune_answer_choices" not in t:
      params[_family(t)].append(t["hypertune_params"]["params"])
  for t in builtin_suite.TRAIN_TRANSFORMS:
    assert len(params[t.name]) == config.tasks_per_transform >= 40, t.name
    assert len(params[t.name]) * config.transform_train_instances >= 1600, t.name
  assert len(set(params["append"])) == len(params["append"])  # an ending per task
  compositions = [f for f in params if "+" in f]
  assert compositions and all(len(params[f]) == config.tasks_per_composition >= 10
                              for f in compositions)


def test_letter_parameter_families_use_three_letters(suite):
  """`contains` and `remove_letter` draw their strings from 3 letters, so that the
  demonstrations usually show the hidden letter: one demonstration per class determines the
  `contains` letter for 70% of queries (6 letters: 28%), and two demonstrations the removed
  letter for 98% (6 letters: 79%)."""
  for family in ("contains", "remove_letter"):
    tasks = [t for t in suite["tasks"].values() if _family(t) == family]
    assert tasks, family
    for t in tasks:
      letters = {c for inst in t["Instances"] for c in inst["input"]}
      assert len(letters) <= 3 and t["hypertune_params"]["params"][-1] in letters, letters


def test_written_files_follow_sni_schema(registered):
  d, _ = registered
  layout = sni.find_layout(d)
  assert layout.train_tasks and layout.test_tasks
  assert set(layout.extra_lists) == set(builtin_suite.HELDOUT_SUBSETS) | {"train_sample"}
  assert layout.extra_lists["train_sample"] == layout.train_tasks[::builtin_suite.SuiteConfig().train_sample_every]
  for name in layout.train_tasks[:5] + layout.test_tasks[:5]:
    raw = sni.load_task_file(layout.task_files[name])
    assert sni.is_english(raw) and len(raw["Positive Examples"]) == 2


def test_write_reuses_cache_and_refuses_foreign_dir(tmp_path, monkeypatch):
  d = str(tmp_path / "s")
  builtin_suite.write_suite(d, seed=1, config=SMALL)
  mtime = os.path.getmtime(os.path.join(d, "MANIFEST.json"))
  builtin_suite.write_suite(d, seed=1, config=SMALL)
  assert os.path.getmtime(os.path.join(d, "MANIFEST.json")) == mtime
  builtin_suite.write_suite(d, seed=2, config=SMALL)  # stale suite: replaced
  assert json.load(open(os.path.join(d, "MANIFEST.json")))["seed"] == 2
  # Written by an edited generator (same version, seed and sizes): replaced as well.
  (tmp_path / "s" / "tasks" / "marker.json").write_text("{}")
  monkeypatch.setattr(builtin_suite, "_generator_digest", lambda: "edited")
  builtin_suite.write_suite(d, seed=2, config=SMALL)
  assert json.load(open(os.path.join(d, "MANIFEST.json")))["generator"] == "edited"
  assert not (tmp_path / "s" / "tasks" / "marker.json").exists()
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="refusing"):
    builtin_suite.write_suite(str(tmp_path / "mine"), seed=0, config=SMALL)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_concurrent_writer_keeps_the_suite_another_process_wrote(tmp_path, monkeypatch):
  """Two processes (test workers, hosts of one job) write the same suite at once: the
  one that finishes second must not move the first one's directory away, which the first
  may be reading already (this failed the 2-process training test on a cold cache)."""
  d = str(tmp_path / "s")
  generate = builtin_suite.generate_suite

  def generate_while_another_process_writes(seed, config):
    monkeypatch.setattr(builtin_suite, "generate_suite", generate)
    builtin_suite.write_suite(d, seed=seed, config=config)  # the other process wins...
    open(os.path.join(d, "being_read"), "w").close()  # ...and is reading its directory
    return generate(seed, config)

  monkeypatch.setattr(builtin_suite, "generate_suite", generate_while_another_process_writes)
  assert builtin_suite.write_suite(d, seed=1, config=SMALL) == d
  assert os.path.exists(os.path.join(d, "being_read")), "the other process's directory was replaced"
  assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary directory left behind


def test_suite_sizes_come_from_gin(tmp_path):
  """`SuiteConfig.<size> = ...` in a gin file sizes the suite register_builtin_suite writes."""
  import gin  # pylint: disable=g-import-not-at-top
  sizes = dataclasses.asdict(SMALL)  # a new dict
  sizes["tasks_per_rule"] = 1
  gin.parse_config([f"hypertune.data.builtin_suite.SuiteConfig.{k} = {v}"
                    for k, v in sizes.items()])
  try:
    d = str(tmp_path / "suite")
    mixtures = builtin.register_builtin_suite(data_dir=d, hyper_modes=("none",),
                                              num_validation=5, prefix="gin_sized")
    # Called directly, the writer reads the same binding (not an import-time default): it
    # finds its suite in place instead of replacing it with a default-sized one.
    assert builtin_suite.write_suite(d) == d
  finally:
    gin.clear_config()
  with open(os.path.join(d, "MANIFEST.json")) as f:
    assert json.load(f)["config"] == json.loads(json.dumps(sizes))  # tuples as lists
  # 4 transforms x 2 + 4 compositions x 1 + 4 rule-tasks (weights 3+1) x 1
  assert len(mixtures["gin_sized_zeroshot_train"]) == 8 + 4 + 4
  assert builtin_suite.SuiteConfig() == builtin_suite.SuiteConfig(tasks_per_rule=60)


def test_registered_names(registered):
  _, mixtures = registered
  for prefix in ("builtin", "builtin_concat", "builtin_zeroshot"):
    for m in ("train", "heldout", "heldout_families", "heldout_compositions",
              "heldout_label_words", "train_sample"):
      assert f"{prefix}_{m}" in mixtures, f"{prefix}_{m}"
  assert set(common.mixture_tasks("builtin_heldout")) == set(
      mixtures["builtin_heldout_families"] + mixtures["builtin_heldout_compositions"]
      + mixtures["builtin_heldout_label_words"])
  assert not set(mixtures["builtin_train"]) & set(mixtures["builtin_heldout"])
  assert "builtin.task001_first_n" in mixtures["builtin_train"]


def test_three_input_variants(registered):
  _, mixtures = registered
  name = mixtures["builtin_heldout"][0]
  base = name.split(".", 1)[1]
  hyper = common.get_examples(name, "test")
  concat = common.get_examples(f"builtin_concat.{base}", "test")
  zero = common.get_examples(f"builtin_zeroshot.{base}", "test")
  assert len(hyper) == SMALL.heldout_instances
  x, y = "\x1e", "\x1f"
  assert hyper[0]["hyper_inputs"].count(x) == 4 and hyper[0]["hyper_inputs"].startswith(x)
  assert len({e["hyper_inputs"] for e in hyper}) == 1  # fixed eval demos
  assert concat[0]["inputs"] == f"{hyper[0]['hyper_inputs']} {x} {hyper[0]['inputs']} {y}"
  assert concat[0]["hyper_inputs"] == "" and zero[0]["hyper_inputs"] == ""
  assert zero[0]["inputs"] == hyper[0]["inputs"]
  # Fixed eval demos come from the held-out pool, never from evaluated instances.
  evaluated = {e["inputs"] for e in hyper}
  demos = common.get_eval_demonstrations(name)
  assert len(demos) == 4 and not {d[0] for d in demos} & evaluated
  # Training split: demos sampled per example, never the example itself.
  tr = common.get_examples("builtin.task001_first_n", "train")
  for e in tr:
    assert f"{x} {e['inputs']} {y}" not in e["hyper_inputs"]
  assert len(common.get_examples("builtin.task001_first_n", "validation")) == 5


def test_batches_through_converter(registered):
  ds = common.get_batches("builtin_train", "train", 8, builtin.SUGGESTED_TASK_FEATURE_LENGTHS)
  b = next(ds.as_numpy_iterator())
  assert b["hyper_encoder_input_tokens"].shape == (8, 256)
  assert b["encoder_input_tokens"].shape == (8, 32)
  assert b["decoder_target_tokens"].shape == (8, 16)
  assert (b["decoder_input_tokens"][:, 0] == 0).all()
  np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:], b["decoder_target_tokens"][:, :-1])
  # Byte-level strings are short: nothing but padding past 32 hyper tokens per demo.
  assert (b["encoder_input_tokens"] == 1).sum() == 8  # one EOS each, none trimmed away
  ds = common.get_batches("builtin_concat_heldout", "test", 4,
                          builtin.SUGGESTED_CONCAT_TASK_FEATURE_LENGTHS, shuffle=False,
                          num_epochs=1)
  b = next(ds.as_numpy_iterator())
  assert b["encoder_input_tokens"].shape == (4, 288)
  assert (b["hyper_encoder_input_tokens"] == np.array([[1]])).all()  # empty hyper: EOS


def test_rank_classification_on_heldout_label_words(registered):
  _, mixtures = registered
  name = mixtures["builtin_heldout_label_words"][0]
  task = seqio.get_mixture_or_task(name)
  batches = list(eval_batches.get_eval_batches(
      [task], "test", 16, builtin.SUGGESTED_TASK_FEATURE_LENGTHS,
      score_choices=True).as_numpy_iterator())
  ids = np.concatenate([b["example_id"] for b in batches])
  assert len(ids) == 2 * SMALL.heldout_instances
  choice = np.concatenate([b["choice_index"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  # Zero-shot "always choice 0" scorer is near chance on balanced classes.
  acc = metrics.rank_classification_accuracy(-choice.astype(float), ids, choice, labels)
  assert 20 <= acc <= 80


def _epoch(name, split="train", epochs=1):
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split, shuffle=False, num_epochs=epochs)
  return [(ex["task_name"].decode(), ex["hyper_inputs_pretokenized"].decode())
          for ex in ds.as_numpy_iterator()]


def test_merged_training_mixture_is_examples_proportional(registered):
  """builtin_train is one seqio Task streaming all training tasks (register_merged_task):
  one epoch holds every task's examples once, shuffled together."""
  _, mixtures = registered
  rates = common.mixture_rates("builtin_train")
  assert sorted(rates) == sorted(mixtures["builtin_train"])
  counts = collections.Counter(t for t, _ in _epoch("builtin_train"))
  assert counts == {t.split(".", 1)[1]: int(r) for t, r in rates.items()}
  order = [t for t, _ in _epoch("builtin_train")]
  assert order[:len(rates)] != sorted(order[:len(rates)])  # mixed, not task by task


def test_training_epochs_draw_fresh_demonstrations(registered):
  """seqio caches small sources in memory before repeat(); ours must not be, or every epoch
  would replay epoch 0's demonstrations."""
  _, mixtures = registered
  name = mixtures["builtin_train"][0]
  two = _epoch(name, epochs=2)
  first, second = two[:len(two) // 2], two[len(two) // 2:]
  assert name.endswith("_first_n")  # a transformation task
  assert len(first) == SMALL.transform_train_instances - 5  # minus the validation instances
  assert first != second


def test_train_families_restricts_training_and_keeps_held_out(tmp_path):
  """SuiteConfig.train_families studies one family alone: the same tasks as in the full
  suite, nothing else in training, the held-out subsets unchanged; with relabel_train and
  balanced_demos each training example shows one demonstration per class, in fresh words."""
  only = dataclasses.replace(SMALL, train_families=("letter_word",))
  full, lw = builtin_suite.generate_suite(0, SMALL), builtin_suite.generate_suite(0, only)
  assert lw["splits"]["train"] and all(
      _family(lw["tasks"][n]) == "letter_word" for n in lw["splits"]["train"])
  # Task names (and so instance ids) are renumbered; the contents are the same.
  content = lambda task: [(i["input"], i["output"]) for i in task["Instances"]]
  instances = lambda s, split: sorted(content(s["tasks"][n]) for n in s["splits"][split])
  assert instances(lw, "train") == sorted(
      content(full["tasks"][n]) for n in full["splits"]["train"]
      if _family(full["tasks"][n]) == "letter_word")
  for subset in builtin_suite.HELDOUT_SUBSETS:
    assert instances(lw, subset) == instances(full, subset)
  mixtures = builtin.register_builtin_suite(
      data_dir=str(tmp_path / "s"), config=only, k=2, hyper_modes=("concat",),
      num_validation=5, prefix="lw_only", balanced_demos=True, relabel_train=True)
  assert json.load(open(tmp_path / "s" / "MANIFEST.json"))["config"]["train_families"] == ["letter_word"]
  for name in mixtures["lw_only_concat_train"]:
    source = common.get_builder(name).task
    for ex in list(common.get_builder(name).examples("train"))[:5]:
      words = [w for w in ex["inputs"].split() if w in builtin_suite.TRAIN_LABEL_WORDS]
      assert sorted(words) == sorted(ex["answer_choices"])  # one demonstration per class
      assert ex["targets"] in builtin_suite.TRAIN_LABEL_WORDS
    held_choices = {tuple(e["answer_choices"]) for e in common.get_builder(name).examples("validation")}
    assert held_choices == {source.splits["validation"][0].answer_choices}


def test_relabel_train_permutes_the_letters_of_transformation_examples(tmp_path):
  """relabel_train: every training example of an `append` task shows its own ending (a
  fresh letter permutation), in its demonstrations and target alike; validation keeps the
  task's ending, so a model has to read it off the demonstrations."""
  only = dataclasses.replace(SMALL, train_families=("append",))
  mixtures = builtin.register_builtin_suite(
      data_dir=str(tmp_path / "s"), config=only, k=2, hyper_modes=("concat",),
      num_validation=2, prefix="append_only", relabel_train=True)
  for name in mixtures["append_only_concat_train"]:
    builder = common.get_builder(name)
    held = builder.task.splits["validation"][0]
    suffix = held.outputs[0][len(held.inputs):]
    endings = set()
    for ex in builder.examples("train"):
      *demos, query = [part.strip() for part in ex["inputs"].split("\x1e")[1:]]
      ending = ex["targets"][len(query):]
      assert ex["targets"] == query + ending and len(ending) == len(suffix)
      for demo in demos:
        x, y = [s.strip() for s in demo.split("\x1f")]
        assert y == x + ending
      endings.add(ending)
    assert len(endings) > 1
    assert all(ex["targets"].endswith(suffix) for ex in builder.examples("validation"))
