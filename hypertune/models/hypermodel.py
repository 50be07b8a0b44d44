"""A downstream T5 adapted per example by a hypernetwork: the one model every method trains.

Methods differ only in `hypernet`, a module
`hypernet(hyper_input_tokens, deterministic, downstream) -> PeftParams` (`downstream` is this
model's T5, for a hypernetwork that shares its weights, as HINT's tied encoder):
  HyperT5 (prefix / LoRA), HART, HINT, SharedPeft (one PEFT set for all tasks), or None (plain
  T5-MTF, and T5-MTF-few-shot whose demonstrations are concatenated into `inputs` by the data
  layer).

Parameters: `{"downstream": T5 params, "hypernet": hypernetwork params}`. Auxiliary losses are
sown into the `losses` collection by any submodule and added to the loss by the train step;
state a method carries between steps lives in the `method_state` collection.
"""
from typing import Optional

import flax.linen as nn
import gin

from hypertune.models.config import T5Config
from hypertune.models.peft import PeftParams
from hypertune.models.t5 import T5


@gin.configurable
class HyperModel(nn.Module):
  config: T5Config
  hypernet: Optional[nn.Module] = None

  def setup(self):
    self.downstream = T5(self.config)

  def generate_peft(self, hyper_encoder_input_tokens, deterministic: bool = True
                    ) -> Optional[PeftParams]:
    """PEFT parameters per example `[batch, ...]` (None for a plain T5)."""
    if self.hypernet is None:
      return None
    return self.hypernet(hyper_encoder_input_tokens, deterministic=deterministic,
                         downstream=self.downstream)

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               hyper_encoder_input_tokens=None, peft: Optional[PeftParams] = None,
               deterministic: bool = True):
    """Teacher-forced logits `[batch, dec_len, vocab]`.

    `peft` given: used as is (parameters generated once per task at deployment); otherwise
    generated from `hyper_encoder_input_tokens` `[batch, hyper_len]`.
    """
    if peft is None and self.hypernet is not None:
      if hyper_encoder_input_tokens is None:
        raise ValueError("this model has a hypernetwork: the batch needs "
                         "'hyper_encoder_input_tokens' (or pass generated `peft`)")
      peft = self.generate_peft(hyper_encoder_input_tokens, deterministic)
    return self.downstream(encoder_input_tokens, decoder_input_tokens, peft, deterministic)
