"""HyperLlama: gist keys/values as a prefix with a position offset equal one pass under the gist
mask; the hypernetwork LoRA only acts in the hypernetwork pass; decoding; the built-in runs."""
import os

import gin_training
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypertune.hypernets.gisting import Gisting
from hypertune.models import decoder_only
from hypertune.models import llama as llama_lib

# The HyperLlama run files; this file runs them (tests/test_gin_runs.py skips them).
RUNS = ["experiments/hyperllama/builtin_llama.gin",
        "experiments/hyperllama/builtin_hyperllama.gin",
        "experiments/hyperllama/builtin_llama_definition.gin",
        "experiments/hyperllama/builtin_hyperllama_instruct.gin",
        "experiments/hyperllama/builtin_llama_prefix.gin"]
G = 3
CFG = llama_lib.llama_config("tiny", vocab_size=64, bos_id=1, eos_id=2)


@pytest.fixture(scope="module")
def model_and_params():
  module = decoder_only.HyperCausalLM(CFG, Gisting(CFG, num_gist_tokens=G, lora_rank=2))
  shapes = {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 3),
            "hyper_encoder_input_tokens": (2, 8)}
  variables = jax.jit(lambda: module.init(jax.random.key(0), **{
      k: jnp.ones(s, jnp.int32) for k, s in shapes.items()}))()
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  return module, meta.unbox(variables["params"])


def _right_pad(rows, width):
  return jnp.array([r + [0] * (width - len(r)) for r in rows], jnp.int32)


DEMOS = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]  # rows of different lengths
QUERIES = [[20, 21, 22, 23], [24, 25]]


def _downstream(params, method, *args, **kw):
  return llama_lib.Llama(CFG).apply({"params": params["downstream"]}, *args, method=method, **kw)


def _two_pass(module, params, demos):
  """Logits `[batch, 1 + max query, vocab]` of `[BOS ; query]` with the gist prefix."""
  peft = module.apply({"params": params}, _right_pad(demos, 8),
                      method=decoder_only.HyperCausalLM.generate_peft)
  tokens, mask = llama_lib.prompt(CFG, _right_pad(QUERIES, 4))
  logits = _downstream(params, llama_lib.Llama.__call__, tokens,
                       llama_lib.positions_of(mask, peft.position_offset),
                       llama_lib.causal_mask(mask), peft)
  return logits, peft


def _one_pass(params, demos):
  """Logits of one pass over `[BOS ; demos ; gists ; BOS ; query]` per row (right-aligned),
  where the query sees the gists but not the demonstrations (the gist mask)."""
  gists = params["hypernet"]["gist_embeddings"]
  rows, parts = [], []
  for d, q in zip(demos, QUERIES):
    rows.append([1] + d + [0] * G + [1] + q)
    parts.append([0] * (1 + len(d)) + [1] * G + [2] * (1 + len(q)))
  width = max(len(r) for r in rows)
  tokens = jnp.array([[0] * (width - len(r)) + r for r in rows])
  part = jnp.array([[-1] * (width - len(p)) + p for p in parts])
  embedded = _downstream(params, llama_lib.Llama.embed, tokens)
  gist_index = jnp.clip(jnp.cumsum(part == 1, axis=1) - 1, 0, G - 1)
  embedded = jnp.where((part == 1)[..., None], gists[gist_index], embedded)
  key_mask = part >= 0
  mask = llama_lib.causal_mask(key_mask)
  mask &= ~((part == 2)[:, None, :, None] & (part == 0)[:, None, None, :])  # the gist mask
  states, _ = _downstream(params, llama_lib.Llama.hidden, embedded,
                          llama_lib.positions_of(key_mask), mask)
  return _downstream(params, llama_lib.Llama.logits, states)


def test_gist_prefix_with_offset_equals_one_pass_under_the_gist_mask(model_and_params):
  module, params = model_and_params
  # A non-zero hypernetwork LoRA would make the two passes differ by design (it is active
  # only for the demonstrations and gists); with it at its zero init both use the base model.
  two, peft = _two_pass(module, params, DEMOS)
  one = _one_pass(params, DEMOS)
  assert peft.position_offset.tolist() == [1 + 3 + G, 1 + 6 + G]
  for i, q in enumerate(QUERIES):
    n = len(q) + 1
    np.testing.assert_allclose(two[i, -n:], one[i, -n:], atol=1e-5)
  # Tokens before the gists reach the query only through the gists: other demonstrations
  # change the outputs, and equal them again when their own gists are the prefix.
  other = [[30, 31, 32], [33, 34, 35, 36, 37, 38]]
  two_other, _ = _two_pass(module, params, other)
  assert not np.allclose(two_other[0, -5:], two[0, -5:], atol=1e-4)
  np.testing.assert_allclose(two_other[0, -5:], _one_pass(params, other)[0, -5:], atol=1e-5)


def test_hypernetwork_lora_acts_only_in_the_hypernetwork_pass(model_and_params):
  module, params = model_and_params
  hyper = _right_pad(DEMOS, 8)
  gen = lambda p: module.apply({"params": p}, hyper,
                               method=decoder_only.HyperCausalLM.generate_peft)
  # At its zero init the hypernetwork pass is the base model's pass over [BOS; demos; gists].
  tokens, mask = llama_lib.prompt(CFG, hyper)
  embedded = jnp.concatenate([_downstream(params, llama_lib.Llama.embed, tokens),
                              jnp.broadcast_to(params["hypernet"]["gist_embeddings"],
                                               (2, G, CFG.d_model))], axis=1)
  key_mask = jnp.concatenate([mask, jnp.ones((2, G), bool)], axis=1)
  _, (k, _) = _downstream(params, llama_lib.Llama.hidden, embedded,
                          llama_lib.positions_of(key_mask), llama_lib.causal_mask(key_mask),
                          kv_last=G)
  np.testing.assert_allclose(gen(params).prefixes["decoder_self"].key, jnp.moveaxis(k, 0, 1),
                             atol=1e-6)
  # A trained (non-zero) LoRA changes the gists but not the downstream pass given them.
  lora = jax.tree.map(lambda x: x + 0.1, params["hypernet"]["hyper_lora"])
  tuned = {**params, "hypernet": {**params["hypernet"], "hyper_lora": lora}}
  peft_tuned = gen(tuned)
  assert not np.allclose(peft_tuned.prefixes["decoder_self"].key,
                         gen(params).prefixes["decoder_self"].key, atol=1e-4)
  q_tokens, q_mask = llama_lib.prompt(CFG, _right_pad(QUERIES, 4))
  args = (q_tokens, llama_lib.positions_of(q_mask, peft_tuned.position_offset),
          llama_lib.causal_mask(q_mask), peft_tuned)
  np.testing.assert_array_equal(_downstream(params, llama_lib.Llama.__call__, *args),
                                _downstream(tuned, llama_lib.Llama.__call__, *args))


def test_greedy_and_beam_decoding_agree_with_teacher_forcing_with_offsets(model_and_params):
  module, params = model_and_params
  peft = module.apply({"params": params}, _right_pad(DEMOS, 8),
                      method=decoder_only.HyperCausalLM.generate_peft)
  model = llama_lib.Llama(CFG)
  prompts = _right_pad(QUERIES, 4)
  for p in (None, peft):
    out = decoder_only.greedy_decode(model, params["downstream"], prompts, p, max_decode_len=5)
    assert out.shape == (2, 5)
    dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), out[:, :-1]], axis=1)
    logits = model.apply({"params": params["downstream"]}, prompts, dec_in, p,
                         method=decoder_only.target_logits)
    # Up to and including the first EOS (pads follow it).
    live = jnp.cumsum(jnp.cumsum(out == CFG.eos_id, axis=1), axis=1) <= 1
    np.testing.assert_array_equal(jnp.where(live, jnp.argmax(logits, -1), CFG.pad_id), out)
    # One beam is greedy; with 4, the best beam's score is its teacher-forced log-likelihood
    # (same prefix, same offsets) over its generated length.
    one, _ = decoder_only.beam_search(model, params["downstream"], prompts, p, max_decode_len=5,
                                      num_beams=1)
    np.testing.assert_array_equal(one[:, 0], out)
    seqs, scores = decoder_only.beam_search(model, params["downstream"], prompts, p,
                                            max_decode_len=5, num_beams=4)
    best = seqs[:, 0]
    live = jnp.cumsum(jnp.cumsum(best == CFG.eos_id, axis=1), axis=1) <= 1
    batch = {"encoder_input_tokens": prompts, "decoder_target_tokens": best,
             "decoder_input_tokens": jnp.concatenate([jnp.zeros((2, 1), jnp.int32), best[:, :-1]],
                                                     axis=1), "decoder_loss_weights": live}
    log_likelihood = decoder_only.CausalLMModel(module).score(params, p, batch)
    np.testing.assert_allclose(scores[:, 0], log_likelihood / jnp.sum(live, axis=1), atol=1e-5)
    np.testing.assert_array_equal(
        decoder_only.CausalLMModel(module).predict(params, p, {"encoder_input_tokens": prompts},
                                                   max_decode_len=5, num_beams=4), best)


def test_builtin_runs_train_evaluate_and_leave_the_base_weights_untouched(tmp_path):
  """builtin_llama.gin trains the downstream; builtin_hyperllama.gin trains HyperLlama over it
  with downstream adaptation: the base weights stay bit for bit, the hypernetwork's change."""
  from test_gin_runs import TINY  # pylint: disable=g-import-not-at-top
  from hypertune import param_sources  # pylint: disable=g-import-not-at-top
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  task = common.mixture_tasks("builtin_heldout_label_words")[0].split(".", 1)[1]
  tiny = TINY + ["builtin.register_builtin_suite.k = 2", "NUM_GIST_TOKENS = 2",
                 "TASK_FEATURE_LENGTHS = {'hyper_inputs': 48, 'inputs': 16, 'targets': 8}"]
  base_dir = str(tmp_path / "llama")
  out = gin_training.train([RUNS[0]], tiny + [
      f"MODEL_DIR = '{base_dir}'", f"EVAL_MIXTURE_OR_TASK_NAME = 'builtin_zeroshot.{task}'"])
  assert np.all(np.isfinite(out["losses"])) and "accuracy" in out["eval"]["average"]
  base = param_sources.load_run_params(base_dir)["downstream"]
  for rank in (2,):  # with downstream adaptation (rank 0 is the other tests' default)
    hyper_dir = str(tmp_path / f"hyperllama{rank}")
    out = gin_training.train([RUNS[1]], tiny + [
        f"MODEL_DIR = '{hyper_dir}'", f"INITIAL_CHECKPOINT_PATH = '{base_dir}'",
        f"DOWNSTREAM_LORA_RANK = {rank}", f"EVAL_MIXTURE_OR_TASK_NAME = 'builtin.{task}'"])
    assert np.all(np.isfinite(out["losses"])) and "exact_match" in out["eval"]["average"]
    trained = param_sources.load_run_params(hyper_dir)
    jax.tree.map(np.testing.assert_array_equal, trained["downstream"], base)
    assert ("downstream_lora" in trained["hypernet"]) == bool(rank)
    assert np.any(np.asarray(trained["hypernet"]["hyper_lora"]["q_up"]) != 0)
    assert os.path.exists(os.path.join(hyper_dir, "model-info.txt"))
  # Deployment: infer writes the gist prefix and its offset once, then applies them.
  import json  # pylint: disable=g-import-not-at-top
  from hypertune import infer  # pylint: disable=g-import-not-at-top
  demos, queries, peft_dir = tmp_path / "demos.json", tmp_path / "queries.txt", tmp_path / "task"
  demos.write_text(json.dumps({"demonstrations": [{"input": "ab", "target": "X"},
                                                  {"input": "cd", "target": "Y"}]}))
  queries.write_text("ab\ncd\n")
  infer.main([f"--gin.MODEL_DIR='{hyper_dir}'", f"--gin.infer.demonstrations_file='{demos}'",
              f"--gin.infer.peft_dir='{peft_dir}'", f"--gin.infer.inputs_file='{queries}'"])
  meta = json.loads((peft_dir / "peft.json").read_text())
  assert meta["tensors"]["prefixes/decoder_self/key"] == [1, 2, 2, 2, 16]  # layers, G, kv heads
  assert meta["tensors"]["position_offset"] == [1]
  lines = (peft_dir / "predictions.jsonl").read_text().splitlines()
  assert [json.loads(line)["input"] for line in lines] == ["ab", "cd"]
  # Several demonstration sets: one prefix, their gists averaged.
  sets = tmp_path / "sets.json"
  sets.write_text(json.dumps({"demonstration_sets": [
      [{"input": "ab", "target": "X"}], [{"input": "cd", "target": "Y"}, {"input": "e", "target": "Z"}]]}))
  infer.main([f"--gin.MODEL_DIR='{hyper_dir}'", f"--gin.infer.demonstrations_file='{sets}'",
              f"--gin.infer.peft_dir='{tmp_path / 'sets'}'"])
  meta = json.loads((tmp_path / "sets" / "peft.json").read_text())
  assert meta["tensors"]["prefixes/decoder_self/key"] == [1, 2, 2, 2, 16]
  assert meta["demonstration_sets"] == 2 and meta["demonstrations_given"] == 3


def test_definition_instruction_and_prefix_tuning_runs(tmp_path):
  """Llama + definition trains on `<x> definition <x> query <y>`; HyperLlama with the
  instruction in the downstream input and flat prefix tuning train over it, base untouched."""
  from test_gin_runs import TINY  # pylint: disable=g-import-not-at-top
  from hypertune import param_sources  # pylint: disable=g-import-not-at-top
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  task = common.mixture_tasks("builtin_heldout_label_words")[0].split(".", 1)[1]
  tiny = TINY + ["builtin.register_builtin_suite.k = 2", "NUM_GIST_TOKENS = 2", "PREFIX_LEN = 2",
                 "TASK_FEATURE_LENGTHS = {'hyper_inputs': 96, 'inputs': 112, 'targets': 8}",
                 f"EVAL_MIXTURE_OR_TASK_NAME = 'builtin_def_concat.{task}'"]
  base_dir = str(tmp_path / "definition")
  out = gin_training.train([RUNS[2]], tiny + [f"MODEL_DIR = '{base_dir}'"])
  assert np.all(np.isfinite(out["losses"])) and "exact_match" in out["eval"]["average"]
  base = param_sources.load_run_params(base_dir)["downstream"]
  for run, task, trained_leaf in (
      (RUNS[3], f"builtin_def_instruct.{task}", ("hyper_lora", "q_up")),
      (RUNS[4], f"builtin_zeroshot.{task}", ("prefix_key",))):
    run_dir = str(tmp_path / os.path.basename(run))
    out = gin_training.train([run], tiny + [
        f"MODEL_DIR = '{run_dir}'", f"INITIAL_CHECKPOINT_PATH = '{base_dir}'",
        f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'"])
    assert np.all(np.isfinite(out["losses"])) and "exact_match" in out["eval"]["average"]
    trained = param_sources.load_run_params(run_dir)
    jax.tree.map(np.testing.assert_array_equal, trained["downstream"], base)
    leaf = trained["hypernet"]
    for key in trained_leaf:
      leaf = leaf[key]
    assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf) != 0)
  # The flat prefix is PEFT's PREFIX_TUNING (tests/test_peft_export.py checks the logits).
  import json  # pylint: disable=g-import-not-at-top
  from hypertune import infer  # pylint: disable=g-import-not-at-top
  spec = tmp_path / "task.json"
  spec.write_text(json.dumps({"instruction": "Copy the input."}))
  infer.main([f"--gin.MODEL_DIR='{run_dir}'", f"--gin.infer.demonstrations_file='{spec}'",
              f"--gin.infer.peft_dir='{tmp_path / 'task'}'",
              f"--gin.infer.hf_peft_dir='{tmp_path / 'task_hf'}'"])
  config = json.loads((tmp_path / "task_hf" / "adapter_config.json").read_text())
  assert (config["peft_type"], config["num_virtual_tokens"]) == ("PREFIX_TUNING", 2)


def test_prefix_tuning_pushes_the_input_down_by_its_length():
  from hypertune.hypernets.prefix_tuning import PrefixTuning  # pylint: disable=g-import-not-at-top
  module = PrefixTuning(CFG, prefix_len=4)
  params = module.init(jax.random.key(1), jnp.ones((3, 1), jnp.int32))
  peft = module.apply(params, jnp.ones((3, 1), jnp.int32))
  assert peft.prefixes["decoder_self"].key.shape == (3, CFG.num_layers, 4, CFG.num_kv_heads,
                                                     CFG.head_dim)
  np.testing.assert_array_equal(peft.position_offset, [4, 4, 4])
  peft.validate(CFG, 3)


def test_remat_and_unrolled_layers_compute_the_same_logits(model_and_params):
  _, params = model_and_params
  tokens, mask = llama_lib.prompt(CFG, _right_pad(QUERIES, 4))
  args = (tokens, llama_lib.positions_of(mask), llama_lib.causal_mask(mask))
  reference = _downstream(params, llama_lib.Llama.__call__, *args)
  remat = llama_lib.Llama(CFG.replace(remat=True)).apply({"params": params["downstream"]},
                                                         *args)
  np.testing.assert_allclose(remat, reference, atol=1e-6)
  unrolled = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i],
                                          params["downstream"]["decoder"]["layers"])
              for i in range(CFG.num_layers)}
  unrolled_params = {**params["downstream"], "decoder": unrolled}
  out = llama_lib.Llama(CFG.replace(scan_layers=False)).apply({"params": unrolled_params}, *args)
  np.testing.assert_allclose(out, reference, atol=1e-5)


def test_gists_of_several_demonstration_sets_are_averaged_at_aligned_positions(model_and_params):
  """Appendix B: set s of length n_s starts at initial offset max(n) - n_s. The values are
  those of the set alone (rope is relative), the keys its keys rotated by that offset."""
  module, params = model_and_params
  generate = lambda tokens: module.apply({"params": params}, tokens,  # pylint: disable=g-long-lambda
                                         method=decoder_only.HyperCausalLM.generate_peft)
  sets = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
  alone = [generate(_right_pad([s], 8)) for s in sets]
  averaged = generate(_right_pad(sets, 8)[None])  # [batch 1, sets 3, hyper_len]
  lengths = np.array([len(s) + 1 for s in sets])  # with BOS
  np.testing.assert_array_equal(averaged.position_offset, [lengths.max() + G])
  inv_freq = llama_lib.rope_frequencies(CFG)

  def shifted_keys(p, shift):  # [1, layers, G, kv_heads, hd] rotated by `shift` more positions
    k = jnp.moveaxis(p.prefixes["decoder_self"].key[0], 0, 1)  # [G, layers, kv_heads, hd]
    k = llama_lib.apply_rope(k, jnp.full(k.shape[:2], shift), inv_freq)
    return jnp.moveaxis(k, 1, 0)[None]

  want_keys = np.mean([shifted_keys(p, lengths.max() - n) for p, n in zip(alone, lengths)], 0)
  want_values = np.mean([p.prefixes["decoder_self"].value for p in alone], axis=0)
  got = averaged.prefixes["decoder_self"]
  np.testing.assert_allclose(got.value, want_values, atol=1e-5)
  np.testing.assert_allclose(got.key, want_keys, atol=1e-5)
  # Without the alignment (the keys as computed alone) they would differ.
  assert np.abs(np.mean([p.prefixes["decoder_self"].key for p in alone], 0) - got.key).max() > 1e-3
  # One set in the sets layout is the plain layout.
  one = generate(_right_pad(sets[:1], 8)[None])
  np.testing.assert_allclose(one.prefixes["decoder_self"].key, alone[0].prefixes["decoder_self"].key,
                             atol=1e-6)


def _mlp_lora(rng, batch, up_scale=0.3, scale=0.5, projections=("gate", "up", "down")):
  """Random "decoder_mlp/P" LoRA of rank 2 (up zero when up_scale is 0)."""
  from hypertune.models.peft import LoRA  # pylint: disable=g-import-not-at-top
  dims = {"gate": (CFG.d_model, CFG.d_ff), "up": (CFG.d_model, CFG.d_ff),
          "down": (CFG.d_ff, CFG.d_model)}
  out = {}
  for p in projections:
    d_in, d_out = dims[p]
    out[f"decoder_mlp/{p}"] = LoRA(
        down=jnp.asarray(rng.standard_normal((batch, CFG.num_layers, 2, d_in)), jnp.float32),
        up=jnp.asarray(up_scale * rng.standard_normal((batch, CFG.num_layers, d_out, 2)),
                       jnp.float32), scale=scale)
  return out


def test_mlp_lora_zero_is_the_base_nonzero_equals_the_merged_weights_and_shapes_are_checked(
    model_and_params):
  from hypertune.models.config import t5_config  # pylint: disable=g-import-not-at-top
  from hypertune.models.peft import PeftParams, PeftShapeError  # pylint: disable=g-import-not-at-top
  _, params = model_and_params
  tokens, mask = llama_lib.prompt(CFG, _right_pad(QUERIES, 4))
  args = (tokens, llama_lib.positions_of(mask), llama_lib.causal_mask(mask))
  apply = jax.jit(lambda p, peft: _downstream(p, llama_lib.Llama.__call__, *args, peft))
  run = lambda p, peft=None: np.asarray(apply(p, peft))
  base = run(params)
  rng = np.random.default_rng(0)
  # Zero up: exactly the base model (the delta is added, not approximated).
  np.testing.assert_array_equal(run(params, PeftParams(lora=_mlp_lora(rng, 2, up_scale=0.0))),
                                base)
  # Non-zero: the base model with `W + scale * (up @ down).T` merged into gate, up and down
  # (the same LoRA in both rows; a projection whose LoRA were ignored would not match).
  lora = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), _mlp_lora(rng, 2))
  layers = params["downstream"]["decoder"]["layers"]
  merged_mlp = {}
  for p in ("gate", "up", "down"):
    lo = lora[f"decoder_mlp/{p}"]
    delta = lo.scale * jnp.einsum("lor,lri->lio", lo.up[0], lo.down[0])  # [layers, in, out]
    merged_mlp[f"{p}_proj"] = layers["mlp"][f"{p}_proj"] + delta
  merged = {**params, "downstream": {**params["downstream"], "decoder": {"layers": {
      **layers, "mlp": merged_mlp}}}}
  with_lora = run(params, PeftParams(lora=lora))
  assert np.abs(with_lora - base).max() > 1e-1
  np.testing.assert_allclose(with_lora, run(merged), atol=1e-5)
  # Shapes and keys are checked, one line naming the tensor and what was expected.
  bad_down = lora["decoder_mlp/down"].replace(down=jnp.zeros((2, CFG.num_layers, 2, CFG.d_model)))
  cases = [
      ({"decoder_mlp/down": bad_down},
       r"lora\['decoder_mlp/down'\].down has shape \(2, 2, 2, 64\); expected \(2, 2, 2, 128\)"),
      ({"decoder_mlp/gate": lora["decoder_mlp/up"].replace(
          up=jnp.zeros((2, CFG.num_layers, CFG.d_model, 2)))},
       r"lora\['decoder_mlp/gate'\].up has shape \(2, 2, 64, 2\); expected \(2, 2, 128, 2\) = "
       r"\[batch, layers, out_features=128, rank\]"),
      ({"decoder_mlp/wi": lora["decoder_mlp/up"]},
       r"lora\['decoder_mlp/wi'\]: expected 'decoder_mlp/PROJ' with PROJ in \('gate', 'up', "
       r"'down'\)"),
  ]
  for bad, message in cases:
    with pytest.raises(PeftShapeError, match=message) as error:
      PeftParams(lora=bad).validate(CFG, 2)  # what Llama.hidden runs at trace time
    assert "\n" not in str(error.value)
  t5 = t5_config(size="tiny")
  with pytest.raises(PeftShapeError, match=r"MLP LoRA needs a SwiGLU decoder \(Llama\); "
                                           r"T5Config has none"):
    PeftParams(lora=_mlp_lora(rng, 1)).validate(t5, 1)


def test_gisting_lora_projections_put_lora_on_the_mlp_in_both_passes(model_and_params):
  projections = ("q", "v", "gate", "up", "down")
  module = decoder_only.HyperCausalLM(CFG, Gisting(
      CFG, num_gist_tokens=G, lora_rank=2, downstream_lora_rank=2, lora_projections=projections))
  hyper, enc, dec = _right_pad(DEMOS, 8), _right_pad(QUERIES, 4), jnp.ones((2, 3), jnp.int32)
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  shapes = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), enc, dec, hyper)["params"])
  # The base weights and gists of the fixture; the LoRAs at their init (random down, zero up),
  # without compiling `init` (fast on 2 cores).
  _, base = model_and_params
  rng = np.random.default_rng(1)
  lora_init = lambda k, s: jnp.asarray(np.zeros(s.shape) if k.endswith("_up") else
                                       0.1 * rng.standard_normal(s.shape), jnp.float32)
  params = {"downstream": base["downstream"], "hypernet": {
      "gist_embeddings": base["hypernet"]["gist_embeddings"],
      **{n: {k: lora_init(k, s) for k, s in shapes["hypernet"][n].items()}
         for n in ("hyper_lora", "downstream_lora")}}}
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes)
  for name in ("hyper_lora", "downstream_lora"):
    got = {k: v.shape for k, v in params["hypernet"][name].items()}
    assert got == {"q_down": (2, 2, 64), "q_up": (2, 64, 2), "v_down": (2, 2, 64),
                   "v_up": (2, 32, 2), "mlp_gate_down": (2, 2, 64), "mlp_gate_up": (2, 128, 2),
                   "mlp_up_down": (2, 2, 64), "mlp_up_up": (2, 128, 2),
                   "mlp_down_down": (2, 2, 128), "mlp_down_up": (2, 64, 2)}, name
  gen = jax.jit(lambda p: module.apply({"params": p}, hyper,
                                       method=decoder_only.HyperCausalLM.generate_peft))
  peft = gen(params)
  assert sorted(peft.lora) == ["decoder_mlp/down", "decoder_mlp/gate", "decoder_mlp/up",
                               "decoder_self/q", "decoder_self/v"]
  q_tokens, q_mask = llama_lib.prompt(CFG, enc)
  downstream = jax.jit(lambda p, peft: _downstream(  # the downstream pass given the gists
      p, llama_lib.Llama.__call__, q_tokens, llama_lib.positions_of(q_mask, peft.position_offset),
      llama_lib.causal_mask(q_mask), peft))

  def bump(p, which, name):  # a trained (non-zero) up of one MLP projection
    lora = dict(p["hypernet"][which])
    lora[name] = lora[name] + 0.5
    return {**p, "hypernet": {**p["hypernet"], which: lora}}

  # The hypernetwork's MLP LoRA changes the gists; the downstream's the downstream pass only.
  hyper_tuned = bump(params, "hyper_lora", "mlp_down_up")
  assert np.abs(gen(hyper_tuned).prefixes["decoder_self"].key
                - peft.prefixes["decoder_self"].key).max() > 1e-3
  down_tuned = bump(params, "downstream_lora", "mlp_gate_up")
  peft_tuned = gen(down_tuned)
  np.testing.assert_array_equal(peft_tuned.prefixes["decoder_self"].key,
                                peft.prefixes["decoder_self"].key)
  np.testing.assert_array_equal(peft_tuned.lora["decoder_mlp/gate"].up,
                                peft.lora["decoder_mlp/gate"].up + 0.5)
  assert np.abs(downstream(params, peft_tuned) - downstream(params, peft)).max() > 1e-3
  bad = decoder_only.HyperCausalLM(CFG, Gisting(CFG, num_gist_tokens=G, lora_rank=2,
                                                lora_projections=("q", "wi")))
  with pytest.raises(ValueError, match=r"SharedLoRA.projections=\('q', 'wi'\): expected distinct "
                                       r"names from \('q', 'k', 'v', 'o', 'gate', 'up', 'down'\)"):
    jax.eval_shape(bad.init, jax.random.key(0), enc, dec, hyper)
