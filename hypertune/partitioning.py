"""Device meshes, logical axis rules and sharding helpers (t5x-style, no t5x dependency).

Models annotate parameters with *logical* axis names (``nn.with_logical_partitioning``)
and activations with ``nn.with_logical_constraint``.  This module maps those names to
the two physical mesh axes ``('data', 'model')`` with t5x's vocabulary and defaults, so
the same model runs on one CPU, 8 forced host devices or a TPU pod.

Typical use in a train loop::

    mesh = partitioning.make_mesh()                       # gin: make_mesh.num_partitions
    rules = partitioning.standard_logical_axis_rules()
    abstract = jax.eval_shape(init_fn, rng)               # boxed (nn.Partitioned) tree
    shardings = partitioning.tree_shardings(abstract, mesh, rules)
    with partitioning.axis_rules_and_mesh(mesh, rules):
        step = jax.jit(train_step, in_shardings=..., out_shardings=...)
        state, metrics = step(state, partitioning.shard_batch(batch, mesh))

Why ``axis_rules_and_mesh`` and not ``with mesh:``: on jax >= 0.7 / flax >= 0.11,
``nn.with_logical_constraint`` looks for the mesh through ``jax.sharding.get_abstract_mesh()``,
which only ``jax.set_mesh`` populates.  The legacy ``with mesh:`` context leaves it empty and
every activation constraint inside the model is silently dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "make_mesh",
    "standard_logical_axis_rules",
    "axis_rules_and_mesh",
    "logical_to_sharding",
    "tree_shardings",
    "opt_state_shardings",
    "batch_sharding",
    "DataLayout",
    "data_layout",
    "shard_batch",
    "maybe_initialize_distributed",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"

LogicalRules = Sequence[Tuple[str, Optional[str]]]


# --------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------


@gin.configurable
def make_mesh(
    num_partitions: Optional[int] = 1,
    model_parallel_submesh: Optional[Sequence[int]] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Mesh:
    """Builds a 2-D ``Mesh`` with axes ``('data', 'model')``.

    Args:
      num_partitions: size of the 'model' axis (t5x's ``num_partitions``); the 'data'
        axis gets ``num_devices // num_partitions``.  Ignored when
        ``model_parallel_submesh`` is given.
      model_parallel_submesh: t5x-style per-replica device block, e.g. ``(1, 1, 2, 1)``
        on TPU (x, y, z, core); its product is the 'model' axis size.  Any length works.
      devices: devices to use (default: all global devices, ``jax.devices()``).

    Returns:
      ``Mesh`` of shape ``(num_devices // m, m)`` with Auto axis types, devices laid out
      by ``mesh_utils.create_device_mesh`` so that 'model' neighbours are physically close
      on TPU.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model_parallel_submesh is not None:
        submesh = tuple(int(s) for s in model_parallel_submesh)
        if not submesh or any(s < 1 for s in submesh):
            raise ValueError(f"model_parallel_submesh must be positive ints, got {model_parallel_submesh}")
        model = math.prod(submesh)
        if num_partitions not in (None, 1, model):
            raise ValueError(
                f"num_partitions={num_partitions} conflicts with model_parallel_submesh={submesh} "
                f"(product {model}); set only one of them"
            )
    else:
        model = 1 if num_partitions is None else int(num_partitions)
    if model < 1 or n % model:
        raise ValueError(
            f"the 'model' axis size {model} must be >= 1 and divide the number of devices ({n}); "
            "check make_mesh.num_partitions / model_parallel_submesh"
        )
    shape = (n // model, model)
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception as e:  # Non-TPU topologies or unusual device subsets: plain row-major.
        logging.info("create_device_mesh(%s) failed (%s); using row-major device order", shape, e)
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    auto = jax.sharding.AxisType.Auto
    # Auto axes: shardings are propagated by XLA and constraints are hints, which is what
    # logical-axis (t5x-style) models expect; Explicit axes would change jnp semantics.
    return Mesh(device_array, (DATA_AXIS, MODEL_AXIS), axis_types=(auto, auto))


# --------------------------------------------------------------------------------------
# Logical axis rules
# --------------------------------------------------------------------------------------


@gin.configurable
def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Optional[LogicalRules] = None,
) -> Tuple[Tuple[str, Optional[str]], ...]:
    """Logical-axis -> mesh-axis rules in t5x's vocabulary.

    With the defaults (1, 1): batch -> 'data'; vocab, mlp, heads, joined_kv -> 'model';
    everything else (embed, kv, length, layers, relpos_buckets, hyper_tokens...) replicated.
    ``parameter_partitioning_dims=2`` additionally shards 'embed' over 'data' (2-D
    parameter sharding, t5x's "fully sharded"); ``activation_partitioning_dims=2`` shards
    activations' 'embed' over 'model'.

    Args:
      activation_partitioning_dims: 1 or 2.
      parameter_partitioning_dims: 1 or 2.
      additional_rules: extra ``(logical_name, mesh_axis_or_None)`` pairs, e.g. from gin.
        They are placed *first*, so they override the standard rule for the same name
        (flax uses the first rule whose mesh axis is still free).

    Returns:
      Tuple of ``(logical_name, mesh_axis or None)`` pairs, highest precedence first.
    """
    if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
        raise ValueError(
            "activation_partitioning_dims and parameter_partitioning_dims must be 1 or 2, got "
            f"{activation_partitioning_dims} and {parameter_partitioning_dims}"
        )
    rules = [
        ("batch", DATA_AXIS),
        ("vocab", MODEL_AXIS),
        ("mlp", MODEL_AXIS),
        ("heads", MODEL_AXIS),
        ("kv", None),
        ("joined_kv", MODEL_AXIS),
    ]
    if activation_partitioning_dims == 2:
        rules.append(("embed", MODEL_AXIS))
    if parameter_partitioning_dims == 2:
        rules.append(("embed", DATA_AXIS))
    replicated = [
        "embed",
        "length",
        "layers",
        "stack",
        "relpos_buckets",
        "abspos_buckets",
        "mlp_activations",
        # hypertune-specific names (hypernetworks / PEFT modules): small, replicate.
        "hyper_tokens",
        "prefix_length",
        "lora_rank",
        "adapter_dim",
        "tasks",
    ]
    rules.extend((name, None) for name in replicated)
    extra = []
    for rule in additional_rules or ():
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"each logical axis rule must be (name, mesh_axis_or_None), got {rule!r}")
        extra.append((rule[0], rule[1]))
    return tuple(extra + rules)


@contextlib.contextmanager
def axis_rules_and_mesh(mesh: Mesh, rules: LogicalRules) -> Iterator[Mesh]:
    """Context in which ``nn.with_logical_constraint`` inside models actually applies.

    Sets the mesh with ``jax.set_mesh`` (not the legacy ``with mesh:``, under which flax
    drops logical constraints) and the logical axis rules with ``nn.logical_axis_rules``.
    Trace (first call of) jitted train/eval steps inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield mesh


# --------------------------------------------------------------------------------------
# Shardings of trees
# --------------------------------------------------------------------------------------


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_sharding(logical_specs_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Maps a tree of *logical* specs to ``NamedSharding``s on ``mesh``.

    Args:
      logical_specs_tree: pytree whose leaves are ``PartitionSpec``s of logical names
        (e.g. ``PartitionSpec('embed', 'mlp')``), tuples of names, or None (replicated).
      mesh: the device mesh.
      rules: logical axis rules, e.g. :func:`standard_logical_axis_rules`.

    Returns:
      Same-structure tree of ``NamedSharding``.  Logical names without a rule are
      replicated (flax's AXIS_IS_UNSHARDED fallback).
    """

    def to_spec(x):
        if x is None:
            return PartitionSpec()
        if isinstance(x, (tuple, list)) and not _is_spec(x):
            return PartitionSpec(*x)
        return x

    specs = jax.tree_util.tree_map(
        to_spec,
        logical_specs_tree,
        is_leaf=lambda x: x is None or _is_spec(x) or isinstance(x, (tuple, list)) and all(
            e is None or isinstance(e, str) for e in x
        ),
    )
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Shardings of a (possibly abstract) tree of flax-boxed values.

    Args:
      boxed_tree: e.g. ``jax.eval_shape(model.init, ...)`` whose parameters are
        ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes (from
        ``nn.with_logical_partitioning``).  Unboxed leaves are replicated.
      mesh, rules: as in :func:`logical_to_sharding`.

    Returns:
      Tree with the same structure as ``nn.meta.unbox(boxed_tree)``, leaves ``NamedSharding``.

    Raises:
      ValueError: if a box's names do not match its value's rank (names the path).
    """

    def check(path, x):
        if isinstance(x, meta.AxisMetadata) and isinstance(x, nn.Partitioned):
            ndim = len(np.shape(x.value))
            if len(x.names) != ndim:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)}: logical axis names {x.names} have "
                    f"{len(x.names)} entries but the value has rank {ndim} (shape {np.shape(x.value)})"
                )
        return x

    jax.tree_util.tree_map_with_path(check, boxed_tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def _path_keys(path) -> Tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def opt_state_shardings(abstract_opt_state: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for an optimizer state, derived from the parameters' shardings.

    Optimizer states (optax) embed copies of the parameter tree (Adam's ``mu``/``nu``,
    Adafactor's factored ``v_row``/``v_col``).  A state leaf whose key path *ends with* a
    parameter's key path inherits that parameter's sharding when shapes agree; a factored
    statistic (the parameter's shape with one dimension removed) inherits the spec with
    that dimension dropped; anything else (step counts, placeholders) is replicated.

    Args:
      abstract_opt_state: optimizer state (arrays or ``ShapeDtypeStruct``s), unboxed.
      params: the unboxed parameter tree the optimizer was initialised with.
      param_shardings: same-structure tree of ``NamedSharding``.

    Returns:
      Tree of ``NamedSharding`` with the structure of ``abstract_opt_state``.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree_util.tree_leaves(
        param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if len(flat_params) != len(flat_shardings):
        raise ValueError(
            f"params has {len(flat_params)} leaves but param_shardings has {len(flat_shardings)}"
        )
    by_path = {_path_keys(p): (np.shape(v), s) for (p, v), s in zip(flat_params, flat_shardings)}
    mesh = flat_shardings[0].mesh if flat_shardings else None
    max_len = max((len(k) for k in by_path), default=0)

    def derive(path, leaf):
        keys = _path_keys(path)
        shape = tuple(np.shape(leaf))
        if mesh is None:
            raise ValueError("cannot derive optimizer-state shardings without any parameter")
        for start in range(max(0, len(keys) - max_len), len(keys)):
            hit = by_path.get(keys[start:])
            if hit is None:
                continue
            pshape, sharding = hit
            spec = tuple(sharding.spec) + (None,) * (len(pshape) - len(sharding.spec))
            if shape == tuple(pshape):
                return sharding
            if len(shape) == len(pshape) - 1:
                for drop in range(len(pshape)):
                    if tuple(pshape[:drop]) + tuple(pshape[drop + 1 :]) == shape:
                        return NamedSharding(mesh, PartitionSpec(*(spec[:drop] + spec[drop + 1 :])))
            break
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(derive, abstract_opt_state)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (batch) dimension over 'data', rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which rows of each global batch this process loads (t5x's data layout).

    Processes whose devices sit at the same positions of the mesh's 'data' axis need the
    same rows: they form one data shard and load them alike.  The global batch is the
    concatenation of the ``num_shards`` shards' rows in shard order.
    """

    shard_id: int
    num_shards: int


def data_layout(mesh: Mesh) -> DataLayout:
    """This process's ``DataLayout`` on ``mesh`` (one shard on one process).

    E.g. 2 processes x 2 devices: a (2, 2) mesh gives each process its own shard (2 shards);
    ``num_partitions=4``, a (1, 4) mesh, puts both in one shard (they load the same rows).
    """
    process_grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return _data_layout(process_grid, mesh.axis_names.index(DATA_AXIS), jax.process_index())


@functools.lru_cache(maxsize=None)
def _num_shards(mesh: Mesh) -> int:  # cached: shard_batch runs every step
    return data_layout(mesh).num_shards


def _data_layout(process_grid: np.ndarray, data_axis: int, process_index: int) -> DataLayout:
    """``DataLayout`` from the mesh's grid of process indices (``[data, model]`` for ours)."""
    positions = {}  # process -> the 'data' positions its devices occupy
    for index, proc in np.ndenumerate(process_grid):
        positions.setdefault(int(proc), set()).add(index[data_axis])
    shards = sorted({tuple(sorted(p)) for p in positions.values()})
    for shard in shards:
        # make_array_from_process_local_data places a process's rows as one block.
        if list(shard) != list(range(shard[0], shard[-1] + 1)) or len(shard) != len(shards[0]):
            raise ValueError(
                "each process's devices must cover one contiguous block of the mesh's 'data' "
                f"axis, the same size for every process; got 'data' positions per process "
                f"{ {k: sorted(v) for k, v in sorted(positions.items())} }")
    if len({i for s in shards for i in s}) != sum(len(s) for s in shards):
        raise ValueError("processes share part of a 'data' block without sharing all of it: "
                         f"{ {k: sorted(v) for k, v in sorted(positions.items())} }")
    return DataLayout(shard_id=shards.index(tuple(sorted(positions[process_index]))),
                      num_shards=len(shards))


def shard_batch(batch_np: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch into global ``jax.Array``s sharded over 'data'.

    Args:
      batch_np: pytree of numpy arrays ``[local_batch, ...]`` -- the rows this process
        loaded: those of its data shard (``data_layout``).  On one host that is the whole
        global batch; with ``S`` shards the global batch is the concatenation of the
        shards' rows in shard order (``global_batch = S * local_batch``).

    Returns:
      Same-structure tree of ``jax.Array`` with ``batch_sharding(mesh)``.

    Raises:
      ValueError: naming the feature whose global batch size does not divide the 'data'
        axis.
    """
    sharding = batch_sharding(mesh)
    data_size = mesh.shape[DATA_AXIS]
    num_shards = _num_shards(mesh)

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch feature {jax.tree_util.keystr(path)} is a scalar; it needs a batch dimension")
        global_rows = x.shape[0] * num_shards
        if global_rows % data_size:
            raise ValueError(
                f"batch feature {jax.tree_util.keystr(path)} has global batch size {global_rows} "
                f"(local {x.shape[0]} x {num_shards} data shards), not divisible by the 'data' mesh axis "
                f"of size {data_size}"
            )
        global_shape = (global_rows,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch_np)


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of (possibly sharded) arrays, the same on every process.

    ``jax.device_get`` only reads arrays whose shards all live on this process; parameters
    sharded across hosts are gathered first (a collective: every process must call this).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
        # The processes meet at the coordination service first: on CPU, gloo gives a process
        # only 30 s to join the first gather, and one process may still be busy (compiling,
        # writing files) long after another arrived.
        wait_for_all_processes("to_host")
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree_util.tree_map(get, tree)


_BARRIERS = {}


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Block until every process of the job reaches the barrier `name` (a no-op with one
    process). Uses the coordination service, not a device collective."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    count = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1  # each barrier id is used once
    distributed.global_state.client.wait_at_barrier(f"hypertune_{name}_{count}",
                                                    timeout_s * 1000)


# --------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------

# Environment variables whose presence (with more than one process) means "a multi-process
# job": jax's cluster auto-detection (TPU pod, SLURM, Open MPI, GKE) handles the rest.
_CLUSTER_ENV_COUNTS = (
    ("SLURM_NTASKS", "SLURM_JOB_ID"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
)


def _tpu_multi_host(env: Mapping[str, str]) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


@gin.configurable
def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
    initialize_fn: Optional[Callable[..., Any]] = None,
    multiprocess_gpu: bool = False,
) -> bool:
    """Calls ``jax.distributed.initialize`` iff this looks like a multi-process job.

    Triggers, in order:
      1. explicit ``coordinator_address`` (flag/gin) or ``$JAX_COORDINATOR_ADDRESS``,
         with ``num_processes``/``$JAX_NUM_PROCESSES`` and ``process_id``/``$JAX_PROCESS_ID``;
      2. ``multiprocess_gpu`` (t5x's ``--multiprocess_gpu``): always, with whichever of
         ``num_processes`` / ``process_id`` are given; jax detects the rest (SLURM, Open MPI);
      3. a multi-host TPU slice (``$TPU_WORKER_HOSTNAMES`` lists >1 host, or Megascale);
      4. SLURM or Open MPI with more than one task.
    In cases 3-4 jax auto-detects everything.  Otherwise (one process) nothing happens.
    Must run before any other JAX call that touches devices.  The flags of the binaries
    (``--coordinator_address``, ``--process_count``, ``--process_index``,
    ``--multiprocess_gpu``) arrive here through ``command_line.initialize_distributed``.

    Args:
      env: environment mapping (default ``os.environ``); injectable for tests.
      initialize_fn: default ``jax.distributed.initialize``; injectable for tests.

    Returns:
      True if ``initialize`` was called.
    """
    env = os.environ if env is None else env
    init = jax.distributed.initialize if initialize_fn is None else initialize_fn
    if initialize_fn is None and jax.distributed.is_initialized():
        return False
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if address or multiprocess_gpu:
        n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
        pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
        kwargs = {"coordinator_address": address} if address else {}
        if n is not None:
            kwargs["num_processes"] = int(n)
        if pid is not None:
            kwargs["process_id"] = int(pid)
        logging.info("jax.distributed.initialize(%s)", kwargs)
        init(**kwargs)
        return True
    multi = _tpu_multi_host(env)
    for count_var, marker in _CLUSTER_ENV_COUNTS:
        if env.get(marker) and re.fullmatch(r"\d+", env.get(count_var, "")) and int(env[count_var]) > 1:
            multi = True
    if multi:
        logging.info("multi-process environment detected; jax.distributed.initialize() with auto-detection")
        init()
        return True
    return False
