"""seqio registry for P3 / T0 (HyperT5 P3 experiments).

`register_p3(data_dir)` with ``data_dir`` laid out like ../shared/data/p3 registers,
per hyper_mode (``p3`` = hyper, ``p3_concat`` = T5-MTF-Few-shot, ``p3_zeroshot`` =
T5-MTF/T0):

* held-out rank-classification tasks ``p3.<dataset>_<template>`` (their only split is
  ``EVAL_SPLIT`` = "validation"; ANLI r1-r3, HellaSwag, CB, COPA, RTE, WiC, WSC,
  WinoGrande; by default only templates with ``original_task: true`` and answer choices,
  as T0's evaluation),
  mixtures ``p3_heldout`` and ``p3_heldout_<dataset>``. Fixed demonstrations are
  rendered with the same template from a disjoint file (SuperGLUE/WinoGrande train,
  ANLI test; HellaSwag: the last 64 validation examples, which are not evaluated).
* training tasks ``p3.train.<dataset_prompt>`` from the prompted T0 training sample
  (``t0_train_sample/*.jsonl``), filtered to HyperT5's Figure 6 list, and the
  mixture ``p3_train`` (examples-proportional, capped).

Token budgets come from the run's ``task_feature_lengths`` (gin: ``%TASK_FEATURE_LENGTHS``,
as in gin/tasks/p3.gin): demonstrations are dropped whole to fit ``hyper_inputs`` (mode
hyper) or, in concat mode, to fit the whole concatenated ``inputs`` with the query kept at
its end; a T5-MTF-Few-shot run therefore sets ``inputs`` itself (e.g. 1408: HyperT5's
1024 hyper + 384 inputs).
Evaluation scores are averaged per dataset as the papers do by
`hypertune.metrics.aggregate_task_metrics` (``p3_dataset.<dataset>``, ``p3_average``).

`register_p3_tfrecords` accepts bigscience's released P3 TFRecord directories instead.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import seqio

from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import p3
from tasks import common
from tasks.sni import variant_name


# The held-out tasks' only split (T0 evaluates on validation); runs evaluating P3 set
# train.eval_split / evaluation.evaluate_checkpoint.split to it (gin/tasks/p3.gin).
EVAL_SPLIT = "validation"


def _config(mode: str, k: int, seed: int,
            task_feature_lengths: Mapping[str, int]) -> fewshot.HyperConfig:
  """P3's formatting (no instruction, sampled demonstrations) within the run's lengths."""
  return fewshot.config_for_lengths(task_feature_lengths, hyper_mode=mode,
                                    use_instruction=False, demos="sampled", k=k, seed=seed)


def heldout_task_data(data_dir: str, spec: p3.HeldoutDataset, template: p3.Template,
                      max_eval_examples: Optional[int] = None) -> fewshot.TaskData:
  """Renders one held-out dataset with one template into TaskData."""
  key = f"{spec.key}_{p3.sanitize(template.name)}"
  rows = p3.read_heldout_raw(os.path.join(data_dir, spec.eval_file), spec.reader)
  if spec.demo_file:
    demo_rows = p3.read_heldout_raw(os.path.join(data_dir, spec.demo_file), spec.reader)
  else:
    rows, demo_rows = rows[: -p3.HELLASWAG_DEMO_POOL], rows[-p3.HELLASWAG_DEMO_POOL:]
  if max_eval_examples:
    rows = rows[:max_eval_examples]
  evaluated = p3.render_choice_examples(rows, template, key)
  demos = [e.demonstration() for e in p3.render_choice_examples(demo_rows, template, key, seed=1)]
  return fewshot.TaskData(name=key, splits={EVAL_SPLIT: evaluated}, eval_pool=demos)


@gin.configurable
def register_p3(
    data_dir: str,
    vocabulary: Optional[seqio.Vocabulary] = None,
    hyper_modes: Sequence[str] = ("hyper", "concat", "none"),
    k: int = 16,
    seed: int = 0,
    heldout: Sequence[str] = tuple(h.key for h in p3.HELDOUT_DATASETS),
    original_task_only: bool = True,
    train_prompts: Optional[Sequence[str]] = p3.HYPERT5_TRAIN_PROMPTS,
    include_train: bool = True,
    max_eval_examples: Optional[int] = None,
    mixing_cap: Optional[int] = 500_000,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
) -> Dict[str, List[str]]:
  """Registers P3 held-out evaluation and training tasks; returns {mixture: tasks}.

  Args:
    data_dir: directory with promptsource_templates/, the held-out raw files and
      t0_train_sample/ (the layout of ../shared/data/p3).
    vocabulary: default: ByteVocabulary; use the T5 SentencePiece one for real runs.
    heldout: which HELDOUT_DATASETS keys to register.
    original_task_only: only templates marked original_task (T0 evaluation).
    train_prompts: dataset-prompt names to train on (None: every file).
    max_eval_examples: cap per held-out task (None: all).
    task_feature_lengths: the run's lengths (``%TASK_FEATURE_LENGTHS``): ``hyper_inputs``
      budgets the demonstrations of mode hyper, ``inputs`` the downstream input of every
      mode (concat: demonstrations + query, demonstrations dropped whole to fit).
  """
  vocabulary = vocabulary or seqio.ByteVocabulary()
  tdir = os.path.join(data_dir, "promptsource_templates")
  specs = {h.key: h for h in p3.HELDOUT_DATASETS}
  unknown = set(heldout) - set(specs)
  if unknown:
    raise ValueError(f"unknown P3 held-out datasets {sorted(unknown)}; known: {sorted(specs)}")
  heldout_tasks: Dict[str, List[fewshot.TaskData]] = {}
  for key in heldout:
    spec = specs[key]
    templates = p3.load_templates(tdir, spec.dataset, spec.subset)
    for t in templates.values():
      if not t.answer_choices or (original_task_only and not t.original_task):
        continue
      heldout_tasks.setdefault(key, []).append(heldout_task_data(data_dir, spec, t, max_eval_examples))
  train_tasks: List[fewshot.TaskData] = []
  if include_train:
    files = sorted(glob.glob(os.path.join(data_dir, "t0_train_sample", "*.jsonl")))
    wanted = None if train_prompts is None else {p3.normalize_prompt_name(n) for n in train_prompts}
    for f in files:
      name = os.path.basename(f)[: -len(".jsonl")]
      if wanted is not None and p3.normalize_prompt_name(name) not in wanted:
        continue
      exs = p3.read_prompted_jsonl(f)
      if exs:
        train_tasks.append(fewshot.TaskData(name=f"train.{p3.sanitize(name)}",
                                            splits={"train": exs}))
    if wanted is not None:
      found = {p3.normalize_prompt_name(t.name[len("train."):]) for t in train_tasks}
      logging.info("P3: %d of %d HyperT5 training dataset-prompts found in %s",
                   len(found & wanted), len(wanted), data_dir)
  out: Dict[str, List[str]] = {}
  for mode in hyper_modes:
    if mode not in p3.MODE_PREFIXES:
      raise ValueError(f"unknown hyper_mode {mode!r}; known: {sorted(p3.MODE_PREFIXES)}")
    variant = p3.MODE_PREFIXES[mode]  # metrics reads the held-out groups from these names
    cfg = _config(mode, k, seed, task_feature_lengths)
    all_heldout = {}
    for key, tds in heldout_tasks.items():
      names = {}
      for td in tds:
        name = f"{variant}.{td.name}"
        common.register_three_input_task(name, td, cfg, vocabulary)
        names[name] = float(td.num_examples(EVAL_SPLIT))
      common.register_mixture(f"{variant}_heldout_{key}", names)
      out[f"{variant}_heldout_{key}"] = list(names)
      all_heldout.update(names)
    if all_heldout:
      common.register_mixture(f"{variant}_heldout", all_heldout)
      out[f"{variant}_heldout"] = list(all_heldout)
    if train_tasks:
      sizes = {}
      for td in train_tasks:
        name = f"{variant}.{td.name}"
        common.register_three_input_task(name, td, cfg, vocabulary)
        sizes[name] = td.num_examples("train")
      rates = common.size_proportional_rates(sizes, mixing_cap)
      common.register_mixture(f"{variant}_train", rates)
      out[f"{variant}_train"] = list(rates)
  return out


@gin.configurable
def register_p3_tfrecords(
    p3_dir: str,
    task_names: Sequence[str],
    vocabulary: Optional[seqio.Vocabulary] = None,
    hyper_modes: Sequence[str] = ("hyper",),
    k: int = 16,
    seed: int = 0,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
    mixture_name: str = "p3tf",
) -> Dict[str, List[str]]:
  """Registers tasks from bigscience P3 TFRecords: ``<p3_dir>/<task>/<split>.tfrecord*``.

  Each task gets the splits present (train / validation / test); names are
  ``<mixture_name>[_concat|_zeroshot].<task>`` with a ``<...>_all`` mixture.
  ``task_feature_lengths`` budgets the demonstrations as in `register_p3`.
  """
  vocabulary = vocabulary or seqio.ByteVocabulary()
  tds = []
  for t in task_names:
    splits = {}
    for split in ("train", "validation", "test"):
      pattern = os.path.join(p3_dir, t, f"{split}.tfrecord*")
      if glob.glob(pattern):
        splits[split] = p3.read_p3_tfrecords(pattern)
    if not splits:
      raise p3.P3Error(f"{os.path.join(p3_dir, t)}: task {t}: no <split>.tfrecord* files")
    pool = [e.demonstration() for e in splits.get("train", [])]
    tds.append(fewshot.TaskData(name=p3.sanitize(t), splits=splits, eval_pool=pool))
  out = {}
  for mode in hyper_modes:
    variant = variant_name(mixture_name, None, mode)
    cfg = _config(mode, k, seed, task_feature_lengths)
    names = {}
    for td in tds:
      name = f"{variant}.{td.name}"
      common.register_three_input_task(name, td, cfg, vocabulary)
      names[name] = float(sum(len(v) for v in td.splits.values()))
    common.register_mixture(f"{variant}_all", names)
    out[f"{variant}_all"] = list(names)
  return out
