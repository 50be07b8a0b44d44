"""hypertune's Llama against Hugging Face transformers on the same random weights, and the HF
checkpoint conversion (single-file, sharded, .bin; export loaded back by transformers)."""
import copy
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax.core import meta  # pylint: disable=g-import-not-at-top,wrong-import-position

from hypertune.models import hf_llama, llama  # pylint: disable=wrong-import-position
from hypertune.models.decoder_only import beam_search, greedy_decode  # pylint: disable=wrong-import-position
from hypertune.models.llama import Llama  # pylint: disable=wrong-import-position

PAD, BOS, EOS = 0, 1, 2
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS)
# (a) grouped-query attention, untied head; (b) Llama-3 rope scaling whose original context (32)
# is shorter than the longest wavelengths, rope_theta != 10000, tied embeddings.
HF_CONFIGS = {
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "llama3": dict(num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=256,
                   rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32)),
}
# Right-padded prompts (pad 0) of lengths 9, 5, 2, 8; the model prepends BOS.
PROMPTS = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 0, 0, 0, 0],
                    [30, 31, 0, 0, 0, 0, 0, 0, 0], [40, 41, 42, 43, 44, 45, 46, 47, 0]])
MAX_DECODE = 10


def left_padded_batch():
  """(`[pads ; BOS ; prompt]` `[batch, 10]`, its mask): the layout generate expects."""
  lengths = (PROMPTS != PAD).sum(1) + 1
  width = PROMPTS.shape[1] + 1
  tokens = np.full((len(PROMPTS), width), PAD)
  for row, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
    tokens[row, width - n:] = np.concatenate([[BOS], prompt[:n - 1]])
  return tokens, np.arange(width)[None, :] >= (width - lengths)[:, None]


TOKENS, MASK = left_padded_batch()


def make_hf_llama(name: str, seed: int = 0):
  """A float32 LlamaForCausalLM (eager attention) with random weights, norms included, scaled
  so that logits spread (std ~1) and the EOS row up so that some rows stop early."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**BASE, **HF_CONFIGS[name], attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
    model.get_output_embeddings().weight[EOS].mul_(2.5)
  return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pair(request, tmp_path_factory):
  """(name, hf model, its single-file directory, LlamaConfig, params) from load_hf_llama."""
  directory = str(tmp_path_factory.mktemp(request.param))
  hf = make_hf_llama(request.param)
  hf.save_pretrained(directory)
  config, params = hf_llama.load_hf_llama(directory)
  return request.param, hf, directory, config, params


def hf_logits(hf, tokens=TOKENS, mask=MASK):
  """Logits on a left-padded batch with generate's position ids (real tokens counted)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
              position_ids=torch.tensor(positions)).logits.numpy()


def our_logits(config, params, tokens=TOKENS, mask=MASK):
  mask = jnp.asarray(mask)
  return np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens),
                                        llama.positions_of(mask), llama.causal_mask(mask)))


def assert_close_at_real_positions(ours, ref, what):
  diff = np.abs(ours[MASK] - ref[MASK]).max()
  print(f"{what}: max |logit diff| = {diff:.2e} (logit std {ref[MASK].std():.2f})")
  assert ref[MASK].std() > 0.5  # logits spread: the tolerance below is meaningful
  np.testing.assert_allclose(ours[MASK], ref[MASK], atol=1e-4, rtol=0)


def test_config_from_hf(pair):
  name, hf, _, config, _ = pair
  assert (config.num_kv_heads, config.head_dim, config.tie_word_embeddings) == (
      hf.config.num_key_value_heads, 16, hf.config.tie_word_embeddings)
  assert (config.pad_id, config.bos_id, config.eos_id) == (PAD, BOS, EOS)
  if name == "llama3":
    assert (config.rope_theta, config.rope_scaling_factor, config.rope_original_max_position) == (
        50000.0, 8.0, 32)
  else:
    assert (config.rope_theta, config.rope_scaling_factor) == (10000.0, None)
  assert hf_llama.config_from_hf(hf_llama.config_to_hf(config)) == config
  # Our inverse frequencies are transformers' (Llama-3 scaling changes them at this size).
  ours = np.asarray(llama.rope_frequencies(config))
  np.testing.assert_allclose(ours, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  unscaled = np.asarray(llama.rope_frequencies(config.replace(rope_scaling_factor=None)))
  assert (name == "llama3") == (not np.allclose(ours, unscaled))


def test_config_from_hf_rejects_and_defaults():
  hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32}
  config = hf_llama.config_from_hf({**hf, "eos_token_id": [7, 6], "rope_theta": 500000.0})
  assert (config.eos_id, config.num_kv_heads, config.head_dim, config.rope_theta) == (
      7, 2, 8, 500000.0)
  # transformers 4's layout of Llama-3.1: rope_theta beside rope_scaling.
  config = hf_llama.config_from_hf({**hf, "rope_theta": 500000.0, "rope_scaling": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}})
  assert (config.rope_theta, config.rope_scaling_factor, config.rope_high_freq_factor,
          config.rope_original_max_position) == (500000.0, 8.0, 4.0, 8192)
  with pytest.raises(ValueError, match="rope_type='linear'"):
    hf_llama.config_from_hf({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
  with pytest.raises(ValueError, match="model_type='mistral'"):
    hf_llama.config_from_hf({**hf, "model_type": "mistral"})


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_hf_on_padded_batch(pair, scan_layers):
  name, hf, directory, _, _ = pair
  config, params = hf_llama.load_hf_llama(directory, scan_layers=scan_layers)
  assert ("layers" in params["decoder"]) == scan_layers
  assert ("lm_head" in params) == (not config.tie_word_embeddings)
  assert_close_at_real_positions(our_logits(config, params), hf_logits(hf),
                                 f"{name} scan={scan_layers}")


def random_params(config, seed):
  """Random parameters in our Llama's own tree (its init's paths and shapes, traced without
  running it), drawn as in make_hf_llama."""
  mask = jnp.asarray(MASK)
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.asarray(TOKENS),
                          llama.positions_of(mask), llama.causal_mask(mask))
  leaves, tree = jax.tree_util.tree_flatten_with_path(meta.unbox(shapes["params"]))
  rng = np.random.default_rng(seed)
  draw = lambda x: rng.standard_normal(x.shape).astype(np.float32)
  return jax.tree_util.tree_unflatten(tree, [
      1.0 + 0.2 * draw(x) if "scale" in jax.tree_util.keystr(p) else 0.15 * draw(x)
      for p, x in leaves])


def test_export_loads_in_transformers(pair, tmp_path):
  name, _, _, config, _ = pair
  params = random_params(config, seed=5)
  # gqa exported sharded (transformers reads our index), llama3 as one file.
  shard_size = "40KB" if name == "gqa" else None
  hf_llama.save_hf_llama(str(tmp_path), config, params, max_shard_size=shard_size)
  assert os.path.exists(tmp_path / hf_llama.SAFE_INDEX) == (name == "gqa")
  reloaded, info = transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", output_loading_info=True)
  reloaded.eval()
  assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
  assert reloaded.dtype == torch.float32
  np.testing.assert_allclose(reloaded.model.rotary_emb.inv_freq.numpy(),
                             np.asarray(llama.rope_frequencies(config)), rtol=1e-6)
  assert_close_at_real_positions(our_logits(config, params), hf_logits(reloaded),
                                 f"{name} export")


def _assert_same_params(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _shards(directory):
  return sorted(f for f in os.listdir(directory)
                if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f))


def _bfloat16(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def test_loads_transformers_sharded_checkpoint(pair, tmp_path):
  name, hf, _, config, params = pair
  if name == "llama3":  # stored in bfloat16, as published checkpoints are
    hf = copy.deepcopy(hf).to(torch.bfloat16)
    params = jax.tree.map(_bfloat16, params)
  hf.save_pretrained(str(tmp_path), max_shard_size="50KB")
  assert len(_shards(tmp_path)) > 1 and not os.path.exists(tmp_path / hf_llama.SAFE_WEIGHTS)
  sharded_config, sharded = hf_llama.load_hf_llama(str(tmp_path))
  assert sharded_config == config
  _assert_same_params(sharded, params)


def test_save_sharded_roundtrip(pair, tmp_path):
  _, _, _, config, params = pair
  hf_llama.save_hf_llama(str(tmp_path), config, params)  # an earlier single-file save
  hf_llama.save_hf_llama(str(tmp_path), config, params, max_shard_size=30_000)
  shards = _shards(tmp_path)
  assert len(shards) > 2 and not os.path.exists(tmp_path / hf_llama.SAFE_WEIGHTS)
  for name in shards:  # at most the limit, or one larger tensor (the 32 KiB embedding) alone
    assert os.path.getsize(tmp_path / name) < 34_000
  loaded_config, loaded = hf_llama.load_hf_llama(str(tmp_path))
  assert loaded_config == config
  _assert_same_params(loaded, params)


def test_sharded_checkpoint_errors_name_the_tensor(tmp_path):
  hf = make_hf_llama("gqa")
  hf.save_pretrained(str(tmp_path), max_shard_size="50KB")
  config, _ = hf_llama.load_hf_llama(str(tmp_path))
  with open(tmp_path / hf_llama.SAFE_INDEX) as f:
    index = json.load(f)
  victim = "model.layers.1.mlp.up_proj.weight"
  shard = tmp_path / index["weight_map"][victim]
  tensors = safetensors_torch.load_file(str(shard))

  def write(state, weight_map):
    safetensors_torch.save_file(state, str(shard), metadata={"format": "pt"})
    with open(tmp_path / hf_llama.SAFE_INDEX, "w") as f:
      json.dump({**index, "weight_map": weight_map}, f)

  # A shape that does not fit the config: the (first such) tensor, both shapes and its shard
  # are named.
  first = "model.layers.0.mlp.gate_proj.weight"
  with pytest.raises(hf_llama.CheckpointMismatchError,
                     match=rf"{index['weight_map'][first]}: tensor '{first}' has shape "
                           r"\(128, 64\) .* expects \(96, 64\)"):
    hf_llama.load_hf_llama(str(tmp_path), config=config.replace(d_ff=96))
  # Deleted from its shard while the index still names it.
  write({k: v for k, v in tensors.items() if k != victim}, index["weight_map"])
  with pytest.raises(hf_llama.CheckpointMismatchError,
                     match=rf"{shard.name}: the index names tensors .*{victim}"):
    hf_llama.load_hf_llama(str(tmp_path))
  # Deleted from the index too: missing from the checkpoint.
  write({k: v for k, v in tensors.items() if k != victim},
        {k: v for k, v in index["weight_map"].items() if k != victim})
  with pytest.raises(hf_llama.CheckpointMismatchError,
                     match=rf"{tmp_path}: does not fit .*missing tensors \(1\): \['{victim}'\]"):
    hf_llama.load_hf_llama(str(tmp_path))
  # An extra tensor is unexpected; a rotary inv_freq buffer is not.
  extra = "model.layers.0.self_attn.q_proj.bias"
  write({**tensors, extra: torch.zeros(64),
         "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)},
        {**index["weight_map"], extra: shard.name,
         "model.layers.0.self_attn.rotary_emb.inv_freq": shard.name})
  with pytest.raises(hf_llama.CheckpointMismatchError, match=rf"unexpected tensors \(1\): "
                                                             rf"\['{extra}'\]"):
    hf_llama.load_hf_llama(str(tmp_path))
  # A shard the index names is gone.
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=rf"shard '{shard.name}'"):
    hf_llama.load_hf_llama(str(tmp_path))


def test_loads_pytorch_bin(pair, tmp_path):
  name, hf, directory, config, params = pair
  state = {k: v.to(torch.bfloat16 if "norm" in k else torch.float32)
           for k, v in hf.state_dict().items()}
  state["model.rotary_emb.inv_freq"] = hf.model.rotary_emb.inv_freq
  if name == "gqa":  # one file
    torch.save(state, tmp_path / hf_llama.TORCH_WEIGHTS)
  else:  # two shards and their index
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:7],
              "pytorch_model-00002-of-00002.bin": keys[7:]}
    for file, names in shards.items():
      torch.save({k: state[k] for k in names}, tmp_path / file)
    (tmp_path / hf_llama.TORCH_INDEX).write_text(json.dumps(
        {"weight_map": {k: f for f, names in shards.items() for k in names}}))
  with open(os.path.join(directory, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  loaded_config, loaded = hf_llama.load_hf_llama(str(tmp_path))
  assert loaded_config == config
  expected = jax.tree_util.tree_map_with_path(
      lambda p, x: _bfloat16(x) if "norm" in jax.tree_util.keystr(p) else x, params)
  _assert_same_params(loaded, expected)


def _padded_after_eos(row):
  row = list(row)
  return row[:row.index(EOS) + 1] + [PAD] * (len(row) - row.index(EOS) - 1) if EOS in row else row


def test_greedy_matches_hf_generate(pair):
  name, hf, _, config, params = pair
  prompt, prompt_mask = llama.prompt(config, jnp.asarray(PROMPTS))
  np.testing.assert_array_equal(np.asarray(prompt), TOKENS)  # the layout generate gets below
  np.testing.assert_array_equal(np.asarray(prompt_mask), MASK)
  ours = np.asarray(greedy_decode(Llama(config), params, jnp.asarray(PROMPTS),
                                  max_decode_len=MAX_DECODE))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(TOKENS),
                      attention_mask=torch.tensor(MASK.astype(np.int64)),
                      max_new_tokens=MAX_DECODE, num_beams=1, do_sample=False,
                      pad_token_id=PAD, eos_token_id=EOS).numpy()[:, TOKENS.shape[1]:]
  # generate stops when every row has ended: pad its output to MAX_DECODE as ours is.
  ref = np.pad(ref, ((0, 0), (0, MAX_DECODE - ref.shape[1])), constant_values=PAD)
  print(f"{name} greedy: ours {ours.tolist()} hf {ref.tolist()}")
  assert ours.shape == (len(PROMPTS), MAX_DECODE)
  ended = [EOS in row for row in ref]
  assert any(ended) and not all(ended)  # both an early stop and a full-length row are checked
  np.testing.assert_array_equal(ours, ref)
  assert [_padded_after_eos(row) for row in ours] == ours.tolist()


def test_beam_search_matches_hf_generate(pair):
  name, hf, _, config, params = pair
  seqs, scores = beam_search(Llama(config), params, jnp.asarray(PROMPTS),
                             max_decode_len=MAX_DECODE, num_beams=4)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(TOKENS),
                      attention_mask=torch.tensor(MASK.astype(np.int64)),
                      max_new_tokens=MAX_DECODE, num_beams=4, do_sample=False,
                      pad_token_id=PAD, eos_token_id=EOS, output_scores=True,
                      return_dict_in_generate=True)
  best = ref.sequences.numpy()[:, TOKENS.shape[1]:]
  best = np.pad(best, ((0, 0), (0, MAX_DECODE - best.shape[1])), constant_values=PAD)
  print(f"{name} beam: ours {np.asarray(seqs[:, 0]).tolist()} hf {best.tolist()}")
  assert seqs.shape == (len(PROMPTS), 4, MAX_DECODE)
  # generate fills a finished beam with EOS up to the longest one; ours pads after EOS.
  np.testing.assert_array_equal(np.asarray(seqs[:, 0]), [_padded_after_eos(r) for r in best])
  assert [_padded_after_eos(row) for row in np.asarray(seqs[:, 0])] == seqs[:, 0].tolist()
  np.testing.assert_allclose(np.asarray(scores[:, 0]), ref.sequences_scores.numpy(), atol=1e-4)
