"""Random-weight Hugging Face T5 models, saved to disk, for parity tests and benchmarks."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# A v1.1 gated-GELU untied config with num_heads * d_kv != d_model and unequal stack depths, and
# an original-T5 ReLU tied config.
HF_CONFIGS = {
    "v1_1": dict(vocab_size=96, d_model=48, d_kv=16, num_heads=4, d_ff=80, num_layers=3,
                 num_decoder_layers=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, dropout_rate=0.0),
    "original": dict(vocab_size=96, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2,
                     num_decoder_layers=2, relative_attention_num_buckets=8,
                     relative_attention_max_distance=20, feed_forward_proj="relu",
                     tie_word_embeddings=True, dropout_rate=0.0),
}


def make_hf_t5(name: str, seed: int = 0):
  """A T5ForConditionalGeneration with random weights (layer norms included), in eval mode.

  Embeddings are scaled down and the EOS row up so greedy/beam outputs vary and some stop early.
  """
  torch.manual_seed(seed)
  cfg = transformers.T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                              **HF_CONFIGS[name])
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "layer_norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "relative_attention_bias" in pname:
        p.copy_(torch.randn_like(p))
    model.shared.weight.mul_(0.3)
    model.shared.weight[1].mul_(2.0)
  return model


def save_untied(model, directory: str):
  """Save as a published T5 v1.1 checkpoint is laid out: a separate `lm_head.weight`.

  (transformers >= 5 ties every T5 it builds; a file holding both keys loads untied.)
  """
  import json
  import safetensors.torch
  model.save_pretrained(directory)
  path = f"{directory}/model.safetensors"
  state = safetensors.torch.load_file(path)
  torch.manual_seed(1)
  state["lm_head.weight"] = 0.3 * torch.randn_like(state["shared.weight"])
  safetensors.torch.save_file(state, path, metadata={"format": "pt"})
  with open(f"{directory}/config.json") as f:
    config = json.load(f)
  config.update(tie_word_embeddings=False)
  config.pop("scale_decoder_outputs", None)
  with open(f"{directory}/config.json", "w") as f:
    json.dump(config, f)
  return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


def save_hf_t5_like(config, directory: str) -> str:
  """A random Hugging Face T5 with hypertune `config`'s shapes, saved untied to `directory`."""
  from hypertune.models.config import config_to_hf  # pylint: disable=g-import-not-at-top
  hf_cfg = {k: v for k, v in config_to_hf(config).items()
            if k not in ("architectures", "model_type", "is_encoder_decoder")}
  torch.manual_seed(0)
  save_untied(transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg)).eval(),
              directory)
  return directory
