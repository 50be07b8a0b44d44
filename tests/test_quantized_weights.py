"""Tests for hypertune.models.quantization: frozen matmul weights stored as int8 / int4 / nf4
(block-wise absmax, qwix), dequantised in `layers.dot`, in the trainer behind
`train.frozen_weights_dtype`."""
import functools

import gin_training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta
from flax.traverse_util import flatten_dict
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from hypertune import optimizers, partitioning, train_lib
from hypertune.hypernets.shared_peft import SharedPeft
from hypertune.models import quantization as q
from hypertune.models.base import EncoderDecoderModel
from hypertune.models.config import t5_config
from hypertune.models.hypermodel import HyperModel
from hypertune.models.layers import Attention
from hypertune.models.llama import Llama, causal_mask, llama_config, positions_of
from hypertune.models.peft import LoRA
from hypertune.models.t5 import T5

# Max |logit difference| / max |float32 logit| allowed, per storage type: about twice what
# tiny randomly initialised T5 and Llama measure (docs/memory.md, "Quantised frozen weights").
LOGIT_TOLERANCE = {"int8": 0.04, "int4": 0.5, "nf4": 0.5}


def _all_frozen(params):
  return jax.tree.map(lambda _: False, params)


def _matmul_weights(params):
  return {k: v for k, v in flatten_dict(params, sep="/").items()
          if q.MATMUL_WEIGHTS.fullmatch(k)}


@pytest.fixture(scope="module")
def t5():
  cfg = t5_config("tiny", vocab_size=128)
  enc = jax.random.randint(jax.random.key(1), (2, 10), 1, 128)
  dec = jax.random.randint(jax.random.key(2), (2, 6), 1, 128)
  model = T5(cfg)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), enc, dec)["params"])
  apply = jax.jit(lambda p, peft=None: model.apply({"params": p}, enc, dec, peft))
  return cfg, params, apply


@pytest.fixture(scope="module")
def llama():
  cfg = llama_config("tiny", vocab_size=128)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 1, 128)
  key_mask = jnp.ones_like(tokens)
  args = (tokens, positions_of(key_mask), causal_mask(key_mask))
  model = Llama(cfg)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"])
  return cfg, params, jax.jit(lambda p: model.apply({"params": p}, *args))


def test_blocks_round_trip_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (3, 32, 4, 16)) * 0.05  # scanned: [layers, ...]
  assert q.block_tiles(w.shape) == {3: 16, 2: 4}  # 64-element blocks over (heads, kv)
  assert q.block_tiles((64, 2, 16)) == {2: 16, 1: 2}  # axis 0 is never tiled
  quantize = jax.jit(q.quantize, static_argnums=1)
  dequantize = jax.jit(q.dequantize)
  for qtype, qmax in (("int8", 127.5), ("int4", 7.5)):
    qw = quantize(w, qtype)
    assert qw.shape == w.shape and qw.scale.shape == (3, 32, 1, 1)
    # absmax: step = block absmax / qmax; rounding is off by at most half a step.
    step = np.asarray(jnp.max(jnp.abs(w), axis=(2, 3), keepdims=True)) / qmax
    err = np.abs(np.asarray(dequantize(qw)) - np.asarray(w))
    assert np.all(err <= 0.5 * step + 1e-7), qtype
    # A slice along axis 0 (what nn.scan hands a layer) is that layer's weight.
    layer = jax.tree.map(lambda a: a[1], qw)
    np.testing.assert_array_equal(dequantize(layer), dequantize(qw)[1])
  # 4-bit codes: two a byte, every code -8..7 survives the packing.
  codes = jnp.arange(-8, 8, dtype=jnp.int8).reshape(1, 16)
  np.testing.assert_array_equal(q._unpack4(q._pack4(codes), "int4"), codes)
  nf4 = quantize(w, "nf4")
  assert nf4.qvalue.dtype == jnp.uint8 and nf4.qvalue.shape == (3, 32, 4, 8)
  assert float(jnp.max(jnp.abs(dequantize(nf4) - w))) < 0.2 * float(jnp.max(jnp.abs(w)))


@pytest.mark.parametrize("which", ["t5", "llama"])
def test_frozen_weight_memory(which, request):
  _, params, _ = request.getfixturevalue(which)
  fp32 = q.nbytes(_matmul_weights(params))
  ratios = {}
  for qtype in q.QTYPES if which == "t5" else ("int8", "int4"):
    quantised = q.quantize_frozen(params, _all_frozen(params), qtype)
    weights = _matmul_weights(quantised)
    assert all(isinstance(w, q.QuantizedWeight) for w in weights.values())
    ratios[qtype] = q.nbytes(weights) / fp32
    # Embeddings and norm scales stay float32, untouched.
    for path, leaf in flatten_dict(quantised, sep="/").items():
      if path not in weights:
        assert leaf is flatten_dict(params, sep="/")[path]
  # Measured on the device buffers: int8 1 + 4/64 bytes a weight, 4-bit 0.5 + 4/64 (or more
  # scale bytes where a weight's trailing axes hold fewer than 64 elements).
  assert 0.26 <= ratios["int8"] <= 0.30, ratios
  assert ratios["int4"] == ratios.get("nf4", ratios["int4"]) <= 0.16, ratios


def test_only_frozen_parameters_are_quantised(t5):
  _, params, _ = t5
  trainable = optimizers.trainable_mask(params, (".*",), ("encoder/.*",))
  quantised = flatten_dict(q.quantize_frozen(params, trainable, "int8"), sep="/")
  for path, train in flatten_dict(trainable, sep="/").items():
    expect = not train and q.MATMUL_WEIGHTS.fullmatch(path) is not None
    assert isinstance(quantised[path], q.QuantizedWeight) == expect, path
    if train:
      assert quantised[path].dtype == jnp.float32
  assert q.quantize_frozen(params, trainable, None) is params


@pytest.mark.parametrize("which", ["t5", "llama"])
def test_logits_close_to_float32(which, request):
  _, params, apply = request.getfixturevalue(which)
  ref = np.asarray(apply(params))
  for qtype, tol in LOGIT_TOLERANCE.items():
    if which == "llama" and qtype == "nf4":
      continue  # a compile saved: nf4 shares int4's code path but for the code book
    out = np.asarray(apply(q.quantize_frozen(params, _all_frozen(params), qtype)))
    rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert 0 < rel < tol, (qtype, rel)


def test_gradients_reach_lora_through_the_dequantised_matmuls():
  """T5 attention with LoRA on q and o: the gradients of the LoRA factors and of the input
  pass through the dequantised k and out projections, close to float32's."""
  cfg = t5_config("tiny")
  batch, length, rank = 2, 6, 2
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (batch, length, cfg.d_model))
  bias = jnp.zeros((1, cfg.num_heads, length, length))
  mask = jnp.ones((batch, 1, length, length), bool)
  lora = {name: LoRA(down=jax.random.normal(k1, (batch, rank, n_in)) * 0.1,
                     up=jax.random.normal(k2, (batch, cfg.d_model, rank)) * 0.1)
          for name, n_in, k1, k2 in (("q", cfg.d_model, keys[1], keys[2]),
                                     ("o", cfg.inner_dim, keys[3], keys[4]))}
  attention = Attention(cfg)
  params = meta.unbox(attention.init(jax.random.key(0), x, x, bias, mask)["params"])

  @jax.jit
  def grads(p, x, lora):
    loss = lambda x, lora: jnp.sum(attention.apply({"params": p}, x, x, bias, mask, lora=lora)**2)
    return jax.grad(loss, argnums=(0, 1))(x, lora)

  ref = jax.tree.leaves(grads(params, x, lora))
  for qtype, cosine in (("int8", 0.999), ("int4", 0.9)):  # measured min 0.9999, 0.943
    got = jax.tree.leaves(grads(q.quantize_frozen(params, _all_frozen(params), qtype), x, lora))
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
      g, r = np.ravel(g), np.ravel(r)
      assert g @ r / (np.linalg.norm(g) * np.linalg.norm(r)) > cosine, qtype


def _trainer(qtype, cfg, batch_shapes):
  model = EncoderDecoderModel(HyperModel(cfg, hypernet=SharedPeft(cfg, peft_type="lora")))
  patterns = dict(trainable_patterns=(".*",), frozen_patterns=("downstream/.*",))
  tx = optimizers.make_optimizer(optax.adam(3e-2), **patterns)
  return train_lib.PartitionedTrainer(
      model, tx, partitioning.make_mesh(), partitioning.standard_logical_axis_rules(),
      batch_shapes, frozen_weights_dtype=qtype, **patterns)


def _batch(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes) + 1)
  batch = {k: jax.random.randint(key, s, 1, 128) for (k, s), key in zip(shapes.items(), keys)}
  batch["decoder_target_tokens"] = jax.random.randint(keys[-1], shapes["decoder_input_tokens"],
                                                      1, 128)
  batch["decoder_loss_weights"] = jnp.ones(shapes["decoder_input_tokens"], jnp.float32)
  return batch


def test_training_updates_lora_and_keeps_no_float_copy_of_the_weights():
  """A few train steps over int4 frozen weights: the loss goes down, LoRA changes, the
  quantised weights stay bit for bit. XLA's temporaries match float32's: the backward pass
  dequantises again (`quantization.dot` is rematerialised) instead of saving every layer's
  float weight."""
  cfg = t5_config("tiny", vocab_size=128, d_model=128, d_ff=512, d_kv=32)
  shapes = {"encoder_input_tokens": (4, 8), "decoder_input_tokens": (4, 4),
            "hyper_encoder_input_tokens": (4, 1)}
  batch, rng = _batch(shapes), jax.random.key(1)
  sizes, steps, params = {}, {}, None
  for qtype in (None, "int4"):
    trainer = _trainer(qtype, cfg, shapes)
    params = trainer.init_params(jax.random.key(0)) if params is None else params
    state = trainer.create_state(params)
    fn = functools.partial(train_lib.train_step, trainer.model, trainer.tx,
                           trainable=trainer.trainable)
    with partitioning.axis_rules_and_mesh(trainer.mesh, trainer.rules):
      steps[qtype] = jax.jit(fn).lower(state, batch, rng).compile()
    mem = steps[qtype].memory_analysis()
    sizes[qtype] = (mem.argument_size_in_bytes, mem.temp_size_in_bytes,
                    q.nbytes(_matmul_weights(state.params["downstream"])))
  float_weights = sizes[None][2]
  assert sizes["int4"][2] < 0.15 * float_weights
  assert sizes["int4"][0] < sizes[None][0] - 0.8 * float_weights  # the state itself
  assert sizes["int4"][1] < sizes[None][1] + 0.1 * float_weights, sizes

  frozen = _matmul_weights(state.params["downstream"])
  assert frozen and all(isinstance(w, q.QuantizedWeight) for w in frozen.values())
  before = jax.device_get((frozen, state.params["hypernet"]))
  losses = []
  for _ in range(4):
    state, metrics = steps["int4"](state, batch, rng)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  after = jax.device_get((_matmul_weights(state.params["downstream"]), state.params["hypernet"]))
  jax.tree.map(np.testing.assert_array_equal, after[0], before[0])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[1]),
                                                       jax.tree.leaves(before[1])))


def test_quantised_shardings_keep_the_weight_spec():
  mesh = AbstractMesh((1, 4), ("data", "model"))
  shard = lambda *spec: NamedSharding(mesh, P(*spec))
  params = {"wi": jax.ShapeDtypeStruct((64, 256), jnp.float32),
            "wo": jax.ShapeDtypeStruct((128, 64), jnp.float32),
            "scale": jax.ShapeDtypeStruct((64,), jnp.float32)}
  shardings = {"wi": shard(None, "model"), "wo": shard("model", None), "scale": shard()}
  out = q.quantized_shardings(shardings, params, _all_frozen(params), "int4")
  assert out["scale"] is shardings["scale"]
  # wi: codes [64, 128] and scales [64, 4] stay split over 'model'.
  assert out["wi"].qvalue.spec == P(None, "model") and out["wi"].scale.spec == P(None, "model")
  # wo: the last axis holds 32 packed bytes and one scale, unsplit; axis 0 stays split.
  assert out["wo"].qvalue.spec == P("model", None) and out["wo"].scale.spec == P("model", None)
  # 8-way 'model': wi's 4 scale columns cannot be split and are replicated, its codes are not.
  wide = NamedSharding(AbstractMesh((1, 8), ("data", "model")), P(None, "model"))
  wi = q.quantized_shardings({"wi": wide}, {"wi": params["wi"]}, {"wi": False}, "int8")["wi"]
  assert wi.qvalue.spec == P(None, "model") and wi.scale.spec == P(None, None)


def test_bad_dtype_is_one_line_naming_the_field():
  with pytest.raises(ValueError, match="frozen_weights_dtype must be None or one of"):
    q.check_dtype("int2")
  with pytest.raises(ValueError, match="last axis"):
    q.quantize(jnp.ones((4, 3)), "int4")


def test_gin_switch_reaches_the_trainer(tmp_path, monkeypatch):
  """`train.frozen_weights_dtype` from a gin binding over a quickstart run file: the trainer that
  `train()` builds holds the frozen encoder's matmul weights as int4, the decoder in float32.
  (Stopped before the first compile; the train step itself is the test above.)"""
  from hypertune import trainer  # pylint: disable=g-import-not-at-top
  built = []

  def stop(partitioned, *args, **kwargs):
    built.append(partitioned)
    raise InterruptedError

  monkeypatch.setattr(trainer, "initial_state", stop)
  bindings = ["config.t5_config.size = 'tiny'", "BATCH_SIZE = 4", "EVAL_PERIOD = 0",
              "TRAIN_STEPS = 1", "TASK_FEATURE_LENGTHS = {'hyper_inputs': 1, 'inputs': 8, "
              "'targets': 4}", "train.frozen_patterns = ['downstream/encoder/.*']",
              "train.frozen_weights_dtype = 'int4'", f"MODEL_DIR = '{tmp_path}'"]
  with pytest.raises(InterruptedError):
    gin_training.train(["quickstart/1_downstream.gin"], bindings)
  assert built[0].frozen_weights_dtype == "int4"
  shardings = flatten_dict(built[0].state_shardings.params, sep="/")
  quantised = sorted(k for k, v in shardings.items() if isinstance(v, q.QuantizedWeight))
  # 2 layers x (q, k, v, o, wi_0, wi_1, wo) of the encoder.
  assert len(quantised) == 14 and all(k.startswith("downstream/encoder/") for k in quantised)
  with pytest.raises(ValueError, match="frozen_weights_dtype"):
    gin_training.train(["quickstart/1_downstream.gin"],
                       bindings[:-2] + ["train.frozen_weights_dtype = 'int3'", bindings[-1]])
