"""hypertune's T5 against Hugging Face transformers / peft on the same random weights."""
import copy

import numpy as np
import pytest

from hf_reference import make_hf_t5, save_untied, torch, transformers
import jax.numpy as jnp

from hypertune.models import decoding, hf_convert
from hypertune.models.peft import LoRA, PeftParams
from hypertune.models.t5 import T5

# A padded batch: rows end in EOS (1) and pad (0) differently.
ENC = np.array([[5, 6, 7, 8, 9, 10, 1], [11, 12, 13, 1, 0, 0, 0], [20, 21, 22, 23, 24, 25, 1],
                [30, 31, 1, 0, 0, 0, 0]])
DEC = np.array([[0, 3, 4, 5, 6], [0, 7, 8, 1, 0], [0, 9, 1, 0, 0], [0, 2, 3, 4, 5]])
MAX_DECODE = 12


@pytest.fixture(scope="module", params=["v1_1", "v1_1_untied", "original"])
def pair(request, tmp_path_factory):
  """(hf_model, hypertune T5, params) holding the same weights, loaded from an HF directory."""
  directory = str(tmp_path_factory.mktemp(request.param))
  hf = make_hf_t5(request.param.replace("_untied", ""))
  if request.param.endswith("_untied"):
    hf = save_untied(hf, directory)
  else:
    hf.save_pretrained(directory)
  config, params = hf_convert.load_hf_t5(directory)
  if request.param == "v1_1_untied":
    assert not config.tie_word_embeddings and "logits_dense" in params
  return hf, T5(config), params


def hf_logits(hf, **kwargs):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC != 0),
              decoder_input_ids=torch.tensor(DEC), **kwargs).logits.numpy()


def test_logits_match_hf(pair):
  hf, model, params = pair
  ours = np.asarray(model.apply({"params": params}, ENC, DEC))
  np.testing.assert_allclose(ours, hf_logits(hf), atol=1e-4, rtol=0)


def _until_eos(row):
  row = list(row)
  return row[:row.index(1) + 1] if 1 in row else row


def test_greedy_matches_hf_generate(pair):
  hf, model, params = pair
  ours = np.asarray(decoding.greedy_decode(model, params, jnp.asarray(ENC),
                                           max_decode_len=MAX_DECODE))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC != 0),
                      max_length=MAX_DECODE + 1, num_beams=1, do_sample=False).numpy()[:, 1:]
  assert ours.shape == (len(ENC), MAX_DECODE)
  for a, b in zip(ours, ref):
    assert _until_eos(a) == _until_eos(b)
    assert all(t == 0 for t in a[len(_until_eos(a)):])  # padded after EOS


def test_beam_search_matches_hf_generate(pair):
  hf, model, params = pair
  seqs, scores = decoding.beam_search(model, params, jnp.asarray(ENC), max_decode_len=MAX_DECODE,
                                      num_beams=4)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC != 0),
                      max_length=MAX_DECODE + 1, num_beams=4, do_sample=False,
                      output_scores=True, return_dict_in_generate=True)
  for a, b in zip(np.asarray(seqs[:, 0]), ref.sequences.numpy()[:, 1:]):
    assert _until_eos(a) == _until_eos(b)
  np.testing.assert_allclose(np.asarray(scores[:, 0]), ref.sequences_scores.numpy(), atol=1e-4)


def test_export_roundtrip_loads_in_transformers(pair, tmp_path):
  hf, model, params = pair
  hf_convert.save_hf_t5(str(tmp_path), model.config, params)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(hf_logits(reloaded), hf_logits(hf), atol=1e-5, rtol=0)


def test_lora_matches_peft(tmp_path):
  peft = pytest.importorskip("peft")
  hf = make_hf_t5("v1_1", seed=3)
  hf.save_pretrained(str(tmp_path))
  config, params = hf_convert.load_hf_t5(str(tmp_path))
  rank, alpha = 4, 8
  base = hf_logits(hf)  # before get_peft_model, which wraps hf in place
  lora_model = peft.get_peft_model(
      hf, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q", "v"], lora_dropout=0.0))
  torch.manual_seed(7)
  with torch.no_grad():
    for name, p in lora_model.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn_like(p))  # lora_B starts at zero: make both non-zero
  lora_model.eval()
  # The reference runs in float64: with LoRA deltas this large, float32 rounding alone moves
  # transformers' logits by ~9e-5 (and hypertune's by ~8e-5) from the exact values.
  with torch.no_grad():
    ref = copy.deepcopy(lora_model).double()(
        input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC != 0),
        decoder_input_ids=torch.tensor(DEC)).logits.numpy()

  state = {k: v.numpy() for k, v in lora_model.state_dict().items() if "lora_" in k}
  kinds = {"encoder_self": ("encoder", "layer.0.SelfAttention"),
           "decoder_self": ("decoder", "layer.0.SelfAttention"),
           "decoder_cross": ("decoder", "layer.1.EncDecAttention")}
  lora = {}
  batch = len(ENC)
  for kind, (stack, where) in kinds.items():
    n = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
    for proj in ("q", "v"):
      prefix = f"base_model.model.{stack}.block.{{}}.{where}.{proj}"
      down = np.stack([state[prefix.format(i) + ".lora_A.default.weight"] for i in range(n)])
      up = np.stack([state[prefix.format(i) + ".lora_B.default.weight"] for i in range(n)])
      lora[f"{kind}/{proj}"] = LoRA(down=jnp.broadcast_to(down, (batch,) + down.shape),
                                    up=jnp.broadcast_to(up, (batch,) + up.shape),
                                    scale=alpha / rank)
  ours = np.asarray(T5(config).apply({"params": params}, ENC, DEC, PeftParams(lora=lora)))
  assert np.abs(ref - base).max() > 1e-2  # the LoRA deltas matter
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
  hf = make_hf_t5("original")
  hf.save_pretrained(str(tmp_path))
  config, _ = hf_convert.load_hf_t5(str(tmp_path))
  with pytest.raises(hf_convert.CheckpointMismatchError, match=r"d_model|shape \(96, 64\)"):
    hf_convert.load_hf_t5(str(tmp_path), config=config.replace(d_model=32))
  with pytest.raises(hf_convert.CheckpointMismatchError, match=r"missing keys .*block\.2"):
    hf_convert.load_hf_t5(str(tmp_path), config=config.replace(num_encoder_layers=3))
  with pytest.raises(hf_convert.CheckpointMismatchError, match=r"unexpected keys .*block\.1"):
    hf_convert.load_hf_t5(str(tmp_path), config=config.replace(num_decoder_layers=1))
