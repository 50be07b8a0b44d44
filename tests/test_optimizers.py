"""Tests for hypertune.optimizers."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hypertune import optimizers


def _params():
    # Distinct shapes so state leaves can be attributed to parameters by shape.
    return {
        "downstream": {"encoder": {"kernel": jnp.ones((64, 48)), "bias": jnp.ones((48,))}},
        "hypernet": {"head": {"kernel": jnp.full((33, 7), 0.5), "bias": jnp.zeros((7,))}},
    }


FROZEN_SHAPES = {(64, 48), (48,), (64,)}  # incl. factored rows/cols of the frozen kernel


def test_trainable_mask_regex_rules():
    mask = optimizers.trainable_mask(_params(), frozen_patterns=("downstream/.*",))
    assert mask == {
        "downstream": {"encoder": {"kernel": False, "bias": False}},
        "hypernet": {"head": {"kernel": True, "bias": True}},
    }
    # Frozen wins over trainable; full match (".*bias" would not match "hypernet/head/bias_x").
    mask = optimizers.trainable_mask(
        _params(), trainable_patterns=("hypernet/.*", "downstream/.*/bias"), frozen_patterns=(".*/bias",)
    )
    assert mask["hypernet"]["head"] == {"kernel": True, "bias": False}
    assert mask["downstream"]["encoder"] == {"kernel": False, "bias": False}


def test_trainable_mask_errors_name_the_pattern():
    with pytest.raises(ValueError, match=r"'downstrem/\.\*' matches no parameter"):
        optimizers.trainable_mask(_params(), frozen_patterns=("downstrem/.*",))
    optimizers.trainable_mask(_params(), frozen_patterns=("downstrem/.*",), strict=False)
    with pytest.raises(ValueError, match="invalid regex"):
        optimizers.trainable_mask(_params(), frozen_patterns=("(",))
    with pytest.raises(TypeError, match="single string"):
        optimizers.trainable_mask(_params(), frozen_patterns="downstream/.*")


@pytest.mark.parametrize("base", ["adamw", "adafactor"])
def test_frozen_params_get_no_state_and_never_change(base):
    params = _params()
    opt = optimizers.adamw(1e-2) if base == "adamw" else optimizers.adafactor(min_dim_size_to_factor=4)
    tx = optimizers.make_optimizer(opt, frozen_patterns=("downstream/.*",), max_grad_norm=1.0)
    state = tx.init(params)
    shapes = {tuple(np.shape(l)) for l in jax.tree_util.tree_leaves(state)}
    assert not shapes & FROZEN_SHAPES, f"optimizer state holds frozen-param-sized leaves: {shapes & FROZEN_SHAPES}"
    assert (33, 7) in shapes or {(33,), (7,)} <= shapes  # trainable kernel does get state

    def loss(p):
        return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = params
    for _ in range(3):
        p, state = step(p, state)
    for path in ("kernel", "bias"):
        np.testing.assert_array_equal(p["downstream"]["encoder"][path], params["downstream"]["encoder"][path])
    assert not np.allclose(p["hypernet"]["head"]["kernel"], params["hypernet"]["head"]["kernel"])


def test_clipping_uses_trainable_gradients_only():
    params = _params()
    tx = optimizers.make_optimizer(optax.sgd(1.0), frozen_patterns=("downstream/.*",), max_grad_norm=1.0)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads["downstream"]["encoder"]["kernel"] = jnp.full((64, 48), 100.0)  # huge but frozen
    grads["hypernet"]["head"]["bias"] = jnp.full((7,), 0.1)  # norm ~0.26 < 1: not clipped
    u, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(u["hypernet"]["head"]["bias"], -0.1, rtol=1e-6)
    grads["hypernet"]["head"]["bias"] = jnp.full((7,), 10.0)  # norm 26.5 -> clipped to 1
    u, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 1.0, rtol=1e-5)


def test_schedules():
    s = optimizers.linear_warmup_decay(peak_value=1.0, warmup_steps=10, total_steps=110, end_value=0.0)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110), s(500)], [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    s0 = optimizers.linear_warmup_decay(peak_value=2.0, warmup_steps=0, total_steps=4)
    np.testing.assert_allclose([s0(0), s0(2)], [2.0, 1.0])
    np.testing.assert_allclose(optimizers.constant(3e-4)(123), 3e-4)
    with pytest.raises(ValueError, match="total_steps"):
        optimizers.linear_warmup_decay(warmup_steps=10, total_steps=5)


def test_learning_rate_is_readable_from_state():
    params = {"w": jnp.ones((3,))}
    sched = optimizers.linear_warmup_decay(peak_value=1.0, warmup_steps=4, total_steps=8)
    tx = optimizers.make_optimizer(optimizers.adamw(sched))
    state = tx.init(params)
    lrs = []
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones((3,))}, state, params)
        lrs.append(optimizers.learning_rate_from_state(state))
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5])  # lr used at steps 0, 1, 2
    assert optimizers.learning_rate_from_state(optimizers.adafactor().init(params)) == pytest.approx(1e-3)
    assert optimizers.learning_rate_from_state(optax.sgd(0.1).init(params)) is None


def test_works_with_flax_boxed_params():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5, name="frozen_layer")(x)
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(3, kernel_init=init, name="head")(x)

    params = M().init(jax.random.key(0), jnp.ones((2, 4)))["params"]
    assert isinstance(params["head"]["kernel"], nn.LogicallyPartitioned)
    mask = optimizers.trainable_mask(params, frozen_patterns=("frozen_layer/.*",))
    assert mask["head"]["kernel"] is True and mask["frozen_layer"]["kernel"] is False
    tx = optimizers.make_optimizer(optimizers.adamw(0.1), frozen_patterns=("frozen_layer/.*",))
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(nn.meta.unbox(updates)["frozen_layer"]["kernel"]).sum()) == 0.0
    assert float(jnp.abs(nn.meta.unbox(updates)["head"]["kernel"]).sum()) > 0.0


def test_parameter_table():
    table = optimizers.parameter_table(
        _params(),
        frozen_patterns=("downstream/.*",),
        restored_from={"downstream/encoder/kernel": "encoder/kernel", "hypernet/head/kernel": None},
    )
    lines = table.splitlines()
    row = next(l for l in lines if l.startswith("downstream/encoder/kernel"))
    assert "(64, 48)" in row and "3,072" in row and "frozen" in row and "checkpoint:encoder/kernel" in row
    row = next(l for l in lines if l.startswith("hypernet/head/kernel"))
    assert "trainable" in row and "fresh init" in row
    assert lines[-1] == "trainable: 238 params in 2 arrays; frozen: 3.12K params in 2 arrays"
    # Copied after loading (HyperT5's hyper encoder from the downstream): named as a copy,
    # with or without an initial checkpoint.
    for restored in (None, {"hypernet/head/kernel": None}):
        table = optimizers.parameter_table(
            _params(), restored_from=restored,
            copied_from={"hypernet/head/kernel": "downstream/encoder/kernel"})
        row = next(l for l in table.splitlines() if l.startswith("hypernet/head/kernel"))
        assert row.endswith("copy of downstream/encoder/kernel")
        row = next(l for l in table.splitlines() if l.startswith("downstream/encoder/kernel"))
        assert row.endswith("fresh init")


def test_gin_configuration():
    gin.clear_config()
    try:
        gin.parse_config(
            """
            import hypertune.optimizers
            make_optimizer.optimizer = @adamw()
            adamw.learning_rate = @linear_warmup_decay()
            linear_warmup_decay.peak_value = 0.5
            linear_warmup_decay.warmup_steps = 1
            linear_warmup_decay.total_steps = 10
            make_optimizer.frozen_patterns = ['downstream/.*']
            """
        )
        tx = optimizers.make_optimizer()
        params = _params()
        state = tx.init(params)
        _, state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        _, state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        assert optimizers.learning_rate_from_state(state) == pytest.approx(0.5)
        shapes = {tuple(np.shape(l)) for l in jax.tree_util.tree_leaves(state)}
        assert (64, 48) not in shapes and (33, 7) in shapes
    finally:
        gin.clear_config()
