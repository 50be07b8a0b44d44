"""HINT (Ivison et al., "HINT: Hypernetwork Instruction Tuning for Efficient Zero- & Few-Shot
Generalisation", section 3).

The hyper encoder reads the instruction (and few-shot examples); by default it *is* the
downstream encoder (tied: one set of weights serves both uses). The parameter generator holds
one learned embedding per generated column / token of every module in every layer (a prefix
token of each attention kind, a bottleneck column of each stack's adapter), lets them read the
encoded instruction through one multi-head cross-attention layer, and turns them into
parameters with one two-layer MLP per module type, shared by all layers: prefix keys, prefix
values, adapter down rows, adapter up columns. The generator's networks therefore do not grow
with the bottleneck or the prefix length (section 3.1.1, "Scaling Down Parameters"); only the
embeddings do, one `d_model` row per generated column.

    hyper_input_tokens [batch, hyper_len]
      -> hyper encoder (the downstream encoder, tied)      [batch, hyper_len, d]
      -> embeddings' = embeddings + CrossAttention(norm(embeddings), encoded)
                                                            [batch, num_embeddings, d]
      -> MLPs        prefixes [batch, layers, P, heads, head_dim] for every attention kind,
                     parallel adapters down [batch, layers, bottleneck, d], up [.., d, bottleneck]
      + instruction fusion: the encoded instruction as the downstream decoder's extra memory

Ablations (Table 6) as options: `instruction_fusion=False`, `peft_generation=False` (fusion
alone: no new parameters), `generator="decoder"` (a non-causal T5 decoder over the embeddings
instead of the one cross-attention layer).
"""
from typing import Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from hypertune.hypernets.heads import MLPHead
from hypertune.models.config import T5Config
from hypertune.models.layers import Attention, RMSNorm
from hypertune.models.peft import Adapter, PeftParams, Prefix
from hypertune.models.t5 import Decoder, Encoder

PREFIX_KINDS = (("encoder_self", "encoder"), ("decoder_self", "decoder"),
                ("decoder_cross", "decoder"))
ADAPTER_STACKS = ("encoder", "decoder")


@gin.configurable
class HINT(nn.Module):
  """HINT's hypernetwork.

  Attributes:
    config: the hyper encoder's T5 config when untied (and the generator's width, d_model).
    downstream: config of the model whose modules are generated.
    prefix_len: prefix tokens per layer in every self- and cross-attention (paper: 30; 0: none).
    bottleneck: adapter bottleneck on every feed-forward block (paper: 512; 0: none).
    tie_encoder: the hyper encoder is the downstream encoder (one set of weights; paper's best).
      Off: an encoder of its own (initialised from the downstream by
      `train.init_hypernet_from_downstream`).
    generator: "cross_attention" (paper) or "decoder" (Table 6's "+ Decoder").
    num_hyper_decoder_layers: the "decoder" generator's depth (None: the config's).
    peft_generation: generate prefixes and adapters (off: instruction fusion only).
    instruction_fusion: the downstream decoder cross-attends to the encoded instruction too.
  """
  config: T5Config
  downstream: T5Config
  prefix_len: int = 30
  bottleneck: int = 512
  tie_encoder: bool = True
  generator: str = "cross_attention"
  num_hyper_decoder_layers: Optional[int] = None
  peft_generation: bool = True
  instruction_fusion: bool = True

  def setup(self):
    cfg, ds = self.config, self.downstream
    if self.generator not in ("cross_attention", "decoder"):
      raise ValueError(f"HINT.generator must be 'cross_attention' or 'decoder', got "
                       f"{self.generator!r}")
    if not (self.peft_generation or self.instruction_fusion):
      raise ValueError("HINT with peft_generation=False and instruction_fusion=False adapts "
                       "nothing: switch one on")
    if cfg.d_model != ds.d_model:
      raise ValueError(f"HINT needs the hypernetwork's d_model ({cfg.d_model}) to equal the "
                       f"downstream's ({ds.d_model}): its memory and generator share one width")
    if not self.tie_encoder:
      self.token_embedder = nn.Embed(
          cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=cfg.compute_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      ("vocab", "embed")))
      self.hyper_encoder = Encoder(cfg)
    if not self.peft_generation:
      return
    layers = {"encoder": ds.num_encoder_layers, "decoder": ds.num_decoder_layers}
    embed = lambda name, n: self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("layers", "hyper_tokens", "embed")),
        (layers[n[0]], n[1], cfg.d_model), jnp.float32)
    # [layers, P | bottleneck, d] per generated module.
    self.embeddings = {
        **{f"prefix_{kind}": embed(f"prefix_{kind}_embeddings", (stack, self.prefix_len))
           for kind, stack in PREFIX_KINDS if self.prefix_len},
        **{f"adapter_{stack}": embed(f"adapter_{stack}_embeddings", (stack, self.bottleneck))
           for stack in ADAPTER_STACKS if self.bottleneck}}
    if self.generator == "cross_attention":
      self.generator_norm = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype)
      self.generator_attention = Attention(cfg)
    else:
      self.hyper_decoder = Decoder(cfg.replace(num_decoder_layers=self.num_hyper_decoder_layers
                                               or cfg.num_decoder_layers), causal=False)
    mlp = lambda out, axis, scale=1.0: MLPHead(cfg.d_model, out, out_axis=axis,
                                               out_init_scale=scale, dtype=cfg.dtype)
    self.prefix_key_mlp = mlp(ds.inner_dim, "joined_kv")
    self.prefix_value_mlp = mlp(ds.inner_dim, "joined_kv")
    # The up projection starts at zero, so training starts from the unadapted model.
    self.adapter_down_mlp = mlp(ds.d_model, "embed")
    self.adapter_up_mlp = mlp(ds.d_model, "embed", 0.0)

  def encode(self, hyper_input_tokens, deterministic: bool, downstream):
    """`[batch, hyper_len]` -> `[batch, hyper_len, d]` by the tied or the own hyper encoder."""
    if self.tie_encoder:
      if downstream is None:
        raise ValueError("HINT.tie_encoder needs the downstream model (HyperModel passes it)")
      return downstream.encode(hyper_input_tokens, None, deterministic)
    mask = hyper_input_tokens != self.config.pad_id
    return self.hyper_encoder(self.token_embedder(hyper_input_tokens), mask, None,
                              deterministic)

  def generate(self, encoded, mask, deterministic: bool):
    """The embeddings after reading the instruction: {name: [batch, layers, n, d]}."""
    names = list(self.embeddings)
    shapes = [self.embeddings[k].shape for k in names]
    flat = jnp.concatenate([self.embeddings[k].reshape(-1, self.config.d_model) for k in names])
    x = jnp.broadcast_to(flat.astype(self.config.compute_dtype),
                         (encoded.shape[0],) + flat.shape)
    if self.generator == "cross_attention":
      no_bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
      x = x + self.generator_attention(self.generator_norm(x), encoded, no_bias,
                                       mask[:, None, None, :], deterministic=deterministic)
    else:
      x = self.hyper_decoder(x, encoded, mask, None, deterministic)
    out, start = {}, 0
    for name, shape in zip(names, shapes):
      size = shape[0] * shape[1]
      out[name] = x[:, start:start + size].reshape((x.shape[0],) + shape)
      start += size
    return out

  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    """hyper_input_tokens `[batch, hyper_len]` -> prefixes, adapters and fused instruction."""
    ds = self.downstream
    mask = hyper_input_tokens != self.config.pad_id
    encoded = self.encode(hyper_input_tokens, deterministic, downstream)
    peft = PeftParams()
    if self.peft_generation:
      emb = self.generate(encoded, mask, deterministic)
      heads = lambda x: x.reshape(x.shape[:-1] + (ds.num_heads, ds.d_kv))
      prefixes = {kind: Prefix(heads(self.prefix_key_mlp(emb[f"prefix_{kind}"])),
                               heads(self.prefix_value_mlp(emb[f"prefix_{kind}"])))
                  for kind, _ in PREFIX_KINDS if f"prefix_{kind}" in emb}
      adapters = {stack: Adapter(down=self.adapter_down_mlp(emb[f"adapter_{stack}"]),
                                 up=jnp.swapaxes(self.adapter_up_mlp(emb[f"adapter_{stack}"]),
                                                 -1, -2))
                  for stack in ADAPTER_STACKS if f"adapter_{stack}" in emb}
      peft = PeftParams(prefixes=prefixes, adapters=adapters)
    if self.instruction_fusion:
      peft = peft.replace(extra_memory=encoded, extra_memory_mask=mask)
    return peft
