"""Llama-2/3 decoder-only language model with per-example PEFT hooks and position offsets.

RMSNorm, rotary position embeddings (Llama-3's scaled frequencies by config), SwiGLU,
grouped-query attention (`num_kv_heads` key/value heads shared by `num_heads // num_kv_heads`
query heads each), untied output head. Layers are scanned (`nn.scan`, parameters with a
leading `layers` axis) unless `config.scan_layers=False`.

Per example (`hypertune.models.peft.PeftParams`, attention kind "decoder_self"):
  - prefixes `[batch, layers, prefix_len, kv_heads, head_dim]`: keys (already rotated, as a
    KV cache holds them) and values prepended to every layer's attention, always visible;
  - LoRA on q, k, v, o, and optionally on the MLP's gate, up, down (kind "decoder_mlp");
  - `position_offset` `[batch]`: row i's first token sits at position `offset_i` (the gist
    count plus what came before, or the prefix length), a different offset in every row.

Sequence layout (`layout`): the prompt (`inputs`) is left-aligned after a BOS token, so every
row's prompt ends in the same column and decoding runs in lockstep; positions count real
tokens only, so left padding does not move them.
"""
import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from hypertune.models import peft as peft_lib
from hypertune.models.layers import dot, param_with_axes

PeftParams = peft_lib.PeftParams
NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape of a Llama model (Hugging Face `LlamaConfig` names in comments)."""
  vocab_size: int = 32000
  d_model: int = 4096  # hidden_size
  num_layers: int = 32  # num_hidden_layers
  num_heads: int = 32  # num_attention_heads
  num_kv_heads: int = 32  # num_key_value_heads (grouped-query attention when fewer)
  head_dim: int = 128
  d_ff: int = 11008  # intermediate_size
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3 rope scaling ("rope_type": "llama3"); None = plain rope.
  rope_scaling_factor: Optional[float] = None
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  tie_word_embeddings: bool = False
  dropout_rate: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters are stored in float32
  scan_layers: bool = True
  remat: bool = False
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"LlamaConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  # The PEFT container's vocabulary (shared with T5): one "decoder" stack, no encoder.
  @property
  def num_decoder_layers(self) -> int:
    return self.num_layers

  @property
  def num_encoder_layers(self) -> int:
    return 0

  @property
  def d_kv(self) -> int:
    return self.head_dim

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def supports_mlp_lora(self) -> bool:  # PeftParams.validate: "decoder_mlp/*" keys apply
    return True

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


LLAMA_SIZES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128),
    "llama2_7b": dict(),
    "llama3_8b": dict(vocab_size=128256, num_kv_heads=8, d_ff=14336, rope_theta=500000.0,
                      bos_id=128000, eos_id=128001),
    "llama3.1_8b": dict(vocab_size=128256, num_kv_heads=8, d_ff=14336, rope_theta=500000.0,
                        rope_scaling_factor=8.0, bos_id=128000, eos_id=128001),
}


@gin.configurable
def llama_config(size: str = "tiny", **overrides) -> LlamaConfig:
  """`LlamaConfig` of a named size (LLAMA_SIZES) with overrides, e.g. in gin:
  `MODEL_CONFIG = @config.llama_config()`, `config.llama_config.size = "llama2_7b"`."""
  if size not in LLAMA_SIZES:
    raise ValueError(f"llama_config: unknown size {size!r}; expected one of "
                     f"{sorted(LLAMA_SIZES)}")
  return LlamaConfig(**{**LLAMA_SIZES[size], **overrides})


# --- rotary position embeddings ------------------------------------------------------------
def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
  """Inverse frequencies `[head_dim // 2]`, Llama-3-scaled when configured (as transformers'
  `_compute_llama3_parameters`: long wavelengths divided by the factor, short ones kept, the
  band between interpolated)."""
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32)
                                       / cfg.head_dim))
  if cfg.rope_scaling_factor is None:
    return inv_freq
  factor, old = cfg.rope_scaling_factor, cfg.rope_original_max_position
  low_wavelen = old / cfg.rope_low_freq_factor
  high_wavelen = old / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
  """x `[batch, length, heads, head_dim]` rotated at positions `[batch, length]` (the
  half-split convention of transformers' `rotate_half`)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# --- layers --------------------------------------------------------------------------------
class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale * x32).astype(self.dtype)


def _lora_delta(x, lo: peft_lib.LoRA, dt):
  """`scale * up @ down @ x` per example: x `[batch, len, in]` -> `[batch, len, out]`."""
  delta = dot("btd,brd->btr", x, lo.down, dt)
  return dot("btr,bor->bto", delta, lo.up, dt) * lo.scale


class Attention(nn.Module):
  """Grouped-query causal self-attention with rope, optional prefix, LoRA and a KV cache.

  `decode=True`: the call's keys/values are written into a cache of the full length at its
  `cache_index` and the queries attend to the whole cache under `mask`.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, prefix: Optional[peft_lib.Prefix] = None,
               lora=None, decode: bool = False, deterministic: bool = True):
    """x `[batch, len, d_model]`, positions `[batch, len]`, mask `[batch, 1, len, keys]` bool.
    Returns (`[batch, len, d_model]`, (keys, values) `[batch, len, kv_heads, head_dim]`, the
    keys rotated)."""
    cfg = self.config
    dt = cfg.compute_dtype
    lora = lora or {}
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(0.02)
    wq = param_with_axes(self, "q_proj", init, (cfg.d_model, h, hd), ("embed", "heads", "kv"))
    wk = param_with_axes(self, "k_proj", init, (cfg.d_model, kvh, hd),
                         ("embed", "kv_heads", "kv"))
    wv = param_with_axes(self, "v_proj", init, (cfg.d_model, kvh, hd),
                         ("embed", "kv_heads", "kv"))
    wo = param_with_axes(self, "o_proj", init, (h, hd, cfg.d_model), ("heads", "kv", "embed"))

    def project(w, name):
      y = dot("btd,dhk->bthk", x, w, dt)
      if name in lora:
        y = y + _lora_delta(x, lora[name], dt).reshape(y.shape).astype(dt)
      return y

    inv_freq = rope_frequencies(cfg)
    q = apply_rope(project(wq, "q"), positions, inv_freq)
    k = apply_rope(project(wk, "k"), positions, inv_freq)
    v = project(wv, "v")
    new_kv = (k, v)
    if decode:
      k, v = self._update_cache(k, v)
    if prefix is not None:  # always visible, positions already applied
      k = jnp.concatenate([prefix.key.astype(dt), k], axis=1)
      v = jnp.concatenate([prefix.value.astype(dt), v], axis=1)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (prefix.key.shape[1],), bool), mask],
                             axis=-1)
    batch, length = x.shape[:2]
    # [batch, kv_heads, group, len, head_dim]: heads-major operands (fast batched matmuls).
    qg = q.reshape(batch, length, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, keys, hd]
    logits = dot("bkgqd,bksd->bkgqs", qg, kt, dt, jnp.float32) / math.sqrt(hd)
    logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = dot("bkgqs,bksd->bkgqd", weights, vt, dt)  # [batch, kv_heads, group, len, hd]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, length, h, hd)
    y = dot("bqhk,hkd->bqd", out, wo, dt)
    if "o" in lora:
      y = y + _lora_delta(out.reshape(batch, length, h * hd), lora["o"], dt).astype(dt)
    return nn.with_logical_constraint(y, ("batch", "length", "embed")), new_kv

  def _update_cache(self, k, v):
    is_init = self.is_initializing() or not self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if is_init:
      return k, v
    zero = jnp.array(0, jnp.int32)
    start = (zero, index.value, zero, zero)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, start)
    index.value = index.value + k.shape[1]
    return cached_key.value, cached_value.value


class MLP(nn.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`, each projection with its optional LoRA
  (`lora` {"gate"|"up"|"down": LoRA}, PeftParams key "decoder_mlp/...")."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, lora=None):
    cfg = self.config
    dt = cfg.compute_dtype
    lora = lora or {}
    init = nn.initializers.normal(0.02)
    gate = param_with_axes(self, "gate_proj", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
    up = param_with_axes(self, "up_proj", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
    down = param_with_axes(self, "down_proj", init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))

    def project(h, w, name, spec):
      y = dot(spec, h, w, dt)
      if name in lora:
        y = y + _lora_delta(h, lora[name], dt).astype(dt)
      return y

    hidden = (jax.nn.silu(project(x, gate, "gate", "btd,df->btf"))
              * project(x, up, "up", "btd,df->btf"))
    return project(hidden, down, "down", "btf,fd->btd")


class LlamaLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, peft: PeftParams, positions, mask, deterministic: bool, decode: bool,
               kv_last: int):
    """-> (x, (keys, values) of the last `kv_last` positions, or None when 0)."""
    cfg = self.config
    h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="input_layernorm")(x)
    h, (k, v) = Attention(cfg, name="self_attn")(
        h, positions, mask, peft.prefixes.get("decoder_self"), peft.lora_for("decoder_self"),
        decode=decode, deterministic=deterministic)
    x = x + h
    h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, name="mlp")(h, peft.lora_for(peft_lib.MLP_KIND))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, ((k[:, -kv_last:], v[:, -kv_last:]) if kv_last else None)


class LlamaStack(nn.Module):
  """The layers, scanned (one compiled body) or unrolled, per the config."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, by_layer: PeftParams, positions, mask, deterministic: bool,
               decode: bool, kv_last: int):
    cfg = self.config
    layer_cls = LlamaLayer
    if cfg.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers, static_argnums=(5, 6, 7))
    args = (positions, mask, deterministic, decode, kv_last)
    if cfg.scan_layers:
      scanned = nn.scan(
          layer_cls, variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0,) + (nn.broadcast,) * len(args), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(cfg, name="layers")(x, by_layer, *args)
    kvs = []
    for i in range(cfg.num_layers):
      x, layer_kv = layer_cls(cfg, name=f"layers_{i}")(
          x, jax.tree.map(lambda a, i=i: a[i], by_layer), *args)
      kvs.append(layer_kv)
    return x, (jax.tree.map(lambda *a: jnp.stack(a), *kvs) if kv_last else None)


class Llama(nn.Module):
  """Llama causal LM. Entry points take embedded inputs (a hypernetwork appends learned gist
  embeddings) and an optional `PeftParams` (per example)."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    self.decoder = LlamaStack(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = LMHead(cfg)

  def embed(self, tokens):
    return self.embed_tokens(tokens)

  def hidden(self, embedded, positions, mask, peft: Optional[PeftParams] = None,
             deterministic: bool = True, decode: bool = False, kv_last: int = 0):
    """embedded `[batch, len, d_model]`, positions `[batch, len]`, mask `[batch, 1, len, keys]`
    -> (final-norm states `[batch, len, d_model]`, per-layer (keys, values)
    `[layers, batch, kv_last, kv_heads, head_dim]` or None)."""
    peft = peft if peft is not None else PeftParams()
    if not peft.is_empty:
      peft.validate(self.config, embedded.shape[0])
    x, kv = self.decoder(embedded, peft.stack_view("decoder"), positions, mask, deterministic,
                         decode, kv_last)
    return self.norm(x), kv

  def logits(self, states):
    """`[batch, len, d_model]` -> float32 logits `[batch, len, vocab]`."""
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(states)
    else:
      logits = self.lm_head(states)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, tokens, positions, mask, peft: Optional[PeftParams] = None,
               deterministic: bool = True, decode: bool = False):
    """Logits `[batch, len, vocab]` of the next token at every position."""
    states, _ = self.hidden(self.embed(tokens), positions, mask, peft, deterministic, decode)
    return self.logits(states)


class LMHead(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, y):
    cfg = self.config
    kernel = param_with_axes(self, "kernel", nn.initializers.normal(0.02),
                             (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    return dot("btd,dv->btv", y, kernel, cfg.compute_dtype, jnp.float32)


# --- sequence layout -----------------------------------------------------------------------
def left_align(tokens, lengths):
  """Rows `[batch, len]` with `lengths` real tokens first -> the same rows right-aligned."""
  width = tokens.shape[1]
  shift = width - lengths
  index = (jnp.arange(width)[None, :] - shift[:, None]) % width
  return jnp.take_along_axis(tokens, index, axis=1)


def positions_of(key_mask, offset=None):
  """Positions `[batch, len]` counting real tokens only (pads repeat their neighbour's
  position), starting at `offset` `[batch]` (0 when None)."""
  positions = jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1, 0)
  return positions if offset is None else positions + offset[:, None]


def causal_mask(key_mask, query_len: Optional[int] = None):
  """`[batch, 1, query_len, keys]`: the last `query_len` positions (all when None) see the real
  keys at or before them."""
  keys = key_mask.shape[1]
  query_len = keys if query_len is None else query_len
  causal = jnp.arange(keys)[None, :] <= (jnp.arange(query_len) + keys - query_len)[:, None]
  return causal[None, None] & key_mask.astype(bool)[:, None, None, :]


def prompt(cfg: LlamaConfig, tokens) -> Tuple[jax.Array, jax.Array]:
  """Right-padded ids `[batch, len]` -> (`[BOS ; ids]` right-aligned `[batch, len + 1]`, its
  mask of real tokens). Lengths come from the pad id, before the BOS (which may equal it)."""
  lengths = jnp.sum(tokens != cfg.pad_id, axis=1) + 1
  with_bos = jnp.concatenate([jnp.full((tokens.shape[0], 1), cfg.bos_id, tokens.dtype), tokens],
                             axis=1)
  aligned = left_align(with_bos, lengths)
  mask = jnp.arange(aligned.shape[1])[None, :] >= (aligned.shape[1] - lengths)[:, None]
  return aligned, mask
