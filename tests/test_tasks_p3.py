"""Tests of P3: promptsource rendering, held-out tasks, training files, TFRecords."""

import json
import os

import gin
import pytest
import seqio
import tensorflow as tf

from hypertune import metrics
from hypertune.data import formatting
from hypertune.data import p3
from tasks import common
from tasks import p3 as p3_tasks
from tasks import sni as sni_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P3_DIR = os.path.join(REPO, "..", "shared", "data", "p3")
SPM = os.path.join(REPO, "..", "shared", "data", "t5_vocab", "spiece.model")
needs_p3 = pytest.mark.skipif(not os.path.isdir(P3_DIR), reason="../shared/data/p3 absent")
needs_spm = pytest.mark.skipif(not os.path.exists(SPM), reason="../shared/data/t5_vocab absent")

TEMPLATES = """dataset: toy
templates:
  aaa: !Template
    answer_choices: Yes ||| No
    id: aaa
    jinja: '{{premise}} Is "{{hypothesis}}" true? ||| {% if label != -1 %}{{ answer_choices[label] }}{% endif %}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: is it true
    reference: test
  bbb: !Template
    answer_choices: '{{choice1}} ||| {{choice2}}'
    id: bbb
    jinja: '{% if question == "effect" %}{{premise}} so{% endif %} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      original_task: true
    name: effect only
  ccc: !Template
    answer_choices: null
    id: ccc
    jinja: '{{ [premise, hypothesis] | choice }} ||| x'
    metadata: !TemplateMetadata
      original_task: false
    name: random pick
"""


@pytest.fixture
def tdir(tmp_path):
  d = tmp_path / "promptsource_templates" / "toy"
  d.mkdir(parents=True)
  (d / "templates.yaml").write_text(TEMPLATES)
  return str(tmp_path / "promptsource_templates")


def test_render_like_promptsource(tdir):
  ts = p3.load_templates(tdir, "toy")
  assert set(ts) == {"is it true", "effect only", "random pick"}
  t = ts["is it true"]
  assert t.original_task and not t.choices_in_prompt
  assert t.apply({"premise": "It rains.", "hypothesis": "Wet", "label": 1}) == (
      'It rains. Is "Wet" true?', "No", ["Yes", "No"])
  assert t.apply({"premise": "A", "hypothesis": "B", "label": -1})[1] == ""
  prompt, target, choices = ts["effect only"].apply(
      {"premise": "P.", "choice1": "c1", "choice2": "c2", "question": "effect", "label": 0})
  assert (prompt, target, choices) == ("P. so", "c1", ["c1", "c2"])
  # `choice` is seeded per example: deterministic renders.
  r = ts["random pick"]
  ex = {"premise": "p", "hypothesis": "h"}
  assert r.apply(ex, seed=3) == r.apply(ex, seed=3)
  assert {r.apply(ex, seed=s)[0] for s in range(20)} == {"p", "h"}


def test_render_choice_examples_drops_inapplicable_and_checks_gold(tdir):
  ts = p3.load_templates(tdir, "toy")
  rows = [{"premise": "P.", "choice1": "a", "choice2": "b", "question": q, "label": l}
          for q, l in (("effect", 1), ("cause", 0), ("effect", 0))]
  exs = p3.render_choice_examples(rows, ts["effect only"], "toy_effect")
  assert [(e.outputs[0], e.label, e.id) for e in exs] == [("b", 1, "0"), ("a", 0, "2")]
  with pytest.raises(p3.P3Error, match="answer_choices"):
    p3.render_choice_examples([{"premise": "p", "hypothesis": "h"}], ts["random pick"], "toy")


def test_template_errors(tdir, tmp_path):
  ts = p3.load_templates(tdir, "toy")
  with pytest.raises(p3.P3Error, match="unknown template 'is it tru'.*is it true"):
    p3.get_template(ts, "is it tru", "toy")
  with pytest.raises(p3.P3Error, match="no promptsource templates for dataset 'nope'"):
    p3.load_templates(tdir, "nope")
  bad = tmp_path / "promptsource_templates" / "bad"
  bad.mkdir()
  (bad / "templates.yaml").write_text("dataset: bad\ntemplates:\n  x: !Template\n    id: x\n")
  with pytest.raises(p3.P3Error, match=r"templates.yaml: dataset 'bad', template x, field 'name'"):
    p3.load_templates(str(tmp_path / "promptsource_templates"), "bad")
  (bad / "templates.yaml").write_text("dataset: [unclosed\n")
  with pytest.raises(p3.P3Error, match="bad YAML"):
    p3.load_templates(str(tmp_path / "promptsource_templates"), "bad")
  broken = p3.Template("z", "broken", "{{ x.y.z }} ||| {{ }", None, True, False, "mem.yaml")
  with pytest.raises(p3.P3Error, match="mem.yaml: template 'broken'.*'jinja'"):
    broken.apply({})


def test_prompted_jsonl(tmp_path):
  f = tmp_path / "glue_qqp_answer.jsonl"
  f.write_text(json.dumps({"prompt": "Q? ", "completion": " yes<|endoftext|>"}) + "\n")
  exs = p3.read_prompted_jsonl(str(f))
  assert exs[0].inputs == "Q?" and exs[0].outputs == ("yes",)
  f.write_text(json.dumps({"prompt": "Q?"}) + "\n")
  with pytest.raises(p3.P3Error, match="glue_qqp_answer.jsonl: example 0: field 'completion'"):
    p3.read_prompted_jsonl(str(f))


def test_figure6_list_and_name_matching():
  assert len(p3.HYPERT5_TRAIN_PROMPTS) == 241
  assert len(set(p3.HYPERT5_TRAIN_PROMPTS)) == 241
  assert p3.normalize_prompt_name("cnn_dailymail_3.0.0_generate_story") == \
      p3.normalize_prompt_name("cnn_dailymail_3_0_0_generate_story")
  assert p3.normalize_prompt_name("samsun_Summarize_") == p3.normalize_prompt_name("samsum_Summarize_")


def test_heldout_task_names_parse_back_to_mode_and_dataset():
  for mode, prefix in p3.MODE_PREFIXES.items():
    assert prefix == sni_tasks.variant_name("p3", None, mode)  # the names tasks register
    for h in p3.HELDOUT_DATASETS:
      name = f"{prefix}.{h.key}_{p3.sanitize('GPT-3 style')}"
      assert p3.parse_heldout_task_name(name) == (prefix, h.key, "GPT_3_style"), name
  assert p3.parse_heldout_task_name("p3.train.ag_news_classify") is None
  assert p3.parse_heldout_task_name("p3_heldout_anli_r1") is None  # a mixture
  assert p3.parse_heldout_task_name("sni.super_glue_cb_x") is None
  # HyperT5 Tables 1-2: ANLI, HSwag, CB, COPA, RTE, WiC, WSC, WGD.
  assert p3.PAPER_COLUMNS == ("anli", "hellaswag", "super_glue_cb", "super_glue_copa",
                              "super_glue_rte", "super_glue_wic", "super_glue_wsc.fixed",
                              "winogrande")
  assert [p3.paper_column(k) for k in ("anli_r1", "anli_r2", "anli_r3")] == ["anli"] * 3
  with pytest.raises(ValueError, match="unknown hyper_mode"):
    p3_tasks.register_p3("/nonexistent", heldout=(), include_train=False, hyper_modes=("x",))


def _bytes(*vals):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in vals]))


def test_p3_tfrecords(tmp_path):
  d = tmp_path / "super_glue_rte_GPT_3_style"
  d.mkdir()
  with tf.io.TFRecordWriter(str(d / "validation.tfrecord-00000-of-00001")) as w:
    for inp, tgt in (("A? True or False?", "False"), ("B? True or False?", "True")):
      ex = tf.train.Example(features=tf.train.Features(feature={
          "inputs_pretokenized": _bytes(inp), "targets_pretokenized": _bytes(tgt),
          "answer_choices": _bytes("True", "False"),
          "inputs": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2])),
      }))
      w.write(ex.SerializeToString())
  with tf.io.TFRecordWriter(str(d / "train.tfrecord-00000-of-00001")) as w:
    ex = tf.train.Example(features=tf.train.Features(feature={
        "inputs_pretokenized": _bytes("C?"), "targets_pretokenized": _bytes("True")}))
    w.write(ex.SerializeToString())
  exs = p3.read_p3_tfrecords(str(d / "validation.tfrecord*"))
  assert [(e.inputs, e.answer_choices, e.label) for e in exs] == [
      ("A? True or False?", ("True", "False"), 1), ("B? True or False?", ("True", "False"), 0)]
  out = p3_tasks.register_p3_tfrecords(str(tmp_path), ["super_glue_rte_GPT_3_style"], k=1)
  name = out["p3tf_all"][0]
  ex = common.get_examples(name, "validation")[0]
  assert ex["hyper_inputs"] == "\x1e C? \x1f True" and ex["label"] == 1
  with pytest.raises(p3.P3Error, match="no <split>.tfrecord"):
    p3_tasks.register_p3_tfrecords(str(tmp_path), ["missing_task"])


# -- real data ----------------------------------------------------------------

# (dataset key, template, example index) -> (gold target, gold index), checked by hand
# against the raw labels (e.g. CB #0 is "contradiction" -> "False" in GPT-3 style).
HAND_CHECKED = {
    ("anli_r1", "GPT-3 style", 0): ("False", 2),
    ("anli_r2", "GPT-3 style", 0): ("Neither", 1),
    ("anli_r3", "GPT-3 style", 0): ("True", 0),
    ("hellaswag", "complete_first_then", 0): ("starts pulling up roofing on a roof.", 3),
    ("super_glue_cb", "GPT-3 style", 0): ("False", 1),
    ("super_glue_copa", "C1 or C2? premise, so/because…", 0): ("Water flowed from the spout.", 1),
    ("super_glue_rte", "GPT-3 style", 0): ("False", 1),
    ("super_glue_wic", "GPT-3-prompt", 0): ("No", 0),
    ("super_glue_wsc.fixed", "GPT-3 Style", 0): ("No", 0),
    ("winogrande", "Replace", 0): ("Maria", 1),
    ("winogrande", "Replace", 1): ("Sarah", 0),
}


@pytest.fixture(scope="module")
def real_p3():
  if not os.path.isdir(P3_DIR):
    pytest.skip("../shared/data/p3 absent")
  return p3_tasks.register_p3(P3_DIR, hyper_modes=("hyper", "concat"), k=4,
                              max_eval_examples=20, include_train=False)


@needs_p3
def test_real_golden_rte_prompt():
  ts = p3.load_templates(os.path.join(P3_DIR, "promptsource_templates"), "super_glue", "rte")
  rows = p3.read_heldout_raw(os.path.join(P3_DIR, "superglue_fewglue32dev/RTE/val.jsonl"), "rte")
  assert ts["GPT-3 style"].apply(rows[0]) == (
      "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
      "according to the Christopher Reeve Foundation.\n"
      "Question: Christopher Reeve had an accident. True or False?",
      "False", ["True", "False"])


@needs_p3
def test_real_heldout_one_task_per_dataset(real_p3):
  for h in p3.HELDOUT_DATASETS:
    assert real_p3[f"p3_heldout_{h.key}"], h.key
  for (key, template, i), (target, label) in HAND_CHECKED.items():
    name = f"p3.{key}_{p3.sanitize(template)}"
    ex = common.get_examples(name, "validation")[i]
    assert ex["targets"] == target and ex["label"] == label, (name, ex)
    assert ex["answer_choices"][label] == target
    demos = common.get_eval_demonstrations(name)
    assert len(demos) == 4
    assert not {d[0] for d in demos} & {e["inputs"] for e in common.get_examples(name, "validation")}
  assert len(real_p3["p3_heldout_anli_r1"]) == 15  # all original-task ANLI templates


@needs_p3
def test_real_heldout_batches(real_p3):
  name = "p3.super_glue_rte_GPT_3_style"
  task = seqio.get_mixture_or_task(name)
  ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  hyper = ex["hyper_inputs_pretokenized"].decode()
  # 4 demos requested, but whole demos are dropped to fit the 1024-byte budget.
  assert 1 <= hyper.count("\x1e") < 4 and len(hyper.encode()) <= 1023
  assert hyper.count("\x1e") == hyper.count("\x1f")
  assert len(ex["hyper_inputs"]) == len(hyper.encode()) + 1  # EOS
  c = common.get_examples("p3_concat.super_glue_rte_GPT_3_style", "validation")[0]
  assert c["inputs"].endswith("Christopher Reeve had an accident. True or False? \x1f")


@needs_p3
def test_real_heldout_names_aggregate_to_the_eight_paper_columns(real_p3):
  for prefix in ("p3", "p3_concat"):
    names = real_p3[f"{prefix}_heldout"]
    # Dummy scores that differ per template; the expected columns come from the
    # registration's per-dataset mixtures, not from parsing the names.
    per_task = {n: {"accuracy": float(i % 7) * 10} for i, n in enumerate(names)}
    expected = {}
    for h in p3.HELDOUT_DATASETS:
      members = real_p3[f"{prefix}_heldout_{h.key}"]
      expected[h.key] = sum(per_task[n]["accuracy"] for n in members) / len(members)
    expected["anli"] = sum(expected[f"anli_r{r}"] for r in (1, 2, 3)) / 3
    out = metrics.aggregate_task_metrics(per_task)
    for key, value in expected.items():
      assert out[f"{prefix}_dataset.{key}"]["accuracy"] == pytest.approx(value), (prefix, key)
    assert out[f"{prefix}_dataset.anli"]["accuracy/num_rounds"] == 3
    assert out[f"{prefix}_dataset.anli_r1"]["accuracy/num_templates"] == 15
    columns = [expected[c] for c in p3.PAPER_COLUMNS]
    assert out[f"{prefix}_average"] == pytest.approx(
        {"accuracy": sum(columns) / 8, "accuracy/num_datasets": 8})
    assert out["average"]["accuracy"] == pytest.approx(sum(columns) / 8)


@needs_p3
def test_real_training_files_filtered_by_figure6():
  # Figure 6 spellings ("3.0.0", "samsun") match the released file names.
  prompts = ("ag_news_classify", "cnn_dailymail_3.0.0_generate_story", "samsun_Summarize_")
  assert all(pr in p3.HYPERT5_TRAIN_PROMPTS for pr in prompts)
  out = p3_tasks.register_p3(P3_DIR, hyper_modes=("hyper",), heldout=(), k=2,
                             train_prompts=prompts)
  assert sorted(out["p3_train"]) == [
      "p3.train.ag_news_classify", "p3.train.cnn_dailymail_3_0_0_generate_story",
      "p3.train.samsum_Summarize"]
  ex = common.get_examples("p3.train.ag_news_classify", "train")[0]
  assert ex["targets"] and not ex["targets"].endswith("<|endoftext|>")
  assert ex["hyper_inputs"].count("\x1f") == 2
  with pytest.raises(ValueError, match="unknown P3 held-out"):
    p3_tasks.register_p3(P3_DIR, heldout=("storycloze",))


# The tests below re-register p3.* held-out tasks with other options: keep them after the
# tests that use the module's `real_p3` registration.

@needs_p3
@needs_spm
def test_real_lengths_come_from_task_feature_lengths():
  vocab = common.get_vocabulary("sentencepiece", SPM)
  lengths = {"hyper_inputs": 64, "inputs": 96, "targets": 16}
  out = p3_tasks.register_p3(P3_DIR, vocab, hyper_modes=("hyper", "concat"), k=4,
                             heldout=("super_glue_copa", "super_glue_wic"), include_train=False,
                             max_eval_examples=8, task_feature_lengths=lengths)
  tokens = formatting.special_tokens_for(vocab)
  demos = {"hyper": 0, "concat": 0}
  for name in out["p3_concat_heldout"]:
    hyper_name = name.replace("p3_concat.", "p3.")
    # Token counts (EOS included) as the untrimmed seqio pipeline produces them.
    for task_name, feature, limit in ((name, "inputs", 96), (hyper_name, "hyper_inputs", 64)):
      ds = seqio.get_mixture_or_task(task_name).get_dataset(None, split="validation",
                                                            shuffle=False)
      assert all(len(ex[feature]) <= limit for ex in ds.as_numpy_iterator()), (task_name, feature)
    hyper = common.get_examples(hyper_name, "validation")
    for c, h in zip(common.get_examples(name, "validation"), hyper):
      # The whole query (mode hyper's inputs) ends the concatenated input: none of it is cut.
      assert c["inputs"].endswith(formatting.format_concat_inputs("", h["inputs"], tokens)), name
      demos["concat"] += c["inputs"].count(tokens.x) - 1
      demos["hyper"] += h["hyper_inputs"].count(tokens.x)
  # Demonstrations are kept where they fit (the budgets bind, they do not empty the inputs).
  assert demos["concat"] > 0 and demos["hyper"] > 0
  builder = common.get_builder(out["p3_concat_heldout"][0])
  assert builder.config.max_inputs_length == 96  # not hyper + inputs


@needs_p3
@needs_spm
def test_gin_tasks_p3_registers_with_the_runs_lengths_and_split():
  from hypertune import gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse(
        ["models/t5_tiny.gin", "models/t5_mtf.gin", "runs/train.gin", "tasks/p3.gin"],
        ["MODEL_DIR = '/tmp/x'", f"P3_DATA_DIR = '{P3_DIR}'", f"VOCABULARY_PATH = '{SPM}'",
         "TASK_FEATURE_LENGTHS = {'hyper_inputs': 64, 'inputs': 96, 'targets': 16}",
         # A small registration: one held-out dataset, one training prompt.
         "p3.register_p3.heldout = ['super_glue_cb']", "p3.register_p3.max_eval_examples = 2",
         "p3.register_p3.train_prompts = ['ag_news_classify']",
         "p3.register_p3.hyper_modes = ['hyper', 'concat']"])
    # EVAL_SPLIT is read by train.eval_split and by runs/eval.gin's evaluate_checkpoint.split.
    assert gin.query_parameter("%EVAL_SPLIT") == p3_tasks.EVAL_SPLIT
    out = p3_tasks.register_p3()  # every argument from gin, as train.setup_tasks calls it
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") in out
    assert gin.query_parameter("%EVAL_MIXTURE_OR_TASK_NAME") in out
    task = out["p3_concat_heldout_super_glue_cb"][0]
    assert common.get_builder(task).config.max_inputs_length == 96
    assert common.get_builder(out["p3_heldout"][0]).config.max_hyper_length == 64
    vocab = seqio.get_mixture_or_task(task).output_features["inputs"].vocabulary
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    assert list(common.get_builder(task).task.splits) == [p3_tasks.EVAL_SPLIT]
  finally:
    gin.clear_config()
