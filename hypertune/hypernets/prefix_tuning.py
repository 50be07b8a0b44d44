"""Prefix tuning of a decoder-only downstream without reparameterisation (`hyperllama_gisting.md`
section 6 and appendix E): the key/value prefixes of every layer are trained directly, one set
shared by all tasks, and the input is pushed down by `prefix_len` positions.

This is the flat form that HyperLlama's gists take, so it is the baseline the gists are compared
with (multi-task prefix tuning: its prefixes are the "shared" initialisation of per-task prefix
tuning). It has the hypernetwork interface and ignores the hyper inputs.
"""
import flax.linen as nn
import gin
import jax.numpy as jnp

from hypertune.models.llama import LlamaConfig
from hypertune.models.peft import PeftParams, Prefix


@gin.configurable
class PrefixTuning(nn.Module):
  """`hyper_tokens [batch, any]` -> PeftParams(prefix `[batch, layers, prefix_len, kv_heads,
  head_dim]` for "decoder_self", position_offset = prefix_len)."""
  config: LlamaConfig
  prefix_len: int = 16
  init_scale: float = 0.02  # the scale of Llama's keys/values at random initialisation

  @nn.compact
  def __call__(self, hyper_tokens, deterministic: bool = True, downstream=None) -> PeftParams:
    del deterministic, downstream  # no dropout; the prefixes do not depend on the downstream
    cfg = self.config
    batch = hyper_tokens.shape[0]
    shape = (cfg.num_layers, self.prefix_len, cfg.num_kv_heads, cfg.head_dim)
    axes = ("layers", "prefix_length", "kv_heads", "kv")

    def prefix(name):
      x = self.param(name, nn.with_logical_partitioning(
          nn.initializers.normal(self.init_scale), axes), shape, jnp.float32)
      return jnp.broadcast_to(x, (batch,) + shape)

    return PeftParams(prefixes={"decoder_self": Prefix(prefix("prefix_key"),
                                                       prefix("prefix_value"))},
                      position_offset=jnp.full((batch,), self.prefix_len, jnp.int32))
