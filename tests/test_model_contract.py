"""The model contract (`hypertune.models.base`) is all the trainer, evaluator and infer binary
need: a decoder-only downstream and a hypernetwork that emits encoder memory (fusion-in-decoder)
train, evaluate and deploy through them with no change to evaluation code."""
import json
import os

import flax.linen as nn
import gin
import gin_training
import jax
import jax.numpy as jnp
import numpy as np

from hypertune.models import base
from hypertune.models.peft import PeftParams

TINY = ["config.t5_config.size = 'tiny'", "BATCH_SIZE = 4", "TRAIN_STEPS = 2",
        "optimizers.linear_warmup_decay.warmup_steps = 0", "train.log_every_steps = 1",
        "builtin.register_builtin_suite.k = 2", "train.eval_batch_size = 8",
        "TASK_FEATURE_LENGTHS = {'hyper_inputs': 48, 'inputs': 16, 'targets': 8}"]


class CausalLM(nn.Module):
  """A toy decoder-only language model: embeddings, one causal self-attention, logits."""
  vocab_size: int = 384
  width: int = 32

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):  # [batch, length] -> logits
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    mask = nn.make_causal_mask(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x, mask=mask)
    return nn.Dense(self.vocab_size)(x)


@gin.configurable(module="test_contract")
class DecoderOnlyModel(base.BaseModel):
  """Reads `[inputs ; targets]` as one sequence (a prefix LM): nothing here is T5."""
  FEATURES = ("encoder_input_tokens", "decoder_input_tokens")

  def __init__(self):
    self.module = CausalLM()

  @property
  def has_hypernet(self):
    return False

  def _target_logits(self, params, enc, dec_in):
    logits = self.module.apply({"params": params}, jnp.concatenate([enc, dec_in], axis=1))
    return logits[:, enc.shape[1]:]

  def init_variables(self, rng, batch_shapes):
    enc, dec = batch_shapes["encoder_input_tokens"], batch_shapes["decoder_input_tokens"]
    return self.module.init(rng, jnp.ones((enc[0], enc[1] + dec[1]), jnp.int32))

  def logits(self, params, method_state, batch, rng, deterministic=False):
    return self._target_logits(params, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"]), {}

  def task_parameters(self, params, method_state, hyper_tokens):
    return None

  def score(self, params, task_params, batch):
    logp = jax.nn.log_softmax(self._target_logits(params, batch["encoder_input_tokens"],
                                                  batch["decoder_input_tokens"]))
    ll = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return jnp.sum(ll * batch["decoder_loss_weights"], axis=-1)

  def predict(self, params, task_params, batch, max_decode_len, num_beams=1):
    enc = batch["encoder_input_tokens"]
    out = jnp.zeros((enc.shape[0], max_decode_len + 1), jnp.int32)  # start token 0

    def step(i, out):
      token = jnp.argmax(self._target_logits(params, enc, out[:, :-1])[:, i], axis=-1)
      return out.at[:, i + 1].set(token.astype(jnp.int32))
    return jax.lax.fori_loop(0, max_decode_len, step, out)[:, 1:]


@gin.configurable(module="test_contract")
class MemoryHypernet(nn.Module):
  """Emits encoder memory (as HART / HINT do) instead of prefixes: the downstream decoder reads
  `[memory ; encoded inputs]`. memory `[batch, memory_len, d_model]` from the hyper tokens."""
  d_model: int = 64
  vocab_size: int = 384
  memory_len: int = 4

  @nn.compact
  def __call__(self, hyper_input_tokens, deterministic: bool = True, downstream=None
               ) -> PeftParams:
    tokens = hyper_input_tokens[:, :self.memory_len]
    memory = nn.Dense(self.d_model)(nn.Embed(self.vocab_size, self.d_model)(tokens))
    return PeftParams(extra_memory=memory, extra_memory_mask=(tokens != 0).astype(jnp.int32))


def _train(tmp_path, *bindings):
  return gin_training.train(["quickstart.gin", "models/t5_mtf.gin"],
                            TINY + [f"MODEL_DIR = '{tmp_path}'", *bindings])


def _heldout_tasks():
  from tasks import common  # pylint: disable=g-import-not-at-top
  names = common.mixture_tasks("builtin_heldout_label_words")
  return names[0], common.mixture_tasks("builtin_heldout_families")[0]


def test_decoder_only_model_trains_and_evaluates_through_the_contract(tmp_path):
  from tasks import builtin  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  classification, generation = _heldout_tasks()
  out = _train(tmp_path, "train.model = @test_contract.DecoderOnlyModel()",
               "MIXTURE_OR_TASK_NAME = 'builtin_zeroshot_train'", "EVAL_PERIOD = 2",
               f"EVAL_MIXTURE_OR_TASK_NAME = 'builtin_zeroshot.{classification.split('.', 1)[1]}'")
  assert len(out["losses"]) == 2 and np.all(np.isfinite(out["losses"]))
  result = out["eval"][f"builtin_zeroshot.{classification.split('.', 1)[1]}"]
  assert 0.0 <= result["accuracy"] <= 100.0 and 0.0 <= result["exact_match"] <= 100.0
  # The evaluator runs on the run directory alone (load_run_params), generation included.
  from hypertune.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  from hypertune import param_sources  # pylint: disable=g-import-not-at-top
  model = DecoderOnlyModel()
  params = param_sources.load_run_params(str(tmp_path))
  ev = Evaluator(model, {"hyper_inputs": 48, "inputs": 16, "targets": 8}, batch_size=8)
  again = ev.evaluate(params, [f"builtin_zeroshot.{generation.split('.', 1)[1]}"], "test")
  assert "rougeL" in again["average"]


def test_memory_emitting_hypernet_trains_evaluates_and_deploys(tmp_path):
  from tasks import builtin  # pylint: disable=g-import-not-at-top
  builtin.register_builtin_suite(k=2)
  classification, _ = _heldout_tasks()
  run = tmp_path / "run"
  out = _train(run, "hypermodel.HyperModel.hypernet = @test_contract.MemoryHypernet()",
               "MIXTURE_OR_TASK_NAME = 'builtin_train'", "EVAL_PERIOD = 2",
               "train.frozen_patterns = ['downstream/.*']",
               f"EVAL_MIXTURE_OR_TASK_NAME = '{classification}'")
  assert np.all(np.isfinite(out["losses"])) and "accuracy" in out["eval"][classification]
  # Deployment: the saved task artefact holds the encoded demonstrations (the memory), and
  # decoding with it equals decoding with the memory generated in memory.
  demos = tmp_path / "demos.json"
  demos.write_text(json.dumps({"demonstrations": [{"input": "ab", "target": "X"},
                                                  {"input": "cd", "target": "Y"}]}))
  queries = tmp_path / "queries.txt"
  queries.write_text("ab\ncd\n")
  from hypertune import infer  # pylint: disable=g-import-not-at-top
  peft_dir = tmp_path / "task"
  infer.main([f"--gin.MODEL_DIR='{run}'", f"--gin.infer.demonstrations_file='{demos}'",
              f"--gin.infer.peft_dir='{peft_dir}'", f"--gin.infer.inputs_file='{queries}'"])
  from hypertune.models import peft as peft_lib  # pylint: disable=g-import-not-at-top
  saved, _ = peft_lib.load(str(peft_dir))
  assert saved.extra_memory.shape == (1, 4, 64) and not saved.prefixes
  lines = [json.loads(line) for line in open(os.path.join(peft_dir, "predictions.jsonl"))]
  assert [line["input"] for line in lines] == ["ab", "cd"]


class _EchoHypernetModel(DecoderOnlyModel):
  """Task parameters that are the hyper tokens themselves (as `extra_memory`)."""

  @property
  def has_hypernet(self):
    return True

  def task_parameters(self, params, method_state, hyper_tokens):
    memory = hyper_tokens.astype(jnp.float32)[:, :, None]
    return PeftParams(extra_memory=memory, extra_memory_mask=hyper_tokens > 0)


def test_evaluator_gives_each_row_of_a_mixed_batch_its_own_tasks_parameters():
  """A batch holding three tasks' rows (and padding): the hypernetwork runs once per task,
  from the task's first row, and every row gets its own task's parameters."""
  from hypertune.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  ev = Evaluator(_EchoHypernetModel(), {"hyper_inputs": 3, "inputs": 4, "targets": 2},
                 batch_size=8)
  task_index = np.array([4, 4, 5, 5, 5, 9, 0, 0])  # 6 real rows, then 2 padding rows
  hyper = np.repeat(np.arange(8)[:, None] + 10, 3, axis=1)  # row i: [10+i] * 3
  peft = ev.task_parameters({}, {}, {"task_index": task_index,
                                     "hyper_encoder_input_tokens": hyper}, num_rows=6)
  first_row_of_task = [0, 0, 2, 2, 2, 5]
  np.testing.assert_array_equal(np.asarray(peft.extra_memory)[:6, 0, 0],
                                [10 + i for i in first_row_of_task])
  assert peft.extra_memory.shape == (8, 3, 1)
