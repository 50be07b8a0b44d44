"""seqio registry for hyperpretraining corpora.

`register_pretraining(objective, text_files=..., vocabulary=..., task_feature_lengths=...)`
registers ``pretrain_<objective>`` (objective in caclm / hint / gist; `task_name`) reading
plain text (``.txt``: one document per blank-line-separated paragraph block; ``.jsonl``: a
``text`` field per line), or C4 through tfds when `tfds_data_dir` holds it (always
``download=False``). Features are already token ids (no EOS: continuations), so the same
feature converters apply. gin/tasks/hyperpretrain.gin configures a run.

Lengths follow the run's `task_feature_lengths`: for CACLM and gist |B| is "inputs", C
fits "targets" (`pretraining.caclm_split`'s max_target_length), and the window is
shortened where needed so that A and D always fit "hyper_inputs". HINT's random chunks
beyond their lengths are trimmed by the feature converter.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Iterator, Mapping, Optional, Sequence, Tuple

import gin
import seqio
import tensorflow as tf

from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import pretraining
from tasks import common


def iter_text_documents(paths: Sequence[str]) -> Iterator[str]:
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"pretraining corpus file not found: {path}")
    with open(path, encoding="utf-8") as f:
      if path.endswith(".jsonl"):
        for i, line in enumerate(f):
          if line.strip():
            r = json.loads(line)
            if not isinstance(r.get("text"), str):
              raise ValueError(f"{path}: line {i + 1}, field 'text': expected a string")
            yield r["text"]
      else:
        for block in f.read().split("\n\n"):
          if block.strip():
            yield block.strip()


def load_c4(tfds_data_dir: str, split: str = "train") -> tf.data.Dataset:
  """C4 (en) from a prepared tfds directory; never downloads.

  Raises FileNotFoundError naming the directory when it holds no prepared c4/en.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.load("c4/en", split=split, data_dir=tfds_data_dir, download=False)
  except AssertionError as e:  # tfds' "Dataset c4: could not find data in <dir>"
    raise FileNotFoundError(
        f"tfds_data_dir={tfds_data_dir!r} holds no prepared c4/en (expected "
        f"{os.path.join(tfds_data_dir, 'c4', 'en')}/<version>/ with dataset_info.json and "
        "the tfrecord shards). Nothing is downloaded (download=False): prepare it "
        "beforehand, e.g. `tfds build c4/en --data_dir=...`, or pass text_files instead."
    ) from e


def iter_c4_documents(tfds_data_dir: str, split: str = "train") -> Iterator[str]:
  ds = load_c4(tfds_data_dir, split)
  for ex in ds.as_numpy_iterator():
    yield ex["text"].decode("utf-8")


@gin.configurable
def task_name(objective: str = "caclm") -> str:
  """The name `register_pretraining` gives by default (gin: MIXTURE_OR_TASK_NAME)."""
  return f"pretrain_{objective}"


def fit_window(objective: str, task_feature_lengths: Mapping[str, int], length: int,
               min_segment: int) -> Tuple[int, int]:
  """(window, shortest usable document) for `objective` under the run's lengths.

  CACLM's hypernetwork reads 2 sentinels + A + D = 2 + window - |B| - |C|, with
  |C| >= min_segment: the window shrinks until that fits "hyper_inputs" (gist: no
  sentinels), and C < "targets" needs targets > min_segment. A document must hold |B|
  plus three segments of min_segment.
  """
  if objective == "hint":
    return length, 3 * min_segment
  if task_feature_lengths["targets"] <= min_segment:
    raise ValueError(f"{objective}: targets length {task_feature_lengths['targets']} leaves no "
                     f"room for a C of >= {min_segment} tokens (min_segment)")
  b_length = task_feature_lengths["inputs"]
  extra = 2 if objective == "caclm" else 0
  window = min(length, task_feature_lengths["hyper_inputs"] - extra + b_length + min_segment)
  shortest = b_length + 3 * min_segment
  if window < shortest:
    raise ValueError(
        f"{objective}: task_feature_lengths {dict(task_feature_lengths)} leave a window of "
        f"{window} tokens, under |B| = inputs = {b_length} plus 3 segments of {min_segment}")
  if window < length:
    logging.info("%s: window %d -> %d tokens so that A and D fit hyper_inputs %d", objective,
                 length, window, task_feature_lengths["hyper_inputs"])
  return window, shortest


@gin.configurable
def register_pretraining(
    objective: str = "caclm",
    text_files: Sequence[str] = (),
    tfds_data_dir: Optional[str] = None,
    vocabulary: Optional[seqio.Vocabulary] = None,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
    length: int = 512,
    min_segment: int = 8,
    seed: int = 0,
    min_tokens: int = 64,
    name: Optional[str] = None,
) -> str:
  """Registers a hyperpretraining task; returns its name (default `task_name(objective)`).

  length: the window cut from each document (HyperT5: 512), shortened by `fit_window`;
  min_segment: the shortest segment (A, C, D; HINT's chunks); documents under
  `min_tokens` tokens (or too short to split) are skipped.
  """
  if objective not in pretraining.OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; use one of {sorted(pretraining.OBJECTIVES)}")
  if not text_files and not tfds_data_dir:
    raise ValueError("register_pretraining needs text_files or a tfds_data_dir holding c4")
  window, shortest = fit_window(objective, task_feature_lengths, length, min_segment)
  min_tokens = max(min_tokens, shortest)
  if tfds_data_dir and not text_files:
    # Fail at registration, naming the directory, rather than inside the first tf.data
    # read of a training run.
    load_c4(tfds_data_dir)
  vocabulary = vocabulary or seqio.ByteVocabulary()
  name = name or task_name(objective)
  sentinels = (pretraining.T5_CACLM_SENTINELS
               if isinstance(vocabulary, seqio.SentencePieceVocabulary)
               else tuple(vocabulary.encode("\x02")) + tuple(vocabulary.encode("\x03")))
  b_length, max_target = task_feature_lengths["inputs"], task_feature_lengths["targets"]

  def split_fn(tokens, rng):
    if objective == "caclm":
      return pretraining.caclm_split(tokens, rng, window, b_length, sentinels,
                                     min_len=min_segment, max_target_length=max_target)
    if objective == "gist":
      return pretraining.gist_split(tokens, rng, window, b_length, min_len=min_segment,
                                    max_target_length=max_target)
    return pretraining.hint_split(tokens, rng, window, min_len=min_segment)

  def docs():
    return (iter_text_documents(text_files) if text_files
            else iter_c4_documents(tfds_data_dir))

  def dataset_fn(split, shuffle_files, seed_=None):
    del shuffle_files, seed_
    epochs = itertools.count()

    def gen():
      epoch = next(epochs)
      import random  # pylint: disable=g-import-not-at-top
      for i, doc in enumerate(docs()):
        tokens = vocabulary.encode(doc)
        if len(tokens) < min_tokens:
          continue
        # Split points depend only on (seed, epoch, document index).
        ex = split_fn(tokens, random.Random(fewshot.stable_seed("pretrain", seed, epoch, i)))
        yield {k: tf.constant(v, tf.int32) for k, v in ex.items()}

    spec = tf.TensorSpec([None], tf.int32)
    return tf.data.Dataset.from_generator(
        gen, output_signature={"hyper_inputs": spec, "inputs": spec, "targets": spec})

  seqio.TaskRegistry.remove(name)
  feats = {k: seqio.Feature(vocabulary, add_eos=False) for k in ("hyper_inputs", "inputs", "targets")}
  task = seqio.Task(name, source=common.GeneratorDataSource(
      lambda split, shuffle_files, seed=None: dataset_fn(split, shuffle_files, seed),
      splits=["train"], caching_permitted=False), preprocessors=[], output_features=feats)
  seqio.TaskRegistry.add_provider(name, task)
  return name
