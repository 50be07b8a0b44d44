"""The model contract: all that the trainer, the evaluator, `hypertune.infer` and the benchmarks
know of a model (t5x's `BaseModel`, for hypernetworks).

    model.batch_shapes(batch_size, task_feature_lengths)   -> {feature: shape}
    model.init_variables(rng, batch_shapes)                -> variables (boxed, every collection)
    model.loss(params, method_state, batch, rng, total_weight)
                                                           -> (loss, (metrics, new_method_state))
    model.task_parameters(params, method_state, hyper_tokens)   -> TaskParams | None (once per task)
    model.score(params, task_params, batch)                -> [batch] summed target log-likelihood
    model.predict(params, task_params, batch, max_decode_len, num_beams) -> [batch, max_decode_len]
    model.pretrained_params(path)                          -> {"downstream": ...} from a HF directory

`TaskParams` is the per-example PEFT container (`hypertune.models.peft.PeftParams`): prefixes,
LoRA, adapters and whatever the downstream model reads at query time (fusion-in-decoder memory
in `extra_memory`). It is written once per task from its demonstrations and then serves every
query, so evaluation and deployment never call the hypernetwork per query.

Batches are the data layer's features (`hypertune.data.feature_converters`):
`hyper_encoder_input_tokens` `[batch, hyper_len]`, `encoder_input_tokens` `[batch, inputs_len]`,
`decoder_input_tokens` / `decoder_target_tokens` / `decoder_loss_weights` `[batch, targets_len]`.
A decoder-only downstream reads the same features and lays them out as it needs.
"""
import abc
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from hypertune.models.peft import PeftParams

TaskParams = PeftParams
TARGET_FEATURES = ("decoder_target_tokens", "decoder_loss_weights")


def cross_entropy(logits, targets, weights) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights, number of correct weighted tokens)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct * weights)


def sown_losses(mutated: Mapping, num_microbatches: int = 1) -> Dict[str, jax.Array]:
  """{"path/of/loss": value} of the auxiliary losses sown into the `losses` collection."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(mutated.get("losses", {})))
  return {"/".join(k): jnp.sum(jnp.stack([jnp.asarray(x) for x in v])) / num_microbatches
          for k, v in flat.items()}


class BaseModel(abc.ABC):
  """A downstream model, optionally adapted per example by a hypernetwork.

  Subclasses hold a flax `module` and implement `logits`, `task_parameters`, `score` and
  `predict`; `loss` (token cross-entropy plus sown auxiliary losses) is shared.
  """
  # Batch features the model reads (the trainer feeds it these and the targets).
  FEATURES: Tuple[str, ...] = ("encoder_input_tokens", "decoder_input_tokens",
                               "hyper_encoder_input_tokens")
  module: nn.Module

  @property
  def has_hypernet(self) -> bool:
    """Whether `task_parameters` writes anything (False: a plain downstream model)."""
    return True

  @property
  def averages_demonstration_sets(self) -> bool:
    """Whether `task_parameters` also takes hyper_tokens `[batch, sets, hyper_len]` and
    averages what the sets generate (HyperLlama's gists, appendix B)."""
    return False

  def batch_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int]
                   ) -> Dict[str, Tuple[int, int]]:
    """Shapes of the features this model reads, for initialisation and sharding."""
    length = {"encoder_input_tokens": "inputs", "decoder_input_tokens": "targets",
              "hyper_encoder_input_tokens": "hyper_inputs"}
    return {f: (batch_size, task_feature_lengths[length[f]]) for f in self.FEATURES
            if f != "hyper_encoder_input_tokens" or self.has_hypernet}

  def model_inputs(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: batch[k] for k in self.FEATURES if k in batch}

  def init_variables(self, rng, batch_shapes: Mapping[str, Tuple[int, ...]]):
    """Boxed variables of every collection, for dummy features of the given shapes."""
    dummy = {k: jnp.ones(s, jnp.int32) for k, s in batch_shapes.items()}
    return self.module.init(rng, **dummy)

  @abc.abstractmethod
  def logits(self, params, method_state, batch, rng, deterministic: bool = False):
    """(logits `[batch, targets_len, vocab]` of the targets, mutated collections)."""

  def loss(self, params, method_state, batch, rng, total_weight, num_microbatches: int = 1):
    """(loss, (metrics, new method state)): cross-entropy over `decoder_loss_weights`, divided
    by `total_weight` (the target tokens of the whole batch, so microbatching does not change
    it), plus the auxiliary losses the model sows into `losses`."""
    logits, mutated = self.logits(params, method_state, batch, rng)
    ce_sum, _, correct = cross_entropy(logits, batch["decoder_target_tokens"],
                                       batch["decoder_loss_weights"])
    aux = sown_losses(mutated, num_microbatches)
    loss = ce_sum / total_weight + sum(aux.values())
    metrics = {"cross_entropy": ce_sum / total_weight, "accuracy": correct / total_weight, **aux}
    new_state = {"method_state": mutated["method_state"]} if "method_state" in mutated else {}
    return loss, (metrics, new_state)

  @abc.abstractmethod
  def task_parameters(self, params, method_state, hyper_tokens) -> Optional[TaskParams]:
    """hyper_tokens `[batch, hyper_len]` -> TaskParams (per row), or None without a hypernet."""

  @abc.abstractmethod
  def score(self, params, task_params: Optional[TaskParams], batch) -> jax.Array:
    """`[batch]` float32: summed log-likelihood of `decoder_target_tokens` (weights > 0)."""

  @abc.abstractmethod
  def predict(self, params, task_params: Optional[TaskParams], batch, max_decode_len: int,
              num_beams: int = 1) -> jax.Array:
    """`[batch, max_decode_len]` token ids of the best output per row (pad after EOS)."""

  def pretrained_params(self, path: str) -> dict:
    """Parameters from a Hugging Face directory, as a partial tree of this model's params."""
    raise NotImplementedError(f"{type(self).__name__} cannot read Hugging Face checkpoints")


class HyperModuleModel(BaseModel):
  """A model around a flax module that reads the batch features, adapted by its optional
  `hypernet` through its `generate_peft` (`hypermodel.HyperModel`,
  `decoder_only.HyperCausalLM`)."""

  def __init__(self, module: nn.Module = gin.REQUIRED):
    self.module = module

  @property
  def config(self):
    return self.module.config

  @property
  def has_hypernet(self) -> bool:
    return self.module.hypernet is not None

  @property
  def averages_demonstration_sets(self) -> bool:
    return getattr(self.module.hypernet, "averages_demonstration_sets", False)

  def logits(self, params, method_state, batch, rng, deterministic: bool = False):
    return self.module.apply({"params": params, **method_state}, **self.model_inputs(batch),
                             deterministic=deterministic, rngs={"dropout": rng},
                             mutable=["losses", "method_state"])

  def task_parameters(self, params, method_state, hyper_tokens) -> Optional[TaskParams]:
    if not self.has_hypernet:
      return None
    return self.module.apply({"params": params, **(method_state or {})}, hyper_tokens,
                             method=type(self.module).generate_peft)


@gin.configurable
class EncoderDecoderModel(HyperModuleModel):
  """A T5 downstream with an optional hypernetwork (`hypertune.models.hypermodel.HyperModel`)."""

  def _downstream(self):
    from hypertune.models.t5 import T5  # pylint: disable=g-import-not-at-top
    return T5(self.module.config)

  def score(self, params, task_params, batch) -> jax.Array:
    from hypertune.models import decoding  # pylint: disable=g-import-not-at-top
    return decoding.token_log_likelihood(
        self._downstream(), params["downstream"], batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], batch["decoder_target_tokens"], task_params,
        batch.get("decoder_loss_weights"))[0]

  def predict(self, params, task_params, batch, max_decode_len: int, num_beams: int = 1):
    from hypertune.models import decoding  # pylint: disable=g-import-not-at-top
    enc = batch["encoder_input_tokens"]
    if num_beams > 1:
      return decoding.beam_search(self._downstream(), params["downstream"], enc, task_params,
                                  max_decode_len=max_decode_len, num_beams=num_beams)[0][:, 0]
    return decoding.greedy_decode(self._downstream(), params["downstream"], enc, task_params,
                                  max_decode_len=max_decode_len)

  def pretrained_params(self, path: str) -> dict:
    from hypertune.models import hf_convert  # pylint: disable=g-import-not-at-top
    _, hf_params = hf_convert.load_hf_t5(path, config=self.config)
    return {"downstream": hf_params}
