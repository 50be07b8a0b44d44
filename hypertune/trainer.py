r"""The training loop behind `python -m hypertune.train --gin_file=... --gin.MODEL_DIR=...`.

Hyperpretraining, multi-task fine-tuning of a hypernetwork, and the baselines are the same loop;
they differ in gin (model, mixture, trainable patterns, initial checkpoint).

The run directory MODEL_DIR holds `config.gin` (the operative config), `checkpoints/` (trainable
parameters, optimizer state, data position; frozen parameters are not re-saved: they are rebuilt
from the initial checkpoint), `train/` and `eval/` TensorBoard summaries, and
`eval/results_step*.json` (with `_predictions.jsonl` beside each).
"""
import logging
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
import seqio
from flax.traverse_util import flatten_dict, unflatten_dict

from hypertune import checkpoints, optimizers, partitioning, progress, train_lib
from hypertune.evaluation import Evaluator, write_results
from hypertune.hypernets import hypert5
from hypertune.models import hf_convert
from hypertune.models.hypermodel import HyperModel


def trainable_subtree(params, mask) -> dict:
  """Only the trainable leaves (what a checkpoint stores)."""
  m = flatten_dict(mask, sep="/")
  return unflatten_dict({k: v for k, v in flatten_dict(params, sep="/").items() if m[k]}, sep="/")


def merge_params(params, subtree) -> dict:
  """`params` with the leaves of `subtree` (same paths) replaced."""
  return unflatten_dict({**flatten_dict(params, sep="/"), **flatten_dict(subtree, sep="/")},
                        sep="/")


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_initial_params(path: str, params: dict, model: HyperModel,
                        assignment_map: Sequence[Tuple[str, Optional[str]]] = ()
                        ) -> Tuple[dict, Any]:
  """`params` with values from a Hugging Face T5 directory or an earlier hypertune run.

  A Hugging Face T5 fills `downstream/`; a hypertune run fills whatever it saved, following
  `assignment_map` ((target_regex, source_template | None), first match wins, t5x style).
  Returns (params, AssignmentReport).
  """
  if os.path.exists(os.path.join(path, "config.json")):
    _, hf_params = hf_convert.load_hf_t5(path, config=model.config)
    source = {"downstream": hf_params}
  elif is_run_dir(path):
    ckpt = checkpoints.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    state, _ = ckpt.restore()
    ckpt.close()
    source = state["params"]
  else:
    raise FileNotFoundError(
        f"INITIAL_CHECKPOINT_PATH={path!r} is neither a Hugging Face T5 directory (config.json "
        "+ model.safetensors) nor a hypertune MODEL_DIR (with checkpoints/)")
  return checkpoints.restore_with_assignment_map(source, params, assignment_map)


def host_train_batches(mixture_or_task_name: str, batch_size: int,
                       task_feature_lengths: Mapping[str, int], data_seed: int,
                       mesh: jax.sharding.Mesh, start_step: int = 0
                       ) -> Iterator[Dict[str, np.ndarray]]:
  """This process's rows of each global training batch, from batch `start_step` on.

  The processes form `S` data shards on `mesh` (`partitioning.data_layout`: processes
  holding the same 'data' positions need the same rows). Each shard reads its own disjoint
  part of the examples (seqio `ShardInfo(shard_id, S)`) in batches of `[batch_size // S,
  ...]`; `PartitionedTrainer.shard_batch` assembles the global `[batch_size, ...]` arrays.
  With one shard this is the unsharded stream. Every shard is seeded and deterministic, so
  skipping the consumed batches resumes in the same order.
  """
  from tasks import common  # pylint: disable=g-import-not-at-top
  layout = partitioning.data_layout(mesh)
  if batch_size % layout.num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {layout.num_shards} data "
                     "shards of the mesh (each reads batch_size // shards rows)")
  shard_info = (seqio.ShardInfo(index=layout.shard_id, num_shards=layout.num_shards)
                if layout.num_shards > 1 else None)
  return common.get_batches(mixture_or_task_name, "train", batch_size // layout.num_shards,
                            task_feature_lengths, seed=data_seed,
                            shard_info=shard_info).skip(start_step).as_numpy_iterator()


@gin.configurable(denylist=["train_steps_override"])
def train(
    model_dir: str = gin.REQUIRED,
    model: HyperModel = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    setup_tasks: Sequence[Callable] = (),
    optimizer: Any = None,
    trainable_patterns: Sequence[str] = (".*",),
    frozen_patterns: Sequence[str] = (),
    max_grad_norm: Optional[float] = 1.0,
    initial_checkpoint_path: Optional[str] = None,
    assignment_map: Sequence[Tuple[str, Optional[str]]] = (),
    init_hypernet_from_downstream: bool = False,
    num_microbatches: int = 1,
    checkpoint_period: int = 1000,
    keep_checkpoints: int = 3,
    log_every_steps: int = 50,
    eval_period: int = 0,
    eval_mixture_or_task_name: Optional[str] = None,
    eval_split: str = "test",
    eval_batch_size: int = 32,
    seed: int = 0,
    data_seed: int = 0,
    stop_after_steps: Optional[int] = None,
    train_steps_override: Optional[int] = None,
    restored_fn: Optional[Callable[..., Any]] = None,
) -> Mapping:
  """Train `model` on a seqio mixture.

  With `restored_fn` nothing is trained: the latest checkpoint of `model_dir` is restored and
  `restored_fn(model=, params=, step=, model_dir=, task_feature_lengths=,
  mixture_or_task_name=)` is returned (the `hypertune.eval` and `hypertune.infer` binaries).

  Returns {"losses": [loss of each step run by this call], "eval": last evaluation results}.
  """
  restore_only = restored_fn is not None
  # Before anything touches JAX devices (a no-op unless this is a multi-process job).
  partitioning.maybe_initialize_distributed()
  for setup in setup_tasks:
    setup()
  from tasks import common  # pylint: disable=g-import-not-at-top
  # In a multi-process job every process runs this loop alike; process 0 writes the files.
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
    config_path = "eval/config_restored.gin" if restore_only else "config.gin"
    with open(os.path.join(model_dir, config_path), "w") as f:
      f.write(gin.config_str())
  train_steps = train_steps_override or train_steps
  mesh = partitioning.make_mesh()
  rules = partitioning.standard_logical_axis_rules()
  batch_shapes = {"encoder_input_tokens": (batch_size, task_feature_lengths["inputs"]),
                  "decoder_input_tokens": (batch_size, task_feature_lengths["targets"])}
  if model.hypernet is not None:
    batch_shapes["hyper_encoder_input_tokens"] = (batch_size, task_feature_lengths["hyper_inputs"])
  tx = optimizers.make_optimizer(optimizer, trainable_patterns, frozen_patterns, max_grad_norm)
  trainer = train_lib.PartitionedTrainer(model, tx, mesh, rules, batch_shapes, num_microbatches,
                                         trainable_patterns, frozen_patterns)

  # Parameters: fresh init, then the initial checkpoint, then this run's own checkpoint.
  params = partitioning.to_host(trainer.init_params(jax.random.key(seed)))
  sources = None
  if initial_checkpoint_path:
    params, report = load_initial_params(initial_checkpoint_path, params, model, assignment_map)
    sources = report.sources
    logging.info("initial checkpoint %s:\n%s", initial_checkpoint_path, report.summary())
  copied = None
  if init_hypernet_from_downstream:
    params["hypernet"] = hypert5.init_from_downstream(params["hypernet"], params["downstream"])
    copied = {p: src for p in optimizers.param_paths(params)
              if (src := hypert5.downstream_source(p))}
  mask = trainer.trainable
  logging.info("parameters:\n%s", optimizers.parameter_table(
      params, trainable_patterns, frozen_patterns, restored_from=sources, copied_from=copied))

  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                  save_interval_steps=checkpoint_period,
                                  max_to_keep=keep_checkpoints)
  state = trainer.create_state(params)

  def checkpoint_tree(s: train_lib.TrainState) -> dict:
    # Frozen parameters are not saved: they are rebuilt from the initial checkpoint.
    return {"step": s.step, "params": trainable_subtree(s.params, mask),
            "opt_state": s.opt_state, "method_state": s.method_state}

  start_step = 0
  if restore_only and ckpt.latest_step() is None:
    raise FileNotFoundError(f"MODEL_DIR={model_dir!r} has no checkpoint to restore")
  if ckpt.latest_step() is not None:
    restored, data_state = ckpt.restore(target=checkpoints.abstract_state(checkpoint_tree(state)))
    state = state.replace(step=restored["step"], opt_state=restored["opt_state"],
                          method_state=restored["method_state"],
                          params=merge_params(state.params, restored["params"]))
    start_step = int(restored["step"])
    logging.info("resumed from %s at step %d (data position %s)", ckpt.directory, start_step,
                 data_state)

  def save(force=False):
    s = int(state.step)
    ckpt.save(s, checkpoint_tree(state),
              data_state={"batches_consumed": s, "data_seed": data_seed}, force=force)

  if restore_only:
    ckpt.close()
    return restored_fn(model=model, params=partitioning.to_host(state.params), step=start_step,
                       model_dir=model_dir, task_feature_lengths=task_feature_lengths,
                       mixture_or_task_name=mixture_or_task_name)

  evaluator = None
  eval_tasks = []
  if eval_period and eval_mixture_or_task_name:
    evaluator = Evaluator(model, task_feature_lengths, eval_batch_size)
    eval_tasks = common.mixture_tasks(eval_mixture_or_task_name)

  sigterm = checkpoints.install_sigterm_handler(lambda: (save(force=True),
                                                         ckpt.wait_until_finished()))
  # The same data order on resume: a seeded, deterministic stream with the consumed batches
  # skipped.
  batches = host_train_batches(mixture_or_task_name, batch_size, task_feature_lengths,
                               data_seed, trainer.mesh, start_step)
  log = progress.ProgressLogger(model_dir, total_steps=train_steps, start_step=start_step,
                                log_every_steps=log_every_steps)
  rng = jax.random.key(seed + 1)
  results: Mapping = {}
  losses = []
  end = train_steps if stop_after_steps is None else min(train_steps, stop_after_steps)
  try:
    for step in range(start_step + 1, end + 1):
      batch = next(batches)
      features = {k: v for k, v in batch.items() if k in train_lib.MODEL_FEATURES or
                  k in ("decoder_target_tokens", "decoder_loss_weights")}
      state, metrics = trainer.step_fn(state, trainer.shard_batch(features), rng)
      losses.append(metrics["loss"])
      n_tokens = int(sum(np.count_nonzero(batch[k]) for k in features
                         if k.endswith("input_tokens")))
      log.update(step, metrics, num_tokens=n_tokens,
                 learning_rate=optimizers.learning_rate_from_state(state.opt_state))
      save(force=step == end)
      if evaluator and (step % eval_period == 0 or step == end):
        results = evaluator.evaluate(partitioning.to_host(state.params), eval_tasks, eval_split)
        log.write_eval(step, {f"{t}/{m}": v for t, r in results.items() for m, v in r.items()})
        if is_writer:
          logging.info("eval step %d: average %s -> %s", step, results.get("average"),
                       write_results(model_dir, step, results,
                                     predictions=evaluator.predictions))
  finally:
    ckpt.wait_until_finished()
    sigterm.uninstall()
    log.close()
    ckpt.close()
  return {"losses": [float(l) for l in losses], "eval": results}


def main():
  train()
