"""Shared seqio glue: vocabularies, three-input Tasks, mixtures and name lookup.

Every Task registered through `register_three_input_task` yields three-input examples
(see `hypertune.data.fewshot`), tokenizes `hyper_inputs`, `inputs`, `targets` with the
given vocabulary (EOS appended) and keeps the string/int side features
(`task_name`, `references`, `answer_choices`, `label`, `example_id`, and
`*_pretokenized` copies) for evaluation.

Training data order and resuming: the Tasks of `register_three_input_task` and
`register_merged_task` read an `EpochDataSource`, which shuffles each epoch itself (seeded
by the data seed) and can start at any example, so `get_batches(start_batch=N)` resumes a
training stream without reading the N batches before it. seqio Mixtures
(`register_mixture`) and other sources (`GeneratorDataSource`, e.g. tasks.pretraining's
documents) cannot seek: they read and drop them.

Nothing here does I/O at import: data is read when a register_* function is called.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import itertools
import logging
import random
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from hypertune.data import fewshot
from hypertune.data import formatting
from hypertune import metrics as metrics_lib

THREE_INPUT_SIGNATURE = {
    "hyper_inputs": tf.TensorSpec([], tf.string),
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "task_name": tf.TensorSpec([], tf.string),
    "references": tf.TensorSpec([None], tf.string),
    "answer_choices": tf.TensorSpec([None], tf.string),
    "label": tf.TensorSpec([], tf.int32),
    "example_id": tf.TensorSpec([], tf.int32),
}

T5_VOCAB_RELATIVE_PATH = "../shared/data/t5_vocab/spiece.model"

# Task name -> the ExampleBuilder behind it (for evaluation demos and inspection).
_BUILDERS: Dict[str, fewshot.ExampleBuilder] = {}
# Mixture name -> {task name: rate} for tasks registered here.
_MIXTURES: Dict[str, Dict[str, float]] = {}


@gin.configurable
def get_vocabulary(kind: str = "byte", spm_path: Optional[str] = None,
                   extra_ids: int = 100) -> seqio.Vocabulary:
  """A seqio vocabulary: "byte" (ByteVocabulary) or "sentencepiece" (needs spm_path).

  The T5 SentencePiece model is used with its 100 extra ids, of which <extra_id_0>
  and <extra_id_1> mark `<x>` and `<y>` (see hypertune.data.formatting). There is
  deliberately no gs:// default: pass the path (e.g. ../shared/data/t5_vocab/spiece.model).
  """
  if kind == "byte":
    return seqio.ByteVocabulary()
  if kind == "sentencepiece":
    if not spm_path:
      raise ValueError("get_vocabulary(kind='sentencepiece') needs spm_path")
    return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
  raise ValueError(f"unknown vocabulary kind {kind!r}; use 'byte' or 'sentencepiece'")


def output_features(vocabulary: seqio.Vocabulary) -> Dict[str, seqio.Feature]:
  return {
      "hyper_inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def length_fn_for(vocabulary: seqio.Vocabulary) -> Callable[[str], int]:
  """Number of tokens of a string under `vocabulary` (no EOS)."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return lambda s: len(s.encode("utf-8"))
  return lambda s: len(vocabulary.encode(s))


def _decode(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def references_postprocessor(output, example=None, is_target=False):
  """seqio postprocess_fn: targets become the example's list of references."""
  if is_target and example is not None and "references" in example:
    return [_decode(r) for r in example["references"]]
  return output


class GeneratorDataSource(seqio.FunctionDataSource):
  """FunctionDataSource over an in-memory example generator.

  File-level shuffling is meaningless for an in-memory source; Task.get_dataset
  shuffles the preprocessed examples itself, so the source is always read in order
  (this also avoids seqio's per-task "uncached FunctionDataset" warning). Its Tasks cannot
  seek (the shuffle buffer's contents depend on everything read before): `get_batches`
  resumes them by skipping. Seekable: `EpochDataSource`.
  """

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
    del shuffle
    return super().get_dataset(split=split, shuffle=False, seed=seed,
                               shard_info=shard_info, **kwargs)


# Where the next EpochDataSource.get_dataset starts (examples of its shard's stream already
# read): seqio's Task.get_dataset passes a source no position, so `get_batches` sets it here
# around the seqio.get_dataset call, which calls the source's get_dataset at once.
_START_EXAMPLE = contextvars.ContextVar("hypertune_start_example", default=0)


@contextlib.contextmanager
def _reading_from(start_example: int):
  token = _START_EXAMPLE.set(start_example)
  try:
    yield
  finally:
    _START_EXAMPLE.reset(token)


class EpochDataSource(seqio.DataSource):
  """A seekable source over an in-memory example generator, read in epochs.

  Epoch e of split s is `examples_fn(s, e)`, a deterministic list of `epoch_size(s)`
  examples, the same number every epoch (checked when an epoch is generated). A data shard
  (`seqio.ShardInfo(i, n)`) reads the examples at positions i, i + n, ... of every epoch;
  with shuffle=True in an order drawn from (seed, name, split, epoch). That is the only
  shuffle: the source declares `performs_internal_shuffling` and its Task has no seqio
  shuffle buffer, whose contents at example N depend on all N examples before it (no
  bounded-cost seek could restore them).

  So a stream can start at any example `start` of the shard's stream: at epoch start // m,
  index start % m (m = the shard's examples per epoch). The cost is generating that epoch's
  examples (untokenized; at most one epoch), independent of `start`; nothing skipped is
  tokenized. `get_batches(start_batch=...)` sets the start (`_START_EXAMPLE`).

  Each pass over the returned dataset (seqio's repeat()) is the next epoch, with fresh
  demonstrations; a second iterator over the same dataset continues the epoch count.
  """

  def __init__(self, name: str, examples_fn: Callable[[str, int], Iterable[dict]],
               epoch_size: Callable[[str], int], splits: Sequence[str]):
    # No num_input_examples: seqio caches sources it knows to be small (< 10k examples) in
    # memory before repeat(), which would replay epoch 0's demonstrations forever.
    super().__init__(splits=splits, caching_permitted=False, performs_internal_shuffling=True)
    self._name = name
    self._examples_fn = examples_fn
    self._epoch_size = epoch_size

  @property
  def supports_arbitrary_sharding(self) -> bool:
    # Any number of shards: each takes every n-th example of every epoch (`epoch`).
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def shard_epoch_size(self, split: str, shard_info: Optional[seqio.ShardInfo] = None) -> int:
    """Examples per epoch of `split` read by the shard (all of them without shard_info)."""
    index, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    return len(range(index, self._epoch_size(split), num_shards))

  def epoch(self, split: str, epoch: int, order_seed: Optional[int] = None,
            shard_info: Optional[seqio.ShardInfo] = None) -> List[dict]:
    """The shard's examples of `epoch`, in reading order (order_seed None: generated order)."""
    exs = list(self._examples_fn(split, epoch))
    if len(exs) != self._epoch_size(split):
      # A seek computes epochs from the declared size: a wrong size would resume elsewhere.
      raise ValueError(f"{self._name}: epoch {epoch} of {split!r} has {len(exs)} examples, "
                       f"not the declared {self._epoch_size(split)}")
    if shard_info:
      exs = exs[shard_info.index::shard_info.num_shards]
    if order_seed is not None:
      random.Random(fewshot.stable_seed("order", order_seed, self._name, split, epoch)
                    ).shuffle(exs)
    return exs

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    """One epoch per pass from the current start position (seqio repeats the dataset)."""
    del sequence_length, use_cached, num_epochs
    if shuffle and seed is None:
      seed = random.SystemRandom().getrandbits(63)  # As tf.data's shuffle: a fresh order.
    order_seed = seed if shuffle else None
    per_epoch = self.shard_epoch_size(split, shard_info)
    first, offset = divmod(_START_EXAMPLE.get(), per_epoch) if per_epoch else (0, 0)
    epochs = itertools.count(first)

    def gen():
      e = next(epochs)
      # Generating the epoch is the seek's whole cost; only the examples from `offset` on
      # reach tf.data (and tokenization).
      yield from self.epoch(split, e, order_seed, shard_info)[offset if e == first else 0:]

    return tf.data.Dataset.from_generator(gen, output_signature=THREE_INPUT_SIGNATURE)


def safe_name(name: str) -> str:
  """A source task name as a seqio-safe identifier ("-" etc. become "_")."""
  return re.sub(r"[^\w.#:]+", "_", name)


def _remove(name: str) -> None:
  # Re-registering (e.g. a second register_* call with other options) replaces.
  seqio.TaskRegistry.remove(name)
  seqio.MixtureRegistry.remove(name)


def generation_metrics(targets, predictions):
  """seqio metric fn (targets = reference lists): S-NI exact match and ROUGE-L (0-100)."""
  return {"exact_match": metrics_lib.exact_match(predictions, targets),
          "rougeL": metrics_lib.rouge_l(predictions, targets)}


def choice_accuracy_metric(targets, predictions):
  """seqio metric fn: generated answers against the gold choice, S-NI-normalised."""
  return {"accuracy": metrics_lib.exact_match(predictions, targets)}


def register_three_input_task(
    name: str,
    task: fewshot.TaskData,
    config: fewshot.HyperConfig,
    vocabulary: seqio.Vocabulary,
    metric_fns: Optional[Sequence[Callable]] = None,
    builder: Optional[fewshot.ExampleBuilder] = None,
) -> seqio.Task:
  """Registers `task` under seqio name `name` with the given formatting config.

  `builder` overrides the default ExampleBuilder (e.g. symbol tuning's relabelling).
  """
  if builder is None:
    tokens = formatting.special_tokens_for(vocabulary)
    builder = fewshot.ExampleBuilder(task, config, tokens, length_fn_for(vocabulary))
  splits = sorted(s for s, exs in task.splits.items() if exs)
  if metric_fns is None:
    is_choice = any(e.answer_choices for exs in task.splits.values() for e in exs[:1])
    metric_fns = [choice_accuracy_metric if is_choice else generation_metrics]
  t = _register_generator_task(name, builder.examples, splits, vocabulary, metric_fns,
                               epoch_size=task.num_examples)  # one example per raw example
  _BUILDERS[name] = builder
  return t


def _register_generator_task(name, examples_fn, splits, vocabulary, metric_fns,
                             epoch_size: Callable[[str], int]) -> seqio.Task:
  """A seqio Task over `examples_fn(split, epoch)` -> the `epoch_size(split)` three-input
  examples of an epoch, read through a seekable `EpochDataSource`.

  The source shuffles (each epoch, seeded by the data seed), so the Task has no shuffle
  buffer; its preprocessors map one source example to one model example, which lets
  `get_batches` turn a batch position into an example position.
  """
  _remove(name)
  t = seqio.Task(
      name,
      source=EpochDataSource(name, examples_fn, epoch_size, sorted(splits)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(vocabulary),
      postprocess_fn=references_postprocessor,
      metric_fns=list(metric_fns),
      shuffle_buffer_size=None,
  )
  seqio.TaskRegistry.add_provider(name, t)
  return t


def register_merged_task(name: str, rates: Mapping[str, float], vocabulary: seqio.Vocabulary,
                         seed: int = 0) -> seqio.Task:
  """One seqio Task streaming a mixture of tasks registered by `register_three_input_task`.

  The same examples-proportional mixing as `register_mixture` (per epoch, round(rate)
  examples of each task - at most all of them - drawn without replacement from its own
  epoch stream, then all shuffled together, seeded by `seed`), but in one tf.data pipeline:
  seqio builds a pipeline per task of a Mixture (tracing its preprocessors, filling its
  buffers), which dominates start-up and throughput for hundreds of small tasks (S-NI, the
  built-in suite). Splits other than "train" are every example of every task, in order.
  Training reads each epoch in an order drawn from the data seed (`EpochDataSource`), and
  can resume anywhere at the cost of generating one epoch.
  `mixture_tasks(name)` / `mixture_rates(name)` list the merged tasks.
  """
  missing = [t for t in rates if t not in _BUILDERS]
  if missing:
    raise ValueError(f"merged task {name}: {missing[:3]} not registered through "
                     "register_three_input_task")
  builders = {t: _BUILDERS[t] for t in rates}
  splits = set.intersection(*(set(b.task.splits) for b in builders.values()))

  def examples(split, epoch):
    if split != fewshot.TRAIN_SPLIT:
      for b in builders.values():
        yield from b.examples(split, epoch)
      return
    rng = random.Random(fewshot.stable_seed("merged", seed, name, epoch))
    out = []
    for t, b in builders.items():
      exs = list(b.examples(split, epoch))
      rng.shuffle(exs)
      out.extend(exs[:int(round(rates[t]))])
    rng.shuffle(out)
    yield from out

  def epoch_size(split):
    sizes = {t: b.task.num_examples(split) for t, b in builders.items()}
    if split != fewshot.TRAIN_SPLIT:
      return sum(sizes.values())
    return sum(min(int(round(rates[t])), n) for t, n in sizes.items())

  t = _register_generator_task(name, examples, splits, vocabulary, metric_fns=[],
                               epoch_size=epoch_size)
  _MIXTURES[name] = dict(rates)
  return t


def register_mixture(name: str, rates: Mapping[str, float]) -> seqio.Mixture:
  """Registers a mixture of already-registered tasks with explicit rates."""
  if not rates:
    raise ValueError(f"mixture {name}: no tasks")
  _remove(name)
  m = seqio.Mixture(name, [(t, float(r)) for t, r in rates.items()])
  seqio.MixtureRegistry.add_provider(name, m)
  _MIXTURES[name] = dict(rates)
  return m


def size_proportional_rates(sizes: Mapping[str, int], cap: Optional[int]) -> Dict[str, float]:
  """Examples-proportional mixing with a per-task cap (T5/T0 convention)."""
  return {t: float(min(n, cap) if cap else n) for t, n in sizes.items() if n > 0}


# -- lookup -------------------------------------------------------------------

def registered_names() -> List[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task_or_mixture(name: str):
  """seqio Task or Mixture by name; unknown names raise listing close matches."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  close = difflib.get_close_matches(name, registered_names(), n=5, cutoff=0.6)
  raise ValueError(
      f"Unknown task or mixture {name!r}. Close matches: {close or 'none'}"
      f" ({len(registered_names())} registered)")


def get_builder(task_name: str) -> fewshot.ExampleBuilder:
  if task_name not in _BUILDERS:
    get_task_or_mixture(task_name)  # Raises with close matches if unknown.
    raise ValueError(f"{task_name} was not registered through tasks.common")
  return _BUILDERS[task_name]


def mixture_tasks(name: str) -> List[str]:
  """Leaf task names of a task or mixture."""
  if name in _MIXTURES:
    return list(_MIXTURES[name])
  obj = get_task_or_mixture(name)
  if isinstance(obj, seqio.Mixture):
    return [t.name for t in obj.tasks]
  return [name]


def mixture_rates(name: str) -> Dict[str, float]:
  """{task: rate} of a mixture registered through `register_mixture`."""
  if name not in _MIXTURES:
    get_task_or_mixture(name)  # Raises with close matches if unknown.
    raise ValueError(f"{name} was not registered through tasks.common.register_mixture")
  return dict(_MIXTURES[name])


def get_eval_demonstrations(task_name: str) -> List[formatting.Demonstration]:
  """The fixed (input, target) demonstrations used for all eval queries of a task."""
  return get_builder(task_name).eval_demonstrations()


def get_eval_hyper_inputs(task_name: str) -> str:
  """The formatted hyper_inputs shared by all evaluation queries of a task."""
  return get_builder(task_name).eval_hyper_inputs()


def get_examples(task_name: str, split: str, epoch: int = 0) -> List[dict]:
  """Untokenized three-input examples of a task (python dicts), for debugging."""
  return list(get_builder(task_name).examples(split, epoch=epoch))


def get_batches(
    name: str,
    split: str,
    batch_size: int,
    task_feature_lengths: Optional[Mapping[str, int]] = None,
    feature_converter: Optional[seqio.FeatureConverter] = None,
    shuffle: bool = True,
    seed: Optional[int] = 0,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
    shard_info: Optional[seqio.ShardInfo] = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
  """Batched model features of a task or mixture (tf.data; `.as_numpy_iterator()`).

  Uses HyperEncDecFeatureConverter by default with lengths hyper 1024 / inputs 384 /
  targets 128. num_epochs=None repeats forever (training). With `shard_info` only that
  shard of every task's examples is read (disjoint shards; one per process in multi-host
  training) and `batch_size` is the shard's rows per batch.

  `start_batch=N` is the stream from batch N on, the batches of `.skip(N)` (resuming
  training). A Task over an `EpochDataSource` (`register_three_input_task`,
  `register_merged_task`) read forever seeks there, generating at most one epoch first.
  Others read and drop the N batches, with a warning: seqio Mixtures (`register_mixture`:
  sampling the tasks by rate draws from a random stream that depends on every earlier
  draw), other sources (`GeneratorDataSource`, e.g. tasks.pretraining's) and num_epochs set.
  """
  from hypertune.data import feature_converters  # pylint: disable=g-import-not-at-top
  lengths = dict(task_feature_lengths or feature_converters.DEFAULT_TASK_FEATURE_LENGTHS)
  provider = get_task_or_mixture(name)
  seek = bool(start_batch) and seekable(provider.name, num_epochs)
  if start_batch and not seek:
    logging.warning("%s cannot seek (%s): reading and dropping its first %d batches",
                    provider.name, _why_not_seekable(provider, num_epochs), start_batch)
  # Every model example is one source example (see _register_generator_task) and training
  # batches are all full, so batch N starts at example N * batch_size of the shard.
  with _reading_from(start_batch * batch_size if seek else 0):
    ds = seqio.get_dataset(
        provider.name,
        task_feature_lengths=lengths,
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
        shard_info=shard_info,
        use_cached=False,
        feature_converter=feature_converter or feature_converters.HyperEncDecFeatureConverter(),
    )
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.skip(start_batch) if start_batch and not seek else ds


def seekable(name: str, num_epochs: Optional[int] = None) -> bool:
  """Whether `get_batches(name, ..., start_batch=N)` seeks (rather than skips) to batch N."""
  return _why_not_seekable(get_task_or_mixture(name), num_epochs) is None


def _why_not_seekable(provider, num_epochs: Optional[int]) -> Optional[str]:
  if isinstance(provider, seqio.Mixture):
    return "a seqio Mixture"
  if not isinstance(provider.source, EpochDataSource):
    return f"its source is a {type(provider.source).__name__}, not an EpochDataSource"
  if num_epochs is not None:
    # seqio would repeat num_epochs passes counted from the seek's epoch: too many.
    return f"num_epochs={num_epochs}: only endless streams seek"
  return None


def log_registration(kind: str, n_tasks: int, n_skipped: int = 0) -> None:
  logging.info("registered %d %s tasks (%d skipped)", n_tasks, kind, n_skipped)
