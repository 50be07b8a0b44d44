"""A decoder-only downstream (Llama) behind the model contract, optionally with a hypernetwork.

The data layer's features are the encoder-decoder ones; a decoder-only model lays them out as
one sequence per row (`llama.prompt`): `[pads ; BOS ; inputs ; targets]`, the prompt
right-aligned so that every row's targets start in the same column. Logits of the targets are
read at the prompt's last column onwards. With generated `PeftParams` (gist keys/values as a
prefix, their `position_offset`), row i's positions start at `offset_i`.

Decoding (greedy, beam search) is a `lax.while_loop` over a key/value cache (one compiled program
per shape): the prompt fills the cache in one call, then one token per step.
"""
import functools
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from hypertune.models import base
from hypertune.models import beam_search as beam_search_lib
from hypertune.models import llama as llama_lib
from hypertune.models.llama import Llama, LlamaConfig
from hypertune.models.peft import PeftParams


def _offset(peft: Optional[PeftParams], batch: int):
  if peft is None or peft.position_offset is None:
    return jnp.zeros((batch,), jnp.int32)
  return peft.position_offset.astype(jnp.int32)


def sequence(cfg: LlamaConfig, encoder_input_tokens, decoder_input_tokens, peft=None):
  """(tokens, positions, key mask) `[batch, prompt_len + targets_len - 1]` and the column of
  the prompt's last token: the logits there and after predict the targets."""
  prompt, prompt_mask = llama_lib.prompt(cfg, encoder_input_tokens)
  tokens = jnp.concatenate([prompt, decoder_input_tokens[:, 1:]], axis=1)
  key_mask = jnp.concatenate(
      [prompt_mask, jnp.ones(decoder_input_tokens[:, 1:].shape, bool)], axis=1)
  positions = llama_lib.positions_of(key_mask, _offset(peft, tokens.shape[0]))
  return tokens, positions, key_mask, prompt.shape[1] - 1


def target_logits(model: Llama, encoder_input_tokens, decoder_input_tokens, peft=None,
                  deterministic: bool = True):
  """Inside a bound module: logits `[batch, targets_len, vocab]` of the targets."""
  tokens, positions, key_mask, last = sequence(model.config, encoder_input_tokens,
                                               decoder_input_tokens, peft)
  logits = model(tokens, positions, llama_lib.causal_mask(key_mask), peft, deterministic)
  return logits[:, last:]


@gin.configurable
class HyperCausalLM(nn.Module):
  """Llama adapted per example by `hypernet(hyper_tokens, deterministic, downstream)`
  (`hypertune.hypernets.gisting.Gisting`, `SharedPeft`-like modules), or plain (None)."""
  config: LlamaConfig
  hypernet: Optional[nn.Module] = None

  def setup(self):
    self.downstream = Llama(self.config)

  def generate_peft(self, hyper_encoder_input_tokens, deterministic: bool = True):
    if self.hypernet is None:
      return None
    return self.hypernet(hyper_encoder_input_tokens, deterministic=deterministic,
                         downstream=self.downstream)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, hyper_encoder_input_tokens=None,
               peft: Optional[PeftParams] = None, deterministic: bool = True):
    """Teacher-forced logits `[batch, targets_len, vocab]`."""
    if peft is None and self.hypernet is not None:
      if hyper_encoder_input_tokens is None:
        raise ValueError("this model has a hypernetwork: the batch needs "
                         "'hyper_encoder_input_tokens' (or pass generated `peft`)")
      peft = self.generate_peft(hyper_encoder_input_tokens, deterministic)
    return target_logits(self.downstream, encoder_input_tokens, decoder_input_tokens, peft,
                         deterministic)


def _empty_cache(model: Llama, batch: int, length: int):
  def init():
    tokens = jnp.ones((batch, length), jnp.int32)
    mask = llama_lib.causal_mask(jnp.ones((batch, length), bool))
    return model.init(jax.random.key(0), tokens, jnp.zeros_like(tokens), mask,
                      decode=True)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def _decoder(model: Llama, params, encoder_input_tokens, peft: Optional[PeftParams],
             max_decode_len: int):
  """Runs the prompt once into a cache -> (next-token logits `[batch, vocab]`, cache, prompt
  length, `runner(beams)`). `runner(beams)(cache, tokens [batch * beams, n], start)` feeds
  columns `start..start+n-1` -> (logits of the last one, cache); with beams > 1 each example's
  row is repeated `beams` times (beam search).

  Every column's position and visibility are known ahead: the prompt, then one per step."""
  cfg = model.config
  prompt, prompt_mask = llama_lib.prompt(cfg, encoder_input_tokens)
  batch, prompt_len = prompt.shape
  key_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_decode_len), bool)], axis=1)
  positions = llama_lib.positions_of(key_mask, _offset(peft, batch))
  visible = llama_lib.causal_mask(key_mask)  # [batch, 1, total, total]

  def runner(beams: int):
    pos, vis, row_peft = positions, visible, peft
    if beams > 1:  # repeated once, outside the decoding loop
      pos, vis = jnp.repeat(positions, beams, axis=0), jnp.repeat(visible, beams, axis=0)
      row_peft = peft.repeat(beams) if peft is not None else None

    def run(cache, tokens, start):
      length = tokens.shape[1]
      logits, mutated = model.apply(
          {"params": params, "cache": cache}, tokens,
          jax.lax.dynamic_slice_in_dim(pos, start, length, axis=1),
          jax.lax.dynamic_slice_in_dim(vis, start, length, axis=2), row_peft, decode=True,
          mutable=["cache"])
      return logits[:, -1], mutated["cache"]
    return run

  logits, cache = runner(1)(_empty_cache(model, batch, prompt_len + max_decode_len), prompt, 0)
  return logits, cache, prompt_len, runner


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len"))
def greedy_decode(model: Llama, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                  max_decode_len: int = 64):
  """Argmax continuation of `[BOS ; inputs]`. encoder_input_tokens `[batch, len]` (right-padded)
  -> tokens `[batch, max_decode_len]`, `pad_id` after EOS."""
  cfg = model.config
  logits, cache, prompt_len, runner = _decoder(model, params, encoder_input_tokens, peft,
                                               max_decode_len)
  run = runner(1)
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = jnp.full((token.shape[0], max_decode_len), cfg.pad_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_len) & ~jnp.all(done)

  def body(state):
    i, token, out, cache, done = state
    logits, cache = run(cache, token[:, None], prompt_len + i - 1)
    token = jnp.where(done, cfg.pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return i + 1, token, out.at[:, i].set(token), cache, done | (token == cfg.eos_id)

  state = (jnp.array(1), token, out, cache, token == cfg.eos_id)
  return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "num_beams",
                                             "length_penalty"))
def beam_search(model: Llama, params, encoder_input_tokens, peft: Optional[PeftParams] = None,
                max_decode_len: int = 64, num_beams: int = 4, length_penalty: float = 1.0):
  """Beam search as Hugging Face's `generate(num_beams=K, max_new_tokens=max_decode_len)` on
  the left-padded prompt. The prompt runs once per example; its cache is repeated for the K
  beams. Returns (sequences `[batch, K, max_decode_len]` best first, scores `[batch, K]`)."""
  cfg = model.config
  batch = encoder_input_tokens.shape[0]
  logits, cache, prompt_len, runner = _decoder(model, params, encoder_input_tokens, peft,
                                               max_decode_len)
  rows = jnp.repeat(jnp.arange(batch), num_beams)  # beam row -> its example
  cache = beam_search_lib.gather_cache(cache, rows, cfg.scan_layers)
  run = runner(num_beams)

  def step(cache, tokens, i):
    logits, cache = run(cache, tokens[:, None], prompt_len + i)
    return jax.nn.log_softmax(logits), cache

  return beam_search_lib.beam_search_loop(
      step, jax.nn.log_softmax(logits)[rows], cache, batch=batch, num_beams=num_beams,
      max_decode_len=max_decode_len, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
      length_penalty=length_penalty, scan_layers=cfg.scan_layers)


@gin.configurable
class CausalLMModel(base.HyperModuleModel):
  """A Llama downstream with an optional hypernetwork (`HyperCausalLM`)."""

  def score(self, params, task_params, batch) -> jax.Array:
    logits = Llama(self.config).apply(
        {"params": params["downstream"]}, batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], task_params,
        method=lambda m, *a: target_logits(m, *a))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["decoder_target_tokens"]
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = batch.get("decoder_loss_weights", targets != self.config.pad_id)
    return jnp.sum(token_ll * weights.astype(jnp.float32), axis=-1)

  def predict(self, params, task_params, batch, max_decode_len: int, num_beams: int = 1):
    args = (Llama(self.config), params["downstream"], batch["encoder_input_tokens"], task_params)
    if num_beams > 1:
      return beam_search(*args, max_decode_len=max_decode_len, num_beams=num_beams)[0][:, 0]
    return greedy_decode(*args, max_decode_len=max_decode_len)

  def pretrained_params(self, path: str) -> dict:
    from hypertune.models import hf_llama  # pylint: disable=g-import-not-at-top
    _, hf_params = hf_llama.load_hf_llama(path, config=self.config)
    return {"downstream": hf_params}
