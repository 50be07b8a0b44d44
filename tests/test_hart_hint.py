"""HART and HINT: the scanned autoregressive decoder, the consistency loss (first step, later
steps, microbatches), the ablation switches, fusion-in-decoder masking, HINT's generator size
and tied encoder. Training, resume, evaluation and inference through the shared code are in
tests/test_gin_runs.py (every run file) and test_resume_keeps_the_consistency_state below."""
import conftest
import os

import gin_training
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from hypertune import train_lib
from hypertune.hypernets.hart import HART
from hypertune.hypernets.hint import HINT
from hypertune.hypernets.hypert5 import HyperT5
from hypertune.models.base import EncoderDecoderModel
from hypertune.models.config import t5_config
from hypertune.models.hypermodel import HyperModel
from hypertune.models.peft import PeftParams
from hypertune.models.t5 import T5

CFG = t5_config("tiny", vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_encoder_layers=3,
                num_decoder_layers=3, dropout_rate=0.0)
HYPER = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]])
ENC = np.array([[5, 6, 1], [7, 8, 1]])
DEC = np.array([[0, 3, 4], [0, 5, 1]])


def build(hypernet, seed=0):
  model = HyperModel(CFG, hypernet=hypernet)
  variables = meta.unbox(jax.jit(model.init)(jax.random.key(seed), ENC, DEC, HYPER))
  return model, variables


def hart(**kw):
  return HART(CFG, CFG, **{"prefix_len": 2, "num_hyper_decoder_layers": 2, **kw})


def hint(**kw):
  return HINT(CFG, CFG, **{"prefix_len": 2, "bottleneck": 4, **kw})


def _encoded(module):
  mask = HYPER != CFG.pad_id
  return module.hyper_encoder(module.token_embedder(HYPER), mask), mask


def _states(model, params, **kw):
  def fn(m, **kw):
    encoded, mask = _encoded(m.hypernet)
    return m.hypernet.states(encoded, mask, **kw)
  return np.asarray(model.apply({"params": params}, method=fn, **kw))


# -- HART ----------------------------------------------------------------------------------

@pytest.mark.parametrize("attend_to_history", [False, True])
def test_hart_scanned_decoder_equals_an_unrolled_loop(attend_to_history):
  model, v = build(hart(attend_to_history=attend_to_history))

  def unrolled(m):
    h = m.hypernet
    encoded, mask = _encoded(h)
    z = jnp.broadcast_to(h.decoder_tokens, (2,) + h.decoder_tokens.shape)
    inputs, states = z, []
    for _ in range(CFG.num_encoder_layers):  # h_l = H_dec(h_{l-1}) (or of all earlier states)
      out = h.hyper_decoder(inputs, encoded, mask)
      states.append(out[:, -2:])
      inputs = jnp.concatenate([inputs, out[:, -2:]], 1) if attend_to_history else out
    return jnp.stack(states, 1)

  expected = np.asarray(model.apply({"params": v["params"]}, method=unrolled))
  np.testing.assert_allclose(_states(model, v["params"]), expected, atol=1e-5, rtol=1e-5)


def test_hart_state_l_follows_state_l_minus_1_and_heads_read_only_their_state():
  model, v = build(hart())
  params = v["params"]
  base = _states(model, params)
  assert base.shape == (2, CFG.num_encoder_layers, 2, CFG.d_model)
  moved = jax.tree.map(lambda x: x, params)
  moved["hypernet"]["decoder_tokens"] = params["hypernet"]["decoder_tokens"] + 0.5
  changed = np.abs(_states(model, moved) - base).max(axis=(0, 2, 3))
  assert np.all(changed > 1e-4), changed  # z reaches every state through the chain

  def prefixes(m, states):
    return m.hypernet.heads["enc_k"](states[:, :, 0])
  out = np.asarray(model.apply({"params": params}, jnp.asarray(base), method=prefixes))
  poked = base.copy()
  poked[:, 1] += np.random.default_rng(0).normal(size=poked[:, 1].shape)  # (LayerNorm removes a shift)
  out2 = np.asarray(model.apply({"params": params}, jnp.asarray(poked), method=prefixes))
  diff = np.abs(out2 - out).max(axis=(0, 2, 3))
  assert diff[1] > 1e-4 and diff[0] == 0 and diff[2] == 0, diff


def _train_steps(hypernet, batches, num_microbatches=1):
  """Metrics of one train_step per batch (frozen downstream, Adam)."""
  model = EncoderDecoderModel(HyperModel(CFG, hypernet=hypernet))
  variables = meta.unbox(model.init_variables(jax.random.key(0), {
      k: batches[0][k].shape for k in model.FEATURES}))
  state = train_lib.TrainState(step=jnp.asarray(0), params=variables["params"],
                               opt_state=optax.adam(1e-2).init(variables["params"]),
                               method_state={k: x for k, x in variables.items()
                                             if k == "method_state"})
  step = jax.jit(lambda s, b: train_lib.train_step(model, optax.adam(1e-2), s, b,
                                                   jax.random.key(1), num_microbatches))
  out = []
  for batch in batches:
    state, metrics = step(state, batch)
    out.append({k: float(x) for k, x in metrics.items()})
  return out


def _batches(n, batch=4):
  rng = np.random.default_rng(0)
  return [{"hyper_encoder_input_tokens": rng.integers(2, 64, (batch, 6)),
           "encoder_input_tokens": rng.integers(2, 64, (batch, 3)),
           "decoder_input_tokens": rng.integers(2, 64, (batch, 3)),
           "decoder_target_tokens": rng.integers(2, 64, (batch, 3)),
           "decoder_loss_weights": np.ones((batch, 3), np.float32)} for _ in range(n)]


def test_consistency_is_zero_first_then_positive_and_the_same_with_microbatches():
  batches = _batches(3)
  whole = _train_steps(hart(consistency_alpha=5.0), batches)
  key = "hypernet/consistency/consistency"
  assert whole[0][key] == 0.0
  assert whole[1][key] > 0 and whole[2][key] > 0
  np.testing.assert_allclose(whole[1]["loss"], whole[1]["cross_entropy"] + whole[1][key],
                             rtol=1e-5)
  micro = _train_steps(hart(consistency_alpha=5.0), batches, num_microbatches=2)
  for a, b in zip(whole, micro):
    np.testing.assert_allclose([a["loss"], a[key]], [b["loss"], b[key]], rtol=2e-4, atol=1e-7)
  plain = _train_steps(hart(), batches)  # alpha 0: no state, no term, same first step
  assert key not in plain[1]
  np.testing.assert_allclose(plain[0]["loss"], whole[0]["loss"], rtol=1e-6)


def _logits(model, v, peft=None, hyper=HYPER):
  if peft is not None:
    return np.asarray(model.apply(v, ENC, DEC, peft=peft))
  return np.asarray(model.apply(v, ENC, DEC, hyper))


def _peft(model, v, hyper=HYPER):
  return model.apply(v, jnp.asarray(hyper), method=HyperModel.generate_peft)


def _without_memory(peft):
  return peft.replace(extra_memory=None, extra_memory_mask=None)


@pytest.mark.parametrize("hypernet", [
    lambda fusion: hart(fusion_in_decoder=fusion),
    lambda fusion: HyperT5(CFG, CFG, prefix_len=2, num_hyper_decoder_layers=1,
                           fusion_in_decoder=fusion),
    lambda fusion: hint(instruction_fusion=fusion)], ids=["hart", "hypert5", "hint"])
def test_fusion_switch_adds_exactly_the_encoded_demonstrations(hypernet):
  """Off reproduces the model without fusion (same parameters, same logits); on, the decoder
  also reads the hyper encoder's output under its mask."""
  on_model, v = build(hypernet(True))
  off_model = HyperModel(CFG, hypernet=hypernet(False))
  on, off = _peft(on_model, v), _peft(off_model, v)
  assert off.extra_memory is None and on.extra_memory.shape == (2, 6, CFG.d_model)
  np.testing.assert_array_equal(np.asarray(on.extra_memory_mask), HYPER != 0)
  np.testing.assert_allclose(_logits(off_model, v), _logits(on_model, v, _without_memory(on)),
                             atol=1e-5)
  assert np.abs(_logits(on_model, v) - _logits(off_model, v)).max() > 1e-4


def test_consistency_and_autoregression_switches():
  """alpha changes the loss, not the model; autoregressive=False reads 2L learned tokens."""
  model, v = build(hart(consistency_alpha=10.0))
  plain = HyperModel(CFG, hypernet=hart())
  np.testing.assert_array_equal(_logits(model, v), _logits(plain, {"params": v["params"]}))
  flat_model, fv = build(hart(autoregressive=False))
  assert fv["params"]["hypernet"]["decoder_tokens"].shape == (2 * CFG.num_encoder_layers,
                                                             CFG.d_model)
  assert set(fv["params"]["hypernet"]) == set(v["params"]["hypernet"])  # the same heads
  assert np.isfinite(_logits(flat_model, fv)).all()


def test_fused_memory_padding_is_masked():
  t5 = T5(CFG)
  params = meta.unbox(t5.init(jax.random.key(0), ENC, DEC))
  memory = np.random.default_rng(0).normal(size=(2, 6, CFG.d_model)).astype(np.float32)
  mask = HYPER != 0
  peft = PeftParams(extra_memory=jnp.asarray(memory), extra_memory_mask=jnp.asarray(mask))
  garbage = np.where(mask[..., None], memory, 1e3)
  other = peft.replace(extra_memory=jnp.asarray(garbage))
  a, b = (np.asarray(t5.apply(params, ENC, DEC, p)) for p in (peft, other))
  np.testing.assert_allclose(a, b, atol=1e-5)
  visible = peft.replace(extra_memory=jnp.asarray(np.where(mask[..., None], memory + 1, memory)))
  assert np.abs(np.asarray(t5.apply(params, ENC, DEC, visible)) - a).max() > 1e-4


# -- HINT ----------------------------------------------------------------------------------

def test_hint_generates_prefixes_adapters_and_fused_instruction():
  model, v = build(hint())
  peft = _peft(model, v)
  peft.validate(CFG, 2)
  for kind in ("encoder_self", "decoder_self", "decoder_cross"):
    assert peft.prefixes[kind].key.shape == (2, 3, 2, 4, 8)  # [batch, layers, P, heads, hd]
  assert peft.adapters["encoder"].down.shape == (2, 3, 4, CFG.d_model)
  assert peft.adapters["decoder"].up.shape == (2, 3, CFG.d_model, 4)
  assert peft.extra_memory.shape == (2, 6, CFG.d_model)
  k = np.asarray(peft.prefixes["encoder_self"].key)
  assert np.abs(k[0] - k[1]).max() > 1e-4  # per-example modules
  # The adapters' up projection starts at zero: training starts from the unadapted model.
  assert np.abs(np.asarray(peft.adapters["encoder"].up)).max() == 0


def test_hint_generator_size_does_not_grow_with_the_bottleneck():
  def sizes(bottleneck):
    _, v = build(hint(bottleneck=bottleneck))
    h = v["params"]["hypernet"]
    emb = sum(x.size for k, x in h.items() if k.endswith("_embeddings"))
    nets = sum(x.size for k, sub in h.items() if not k.endswith("_embeddings")
               for x in jax.tree.leaves(sub))
    return nets, emb
  nets, emb = sizes(4)
  nets4, emb4 = sizes(16)
  assert nets4 == nets  # cross-attention and MLPs: independent of the bottleneck
  # Only the embeddings grow: one d_model row per new column of every layer's adapter.
  assert emb4 - emb == (CFG.num_encoder_layers + CFG.num_decoder_layers) * 12 * CFG.d_model


def test_hint_tied_encoder_is_one_set_of_weights_trained_by_both_uses():
  """Tied: no encoder of the hypernetwork's own; the downstream encoder's gradient is the sum
  of the gradients an untied model (with a copy of it) gives its two encoders."""
  tied, v = build(hint())
  assert "hyper_encoder" not in v["params"]["hypernet"]
  untied_model = HyperModel(CFG, hypernet=hint(tie_encoder=False))
  untied_params = jax.tree.map(lambda x: x, v["params"])
  untied_params["hypernet"] = {**v["params"]["hypernet"],
                               "hyper_encoder": v["params"]["downstream"]["encoder"],
                               "token_embedder": v["params"]["downstream"]["token_embedder"]}
  np.testing.assert_allclose(_logits(tied, v), _logits(untied_model, {"params": untied_params}),
                             atol=1e-5)

  def loss(model, params):
    return jnp.sum(model.apply({"params": params}, ENC, DEC, HYPER) ** 2) * 1e-3
  g_tied = jax.grad(lambda p: loss(tied, p))(v["params"])
  g_untied = jax.grad(lambda p: loss(untied_model, p))(untied_params)
  for ours, theirs in (("encoder", "hyper_encoder"), ("token_embedder", "token_embedder")):
    hyper_g = g_untied["hypernet"][theirs]
    assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(hyper_g)) > 1e-6
    jax.tree.map(lambda t, d, h: np.testing.assert_allclose(t, d + h, rtol=1e-4, atol=1e-7),
                 g_tied["downstream"][ours], g_untied["downstream"][ours], hyper_g)


def test_hint_ablations():
  """Instruction fusion alone (no PEFT generation) is the T5 reading [instruction ; input];
  the decoder generator swaps the cross-attention layer for a non-causal decoder."""
  model, v = build(hint(peft_generation=False))
  assert "hypernet" not in v["params"] or not v["params"]["hypernet"]
  t5 = T5(CFG)
  ds = {"params": v["params"]["downstream"]}
  encoded = t5.apply(ds, jnp.asarray(HYPER), method=T5.encode)
  fused = PeftParams(extra_memory=encoded, extra_memory_mask=jnp.asarray(HYPER != 0))
  np.testing.assert_allclose(_logits(model, v), np.asarray(t5.apply(ds, ENC, DEC, fused)),
                             atol=1e-5)
  dec_model, dv = build(hint(generator="decoder", num_hyper_decoder_layers=1))
  assert "hyper_decoder" in dv["params"]["hypernet"]
  assert "generator_attention" not in dv["params"]["hypernet"]
  _peft(dec_model, dv).validate(CFG, 2)
  with pytest.raises(ValueError, match="adapts nothing"):
    build(hint(peft_generation=False, instruction_fusion=False))


# -- through the trainer, evaluator, infer and a 2 x 4 mesh: the shared code -----------------

BUILTIN = ["BATCH_SIZE = 4", "train.checkpoint_period = 2", "train.log_every_steps = 1",
           "optimizers.linear_warmup_decay.warmup_steps = 0", "config.t5_config.size = 'tiny'",
           "PREFIX_LEN = 2", "builtin.register_builtin_suite.k = 2",
           "TASK_FEATURE_LENGTHS = {'hyper_inputs': 48, 'inputs': 16, 'targets': 12}",
           "INITIAL_CHECKPOINT_PATH = None", "train.eval_batch_size = 4"]
RUNS = {"quickstart/2_hart.gin": ["hart.HART.num_hyper_decoder_layers = 1"],
        "quickstart/2_hint.gin": ["ADAPTER_BOTTLENECK = 4"]}


def _eval_task():
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  return common.mixture_tasks("builtin_heldout_label_words")[0]


def _run(path, model_dir, *extra):
  return gin_training.train([path], BUILTIN + RUNS[path] + [f"MODEL_DIR = '{model_dir}'",
                                                            *extra])


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
  """{run file: (run dir, output)}: 4 steps of each method on the built-in suite from a random
  downstream, evaluated at the end on one held-out classification task."""
  task = _eval_task()
  runs = {}
  for path in RUNS:
    d = tmp_path_factory.mktemp(os.path.basename(path)[:-4])
    runs[path] = str(d), _run(path, d, "TRAIN_STEPS = 4", "EVAL_PERIOD = 4",
                              f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'")
  return runs, task


@pytest.mark.parametrize("path", list(RUNS))
def test_method_trains_and_evaluates_through_the_shared_code(method_runs, path):
  (runs, task) = method_runs
  d, out = runs[path]
  assert len(out["losses"]) == 4 and np.all(np.isfinite(out["losses"]))
  assert 0.0 <= out["eval"][task]["accuracy"] <= 100.0
  assert os.path.exists(os.path.join(d, "eval", "results_step4.json"))
  metrics = open(os.path.join(d, "train", "metrics.jsonl")).read()
  assert ("consistency" in metrics) == ("hart" in path)


def test_resume_keeps_the_consistency_state(method_runs, tmp_path):
  """HART's previous states are checkpointed: a run resumed at step 2 continues with the losses
  (consistency included) of the uninterrupted run."""
  (runs, task) = method_runs
  _, full = runs["quickstart/2_hart.gin"]
  bindings = ["TRAIN_STEPS = 4", "EVAL_PERIOD = 4", f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'"]
  first = _run("quickstart/2_hart.gin", tmp_path, *bindings, "train.stop_after_steps = 2")
  second = _run("quickstart/2_hart.gin", tmp_path, *bindings)
  assert len(first["losses"]) == 2 and len(second["losses"]) == 2
  np.testing.assert_allclose(first["losses"] + second["losses"], full["losses"], rtol=1e-5)
  assert second["eval"] == full["eval"]


@pytest.mark.parametrize("path, tensors", [
    ("quickstart/2_hart.gin", {"prefixes/encoder_self/key": [1, 2, 2, 4, 16],
                               "extra_memory": [1, 48, 64]}),
    ("quickstart/2_hint.gin", {"prefixes/decoder_cross/value": [1, 2, 2, 4, 16],
                               "adapters/encoder/up": [1, 2, 64, 4],
                               "extra_memory": [1, 48, 64]})])
def test_infer_writes_and_applies_the_task_artefact(method_runs, path, tensors, tmp_path):
  """`hypertune.infer` saves what the method generates (prefixes, adapters, the fused
  demonstrations) and answers queries from the file alone."""
  import json  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from hypertune import infer  # pylint: disable=g-import-not-at-top
  d, _ = method_runs[0][path]
  (tmp_path / "demos.json").write_text(json.dumps({"demonstrations": [
      {"input": "apple", "target": "yes"}, {"input": "pear", "target": "no"}]}))
  (tmp_path / "queries.txt").write_text("plum\nkiwi\n")
  for flags in ([f"--gin.infer.demonstrations_file='{tmp_path}/demos.json'"],
                [f"--gin.infer.inputs_file='{tmp_path}/queries.txt'"]):
    gin.clear_config()
    infer.main([f"--gin.MODEL_DIR='{d}'", f"--gin.infer.peft_dir='{tmp_path}/peft'",
                *flags])
  gin.clear_config()
  meta_json = json.loads((tmp_path / "peft" / "peft.json").read_text())
  for name, shape in tensors.items():
    assert meta_json["tensors"][name] == shape, name
  lines = (tmp_path / "peft" / "predictions.jsonl").read_text().splitlines()
  assert [json.loads(l)["input"] for l in lines] == ["plum", "kiwi"]


MESH_SCRIPT = r"""
import json, sys
import gin_training
print("LOSSES", json.dumps({p: gin_training.train([p], b)["losses"]
                            for p, b in json.loads(sys.argv[1]).items()}))
"""


def test_mesh_2x4_matches_one_device(method_runs, tmp_path):
  """Both methods' train step on a (2, 4) mesh of 8 forced CPU devices (batch over 2, model
  over 4; HART's method_state included) gives the single-device losses."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  runs = {p: BUILTIN + RUNS[p] + [f"MODEL_DIR = '{tmp_path}/{i}'", "TRAIN_STEPS = 4",
                                  "EVAL_PERIOD = 0", "partitioning.make_mesh.num_partitions = 4"]
          for i, p in enumerate(RUNS)}
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags_with_devices(8),
             PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests)]))
  out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(runs)], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES")][0]
  losses = json.loads(line[len("LOSSES "):])
  for path in RUNS:
    np.testing.assert_allclose(losses[path], method_runs[0][path][1]["losses"], rtol=2e-4)
