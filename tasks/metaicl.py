"""seqio registry for MetaICL splits (e.g. hr_to_lr).

Names: ``metaicl_<split>.<task>`` (hyper), ``metaicl_<split>_concat.<task>`` (MetaICL's
own in-context concatenation), ``metaicl_<split>_zeroshot.<task>``; mixtures
``metaicl_<split>_train`` (one merged task) and ``metaicl_<split>_test`` (`mixture_name`).
Test tasks use the k=16 examples of ``<task>_16_<seed>_train.jsonl`` as their fixed
demonstrations (all 16, order fixed by the seed). Tasks whose files are absent (MISSING_BLOBS.txt) are skipped
and counted in the log. Metrics: Macro-F1 for classification tasks, accuracy otherwise.

Budgets: `task_feature_lengths` "hyper_inputs" and "inputs" (the whole concatenation in
"concat" mode), as for S-NI; gin/tasks/metaicl.gin configures a run.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import seqio

from hypertune import metrics
from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import metaicl
from hypertune.data import p3
from tasks import common
from tasks.sni import variant_name


def macro_f1_from_strings(targets, predictions):
  golds = [t[0] if isinstance(t, (list, tuple)) else t for t in targets]
  return {"macro_f1": metrics.macro_f1(list(predictions), golds)}


def accuracy_from_strings(targets, predictions):
  golds = [t[0] if isinstance(t, (list, tuple)) else t for t in targets]
  return {"accuracy": metrics.accuracy(list(predictions), golds)}


@gin.configurable
def mixture_name(split: str = "hr_to_lr", mode: str = "hyper", role: str = "train") -> str:
  """The mixture `register_metaicl` registers, e.g. metaicl_hr_to_lr_concat_test."""
  return f"{variant_name(f'metaicl_{split}', None, mode)}_{role}"


@gin.configurable
def register_metaicl(
    data_dir: str,
    split: str = "hr_to_lr",
    vocabulary: Optional[seqio.Vocabulary] = None,
    hyper_modes: Sequence[str] = ("hyper", "concat", "none"),
    k: int = 16,
    seed: int = 100,
    max_eval_examples: Optional[int] = None,
    mixing_cap: Optional[int] = None,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
) -> Dict[str, List[str]]:
  """Registers a MetaICL split from `data_dir`; returns {mixture: tasks}.

  max_eval_examples: first examples of each test task (None: all).
  """
  vocabulary = vocabulary or seqio.ByteVocabulary()
  cfg_split = metaicl.read_config(data_dir, split)
  loaded = {"train": [], "test": []}
  skipped = []
  for role in ("train", "test"):
    for task in cfg_split[role]:
      td, why = metaicl.load_task(data_dir, task, role, k, seed, max_eval_examples)
      if td is None:
        skipped.append(why)
      else:
        loaded[role].append(td)
  if skipped:
    logging.info("MetaICL %s: %d tasks skipped (%s ...)", split, len(skipped), skipped[0])
  out = {}
  for mode in hyper_modes:
    variant = variant_name(f"metaicl_{split}", None, mode)
    cfg = fewshot.config_for_lengths(task_feature_lengths, hyper_mode=mode,
                                     use_instruction=False, demos="sampled", k=k, seed=seed)
    for role in ("train", "test"):
      sizes = {}
      for td in loaded[role]:
        name = f"{variant}.{p3.sanitize(td.name)}"
        fns = None
        if role == "test":
          is_cls = metaicl.task_type(data_dir, td.name) == "classification"
          fns = [macro_f1_from_strings if is_cls else accuracy_from_strings]
        common.register_three_input_task(name, td, cfg, vocabulary, metric_fns=fns)
        sizes[name] = td.num_examples(role)
      if sizes:
        rates = common.size_proportional_rates(sizes, mixing_cap if role == "train" else None)
        if role == "train":  # One pipeline for dozens of tasks (see register_merged_task).
          common.register_merged_task(f"{variant}_{role}", rates, vocabulary, seed=seed)
        else:
          common.register_mixture(f"{variant}_{role}", rates)
        out[f"{variant}_{role}"] = list(rates)
  return out
