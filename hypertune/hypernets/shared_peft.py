"""Shared PEFT baseline: one learned prefix set (Prefix-MLP re-parameterised, or Prefix-Flat) or
LoRA for all tasks.

It has the hypernetwork interface (`hyper_input_tokens -> PeftParams`) but ignores the hyper
inputs and broadcasts one parameter set over the batch, so it trains with the same train step.
Trained on one task's examples it is per-task PEFT tuning (`hypertune.peft_tune`, HyperT5
section 6 and appendix D).
"""
import flax.linen as nn
import gin
import jax.numpy as jnp

from hypertune.hypernets.heads import MLPHead, to_prefix
from hypertune.models.config import T5Config
from hypertune.models.peft import LoRA, PeftParams, Prefix

PEFT_TYPES = ("prefix", "prefix_flat", "lora")
# Prefix-Flat's parameters, [layers, prefix_len, heads, head_dim] each: the encoder's
# self-attention prefixes and the decoder's, which serve its self- and cross-attention (as
# Prefix-MLP's and HyperT5-Prefix's).
FLAT_PREFIXES = ("enc_prefix_key", "enc_prefix_value", "dec_prefix_key", "dec_prefix_value")


@gin.configurable
class SharedPeft(nn.Module):
  """T5-MTF (Prefix) / T5-MTF (LoRA).

  `peft_type`: "prefix" (Prefix-MLP, Li & Liang: 2P learned embeddings through HyperT5's MLP
  heads), "prefix_flat" (Prefix-Flat: the key/value prefixes themselves are the parameters,
  drawn from normal(`flat_init_scale`): a T5's keys and values at random initialisation have
  unit scale) or "lora" (q and v of every attention kind).
  """
  downstream: T5Config
  peft_type: str = "prefix"
  prefix_len: int = 16
  lora_rank: int = 8
  flat_init_scale: float = 1.0

  @nn.compact
  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    ds = self.downstream
    batch = hyper_input_tokens.shape[0]
    p = self.prefix_len
    if self.peft_type not in PEFT_TYPES:
      raise ValueError(f"SharedPeft.peft_type must be one of {PEFT_TYPES}, got "
                       f"{self.peft_type!r}")
    if self.peft_type == "prefix":
      # Prefix-MLP (Li & Liang): learned embeddings through an MLP, not raw prefixes.
      embeddings = self.param("prefix_embeddings", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ("hyper_tokens", "embed")),
          (2 * self.prefix_len, ds.d_model), jnp.float32)

      def prefix(name, rows, layers):  # [P, d] -> [batch, layers, P, heads, head_dim]
        x = to_prefix(MLPHead(ds.d_model, layers * ds.inner_dim, name=f"{name}_head")(rows), p,
                      layers, ds)
        return jnp.broadcast_to(x, (batch,) + x.shape)

      enc = Prefix(prefix("enc_k", embeddings[:p], ds.num_encoder_layers),
                   prefix("enc_v", embeddings[:p], ds.num_encoder_layers))
      dec = Prefix(prefix("dec_k", embeddings[p:], ds.num_decoder_layers),
                   prefix("dec_v", embeddings[p:], ds.num_decoder_layers))
      return PeftParams(prefixes={"encoder_self": enc, "decoder_self": dec, "decoder_cross": dec})
    if self.peft_type == "prefix_flat":
      def flat(name, layers):  # -> [batch, layers, P, heads, head_dim]
        x = self.param(name, nn.with_logical_partitioning(
            nn.initializers.normal(self.flat_init_scale),
            ("layers", "prefix_length", "heads", "kv")),
            (layers, p, ds.num_heads, ds.d_kv), jnp.float32)
        return jnp.broadcast_to(x, (batch,) + x.shape)

      enc = Prefix(flat("enc_prefix_key", ds.num_encoder_layers),
                   flat("enc_prefix_value", ds.num_encoder_layers))
      dec = Prefix(flat("dec_prefix_key", ds.num_decoder_layers),
                   flat("dec_prefix_value", ds.num_decoder_layers))
      return PeftParams(prefixes={"encoder_self": enc, "decoder_self": dec, "decoder_cross": dec})
    lora = {}
    for kind, layers in (("encoder_self", ds.num_encoder_layers),
                         ("decoder_self", ds.num_decoder_layers),
                         ("decoder_cross", ds.num_decoder_layers)):
      for proj in ("q", "v"):
        name = f"{kind}_{proj}"
        down = self.param(f"{name}_down", nn.with_logical_partitioning(
            nn.initializers.normal(ds.d_model**-0.5), ("layers", "lora_rank", "embed")),
            (layers, self.lora_rank, ds.d_model), jnp.float32)
        up = self.param(f"{name}_up", nn.with_logical_partitioning(
            nn.initializers.zeros, ("layers", "joined_kv", "lora_rank")),
            (layers, ds.inner_dim, self.lora_rank), jnp.float32)
        lora[f"{kind}/{proj}"] = LoRA(down=jnp.broadcast_to(down, (batch,) + down.shape),
                                      up=jnp.broadcast_to(up, (batch,) + up.shape))
    return PeftParams(lora=lora)
