"""Task metrics: S-NI ROUGE-L / exact match, accuracy, MetaICL macro-F1.

Scores are on a 0-100 scale like the papers' tables. seqio metric functions take
`(targets, predictions)`; with `tasks.common.references_postprocessor` each target is
the list of references of the example.
"""

from __future__ import annotations

import re
import string
from typing import Dict, List, Sequence, Union

Refs = Union[str, Sequence[str]]


def _as_list(refs: Refs) -> List[str]:
  return [refs] if isinstance(refs, str) else list(refs)


def normalize_answer(s: str) -> str:
  """Lower text, remove punctuation, articles and extra whitespace (SQuAD/S-NI)."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


_ROUGE = None


def _rouge_scorer():
  global _ROUGE
  if _ROUGE is None:
    from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
    # S-NI's official compute_metrics.py uses rougeL with the stemmer.
    _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return _ROUGE


def rouge_l(prediction: str, references: Refs) -> float:
  """Max ROUGE-L F over references (0-1)."""
  scorer = _rouge_scorer()
  return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in _as_list(references))


def exact_match(prediction: str, references: Refs) -> float:
  p = normalize_answer(prediction)
  return float(any(p == normalize_answer(r) for r in _as_list(references)))


def generation_metrics(targets: Sequence[Refs], predictions: Sequence[str]) -> Dict[str, float]:
  """S-NI evaluation: mean exact match and ROUGE-L over examples, x100."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets vs {len(predictions)} predictions")
  if not targets:
    return {"exact_match": 0.0, "rougeL": 0.0}
  em = sum(exact_match(p, t) for t, p in zip(targets, predictions)) / len(targets)
  rl = sum(rouge_l(p, t) for t, p in zip(targets, predictions)) / len(targets)
  return {"exact_match": 100 * em, "rougeL": 100 * rl}


def choice_accuracy_from_strings(targets: Sequence[Refs], predictions: Sequence[str]):
  """Accuracy of generated answers against the gold choice string (normalized)."""
  if not targets:
    return {"accuracy": 0.0}
  acc = sum(exact_match(p, t) for t, p in zip(targets, predictions)) / len(targets)
  return {"accuracy": 100 * acc}


def accuracy(golds: Sequence, predictions: Sequence) -> float:
  if len(golds) != len(predictions):
    raise ValueError(f"{len(golds)} golds vs {len(predictions)} predictions")
  return 100.0 * sum(g == p for g, p in zip(golds, predictions)) / max(len(golds), 1)


def macro_f1(golds: Sequence, predictions: Sequence) -> float:
  """MetaICL classification metric: unweighted mean of per-class F1 over gold classes.

  Classes are those present in the gold labels (MetaICL's `evaluate`).
  """
  if len(golds) != len(predictions):
    raise ValueError(f"{len(golds)} golds vs {len(predictions)} predictions")
  classes = sorted(set(golds), key=str)
  if not classes:
    return 0.0
  f1s = []
  for c in classes:
    tp = sum(1 for g, p in zip(golds, predictions) if g == c and p == c)
    fp = sum(1 for g, p in zip(golds, predictions) if g != c and p == c)
    fn = sum(1 for g, p in zip(golds, predictions) if g == c and p != c)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
  return 100.0 * sum(f1s) / len(f1s)


def rank_classification_predictions(example_ids, choice_indices, scores) -> Dict[int, int]:
  """Groups per-choice scores back into {example_id: argmax choice index}.

  Higher score = more likely (e.g. summed target log-likelihood). Ties go to the
  lower choice index.
  """
  best: Dict[int, tuple] = {}
  for e, c, s in zip(example_ids, choice_indices, scores):
    e, c, s = int(e), int(c), float(s)
    if e not in best or s > best[e][0] or (s == best[e][0] and c < best[e][1]):
      best[e] = (s, c)
  return {e: c for e, (s, c) in best.items()}


def rank_classification_accuracy(example_ids, choice_indices, labels, scores) -> float:
  """Accuracy (x100) of rank classification from flat per-choice arrays."""
  preds = rank_classification_predictions(example_ids, choice_indices, scores)
  gold = {}
  for e, l in zip(example_ids, labels):
    gold[int(e)] = int(l)
  return accuracy([gold[e] for e in sorted(preds)], [preds[e] for e in sorted(preds)])
