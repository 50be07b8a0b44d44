"""Per-example PEFT semantics, scan vs unrolled, decoding vs teacher forcing, error messages."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from hypertune.models import decoding, hf_convert, layers
from hypertune.models import t5 as t5_lib
from hypertune.models.config import t5_config
from hypertune.models.layers import Attention
from hypertune.models.peft import Adapter, LoRA, PeftParams, PeftShapeError, Prefix
from hypertune.models.t5 import T5, Decoder

CFG = t5_config("tiny", vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=3)  # inner_dim 32, unequal depths
ENC = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 11, 12, 13, 1]])
DEC = np.array([[0, 3, 4, 5], [0, 6, 7, 1]])
B = len(ENC)


@pytest.fixture(scope="module")
def model_and_params():
  model = T5(CFG)
  params = meta.unbox(model.init(jax.random.key(0), ENC, DEC)["params"])
  return model, params


def rand(key, shape, scale=0.5):
  return scale * jax.random.normal(jax.random.key(key), shape)


def full_peft(batch=B, seed=0, prefix_len=3, rank=2, bottleneck=5, memory_len=2):
  """Every kind of PEFT, different for every example."""
  h, k, d = CFG.num_heads, CFG.d_kv, CFG.d_model
  n = {"encoder_self": 2, "decoder_self": 3, "decoder_cross": 3}
  prefixes = {kind: Prefix(rand(seed + i, (batch, L, prefix_len, h, k)),
                           rand(seed + 10 + i, (batch, L, prefix_len, h, k)))
              for i, (kind, L) in enumerate(n.items())}
  lora = {}
  for i, (kind, L) in enumerate(n.items()):
    for j, proj in enumerate("qkvo"):
      lora[f"{kind}/{proj}"] = LoRA(rand(100 + 4 * i + j, (batch, L, rank, d)),
                                    rand(200 + 4 * i + j, (batch, L, d, rank)), scale=2.0)
  adapters = {"encoder": Adapter(rand(300, (batch, 2, bottleneck, d)),
                                 rand(301, (batch, 2, d, bottleneck))),
              "decoder": Adapter(rand(302, (batch, 3, bottleneck, d)),
                                 rand(303, (batch, 3, d, bottleneck)))}
  return PeftParams(prefixes=prefixes, lora=lora, adapters=adapters,
                    extra_memory=rand(400, (batch, memory_len, d)),
                    extra_memory_mask=jnp.ones((batch, memory_len), bool).at[0, 1].set(False))


def equations(jaxpr, name: str):
  """The equations of primitive `name` in a jaxpr, sub-jaxprs (scan, while, jit) included."""
  yield from (eqn for eqn in jaxpr.eqns if eqn.primitive.name == name)
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from equations(sub, name)


def count_primitive(jaxpr, name: str) -> int:
  return sum(1 for _ in equations(jaxpr, name))


def logits(model, params, peft=None, enc=ENC, dec=DEC):
  return np.asarray(model.apply({"params": params}, enc, dec, peft))


def test_every_peft_kind_changes_the_output(model_and_params):
  model, params = model_and_params
  base = logits(model, params)
  peft = full_peft()
  for part in ("prefixes", "lora", "adapters"):
    only = PeftParams(**{part: getattr(peft, part)})
    assert np.abs(logits(model, params, only) - base).max() > 1e-3, part
  memory = PeftParams(extra_memory=peft.extra_memory, extra_memory_mask=peft.extra_memory_mask)
  assert np.abs(logits(model, params, memory) - base).max() > 1e-3


def test_zero_lora_and_adapters_change_nothing(model_and_params):
  model, params = model_and_params
  peft = full_peft()
  zero = PeftParams(
      lora={k: LoRA(v.down, jnp.zeros_like(v.up), v.scale) for k, v in peft.lora.items()},
      adapters={k: Adapter(v.down, jnp.zeros_like(v.up)) for k, v in peft.adapters.items()})
  np.testing.assert_allclose(logits(model, params, zero), logits(model, params), atol=1e-5)


def test_masked_extra_memory_changes_nothing(model_and_params):
  model, params = model_and_params
  peft = full_peft()
  masked = PeftParams(extra_memory=peft.extra_memory,
                      extra_memory_mask=jnp.zeros_like(peft.extra_memory_mask))
  np.testing.assert_allclose(logits(model, params, masked), logits(model, params), atol=1e-5)


def test_vanishing_prefix_changes_nothing():
  """Queries whose head_dim 0 is always 1 and prefix keys of -1e4 there: zero prefix weight."""
  cfg = CFG
  attn = Attention(cfg)
  x = jax.random.normal(jax.random.key(1), (B, 5, cfg.d_model)).at[..., 0].set(1.0)
  bias = jnp.zeros((1, cfg.num_heads, 5, 5))
  mask = jnp.ones((B, 1, 1, 5), bool).at[0, ..., -1].set(False)
  params = meta.unbox(attn.init(jax.random.key(0), x, x, bias, mask)["params"])
  wq = params["query"].at[:, :, 0].set(0.0).at[0, :, 0].set(1.0)  # q[..., h, 0] = x[..., 0] = 1
  params = dict(params, query=wq)
  key = jnp.zeros((B, 3, cfg.num_heads, cfg.d_kv)).at[..., 0].set(-1e4)
  prefix = Prefix(key, rand(5, key.shape))
  with_prefix = attn.apply({"params": params}, x, x, bias, mask, prefix)
  without = attn.apply({"params": params}, x, x, bias, mask)
  np.testing.assert_allclose(with_prefix, without, atol=1e-5)
  visible = Prefix(jnp.zeros_like(key), prefix.value)  # a visible prefix does change it
  assert np.abs(attn.apply({"params": params}, x, x, bias, mask, visible) - without).max() > 1e-3


def test_examples_do_not_leak_into_each_other(model_and_params):
  """A batch of 2 with different PEFT parameters equals two batches of 1."""
  model, params = model_and_params
  peft = full_peft()
  together = logits(model, params, peft)
  for i in range(B):
    row = jax.tree.map(lambda a: a[i:i + 1], peft)
    alone = logits(model, params, row, ENC[i:i + 1], DEC[i:i + 1])
    np.testing.assert_allclose(together[i:i + 1], alone, atol=1e-5)


def test_unmasked_decoder_reads_the_position_table_one_way_by_default():
  """One layer: the last query sees every key whether masked or not, so an unmasked decoder with
  the causal decoder's one-way buckets gives the causal decoder's output there."""
  cfg = CFG.replace(num_decoder_layers=1)
  x, enc = rand(1, (B, 5, CFG.d_model)), rand(2, (B, 4, CFG.d_model))
  enc_mask = jnp.ones((B, 4), bool)
  params = meta.unbox(Decoder(cfg).init(jax.random.key(0), x, enc, enc_mask))
  out = lambda **kw: np.asarray(Decoder(cfg, **kw).apply(params, x, enc, enc_mask))
  causal, unmasked = out(), out(causal=False)
  np.testing.assert_allclose(unmasked[:, -1], causal[:, -1], atol=1e-5)
  assert np.abs(unmasked[:, :-1] - causal[:, :-1]).max() > 1e-3  # the mask is gone
  # Bidirectional buckets (8 in CFG: keys >= 2 back move) change even the last position.
  two_way = out(causal=False, bidirectional_positions=True)
  assert np.abs(two_way[:, -1] - causal[:, -1]).max() > 1e-3


def test_scan_and_unrolled_are_identical(model_and_params, tmp_path):
  model, params = model_and_params
  hf_convert.save_hf_t5(str(tmp_path), CFG, params)
  _, unrolled_params = hf_convert.load_hf_t5(str(tmp_path), config=CFG.replace(scan_layers=False))
  assert "layers_2" in unrolled_params["decoder"]
  unrolled = T5(CFG.replace(scan_layers=False))
  peft = full_peft()
  np.testing.assert_allclose(logits(unrolled, unrolled_params, peft), logits(model, params, peft),
                             atol=1e-5)
  # and the unrolled init has the same parameter tree as the converted one
  init_tree = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), ENC, DEC))["params"]
  assert (jax.tree.structure(meta.unbox(init_tree)) == jax.tree.structure(unrolled_params))


@pytest.mark.parametrize("policy", ["full", "dense"])
def test_remat_gives_same_gradients(model_and_params, policy):
  """Both remat policies compute the gradients of no remat; "full" recomputes the dense
  projections in the backward pass, "dense" keeps them."""
  model, params = model_and_params
  remat = T5(CFG.replace(remat=True, remat_policy=policy))
  peft = full_peft()

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, ENC, DEC, peft) ** 2)
  g1 = jax.jit(jax.grad(loss(model)))(params)
  g2 = jax.jit(jax.grad(loss(remat)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)
  # Matmuls recomputed in the scanned layer bodies, without PEFT: the attention's two in each
  # of 3 attentions (encoder self; decoder self, cross), and for "full" dense projections too.
  dots = lambda m: count_primitive(jax.make_jaxpr(jax.grad(  # noqa: E731
      lambda p: jnp.mean(m.apply({"params": p}, ENC, DEC) ** 2)))(params).jaxpr, "dot_general")
  recomputed = dots(remat) - dots(model)
  assert (recomputed == 6) if policy == "dense" else (recomputed > 6 + 7 + 7)
  with pytest.raises(ValueError, match="remat_policy must be 'full' or 'dense'"):
    CFG.replace(remat_policy="some")


def test_greedy_decoding_with_peft_agrees_with_teacher_forcing(model_and_params):
  """The cached decode path (prefixes, LoRA, adapters, memory) equals full recomputation."""
  model, params = model_and_params
  peft = full_peft()
  max_len = 6
  tokens = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(ENC), peft,
                                             max_decode_len=max_len))
  dec_in = np.concatenate([np.zeros((B, 1), int), tokens[:, :-1]], axis=1)
  forced = logits(model, params, peft, ENC, dec_in).argmax(-1)
  for row, ref in zip(tokens, forced):
    n = list(row).index(1) + 1 if 1 in row else max_len
    assert list(row[:n]) == list(ref[:n])


def test_beam_search_best_is_at_least_greedy(model_and_params):
  model, params = model_and_params
  peft = full_peft()
  greedy = jnp.asarray(decoding.greedy_decode(model, params, jnp.asarray(ENC), peft,
                                              max_decode_len=5))
  seqs, scores = decoding.beam_search(model, params, jnp.asarray(ENC), peft, max_decode_len=5,
                                      num_beams=3)
  assert seqs.shape == (B, 3, 5) and np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)

  def normalized_score(t):
    dec_in = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), t[:, :-1]], axis=1)
    total, _ = decoding.token_log_likelihood(model, params, jnp.asarray(ENC), dec_in, t, peft)
    length = jnp.sum(t != 0, axis=1)  # generated tokens incl. EOS (no token id 0 appears)
    return total / length
  assert np.all(np.asarray(scores[:, 0]) >= np.asarray(normalized_score(greedy)) - 1e-4)
  np.testing.assert_allclose(scores[:, 0], normalized_score(seqs[:, 0]), atol=1e-4)


def test_unrolled_decoding_of_a_scanned_model_decodes_the_same(model_and_params):
  """`unrolled_decoding` reads the same stacked parameters (unstacked once) and decodes the same
  greedy tokens and beams, with every kind of PEFT."""
  model, params = model_and_params
  unrolled = T5(CFG.replace(unrolled_decoding=True))
  peft, enc = full_peft(), jnp.asarray(ENC)
  np.testing.assert_array_equal(
      decoding.greedy_decode(unrolled, params, enc, peft, max_decode_len=6),
      decoding.greedy_decode(model, params, enc, peft, max_decode_len=6))
  for got, want in zip(decoding.beam_search(unrolled, params, enc, peft, max_decode_len=5,
                                            num_beams=3),
                       decoding.beam_search(model, params, enc, peft, max_decode_len=5,
                                            num_beams=3)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  scans = lambda m: count_primitive(jax.make_jaxpr(  # noqa: E731
      lambda p: decoding.greedy_decode(m, p, enc, max_decode_len=3))(params).jaxpr, "scan")
  assert scans(unrolled) == 1 and scans(model) == 3  # the encoder's; + first step, loop body
  unstacked = t5_lib.unstack_decoder_layers(params)["decoder"]
  assert "layers" not in unstacked and unstacked["layers_2"]["mlp"]["wo"].shape == (
      CFG.d_ff, CFG.d_model)


def test_token_log_likelihood_sum_and_mean(model_and_params):
  model, params = model_and_params
  targets = np.array([[3, 4, 5, 1], [6, 7, 1, 0]])
  dec_in = np.array([[0, 3, 4, 5], [0, 6, 7, 1]])
  total, mean = decoding.token_log_likelihood(model, params, ENC, dec_in, targets)
  lp = jax.nn.log_softmax(logits(model, params, None, ENC, dec_in))
  expected = [sum(lp[b, t, targets[b, t]] for t in range(4) if targets[b, t]) for b in range(B)]
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(mean, np.array(expected) / np.array([4, 3]), rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32(model_and_params):
  model, params = model_and_params
  bf16 = T5(CFG.replace(dtype="bfloat16"))
  out = logits(bf16, params)
  assert out.dtype == np.float32
  assert np.abs(out - logits(model, params)).max() < 0.1 * np.abs(logits(model, params)).max()


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.replace(prefixes={"encoder_self": Prefix(
        jnp.zeros((B, 2, 3, 4, 7)), jnp.zeros((B, 2, 3, 4, 8)))}),
     r"prefixes\['encoder_self'\]\.key has shape \(2, 2, 3, 4, 7\); expected \(2, 2, 3, 4, 8\)"),
    (lambda p: p.replace(lora={"decoder_cross/v": LoRA(jnp.zeros((B, 3, 2, 31)),
                                                       jnp.zeros((B, 3, 32, 2)))}),
     r"lora\['decoder_cross/v'\]\.down has shape \(2, 3, 2, 31\); expected \(2, 3, 2, 32\)"),
    (lambda p: p.replace(adapters={"decoder": Adapter(jnp.zeros((B, 2, 5, 32)),
                                                      jnp.zeros((B, 2, 32, 5)))}),
     r"adapters\['decoder'\]\.down has shape \(2, 2, 5, 32\); expected \(2, 3, 5, 32\)"),
    (lambda p: p.replace(lora={"encoder_self/x": LoRA(jnp.zeros(1), jnp.zeros(1))}),
     r"lora\['encoder_self/x'\]"),
])
def test_wrong_peft_shape_is_named(model_and_params, mutate, message):
  model, params = model_and_params
  with pytest.raises(PeftShapeError, match=message):
    jax.jit(lambda p, peft: model.apply({"params": p}, ENC, DEC, peft))(params,
                                                                        mutate(PeftParams()))


def test_params_carry_logical_axes():
  boxed = T5(CFG).init(jax.random.key(0), ENC, DEC)["params"]
  q = boxed["encoder"]["layers"]["attention"]["query"]
  assert q.names == ("layers", "embed", "heads", "kv")
  assert boxed["token_embedder"]["embedding"].names == ("vocab", "embed")
  assert boxed["decoder"]["layers"]["mlp"]["wi_0"].names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("spec,x_ndim,expected", [
    ("btd,dhk->bthk", 3, 1), ("bqhk,hkd->bqd", 4, 2), ("btf,fd->btd", 3, 1),
    ("bhqk,hkd->bqd", 4, None), ("btd,bad->bta", 3, None), ("bqhk,bshk->bhqs", 4, None),
    ("...d,dv->...v", 2, None)])
def test_dense_projections_are_recognised(spec, x_ndim, expected):
  """layers.dot runs these as one 2-D matmul (the weight gradient XLA:CPU runs fastest)."""
  assert layers._dense_split(spec, x_ndim) == expected


def test_dense_dot_equals_einsum():
  x, w = rand(0, (2, 3, 4, 5)), rand(1, (4, 5, 6))
  np.testing.assert_allclose(layers.dot("bqhk,hkd->bqd", x, w, jnp.float32),
                             jnp.einsum("bqhk,hkd->bqd", x, w), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.dot("bqhk,hkd->bqd", x, w, jnp.float32))),
                   (0, 1))(x, w)
  expected = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("bqhk,hkd->bqd", x, w))),
                      (0, 1))(x, w)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_shape", [(1, 2, 4, 5), (3, 2, 4, 5), (1, 2, 1, 5)])
def test_position_bias_gradient_sums_the_broadcast_axes(bias_shape):
  logits, bias = rand(0, (3, 2, 4, 5)), rand(1, bias_shape)
  f = lambda l, b: jnp.sum(jnp.sin(layers.add_position_bias(l, b)))  # noqa: E731
  g = lambda l, b: jnp.sum(jnp.sin(l + b))  # noqa: E731
  for got, want in zip(jax.grad(f, (0, 1))(logits, bias), jax.grad(g, (0, 1))(logits, bias)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_multiplies_in_bfloat16(model_and_params):
  """Every matmul of a bfloat16 T5 (logits, gated-GELU inputs, attention scores included) takes
  bfloat16 operands; float32 is only its accumulation."""
  model, params = model_and_params
  bf16 = T5(CFG.replace(dtype="bfloat16"))
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, ENC, DEC))(params)
  found = list(equations(jaxpr.jaxpr, "dot_general"))
  assert len(found) > 10
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn


def test_bf16_transposed_copies_keep_the_gradients(model_and_params):
  """With `bf16_transposed_copies` a bf16 T5 computes the same logits and the same gradients (bf16
  rounding apart), and the backward of every dense projection multiplies two row-major copies
  (each behind an optimization barrier), not transposed operands."""
  model, params = model_and_params
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ENC, DEC) ** 2)  # noqa: E731
  plain = T5(CFG.replace(dtype="bfloat16"))
  copies = T5(CFG.replace(dtype="bfloat16", bf16_transposed_copies=True))
  np.testing.assert_array_equal(logits(copies, params), logits(plain, params))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(copies))(params)),
                  jax.tree.leaves(jax.grad(loss(plain))(params))):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * np.abs(b).max())

  # the scanned layer bodies: 4 attention projections and 3 MLP matmuls (encoder), 8 + 3
  # (decoder); the logits
  dense = 7 + 11 + 1
  grad_jaxpr = lambda m: jax.make_jaxpr(jax.grad(loss(m)))(params).jaxpr  # noqa: E731
  assert count_primitive(grad_jaxpr(copies), "optimization_barrier") == 2 * dense
  assert count_primitive(grad_jaxpr(plain), "optimization_barrier") == 0


def test_scan_unroll_keeps_parameters_logits_and_decoding(model_and_params):
  """scan_unroll=2 (3 decoder layers: one full iteration and a remainder) reads the same stacked
  parameters and computes the same logits, gradients and greedy decode."""
  model, params = model_and_params
  unrolled2 = T5(CFG.replace(scan_unroll=2))
  shapes = jax.eval_shape(lambda: unrolled2.init(jax.random.key(0), ENC, DEC))["params"]
  assert jax.tree.structure(meta.unbox(shapes)) == jax.tree.structure(params)
  peft = full_peft()
  np.testing.assert_allclose(logits(unrolled2, params, peft), logits(model, params, peft),
                             atol=1e-5)
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ENC, DEC, peft) ** 2)  # noqa: E731
  for a, b in zip(jax.tree.leaves(jax.grad(loss(unrolled2))(params)),
                  jax.tree.leaves(jax.grad(loss(model))(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(decoding.greedy_decode(unrolled2, params, ENC, max_decode_len=5),
                                decoding.greedy_decode(model, params, ENC, max_decode_len=5))
  with pytest.raises(ValueError, match="scan_unroll must be >= 1"):
    CFG.replace(scan_unroll=0)
