"""Runs that chain: hyperpretraining over a Hugging Face T5, then multi-task fine-tuning from
both (HyperT5's recipe), with run directories that load on their own."""
import os

import gin_training
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from hypertune import param_sources

hf_reference = pytest.importorskip("hf_reference")  # skips without torch / transformers

# The downstream T5 of both stages, as a Hugging Face checkpoint would describe it.
MODEL = ["config.t5_config.size = 'tiny'", "config.t5_config.vocab_size = 384",
         "config.t5_config.dropout_rate = 0.0", "config.t5_config.scan_layers = False",
         "config.t5_config.relative_attention_num_buckets = 8",
         "config.t5_config.relative_attention_max_distance = 32", "PREFIX_LEN = 2",
         "hypert5.HyperT5.num_hyper_decoder_layers = 1", "BATCH_SIZE = 2", "TRAIN_STEPS = 3",
         "train.log_every_steps = 1", "optimizers.linear_warmup_decay.warmup_steps = 0",
         "EVAL_PERIOD = 0"]
TINY_384 = dict(size="tiny", vocab_size=384, dropout_rate=0.0, scan_layers=False)
CORPUS = "\n\n".join(
    f"Document {i}: the hypernetwork reads the beginning and the end of this text, and the "
    f"downstream model continues the middle of it, {i} times over. " * 3 for i in range(8))


def _train(files, model_dir, *bindings):
  return gin_training.train(files, MODEL + [f"MODEL_DIR = '{model_dir}'", *bindings])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A Hugging Face T5 saved by `transformers`, shaped like the tiny config above."""
  from hypertune.models import config  # pylint: disable=g-import-not-at-top
  cfg = config.t5_config(**TINY_384)
  hf_cfg = {k: v for k, v in config.config_to_hf(cfg).items()
            if k not in ("architectures", "model_type", "is_encoder_decoder")}
  torch = hf_reference.torch
  torch.manual_seed(0)
  model = hf_reference.transformers.T5ForConditionalGeneration(
      hf_reference.transformers.T5Config(**hf_cfg)).eval()
  d = str(tmp_path_factory.mktemp("hf_t5"))
  hf_reference.save_untied(model, d)
  return d


@pytest.fixture(scope="module")
def hyperpretrained(hf_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("chain")
  corpus = root / "corpus.txt"
  corpus.write_text(CORPUS)
  run = str(root / "hyperpretrain")
  out = _train(["models/t5_tiny.gin", "models/hypert5_prefix.gin", "runs/hyperpretrain.gin",
                "tasks/hyperpretrain.gin"], run,
               f"INITIAL_CHECKPOINT_PATH = '{hf_dir}'", f"PRETRAIN_TEXT_FILES = ['{corpus}']",
               "common.get_vocabulary.kind = 'byte'", "VOCABULARY_PATH = None",
               "pretraining.register_pretraining.min_tokens = 32",
               "TASK_FEATURE_LENGTHS = {'hyper_inputs': 96, 'inputs': 16, 'targets': 24}")
  return run, out


def _hf_params(hf_dir):
  """The Hugging Face weights in this config's (unscanned) layout, flat."""
  from hypertune.models import config, hf_convert  # pylint: disable=g-import-not-at-top
  cfg = config.t5_config(**TINY_384)
  return {k: np.asarray(v) for k, v in
          flatten_dict(hf_convert.load_hf_t5(hf_dir, config=cfg)[1], sep="/").items()}


def _flat(tree, prefix):
  return {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()
          if k.startswith(prefix)}


def test_hyperpretraining_runs_and_saves_a_self_sufficient_run(hyperpretrained, hf_dir):
  run, out = hyperpretrained
  assert len(out["losses"]) == 3 and np.all(np.isfinite(out["losses"]))
  params = param_sources.load_run_params(run)
  hf = _hf_params(hf_dir)
  ours = _flat(params, "downstream/")
  assert len(ours) == len(hf)
  for k, v in hf.items():  # the frozen downstream is the HF one
    np.testing.assert_array_equal(ours[f"downstream/{k}"], v, err_msg=k)


def test_fine_tuning_starts_from_the_hf_downstream_and_the_hyperpretrained_hypernet(
    hyperpretrained, hf_dir, tmp_path):
  run, _ = hyperpretrained
  pretrained = param_sources.load_run_params(run)
  fine = str(tmp_path / "fine")
  # Learning rate 0: after 3 steps every parameter is still what fine-tuning started from.
  _train(["quickstart.gin", "models/hypert5_prefix.gin"], fine,
         "MIXTURE_OR_TASK_NAME = 'builtin_train'", "LEARNING_RATE = 0.0",
         # A parameter comes from the first checkpoint that has it: the downstream from the
         # Hugging Face directory, the hypernetwork from the hyperpretraining run.
         f"train.initial_checkpoints = ['{hf_dir}', '{run}']",
         "TASK_FEATURE_LENGTHS = {'hyper_inputs': 48, 'inputs': 16, 'targets': 8}")
  started = param_sources.load_run_params(fine)
  hyper_now, hyper_then = _flat(started, "hypernet/"), _flat(pretrained, "hypernet/")
  assert hyper_now.keys() == hyper_then.keys()
  for k in hyper_then:  # hyperpretrained, not re-copied from the downstream model
    np.testing.assert_array_equal(hyper_now[k], hyper_then[k], err_msg=k)
  hf = _hf_params(hf_dir)
  now = _flat(started, "downstream/")
  for k, v in hf.items():
    np.testing.assert_array_equal(now[f"downstream/{k}"], v, err_msg=k)
  # A copy of the downstream encoder would differ: the hyperpretrained encoder trained.
  assert not np.array_equal(hyper_then["hypernet/hyper_encoder/encoder_norm/scale"],
                            hf["encoder/encoder_norm/scale"])


def test_a_run_directory_without_frozen_params_is_named(tmp_path):
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match="frozen_params"):
    param_sources.load_run_params(str(tmp_path))
