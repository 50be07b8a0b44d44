"""Tests of the S-NI loader and registry: small files made here + the real files."""

import collections
import json
import logging
import os
import time

import gin
import pytest
import seqio

from hypertune.data import formatting
from hypertune.data import sni
from tasks import common
from tasks import sni as sni_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNI_DIR = os.path.join(REPO, "..", "shared", "data", "sni")
SPM = os.path.join(REPO, common.T5_VOCAB_RELATIVE_PATH)


def _task(n=5, **over):
  t = {
      "Definition": ["Answer with the opposite word."],
      "Input_language": ["English"], "Output_language": ["English"],
      "Positive Examples": [{"input": "hot", "output": "cold", "explanation": ""},
                            {"input": "up", "output": "down", "explanation": ""},
                            {"input": "big", "output": "small", "explanation": ""}],
      "Negative Examples": [],
      "Instances": [{"id": f"i{i}", "input": f"word{i}", "output": [f"opp{i}", f"alt{i}"]}
                    for i in range(n)],
  }
  t.update(over)
  return t


def _write(root, tasks, train, test):
  os.makedirs(os.path.join(root, "tasks"), exist_ok=True)
  os.makedirs(os.path.join(root, "splits", "default"), exist_ok=True)
  for name, t in tasks.items():
    with open(os.path.join(root, "tasks", name + ".json"), "w") as f:
      f.write(t if isinstance(t, str) else json.dumps(t))
  for split, names in (("train", train), ("test", test)):
    with open(os.path.join(root, "splits", "default", f"{split}_tasks.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  return root


@pytest.mark.parametrize("mutate, field, problem", [
    (lambda t: t.pop("Definition"), "Definition", "missing"),
    (lambda t: t.pop("Instances"), "Instances", "missing"),
    (lambda t: t.update(Instances=[]), "Instances", "empty"),
    (lambda t: t["Instances"][1].update(output="opp"), "Instances[1].output", "list of strings"),
    (lambda t: t["Instances"][2].update(input=None), "Instances[2].input", "string"),
    (lambda t: t.update(Definition=[]), "Definition", "string or list"),
    (lambda t: t["Positive Examples"][0].update(output=3), "Positive Examples[0].output", "string"),
])
def test_malformed_files_name_file_task_and_field(tmp_path, mutate, field, problem):
  t = _task()
  mutate(t)
  path = tmp_path / "task999_bad.json"
  path.write_text(json.dumps(t))
  with pytest.raises(sni.TaskFileError) as e:
    sni.load_task_file(str(path))
  msg = str(e.value)
  assert str(path) in msg and "task999_bad" in msg and repr(field) in msg and problem in msg


def test_bad_json(tmp_path):
  path = tmp_path / "task1_x.json"
  path.write_text("{not json")
  with pytest.raises(sni.TaskFileError, match=r"task1_x.json: task 'task1_x', field '<json>': bad JSON"):
    sni.load_task_file(str(path))


def test_golden_def_2pos_example(tmp_path):
  """Pins the exact HyperT5 appendix A.1 string with the T5 <x>/<y> extra ids."""
  root = _write(str(tmp_path / "d"), {"task1_opp": _task(), "task2_opp": _task()},
                ["task1_opp"], ["task2_opp"])
  vocab = seqio.ByteVocabulary()
  tasks = sni_tasks.register_sni_layout(root, vocab, prefix="gold", settings=("def_2pos",),
                                        hyper_modes=("hyper", "concat"))
  ex = common.get_examples("gold_def_2pos.task2_opp", "test")[0]
  x, y = formatting.BYTE_TOKENS.x, formatting.BYTE_TOKENS.y
  assert ex["hyper_inputs"] == (
      f"{x} Answer with the opposite word. {x} hot {y} cold {x} up {y} down")
  assert ex["inputs"] == "word0" and ex["targets"] == "opp0"
  assert ex["references"] == ["opp0", "alt0"]
  c = common.get_examples("gold_def_2pos_concat.task2_opp", "test")[0]
  assert c["inputs"] == (f"{x} Answer with the opposite word. {x} hot {y} cold "
                         f"{x} up {y} down {x} word0 {y}")
  assert set(tasks) == {"gold_def_2pos_train", "gold_def_2pos_test",
                        "gold_def_2pos_concat_train", "gold_def_2pos_concat_test"}


def test_settings_english_filter_and_mixtures(tmp_path):
  tasks = {f"task{i}_t": _task(n=3 + i) for i in range(4)}
  tasks["task9_fr"] = _task(Input_language=["French"])
  root = _write(str(tmp_path / "d"), tasks, ["task0_t", "task1_t", "task2_t", "task9_fr",
                                              "task77_absent"], ["task3_t"])
  out = sni_tasks.register_sni_layout(
      root, seqio.ByteVocabulary(), prefix="t2", settings=("def", "fewshot", "none"),
      hyper_modes=("hyper", "none"), k=2, mixing_cap=4)
  assert sorted(out["t2_def_train"]) == ["t2_def.task0_t", "t2_def.task1_t", "t2_def.task2_t"]
  assert out["t2_def_test"] == ["t2_def.task3_t"]
  assert "t2_zeroshot_train" in out
  # Training mixtures are merged tasks (one pipeline), size-proportional with the cap.
  assert isinstance(seqio.get_mixture_or_task("t2_def_train"), seqio.Task)
  rates = common.mixture_rates("t2_def_train")
  assert rates == {"t2_def.task0_t": 3.0, "t2_def.task1_t": 4.0, "t2_def.task2_t": 4.0}
  epoch = seqio.get_mixture_or_task("t2_def_train").get_dataset(None, "train", shuffle=False)
  counts = collections.Counter(ex["task_name"].decode() for ex in epoch.as_numpy_iterator())
  assert counts == {"task0_t": 3, "task1_t": 4, "task2_t": 4}  # task2_t's 5th capped away
  d = common.get_examples("t2_def.task3_t", "test")[0]
  assert d["hyper_inputs"] == f"{formatting.BYTE_TOKENS.x} Answer with the opposite word."
  f = common.get_examples("t2_fewshot.task0_t", "train")
  assert all(e["hyper_inputs"].count(formatting.BYTE_TOKENS.y) == 2 for e in f)
  assert "Answer" not in f[0]["hyper_inputs"]
  z = common.get_examples("t2_zeroshot.task0_t", "train")[0]
  assert z["hyper_inputs"] == "" and z["inputs"] == "word0"
  # Train targets are sampled among outputs; test keeps all as references.
  targets = {e["targets"] for ep in range(8) for e in common.get_examples("t2_def.task2_t", "train", ep)[:1]}
  assert targets == {"opp0", "alt0"}
  with pytest.raises(ValueError, match="unknown S-NI setting"):
    sni_tasks.register_sni_layout(root, seqio.ByteVocabulary(), prefix="t3", settings=("defs",))


def test_max_instances_and_validation(tmp_path):
  root = _write(str(tmp_path / "d"), {"task1_a": _task(n=30), "task2_b": _task(n=30)},
                ["task1_a"], ["task2_b"])
  sni_tasks.register_sni_layout(root, seqio.ByteVocabulary(), prefix="t4",
                                settings=("fewshot",), k=4, max_train_instances=10,
                                max_eval_instances=12, num_validation=3)
  assert len(common.get_examples("t4_fewshot.task1_a", "train")) == 10
  assert len(common.get_examples("t4_fewshot.task1_a", "validation")) == 3
  assert len(common.get_examples("t4_fewshot.task2_b", "test")) == 12
  # Eval demos come from instances past the evaluated 12.
  demos = common.get_eval_demonstrations("t4_fewshot.task2_b")
  assert len(demos) == 4 and all(int(d[0][4:]) >= 12 for d in demos)


# -- real data ----------------------------------------------------------------

needs_sni = pytest.mark.skipif(not os.path.isdir(SNI_DIR), reason="../shared/data/sni absent")


@needs_sni
def test_real_all_train_and_test_files_load():
  layout = sni.find_layout(SNI_DIR)
  assert len(layout.train_tasks) == 756 and len(layout.test_tasks) == 119
  train, missing_tr = sni.load_tasks(layout, layout.train_tasks, "train")
  test, missing_te = sni.load_tasks(layout, layout.test_tasks, "test")
  assert len(train) == 204 and len(test) == 22
  assert len(missing_tr) == 756 - 204 and len(missing_te) == 119 - 22
  assert all(t.num_examples("test") == 100 for t in test)
  assert all(t.instruction and len(t.positive_examples) >= 2 for t in train + test)
  # The official references agree with the test files' outputs.
  refs = {}
  with open(os.path.join(SNI_DIR, "refs", "test_references.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      refs[r["id"]] = r["references"]
  for t in test[:5]:
    for ex in t.splits["test"]:
      assert list(ex.outputs) == refs[ex.id]


@needs_sni
def test_real_golden_def_2pos_with_t5_vocab():
  if not os.path.exists(SPM):
    pytest.skip("T5 vocabulary absent")
  vocab = common.get_vocabulary("sentencepiece", SPM)
  layout = sni.find_layout(SNI_DIR)
  layout.train_tasks = []
  layout.test_tasks = ["task1393_superglue_copa_text_completion"]
  tasks, _ = sni.load_tasks(layout, layout.test_tasks, "test")
  from hypertune.data import fewshot  # pylint: disable=g-import-not-at-top
  b = fewshot.ExampleBuilder(tasks[0], fewshot.HyperConfig(demos="positive", k=2),
                             formatting.special_tokens_for(vocab), common.length_fn_for(vocab))
  ex = next(b.examples("test"))
  assert ex["hyper_inputs"] == (
      "<extra_id_0> In this task, you are given a premise sentence, two possible options and "
      "a question word. If the question was cause you should select the option that is a "
      "possible cause of the premise sentence, and if the question word was effect you should "
      "find the option which is a possible effect of the premise sentence. Answer with \"A\" "
      "or \"B\". "
      "<extra_id_0> The animal species became endangered. (A) Their habitat was destroyed. "
      "(B) Their predators went extinct., Question: cause <extra_id_1> A "
      "<extra_id_0> The bar closed. (A) It was crowded. (B) It was 3 AM., Question: cause "
      "<extra_id_1> B")
  assert ex["inputs"] == ("The man fell unconscious. (A) The assailant struck the man in the "
                          "head. (B) The assailant took the man's wallet., Question: cause")
  assert ex["targets"] == "A" and ex["references"] == ["A"]
  ids = vocab.encode(ex["hyper_inputs"])
  assert ids[0] == 32099 and ids.count(32099) == 3 and ids.count(32098) == 2


@needs_sni
def test_real_register_sni_end_to_end():
  out = sni_tasks.register_sni(SNI_DIR, seqio.ByteVocabulary(), settings=("def_2pos",),
                               hyper_modes=("hyper",))
  assert len(out["sni_def_2pos_train"]) == 204 and len(out["sni_def_2pos_test"]) == 22
  # Names with "-" in the source are made seqio-safe.
  assert "sni_def_2pos.task105_story_cloze_rocstories_sentence_generation" in \
      out["sni_def_2pos_train"] or all("-" not in n for n in out["sni_def_2pos_train"])
  ds = common.get_batches("sni_def_2pos_test", "test", 2, shuffle=False, num_epochs=1)
  b = next(ds.as_numpy_iterator())
  assert b["hyper_encoder_input_tokens"].shape == (2, 1024)


needs_spm = pytest.mark.skipif(not os.path.exists(SPM), reason="T5 vocabulary absent")
TINY_LENGTHS = {"hyper_inputs": 64, "inputs": 128, "targets": 16}


@needs_sni
@needs_spm
def test_real_registration_budgets_are_the_task_feature_lengths(caplog):
  """One length knob: concat inputs fit "inputs" (128) whole with the query last, hyper
  inputs fit "hyper_inputs" (64), and the truncation warning names 128."""
  vocab = common.get_vocabulary("sentencepiece", SPM)
  n_tokens = common.length_fn_for(vocab)
  tokens = formatting.special_tokens_for(vocab)
  with caplog.at_level(logging.WARNING):
    out = sni_tasks.register_sni(SNI_DIR, vocab, settings=("def", "def_2pos"),
                                 hyper_modes=("hyper", "concat"), max_train_instances=20,
                                 task_feature_lengths=TINY_LENGTHS)
    fitted = long_queries = 0
    for name in out["sni_def_2pos_concat_test"] + out["sni_def_concat_train"][::10]:
      builder = common.get_builder(name)
      split = "test" if "test" in builder.task.splits else "train"
      examples = list(builder.examples(split))  # whole: it warns at the end
      for raw, ex in zip(builder.task.splits[split], examples):
        query = formatting.format_concat_inputs("", raw.inputs, tokens)
        if n_tokens(query) + 1 > 128:
          long_queries += 1  # the query alone is over: trimmed, and warned about
          continue
        assert n_tokens(ex["inputs"]) + 1 <= 128 and ex["inputs"].endswith(query), name
        assert ex["inputs"].startswith(tokens.x)  # (the cut) definition first
        fitted += 1
  assert fitted > 1000 and long_queries > 0
  warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert warnings and all("longer than 128 tokens" in w for w in warnings)
  assert not any("384" in w or "1408" in w for w in warnings)
  for name in out["sni_def_2pos_test"] + out["sni_def_train"][::10]:
    builder = common.get_builder(name)
    for split in builder.task.splits:
      assert all(n_tokens(ex["hyper_inputs"]) + 1 <= 64 for ex in builder.examples(split))
  # After the feature converter (trimming, then EOS) the query's closing <y> is still there.
  name = out["sni_def_2pos_concat_test"][0]
  batch = next(common.get_batches(name, "test", 16, TINY_LENGTHS, shuffle=False,
                                  num_epochs=1).as_numpy_iterator())
  y_id = vocab.encode(tokens.y)[-1]
  raw = common.get_builder(name).task.splits["test"]
  for row, r in zip(batch["encoder_input_tokens"], raw):
    ids = [int(t) for t in row if t]
    fits = n_tokens(formatting.format_concat_inputs("", r.inputs, tokens)) + 1 <= 128
    assert ids[-1] == 1 and (ids[-2] == y_id or not fits and len(ids) == 128)


def _resolve(value):
  """A gin value as the trainer gets it: evaluated references (`@f()`) called."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return value.scoped_configurable_fn()
  return value


def register_from_gin(task_file, bindings, lengths):
  """Parse a tiny run with `task_file`, call its setup_tasks as the trainer does; returns
  (MIXTURE_OR_TASK_NAME, EVAL_MIXTURE_OR_TASK_NAME, train.eval_split, seconds)."""
  from hypertune import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_utils.parse(["models/t5_tiny.gin", "models/t5_mtf.gin", "runs/train.gin", task_file],
                  ['MODEL_DIR = "/tmp/unused"', f'VOCABULARY_PATH = "{SPM}"',
                   f"TASK_FEATURE_LENGTHS = {lengths!r}", *bindings])
  gin_utils.check_required_macros()
  start = time.time()
  for setup in gin.query_parameter("train.setup_tasks"):
    setup.scoped_configurable_fn()
  seconds = time.time() - start
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == lengths
  names = [_resolve(gin.query_parameter(f"%{m}"))
           for m in ("MIXTURE_OR_TASK_NAME", "EVAL_MIXTURE_OR_TASK_NAME")]
  return (*names, _resolve(gin.query_parameter("train.eval_split")), seconds)


@pytest.fixture
def clean_gin():
  yield
  gin.clear_config()


@needs_sni
@needs_spm
@pytest.mark.parametrize("bindings, train_name, eval_name", [
    ([], "sni_def_2pos_train", "sni_def_2pos_test"),
    (['SNI_SETTING = "def"', 'SNI_MODE = "concat"'], "sni_def_concat_train", "sni_def_concat_test"),
    (['SNI_MODE = "none"'], "sni_zeroshot_train", "sni_zeroshot_test"),
])
def test_sni_gin_registers_its_mixtures_at_tiny_size(clean_gin, bindings, train_name, eval_name):
  lengths = {"hyper_inputs": 64, "inputs": 64, "targets": 16}
  tiny = [f'SNI_DATA_DIR = "{SNI_DIR}"', "sni.register_sni.max_train_instances = 2",
          "sni.register_sni.max_eval_instances = 2"]
  name, eval_name_got, split, seconds = register_from_gin("tasks/sni.gin", tiny + bindings,
                                                          lengths)
  assert (name, eval_name_got, split) == (train_name, eval_name, "test")
  assert seconds < 10
  assert len(common.mixture_tasks(name)) == 204 and len(common.mixture_tasks(eval_name)) == 22
  common.get_task_or_mixture(eval_name)
  batch = next(common.get_batches(name, "train", 2, lengths).as_numpy_iterator())
  assert batch["hyper_encoder_input_tokens"].shape == (2, 64)
  assert batch["encoder_input_tokens"].shape == (2, 64)
  assert batch["decoder_target_tokens"].shape == (2, 16)
  ex = common.get_examples(common.mixture_tasks(name)[0], "train")[0]
  assert (ex["hyper_inputs"] == "") == (name != "sni_def_2pos_train")  # only HyperT5 reads it
