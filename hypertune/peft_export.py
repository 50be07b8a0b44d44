"""Generated LoRA -> a Hugging Face PEFT adapter folder (`peft.PeftModel.from_pretrained` loads it).

    export_lora_to_hf_peft(peft, "/runs/task_hf", base_model_name_or_path="/models/t5-large")
    # /runs/task_hf/adapter_config.json + adapter_model.safetensors

One task is one row of the batch (`row`). For a T5 downstream, hypertune's LoRA keys map to
    "encoder_self/P"  -> base_model.model.encoder.block.{i}.layer.0.SelfAttention.P
    "decoder_self/P"  -> base_model.model.decoder.block.{i}.layer.0.SelfAttention.P
    "decoder_cross/P" -> base_model.model.decoder.block.{i}.layer.1.EncDecAttention.P
for P in q, k, v, o, each with `.lora_A.weight` `[r, in]` (hypertune's `down[row, i]`) and
`.lora_B.weight` `[out, r]` (`scale * up[row, i]`).

Scaling: PEFT computes `x @ (lora_B @ lora_A).T * (lora_alpha / r)`; hypertune computes
`scale * up @ down @ x`. The export writes `lora_alpha = r` (PEFT's factor is 1) and folds each
LoRA's `scale` into `lora_B`, so projections with different scales share one config.
Tensors are written as float32.

Only LoRA is representable. Prefixes, adapters, fusion memory (`extra_memory`) and position
offsets are refused with an error naming them: PEFT's prefix tuning for T5 gives the prefix
positions a relative position bias (hypertune gives them none) and has no encoder prefix; PEFT
has no parallel adapters. See docs/peft_export.md.
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


class PeftExportError(ValueError):
  """The PEFT parameters cannot be written as a Hugging Face PEFT LoRA adapter."""


def _unsupported(peft: peft_lib.PeftParams) -> list:
  """Names of the pieces of `peft` that are not LoRA."""
  names = [f"prefixes[{k!r}]" for k in peft.prefixes]
  names += [f"adapters[{k!r}]" for k in peft.adapters]
  names += [n for n in ("extra_memory", "position_offset") if getattr(peft, n) is not None]
  return names


def _check(peft: peft_lib.PeftParams, row: int) -> int:
  """The LoRA rank; PeftExportError unless `peft` is only LoRA, on T5 kinds, of one rank."""
  unsupported = _unsupported(peft)
  if unsupported:
    raise PeftExportError(
        f"cannot export {', '.join(unsupported)} to Hugging Face PEFT: only LoRA is representable "
        "(T5 prefixes get position bias in PEFT; no adapters/memory; see docs/peft_export.md)")
  if not peft.lora:
    raise PeftExportError("cannot export to Hugging Face PEFT: the PEFT parameters have no LoRA")
  ranks = set()
  for name, lo in peft.lora.items():
    kind, _, proj = name.partition("/")
    if kind not in T5_MODULES or proj not in peft_lib.PROJECTIONS:
      raise PeftExportError(f"lora[{name!r}]: expected a key 'KIND/PROJ' with KIND in "
                            f"{tuple(T5_MODULES)} and PROJ in {peft_lib.PROJECTIONS}")
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


def _module_name(name: str, layer: int) -> str:
  """"encoder_self/q", 0 -> "encoder.block.0.layer.0.SelfAttention.q" (transformers' T5)."""
  kind, _, proj = name.partition("/")
  stack, where = T5_MODULES[kind]
  return f"{stack}.block.{layer}.{where}.{proj}"


def hf_state_dict(peft: peft_lib.PeftParams, row: int = 0) -> dict:
  """{"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": [r, in], ...}
  float32, `scale` folded into lora_B."""
  _check(peft, row)
  state = {}
  for name, lo in peft.lora.items():
    down = np.asarray(lo.down[row], np.float32)  # [layers, rank, in]
    up = np.asarray(lo.up[row], np.float32) * np.float32(lo.scale)  # [layers, out, rank]
    for i in range(down.shape[0]):
      key = f"base_model.model.{_module_name(name, i)}"
      state[f"{key}.lora_A.weight"] = np.ascontiguousarray(down[i])
      state[f"{key}.lora_B.weight"] = np.ascontiguousarray(up[i])
  return state


def adapter_config(peft: peft_lib.PeftParams, base_model_name_or_path: str = "",
                   row: int = 0) -> dict:
  """PEFT's LoraConfig as JSON: `lora_alpha = r` and the exact module names as target_modules."""
  rank = int(_check(peft, row))
  modules = sorted(_module_name(name, i) for name, lo in peft.lora.items()
                   for i in range(np.shape(lo.down)[1]))
  return {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM",
          "base_model_name_or_path": base_model_name_or_path or None,
          "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
          "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False,
          "use_dora": False, "init_lora_weights": True, "inference_mode": True}


def export_lora_to_hf_peft(peft: peft_lib.PeftParams, directory: str,
                           base_model_name_or_path: str = "", row: int = 0) -> str:
  """Write row `row` of `peft`'s LoRA as `directory/adapter_config.json` +
  `adapter_model.safetensors`; returns `directory`. Raises PeftExportError (one line) for
  pieces that are not LoRA, bad shapes or keys, mixed ranks, or a row out of range."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = adapter_config(peft, base_model_name_or_path, row)
  os.makedirs(directory, exist_ok=True)
  save_file(hf_state_dict(peft, row), os.path.join(directory, ADAPTER_WEIGHTS),
            metadata={"format": "pt"})
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return directory
