"""Hugging Face Llama checkpoints <-> hypertune parameters.

`load_hf_llama(directory)` reads `config.json` and the weights: `model.safetensors`, a sharded
`model.safetensors.index.json` (its `weight_map` names `model-0000i-of-0000n.safetensors`), or
`pytorch_model.bin` / `pytorch_model.bin.index.json` (these need torch), in the order
transformers looks for them; it returns `(LlamaConfig, params)`. `save_hf_llama(directory, config,
params, max_shard_size=None)` writes them back, sharded when asked, so that
`transformers.LlamaForCausalLM.from_pretrained(directory)` loads them.

HF stores Linear weights as `[out, in]`; hypertune kernels are `[in, ...out]` with the attention
heads split out: q `[d_model, heads, head_dim]`, k/v `[d_model, kv_heads, head_dim]`,
o `[heads, head_dim, d_model]`; the MLP's `[d_model, d_ff]` / `[d_ff, d_model]`.
"""
import json
import os
import re
from typing import Dict, Optional, Tuple, Union

import numpy as np

from hypertune.models.hf_convert import CheckpointMismatchError, _get, _set, _unbox
from hypertune.models.llama import LlamaConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# Buffers older transformers saved with the weights; recomputed from the config.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# --- config.json ---------------------------------------------------------------------------
def _rope_fields(hf_config: dict) -> dict:
  """LlamaConfig rope fields from `rope_parameters` (transformers >= 5) or the older
  `rope_scaling` + `rope_theta`."""
  rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
  theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return dict(rope_theta=float(theta))
  if kind != "llama3":
    raise ValueError(f"config.json: rope_type={kind!r} is not supported (expected 'default' or "
                     "'llama3')")
  missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
  if missing:
    raise ValueError(f"config.json: rope_type 'llama3' needs {missing} in its rope parameters")
  original = rope.get("original_max_position_embeddings",
                      hf_config.get("max_position_embeddings", 8192))
  return dict(rope_theta=float(theta), rope_scaling_factor=float(rope["factor"]),
              rope_low_freq_factor=float(rope["low_freq_factor"]),
              rope_high_freq_factor=float(rope["high_freq_factor"]),
              rope_original_max_position=int(original))


def config_from_hf(hf_config: dict, **overrides) -> LlamaConfig:
  """LlamaConfig from a Hugging Face `config.json` dict (Llama-2, Llama-3, Llama-3.1).

  `eos_token_id` may be a list (Llama-3 instruct): the first is the EOS. Without a
  `pad_token_id` (Llama checkpoints have none) the pad id is 0, the data layer's padding.
  """
  model_type = hf_config.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"config.json: model_type={model_type!r}; expected 'llama'")
  for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf_config.get(key, supported) != supported:
      raise ValueError(f"config.json: {key}={hf_config[key]!r} is not supported (expected "
                       f"{supported!r})")
  heads = hf_config["num_attention_heads"]
  eos = hf_config.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    eos = eos[0] if eos else None
  ids = dict(pad_id=hf_config.get("pad_token_id"), bos_id=hf_config.get("bos_token_id"),
             eos_id=eos)
  fields = dict(
      vocab_size=hf_config["vocab_size"],
      d_model=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or heads,
      head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
      d_ff=hf_config["intermediate_size"],
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
      dropout_rate=float(hf_config.get("attention_dropout") or 0.0),
      **_rope_fields(hf_config),
      **{k: v for k, v in ids.items() if v is not None},
  )
  fields.update(overrides)
  return LlamaConfig(**fields)


def config_to_hf(config: LlamaConfig) -> dict:
  """Hugging Face `config.json` dict for a LlamaConfig, readable by transformers 4 (`rope_theta`,
  `rope_scaling`) and 5 (`rope_parameters`). `max_position_embeddings` is nominal (rope has no
  learned limit): the scaled context for Llama-3 scaling, else 4096."""
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  scaling = None
  max_positions = 4096
  if config.rope_scaling_factor is not None:
    scaling = {"rope_type": "llama3", "factor": config.rope_scaling_factor,
               "low_freq_factor": config.rope_low_freq_factor,
               "high_freq_factor": config.rope_high_freq_factor,
               "original_max_position_embeddings": config.rope_original_max_position}
    rope = {**scaling, "rope_theta": config.rope_theta}
    max_positions = int(config.rope_original_max_position * config.rope_scaling_factor)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.d_ff,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_positions,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": rope,
      "attention_bias": False,
      "attention_dropout": config.dropout_rate,
      "mlp_bias": False,
      "tie_word_embeddings": config.tie_word_embeddings,
      "pad_token_id": config.pad_id,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "dtype": "float32",
      "use_cache": True,
  }


# --- tensors -------------------------------------------------------------------------------
def _layer_mapping(config: LlamaConfig):
  """[(hypertune path inside one layer, HF key suffix inside `model.layers.{i}`, HF shape,
  to_ours, to_hf)]."""
  d, h, kvh, hd, ff = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
                       config.d_ff)

  def heads_out(n):  # [n * hd, d] <-> [d, n, hd]
    return (lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T)

  heads_in = (lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T)
  lin = (lambda w: w.T, lambda w: w.T)
  same = (lambda w: w, lambda w: w)
  return [
      ("input_layernorm/scale", "input_layernorm.weight", (d,), *same),
      ("self_attn/q_proj", "self_attn.q_proj.weight", (h * hd, d), *heads_out(h)),
      ("self_attn/k_proj", "self_attn.k_proj.weight", (kvh * hd, d), *heads_out(kvh)),
      ("self_attn/v_proj", "self_attn.v_proj.weight", (kvh * hd, d), *heads_out(kvh)),
      ("self_attn/o_proj", "self_attn.o_proj.weight", (d, h * hd), *heads_in),
      ("post_attention_layernorm/scale", "post_attention_layernorm.weight", (d,), *same),
      ("mlp/gate_proj", "mlp.gate_proj.weight", (ff, d), *lin),
      ("mlp/up_proj", "mlp.up_proj.weight", (ff, d), *lin),
      ("mlp/down_proj", "mlp.down_proj.weight", (d, ff), *lin),
  ]


def expected_hf_shapes(config: LlamaConfig) -> Dict[str, Tuple[int, ...]]:
  """Every HF key a checkpoint of `config` must have, with its shape."""
  shapes = {"model.embed_tokens.weight": (config.vocab_size, config.d_model),
            "model.norm.weight": (config.d_model,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, config.d_model)
  for i in range(config.num_layers):
    for _, hf, shape, _, _ in _layer_mapping(config):
      shapes[f"model.layers.{i}.{hf}"] = shape
  return shapes


def _describe(config: LlamaConfig) -> str:
  return (f"the Llama config ({config.num_layers} layers, d_model={config.d_model}, "
          f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, "
          f"head_dim={config.head_dim}, d_ff={config.d_ff}, vocab={config.vocab_size}, "
          f"tied={config.tie_word_embeddings})")


def _float32(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (any dtype, bfloat16 included)
    return value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def params_from_hf_state_dict(state_dict: Dict[str, np.ndarray], config: LlamaConfig,
                              source: str = "checkpoint",
                              files: Optional[Dict[str, str]] = None) -> dict:
  """hypertune params (unboxed; `decoder/layers` stacked, or `decoder/layers_{i}`, per
  `config.scan_layers`) from an HF state dict (numpy arrays or torch tensors).

  Raises CheckpointMismatchError naming every missing/unexpected key, or the first key whose
  shape does not fit, with both shapes and (given `files`: key -> file) the file holding it.
  """
  expected = expected_hf_shapes(config)
  present = {k for k in state_dict if not _IGNORED.search(k)}
  if config.tie_word_embeddings:
    present.discard("lm_head.weight")  # tied: the head is the embedding
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  if missing or unexpected:
    msg = [f"{source}: does not fit {_describe(config)}."]
    if missing:
      msg.append(f"missing tensors ({len(missing)}): {missing[:10]}")
    if unexpected:
      msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
    raise CheckpointMismatchError(" ".join(msg))
  for key, shape in expected.items():
    found = tuple(state_dict[key].shape)
    if found != shape:
      where = f"{source}/{files[key]}" if files and key in files else source
      raise CheckpointMismatchError(
          f"{where}: tensor {key!r} has shape {found} but {_describe(config)} expects {shape}")

  params: dict = {}
  _set(params, "embed_tokens/embedding", _float32(state_dict["model.embed_tokens.weight"]))
  _set(params, "norm/scale", _float32(state_dict["model.norm.weight"]))
  if not config.tie_word_embeddings:
    _set(params, "lm_head/kernel", _float32(state_dict["lm_head.weight"]).T)
  for ours, hf, _, to_ours, _ in _layer_mapping(config):
    per_layer = [to_ours(_float32(state_dict[f"model.layers.{i}.{hf}"]))
                 for i in range(config.num_layers)]
    if config.scan_layers:
      _set(params, f"decoder/layers/{ours}", np.stack(per_layer))
    else:
      for i, w in enumerate(per_layer):
        _set(params, f"decoder/layers_{i}/{ours}", w)
  return params


def params_to_hf_state_dict(params: dict, config: LlamaConfig) -> Dict[str, np.ndarray]:
  """The inverse of `params_from_hf_state_dict`: float32 `[out, in]` arrays by HF key."""
  params = _unbox(params)

  def get(path):
    return np.asarray(_get(params, path), np.float32)

  state = {"model.embed_tokens.weight": get("embed_tokens/embedding"),
           "model.norm.weight": get("norm/scale")}
  if not config.tie_word_embeddings:
    state["lm_head.weight"] = get("lm_head/kernel").T
  for ours, hf, _, _, to_hf in _layer_mapping(config):
    stacked = get(f"decoder/layers/{ours}") if config.scan_layers else None
    for i in range(config.num_layers):
      w = stacked[i] if config.scan_layers else get(f"decoder/layers_{i}/{ours}")
      state[f"model.layers.{i}.{hf}"] = to_hf(w)
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


# --- files ---------------------------------------------------------------------------------
def _read_safetensors(path: str, keys=None) -> Dict[str, np.ndarray]:
  from safetensors import safe_open  # numpy framework: bfloat16 comes back as ml_dtypes'
  with safe_open(path, framework="numpy") as f:
    names = f.keys() if keys is None else keys
    available = set(f.keys())
    absent = sorted(set(names) - available)
    if absent:
      raise CheckpointMismatchError(f"{path}: the index names tensors this file does not hold: "
                                    f"{absent[:10]}")
    return {k: f.get_tensor(k) for k in names}


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path}: reading a PyTorch .bin checkpoint needs torch "
                      "(pip install 'hypertune[reference]'), or convert it to "
                      "model.safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def read_hf_tensors(directory: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """(arrays by HF key, file name by HF key) of the checkpoint in `directory`: the first of
  model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin,
  pytorch_model.bin.index.json. Arrays keep their stored dtype (bfloat16 included)."""
  for single, index, read in ((SAFE_WEIGHTS, SAFE_INDEX, _read_safetensors),
                              (TORCH_WEIGHTS, TORCH_INDEX, _read_torch)):
    path = os.path.join(directory, single)
    if os.path.exists(path):
      state = read(path)
      return state, {k: single for k in state}
    if os.path.exists(os.path.join(directory, index)):
      return _read_sharded(directory, index, read)
  raise FileNotFoundError(f"{directory}: no {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or "
                          f"{TORCH_INDEX} found")


def _read_sharded(directory: str, index: str, read):
  index_path = os.path.join(directory, index)
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path}: expected a non-empty 'weight_map' {{tensor: file}}")
  by_file: Dict[str, list] = {}
  for key, name in weight_map.items():
    by_file.setdefault(name, []).append(key)
  state: Dict[str, np.ndarray] = {}
  for name, keys in sorted(by_file.items()):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{index_path}: names shard {name!r} ({len(keys)} tensors, e.g. "
                              f"{keys[0]!r}), which is not in {directory}")
    if read is _read_safetensors:
      state.update(read(path, keys))
    else:
      shard = read(path)
      absent = sorted(set(keys) - set(shard))
      if absent:
        raise CheckpointMismatchError(f"{path}: the index names tensors this file does not "
                                      f"hold: {absent[:10]}")
      state.update({k: shard[k] for k in keys})
  return state, dict(weight_map)


def load_hf_llama(directory: str, config: Optional[LlamaConfig] = None,
                  **config_overrides) -> Tuple[LlamaConfig, dict]:
  """(config, params) from a Hugging Face Llama checkpoint directory.

  With `config` given, the checkpoint is checked against it instead of its own config.json
  (`config_overrides` then apply to it, e.g. `scan_layers=False`).
  """
  if config is None:
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face Llama checkpoint "
                              f"directory has config.json and {SAFE_WEIGHTS} or {SAFE_INDEX})")
    with open(config_path) as f:
      config = config_from_hf(json.load(f), **config_overrides)
  elif config_overrides:
    config = config.replace(**config_overrides)
  state, files = read_hf_tensors(directory)
  return config, params_from_hf_state_dict(state, config, source=directory, files=files)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def _bytes(size: Union[int, str]) -> int:
  """A shard size: bytes, or a string as transformers writes them ("5GB", "500MiB", "50KB")."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(size).upper())
  if not match or match.group(2) not in _UNITS:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a size such as '5GB', "
                     "'500MB', '2GiB'")
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def save_hf_llama(directory: str, config: LlamaConfig, params: dict,
                  max_shard_size: Optional[Union[int, str]] = None) -> None:
  """Write `config.json` and the float32 weights, loadable by transformers: one
  `model.safetensors`, or where the weights exceed `max_shard_size` (bytes or "5GB") as many
  `model-0000i-of-0000n.safetensors` as needed plus `model.safetensors.index.json` (a tensor
  larger than the limit gets a shard of its own).

  Weight files of an earlier save in `directory` (as transformers names them) are removed first,
  so that no stale checkpoint shadows this one.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = params_to_hf_state_dict(params, config)
  shards = [dict(state)]
  if max_shard_size is not None:
    limit, shards = _bytes(max_shard_size), [{}]
    used = 0
    for key, value in state.items():
      if shards[-1] and used + value.nbytes > limit:
        shards.append({})
        used = 0
      shards[-1][key] = value
      used += value.nbytes
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if name in (SAFE_WEIGHTS, SAFE_INDEX) or _SHARD.match(name):
      os.remove(os.path.join(directory, name))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  if len(shards) == 1:
    save_file(state, os.path.join(directory, SAFE_WEIGHTS), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
           "weight_map": weight_map}
  with open(os.path.join(directory, SAFE_INDEX), "w") as f:
    json.dump(index, f, indent=2)
