"""Tests of the three-input example, few-shot sampling, converters, rank classification."""

import logging
import os
import random
import string

import numpy as np
import pytest
import seqio
import tensorflow as tf
from seqio import test_utils

from hypertune.data import eval_batches
from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import formatting
from hypertune import metrics
from hypertune.data import rank_classification
from tasks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPM = os.path.join(REPO, common.T5_VOCAB_RELATIVE_PATH)
T = formatting.SpecialTokens(x="<x>", y="<y>")


# -- formatting ---------------------------------------------------------------

def test_format_hyper_inputs_appendix_a1_layout():
  text, kept = formatting.format_hyper_inputs(
      "Do it.", [("in 1", "out 1"), ("in  2\n", "out 2")], T)
  assert text == "<x> Do it. <x> in 1 <y> out 1 <x> in 2 <y> out 2"
  assert kept == 2
  text, _ = formatting.format_hyper_inputs(None, [("a", "b")], T)
  assert text == "<x> a <y> b"


def test_truncation_drops_whole_demonstrations_from_the_end():
  demos = [(f"input{i}", f"target{i}") for i in range(10)]
  full, _ = formatting.format_hyper_inputs("Instr", demos, T)
  for budget in range(5, len(full) + 5):
    text, kept = formatting.format_hyper_inputs("Instr", demos, T, len, budget)
    assert len(text) <= budget or kept == 0
    # The kept text is exactly the untruncated format of the first `kept` demos.
    assert text == formatting.format_hyper_inputs("Instr", demos[:kept], T)[0]
  _, kept = formatting.format_hyper_inputs("Instr", demos, T, len, 40)
  assert 0 < kept < 10
  with pytest.raises(ValueError, match="length_fn"):
    formatting.format_hyper_inputs("I", demos, T, None, 10)


def test_concat_inputs_format():
  assert formatting.format_concat_inputs("<x> a <y> b", "q", T) == "<x> a <y> b <x> q <y>"
  assert formatting.format_concat_inputs("", "q", T) == "<x> q <y>"


def test_byte_special_tokens_are_single_tokens():
  v = seqio.ByteVocabulary()
  tok = formatting.special_tokens_for(v)
  assert tok == formatting.BYTE_TOKENS
  assert len(v.encode(tok.x)) == 1 and len(v.encode(tok.y)) == 1
  assert v.encode(tok.x) != v.encode(tok.y)


def test_sentencepiece_special_tokens_are_t5_extra_ids():
  if not os.path.exists(SPM):
    pytest.skip("../shared/data/t5_vocab absent")
  v = common.get_vocabulary("sentencepiece", SPM)
  tok = formatting.special_tokens_for(v)
  assert v.encode(f"{tok.x} hello {tok.y} world") == [32099, 21820, 32098, 296]
  with pytest.raises(ValueError, match="extra_ids"):
    formatting.special_tokens_for(seqio.SentencePieceVocabulary(SPM, extra_ids=0))


def test_get_vocabulary_errors():
  with pytest.raises(ValueError, match="spm_path"):
    common.get_vocabulary("sentencepiece")
  with pytest.raises(ValueError, match="unknown vocabulary"):
    common.get_vocabulary("wordpiece")


# -- few-shot sampling --------------------------------------------------------

def test_sample_demonstrations_never_includes_target():
  pool = [(str(i), str(i)) for i in range(20)]
  for seed in range(200):
    rng = random.Random(seed)
    i = seed % 20
    demos = fewshot.sample_demonstrations(pool, 16, rng, exclude_index=i)
    assert len(demos) == 16
    assert (str(i), str(i)) not in demos
    assert len(set(demos)) == 16
  # Fewer available than k: all others, still not the target.
  demos = fewshot.sample_demonstrations(pool[:3], 16, random.Random(0), exclude_index=1)
  assert sorted(demos) == [("0", "0"), ("2", "2")]
  assert fewshot.sample_demonstrations(pool[:1], 4, random.Random(0), exclude_index=0) == []


def test_fixed_demonstrations_are_seeded_per_task():
  pool = [(str(i), "y") for i in range(50)]
  a = fewshot.fixed_demonstrations(pool, 8, 0, "task_a")
  assert a == fewshot.fixed_demonstrations(pool, 8, 0, "task_a")
  assert a != fewshot.fixed_demonstrations(pool, 8, 1, "task_a")
  assert a != fewshot.fixed_demonstrations(pool, 8, 0, "task_b")


def test_balanced_sampling_shows_every_class_before_repeating_one():
  pool = [(f"x{i}", "AB"[i % 5 == 0]) for i in range(40)]  # 8 of class "B", 32 of "A"
  for seed in range(100):
    demos = fewshot.sample_demonstrations(pool, 2, random.Random(seed), exclude_index=seed % 40,
                                          balanced=True)
    assert sorted(y for _, y in demos) == ["A", "B"]
    assert pool[seed % 40] not in demos
    demos = fewshot.sample_demonstrations(pool, 5, random.Random(seed), balanced=True)
    counts = sorted([y for _, y in demos].count(c) for c in "AB")
    assert counts == [2, 3]  # round-robin: the classes differ by at most one
    assert len(set(demos)) == 5
  # Both orders occur (shuffled), and with distinct outputs it is plain random sampling.
  firsts = {fewshot.sample_demonstrations(pool, 2, random.Random(s), balanced=True)[0][1]
            for s in range(20)}
  assert firsts == {"A", "B"}
  distinct = [(str(i), str(i)) for i in range(10)]
  demos = fewshot.sample_demonstrations(distinct, 4, random.Random(0), exclude_index=3,
                                        balanced=True)
  assert len(set(demos)) == 4 and ("3", "3") not in demos
  assert fewshot.fixed_demonstrations(pool, 2, 0, "t", balanced=True) == \
      fewshot.fixed_demonstrations(pool, 2, 0, "t", balanced=True)


def test_relabel_pool_gives_fresh_label_words_shared_by_the_demonstrations():
  """relabel_pool: every training example (with demonstrations) of a classification task
  draws its own label words; its demonstrations show the same mapping, so the words carry
  no meaning beyond the example. Evaluation splits and the zero-shot format keep them."""
  train = [fewshot.TaskExample(f"in{i}", (["no", "yes"][i % 2],), ("no", "yes"), i % 2)
           for i in range(20)]
  task = fewshot.TaskData("cls", {"train": train, "test": train[:4]},
                          eval_pool=[e.demonstration() for e in train])
  pool = tuple("ABCDEFGH")
  cfg = fewshot.HyperConfig(k=2, use_instruction=False, balanced=True, relabel_pool=pool)
  exs = list(fewshot.ExampleBuilder(task, cfg, T).examples("train"))
  mappings = set()
  for i, e in enumerate(exs):
    assert e["answer_choices"][0] != e["answer_choices"][1]
    assert set(e["answer_choices"]) <= set(pool)
    assert e["targets"] == e["answer_choices"][e["label"]] and e["label"] == i % 2
    for part in e["hyper_inputs"].split("<x>")[1:]:
      inp, word = [s.strip() for s in part.split("<y>")]
      assert word == e["answer_choices"][int(inp[2:]) % 2]  # odd inputs are "yes"
    mappings.add(tuple(e["answer_choices"]))
  assert len(mappings) > 10
  # Demonstrations are the ones drawn without relabelling.
  plain = list(fewshot.ExampleBuilder(task, fewshot.HyperConfig(
      k=2, use_instruction=False, balanced=True), T).examples("train"))
  assert [p["hyper_inputs"].count("in") for p in plain] == [e["hyper_inputs"].count("in") for e in exs]
  for split, mode in (("test", "hyper"), ("train", "none")):
    c = fewshot.HyperConfig(k=2, hyper_mode=mode, relabel_pool=pool)
    assert {tuple(e["answer_choices"]) for e in fewshot.ExampleBuilder(task, c, T).examples(split)} \
        == {("no", "yes")}
  with pytest.raises(ValueError, match="relabel_pool has 1 words"):
    list(fewshot.ExampleBuilder(task, fewshot.HyperConfig(k=2, relabel_pool=("A",)), T)
         .examples("train"))


def test_permute_alphabets_applies_one_letter_permutation_per_training_example():
  """permute_alphabets: every training example (with demonstrations) of a generation task
  has one random letter permutation applied to its query, target and demonstrations, and
  capitals follow their small letters; classification tasks and evaluation are untouched."""
  train = [fewshot.TaskExample(s, (s + "q",)) for s in ("ab", "cd", "ef", "gh", "ij", "kl")]
  task = fewshot.TaskData("append_q", {"train": train, "test": train[:2]})
  alphabets = (string.ascii_lowercase, string.ascii_uppercase)
  cfg = fewshot.HyperConfig(k=2, use_instruction=False, permute_alphabets=alphabets)
  endings = set()
  for e in fewshot.ExampleBuilder(task, cfg, T).examples("train"):
    query, target = e["inputs"], e["targets"]
    assert len(target) == 3 and target[:2] == query  # still "append one letter"
    demos = [[s.strip() for s in part.split("<y>")] for part in e["hyper_inputs"].split("<x>")[1:]]
    assert len(demos) == 2 and all(y == x + target[2] for x, y in demos)  # the same ending
    endings.add(target[2])
  assert len(endings) >= 4  # a fresh permutation per example (6 examples)
  upper = fewshot.TaskData("upper", {"train": [fewshot.TaskExample(s, (s.upper(),)) for s in
                                               ("ab", "cd", "ef", "gh")]})
  exs = list(fewshot.ExampleBuilder(upper, cfg, T).examples("train"))
  assert all(e["targets"] == e["inputs"].upper() for e in exs)
  assert {e["inputs"] for e in exs} != {"ab", "cd", "ef", "gh"}
  plain = fewshot.HyperConfig(k=2, use_instruction=False)
  targets = lambda c: [e["targets"] for e in fewshot.ExampleBuilder(task, c, T).examples("test")]
  assert targets(cfg) == targets(plain) == ["abq", "cdq"]
  cls = [fewshot.TaskExample(s, (["no", "yes"][i % 2],), ("no", "yes"), i % 2)
         for i, s in enumerate(("ab", "cd", "ef", "gh"))]
  cls_task = fewshot.TaskData("cls", {"train": cls})
  assert [e["inputs"] for e in fewshot.ExampleBuilder(cls_task, cfg, T).examples("train")] == \
      ["ab", "cd", "ef", "gh"]
  with pytest.raises(ValueError, match="permute_alphabets"):
    fewshot.HyperConfig(permute_alphabets=("abc", "AB"))


def test_hyper_config_validation():
  with pytest.raises(ValueError, match="hyper_mode"):
    fewshot.HyperConfig(hyper_mode="both")
  with pytest.raises(ValueError, match="k must be"):
    fewshot.HyperConfig(k=17)
  with pytest.raises(ValueError, match="demos"):
    fewshot.HyperConfig(demos="all")


def _toy_task(n_train=12, n_test=5, name="toy"):
  train = [fewshot.TaskExample(f"tr{i}", (f"a{i}", f"b{i}")) for i in range(n_train)]
  test = [fewshot.TaskExample(f"te{i}", (f"c{i}", f"d{i}"), ("no", "yes"), i % 2)
          for i in range(n_test)]
  return fewshot.TaskData(
      name=name, splits={"train": train, "test": test}, instruction="Copy.",
      positive_examples=[("p1", "q1"), ("p2", "q2"), ("p3", "q3")],
      eval_pool=[e.demonstration() for e in train])


def test_builder_training_examples_sample_fresh_demos_per_epoch():
  b = fewshot.ExampleBuilder(_toy_task(), fewshot.HyperConfig(k=4, use_instruction=False), T)
  e0 = list(b.examples("train", epoch=0))
  e1 = list(b.examples("train", epoch=1))
  assert [e["inputs"] for e in e0] == [f"tr{i}" for i in range(12)]
  for i, ex in enumerate(e0):
    assert f"<x> tr{i} <y>" not in ex["hyper_inputs"]  # never the target itself
    assert ex["hyper_inputs"].count("<x>") == 4
    assert ex["targets"] in (f"a{i}", f"b{i}")  # a sampled output
    assert ex["references"] == [f"a{i}", f"b{i}"]
  assert [e["hyper_inputs"] for e in e0] != [e["hyper_inputs"] for e in e1]
  assert e0 == list(b.examples("train", epoch=0))  # reproducible


def test_builder_eval_uses_one_fixed_demo_set():
  b = fewshot.ExampleBuilder(_toy_task(), fewshot.HyperConfig(k=3), T)
  exs = list(b.examples("test"))
  assert len({e["hyper_inputs"] for e in exs}) == 1
  assert exs[0]["hyper_inputs"] == b.eval_hyper_inputs()
  assert exs[0]["hyper_inputs"].startswith("<x> Copy. <x> tr")
  demos = b.eval_demonstrations()
  assert len(demos) == 3 and all(d[0].startswith("tr") for d in demos)
  assert [e["targets"] for e in exs] == [f"c{i}" for i in range(5)]
  assert exs[1]["answer_choices"] == ["no", "yes"] and exs[1]["label"] == 1
  assert [e["example_id"] for e in exs] == list(range(5))
  with pytest.raises(KeyError, match="no split 'validation'"):
    list(b.examples("validation"))


def test_builder_positive_examples_setting():
  cfg = fewshot.HyperConfig(demos="positive", k=2)
  b = fewshot.ExampleBuilder(_toy_task(), cfg, T)
  ex = next(b.examples("test"))
  assert ex["hyper_inputs"] == "<x> Copy. <x> p1 <y> q1 <x> p2 <y> q2"
  ex = next(b.examples("train"))
  assert ex["hyper_inputs"] == "<x> Copy. <x> p1 <y> q1 <x> p2 <y> q2"


def test_builder_modes_share_data():
  task = _toy_task()
  hyper = next(fewshot.ExampleBuilder(task, fewshot.HyperConfig(k=2), T).examples("test"))
  concat = next(fewshot.ExampleBuilder(
      task, fewshot.HyperConfig(k=2, hyper_mode="concat"), T).examples("test"))
  none = next(fewshot.ExampleBuilder(
      task, fewshot.HyperConfig(k=2, hyper_mode="none"), T).examples("test"))
  assert hyper["inputs"] == "te0" and hyper["hyper_inputs"]
  assert concat["hyper_inputs"] == ""
  assert concat["inputs"] == hyper["hyper_inputs"] + " <x> te0 <y>"
  assert none["hyper_inputs"] == "" and none["inputs"] == "te0"
  assert hyper["targets"] == concat["targets"] == none["targets"]
  # hyper_instruct: the hypernetwork reads what "hyper" gives it, the downstream reads what
  # "concat" without demonstrations (Llama + definition) gives it.
  instruct = next(fewshot.ExampleBuilder(
      task, fewshot.HyperConfig(k=2, hyper_mode="hyper_instruct"), T).examples("test"))
  definition = next(fewshot.ExampleBuilder(
      task, fewshot.HyperConfig(k=2, hyper_mode="concat", demos="none"), T).examples("test"))
  assert instruct["hyper_inputs"] == hyper["hyper_inputs"]
  assert instruct["inputs"] == definition["inputs"] == "<x> Copy. <x> te0 <y>"


def test_builder_budget_and_truncation_warning(caplog):
  task = _toy_task()
  task.splits["test"].append(fewshot.TaskExample("x" * 50, ("long",)))
  cfg = fewshot.HyperConfig(k=8, max_hyper_length=40, max_inputs_length=20)
  b = fewshot.ExampleBuilder(task, cfg, T, length_fn=len)
  with caplog.at_level(logging.WARNING):
    exs = list(b.examples("test"))
  assert all(len(e["hyper_inputs"]) <= 39 for e in exs)  # 1 position left for EOS
  assert exs[0]["hyper_inputs"].count("<y>") < 8  # whole demos dropped
  assert b.stats["test"].truncated == 1 and b.stats["test"].total == 6
  assert "task toy (test): 1 of 6 examples have inputs longer than 20" in caplog.text
  # concat mode: the demos share the downstream budget with the query.
  cfg = fewshot.HyperConfig(k=8, hyper_mode="concat", max_inputs_length=60)
  b = fewshot.ExampleBuilder(_toy_task(), cfg, T, length_fn=len)
  for e in b.examples("test"):
    assert len(e["inputs"]) <= 59 and e["inputs"].endswith("<y>")
    assert b.stats["test"].truncated == 0


def test_config_for_lengths_budgets_every_mode_by_the_run_lengths():
  lengths = {"hyper_inputs": 40, "inputs": 30, "targets": 8}
  for mode in fewshot.HYPER_MODES:
    cfg = fewshot.config_for_lengths(lengths, hyper_mode=mode, k=3)
    assert (cfg.max_hyper_length, cfg.max_inputs_length, cfg.k) == (40, 30, 3)
  with pytest.raises(ValueError, match=r"lacks \['hyper_inputs'\]"):
    fewshot.config_for_lengths({"inputs": 30, "targets": 8})


def test_longest_fitting_prefix():
  assert fewshot.longest_fitting_prefix("aa bb cc dd", 5, len) == "aa bb"
  assert fewshot.longest_fitting_prefix("aa  bb cc", 8, len) == "aa bb cc"
  assert fewshot.longest_fitting_prefix("aaaa bb", 3, len) is None


def test_long_instruction_is_cut_so_that_the_query_stays_last():
  """A definition longer than the budget is cut at a word, in front of the query (concat) or
  alone (hyper); seqio's trimming from the end would otherwise drop the query."""
  task = _toy_task()
  task.instruction = " ".join(f"w{i}" for i in range(40))  # 159 characters
  lengths = {"hyper_inputs": 40, "inputs": 60, "targets": 8}
  concat = fewshot.ExampleBuilder(
      task, fewshot.config_for_lengths(lengths, hyper_mode="concat", k=2), T, length_fn=len)
  for split in ("train", "test"):
    for raw, e in zip(task.splits[split], concat.examples(split)):
      assert len(e["inputs"]) + 1 <= 60, e["inputs"]
      assert e["inputs"].startswith("<x> w0 w1 w2") and e["inputs"].endswith(
          f"<x> {raw.inputs} <y>")
    assert concat.stats[split].truncated == 0
  hyper = fewshot.ExampleBuilder(task, fewshot.config_for_lengths(lengths, k=2), T, length_fn=len)
  for e in hyper.examples("test"):
    assert e["hyper_inputs"].startswith("<x> w0 w1") and len(e["hyper_inputs"]) + 1 <= 40
    assert "<y>" not in e["hyper_inputs"]  # no room left for a demonstration
  # With room, the whole instruction and the demonstrations are kept.
  roomy = fewshot.ExampleBuilder(task, fewshot.config_for_lengths(
      {"hyper_inputs": 400, "inputs": 400}, hyper_mode="concat", k=2), T, length_fn=len)
  e = next(roomy.examples("test"))
  assert e["inputs"].startswith(f"<x> {task.instruction} <x> tr") and e["inputs"].count("<y>") == 3


def test_truncation_warning_names_the_inputs_length_once_per_split(caplog):
  task = _toy_task()
  task.splits["train"].append(fewshot.TaskExample("x" * 50, ("long",)))
  cfg = fewshot.config_for_lengths({"hyper_inputs": 40, "inputs": 20}, hyper_mode="concat", k=2)
  b = fewshot.ExampleBuilder(task, cfg, T, length_fn=len)
  with caplog.at_level(logging.WARNING):
    for epoch in range(3):
      list(b.examples("train", epoch))
  warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "task toy (train): 1 of 13 examples have inputs longer than 20 tokens" in warnings[0]
  assert b.stats["train"].truncated == 1  # still counted every epoch


# -- feature converters -------------------------------------------------------

def _ds(examples):
  return test_utils.create_default_dataset(
      examples, feature_names=("hyper_inputs", "inputs", "targets"))


def test_enc_dec_converter():
  ds = _ds([{"hyper_inputs": [5, 6, 7, 1], "inputs": [9, 4, 3, 8, 1], "targets": [3, 9, 4, 1]}])
  conv = feature_converters.HyperEncDecFeatureConverter()
  out = conv(ds, {"hyper_inputs": 6, "inputs": 7, "targets": 5})
  test_utils.assert_dataset(out, {
      "hyper_encoder_input_tokens": [5, 6, 7, 1, 0, 0],
      "encoder_input_tokens": [9, 4, 3, 8, 1, 0, 0],
      "decoder_target_tokens": [3, 9, 4, 1, 0],
      "decoder_input_tokens": [0, 3, 9, 4, 1],
      "decoder_loss_weights": [1, 1, 1, 1, 0],
  })


def test_enc_dec_converter_defaults_and_length_check():
  ds = _ds([{"hyper_inputs": list(range(2, 12)), "inputs": [3, 4, 5], "targets": [6, 7, 8]}])
  # seqio convention: trimming is done by seqio.get_dataset (trim_output_features);
  # the converter itself validates lengths.
  with pytest.raises(tf.errors.InvalidArgumentError, match="hyper_inputs"):
    list(feature_converters.HyperEncDecFeatureConverter()(
        ds, {"hyper_inputs": 4, "inputs": 2, "targets": 2}).as_numpy_iterator())
  out = feature_converters.HyperEncDecFeatureConverter()(ds)
  ex = next(out.as_numpy_iterator())
  assert ex["hyper_encoder_input_tokens"].shape == (1024,)
  assert ex["encoder_input_tokens"].shape == (384,)
  assert ex["decoder_target_tokens"].shape == (128,)
  with pytest.raises(ValueError, match="packing"):
    feature_converters.HyperEncDecFeatureConverter(pack=True)


def test_enc_dec_converter_requires_hyper_inputs():
  ds = test_utils.create_default_dataset([{"inputs": [1], "targets": [1]}])
  with pytest.raises(ValueError, match="hyper_inputs"):
    feature_converters.HyperEncDecFeatureConverter()(
        ds, {"hyper_inputs": 4, "inputs": 2, "targets": 2})


def test_decoder_only_converter():
  ds = _ds([{"hyper_inputs": [5, 6, 1], "inputs": [9, 4, 1], "targets": [3, 1]}])
  out = feature_converters.HyperDecoderOnlyFeatureConverter()(
      ds, {"hyper_inputs": 4, "inputs": 4, "targets": 3})
  test_utils.assert_dataset(out, {
      "hyper_decoder_input_tokens": [5, 6, 1, 0],
      "decoder_target_tokens": [9, 4, 1, 3, 1, 0, 0],
      "decoder_input_tokens": [0, 9, 4, 1, 3, 1, 0],
      "decoder_loss_weights": [0, 0, 0, 1, 1, 0, 0],
      "decoder_causal_attention": [1, 1, 1, 1, 0, 0, 0],
  })
  out = feature_converters.HyperDecoderOnlyFeatureConverter(loss_on_targets_only=False)(
      ds, {"hyper_inputs": 4, "inputs": 4, "targets": 3})
  ex = next(out.as_numpy_iterator())
  np.testing.assert_array_equal(ex["decoder_loss_weights"], [1, 1, 1, 1, 1, 0, 0])


# -- metrics ------------------------------------------------------------------

def test_metrics():
  # S-NI's exact match keeps articles (its compute_metrics.py, unlike SQuAD).
  assert metrics.exact_match(["The Cat."], [["the cat"]]) == 100.0
  assert metrics.exact_match(["The Cat."], [["a cat"]]) == 0.0
  assert metrics.rouge_l(["a b c"], [["x y", "a b c"]]) == 100.0
  m = common.generation_metrics([["yes"], ["no", "nope"]], ["yes", "maybe"])
  assert m["exact_match"] == 50.0
  # Macro-F1 over gold classes: a: P=1/2 R=1 F=2/3; b: P=0/0 -> 0, mean 1/3.
  assert metrics.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx(100 / 3)
  assert metrics.macro_f1(["a", "b", "b"], ["a", "b", "b"]) == 100.0
  # A predicted class that is never gold is not averaged (MetaICL), only penalised.
  assert metrics.macro_f1(["a", "c"], ["a", "a"]) == pytest.approx(100 * 2 / 3)
  assert metrics.accuracy([1, 3], [1, 2]) == 50.0
  preds = metrics.rank_classification_predictions([-1, -2, -5, -1], [0, 0, 1, 1], [0, 1, 0, 1])
  assert preds == {0: 0, 1: 1}
  assert metrics.rank_classification_accuracy([-1, -2, -5, -1], [0, 0, 1, 1], [0, 1, 0, 1],
                                              [1, 1, 1, 1]) == 50.0


# -- seqio tasks and rank classification ---------------------------------------

@pytest.fixture(scope="module")
def toy_task_name():
  name = "test_core.toy"
  common.register_three_input_task(name, _toy_task(), fewshot.HyperConfig(k=2),
                                   seqio.ByteVocabulary())
  return name


def test_registered_task_features(toy_task_name):
  task = seqio.get_mixture_or_task(toy_task_name)
  ex = next(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
  assert ex["task_name"] == b"toy"
  assert list(ex["answer_choices"]) == [b"no", b"yes"]
  assert ex["inputs"].tolist() == list(seqio.ByteVocabulary().encode("te0")) + [1]
  assert ex["hyper_inputs_pretokenized"].decode() == common.get_eval_hyper_inputs(toy_task_name)
  assert common.get_eval_demonstrations(toy_task_name) == common.get_builder(
      toy_task_name).eval_demonstrations()
  # The seqio postprocessor turns targets into reference lists for metrics.
  assert common.references_postprocessor("x", {"references": [b"a", b"b"]}, True) == ["a", "b"]


def test_get_batches(toy_task_name):
  ds = common.get_batches(toy_task_name, "train", 4,
                          {"hyper_inputs": 64, "inputs": 8, "targets": 8})
  b = next(ds.as_numpy_iterator())
  assert b["hyper_encoder_input_tokens"].shape == (4, 64)
  assert b["encoder_input_tokens"].shape == (4, 8)
  assert b["decoder_loss_weights"].shape == (4, 8)
  # Training repeats forever with fresh demos: more batches than examples.
  assert len(list(ds.take(10).as_numpy_iterator())) == 10


def test_get_batches_shards_are_disjoint_and_cover_the_split(toy_task_name):
  lengths = {"hyper_inputs": 64, "inputs": 8, "targets": 8}

  def rows(shard_info=None):
    # One shuffled epoch, as whole examples (hyper, inputs, targets token rows).
    ds = common.get_batches(toy_task_name, "train", 3, lengths, seed=0, num_epochs=1,
                            drop_remainder=False, shard_info=shard_info)
    return [tuple(tuple(b[k][i]) for k in ("hyper_encoder_input_tokens", "encoder_input_tokens",
                                            "decoder_target_tokens"))
            for b in ds.as_numpy_iterator() for i in range(len(b["encoder_input_tokens"]))]

  full = rows()
  shards = [rows(seqio.ShardInfo(index=i, num_shards=2)) for i in range(2)]
  assert len(full) == 12 and [len(s) for s in shards] == [6, 6]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(full)
  assert rows(None) == full  # unsharded reads are unchanged and deterministic


def test_unknown_name_lists_close_matches(toy_task_name):
  with pytest.raises(ValueError, match="Close matches.*test_core.toy"):
    common.get_task_or_mixture("test_core.tpy")


def test_expand_choices():
  ds = tf.data.Dataset.from_tensors({
      "hyper_inputs": "h", "inputs": "q", "task_name": "t", "label": 1, "example_id": 7,
      "answer_choices": tf.constant(["no", "yes", "maybe"])})
  out = list(rank_classification.expand_choices(ds).as_numpy_iterator())
  assert [o["targets"] for o in out] == [b"no", b"yes", b"maybe"]
  assert [o["choice_index"] for o in out] == [0, 1, 2]
  assert [bool(o["is_correct"]) for o in out] == [False, True, False]
  assert all(o["example_id"] == 7 and o["inputs"] == b"q" and o["label"] == 1 for o in out)
  py = rank_classification.expand_example(
      {"inputs": "q", "hyper_inputs": "h", "answer_choices": ["a", "b"], "label": 0,
       "example_id": 3})
  assert [(d["targets"], d["is_correct"]) for d in py] == [("a", True), ("b", False)]


def test_scoring_batches(toy_task_name):
  task = seqio.get_mixture_or_task(toy_task_name)
  ds = eval_batches.get_eval_batches(
      [task], "test", 4, {"hyper_inputs": 64, "inputs": 8, "targets": 4}, score_choices=True)
  batches = list(ds.as_numpy_iterator())
  ids = np.concatenate([b["example_id"] for b in batches])
  choice = np.concatenate([b["choice_index"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  assert choice.tolist() == [0, 1] * 5
  assert labels.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
  targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
  v = seqio.ByteVocabulary()
  assert targets[0].tolist() == v.encode("no") + [1, 0]
  assert targets[1].tolist() == v.encode("yes") + [1]
  # An oracle scorer gets 100%.
  scores = (choice == labels).astype(float)
  assert metrics.rank_classification_accuracy(scores, ids, choice, labels) == 100.0


def test_eval_batches_of_many_tasks_match_one_pipeline_per_task(toy_task_name):
  """One pipeline over several tasks gives each task's rows exactly as its own pipeline
  would, in order and tagged with the task's position (a batch may hold two tasks' rows)."""
  common.register_three_input_task("test_core.toy_b", _toy_task(n_test=3, name="toy_b"),
                                   fewshot.HyperConfig(k=1), seqio.ByteVocabulary())
  tasks = [seqio.get_mixture_or_task(n) for n in (toy_task_name, "test_core.toy_b")]
  lengths = {"hyper_inputs": 64, "inputs": 8, "targets": 4}

  def rows(task_list, score_choices):
    batches = list(eval_batches.get_eval_batches(task_list, "test", 4, lengths,
                                                 score_choices=score_choices
                                                 ).as_numpy_iterator())
    assert all(len(b["task_index"]) == 4 for b in batches[:-1])  # batches span tasks
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  for score_choices, rows_per_task in ((False, [5, 3]), (True, [10, 6])):
    together = rows(tasks, score_choices)
    assert together["task_index"].tolist() == sum(([i] * n for i, n in
                                                   enumerate(rows_per_task)), [])
    for index, task in enumerate(tasks):
      alone = rows([task], score_choices)
      mine = together["task_index"] == index
      for k, v in alone.items():
        if k != "task_index":
          np.testing.assert_array_equal(together[k][mine], v)
  with pytest.raises(ValueError, match="no tasks"):
    eval_batches.get_eval_batches([], "test", 4, lengths)
  untrimmed = seqio.Task("test_core.untrimmed", tasks[0].source, tasks[0].output_features,
                         preprocessors=[seqio.preprocessors.tokenize])
  with pytest.raises(ValueError, match="test_core.untrimmed: unsupported preprocessors"):
    eval_batches.get_eval_batches([tasks[0], untrimmed], "test", 4, lengths)
  other_vocab = seqio.Task("test_core.other_vocab", tasks[0].source,
                           common.output_features(seqio.ByteVocabulary(extra_ids=10)),
                           preprocessors=tasks[0].preprocessors)
  with pytest.raises(ValueError, match="other_vocab has other output features"):
    eval_batches.get_eval_batches([tasks[0], other_vocab], "test", 4, lengths)
