"""Hugging Face T5 checkpoints <-> hypertune parameters.

`load_hf_t5(directory)` reads `config.json` and `model.safetensors` (or `pytorch_model.bin`, which
needs torch) and returns `(T5Config, params)`; `save_hf_t5(directory, config, params)` writes them
back so `transformers.T5ForConditionalGeneration.from_pretrained(directory)` loads them.

HF stores Linear weights as `[out, in]`; hypertune kernels are `[in, ...out]` with the attention
heads split out: query/key/value `[d_model, heads, d_kv]`, out `[heads, d_kv, d_model]`.
"""
import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from hypertune.models.config import T5Config, config_from_hf, config_to_hf

# HF keys that are views of `shared.weight` when embeddings are tied and may be absent on disk.
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configuration it is loaded into."""


def _layer_mapping(config: T5Config, stack: str):
  """[(hypertune path inside one layer, HF key suffix inside block i, to_ours, to_hf)]."""
  d, h, k = config.d_model, config.num_heads, config.d_kv
  qkv = (lambda w: w.T.reshape(d, h, k), lambda w: w.reshape(d, h * k).T)
  out = (lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T)
  lin = (lambda w: w.T, lambda w: w.T)
  same = (lambda w: w, lambda w: w)
  attn_names = {"query": "q", "key": "k", "value": "v", "out": "o"}

  def attention(ours, hf):
    return [(f"{ours}/{n}", f"{hf}.{m}.weight", *(out if n == "out" else qkv))
            for n, m in attn_names.items()]

  if config.mlp_activation == "gated-gelu":
    mlp_names = [("wi_0", "wi_0"), ("wi_1", "wi_1"), ("wo", "wo")]
  else:
    mlp_names = [("wi", "wi"), ("wo", "wo")]

  if stack == "encoder":
    rows = attention("attention", "layer.0.SelfAttention")
    rows.append(("pre_attention_layer_norm/scale", "layer.0.layer_norm.weight", *same))
    mlp_layer = 1
  else:
    rows = attention("self_attention", "layer.0.SelfAttention")
    rows.append(("pre_self_attention_layer_norm/scale", "layer.0.layer_norm.weight", *same))
    rows += attention("encoder_decoder_attention", "layer.1.EncDecAttention")
    rows.append(("pre_cross_attention_layer_norm/scale", "layer.1.layer_norm.weight", *same))
    mlp_layer = 2
  rows += [(f"mlp/{n}", f"layer.{mlp_layer}.DenseReluDense.{m}.weight", *lin)
           for n, m in mlp_names]
  rows.append(("pre_mlp_layer_norm/scale", f"layer.{mlp_layer}.layer_norm.weight", *same))
  return rows


def _set(tree: dict, path: str, value):
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def expected_hf_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """Every HF key a checkpoint of `config` must have, with its shape."""
  shapes = {"shared.weight": (config.vocab_size, config.d_model)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, config.d_model)
  inner = config.inner_dim
  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    shapes[f"{stack}.final_layer_norm.weight"] = (config.d_model,)
    shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        config.relative_attention_num_buckets, config.num_heads)
    for i in range(n):
      for ours, hf, _, _ in _layer_mapping(config, stack):
        key = f"{stack}.block.{i}.{hf}"
        if "layer_norm" in hf:
          shapes[key] = (config.d_model,)
        elif hf.endswith(".o.weight"):
          shapes[key] = (config.d_model, inner)
        elif re.search(r"\.[qkv]\.weight$", hf):
          shapes[key] = (inner, config.d_model)
        elif "wo" in hf:
          shapes[key] = (config.d_model, config.d_ff)
        else:
          shapes[key] = (config.d_ff, config.d_model)
  return shapes


def params_from_hf_state_dict(state_dict: Dict[str, np.ndarray], config: T5Config,
                              source: str = "checkpoint") -> dict:
  """hypertune params (unboxed, stacked per `config.scan_layers`) from an HF state dict.

  Raises CheckpointMismatchError naming every missing/unexpected key, or the first key whose
  shape does not fit, with both shapes.
  """
  state = {k: np.asarray(v, dtype=np.float32) for k, v in state_dict.items()}
  expected = expected_hf_shapes(config)
  present = set(state) - set(_TIED_ALIASES)
  if config.tie_word_embeddings and "lm_head.weight" in present:
    present.discard("lm_head.weight")  # tied: lm_head is shared.weight
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  if missing or unexpected:
    msg = [f"{source}: does not fit the T5 config ({config.num_encoder_layers}+"
           f"{config.num_decoder_layers} layers, mlp={config.mlp_activation}, "
           f"tied={config.tie_word_embeddings})."]
    if missing:
      msg.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
      msg.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    raise CheckpointMismatchError(" ".join(msg))
  for key, shape in expected.items():
    if tuple(state[key].shape) != shape:
      raise CheckpointMismatchError(
          f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the config expects "
          f"{shape}")

  params: dict = {}
  _set(params, "token_embedder/embedding", state["shared.weight"])
  if not config.tie_word_embeddings:
    _set(params, "logits_dense/kernel", state["lm_head.weight"].T)
  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    _set(params, f"{stack}/relpos_bias/rel_embedding",
         state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    _set(params, f"{stack}/{stack}_norm/scale", state[f"{stack}.final_layer_norm.weight"])
    for ours, hf, to_ours, _ in _layer_mapping(config, stack):
      per_layer = [to_ours(state[f"{stack}.block.{i}.{hf}"]) for i in range(n)]
      if config.scan_layers:
        _set(params, f"{stack}/layers/{ours}", np.stack(per_layer))
      else:
        for i, w in enumerate(per_layer):
          _set(params, f"{stack}/layers_{i}/{ours}", w)
  return params


def params_to_hf_state_dict(params: dict, config: T5Config) -> Dict[str, np.ndarray]:
  """The inverse of `params_from_hf_state_dict`."""
  params = _unbox(params)
  state = {"shared.weight": np.asarray(_get(params, "token_embedder/embedding"))}
  if not config.tie_word_embeddings:
    state["lm_head.weight"] = np.asarray(_get(params, "logits_dense/kernel")).T
  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.asarray(
        _get(params, f"{stack}/relpos_bias/rel_embedding"))
    state[f"{stack}.final_layer_norm.weight"] = np.asarray(
        _get(params, f"{stack}/{stack}_norm/scale"))
    for ours, hf, _, to_hf in _layer_mapping(config, stack):
      for i in range(n):
        w = (_get(params, f"{stack}/layers/{ours}")[i] if config.scan_layers else
             _get(params, f"{stack}/layers_{i}/{ours}"))
        state[f"{stack}.block.{i}.{hf}"] = np.ascontiguousarray(to_hf(np.asarray(w, np.float32)))
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def _unbox(params):
  from flax.core import meta
  return meta.unbox(params)


def read_hf_state_dict(directory: str) -> Dict[str, np.ndarray]:
  """Arrays of `model.safetensors` (preferred) or `pytorch_model.bin` in `directory`."""
  st_path = os.path.join(directory, "model.safetensors")
  bin_path = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(st_path):
    from safetensors.numpy import load_file
    return load_file(st_path)
  if os.path.exists(bin_path):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{bin_path}: reading a PyTorch .bin checkpoint needs torch "
                        "(pip install 'hypertune[reference]'), or convert it to "
                        "model.safetensors") from e
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin found")


def load_hf_t5(directory: str, config: Optional[T5Config] = None,
               **config_overrides) -> Tuple[T5Config, dict]:
  """(config, params) from a Hugging Face T5 checkpoint directory.

  With `config` given, the checkpoint is checked against it instead of its own config.json.
  """
  config_path = os.path.join(directory, "config.json")
  if config is None:
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face T5 checkpoint "
                              "directory has config.json and model.safetensors)")
    with open(config_path) as f:
      config = config_from_hf(json.load(f), **config_overrides)
  state = read_hf_state_dict(directory)
  if "lm_head.weight" not in state and not config.tie_word_embeddings:
    # transformers >= 5 ties every T5 and drops lm_head.weight from the file.
    config = config.replace(tie_word_embeddings=True,
                            scale_decoder_outputs=config.scales_decoder_outputs)
  return config, params_from_hf_state_dict(state, config, source=directory)


def save_hf_t5(directory: str, config: T5Config, params: dict) -> None:
  """Write `config.json` + `model.safetensors` loadable by transformers."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  save_file(params_to_hf_state_dict(params, config), os.path.join(directory, "model.safetensors"),
            metadata={"format": "pt"})
