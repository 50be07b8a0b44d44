"""HyperT5 (Phang et al., "HyperTuning", section 4 and appendix Figures 7-8).

A T5 encoder reads `hyper_inputs` (few-shot examples / instruction); a T5 decoder *without causal
mask* reads a fixed set of learned token embeddings (2P for prefixes, 3P with separate
cross-attention prefixes, 3L for LoRA) while cross-attending to it; MLP heads turn the decoder
outputs into the downstream model's PEFT parameters. Both stacks can be initialised from the
downstream T5 (`init_from_downstream`).

    hyper_input_tokens [batch, hyper_len]
      -> hyper_encoder            [batch, hyper_len, d]
      -> hyper_decoder(tokens)    [batch, 2P | 3P | 3L, d]
      -> heads                    PeftParams (prefixes [batch, layers, P, heads, head_dim]
                                              or LoRA on q, v of every attention kind)
"""
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from hypertune.hypernets.heads import MLPHead, to_prefix
from hypertune.models.config import T5Config
from hypertune.models.peft import LoRA, PeftParams, Prefix
from hypertune.models.t5 import Decoder, Encoder


@gin.configurable
class HyperT5(nn.Module):
  """HyperT5-Prefix (`peft_type="prefix"`) or HyperT5-LoRA (`peft_type="lora"`).

  Attributes:
    config: the hypermodel's T5 backbone (usually the downstream config).
    downstream: config of the model whose PEFT parameters are generated.
    num_hyper_decoder_layers: keep only the first N decoder layers (None: all).
    prefix_len: P, prefix tokens per layer and attention kind.
    lora_rank: R.
    hyper_decoder_bidirectional_positions: bucket the hyper decoder's relative positions
      bidirectionally (as the encoder does). Off (default): bucket them one-way, as the causal
      downstream decoder whose table the hyper decoder is initialised from was trained (keys
      after the query share the distance-0 bucket); only the causal mask is removed (section 4.1).
    separate_cross_prefixes: HyperT5-Prefix only. Off (default, the paper's [L, 2, 2, P, H]):
      the decoder's prefixes serve its self- and cross-attention. On: 3P learned tokens and
      `cross_k`/`cross_v` heads give the decoder's cross-attention prefixes of its own.
    fusion_in_decoder: the downstream decoder also cross-attends to the encoded demonstrations
      (`PeftParams.extra_memory`; HART's "HyperTuning" row, Table 5).
  """
  config: T5Config
  downstream: T5Config
  peft_type: str = "prefix"
  prefix_len: int = 16
  lora_rank: int = 8
  num_hyper_decoder_layers: Optional[int] = None
  hyper_decoder_bidirectional_positions: bool = False
  separate_cross_prefixes: bool = False
  fusion_in_decoder: bool = False

  def setup(self):
    cfg = self.config
    if self.peft_type not in ("prefix", "lora"):
      raise ValueError(f"HyperT5.peft_type must be 'prefix' or 'lora', got {self.peft_type!r}")
    if self.fusion_in_decoder and cfg.d_model != self.downstream.d_model:
      raise ValueError(f"HyperT5.fusion_in_decoder needs the hypernetwork's d_model "
                       f"({cfg.d_model}) to equal the downstream's ({self.downstream.d_model})")
    if self.separate_cross_prefixes and self.peft_type != "prefix":
      raise ValueError("HyperT5.separate_cross_prefixes needs peft_type='prefix' (HyperT5-LoRA "
                       "already generates cross-attention LoRA of its own)")
    dec_cfg = cfg.replace(num_decoder_layers=self.num_hyper_decoder_layers or
                          cfg.num_decoder_layers)
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    self.hyper_encoder = Encoder(cfg)
    self.hyper_decoder = Decoder(
        dec_cfg, causal=False,
        bidirectional_positions=self.hyper_decoder_bidirectional_positions)
    ds = self.downstream
    if self.peft_type == "prefix":
      kinds = (("enc", ds.num_encoder_layers), ("dec", ds.num_decoder_layers))
      if self.separate_cross_prefixes:
        kinds += (("cross", ds.num_decoder_layers),)
      num_tokens = len(kinds) * self.prefix_len
      self.heads = {f"{kind}_{kv}": MLPHead(cfg.d_model, n * ds.inner_dim, dtype=cfg.dtype,
                                            name=f"{kind}_{kv}_head")
                    for kind, n in kinds for kv in ("k", "v")}
    else:
      if ds.num_encoder_layers != ds.num_decoder_layers:
        raise ValueError("HyperT5-LoRA generates one token per layer of each attention kind and "
                         "needs num_encoder_layers == num_decoder_layers in the downstream config")
      num_tokens = 3 * ds.num_encoder_layers
      width = self.lora_rank * (ds.d_model + ds.inner_dim)  # down [R, d_model] + up [inner, R]
      self.heads = {f"{kind}_{proj}": MLPHead(cfg.d_model, width, dtype=cfg.dtype,
                                              name=f"{kind}_{proj}_head")
                    for kind in ("enc", "dec", "cross") for proj in ("q", "v")}
      # tanh(0) = 0: generated deltas start at exactly zero and the gates learn to open.
      self.gates = {name: self.param(f"{name}_gate", nn.with_logical_partitioning(
          nn.initializers.zeros, ("layers",)), (ds.num_encoder_layers,), jnp.float32)
                    for name in self.heads}
    self.decoder_tokens = self.param(
        "decoder_tokens", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                       ("hyper_tokens", "embed")),
        (num_tokens, cfg.d_model), jnp.float32)

  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    """hyper_input_tokens `[batch, hyper_len]` -> PeftParams for `self.downstream` (with the
    encoded demonstrations as fused memory under `fusion_in_decoder`)."""
    cfg = self.config
    mask = hyper_input_tokens != cfg.pad_id
    encoded = self.hyper_encoder(self.token_embedder(hyper_input_tokens), mask, None,
                                 deterministic)
    tokens = jnp.broadcast_to(self.decoder_tokens.astype(cfg.compute_dtype),
                              (mask.shape[0],) + self.decoder_tokens.shape)
    hidden = self.hyper_decoder(tokens, encoded, mask, None, deterministic)  # [batch, n, d]
    peft = self.prefixes(hidden) if self.peft_type == "prefix" else self.lora(hidden)
    if self.fusion_in_decoder:
      peft = peft.replace(extra_memory=encoded, extra_memory_mask=mask)
    return peft

  def prefixes(self, hidden) -> PeftParams:
    """Hyper decoder outputs `[batch, 2P | 3P, d]` -> prefixes of every attention kind."""
    ds = self.downstream
    p = self.prefix_len

    def prefix(name, rows, layers):  # [batch, P, d] -> [batch, layers, P, heads, head_dim]
      return to_prefix(self.heads[name](rows), p, layers, ds)

    enc = Prefix(prefix("enc_k", hidden[:, :p], ds.num_encoder_layers),
                 prefix("enc_v", hidden[:, :p], ds.num_encoder_layers))
    dec = Prefix(prefix("dec_k", hidden[:, p:2 * p], ds.num_decoder_layers),
                 prefix("dec_v", hidden[:, p:2 * p], ds.num_decoder_layers))
    if not self.separate_cross_prefixes:
      # The decoder's prefixes serve its self- and cross-attention (the paper's [L, 2, 2, P, H]).
      return PeftParams(prefixes={"encoder_self": enc, "decoder_self": dec,
                                  "decoder_cross": dec})
    cross = Prefix(prefix("cross_k", hidden[:, 2 * p:], ds.num_decoder_layers),
                   prefix("cross_v", hidden[:, 2 * p:], ds.num_decoder_layers))
    return PeftParams(prefixes={"encoder_self": enc, "decoder_self": dec,
                                "decoder_cross": cross})

  def lora(self, hidden) -> PeftParams:
    """Hyper decoder outputs `[batch, 3L, d]` -> gated LoRA on q and v of every attention kind."""
    ds = self.downstream
    batch, layers, r = hidden.shape[0], ds.num_encoder_layers, self.lora_rank
    lora = {}
    for i, (short, kind) in enumerate((("enc", "encoder_self"), ("dec", "decoder_self"),
                                       ("cross", "decoder_cross"))):
      rows = hidden[:, i * layers:(i + 1) * layers]  # [batch, layers, d]
      for proj in ("q", "v"):
        name = f"{short}_{proj}"
        out = self.heads[name](rows)
        down = out[..., :r * ds.d_model].reshape(batch, layers, r, ds.d_model)
        up = out[..., r * ds.d_model:].reshape(batch, layers, ds.inner_dim, r)
        gate = jnp.tanh(self.gates[name])[None, :, None, None]
        lora[f"{kind}/{proj}"] = LoRA(down=down, up=up * gate)
    return PeftParams(lora=lora)


# Hypernetwork sub-tree (HyperT5, HART, HINT's untied encoder) -> the downstream sub-tree
# `init_from_downstream` copies it from.
COPIED_FROM_DOWNSTREAM = {"token_embedder": "token_embedder", "hyper_encoder": "encoder",
                          "hyper_decoder": "decoder"}


def downstream_source(path: str) -> Optional[str]:
  """"hypernet/hyper_encoder/x" -> "downstream/encoder/x" (None if not copied)."""
  parts = path.split("/")
  if len(parts) > 2 and parts[0] == "hypernet" and parts[1] in COPIED_FROM_DOWNSTREAM:
    return "/".join(["downstream", COPIED_FROM_DOWNSTREAM[parts[1]]] + parts[2:])
  return None


def init_from_downstream(hypernet_params: dict, downstream_params: dict) -> dict:
  """Hypernetwork parameters with whichever of embeddings, encoder and (truncated) decoder it
  has (HyperT5 and HART: all three; HINT untied: the first two) copied from the downstream T5.

  Works on unboxed trees with scanned layers (the leading `layers` axis of the hyper decoder is
  cut to its own depth).
  """
  copy = lambda tree: jax.tree.map(np.array, tree)  # own buffers: no aliasing with downstream
  out = dict(hypernet_params)
  for ours in ("token_embedder", "hyper_encoder"):
    if ours in hypernet_params:  # HINT's tied encoder has neither
      out[ours] = copy(downstream_params[COPIED_FROM_DOWNSTREAM[ours]])

  def take(ours, theirs):
    if isinstance(ours, dict):
      return {k: take(ours[k], theirs[k]) for k in ours}
    theirs = np.asarray(theirs)
    if theirs.shape == ours.shape:
      return theirs
    if theirs.shape[1:] == ours.shape[1:] and theirs.shape[0] > ours.shape[0]:
      return theirs[:ours.shape[0]]  # truncated stack: the first N layers
    raise ValueError(f"cannot initialise hyper decoder parameter of shape {ours.shape} from "
                     f"downstream shape {theirs.shape}")
  if "hyper_decoder" in hypernet_params:
    out["hyper_decoder"] = take(hypernet_params["hyper_decoder"],
                                downstream_params[COPIED_FROM_DOWNSTREAM["hyper_decoder"]])
  return out
