"""Super-NaturalInstructions (S-NI) task files -> TaskData.

Reads the official task JSON schema (`Definition`, `Positive Examples`, `Instances`
with `id`/`input`/`output` list, `Input_language`, `Output_language`, ...) and the
split lists (`train_tasks.txt`, `test_tasks.txt`). Two directory layouts are found:

* the official repository: ``tasks/<name>.json`` + ``splits/default/{train,test}_tasks.txt``
* ``train/``, ``test/`` task directories + ``splits/{train,test}_tasks.txt`` (the
  layout of ../shared/data/sni and of the built-in suite).

Settings (HyperT5 / HINT vocabulary):

* ``def``      - definition only.
* ``def_2pos`` - definition + the two first positive examples (fixed for the task).
* ``fewshot``  - K demonstrations sampled from the task's instances, no definition.
* ``def_fewshot`` - definition + K sampled demonstrations.
* ``none``     - neither (the input alone).

Malformed files raise `TaskFileError` naming the file, the task and the field.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Dict, Iterable, List, Tuple

from hypertune.data import fewshot

SETTINGS = {
    # setting: (use_instruction, demos)
    "def": (True, "none"),
    "def_2pos": (True, "positive"),
    "fewshot": (False, "sampled"),
    "def_fewshot": (True, "sampled"),
    "none": (False, "none"),
}


class TaskFileError(ValueError):
  """A malformed task file; the message names file, task and field."""

  def __init__(self, path: str, task: str, field: str, problem: str):
    super().__init__(f"{path}: task {task!r}, field {field!r}: {problem}")
    self.path, self.task, self.field = path, task, field


def task_name_from_path(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _text(value, path, task, field) -> str:
  """S-NI stores Definition as a list of strings; accept a plain string too."""
  if isinstance(value, str):
    text = value
  elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    text = " ".join(value)
  else:
    raise TaskFileError(path, task, field, f"expected a string or list of strings, got {value!r:.80}")
  if not text.strip():
    raise TaskFileError(path, task, field, "is empty")
  return text


def validate_task(raw, path: str, task: str) -> dict:
  """Checks the fields we use; returns the raw dict."""
  if not isinstance(raw, dict):
    raise TaskFileError(path, task, "<root>", f"expected a JSON object, got {type(raw).__name__}")
  for field in ("Definition", "Instances"):
    if field not in raw:
      raise TaskFileError(path, task, field, "missing")
  _text(raw["Definition"], path, task, "Definition")
  inst = raw["Instances"]
  if not isinstance(inst, list):
    raise TaskFileError(path, task, "Instances", f"expected a list, got {type(inst).__name__}")
  if not inst:
    raise TaskFileError(path, task, "Instances", "empty: the task has no instances")
  for i, ex in enumerate(inst):
    where = f"Instances[{i}]"
    if not isinstance(ex, dict):
      raise TaskFileError(path, task, where, "expected an object")
    if not isinstance(ex.get("input"), str):
      raise TaskFileError(path, task, where + ".input", f"expected a string, got {ex.get('input')!r:.80}")
    out = ex.get("output")
    if not isinstance(out, list):
      raise TaskFileError(path, task, where + ".output",
                          f"expected a list of strings, got {type(out).__name__}: {out!r:.80}")
    if not out or not all(isinstance(o, str) for o in out):
      raise TaskFileError(path, task, where + ".output", f"expected a non-empty list of strings, got {out!r:.80}")
  pos = raw.get("Positive Examples", [])
  if not isinstance(pos, list):
    raise TaskFileError(path, task, "Positive Examples", "expected a list")
  for i, ex in enumerate(pos):
    where = f"Positive Examples[{i}]"
    if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
      raise TaskFileError(path, task, where + ".input", "expected an object with a string input")
    out = ex.get("output")
    if not (isinstance(out, str) or (isinstance(out, list) and out and isinstance(out[0], str))):
      raise TaskFileError(path, task, where + ".output", f"expected a string, got {out!r:.80}")
  return raw


def load_task_file(path: str) -> dict:
  """Loads and validates one task JSON file."""
  task = task_name_from_path(path)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise TaskFileError(path, task, "<json>", f"bad JSON: {e}") from e
  return validate_task(raw, path, task)


def is_english(raw: dict) -> bool:
  """The official English filter on Input_language / Output_language."""
  return raw.get("Input_language") == ["English"] and raw.get("Output_language") == ["English"]


def read_split_list(path: str) -> List[str]:
  with open(path, encoding="utf-8") as f:
    return [l.strip() for l in f if l.strip() and not l.startswith("#")]


@dataclasses.dataclass
class Layout:
  task_files: Dict[str, str]  # task name -> json path
  train_tasks: List[str]
  test_tasks: List[str]
  extra_lists: Dict[str, List[str]]  # other *_tasks.txt lists (e.g. built-in subsets)


def find_layout(data_dir: str) -> Layout:
  """Finds task files and split lists under `data_dir` (see module doc)."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"S-NI data directory not found: {data_dir}")
  files = {}
  for sub in ("tasks", "train", "test", "."):
    for p in sorted(glob.glob(os.path.join(data_dir, sub, "*.json"))):
      files.setdefault(task_name_from_path(p), p)
  split_dir = None
  for cand in ("splits/default", "splits"):
    if os.path.exists(os.path.join(data_dir, cand, "train_tasks.txt")):
      split_dir = os.path.join(data_dir, cand)
      break
  if split_dir is None:
    raise FileNotFoundError(f"{data_dir}: no splits/default/train_tasks.txt or splits/train_tasks.txt")
  lists = {}
  for p in sorted(glob.glob(os.path.join(split_dir, "*_tasks.txt"))):
    lists[os.path.basename(p)[: -len("_tasks.txt")]] = read_split_list(p)
  return Layout(files, lists.pop("train", []), lists.pop("test", []), lists)


def _positive_examples(raw) -> List[Tuple[str, str]]:
  out = []
  for ex in raw.get("Positive Examples", []):
    o = ex["output"]
    out.append((ex["input"], o if isinstance(o, str) else o[0]))
  return out


def to_task_data(
    raw: dict,
    name: str,
    role: str,
    max_instances: int = 100,
    num_validation: int = 0,
    path: str = "<memory>",
) -> fewshot.TaskData:
  """Builds TaskData from a validated task dict.

  Args:
    raw: task JSON.
    name: task name.
    role: "train" (a training task: split "train", plus "validation" if
      num_validation > 0) or "test" (an evaluation task: split "test").
    max_instances: at most this many instances are used per task (official protocol:
      100 for evaluation).
    num_validation: for training tasks, the first instances held out as "validation".
  """
  # Optional non-S-NI field written by the built-in suite: the class label words,
  # enabling rank classification.
  choices = tuple(raw.get("hypertune_answer_choices") or ())
  instances = []
  for i, ex in enumerate(raw["Instances"]):
    label = -1
    if choices:
      if ex["output"][0] not in choices:
        raise TaskFileError(path, name, f"Instances[{i}].output",
                            f"{ex['output'][0]!r} is not one of the answer choices {choices}")
      label = choices.index(ex["output"][0])
    instances.append(fewshot.TaskExample(
        inputs=ex["input"], outputs=tuple(ex["output"]), answer_choices=choices, label=label,
        id=str(ex.get("id", i))))
  definition = _text(raw["Definition"], path, name, "Definition")
  positives = _positive_examples(raw)
  if role == "train":
    val = instances[:num_validation]
    train = instances[num_validation: num_validation + max_instances]
    splits = {"train": train}
    if val:
      splits["validation"] = val
    pool = [e.demonstration() for e in train]
  elif role == "test":
    evaluated = instances[:max_instances]
    splits = {"test": evaluated}
    # Demos for fixed few-shot evaluation come from instances that are not evaluated;
    # S-NI test files usually hold exactly the evaluated ones, so fall back to the
    # task's positive examples.
    rest = [e.demonstration() for e in instances[max_instances:]]
    pool = rest or positives
  else:
    raise ValueError(f"role must be 'train' or 'test', got {role!r}")
  return fewshot.TaskData(name=name, splits=splits, instruction=definition,
                          positive_examples=positives, eval_pool=pool)


def load_tasks(
    layout: Layout,
    names: Iterable[str],
    role: str,
    english_only: bool = True,
    max_instances: int = 100,
    num_validation: int = 0,
) -> Tuple[List[fewshot.TaskData], List[str]]:
  """Loads the listed tasks present in `layout`; returns (tasks, missing names)."""
  tasks, missing = [], []
  for n in names:
    path = layout.task_files.get(n)
    if path is None:
      missing.append(n)
      continue
    raw = load_task_file(path)
    if english_only and not is_english(raw):
      continue
    tasks.append(to_task_data(raw, n, role, max_instances, num_validation, path))
  return tasks, missing
