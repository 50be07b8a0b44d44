"""T5 configurations: one frozen dataclass covers T5 v1.1 / LM-adapted T5 and original T5.

Sizes follow the published checkpoints; `t5_config("base")` etc. are what gin files bind, e.g.

    MODEL_CONFIG = @t5_config()
    t5_config.size = "base"
"""
import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shape and flavour of a T5 encoder-decoder.

  `mlp_activation="gated-gelu"` + untied `lm_head` is T5 v1.1 / LM-adapted T5;
  `mlp_activation="relu"` + `tie_word_embeddings=True` is the original T5 (logits scaled by
  `d_model**-0.5`). `num_heads * d_kv` need not equal `d_model`.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  mlp_activation: str = "gated-gelu"  # "gated-gelu" (v1.1) or "relu" (original T5)
  tie_word_embeddings: bool = False  # logits from the token embedding (no separate lm_head)
  # Multiply decoder outputs by d_model**-0.5 before the logits; None = as tie_word_embeddings
  # (original T5). Hugging Face >= 5 ties every T5 and stores this flag on its own.
  scale_decoder_outputs: Optional[bool] = None
  dtype: str = "float32"  # compute dtype; parameters are always stored in float32
  scan_layers: bool = True  # nn.scan over layers (fast compile); False unrolls them
  # Layers per iteration of the scanned loop (lax.scan's unroll; parameters stay stacked). On
  # XLA:CPU 2 took back two thirds of the loop's cost against unrolled layers (4.57 -> 4.05 s a
  # t5-small step, unrolled 3.79; bench/t5_step.py --scan_unroll, docs/performance.md).
  scan_unroll: int = 1
  # bfloat16 on CPU: the backward matmuls of the dense projections read row-major copies of their
  # transposed operands, which XLA:CPU multiplies natively in bf16 (else in float32, at about
  # half the speed; bench/xla_cpu_ops.py). GPUs and TPUs need no copies: leave it off there.
  bf16_transposed_copies: bool = False
  remat: bool = False  # rematerialise each layer in the backward pass (saves memory)
  # What a rematerialised layer keeps for the backward pass: "full" its input only (least
  # memory); "dense" also every dense projection's output, recomputing norms, attention and
  # activations. With scanned layers on XLA:CPU "dense" is also faster than no remat at all
  # (fewer stacked activations to zero and write: 3.15 against 3.73 s a t5-small step in one
  # run; docs/performance.md).
  remat_policy: str = "full"
  # Decoding (greedy, beam search) runs a scanned decoder's layers unrolled, from one unstacked
  # copy of their parameters: inside the decoding loop XLA:CPU otherwise slices every layer's
  # weights and caches at every step (greedy 4.67 -> 3.26 s; bench/generation.py). Costs that
  # copy.
  unrolled_decoding: bool = False
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def __post_init__(self):
    if self.mlp_activation not in ("gated-gelu", "relu"):
      raise ValueError(f"T5Config.mlp_activation must be 'gated-gelu' or 'relu', got "
                       f"{self.mlp_activation!r}")
    if self.remat_policy not in ("full", "dense"):
      raise ValueError(f"T5Config.remat_policy must be 'full' or 'dense', got "
                       f"{self.remat_policy!r}")
    if self.scan_unroll < 1:
      raise ValueError(f"T5Config.scan_unroll must be >= 1, got {self.scan_unroll}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"T5Config.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def scales_decoder_outputs(self) -> bool:
    if self.scale_decoder_outputs is None:
      return self.tie_word_embeddings
    return self.scale_decoder_outputs

  @property
  def inner_dim(self) -> int:
    """Width of the joined attention heads, `num_heads * d_kv`."""
    return self.num_heads * self.d_kv

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


# T5 v1.1 / LM-adapted sizes (gated-GELU, untied), plus tiny sizes for tests and the quickstart.
T5_SIZES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2,
                 num_decoder_layers=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32),
    "mini": dict(d_model=128, d_kv=32, d_ff=256, num_heads=4, num_encoder_layers=3,
                 num_decoder_layers=3, relative_attention_num_buckets=16,
                 relative_attention_max_distance=64),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_encoder_layers=8,
                  num_decoder_layers=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12,
                 num_decoder_layers=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_encoder_layers=24,
                  num_decoder_layers=24),
    "xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_encoder_layers=24,
               num_decoder_layers=24),
    "xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_encoder_layers=24,
                num_decoder_layers=24),
}


@gin.configurable
def t5_config(size: str = "small", vocab_size: Optional[int] = None, **overrides) -> T5Config:
  """A T5 v1.1 config of a named size, with any field overridden (gin binds this)."""
  if size not in T5_SIZES:
    raise ValueError(f"Unknown T5 size {size!r}; known sizes: {sorted(T5_SIZES)}")
  fields = dict(T5_SIZES[size])
  if vocab_size is not None:
    fields["vocab_size"] = vocab_size
  fields.update(overrides)
  return T5Config(**fields)


def config_from_hf(hf_config: dict, **overrides) -> T5Config:
  """T5Config from a Hugging Face `config.json` dict (T5 v1.1, LM-adapted, original T5)."""
  proj = hf_config.get("feed_forward_proj", "relu")
  if proj in ("gated-gelu",):
    activation = "gated-gelu"
  elif proj == "relu":
    activation = "relu"
  else:
    raise ValueError(f"config.json: feed_forward_proj={proj!r} is not supported "
                     "(expected 'gated-gelu' or 'relu')")
  fields = dict(
      vocab_size=hf_config["vocab_size"],
      d_model=hf_config["d_model"],
      d_kv=hf_config["d_kv"],
      d_ff=hf_config["d_ff"],
      num_heads=hf_config["num_heads"],
      num_encoder_layers=hf_config["num_layers"],
      num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
      relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
      dropout_rate=hf_config.get("dropout_rate", 0.1),
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
      mlp_activation=activation,
      tie_word_embeddings=hf_config.get("tie_word_embeddings", True),
      # transformers >= 5 writes tie_word_embeddings=True always and this flag separately.
      scale_decoder_outputs=hf_config.get("scale_decoder_outputs"),
      pad_id=hf_config.get("pad_token_id", 0),
      eos_id=hf_config.get("eos_token_id", 1),
      decoder_start_id=hf_config.get("decoder_start_token_id", 0),
  )
  fields.update(overrides)
  return T5Config(**fields)


def config_to_hf(config: T5Config) -> dict:
  """Hugging Face `config.json` dict for a T5Config."""
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": config.mlp_activation,
      "is_gated_act": config.mlp_activation == "gated-gelu",
      "dense_act_fn": "gelu_new" if config.mlp_activation == "gated-gelu" else "relu",
      # transformers >= 5 reads the scaling from this key and ties lm_head to the embedding
      # whenever the checkpoint has no separate lm_head.weight.
      "tie_word_embeddings": config.scales_decoder_outputs,
      "pad_token_id": config.pad_id,
      "eos_token_id": config.eos_id,
      "decoder_start_token_id": config.decoder_start_id,
      "is_encoder_decoder": True,
  }
