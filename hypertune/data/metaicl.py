"""MetaICL data: jsonl files (`task`, `input`, `output`, `options`) + split configs.

Layout (as released by MetaICL, and ../shared/data/metaicl)::

    config/<split>.json            {"train": [tasks], "test": [tasks]} (e.g. hr_to_lr)
    config/tasks/<task>.json       {"task_type": "classification" | ..., "options": [...]}
    data/<task>/<task>_<k>_<seed>_{train,dev,test}.jsonl

Evaluation follows MetaICL: the k=16 demonstrations of the `_16_<seed>_train` file are
the fixed demonstrations of a test task; classification tasks are scored by Macro-F1,
the others (multiple-choice) by accuracy, both via rank classification over `options`.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from hypertune.data import fewshot


class MetaICLError(ValueError):
  """Bad MetaICL file; names the file, the task and the field."""


def read_config(data_dir: str, split: str) -> Dict[str, List[str]]:
  path = os.path.join(data_dir, "config", f"{split}.json")
  if not os.path.exists(path):
    avail = sorted(f[:-5] for f in os.listdir(os.path.join(data_dir, "config")) if f.endswith(".json"))
    raise MetaICLError(f"{path}: no MetaICL split config {split!r}; available: {avail}")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  for key in ("train", "test"):
    if not isinstance(cfg.get(key), list):
      raise MetaICLError(f"{path}: split {split!r}, field {key!r}: expected a list of tasks")
  return cfg


def task_type(data_dir: str, task: str) -> str:
  path = os.path.join(data_dir, "config", "tasks", f"{task}.json")
  if not os.path.exists(path):
    return "unknown"
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("task_type", "unknown")


def data_file(data_dir: str, task: str, k: int, seed: int, split: str) -> str:
  return os.path.join(data_dir, "data", task, f"{task}_{k}_{seed}_{split}.jsonl")


def read_jsonl(path: str, task: str) -> List[fewshot.TaskExample]:
  """Examples of one file; options -> answer_choices, label = options.index(output)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise MetaICLError(f"{path}: task {task}, line {i + 1}: bad JSON: {e}") from e
      for field in ("input", "output"):
        if not isinstance(r.get(field), str):
          raise MetaICLError(f"{path}: task {task}, line {i + 1}, field {field!r}: expected a string")
      options = r.get("options") or []
      if not isinstance(options, list):
        raise MetaICLError(f"{path}: task {task}, line {i + 1}, field 'options': expected a list")
      label = options.index(r["output"]) if r["output"] in options else -1
      if options and label < 0:
        raise MetaICLError(f"{path}: task {task}, line {i + 1}, field 'output': "
                           f"{r['output']!r} not among options {options}")
      out.append(fewshot.TaskExample(r["input"], (r["output"],), tuple(options), label, str(i)))
  return out


def load_task(data_dir: str, task: str, role: str, k: int = 16, seed: int = 100,
              max_eval_examples: Optional[int] = None) -> Tuple[Optional[fewshot.TaskData], str]:
  """TaskData for a train or test task; (None, reason) when its files are absent."""
  train_path = data_file(data_dir, task, k, seed, "train")
  if not os.path.exists(train_path):
    return None, f"missing {train_path}"
  demos = read_jsonl(train_path, task)
  if role == "train":
    dev_path = data_file(data_dir, task, k, seed, "dev")
    exs = demos + (read_jsonl(dev_path, task) if os.path.exists(dev_path) else [])
    return fewshot.TaskData(name=task, splits={"train": exs}), ""
  test_path = data_file(data_dir, task, k, seed, "test")
  if not os.path.exists(test_path):
    return None, f"missing {test_path}"
  test = read_jsonl(test_path, task)[:max_eval_examples]
  return fewshot.TaskData(name=task, splits={"test": test},
                          eval_pool=[e.demonstration() for e in demos]), ""
