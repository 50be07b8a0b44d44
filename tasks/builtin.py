"""seqio registry for the built-in meta-learning suite (no data files needed).

`register_builtin_suite()` generates the suite deterministically
(hypertune.data.builtin_suite), writes it in the S-NI schema to a cache directory,
reads it back through the S-NI loader and registers, per hyper_mode:

=====================  ==========================================================
name                   what
=====================  ==========================================================
builtin_train          mixture of the training-family tasks; splits "train" and
                       "validation" (first `num_validation` instances per task)
builtin_heldout        all held-out tasks; split "test"
builtin_heldout_families / builtin_heldout_compositions / builtin_heldout_label_words
                       the three held-out subsets; split "test"
builtin.<task>         one task (e.g. builtin.task001_first_n)
=====================  ==========================================================

with ``builtin_concat*`` (demos concatenated into `inputs`: T5-MTF-Few-shot) and
``builtin_zeroshot*`` (inputs only: T5-MTF) variants reading the same data. Training
mixtures are merged tasks
(`tasks.common.register_merged_task`): one tf.data pipeline for hundreds of small tasks.

Default setting "fewshot": the hypernetwork reads K=8 demonstrations
``<x> in <y> out ...`` (no definition; "def_2pos" and "def_fewshot" are available).
Classification tasks carry `answer_choices`/`label` for rank classification.
Default vocabulary: seqio.ByteVocabulary (`<x>` = "\\x1e", `<y>` = "\\x1f").
Suggested lengths for a tiny model: hyper_inputs 256, inputs 32 (concat: 288),
targets 16 (see SUGGESTED_TASK_FEATURE_LENGTHS).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import gin
import seqio

from hypertune.data import builtin_suite
from tasks import sni as sni_tasks

SUGGESTED_TASK_FEATURE_LENGTHS = {"hyper_inputs": 256, "inputs": 32, "targets": 16}
SUGGESTED_CONCAT_TASK_FEATURE_LENGTHS = {"hyper_inputs": 1, "inputs": 288, "targets": 16}


@gin.configurable
def register_builtin_suite(
    data_dir: Optional[str] = None,
    seed: int = 0,
    vocabulary: Optional[seqio.Vocabulary] = None,
    setting: str = "fewshot",
    k: int = 8,
    hyper_modes: Sequence[str] = ("hyper", "concat", "none"),
    num_validation: int = 16,
    config: Optional[builtin_suite.SuiteConfig] = None,
    task_feature_lengths: Mapping[str, int] = SUGGESTED_TASK_FEATURE_LENGTHS,
    prefix: str = "builtin",
    balanced_demos: bool = False,
    relabel_train: bool = False,
) -> Dict[str, List[str]]:
  """Generates (or reuses) the suite and registers it; returns {mixture: tasks}.

  Args:
    data_dir: where to write/read the S-NI JSON files; None = a cache directory
      (~/.cache/hypertune/builtin_suite_v<version>_seed<seed>, or $HYPERTUNE_CACHE).
    seed: suite seed (task parameters, instances and the composition split).
    vocabulary: defaults to seqio.ByteVocabulary().
    setting: S-NI setting for what the hypernetwork reads (see hypertune.data.sni).
    k: number of demonstrations (sampled per example in training; fixed per task,
      chosen once with `seed`, at evaluation).
    hyper_modes: which of "hyper", "concat", "none" to register.
    num_validation: instances per training task held out as split "validation".
    config: sizes of the suite (default: SuiteConfig(), as bound in gin).
    task_feature_lengths: the run's TASK_FEATURE_LENGTHS; whole demonstrations that do not
      fit `hyper_inputs` (or, concatenated with the query, `inputs`) are dropped.
    prefix: name prefix.
    balanced_demos: draw the demonstrations of classification tasks one class at a time
      (with k=2: one per class); see `fewshot.HyperConfig.balanced`.
    relabel_train: training examples (with demonstrations) are relabelled, so that a model
      cannot memorise the tasks and has to read them off the demonstrations: classification
      examples draw fresh label words from the training pool, transformation examples a
      fresh permutation of the letters (an `append` task's ending "q" becomes another).
  """
  config = config or builtin_suite.SuiteConfig()
  out_dir = builtin_suite.write_suite(data_dir, seed=seed, config=config)
  return sni_tasks.register_sni_layout(
      out_dir,
      vocabulary=vocabulary or seqio.ByteVocabulary(),
      prefix=prefix,
      settings=(setting,),
      hyper_modes=hyper_modes,
      setting_in_name=False,
      k=k,
      seed=seed,
      max_train_instances=max(config.train_instances, config.transform_train_instances),
      max_eval_instances=config.heldout_instances,
      num_validation=num_validation,
      mixing_cap=None,
      task_feature_lengths=task_feature_lengths,
      list_aliases={"test": "heldout"},
      balanced_demos=balanced_demos,
      relabel_pool=builtin_suite.TRAIN_LABEL_WORDS if relabel_train else (),
      permute_alphabets=((builtin_suite.LETTERS, builtin_suite.LETTERS.upper()) if relabel_train
                         else ()),
  )
