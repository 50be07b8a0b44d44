"""Tests of MetaICL, symbol tuning and the hyperpretraining objectives."""

import collections
import json
import os
import random
import tempfile

import pytest
import seqio
from test_tasks_sni import SPM, clean_gin, needs_spm, register_from_gin  # pylint: disable=unused-import

from hypertune.data import fewshot
from hypertune.data import formatting
from hypertune.data import metaicl
from hypertune.data import pretraining
from hypertune.data import symbol_tuning
from tasks import common
from tasks import metaicl as metaicl_tasks
from tasks import pretraining as pretraining_tasks
from tasks import symbol_tuning as symbol_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METAICL_DIR = os.path.join(REPO, "..", "shared", "data", "metaicl")
X, Y = formatting.BYTE_TOKENS.x, formatting.BYTE_TOKENS.y


def _metaicl_dir(root):
  os.makedirs(os.path.join(root, "config", "tasks"))
  json.dump({"train": ["tr-a"], "test": ["te-b", "te-missing"]},
            open(os.path.join(root, "config", "toy.json"), "w"))
  json.dump({"task_type": "classification", "options": ["neg", "pos"]},
            open(os.path.join(root, "config", "tasks", "te-b.json"), "w"))
  for task, splits in (("tr-a", ("train", "dev")), ("te-b", ("train", "test"))):
    os.makedirs(os.path.join(root, "data", task))
    for split in splits:
      with open(metaicl.data_file(root, task, 16, 100, split), "w") as f:
        for i in range(16 if split == "train" else 5):
          f.write(json.dumps({"task": task, "input": f"{split}{i}", "output": ["neg", "pos"][i % 2],
                              "options": ["neg", "pos"]}) + "\n")
  return root


def test_metaicl_small(tmp_path):
  root = _metaicl_dir(str(tmp_path / "m"))
  out = metaicl_tasks.register_metaicl(root, "toy", hyper_modes=("hyper", "concat"), k=16)
  assert out["metaicl_toy_train"] == ["metaicl_toy.tr_a"]
  assert out["metaicl_toy_test"] == ["metaicl_toy.te_b"]  # te-missing skipped
  assert len(common.get_examples("metaicl_toy.tr_a", "train")) == 21  # 16 train + 5 dev
  ex = common.get_examples("metaicl_toy.te_b", "test")[1]
  assert ex["inputs"] == "test1" and ex["answer_choices"] == ["neg", "pos"] and ex["label"] == 1
  assert ex["hyper_inputs"].count(X) == 16  # all 16 k-shot train examples
  assert {d[0] for d in common.get_eval_demonstrations("metaicl_toy.te_b")} == {
      f"train{i}" for i in range(16)}
  task = seqio.get_mixture_or_task("metaicl_toy.te_b")
  assert task.metric_fns[0]([["neg"], ["pos"]], ["neg", "neg"]) == {"macro_f1": pytest.approx(100 / 3)}
  with pytest.raises(metaicl.MetaICLError, match="no MetaICL split config 'nope'.*toy"):
    metaicl_tasks.register_metaicl(root, "nope")
  with open(metaicl.data_file(root, "te-b", 16, 100, "test"), "a") as f:
    f.write(json.dumps({"input": "x", "output": "maybe", "options": ["neg", "pos"]}) + "\n")
  with pytest.raises(metaicl.MetaICLError, match="te-b_16_100_test.jsonl: task te-b, line 6, field 'output'"):
    metaicl_tasks.register_metaicl(root, "toy")


def test_metaicl_budgets_are_the_task_feature_lengths(tmp_path):
  root = _metaicl_dir(str(tmp_path / "m"))
  lengths = {"hyper_inputs": 60, "inputs": 50, "targets": 8}
  out = metaicl_tasks.register_metaicl(root, "toy", hyper_modes=("hyper", "concat"), k=16,
                                       task_feature_lengths=lengths)
  assert set(out) == {metaicl_tasks.mixture_name("toy", mode, role)
                      for mode in ("hyper", "concat") for role in ("train", "test")}
  for i, ex in enumerate(common.get_examples("metaicl_toy_concat.te_b", "test")):
    # The whole concatenation fits "inputs" (one position for EOS), the query last.
    assert len(ex["inputs"].encode()) <= 49 and ex["inputs"].endswith(f"{X} test{i} {Y}")
    assert ex["inputs"].count(Y) == 3  # 2 demonstrations of ~13 bytes fit, then the query
  for ex in common.get_examples("metaicl_toy.te_b", "test"):
    assert len(ex["hyper_inputs"].encode()) <= 59 and ex["hyper_inputs"].count(Y) == 3
  assert isinstance(seqio.get_mixture_or_task("metaicl_toy_train"), seqio.Task)  # merged


@pytest.mark.skipif(not os.path.isdir(METAICL_DIR), reason="../shared/data/metaicl absent")
def test_metaicl_real_hr_to_lr_loads():
  cfg = metaicl.read_config(METAICL_DIR, "hr_to_lr")
  out = metaicl_tasks.register_metaicl(METAICL_DIR, "hr_to_lr", hyper_modes=("hyper",),
                                       max_eval_examples=50)
  present = [t for t in cfg["train"]
             if os.path.exists(metaicl.data_file(METAICL_DIR, t, 16, 100, "train"))]
  assert len(out["metaicl_hr_to_lr_train"]) == len(present) >= 50
  present = [t for t in cfg["test"]
             if os.path.exists(metaicl.data_file(METAICL_DIR, t, 16, 100, "test"))]
  assert len(out["metaicl_hr_to_lr_test"]) == len(present)
  assert len(out["metaicl_hr_to_lr_test"]) >= 20
  name = out["metaicl_hr_to_lr_test"][0]
  ex = common.get_examples(name, "test")[0]
  assert ex["answer_choices"] and ex["answer_choices"][ex["label"]] == ex["targets"]


# -- symbol tuning ----------------------------------------------------------------

def _cls_task():
  mk = lambda p, n: [fewshot.TaskExample(f"{p}{i}", (["bad", "good"][i % 2],), ("bad", "good"), i % 2)
                     for i in range(n)]
  return fewshot.TaskData("cls", {"train": mk("tr", 20), "test": mk("te", 6)})


def test_draw_labels():
  rng = random.Random(0)
  for kind in symbol_tuning.LABEL_KINDS:
    labels = symbol_tuning.draw_labels(3, rng, kind)
    assert len(set(labels)) == 3
  assert all(0 <= int(s) <= 9999 for s in symbol_tuning.draw_labels(5, rng, "integer"))
  kinds = collections.Counter(
      "i" if l[0].isdigit() else ("w" if l in symbol_tuning.WORDS else "l")
      for s in range(300) for l in symbol_tuning.draw_labels(1, random.Random(s)))
  assert len(kinds) == 3


def test_draw_labels_for_more_classes_than_words():
  labels = symbol_tuning.draw_labels(len(symbol_tuning.WORDS) + 1, random.Random(0))
  assert len(set(labels)) == len(symbol_tuning.WORDS) + 1
  with pytest.raises(ValueError, match="distinct word labels"):
    symbol_tuning.draw_labels(len(symbol_tuning.WORDS) + 1, random.Random(0), "word")


def test_symbol_tuning_relabels_demos_with_target_mapping():
  b = symbol_tuning.SymbolTuningBuilder(_cls_task(), fewshot.HyperConfig(k=4), formatting.BYTE_TOKENS)
  exs = list(b.examples("train"))
  mappings = set()
  for e in exs:
    assert e["targets"] == e["answer_choices"][e["label"]]
    assert e["targets"] not in ("bad", "good")
    mappings.add(tuple(e["answer_choices"]))
    # Each demo's label is the mapped string of its true class (even index -> class 0).
    for part in e["hyper_inputs"].split(X)[1:]:
      inp, lab = [s.strip() for s in part.split(Y)]
      assert lab == e["answer_choices"][int(inp[2:]) % 2]
  assert len(mappings) > 15  # fresh mapping per example
  ev0 = list(symbol_tuning.SymbolTuningBuilder(_cls_task(), fewshot.HyperConfig(k=4),
                                               formatting.BYTE_TOKENS, eval_seed=0).examples("test"))
  ev1 = list(symbol_tuning.SymbolTuningBuilder(_cls_task(), fewshot.HyperConfig(k=4),
                                               formatting.BYTE_TOKENS, eval_seed=1).examples("test"))
  assert [e["inputs"] for e in ev0] == [e["inputs"] for e in ev1]
  assert [e["answer_choices"] for e in ev0] != [e["answer_choices"] for e in ev1]
  with pytest.raises(ValueError, match="classification tasks only"):
    symbol_tuning.SymbolTuningBuilder(
        fewshot.TaskData("gen", {"train": [fewshot.TaskExample("a", ("b",))]}),
        fewshot.HyperConfig(), formatting.BYTE_TOKENS)


def test_register_symbol_tuning():
  common.register_three_input_task("symsrc.cls", _cls_task(), fewshot.HyperConfig(k=2),
                                   seqio.ByteVocabulary())
  out = symbol_tasks.register_symbol_tuning(["symsrc.cls"], k=2)
  assert out["symbol_train"] == ["symbol.symsrc.cls"]
  assert len(out["symbol_eval"]) == symbol_tuning.NUM_EVAL_SEEDS
  ex = common.get_examples("symbol_s3.symsrc.cls", "test")[0]
  assert ex["targets"] not in ("bad", "good") and ex["hyper_inputs"].count(X) == 2
  task = seqio.get_mixture_or_task("symbol.symsrc.cls")
  got = next(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert got["targets_pretokenized"].decode() not in ("bad", "good")


def test_symbol_tuning_sources_are_the_classification_tasks_of_mixtures():
  vocab = seqio.ByteVocabulary()
  three = fewshot.TaskData("three", {"train": [
      fewshot.TaskExample(f"x{i}", ("abc"[i % 3],), ("a", "b", "c"), i % 3) for i in range(9)]})
  choice = fewshot.TaskData("choice", {"train": [
      fewshot.TaskExample(f"q{i}", (f"o{i}",), (f"o{i}", f"p{i}"), 0) for i in range(6)]})
  for name, task in (("symmix.cls", _cls_task()), ("symmix.three", three),
                     ("symmix.choice", choice)):
    common.register_three_input_task(name, task, fewshot.HyperConfig(k=2), vocab)
  common.register_mixture("symmix_all", {"symmix.cls": 1.0, "symmix.three": 1.0,
                                         "symmix.choice": 1.0})
  # Options that change with every example are multiple choice, not a label set.
  assert symbol_tasks.classification_sources(["symmix_all"]) == ["symmix.cls", "symmix.three"]
  assert symbol_tasks.classification_sources(["symmix_all"], max_classes=2) == ["symmix.cls"]
  out = symbol_tasks.register_symbol_tuning(source_mixtures=["symmix_all"], k=2, max_classes=2)
  assert out["symbol_train"] == ["symbol.symmix.cls"]
  with pytest.raises(ValueError, match="no source tasks"):
    symbol_tasks.register_symbol_tuning(source_mixtures=["symmix_all"], max_classes=1)


def test_symbol_eval_results_average_over_seeds_per_source(tmp_path):
  """The evaluator's results (as training, hypertune.eval and the JSON files get them) carry
  a seed average per source task, and the overall average counts each source once."""
  from hypertune import evaluation
  from hypertune import metrics
  for src in ("symsrc.a", "symsrc.b"):
    common.register_three_input_task(src, _cls_task(), fewshot.HyperConfig(k=2),
                                     seqio.ByteVocabulary())
  tasks = symbol_tasks.register_symbol_tuning(["symsrc.a", "symsrc.b"], k=2)["symbol_eval"]
  # The names register_symbol_tuning gives are the ones the metrics group.
  assert metrics.seed_groups(tasks) == {
      f"symbol_avg.{src}": [f"symbol.{src}"] + [f"symbol_s{j}.{src}" for j in
                                                 range(1, symbol_tuning.NUM_EVAL_SEEDS)]
      for src in ("symsrc.a", "symsrc.b")}

  def fake_rank_classification(params, names, split, method_state=None):
    # Source a scores 10 * seed, source b 50 on every seed.
    seed = lambda name: 0 if name.startswith("symbol.") else int(name.split(".")[0][len("symbol_s"):])
    return {name: {"accuracy": 10.0 * seed(name) if "symsrc.a" in name else 50.0}
            for name in names}

  ev = object.__new__(evaluation.Evaluator)  # no model: scoring is faked
  ev.generate_classification = False
  ev.rank_classification = fake_rank_classification
  results = ev.evaluate(None, tasks, "test")
  n = symbol_tuning.NUM_EVAL_SEEDS
  mean_a = 10.0 * (n - 1) / 2
  assert results["symbol_avg.symsrc.a"]["accuracy"] == pytest.approx(mean_a)
  assert results["symbol_avg.symsrc.a"]["accuracy/num_seeds"] == n
  assert results["symbol_avg.symsrc.b"]["accuracy/std"] == 0.0
  assert results["average"]["accuracy"] == pytest.approx((mean_a + 50.0) / 2)
  assert results["average"]["accuracy/num_tasks"] == 2
  path = evaluation.write_results(str(tmp_path), 7, results)
  with open(path) as f:
    assert json.load(f)["symbol_avg.symsrc.a"]["accuracy"] == pytest.approx(mean_a)


# -- hyperpretraining --------------------------------------------------------------

def test_caclm_split():
  toks = list(range(100, 700))
  ex = pretraining.caclm_split(toks, random.Random(0), length=512, b_length=32, sentinels=(7, 8))
  h, b, c = ex["hyper_inputs"], ex["inputs"], ex["targets"]
  assert len(b) == 32 and h[0] == 7 and h.count(8) == 1
  a, d = h[1:h.index(8)], h[h.index(8) + 1:]
  window = a + b + c + d
  assert len(window) == 512 and window == list(range(window[0], window[0] + 512))  # consecutive
  assert a and c and d
  # Split points come from the rng only: same seed, same split; other seeds differ.
  assert pretraining.caclm_split(toks, random.Random(0), sentinels=(7, 8)) == ex
  assert len({len(pretraining.caclm_split(toks, random.Random(s))["targets"]) for s in range(10)}) > 1
  with pytest.raises(ValueError, match="too short"):
    pretraining.caclm_split(list(range(30)), random.Random(0))


def _abcd_of(objective, ex, sentinels=(7, 8), separator=(-1,)):
  """(A, B, C, D) back from a CACLM or gist example."""
  h = ex["hyper_inputs"]
  if objective == "caclm":
    assert h[0] == sentinels[0] and h.count(sentinels[1]) == 1
    a, d = h[1:h.index(sentinels[1])], h[h.index(sentinels[1]) + 1:]
  else:
    a, d = h[:h.index(separator[0])], h[h.index(separator[0]) + 1:]
  return a, ex["inputs"], ex["targets"], d


@pytest.mark.parametrize("objective", ["caclm", "gist"])
@pytest.mark.parametrize("length,b_length,max_target_length", [(512, 32, 128), (128, 8, 16)])
def test_caclm_split_invariants_over_documents_and_seeds(objective, length, b_length,
                                                         max_target_length):
  """Every split: A+B+C+D a contiguous window of the document of min(len, `length`) tokens,
  |B| == b_length, C fits the target budget with a spare position, no segment under 8."""
  min_len = 8
  doc_rng = random.Random(f"{objective}{length}")
  c_lens = []
  for doc in range(150):
    n = doc_rng.randint(b_length + 3 * min_len, 3 * length)
    start = 100 + doc_rng.randint(0, 10_000)
    toks = list(range(start, start + n))
    for seed in range(4):
      rng = random.Random(fewshot.stable_seed("caclm-test", doc, seed))
      if objective == "caclm":
        ex = pretraining.caclm_split(toks, rng, length, b_length, sentinels=(7, 8),
                                     max_target_length=max_target_length)
      else:
        ex = pretraining.gist_split(toks, rng, length, b_length, separator=(-1,),
                                    max_target_length=max_target_length)
      a, b, c, d = _abcd_of(objective, ex)
      window = a + b + c + d
      assert len(window) == min(n, length)
      assert window == list(range(window[0], window[0] + len(window)))  # D follows C, ...
      assert start <= window[0] and window[-1] < start + n  # ... inside the document
      assert len(b) == b_length
      assert len(c) + 1 <= max_target_length
      assert min(len(a), len(c), len(d)) >= min_len, (len(a), len(c), len(d))
      c_lens.append(len(c))
  assert max(c_lens) == max_target_length - 1 and min(c_lens) == min_len  # the whole range


def test_caclm_split_rejects_a_budget_without_room_for_c():
  with pytest.raises(ValueError, match="max_target_length=8"):
    pretraining.caclm_split(list(range(600)), random.Random(0), max_target_length=8)
  with pytest.raises(ValueError, match="too short"):
    pretraining.caclm_split(list(range(32 + 3 * 8 - 1)), random.Random(0))
  assert pretraining.caclm_split(list(range(32 + 3 * 8)), random.Random(0))["targets"]


def test_hint_and_gist_split():
  toks = list(range(50))
  ex = pretraining.hint_split(toks, random.Random(1), length=512)
  assert ex["hyper_inputs"] + ex["inputs"] + ex["targets"] == toks
  assert all(ex[k] for k in ex)
  lens = {tuple(len(v) for v in pretraining.hint_split(toks, random.Random(s)).values())
          for s in range(20)}
  assert len(lens) > 5  # random-length chunks
  g = pretraining.gist_split(list(range(200)), random.Random(2), length=128, b_length=16,
                             separator=(-1,))
  a, d = g["hyper_inputs"][:g["hyper_inputs"].index(-1)], g["hyper_inputs"][g["hyper_inputs"].index(-1) + 1:]
  assert a + g["inputs"] + g["targets"] + d == list(range(a[0], a[0] + 128))


def test_register_pretraining_from_text(tmp_path):
  f = tmp_path / "corpus.jsonl"
  f.write_text("\n".join(json.dumps({"text": "word " * (50 + i)}) for i in range(5)) + "\n")
  name = pretraining_tasks.register_pretraining("hint", text_files=[str(f)], length=64)
  task = seqio.get_mixture_or_task(name)
  exs = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert len(exs) == 5
  v = seqio.ByteVocabulary()
  for e in exs:
    joined = list(e["hyper_inputs"]) + list(e["inputs"]) + list(e["targets"])
    assert len(joined) == 64 and v.decode(joined) in "word " * 60  # a contiguous window
  name = pretraining_tasks.register_pretraining(
      "caclm", text_files=[str(f)], length=128,
      task_feature_lengths={"hyper_inputs": 128, "inputs": 8, "targets": 16})
  e = next(seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert len(e["inputs"]) == 8 and len(e["targets"]) < 16  # |B| = inputs, C fits targets
  with pytest.raises(ValueError, match="unknown objective"):
    pretraining_tasks.register_pretraining("mlm", text_files=[str(f)])
  with pytest.raises(ValueError, match="text_files or a tfds_data_dir"):
    pretraining_tasks.register_pretraining("hint")


def _mock_c4(docs):
  """tfds.testing.mock_data over c4/en whose train split yields `docs` (in order)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset(builder, split, *args, **kwargs):
    assert (builder.name, builder.builder_config.name, split) == ("c4", "en", "train")
    n = len(docs)
    return tf.data.Dataset.from_tensor_slices({
        "text": docs, "url": [f"http://x/{i}" for i in range(n)], "timestamp": ["2019"] * n,
        "content-type": ["text/plain"] * n, "content-length": [str(len(d)) for d in docs]})

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_register_pretraining_from_c4_through_tfds(tmp_path):
  # Word i of document k is "d<k>w<i>": a window's text names its document.
  docs = [" ".join(f"d{k}w{i}" for i in range(40 + 5 * k)) for k in range(4)]
  docs.insert(2, "too short")  # under min_tokens: skipped
  v = seqio.ByteVocabulary()
  s0, s1 = v.encode("\x02")[0], v.encode("\x03")[0]
  lengths = {"hyper_inputs": 128, "inputs": 8, "targets": 128}
  with _mock_c4(docs):
    name = pretraining_tasks.register_pretraining("caclm", tfds_data_dir=str(tmp_path),
                                                  length=128, task_feature_lengths=lengths)
    task = seqio.get_mixture_or_task(name)
    exs = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    batch = next(common.get_batches(name, "train", 2, lengths).as_numpy_iterator())
  assert len(exs) == 4
  for e, doc in zip(exs, [d for d in docs if d != "too short"]):
    assert sorted(e) == ["hyper_inputs", "inputs", "targets"]
    assert all(x.dtype == "int32" for x in e.values())
    hyper = e["hyper_inputs"].tolist()
    assert hyper[0] == s0 and hyper.count(s1) == 1 and len(e["inputs"]) == 8
    a, d = hyper[1:hyper.index(s1)], hyper[hyper.index(s1) + 1:]
    window = a + e["inputs"].tolist() + e["targets"].tolist() + d
    assert len(window) == 128 and v.decode(window) in doc  # contiguous window of this document
  assert batch["hyper_encoder_input_tokens"].shape == (2, 128)
  assert batch["encoder_input_tokens"].shape == (2, 8)
  assert batch["decoder_target_tokens"].shape == (2, 128)


@pytest.mark.parametrize("objective", ["caclm", "gist"])
def test_register_pretraining_fits_every_feature_into_the_run_lengths(tmp_path, objective):
  """|B| = inputs, C fits targets, and the 512-token window shrinks until the sentinels, A
  and D always fit hyper_inputs: nothing is trimmed by the feature converter."""
  f = tmp_path / "corpus.txt"
  rng = random.Random(0)
  f.write_text("\n\n".join(" ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(20, 200)))
                            for _ in range(60)))
  lengths = {"hyper_inputs": 40, "inputs": 12, "targets": 10}
  name = pretraining_tasks.register_pretraining(objective, text_files=[str(f)], min_tokens=0,
                                                task_feature_lengths=lengths)
  task = seqio.get_mixture_or_task(name)
  sizes = collections.defaultdict(list)
  for epoch in task.get_dataset(None, split="train", shuffle=False, num_epochs=3).as_numpy_iterator():
    for k in lengths:
      sizes[k].append(len(epoch[k]))
  assert len(sizes["inputs"]) > 100 and set(sizes["inputs"]) == {12}
  assert max(sizes["hyper_inputs"]) == 40  # the whole budget is used, never more
  assert max(sizes["targets"]) <= 10
  assert pretraining_tasks.fit_window(objective, lengths, 512, 8) == (
      40 - (2 if objective == "caclm" else 0) + 12 + 8, 12 + 3 * 8)
  with pytest.raises(ValueError, match="leave a window of"):
    pretraining_tasks.register_pretraining(
        objective, text_files=[str(f)],
        task_feature_lengths={"hyper_inputs": 10, "inputs": 32, "targets": 10})
  with pytest.raises(ValueError, match="targets length 8 leaves no room"):
    pretraining_tasks.register_pretraining(
        objective, text_files=[str(f)],
        task_feature_lengths={"hyper_inputs": 40, "inputs": 12, "targets": 8})


def test_pretraining_keeps_the_window_that_fits():
  lengths = {"hyper_inputs": 1024, "inputs": 32, "targets": 128}
  assert pretraining_tasks.fit_window("caclm", lengths, 512, 8) == (512, 56)
  assert pretraining_tasks.fit_window("hint", {"hyper_inputs": 8, "inputs": 8}, 512, 8) == (512, 24)


def test_tfds_temp_dirs_stay_under_pytest_tmp(tmp_path, library_temp_files_under_pytest_tmp):
  """tfds leaves an empty temporary directory per builder (253 in the mock test above):
  they land under pytest's temporary directory (conftest), not in /tmp."""
  import tensorflow_datasets as tfds

  before = set(os.listdir(library_temp_files_under_pytest_tmp))
  tfds.builder("c4/en", data_dir=str(tmp_path))
  made = set(os.listdir(library_temp_files_under_pytest_tmp)) - before
  assert made and all(p.endswith("tfds") for p in made)
  assert tempfile.gettempdir() == library_temp_files_under_pytest_tmp


@pytest.mark.parametrize("subdir", ["empty", "missing"])
def test_register_pretraining_without_c4_names_the_directory(tmp_path, subdir):
  d = tmp_path / subdir
  if subdir == "empty":
    (d / "mnist").mkdir(parents=True)  # a tfds directory with other datasets only
  with pytest.raises(FileNotFoundError) as err:
    pretraining_tasks.register_pretraining("caclm", tfds_data_dir=str(d))
  msg = str(err.value)
  assert repr(str(d)) in msg and "c4/en" in msg and "download=False" in msg
  assert not os.path.exists(os.path.join(d, "downloads"))  # nothing was fetched


# -- gin/tasks files at tiny size ----------------------------------------------------

TINY_LENGTHS = {"hyper_inputs": 64, "inputs": 64, "targets": 16}
needs_metaicl = pytest.mark.skipif(not os.path.isdir(METAICL_DIR),
                                   reason="../shared/data/metaicl absent")


def _one_batch(name):
  batch = next(common.get_batches(name, "train", 2, TINY_LENGTHS).as_numpy_iterator())
  return {k: v.shape for k, v in batch.items()}


@needs_metaicl
@needs_spm
@pytest.mark.parametrize("mode, train_name, eval_name", [
    ("hyper", "metaicl_hr_to_lr_train", "metaicl_hr_to_lr_test"),
    ("concat", "metaicl_hr_to_lr_concat_train", "metaicl_hr_to_lr_concat_test"),
    ("none", "metaicl_hr_to_lr_zeroshot_train", "metaicl_hr_to_lr_zeroshot_test"),
])
def test_metaicl_gin_registers_its_mixtures_at_tiny_size(clean_gin, mode, train_name, eval_name):
  bindings = [f'METAICL_DATA_DIR = "{METAICL_DIR}"', f'METAICL_MODE = "{mode}"',
              "metaicl.register_metaicl.max_eval_examples = 4"]
  got = register_from_gin("tasks/metaicl.gin", bindings, TINY_LENGTHS)
  assert got[:3] == (train_name, eval_name, "test") and got[3] < 10
  assert len(common.mixture_tasks(train_name)) >= 50 and len(common.mixture_tasks(eval_name)) >= 20
  assert common.get_examples(common.mixture_tasks(eval_name)[0], "test")[0]["answer_choices"]
  assert _one_batch(train_name)["encoder_input_tokens"] == (2, 64)


@needs_metaicl
@needs_spm
def test_symbol_tuning_gin_registers_at_tiny_size(clean_gin):
  bindings = [f'METAICL_DATA_DIR = "{METAICL_DIR}"',
              "metaicl.register_metaicl.max_eval_examples = 4"]
  got = register_from_gin("tasks/symbol_tuning.gin", bindings, TINY_LENGTHS)
  assert got[:3] == ("symbol_train", "symbol_eval", "test") and got[3] < 10
  train = common.mixture_tasks("symbol_train")
  assert len(train) >= 20 and all(t.startswith("symbol.metaicl_hr_to_lr.") for t in train)
  assert "symbol.metaicl_hr_to_lr.discovery" not in train  # 174 classes > k = 16
  assert len(common.mixture_tasks("symbol_eval")) % symbol_tuning.NUM_EVAL_SEEDS == 0
  source = common.get_examples("metaicl_hr_to_lr.glue_rte", "test")[0]
  ex = common.get_examples("symbol_s1.metaicl_hr_to_lr.glue_rte", "test")[0]
  assert ex["inputs"] == source["inputs"] and ex["answer_choices"] != source["answer_choices"]
  assert _one_batch("symbol_train")["hyper_encoder_input_tokens"] == (2, 64)


@needs_spm
def test_hyperpretrain_gin_registers_at_tiny_size(clean_gin, tmp_path):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("\n".join(json.dumps({"text": " ".join(f"word{i}x{j}" for j in range(150))})
                              for i in range(4)))
  got = register_from_gin("tasks/hyperpretrain.gin", [f"PRETRAIN_TEXT_FILES = ['{corpus}']"],
                          TINY_LENGTHS)
  assert got[:2] == ("pretrain_caclm", None) and got[3] < 10
  ex = next(seqio.get_mixture_or_task("pretrain_caclm").get_dataset(
      None, split="train", shuffle=False).as_numpy_iterator())
  assert len(ex["inputs"]) == 64 and len(ex["hyper_inputs"]) <= 64 and len(ex["targets"]) < 16
  assert ex["hyper_inputs"][0] == pretraining.T5_CACLM_SENTINELS[0]  # the T5 vocabulary's
  assert _one_batch("pretrain_caclm")["hyper_encoder_input_tokens"] == (2, 64)
  with pytest.raises(ValueError, match="text_files or a tfds_data_dir"):
    register_from_gin("tasks/hyperpretrain.gin", [], TINY_LENGTHS)
