"""Tests for hypertune.partitioning.

Single-device behaviour is tested in-process; everything needing a (2, 4) mesh runs in
one subprocess with 8 forced CPU devices (tests/multidevice_checks.py), because
XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hypertune import partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(REPO, "tests", "multidevice_checks.py")


def run_multidevice(*args, timeout=300):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, CHECKS, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert proc.returncode == 0 and lines, f"subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def multidevice_results():
    return run_multidevice("partitioning")


@pytest.mark.parametrize(
    "name",
    [
        "mesh_shape",
        "constraint_applies_inside_jit",
        "constraint_inside_model_applies",
        "tree_and_opt_state_shardings",
        "shard_batch_values_and_errors",
        "sharded_training_matches_single_device",
    ],
)
def test_on_2x4_mesh(multidevice_results, name):
    assert multidevice_results.get(name) == "ok", multidevice_results.get(name, f"check {name} did not run")


def test_make_mesh_single_device_and_errors():
    mesh = partitioning.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="num_partitions"):
        partitioning.make_mesh(num_partitions=jax.device_count() + 1)
    with pytest.raises(ValueError, match="conflicts"):
        partitioning.make_mesh(num_partitions=3, model_parallel_submesh=(1, 2))


def test_make_mesh_is_gin_configurable():
    gin.clear_config()
    try:
        gin.parse_config("make_mesh.num_partitions = 1")
        assert dict(partitioning.make_mesh().shape)["model"] == 1
        gin.parse_config("make_mesh.num_partitions = 7")
        with pytest.raises(ValueError, match="7"):
            partitioning.make_mesh()
    finally:
        gin.clear_config()


def test_standard_rules_use_t5x_vocabulary():
    rules = dict(partitioning.standard_logical_axis_rules())
    assert rules["batch"] == "data"
    for name in ("vocab", "mlp", "heads", "joined_kv"):
        assert rules[name] == "model", name
    for name in ("embed", "kv", "length", "layers", "relpos_buckets", "hyper_tokens"):
        assert rules[name] is None, name


def test_two_dim_parameter_partitioning_shards_embed_over_data():
    rules = partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)
    mesh = partitioning.make_mesh()
    sh = partitioning.logical_to_sharding({"k": P("embed", "mlp")}, mesh, rules)
    assert sh["k"].spec == P("data", "model")
    with pytest.raises(ValueError, match="must be 1 or 2"):
        partitioning.standard_logical_axis_rules(activation_partitioning_dims=3)


def test_additional_rules_take_precedence():
    rules = partitioning.standard_logical_axis_rules(additional_rules=[("hyper_tokens", "model"), ("mlp", None)])
    mesh = partitioning.make_mesh()
    sh = partitioning.logical_to_sharding(
        {"a": P("hyper_tokens", "embed"), "b": ("embed", "mlp"), "c": None, "d": P("unknown_axis")}, mesh, rules
    )
    assert sh["a"].spec == P("model", None)
    assert sh["b"].spec == P(None, None)
    assert sh["c"].spec == P()
    assert sh["d"].spec == P(None)  # Unknown logical names are replicated.
    with pytest.raises(ValueError, match="name, mesh_axis"):
        partitioning.standard_logical_axis_rules(additional_rules=[("only_name",)])


def test_tree_shardings_rejects_rank_mismatch():
    import flax.linen as nn

    mesh = partitioning.make_mesh()
    bad = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3,), np.float32), names=("embed", "mlp"))}
    with pytest.raises(ValueError, match=r"\['w'\].*rank 1"):
        partitioning.tree_shardings(bad, mesh, partitioning.standard_logical_axis_rules())


def test_shard_batch_single_device_round_trip():
    mesh = partitioning.make_mesh()
    batch = {"inputs": np.arange(12).reshape(4, 3), "nested": {"t": np.ones((4,), np.float32)}}
    out = partitioning.shard_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])
    assert out["nested"]["t"].sharding.spec == P("data")
    with pytest.raises(ValueError, match="scalar"):
        partitioning.shard_batch({"s": np.float32(1.0)}, mesh)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


@pytest.mark.parametrize(
    "env,kwargs,expected",
    [
        ({}, {}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}, {},
         {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
        ({}, {"coordinator_address": "host:99", "num_processes": 2, "process_id": 0},
         {"coordinator_address": "host:99", "num_processes": 2, "process_id": 0}),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}, {}),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, None),  # Single-host TPU VM.
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, {}, {}),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, {}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, {}, {}),
    ],
)
def test_maybe_initialize_distributed(env, kwargs, expected):
    rec = _Recorder()
    called = partitioning.maybe_initialize_distributed(env=env, initialize_fn=rec, **kwargs)
    assert called == (expected is not None)
    assert rec.calls == ([] if expected is None else [expected])


def test_maybe_initialize_distributed_noop_in_this_process():
    # The test process is a single-process job: the real jax.distributed must not be touched.
    assert partitioning.maybe_initialize_distributed(env={}) is False
    assert jax.process_count() == 1
