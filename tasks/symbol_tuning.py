"""seqio registry for symbol tuning over already-registered classification tasks.

`register_symbol_tuning(source_tasks)` registers, for each source task ``<src>``
(registered through tasks.common, e.g. ``builtin.task441_longer_than`` or
``metaicl_hr_to_lr.glue_sst2``):

* ``symbol.<src>`` - training split(s) relabelled per example (fresh mapping each
  example and epoch; demonstrations share it); evaluation splits with eval seed 0;
* ``symbol_s<j>.<src>`` for j in 1..NUM_EVAL_SEEDS-1 - the other evaluation
  relabellings; mixture ``symbol_eval`` holds all seeds and ``symbol_train`` the
  training tasks. Evaluation results add ``symbol_avg.<src>`` (mean and std over the
  seeds) and count each source once in the overall average
  (`hypertune.metrics.aggregate_task_metrics`, which relies on these names).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import gin
import seqio

from hypertune.data import fewshot
from hypertune.data import formatting
from hypertune.data import symbol_tuning
from tasks import common


def _register(name, builder, vocabulary):
    return common.register_three_input_task(name, builder.task, builder.config, vocabulary,
                                          builder=builder)


@gin.configurable
def register_symbol_tuning(
    source_tasks: Sequence[str],
    vocabulary: Optional[seqio.Vocabulary] = None,
    k: int = 16,
    seed: int = 0,
    num_eval_seeds: int = symbol_tuning.NUM_EVAL_SEEDS,
    max_hyper_length: int = 1024,
    max_inputs_length: int = 384,
) -> Dict[str, List[str]]:
  vocabulary = vocabulary or seqio.ByteVocabulary()
  tokens = formatting.special_tokens_for(vocabulary)
  cfg = fewshot.HyperConfig(k=k, seed=seed, max_hyper_length=max_hyper_length,
                            max_inputs_length=max_inputs_length)
  train, evals = {}, {}
  for src in source_tasks:
    task = common.get_builder(src).task
    for j in range(num_eval_seeds):
      name = f"symbol.{src}" if j == 0 else f"symbol_s{j}.{src}"
      b = symbol_tuning.SymbolTuningBuilder(task, cfg, tokens, common.length_fn_for(vocabulary), j)
      _register(name, b, vocabulary)
      if j == 0 and task.num_examples("train"):
        train[name] = float(task.num_examples("train"))
      n_eval = sum(len(v) for s, v in task.splits.items() if s != "train")
      if n_eval:
        evals[name] = float(n_eval)
  out = {}
  for mix, rates in (("symbol_train", train), ("symbol_eval", evals)):
    if rates:
      common.register_mixture(mix, rates)
      out[mix] = list(rates)
  return out
