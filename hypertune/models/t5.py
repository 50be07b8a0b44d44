"""T5 encoder-decoder (v1.1 / LM-adapted / original) with per-example PEFT hooks.

The stacks take embedded inputs so a hypernetwork can reuse them (HyperT5's hyper decoder reads
learned token embeddings, not token ids). Layers are stacked with `nn.scan` (parameters get a
leading `layers` axis) unless `config.scan_layers=False`, which unrolls them as `layers_0`, ...
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hypertune.models import peft as peft_lib
from hypertune.models.config import T5Config
from hypertune.models.layers import (DENSE_OUTPUT, Attention, FeedForward, RMSNorm,
                                     RelativePositionBias, dot, param_with_axes)

PeftParams = peft_lib.PeftParams


def _layer_peft(peft: PeftParams, kind: str):
  """(prefix, lora) of one attention kind from a per-layer PEFT view."""
  return peft.prefixes.get(kind), peft.lora_for(kind)


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, peft: PeftParams, bias, mask, deterministic: bool):
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    prefix, lora = _layer_peft(peft, "encoder_self")
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_attention_layer_norm")(x)
    h = Attention(cfg, name="attention")(h, h, bias, mask, prefix, lora,
                                         deterministic=deterministic)
    x = x + dropout(h, deterministic=deterministic)
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
    h = FeedForward(cfg, name="mlp")(h, peft.adapters.get("encoder"), deterministic)
    x = x + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, peft: PeftParams, bias, mask, encoded, encoder_mask,
               deterministic: bool, decode: bool):
    cfg = self.config
    dropout = nn.Dropout(cfg.dropout_rate)
    prefix, lora = _layer_peft(peft, "decoder_self")
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_self_attention_layer_norm")(x)
    h = Attention(cfg, name="self_attention")(h, h, bias, mask, prefix, lora, decode=decode,
                                              deterministic=deterministic)
    x = x + dropout(h, deterministic=deterministic)
    prefix, lora = _layer_peft(peft, "decoder_cross")
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype,
                name="pre_cross_attention_layer_norm")(x)
    h = Attention(cfg, name="encoder_decoder_attention")(
        h, encoded, jnp.zeros((1, 1, 1, 1), jnp.float32), encoder_mask, prefix, lora,
        decode=decode, deterministic=deterministic, fixed_kv=True)
    x = x + dropout(h, deterministic=deterministic)
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
    h = FeedForward(cfg, name="mlp")(h, peft.adapters.get("decoder"), deterministic)
    x = x + dropout(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _stack_layers(module: nn.Module, layer_cls, num_layers: int, x, peft_by_layer: PeftParams,
                  *broadcast_args):
  """Apply `num_layers` layers, scanned (one compiled body) or unrolled, per the config."""
  cfg = module.config
  if cfg.remat:
    # Python-bool arguments (deterministic, decode) are static; argnum 0 is the module itself.
    static = (5,) if layer_cls is EncoderLayer else (7, 8)
    policy = {"full": None,  # keep each layer's input only
              "dense": jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)}
    layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers, static_argnums=static,
                         policy=policy[cfg.remat_policy])
  if cfg.scan_layers:
    scanned = nn.scan(
        layer_cls, variable_axes={"params": 0, "cache": 0, "cross_kv": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * len(broadcast_args), length=num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, name="layers")(x, peft_by_layer, *broadcast_args)
    return x
  for i in range(num_layers):
    layer_peft = jax.tree.map(lambda a: a[i], peft_by_layer)
    x, _ = layer_cls(cfg, name=f"layers_{i}")(x, layer_peft, *broadcast_args)
  return x


def unstack_decoder_layers(params: dict) -> dict:
  """A scanned T5's parameters with the decoder's layers unstacked: `decoder/layers` (leaves
  `[layers, ...]`) -> `decoder/layers_0`, `decoder/layers_1`, ... as an unrolled decoder reads
  them. Every other parameter is shared, not copied."""
  decoder = dict(params["decoder"])
  layers = decoder.pop("layers")
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  for i in range(num_layers):
    decoder[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
  return {**params, "decoder": decoder}


class Encoder(nn.Module):
  """T5 encoder stack over embedded inputs."""
  config: T5Config

  @nn.compact
  def __call__(self, embedded, mask, peft: Optional[PeftParams] = None,
               deterministic: bool = True):
    """embedded `[batch, length, d_model]`, mask `[batch, length]` (1 = real token).

    Returns `[batch, length, d_model]`.
    """
    cfg = self.config
    peft = peft if peft is not None else PeftParams()
    length = embedded.shape[1]
    bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(length, length)
    attn_mask = mask.astype(bool)[:, None, None, :]
    x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
    x = _stack_layers(self, EncoderLayer, cfg.num_encoder_layers, x, peft.stack_view("encoder"),
                      bias, attn_mask, deterministic)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """T5 decoder stack over embedded inputs; `causal=False` gives HyperT5's hyper decoder.

  Attributes:
    causal: mask future positions in self-attention.
    bidirectional_positions: bucket relative positions as the encoder does (separate buckets
      for keys before and after the query). Independent of `causal`: a hyper decoder copied
      from the causal decoder keeps its one-way table meaning (False) although it is unmasked.
  """
  config: T5Config
  causal: bool = True
  bidirectional_positions: bool = False

  @nn.compact
  def __call__(self, embedded, encoded, encoder_mask, peft: Optional[PeftParams] = None,
               deterministic: bool = True, decode: bool = False, key_mask=None):
    """embedded `[batch, length, d_model]`, encoded `[batch, enc_len, d_model]`, encoder_mask
    `[batch, enc_len]`. With `decode=True` the input is one token and self-attention uses the
    cache. `key_mask` `[batch, length]` (optional, not with `decode`): self-attention reads only
    these positions (HART's growing history of states). Returns `[batch, length, d_model]`
    (after the final norm, before the logits)."""
    cfg = self.config
    peft = peft if peft is not None else PeftParams()
    batch, length = embedded.shape[:2]
    relpos = RelativePositionBias(cfg, bidirectional=self.bidirectional_positions,
                                  name="relpos_bias")
    if decode:
      # The cache is shaped by an init call over the full decode length; afterwards each call is
      # one token at `position`, attending to the whole cache (the attention masks the future).
      is_init = self.is_initializing() or not self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      # A zero-size-per-step marker whose static shape remembers the decode length.
      cache_len = self.variable("cache", "decode_length", lambda: jnp.zeros((length,), jnp.int8))
      if is_init:
        bias = relpos(length, length)
        self_mask = nn.make_causal_mask(jnp.ones((batch, length))).astype(bool)
      else:
        bias = relpos(1, cache_len.value.shape[0], q_offset=position.value)
        position.value = position.value + 1
        self_mask = jnp.ones((batch, 1, 1, 1), bool)  # replaced by the attention's cache mask
    else:
      bias = relpos(length, length)
      if self.causal:
        self_mask = nn.make_causal_mask(jnp.ones((batch, length))).astype(bool)
      else:
        self_mask = jnp.ones((batch, 1, length, length), bool)
      if key_mask is not None:
        self_mask = self_mask & key_mask.astype(bool)[:, None, None, :]
    cross_mask = encoder_mask.astype(bool)[:, None, None, :]
    x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
    x = _stack_layers(self, DecoderLayer, cfg.num_decoder_layers, x, peft.stack_view("decoder"),
                      bias, self_mask, encoded, cross_mask, deterministic, decode)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="decoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class T5(nn.Module):
  """T5 encoder-decoder. Every entry point takes an optional `PeftParams` (per example)."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      self.logits_dense = LogitsDense(cfg)

  def encode(self, encoder_input_tokens, peft: Optional[PeftParams] = None,
             deterministic: bool = True):
    """encoder_input_tokens `[batch, enc_len]` -> encoded `[batch, enc_len, d_model]`."""
    if peft is not None:
      peft.validate(self.config, encoder_input_tokens.shape[0])
    mask = encoder_input_tokens != self.config.pad_id
    return self.encoder(self.token_embedder(encoder_input_tokens), mask, peft, deterministic)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             peft: Optional[PeftParams] = None, deterministic: bool = True,
             decode: bool = False):
    """Logits `[batch, dec_len, vocab]` (float32) of the next token at every decoder position.

    Fusion-in-decoder: with `peft.extra_memory`, cross-attention reads
    `[extra_memory ; encoded]` under `[extra_memory_mask ; encoder mask]`.
    """
    cfg = self.config
    encoder_mask = encoder_input_tokens != cfg.pad_id
    if peft is not None and peft.extra_memory is not None:
      encoded = jnp.concatenate([peft.extra_memory.astype(encoded.dtype), encoded], axis=1)
      encoder_mask = jnp.concatenate([peft.extra_memory_mask.astype(bool), encoder_mask], axis=1)
    y = self.decoder(self.token_embedder(decoder_input_tokens), encoded, encoder_mask, peft,
                     deterministic, decode)
    if cfg.scales_decoder_outputs:  # original T5 rescales before the output projection
      y = (y * cfg.d_model**-0.5).astype(cfg.compute_dtype)
    if cfg.tie_word_embeddings:
      logits = self.token_embedder.attend(y)
    else:
      logits = self.logits_dense(y)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               peft: Optional[PeftParams] = None, deterministic: bool = True,
               decode: bool = False):
    """Teacher-forced logits `[batch, dec_len, vocab]`."""
    encoded = self.encode(encoder_input_tokens, peft, deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, peft, deterministic,
                       decode)


class LogitsDense(nn.Module):
  """Untied output projection (`lm_head`) of T5 v1.1."""
  config: T5Config

  @nn.compact
  def __call__(self, y):
    cfg = self.config
    kernel = param_with_axes(self, "kernel", nn.initializers.normal(cfg.d_model**-0.5),
                             (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    return dot("btd,dv->btv", y, kernel, cfg.compute_dtype, jnp.float32,
               transposed_copies=cfg.bf16_transposed_copies)
