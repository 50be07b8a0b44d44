"""Evaluation batches for many tasks from one tf.data pipeline.

seqio builds a pipeline per task (tracing its preprocessors and the feature converter,
about 0.5 s each); an evaluation mixture of a hundred small tasks would spend most of its
time there. Here the tasks' sources are read in order, concatenated, and tokenized and
converted once. Each row keeps `task_index` (the task's position in the list) so the
evaluator can group rows by task (a batch may hold several tasks' rows).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from hypertune.data import feature_converters
from hypertune.data import rank_classification

_PREPROCESSORS = ["tokenize", "append_eos_after_trim"]


def _check_shared_pipeline(tasks: Sequence[seqio.Task]) -> None:
  """Tasks evaluated together must tokenize alike (those of `tasks.common` do)."""
  features = lambda task: {k: (type(f.vocabulary), f.vocabulary.vocab_size, f.add_eos)
                           for k, f in task.output_features.items()}
  for task in tasks:
    names = [getattr(p, "__name__", repr(p)) for p in task.preprocessors]
    if names != _PREPROCESSORS:
      raise ValueError(f"task {task.name}: unsupported preprocessors {names} for evaluation "
                       f"batches (expected {_PREPROCESSORS}, as tasks.common registers)")
    if features(task) != features(tasks[0]):
      raise ValueError(f"task {task.name} has other output features than {tasks[0].name}; "
                       "evaluate tasks with different vocabularies separately")


def get_eval_batches(
    tasks: Sequence[seqio.Task],
    split: str,
    batch_size: int,
    task_feature_lengths: Mapping[str, int],
    feature_converter: Optional[seqio.FeatureConverter] = None,
    score_choices: bool = False,
) -> tf.data.Dataset:
  """Batches of every example of `tasks`' `split`, task after task, in order.

  Each batch has the converter's model features (HyperEncDecFeatureConverter by default)
  and `task_index` [B] int32. With `score_choices` every example becomes one row per
  answer choice (rank classification; `rank_classification.expand_choices`) and batches
  also carry `example_id`, `choice_index`, `label` [B] int32. The last batch is not
  dropped; a batch may hold rows of several tasks.
  """
  if not tasks:
    raise ValueError("get_eval_batches: no tasks")
  _check_shared_pipeline(tasks)
  sources = [tf.data.Dataset.zip((t.source.get_dataset(split=split, shuffle=False),
                                  tf.data.Dataset.from_tensors(np.int32(i)).repeat()))
             for i, t in enumerate(tasks)]
  ds = sources[0]
  for s in sources[1:]:
    ds = ds.concatenate(s)
  ds = ds.map(lambda ex, i: {**ex, "task_index": i})
  side = ["task_index"]
  if score_choices:
    ds = rank_classification.expand_choices(ds)
    side += ["example_id", "choice_index", "label"]
  output_features = tasks[0].output_features
  ds = seqio.preprocessors.tokenize(ds, output_features=output_features)
  ds = seqio.preprocessors.append_eos_after_trim(
      ds, output_features=output_features, sequence_length=task_feature_lengths)
  converter = feature_converter or feature_converters.HyperEncDecFeatureConverter()
  ids = ds.map(lambda ex: {k: tf.cast(ex[k], tf.int32) for k in side})
  both = tf.data.Dataset.zip((converter(ds, task_feature_lengths), ids))
  return both.map(lambda a, b: {**a, **b}).batch(batch_size)
