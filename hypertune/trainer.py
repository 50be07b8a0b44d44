r"""The training loop behind `python -m hypertune.train --gin_file=... --gin.MODEL_DIR=...`.

Hyperpretraining, multi-task fine-tuning of a hypernetwork, and the baselines are the same loop;
they differ in gin (model, mixture, trainable patterns, initial checkpoint).

The run directory MODEL_DIR holds `config.gin` (the operative config), `frozen_params/` (the
frozen parameters, written once when the run starts), `checkpoints/` (trainable parameters,
optimizer state, data position), `train/` and `eval/` TensorBoard summaries, and
`eval/results_step*.json` (with `_predictions.jsonl` beside each). Where parameters come from
(initial checkpoints, copies, resume): `hypertune.param_sources`.
"""
import logging
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
import seqio

from hypertune import checkpoints, optimizers, param_sources, partitioning, progress, train_lib
from hypertune.evaluation import MODEL_BATCH_FEATURES, Evaluator, write_results
from hypertune.models.base import BaseModel


def checkpoint_tree(state: train_lib.TrainState, mask) -> dict:
  """What a checkpoint holds: the trainable parameters and everything else that changes."""
  return {"step": state.step, "params": param_sources.subtree(state.params, mask),
          "opt_state": state.opt_state, "method_state": state.method_state}


def resume_state(trainer: train_lib.PartitionedTrainer, model_dir: str, fresh
                 ) -> Tuple[train_lib.TrainState, int]:
  """The run's own latest state: its frozen parameters and its latest checkpoint."""
  mask = trainer.trainable
  frozen = param_sources.subtree(fresh, mask, keep=False)
  target = {"params": checkpoints.abstract_state(frozen),
            "num_frozen": jax.ShapeDtypeStruct((), np.int32)}
  restored_frozen = param_sources.restore_dir(
      os.path.join(model_dir, param_sources.FROZEN_DIR), target)["params"]
  state = trainer.create_state(param_sources.merge_params(fresh, restored_frozen))
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, param_sources.CHECKPOINTS_DIR),
                                  async_save=False)
  try:
    restored, data_state = ckpt.restore(
        target=checkpoints.abstract_state(checkpoint_tree(state, mask)))
  finally:
    ckpt.close()
  state = state.replace(step=restored["step"], opt_state=restored["opt_state"],
                        method_state=restored["method_state"],
                        params=param_sources.merge_params(state.params, restored["params"]))
  logging.info("resumed from %s at step %d (data position %s)", model_dir,
               int(restored["step"]), data_state)
  return state, int(restored["step"])


def initial_state(trainer: train_lib.PartitionedTrainer, model: BaseModel, model_dir: str,
                  seed: int, sources: Sequence, init_hypernet_from_downstream: bool,
                  trainable_patterns: Sequence[str], frozen_patterns: Sequence[str]
                  ) -> Tuple[train_lib.TrainState, int]:
  """(train state, start step): resumed if `model_dir` has a checkpoint, else fresh
  initialisation, then the initial checkpoints `sources`, then the hypernetwork's copies of the
  downstream model; a new run writes its frozen parameters once."""
  fresh = trainer.init_params(jax.random.key(seed))
  if has_checkpoint(model_dir):
    return resume_state(trainer, model_dir, fresh)
  params, restored = param_sources.restore_initial_checkpoints(
      partitioning.to_host(fresh), model, sources)
  copied = {}
  if init_hypernet_from_downstream:
    params, copied = param_sources.copy_hypernet_from_downstream(params, restored)
  report_parameters(model_dir, params, trainer.trainable, optimizers.parameter_table(
      params, trainable_patterns, frozen_patterns, restored_from=restored if sources else None,
      copied_from=copied), [path for path, _ in sources], restored, copied)
  # frozen_params/ holds float32 even where the state stores them quantised (create_state).
  params = jax.device_put(params, trainer.param_shardings)
  param_sources.save_frozen(model_dir, param_sources.subtree(params, trainer.trainable,
                                                             keep=False))
  return trainer.create_state(params), 0


def report_parameters(model_dir: str, params, mask, table: str, sources: Sequence[str],
                      restored: Mapping[str, str], copied: Mapping[str, str]) -> None:
  """The parameter table (hundreds of rows for T5-Large) goes to MODEL_DIR/model-info.txt, as
  t5x's; the console gets what one checks first: the sizes and where the parameters came from."""
  info_path = os.path.join(model_dir, "model-info.txt")
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(info_path, "w") as f:
      f.write(table + "\n")

  def size(tree):
    return optimizers.format_count(sum(int(np.size(x)) for x in jax.tree.leaves(tree)))

  origins = [f"{sum(v.startswith(f'{path}:') for v in restored.values())} restored from {path}"
             for path in sources]
  origins += [f"{len(copied)} copied from downstream"] if copied else []
  origins.append(f"{len(jax.tree.leaves(params)) - len(restored) - len(copied)} fresh")
  logging.info("parameters: %s trainable, %s frozen; %s; table in %s",
               size(param_sources.subtree(params, mask)),
               size(param_sources.subtree(params, mask, keep=False)), ", ".join(origins),
               info_path)


def has_checkpoint(model_dir: str) -> bool:
  ckpt_dir = os.path.join(model_dir, param_sources.CHECKPOINTS_DIR)
  if not os.path.isdir(ckpt_dir):
    return False
  ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


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
  resuming at `start_step` continues the same stream: the tasks of tasks.common
  (`register_three_input_task`, `register_merged_task`) seek there, at the cost of generating
  one epoch whatever the step; seqio Mixtures and other sources read and drop the consumed
  batches (`common.get_batches`' start_batch, which warns).
  """
  from tasks import common  # pylint: disable=g-import-not-at-top
  layout = partitioning.data_layout(mesh)
  if batch_size % layout.num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {layout.num_shards} data "
                     "shards of the mesh (each reads batch_size // shards rows)")
  shard_info = (seqio.ShardInfo(index=layout.shard_id, num_shards=layout.num_shards)
                if layout.num_shards > 1 else None)
  return common.get_batches(mixture_or_task_name, "train", batch_size // layout.num_shards,
                            task_feature_lengths, seed=data_seed, shard_info=shard_info,
                            start_batch=start_step).as_numpy_iterator()


@gin.configurable(denylist=["train_steps_override"])
def train(
    model_dir: str = gin.REQUIRED,
    model: BaseModel = gin.REQUIRED,
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
    initial_checkpoints: Sequence[Any] = (),
    init_hypernet_from_downstream: bool = False,
    num_microbatches: int = 1,
    frozen_weights_dtype: Optional[str] = None,
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

  Initial parameters (`hypertune.param_sources`): `initial_checkpoint_path` with
  `assignment_map` (t5x's INITIAL_CHECKPOINT_PATH), then each of `initial_checkpoints`, a path
  or a `(path, assignment_map)` pair; a Hugging Face directory or an earlier run's MODEL_DIR. A
  parameter is restored by the first checkpoint that provides it, e.g.
  `[("/hf/t5-base", [("downstream/.*", None)...]), "/runs/hyperpretrain"]`; the
  `init_hypernet_from_downstream` copies never overwrite a restored parameter.

  `frozen_weights_dtype` ("int8", "int4", "nf4"; None: float32): the frozen matmul weights are
  kept quantised on the devices, QLoRA-style (`hypertune.models.quantization`); the run's
  `frozen_params/` stays float32.

  With `restored_fn` nothing is trained: the latest checkpoint of `model_dir` is restored and
  `restored_fn(model=, params=, method_state=, step=, model_dir=, task_feature_lengths=,
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
  train_steps = train_steps_override or train_steps
  # Fail fast, before any model is built: names, and a checkpoint to restore.
  for name in (mixture_or_task_name, eval_mixture_or_task_name if eval_period else None):
    if name:
      common.get_task_or_mixture(name)
  if restore_only and not has_checkpoint(model_dir):
    raise FileNotFoundError(f"MODEL_DIR={model_dir!r} has no checkpoint to restore")
  # After the checks: a run that fails on a name leaves no MODEL_DIR behind.
  if is_writer:
    os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
    config_path = "eval/config_restored.gin" if restore_only else "config.gin"
    with open(os.path.join(model_dir, config_path), "w") as f:
      f.write(gin.config_str())
  mesh = partitioning.make_mesh()
  rules = partitioning.standard_logical_axis_rules()
  batch_shapes = model.batch_shapes(batch_size, task_feature_lengths)
  tx = optimizers.make_optimizer(optimizer, trainable_patterns, frozen_patterns, max_grad_norm)
  trainer = train_lib.PartitionedTrainer(model, tx, mesh, rules, batch_shapes, num_microbatches,
                                         trainable_patterns, frozen_patterns,
                                         frozen_weights_dtype)

  state, start_step = initial_state(trainer, model, model_dir, seed,
      param_sources.initial_checkpoint_list(initial_checkpoint_path, assignment_map,
                                            initial_checkpoints),
      init_hypernet_from_downstream, trainable_patterns, frozen_patterns)
  mask = trainer.trainable
  if restore_only:
    return restored_fn(model=model, params=partitioning.to_host(state.params),
                       method_state=state.method_state, step=start_step, model_dir=model_dir,
                       task_feature_lengths=task_feature_lengths,
                       mixture_or_task_name=mixture_or_task_name)

  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, param_sources.CHECKPOINTS_DIR),
                                  save_interval_steps=checkpoint_period,
                                  max_to_keep=keep_checkpoints)

  def save(force=False):
    s = int(state.step)
    ckpt.save(s, checkpoint_tree(state, mask),
              data_state={"batches_consumed": s, "data_seed": data_seed}, force=force)

  evaluator = None
  eval_tasks = []
  if eval_period and eval_mixture_or_task_name:
    evaluator = Evaluator(model, task_feature_lengths, eval_batch_size)
    eval_tasks = common.mixture_tasks(eval_mixture_or_task_name)

  sigterm = checkpoints.install_sigterm_handler(lambda: (save(force=True),
                                                         ckpt.wait_until_finished()))
  # The same data order on resume: a seeded, deterministic stream read from batch start_step.
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
      features = {k: v for k, v in batch.items() if k in MODEL_BATCH_FEATURES}
      state, metrics = trainer.step_fn(state, trainer.shard_batch(features), rng)
      losses.append(metrics["loss"])
      n_tokens = int(sum(np.count_nonzero(batch[k]) for k in features
                         if k.endswith("input_tokens")))
      log.update(step, metrics, num_tokens=n_tokens,
                 learning_rate=optimizers.learning_rate_from_state(state.opt_state))
      save(force=step == end)
      if evaluator and (step % eval_period == 0 or step == end):
        results = evaluator.evaluate(partitioning.to_host(state.params), eval_tasks, eval_split,
                                     state.method_state)
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
