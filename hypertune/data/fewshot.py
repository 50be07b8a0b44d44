"""Few-shot sampling and construction of three-input examples.

A *three-input example* is a dict of features::

    hyper_inputs   str        what the hypernetwork reads (instruction and/or demos)
    inputs         str        what the frozen downstream model reads
    targets        str        the training target (eval: the first reference)
    task_name      str
    references     [R] str    all acceptable outputs (generation evaluation)
    answer_choices [C] str    candidate outputs (rank classification); [] otherwise
    label          int32      gold index into answer_choices; -1 when not a choice task
    example_id     int32      position of the example inside its task split

`hyper_mode` decides where the demonstrations go, so the three baselines of the
papers read the *same* data:

* ``"hyper"``  - HyperT5 / HINT: demos (and instruction) -> hyper_inputs,
  query -> inputs.
* ``"concat"`` - T5-MTF-Few-shot / Tk-Instruct: demos (and instruction) are
  concatenated in front of the query in ``inputs``; hyper_inputs is empty.
* ``"none"``   - T5-MTF zero-shot (T0-style): inputs is the query alone; hyper_inputs
  is empty.
* ``"hyper_instruct"`` - as "hyper", and the instruction is also in front of the query in
  ``inputs``, formatted as "concat" formats it without demonstrations (HyperLlama's
  "instruction in the downstream input": the downstream reads what Llama + definition reads).

Demonstrations (``demos``):

* ``"none"``     - no demonstrations (S-NI ``def`` setting).
* ``"positive"`` - the task's fixed positive examples, first ``k`` (S-NI ``def_2pos``
  with k=2).
* ``"sampled"``  - training: ``k`` demos drawn per target example from the same task
  split, never the target itself; evaluation: one fixed set of ``k`` demos per task
  chosen once with the seed from the task's demonstration pool (which excludes the
  evaluated examples) and reused for every query, as in the papers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import random
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from hypertune.data import formatting

Demonstration = formatting.Demonstration

HYPER_MODES = ("hyper", "hyper_instruct", "concat", "none")
DEMO_SOURCES = ("none", "positive", "sampled")
MAX_K = 16  # the papers use up to 16 demonstrations
TRAIN_SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One raw example of a task before formatting.

  outputs: all acceptable outputs (S-NI keeps several); training samples one.
  answer_choices/label: for classification tasks (rank classification).
  """

  inputs: str
  outputs: Tuple[str, ...]
  answer_choices: Tuple[str, ...] = ()
  label: int = -1
  id: str = ""

  def demonstration(self) -> Demonstration:
    return (self.inputs, self.outputs[0])


@dataclasses.dataclass
class TaskData:
  """A task: splits of raw examples plus what the hypernetwork may read.

  Attributes:
    name: task name (used in task_name and for seeding; must be stable).
    splits: split name -> examples.
    instruction: task definition (S-NI) or None.
    positive_examples: fixed demonstrations (S-NI "Positive Examples").
    eval_pool: demonstrations from which the fixed evaluation demos are chosen.
      Must not contain evaluated examples. Defaults to the train split when that is
      disjoint from the eval split, else to positive_examples.
  """

  name: str
  splits: Dict[str, List[TaskExample]]
  instruction: Optional[str] = None
  positive_examples: List[Demonstration] = dataclasses.field(default_factory=list)
  eval_pool: Optional[List[Demonstration]] = None

  def num_examples(self, split: str) -> int:
    return len(self.splits.get(split, ()))


@dataclasses.dataclass(frozen=True)
class HyperConfig:
  """How to turn raw examples into three-input examples (see module doc)."""

  hyper_mode: str = "hyper"
  use_instruction: bool = True
  demos: str = "sampled"
  k: int = 16
  seed: int = 0
  # Token budgets in tokens including the EOS the output feature appends.
  max_hyper_length: Optional[int] = 1024
  max_inputs_length: Optional[int] = 384
  # Sampled demos drawn round-robin over the distinct outputs (every class shown before one
  # repeats); for tasks whose outputs all differ this is plain random sampling.
  balanced: bool = False
  # Non-empty: each training example of a classification task (with demonstrations) draws
  # fresh label words from this pool, shared by its demonstrations (symbol tuning over a
  # fixed pool), so that tasks cannot be memorised and the pairing must be read.
  relabel_pool: Tuple[str, ...] = ()
  # Non-empty: each training example of a generation task (no answer choices, with
  # demonstrations) draws one random permutation of character positions and applies it to
  # every alphabet given (("abc...z", "ABC...Z"): a -> q and A -> Q alike) in its input,
  # target and demonstrations, so that a task's parameter (an ending, a letter to delete)
  # cannot be memorised either and has to be read off the demonstrations.
  permute_alphabets: Tuple[str, ...] = ()

  def __post_init__(self):
    if self.hyper_mode not in HYPER_MODES:
      raise ValueError(f"hyper_mode must be one of {HYPER_MODES}, got {self.hyper_mode!r}")
    if self.demos not in DEMO_SOURCES:
      raise ValueError(f"demos must be one of {DEMO_SOURCES}, got {self.demos!r}")
    if not 0 <= self.k <= MAX_K:
      raise ValueError(f"k must be in [0, {MAX_K}], got {self.k}")
    sizes = {len(a) for a in self.permute_alphabets}
    if len(sizes) > 1 or any(len(set(a)) != len(a) for a in self.permute_alphabets):
      raise ValueError("permute_alphabets must be alphabets of one length without repeated "
                       f"characters, got {self.permute_alphabets!r}")


def config_for_lengths(task_feature_lengths: Mapping[str, int], **kwargs) -> HyperConfig:
  """A HyperConfig whose token budgets are a run's `task_feature_lengths`.

  hyper_inputs budgets the hypernetwork text; inputs budgets what the downstream model
  reads in every mode: in "concat" mode that is the whole concatenation, demonstrations
  fitted in front of the query (so a few-shot concatenation run sets a long `inputs`).
  """
  missing = [k for k in ("hyper_inputs", "inputs") if k not in task_feature_lengths]
  if missing:
    raise ValueError(f"task_feature_lengths {dict(task_feature_lengths)} lacks {missing}")
  return HyperConfig(max_hyper_length=task_feature_lengths["hyper_inputs"],
                     max_inputs_length=task_feature_lengths["inputs"], **kwargs)


def longest_fitting_prefix(text: str, budget: int, length_fn) -> Optional[str]:
  """The longest word prefix of `text` with length_fn(prefix) <= budget; None if no word fits.

  Binary search: length_fn is monotone in the prefix up to SentencePiece merges.
  """
  words = text.split()
  lo, hi = 0, len(words)  # the answer n (words kept) lies in [lo, hi]
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if length_fn(" ".join(words[:mid])) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return " ".join(words[:lo]) if lo else None


def stable_seed(*parts) -> int:
  """A 63-bit seed from arbitrary parts, stable across processes (unlike hash())."""
  h = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
  return int.from_bytes(h[:8], "little") >> 1


def sample_demonstrations(
    pool: Sequence[Demonstration],
    k: int,
    rng: random.Random,
    exclude_index: Optional[int] = None,
    balanced: bool = False,
) -> List[Demonstration]:
  """Draws min(k, available) demos without replacement, never `exclude_index`.

  balanced: round-robin over the groups of equal output (`demo[1]`), groups and members
  in random order, then shuffled: a binary task with k=2 shows one demo per class.
  """
  if balanced:
    groups: Dict[str, List[int]] = {}
    for i, demo in enumerate(pool):
      if i != exclude_index:
        groups.setdefault(demo[1], []).append(i)
    order = list(groups.values())
    rng.shuffle(order)
    for group in order:
      rng.shuffle(group)
    # Round robin: the last member of every group, then the one before it, ...
    rounds = itertools.zip_longest(*(reversed(group) for group in order))
    picks = [i for members in rounds for i in members if i is not None][:k]
    rng.shuffle(picks)
    return [pool[p] for p in picks]
  n = len(pool)
  candidates = n - (1 if exclude_index is not None and 0 <= exclude_index < n else 0)
  m = min(k, candidates)
  if m <= 0:
    return []
  picks = rng.sample(range(candidates), m)
  if exclude_index is not None:
    # Map [0, n-1) onto [0, n) \ {exclude_index}.
    picks = [p + 1 if p >= exclude_index else p for p in picks]
  return [pool[p] for p in picks]


def fixed_demonstrations(
    pool: Sequence[Demonstration], k: int, seed: int, task_name: str, balanced: bool = False
) -> List[Demonstration]:
  """The evaluation demos of a task: chosen once from `pool` by (seed, task_name)."""
  return sample_demonstrations(pool, k, random.Random(stable_seed("fixed", seed, task_name)),
                               balanced=balanced)


def eval_pool(task: TaskData) -> List[Demonstration]:
  if task.eval_pool is not None:
    return list(task.eval_pool)
  return list(task.positive_examples)


def relabel(ex: TaskExample, mapping: Sequence[str]) -> TaskExample:
  """`ex` with class i's label word replaced by mapping[i] (symbol tuning)."""
  return TaskExample(ex.inputs, (mapping[ex.label],), tuple(mapping), ex.label, ex.id)


def _relabel_from_pool(ex: TaskExample, demos: Sequence[Demonstration],
                       label_pool: Sequence[str], rng: random.Random
                       ) -> Tuple[TaskExample, List[Demonstration]]:
  """`ex` and its demonstrations with the task's label words replaced by words drawn from
  `label_pool` (one mapping for all of them)."""
  choices = ex.answer_choices
  if len(label_pool) < len(choices):
    raise ValueError(f"relabel_pool has {len(label_pool)} words; the task has "
                     f"{len(choices)} classes")
  words = rng.sample(list(label_pool), len(choices))
  new_word = dict(zip(choices, words))
  return relabel(ex, words), [(x, new_word.get(y, y)) for x, y in demos]


def _permute_characters(ex: TaskExample, demos: Sequence[Demonstration],
                        alphabets: Sequence[str], rng: random.Random
                        ) -> Tuple[TaskExample, List[Demonstration]]:
  """`ex` and its demonstrations with one random permutation applied to every alphabet."""
  order = list(range(len(alphabets[0])))
  rng.shuffle(order)
  table = str.maketrans({a[i]: a[j] for a in alphabets for i, j in enumerate(order)})
  ex = dataclasses.replace(ex, inputs=ex.inputs.translate(table),
                           outputs=tuple(o.translate(table) for o in ex.outputs))
  return ex, [(x.translate(table), y.translate(table)) for x, y in demos]


class TruncationStats:
  """Counts downstream inputs longer than the budget; warns with the task name."""

  def __init__(self):
    self.truncated = 0
    self.total = 0
    self.demos_dropped = 0

  def report(self, task_name: str, split: str, max_len: Optional[int]) -> None:
    if self.truncated:
      logging.warning(
          "task %s (%s): %d of %d examples have inputs longer than %s tokens (the "
          "\"inputs\" task feature length) and will be truncated by the feature converter",
          task_name, split, self.truncated, self.total, max_len)


class ExampleBuilder:
  """Formats raw examples of one task into three-input examples.

  Args:
    task: the task.
    config: HyperConfig.
    tokens: `<x>`/`<y>` strings for the vocabulary.
    length_fn: tokens of a string (no EOS); None disables budgets and counting.
  """

  def __init__(self, task: TaskData, config: HyperConfig,
               tokens: formatting.SpecialTokens, length_fn=None):
    self.task = task
    self.config = config
    self.tokens = tokens
    self.length_fn = functools.lru_cache(maxsize=1 << 16)(length_fn) if length_fn else None
    self.stats: Dict[str, TruncationStats] = {}
    self._instructions: Dict[int, Optional[str]] = {}  # budget -> instruction cut to it
    self._warned = set()  # splits already warned about (once, not every epoch)

  # -- demonstrations -------------------------------------------------------
  def eval_demonstrations(self) -> List[Demonstration]:
    """The fixed demonstrations used for every evaluation query of the task."""
    c = self.config
    if c.demos == "none" or c.k == 0:
      return []
    if c.demos == "positive":
      return list(self.task.positive_examples[: c.k])
    return fixed_demonstrations(eval_pool(self.task), c.k, c.seed, self.task.name, c.balanced)

  def _instruction(self, budget: Optional[int] = None) -> Optional[str]:
    """The instruction (if used), cut at a word so that `<x> instruction` fits `budget`.

    Uncut, a long definition would be trimmed by the feature converter from the end,
    taking the demonstrations with it, and in "concat" mode the query.
    """
    text = self.task.instruction if self.config.use_instruction else None
    if not text or budget is None:
      return text
    if budget not in self._instructions:
      marked = lambda s: self.length_fn(f"{self.tokens.x} {s}")
      self._instructions[budget] = (text if marked(" ".join(text.split())) <= budget
                                    else longest_fitting_prefix(text, budget, marked))
    return self._instructions[budget]

  def _budget(self, n: Optional[int]) -> Optional[int]:
    # One position is reserved for the EOS that the output feature appends.
    return None if (n is None or self.length_fn is None) else n - 1

  def hyper_text(self, demos: Sequence[Demonstration], query: str = "",
                 into_inputs: Optional[bool] = None) -> Tuple[str, int]:
    """Formatted instruction+demos within their budget: the hypernetwork's, or (into_inputs;
    default: mode "concat") what is left of the downstream's after the query."""
    c = self.config
    if not (c.hyper_mode == "concat" if into_inputs is None else into_inputs):
      budget = self._budget(c.max_hyper_length)
    else:
      # concat: instruction and demos share the downstream budget with the query, which
      # comes last (one token spare for the join).
      budget = self._budget(c.max_inputs_length)
      if budget is not None:
        budget -= self.length_fn(formatting.format_concat_inputs("", query, self.tokens)) + 1
        budget = max(budget, 0)
    return formatting.format_hyper_inputs(
        self._instruction(budget), demos, self.tokens, self.length_fn, budget)

  def eval_hyper_inputs(self) -> str:
    """hyper_inputs shared by all evaluation queries (mode "hyper")."""
    return self.hyper_text(self.eval_demonstrations())[0]

  # -- examples -------------------------------------------------------------
  def _assemble(self, ex: TaskExample, target: str, demos, idx: int, stats) -> dict:
    c = self.config
    if c.hyper_mode == "none":
      hyper, inputs = "", ex.inputs
    elif c.hyper_mode == "hyper":
      hyper, inputs = self.hyper_text(demos)[0], ex.inputs
    elif c.hyper_mode == "hyper_instruct":
      hyper = self.hyper_text(demos)[0]
      inputs = formatting.format_concat_inputs(
          self.hyper_text([], ex.inputs, into_inputs=True)[0], ex.inputs, self.tokens)
    else:
      text, kept = self.hyper_text(demos, ex.inputs)
      stats.demos_dropped += len(demos) - kept
      hyper, inputs = "", formatting.format_concat_inputs(text, ex.inputs, self.tokens)
    if self.length_fn is not None and c.max_inputs_length is not None:
      stats.total += 1
      if self.length_fn(inputs) + 1 > c.max_inputs_length:
        stats.truncated += 1
    return {
        "hyper_inputs": hyper,
        "inputs": inputs,
        "targets": target,
        "task_name": self.task.name,
        "references": list(ex.outputs),
        "answer_choices": list(ex.answer_choices),
        "label": ex.label,
        "example_id": idx,
    }

  def examples(self, split: str, epoch: int = 0) -> Iterator[dict]:
    """Yields three-input examples of `split`.

    The training split samples a fresh target output and fresh demos per example,
    seeded by (seed, task, epoch), so every pass differs but runs are reproducible.
    Other splits use the first output as target and the fixed eval demos.
    """
    c = self.config
    data = self.task.splits.get(split)
    if data is None:
      raise KeyError(f"task {self.task.name} has no split {split!r} "
                     f"(has {sorted(self.task.splits)})")
    stats = self.stats[split] = TruncationStats()
    need_demos = c.hyper_mode != "none" and c.demos != "none" and c.k > 0
    if split == TRAIN_SPLIT:
      rng = random.Random(stable_seed("train", c.seed, self.task.name, epoch))
      relabel_rng = random.Random(stable_seed("relabel", c.seed, self.task.name, epoch))
      pool = [e.demonstration() for e in data]
      for i, ex in enumerate(data):
        target = ex.outputs[0] if len(ex.outputs) == 1 else rng.choice(ex.outputs)
        if not need_demos:
          demos = []
        elif c.demos == "positive":
          demos = self.task.positive_examples[: c.k]
        else:
          demos = sample_demonstrations(pool, c.k, rng, exclude_index=i, balanced=c.balanced)
        if need_demos and c.relabel_pool and ex.answer_choices:
          ex, demos = _relabel_from_pool(ex, demos, c.relabel_pool, relabel_rng)
          target = ex.outputs[0]
        elif need_demos and c.permute_alphabets and not ex.answer_choices:
          permuted, demos = _permute_characters(ex, demos, c.permute_alphabets, relabel_rng)
          target = permuted.outputs[ex.outputs.index(target)]
          ex = permuted
        yield self._assemble(ex, target, demos, i, stats)
    else:
      demos = self.eval_demonstrations() if need_demos else []
      for i, ex in enumerate(data):
        yield self._assemble(ex, ex.outputs[0], demos, i, stats)
    self.report(split, stats)

  def report(self, split: str, stats: TruncationStats) -> None:
    """Warns about truncated inputs of `split`, once per builder and split."""
    if stats.truncated and split not in self._warned:
      self._warned.add(split)
      stats.report(self.task.name, split, self.config.max_inputs_length)
