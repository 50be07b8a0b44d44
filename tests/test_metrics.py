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


# Synthetic P3 held-out results: {dataset key: template accuracies}. ANLI has 9-15 templates
# per round, the others 1-3, so a mean over templates is dominated by ANLI; R3 has fewer
# templates, so the mean over rounds differs from the mean over ANLI's templates.
P3_SCORES = {
    "anli_r1": [30.0 + j for j in range(15)],  # mean 37
    "anli_r2": [33.0, 34.0, 35.0] * 5,  # mean 34
    "anli_r3": [31.0] * 9,  # mean 31
    "hellaswag": [25.0, 27.0],  # 26
    "super_glue_cb": [60.0, 70.0, 80.0],  # 70
    "super_glue_copa": [70.0, 80.0],  # 75
    "super_glue_rte": [60.0, 70.0],  # 65
    "super_glue_wic": [50.0],  # 50
    "super_glue_wsc.fixed": [60.0, 62.0],  # 61
    "winogrande": [52.0, 54.0],  # 53
}
# ANLI = (37 + 34 + 31) / 3 = 34; the 8 columns: 34, 26, 70, 75, 65, 50, 61, 53.
P3_AVERAGE = (34 + 26 + 70 + 75 + 65 + 50 + 61 + 53) / 8  # 54.25


def _p3_results(prefix="p3", offset=0.0):
    return {f"{prefix}.{key}_template_{j}": {"accuracy": acc + offset}
            for key, accs in P3_SCORES.items() for j, acc in enumerate(accs)}


def test_p3_heldout_groups_by_mode_and_dataset():
    names = ["p3.anli_r1_GPT_3_style", "p3_concat.anli_r1_GPT_3_style", "p3.anli_r1_MNLI_crowdsource",
             "p3.super_glue_wsc.fixed_GPT_3_Style", "p3.train.ag_news_classify", "p3tf.x_y", "copa"]
    assert metrics.p3_heldout_groups(names) == {
        "p3": {"anli_r1": ["p3.anli_r1_GPT_3_style", "p3.anli_r1_MNLI_crowdsource"],
               "super_glue_wsc.fixed": ["p3.super_glue_wsc.fixed_GPT_3_Style"]},
        "p3_concat": {"anli_r1": ["p3_concat.anli_r1_GPT_3_style"]},
    }


def test_aggregate_p3_per_dataset_as_the_papers():
    per_task = _p3_results()
    out = metrics.aggregate_task_metrics(per_task)
    assert out["p3_dataset.anli_r1"] == {"accuracy": 37.0, "accuracy/num_templates": 15}
    assert out["p3_dataset.anli_r2"]["accuracy"] == pytest.approx(34.0)
    assert out["p3_dataset.super_glue_cb"] == {"accuracy": 70.0, "accuracy/num_templates": 3}
    assert out["p3_dataset.super_glue_wsc.fixed"]["accuracy"] == pytest.approx(61.0)
    # ANLI: the mean of its three rounds (each over its templates), counted once below.
    assert out["p3_dataset.anli"] == pytest.approx(
        {"accuracy": 34.0, "accuracy/num_rounds": 3, "accuracy/num_templates": 39})
    anli = [s for k in ("anli_r1", "anli_r2", "anli_r3") for s in P3_SCORES[k]]
    assert sum(anli) / len(anli) == pytest.approx(1344 / 39)  # ~34.5: not the round rule
    assert out["p3_average"] == pytest.approx({"accuracy": P3_AVERAGE, "accuracy/num_datasets": 8})
    # The headline average is the 8-column mean, not the mean over the 53 templates.
    per_template = sum(s for accs in P3_SCORES.values() for s in accs) / 53
    assert per_template == pytest.approx(2164 / 53)  # ~40.8: ANLI's 39 templates weigh 74%
    assert out["average"]["accuracy"] == pytest.approx(P3_AVERAGE)
    assert out["average"]["accuracy/num_tasks"] == 8
    assert out["p3.anli_r1_template_3"] == {"accuracy": 33.0}  # per-template entries kept


def test_aggregate_p3_keeps_modes_apart_and_weights_columns():
    per_task = {**_p3_results(), **_p3_results("p3_concat", offset=10.0),
                "p3.train.ag_news_classify": {"accuracy": 0.0}}
    out = metrics.aggregate_task_metrics(per_task)
    assert out["p3_average"]["accuracy"] == pytest.approx(P3_AVERAGE)
    assert out["p3_concat_average"]["accuracy"] == pytest.approx(P3_AVERAGE + 10)
    assert out["p3_concat_dataset.anli"]["accuracy"] == pytest.approx(44.0)
    assert "p3_zeroshot_average" not in out
    # 16 columns and one training task (not a held-out name, so a unit of its own).
    assert out["average"]["accuracy"] == pytest.approx((16 * P3_AVERAGE + 80) / 17)
    assert out["average"]["accuracy/num_tasks"] == 17
    # A column weighs the mean of its templates' weights; the p3_* entries stay unweighted.
    per_task = _p3_results()
    w = {t: 3.0 if ".super_glue_cb_" in t else 1.0 for t in per_task}
    weighted = metrics.aggregate_task_metrics(per_task, weights=w)
    assert weighted["average"]["accuracy"] == pytest.approx((8 * P3_AVERAGE + 2 * 70) / 10)
    assert weighted["p3_average"]["accuracy"] == pytest.approx(P3_AVERAGE)


def test_aggregate_p3_partial_datasets_and_metrics():
    # Only ANLI R2 and WiC evaluated; WiC also decoded (exact_match) -- each metric is
    # averaged over the columns that report it.
    per_task = {"p3.anli_r2_a": {"accuracy": 40.0}, "p3.anli_r2_b": {"accuracy": 30.0},
                "p3.super_glue_wic_a": {"accuracy": 50.0, "exact_match": 20.0}}
    out = metrics.aggregate_task_metrics(per_task)
    assert out["p3_dataset.anli"] == {"accuracy": 35.0, "accuracy/num_rounds": 1,
                                      "accuracy/num_templates": 2}
    assert out["p3_average"] == {"accuracy": 42.5, "accuracy/num_datasets": 2,
                                 "exact_match": 20.0, "exact_match/num_datasets": 1}
    with pytest.raises(ValueError, match="'p3_average' is reserved"):
        metrics.aggregate_task_metrics({**per_task, "p3_average": {"accuracy": 1.0}})


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
  # `*_`: further arguments (e.g. method state) play no part in what is faked here.
  ev.rank_classification = lambda params, names, split, *_: {n: {"accuracy": 50.0} for n in names}
  ev.generation = lambda params, names, split, refs, *_: {
      n: {"exact_match": 100.0 * (refs[n] == [["a"]]), "predictions": ["a"]} for n in names}
  results = ev.evaluate(None, ["cls", "gen"], "test")
  assert results["gen"] == {"exact_match": 0.0}
  assert results["cls"] == ({"accuracy": 50.0, "exact_match": 100.0} if generate_classification
                            else {"accuracy": 50.0})
