"""Every shipped gin file that defines a run is run end to end at tiny size: 2 steps of batch 2
with an evaluation where the file has one, on the built-in suite or on ../shared/data (skipped
where it is absent). A run file that does not run fails here."""
import glob
import os
import re

import gin
import gin_training
import jax
import numpy as np
import pytest

from hypertune import gin_utils

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
# Run files: experiments (one per paper setting) and the quickstart's stages and studies.
# Everything else under gin/ is a fragment (sizes, methods, schedules, data) that they include.
RUN_FILES = sorted(
    os.path.relpath(p, GIN_DIR) for p in
    glob.glob(f"{GIN_DIR}/experiments/**/*.gin", recursive=True) +
    glob.glob(f"{GIN_DIR}/quickstart/*.gin"))

TINY = ["BATCH_SIZE = 2", "TRAIN_STEPS = 2", "EVAL_PERIOD = 2", "train.eval_batch_size = 4",
        "train.log_every_steps = 1", "optimizers.linear_warmup_decay.warmup_steps = 0",
        "train.checkpoint_period = 2"]
# The papers' T5 at "tiny" size, with the T5 SentencePiece vocabulary of ../shared/data.
TINY_T5 = ["config.t5_config.size = 'tiny'", "PREFIX_LEN = 2", "LORA_RANK = 2",
           "hypert5.HyperT5.num_hyper_decoder_layers = 1",
           "hart.HART.num_hyper_decoder_layers = 1", "ADAPTER_BOTTLENECK = 2"]
LENGTHS = "TASK_FEATURE_LENGTHS = {'hyper_inputs': 64, 'inputs': %d, 'targets': 16}"


def _readme_run_files():
  """Run files the README's commands train (tests/test_readme.py runs those commands)."""
  text = open(os.path.join(os.path.dirname(GIN_DIR), "README.md")).read()
  return set(re.findall(r"python -m hypertune\.train --gin_file=(\S+)", text))


def _quickstart_run_files():
  """The quickstart's stages (tests/test_quickstart.py runs the quickstart end to end)."""
  from hypertune import quickstart  # pylint: disable=g-import-not-at-top
  return {f.split("=", 1)[1] for _, _, flags in quickstart.STAGES for f in flags
          if f.startswith("--gin_file=")}


def _method_test_run_files():
  """HART's, HINT's and HyperLlama's built-in-suite runs and per-task PEFT tuning's
  (tests/test_hart_hint.py, tests/test_hyperllama.py and tests/test_peft_tune.py run and
  check them)."""
  import test_hart_hint  # pylint: disable=g-import-not-at-top
  import test_hyperllama  # pylint: disable=g-import-not-at-top
  import test_peft_tune  # pylint: disable=g-import-not-at-top
  return set(test_hart_hint.RUNS) | set(test_hyperllama.RUNS) | set(test_peft_tune.RUNS)


# Each run file is run once in the suite: here, unless another test already runs it.
RUN_ELSEWHERE = _readme_run_files() | _quickstart_run_files() | _method_test_run_files()
RUN_HERE = [p for p in RUN_FILES if p not in RUN_ELSEWHERE]


def test_every_run_file_is_run_by_a_test():
  assert "quickstart/1_downstream.gin" in RUN_FILES
  assert "experiments/hypert5/p3_hypert5_prefix.gin" in RUN_ELSEWHERE  # the README's
  assert RUN_ELSEWHERE <= set(RUN_FILES), RUN_ELSEWHERE - set(RUN_FILES)
  assert set(RUN_HERE) | RUN_ELSEWHERE == set(RUN_FILES)


def _train(path, bindings):
  return gin_training.train([path], bindings)


@pytest.fixture(scope="module")
def hf_t5_dir(tmp_path_factory):
  """A Hugging Face T5 (saved by transformers) of the tiny size, with T5's 32,128 ids."""
  hf_reference = pytest.importorskip("hf_reference")
  from hypertune.models import config  # pylint: disable=g-import-not-at-top
  return hf_reference.save_hf_t5_like(config.t5_config(size="tiny"),
                                      str(tmp_path_factory.mktemp("hf_t5")))


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
  """A Hugging Face Llama directory (random tiny weights) with the T5 vocabulary's 32,128 ids."""
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  from hypertune.models import hf_llama, llama  # pylint: disable=g-import-not-at-top
  cfg = llama.llama_config("tiny", **TINY_LLAMA_CONFIG)
  tokens = jax.numpy.ones((1, 4), jax.numpy.int32)
  mask = llama.causal_mask(tokens > 0)
  params = meta.unbox(jax.jit(lambda: llama.Llama(cfg).init(
      jax.random.key(0), tokens, jax.numpy.zeros_like(tokens), mask))()["params"])
  directory = str(tmp_path_factory.mktemp("hf_llama"))
  hf_llama.save_hf_llama(directory, cfg, params)
  return directory


# Llama with the T5 SentencePiece vocabulary of ../shared/data (pad 0, EOS 1, no BOS: 0).
TINY_LLAMA_CONFIG = dict(vocab_size=32128, bos_id=0, eos_id=1)
TINY_LLAMA = ["llama.llama_config.size = 'tiny'", "NUM_GIST_TOKENS = 2"] + [
    f"llama.llama_config.{k} = {v}" for k, v in TINY_LLAMA_CONFIG.items()]


def _data_bindings(path, shared, tmp):
  """Data macros and tiny registration for the source a run file reads."""
  vocab = f"VOCABULARY_PATH = '{shared}/t5_vocab/spiece.model'"
  name = os.path.basename(path)
  if name.startswith("p3_"):
    return [vocab, f"P3_DATA_DIR = '{shared}/p3'", "p3.register_p3.max_eval_examples = 2",
            "p3.register_p3.heldout = ['super_glue_rte']",
            "p3.register_p3.train_prompts = ['ag_news_classify', "
            "'glue_mrpc_equivalent']", "p3.register_p3.k = 2"]
  if name.startswith("sni_"):
    return [vocab, f"SNI_DATA_DIR = '{shared}/sni'", "sni.register_sni.max_train_instances = 2",
            "sni.register_sni.max_eval_instances = 2"]
  if name.startswith("symbol_"):  # one held-out task under the 10 label seeds
    return [vocab, f"METAICL_DATA_DIR = '{shared}/metaicl'",
            "metaicl.register_metaicl.max_eval_examples = 2", "SYMBOL_TUNING_K = 2",
            "EVAL_MIXTURE_OR_TASK_NAME = 'symbol_seeds.metaicl_hr_to_lr.glue_rte'"]
  if name.startswith(("hyperpretrain_", "hint_pretrain")):
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}. " + "Some words of running text. " * 30
                                  for i in range(6)))
    return [vocab, f"PRETRAIN_TEXT_FILES = ['{corpus}']"]
  raise ValueError(f"{path}: no tiny data bindings for this run file")


# Run files whose runs others start from (MACRO naming the run dir -> the run file).
PRETRAINING = {"HYPERPRETRAINED_DIR": "experiments/hypert5/hyperpretrain_{kind}.gin",
               "HINT_PRETRAINED_DIR": "experiments/hint/hint_pretrain.gin"}


@pytest.fixture(scope="module")
def pretrained(hf_t5_dir, hf_llama_dir, shared_data, tmp_path_factory):
  """run file -> (run dir, output) of its tiny run, run once (hyperpretraining, HINT's
  pretraining) and shared by the runs that start from it."""
  runs = {}

  def get(path):
    if path not in runs:
      tmp = tmp_path_factory.mktemp(os.path.basename(path)[:-4])
      runs[path] = str(tmp / "run"), _train(path, _experiment_bindings(
          path, {"t5": hf_t5_dir, "llama": hf_llama_dir}, shared_data, tmp, {}))
    return runs[path]
  return get


def _experiment_bindings(path, hf_dirs, shared, tmp, starts):
  """Tiny bindings for a run file; `hf_dirs`: {"t5"|"llama": Hugging Face directory};
  `starts`: {macro: run dir} of the runs it starts from."""
  concat = "fewshot" in path or "t5_mtf.gin" in path and "sni_" in path
  family = "llama" if "hyperllama" in path else "t5"
  out = TINY + (TINY_LLAMA if family == "llama" else TINY_T5) + [
      LENGTHS % (96 if concat else 32), f"MODEL_DIR = '{tmp}/run'"]
  if "INITIAL_CHECKPOINT_PATH = %gin.REQUIRED" in open(os.path.join(GIN_DIR, path)).read():
    out.append(f"INITIAL_CHECKPOINT_PATH = '{hf_dirs[family]}'")
  out += [f"{macro} = '{d}'" for macro, d in starts.items()]
  return out + _data_bindings(path, shared, tmp)


@pytest.mark.parametrize("path", [p for p in RUN_HERE if p.startswith("experiments/")])
def test_experiment_runs_end_to_end(path, hf_t5_dir, hf_llama_dir, shared_data, pretrained,
                                   tmp_path):
  name = os.path.basename(path)
  if name.startswith(("hyperpretrain_", "hint_pretrain")):
    _, out = pretrained(path)
  else:
    text = open(os.path.join(GIN_DIR, path)).read()
    kind = "lora" if "lora" in name else "prefix"
    starts = {macro: pretrained(run_file.format(kind=kind))[0]
              for macro, run_file in PRETRAINING.items() if f"{macro} = %gin.REQUIRED" in text}
    out = _train(path, _experiment_bindings(path, {"t5": hf_t5_dir, "llama": hf_llama_dir},
                                            shared_data, tmp_path, starts))
    average = out["eval"]["average"]
    metric = "accuracy" if name.startswith(("p3_", "symbol_")) else "rougeL"
    assert 0.0 <= average[metric] <= 100.0, average
    if name.startswith("symbol_"):  # averaged over the 10 label seeds
      assert out["eval"]["symbol_avg.metaicl_hr_to_lr.glue_rte"]["accuracy/num_seeds"] == 10
  assert len(out["losses"]) == 2 and np.all(np.isfinite(out["losses"]))


QUICKSTART_TINY = TINY + ["config.t5_config.size = 'tiny'", "PREFIX_LEN = 2",
                          "hypert5.HyperT5.num_hyper_decoder_layers = 1",
                          "builtin.register_builtin_suite.k = 2"]


@pytest.mark.parametrize("path", [p for p in RUN_HERE if p.startswith("quickstart/")])
def test_quickstart_file_runs_end_to_end(path, tmp_path):
  """The quickstart's studies (binding.gin, families.gin), which train from scratch."""
  from tasks import builtin, common  # pylint: disable=g-import-not-at-top
  assert "INITIAL_CHECKPOINT_PATH" not in open(os.path.join(GIN_DIR, path)).read()
  bindings = QUICKSTART_TINY + [f"MODEL_DIR = '{tmp_path}'"]
  # Evaluate on one task of the file's own evaluation mixture (names as any registration).
  builtin.register_builtin_suite(k=2)
  gin.clear_config()
  gin_utils.parse([path], bindings)
  eval_name = gin.query_parameter("%EVAL_MIXTURE_OR_TASK_NAME")
  gin.clear_config()
  task = common.mixture_tasks(eval_name)[0]
  out = _train(path, bindings + [f"EVAL_MIXTURE_OR_TASK_NAME = '{task}'"])
  assert len(out["losses"]) == 2 and np.all(np.isfinite(out["losses"]))
  assert out["eval"]["average"]
