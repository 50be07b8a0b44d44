"""HyperT5 and the shared-PEFT baseline produce PEFT parameters that fit the downstream model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from hypertune import optimizers
from hypertune.hypernets.hypert5 import HyperT5, downstream_source, init_from_downstream
from hypertune.hypernets.shared_peft import SharedPeft
from hypertune.models.config import t5_config
from hypertune.models.hypermodel import HyperModel
from hypertune.models.layers import RelativePositionBias

CFG = t5_config("tiny", vocab_size=64, d_model=32, d_kv=8, num_heads=4)  # inner 32, 2+2 layers
HYPER = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]])
ENC = np.array([[5, 6, 1], [7, 8, 1]])
DEC = np.array([[0, 3, 4], [0, 5, 1]])


def build(hypernet):
  model = HyperModel(CFG, hypernet=hypernet)
  # Jitted: one compilation instead of eager per-op dispatch (17 s -> 7 s for tiny HyperT5).
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), ENC, DEC, HYPER)["params"])
  return model, params


def peft_of(model, params, hyper=HYPER):
  return model.apply({"params": params}, jnp.asarray(hyper), method=HyperModel.generate_peft)


def test_hypert5_prefix_shapes_and_per_example_output():
  model, params = build(HyperT5(CFG, CFG, peft_type="prefix", prefix_len=3,
                                num_hyper_decoder_layers=1))
  assert params["hypernet"]["decoder_tokens"].shape == (6, CFG.d_model)  # 2P learned tokens
  assert set(params["hypernet"]) == {"token_embedder", "hyper_encoder", "hyper_decoder",
                                     "decoder_tokens", "enc_k_head", "enc_v_head", "dec_k_head",
                                     "dec_v_head"}
  peft = peft_of(model, params)
  assert peft.prefixes["encoder_self"].key.shape == (2, 2, 3, 4, 8)
  assert peft.prefixes["decoder_self"] is peft.prefixes["decoder_cross"]
  peft.validate(CFG, 2)
  k = np.asarray(peft.prefixes["encoder_self"].key)
  assert np.abs(k[0] - k[1]).max() > 1e-4  # different demonstrations, different prefixes


def test_hypert5_separate_cross_prefixes():
  model, params = build(HyperT5(CFG, CFG, peft_type="prefix", prefix_len=3,
                                num_hyper_decoder_layers=1, separate_cross_prefixes=True))
  hyper = params["hypernet"]
  assert hyper["decoder_tokens"].shape == (9, CFG.d_model)  # 3P learned tokens
  assert {"cross_k_head", "cross_v_head"} <= set(hyper)
  peft = peft_of(model, params)
  peft.validate(CFG, 2)
  for kind in ("encoder_self", "decoder_self", "decoder_cross"):
    for kv in (peft.prefixes[kind].key, peft.prefixes[kind].value):
      assert kv.shape == (2, 2, 3, 4, 8)  # [batch, layers, prefix_len, heads, head_dim]
  self_, cross = peft.prefixes["decoder_self"], peft.prefixes["decoder_cross"]
  assert np.abs(np.asarray(cross.key) - np.asarray(self_.key)).max() > 1e-4
  assert np.abs(np.asarray(cross.value) - np.asarray(self_.value)).max() > 1e-4
  # The downstream forward pass reads them: sharing the self prefixes instead changes its output.
  out = np.asarray(model.apply({"params": params}, ENC, DEC, HYPER))
  shared = peft.replace(prefixes={**peft.prefixes, "decoder_cross": self_})
  out_shared = np.asarray(model.apply({"params": params}, ENC, DEC, peft=shared))
  assert np.isfinite(out).all() and np.abs(out - out_shared).max() > 1e-4
  with pytest.raises(ValueError, match="separate_cross_prefixes needs peft_type='prefix'"):
    build(HyperT5(CFG, CFG, peft_type="lora", separate_cross_prefixes=True))


def _relpos_biases(hypernet):
  """(hyper decoder bias `[1, heads, 2P, 2P]`, downstream decoder bias `[1, heads, dec, dec]`,
  their shared table) with the hyper decoder initialised from the downstream one."""
  model, params = build(hypernet)
  params = {**params, "hypernet": init_from_downstream(params["hypernet"], params["downstream"])}
  _, state = model.apply(
      {"params": params}, ENC, DEC, HYPER, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: isinstance(mdl, RelativePositionBias))
  got = state["intermediates"]
  return (np.asarray(got["hypernet"]["hyper_decoder"]["relpos_bias"]["__call__"][0]),
          np.asarray(got["downstream"]["decoder"]["relpos_bias"]["__call__"][0]),
          params["downstream"]["decoder"]["relpos_bias"]["rel_embedding"])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_hyper_decoder_relative_position_buckets(bidirectional):
  """Default: the copied causal-decoder table is read one-way, as it was trained; the option
  reads it with the encoder's bidirectional buckets."""
  hyper, causal, table = _relpos_biases(HyperT5(
      CFG, CFG, prefix_len=3, hyper_decoder_bidirectional_positions=bidirectional))
  n, m = hyper.shape[-1], causal.shape[-1]
  bias = lambda two_way: np.asarray(RelativePositionBias(CFG, bidirectional=two_way).apply(
      {"params": {"rel_embedding": table}}, n, n))
  seen = np.tril(np.ones((n, n), bool))  # i >= j: what the causal decoder attends to
  past = lambda b: b[..., :m, :m][..., seen[:m, :m]]  # [1, heads, m (m + 1) / 2]
  np.testing.assert_array_equal(past(causal), past(bias(False)))
  if not bidirectional:
    np.testing.assert_array_equal(hyper, bias(False))
    np.testing.assert_array_equal(past(hyper), past(causal))
  else:
    np.testing.assert_array_equal(hyper, bias(True))
    # Tiny config (8 buckets): distances >= 2 back already fall in other buckets.
    assert np.abs(hyper[..., seen] - bias(False)[..., seen]).max() > 1e-4


def test_hypert5_lora_starts_as_the_unadapted_model():
  model, params = build(HyperT5(CFG, CFG, peft_type="lora", lora_rank=2))
  assert params["hypernet"]["decoder_tokens"].shape == (3 * CFG.num_encoder_layers, CFG.d_model)
  peft = peft_of(model, params)
  assert set(peft.lora) == {f"{k}/{p}" for k in ("encoder_self", "decoder_self",
                                                  "decoder_cross") for p in "qv"}
  peft.validate(CFG, 2)
  with_peft = model.apply({"params": params}, ENC, DEC, HYPER)
  plain = HyperModel(CFG).apply({"params": {"downstream": params["downstream"]}}, ENC, DEC)
  np.testing.assert_allclose(with_peft, plain, atol=1e-5)  # tanh(0) gates: zero deltas


def test_init_from_downstream_copies_encoder_and_truncated_decoder():
  model, params = build(HyperT5(CFG, CFG, peft_type="prefix", prefix_len=2,
                                num_hyper_decoder_layers=1))
  hyper = init_from_downstream(params["hypernet"], params["downstream"])
  down = params["downstream"]
  np.testing.assert_array_equal(hyper["hyper_encoder"]["layers"]["attention"]["query"],
                                down["encoder"]["layers"]["attention"]["query"])
  np.testing.assert_array_equal(hyper["hyper_decoder"]["layers"]["mlp"]["wo"],
                                down["decoder"]["layers"]["mlp"]["wo"][:1])
  np.testing.assert_array_equal(hyper["decoder_tokens"], params["hypernet"]["decoder_tokens"])
  # downstream_source (the training log's "copy of ...") names exactly what was copied.
  before = optimizers.param_paths({"hypernet": params["hypernet"]})
  after = optimizers.param_paths({"hypernet": hyper})
  flat_down = optimizers.param_paths({"downstream": down})
  for path, value in after.items():
    src = downstream_source(path)
    if src is None:
      np.testing.assert_array_equal(value, before[path])
    else:
      np.testing.assert_array_equal(value, np.asarray(flat_down[src])[:np.shape(value)[0]])
  assert downstream_source("hypernet/decoder_tokens") is None
  assert downstream_source("hypernet/hyper_encoder/layers/mlp/wo") == \
      "downstream/encoder/layers/mlp/wo"


@pytest.mark.parametrize("peft_type", ["prefix", "lora"])
def test_shared_peft_is_the_same_for_every_example(peft_type):
  model, params = build(SharedPeft(CFG, peft_type=peft_type, prefix_len=2, lora_rank=2))
  peft = peft_of(model, params)
  peft.validate(CFG, 2)
  for leaf in jax.tree.leaves(peft):
    np.testing.assert_array_equal(leaf[0], leaf[1])


def test_peft_files_roundtrip(tmp_path):
  from hypertune.models import peft as peft_lib
  model, params = build(HyperT5(CFG, CFG, peft_type="lora", lora_rank=2))
  peft = peft_of(model, params).replace(lora={
      k: v.replace(scale=0.5) for k, v in peft_of(model, params).lora.items()})
  peft_lib.save(str(tmp_path), peft, {"note": "test"})
  loaded, meta = peft_lib.load(str(tmp_path))
  assert meta["note"] == "test" and loaded.lora["decoder_cross/v"].scale == 0.5
  jax.tree.map(np.testing.assert_array_equal, loaded, peft)
  with pytest.raises(ValueError, match="unknown tensor 'bogus/x'"):
    peft_lib.from_arrays({"bogus/x": np.zeros(1)}, {})
