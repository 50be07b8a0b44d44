"""seqio registry for symbol tuning over already-registered classification tasks.

`register_symbol_tuning(source_tasks)` registers, for each source task ``<src>``
(registered through tasks.common, e.g. ``builtin.task441_longer_than`` or
``metaicl_hr_to_lr.glue_sst2``):

* ``symbol.<src>`` - training split(s) relabelled per example (fresh mapping each
  example and epoch; demonstrations share it); evaluation splits with eval seed 0;
* ``symbol_s<j>.<src>`` for j in 1..NUM_EVAL_SEEDS-1 - the other evaluation
  relabellings; mixture ``symbol_eval`` holds all seeds of all sources,
  ``symbol_seeds.<src>`` those of one source and ``symbol_train`` (one merged task) the
  training tasks. Evaluation results add ``symbol_avg.<src>`` (mean and
  std over the seeds) and count each source once in the overall average
  (`hypertune.metrics.aggregate_task_metrics`, which relies on these names).

`source_mixtures` adds the classification tasks (one fixed label set) of registered
mixtures, e.g. a MetaICL split's; gin/tasks/symbol_tuning.gin does so for MetaICL.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import seqio

from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import formatting
from hypertune.data import symbol_tuning
from tasks import common


def _register(name, builder, vocabulary):
  return common.register_three_input_task(name, builder.task, builder.config, vocabulary,
                                          builder=builder)


def classification_sources(mixtures: Sequence[str],
                           max_classes: Optional[int] = None) -> List[str]:
  """The tasks of `mixtures` with one fixed label set (`symbol_tuning.is_classification`)
  of at most `max_classes` labels: relabelling multiple-choice options that change with
  every example would mean nothing, and nor would classes the demonstrations cannot show."""
  names = [t for m in mixtures for t in common.mixture_tasks(m)]
  keep = []
  for t in names:
    task = common.get_builder(t).task
    if symbol_tuning.is_classification(task) and (
        max_classes is None or symbol_tuning.num_classes(task) <= max_classes):
      keep.append(t)
  logging.info("symbol tuning: %d of %d tasks of %s are classification tasks with <= %s "
               "classes", len(keep), len(names), list(mixtures), max_classes)
  return keep


@gin.configurable
def register_symbol_tuning(
    source_tasks: Sequence[str] = (),
    vocabulary: Optional[seqio.Vocabulary] = None,
    k: int = 16,
    seed: int = 0,
    num_eval_seeds: int = symbol_tuning.NUM_EVAL_SEEDS,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
    source_mixtures: Sequence[str] = (),
    max_classes: Optional[int] = None,
) -> Dict[str, List[str]]:
  """Registers symbol tuning over `source_tasks` plus the classification tasks of
  `source_mixtures` with at most `max_classes` classes (all registered through
  tasks.common); returns {mixture: tasks}.

  Budgets: `task_feature_lengths` "hyper_inputs" (the relabelled demonstrations) and
  "inputs" (the query).
  """
  sources = list(dict.fromkeys(
      list(source_tasks) + classification_sources(source_mixtures, max_classes)))
  if not sources:
    raise ValueError(f"symbol tuning: no source tasks (source_tasks={list(source_tasks)}, "
                     f"no classification task in source_mixtures={list(source_mixtures)})")
  vocabulary = vocabulary or seqio.ByteVocabulary()
  tokens = formatting.special_tokens_for(vocabulary)
  cfg = fewshot.config_for_lengths(task_feature_lengths, k=k, seed=seed)
  train, evals = {}, {}
  out = {}
  for src in sources:
    task = common.get_builder(src).task
    seeds = {}
    for j in range(num_eval_seeds):
      name = f"symbol.{src}" if j == 0 else f"symbol_s{j}.{src}"
      b = symbol_tuning.SymbolTuningBuilder(task, cfg, tokens, common.length_fn_for(vocabulary), j)
      _register(name, b, vocabulary)
      if j == 0 and task.num_examples("train"):
        train[name] = float(task.num_examples("train"))
      n_eval = sum(len(v) for s, v in task.splits.items() if s != "train")
      if n_eval:
        seeds[name] = float(n_eval)
    if seeds:  # one source under every evaluation seed
      common.register_mixture(f"symbol_seeds.{src}", seeds)
      out[f"symbol_seeds.{src}"] = list(seeds)
      evals.update(seeds)
  if train:  # One pipeline for dozens of tasks (see register_merged_task).
    common.register_merged_task("symbol_train", train, vocabulary, seed=seed)
    out["symbol_train"] = list(train)
  if evals:
    common.register_mixture("symbol_eval", evals)
    out["symbol_eval"] = list(evals)
  return out
