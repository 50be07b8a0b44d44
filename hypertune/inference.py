"""Inference as at deployment (the `hypertune.infer` binary): write a task's PEFT parameters once, then apply them to new inputs.

    # demonstrations (and/or an instruction) -> PEFT_DIR/peft.safetensors + peft.json
    python -m hypertune.infer --gin.MODEL_DIR="'/path/to/run'" \
        --gin.infer.demonstrations_file="'demos.json'" --gin.infer.peft_dir="'/tmp/task_peft'"
    # saved parameters + one input per line -> predictions (printed, and PEFT_DIR/predictions.jsonl)
    python -m hypertune.infer --gin.MODEL_DIR="'/path/to/run'" \
        --gin.infer.peft_dir="'/tmp/task_peft'" --gin.infer.inputs_file="'queries.txt'"

`demos.json`: {"instruction": "optional text", "demonstrations": [{"input": ..., "target": ...}]}.
HyperLlama runs also take `"demonstration_sets": [[{"input": ..., "target": ...}, ...], ...]`
instead: the gists of the sets are averaged (appendix B of the paper).
The text is formatted as in training (`<x> instruction <x> input <y> target ...`, whole
demonstrations dropped to fit the hyper length) and tokenized with the run's vocabulary.
The files: `peft.safetensors` holds the tensors with batch size 1, named like
`prefixes/encoder_self/key` `[1, layers, prefix_len, heads, head_dim]` or
`lora/encoder_self/q/down` `[1, layers, rank, d_model]`; `peft.json` holds the format name, the
LoRA scales, every tensor's shape, the run and step they came from.

With `--gin.infer.hf_peft_dir="'/runs/task_hf'"` (T5 runs whose generated PEFT is LoRA only;
Llama runs) the demonstrations step also writes a Hugging Face PEFT adapter there
(`adapter_config.json` + `adapter_model.safetensors`, `hypertune.peft_export`;
`infer.hf_base_model` is recorded as its `base_model_name_or_path`). HyperLlama's PEFT also
holds the gist prefix: `--gin.infer.hf_lora_only=True` exports its downstream LoRA alone
(`downstream_lora_rank > 0`); a flat prefix-tuning run's prefix (`builtin_llama_prefix.gin`) is
written as PEFT's PREFIX_TUNING. See docs/peft_export.md.
"""
import json
import os
from typing import Mapping, Optional

import gin
import jax.numpy as jnp
import numpy as np

from hypertune import peft_export
from hypertune.evaluation import detokenize
from hypertune.models import peft as peft_lib
from hypertune.models.base import BaseModel, EncoderDecoderModel


def _demonstrations(path: str, demos, field: str):
  if not isinstance(demos, list) or any(not isinstance(d, dict) or {"input", "target"} - set(d)
                                        for d in demos):
    raise ValueError(f"{path}: '{field}' must be a list of {{'input', 'target'}} objects")
  return [(d["input"], d["target"]) for d in demos]


def _read_demonstrations(path: str):
  """-> (instruction or None, [demonstration set: [(input, target)]])."""
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read demonstrations JSON ({e})") from None
  if "demonstration_sets" in spec:
    sets = spec["demonstration_sets"]
    if not isinstance(sets, list) or not sets:
      raise ValueError(f"{path}: 'demonstration_sets' must be a non-empty list of lists")
    sets = [_demonstrations(path, d, "demonstration_sets[*]") for d in sets]
  else:
    sets = [_demonstrations(path, spec.get("demonstrations", []), "demonstrations")]
  if not any(sets) and not spec.get("instruction"):
    raise ValueError(f"{path}: needs an 'instruction' or at least one demonstration")
  return spec.get("instruction"), sets


@gin.configurable(denylist=["model", "params", "step", "model_dir", "task_feature_lengths",
                            "mixture_or_task_name", "method_state"])
def infer(model: BaseModel, params, step: int, model_dir: str,
          task_feature_lengths: Mapping[str, int], mixture_or_task_name: str,
          method_state=None,
          peft_dir: str = gin.REQUIRED, demonstrations_file: Optional[str] = None,
          inputs_file: Optional[str] = None, max_decode_len: Optional[int] = None,
          hf_peft_dir: Optional[str] = None, hf_base_model: str = "",
          hf_lora_only: bool = False):
  """Generate PEFT parameters from `demonstrations_file` into `peft_dir` (if given; and their
  LoRA as a Hugging Face PEFT adapter into `hf_peft_dir`, if given; `hf_lora_only`: the LoRA
  even when there is more, e.g. HyperLlama's gists), then decode each line of `inputs_file`
  with the parameters in `peft_dir` (if given)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune.data import formatting  # pylint: disable=g-import-not-at-top
  if not model.has_hypernet:
    raise ValueError(f"{model_dir}: this run has no hypernetwork; nothing to generate")
  if hf_peft_dir and not demonstrations_file:
    raise ValueError("infer.hf_peft_dir needs infer.demonstrations_file (it exports what they "
                     "generate)")
  from hypertune.models.decoder_only import CausalLMModel  # pylint: disable=g-import-not-at-top
  architecture = ("t5" if isinstance(model, EncoderDecoderModel) else
                  "llama" if isinstance(model, CausalLMModel) else None)
  if hf_peft_dir and architecture is None:
    raise ValueError(f"infer.hf_peft_dir: the Hugging Face PEFT export supports T5 and Llama "
                     f"runs; {model_dir} has a {type(model).__name__}")
  vocab = seqio.get_mixture_or_task(mixture_or_task_name).output_features["inputs"].vocabulary
  if demonstrations_file:
    instruction, sets = _read_demonstrations(demonstrations_file)
    if len(sets) > 1 and not model.averages_demonstration_sets:
      raise ValueError(f"{demonstrations_file}: 'demonstration_sets' ({len(sets)}) needs a "
                       f"hypernetwork that averages sets (HyperLlama); {model_dir} has none")
    hyper_len = task_feature_lengths["hyper_inputs"]
    rows, kept = [], []
    for demos in sets:
      text, n = formatting.format_hyper_inputs(
          instruction, demos, formatting.special_tokens_for(vocab),
          length_fn=lambda s: len(vocab.encode(s)), max_length=hyper_len - 1)
      tokens = (list(vocab.encode(text)) + [1])[:hyper_len]
      rows.append(tokens + [0] * (hyper_len - len(tokens)))
      kept.append(n)
    tokens = np.array([rows] if len(sets) > 1 else rows, np.int32)  # [1, (sets,) hyper_len]
    peft = model.task_parameters(params, method_state or {}, jnp.asarray(tokens))
    kept, demos = sum(kept), [d for s in sets for d in s]
    peft_lib.save(peft_dir, peft, {"model_dir": model_dir, "step": step,
                                   "demonstrations_used": kept,
                                   "demonstrations_given": len(demos),
                                   "demonstration_sets": len(sets)})
    print(f"wrote PEFT parameters from {kept}/{len(demos)} demonstrations to {peft_dir}")
    if hf_peft_dir and architecture == "llama" and peft.prefixes and not peft.lora:
      # A prefix alone: PEFT's PREFIX_TUNING, when the input starts after it (flat prefix tuning).
      peft_export.export_prefix_to_hf_peft(peft, hf_peft_dir, hf_base_model)
    elif hf_peft_dir:
      peft_export.export_lora_to_hf_peft(peft, hf_peft_dir, base_model_name_or_path=hf_base_model,
                                         architecture=architecture, lora_only=hf_lora_only)
      print(f"wrote the Hugging Face PEFT adapter to {hf_peft_dir}")
  if inputs_file:
    peft, _ = peft_lib.load(peft_dir)
    with open(inputs_file) as f:
      queries = [line.rstrip("\n") for line in f if line.strip()]
    length = task_feature_lengths["inputs"]
    rows = [(list(vocab.encode(q)) + [1])[:length] for q in queries]
    enc = np.array([r + [0] * (length - len(r)) for r in rows], np.int32)
    out = model.predict(params, peft.repeat(len(rows)), {"encoder_input_tokens": jnp.asarray(enc)},
                        max_decode_len=max_decode_len or task_feature_lengths["targets"])
    predictions = detokenize(vocab, out)
    with open(os.path.join(peft_dir, "predictions.jsonl"), "w") as f:
      for q, p in zip(queries, predictions):
        f.write(json.dumps({"input": q, "prediction": p}) + "\n")
        print(f"{q}\t{p}")
    return predictions
  return None

