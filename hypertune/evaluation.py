"""Evaluation as at deployment: PEFT parameters are generated once per task from its fixed
demonstrations, then every query of the task runs with them (no hypernetwork call per query).

Rank classification (P3 protocol: the answer choice with the highest total target
log-likelihood; accuracy) and generation (greedy or beam; ROUGE-L with S-NI's scoring, exact
match), per task and averaged.
"""
import functools
import json
import logging
import os
from typing import Dict, Mapping, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from hypertune import metrics as metrics_lib
from hypertune.data import eval_batches
from hypertune.models.base import TARGET_FEATURES, BaseModel

# What a model's score / predict read of an evaluation batch.
MODEL_BATCH_FEATURES = BaseModel.FEATURES + TARGET_FEATURES


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
  """Pad the batch axis to `size` (one compiled shape for the last, smaller batch)."""
  n = len(next(iter(batch.values())))
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) if n < size else v
          for k, v in batch.items()}


def detokenize(vocab, tokens) -> list:
  """Decoded `[batch, length]` token ids -> strings, each cut at its first EOS (id 1)."""
  out = []
  for row in np.asarray(tokens).tolist():
    row = row[:row.index(1)] if 1 in row else row
    out.append(vocab.decode([t for t in row if t > 1]))  # drop pad (0)
  return out


@gin.configurable(denylist=["model", "task_feature_lengths", "batch_size", "num_beams"])
class Evaluator:
  """Scores or decodes tasks through the model contract; compiled functions are shared.

  Tasks with `answer_choices` get rank classification; with `generate_classification` they
  are also decoded (S-NI's protocol scores every task by generation, which also shows whether
  a model knows a task's label words at all).
  """

  def __init__(self, model: BaseModel, task_feature_lengths: Mapping[str, int],
               batch_size: int = 32, max_decode_len: Optional[int] = None, num_beams: int = 1,
               generate_classification: bool = False):
    self.model = model
    self.lengths = dict(task_feature_lengths)
    self.batch_size = batch_size
    self.max_decode_len = max_decode_len or self.lengths["targets"]
    self.num_beams = num_beams
    self.generate_classification = generate_classification
    self.predictions: Dict[str, list] = {}  # of the last `evaluate`
    # Compiled once and shared by every task (one shape: batches are padded).
    self._task_parameters = jax.jit(model.task_parameters)
    self._score = jax.jit(model.score)
    self._predict = jax.jit(functools.partial(model.predict, max_decode_len=self.max_decode_len,
                                              num_beams=num_beams))

  def task_parameters(self, params, method_state, batch, num_rows: int):
    """Per-row task parameters for a batch that may hold several tasks' rows: each task's
    parameters are written once, from its first row (a task's rows share its
    demonstrations), then gathered to its rows. The hypernetwork runs on the batch's tasks
    padded to a power of two: a few compiled shapes, never a call per query."""
    if not self.model.has_hypernet:
      return None
    task_index = np.asarray(batch["task_index"][:num_rows])
    starts = np.flatnonzero(np.r_[True, task_index[1:] != task_index[:-1]])
    row_to_task = np.zeros(len(batch["task_index"]), np.int32)  # padding rows: task 0
    row_to_task[:num_rows] = np.cumsum(np.r_[True, task_index[1:] != task_index[:-1]]) - 1
    size = min(1 << (len(starts) - 1).bit_length(), self.batch_size)
    hyper = _pad_batch({"h": batch["hyper_encoder_input_tokens"][starts]}, size)["h"]
    per_task = self._task_parameters(params, method_state, jnp.asarray(hyper))
    return jax.tree.map(lambda x: jnp.take(x, row_to_task, axis=0), per_task)

  def _batches(self, params, method_state, task_names: Sequence[str], split: str,
               score_choices: bool):
    """(rows, padded model batch, per-row task parameters) for every batch of all tasks'
    rows, read through one pipeline; a batch may hold the rows of several tasks."""
    tasks = [seqio.get_mixture_or_task(name) for name in task_names]
    batches = eval_batches.get_eval_batches(tasks, split, self.batch_size, self.lengths,
                                            score_choices=score_choices)
    for rows in batches.as_numpy_iterator():
      padded = _pad_batch(rows, self.batch_size)
      task_params = self.task_parameters(params, method_state, padded, len(rows["task_index"]))
      features = {k: jnp.asarray(v) for k, v in padded.items() if k in MODEL_BATCH_FEATURES}
      yield rows, features, task_params

  def rank_classification(self, params, task_names: Sequence[str], split: str,
                          method_state=None) -> Dict[str, Dict[str, float]]:
    """{task: {"accuracy": %}}: the choice with the highest summed target log-likelihood."""
    columns = []  # (task index, scores, example ids, choices, labels) of each batch
    for rows, batch, task_params in self._batches(params, method_state or {}, task_names,
                                                  split, True):
      s = np.asarray(self._score(params, task_params, batch))[:len(rows["task_index"])]
      columns.append((rows["task_index"], s, rows["example_id"], rows["choice_index"],
                      rows["label"]))
    task_index, *rest = (np.concatenate(c) for c in zip(*columns))
    return {name: {"accuracy": metrics_lib.rank_classification_accuracy(
        *(c[task_index == i] for c in rest))}
            for i, name in enumerate(task_names) if np.any(task_index == i)}

  def generation(self, params, task_names: Sequence[str], split: str,
                 references: Mapping[str, Sequence[Sequence[str]]],
                 method_state=None) -> Dict[str, Dict]:
    """{task: {"rougeL", "exact_match", "predictions": [str]}}: every query decoded;
    `references[task]` are the task's examples' reference lists."""
    predictions = {name: [] for name in task_names}
    # Tasks evaluated together share their vocabulary (eval_batches checks it).
    vocab = seqio.get_mixture_or_task(task_names[0]).output_features["targets"].vocabulary
    for rows, batch, task_params in self._batches(params, method_state or {}, task_names,
                                                  split, False):
      tokens = np.asarray(self._predict(params, task_params, batch))
      for i, text in zip(rows["task_index"], detokenize(vocab, tokens[:len(rows["task_index"])])):
        predictions[task_names[i]].append(text)
    for name in task_names:
      if len(predictions[name]) != len(references[name]):
        raise RuntimeError(f"{name}: {len(predictions[name])} predictions for "
                           f"{len(references[name])} references")
    return {name: {"rougeL": metrics_lib.rouge_l(predictions[name], references[name]),
                   "exact_match": metrics_lib.exact_match(predictions[name], references[name]),
                   "predictions": predictions[name]}
            for name in task_names}

  def evaluate(self, params, task_names: Sequence[str], split: str,
               method_state=None) -> Dict[str, Dict]:
    """{task: {metric: value}, "symbol_avg.<src>": {metric: mean/std over its seeds},
    "p3_dataset.<dataset>" / "p3_average": P3's per-dataset means and the papers' 8-column
    average, "average": {metric: mean over tasks, a source's seeds and a P3 dataset's
    templates counting once}} (`metrics.aggregate_task_metrics`).

    The decoded outputs are kept in `self.predictions`: {task: [{"inputs", "prediction",
    "references"}]}, one per query, for `write_results`.
    """
    from tasks import common  # pylint: disable=g-import-not-at-top
    examples = {name: common.get_examples(name, split) for name in task_names}
    # On the device once, not with every compiled call (host arrays are copied each time).
    params, method_state = jax.device_put((params, method_state or {}))
    classification = [n for n in task_names if examples[n] and examples[n][0].get("answer_choices")]
    generated = [n for n in task_names if n not in classification or self.generate_classification]
    results = {name: {} for name in task_names}
    self.predictions = {}
    if classification:
      for name, r in self.rank_classification(params, classification, split,
                                                   method_state).items():
        results[name].update(r)
    if generated:
      references = {n: [ex["references"] for ex in examples[n]] for n in generated}
      for name, r in self.generation(params, generated, split, references,
                                           method_state).items():
        predictions = r.pop("predictions")
        self.predictions[name] = [
            {"inputs": ex["inputs"], "prediction": p, "references": list(ex["references"])}
            for ex, p in zip(examples[name], predictions)]
        results[name].update(r)
    for name in task_names:  # per task on --verbosity=1; the files have them all
      logging.debug("eval %s: %s", name, results[name])
    return metrics_lib.aggregate_task_metrics(results)


def write_results(model_dir: str, step: int, results: Mapping, name: str = "results",
                  predictions: Optional[Mapping[str, Sequence[Mapping]]] = None) -> str:
  """`MODEL_DIR/eval/<name>_step<step>.json` ("results" for evaluations during training) and,
  with `predictions` (`Evaluator.predictions`), `<name>_step<step>_predictions.jsonl`: one
  line per decoded query, {"task", "inputs", "prediction", "references"}."""
  os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
  path = os.path.join(model_dir, "eval", f"{name}_step{step}.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  if predictions:
    with open(path[:-len(".json")] + "_predictions.jsonl", "w") as f:
      for task, rows in predictions.items():
        for row in rows:
          f.write(json.dumps({"task": task, **row}) + "\n")
  return path


@gin.configurable(denylist=["model", "params", "step", "model_dir", "task_feature_lengths",
                            "mixture_or_task_name", "method_state"])
def evaluate_checkpoint(model: BaseModel, params, step: int, model_dir: str,
                        task_feature_lengths: Mapping[str, int], mixture_or_task_name: str,
                        method_state=None,
                        eval_mixture_or_task_name: str = gin.REQUIRED, split: str = "test",
                        batch_size: int = 32, num_beams: int = 1) -> Dict[str, Dict]:
  """Evaluate restored parameters once (the `hypertune.eval` binary).

  Writes `MODEL_DIR/eval/<eval_mixture_or_task_name>_<split>_step<N>.json`, beside (never
  over) the results written during training.
  """
  from tasks import common  # pylint: disable=g-import-not-at-top
  del mixture_or_task_name  # the training mixture; evaluation has its own
  evaluator = Evaluator(model, task_feature_lengths, batch_size, num_beams=num_beams)
  results = evaluator.evaluate(params, common.mixture_tasks(eval_mixture_or_task_name), split,
                               method_state)
  if jax.process_index() != 0:  # every process evaluates alike (multi-host); one writes
    return results
  logging.info("eval of step %d: average %s -> %s", step, results.get("average"),
               write_results(model_dir, step, results,
                             name=f"{eval_mixture_or_task_name}_{split}",
                             predictions=evaluator.predictions))
  return results
