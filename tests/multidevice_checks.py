"""Multi-device checks, run in a subprocess with 8 forced CPU devices.

XLA_FLAGS must be set before jax is imported, so pytest (one device) runs this file via
``tests/multidevice.py:run_checks``.  Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py partitioning
    XLA_FLAGS=... python tests/multidevice_checks.py restore CKPT_DIR EXPECTED.npz

Prints one JSON object {check_name: "ok" | "FAIL: ..."} as the last stdout line.
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from hypertune import checkpoints, optimizers, partitioning  # noqa: E402

RESULTS = {}


def check(fn):
    try:
        fn()
        RESULTS[fn.__name__] = "ok"
    except Exception:  # Report every failure, not just the first.
        RESULTS[fn.__name__] = "FAIL: " + traceback.format_exc()[-3000:]
    return fn


def _spec(x):
    return tuple(x.sharding.spec)


# ----------------------------------------------------------------------------- partitioning


class TinyMLP(nn.Module):
    """Logically annotated 2-layer MLP with an activation constraint."""

    hidden: int = 32
    out: int = 8

    @nn.compact
    def __call__(self, x):  # x: [batch, embed]
        w_init = nn.initializers.normal(0.1)
        h = nn.Dense(
            self.hidden,
            kernel_init=nn.with_logical_partitioning(w_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        h = nn.with_logical_constraint(jnp.tanh(h), ("batch", "mlp"))
        return nn.Dense(
            self.out,
            kernel_init=nn.with_logical_partitioning(w_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(h)


def _train_losses(mesh, steps=5):
    """Trains TinyMLP on a fixed regression batch; params, opt state, batch sharded on mesh."""
    rules = partitioning.standard_logical_axis_rules()
    model = TinyMLP()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12)).astype(np.float32)
    y = rng.normal(size=(16, 8)).astype(np.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shardings = partitioning.tree_shardings(abstract, mesh, rules)["params"]
    tx = optimizers.make_optimizer(optimizers.adamw(1e-2), frozen_patterns=("Dense_1/bias",), max_grad_norm=1.0)
    with partitioning.axis_rules_and_mesh(mesh, rules):
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, x))["params"], out_shardings=shardings)(
            jax.random.key(0)
        )
        opt_abstract = jax.eval_shape(tx.init, params)
        opt_shardings = partitioning.opt_state_shardings(opt_abstract, params, shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        batch_sh = partitioning.batch_sharding(mesh)

        def step(params, opt_state, batch):
            def loss_fn(p):
                pred = model.apply({"params": p}, batch["x"])
                return jnp.mean((pred - batch["y"]) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = jax.jit(
            step,
            in_shardings=(shardings, opt_shardings, {"x": batch_sh, "y": batch_sh}),
            out_shardings=(shardings, opt_shardings, None),
        )
        losses = []
        for _ in range(steps):
            batch = partitioning.shard_batch({"x": x, "y": y}, mesh)
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
    return losses, params, opt_state


def partitioning_checks():
    assert jax.device_count() == 8, jax.device_count()
    mesh = partitioning.make_mesh(num_partitions=4)
    rules = partitioning.standard_logical_axis_rules()

    @check
    def mesh_shape():
        assert dict(mesh.shape) == {"data": 2, "model": 4}, mesh.shape
        m2 = partitioning.make_mesh(model_parallel_submesh=(1, 1, 2, 1))
        assert dict(m2.shape) == {"data": 4, "model": 2}, m2.shape
        assert dict(partitioning.make_mesh().shape) == {"data": 8, "model": 1}

    @check
    def constraint_applies_inside_jit():
        def f(x):
            return nn.with_logical_constraint(x * 2.0, ("batch", "mlp"))

        with partitioning.axis_rules_and_mesh(mesh, rules):
            out = jax.jit(f)(jnp.ones((8, 16)))
        assert out.sharding.spec == P("data", "model"), out.sharding

    @check
    def constraint_inside_model_applies():
        # Unsharded params and input: only the constraint inside the module can shard the output.
        class Probe(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.Dense(32, kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")))(x)
                return nn.with_logical_constraint(h, ("batch", "mlp"))

        x = jnp.ones((8, 12))
        with partitioning.axis_rules_and_mesh(mesh, rules):
            v = Probe().init(jax.random.key(0), x)
            out = jax.jit(Probe().apply)(v, x)
        assert out.sharding.spec == P("data", "model"), out.sharding

    @check
    def tree_and_opt_state_shardings():
        abstract = jax.eval_shape(TinyMLP().init, jax.random.key(0), jnp.ones((4, 12)))
        sh = partitioning.tree_shardings(abstract, mesh, rules)["params"]
        assert sh["Dense_0"]["kernel"].spec == P(None, "model"), sh["Dense_0"]["kernel"]
        assert sh["Dense_1"]["kernel"].spec == P("model", None), sh["Dense_1"]["kernel"]
        assert sh["Dense_0"]["bias"].spec == P("model"), sh["Dense_0"]["bias"]
        params = nn.meta.unbox(abstract)["params"]
        opt = jax.eval_shape(optax.adamw(1e-3).init, params)
        osh = partitioning.opt_state_shardings(opt, params, sh)
        assert osh[0].mu["Dense_0"]["kernel"].spec == P(None, "model")
        assert osh[0].count.spec == P()
        # Adafactor's factored second moments drop one dimension of the parameter's spec.
        big = {"k": jax.ShapeDtypeStruct((256, 512), jnp.float32)}
        big_sh = {"k": NamedSharding(mesh, P("data", "model"))}
        fst = jax.eval_shape(optax.adafactor(1e-3).init, big)
        fsh = partitioning.opt_state_shardings(fst, big, big_sh)
        assert fst[0].v_row["k"].shape == (256,) and fsh[0].v_row["k"].spec == P("data"), fsh[0].v_row
        assert fst[0].v_col["k"].shape == (512,) and fsh[0].v_col["k"].spec == P("model"), fsh[0].v_col

    @check
    def shard_batch_values_and_errors():
        x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
        b = partitioning.shard_batch({"inputs": x}, mesh)
        assert b["inputs"].sharding.spec == P("data"), b["inputs"].sharding
        assert len(b["inputs"].addressable_shards) == 8
        assert b["inputs"].addressable_shards[0].data.shape == (4, 3)
        np.testing.assert_array_equal(np.asarray(b["inputs"]), x)
        try:
            partitioning.shard_batch({"targets": np.zeros((3, 2))}, mesh)
        except ValueError as e:
            assert "targets" in str(e) and "'data'" in str(e), e
        else:
            raise AssertionError("batch of 3 on a data axis of 2 did not raise")

    @check
    def sharded_training_matches_single_device():
        sharded, params_s, opt_s = _train_losses(mesh)
        single_mesh = partitioning.make_mesh(devices=jax.devices()[:1])
        single, params_1, _ = _train_losses(single_mesh)
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
        assert sharded[-1] < sharded[0], sharded  # It actually trains.
        assert params_s["Dense_0"]["kernel"].sharding.spec == P(None, "model")
        # Adam moments of a model-sharded kernel are sharded the same way.
        mu = jax.tree_util.tree_leaves(opt_s, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        adam = [s for s in mu if isinstance(s, optax.ScaleByAdamState)][0]
        assert adam.mu["Dense_0"]["kernel"].sharding.spec == P(None, "model")
        for a, b in zip(jax.tree_util.tree_leaves(params_s), jax.tree_util.tree_leaves(params_1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints


def restore_checks(ckpt_dir, expected_npz):
    expected = dict(np.load(expected_npz))
    mesh = partitioning.make_mesh(num_partitions=4)

    @check
    def restore_onto_2x4_mesh():
        assert jax.device_count() == 8
        shardings = {
            "kernel": NamedSharding(mesh, P("data", "model")),
            "embedding": NamedSharding(mesh, P("model", None)),
            "step": NamedSharding(mesh, P()),
        }
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in expected.items()
        }
        ckpt = checkpoints.Checkpointer(ckpt_dir)
        state, data = ckpt.restore(target=target)
        assert data == {"index": 7, "seed": 3}, data
        for k, v in expected.items():
            assert state[k].sharding == shardings[k], (k, state[k].sharding)
            np.testing.assert_array_equal(np.asarray(state[k]), v)
        shard = state["kernel"].addressable_shards[0].data
        assert shard.shape == (expected["kernel"].shape[0] // 2, expected["kernel"].shape[1] // 4), shard.shape


if __name__ == "__main__":
    if sys.argv[1] == "partitioning":
        partitioning_checks()
    elif sys.argv[1] == "restore":
        restore_checks(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown check group {sys.argv[1]!r}")
    print(json.dumps(RESULTS))
