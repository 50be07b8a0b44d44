"""Tests for hypertune.quantized_adam and optimizers.adamw_8bit: state memory, agreement with
AdamW, block-wise round-trip error, checkpoints, shardings, and a tiny training run."""
import conftest
import json
import os
import subprocess
import sys

import gin_training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hypertune import checkpoints, optimizers, partitioning
from hypertune import quantized_adam as qa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nbytes(tree):
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _max_error(signed):
  """Nearest-code rounding error bound, relative to the block's absmax: half the widest gap."""
  return float(np.max(np.diff(qa.dynamic_map(signed)))) / 2


def test_dynamic_maps():
  signed, unsigned = qa.dynamic_map(True), qa.dynamic_map(False)
  for table in (signed, unsigned):
    assert table.shape == (256,) and table.dtype == np.float32
    assert np.all(np.diff(table) > 0) and table[-1] == 1.0 and 0.0 in table
  assert unsigned[0] == 0.0 and -0.995 < signed[0] < -0.99
  # Dynamic range: the smallest non-zero magnitudes are ~1e-7 of the absmax, the top decade
  # is finest (64 signed / 128 unsigned fractions in [0.1, 1]).
  assert 1e-7 < np.min(np.abs(signed[signed != 0])) < 1e-6
  top = lambda t: np.sum((t > 0.1) & (t < 1.0))
  assert top(signed) == 64 and top(unsigned) == 128
  assert _max_error(True) < 0.0071 and _max_error(False) < 0.0036


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,block_size", [((96, 70), 256), ((6, 8, 32), 64)])
def test_round_trip_error_is_bounded_per_block(signed, shape, block_size):
  """Blocks of the flattened array: a padded last block ([96, 70]), or whole blocks in the
  trailing dimensions ([6, 8, 32] as [6, 4, 64], the same blocks)."""
  rng = np.random.default_rng(0)
  # Heavy-tailed values with block-to-block scale changes of 1e4, as in Adam moments.
  x = rng.standard_t(2, size=shape) * 10.0 ** rng.uniform(-6, -2, size=shape)
  x = np.asarray(x if signed else np.abs(x), np.float32)
  codes, absmax = qa.quantize_blockwise(jnp.asarray(x), block_size, signed)
  num_blocks = -(-x.size // block_size)
  assert codes.shape == x.shape and codes.dtype == (jnp.int8 if signed else jnp.uint8)
  assert absmax.shape == (num_blocks,) and absmax.dtype == jnp.float32
  padded = np.pad(x.ravel(), (0, num_blocks * block_size - x.size)).reshape(num_blocks, -1)
  np.testing.assert_array_equal(np.asarray(absmax), np.abs(padded).max(axis=1))
  back = np.asarray(qa.dequantize_blockwise(codes, absmax, block_size))
  err = np.pad(np.abs(back - x).ravel(), (0, padded.size - x.size)).reshape(num_blocks, -1)
  ratio = err.max(axis=1) / np.asarray(absmax)
  assert np.all(ratio <= _max_error(signed) * (1 + 1e-5)), ratio.max()
  # A block's absmax, where positive, and zeros are exact (1.0 and 0.0 are codes).
  peak = np.argmax(np.abs(padded), axis=1)
  back_padded = np.pad(back.ravel(), (0, padded.size - x.size)).reshape(num_blocks, -1)
  rows = np.arange(num_blocks)
  positive = padded[rows, peak] > 0
  assert positive.sum() > 0
  np.testing.assert_array_equal(back_padded[rows, peak][positive], padded[rows, peak][positive])
  zeros = qa.quantize_blockwise(jnp.zeros(shape), block_size, signed)
  assert np.all(np.asarray(qa.dequantize_blockwise(*zeros, block_size)) == 0.0)


def _realistic_params():
  """A few T5-small-like matrices, plus small tensors that keep float32 moments."""
  f = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = lambda: {"wi": f(256, 1024), "wo": f(1024, 256), "scale": f(256)}
  return {"layers_0": layer(), "layers_1": layer(), "head": {"kernel": f(256, 512), "bias": f(512)}}


def test_state_is_at_most_30_percent_of_adamw():
  params = _realistic_params()
  state = jax.eval_shape(optimizers.adamw_8bit().init, params)
  ratio = _nbytes(state) / _nbytes(jax.eval_shape(optimizers.adamw().init, params))
  print(f"8-bit / AdamW state bytes: {ratio:.4f}")
  assert ratio <= 0.30, ratio
  adam = state.inner_state[0]
  assert adam.mu["layers_0"]["wi"].dtype == jnp.int8 and adam.nu["layers_0"]["wi"].dtype == jnp.uint8
  assert adam.mu_absmax["layers_0"]["wi"].absmax.shape == (1024,)
  # Small tensors keep float32 moments (no absmax).
  assert adam.mu["head"]["bias"].dtype == jnp.float32 and adam.mu_absmax["head"]["bias"] is None


def _regression():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(256, 64)), jnp.float32)
  w_true = rng.normal(size=(64, 128)) / 8
  y = jnp.asarray(x @ w_true + 0.01 * rng.normal(size=(256, 128)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(64, 128)) / 8, jnp.float32),  # quantized
            "b": jnp.zeros((128,), jnp.float32)}  # float32 moments
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  return params, loss


def _trajectory(tx, params, loss, steps=50):
  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (params, value)
    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]
  return run(params)


def test_updates_match_adamw_within_quantization_error():
  params, loss = _regression()
  kwargs = dict(learning_rate=3e-3, weight_decay=1e-2)
  ref, ref_loss = _trajectory(optimizers.adamw(**kwargs), params, loss)
  q, q_loss = _trajectory(optimizers.adamw_8bit(**kwargs), params, loss)
  moved = np.linalg.norm(ref["w"] - params["w"], axis=(1, 2))
  rel = np.linalg.norm(q["w"] - ref["w"], axis=(1, 2)) / moved
  rel_b = np.linalg.norm(q["b"] - ref["b"], axis=1) / np.linalg.norm(ref["b"], axis=1)
  final = abs(float(q_loss[-1]) - float(ref_loss[-1])) / float(ref_loss[-1])
  print(f"weight trajectory error / displacement: step1 {rel[0]:.2e} max {rel.max():.2e} "
        f"(bias, float32 moments: {rel_b.max():.2e}); "
        f"final loss {float(ref_loss[-1]):.5f} vs {float(q_loss[-1]):.5f} ({final:.2%})")
  assert rel[0] < 1e-5  # the first step's update uses the float32 moments
  # The dynamic map's relative precision is ~1% near a block's absmax and coarser below it
  # (v spans decades within a block): the trajectories part by a few percent, not more.
  assert rel.max() < 0.06 and rel_b.max() < 0.06, (rel, rel_b)
  assert float(ref_loss[-1]) < 0.5 * float(ref_loss[0])  # it is a real optimization
  assert final < 0.02


def test_float32_moments_reproduce_adamw():
  """With nothing quantized the transformation is AdamW: the Adam arithmetic is optax's."""
  params, loss = _regression()
  kwargs = dict(learning_rate=3e-3, weight_decay=1e-2)
  ref, _ = _trajectory(optimizers.adamw(**kwargs), params, loss, steps=10)
  same, _ = _trajectory(optimizers.adamw_8bit(min_quantized_size=10**9, **kwargs), params, loss,
                        steps=10)
  for k in ("w", "b"):
    np.testing.assert_allclose(same[k], ref[k], rtol=1e-5, atol=1e-7)


def test_frozen_params_and_checkpoint_round_trip(tmp_path):
  params, loss = _regression()
  params = {"hypernet": params, "downstream": {"w": jnp.ones((64, 128))}}
  tx = optimizers.make_optimizer(optimizers.adamw_8bit(1e-3), frozen_patterns=("downstream/.*",))
  full_loss = lambda p: loss(p["hypernet"]) + jnp.sum(p["downstream"]["w"])
  step = jax.jit(lambda p, s: tx.update(jax.grad(full_loss)(p), s, p))
  state = tx.init(params)
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert np.all(np.asarray(updates["downstream"]["w"]) == 0)
  # Frozen parameters have no moments.
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, qa.ScaleByAdam8bitState))
          if isinstance(s, qa.ScaleByAdam8bitState)][0]
  assert isinstance(adam.mu["downstream"]["w"], optax.MaskedNode)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=1)
  ckpt.save(3, {"opt_state": state})
  ckpt.wait_until_finished()
  restored, _ = ckpt.restore(target=checkpoints.abstract_state({"opt_state": state}))
  ckpt.close()
  restored = restored["opt_state"]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Training continues identically from the restored state.
  np.testing.assert_array_equal(np.asarray(step(params, restored)[0]["hypernet"]["w"]),
                                np.asarray(step(params, state)[0]["hypernet"]["w"]))


def test_codes_inherit_param_shardings_and_scales_replicate():
  params = {"dense": {"kernel": jnp.zeros((64, 128)), "bias": jnp.zeros((128,))},
            "frozen": {"kernel": jnp.zeros((128, 64))}}
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  specs = {"dense": {"kernel": P(None, "model"), "bias": P("model")},
           "frozen": {"kernel": P("model", None)}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda s: isinstance(s, P))
  tx = optimizers.make_optimizer(optimizers.adamw_8bit(block_size=64),
                                 frozen_patterns=("frozen/.*",))
  abstract = jax.eval_shape(tx.init, params)
  osh = partitioning.opt_state_shardings(abstract, params, shardings)
  got = {optimizers.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(osh)[0]}
  for field in ("mu", "nu"):
    # kernel: [64, 128] codes; absmax: [128] blocks, the shape of a factored statistic (the
    # kernel's shape less dim 0) that would be sharded over 'model' if its path ended in the
    # kernel's.
    assert [s for p, s in got.items() if p.endswith(f"/{field}/dense/kernel")] == [P(None, "model")]
    assert [s for p, s in got.items() if p.endswith(f"/{field}/dense/bias")] == [P("model")]
    assert [s for p, s in got.items() if p.endswith(f"/{field}_absmax/dense/kernel/absmax")] == [P()]
  assert not any("frozen" in p for p in got), got  # frozen parameters have no state
  state = jax.jit(tx.init, out_shardings=osh)(params)
  assert jax.tree.structure(state) == jax.tree.structure(abstract)


MESH_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from hypertune import optimizers, partitioning
rng = np.random.default_rng(0)
x, y = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32), jnp.asarray(rng.normal(size=(16, 256)), jnp.float32)
params = {"w": jnp.asarray(rng.normal(size=(64, 256)) / 8, jnp.float32), "b": jnp.zeros((256,))}
tx = optimizers.adamw_8bit(1e-2, block_size=64)
def run(mesh, specs):
  sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  p = jax.device_put(params, sh)
  osh = partitioning.opt_state_shardings(jax.eval_shape(tx.init, p), p, sh)
  s = jax.jit(tx.init, out_shardings=osh)(p)
  def step(p, s):
    g = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  step = jax.jit(step, in_shardings=(sh, osh), out_shardings=(sh, osh))
  for _ in range(5):
    p, s = step(p, s)
  mu = s.inner_state[0].mu["w"]
  return np.asarray(p["w"]), np.asarray(mu), str(mu.sharding.spec), mu.addressable_shards[0].data.size
mesh = partitioning.make_mesh(num_partitions=4)
w8, mu8, spec, shard = run(mesh, {"w": P("data", "model"), "b": P("model")})
w1, mu1, _, _ = run(partitioning.make_mesh(devices=jax.devices()[:1]), {"w": P(), "b": P()})
print(json.dumps({"max_diff": float(np.abs(w8 - w1).max()), "moved": float(np.abs(w1 - params["w"]).max()),
                  "same_codes": float(np.mean(mu8 == mu1)), "spec": spec, "shard": shard}))
"""


def test_sharded_training_on_a_2x4_mesh_matches_one_device():
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags_with_devices(8),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["spec"] == str(P("data", "model")) and result["shard"] == 64 * 256 // 8, result
  # Float reduction order differs across the mesh; a moment at a code boundary may round the
  # other way, so codes agree almost everywhere and parameters to well under 1% of their motion.
  assert result["same_codes"] > 0.99 and result["max_diff"] < 0.01 * result["moved"], result


# The quickstart's downstream stage, one layer each side (compiling the step dominates).
TINY = ["config.t5_config.size = 'tiny'", "config.t5_config.num_encoder_layers = 1",
        "config.t5_config.num_decoder_layers = 1", "BATCH_SIZE = 8", "TRAIN_STEPS = 20",
        "train.log_every_steps = 10", "optimizers.linear_warmup_decay.warmup_steps = 0",
        "EVAL_PERIOD = 0", "train.checkpoint_period = 1000", "LEARNING_RATE = 3e-3"]


def test_tiny_training_run_follows_adamw(tmp_path):
  curves = {}
  for name in ("adamw", "adamw_8bit"):
    curves[name] = np.asarray(gin_training.train(["quickstart/1_downstream.gin"], TINY + [
        f"MODEL_DIR = '{tmp_path / name}'", f"train.optimizer = @optimizers.{name}()",
        f"optimizers.{name}.learning_rate = @optimizers.linear_warmup_decay()"])["losses"])
  ref, q = curves["adamw"], curves["adamw_8bit"]
  rel = np.abs(q - ref) / ref
  print(f"tiny run losses adamw {ref[0]:.4f}->{ref[-1]:.4f}, 8-bit {q[0]:.4f}->{q[-1]:.4f}; "
        f"max relative difference {rel.max():.2%}, final {rel[-1]:.2%}")
  assert len(q) == 20 and ref[-1] < 0.8 * ref[0]
  assert rel[-1] < 0.03 and rel.max() < 0.05, rel
