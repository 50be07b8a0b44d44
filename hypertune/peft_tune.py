r"""Per-task PEFT tuning from three initialisations (HyperT5 section 6 and appendix D,
HyperLlama section 6):

    python -m hypertune.peft_tune --gin_file=experiments/hypert5/builtin_peft_tune.gin \
      --gin.MODEL_DIR="'/tmp/peft_tune'" --gin.HYPER_PREFIX_DIR="'/tmp/qs/2'" ...

Every task of MIXTURE_OR_TASK_NAME (held-out tasks) is tuned on its own training examples,
for each PEFT type and initialisation and seed, over the frozen downstream T5 of the runs it
starts from, and scored from step 0 every `eval_every` steps:

  PEFT types (`peft_types`):
    prefix_flat  the key/value prefixes of every layer are the parameters (Prefix-Flat)
    prefix_mlp   2P learned embeddings through MLP heads give them (Prefix-MLP, Li & Liang)
    lora         LoRA on q and v of every attention kind
  initialisations (`inits`):
    random  fresh parameters (LoRA: up = 0, i.e. the plain downstream model)
    shared  the multi-task PEFT baseline's (`SharedPeft`: a run of models/shared_prefix.gin or
            shared_lora.gin); Prefix-Flat: the prefixes its Prefix-MLP computes
    hyper   what a trained HyperT5 run generates from `num_hyper_examples` (16) training
            examples of the task, sampled per seed: Prefix-Flat the generated prefixes, LoRA the
            generated (gated) LoRA; Prefix-MLP the hyper decoder's outputs as the embeddings
            and HyperT5's heads as the MLPs. HyperT5-Prefix's heads are Prefix-MLP's
            reparameterisation (LayerNorm, Dense, tanh, Dense on each of 2P token states), so it
            is appendix D's "HyperT5-Prefix-MLP".

The per-task module is `SharedPeft` (one parameter set; the hyper inputs are ignored) trained
on one task, through `train_lib`'s train step (frozen downstream: no gradient, no update) and
scored by `evaluation.Evaluator`, as every run is. A task without a "train" split (held-out
evaluation tasks: the built-in suite's, S-NI's) is tuned on its demonstration pool, the
instances that are never evaluated; the downstream reads the query alone.

Writes MODEL_DIR/peft_tune.json (every run's scores over steps, and their means per PEFT type
and initialisation; rewritten after each run) and MODEL_DIR/peft_tune.png (mean score vs step,
a panel per PEFT type, a line per initialisation). Run directories are read as
`hypertune.eval` reads them: the model from their config.gin, the parameters from
frozen_params/ and the latest checkpoint.

Flags as `hypertune.train`'s (`--gin_file`, `--gin.NAME=VALUE`, `--gin_bindings`,
`--gin_search_paths`); gin selectors are `peft_tune.peft_tune.<param>`.
"""
import dataclasses
import json
import logging
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import numpy as np

from hypertune import gin_utils  # first: the console's quiet start-up precedes TensorFlow

# Ours -> SharedPeft.peft_type, and which kind of run ("prefix" | "lora") initialises it.
PEFT_TYPES = {"prefix_flat": "prefix_flat", "prefix_mlp": "prefix", "lora": "lora"}
SOURCE_KIND = {"prefix_flat": "prefix", "prefix_mlp": "prefix", "lora": "lora"}
INITS = ("random", "shared", "hyper")
LABELS = {"prefix_flat": "Prefix-Flat", "prefix_mlp": "Prefix-MLP", "lora": "LoRA",
          "random": "Rand Init", "shared": "Shared Init", "hyper": "Hyper Init"}
RESULTS_FILE = "peft_tune.json"
PLOT_FILE = "peft_tune.png"
TUNING_PREFIX = "peft_tune."  # seqio name of a task's tuning data: peft_tune.<task>


@dataclasses.dataclass
class Run:
  """A finished training run: its model (as its config.gin builds it) and parameters."""
  model_dir: str
  model: Any
  params: dict


def load_run(model_dir: str) -> Run:
  """The model `MODEL_DIR/config.gin` builds and the run's parameters (frozen + latest
  trainable). The caller's gin configuration is restored afterwards."""
  from hypertune import param_sources  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(model_dir, "config.gin")
  if not (param_sources.is_run_dir(model_dir) and os.path.exists(config_path)):
    raise FileNotFoundError(f"{model_dir}: not a hypertune training run (needs config.gin and "
                            "checkpoints/)")
  saved = gin.config_str()
  gin.clear_config()
  try:
    gin_utils.parse([config_path])
    reference = gin.query_parameter("train.model")
    model = reference.scoped_configurable_fn()
  finally:
    gin.clear_config()
    gin.parse_config(saved)
  return Run(model_dir, model, param_sources.load_run_params(model_dir))


def task_model(config, peft_type: str, prefix_len: int, lora_rank: int,
               flat_init_scale: float = 1.0):
  """The downstream T5 of `config` with one `SharedPeft` of `peft_type` (ours) over it."""
  from hypertune.hypernets.shared_peft import SharedPeft  # pylint: disable=g-import-not-at-top
  from hypertune.models.base import EncoderDecoderModel  # pylint: disable=g-import-not-at-top
  from hypertune.models.hypermodel import HyperModel  # pylint: disable=g-import-not-at-top
  if peft_type not in PEFT_TYPES:
    raise ValueError(f"peft_tune.peft_types: {peft_type!r} is not one of {list(PEFT_TYPES)}")
  hypernet = SharedPeft(config, peft_type=PEFT_TYPES[peft_type], prefix_len=prefix_len,
                        lora_rank=lora_rank, flat_init_scale=flat_init_scale)
  return EncoderDecoderModel(module=HyperModel(config, hypernet=hypernet))


# --- a task's tuning data --------------------------------------------------------------------

def training_examples(task, eval_split: str) -> list:
  """The raw examples a task is tuned on: its "train" split, else its demonstration pool (the
  instances never evaluated), labelled with the answer choices of its evaluated examples."""
  from hypertune.data import fewshot  # pylint: disable=g-import-not-at-top
  if task.splits.get(fewshot.TRAIN_SPLIT):
    return list(task.splits[fewshot.TRAIN_SPLIT])
  evaluated = task.splits.get(eval_split) or []
  choices = tuple(evaluated[0].answer_choices) if evaluated else ()
  pool = fewshot.eval_pool(task)
  if not pool:
    raise ValueError(f"task {task.name}: no 'train' split and no demonstration pool to tune on")
  return [fewshot.TaskExample(x, (y,), choices, choices.index(y) if y in choices else -1,
                              id=f"pool-{i}") for i, (x, y) in enumerate(pool)]


def register_tuning_task(task_name: str, eval_split: str,
                         task_feature_lengths: Mapping[str, int]) -> Tuple[str, list]:
  """Registers `peft_tune.<task_name>`: split "train" (the tuning examples) and `eval_split`
  (the task's evaluated examples), the downstream reading the query alone (hyper_mode "none").
  Returns (its name, the tuning examples)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune.data import fewshot  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  builder = common.get_builder(task_name)
  task = builder.task
  if not task.splits.get(eval_split):
    raise ValueError(f"peft_tune.eval_split: task {task_name} has no split {eval_split!r} "
                     f"(has {sorted(task.splits)})")
  train = training_examples(task, eval_split)
  data = fewshot.TaskData(name=task.name, splits={fewshot.TRAIN_SPLIT: train,
                                                  eval_split: list(task.splits[eval_split])},
                          eval_pool=[e.demonstration() for e in train])
  config = fewshot.config_for_lengths(task_feature_lengths, hyper_mode="none",
                                      use_instruction=False, demos="none", k=0,
                                      seed=builder.config.seed)
  vocab = seqio.get_mixture_or_task(task_name).output_features["inputs"].vocabulary
  name = TUNING_PREFIX + task_name
  common.register_three_input_task(name, data, config, vocab)
  return name, train


def hyper_tokens(task_name: str, examples: Sequence, num_examples: int, seed: int
                 ) -> Tuple[np.ndarray, int]:
  """(hyper_input_tokens `[1, hyper_len]`, demonstrations that fit): `num_examples` of
  `examples` sampled by `seed`, formatted as the task's hypernetwork inputs are (its
  registration's instruction, `<x> in <y> out` markers and hyper length; whole demonstrations
  that do not fit are dropped)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune.data import fewshot  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  builder = common.get_builder(task_name)
  demos = fewshot.sample_demonstrations(
      [e.demonstration() for e in examples], num_examples,
      random.Random(fewshot.stable_seed("peft_tune", seed, task_name)))
  text, used = builder.hyper_text(demos)
  vocab = seqio.get_mixture_or_task(task_name).output_features["inputs"].vocabulary
  length = builder.config.max_hyper_length
  ids = (list(vocab.encode(text)) + [vocab.eos_id])[:length]  # EOS: as the output feature adds
  return np.array([ids + [0] * (length - len(ids))], np.int32), used


# --- initial parameters ----------------------------------------------------------------------

def peft_to_params(peft, peft_type: str) -> dict:
  """Row 0 of generated PEFT (`PeftParams`, batch 1) -> the per-task module's parameters:
  Prefix-Flat `{enc,dec}_prefix_{key,value}` `[layers, P, heads, head_dim]` or LoRA
  `{kind}_{q,v}_{down,up}` `[layers, R, d_model]` / `[layers, inner, R]` (scale folded into up).
  """
  from hypertune.models.peft import ATTENTION_KINDS  # pylint: disable=g-import-not-at-top
  row = lambda x: np.array(x[0], np.float32)
  if peft.adapters or peft.extra_memory is not None or peft.position_offset is not None:
    raise ValueError("peft_tune: the generated PEFT has adapters, fused memory or offsets; the "
                     "per-task module has prefixes or LoRA only")
  if peft_type == "prefix_flat":
    prefixes = peft.prefixes
    if set(prefixes) != set(ATTENTION_KINDS) or peft.lora:
      raise ValueError(f"peft_tune: Prefix-Flat needs prefixes of {ATTENTION_KINDS} only; the "
                       f"source generates prefixes {sorted(prefixes)} and LoRA {sorted(peft.lora)}")
    cross, dec = prefixes["decoder_cross"], prefixes["decoder_self"]
    if not (np.array_equal(cross.key, dec.key) and np.array_equal(cross.value, dec.value)):
      raise ValueError("peft_tune: the source's decoder cross-attention prefixes differ from its "
                       "self-attention ones (separate_cross_prefixes); Prefix-Flat shares them")
    return {"enc_prefix_key": row(prefixes["encoder_self"].key),
            "enc_prefix_value": row(prefixes["encoder_self"].value),
            "dec_prefix_key": row(dec.key), "dec_prefix_value": row(dec.value)}
  if peft_type != "lora":
    raise ValueError(f"peft_to_params: {peft_type!r} is not 'prefix_flat' or 'lora'")
  expected = {f"{kind}/{proj}" for kind in ATTENTION_KINDS for proj in ("q", "v")}
  if set(peft.lora) != expected or peft.prefixes:
    raise ValueError(f"peft_tune: LoRA needs LoRA on {sorted(expected)} only; the source "
                     f"generates LoRA {sorted(peft.lora)} and prefixes {sorted(peft.prefixes)}")
  out = {}
  for name, lora in peft.lora.items():
    key = name.replace("/", "_")
    out[f"{key}_down"] = row(lora.down)
    out[f"{key}_up"] = row(lora.up) * np.float32(lora.scale)
  return out


def hyper_prefix_mlp(run: Run, tokens: np.ndarray) -> dict:
  """Prefix-MLP parameters from HyperT5-Prefix: the hyper decoder's outputs for `tokens`
  `[1, hyper_len]` as `prefix_embeddings` `[2P, d_model]`, HyperT5's heads as the MLPs."""
  from hypertune.hypernets.hypert5 import HyperT5  # pylint: disable=g-import-not-at-top
  from hypertune.models.hypermodel import HyperModel  # pylint: disable=g-import-not-at-top
  hypernet = run.model.module.hypernet
  if not (isinstance(hypernet, HyperT5) and hypernet.peft_type == "prefix"):
    raise ValueError(f"peft_tune: hyper init of Prefix-MLP needs a HyperT5-Prefix run; "
                     f"{run.model_dir} has {type(hypernet).__name__}")
  if hypernet.separate_cross_prefixes or hypernet.fusion_in_decoder:
    raise ValueError(f"peft_tune: {run.model_dir}: Prefix-MLP has no cross-attention prefixes "
                     "or fused memory of its own (separate_cross_prefixes, fusion_in_decoder)")
  if hypernet.config.d_model != hypernet.downstream.d_model:
    raise ValueError(f"peft_tune: {run.model_dir}: the hyper decoder's width "
                     f"({hypernet.config.d_model}) must equal the downstream's d_model "
                     f"({hypernet.downstream.d_model}) to serve as Prefix-MLP's embeddings")
  _, state = run.model.module.apply(
      {"params": run.params}, tokens, method=HyperModel.generate_peft,
      capture_intermediates=lambda m, name: m.name == "hyper_decoder" and name == "__call__",
      mutable=["intermediates"])
  hidden = state["intermediates"]["hypernet"]["hyper_decoder"]["__call__"][0]  # [1, 2P, d]
  heads = {f"{kind}_{kv}_head": run.params["hypernet"][f"{kind}_{kv}_head"]
           for kind in ("enc", "dec") for kv in ("k", "v")}
  return {"prefix_embeddings": np.array(hidden[0], np.float32),
          **{k: {n: np.array(v) for n, v in h.items()} for k, h in heads.items()}}


def initial_hypernet(init: str, peft_type: str, fresh: dict, source: Optional[Run],
                     tokens: np.ndarray) -> dict:
  """The per-task module's initial parameters (shaped as `fresh`, its own initialisation)."""
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  if init == "random":
    return fresh
  if init == "shared" and peft_type != "prefix_flat":
    params = source.params["hypernet"]  # the same module: its parameters as they are
  elif init == "hyper" and peft_type == "prefix_mlp":
    params = hyper_prefix_mlp(source, tokens)
  else:
    peft = source.model.task_parameters(source.params, {}, tokens)
    params = peft_to_params(peft, peft_type)
  ours = {k: np.shape(v) for k, v in flatten_dict(fresh, sep="/").items()}
  theirs = {k: np.shape(v) for k, v in flatten_dict(params, sep="/").items()}
  for key in sorted(set(ours) | set(theirs)):
    if ours.get(key) != theirs.get(key):
      raise ValueError(f"peft_tune: {init} init of {peft_type} from {source.model_dir}: "
                       f"parameter {key} is {theirs.get(key)} there, {ours.get(key)} in the "
                       "per-task module (prefix_len / lora_rank must be the run's)")
  return jax_free_copy(params)


def jax_free_copy(tree) -> dict:
  """numpy copies of every leaf (the train state is donated: no buffer is shared)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.array(x), tree)


# --- tuning ----------------------------------------------------------------------------------

def tune(trainer, evaluator, params: dict, task_name: str, eval_split: str, steps: int,
         eval_every: int, batch_size: int, task_feature_lengths: Mapping[str, int], seed: int
         ) -> Tuple[List[dict], dict]:
  """Tunes `params` on `task_name`'s "train" split through the train step; scores it on
  `eval_split` at step 0, every `eval_every` steps and at the end.

  Returns ([{"step", "train_loss" (mean since the last score; None at step 0), metric: %}],
  the final parameters, on the devices).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from hypertune.evaluation import MODEL_BATCH_FEATURES  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top
  state = trainer.create_state(params)
  batches = common.get_batches(task_name, "train", batch_size, task_feature_lengths,
                               seed=seed).as_numpy_iterator()
  rng = jax.random.key(seed + 1)
  scores, losses = [], []

  def score(step):
    results = evaluator.evaluate(state.params, [task_name], eval_split)[task_name]
    scores.append({"step": step, "train_loss": float(np.mean(losses)) if losses else None,
                   **{k: float(v) for k, v in results.items() if isinstance(v, (int, float))}})
    losses.clear()

  score(0)
  for step in range(1, steps + 1):
    batch = next(batches)
    features = {k: v for k, v in batch.items() if k in MODEL_BATCH_FEATURES}
    state, metrics = trainer.step_fn(state, trainer.shard_batch(features), rng)
    losses.append(float(metrics["loss"]))
    if step % eval_every == 0 or step == steps:
      score(step)
  return scores, state.params


def summarize(runs: Sequence[Mapping], metrics: Sequence[str]) -> dict:
  """{peft_type: {init: {"steps": [...], metric: [mean over the tasks and seeds that have it],
  "runs": n}}}."""
  out: Dict[str, Dict[str, dict]] = {}
  totals: Dict[Tuple[str, str, str], Tuple[List[float], int]] = {}  # sums and run counts
  for run in runs:
    steps = [s["step"] for s in run["scores"]]
    entry = out.setdefault(run["peft_type"], {}).setdefault(run["init"],
                                                           {"steps": steps, "runs": 0})
    if entry["steps"] != steps:
      raise ValueError("peft_tune: runs of one PEFT type and init scored at different steps")
    entry["runs"] += 1
    for m in metrics:
      if all(m in s for s in run["scores"]):
        key = (run["peft_type"], run["init"], m)
        total, n = totals.get(key, ([0.0] * len(steps), 0))
        totals[key] = ([a + s[m] for a, s in zip(total, run["scores"])], n + 1)
  for (peft_type, init, m), (total, n) in totals.items():
    out[peft_type][init][m] = [v / n for v in total]
  return out


def plot_curves(summary: Mapping, out: str, metric: str, title: str = "") -> str:
  """Writes `out` (PNG): mean `metric` vs step, a panel per PEFT type, a line per init (as the
  papers' Figures 5 and 9). Returns `out`."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from hypertune import plot  # pylint: disable=g-import-not-at-top
  types = list(summary)
  fig = Figure(figsize=(1.0 + 4.2 * max(len(types), 1), 4.2), layout="constrained")
  axes = fig.subplots(1, max(len(types), 1), squeeze=False, sharey=True)[0]
  for ax, peft_type in zip(axes, types):
    for i, init in enumerate(INITS):
      curve = summary[peft_type].get(init)
      if curve:
        ax.plot(curve["steps"], curve[metric], marker="o", color=f"C{i}", label=LABELS[init])
    ax.set(title=LABELS.get(peft_type, peft_type), xlabel="tuning step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel(f"{metric} (%, mean over tasks and seeds)")
  if title:
    fig.suptitle(title)
  return plot._save(fig, out)  # pylint: disable=protected-access


def _write_json(path: str, data) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def _same_tree(a, b) -> bool:
  from flax.traverse_util import flatten_dict  # pylint: disable=g-import-not-at-top
  fa, fb = flatten_dict(a, sep="/"), flatten_dict(b, sep="/")
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def _module_value(runs: Sequence[Run], field: str, default: int) -> int:
  """`prefix_len` / `lora_rank` of the runs' hypernetworks (they must agree), else `default`."""
  values = {(r.model_dir, getattr(r.model.module.hypernet, field)) for r in runs
            if hasattr(r.model.module.hypernet, field)}
  if len({v for _, v in values}) > 1:
    raise ValueError(f"peft_tune: the runs disagree on {field}: {sorted(values)}")
  return values.pop()[1] if values else default


@gin.configurable
def peft_tune(
    model_dir: str = gin.REQUIRED,
    tasks: Union[str, Sequence[str]] = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    peft_types: Sequence[str] = tuple(PEFT_TYPES),
    inits: Sequence[str] = INITS,
    shared_runs: Mapping[str, Optional[str]] = None,
    hyper_runs: Mapping[str, Optional[str]] = None,
    downstream_checkpoint: Optional[str] = None,
    model_config: Any = None,
    setup_tasks: Sequence[Callable] = (),
    max_tasks: Optional[int] = None,
    eval_split: str = "test",
    steps: int = 200,
    eval_every: int = 50,
    batch_size: int = 8,
    eval_batch_size: int = 32,
    learning_rate: Union[float, Mapping[str, float]] = 1e-3,
    max_grad_norm: Optional[float] = 1.0,
    seeds: Sequence[int] = (0,),
    num_hyper_examples: int = 16,
    prefix_len: Optional[int] = None,
    lora_rank: Optional[int] = None,
    flat_init_scale: float = 1.0,
    metric: str = "exact_match",
) -> dict:
  """Tunes each task x PEFT type x init x seed (see the module doc); returns what
  MODEL_DIR/peft_tune.json holds.

  Args:
    tasks: a task or mixture name, or a list of them (registered by `setup_tasks`).
    max_tasks: at most this many of the tasks, evenly spaced (the built-in suite lists a
      family's tasks together: every n-th task covers the families).
    shared_runs / hyper_runs: {"prefix" | "lora": run directory}: the multi-task PEFT baseline
      (models/shared_{prefix,lora}.gin) and HyperT5 (models/hypert5_{prefix,lora}.gin) runs
      for the shared and hyper inits ("prefix" serves Prefix-Flat and Prefix-MLP).
    downstream_checkpoint: the frozen downstream T5 (Hugging Face directory or run); None: the
      runs' (which must all have the same downstream T5, bit for bit).
    model_config: the downstream's T5Config; None: the runs'.
    learning_rate: one rate, or {peft type: rate} (constant; AdamW).
    prefix_len, lora_rank: None: the runs' (SharedPeft's / HyperT5's; they must agree).
    metric: what the plot shows and `summary` averages first (all metrics are kept).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from hypertune import optimizers, param_sources, partitioning, train_lib  # pylint: disable=g-import-not-at-top
  from hypertune.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  from tasks import common  # pylint: disable=g-import-not-at-top

  shared_runs, hyper_runs = dict(shared_runs or {}), dict(hyper_runs or {})
  for t in peft_types:
    if t not in PEFT_TYPES:
      raise ValueError(f"peft_tune.peft_types: {t!r} is not one of {list(PEFT_TYPES)}")
  for i in inits:
    if i not in INITS:
      raise ValueError(f"peft_tune.inits: {i!r} is not one of {list(INITS)}")
  if eval_every <= 0 or steps < 0:
    raise ValueError(f"peft_tune: steps ({steps}) must be >= 0 and eval_every ({eval_every}) > 0")
  # The run directories needed, checked before anything is built.
  needed = {}
  for init, runs in (("shared", shared_runs), ("hyper", hyper_runs)):
    if init not in inits:
      continue
    for kind in sorted({SOURCE_KIND[t] for t in peft_types}):
      path = runs.get(kind)
      if not path:
        raise ValueError(f"peft_tune.{init}_runs[{kind!r}]: a run directory is needed for the "
                         f"{init} init of {[t for t in peft_types if SOURCE_KIND[t] == kind]}")
      if not param_sources.is_run_dir(path):
        raise FileNotFoundError(f"peft_tune.{init}_runs[{kind!r}] = {path!r}: not a hypertune "
                                "run directory (with checkpoints/)")
      needed[(init, kind)] = path

  for setup in setup_tasks:
    setup()
  names = [tasks] if isinstance(tasks, str) else list(tasks)
  task_names = [t for name in names for t in common.mixture_tasks(name)]
  if max_tasks and len(task_names) > max_tasks:
    task_names = [task_names[i * len(task_names) // max_tasks] for i in range(max_tasks)]
  sources = {key: load_run(path) for key, path in needed.items()}

  # One frozen downstream T5 for every init: tuned runs compare initialisations, not models.
  if model_config is None:
    configs = [r.model.module.config for r in sources.values()]
    if not configs:
      raise ValueError("peft_tune.model_config is needed without shared or hyper runs")
    model_config = configs[0]
  for run in sources.values():
    if run.model.module.config != model_config:
      raise ValueError(f"peft_tune: {run.model_dir}'s downstream T5Config differs from "
                       f"{'peft_tune.model_config' if not sources else 'the other runs'}")
  if downstream_checkpoint:
    downstream = param_sources.read_source(downstream_checkpoint, task_model(
        model_config, peft_types[0], 1, 1))["downstream"]
    origin = downstream_checkpoint
  elif sources:
    first = next(iter(sources.values()))
    downstream, origin = first.params["downstream"], first.model_dir
  else:
    raise ValueError("peft_tune.downstream_checkpoint is needed without shared or hyper runs")
  downstream = jax_free_copy(downstream)
  for run in sources.values():
    if not _same_tree(run.params["downstream"], downstream):
      raise ValueError(f"peft_tune: the downstream T5 of {run.model_dir} differs from that of "
                       f"{origin}; the runs must share one frozen downstream model")
  prefix_len = prefix_len or _module_value(
      [r for (_, kind), r in sources.items() if kind == "prefix"], "prefix_len", 16)
  lora_rank = lora_rank or _module_value(
      [r for (_, kind), r in sources.items() if kind == "lora"], "lora_rank", 8)

  tune_lengths = dict(task_feature_lengths, hyper_inputs=1)  # the hyper inputs are ignored
  tuning = {t: register_tuning_task(t, eval_split, tune_lengths) for t in task_names}
  mesh = partitioning.make_mesh()
  rules = partitioning.standard_logical_axis_rules()
  os.makedirs(model_dir, exist_ok=True)
  json_path = os.path.join(model_dir, RESULTS_FILE)
  config = {"tasks": task_names, "peft_types": list(peft_types), "inits": list(inits),
            "seeds": list(seeds), "steps": steps, "eval_every": eval_every,
            "batch_size": batch_size, "eval_split": eval_split, "learning_rate": learning_rate,
            "num_hyper_examples": num_hyper_examples, "prefix_len": prefix_len,
            "lora_rank": lora_rank, "downstream": origin,
            "runs": {f"{init}_{kind}": path for (init, kind), path in needed.items()},
            "task_feature_lengths": dict(task_feature_lengths), "metric": metric}
  runs: List[dict] = []
  total = len(peft_types) * len(inits) * len(task_names) * len(seeds)
  start = time.time()
  for peft_type in peft_types:
    lr = learning_rate[peft_type] if isinstance(learning_rate, Mapping) else learning_rate
    model = task_model(model_config, peft_type, prefix_len, lora_rank, flat_init_scale)
    tx = optimizers.make_optimizer(optimizers.adamw(optimizers.constant(lr)), ["hypernet/.*"],
                                   ["downstream/.*"], max_grad_norm)
    # One trainer and evaluator per PEFT type: their compiled functions serve every run.
    trainer = train_lib.PartitionedTrainer(
        model, tx, mesh, rules, model.batch_shapes(batch_size, tune_lengths),
        trainable_patterns=["hypernet/.*"], frozen_patterns=["downstream/.*"])
    evaluator = Evaluator(model, tune_lengths, eval_batch_size)
    for seed in seeds:
      fresh = jax_free_copy(partitioning.to_host(
          trainer.init_params(jax.random.key(seed)))["hypernet"])
      for task in task_names:
        tuning_name, examples = tuning[task]
        tokens, used = hyper_tokens(task, examples, num_hyper_examples, seed)
        for init in inits:
          t0 = time.time()
          source = sources.get((init, SOURCE_KIND[peft_type]))
          hypernet = initial_hypernet(init, peft_type, fresh, source, tokens)
          scores, _ = tune(trainer, evaluator, {"downstream": downstream, "hypernet": hypernet},
                           tuning_name, eval_split, steps, eval_every, batch_size,
                           tune_lengths, seed)
          runs.append({"peft_type": peft_type, "init": init, "task": task, "seed": seed,
                       "learning_rate": lr, "train_examples": len(examples),
                       "hyper_demonstrations": used if init == "hyper" else None,
                       "seconds": round(time.time() - t0, 2), "scores": scores})
          logging.info("[%d/%d] %s %s %s seed %d: %s %.1f -> %.1f (%.0f s; %.0f s in all)",
                       len(runs), total, peft_type, init, task, seed, metric,
                       scores[0].get(metric, float("nan")), scores[-1].get(metric, float("nan")),
                       time.time() - t0, time.time() - start)
          metrics = sorted({m for r in runs for s in r["scores"] for m in s
                            if m not in ("step", "train_loss")})
          _write_json(json_path, {"config": config, "summary": summarize(runs, metrics),
                                  "runs": runs})
  metrics = sorted({m for r in runs for s in r["scores"] for m in s
                    if m not in ("step", "train_loss")})
  summary = summarize(runs, metrics)
  result = {"config": config, "summary": summary, "runs": runs,
            "seconds": round(time.time() - start, 1)}
  _write_json(json_path, result)
  if runs and metric in metrics:
    png = plot_curves(summary, os.path.join(model_dir, PLOT_FILE), metric,
                      title=f"Per-task PEFT tuning: {len(task_names)} tasks x {len(seeds)} "
                            f"seed(s), {metric}")
    logging.info("wrote %s and %s", json_path, png)
  return result


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv):
    print(__doc__)
    return None
  # Under `python -m` this file is __main__; gin binds the importable module's function.
  from hypertune import peft_tune as module  # pylint: disable=g-import-not-at-top,import-self
  return gin_utils.run(lambda: module.peft_tune(), argv, binary="train")


if __name__ == "__main__":
  main()
