"""Where a run's parameters come from: fresh initialisation, then initial checkpoints (Hugging
Face directories and earlier hypertune runs, first match wins), then copies within the model
(HyperT5's hyper encoder from the downstream encoder), then the run's own checkpoint on resume.

A run directory is self-sufficient: besides `checkpoints/` (trainable parameters, optimizer
state, data position, every `checkpoint_period` steps) it holds `frozen_params/`, the frozen
parameters written once when the run starts. Loading a run (as an initial checkpoint, in
`hypertune.eval`, in `hypertune.infer`, on resume) reads both and never goes back to the
checkpoints the run itself started from, so they may be moved or deleted.
"""
import logging
import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from hypertune import checkpoints
from hypertune.hypernets import hypert5

AssignmentMap = Sequence[Tuple[str, Optional[str]]]
FROZEN_DIR = "frozen_params"
CHECKPOINTS_DIR = "checkpoints"


def subtree(params, mask, keep: bool = True) -> dict:
  """The leaves of `params` whose `mask` leaf is `keep` (trainable: True, frozen: False)."""
  m = flatten_dict(mask, sep="/")
  return unflatten_dict({k: v for k, v in flatten_dict(params, sep="/").items()
                         if bool(m[k]) == keep}, sep="/")


def merge_params(params, *subtrees) -> dict:
  """`params` with the leaves of each subtree (same paths) replaced, later ones winning."""
  flat = flatten_dict(params, sep="/")
  for tree in subtrees:
    flat.update(flatten_dict(tree, sep="/"))
  return unflatten_dict(flat, sep="/")


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def is_hf_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def save_frozen(model_dir: str, frozen: dict) -> None:
  """Write the frozen parameters once (atomically, as any checkpoint) unless they are there."""
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, FROZEN_DIR), async_save=False,
                                  max_to_keep=None)
  try:
    if ckpt.latest_step() is None:
      # A scalar beside the tree: a run that trains everything still writes a valid item.
      ckpt.save(0, {"params": frozen, "num_frozen": np.int32(len(flatten_dict(frozen)))},
                force=True)
  finally:
    ckpt.close()


def restore_dir(directory: str, target=None) -> dict:
  """The latest state saved in a checkpoint directory (onto `target`'s shardings if given)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: not a complete hypertune run directory")
  ckpt = checkpoints.Checkpointer(directory, async_save=False)
  try:
    return ckpt.restore(target=target)[0]
  finally:
    ckpt.close()


def load_run_params(model_dir: str) -> dict:
  """Every parameter a run trained with: its frozen parameters and its latest trainable ones."""
  frozen_dir = os.path.join(model_dir, FROZEN_DIR)
  if not os.path.isdir(frozen_dir):
    raise FileNotFoundError(
        f"{model_dir}: no {FROZEN_DIR}/ (the frozen parameters a run writes when it starts); "
        "it is not a complete hypertune run directory")
  frozen = restore_dir(frozen_dir).get("params", {})
  trainable = restore_dir(os.path.join(model_dir, CHECKPOINTS_DIR))["params"]
  return merge_params(frozen, trainable)


def read_source(path: str, model) -> dict:
  """A partial parameter tree from a Hugging Face directory or a hypertune run directory."""
  if is_hf_dir(path):
    return model.pretrained_params(path)
  if is_run_dir(path):
    return load_run_params(path)
  raise FileNotFoundError(
      f"initial checkpoint {path!r} is neither a Hugging Face directory (config.json + "
      "model.safetensors) nor a hypertune MODEL_DIR (with checkpoints/)")


def initial_checkpoint_list(initial_checkpoint_path: Optional[str], assignment_map: AssignmentMap,
                            initial_checkpoints: Sequence) -> list:
  """[(path, assignment_map)]: t5x's single INITIAL_CHECKPOINT_PATH first, then the others."""
  out = [(initial_checkpoint_path, tuple(assignment_map))] if initial_checkpoint_path else []
  for entry in initial_checkpoints:
    path, amap = (entry, ()) if isinstance(entry, str) else entry
    out.append((path, tuple(amap)))
  return out


def restore_initial_checkpoints(params: dict, model, sources: Sequence
                                ) -> Tuple[dict, Dict[str, str]]:
  """`params` filled from each `(path, assignment_map)` in turn; a parameter that an earlier
  checkpoint restored is never overwritten by a later one (first match wins).

  Returns (params, {parameter path: "checkpoint path:source path"} for every restored one).
  """
  restored: Dict[str, str] = {}
  for path, amap in sources:
    keep = [(re.escape(p), None) for p in restored]  # taken by an earlier checkpoint
    params, report = checkpoints.restore_with_assignment_map(
        read_source(path, model), params, keep + list(amap))
    logging.debug("initial checkpoint %s: %d parameters restored", path,
                 len(report.restored) - len(restored))
    restored.update({t: f"{path}:{s}" for t, s in report.sources.items()
                     if s is not None and t not in restored})
  return params, restored


def copy_hypernet_from_downstream(params: dict, restored: Mapping[str, str]
                                  ) -> Tuple[dict, Dict[str, str]]:
  """HyperT5's embeddings, hyper encoder and hyper decoder copied from the downstream T5, except
  the parameters an initial checkpoint restored (a hyperpretrained hypernetwork stays).

  Returns (params, {parameter path: the downstream path it was copied from}).
  """
  full = hypert5.init_from_downstream(params["hypernet"], params["downstream"])
  copies, copied = {}, {}
  for key, value in flatten_dict(full, sep="/").items():
    path = f"hypernet/{key}"
    source = hypert5.downstream_source(path)
    if source and path not in restored:
      copies[path], copied[path] = np.asarray(value), source
  return merge_params(params, copies), copied
