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
