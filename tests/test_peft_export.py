"""`hypertune.peft_export`: generated LoRA -> a Hugging Face PEFT adapter that `peft` loads onto
transformers' T5 with the same logits as hypertune's T5."""
import json

import numpy as np
import pytest

from hf_reference import save_hf_t5_like, torch, transformers
import jax
import jax.numpy as jnp

from hypertune import peft_export
from hypertune.models import hf_convert
from hypertune.models.config import t5_config
from hypertune.models.peft import LoRA, PeftParams, Prefix
from hypertune.models.t5 import T5

peft = pytest.importorskip("peft")

ENC = np.array([[5, 6, 7, 8, 9, 10, 1], [11, 12, 13, 1, 0, 0, 0]])
DEC = np.array([[0, 3, 4, 5, 6], [0, 7, 8, 1, 0]])
# (kind/projection, scale): q and v of every attention kind, plus o and k (in != out here).
TARGETS = {"encoder_self/q": 0.5, "encoder_self/v": 2.0, "encoder_self/o": 1.0,
           "decoder_self/q": 1.5, "decoder_self/v": 1.0,
           "decoder_cross/q": 1.0, "decoder_cross/k": 0.7, "decoder_cross/v": 3.0}
RANK = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(HF directory, hypertune config, params): a T5 with 3 encoder and 2 decoder layers and
  heads * d_kv = 32 != d_model = 64."""
  config = t5_config(size="tiny", vocab_size=96).replace(d_kv=8, num_encoder_layers=3)
  directory = save_hf_t5_like(config, str(tmp_path_factory.mktemp("hf_t5")))
  config, params = hf_convert.load_hf_t5(directory)
  return directory, config, params


def random_lora(config, batch=2, rank=RANK, seed=0) -> PeftParams:
  rng = np.random.default_rng(seed)
  lora = {}
  for name, scale in TARGETS.items():
    kind, proj = name.split("/")
    layers = config.num_encoder_layers if kind == "encoder_self" else config.num_decoder_layers
    d_in, d_out = ((config.inner_dim, config.d_model) if proj == "o"
                   else (config.d_model, config.inner_dim))
    lora[name] = LoRA(down=0.3 * rng.standard_normal((batch, layers, rank, d_in), np.float32),
                      up=0.3 * rng.standard_normal((batch, layers, d_out, rank), np.float32),
                      scale=scale)
  return PeftParams(lora=lora)


def hf_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC != 0),
                 decoder_input_ids=torch.tensor(DEC)).logits.numpy()


def test_exported_lora_matches_peft_from_pretrained(base, tmp_path):
  directory, config, params = base
  lora = random_lora(config)
  ours = np.asarray(jax.jit(T5(config).apply)({"params": params}, ENC, DEC, lora))  # row i: LoRA i
  out = peft_export.export_lora_to_hf_peft(lora, str(tmp_path / "adapter"),
                                           base_model_name_or_path=directory, row=1)

  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (meta["peft_type"], meta["r"], meta["lora_alpha"]) == ("LORA", RANK, RANK)
  assert len(meta["target_modules"]) == 3 * 3 + 2 * 5  # encoder: 3 layers x 3; decoder: 2 x 5
  hf = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  base_logits = hf_logits(hf)
  model = peft.PeftModel.from_pretrained(hf, out).eval()
  loaded = {k for k in model.state_dict() if "lora_" in k}
  assert len(loaded) == 2 * len(meta["target_modules"])
  assert ("base_model.model.decoder.block.1.layer.1.EncDecAttention.k.lora_B.default.weight"
          in loaded)
  ref = hf_logits(model)  # row 1's LoRA applied to both rows

  assert np.abs(ref - base_logits).max() > 1e-1  # the LoRA deltas matter
  np.testing.assert_allclose(ours[1], ref[1], atol=1e-4, rtol=0)
  assert np.abs(ours[0] - ref[0]).max() > 1e-2  # row 0 has its own LoRA: `row` was honoured


def test_unrepresentable_or_malformed_peft_is_a_one_line_error(base, tmp_path):
  _, config, _ = base
  lora = random_lora(config, batch=1)
  key = jnp.zeros((1, config.num_decoder_layers, 3, config.num_heads, config.d_kv))
  cases = [
      (lora.replace(prefixes={"decoder_self": Prefix(key, key)}),
       r"cannot export prefixes\['decoder_self'\] to Hugging Face PEFT: only LoRA"),
      (PeftParams(), "have no LoRA"),
      (PeftParams(lora={"decoder_self/q": LoRA(down=jnp.zeros((1, 2, 2, 64)),
                                               up=jnp.zeros((1, 2, 32, 3)))}),
       r"lora\['decoder_self/q'\]: down \(1, 2, 2, 64\) and up \(1, 2, 32, 3\) do not fit"),
      (PeftParams(lora={"decoder/q": lora.lora["decoder_self/q"]}),
       r"lora\['decoder/q'\]: expected a key 'KIND/PROJ'"),
      (PeftParams(lora={**lora.lora, "decoder_self/k": random_lora(config, 1, rank=3).lora[
          "decoder_cross/k"]}), r"LoRA ranks differ \(\[2, 3\]\)"),
  ]
  for bad, message in cases:
    with pytest.raises(peft_export.PeftExportError, match=message) as error:
      peft_export.export_lora_to_hf_peft(bad, str(tmp_path / "adapter"))
    assert "\n" not in str(error.value)
  with pytest.raises(peft_export.PeftExportError, match="row 1 is out of range .* batch 1"):
    peft_export.export_lora_to_hf_peft(lora, str(tmp_path / "adapter"), row=1)
  assert not (tmp_path / "adapter").exists()  # nothing is written before the checks pass


def test_peft_prefix_tuning_differs_from_hypertune_prefix_only_by_position_bias(base):
  """Why prefixes are not exported (docs/peft_export.md): PEFT's T5 prefix tuning drops
  cross-attention prefixes and gives decoder self-attention prefix positions a relative position
  bias. Fed PEFT's own prefix, hypertune matches it only once the decoder bias table is zero."""
  directory, config, params = base
  apply = jax.jit(T5(config).apply)
  for zero_bias in (False, True):
    hf = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    table = hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    ours_params = params
    if zero_bias:
      with torch.no_grad():
        table.zero_()
      ours_params = {**params, "decoder": {**params["decoder"], "relpos_bias": jax.tree.map(
          jnp.zeros_like, params["decoder"]["relpos_bias"])}}
    model = peft.get_peft_model(hf, peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, num_layers=config.num_decoder_layers,
        token_dim=config.inner_dim, num_attention_heads=config.num_heads)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
      embedding = model.prompt_encoder["default"].embedding.weight
      embedding.copy_(torch.randn_like(embedding))
      cache = model.get_prompt(batch_size=len(ENC))
      ref = hf_logits(model)
    assert cache.cross_attention_cache.get_seq_length() == 0  # cross-attention gets no prefix
    layers = cache.self_attention_cache.layers  # keys/values [batch, heads, prefix_len, head_dim]
    key, value = (jnp.asarray(np.stack([getattr(l, a).numpy() for l in layers], 1)).swapaxes(2, 3)
                  for a in ("keys", "values"))
    prefix = PeftParams(prefixes={"decoder_self": Prefix(key, value)})
    gap = np.abs(np.asarray(apply({"params": ours_params}, ENC, DEC, prefix)) - ref).max()
    if zero_bias:
      assert gap < 1e-4
    else:
      assert gap > 1e-2


def test_infer_writes_the_hf_peft_adapter_beside_the_hypertune_files(base, tmp_path):
  """`--gin.infer.hf_peft_dir`: the generated LoRA also lands as a PEFT adapter folder."""
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune import inference  # pylint: disable=g-import-not-at-top
  from hypertune.models.base import EncoderDecoderModel  # pylint: disable=g-import-not-at-top
  _, config, _ = base
  name = "peft_export_test_bytes"
  if name not in seqio.TaskRegistry.names():
    source = seqio.FunctionDataSource(lambda split, shuffle_files: None, ["train"])
    seqio.TaskRegistry.add(name, source=source,
                           output_features={"inputs": seqio.Feature(seqio.ByteVocabulary())})

  class LoraRun(EncoderDecoderModel):  # the generated PEFT of a HyperT5-LoRA run, without one
    def __init__(self, generated):  # pylint: disable=super-init-not-called
      self.generated = generated
    has_hypernet = True

    def task_parameters(self, params, method_state, hyper_tokens):
      assert hyper_tokens.shape == (1, 32)
      return self.generated

  demos = tmp_path / "demos.json"
  demos.write_text(json.dumps({"demonstrations": [{"input": "apple", "target": "yes"}]}))
  lora = random_lora(config, batch=1)
  kwargs = dict(params={}, step=3, model_dir="/runs/r", mixture_or_task_name=name,
                task_feature_lengths={"hyper_inputs": 32}, peft_dir=str(tmp_path / "peft"),
                demonstrations_file=str(demos), hf_peft_dir=str(tmp_path / "hf"),
                hf_base_model="/models/t5")
  inference.infer(LoraRun(lora), **kwargs)
  assert (tmp_path / "peft" / "peft.safetensors").exists()
  meta = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert meta["base_model_name_or_path"] == "/models/t5" and meta["r"] == RANK
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(  # scale 3.0 folded into lora_B
      load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))[
          "base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"],
      3.0 * np.asarray(lora.lora["decoder_cross/v"].up[0, 1]), rtol=1e-6)
  with pytest.raises(peft_export.PeftExportError, match=r"prefixes\['encoder_self'\]"):
    key = jnp.zeros((1, config.num_encoder_layers, 2, config.num_heads, config.d_kv))
    inference.infer(LoraRun(lora.replace(prefixes={"encoder_self": Prefix(key, key)})),
                    **kwargs)
  with pytest.raises(ValueError, match="hf_peft_dir needs infer.demonstrations_file"):
    inference.infer(LoraRun(lora), **{**kwargs, "demonstrations_file": None})


# --- Llama --------------------------------------------------------------------------------
# (kind/projection, scale): every attention projection (k/v with the 2 key/value heads) and
# every SwiGLU projection.
LLAMA_TARGETS = {"decoder_self/q": 0.5, "decoder_self/k": 2.0, "decoder_self/v": 1.0,
                 "decoder_self/o": 1.5, "decoder_mlp/gate": 1.0, "decoder_mlp/up": 0.7,
                 "decoder_mlp/down": 3.0}
# Left-padded `[pads ; BOS ; prompt]` rows (pad 0, BOS 1) and their masks.
LLAMA_TOKENS = np.array([[1, 5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 1, 20, 21, 22, 23]])
LLAMA_MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], bool)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
  """(HF directory, hypertune config, params): a random-weight LlamaForCausalLM with
  grouped-query attention (4 heads, 2 key/value heads), 2 layers, d_ff 128 != d_model 64."""
  from hypertune.models import hf_llama  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, tie_word_embeddings=False, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp("hf_llama"))
  model.save_pretrained(directory)
  config, params = hf_llama.load_hf_llama(directory)
  return directory, config, params


def random_llama_lora(config, batch=2, rank=RANK, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  kv = config.num_kv_heads * config.head_dim
  dims = {"q": (config.d_model, config.inner_dim), "k": (config.d_model, kv),
          "v": (config.d_model, kv), "o": (config.inner_dim, config.d_model),
          "gate": (config.d_model, config.d_ff), "up": (config.d_model, config.d_ff),
          "down": (config.d_ff, config.d_model)}
  lora = {}
  for name, scale in LLAMA_TARGETS.items():
    d_in, d_out = dims[name.split("/")[1]]
    shape = (batch, config.num_layers)
    lora[name] = LoRA(down=0.3 * rng.standard_normal(shape + (rank, d_in), np.float32),
                      up=0.3 * rng.standard_normal(shape + (d_out, rank), np.float32),
                      scale=scale)
  return lora


def llama_hf_logits(model):
  positions = np.maximum(np.cumsum(LLAMA_MASK, axis=1) - 1, 0)  # real tokens counted
  with torch.no_grad():
    return model(input_ids=torch.tensor(LLAMA_TOKENS),
                 attention_mask=torch.tensor(LLAMA_MASK.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.numpy()


def test_exported_llama_lora_matches_peft_from_pretrained(llama_base, tmp_path):
  """q, k, v, o and gate, up, down LoRA of a HyperLlama-shaped PeftParams (gist prefix and
  position offset beside the downstream LoRA): refused whole, exported with lora_only=True,
  loaded by PEFT onto transformers' Llama: the logits of hypertune's Llama with the LoRA."""
  from hypertune.models import llama  # pylint: disable=g-import-not-at-top
  directory, config, params = llama_base
  lora = random_llama_lora(config)
  mask = jnp.asarray(LLAMA_MASK)
  ours = np.asarray(jax.jit(llama.Llama(config).apply)(
      {"params": params}, jnp.asarray(LLAMA_TOKENS), llama.positions_of(mask),
      llama.causal_mask(mask), PeftParams(lora=lora)))  # row i: LoRA i
  key = jnp.zeros((2, config.num_layers, 3, config.num_kv_heads, config.head_dim))
  gisting = PeftParams(prefixes={"decoder_self": Prefix(key, key)}, lora=lora,
                       position_offset=jnp.array([7, 9], jnp.int32))
  with pytest.raises(peft_export.PeftExportError,
                     match=r"cannot export prefixes\['decoder_self'\], position_offset to "
                           r"Hugging Face PEFT: .*lora_only=True exports the LoRA alone"):
    peft_export.export_lora_to_hf_peft(gisting, str(tmp_path / "adapter"), architecture="llama")
  out = peft_export.export_lora_to_hf_peft(gisting, str(tmp_path / "adapter"),
                                           base_model_name_or_path=directory, row=1,
                                           architecture="llama", lora_only=True)

  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (meta["peft_type"], meta["task_type"], meta["r"], meta["lora_alpha"]) == (
      "LORA", "CAUSAL_LM", RANK, RANK)
  assert len(meta["target_modules"]) == 2 * 7
  assert "model.layers.1.mlp.down_proj" in meta["target_modules"]
  hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
  base_logits = llama_hf_logits(hf)
  model = peft.PeftModel.from_pretrained(hf, out).eval()
  loaded = {k for k in model.state_dict() if "lora_" in k}
  assert len(loaded) == 2 * len(meta["target_modules"])
  assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight" in loaded
  ref = llama_hf_logits(model)  # row 1's LoRA applied to both rows

  real = LLAMA_MASK[1]
  assert np.abs(ref - base_logits)[1, real].max() > 1e-1  # the LoRA deltas matter
  assert ref[1, real].std() > 0.5  # logits spread: the tolerance is meaningful
  diff = np.abs(ours[1, real] - ref[1, real]).max()
  print(f"Llama LoRA export: max |logit diff| vs PEFT = {diff:.2e} (LoRA moves the logits by "
        f"{np.abs(ref - base_logits)[1, real].max():.2f}; logit std {ref[1, real].std():.2f})")
  np.testing.assert_allclose(ours[1, real], ref[1, real], atol=1e-4, rtol=0)
  assert np.abs(ours[0] - ref[0]).max() > 1e-2  # row 0 has its own LoRA: `row` was honoured


def test_llama_export_refuses_keys_of_the_other_architecture(llama_base, tmp_path):
  _, config, _ = llama_base
  lora = random_llama_lora(config, batch=1)
  cases = [
      ({"decoder_cross/q": lora["decoder_self/q"]}, "llama",
       r"lora\['decoder_cross/q'\]: expected a key 'decoder_self/PROJ' with PROJ in \('q', 'k', "
       r"'v', 'o'\) or 'decoder_mlp/PROJ' with PROJ in \('gate', 'up', 'down'\) "
       r"\(architecture 'llama'\)"),
      ({"decoder_mlp/gate": lora["decoder_mlp/gate"]}, "t5",
       r"lora\['decoder_mlp/gate'\]: expected a key 'KIND/PROJ' with KIND in "
       r"\('encoder_self', 'decoder_self', 'decoder_cross'\)"),
      ({"decoder_mlp/wi_0": lora["decoder_mlp/gate"]}, "llama", r"lora\['decoder_mlp/wi_0'\]"),
      (lora, "gpt2", r"architecture='gpt2': expected one of \('t5', 'llama'\)"),
  ]
  for bad, architecture, message in cases:
    with pytest.raises(peft_export.PeftExportError, match=message) as error:
      peft_export.export_lora_to_hf_peft(PeftParams(lora=bad), str(tmp_path / "adapter"),
                                         architecture=architecture)
    assert "\n" not in str(error.value)
  assert not (tmp_path / "adapter").exists()


def test_infer_exports_a_hyperllama_downstream_lora_with_hf_lora_only(llama_base, tmp_path):
  """`--gin.infer.hf_peft_dir` on a Llama run: the gists are refused by name unless
  `hf_lora_only=True`, which writes the downstream LoRA under Llama module names."""
  import seqio  # pylint: disable=g-import-not-at-top
  from hypertune import inference  # pylint: disable=g-import-not-at-top
  from hypertune.models.decoder_only import CausalLMModel  # pylint: disable=g-import-not-at-top
  _, config, _ = llama_base
  name = "peft_export_test_bytes"
  if name not in seqio.TaskRegistry.names():
    source = seqio.FunctionDataSource(lambda split, shuffle_files: None, ["train"])
    seqio.TaskRegistry.add(name, source=source,
                           output_features={"inputs": seqio.Feature(seqio.ByteVocabulary())})

  class GistingRun(CausalLMModel):  # the generated PEFT of a HyperLlama run, without one
    def __init__(self, generated):  # pylint: disable=super-init-not-called
      self.generated = generated
    has_hypernet = True
    averages_demonstration_sets = True

    def task_parameters(self, params, method_state, hyper_tokens):
      return self.generated

  demos = tmp_path / "demos.json"
  demos.write_text(json.dumps({"demonstrations": [{"input": "apple", "target": "yes"}]}))
  lora = random_llama_lora(config, batch=1)
  key = jnp.zeros((1, config.num_layers, 3, config.num_kv_heads, config.head_dim))
  generated = PeftParams(prefixes={"decoder_self": Prefix(key, key)}, lora=lora,
                         position_offset=jnp.array([9], jnp.int32))
  kwargs = dict(params={}, step=3, model_dir="/runs/r", mixture_or_task_name=name,
                task_feature_lengths={"hyper_inputs": 32}, peft_dir=str(tmp_path / "peft"),
                demonstrations_file=str(demos), hf_peft_dir=str(tmp_path / "hf"),
                hf_base_model="/models/llama")
  with pytest.raises(peft_export.PeftExportError,
                     match=r"prefixes\['decoder_self'\], position_offset"):
    inference.infer(GistingRun(generated), **kwargs)
  inference.infer(GistingRun(generated), **kwargs, hf_lora_only=True)
  meta = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert (meta["base_model_name_or_path"], meta["task_type"]) == ("/models/llama", "CAUSAL_LM")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(  # scale 3.0 folded into lora_B
      load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))[
          "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
      3.0 * np.asarray(lora["decoder_mlp/down"].up[0, 1]), rtol=1e-6)


def test_exported_llama_flat_prefix_matches_peft_prefix_tuning(llama_base, tmp_path):
  """Flat prefix tuning's prefix (input pushed down by P) is PEFT's PREFIX_TUNING exactly; a
  gist prefix (offset after the demonstrations) or a LoRA beside it is refused."""
  from hypertune.models import llama  # pylint: disable=g-import-not-at-top
  directory, config, params = llama_base
  p = 3
  shape = (2, config.num_layers, p, config.num_kv_heads, config.head_dim)
  key, value = (jax.random.normal(jax.random.key(i), shape) for i in (1, 2))
  flat = PeftParams(prefixes={"decoder_self": Prefix(key, value)},
                    position_offset=jnp.array([p, p], jnp.int32))
  mask = jnp.asarray(LLAMA_MASK)
  ours = np.asarray(jax.jit(llama.Llama(config).apply)(
      {"params": params}, jnp.asarray(LLAMA_TOKENS), llama.positions_of(mask, flat.position_offset),
      llama.causal_mask(mask), flat))
  for bad, message in (
      (PeftParams(prefixes=flat.prefixes, position_offset=jnp.array([7, 9], jnp.int32)),
       r"position_offset 9 of row 1 != prefix_len 3"),
      (PeftParams(prefixes=flat.prefixes, lora=random_llama_lora(config),
                  position_offset=flat.position_offset), r"cannot export lora\['decoder_self/q'\]")):
    with pytest.raises(peft_export.PeftExportError, match=message):
      peft_export.export_prefix_to_hf_peft(bad, str(tmp_path / "bad"), row=1)
  assert not (tmp_path / "bad").exists()
  out = peft_export.export_prefix_to_hf_peft(flat, str(tmp_path / "prefix"), directory, row=0)
  hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
  model = peft.PeftModel.from_pretrained(hf, out).eval()
  # PEFT drops position_ids with prefix tuning (positions are P + column), so the unpadded
  # row 0 is the one compared.
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(LLAMA_TOKENS),
                attention_mask=torch.tensor(LLAMA_MASK.astype(np.int64))).logits.numpy()
  diff = np.abs(ours[0] - ref[0]).max()
  print(f"Llama flat prefix export: max |logit diff| vs PEFT PREFIX_TUNING = {diff:.2e}")
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=0)
  assert np.abs(ours[1] - ref[1])[LLAMA_MASK[1]].max() > 1e-2  # row 1 has its own prefix
