"""HART (Ding et al., "HART: Efficient Adaptation via Regularized Autoregressive Parameter
Generation", sections 3 and 6.1.2).

The hyper encoder (a T5 encoder) reads the demonstrations; the hyper decoder (the first 8
layers of the downstream decoder, unmasked) generates one state per downstream layer,
autoregressively: `h_1 = H_dec(z)`, `h_l = H_dec(h_{l-1})`, each state 2 tokens `[2, d]`
cross-attending to the encoded demonstrations. Token 0 of `h_l` becomes layer l's encoder
prefixes, token 1 its decoder prefixes (`LayerwisePrefixHead`).

    hyper_input_tokens [batch, hyper_len]
      -> hyper_encoder                      [batch, hyper_len, d]
      -> L steps of hyper_decoder (scanned) [batch, L, 2, d]   (the states h_1..h_L)
      -> heads                              prefixes [batch, L, P, heads, head_dim]

Local consistency regularisation: `consistency_alpha * MSE(states_t, states_{t-1})`, sown into
the `losses` collection; the previous step's states (constants) live in `method_state`, one row
per example (`[batch, L, 2, d]`), so they are checkpointed with the train state and split with
the batch into microbatches. Fusion-in-decoder (`fusion_in_decoder`): the downstream decoder also
cross-attends to the encoded demonstrations (`PeftParams.extra_memory`).

Table 5's ladder is gin switches: `autoregressive=False` reads 2L learned tokens in one
non-causal decoder pass (same heads); `consistency_alpha=0` drops the regulariser;
`fusion_in_decoder=False` drops the fused memory.
"""
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from hypertune.hypernets.heads import LayerwisePrefixHead
from hypertune.models.config import T5Config
from hypertune.models.peft import PeftParams, Prefix
from hypertune.models.t5 import Decoder, Encoder

STATE_TOKENS = 2  # token 0 -> encoder prefixes, token 1 -> decoder prefixes


class LocalConsistency(nn.Module):
  """Sows `alpha * MSE(states, the previous step's states)` into `losses` (0 at the first step)
  and stores `states` for the next step, while training (`method_state` mutable); a no-op in
  evaluation and inference.

  `previous_states` `[batch, L, 2, d]` and `has_previous` `[batch]`: one row per example, the
  layout `train_lib.train_step` splits into microbatches along with the batch.
  """
  alpha: float

  @nn.compact
  def __call__(self, states):
    if not self.is_mutable_collection("method_state"):
      return
    states = states.astype(jnp.float32)
    previous = self.variable("method_state", "previous_states", jnp.zeros, states.shape,
                             jnp.float32)
    has_previous = self.variable("method_state", "has_previous", jnp.zeros, states.shape[:1],
                                 jnp.float32)
    if self.is_initializing():
      return
    # The previous states are constants: the gradient flows through this step's states only.
    sq = jnp.square(states - previous.value)
    per_row = jnp.mean(sq, axis=tuple(range(1, sq.ndim))) * has_previous.value
    self.sow("losses", "consistency", self.alpha * jnp.mean(per_row))
    previous.value = jax.lax.stop_gradient(states)
    has_previous.value = jnp.ones_like(has_previous.value)


@gin.configurable
class HART(nn.Module):
  """HART's hypernetwork.

  Attributes:
    config: the hypernetwork's T5 backbone (usually the downstream config).
    downstream: config of the model whose prefixes are generated (as many encoder as decoder
      layers: one state serves both).
    prefix_len: P, prefix tokens per layer and attention kind (paper: 32).
    num_hyper_decoder_layers: keep only the first N decoder layers (paper: 8; None: all).
    autoregressive: generate the states step by step (off: one pass over 2L learned tokens).
    attend_to_history: a step also self-attends to every earlier state (off, the paper's
      equations: step l reads only h_{l-1}).
    consistency_alpha: weight of the local consistency loss (paper: 1, 5, 10 or 20; 0: off).
    fusion_in_decoder: the downstream decoder cross-attends to the encoded demonstrations too.
  """
  config: T5Config
  downstream: T5Config
  prefix_len: int = 32
  num_hyper_decoder_layers: Optional[int] = 8
  autoregressive: bool = True
  attend_to_history: bool = False
  consistency_alpha: float = 0.0
  fusion_in_decoder: bool = True

  def setup(self):
    cfg, ds = self.config, self.downstream
    if ds.num_encoder_layers != ds.num_decoder_layers:
      raise ValueError("HART generates one state per layer for both stacks and needs "
                       "num_encoder_layers == num_decoder_layers in the downstream config")
    if self.fusion_in_decoder and cfg.d_model != ds.d_model:
      raise ValueError(f"HART.fusion_in_decoder needs the hypernetwork's d_model ({cfg.d_model}) "
                       f"to equal the downstream's ({ds.d_model})")
    if self.attend_to_history and not self.autoregressive:
      raise ValueError("HART.attend_to_history needs autoregressive=True")
    dec_cfg = cfg.replace(num_decoder_layers=min(self.num_hyper_decoder_layers or
                                                 cfg.num_decoder_layers, cfg.num_decoder_layers))
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    self.hyper_encoder = Encoder(cfg)
    self.hyper_decoder = Decoder(dec_cfg, causal=False)
    # z: the first step's input (autoregressive), or all L states' learned tokens (not).
    num_tokens = STATE_TOKENS if self.autoregressive else STATE_TOKENS * ds.num_encoder_layers
    self.decoder_tokens = self.param(
        "decoder_tokens", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                       ("hyper_tokens", "embed")),
        (num_tokens, cfg.d_model), jnp.float32)
    self.heads = {name: LayerwisePrefixHead(ds.num_encoder_layers, self.prefix_len,
                                            ds.inner_dim, dtype=cfg.dtype, name=f"{name}_head")
                  for name in ("enc_k", "enc_v", "dec_k", "dec_v")}
    if self.consistency_alpha > 0:
      self.consistency = LocalConsistency(self.consistency_alpha)

  def states(self, encoded, mask, deterministic: bool = True):
    """The L generated states `[batch, L, 2, d]` from encoded demonstrations `[batch, len, d]`."""
    batch, layers = encoded.shape[0], self.downstream.num_encoder_layers
    z = jnp.broadcast_to(self.decoder_tokens.astype(self.config.compute_dtype),
                         (batch,) + self.decoder_tokens.shape)
    if not self.autoregressive:
      hidden = self.hyper_decoder(z, encoded, mask, None, deterministic)
      return hidden.reshape(batch, layers, STATE_TOKENS, -1)
    if self.attend_to_history:
      return self._states_with_history(z, encoded, mask, layers, deterministic)

    def step(module, previous, _):  # h_l = H_dec(h_{l-1})
      h = module.hyper_decoder(previous, encoded, mask, None, deterministic)
      return h, h

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False,
                                                                  "dropout": True},
                   length=layers)
    _, hidden = scan(self, z, None)  # [L, batch, 2, d]
    return jnp.moveaxis(hidden, 0, 1)

  def _states_with_history(self, z, encoded, mask, layers: int, deterministic: bool):
    """Step l reads `[z; h_1; ...; h_{l-1}]` (a buffer of L+1 states, later ones masked out)
    and its last two outputs are h_l."""
    batch, n = z.shape[0], STATE_TOKENS
    buffer = jnp.zeros((batch, (layers + 1) * n, z.shape[-1]), z.dtype).at[:, :n].set(z)
    positions = jnp.arange((layers + 1) * n)

    def step(module, buffer, l):  # l = 0 .. L-1: inputs are states 0..l, the output h_{l+1}
      key_mask = jnp.broadcast_to(positions < (l + 1) * n, buffer.shape[:2])
      out = module.hyper_decoder(buffer, encoded, mask, None, deterministic, key_mask=key_mask)
      h = jax.lax.dynamic_slice_in_dim(out, l * n, n, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(buffer, h.astype(buffer.dtype), (l + 1) * n,
                                                 axis=1), h

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False,
                                                                  "dropout": True},
                   length=layers)
    _, hidden = scan(self, buffer, jnp.arange(layers))
    return jnp.moveaxis(hidden, 0, 1)

  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    """hyper_input_tokens `[batch, hyper_len]` -> prefixes (+ fused memory) for `downstream`."""
    cfg, ds = self.config, self.downstream
    mask = hyper_input_tokens != cfg.pad_id
    encoded = self.hyper_encoder(self.token_embedder(hyper_input_tokens), mask, None,
                                 deterministic)
    states = self.states(encoded, mask, deterministic)  # [batch, L, 2, d]
    if self.consistency_alpha > 0:
      self.consistency(states)
    batch, layers, p = states.shape[0], ds.num_encoder_layers, self.prefix_len

    def prefix(name, token):  # [batch, L, d] -> [batch, L, P, heads, head_dim]
      out = self.heads[name](states[:, :, token])
      return out.reshape(batch, layers, p, ds.num_heads, ds.d_kv)

    enc = Prefix(prefix("enc_k", 0), prefix("enc_v", 0))
    dec = Prefix(prefix("dec_k", 1), prefix("dec_v", 1))
    peft = PeftParams(prefixes={"encoder_self": enc, "decoder_self": dec, "decoder_cross": dec})
    if self.fusion_in_decoder:
      peft = peft.replace(extra_memory=encoded, extra_memory_mask=mask)
    return peft
