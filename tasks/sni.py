"""seqio registry for Super-NaturalInstructions (and anything in its layout).

Names (``prefix`` defaults to "sni"; ``<setting>`` in hypertune.data.sni.SETTINGS):

* tasks:    ``sni_<setting>.<task>`` (hyper_mode "hyper": definition/examples go to the
  hypernetwork), ``sni_<setting>_concat.<task>`` (Tk-Instruct-style baseline: they
  are concatenated into ``inputs``), ``sni_zeroshot.<task>`` (input only).
* mixtures: ``<variant>_train`` (training tasks, examples-proportional with a cap) and
  ``<variant>_test`` (the evaluation tasks; up to 100 instances each), plus
  ``<variant>_<list>`` for any other ``<list>_tasks.txt`` in the splits directory.

Training targets are one output sampled per example and epoch; evaluation keeps all
outputs as `references` (ROUGE-L / exact match as in S-NI).

Token budgets come from the run's `task_feature_lengths` (gin: %TASK_FEATURE_LENGTHS):
"hyper_inputs" for what the hypernetwork reads, "inputs" for what the downstream model
reads in every mode; a "concat" run therefore sets a long "inputs" itself (HyperT5's
T5-MTF-Few-shot: 1024 + 384 = 1408). gin/tasks/sni.gin configures all of this.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import seqio

from hypertune.data import feature_converters
from hypertune.data import fewshot
from hypertune.data import sni
from tasks import common

MODE_SUFFIX = {"hyper": "", "hyper_instruct": "_instruct", "concat": "_concat",
               "none": "_zeroshot"}


def variant_name(prefix: str, setting: Optional[str], mode: str) -> str:
  if mode == "none":
    return prefix + "_zeroshot"
  return prefix + (f"_{setting}" if setting else "") + MODE_SUFFIX[mode]


@gin.configurable
def mixture_name(setting: str = "def_2pos", mode: str = "hyper", split: str = "train",
                 prefix: str = "sni") -> str:
  """The mixture `register_sni` registers for (setting, mode, split list), e.g.
  sni_def_2pos_train; gin/tasks/sni.gin derives MIXTURE_OR_TASK_NAME from it."""
  return f"{variant_name(prefix, setting, mode)}_{split}"


def register_sni_layout(
    data_dir: str,
    vocabulary: Optional[seqio.Vocabulary] = None,
    prefix: str = "sni",
    settings: Sequence[str] = ("def_2pos",),
    hyper_modes: Sequence[str] = ("hyper",),
    setting_in_name: bool = True,
    k: int = 2,
    seed: int = 0,
    max_train_instances: int = 100,
    max_eval_instances: int = 100,
    num_validation: int = 0,
    mixing_cap: Optional[int] = 1000,
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
    english_only: bool = True,
    list_aliases: Optional[Mapping[str, str]] = None,
    balanced_demos: bool = False,
    relabel_pool: Sequence[str] = (),
    permute_alphabets: Sequence[str] = (),
) -> Dict[str, List[str]]:
  """Registers tasks + mixtures for an S-NI-layout directory; returns {mixture: tasks}.

  task_feature_lengths: the run's lengths; see `fewshot.config_for_lengths` (in "concat"
    mode the instruction and demonstrations are fitted into "inputs" before the query).
  balanced_demos / relabel_pool / permute_alphabets: see `fewshot.HyperConfig`.
  """
  vocabulary = vocabulary or common.get_vocabulary()
  layout = sni.find_layout(data_dir)
  train_tasks, missing_tr = sni.load_tasks(
      layout, layout.train_tasks, "train", english_only, max_train_instances, num_validation)
  test_tasks, missing_te = sni.load_tasks(
      layout, layout.test_tasks, "test", english_only, max_eval_instances)
  if missing_tr or missing_te:
    logging.info("%s: %d train and %d test tasks listed but absent from %s", prefix,
                 len(missing_tr), len(missing_te), data_dir)
  if not train_tasks and not test_tasks:
    raise ValueError(f"{data_dir}: none of the listed S-NI tasks were found")
  aliases = dict(list_aliases or {})
  listed = {t.name for t in train_tasks + test_tasks}
  out: Dict[str, List[str]] = {}
  done_variants = set()
  for setting in settings:
    if setting not in sni.SETTINGS:
      raise ValueError(f"unknown S-NI setting {setting!r}; use one of {sorted(sni.SETTINGS)}")
    use_instruction, demos = sni.SETTINGS[setting]
    for mode in hyper_modes:
      variant = variant_name(prefix, setting if setting_in_name else None, mode)
      if variant in done_variants:
        continue
      done_variants.add(variant)
      cfg = fewshot.config_for_lengths(
          task_feature_lengths, hyper_mode=mode, use_instruction=use_instruction,
          demos=demos, k=k, seed=seed, balanced=balanced_demos,
          relabel_pool=tuple(relabel_pool), permute_alphabets=tuple(permute_alphabets))
      sizes = {}
      for t in train_tasks + test_tasks:
        name = f"{variant}.{common.safe_name(t.name)}"
        common.register_three_input_task(name, t, cfg, vocabulary)
        sizes[t.name] = t.num_examples("train") or t.num_examples("test")
      lists = {"train": [t.name for t in train_tasks], "test": [t.name for t in test_tasks]}
      for lname, names in layout.extra_lists.items():
        lists[lname] = [n for n in names if n in listed]
      for lname, names in lists.items():
        if not names:
          continue
        mix = f"{variant}_{aliases.get(lname, lname)}"
        rates = common.size_proportional_rates(
            {f"{variant}.{common.safe_name(n)}": sizes[n] for n in names},
                                               mixing_cap if lname == "train" else None)
        if lname == "train":  # One pipeline for hundreds of tasks (see register_merged_task).
          common.register_merged_task(mix, rates, vocabulary, seed=seed)
        else:
          common.register_mixture(mix, rates)
        out[mix] = list(rates)
  common.log_registration(prefix, len(train_tasks) + len(test_tasks),
                          len(missing_tr) + len(missing_te))
  return out


@gin.configurable
def register_sni(
    data_dir: str,
    vocabulary: Optional[seqio.Vocabulary] = None,
    settings: Sequence[str] = ("def", "def_2pos"),
    hyper_modes: Sequence[str] = ("hyper", "concat"),
    task_feature_lengths: Mapping[str, int] = feature_converters.DEFAULT_TASK_FEATURE_LENGTHS,
    **kwargs,
) -> Dict[str, List[str]]:
  """Registers Super-NaturalInstructions from `data_dir` (see module doc).

  E.g. register_sni("../shared/data/sni", common.get_vocabulary("sentencepiece",
  "../shared/data/t5_vocab/spiece.model"), task_feature_lengths={"hyper_inputs": 1024,
  "inputs": 384, "targets": 128}). Only listed English tasks are used. Other keyword
  arguments: see `register_sni_layout`.
  """
  return register_sni_layout(data_dir, vocabulary, prefix="sni", settings=settings,
                             hyper_modes=hyper_modes,
                             task_feature_lengths=task_feature_lengths, **kwargs)
