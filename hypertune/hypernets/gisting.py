"""HyperLlama (Phang, 2023, `hyperllama_gisting.md` sections 3-4): a gist-token hypernetwork.

The hypernetwork is the downstream Llama itself (one copy of the base weights) with its own
LoRA, active only in this pass. It reads `[BOS ; demonstrations ; gists]` causally, where the
G gists are learned embeddings appended after each row's real tokens; the keys and values at
the gist positions of every layer become the downstream model's prefix
`[batch, layers, G, kv_heads, head_dim]`, and the downstream input of row i starts at position
`n_i + G` (its hyper input's length plus the gists, `PeftParams.position_offset`), as if it
followed the gists in one pass that masks the demonstrations from it (tests/test_hyperllama.py
checks that equivalence). Trained: the hypernetwork LoRA and the gist embeddings; optionally
(`downstream_lora_rank > 0`, the paper's downstream adaptation) a second LoRA that only the
downstream pass uses.
"""
from typing import Dict, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from hypertune.models import llama as llama_lib
from hypertune.models.llama import LlamaConfig
from hypertune.models.peft import MLP_KIND, LoRA, PeftParams, Prefix


class SharedLoRA(nn.Module):
  """One LoRA per layer on the chosen projections, broadcast over the batch.

  `projections`: attention "q", "k", "v", "o" (PeftParams key "decoder_self/P") and/or the
  SwiGLU MLP's "gate", "up", "down" ("decoder_mlp/P"; QLoRA tunes all seven).
  down `[layers, rank, in]` (random), up `[layers, out, rank]` (zero: starts as the base model).
  """
  config: LlamaConfig
  rank: int
  alpha: float
  projections: Sequence[str] = ("q", "k", "v", "o")

  @nn.compact
  def __call__(self, batch: int) -> Dict[str, LoRA]:
    cfg = self.config
    kv = cfg.num_kv_heads * cfg.head_dim
    # projection -> (PeftParams key, parameter name prefix, d_in, d_out, logical axes of in/out)
    attn = lambda p, d_in, d_out: (f"decoder_self/{p}", p, d_in, d_out, "embed", "embed")
    mlp = lambda p, d_in, d_out, ax_in, ax_out: (f"{MLP_KIND}/{p}", f"mlp_{p}", d_in, d_out,
                                                 ax_in, ax_out)
    specs = {"q": attn("q", cfg.d_model, cfg.inner_dim), "k": attn("k", cfg.d_model, kv),
             "v": attn("v", cfg.d_model, kv), "o": attn("o", cfg.inner_dim, cfg.d_model),
             "gate": mlp("gate", cfg.d_model, cfg.d_ff, "embed", "mlp"),
             "up": mlp("up", cfg.d_model, cfg.d_ff, "embed", "mlp"),
             "down": mlp("down", cfg.d_ff, cfg.d_model, "mlp", "embed")}
    unknown = [p for p in self.projections if p not in specs]
    if unknown or len(set(self.projections)) != len(self.projections) or not self.projections:
      raise ValueError(f"SharedLoRA.projections={tuple(self.projections)!r}: expected distinct "
                       f"names from {tuple(specs)}")
    out = {}
    for proj in self.projections:
      key, pname, d_in, d_out, ax_in, ax_out = specs[proj]
      down = self.param(f"{pname}_down", nn.with_logical_partitioning(
          nn.initializers.normal(d_in**-0.5), ("layers", "lora_rank", ax_in)),
          (cfg.num_layers, self.rank, d_in), jnp.float32)
      up = self.param(f"{pname}_up", nn.with_logical_partitioning(
          nn.initializers.zeros, ("layers", ax_out, "lora_rank")),
          (cfg.num_layers, d_out, self.rank), jnp.float32)
      out[key] = LoRA(
          down=jnp.broadcast_to(down, (batch,) + down.shape),
          up=jnp.broadcast_to(up, (batch,) + up.shape), scale=self.alpha / self.rank)
    return out


@gin.configurable
class Gisting(nn.Module):
  """`hyper_tokens [batch, hyper_len]` -> PeftParams(gist prefix, position offset[, LoRA]).

  `hyper_tokens [batch, sets, hyper_len]`: several demonstration sets per example; their gists'
  keys and values are averaged (appendix B)."""
  config: LlamaConfig
  num_gist_tokens: int = 16
  lora_rank: int = 8
  lora_alpha: float = 16.0
  downstream_lora_rank: int = 0  # > 0: the paper's downstream adaptation
  # Projections of both LoRAs (SharedLoRA.projections); add "gate", "up", "down" for the MLP.
  lora_projections: Sequence[str] = ("q", "k", "v", "o")
  averages_demonstration_sets = True  # hyper_tokens may be [batch, sets, hyper_len]

  @nn.compact
  def __call__(self, hyper_tokens, deterministic: bool = True, downstream=None) -> PeftParams:
    if downstream is None:
      raise ValueError("Gisting runs inside the downstream Llama: use it as the `hypernet` of "
                       "decoder_only.HyperCausalLM")
    cfg, g = self.config, self.num_gist_tokens
    batch = hyper_tokens.shape[0]
    sets = hyper_tokens.shape[1] if hyper_tokens.ndim == 3 else 1
    rows = hyper_tokens.reshape(batch * sets, hyper_tokens.shape[-1])
    gists = self.param("gist_embeddings", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("hyper_tokens", "embed")), (g, cfg.d_model), jnp.float32)
    tokens, mask = llama_lib.prompt(cfg, rows)  # [BOS ; demonstrations], right-aligned
    embedded = jnp.concatenate([downstream.embed(tokens), jnp.broadcast_to(
        gists.astype(cfg.compute_dtype), (batch * sets, g, cfg.d_model))], axis=1)
    key_mask = jnp.concatenate([mask, jnp.ones((batch * sets, g), bool)], axis=1)
    # Appendix B: each set starts at an initial offset that ends its gists where the longest
    # set of its example ends them, so the gists of all sets sit at the same positions.
    lengths = jnp.sum(mask, axis=1).reshape(batch, sets)
    end = jnp.max(lengths, axis=1)  # [batch]
    initial_offset = (end[:, None] - lengths).reshape(-1)
    hyper_lora = SharedLoRA(cfg, self.lora_rank, self.lora_alpha, tuple(self.lora_projections),
                            name="hyper_lora")(batch * sets)
    _, (keys, values) = downstream.hidden(
        embedded, llama_lib.positions_of(key_mask, initial_offset),
        llama_lib.causal_mask(key_mask), PeftParams(lora=hyper_lora), deterministic, kv_last=g)

    def average(x):  # [layers, batch * sets, G, kv_heads, head_dim] -> [batch, layers, G, ...]
      x = x.reshape((x.shape[0], batch, sets) + x.shape[2:]).mean(axis=2)
      return jnp.moveaxis(x, 0, 1)

    prefix = Prefix(average(keys), average(values))
    lora = {}
    if self.downstream_lora_rank:
      lora = SharedLoRA(cfg, self.downstream_lora_rank, self.lora_alpha,
                        tuple(self.lora_projections), name="downstream_lora")(batch)
    return PeftParams(prefixes={"decoder_self": prefix}, lora=lora,
                      position_offset=end.astype(jnp.int32) + g)
