"""bench/memory_table.py --quick runs, and the per-device parameter bytes it reports equal the
eval_shape parameter sizes divided by the mesh axes their logical names map to (recomputed here
from the partitioning rules, without jax's sharding objects)."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
from flax.core import meta

from hypertune import partitioning
from hypertune.hypernets import hypert5
from hypertune.models import base, hypermodel
from hypertune.models.config import t5_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_axes(names, rules):
  """flax's rule: each logical name takes the first rule's mesh axis not yet used in the spec."""
  used, axes = set(), []
  for name in names:
    axis = next((a for n, a in rules if n == name and (a is None or a not in used)), None)
    if axis is not None:
      used.add(axis)
    axes.append(axis)
  return axes


def _expected_param_bytes(mesh_shape, quick_args):
  """{"trainable": bytes, "frozen": bytes} per device on a (data, model) mesh."""
  cfg = t5_config("tiny", vocab_size=quick_args["vocab"])
  hypernet = hypert5.HyperT5(config=cfg, downstream=cfg, peft_type="prefix",
                             prefix_len=quick_args["prefix_len"])
  model = base.EncoderDecoderModel(hypermodel.HyperModel(cfg, hypernet=hypernet))
  shapes = model.batch_shapes(quick_args["batch"], {"hyper_inputs": quick_args["hyper_len"],
                                                     "inputs": quick_args["inputs_len"],
                                                     "targets": quick_args["targets_len"]})
  boxed = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), shapes))["params"]
  sizes = dict(zip((partitioning.DATA_AXIS, partitioning.MODEL_AXIS), mesh_shape))
  rules = partitioning.standard_logical_axis_rules()
  out = {"trainable": 0, "frozen": 0}
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))[0]
  for path, leaf in leaves:
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(value.shape)
    per_device = math.prod(-(-dim // (sizes[a] if a else 1))
                           for dim, a in zip(value.shape, _mesh_axes(names, rules)))
    kind = "frozen" if path[0].key == "downstream" else "trainable"
    out[kind] += per_device * value.dtype.itemsize
  return out


def test_quick_memory_table_parameter_bytes(tmp_path):
  out_json = tmp_path / "table.json"
  run = subprocess.run([sys.executable, "bench/memory_table.py", "--quick", "--no_compile",
                        "--json", str(out_json)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| tiny | 1x2 |" in run.stdout
  report = json.loads(out_json.read_text())
  rows = {r["mesh"]: r for r in report["rows"]}
  assert sorted(rows) == ["1x2", "2x1"]
  for name, row in rows.items():
    mesh_shape = tuple(int(d) for d in name.split("x"))
    expected = _expected_param_bytes(mesh_shape, report["args"])
    assert (row["trainable"], row["frozen"]) == (expected["trainable"], expected["frozen"]), name
    # AdamW: two float32 moments of the trainable parameters only, plus scalars (count, lr).
    assert 0 <= row["adamw"] - 2 * row["trainable"] < 64, row
    assert row["adamw_8bit"] < row["adamw"] / 2, row
  # Model parallelism splits the vocab / mlp / heads axes: fewer bytes per device on 1x2.
  assert rows["1x2"]["trainable"] < rows["2x1"]["trainable"]
  assert rows["2x1"]["trainable"] == 4 * rows["2x1"]["trainable_count"]  # replicated on 2x1
