"""The one container for per-example parameter-efficient modules (PEFT).

A hypernetwork writes one set of PEFT parameters per task and batches mix tasks, so every tensor
here has a leading `batch` axis: row i of a batch is adapted by row i of each tensor. A shared
(non-hyper) PEFT method simply broadcasts one learned set over the batch.

Attention kinds (keys of `prefixes`, and the first half of `lora` keys):
  "encoder_self"  - encoder self-attention
  "decoder_self"  - decoder self-attention
  "decoder_cross" - decoder cross-attention (queries from the decoder, keys/values from the encoder)
Projections (second half of `lora` keys): "q", "k", "v", "o".
MLP LoRA (Llama's SwiGLU only): keys "decoder_mlp/gate", "decoder_mlp/up", "decoder_mlp/down"
(gate/up: d_model -> d_ff, down: d_ff -> d_model), part of the "decoder" stack.
Stacks (keys of `adapters`): "encoder", "decoder".

Shapes as stored (with the `layers` axis):
  Prefix.key / Prefix.value: [batch, layers, prefix_len, heads, head_dim]
  LoRA.down: [batch, layers, rank, in_features]   (as peft's lora_A.weight, per example)
  LoRA.up:   [batch, layers, out_features, rank]  (as peft's lora_B.weight, per example)
  Adapter.down: [batch, layers, bottleneck, d_model]
  Adapter.up:   [batch, layers, d_model, bottleneck]
  extra_memory: [batch, memory_len, d_model]; extra_memory_mask: [batch, memory_len]
  position_offset: [batch] (decoder-only models: where each row's tokens start)
A grouped-query model (Llama) has `num_kv_heads` heads in prefixes and k/v LoRA outputs.
Inside a scanned layer each tensor is seen without its `layers` axis.

Absent pieces are simply absent (empty dicts / None) and cost nothing: the model only adds a
computation for what is present.
"""
from typing import Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp

ATTENTION_KINDS = ("encoder_self", "decoder_self", "decoder_cross")
PROJECTIONS = ("q", "k", "v", "o")
MLP_KIND = "decoder_mlp"  # LoRA on the feed-forward block of a SwiGLU decoder (Llama)
MLP_PROJECTIONS = ("gate", "up", "down")
STACKS = ("encoder", "decoder")

Array = jax.Array


class PeftShapeError(ValueError):
  """A PEFT tensor does not fit the model it is applied to."""


@flax.struct.dataclass
class Prefix:
  """Key and value prefixes for one attention kind: [batch, layers, prefix_len, heads, head_dim]."""
  key: Array
  value: Array


@flax.struct.dataclass
class LoRA:
  """Low-rank delta `scale * up @ down` on one projection.

  down: [batch, layers, rank, in_features]; up: [batch, layers, out_features, rank].
  """
  down: Array
  up: Array
  scale: float = flax.struct.field(pytree_node=False, default=1.0)


@flax.struct.dataclass
class Adapter:
  """Parallel adapter on the feed-forward block: `x + FFN(h) + up(gelu(down(h)))`, h = norm(x).

  down: [batch, layers, bottleneck, d_model]; up: [batch, layers, d_model, bottleneck].
  """
  down: Array
  up: Array


@flax.struct.dataclass
class PeftParams:
  """Whatever subset of prefixes, LoRA, adapters and extra encoder memory is present."""
  prefixes: Mapping[str, Prefix] = flax.struct.field(default_factory=dict)
  lora: Mapping[str, LoRA] = flax.struct.field(default_factory=dict)  # key "encoder_self/q"
  adapters: Mapping[str, Adapter] = flax.struct.field(default_factory=dict)
  extra_memory: Optional[Array] = None  # fusion-in-decoder memory [batch, memory_len, d_model]
  extra_memory_mask: Optional[Array] = None  # [batch, memory_len], 1 = attend
  # Decoder-only models: row i's first token sits at position offset_i [batch] (int32).
  position_offset: Optional[Array] = None

  # --- views -------------------------------------------------------------------------------
  def stack_view(self, stack: str) -> "PeftParams":
    """The per-layer pieces that one stack ("encoder"/"decoder") uses, layers axis first.

    Returned leaves are [layers, batch, ...] so that `nn.scan` slices one layer per step;
    `extra_memory` is not per layer and is dropped here (the model consumes it directly).
    """
    kinds = (("encoder_self",) if stack == "encoder" else
             ("decoder_self", "decoder_cross", MLP_KIND))
    layers_first = lambda x: jnp.moveaxis(x, 1, 0)
    return PeftParams(
        prefixes={k: jax.tree.map(layers_first, v) for k, v in self.prefixes.items()
                  if k in kinds},
        lora={k: jax.tree.map(layers_first, v) for k, v in self.lora.items()
              if k.split("/")[0] in kinds},
        adapters={k: jax.tree.map(layers_first, v) for k, v in self.adapters.items()
                  if k == stack},
    )

  def repeat(self, n: int) -> "PeftParams":
    """Each example's parameters repeated n times along the batch (for beam search, choices)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)

  def lora_for(self, kind: str) -> dict:
    """{"q": LoRA, ...} for one attention kind; {"gate": LoRA, ...} for MLP_KIND."""
    return {k.split("/")[1]: v for k, v in self.lora.items() if k.split("/")[0] == kind}

  @property
  def is_empty(self) -> bool:
    return not (self.prefixes or self.lora or self.adapters or self.extra_memory is not None
                or self.position_offset is not None)

  # --- validation ----------------------------------------------------------------------------
  def validate(self, config, batch_size: int) -> None:
    """Raise PeftShapeError naming the tensor and both shapes if anything does not fit `config`.

    Runs at trace time (shapes are static), so a wrong tensor never reaches a JAX op.
    """
    layers = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    # Grouped-query attention (Llama): prefixes and k/v projections have the key/value heads.
    kv_heads = getattr(config, "num_kv_heads", config.num_heads)
    stack_of = {"encoder_self": "encoder", "decoder_self": "decoder", "decoder_cross": "decoder",
                MLP_KIND: "decoder"}

    def check(name, x, expected, axes):
      if tuple(x.shape) != tuple(expected):
        raise PeftShapeError(f"PEFT tensor {name} has shape {tuple(x.shape)}; expected "
                             f"{tuple(expected)} = [{', '.join(axes)}]")

    for kind, prefix in self.prefixes.items():
      if kind not in ATTENTION_KINDS:
        raise PeftShapeError(f"PEFT prefixes[{kind!r}]: unknown attention kind; expected one "
                             f"of {ATTENTION_KINDS}")
      p = prefix.key.shape[2] if prefix.key.ndim == 5 else -1
      shape = (batch_size, layers[stack_of[kind]], p, kv_heads, config.d_kv)
      axes = ("batch", "layers", "prefix_len", f"heads={kv_heads}",
              f"head_dim={config.d_kv}")
      check(f"prefixes[{kind!r}].key", prefix.key, shape, axes)
      check(f"prefixes[{kind!r}].value", prefix.value, shape, axes)

    for name, lora in self.lora.items():
      kind, _, proj = name.partition("/")
      if kind == MLP_KIND:
        if proj not in MLP_PROJECTIONS:
          raise PeftShapeError(f"PEFT lora[{name!r}]: expected '{MLP_KIND}/PROJ' with PROJ in "
                               f"{MLP_PROJECTIONS}")
        # Only a model that reads these keys may get them (T5 would silently ignore them).
        if not getattr(config, "supports_mlp_lora", False):
          raise PeftShapeError(f"PEFT lora[{name!r}]: MLP LoRA needs a SwiGLU decoder (Llama); "
                               f"{type(config).__name__} has none")
        d_in, d_out = ((config.d_ff, config.d_model) if proj == "down" else
                       (config.d_model, config.d_ff))
      elif kind not in ATTENTION_KINDS or proj not in PROJECTIONS:
        raise PeftShapeError(f"PEFT lora[{name!r}]: expected a key 'KIND/PROJ' with KIND in "
                             f"{ATTENTION_KINDS} and PROJ in {PROJECTIONS}, or "
                             f"'{MLP_KIND}/PROJ' with PROJ in {MLP_PROJECTIONS}")
      else:
        d_in, d_out = ((config.inner_dim, config.d_model) if proj == "o" else
                       (config.d_model, kv_heads * config.d_kv) if proj in ("k", "v") else
                       (config.d_model, config.inner_dim))
      rank = lora.down.shape[2] if lora.down.ndim == 4 else -1
      n = layers[stack_of[kind]]
      check(f"lora[{name!r}].down", lora.down, (batch_size, n, rank, d_in),
            ("batch", "layers", "rank", f"in_features={d_in}"))
      check(f"lora[{name!r}].up", lora.up, (batch_size, n, d_out, rank),
            ("batch", "layers", f"out_features={d_out}", "rank"))

    for stack, adapter in self.adapters.items():
      if stack not in STACKS:
        raise PeftShapeError(f"PEFT adapters[{stack!r}]: unknown stack; expected one of {STACKS}")
      b = adapter.down.shape[2] if adapter.down.ndim == 4 else -1
      check(f"adapters[{stack!r}].down", adapter.down, (batch_size, layers[stack], b, config.d_model),
            ("batch", "layers", "bottleneck", f"d_model={config.d_model}"))
      check(f"adapters[{stack!r}].up", adapter.up, (batch_size, layers[stack], config.d_model, b),
            ("batch", "layers", f"d_model={config.d_model}", "bottleneck"))

    if self.position_offset is not None:
      check("position_offset", self.position_offset, (batch_size,), ("batch",))
    if (self.extra_memory is None) != (self.extra_memory_mask is None):
      raise PeftShapeError("PEFT extra_memory and extra_memory_mask must be given together")
    if self.extra_memory is not None:
      m = self.extra_memory.shape[1] if self.extra_memory.ndim == 3 else -1
      check("extra_memory", self.extra_memory, (batch_size, m, config.d_model),
            ("batch", "memory_len", f"d_model={config.d_model}"))
      check("extra_memory_mask", self.extra_memory_mask, (batch_size, m),
            ("batch", "memory_len"))


# --- files: safetensors + JSON ---------------------------------------------------------------
PEFT_FORMAT = "hypertune-peft"


def to_arrays(peft: PeftParams) -> dict:
  """Flat {"prefixes/encoder_self/key": array, "lora/encoder_self/q/down": ...} and the LoRA
  scales {"encoder_self/q": scale} (the only non-array state)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays = {}
  for kind, p in peft.prefixes.items():
    arrays[f"prefixes/{kind}/key"], arrays[f"prefixes/{kind}/value"] = p.key, p.value
  for name, lo in peft.lora.items():
    arrays[f"lora/{name}/down"], arrays[f"lora/{name}/up"] = lo.down, lo.up
  for stack, a in peft.adapters.items():
    arrays[f"adapters/{stack}/down"], arrays[f"adapters/{stack}/up"] = a.down, a.up
  if peft.extra_memory is not None:
    arrays["extra_memory"] = peft.extra_memory
    arrays["extra_memory_mask"] = peft.extra_memory_mask
  if peft.position_offset is not None:
    arrays["position_offset"] = peft.position_offset
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
  return arrays, {name: lo.scale for name, lo in peft.lora.items()}


def from_arrays(arrays: Mapping, lora_scales: Mapping[str, float]) -> PeftParams:
  """The inverse of `to_arrays`; an unknown key is an error naming it."""
  prefixes, lora, adapters = {}, {}, {}
  for key in arrays:
    section, _, rest = key.partition("/")
    if section == "prefixes":
      kind = rest.rsplit("/", 1)[0]
      prefixes[kind] = Prefix(arrays[f"prefixes/{kind}/key"], arrays[f"prefixes/{kind}/value"])
    elif section == "lora":
      name = rest.rsplit("/", 1)[0]
      lora[name] = LoRA(arrays[f"lora/{name}/down"], arrays[f"lora/{name}/up"],
                        scale=float(lora_scales.get(name, 1.0)))
    elif section == "adapters":
      stack = rest.rsplit("/", 1)[0]
      adapters[stack] = Adapter(arrays[f"adapters/{stack}/down"], arrays[f"adapters/{stack}/up"])
    elif key not in ("extra_memory", "extra_memory_mask", "position_offset"):
      raise ValueError(f"PEFT file: unknown tensor {key!r}")
  return PeftParams(prefixes=prefixes, lora=lora, adapters=adapters,
                    extra_memory=arrays.get("extra_memory"),
                    extra_memory_mask=arrays.get("extra_memory_mask"),
                    position_offset=arrays.get("position_offset"))


def save(directory: str, peft: PeftParams, metadata: Mapping) -> None:
  """Write `peft.safetensors` (tensors) and `peft.json` (format, LoRA scales, `metadata`)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  arrays, scales = to_arrays(peft)
  save_file(arrays, os.path.join(directory, "peft.safetensors"))
  with open(os.path.join(directory, "peft.json"), "w") as f:
    json.dump({"format": PEFT_FORMAT, "version": 1, "lora_scales": scales,
               "tensors": {k: list(v.shape) for k, v in arrays.items()}, **metadata}, f,
              indent=2)


def load(directory: str) -> "tuple[PeftParams, dict]":
  """(PeftParams, the JSON metadata) from a directory written by `save`."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(directory, "peft.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory}: no peft.json (written by `hypertune.infer`)")
  with open(meta_path) as f:
    metadata = json.load(f)
  if metadata.get("format") != PEFT_FORMAT:
    raise ValueError(f"{meta_path}: format is {metadata.get('format')!r}, expected "
                     f"{PEFT_FORMAT!r}")
  arrays = load_file(os.path.join(directory, "peft.safetensors"))
  return from_arrays(arrays, metadata.get("lora_scales", {})), metadata
