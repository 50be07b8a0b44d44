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
* P3's headline number (HyperT5 Tables 1-2, T0) is a mean over 8 datasets, each the mean
  over its templates (ANLI over its rounds): :func:`aggregate_task_metrics` adds it.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hypertune.data import p3 as p3_data

__all__ = [
    "normalize_answer",
    "rouge_l",
    "exact_match",
    "rank_classification_predictions",
    "rank_classification_accuracy",
    "macro_f1",
    "accuracy",
    "seed_groups",
    "p3_heldout_groups",
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


def p3_heldout_groups(task_names: Sequence[str]) -> Dict[str, Dict[str, List[str]]]:
    """P3 held-out templates by mode and dataset.

    Args:
      task_names: any task names; only held-out ones (``<mode prefix>.<dataset>_<template>``,
        see :func:`hypertune.data.p3.parse_heldout_task_name`) are kept.

    Returns:
      {mode prefix ("p3", "p3_concat", "p3_zeroshot"): {dataset key: [its template tasks]}},
      in order of first appearance: modes are never mixed.
    """
    groups: Dict[str, Dict[str, List[str]]] = {}
    for name in task_names:
        parsed = p3_data.parse_heldout_task_name(name)
        if parsed:
            prefix, key, _ = parsed
            groups.setdefault(prefix, {}).setdefault(key, []).append(name)
    return groups


def _means(members: Sequence[Mapping[str, float]]) -> Tuple[Dict[str, float], Dict[str, int]]:
    """({metric: unweighted mean over the members reporting it}, {metric: how many})."""
    values: Dict[str, List[float]] = collections.defaultdict(list)
    for m in members:
        for name, value in m.items():
            values[name].append(float(value))
    return ({name: float(np.mean(v)) for name, v in values.items()},
            {name: len(v) for name, v in values.items()})


def _counted(means: Mapping[str, float], counts: Mapping[str, int], what: str) -> Dict[str, float]:
    """``{metric: mean, "<metric>/<what>": count}``."""
    return {**means, **{f"{name}/{what}": n for name, n in counts.items()}}


def _p3_mode_entries(prefix: str, datasets: Mapping[str, Sequence[str]],
                     per_task: Mapping[str, Mapping[str, float]]):
    """The P3 entries of one mode, as the papers' P3 tables compute them.

    Returns (entries, columns, members): ``entries`` for the results
    (``<prefix>_dataset.<key>`` per dataset, ``<prefix>_dataset.anli`` over the rounds and
    ``<prefix>_average`` over the columns); ``columns``: {column entry: metric means}, the
    averaging units; ``members``: {column entry: its template tasks}.
    """
    entries: Dict[str, Dict[str, float]] = {}
    dataset_means: Dict[str, Dict[str, float]] = {}
    for key, names in datasets.items():
        means, counts = _means([per_task[t] for t in names])
        entries[f"{prefix}_dataset.{key}"] = _counted(means, counts, "num_templates")
        dataset_means[key] = means
    columns: Dict[str, Dict[str, float]] = {}
    members: Dict[str, List[str]] = {}
    for column in p3_data.PAPER_COLUMNS:
        keys = [k for k in datasets if p3_data.paper_column(k) == column]
        if not keys:
            continue
        entry = f"{prefix}_dataset.{column}"
        members[entry] = [t for k in keys for t in datasets[k]]
        if keys == [column]:  # a column of one dataset: its entry is the column
            columns[entry] = dataset_means[column]
            continue
        # ANLI: the unweighted mean of its rounds, each the mean over its templates.
        means, rounds = _means([dataset_means[k] for k in keys])
        _, templates = _means([per_task[t] for t in members[entry]])
        entries[entry] = {**_counted(means, rounds, "num_rounds"),
                          **_counted({}, templates, "num_templates")}
        columns[entry] = means
    means, counts = _means(list(columns.values()))
    entries[f"{prefix}_average"] = _counted(means, counts, "num_datasets")
    return entries, columns, members


def _seed_entry(names: Sequence[str], per_task: Mapping[str, Mapping[str, float]]):
    """(``{metric: mean over seeds, "<metric>/std", "<metric>/num_seeds"}``, metric means)."""
    values: Dict[str, List[float]] = collections.defaultdict(list)
    for t in names:
        for name, value in per_task[t].items():
            values[name].append(float(value))
    means = {name: float(np.mean(v)) for name, v in values.items()}
    stats: Dict[str, float] = dict(means)
    for name, v in values.items():
        stats[f"{name}/std"] = float(np.std(v))
        stats[f"{name}/num_seeds"] = len(v)
    return stats, means


def _weighted_average(units: Mapping[str, Mapping[str, float]],
                      unit_weights: Mapping[str, float]) -> Dict[str, float]:
    """{metric: weighted mean over the units reporting it, "<metric>/num_tasks": count}."""
    sums: Dict[str, float] = collections.defaultdict(float)
    norms: Dict[str, float] = collections.defaultdict(float)
    counts: Dict[str, int] = collections.defaultdict(int)
    for unit, metrics in units.items():
        w = unit_weights[unit]
        for name, value in metrics.items():
            sums[name] += w * float(value)
            norms[name] += w
            counts[name] += 1
    out = {name: sums[name] / norms[name] for name in sums if norms[name] > 0}
    for name in sums:
        out[f"{name}/num_tasks"] = counts[name]
    return out


def aggregate_task_metrics(
    per_task: Mapping[str, Mapping[str, float]],
    weights: Optional[Mapping[str, float]] = None,
) -> Dict[str, Dict[str, float]]:
    """Adds seed averages, P3 dataset columns and an ``average`` entry over tasks.

    Seed relabellings of one source task (see :func:`seed_groups`) get an entry
    ``symbol_avg.<src>``: ``{metric: mean over seeds, "<metric>/std": population std,
    "<metric>/num_seeds": n}``, and count once in ``average`` (through that mean), so a
    source task with 10 evaluation seeds weighs as much as a task evaluated once.

    P3 held-out tasks (one per dataset and template, ``<mode>.<dataset>_<template>``; see
    :func:`p3_heldout_groups`) are averaged as the HyperT5 and T0 P3 tables do, per mode
    ``<mode>`` = ``p3`` / ``p3_concat`` / ``p3_zeroshot`` (modes are never mixed):

    * ``<mode>_dataset.<dataset>`` (e.g. ``p3_dataset.anli_r1``, ``p3_dataset.super_glue_cb``):
      ``{metric: unweighted mean over its templates, "<metric>/num_templates": n}``;
    * ``<mode>_dataset.anli``: the unweighted mean of the ANLI rounds' entries (R1, R2, R3),
      with ``"<metric>/num_rounds"`` and ``"<metric>/num_templates"`` (over all rounds);
    * ``<mode>_average``: the unweighted mean over the 8 columns ANLI, HellaSwag, CB, COPA,
      RTE, WiC, WSC, WinoGrande (``hypertune.data.p3.PAPER_COLUMNS``; ANLI counted once),
      with ``"<metric>/num_datasets"`` (fewer than 8 when only some datasets were evaluated).

    In ``average`` each column counts as one task, replacing its templates: when the
    evaluated tasks are one mode's P3 held-out tasks (the P3 runs' evaluation mixture) and
    there are no ``weights``, ``average`` equals ``<mode>_average``, the papers' Avg column,
    so the trainer's logs show that number. Per-template entries are kept as they are.

    Args:
      per_task: {task_name: {metric_name: value}}.  Tasks may report different
        metrics (e.g. rank classification vs generation); each metric is averaged
        over the tasks that report it, and ``average/num_tasks`` records how many
        (a seed group and a P3 column counting one).
      weights: optional {task_name: weight}, e.g. example counts for a micro average;
        a seed group or a P3 column weighs the mean of its tasks' weights (the
        ``<mode>_*`` entries themselves are always unweighted).

    Returns:
      A copy of ``per_task`` plus the ``symbol_avg.<src>``, ``<mode>_dataset.<dataset>``
      and ``<mode>_average`` entries and ``{"average": {metric: mean, ...}}``.
    """
    if "average" in per_task:
        raise ValueError("'average' is reserved for the aggregate and cannot be a task name")
    added: Dict[str, Dict[str, float]] = {}  # the seed and P3 entries
    groups: Dict[str, Dict[str, float]] = {}  # averaging unit -> its metric means
    members: Dict[str, List[str]] = {}  # averaging unit -> the tasks it stands for
    for group, names in seed_groups(list(per_task)).items():
        added[group], groups[group] = _seed_entry(names, per_task)
        members[group] = names
    for prefix, datasets in p3_heldout_groups(list(per_task)).items():
        entries, columns, column_members = _p3_mode_entries(prefix, datasets, per_task)
        added.update(entries)
        groups.update(columns)
        members.update(column_members)
    clash = sorted(set(added) & set(per_task))
    if clash:
        raise ValueError(f"{clash[0]!r} is reserved for an aggregate (a seed average or a P3 "
                         "dataset/average entry) and cannot be a task name")
    out = {task: dict(m) for task, m in per_task.items()}
    out.update(added)
    grouped = {t for names in members.values() for t in names}
    # Averaging units: each ungrouped task, then each group through its means.
    units = {t: m for t, m in per_task.items() if t not in grouped}
    units.update(groups)
    members.update({t: [t] for t in per_task if t not in grouped})
    unit_weights = {u: 1.0 if weights is None
                    else float(np.mean([float(weights[t]) for t in members[u]]))
                    for u in units}
    out["average"] = _weighted_average(units, unit_weights)
    return out
