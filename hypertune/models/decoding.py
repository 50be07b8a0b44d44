"""Greedy decoding, beam search and target scoring for `T5`, all inside `jax.jit`.

Decoding loops are `lax.while_loop`s over a key/value cache, so one compiled program produces
the whole output (no Python loop per token). Outputs are `[batch, max_decode_len]` token ids
without the decoder start token, padded with `pad_id` after EOS (as Hugging Face's `generate`).

Beam search is `beam_search.beam_search_loop` (Hugging Face's `generate(num_beams=K)` rules) with
T5's decoder step.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from hypertune.models import beam_search as beam_search_lib
from hypertune.models.peft import PeftParams
from hypertune.models.t5 import T5, unstack_decoder_layers


def _empty_cache(model: T5, batch: int, enc_len: int, max_decode_len: int, peft=None):
  """Zero self-attention cache shaped by an init call over the full decode length (no compute:
  eval_shape). The cross-attention keys/values ("cross_kv") come from the first step."""
  def init():
    return model.init(jax.random.key(0), jnp.ones((batch, enc_len), jnp.int32),
                      jnp.ones((batch, max_decode_len), jnp.int32), peft, decode=True)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def _decode_step(model: T5, params, cache, cross_kv, encoded, encoder_input_tokens, tokens, peft):
  """One token `[batch]` -> (log-probs `[batch, vocab]` float32, new cache, cross_kv). The first
  step (`cross_kv=None`) projects the encoder output for every cross-attention once; later steps
  read those keys/values as constants of the decoding loop."""
  variables = {"params": params, "cache": cache}
  if cross_kv is not None:
    variables["cross_kv"] = cross_kv
  logits, mutated = model.apply(variables, encoded, encoder_input_tokens, tokens[:, None], peft,
                                decode=True, method=T5.decode,
                                mutable=["cache"] if cross_kv is not None else ["cache", "cross_kv"])
  log_probs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))
  return log_probs, mutated["cache"], mutated.get("cross_kv", cross_kv)


def _first_step(model: T5, params, encoder_input_tokens, encoded, peft, cache_len):
  """The decoder start token through an empty cache: (log-probs `[batch, vocab]`, cache,
  cross_kv), the cross-attention keys/values that later steps read as constants."""
  batch = encoder_input_tokens.shape[0]
  cache = _empty_cache(model, batch, encoder_input_tokens.shape[1], cache_len, peft)
  start = jnp.full((batch,), model.config.decoder_start_id, jnp.int32)
  return _decode_step(model, params, cache, None, encoded, encoder_input_tokens, start, peft)


def _decoding_model(model: T5, params):
  """The model and parameters the decoding steps run: as given, or with `unrolled_decoding` a
  scanned decoder's layers unrolled over one unstacked copy of their parameters."""
  cfg = model.config
  if not (cfg.scan_layers and cfg.unrolled_decoding):
    return model, params
  return (model.clone(config=cfg.replace(scan_layers=False)),
          unstack_decoder_layers(params))


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len"))
def greedy_decode(model: T5, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                  max_decode_len: int = 64):
  """Argmax decoding. encoder_input_tokens `[batch, enc_len]` -> tokens `[batch, max_decode_len]`."""
  cfg = model.config
  batch = encoder_input_tokens.shape[0]
  encoded = model.apply({"params": params}, encoder_input_tokens, peft, method=T5.encode)
  model, params = _decoding_model(model, params)
  log_probs, cache, cross_kv = _first_step(model, params, encoder_input_tokens, encoded, peft,
                                           max_decode_len)

  def step(cache, tokens):
    log_probs, cache, _ = _decode_step(model, params, cache, cross_kv, encoded,
                                       encoder_input_tokens, tokens, peft)
    return log_probs, cache

  def emit(i, log_probs, out, done):
    token = jnp.where(done, cfg.pad_id, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
    return token, out.at[:, i].set(token), done | (token == cfg.eos_id)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_len - 1) & ~jnp.all(done)

  def body(state):
    i, log_probs, out, cache, done = state
    token, out, done = emit(i, log_probs, out, done)
    log_probs, cache = step(cache, token)
    return i + 1, log_probs, out, cache, done

  state = (jnp.array(0), log_probs, jnp.full((batch, max_decode_len), cfg.pad_id, jnp.int32),
           cache, jnp.zeros((batch,), bool))
  i, log_probs, out, _, done = jax.lax.while_loop(cond, body, state)
  return emit(i, log_probs, out, done)[1]  # the last token is not fed back


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "num_beams",
                                             "length_penalty"))
def beam_search(model: T5, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                max_decode_len: int = 64, num_beams: int = 4, length_penalty: float = 1.0):
  """Beam search as Hugging Face's `generate(num_beams=K, max_length=max_decode_len + 1)`.

  The encoder runs once per example, and so do the cross-attention keys/values.
  Returns (sequences `[batch, num_beams, max_decode_len]` best first, scores `[batch, num_beams]`
  = sum of log-probs / generated_length ** length_penalty).
  """
  cfg = model.config
  batch = encoder_input_tokens.shape[0]
  k = num_beams
  encoded = model.apply({"params": params}, encoder_input_tokens, peft, method=T5.encode)
  model, params = _decoding_model(model, params)
  # The start token once per example (every beam begins the same): its log-probs and cache are
  # repeated for the K beams, its cross-attention keys/values are not (the attention reads the
  # K beams of an example as that example's queries).
  # One slot more than generated: the loop feeds its last token too (and discards the result).
  log_probs, cache, cross_kv = _first_step(model, params, encoder_input_tokens, encoded, peft,
                                           max_decode_len + 1)
  rows = jnp.repeat(jnp.arange(batch), k)
  cache = beam_search_lib.gather_cache(cache, rows, model.config.scan_layers)
  encoded, enc_tokens = jnp.repeat(encoded, k, axis=0), jnp.repeat(encoder_input_tokens, k, axis=0)
  peft = peft.repeat(k) if peft is not None else None

  def step(cache, tokens, i):
    del i  # the cache counts positions
    log_probs, cache, _ = _decode_step(model, params, cache, cross_kv, encoded, enc_tokens, tokens,
                                       peft)
    return log_probs, cache

  return beam_search_lib.beam_search_loop(
      step, log_probs[rows], cache, batch=batch, num_beams=k, max_decode_len=max_decode_len,
      eos_id=cfg.eos_id, pad_id=cfg.pad_id, length_penalty=length_penalty,
      scan_layers=model.config.scan_layers)


def token_log_likelihood(model: T5, params, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, peft: Optional[PeftParams] = None,
                         decoder_loss_weights=None):
  """Per-example (sum, mean) log-likelihood of the targets: two `[batch]` float32 arrays.

  Rank classification picks the answer choice with the highest sum. Positions with weight 0
  (default: target id == pad) do not count.
  """
  logits = model.apply({"params": params}, encoder_input_tokens, decoder_input_tokens, peft)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  token_ll = jnp.take_along_axis(log_probs, decoder_target_tokens[..., None], axis=-1)[..., 0]
  if decoder_loss_weights is None:
    decoder_loss_weights = decoder_target_tokens != model.config.pad_id
  w = decoder_loss_weights.astype(jnp.float32)
  total = jnp.sum(token_ll * w, axis=-1)
  return total, total / jnp.maximum(jnp.sum(w, axis=-1), 1.0)
