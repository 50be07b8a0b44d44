"""Rank classification: one scoring example per answer choice.

An evaluation example with `answer_choices` [C] and gold `label` becomes C examples
with the same `hyper_inputs`/`inputs`, `targets` = the choice, and

    example_id    int32  the original example (to group scores back)
    choice_index  int32  position of the choice
    label         int32  gold index (copied)
    is_correct    bool   choice_index == label

`hypertune.data.eval_batches.get_eval_batches(..., score_choices=True)` applies it before
tokenization; the evaluator scores each row (summed target log-likelihood), then
`hypertune.metrics.rank_classification_accuracy` takes the argmax per example_id.
This mirrors seqio's `rank_classification` preprocessor, but keeps hyper_inputs.
"""

from __future__ import annotations

from typing import List, Mapping

import tensorflow as tf

_SHARED = ("hyper_inputs", "inputs", "task_name", "label", "example_id", "task_index")


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
