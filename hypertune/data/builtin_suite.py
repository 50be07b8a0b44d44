"""The built-in meta-learning suite: procedurally generated tasks in the S-NI schema.

Each *task* is a family plus hidden parameters drawn per task, e.g. "append a fixed ending"
with ending "q", or "the label that goes with each letter" with ("t" -> "K", "o" -> "7").
The parameters and label words are only visible through the task's demonstrations, so a
model that reads demonstrations (hypernetwork or in-context concatenation) can solve a task
that a zero-shot model can only guess (it still learns the family's format and label space).

Families: string transformations that copy the input with one change (first_n, double,
append, uppercase; held out: last_n, prepend, remove_letter) and their compositions;
classification by a hidden rule (longer than; held out: first letter, contains, length
parity, ...) with label words drawn per task from a small pool of 28 one-character words,
capitals and digits (8 more are held out), so every word serves many tasks in both roles;
token mappings (`letter_word`: one letter -> its word, in-context learning's simplest form).
Strings are 3-5 letters (targets <= 12 bytes) so that a tiny byte-level T5 learns the
training families on 2 CPU cores in 30 minutes (`gin/quickstart/families.gin`).
Transformation tasks are many (260 of 40 strings, 1,600 strings per family): with 160
strings per family (8 tasks of 20) a tiny model memorises them instead of learning to copy,
and with few tasks it remembers their parameters instead of reading them.
Classification tasks are many and small (240 of 20 instances), so that memorising them is
slow. It remains possible: HyperT5 trained only on the 180 `letter_word` tasks for 1,500
steps memorises them. It then reaches 99% training token accuracy but stays at chance on new
`letter_word` tasks (another seed). Only reading the demonstrations transfers to tasks it
has not seen.

Split (fixed, the same for every seed; held-out never appears in training - tested):

* train: TRAIN_TRANSFORMS, TRAIN_COMPOSITIONS, TRAIN_RULES with TRAIN_LABEL_WORDS.
* heldout_families: HELDOUT_TRANSFORMS and HELDOUT_RULES (unseen families).
* heldout_compositions: HELDOUT_COMPOSITIONS, pairs of training transforms never composed
  in training.
* heldout_label_words: training rules with HELDOUT_LABEL_WORDS.

`write_suite` emits S-NI JSON files (``tasks/*.json``, ``splits/train_tasks.txt``,
``splits/test_tasks.txt`` and one ``splits/<subset>_tasks.txt`` per held-out subset)
so the suite is read back through the S-NI loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import string
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import gin

from hypertune.data import fewshot

# 2: first_letter / last_letter lookup rules; 3: copy-with-change transforms, token mappings,
# generated label words, many small held-out tasks; 4: a small label-word pool (48 + 16);
# 5: one-character label words (28 + 8), learned far faster by a byte-level model;
# 6: 200 training strings per transformation task (SuiteConfig.transform_train_instances);
# 7: five times as many transformation tasks with 40 strings each (the same strings in all),
# so that a task's parameter (an ending, a letter) is read off the demonstrations rather
# than remembered for a handful of tasks; `contains` over 3 letters instead of 6.
# 8: `first_letter`, `contains` and `length_parity` held out (`last_letter` dropped),
# `remove_letter` over three letters.
# 9: the composition split fixed for every seed (it was drawn per seed, so another seed's
# "training" compositions included held-out ones); compositions with `remove_letter` second
# draw their strings from its three letters; twice as many `remove_letter` tasks.
# 10: `remove_letter` held out; 5 training compositions (20 tasks each), 3 held out.
SUITE_VERSION = 10
LETTERS = string.ascii_lowercase
VOWELS = set("aeiou")


def _label_word_pools(seed: int = 1234, num_train: int = 28,
                      num_heldout: int = 8) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(training, held-out) label words: single capitals and digits ("K", "7").

  Tasks draw a fresh pair each from a small pool, so every word serves in many tasks, in
  both roles: a model cannot memorise which word means what (it has to read the pairing off
  the demonstrations), but it can learn the words themselves. One byte each, so that
  answering is a one-token lookup in the demonstrations (in-context learning's simplest
  form) rather than copying a multi-byte word.
  """
  words = list(string.ascii_uppercase + string.digits)
  random.Random(seed).shuffle(words)
  return tuple(words[:num_train]), tuple(words[num_train:num_train + num_heldout])


TRAIN_LABEL_WORDS, HELDOUT_LABEL_WORDS = _label_word_pools()

Fn = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A parameterised string transform family.

  make(rng) -> (parameter description, function, input alphabet or None=all letters)
  """

  name: str
  definition: str
  make: Callable[[random.Random], Tuple[str, Fn, Optional[str]]]


def _alphabet(rng, n):
  return "".join(sorted(rng.sample(LETTERS, n)))


def _first_n(rng):
  n = rng.randint(1, 3)
  return f"n={n}", lambda s: s[:n], None


def _last_n(rng):
  n = rng.randint(1, 3)
  return f"n={n}", lambda s: s[-n:], None


def _double(rng):
  return "", lambda s: "".join(c + c for c in s)[:10], None


def _append(rng):
  suf = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2)))
  return f"suffix={suf}", lambda s: s + suf, None


def _prepend(rng):
  pre = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2)))
  return f"prefix={pre}", lambda s: pre + s, None


def _remove_letter(rng):
  # Strings over three letters: the demonstrations almost always show the letter being
  # removed (98% of queries are determined by two demonstrations; 79% over six letters).
  alpha = _alphabet(rng, 3)
  c = rng.choice(alpha)
  return f"remove={c}", lambda s: s.replace(c, "") or "-", alpha


def _upper(rng):
  return "", lambda s: s.upper(), None


# Every family copies the input with one modification: the simplest transformations for a
# byte-level T5 (reverse, sort, shift, ... need far longer; even these are not learned by the
# quickstart's from-scratch model in 1,100 steps).
TRAIN_TRANSFORMS = (
    Transform("first_n", "Keep only the first few letters.", _first_n),
    Transform("double", "Write every letter twice.", _double),
    Transform("append", "Add the same ending to the string.", _append),
    Transform("uppercase", "Write the string in capitals.", _upper),
)
# `remove_letter` is learned far more slowly than the training transformations (80% EM on new
# tasks after 30 minutes, its compositions 58%; suite version 9), so it tests generalisation
# instead.
HELDOUT_TRANSFORMS = (
    Transform("last_n", "Keep only the last few letters.", _last_n),
    Transform("prepend", "Add the same beginning to the string.", _prepend),
    Transform("remove_letter", "Delete every copy of one letter.", _remove_letter),
)
# Compositions (first, then second) of the training transforms, `uppercase` only second (the
# others act on small letters), `append` then `first_n` left out (it equals `first_n`). Each
# transform of a held-out composition is seen in the same position in a training one. The
# split is fixed, as the families' is: a seed draws the tasks' parameters, never which
# compositions are seen, so that new tasks of the training families (another seed) are tasks
# of the same compositions. SuiteConfig's num_train_compositions / num_heldout_compositions
# take the first ones of each list.
TRAIN_COMPOSITIONS = (
    ("first_n", "double"), ("double", "first_n"), ("first_n", "append"),
    ("double", "uppercase"), ("append", "double"),
)
HELDOUT_COMPOSITIONS = (("first_n", "uppercase"), ("double", "append"), ("append", "uppercase"))


@dataclasses.dataclass(frozen=True)
class Rule:
  """A binary classification rule family: make(rng) -> (desc, predicate, alphabet)."""

  name: str
  definition: str
  make: Callable[[random.Random], Tuple[str, Callable[[str], bool], Optional[str]]]
  # Inputs are one letter (repeating): a token mapping, in-context learning's simplest form.
  single_letter: bool = False
  # Tasks per family, in units of SuiteConfig.tasks_per_rule.
  weight: int = 1


def _length_parity(rng):
  return "", lambda s: len(s) % 2 == 0, None


def _contains(rng):
  # Three letters: a demonstration without the letter then usually shows the other two, so
  # the letter can be read off a pair of demonstrations (70% of queries are determined by one
  # per class, 89% by 4 at random; with 6 letters 28% and 66%).
  alpha = _alphabet(rng, 3)
  c = rng.choice(alpha)
  return f"letter={c}", lambda s: c in s, alpha


def _longer_than(rng):
  n = rng.randint(3, 4)
  return f"n={n}", lambda s: len(s) > n, None


def _starts_vowel(rng):
  return "", lambda s: s[0] in VOWELS, None


def _ends_with(rng):
  alpha = _alphabet(rng, 4)
  c = rng.choice(alpha)
  return f"letter={c}", lambda s: s[-1] == c, alpha


def _first_letter(rng):
  # A lookup, not an induction puzzle: strings over two letters, the class is the first one,
  # so the demonstrations show the letter -> label word mapping directly.
  alpha = _alphabet(rng, 2)
  return f"letters={alpha}", lambda s: s[0] == alpha[0], alpha


TRAIN_RULES = (
    Rule("letter_word", "Answer with the word that goes with the letter.", _first_letter,
         single_letter=True, weight=3),
    Rule("longer_than", "Classify the string by whether it is long.", _longer_than),
)
# Rules a tiny model does not learn in minutes test generalisation instead (README "Can a
# tiny model learn the training families?"): `first_letter` and `contains` match a letter of
# the query against letters inside the demonstrations' strings (at chance after 28,000 steps,
# an hour on 2 CPU cores, and the other families are learned more slowly beside them);
# `length_parity` is at chance after 12,000 steps.
HELDOUT_RULES = (
    Rule("starts_vowel", "Classify the string by whether it starts with a vowel.", _starts_vowel),
    Rule("ends_with", "Classify the string by whether it ends with a certain letter.", _ends_with),
    Rule("first_letter", "Classify the string by its first letter.", _first_letter),
    Rule("contains", "Classify the string by whether it contains a certain letter.", _contains),
    Rule("length_parity", "Classify the string by whether its length is even.", _length_parity),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """Sizes of the generated suite (defaults: 500 training tasks, 108 held-out); gin sets
  them (`SuiteConfig.tasks_per_rule = 30`).

  Many tasks per family (each with its own hidden parameters and label words) so that
  what is learned is reading demonstrations, not the tasks themselves.
  """

  # Many transformation tasks, each with its own parameter: with 8 tasks per family a model
  # remembers the 8 endings of `append` (94% EM on seen tasks, 3% on new ones); with 40 it
  # has to read them off the demonstrations (README "Can a tiny model learn the
  # training families?").
  tasks_per_transform: int = 40
  tasks_per_composition: int = 20
  num_train_compositions: int = len(TRAIN_COMPOSITIONS)
  num_heldout_compositions: int = len(HELDOUT_COMPOSITIONS)
  tasks_per_rule: int = 60
  # Many small held-out tasks: a task's two label words make its accuracy 0/50/100-ish for a
  # model that ignores the demonstrations, so few tasks would be a noisy average.
  heldout_tasks_per_family: int = 5
  heldout_label_word_tasks_per_rule: int = 4
  train_instances: int = 20
  # Transformation tasks get more training strings: with 20 (and 8 tasks per family) a tiny
  # model memorises them (99% token accuracy) and never learns to copy (0 EM on new strings);
  # with 1,600 strings per family it has to copy (README "What the quickstart shows").
  transform_train_instances: int = 40
  heldout_instances: int = 16
  # Extra instances per held-out task, after the evaluated ones: the pool from which
  # the fixed evaluation demonstrations are drawn (never evaluated).
  heldout_demo_pool: int = 16
  min_len: int = 3
  max_len: int = 5
  # Every n-th training task is listed as "train_sample": seen tasks evaluated on new queries
  # (their validation split) without decoding all of them.
  train_sample_every: int = 20
  # Non-empty: only these training families (names as in the task names: "letter_word",
  # "append", "first_n_then_double", ...); one family can be studied alone. The held-out
  # subsets do not change.
  train_families: Tuple[str, ...] = ()


def _random_input(rng, alphabet, cfg):
  n = rng.randint(cfg.min_len, cfg.max_len)
  return "".join(rng.choice(alphabet or LETTERS) for _ in range(n))


def _transform_instances(rng, fn, alphabet, n, cfg):
  seen, out = set(), []
  for _ in range(50 * n):
    s = _random_input(rng, alphabet, cfg)
    if s in seen:
      continue
    seen.add(s)
    out.append((s, fn(s)))
    if len(out) == n:
      break
  return out


def _rule_instances(rng, pred, alphabet, words, n, cfg, unique=True):
  """Balanced classes (half each) so the majority label is uninformative."""
  buckets = {True: [], False: []}
  seen = set()
  for _ in range(200 * n):
    s = _random_input(rng, alphabet, cfg)
    if unique and s in seen:
      continue
    seen.add(s)
    b = buckets[bool(pred(s))]
    if len(b) < (n + 1) // 2:
      b.append(s)
    if len(buckets[True]) + len(buckets[False]) >= 2 * ((n + 1) // 2):
      break
  items = [(s, words[0]) for s in buckets[True]] + [(s, words[1]) for s in buckets[False]]
  rng.shuffle(items)
  return items[:n]


def _sni_json(name, definition, instances, category, params, choices=None):
  """One task in the S-NI schema; two positive examples taken from the front."""
  pos = [{"input": x, "output": y, "explanation": ""} for x, y in instances[:2]]
  task = {
      "Contributors": ["hypertune built-in suite"],
      "Source": ["hypertune-builtin"],
      "Categories": [category],
      "Definition": [definition],
      "Input_language": ["English"],
      "Output_language": ["English"],
      "Instruction_language": ["English"],
      "Positive Examples": pos,
      "Negative Examples": [],
      "Instances": [{"id": f"{name}-{i}", "input": x, "output": [y]}
                    for i, (x, y) in enumerate(instances[2:])],
      "Instance License": ["Apache-2.0"],
      # Not S-NI fields: generator metadata, ignored by the loader.
      "hypertune_params": params,
  }
  if choices is not None:
    task["hypertune_answer_choices"] = list(choices)
  return task


def generate_suite(seed: int = 0, config: Optional[SuiteConfig] = None) -> Dict[str, Dict]:
  """Returns {"tasks": {name: sni_json}, "splits": {split: [names]}}.

  Deterministic for (seed, config, SUITE_VERSION); config None = `SuiteConfig()` as bound
  in gin (read at call time, not at import).
  """
  config = config or SuiteConfig()
  tasks: Dict[str, dict] = {}
  splits: Dict[str, List[str]] = {
      "train": [], "heldout_families": [], "heldout_compositions": [], "heldout_label_words": []}
  counter = itertools.count(1)

  def rng_for(*parts):
    return random.Random(fewshot.stable_seed("builtin", SUITE_VERSION, seed, *parts))

  def distinct(seen, make, *parts):
    """Draws task parameters, re-drawing (a few times) ones already used in the family
    so that tasks of a family differ whenever the parameter space allows."""
    for attempt in range(20):
      rng = rng_for(*parts, attempt)
      made = make(rng)
      if made[0] not in seen or not made[0]:
        break
    seen.add(made[0])
    return rng, made

  def add(split, family, definition, instances, params, choices=None, category="Transform"):
    if split == "train" and config.train_families and family not in config.train_families:
      return
    name = f"task{next(counter):03d}_{family}"
    # Positive examples are instances[:2]; the remaining ones are the Instances.
    tasks[name] = _sni_json(name, definition, instances, category, params, choices)
    splits[split].append(name)

  def transform_tasks(split, t: Transform, n_tasks, n_inst):
    seen = set()
    for j in range(n_tasks):
      rng, (params, fn, alpha) = distinct(seen, lambda r: t.make(r), "t", t.name, split, j)
      add(split, t.name, t.definition, _transform_instances(rng, fn, alpha, n_inst + 2, config),
          {"family": t.name, "params": params})

  def rule_tasks(split, r: Rule, n_tasks, n_inst, words_pool):
    seen = set()
    for j in range(n_tasks):
      rng, (params, pred, alpha) = distinct(seen, lambda x: r.make(x), "r", r.name, split, j)
      words = tuple(rng.sample(words_pool, 2))
      inst = _rule_instances(rng, pred, alpha, words, n_inst + 2,
                             dataclasses.replace(config, min_len=1, max_len=1)
                             if r.single_letter else config, unique=not r.single_letter)
      add(split, r.name, f"{r.definition} Answer with one of two words.", inst,
          {"family": r.name, "params": params, "label_words": list(words)},
          choices=words, category="Classification")

  def composition_tasks(split, pairs, n_inst):
    by_name = {t.name: t for t in TRAIN_TRANSFORMS}
    for a, b in ((by_name[x], by_name[y]) for x, y in pairs):
      seen = set()
      for j in range(config.tasks_per_composition):
        make = lambda r: (lambda x, y: (f"{x[0]};{y[0]}", (x, y), None))(a.make(r), b.make(r))
        rng, (_, ((pa, fa, alpha_a), (pb, fb, alpha_b)), _) = distinct(
            seen, make, "c", a.name, b.name, split, j)
        fn = lambda s, fa=fa, fb=fb: fb(fa(s)) or "-"
        # Either part's alphabet: a letter parameter drawn from a few letters (as
        # remove_letter's) hardly ever shows in strings over all 26.
        add(split, f"{a.name}_then_{b.name}", f"{a.definition} Then: {b.definition}",
            _transform_instances(rng, fn, alpha_a or alpha_b, n_inst + 2, config),
            {"family": f"{a.name}+{b.name}", "params": f"{pa};{pb}"})

  n_tr, n_tr_transform = config.train_instances, config.transform_train_instances
  n_ho = config.heldout_instances + config.heldout_demo_pool
  for t in TRAIN_TRANSFORMS:
    transform_tasks("train", t, config.tasks_per_transform, n_tr_transform)
  composition_tasks("train", TRAIN_COMPOSITIONS[:config.num_train_compositions], n_tr_transform)
  for r in TRAIN_RULES:
    rule_tasks("train", r, config.tasks_per_rule * r.weight, n_tr, TRAIN_LABEL_WORDS)
  for t in HELDOUT_TRANSFORMS:
    transform_tasks("heldout_families", t, config.heldout_tasks_per_family, n_ho)
  for r in HELDOUT_RULES:
    rule_tasks("heldout_families", r, config.heldout_tasks_per_family, n_ho, TRAIN_LABEL_WORDS)
  composition_tasks("heldout_compositions",
                    HELDOUT_COMPOSITIONS[:config.num_heldout_compositions], n_ho)
  for r in TRAIN_RULES:
    rule_tasks("heldout_label_words", r, config.heldout_label_word_tasks_per_rule, n_ho,
               HELDOUT_LABEL_WORDS)
  return {"tasks": tasks, "splits": splits}


HELDOUT_SUBSETS = ("heldout_families", "heldout_compositions", "heldout_label_words")


def default_cache_dir(seed: int) -> str:
  base = os.environ.get("HYPERTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hypertune")
  return os.path.join(base, f"builtin_suite_v{SUITE_VERSION}_seed{seed}")


def _holds_manifest(out_dir: str, manifest: dict) -> bool:
  mpath = os.path.join(out_dir, "MANIFEST.json")
  if not os.path.exists(mpath):
    return False
  with open(mpath, encoding="utf-8") as f:
    return json.load(f) == manifest


def _generator_digest() -> str:
  """A digest of this module's source: a suite cached by an edited generator (new families,
  other parameters) is rewritten even where SUITE_VERSION was not bumped yet."""
  with open(__file__, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def write_suite(out_dir: Optional[str] = None, seed: int = 0,
                config: Optional[SuiteConfig] = None) -> str:
  """Writes the suite in S-NI layout under out_dir (default: a cache dir); returns it.

  If out_dir already holds this exact suite (same manifest), it is reused. Writing is
  atomic (temp dir + rename) so concurrent test workers do not see partial files.
  """
  out_dir = out_dir or default_cache_dir(seed)
  config = config or SuiteConfig()
  # Through JSON so that it compares equal to the written file (tuples become lists).
  manifest = json.loads(json.dumps(
      {"version": SUITE_VERSION, "seed": seed, "config": dataclasses.asdict(config),
       "generator": _generator_digest()}))
  mpath = os.path.join(out_dir, "MANIFEST.json")
  if _holds_manifest(out_dir, manifest):
    return out_dir
  suite = generate_suite(seed, config)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".builtin_tmp_", dir=parent)
  os.makedirs(os.path.join(tmp, "tasks"))
  os.makedirs(os.path.join(tmp, "splits"))
  for name, task in suite["tasks"].items():
    with open(os.path.join(tmp, "tasks", name + ".json"), "w", encoding="utf-8") as f:
      json.dump(task, f, indent=1)
  sp = suite["splits"]
  lists = {"train": sp["train"], "test": [n for s in HELDOUT_SUBSETS for n in sp[s]]}
  lists.update({s: sp[s] for s in HELDOUT_SUBSETS})
  lists["train_sample"] = sp["train"][::config.train_sample_every]
  for split, names in lists.items():
    with open(os.path.join(tmp, "splits", f"{split}_tasks.txt"), "w", encoding="utf-8") as f:
      f.write("\n".join(names) + "\n")
  with open(os.path.join(tmp, "MANIFEST.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not os.path.exists(mpath):
    shutil.rmtree(tmp, ignore_errors=True)
    raise FileExistsError(f"{out_dir} exists and is not a built-in suite directory "
                          "(no MANIFEST.json); refusing to overwrite it")
  if _holds_manifest(out_dir, manifest):
    # Another process wrote the same suite meanwhile; it may be reading it already, so it
    # stays in place.
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
  if os.path.exists(out_dir):
    # A stale suite (other seed/config/version): replace it.
    old = tmp + ".old"
    try:
      os.replace(out_dir, old)
      shutil.rmtree(old, ignore_errors=True)
    except OSError:
      pass
  try:
    os.replace(tmp, out_dir)
  except OSError:
    # Another process won the race with the same content.
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
