"""Evaluation metrics (pure Python/NumPy; no JAX).

Conventions follow the papers hypertune reproduces:

* Generation tasks use Super-NaturalInstructions' official scorer
  (``compute_metrics.py`` of S-NI / Tk-Instruct): ROUGE-L F-measure from
  ``rouge-score`` with its default tokenizer and ``use_stemmer=True``; exact
  match after S-NI's ``normalize_answer`` (lower-case, strip punctuation,
  collapse whitespace -- S-NI deliberately does *not* remove articles, unlike
  SQuAD).  Each prediction takes the max over its references.  Scores are on a
  0-100 scale as S-NI reports them.
* Classification tasks use rank classification (the P3 / T0 protocol): every
  answer choice is scored by the model's total target log-likelihood and the
  highest-scoring choice is the prediction.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "normalize_answer",
    "rouge_l",
    "exact_match",
    "rank_classification_predictions",
    "rank_classification_accuracy",
    "macro_f1",
    "accuracy",
    "seed_groups",
    "aggregate_task_metrics",
]

_PUNCTUATION = frozenset(string.punctuation)
_ROUGE_SCORER = None


def normalize_answer(text: str) -> str:
    """S-NI's answer normalisation: lower-case, drop ASCII punctuation, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def _rouge_scorer():
    # Building a RougeScorer loads the Porter stemmer; do it once per process.
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def _as_reference_lists(predictions: Sequence[str], references: Sequence) -> list:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "they must be aligned one-to-one"
        )
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"example {i} has an empty reference list")
        out.append(refs)
    return out


def rouge_l(predictions: Sequence[str], references_lists: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (0-100), max over each example's references.

    Args:
      predictions: N predicted strings.
      references_lists: N lists of reference strings (a bare string counts as one reference).

    Returns:
      100 * mean_i max_j rougeL_f(prediction_i, reference_ij); 0.0 for N == 0.
    """
    refs = _as_reference_lists(predictions, references_lists)
    if not refs:
        return 0.0
    scorer = _rouge_scorer()
    total = 0.0
    for pred, ref_list in zip(predictions, refs):
        total += max(scorer.score(target=r, prediction=pred)["rougeL"].fmeasure for r in ref_list)
    return 100.0 * total / len(refs)


def exact_match(predictions: Sequence[str], references_lists: Sequence[Sequence[str]]) -> float:
    """Mean exact match (0-100) after :func:`normalize_answer`, max over references."""
    refs = _as_reference_lists(predictions, references_lists)
    if not refs:
        return 0.0
    hits = 0
    for pred, ref_list in zip(predictions, refs):
        p = normalize_answer(pred)
        hits += any(p == normalize_answer(r) for r in ref_list)
    return 100.0 * hits / len(refs)


def rank_classification_predictions(
    scores: Sequence[float],
    example_ids: Sequence[Hashable],
    choice_indices: Sequence[int],
) -> Dict[Hashable, int]:
    """Picks, per example, the choice with the highest total log-likelihood.

    Inputs are flat and aligned: one row per (example, choice) pair, as a scoring
    pass over a rank-classification dataset produces them.

    Args:
      scores: [R] total target log-likelihood of each row (sum over target tokens).
      example_ids: [R] id of the example each row belongs to.
      choice_indices: [R] index of the answer choice the row scores.

    Returns:
      {example_id: index of the best choice}.  Ties go to the lowest choice index
      so results do not depend on row order.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (len(scores) == len(example_ids) == len(choice_indices)):
        raise ValueError(
            "scores, example_ids and choice_indices must have one entry per row; got lengths "
            f"{len(scores)}, {len(example_ids)}, {len(choice_indices)}"
        )
    best: Dict[Hashable, tuple] = {}
    for score, ex, choice in zip(scores, example_ids, choice_indices):
        if np.isnan(score):
            raise ValueError(f"NaN score for example {ex!r}, choice {choice}")
        key = (score, -int(choice))
        if ex not in best or key > best[ex]:
            best[ex] = key
    return {ex: -key[1] for ex, key in best.items()}


def rank_classification_accuracy(
    scores: Sequence[float],
    example_ids: Sequence[Hashable],
    choice_indices: Sequence[int],
    labels: Mapping[Hashable, int] | Sequence[int],
) -> float:
    """Rank-classification accuracy (0-100).

    Args:
      scores, example_ids, choice_indices: flat per-row arrays, see
        :func:`rank_classification_predictions`.
      labels: the correct choice index per example: either a mapping
        {example_id: label} or a per-row sequence aligned with ``scores`` (every row of
        an example must then carry the same label).

    Returns:
      100 * fraction of examples whose highest-scoring choice equals the label.
    """
    preds = rank_classification_predictions(scores, example_ids, choice_indices)
    if not isinstance(labels, Mapping):
        if len(labels) != len(example_ids):
            raise ValueError(
                f"per-row labels must have one entry per row ({len(example_ids)}), got {len(labels)}"
            )
        per_example: Dict[Hashable, int] = {}
        for ex, lab in zip(example_ids, labels):
            if per_example.setdefault(ex, int(lab)) != int(lab):
                raise ValueError(
                    f"example {ex!r} has inconsistent labels across its rows: "
                    f"{per_example[ex]} and {int(lab)}"
                )
        labels = per_example
    if not preds:
        return 0.0
    missing = [ex for ex in preds if ex not in labels]
    if missing:
        raise KeyError(f"no label for example ids {missing[:5]} (showing up to 5)")
    correct = sum(int(preds[ex] == int(labels[ex])) for ex in preds)
    return 100.0 * correct / len(preds)


def macro_f1(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """MetaICL's Macro-F1 (0-100), as its ``MetaICLData.evaluate`` computes it.

    The mean of per-class F1 over the *gold* classes; a gold class that is never predicted
    has precision 1.0 (and recall 0, so F1 0); predicted classes that are never gold are not
    averaged (they count only against the recall of the true class).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        return 0.0
    correct_by_pred = collections.defaultdict(list)
    correct_by_gold = collections.defaultdict(list)
    for p, g in zip(predictions, labels):
        correct_by_pred[p].append(p == g)
        correct_by_gold[g].append(p == g)
    f1s = []
    for c, hits in correct_by_gold.items():
        precision = float(np.mean(correct_by_pred[c])) if c in correct_by_pred else 1.0
        recall = float(np.mean(hits))
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return 100.0 * float(np.mean(f1s))


def accuracy(predictions: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Fraction (0-100) of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    return 100.0 * sum(p == g for p, g in zip(predictions, labels)) / max(len(labels), 1)


# Evaluation relabellings of one source task under several seeds (tasks/symbol_tuning.py):
# ``<prefix>.<src>`` is seed 0, ``<prefix>_s<j>.<src>`` seed j; results add
# ``<prefix>_avg.<src>`` with the mean and std over its seeds.
SEED_GROUP_PREFIXES = ("symbol",)
_SEED_TASK = re.compile(r"^(%s)(?:_s(\d+))?\.(.+)$" % "|".join(map(re.escape, SEED_GROUP_PREFIXES)))


def seed_groups(task_names: Sequence[str]) -> Dict[str, List[str]]:
    """Groups seed relabellings of a source task: ``symbol.<src>``/``symbol_s<j>.<src>``.

    Args:
      task_names: any task names; those not following the seed naming are ignored.

    Returns:
      {``symbol_avg.<src>``: [its task names, by seed]}, in order of first appearance.
    """
    groups: Dict[str, List[Tuple[int, str]]] = {}
    for name in task_names:
        m = _SEED_TASK.match(name)
        if m:
            prefix, seed, src = m.groups()
            groups.setdefault(f"{prefix}_avg.{src}", []).append((int(seed or 0), name))
    return {g: [name for _, name in sorted(members)] for g, members in groups.items()}


def aggregate_task_metrics(
    per_task: Mapping[str, Mapping[str, float]],
    weights: Optional[Mapping[str, float]] = None,
) -> Dict[str, Dict[str, float]]:
    """Adds per-source seed averages and an ``average`` entry over tasks.

    Seed relabellings of one source task (see :func:`seed_groups`) get an entry
    ``symbol_avg.<src>``: ``{metric: mean over seeds, "<metric>/std": population std,
    "<metric>/num_seeds": n}``, and count once in ``average`` (through that mean), so a
    source task with 10 evaluation seeds weighs as much as a task evaluated once.

    Args:
      per_task: {task_name: {metric_name: value}}.  Tasks may report different
        metrics (e.g. rank classification vs generation); each metric is averaged
        over the tasks that report it, and ``average/num_tasks`` records how many
        (a seed group counting one).
      weights: optional {task_name: weight}, e.g. example counts for a micro average;
        a seed group weighs the mean of its seeds' weights.

    Returns:
      A copy of ``per_task`` plus the ``symbol_avg.<src>`` entries and
      ``{"average": {metric: mean, ...}}``.
    """
    if "average" in per_task:
        raise ValueError("'average' is reserved for the aggregate and cannot be a task name")
    groups = seed_groups(list(per_task))
    clash = sorted(set(groups) & set(per_task))
    if clash:
        raise ValueError(f"{clash[0]!r} is reserved for a seed average and cannot be a task name")
    grouped = {t for members in groups.values() for t in members}
    out = {task: dict(m) for task, m in per_task.items()}
    # Averaging units: each ungrouped task, and each seed group through its seed means.
    units = {t: m for t, m in per_task.items() if t not in grouped}
    unit_weights = {t: 1.0 if weights is None else float(weights[t]) for t in units}
    for group, members in groups.items():
        values: Dict[str, List[float]] = collections.defaultdict(list)
        for t in members:
            for name, value in per_task[t].items():
                values[name].append(float(value))
        stats: Dict[str, float] = {name: float(np.mean(v)) for name, v in values.items()}
        for name, v in values.items():
            stats[f"{name}/std"] = float(np.std(v))
            stats[f"{name}/num_seeds"] = len(v)
        out[group] = stats
        units[group] = {name: stats[name] for name in values}
        unit_weights[group] = (1.0 if weights is None
                               else float(np.mean([float(weights[t]) for t in members])))
    sums: Dict[str, float] = collections.defaultdict(float)
    norms: Dict[str, float] = collections.defaultdict(float)
    counts: Dict[str, int] = collections.defaultdict(int)
    for unit, metrics in units.items():
        w = unit_weights[unit]
        for name, value in metrics.items():
            sums[name] += w * float(value)
            norms[name] += w
            counts[name] += 1
    out["average"] = {name: sums[name] / norms[name] for name in sums if norms[name] > 0}
    for name in sums:
        out["average"][f"{name}/num_tasks"] = counts[name]
    return out
