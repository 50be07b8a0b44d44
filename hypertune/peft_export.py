"""Generated LoRA -> a Hugging Face PEFT adapter folder (`peft.PeftModel.from_pretrained` loads it).

    export_lora_to_hf_peft(peft, "/runs/task_hf", base_model_name_or_path="/models/t5-large")
    export_lora_to_hf_peft(peft, "/runs/llama_hf", architecture="llama", lora_only=True)
    # -> adapter_config.json + adapter_model.safetensors

One task is one row of the batch (`row`). `architecture` names the downstream whose module
names the keys get. For a T5 downstream ("t5"), hypertune's LoRA keys map to
    "encoder_self/P"  -> base_model.model.encoder.block.{i}.layer.0.SelfAttention.P
    "decoder_self/P"  -> base_model.model.decoder.block.{i}.layer.0.SelfAttention.P
    "decoder_cross/P" -> base_model.model.decoder.block.{i}.layer.1.EncDecAttention.P
for P in q, k, v, o; for a Llama downstream ("llama", transformers' LlamaForCausalLM)
    "decoder_self/P"  -> base_model.model.model.layers.{i}.self_attn.P_proj  (P in q, k, v, o)
    "decoder_mlp/P"   -> base_model.model.model.layers.{i}.mlp.P_proj        (P in gate, up, down)
each with `.lora_A.weight` `[r, in]` (hypertune's `down[row, i]`) and `.lora_B.weight`
`[out, r]` (`scale * up[row, i]`). Both sides order a grouped-query projection's outputs
head-major (`head * head_dim + d`), so the matrices are copied as they are.

Scaling: PEFT computes `x @ (lora_B @ lora_A).T * (lora_alpha / r)`; hypertune computes
`scale * up @ down @ x`. The export writes `lora_alpha = r` (PEFT's factor is 1) and folds each
LoRA's `scale` into `lora_B`, so projections with different scales share one config.
Tensors are written as float32.

Only LoRA is representable. Prefixes, adapters, fusion memory (`extra_memory`) and position
offsets are refused with an error naming them: PEFT's prefix tuning for T5 gives the prefix
positions a relative position bias (hypertune gives them none) and has no encoder prefix; PEFT
has no parallel adapters or per-row position offsets. `lora_only=True` exports the LoRA of a
`PeftParams` that also has such pieces (HyperLlama with `downstream_lora_rank > 0`: the gist
prefix and its position offset, plus the downstream LoRA) and leaves the rest out on purpose:
the adapter is then the downstream LoRA alone, i.e. the model without the gists, at positions
from 0. See docs/peft_export.md.
"""
import json
import os

import numpy as np

from hypertune.models import peft as peft_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Attention kind -> (stack, module path inside block i) in transformers' T5.
T5_MODULES = {"encoder_self": ("encoder", "layer.0.SelfAttention"),
              "decoder_self": ("decoder", "layer.0.SelfAttention"),
              "decoder_cross": ("decoder", "layer.1.EncDecAttention")}
# LoRA kind -> (module inside `model.layers.{i}`, its projections) in transformers' Llama.
LLAMA_MODULES = {"decoder_self": ("self_attn", peft_lib.PROJECTIONS),
                 peft_lib.MLP_KIND: ("mlp", peft_lib.MLP_PROJECTIONS)}
ARCHITECTURES = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM"}  # -> PEFT task_type


class PeftExportError(ValueError):
  """The PEFT parameters cannot be written as a Hugging Face PEFT LoRA adapter."""


def _unsupported(peft: peft_lib.PeftParams) -> list:
  """Names of the pieces of `peft` that are not LoRA."""
  names = [f"prefixes[{k!r}]" for k in peft.prefixes]
  names += [f"adapters[{k!r}]" for k in peft.adapters]
  names += [n for n in ("extra_memory", "position_offset") if getattr(peft, n) is not None]
  return names


def _valid_keys(architecture: str) -> str:
  if architecture == "t5":
    return f"'KIND/PROJ' with KIND in {tuple(T5_MODULES)} and PROJ in {peft_lib.PROJECTIONS}"
  return " or ".join(f"'{kind}/PROJ' with PROJ in {projs}"
                     for kind, (_, projs) in LLAMA_MODULES.items())


def _is_valid_key(name: str, architecture: str) -> bool:
  kind, _, proj = name.partition("/")
  if architecture == "t5":
    return kind in T5_MODULES and proj in peft_lib.PROJECTIONS
  return kind in LLAMA_MODULES and proj in LLAMA_MODULES[kind][1]


def _check(peft: peft_lib.PeftParams, row: int, architecture: str = "t5",
           lora_only: bool = False) -> int:
  """The LoRA rank; PeftExportError unless `peft` is only LoRA (or `lora_only`), on keys of
  `architecture`, of one rank."""
  if architecture not in ARCHITECTURES:
    raise PeftExportError(f"architecture={architecture!r}: expected one of "
                          f"{tuple(ARCHITECTURES)}")
  unsupported = [] if lora_only else _unsupported(peft)
  if unsupported:
    raise PeftExportError(
        f"cannot export {', '.join(unsupported)} to Hugging Face PEFT: only LoRA is representable "
        "(T5 prefixes get position bias in PEFT; no adapters/memory/position offsets; "
        "lora_only=True exports the LoRA alone; see docs/peft_export.md)")
  if not peft.lora:
    raise PeftExportError("cannot export to Hugging Face PEFT: the PEFT parameters have no LoRA")
  ranks = set()
  for name, lo in peft.lora.items():
    if not _is_valid_key(name, architecture):
      raise PeftExportError(f"lora[{name!r}]: expected a key {_valid_keys(architecture)} "
                            f"(architecture {architecture!r})")
    down, up = np.shape(lo.down), np.shape(lo.up)
    if len(down) != 4 or len(up) != 4 or down[:2] != up[:2] or down[2] != up[3]:
      raise PeftExportError(
          f"lora[{name!r}]: down {down} and up {up} do not fit down [batch, layers, rank, in] and "
          "up [batch, layers, out, rank]")
    if not -down[0] <= row < down[0]:
      raise PeftExportError(f"row {row} is out of range for lora[{name!r}] with batch {down[0]}")
    ranks.add(down[2])
  if len(ranks) != 1:
    raise PeftExportError(f"LoRA ranks differ ({sorted(ranks)}); the export needs one rank")
  return ranks.pop()


def _module_name(name: str, layer: int, architecture: str = "t5") -> str:
  """"encoder_self/q", 0 -> "encoder.block.0.layer.0.SelfAttention.q" (transformers' T5);
  "decoder_mlp/gate", 0, "llama" -> "model.layers.0.mlp.gate_proj" (transformers' Llama)."""
  kind, _, proj = name.partition("/")
  if architecture == "llama":
    return f"model.layers.{layer}.{LLAMA_MODULES[kind][0]}.{proj}_proj"
  stack, where = T5_MODULES[kind]
  return f"{stack}.block.{layer}.{where}.{proj}"


def hf_state_dict(peft: peft_lib.PeftParams, row: int = 0, architecture: str = "t5",
                  lora_only: bool = False) -> dict:
  """{"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": [r, in], ...}
  float32, `scale` folded into lora_B."""
  _check(peft, row, architecture, lora_only)
  state = {}
  for name, lo in peft.lora.items():
    down = np.asarray(lo.down[row], np.float32)  # [layers, rank, in]
    up = np.asarray(lo.up[row], np.float32) * np.float32(lo.scale)  # [layers, out, rank]
    for i in range(down.shape[0]):
      key = f"base_model.model.{_module_name(name, i, architecture)}"
      state[f"{key}.lora_A.weight"] = np.ascontiguousarray(down[i])
      state[f"{key}.lora_B.weight"] = np.ascontiguousarray(up[i])
  return state


def adapter_config(peft: peft_lib.PeftParams, base_model_name_or_path: str = "",
                   row: int = 0, architecture: str = "t5", lora_only: bool = False) -> dict:
  """PEFT's LoraConfig as JSON: `lora_alpha = r` and the exact module names as target_modules."""
  rank = int(_check(peft, row, architecture, lora_only))
  modules = sorted(_module_name(name, i, architecture) for name, lo in peft.lora.items()
                   for i in range(np.shape(lo.down)[1]))
  return {"peft_type": "LORA", "task_type": ARCHITECTURES[architecture],
          "base_model_name_or_path": base_model_name_or_path or None,
          "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
          "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False,
          "use_dora": False, "init_lora_weights": True, "inference_mode": True}


def export_lora_to_hf_peft(peft: peft_lib.PeftParams, directory: str,
                           base_model_name_or_path: str = "", row: int = 0,
                           architecture: str = "t5", lora_only: bool = False) -> str:
  """Write row `row` of `peft`'s LoRA as `directory/adapter_config.json` +
  `adapter_model.safetensors` with the module names of `architecture` ("t5" or "llama");
  returns `directory`. Raises PeftExportError (one line) for pieces that are not LoRA (unless
  `lora_only`: then they are left out, and the adapter is the LoRA alone), bad shapes or keys,
  mixed ranks, or a row out of range; nothing is written then."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = adapter_config(peft, base_model_name_or_path, row, architecture, lora_only)
  state = hf_state_dict(peft, row, architecture, lora_only)
  os.makedirs(directory, exist_ok=True)
  save_file(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return directory


def _llama_prefix(peft: peft_lib.PeftParams, row: int):
  """Row `row`'s (key, value) `[layers, P, kv_heads, head_dim]`; PeftExportError unless `peft`
  is one decoder self-attention prefix whose input starts at position P (PEFT's semantics)."""
  others = [f"prefixes[{k!r}]" for k in peft.prefixes if k != "decoder_self"]
  others += [f"lora[{k!r}]" for k in peft.lora] + [f"adapters[{k!r}]" for k in peft.adapters]
  others += ["extra_memory"] if peft.extra_memory is not None else []
  if others or "decoder_self" not in peft.prefixes:
    raise PeftExportError(
        f"cannot export {', '.join(others) or 'PEFT parameters without a decoder_self prefix'} "
        "as PEFT PREFIX_TUNING: it holds one decoder self-attention prefix alone")
  prefix = peft.prefixes["decoder_self"]
  key, value = np.asarray(prefix.key, np.float32), np.asarray(prefix.value, np.float32)
  if key.ndim != 5 or not 0 <= row < key.shape[0]:
    raise PeftExportError(f"prefix key {key.shape}: expected [batch, layers, P, kv_heads, "
                          f"head_dim] with row {row} in range")
  p = key.shape[2]
  offset = None if peft.position_offset is None else int(np.asarray(peft.position_offset)[row])
  if offset != p:
    raise PeftExportError(
        f"position_offset {offset} of row {row} != prefix_len {p}: PEFT's prefix tuning starts "
        "the input at position prefix_len (HyperLlama's gists start it after the "
        "demonstrations too); only flat prefix tuning (hypernets/prefix_tuning.py) matches")
  return key[row], value[row]


def export_prefix_to_hf_peft(peft: peft_lib.PeftParams, directory: str,
                             base_model_name_or_path: str = "", row: int = 0) -> str:
  """Write row `row` of a Llama run's flat prefix (`hypernets.prefix_tuning.PrefixTuning`:
  prefix `[batch, layers, P, kv_heads, head_dim]`, position offset P) as a PEFT PREFIX_TUNING
  adapter: `prompt_embeddings` `[P, layers * 2 * kv_heads * head_dim]`, laid out per virtual
  token as `[layer, key|value, kv_heads, head_dim]` (what PEFT's `get_prompt` reshapes it by).
  Returns `directory`; PeftExportError (one line) for anything else (see `_llama_prefix`)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  key, value = _llama_prefix(peft, row)
  layers, p, kv_heads, head_dim = key.shape
  embeddings = np.stack([key, value], axis=1)  # [layers, 2, P, kv_heads, head_dim]
  embeddings = embeddings.transpose(2, 0, 1, 3, 4).reshape(p, -1)
  config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or None,
            "num_virtual_tokens": p, "num_layers": layers, "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads, "num_transformer_submodules": 1,
            "prefix_projection": False, "inference_mode": True}
  os.makedirs(directory, exist_ok=True)
  save_file({"prompt_embeddings": np.ascontiguousarray(embeddings)},
            os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return directory
