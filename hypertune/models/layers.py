"""T5 building blocks: RMS norm, relative position bias, the one attention, the feed-forward block.

Parameters carry logical axis names in t5x's vocabulary (`embed`, `mlp`, `heads`, `kv`, `vocab`,
`relpos_buckets`) so partitioning is a rule table (see `hypertune.partitioning`).
Matmuls accumulate in float32 (`preferred_element_type`): on jax 0.10 a bf16 x bf16 matmul is only
fast that way, and it keeps float32 and bfloat16 compute on one code path.
"""
import functools
import math
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hypertune.models import peft as peft_lib
from hypertune.models import quantization
from hypertune.models.config import T5Config

NEG_INF = -1e10  # added to masked attention logits (finite, so fully masked rows stay finite)
DENSE_OUTPUT = "dense_output"  # jax.ad_checkpoint name of every dense projection's output


def dot(spec: str, x, w, dtype, result_dtype=None, transposed_copies: bool = False):
  """einsum of operands cast to the compute `dtype`, with float32 accumulation, the result cast
  to `result_dtype` (default: `dtype`; float32 where a softmax or GELU follows). A frozen weight
  stored quantised (`quantization.QuantizedWeight`) is dequantised in the matmul.

  A dense projection (x's trailing axes contracted with w's leading ones, e.g. "btd,dhk->bthk")
  runs as one 2-D matmul `[tokens, in] @ [in, out]`: its weight gradient is then a matmul with
  one contracting axis, which XLA:CPU runs without the transposed copies of the activations it
  builds for several contracting axes (about 1 s of a 4.7 s scanned t5-small step in a profile of
  bench/t5_step.py; docs/performance.md). The reshapes are free on every backend.

  `transposed_copies` (bfloat16 dense projections; `T5Config.bf16_transposed_copies`): the
  backward's two matmuls read copies of their transposed operands (see `_matmul_bf16_backward`).
  """
  result_dtype = dtype if result_dtype is None else result_dtype
  if quantization.is_quantized(w):
    return quantization.dot(spec, x, w, dtype, result_dtype)
  x, w = x.astype(dtype), w.astype(dtype)
  dense = _dense_split(spec, x.ndim)
  if dense is None:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(result_dtype)
  lead, contracted = x.shape[:x.ndim - dense], x.shape[x.ndim - dense:]
  out = w.shape[dense:]
  x, w = x.reshape(-1, math.prod(contracted)), w.reshape(math.prod(contracted), -1)
  if transposed_copies and dtype == jnp.bfloat16:
    y = _matmul_bf16_backward(x, w)
  else:
    y = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  # Named, so that a remat policy can keep it (T5Config.remat_policy="dense").
  return checkpoint_name(y.reshape(lead + out).astype(result_dtype), DENSE_OUTPUT)


@jax.custom_vjp
def _matmul_bf16_backward(x, w):
  """`x @ w` for bfloat16 `x [m, k]`, `w [k, n]`, float32 result, whose backward multiplies
  `g @ w.T` and `x.T @ g` with bfloat16 operands `[m, n] @ [n, k]`, `[k, m] @ [m, n]` copied
  into row-major order. XLA:CPU runs a bf16 matmul natively only in that form; for a transposed
  operand it converts both operands to float32 and runs at about half the speed
  (bench/xla_cpu_ops.py). GPUs and TPUs read transposed operands natively: they need no copies."""
  return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _matmul_bf16_backward_fwd(x, w):
  return _matmul_bf16_backward(x, w), (x, w)


def _matmul_bf16_backward_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)  # bf16 gradients into the matmuls, as PyTorch's autocast
  dx = jnp.matmul(g, _row_major_transpose(w), preferred_element_type=jnp.float32)
  dw = jnp.matmul(_row_major_transpose(x), g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_bf16_backward.defvjp(_matmul_bf16_backward_fwd, _matmul_bf16_backward_bwd)


def _row_major_transpose(a):
  """`a.T` `[n, m]` as a row-major copy. XLA would otherwise give the transpose a column-major
  layout (no copy) that the matmul reads transposed: a 1-D array has one layout only, and the
  barrier keeps the reshapes from cancelling."""
  t = a.T
  return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


@functools.lru_cache(maxsize=None)
def _dense_split(spec: str, x_ndim: int) -> Optional[int]:
  """The number of contracted axes if `spec` is a dense projection (x = lead + contracted,
  w = contracted + out, result = lead + out, no axis shared by lead and w), else None."""
  inputs, result = spec.split("->")
  xs, ws = inputs.split(",")
  if "." in spec or len(xs) != x_ndim:
    return None
  for n in range(min(len(xs), len(ws)), 0, -1):
    lead, contracted, out = xs[:-n], xs[-n:], ws[n:]
    if (ws[:n] == contracted and result == lead + out and not set(lead) & set(ws)
        and len(set(xs + ws)) == len(xs) + len(out)):
      return n
  return None


def param_with_axes(module: nn.Module, name: str, init, shape, axes):
  """A float32 parameter annotated with logical axis names, or the QuantizedWeight a run stores
  in its place (for `dot`)."""
  if module.has_variable("params", name):
    stored = module.get_variable("params", name)
    if quantization.is_quantized(stored):  # 4-bit codes are packed: flax's shape check cannot see
      if stored.shape != tuple(shape):
        raise ValueError(f"{module.scope.path_text}/{name}: quantised weight of shape "
                         f"{stored.shape}, expected {tuple(shape)}")
      return stored
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucketing of `key_position - query_position` (half exact, half log-spaced)."""
  ret = 0
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = -jnp.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # max(n, 1) keeps log finite; the value is discarded where is_small.
  val_if_large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) /
      math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """Per-stack learned bias `[1, heads, q_len, k_len]`, shared by every layer of the stack."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_len: int, k_len: int, q_offset=0):
    """Bias for queries at positions `q_offset + [0, q_len)` against keys `[0, k_len)`."""
    cfg = self.config
    table = param_with_axes(
        self, "rel_embedding", nn.initializers.normal(cfg.d_model**-0.5),
        (cfg.relative_attention_num_buckets, cfg.num_heads), ("relpos_buckets", "heads"))
    context = jnp.arange(q_len)[:, None] + q_offset
    memory = jnp.arange(k_len)[None, :]
    buckets = relative_position_bucket(memory - context, self.bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    bias = jnp.take(table, buckets, axis=0)  # [q, k, heads]
    return jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)


@jax.custom_vjp
def add_position_bias(logits, bias):
  """`logits + bias`, bias broadcast over the batch: `[batch, heads, q, k] + [1, heads, q, k]`.

  Its gradient sums over the batch as a matmul with ones: XLA:CPU reduces over the leading axis
  far slower than it multiplies (bench/xla_cpu_ops.py: 16.9 ms against 0.26 ms at t5-small's
  encoder shape; once per layer of every train step)."""
  return logits + bias


def _add_position_bias_fwd(logits, bias):
  return logits + bias, bias


def _add_position_bias_bwd(bias, g):
  dbias = g
  if bias.shape[0] == 1 and g.shape[0] != 1:
    ones = jnp.ones((1, g.shape[0]), g.dtype)
    dbias = jnp.matmul(ones, g.reshape(g.shape[0], -1)).reshape((1,) + g.shape[1:])
  broadcast = tuple(i for i in range(1, g.ndim) if bias.shape[i] == 1 and g.shape[i] != 1)
  if broadcast:
    dbias = jnp.sum(dbias, axis=broadcast, keepdims=True)
  return g, dbias.astype(bias.dtype)


add_position_bias.defvjp(_add_position_bias_fwd, _add_position_bias_bwd)


class Attention(nn.Module):
  """Multi-head attention without logit scaling (T5), with optional per-example PEFT.

  - `prefix`: Prefix with key/value `[batch, prefix_len, heads, head_dim]`, prepended to the keys
    and values; every real query sees every prefix position, with no position bias.
  - `lora`: {"q"|"k"|"v"|"o": LoRA with down `[batch, rank, in]`, up `[batch, out, rank]`}.
  - `decode`: autoregressive self-attention with a key/value cache of the full decode length
    (the first call, at init, only shapes it); cross-attention (`fixed_kv`) keeps the keys/values
    of its fixed inputs in the "cross_kv" collection.
  """
  config: T5Config

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, bias, mask, prefix: Optional[peft_lib.Prefix] = None,
               lora: Optional[Mapping[str, peft_lib.LoRA]] = None, decode: bool = False,
               deterministic: bool = True, fixed_kv: bool = False):
    """inputs_q `[batch, q_len, d_model]`, inputs_kv `[batch, k_len, d_model]`,
    bias `[1|batch, heads, q_len, k_len]` float, mask `[batch, 1, q_len|1, k_len]` bool.
    `fixed_kv` (cross-attention): inputs_kv is the same at every decoding step, so with `decode`
    its keys/values (prefix included) are projected at the first step only, then read.
    Returns `[batch, q_len, d_model]`.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    dense = functools.partial(dot, transposed_copies=cfg.bf16_transposed_copies)
    lora = lora or {}
    h, dk = cfg.num_heads, cfg.d_kv
    init_q = nn.initializers.normal((cfg.d_model * dk)**-0.5)
    init_kv = nn.initializers.normal(cfg.d_model**-0.5)
    init_o = nn.initializers.normal(cfg.inner_dim**-0.5)
    wq = param_with_axes(self, "query", init_q, (cfg.d_model, h, dk), ("embed", "heads", "kv"))
    wk = param_with_axes(self, "key", init_kv, (cfg.d_model, h, dk), ("embed", "heads", "kv"))
    wv = param_with_axes(self, "value", init_kv, (cfg.d_model, h, dk), ("embed", "heads", "kv"))
    wo = param_with_axes(self, "out", init_o, (h, dk, cfg.d_model), ("heads", "kv", "embed"))

    def project(x, w, name):
      y = dense("btd,dhk->bthk", x, w, dt)
      if name in lora:  # per-example low-rank delta: scale * up_b @ down_b @ x
        lo = lora[name]
        delta = dot("btd,brd->btr", x, lo.down, dt)
        delta = dot("btr,bor->bto", delta, lo.up, dt) * lo.scale
        y = y + delta.reshape(y.shape).astype(dt)
      return y

    q = project(inputs_q, wq, "q")
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

    def keys_values():
      return _heads_major(project(inputs_kv, wk, "k"), project(inputs_kv, wv, "v"))

    if decode and fixed_kv:
      key, value = self._fixed_kv(lambda: _prepend(prefix, *keys_values(), dt))
    else:
      key, value = keys_values()
      if decode:
        key, value, mask = self._update_cache(key, value, mask)
      key, value = _prepend(prefix, key, value, dt)
    if prefix is not None:  # prefix positions: always visible, no position bias
      p = prefix.key.shape[1]
      bias = jnp.broadcast_to(bias, bias.shape[:-1] + (key.shape[-1] - p,))
      bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 0), (p, 0)])
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (p,), bool), mask], axis=-1)

    # Beam search keeps one copy of the cross-attention keys/values per example: the `group`
    # adjacent rows (beams) of an example are read as that example's queries.
    batch, group = q.shape[0], q.shape[0] // key.shape[0]
    if group > 1:
      q = q.reshape((key.shape[0], group * q.shape[1]) + q.shape[2:])
      mask = mask[::group]  # the same encoder mask for every beam, one query row
    logits = add_position_bias(dot("bqhk,bhks->bhqs", q, key, dt, jnp.float32), bias)
    logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = dot("bhqs,bhsk->bhqk", weights, value, dt)  # [batch, heads, q, kv]
    if group > 1:
      b, h_, gq, d = out.shape
      out = out.reshape(b, h_, group, gq // group, d).transpose(0, 2, 1, 3, 4).reshape(
          batch, h_, gq // group, d)
    if "o" in lora:
      lo = lora["o"]
      flat = jnp.swapaxes(out, 1, 2).reshape(out.shape[0], out.shape[2], -1)
      delta = dot("bod,brd->bor", flat, lo.down, dt)
      delta = dot("bor,bmr->bom", delta, lo.up, dt) * lo.scale
    else:
      delta = 0.0
    y = dense("bqhk,hkd->bqd", jnp.swapaxes(out, 1, 2), wo, dt) + delta
    return nn.with_logical_constraint(y.astype(dt), ("batch", "length", "embed"))

  def _update_cache(self, key, value, mask):
    """Self-attention decoding: write one token's key `[batch, heads, head_dim, 1]` and value
    `[batch, heads, 1, head_dim]` into the cache of the full decode length; returns the cached
    keys and values and the mask of the positions written so far. The init call (over the full
    length) only shapes the cache."""
    is_init = self.is_initializing() or not self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if is_init:
      return key, value, mask
    index, zero = cache_index.value, jnp.array(0, jnp.int32)
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (zero, zero, zero, index))
    value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype),
                                         (zero, zero, index, zero))
    cached_key.value, cached_value.value = key, value
    cache_index.value = index + 1
    length = key.shape[-1]
    return key, value, jnp.broadcast_to(jnp.arange(length) <= index, (key.shape[0], 1, 1, length))

  def _fixed_kv(self, compute):
    """Cross-attention keys/values while decoding: `compute()`d at the first call, when the
    "cross_kv" collection is mutable, and read from it at every later step. They are not part of
    the mutable cache, so a step neither copies nor rewrites them."""
    if self.is_mutable_collection("cross_kv"):
      key, value = compute()
      self.put_variable("cross_kv", "key", key)
      self.put_variable("cross_kv", "value", value)
      return key, value
    return self.get_variable("cross_kv", "key"), self.get_variable("cross_kv", "value")


def _heads_major(k, v):
  """k, v `[batch, len, heads, head_dim]` -> key `[batch, heads, head_dim, len]` and value
  `[batch, heads, len, head_dim]`: the operand layouts of the attention's two batched matmuls,
  which the decoding caches keep so that no step transposes them (XLA:CPU copies a transposed
  operand of a batched matmul; 'bhqs,bshk->bqhk' ran ~6x slower than the heads-major form)."""
  return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))


def _prepend(prefix: Optional[peft_lib.Prefix], key, value, dtype):
  """Heads-major key/value with the prefix's positions first (unchanged without a prefix)."""
  if prefix is None:
    return key, value
  prefix_key, prefix_value = _heads_major(prefix.key, prefix.value)
  return (jnp.concatenate([prefix_key.astype(dtype), key.astype(dtype)], axis=-1),
          jnp.concatenate([prefix_value.astype(dtype), value.astype(dtype)], axis=-2))


class FeedForward(nn.Module):
  """T5 MLP: gated-GELU (v1.1: `wo(gelu(wi_0 x) * wi_1 x)`) or ReLU (original: `wo(relu(wi x))`),
  plus an optional per-example parallel adapter `up(gelu(down(x)))` (HINT's placement)."""
  config: T5Config

  @nn.compact
  def __call__(self, x, adapter: Optional[peft_lib.Adapter] = None, deterministic: bool = True):
    """x `[batch, length, d_model]` (already normed); adapter down/up `[batch, b, d]`/`[batch, d, b]`."""
    cfg = self.config
    dt = cfg.compute_dtype
    dense = functools.partial(dot, transposed_copies=cfg.bf16_transposed_copies)
    init_in = nn.initializers.normal(cfg.d_model**-0.5)
    init_out = nn.initializers.normal(cfg.d_ff**-0.5)
    if cfg.mlp_activation == "gated-gelu":
      wi_0 = param_with_axes(self, "wi_0", init_in, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      wi_1 = param_with_axes(self, "wi_1", init_in, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      hidden = (jax.nn.gelu(dense("btd,df->btf", x, wi_0, dt, jnp.float32), approximate=True) *
                dense("btd,df->btf", x, wi_1, dt, jnp.float32)).astype(dt)
    else:
      wi = param_with_axes(self, "wi", init_in, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      hidden = jax.nn.relu(dense("btd,df->btf", x, wi, dt))
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    wo = param_with_axes(self, "wo", init_out, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
    y = dense("btf,fd->btd", hidden, wo, dt)
    if adapter is not None:
      a = jax.nn.gelu(dot("btd,bad->bta", x, adapter.down, dt, jnp.float32), approximate=False)
      y = y + dot("bta,bda->btd", a, adapter.up, dt)
    return y
