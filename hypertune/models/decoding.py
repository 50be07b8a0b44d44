"""Greedy decoding, beam search and target scoring for `T5`, all inside `jax.jit`.

Decoding loops are `lax.while_loop`s over a key/value cache, so one compiled program produces
the whole output (no Python loop per token). Outputs are `[batch, max_decode_len]` token ids
without the decoder start token, padded with `pad_id` after EOS (as Hugging Face's `generate`).

Beam search follows Hugging Face's `generate(num_beams=K)` (length_penalty, early_stopping=False
heuristic, 2K candidates per step, only the top K may finish) so results can be compared exactly.
"""
import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from hypertune.models.peft import PeftParams
from hypertune.models.t5 import T5

_CACHE_LEAVES_WITH_BATCH = ("cached_key", "cached_value")


def _empty_cache(model: T5, batch: int, enc_len: int, max_decode_len: int):
  """Zero cache shaped by an init call over the full decode length (no compute: eval_shape)."""
  def init():
    return model.init(jax.random.key(0), jnp.ones((batch, enc_len), jnp.int32),
                      jnp.ones((batch, max_decode_len), jnp.int32), decode=True)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def _decode_step(model: T5, params, cache, encoded, encoder_input_tokens, tokens, peft):
  """One token `[batch]` -> (log-probs `[batch, vocab]` float32, new cache)."""
  logits, mutated = model.apply({"params": params, "cache": cache}, encoded, encoder_input_tokens,
                                tokens[:, None], peft, decode=True, mutable=["cache"],
                                method=T5.decode)
  return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), mutated["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len"))
def greedy_decode(model: T5, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                  max_decode_len: int = 64):
  """Argmax decoding. encoder_input_tokens `[batch, enc_len]` -> tokens `[batch, max_decode_len]`."""
  cfg = model.config
  batch, enc_len = encoder_input_tokens.shape
  encoded = model.apply({"params": params}, encoder_input_tokens, peft, method=T5.encode)
  cache = _empty_cache(model, batch, enc_len, max_decode_len)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_len) & ~jnp.all(done)

  def body(state):
    i, token, out, cache, done = state
    log_probs, cache = _decode_step(model, params, cache, encoded, encoder_input_tokens, token,
                                    peft)
    token = jnp.where(done, cfg.pad_id, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
    out = out.at[:, i].set(token)
    return i + 1, token, out, cache, done | (token == cfg.eos_id)

  state = (jnp.array(0), jnp.full((batch,), cfg.decoder_start_id, jnp.int32),
           jnp.full((batch, max_decode_len), cfg.pad_id, jnp.int32), cache,
           jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, state)[2]


def _gather_cache(cache, flat_indices, scan_layers: bool):
  """Reorder the batch rows of the key/value caches (beam search); counters stay as they are."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(cache))
  axis = 1 if scan_layers else 0  # scanned caches carry a leading layers axis
  flat = {k: (jnp.take(v, flat_indices, axis=axis) if k[-1] in _CACHE_LEAVES_WITH_BATCH else v)
          for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "num_beams",
                                             "length_penalty"))
def beam_search(model: T5, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                max_decode_len: int = 64, num_beams: int = 4, length_penalty: float = 1.0):
  """Beam search as Hugging Face's `generate(num_beams=K, max_length=max_decode_len + 1)`.

  Returns (sequences `[batch, num_beams, max_decode_len]` best first, scores `[batch, num_beams]`
  = sum of log-probs / generated_length ** length_penalty).
  """
  cfg = model.config
  batch, enc_len = encoder_input_tokens.shape
  k = num_beams
  neg = jnp.float32(-1e9)
  enc_tokens = jnp.repeat(encoder_input_tokens, k, axis=0)
  peft = peft.repeat(k) if peft is not None else None
  encoded = model.apply({"params": params}, enc_tokens, peft, method=T5.encode)
  cache = _empty_cache(model, batch * k, enc_len, max_decode_len)
  top_k_mask = jnp.arange(2 * k) < k  # only the best K candidates may become finished
  batch_offset = (jnp.arange(batch) * k)[:, None]

  def gather(x, idx):  # x [batch, n, ...], idx [batch, m] -> [batch, m, ...]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(state):
    i, improvable = state[0], state[-1]
    return (i < max_decode_len) & jnp.any(improvable)

  def body(state):
    i, tokens, cache, run_seqs, run_scores, fin_seqs, fin_scores, fin_flags, improvable = state
    log_probs, cache = _decode_step(model, params, cache, encoded, enc_tokens, tokens, peft)
    vocab = log_probs.shape[-1]
    total = (log_probs.reshape(batch, k, vocab) + run_scores[:, :, None]).reshape(batch, k * vocab)
    cand_scores, cand_idx = jax.lax.top_k(total, 2 * k)
    cand_beam, cand_token = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
    cand_seqs = gather(run_seqs, cand_beam).at[:, :, i].set(cand_token)
    hits = (cand_token == cfg.eos_id) | (i + 1 >= max_decode_len)

    # Continue with the best K candidates that did not stop.
    _, keep = jax.lax.top_k(cand_scores + hits * neg, k)
    run_seqs, run_scores = gather(cand_seqs, keep), gather(cand_scores + hits * neg, keep)
    tokens = gather(cand_token, keep).reshape(-1)
    cache = _gather_cache(cache, (gather(cand_beam, keep) + batch_offset).reshape(-1),
                          cfg.scan_layers)

    # Candidates that stopped among the top K join the finished pool if they beat it.
    normed = cand_scores / ((i + 1.0) ** length_penalty)
    normed = normed + (~improvable)[:, None] * neg + (~(hits & top_k_mask[None])) * neg
    merged_scores = jnp.concatenate([fin_scores, normed], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    fin_seqs = gather(jnp.concatenate([fin_seqs, cand_seqs], axis=1), best)
    fin_scores = gather(merged_scores, best)
    fin_flags = gather(jnp.concatenate([fin_flags, hits & top_k_mask[None]], axis=1), best)

    # HF's early_stopping=False heuristic: stop once the best running beam, normalised at the
    # current length, cannot beat the worst finished one.
    best_running = run_scores[:, :1] / ((i + 1.0) ** length_penalty)
    worst = jnp.where(fin_flags, jnp.min(fin_scores, axis=1, keepdims=True), neg)
    improvable = improvable & jnp.any(best_running > worst, axis=1)
    return (i + 1, tokens, cache, run_seqs, run_scores, fin_seqs, fin_scores, fin_flags,
            improvable)

  run_scores = jnp.where(jnp.arange(k)[None] == 0, 0.0, neg) * jnp.ones((batch, 1))
  seqs = jnp.full((batch, k, max_decode_len), cfg.pad_id, jnp.int32)
  state = (jnp.array(0), jnp.full((batch * k,), cfg.decoder_start_id, jnp.int32), cache, seqs,
           run_scores.astype(jnp.float32), seqs, jnp.full((batch, k), neg),
           jnp.zeros((batch, k), bool), jnp.ones((batch,), bool))
  state = jax.lax.while_loop(cond, body, state)
  return state[5], state[6]


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
