"""Symbol tuning (Wei et al. 2023; HyperLlama): relabel classification tasks.

Every example draws fresh random label strings for its classes - English words,
random letter strings, or integers up to 4 digits - and its demonstrations share the
target's mapping, so the label semantics must be read from the demonstrations. No
instruction is given. Evaluation averages over `NUM_EVAL_SEEDS` relabelling seeds.
"""

from __future__ import annotations

import random
import string
from typing import Iterator, List

from hypertune.data import fewshot

NUM_EVAL_SEEDS = 10
LABEL_KINDS = ("word", "letters", "integer")
# A small fixed vocabulary of common English words for "word" labels.
WORDS = tuple("""
apple river stone cloud table paper music garden window silver forest candle bridge
yellow orange purple winter summer autumn spring ocean desert island castle rocket
pencil butter coffee mirror ladder basket hammer guitar violin tiger rabbit falcon
dolphin spider turtle monkey planet comet meteor thunder rainbow shadow velvet marble
copper crystal feather pillow blanket kettle lantern anchor harbor valley canyon meadow
""".split())


def draw_labels(n: int, rng: random.Random, kind: str = None) -> List[str]:
  """n distinct random label strings of one kind (random kind if None; "word" only for
  n <= len(WORDS))."""
  if kind is None:
    kind = rng.choice(LABEL_KINDS if n <= len(WORDS) else ("letters", "integer"))
  elif kind == "word" and n > len(WORDS):
    raise ValueError(f"{n} distinct word labels asked for; there are {len(WORDS)} words")
  out: List[str] = []
  while len(out) < n:
    if kind == "word":
      s = rng.choice(WORDS)
    elif kind == "letters":
      s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5)))
    elif kind == "integer":
      s = str(rng.randint(0, 9999))
    else:
      raise ValueError(f"unknown label kind {kind!r}; use one of {LABEL_KINDS}")
    if s not in out:
      out.append(s)
  return out


def is_classification(task: fewshot.TaskData) -> bool:
  """Every example has a label among one label set shared by the whole task."""
  exs = [e for split in task.splits.values() for e in split]
  if not exs or not exs[0].answer_choices:
    return False
  return all(e.label >= 0 and e.answer_choices == exs[0].answer_choices for e in exs)


def num_classes(task: fewshot.TaskData) -> int:
  """Size of the label set of a classification task (`is_classification`)."""
  return len(next(e for split in task.splits.values() for e in split).answer_choices)


class SymbolTuningBuilder(fewshot.ExampleBuilder):
  """ExampleBuilder that relabels each example and its demonstrations.

  The source task must be a classification task: every example has
  answer_choices (same classes) and label >= 0. `eval_seed` selects one of the
  NUM_EVAL_SEEDS relabellings used at evaluation.
  """

  def __init__(self, task: fewshot.TaskData, config: fewshot.HyperConfig, tokens,
               length_fn=None, eval_seed: int = 0):
    for split, exs in task.splits.items():
      for e in exs:
        if not e.answer_choices or e.label < 0:
          raise ValueError(f"task {task.name}, split {split}, example {e.id}: symbol tuning "
                           "needs answer_choices and a label (classification tasks only)")
    cfg = fewshot.HyperConfig(**{**config.__dict__, "use_instruction": False, "demos": "sampled"})
    super().__init__(task, cfg, tokens, length_fn)
    self.eval_seed = eval_seed

  def examples(self, split: str, epoch: int = 0) -> Iterator[dict]:
    c = self.config
    data = self.task.splits[split]
    stats = self.stats[split] = fewshot.TruncationStats()
    n_classes = len(data[0].answer_choices)
    if split == fewshot.TRAIN_SPLIT:
      rng = random.Random(fewshot.stable_seed("symbol", c.seed, self.task.name, epoch))
      for i, ex in enumerate(data):
        demos = fewshot.sample_demonstrations(data, c.k, rng, exclude_index=i)
        mapping = draw_labels(n_classes, rng)
        yield self._emit(ex, demos, mapping, i, stats)
    else:
      # Fixed demo examples per task (chosen once), fresh mapping per query & seed.
      pool = [e for exs in [self.task.splits.get(fewshot.TRAIN_SPLIT, [])] for e in exs]
      pool = pool or data
      demo_rng = random.Random(fewshot.stable_seed("symbol-demos", c.seed, self.task.name))
      for i, ex in enumerate(data):
        demos_ex = fewshot.sample_demonstrations(
            pool, c.k, random.Random(demo_rng.random()), exclude_index=i if pool is data else None)
        rng = random.Random(fewshot.stable_seed("symbol-eval", self.eval_seed, self.task.name, i))
        yield self._emit(ex, demos_ex, draw_labels(n_classes, rng), i, stats)
    self.report(split, stats)

  def _emit(self, ex, demo_examples, mapping, i, stats):
    target = fewshot.relabel(ex, mapping)
    demos = [(d.inputs, mapping[d.label]) for d in demo_examples]
    return self._assemble(target, target.outputs[0], demos, i, stats)
