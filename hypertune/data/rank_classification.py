"""Rank classification: one scoring example per answer choice.

An evaluation example with `answer_choices` [C] and gold `label` becomes C examples
with the same `hyper_inputs`/`inputs`, `targets` = the choice, and

    example_id    int32  the original example (to group scores back)
    choice_index  int32  position of the choice
    label         int32  gold index (copied)
    is_correct    bool   choice_index == label

The evaluator scores each (summed target log-likelihood), then
`hypertune.metrics.rank_classification_accuracy` takes the argmax per example_id.
This mirrors seqio's `rank_classification` preprocessor, but keeps hyper_inputs.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import seqio
import tensorflow as tf

_SHARED = ("hyper_inputs", "inputs", "task_name", "label", "example_id")


def expand_choices(ds: tf.data.Dataset) -> tf.data.Dataset:
  """String-level expansion of each example into one example per answer choice.

  Examples with no answer_choices produce nothing.
  """

  def expand(ex):
    choices = ex["answer_choices"]
    n = tf.shape(choices)[0]
    idx = tf.range(n, dtype=tf.int32)
    out = {k: tf.repeat(tf.expand_dims(ex[k], 0), n, axis=0) for k in _SHARED if k in ex}
    out["targets"] = choices
    out["choice_index"] = idx
    out["is_correct"] = tf.equal(idx, tf.cast(ex["label"], tf.int32))
    return tf.data.Dataset.from_tensor_slices(out)

  return ds.flat_map(expand)


def expand_example(ex: Mapping) -> List[dict]:
  """Pure-python version of `expand_choices` for one example dict."""
  out = []
  for i, choice in enumerate(ex["answer_choices"]):
    d = {k: ex[k] for k in _SHARED if k in ex}
    d.update(targets=choice, choice_index=i, is_correct=(i == int(ex["label"])))
    out.append(d)
  return out


def get_scoring_dataset(task: seqio.Task, split: str,
                        sequence_length: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """The task's `split` expanded for rank classification and tokenized.

  Runs the task's source and preprocessors, inserting `expand_choices` right before
  tokenization, so targets are the tokenized choices (EOS appended). Feed the result
  to a feature converter with `shuffle=False` order preserved; features
  `example_id`, `choice_index`, `label`, `is_correct` survive until conversion.
  """
  names = [getattr(p, "__name__", repr(p)) for p in task.preprocessors]
  if names != ["tokenize", "append_eos_after_trim"]:
    # Tasks registered by tasks.common have exactly these; others may have
    # text preprocessors we would have to run before expansion.
    raise ValueError(f"task {task.name}: unsupported preprocessors {names} for rank "
                     "classification (expected tokenize, append_eos_after_trim)")
  ds = task.source.get_dataset(split=split, shuffle=False)
  ds = expand_choices(ds)
  ds = seqio.preprocessors.tokenize(ds, output_features=task.output_features)
  ds = seqio.preprocessors.append_eos_after_trim(
      ds, output_features=task.output_features, sequence_length=sequence_length)
  return ds


def get_scoring_batches(
    task: seqio.Task,
    split: str,
    batch_size: int,
    task_feature_lengths: Optional[Mapping[str, int]] = None,
    feature_converter: Optional[seqio.FeatureConverter] = None,
) -> tf.data.Dataset:
  """Batches of model features for rank classification, plus grouping features.

  Each batch has the converter's model features (HyperEncDecFeatureConverter by
  default) and `example_id`, `choice_index`, `label` [B] int32. The last batch is
  not dropped. Order is deterministic.
  """
  from hypertune.data import feature_converters  # pylint: disable=g-import-not-at-top
  lengths = dict(task_feature_lengths or feature_converters.DEFAULT_TASK_FEATURE_LENGTHS)
  converter = feature_converter or feature_converters.HyperEncDecFeatureConverter()
  ds = get_scoring_dataset(task, split, sequence_length=lengths)
  ids = ds.map(lambda ex: {k: tf.cast(ex[k], tf.int32)
                           for k in ("example_id", "choice_index", "label")})
  model = converter(ds, lengths)
  both = tf.data.Dataset.zip((model, ids)).map(lambda a, b: {**a, **b})
  return both.batch(batch_size)
