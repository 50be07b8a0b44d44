"""Tests for hypertune.metrics."""

import pytest
from rouge_score import rouge_scorer

from hypertune import metrics


def test_rouge_l_equals_rouge_score_on_known_strings():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds = ["The cat sat on the mat.", "running dogs", "completely unrelated", ""]
    refs = [["the cat is on the mat"], ["a dog runs", "run dog"], ["nothing here"], ["x"]]
    expected = []
    for p, rs in zip(preds, refs):
        expected.append(max(scorer.score(target=r, prediction=p)["rougeL"].fmeasure for r in rs))
    assert metrics.rouge_l(preds, refs) == pytest.approx(100 * sum(expected) / len(expected))
    # Hand-checked: LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens.
    assert metrics.rouge_l(["The cat sat on the mat."], [["the cat is on the mat"]]) == pytest.approx(100 * 5 / 6)
    # Stemming and max over references: "running dogs" == "run dog" after Porter stemming.
    assert metrics.rouge_l(["running dogs"], [["a cat", "run dog"]]) == pytest.approx(100.0)
    # A bare string counts as one reference.
    assert metrics.rouge_l(["Yes"], ["yes"]) == pytest.approx(100.0)


def test_exact_match_uses_sni_normalisation():
    assert metrics.normalize_answer("  The  Cat, sat!! ") == "the cat sat"
    assert metrics.exact_match(["The Cat!"], [["the cat"]]) == 100.0
    # S-NI keeps articles (unlike SQuAD), so "a cat" != "cat".
    assert metrics.exact_match(["a cat"], [["cat"]]) == 0.0
    assert metrics.exact_match(["no", "Positive."], [["yes", "No"], ["negative"]]) == 50.0


def test_length_and_empty_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        metrics.rouge_l(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="example 0 has an empty reference list"):
        metrics.exact_match(["a"], [[]])
    assert metrics.rouge_l([], []) == 0.0


def test_rank_classification_picks_highest_total_log_likelihood():
    # Rows are (example, choice); scores are summed target log-likelihoods.
    rows = [
        ("ex1", 0, -5.0), ("ex1", 1, -2.0), ("ex1", 2, -9.0),   # -> 1
        ("ex2", 0, -1.0), ("ex2", 1, -1.5),                     # -> 0
        ("ex3", 2, -3.0), ("ex3", 0, -3.0), ("ex3", 1, -4.0),   # tie 0/2 -> lowest index 0
    ]
    ids = [r[0] for r in rows]
    choices = [r[1] for r in rows]
    scores = [r[2] for r in rows]
    assert metrics.rank_classification_predictions(scores, ids, choices) == {"ex1": 1, "ex2": 0, "ex3": 0}
    labels = {"ex1": 1, "ex2": 1, "ex3": 0}
    assert metrics.rank_classification_accuracy(scores, ids, choices, labels) == pytest.approx(200 / 3)
    per_row = [labels[i] for i in ids]
    assert metrics.rank_classification_accuracy(scores, ids, choices, per_row) == pytest.approx(200 / 3)


def test_rank_classification_errors():
    with pytest.raises(ValueError, match="one entry per row"):
        metrics.rank_classification_predictions([0.0, 1.0], ["a"], [0, 1])
    with pytest.raises(ValueError, match="inconsistent labels"):
        metrics.rank_classification_accuracy([0.0, 1.0], ["a", "a"], [0, 1], [0, 1])
    with pytest.raises(KeyError, match="no label"):
        metrics.rank_classification_accuracy([0.0], ["a"], [0], {"b": 0})
    with pytest.raises(ValueError, match="NaN"):
        metrics.rank_classification_predictions([float("nan")], ["a"], [0])


def test_macro_f1():
    # MetaICL averages over gold classes only: a: P=1/2 R=1/2 -> .5; b: P=1 R=1/2 -> 2/3;
    # c is predicted but never gold, so it is not averaged.
    preds = ["a", "b", "a", "c"]
    gold = ["a", "b", "b", "a"]
    assert metrics.macro_f1(preds, gold) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    # A gold class never predicted: precision 1.0 by MetaICL's convention, recall 0 -> F1 0.
    assert metrics.macro_f1(["a", "a"], ["a", "b"]) == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert metrics.macro_f1(["x", "y"], ["x", "y"]) == 100.0


def test_aggregate_task_metrics():
    out = metrics.aggregate_task_metrics(
        {"copa": {"accuracy": 60.0}, "rte": {"accuracy": 80.0}, "sni_task1": {"rougeL": 40.0, "exact_match": 10.0}}
    )
    assert out["average"]["accuracy"] == 70.0
    assert out["average"]["rougeL"] == 40.0
    assert out["average"]["accuracy/num_tasks"] == 2
    assert out["copa"] == {"accuracy": 60.0}
    weighted = metrics.aggregate_task_metrics({"a": {"acc": 0.0}, "b": {"acc": 100.0}}, weights={"a": 1, "b": 3})
    assert weighted["average"]["acc"] == 75.0
    with pytest.raises(ValueError, match="reserved"):
        metrics.aggregate_task_metrics({"average": {"acc": 1.0}})


def test_seed_groups_collect_symbol_relabellings_by_source():
    names = ["symbol_s2.metaicl.glue_sst2", "copa", "symbol.metaicl.glue_sst2", "symbol_s10.b",
             "symbol.b", "symbolic.x", "symbol_avg.c", "pre_symbol.d"]
    assert metrics.seed_groups(names) == {
        "symbol_avg.metaicl.glue_sst2": ["symbol.metaicl.glue_sst2", "symbol_s2.metaicl.glue_sst2"],
        # Numeric seed order, not string order ("s10" after "s2").
        "symbol_avg.b": ["symbol.b", "symbol_s10.b"],
    }
    assert metrics.seed_groups(["copa", "rte"]) == {}


def test_aggregate_averages_seeds_per_source_and_weighs_each_source_once():
    # Source "a": 10 seeds with accuracies 0, 10, ..., 90 (mean 45, population std ~28.72);
    # source "b": 2 seeds; plus an ordinary task.
    per_task = {("symbol.a" if j == 0 else f"symbol_s{j}.a"): {"accuracy": 10.0 * j} for j in range(10)}
    per_task.update({"symbol.b": {"accuracy": 80.0}, "symbol_s1.b": {"accuracy": 100.0},
                     "copa": {"accuracy": 30.0}, "sni": {"rougeL": 50.0}})
    out = metrics.aggregate_task_metrics(per_task)
    assert out["symbol_avg.a"]["accuracy"] == pytest.approx(45.0)
    assert out["symbol_avg.a"]["accuracy/std"] == pytest.approx(28.7228, abs=1e-4)
    assert out["symbol_avg.a"]["accuracy/num_seeds"] == 10
    assert out["symbol_avg.b"] == {"accuracy": 90.0, "accuracy/std": 10.0, "accuracy/num_seeds": 2}
    assert out["symbol_s3.a"] == {"accuracy": 30.0}  # per-seed entries are kept
    # Three units for accuracy (a, b, copa), not 13 seed tasks: (45 + 90 + 30) / 3.
    assert out["average"]["accuracy"] == pytest.approx(55.0)
    assert out["average"]["accuracy/num_tasks"] == 3
    assert out["average"]["rougeL"] == 50.0 and out["average"]["rougeL/num_tasks"] == 1
    # Weighted: a seed group weighs the mean of its seeds' weights (one seed's examples).
    w = {t: 1.0 for t in per_task}
    w.update({"symbol.b": 2.0, "symbol_s1.b": 2.0})
    weighted = metrics.aggregate_task_metrics(per_task, weights=w)
    assert weighted["average"]["accuracy"] == pytest.approx((45 + 2 * 90 + 30) / 4)
    # The result is JSON-serialisable as written by evaluation.write_results.
    import json
    assert json.loads(json.dumps(out))["symbol_avg.b"]["accuracy"] == 90.0
    with pytest.raises(ValueError, match="'symbol_avg.b' is reserved"):
        metrics.aggregate_task_metrics({"symbol.b": {"acc": 1.0}, "symbol_avg.b": {"acc": 1.0}})


@pytest.mark.parametrize("generate_classification", [False, True])
def test_evaluator_decodes_classification_tasks_only_when_asked(monkeypatch,
                                                                 generate_classification):
  from hypertune import evaluation
  from tasks import common
  examples = {"cls": [{"inputs": "q", "answer_choices": ["a", "b"], "references": ["a"]}],
              "gen": [{"inputs": "q", "references": ["xyz"]}]}
  monkeypatch.setattr(common, "get_examples", lambda name, split: examples[name])
  ev = object.__new__(evaluation.Evaluator)  # no model: scoring and decoding are faked
  ev.generate_classification = generate_classification
  ev.rank_classification = lambda params, names, split: {n: {"accuracy": 50.0} for n in names}
  ev.generation = lambda params, names, split, refs: {
      n: {"exact_match": 100.0 * (refs[n] == [["a"]]), "predictions": ["a"]} for n in names}
  results = ev.evaluate(None, ["cls", "gen"], "test")
  assert results["gen"] == {"exact_match": 0.0}
  assert results["cls"] == ({"accuracy": 50.0, "exact_match": 100.0} if generate_classification
                            else {"accuracy": 50.0})
