"""seqio registry for hyperpretraining corpora.

`register_pretraining(objective, text_files=..., vocabulary=...)` registers
``pretrain_<objective>`` (objective in caclm / hint / gist) reading plain text
(``.txt``: one document per blank-line-separated paragraph block; ``.jsonl``: a
``text`` field per line), or C4 through tfds when `tfds_data_dir` holds it
(always ``download=False``). Features are already token ids (no EOS: continuations),
so the same feature converters apply.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterator, Optional, Sequence

import gin
import seqio
import tensorflow as tf

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
def register_pretraining(
    objective: str = "caclm",
    text_files: Sequence[str] = (),
    tfds_data_dir: Optional[str] = None,
    vocabulary: Optional[seqio.Vocabulary] = None,
    length: int = 512,
    b_length: int = 32,
    seed: int = 0,
    min_tokens: int = 64,
    name: Optional[str] = None,
) -> str:
  """Registers a hyperpretraining task; returns its name (default pretrain_<objective>)."""
  if objective not in pretraining.OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; use one of {sorted(pretraining.OBJECTIVES)}")
  if not text_files and not tfds_data_dir:
    raise ValueError("register_pretraining needs text_files or a tfds_data_dir holding c4")
  if tfds_data_dir and not text_files:
    # Fail at registration, naming the directory, rather than inside the first tf.data
    # read of a training run.
    load_c4(tfds_data_dir)
  vocabulary = vocabulary or seqio.ByteVocabulary()
  name = name or f"pretrain_{objective}"
  sentinels = (pretraining.T5_CACLM_SENTINELS
               if isinstance(vocabulary, seqio.SentencePieceVocabulary)
               else tuple(vocabulary.encode("\x02")) + tuple(vocabulary.encode("\x03")))

  def split_fn(tokens, rng):
    if objective == "caclm":
      return pretraining.caclm_split(tokens, rng, length, b_length, sentinels)
    if objective == "gist":
      return pretraining.gist_split(tokens, rng, length, b_length)
    return pretraining.hint_split(tokens, rng, length)

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
