"""Per-device training memory of HyperT5-Prefix on (data, model) meshes, from the real shapes.

For each T5 size and mesh shape this builds the model as `gin/models/hypert5_prefix.gin` does
(`HyperModel(t5_config(size), hypernet=HyperT5(peft_type="prefix", prefix_len=16))`, the
downstream T5 frozen with `frozen_patterns=["downstream/.*"]`) and the trainer's own
`train_lib.PartitionedTrainer` on a mesh of forced CPU host devices, then reports per device:

- trainable (hypernetwork) and frozen (downstream) parameters: the `jax.eval_shape` shapes of
  `model.init_variables`, each leaf's per-device shard shape under the trainer's shardings
  (`partitioning.tree_shardings` with `standard_logical_axis_rules`), float32;
- optimizer state: `jax.eval_shape(tx.init, params)` for `make_optimizer(adamw)` (the gin run
  files' optimizer) and `make_optimizer(adamw_8bit)`, each leaf sharded by
  `partitioning.opt_state_shardings` as the trainer shards it (frozen parameters get no state);
- gradients: one float32 copy of the trainable parameters, sharded like them;
- XLA temp and peak: `jax.jit(train_step).lower(abstract state, abstract batch).compile()
  .memory_analysis()` of the full-depth train step (AdamW, state donated), compiled for the
  CPU backend. `temp` is XLA's buffer assignment for everything that is neither an input nor
  an output: saved activations for the backward pass, the gradients, the update's
  intermediates. `peak` = arguments + outputs - aliased (donated) + temp. Layers are scanned
  (`nn.scan`, `T5Config.scan_layers`), so the compiled program is the real depth: nothing is
  extrapolated from a shallower model.

Nothing is allocated: parameters, state and batch are `ShapeDtypeStruct`s with shardings. The
memory analysis is the CPU compiler's (its fusion and layouts, not a TPU's or GPU's); use it as
an estimate of the activation memory, the parameter and state columns are exact.

Run (from the repository root):

    .venv/bin/python bench/memory_table.py               # T5-Large and T5-XL, 8 and 32 devices
    .venv/bin/python bench/memory_table.py --sizes large --meshes 8x1,1x8 --remat
    .venv/bin/python bench/memory_table.py --remat --dtype bfloat16 --num_microbatches 4
    .venv/bin/python bench/memory_table.py --quick       # tiny size, 2 meshes (~1 min: 2 compiles)
    .venv/bin/python bench/memory_table.py --quick --no_compile   # parameters and state, seconds

`--json PATH` also writes every number in bytes.
"""
import argparse
import functools
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN_PATTERNS = ("downstream/.*",)
TARGET_DTYPES = {"decoder_target_tokens": "int32", "decoder_loss_weights": "int32"}


def parse_meshes(text):
  """"8x1,4x2" -> [(8, 1), (4, 2)] (data, model)."""
  meshes = []
  for part in text.split(","):
    dims = part.strip().lower().split("x")
    if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise SystemExit(f"--meshes: {part!r} is not DATAxMODEL with positive integers, e.g. 4x2")
    meshes.append((int(dims[0]), int(dims[1])))
  return meshes


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="large,xl", help="t5_config sizes, comma-separated")
  p.add_argument("--meshes", default="8x1,4x2,2x4,1x8,32x1,8x4",
                 help="(data x model) mesh shapes, comma-separated")
  p.add_argument("--batch", type=int, default=256, help="global batch size")
  p.add_argument("--hyper_len", type=int, default=1024, help="TASK_FEATURE_LENGTHS hyper_inputs")
  p.add_argument("--inputs_len", type=int, default=384, help="TASK_FEATURE_LENGTHS inputs")
  p.add_argument("--targets_len", type=int, default=128, help="TASK_FEATURE_LENGTHS targets")
  p.add_argument("--prefix_len", type=int, default=16, help="HyperT5 prefix_len (PREFIX_LEN)")
  p.add_argument("--vocab", type=int, default=None, help="vocab_size (default: the size's own)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="T5Config.dtype (compute dtype; parameters stay float32)")
  p.add_argument("--remat", action="store_true", help="T5Config.remat: rematerialise layers")
  p.add_argument("--num_microbatches", type=int, default=1,
                 help="train.num_microbatches (gradient accumulation inside the step)")
  p.add_argument("--no_compile", action="store_true",
                 help="skip the XLA memory analysis (parameters and optimizer state only)")
  p.add_argument("--json", default=None, help="also write the rows (bytes) to this file")
  p.add_argument("--quick", action="store_true",
                 help="tiny size, meshes 2x1,1x2, batch 4, lengths 32/16/8, vocab 384")
  args = p.parse_args(argv)
  if args.quick:
    args.sizes, args.meshes, args.batch, args.vocab = "tiny", "2x1,1x2", 4, 384
    args.hyper_len, args.inputs_len, args.targets_len, args.prefix_len = 32, 16, 8, 4
  args.mesh_shapes = parse_meshes(args.meshes)
  args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
  for name in ("batch", "hyper_len", "inputs_len", "targets_len", "prefix_len",
               "num_microbatches"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
  for data, model in args.mesh_shapes:
    if args.batch % (data * args.num_microbatches):
      raise SystemExit(f"--batch {args.batch} is not divisible by the data axis {data} of mesh "
                       f"{data}x{model} times --num_microbatches {args.num_microbatches}")
  return args


def force_host_devices(n):
  """Ask XLA for n CPU devices; must run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("bench/memory_table.py must set XLA_FLAGS before jax is imported")
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def build_model(size, args):
  """HyperT5-Prefix over a frozen T5 of `size`, as gin/models/hypert5_prefix.gin builds it."""
  from hypertune.hypernets import hypert5
  from hypertune.models import base, hypermodel
  from hypertune.models.config import t5_config
  cfg = t5_config(size, vocab_size=args.vocab, dtype=args.dtype, remat=args.remat)
  hypernet = hypert5.HyperT5(config=cfg, downstream=cfg, peft_type="prefix",
                             prefix_len=args.prefix_len)
  return cfg, base.EncoderDecoderModel(hypermodel.HyperModel(cfg, hypernet=hypernet))


def shard_bytes(tree, shardings):
  """Bytes per device of a tree of arrays / ShapeDtypeStructs under same-structure shardings."""
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} leaves but {len(shards)} shardings")
  return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, shards))


def split_by_mask(tree, mask, keep):
  """The leaves of `tree` whose mask entry is `keep` (others dropped)."""
  import jax
  return [x for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if t == keep]


def abstract_with(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def xla_memory(model, tx, trainer, batch_shapes):
  """XLA's memory analysis of the trainer's jitted train step on abstract inputs."""
  import jax
  import jax.numpy as jnp
  from hypertune import partitioning, train_lib
  shardings = trainer.state_shardings
  opt_abstract = jax.eval_shape(tx.init, trainer.abstract_params)
  state = train_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
      params=abstract_with(trainer.abstract_params, shardings.params),
      opt_state=abstract_with(opt_abstract, shardings.opt_state),
      method_state=abstract_with(trainer._abstract_method_state, shardings.method_state))
  features = dict(batch_shapes)
  targets = batch_shapes["decoder_input_tokens"]
  batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=trainer.batch_sharding)
           for k, s in features.items()}
  batch.update({k: jax.ShapeDtypeStruct(targets, jnp.dtype(d), sharding=trainer.batch_sharding)
                for k, d in TARGET_DTYPES.items()})
  # As PartitionedTrainer.step_fn jits it.
  fn = functools.partial(train_lib.train_step, model, tx,
                         num_microbatches=trainer.num_microbatches,
                         trainable=trainer.trainable)
  jitted = jax.jit(fn, in_shardings=(shardings, trainer.batch_sharding, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))
  t0 = time.perf_counter()
  with partitioning.axis_rules_and_mesh(trainer.mesh, trainer.rules):
    compiled = jitted.lower(state, batch, jax.random.key(0)).compile()
  ma = compiled.memory_analysis()
  out = {k: int(getattr(ma, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  return out


def measure(size, mesh_shape, args):
  """One row: bytes per device of every component for `size` on a `mesh_shape` mesh."""
  import jax
  from hypertune import optimizers, partitioning, train_lib
  data, model_axis = mesh_shape
  cfg, model = build_model(size, args)
  lengths = {"hyper_inputs": args.hyper_len, "inputs": args.inputs_len,
             "targets": args.targets_len}
  batch_shapes = model.batch_shapes(args.batch, lengths)
  mesh = partitioning.make_mesh(num_partitions=model_axis,
                                devices=jax.devices()[:data * model_axis])
  rules = partitioning.standard_logical_axis_rules()
  tx = optimizers.make_optimizer(optimizers.adamw(1e-4), frozen_patterns=FROZEN_PATTERNS)
  trainer = train_lib.PartitionedTrainer(model, tx, mesh, rules, batch_shapes,
                                         num_microbatches=args.num_microbatches,
                                         frozen_patterns=FROZEN_PATTERNS)
  params, mask, pshard = trainer.abstract_params, trainer.trainable, trainer.param_shardings
  shard_leaves = jax.tree.leaves(pshard, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  trainable = shard_bytes(split_by_mask(params, mask, True),
                          split_by_mask(shard_leaves, mask, True))
  frozen = shard_bytes(split_by_mask(params, mask, False),
                       split_by_mask(shard_leaves, mask, False))
  adam = shard_bytes(jax.eval_shape(tx.init, params), trainer.state_shardings.opt_state)
  tx8 = optimizers.make_optimizer(optimizers.adamw_8bit(1e-4), frozen_patterns=FROZEN_PATTERNS)
  opt8 = jax.eval_shape(tx8.init, params)
  adam8 = shard_bytes(opt8, partitioning.opt_state_shardings(opt8, params, pshard))
  count = lambda keep: sum(x.size for x in split_by_mask(params, mask, keep))
  row = dict(size=size, mesh=f"{data}x{model_axis}", devices=data * model_axis,
             trainable_count=count(True), frozen_count=count(False),
             trainable=trainable, frozen=frozen, adamw=adam, adamw_8bit=adam8,
             gradients=trainable)  # float32 gradients of the trainable parameters, same shards
  if not args.no_compile:
    row["xla"] = xla_memory(model, tx, trainer, batch_shapes)
  return row


def gib(n):
  return f"{n / 2**30:.2f}" if n >= 2**24 else f"{n / 2**20:.3f} MiB"


def markdown(rows, args):
  head = ["size", "mesh (data x model)", "trainable params", "frozen params", "AdamW state",
          "AdamW-8bit state", "gradients"]
  if not args.no_compile:
    head += ["XLA temp", "XLA peak", "compile s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["size"], r["mesh"], gib(r["trainable"]), gib(r["frozen"]), gib(r["adamw"]),
             gib(r["adamw_8bit"]), gib(r["gradients"])]
    if "xla" in r:
      cells += [gib(r["xla"]["temp"]), gib(r["xla"]["peak"]), str(r["xla"]["compile_s"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  force_host_devices(max(d * m for d, m in args.mesh_shapes))
  sys.path.insert(0, REPO)
  import jax
  rows = []
  for size in args.size_list:
    for mesh_shape in args.mesh_shapes:
      rows.append(measure(size, mesh_shape, args))
      print(markdown(rows[-1:], args).splitlines()[-1], file=sys.stderr, flush=True)
  print(f"HyperT5-Prefix (prefix_len {args.prefix_len}), downstream frozen; batch {args.batch}, "
        f"hyper_inputs {args.hyper_len}, inputs {args.inputs_len}, targets {args.targets_len}; "
        f"dtype {args.dtype}, remat {args.remat}, microbatches {args.num_microbatches}; "
        f"jax {jax.__version__}, XLA CPU backend. GiB per device unless marked.")
  for size in args.size_list:
    r = next(r for r in rows if r["size"] == size)
    print(f"{size}: {r['trainable_count']:,} trainable (hypernetwork), {r['frozen_count']:,} "
          f"frozen (downstream) parameters")
  print()
  print(markdown(rows, args))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": {k: v for k, v in vars(args).items() if k != "mesh_shapes"},
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
